"""A full disk: the cache evicts, checkpoints and truncates its log, and keeps working.

The real test mounts an 8 MiB tmpfs (it needs root) and writes more than fits
under a cap larger than the disk. Without root, a second test emulates the same
disk: statvfs reports 8 MiB minus the cache's files, and RLIMIT_FSIZE (with
SIGXFSZ ignored) fails any write past 8 MiB of one file. Both run in child
processes, the second one in a fresh process that checks what the first flushed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vyre_sqlcache import CacheFullError, DeviceFingerprint, PipelineCache, ReadOnlyCacheError

from .helpers import flush_once_recovered, run_script

FP = DeviceFingerprint.from_parts(1, 2, "full")

DISK_BYTES = 8 << 20
CAP_BYTES = 64 << 20  # the cap is larger than the disk

# argv: folder, blob size, bytes to write, "real" or "emulated". Writes blobs (digest i:
# sha256(i)) and flushes every 10; prints what happened as JSON.
CHILD = textwrap.dedent(
    """
    import hashlib, json, logging, os, random, resource, signal, sys, time
    folder, size, total, disk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    DISK = %(disk)d
    files = lambda: [os.path.join(folder, n) for n in os.listdir(folder)]
    used = lambda: sum(os.stat(f).st_size for f in files() if os.path.exists(f))
    if disk == "emulated":
        # A disk of DISK bytes: statvfs counts the cache's files, no file grows past it.
        real_statvfs = os.statvfs
        def statvfs(path):
            real = real_statvfs(path)
            free = max(0, DISK - used()) // real.f_frsize
            return os.statvfs_result((real.f_bsize, real.f_frsize, DISK // real.f_frsize,
                free, free, real.f_files, real.f_ffree, real.f_favail, real.f_flag,
                real.f_namemax))
        os.statvfs = statvfs
    if disk in ("emulated", "file size limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISK, DISK))

    from vyre_sqlcache import CacheError, DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "full")
    digest = lambda i: hashlib.sha256(b"%%d" %% i).digest()
    blob = lambda i: random.Random(i).randbytes(size)  # incompressible
    free = lambda: os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    path = os.path.join(folder, "pipelines.sqlite3")
    recoveries = []
    class Count(logging.Handler):
        def emit(self, record):
            if "hit a full disk" in record.getMessage():
                recoveries.append(1)
    logging.getLogger("vyre_sqlcache").addHandler(Count())
    out = {"errors": [], "min_free": free(), "max_used": used(), "slowest_s": 0.0}
    first = int(os.environ.get("FIRST", "0"))
    count = total // size
    cache = PipelineCache.open(path, max_bytes=%(cap)d)
    for i in range(first, first + count):
        started = time.monotonic()
        try:
            cache.write(digest(i), fp, blob(i))
            if i %% 10 == 9:
                cache.flush()
        except CacheError as error:
            out["errors"].append(f"{i}: {type(error).__name__}: {error}")
        out["slowest_s"] = max(out["slowest_s"], time.monotonic() - started)
        out["min_free"] = min(out["min_free"], free())
        out["max_used"] = max(out["max_used"], used())
    cache.flush()
    last = first + count - 1
    recent = range(last - min(10, (2 << 20) // size) + 1, last + 1)  # 2 MiB at most
    out["last_read"] = [cache.read(digest(i), fp) == blob(i) for i in recent]
    stats = cache.stats()
    out["entries"], out["evictions"] = stats.entries, stats.total_evictions
    if os.environ.get("CHECK"):
        results = [cache.read(digest(i), fp) for i in range(last + 1)]
        out["right"] = sum(r == blob(i) for i, r in enumerate(results))
        out["wrong"] = sum(r is not None and r != blob(i) for i, r in enumerate(results))
        try:
            cache.compact()
            out["compact"] = "ok"
        except CacheError as error:
            out["compact"] = f"{type(error).__name__}: {error}"
        out["free_after_compact"] = free()
        cache.write(digest(-1), fp, blob(-1))  # the cache still works after the compact
        cache.flush()
    cache.close()
    out["recoveries"] = len(recoveries)
    out["free_after_close"] = free()
    out["wal_after_close"] = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    if os.environ.get("CHECK"):
        import apsw
        connection = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        out["integrity"] = connection.execute("PRAGMA integrity_check").fetchall()[0][0]
        connection.close()
        # Room is made: a lower cap evicts, and then the file compacts.
        with PipelineCache.open(path, max_bytes=512 << 10) as cache:
            cache.write(digest(-2), fp, blob(-2))
            cache.flush()
            before, after = cache.compact()
        out["compacted"] = [before, after]
    print(json.dumps(out))
    """
) % {"disk": DISK_BYTES, "cap": CAP_BYTES}


def run_child(folder: Path, size: int, total: int, disk: str, **env: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(size), str(total), disk],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted afterwards; skips where it cannot be mounted."""
    mount = shutil.which("mount")
    if mount is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (test_an_emulated_full_disk runs instead)")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        unmounted = subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)
        if unmounted.returncode != 0:  # still busy: detach it, the kernel frees it later
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def assert_fills_and_recovers(folder: Path, size: int, disk: str) -> None:
    total = 2 * DISK_BYTES  # twice what the disk holds
    filled = run_child(folder, size, total, disk)
    # Every write succeeded: the cache evicted for the disk, not for its cap.
    assert filled["errors"] == [], filled["errors"][:3]
    assert filled["evictions"] > 0
    assert filled["recoveries"] + filled["evictions"] > 0
    assert all(filled["last_read"]), filled
    # The cache's own files never took the whole disk, and its log is gone at close.
    assert filled["max_used"] <= DISK_BYTES - (512 << 10), filled
    assert filled["min_free"] >= 512 << 10, filled
    assert filled["wal_after_close"] == 0
    assert filled["free_after_close"] >= 1 << 20, filled

    # A fresh process: everything flushed is there or was evicted, never wrong; it
    # writes on; compact succeeds or says the disk is too full, leaving it usable.
    count = total // size
    checked = run_child(folder, size, total // 4, disk, CHECK="1", FIRST=str(count))
    assert checked["errors"] == [], checked["errors"][:3]
    assert checked["wrong"] == 0
    assert all(checked["last_read"]), checked
    written = count + total // 4 // size
    assert checked["right"] == checked["entries"]
    assert checked["entries"] + checked["evictions"] == written, checked
    assert checked["compact"] == "ok" or "needs about" in checked["compact"], checked
    assert checked["free_after_compact"] >= 512 << 10, checked
    assert checked["integrity"] == "ok"
    before, after = checked["compacted"]
    assert after < min(before, 1 << 20), checked
    print(
        f"\n{disk} disk, {size}-byte blobs: at most {filled['max_used'] / 2**20:.2f} MiB "
        f"of {DISK_BYTES / 2**20:.0f} MiB used, {filled['min_free'] / 2**20:.2f} MiB "
        f"free at least, {filled['recoveries']} full-disk recoveries, slowest write "
        f"{filled['slowest_s'] * 1000:.0f} ms"
    )


@pytest.mark.parametrize("size", [2_000, 20_000, 300_000])
def test_a_full_tmpfs(small_disk: Path, size: int) -> None:
    assert_fills_and_recovers(small_disk, size, "real")


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX statvfs and rlimits")
@pytest.mark.parametrize("size", [2_000, 20_000])
def test_an_emulated_full_disk(tmp_path: Path, size: int) -> None:
    folder = tmp_path / "disk"
    folder.mkdir()
    assert_fills_and_recovers(folder, size, "emulated")


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX rlimits")
def test_the_largest_file_the_process_may_write(tmp_path: Path) -> None:
    # RLIMIT_FSIZE (`ulimit -f`, a batch system's limit) on a disk with room: SQLite gets
    # EFBIG and says "disk I/O error"; the cache takes it for a full disk.
    size = 20_000
    total = 2 * DISK_BYTES
    filled = run_child(tmp_path, size, total, "file size limit")
    assert filled["errors"] == [], filled["errors"][:3]
    assert filled["evictions"] > 0
    assert all(filled["last_read"]), filled
    count = total // size
    checked = run_child(tmp_path, size, total // 4, "file size limit", CHECK="1", FIRST=str(count))
    assert checked["errors"] == [], checked["errors"][:3]
    assert (checked["wrong"], checked["integrity"]) == (0, "ok")
    assert all(checked["last_read"]), checked
    assert checked["right"] == checked["entries"]
    assert checked["entries"] + checked["evictions"] == count + total // 4 // size, checked


# The start of both scripts below: 20,000-byte blobs into p.sqlite3 of the folder given,
# with SIGXFSZ ignored so that a write past the file size limit fails (EFBIG) instead.
LIMITED_HEAD = textwrap.dedent(
    """
    import hashlib, json, os, random, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from vyre_sqlcache import CacheError, DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "full")
    path = os.path.join(sys.argv[1], "p.sqlite3")
    size = lambda f: os.path.getsize(f) if os.path.exists(f) else 0
    digest = lambda i: hashlib.sha256(b"%d" % i).digest()
    blob = lambda i: random.Random(i).randbytes(20_000)
    """
)
# argv: folder. Writes 2.4 MB, then lowers the file size limit to just above the files
# and writes on at once (before the cache looks at its room again).
LOWERED = LIMITED_HEAD + textwrap.dedent(
    """
    cache = PipelineCache.open(path)
    for i in range(100):
        cache.write(digest(i), fp, blob(i))
    cache.flush()
    limit = max(size(path), size(path + "-wal")) + 60_000
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        for i in range(100, 120):
            cache.write(digest(i), fp, blob(i))
        cache.flush()
        found = [cache.read(digest(i), fp) == blob(i) for i in range(100, 120)]
        print(json.dumps(["flushed", found]))
    except CacheError as error:
        print(json.dumps([type(error).__name__, str(error)]))
    """
)


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX rlimits")
def test_a_file_size_limit_met_before_the_cache_knows_it(tmp_path: Path) -> None:
    result = run_script(LOWERED, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    outcome, detail = json.loads(result.stdout.strip().splitlines()[-1])
    assert (outcome, detail) == ("flushed", [True] * 20)


# argv: folder. Writes 2 MB, invalidates all of it with the background purge held off,
# then lowers the file size limit to just above the files (as LOWERED does) and writes
# 2 MB more: only the tombstoned entries can make room for them.
TOMBSTONED = LIMITED_HEAD + textwrap.dedent(
    """
    from vyre_sqlcache import _checkpointer
    _checkpointer.Checkpointer.purge_soon = lambda self: None
    cache = PipelineCache.open(path)
    cache.write_many([(digest(i), blob(i)) for i in range(100)], fp)
    assert cache.invalidate_impacted([1] * 100, [digest(i) for i in range(100)], fp) == 100
    cache.flush()
    limit = max(size(path), size(path + "-wal")) + 60_000
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    errors = []
    for i in range(200, 300):
        try:
            cache.write(digest(i), fp, blob(i))
            cache.flush()
        except CacheError as error:
            errors.append(f"{i}: {error}")
    found = sum(cache.read(digest(i), fp) == blob(i) for i in range(200, 300))
    print(json.dumps({"errors": errors[:3], "found": found, "entries": cache.stats().entries}))
    """
)


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX rlimits")
def test_tombstoned_entries_make_room_on_a_full_disk(tmp_path: Path) -> None:
    result = run_script(TOMBSTONED, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Every write went in: the purge on the full disk freed the tombstoned entries (the
    # eviction skips them), then evicted the oldest new ones as the files stayed full.
    assert out["errors"] == []
    assert 0 < out["found"] == out["entries"]


@pytest.mark.parametrize("method", ["copy", "bundle"])
def test_a_copy_or_bundle_onto_a_full_disk_says_what_it_needs(
    small_disk: Path, tmp_path: Path, method: str
) -> None:
    # It said "lower the cache's size cap", which is no remedy for the disk of the copy.
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path, compression="off") as cache:
        for i in range(12):
            cache.write(bytes([i]) * 32, FP, os.urandom(1 << 20))
        with pytest.raises(CacheFullError, match=r"no room for it") as raised:
            getattr(cache, method)(small_disk / "out.sqlite3")
        assert "size cap" not in str(raised.value) and "free space on that disk" in str(
            raised.value
        )
    assert os.listdir(small_disk) == []


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 8 MiB and 16 inodes, unmounted afterwards; skips where it cannot be
    mounted. Its inodes are used up with `use_up_inodes`."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "few-inodes"
    folder.mkdir()
    options = "size=8m,nr_inodes=16"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def use_up_inodes(folder: Path) -> None:
    """Make files in `folder` until its file system holds no more."""
    with contextlib.suppress(OSError):
        for i in range(64):
            (folder / f"f{i}").touch()


@pytest.mark.parametrize("method", ["copy", "bundle"])
def test_a_copy_or_bundle_onto_a_disk_without_inodes_says_so(
    tmp_path: Path, few_inodes: Path, method: str
) -> None:
    # Free bytes, no free inodes: it said "give a path in a folder this user can write".
    use_up_inodes(few_inodes)
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(bytes(32), FP, b"entry")
        with pytest.raises(CacheFullError, match=r"no free inodes") as raised:
            getattr(cache, method)(few_inodes / "out.sqlite3")
    assert "can write" not in str(raised.value)
    assert not [name for name in os.listdir(few_inodes) if "out.sqlite3" in name]


# argv: cache, folder. export-dir under a file size limit below one entry's file.
EXPORT_OVER_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    from vyre_sqlcache.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
    sys.exit(main(["--path", sys.argv[1], "export-dir", sys.argv[2]]))
    """
)


def test_export_dir_onto_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    # It printed only "[Errno 27] File too large".
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path, compression="off") as cache:
        for i in range(3):
            cache.write(bytes([i]) * 32, FP, os.urandom(1 << 20))
    done = run_script(EXPORT_OVER_LIMIT, str(path), str(tmp_path / "vyre"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "export-dir stopped: no room for the files" in done.stderr
    assert "run it again" in done.stderr
    leftovers = [p for p in (tmp_path / "vyre").rglob("*") if p.is_file()]
    assert leftovers == []  # no file cut short, no temporary file


# argv: cache, output. `get` under a file size limit below the blob's size.
GET_OVER_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    from vyre_sqlcache.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
    sys.exit(main(["--path", sys.argv[1], "get", "01" * 32, "-o", sys.argv[2]]))
    """
)


@pytest.mark.parametrize("before", [None, b"last week's pipeline"])
def test_get_onto_a_full_disk_leaves_the_output_as_it_was(
    tmp_path: Path, before: bytes | None
) -> None:
    # It left a file cut short at the limit (and the old bytes gone).
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path, compression="off") as cache:
        cache.put_entry(bytes([1]) * 32, os.urandom(1 << 20))
    out = tmp_path / "out" / "pipeline.bin"
    out.parent.mkdir()
    if before is not None:
        out.write_bytes(before)
    done = run_script(GET_OVER_LIMIT, str(path), str(out))
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "no room to write" in done.stderr
    assert os.listdir(out.parent) == ([] if before is None else ["pipeline.bin"])
    if before is not None:
        assert out.read_bytes() == before


@pytest.mark.parametrize("count", [120, 220])
def test_writes_queued_on_a_full_disk_are_committed_once_room_returns(
    small_disk: Path, count: int
) -> None:
    # Another program's file leaves less room than the queued writes need, and nothing of
    # the cache can be evicted for them. Once it is gone, the queue goes in: whole (120
    # entries), or in parts, evicting for the disk, when it is more than the disk can
    # hold beside its reserve (220 entries of 20 kB take two 16 KiB pages each).
    import random

    filler = small_disk / "someone else's file"
    filler.write_bytes(bytes(6 << 20))
    blobs = {
        hashlib.sha256(b"%d" % i).digest(): random.Random(i).randbytes(20_000) for i in range(count)
    }
    cache = PipelineCache.open(small_disk / "pipelines.sqlite3", compression="off")
    try:
        failures = 0
        for done, (digest, blob) in enumerate(blobs.items(), 1):
            try:  # write() reports a background commit's failure once, then queues
                cache.write(digest, FP, blob)
            except CacheFullError:
                cache.write(digest, FP, blob)
            if done % 5 == 0:
                try:
                    cache.flush()
                except CacheFullError:
                    failures += 1
        assert failures > 0, "the disk never filled: the test proves nothing"
        filler.unlink()
        flush_once_recovered(cache)
        stats = cache.stats()
        assert stats.entries + stats.total_evictions == len(blobs)
        if count == 120:
            assert stats.total_evictions == 0
    finally:
        cache.close()
    with PipelineCache.open(small_disk / "pipelines.sqlite3", readonly=True) as reader:
        found = [reader.read(digest, FP) for digest in blobs]
    assert all(got in (None, blobs[d]) for d, got in zip(blobs, found, strict=True))
    assert sum(got is not None for got in found) == stats.entries


# argv: folder. A cache of 2 MB at rest, opened by a process whose file size limit is
# half of that: it is read, and writes are refused up front, saying why.
OVER_THE_LIMIT = LIMITED_HEAD + textwrap.dedent(
    """
    import logging
    from vyre_sqlcache import ReadOnlyCacheError
    with PipelineCache.open(path, compression="off") as cache:
        cache.write_many([(digest(i), blob(i)) for i in range(100)], fp)
    before = open(path, "rb").read()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with PipelineCache.open(path) as cache:
        found = sum(cache.read(digest(i), fp) == blob(i) for i in range(100))
        try:
            cache.write(digest(500), fp, blob(500))
            refused = ""
        except ReadOnlyCacheError as error:
            refused = str(error)
    same = open(path, "rb").read() == before
    print(json.dumps({"found": found, "refused": refused, "same": same}))
    """
)


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX rlimits")
def test_a_cache_larger_than_the_file_size_limit_is_read_and_says_why_not_written(
    tmp_path: Path,
) -> None:
    # Its pages past the limit could never be written, nor its log checkpointed: after a
    # few writes every write, flush and compact failed, and close() lost the queue.
    result = run_script(OVER_THE_LIMIT, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["found"] == 100 and out["same"], out
    assert "ulimit -f" in out["refused"] and "more than the largest file" in out["refused"]
    assert "opening it read-only" in result.stderr and "ulimit -f" in result.stderr


def test_a_cache_on_a_file_system_without_free_inodes_is_read(few_inodes: Path) -> None:
    # With no inode for its -wal and -shm, every open failed with "unable to open database
    # file", read-only ones too: the entries could not be read at all.
    path = few_inodes / "pipelines.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(bytes(32), FP, b"kept")
    use_up_inodes(few_inodes)
    for readonly in (True, False):
        with PipelineCache.open(path, readonly=readonly) as cache:
            assert cache.read(bytes(32), FP) == b"kept"
            with pytest.raises(ReadOnlyCacheError, match="no free inodes"):
                cache.write(bytes([2]) * 32, FP, b"new")


@pytest.mark.parametrize("batch", [False, True])
def test_the_first_burst_into_a_new_cache_on_a_small_disk_leaves_room(
    small_disk: Path, batch: bool
) -> None:
    # The first commit of a new file ran before the cache had looked at the disk: a
    # burst of 6 MB into a new cache on an 8 MiB disk took every free byte, the queue
    # was lost at close and the next process could not open the file.
    path = small_disk / "pipelines.sqlite3"
    blobs = [(hashlib.sha256(b"%d" % i).digest(), os.urandom(100_000)) for i in range(60)]
    with PipelineCache.open(path, max_bytes=None) as cache:
        if batch:
            cache.write_many(blobs, FP)
        else:
            for digest, blob in blobs:
                cache.write(digest, FP, blob)
        cache.flush()
        assert cache.read(blobs[-1][0], FP) == blobs[-1][1]
        stats = cache.stats()
        assert stats.entries + stats.total_evictions == len(blobs)
    info = os.statvfs(small_disk)
    assert info.f_bavail * info.f_frsize >= 512 << 10
    with PipelineCache.open(path) as cache:  # a fresh open, which writes
        assert cache.read(blobs[-1][0], FP) == blobs[-1][1]
        assert all(cache.read(digest, FP) in (None, blob) for digest, blob in blobs)
        cache.write(blobs[0][0], FP, b"written after")
        cache.flush()
