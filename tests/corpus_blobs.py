"""Real compiler output for the layer, bundle and merge tests: small files of the
shared corpus (PTX, Triton IR, metadata JSON), read once per process."""

from __future__ import annotations

import hashlib
import tarfile
from functools import cache
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "gpu-artifacts.tar.xz"
_FALLBACK = Path(__file__).resolve().parents[1] / "shared" / "corpus" / "gpu-artifacts.tar.xz"
_SUFFIXES = (".ptx", ".ttir", ".ttgir", ".llir", ".json", ".source")


@cache
def blobs(count: int = 64, max_bytes: int = 24 * 1024) -> tuple[bytes, ...]:
    """`count` distinct corpus files of at most `max_bytes`, in archive order.

    Without the corpus (a checkout without shared/), PTX-like text made from a hash chain
    stands in, so the tests still run on compressible, distinct bytes.
    """
    tarball = TARBALL if TARBALL.is_file() else _FALLBACK
    found: list[bytes] = []
    seen: set[bytes] = set()
    if tarball.is_file():
        with tarfile.open(tarball, "r|xz") as archive:
            for member in archive:
                if not member.isfile() or not member.name.endswith(_SUFFIXES):
                    continue
                if not 64 <= member.size <= max_bytes:
                    continue
                handle = archive.extractfile(member)
                assert handle is not None
                data = handle.read()
                if data not in seen:
                    seen.add(data)
                    found.append(data)
                if len(found) == count:
                    return tuple(found)
    seed = b"ptx"
    while len(found) < count:
        seed = hashlib.sha256(seed).digest()
        found.append(b".visible .entry k_%s() {\n  ret;\n}\n" % seed.hex().encode() * 40)
    return tuple(found)
