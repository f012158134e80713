"""Time and peak memory of the command line's bulk commands on a synthetic cache.

``python -m benchmarks.commands [--entries 100000] [--dir DIR]`` builds a cache of
small imported entries (200 B to 2 KiB of random bytes, written with `put_entries` in
large batches), then runs each command in a child process and reports its wall time and
peak resident memory (`ru_maxrss` of that child alone, from `os.wait4`):

- ``ls --json``
- ``sql --json "SELECT * FROM pipelines_v"``
- ``export-dir`` into an empty folder
- ``import-dir`` of that folder into a new cache

The command's standard output goes to /dev/null, as when it is piped to a file.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vyre_sqlcache import PipelineCache

BATCH = 10_000


def build(path: Path, count: int, seed: int = 1) -> None:
    """A cache of `count` imported entries of 200 B to 2 KiB of random bytes."""
    rng = random.Random(seed)
    now = time.time_ns() // 1_000_000
    with PipelineCache.open(path, max_bytes=None, write_behind=False) as cache:
        for start in range(0, count, BATCH):
            items = [
                (
                    rng.randbytes(32),
                    rng.randbytes(rng.randint(200, 2048)),
                    now - rng.randint(0, 86_400_000),
                )
                for _ in range(min(BATCH, count - start))
            ]
            cache.put_entries(items)
        cache.flush()


def measure(argv: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in bytes and exit status of one command in a child."""
    command = [sys.executable, "-m", "vyre_sqlcache", *argv]
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        child = subprocess.Popen(command, stdout=sink)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, child.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vyre-commands-", dir=args.dir) as work:
        folder = Path(work)
        cache = folder / "cache.sqlite3"
        start = time.perf_counter()
        build(cache, args.entries)
        print(f"built {args.entries} entries in {time.perf_counter() - start:.1f} s")
        path = ["--path", str(cache)]
        runs = {
            "ls --json": ["ls", "--json", *path],
            "sql --json (pipelines_v)": ["sql", "--json", "SELECT * FROM pipelines_v", *path],
            "export-dir": ["export-dir", str(folder / "tree"), *path],
            "import-dir": ["import-dir", str(folder / "tree"), "--path", str(folder / "new")],
        }
        print(f"| command ({args.entries} entries) | time | peak RSS |")
        print("|---|---:|---:|")
        for name, command in runs.items():
            seconds, rss, status = measure(command)
            failed = "" if status == 0 else f" (exit {status})"
            print(f"| `{name}` | {seconds:.1f} s | {rss / 1e6:.0f} MB{failed} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
