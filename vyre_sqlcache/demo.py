"""The demo: a few hundred synthetic pipelines written, read back and invalidated."""

from __future__ import annotations

import random
import time
from pathlib import Path

from .cache import PipelineCache
from .keys import DeviceFingerprint, FeatureFlags, PipelineCacheKey

__all__ = ["DEMO_BACKEND", "run"]

#: The backend name of every demo entry, so that they are easy to find and remove.
DEMO_BACKEND = "demo"


def run(path: Path | None, *, count: int, keep: bool, seed: int) -> int:
    """Run the demo on the cache at `path` (None: the default); return 0 if all went well.

    Raises CacheError if the cache cannot be opened or written.
    """
    rng = random.Random(seed)
    fingerprint = DeviceFingerprint.from_parts(0x10DE, 0x2684, "demo-driver-1.0")
    created = not PipelineCache.resolve_path(path).exists()
    with PipelineCache.open(path) as cache:
        print(f"cache: {cache.path}")
        before = len(cache)
        digests = [rng.randbytes(32) for _ in range(count)]
        keys = [
            PipelineCacheKey(
                shader_hash=rng.randbytes(32),
                bind_group_layout_hash=rng.randbytes(32),
                push_constant_size=rng.choice((0, 16, 64, 128)),
                workgroup_size=(rng.choice((32, 64, 128, 256)), 1, 1),
                feature_flags=FeatureFlags(rng.getrandbits(9)),
                backend=DEMO_BACKEND,
            )
            for _ in range(count)
        ]
        blobs = [rng.randbytes(rng.randint(1024, 64 * 1024)) for _ in range(count)]

        start = time.perf_counter()
        cache.put_many(zip(keys, blobs, digests, strict=True), fingerprint)
        cache.flush()
        took = time.perf_counter() - start
        total = sum(map(len, blobs))
        print(
            f"wrote    {count} pipelines ({total / 1e6:.1f} MB) and flushed in {took * 1e3:.1f} ms"
        )

        start = time.perf_counter()
        read = [cache.get(key, fingerprint) for key in keys]
        took = time.perf_counter() - start
        intact = sum(1 for got, want in zip(read, blobs, strict=True) if got == want)
        print(f"read     {count} pipelines in {took * 1e3:.1f} ms: {intact} intact")

        mask = [1 if i % 4 == 0 else 0 for i in range(count)]
        removed = cache.invalidate_impacted(mask, digests, fingerprint)
        gone = sum(1 for key in keys if not cache.contains(key, fingerprint))
        print(
            f"invalidated {removed} pipelines by impact mask ({sum(mask)} marked); {gone} now miss"
        )

        stats = cache.stats()
        print(
            f"totals:  {stats.entries} entries, {stats.blob_bytes / 1e6:.1f} MB of blobs in a "
            f"{stats.file_bytes / 1e6:.1f} MB file ({before} entries before the demo)"
        )
        if not keep:
            cache.delete_entries(key.entry_key(fingerprint) for key in keys)
            cache.flush()
            print(
                f"removed the demo's entries: {len(cache)} entries remain (use --keep to keep them)"
            )
    if created and not keep:
        # The demo made the file: leave no file behind, as there was none.
        for suffix in ("", "-wal", "-shm"):
            Path(str(cache.path) + suffix).unlink(missing_ok=True)
        print(f"removed {cache.path}, which the demo had created")
    ok = intact == count and gone == sum(mask)
    return 0 if ok else 1
