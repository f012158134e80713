"""``python -m benchmarks.miss_log``: what the miss log costs a miss, and that a hit pays
nothing for it.

A cache is filled with the corpus's files (real compiler output, keyed by
PipelineCacheKey; random bytes where the corpus is not there). Each round opens it
twice, with the miss log off and on (in alternating order), and times a loop of
``get()`` calls that hit, then a loop of ``get()`` calls that miss (keys never
written); each miss with the log on is buffered, and written every
``MISS_WRITE_AT`` misses in a short transaction of its own, which the loop pays
for. Prints the median over rounds of the mean time a call, in microseconds, and
the on/off ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import blake3

from benchmarks import corpus
from vyre_sqlcache import DeviceFingerprint, FeatureFlags, PipelineCache, PipelineCacheKey

KINDS = ("hit", "miss")
FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2330, "miss log")


def key(index: int, salt: bytes = b"") -> PipelineCacheKey:
    """A distinct key (`salt` gives keys never written)."""
    digest = blake3.blake3(b"miss-log:%d:" % index + salt).digest()
    return PipelineCacheKey(digest, bytes(32), 16, (128, 1, 1), FeatureFlags.SUBGROUP_OPS, "cuda")


def blobs(count: int, workdir: Path) -> tuple[list[bytes], str]:
    """`count` blobs from the corpus (cycled), or random 4 KiB ones without it."""
    if corpus.DEFAULT_TARBALL.exists():
        root = corpus.unpack(corpus.DEFAULT_TARBALL, workdir / "corpus")
        files = [item.blob for item in corpus.item_sets(root)["files"]]
        return [files[i % len(files)] for i in range(count)], "corpus files"
    return [os.urandom(4096) for _ in range(count)], "random 4 KiB"


def one_round(
    path: Path, hits: list[PipelineCacheKey], misses: list[PipelineCacheKey], *, log: bool
) -> dict[str, float]:
    """Mean microseconds a `get` that hits and one that misses, on a fresh open."""
    with PipelineCache.open(path, log_misses=log) as cache:
        get = cache.get
        for k in hits[:100]:  # connections, dictionaries and pages warm
            get(k, FINGERPRINT)
        start = time.perf_counter_ns()
        for k in hits:
            get(k, FINGERPRINT)
        hit_us = (time.perf_counter_ns() - start) / 1000 / len(hits)
        start = time.perf_counter_ns()
        for k in misses:
            get(k, FINGERPRINT)
        miss_us = (time.perf_counter_ns() - start) / 1000 / len(misses)
    return {"hit": hit_us, "miss": miss_us}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.miss_log")
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--misses", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"log off": [], "log on": []}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
        workdir = Path(folder)
        data, source = blobs(args.entries, workdir)
        path = workdir / "cache.sqlite3"
        hits = [key(i) for i in range(args.entries)]
        with PipelineCache.open(path, max_bytes=None) as cache:
            cache.put_many(list(zip(hits, data, strict=True)), FINGERPRINT)
        for number in range(args.rounds):
            order = (False, True) if number % 2 == 0 else (True, False)
            for log in order:
                misses = [key(i, b"miss:%d:%d" % (number, log)) for i in range(args.misses)]
                figures = one_round(path, hits, misses, log=log)
                results["log on" if log else "log off"].append(figures)
        with PipelineCache.open(path, readonly=True) as cache:
            logged = len(cache.misses(limit=10_000))
    summary = {
        name: {kind: round(statistics.median(r[kind] for r in rounds), 3) for kind in KINDS}
        for name, rounds in results.items()
    }
    print(
        json.dumps(
            {
                "blobs": source,
                "entries": args.entries,
                "misses_per_round": args.misses,
                "rounds": args.rounds,
                "us_per_call": summary,
                "hit_on_over_off": round(summary["log on"]["hit"] / summary["log off"]["hit"], 3),
                "miss_on_over_off": round(
                    summary["log on"]["miss"] / summary["log off"]["miss"], 3
                ),
                "miss_cost_us": round(summary["log on"]["miss"] - summary["log off"]["miss"], 3),
                "rows_in_the_log": logged,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
