"""``python -m benchmarks.write_latency``: what a caller's ``write()`` costs, call by call.

A loop of single ``write()`` calls of random 4 KiB blobs into a fresh cache, each
call timed, then one ``flush()``; with write-behind (the default) and without it,
in alternating rounds. Prints the median, p99 and largest ``write()`` and the
flush, in microseconds: the figure an application's hot loop sees while the
writer thread commits beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from vyre_sqlcache import DeviceFingerprint, PipelineCache

FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2684, "write latency")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def one_round(folder: Path, count: int, size: int, *, write_behind: bool) -> dict[str, float]:
    """Time `count` writes and the flush into a fresh cache file."""
    path = folder / f"cache-{time.time_ns()}.sqlite3"
    blobs = [(os.urandom(32), os.urandom(size)) for _ in range(count)]
    calls: list[float] = []
    with PipelineCache.open(
        path, max_bytes=None, compression="off", write_behind=write_behind
    ) as cache:
        for digest, blob in blobs:
            start = time.perf_counter_ns()
            cache.write(digest, FINGERPRINT, blob)
            calls.append((time.perf_counter_ns() - start) / 1000)
        start = time.perf_counter_ns()
        cache.flush()
        flush_us = (time.perf_counter_ns() - start) / 1000
    return {
        "p50": percentile(calls, 0.5),
        "p99": percentile(calls, 0.99),
        "max": max(calls),
        "flush": flush_us,
        "per_entry": (sum(calls) + flush_us) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.write_latency")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"write-behind": [], "commit per write": []}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
        for _ in range(args.rounds):
            for name, behind in (("write-behind", True), ("commit per write", False)):
                results[name].append(
                    one_round(Path(folder), args.count, args.size, write_behind=behind)
                )
    summary = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for name, rounds in results.items()
    }
    print(
        json.dumps(
            {"count": args.count, "size": args.size, "rounds": args.rounds, **summary}, indent=1
        )
    )


if __name__ == "__main__":
    main()
