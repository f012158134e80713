"""Real compiler output for the layer, bundle and merge tests: small files of the
shared corpus (PTX, Triton IR, metadata JSON), read once per process."""

from __future__ import annotations

import random
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
    ops = (
        b"mov.u32",
        b"add.s32",
        b"ld.global.f32",
        b"st.global.f32",
        b"fma.rn.f32",
        b"setp.lt.s32",
    )
    while len(found) < count:
        # Small kernels of one vocabulary: a dictionary shrinks them further, as on the corpus.
        rng = random.Random(len(found))
        lines = [b".visible .entry k%d(.param .u64 p0)\n{\n" % len(found)]
        for _ in range(60):
            a, b, c = rng.randrange(256), rng.randrange(256), rng.randrange(1 << 16)
            lines.append(b"\t%s \t%%r%d, %%r%d, %d;\n" % (rng.choice(ops), a, b, c))
        found.append(b"".join(lines) + b"\tret;\n}\n")
    return tuple(found)
