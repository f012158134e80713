"""The workload of `vyre-sqlcache demo`: synthetic pipelines written, read back, invalidated
by impact mask and removed again, through the public API only.

It prints nothing and chooses no file: the command line does both (see `cli.py`). It
counts nothing into the cache either: the writer only writes (a cache counts hits and
misses of its reads only), the reads go through a read-only cache object, whose counts
never reach the file, and nothing is flushed (a flush is counted in the file).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from .cache import PipelineCache
from .keys import DeviceFingerprint, FeatureFlags, PipelineCacheKey

__all__ = [
    "BACKEND",
    "FINGERPRINT",
    "MAX_COUNT",
    "MIN_COUNT",
    "Outcome",
    "Workload",
    "remove",
    "run",
]

#: The backend name of every demo entry, so that they are easy to find and remove (the
#: library records no departure of this backend's entries: `_explain_sql.DEMO_BACKEND`).
BACKEND = "demo"
#: The demo's device.
FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2684, "demo-driver-1.0")
#: How many pipelines `demo --count` may ask for.
MIN_COUNT, MAX_COUNT = 1, 100_000
#: Pipelines written or read in one call (bounds the memory a large count takes).
BATCH = 256


@dataclass(frozen=True)
class Workload:
    """`count` synthetic pipelines made from `seed`: the same seed gives the same ones.

    Blobs are made again from the seed when they are compared, so only their sizes and
    digests are held in memory.
    """

    seed: int
    count: int

    @cached_property
    def _rng_state(self) -> tuple[list[int], list[bytes], list[PipelineCacheKey]]:
        rng = random.Random(self.seed)
        sizes = [rng.randint(1024, 64 * 1024) for _ in range(self.count)]
        digests = [rng.randbytes(32) for _ in range(self.count)]
        keys = [
            PipelineCacheKey(
                shader_hash=rng.randbytes(32),
                bind_group_layout_hash=rng.randbytes(32),
                push_constant_size=rng.choice((0, 16, 64, 128)),
                workgroup_size=(rng.choice((32, 64, 128, 256)), 1, 1),
                feature_flags=FeatureFlags(rng.getrandbits(9)),
                backend=BACKEND,
            )
            for _ in range(self.count)
        ]
        return sizes, digests, keys

    @property
    def sizes(self) -> list[int]:
        return self._rng_state[0]

    @property
    def digests(self) -> list[bytes]:
        return self._rng_state[1]

    @property
    def keys(self) -> list[PipelineCacheKey]:
        return self._rng_state[2]

    @property
    def total_bytes(self) -> int:
        """Blob bytes the demo stores."""
        return sum(self.sizes)

    def blob(self, index: int) -> bytes:
        """The bytes of pipeline `index`."""
        return random.Random(f"{self.seed}:{index}").randbytes(self.sizes[index])

    def batches(self) -> Iterator[range]:
        for start in range(0, self.count, BATCH):
            yield range(start, min(start + BATCH, self.count))


@dataclass(frozen=True)
class Outcome:
    """What the demo did and how long it took."""

    written: int
    write_s: float
    intact: int
    read_s: float
    marked: int
    invalidated: int
    missing_after: int

    def ok(self, count: int) -> bool:
        """Whether every pipeline came back intact and exactly the marked ones went."""
        return self.intact == count and self.invalidated == self.missing_after == self.marked


def run(writer: PipelineCache, reader: PipelineCache, workload: Workload) -> Outcome:
    """Write the workload through `writer`, read it back through `reader` (read-only, on
    the same file) and invalidate every fourth pipeline by impact mask. Raises CacheError
    types as the cache does."""
    keys, digests = workload.keys, workload.digests
    start = time.perf_counter()
    for batch in workload.batches():
        writer.put_many([(keys[i], workload.blob(i), digests[i]) for i in batch], FINGERPRINT)
    write_s = time.perf_counter() - start

    intact = 0
    read_s = 0.0
    for batch in workload.batches():
        start = time.perf_counter()
        got = reader.get_many([keys[i] for i in batch], FINGERPRINT)
        read_s += time.perf_counter() - start
        intact += sum(blob == workload.blob(i) for blob, i in zip(got, batch, strict=True))

    mask = [1 if i % 4 == 0 else 0 for i in range(workload.count)]
    invalidated = writer.invalidate_impacted(mask, digests, FINGERPRINT)
    missing_after = sum(not reader.contains(key, FINGERPRINT) for key in keys)
    return Outcome(
        written=workload.count,
        write_s=write_s,
        intact=intact,
        read_s=read_s,
        marked=sum(mask),
        invalidated=invalidated,
        missing_after=missing_after,
    )


def remove(writer: PipelineCache, workload: Workload) -> int:
    """Delete the workload's entries; return how many there were."""
    return writer.delete_entries(key.entry_key(FINGERPRINT) for key in workload.keys)
