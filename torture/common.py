"""Numbered keys (slots), tagged blobs and checks of a file, shared by the trials."""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from vyre_sqlcache import (
    CacheError,
    DeviceFingerprint,
    FeatureFlags,
    PipelineCache,
    PipelineCacheKey,
)

#: The device every trial writes for.
FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2684, "torture 1.0")
#: How many lines of detail a report keeps about each kind of failure.
MAX_DETAILS = 8


def _hash32(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def is_keyed(slot: int) -> bool:
    """Every fourth slot is a `PipelineCacheKey` entry; the others are program entries."""
    return slot % 4 == 3


def program_digest(slot: int) -> bytes:
    """The program digest of a slot (keyed slots carry it, for invalidation)."""
    return _hash32("program", slot)


def pipeline_key(slot: int) -> PipelineCacheKey:
    """The `PipelineCacheKey` of a keyed slot."""
    return PipelineCacheKey(
        shader_hash=_hash32("shader", slot),
        bind_group_layout_hash=_hash32("layout", slot % 7),
        push_constant_size=16 * (slot % 5),
        workgroup_size=(64, 1 + slot % 3, 1),
        feature_flags=FeatureFlags.SUBGROUP_OPS | FeatureFlags(slot % 512),
        backend="vulkan",
    )


def entry_key_of(slot: int) -> bytes:
    """The entry key a slot is stored under."""
    if is_keyed(slot):
        return pipeline_key(slot).entry_key(FINGERPRINT)
    return FINGERPRINT.cache_key(program_digest(slot))


def write_slots(cache: PipelineCache, items: Sequence[tuple[int, bytes]]) -> None:
    """Store slots of one kind in one transaction (`write_many` or `put_many`)."""
    if is_keyed(items[0][0]):
        cache.put_many(
            [(pipeline_key(s), blob, program_digest(s)) for s, blob in items], FINGERPRINT
        )
    else:
        cache.write_many([(program_digest(s), blob) for s, blob in items], FINGERPRINT)


def read_slot(cache: PipelineCache, slot: int) -> bytes | None:
    """Read a slot through the API it was written with."""
    if is_keyed(slot):
        return cache.get(pipeline_key(slot), FINGERPRINT)
    return cache.read(program_digest(slot), FINGERPRINT)


def invalidate_slots(cache: PipelineCache, slots: Sequence[int], mask: Sequence[int]) -> int:
    """`invalidate_impacted` over the slots' program digests."""
    return cache.invalidate_impacted(mask, [program_digest(s) for s in slots], FINGERPRINT)


def sha(blob: bytes | None) -> str | None:
    """A short fingerprint of a blob for logs and models (None stays None)."""
    return None if blob is None else hashlib.sha256(blob).hexdigest()[:32]


def blob_size(rng: random.Random, largest: int = 256 * 1024) -> int:
    """A blob size: mostly small, often a few pages, sometimes up to `largest`."""
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(0, 4096)
    if roll < 0.85:
        return rng.randint(4097, min(64 * 1024, largest))
    return rng.randint(min(64 * 1024, largest), largest)


def tagged_blob(entry_key: bytes, nonce: int, size: int) -> bytes:
    """Bytes that prove which key and version they were written for (see `tag_matches`)."""
    body = random.Random(entry_key + nonce.to_bytes(8, "big")).randbytes(max(0, size - 8))
    return nonce.to_bytes(8, "big") + body


def tag_matches(entry_key: bytes, blob: bytes) -> bool:
    """Whether `blob` is a whole `tagged_blob` of this key (any version)."""
    if len(blob) < 8:
        return False
    return tagged_blob(entry_key, int.from_bytes(blob[:8], "big"), len(blob)) == blob


# -- checking a file from outside the library ------------------------------------------


@dataclass
class FileCheck:
    """What a raw look at a cache file found."""

    integrity: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    entry_keys: set[bytes] = field(default_factory=set)
    entries: int = 0
    blob_bytes: int = 0

    @property
    def sound(self) -> bool:
        return self.integrity == ["ok"]

    @property
    def ok(self) -> bool:
        return self.sound and not self.problems


def check_file(path: Path, blob_ok: Callable[[bytes, bytes], bool] | None = None) -> FileCheck:
    """Check a cache file: `integrity_check`, the counters kept in `meta` against the rows,
    sizes against the blobs and no orphans (with a plain connection); then every entry's
    checksum through `PipelineCache.check_entry` (a read-only, strict open that changes
    nothing), and, given `blob_ok(entry_key, blob)`, every blob against the trial's model
    of what it wrote."""
    found = FileCheck()
    blobs: dict[bytes, bytes] = {}
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        connection.set_busy_timeout(10_000)
        found.integrity = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
        if not found.sound:
            return found
        # A damaged name may not be UTF-8: read it as bytes.
        meta = {
            bytes(n).decode("utf-8", "replace"): int(v)
            for n, v in connection.execute("SELECT CAST(name AS BLOB), value FROM meta")
        }
        count, sizes = connection.execute(
            "SELECT count(*), coalesce(sum(blob_size), 0) FROM entries"
        ).fetchone() or (0, 0)
        found.entries, found.blob_bytes = int(count), int(sizes)
        if meta.get("entries") != count or meta.get("blob_bytes") != sizes:
            found.problems.append(
                f"meta says {meta.get('entries')} entries / {meta.get('blob_bytes')} bytes, "
                f"rows say {count} / {sizes}"
            )
        rows = connection.execute(
            "SELECT e.entry_key, e.blob_size, b.data FROM entries e LEFT JOIN blobs b USING (id)"
        )
        for entry_key, size, data in rows:
            assert isinstance(entry_key, bytes)
            found.entry_keys.add(entry_key)
            if data is None:
                found.problems.append(f"entry {entry_key.hex()[:16]} has no blob")
            elif len(data) != size:
                found.problems.append(f"entry {entry_key.hex()[:16]} size {size} != {len(data)}")
            elif blob_ok is not None:
                blobs[entry_key] = bytes(data)
        (orphans,) = connection.execute(
            "SELECT count(*) FROM blobs WHERE id NOT IN (SELECT id FROM entries)"
        ).fetchone() or (0,)
        if orphans:
            found.problems.append(f"{orphans} blobs without an entry")
    finally:
        connection.close()
    found.problems += _check_entries(path, found.entry_keys)
    for entry_key, blob in blobs.items():
        if blob_ok is not None and not blob_ok(entry_key, blob):
            found.problems.append(
                f"entry {entry_key.hex()[:16]} holds bytes the trial did not write there"
            )
    return found


def _check_entries(path: Path, entry_keys: set[bytes]) -> list[str]:
    """Every entry's bytes against its checksum, by the library's own `check_entry`."""
    problems: list[str] = []
    try:
        with PipelineCache.open(path, readonly=True, strict=True) as cache:
            for entry_key in sorted(entry_keys):
                if cache.check_entry(entry_key) is False:
                    problems.append(f"entry {entry_key.hex()[:16]} fails its checksum")
    except CacheError as error:
        problems.append(f"check_entry: {type(error).__name__}: {error}")
    return problems


def moved_aside(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.parent.glob(path.name + ".corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    )


def remove_cache_files(path: Path) -> None:
    """Start a trial from no file (a reused work folder may hold an earlier run's)."""
    for old in path.parent.glob(path.name + "*"):
        if old.is_file():
            old.unlink()


#: The folder that holds the `torture` package (the source tree's root).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def child_command(*args: object) -> list[str]:
    """`python -m torture child-...`: paths made absolute, since children run in
    `SOURCE_ROOT` (see `child_options`)."""
    return [
        sys.executable,
        "-m",
        "torture",
        *(os.path.abspath(a) if isinstance(a, Path) else str(a) for a in args),
    ]


def child_options() -> dict[str, Any]:
    """`subprocess` options for a child: run in the source tree with it on PYTHONPATH, so
    `python -m torture` finds this package (and the library beside it) from any cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return {"cwd": SOURCE_ROOT, "env": env}


def bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def add_detail(details: list[str], text: str) -> None:
    if len(details) < MAX_DETAILS:
        details.append(text)
