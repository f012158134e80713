"""Threads and processes on one cache file, and fork safety."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import CacheBusyError, DeviceFingerprint, PipelineCache, _connections

from .helpers import connection_of, open_connections, run_script


def digest_of(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def blob_of(digest: bytes, size: int = 3000) -> bytes:
    return (digest * (size // 32 + 1))[:size]


def run_threads(count: int, target: object, *args: object) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index, *args)  # type: ignore[operator]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def test_threads_get_their_own_connections(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    seen: list[object] = []

    def work(index: int) -> None:
        digest = digest_of("thread", index)
        cache.write(digest, fingerprint, blob_of(digest))
        assert cache.read(digest, fingerprint) == blob_of(digest)
        seen.append(connection_of(cache))

    assert not run_threads(4, work)
    assert len({id(connection) for connection in seen}) == 4


def test_readers_and_writers_in_threads(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    shared = [digest_of("shared", i) for i in range(200)]
    cache.write_many([(d, blob_of(d)) for d in shared], fingerprint)

    def work(index: int) -> None:
        for round_ in range(50):
            if index == 0:
                digest = digest_of("new", round_)
                cache.write(digest, fingerprint, blob_of(digest))
            for digest in shared[index::4]:
                assert cache.read(digest, fingerprint) == blob_of(digest)

    assert not run_threads(4, work)
    assert len(cache) == 250
    assert cache.stats().hits == 50 * 200


@pytest.mark.parametrize("reads", [50, 3_000])
def test_every_hit_of_many_threads_is_counted(
    cache: PipelineCache, fingerprint: DeviceFingerprint, reads: int
) -> None:
    # Hits are noted without a lock and counted in batches (past 4,096 pending): none
    # may be lost between threads, in this object's counters or in the file's totals.
    digests = [digest_of("hit", i) for i in range(20)]
    cache.write_many([(d, blob_of(d)) for d in digests], fingerprint)
    cache.flush()

    def read(index: int) -> None:
        for i in range(reads):
            assert cache.read(digests[(index + i) % len(digests)], fingerprint) is not None
            if i % 997 == 0:
                cache.stats()  # counting while other threads note hits

    assert run_threads(4, read) == []
    stats = cache.stats()
    assert (stats.hits, stats.total_hits) == (4 * reads, 4 * reads)
    cache.flush()  # the hits reach the file with the next write transaction
    assert cache.stats().total_hits == 4 * reads


def test_connections_of_ended_threads_are_closed(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    for round_ in range(20):
        assert not run_threads(2, lambda i, r=round_: cache.read(digest_of(r, i), fingerprint))
    # Each new connection closes those of threads that have ended.
    assert open_connections(cache) <= 3


def _writer(path: str, worker: int, count: int, done: multiprocessing.Queue[object]) -> None:
    fingerprint = DeviceFingerprint.from_parts(7, 8, "driver")
    try:
        with PipelineCache.open(path, max_bytes=None) as cache:
            for i in range(count):
                digest = digest_of(worker, i)
                cache.write(digest, fingerprint, blob_of(digest, 2000 + i))
                if i % 10 == 0:
                    cache.flush()
                    other = digest_of((worker + 1) % 4, i)
                    got = cache.read(other, fingerprint)
                    assert got is None or got == blob_of(other, 2000 + i)
            cache.flush()
        done.put(None)
    except BaseException as error:
        done.put(repr(error))


def test_processes_write_one_file_without_errors_or_loss(cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    done: multiprocessing.Queue[object] = context.Queue()
    count = 100
    processes = [
        context.Process(target=_writer, args=(str(cache_path), w, count, done)) for w in range(4)
    ]
    for process in processes:
        process.start()
    results = [done.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert results == [None] * 4
    fingerprint = DeviceFingerprint.from_parts(7, 8, "driver")
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 4 * count
        for worker in range(4):
            for i in range(count):
                digest = digest_of(worker, i)
                assert cache.read(digest, fingerprint) == blob_of(digest, 2000 + i)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_opens_its_own_connection(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    parent_digest = digest_of("parent")
    cache.write(parent_digest, fingerprint, b"from the parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            assert cache.read(parent_digest, fingerprint) == b"from the parent"
            cache.write(digest_of("child"), fingerprint, b"from the child")
            cache.flush()
            os.write(write, b"ok")
            status = 0
        except BaseException as error:
            os.write(write, repr(error).encode()[:500])
        finally:
            os._exit(status)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    message = os.read(read, 1000)
    os.close(read)
    assert (status, message) == (0, b"ok")
    # The parent reopens its connection and sees the child's write.
    assert cache.read(digest_of("child"), fingerprint) == b"from the child"


def test_one_file_at_rest_after_the_last_close(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    first = PipelineCache.open(cache_path)
    second = PipelineCache.open(cache_path)
    first.write(digest_of(1), fingerprint, os.urandom(50_000))
    second.write(digest_of(2), fingerprint, os.urandom(50_000))
    first.close()
    wal = Path(str(cache_path) + "-wal")
    second.close()
    assert not wal.exists() or wal.stat().st_size == 0
    copy = cache_path.with_name("copy.sqlite3")
    copy.write_bytes(cache_path.read_bytes())
    with PipelineCache.open(copy) as cache:
        assert cache.read(digest_of(1), fingerprint) is not None
        assert cache.read(digest_of(2), fingerprint) is not None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_reads_do_not_wait_for_a_writer_holding_the_lock(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    import apsw

    digest = digest_of("r")
    cache.write(digest, fingerprint, b"readable")
    blocker = apsw.Connection(str(cache_path))
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert cache.read(digest, fingerprint) == b"readable"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.mark.parametrize("readonly", [True, False])
def test_a_program_holding_the_whole_file_makes_an_open_wait_once_and_say_so(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
    readonly: bool,
) -> None:
    import time

    import apsw

    from vyre_sqlcache import CacheBusyError, _cachefile
    from vyre_sqlcache import cache as cache_module

    with PipelineCache.open(cache_path) as cache:
        cache.write(digest_of("x"), fingerprint, b"kept")
    monkeypatch.setattr(cache_module, "HEAD_WAIT_S", 0.2)
    monkeypatch.setattr(_cachefile, "HEAD_WAIT_S", 0.2)
    # An engineer's sqlite3 shell: exclusive locking mode keeps the lock after a read.
    shell = apsw.Connection(str(cache_path))
    shell.execute("PRAGMA locking_mode = EXCLUSIVE; SELECT count(*) FROM meta").fetchall()
    try:
        start = time.monotonic()
        with pytest.raises(CacheBusyError, match="locking_mode=EXCLUSIVE"):
            PipelineCache.open(cache_path, readonly=readonly)
        # One wait (the file's head), not a second one of 10 s for the connection.
        assert time.monotonic() - start < 8
    finally:
        shell.close()
    with PipelineCache.open(cache_path, readonly=readonly) as cache:
        assert cache.read(digest_of("x"), fingerprint) == b"kept"


@pytest.mark.parametrize("call", ["invalidate", "delete"])
def test_a_change_refused_by_another_writer_says_what_it_was(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint, call: str
) -> None:
    import apsw

    from vyre_sqlcache import CacheBusyError
    from vyre_sqlcache._connections import waiter_of

    digest = digest_of("c")
    cache.write(digest, fingerprint, b"x")
    cache.flush()
    waiter = waiter_of(connection_of(cache))
    assert waiter is not None
    waiter.timeout_ms = 50  # (10 s by default)
    blocker = apsw.Connection(str(cache_path))
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CacheBusyError, match=f"^{call[:-1]}ing entries failed"):
            if call == "invalidate":
                cache.invalidate_impacted([1], [digest], fingerprint)
            else:
                cache.delete_entries([fingerprint.cache_key(digest)])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert cache.read(digest, fingerprint) == b"x"


def test_a_flush_behind_a_refused_background_commit_waits_once(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A program holding the write lock (Python's sqlite3 with an implicit transaction
    # never committed): the writer thread's commit waited out the busy timeout, then the
    # flush() that had waited for it waited as long again, 20 s where 10 s were said.
    import time

    import apsw

    from vyre_sqlcache import CacheBusyError, _connections

    monkeypatch.setattr(_connections, "BUSY_TIMEOUT_MS", 2000)
    digest = digest_of("behind")
    with PipelineCache.open(cache_path) as cache:
        blocker = apsw.Connection(str(cache_path))
        blocker.execute("BEGIN IMMEDIATE")
        try:
            cache.write(digest, fingerprint, b"queued")
            time.sleep(0.2)  # the thread's commit is waiting for the lock now
            start = time.monotonic()
            with pytest.raises(CacheBusyError, match="held its lock too long"):
                cache.flush()
            assert time.monotonic() - start < 3.0  # (waiting twice: 3.8 s)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        cache.write(digest_of("after"), fingerprint, b"next")  # said once, not again here
        cache.flush()
        assert cache.read(digest, fingerprint) == b"queued"


@contextmanager
def lock_held(path: Path) -> Iterator[apsw.Connection]:
    """Another connection holding the file's write lock for the block (one the block
    lets go of first is left as it is)."""
    blocker = apsw.Connection(str(path))
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield blocker
    finally:
        with suppress(apsw.SQLError):  # (let go of already)
            blocker.execute("ROLLBACK")
        blocker.close()


def test_a_thread_behind_a_refused_flush_does_not_report_its_error_again(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flush() met the lock and said so; the writer thread, which had waited behind
    # it, kept a copy of that error, and the next flush() after the lock was let go
    # raised "a write queued earlier could not be committed yet" for nothing.
    monkeypatch.setattr(_connections, "BUSY_TIMEOUT_MS", 1000)
    with PipelineCache.open(cache_path) as cache:
        with lock_held(cache_path):
            cache.write(digest_of("first"), fingerprint, b"queued")
            with pytest.raises(CacheBusyError):
                cache.flush()  # commits first; the thread waits behind it
            time.sleep(0.3)  # the thread has its turn
        cache.flush()  # said once already: not again
        cache.write(digest_of("second"), fingerprint, b"next")
        cache.flush()
        assert cache.read(digest_of("first"), fingerprint) == b"queued"


@pytest.mark.parametrize("flushed", [True, False])
def test_close_beside_a_held_lock_waits_one_busy_timeout(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch, flushed: bool
) -> None:
    # close() waited for the writer thread's commit (behind a refused flush, or under way
    # when close() came) to wait out the lock, then waited as long again itself.
    monkeypatch.setattr(_connections, "BUSY_TIMEOUT_MS", 2000)
    cache = PipelineCache.open(cache_path)
    with lock_held(cache_path):
        cache.write(digest_of("held"), fingerprint, b"queued")
        if flushed:
            with pytest.raises(CacheBusyError):
                cache.flush()
        else:
            time.sleep(0.2)  # the thread's commit is waiting for the lock
        start = time.monotonic()
        cache.close()  # its commit waits once, then logs the queue as lost
        assert time.monotonic() - start < 3.5  # (twice: 4.1 s)


def test_close_commits_the_queue_when_the_lock_goes_within_its_own_timeout(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() came while the thread's commit waited for the lock; that commit gave up,
    # and the lock went before close()'s own timeout was out: the queue must go in (a
    # close that gave up with the thread logged it as lost).
    monkeypatch.setattr(_connections, "BUSY_TIMEOUT_MS", 1000)
    cache = PipelineCache.open(cache_path)
    with lock_held(cache_path) as blocker:
        release = threading.Timer(1.2, lambda: blocker.execute("ROLLBACK"))
        cache.write(digest_of("queued"), fingerprint, b"queued")
        release.start()
        time.sleep(0.4)  # the thread's commit waits until about 1.0 s
        cache.close()  # may wait until about 1.4 s
        release.join()
    with PipelineCache.open(cache_path) as reopened:
        assert reopened.read(digest_of("queued"), fingerprint) == b"queued"


def test_a_write_that_raises_an_earlier_commits_error_is_queued_all_the_same(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The error was raised before the entry was queued: the write that told of the
    # failure was the one write lost.
    monkeypatch.setattr(_connections, "BUSY_TIMEOUT_MS", 500)
    with PipelineCache.open(cache_path) as cache:
        with lock_held(cache_path):
            cache.write(digest_of("first"), fingerprint, b"first")
            time.sleep(0.9)  # the thread's commit has waited out the lock and failed
            with pytest.raises(CacheBusyError, match="queued earlier"):
                cache.write(digest_of("second"), fingerprint, b"second")
        cache.flush()
        assert cache.read(digest_of("second"), fingerprint) == b"second"
        assert cache.read(digest_of("first"), fingerprint) == b"first"


def test_compact_refused_by_another_writer_waits_once(
    cache: PipelineCache,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It waited out the lock twice (20 s): once to purge, again to truncate the log.
    import apsw

    from vyre_sqlcache import CacheBusyError
    from vyre_sqlcache._connections import BusyWaiter, waiter_of

    cache.write(digest_of("c"), fingerprint, b"x")
    cache.flush()
    waiter = waiter_of(connection_of(cache))
    assert waiter is not None
    waiter.timeout_ms = 100
    waits = []
    call = BusyWaiter.__call__

    def counted(self: BusyWaiter, prior_calls: int) -> bool:
        if prior_calls == 0:
            waits.append(self)
        return call(self, prior_calls)

    monkeypatch.setattr(BusyWaiter, "__call__", counted)
    blocker = apsw.Connection(str(cache_path))
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CacheBusyError, match=r"^compacting failed"):
            cache.compact()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert len(waits) == 1


# argv: path. Leaves the process 6 spare file descriptors, then 12 threads read and
# write; prints the errors they met and whether the cache worked on, as JSON.
FEW_DESCRIPTORS = """
import json, os, resource, sys, threading
from vyre_sqlcache import DeviceFingerprint, PipelineCache
fp = DeviceFingerprint.from_parts(1, 2, "fds")
cache = PipelineCache.open(sys.argv[1])
for i in range(50):
    cache.write(i.to_bytes(32, "big"), fp, b"x" * 1000)
cache.flush()
spare = len(os.listdir("/proc/self/fd")) + 6
resource.setrlimit(resource.RLIMIT_NOFILE, (spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
errors, wrote = [], []
# No thread ends (and gives its descriptors back) before every thread has tried.
tried = threading.Barrier(12)
def work(k):
    try:
        for i in range(50):
            assert cache.read(i.to_bytes(32, "big"), fp) == b"x" * 1000
        cache.write((1000 + k).to_bytes(32, "big"), fp, b"t")
        wrote.append(k)
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    tried.wait(60)
threads = [threading.Thread(target=work, args=(k,)) for k in range(12)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
# A write the writer thread could not commit is raised once by the next flush(), and
# stays queued: the flush after it commits it, with the ended threads' descriptors back.
for attempt in range(3):
    try:
        cache.flush()
        break
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
found = [k for k in range(12) if cache.read((1000 + k).to_bytes(32, "big"), fp) == b"t"]
print(json.dumps({"errors": errors, "attempts": attempt, "wrote": sorted(wrote), "found": found}))
cache.close()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_running_out_of_file_descriptors_says_so(tmp_path: Path) -> None:
    import json

    result = run_script(FEW_DESCRIPTORS, str(tmp_path / "fds.sqlite3"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["errors"], "12 threads with 6 spare descriptors all got connections"
    for error in out["errors"]:
        assert "no file descriptor left" in error and "ulimit -n" in error, error
    assert out["attempts"] <= 1
    # Every write that returned was kept (and so was one that raised an earlier commit's
    # error: it queues its entry all the same).
    assert set(out["wrote"]) <= set(out["found"])


# Leaves the process 2 spare descriptors, then asks how a failed open is explained.
FEW_LEFT_AFTER_A_FAILED_OPEN = """
import os, resource
from pathlib import Path
import apsw
from vyre_sqlcache._connections import translate
count = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 2, hard))
print(translate(apsw.CantOpenError("unable to open database file"), "opening", Path("c")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_failed_open_with_few_descriptors_left_says_so(tmp_path: Path) -> None:
    # A connection opens the file, then its -wal: when the second open fails, SQLite closes
    # the first, and another thread's failed open gives its descriptors back too. The
    # probe then found one free and the message said only "unable to open database file"
    # (1 run of CI in a few); a connection needs up to 4, so fewer left tells the same.
    result = run_script(FEW_LEFT_AFTER_A_FAILED_OPEN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no file descriptor left" in result.stdout, result.stdout
