"""Deletion trials: the cache file deleted while threads write and read it.

A process opens a cache (write-behind or not) and runs three threads that write
entries, each under a new key, and read back earlier ones. Its main thread
deletes the file at random moments (the file with its -wal and -shm, the main
file alone, or the whole folder) and calls `flush()` in between. The contract
under test (README, "The file deleted or replaced while open"): a deletion takes
what was flushed before it; every entry written before a `flush()` that returned
after the last deletion must be in the file at the path, with its bytes; no read
returns bytes that were never written under its key; calls raise nothing but
`CacheError`. Afterwards the file must pass `integrity_check`.

Run one trial by hand: `python -m torture child-delete PATH SECONDS SEED`.
"""

from __future__ import annotations

import bisect
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vyre_sqlcache import CacheError, PipelineCache

from .lifecycle import (
    FINGERPRINT,
    ROOT,
    TRIAL_TIMEOUT_S,
    _child_env,
    blob_of,
    check_digests,
    digest_of,
)

HOW = ("files", "main file only", "folder")
WORKERS = 3


def _delete(path: Path, how: str) -> None:
    if how == "folder":
        shutil.rmtree(path.parent, ignore_errors=True)
        return
    sides = [] if how == "main file only" else [f"{path.name}-wal", f"{path.name}-shm"]
    for name in [path.name, *sides]:
        (path.parent / name).unlink(missing_ok=True)


def deletion_trial(path: Path, seconds: float, seed: int) -> dict[str, object]:
    """One trial in this process; the figures as a dict (see `DeletionReport`)."""
    rng = random.Random(seed)
    cache = PipelineCache.open(path, max_bytes=None, write_behind=bool(seed % 2))
    stop = threading.Event()
    # (before the call, after it returned, digest) of every write that returned
    written: list[list[tuple[float, float, bytes]]] = [[] for _ in range(WORKERS)]
    wrong = 0
    cache_errors = 0
    other_errors: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        nonlocal wrong, cache_errors
        mine = written[index]
        own = random.Random(seed * 31 + index)
        count = 0
        while not stop.is_set():
            digest = digest_of("delete", seed, index, count)
            count += 1
            try:
                called = time.monotonic()
                cache.write(digest, FINGERPRINT, blob_of(digest))
                mine.append((called, time.monotonic(), digest))
                earlier = own.choice(mine)[2]
                got = cache.read(earlier, FINGERPRINT)
                if got is not None and got != blob_of(earlier):
                    with lock:
                        wrong += 1
            except CacheError:
                with lock:
                    cache_errors += 1
            except Exception as error:  # the trial counts what escapes
                with lock:
                    other_errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    deletions: list[float] = []
    flushes: list[tuple[float, float]] = []  # (start, end) of each flush that returned
    failed_flushes = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0, 0.05))
        if rng.random() < 0.4:
            _delete(path, rng.choice(HOW))
            deletions.append(time.monotonic())
        start = time.monotonic()
        try:
            cache.flush()
            flushes.append((start, time.monotonic()))
        except CacheError:
            failed_flushes += 1
    stop.set()
    for thread in threads:
        thread.join()
    for _attempt in range(3):
        start = time.monotonic()
        try:
            cache.flush()
            flushes.append((start, time.monotonic()))
            break
        except CacheError:
            failed_flushes += 1
    cache.close()

    last_deletion = deletions[-1] if deletions else 0.0
    starts = [start for start, _end in flushes]
    ends = [end for _start, end in flushes]
    owed = []
    for called, returned, digest in (entry for mine in written for entry in mine):
        # A flush begun after the write returned acknowledged it. Any flush that ended
        # after the call may have made it durable in a file that a later deletion then
        # took, as the deletion's owner meant: owed only if none ended before the last.
        acknowledged = bisect.bisect_right(starts, returned) < len(flushes)
        overlapping = bisect.bisect_right(ends, called)
        if acknowledged and flushes[overlapping][1] > last_deletion:
            owed.append(digest)
    lost, wrong_at_the_end, ok = check_digests(path, owed)
    return {
        "deletions": len(deletions),
        "flushes": len(flushes),
        "failed_flushes": failed_flushes,
        "writes": sum(map(len, written)),
        "checked": len(owed),
        "lost": lost,
        "wrong": wrong + wrong_at_the_end,
        "cache_errors": cache_errors,
        "other_errors": other_errors[:5],
        "ok": ok,
    }


@dataclass
class DeletionReport:
    """What a series of deletion trials found."""

    trials: int = 0
    seconds: float = 0.0
    deletions: int = 0
    flushes: int = 0
    failed_flushes: int = 0
    writes: int = 0
    checked: int = 0
    lost: int = 0
    wrong: int = 0
    cache_errors: int = 0
    hangs: int = 0
    not_ok: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.hangs + len(self.errors) + self.lost + self.wrong + self.not_ok

    @property
    def details(self) -> list[str]:
        return self.errors[:5]


def run_deletions(root: Path, trials: int, seconds: float, seed: int) -> DeletionReport:
    """`trials` deletion trials of `seconds` each, each in a fresh process and folder."""
    report = DeletionReport(seconds=seconds)
    root = root.resolve()
    for i in range(trials):
        path = root / f"delete-{i}" / "cache" / "pipelines.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        report.trials += 1
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torture",
                    "child-delete",
                    str(path),
                    str(seconds),
                    str(seed + i),
                ],
                env=_child_env(),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=seconds + TRIAL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            report.hangs += 1
            continue
        if done.returncode != 0:
            report.errors.append(f"exit status {done.returncode}: {done.stderr.strip()[-300:]}")
            continue
        figures = json.loads(done.stdout)
        for name in ("deletions", "flushes", "failed_flushes", "writes", "checked"):
            setattr(report, name, getattr(report, name) + figures[name])
        report.lost += figures["lost"]
        report.wrong += figures["wrong"]
        report.cache_errors += figures["cache_errors"]
        report.errors.extend(figures["other_errors"])
        report.not_ok += not figures["ok"]
    return report


def deletion_child(path: Path, seconds: float, seed: int) -> int:
    """`python -m torture child-delete`: one trial; prints its figures as JSON."""
    print(json.dumps(deletion_trial(path, seconds, seed)))
    return 0
