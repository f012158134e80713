"""``python -m benchmarks.layers``: a read served by a read-only layer against a direct hit.

The same entries (4 KiB slices of the shared corpus, or random bytes without it) are
stored once in a user cache file ("direct") and once in a layer bundled from it,
read through an empty user cache ("layer": every read misses the user's file, looks
at its masks and hits the layer). Each round starts a fresh process per mode, in
alternating order, which opens the cache and reads every key once in a shuffled
order (first reads of distinct keys); the figure is microseconds per read, the
median over rounds, and the ratio layer / direct (the target is at most 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vyre_sqlcache import DeviceFingerprint, PipelineCache

FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2684, "layer benchmark")
TARBALL = Path(__file__).resolve().parent.parent.parent / "shared/corpus/gpu-artifacts.tar.xz"


def make_blobs(count: int, size: int) -> list[bytes]:
    """`count` distinct blobs of `size` bytes cut from the corpus (random without it)."""
    pool = b""
    if TARBALL.is_file():
        import tarfile

        parts: list[bytes] = []
        total = 0
        with tarfile.open(TARBALL, "r|xz") as archive:
            for member in archive:
                if member.isfile():
                    handle = archive.extractfile(member)
                    assert handle is not None
                    parts.append(handle.read())
                    total += member.size
                    if total >= 8 * count * size:
                        break
        pool = b"".join(parts)
    if len(pool) < size * 2:
        return [os.urandom(size) for _ in range(count)]
    step = max(1, (len(pool) - size) // count)
    # The index makes each blob distinct even where the corpus repeats itself.
    return [
        (n.to_bytes(8, "little") + pool[n * step : n * step + size])[:size] for n in range(count)
    ]


def digests(count: int) -> list[bytes]:
    return [n.to_bytes(4, "little") * 8 for n in range(count)]


def prepare(folder: Path, count: int, size: int) -> None:
    direct = folder / "direct.sqlite3"
    with PipelineCache.open(direct, max_bytes=None, compression="off") as cache:
        blobs = make_blobs(count, size)
        pairs = list(zip(digests(count), blobs, strict=True))
        for start in range(0, count, 500):
            cache.write_many(pairs[start : start + 500], FINGERPRINT)
        cache.bundle(folder / "app.layer")
    with PipelineCache.open(folder / "user.sqlite3", max_bytes=None) as user:
        user.flush()


def child(folder: Path, mode: str, count: int, seed: int) -> None:
    """Open the cache of `mode`, read every key once in a shuffled order, print µs/read."""
    order = digests(count)
    random.Random(seed).shuffle(order)
    if mode == "direct":
        cache = PipelineCache.open(folder / "direct.sqlite3", readonly=True)
    else:
        cache = PipelineCache.open(
            folder / "user.sqlite3", readonly=True, layers=[folder / "app.layer"]
        )
    with cache:
        cache.read(b"\xff" * 32, FINGERPRINT)  # the connections are open before timing
        start = time.perf_counter_ns()
        for digest in order:
            if cache.read(digest, FINGERPRINT) is None:
                raise SystemExit(f"{mode}: a read missed")
        elapsed = time.perf_counter_ns() - start
        stats = cache.stats()
    assert stats.layer_hits == (count if mode == "layer" else 0)
    print(json.dumps({"us_per_read": elapsed / count / 1000}))


def run_child(folder: Path, mode: str, count: int, seed: int) -> float:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.layers", "--child", mode),
            *("--folder", str(folder), "--count", str(count), "--seed", str(seed)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(result.stdout)["us_per_read"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layers")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--child", choices=["direct", "layer"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.child:
        child(args.folder, args.child, args.count, args.seed)
        return 0
    with tempfile.TemporaryDirectory(prefix="vyre-layers-") as temporary:
        folder = Path(temporary)
        prepare(folder, args.count, args.size)
        times: dict[str, list[float]] = {"direct": [], "layer": []}
        for round_number in range(args.rounds):
            modes = ["direct", "layer"] if round_number % 2 == 0 else ["layer", "direct"]
            for mode in modes:
                times[mode].append(run_child(folder, mode, args.count, args.seed + round_number))
    direct = statistics.median(times["direct"])
    layer = statistics.median(times["layer"])
    figures = {
        "count": args.count,
        "size": args.size,
        "rounds": args.rounds,
        "direct_us": round(direct, 2),
        "layer_us": round(layer, 2),
        "ratio": round(layer / direct, 2),
        "all": times,
    }
    print(
        f"{args.count} first reads of {args.size} B, median of {args.rounds} fresh processes: "
        f"direct hit {direct:.2f} µs, layer hit {layer:.2f} µs, ratio {layer / direct:.2f}x "
        "(target at most 1.5x)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
