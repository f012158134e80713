"""Background checkpoints: commits never checkpoint; a thread folds the log back."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import DeviceFingerprint, PipelineCache
from vyre_sqlcache import _checkpointer as checkpointer
from vyre_sqlcache import cache as cache_module
from vyre_sqlcache._checkpointer import FULL_DISK_STEP_ENTRIES, FullDiskEviction
from vyre_sqlcache._maintenance import COMPACT_TRUNCATE_WAIT_S

from .helpers import connection_of, count_checkpoints, count_log_restarts


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vyre-sqlcache checkpoint"]


def write_until_checkpointed(
    cache: PipelineCache, fingerprint: DeviceFingerprint, count: int, size: int
) -> list[bytes]:
    """Write `count` blobs of `size` bytes; wait until the file itself holds most of them.

    The first checkpoint may run while only a few writes are in the log; the last
    write wakes the thread again, and its checkpoint copies the rest.
    """
    before = cache.path.stat().st_size
    digests = [os.urandom(32) for _ in range(count)]
    for digest in digests:
        cache.write(digest, fingerprint, os.urandom(size))
    grown = before + count * size * 9 // 10
    deadline = time.monotonic() + 30
    while cache.path.stat().st_size <= grown and time.monotonic() < deadline:
        time.sleep(0.01)
    return digests


def test_commits_do_not_checkpoint(cache: PipelineCache) -> None:
    assert connection_of(cache).pragma("wal_autocheckpoint") == 0


def test_a_grown_log_is_checkpointed_in_the_background(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 16)
    others = set(checkpoint_threads())  # of caches other tests left to the collector
    with PipelineCache.open(cache_path) as cache:
        before = cache_path.stat().st_size
        digests = write_until_checkpointed(cache, fingerprint, 20, 50_000)
        # The database file itself received the pages while the cache stayed open (in WAL
        # mode only a checkpoint writes it), and the checkpoint thread is running.
        assert cache_path.stat().st_size > before + 500_000
        assert len(set(checkpoint_threads()) - others) == 1
        for digest in digests:
            assert cache.read(digest, fingerprint) is not None
    assert set(checkpoint_threads()) - others == set()
    wal = Path(str(cache_path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_after_a_checkpoint_small_writes_wake_no_thread(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite reuses a grown log from its start without shrinking the file: the log's
    # page count, not its file size, says when a checkpoint is due.
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 64)
    done = count_checkpoints(monkeypatch, cache_path)
    with PipelineCache.open(cache_path) as cache:
        write_until_checkpointed(cache, fingerprint, 20, 100_000)
        time.sleep(0.3)  # let a checkpoint woken by the last write finish
        checkpoints = len(done)
        assert checkpoints > 0
        assert Path(str(cache_path) + "-wal").stat().st_size > 64 * 16384
        for _ in range(3):
            cache.write(os.urandom(32), fingerprint, b"small")
        time.sleep(0.3)
        assert len(done) == checkpoints


def test_a_small_log_runs_no_checkpoint(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread is started when a cache that may write opens (it also purges
    # tombstoned entries), but a small log never wakes it to checkpoint.
    done = count_checkpoints(monkeypatch, cache_path)
    with PipelineCache.open(cache_path) as cache:
        cache.write(os.urandom(32), fingerprint, b"small")
        cache.flush()
        time.sleep(0.2)
        assert len(checkpoint_threads()) == 1
        assert done == []


def test_a_checkpoint_does_not_block_a_writer_or_reader(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 4)
    with PipelineCache.open(cache_path) as cache:
        reader = apsw.Connection(str(cache_path))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM entries").fetchall()  # holds a snapshot
        try:
            for _ in range(30):
                digest = os.urandom(32)
                cache.write(digest, fingerprint, os.urandom(20_000))
                assert cache.read(digest, fingerprint) is not None
        finally:
            reader.execute("COMMIT")
            reader.close()


_OPS = (b"mov.u32", b"add.s32", b"ld.global.f32", b"st.global.f32", b"fma.rn.f32", b"setp.lt.s32")


def kernel_text(i: int, size: int = 16_000) -> bytes:
    """PTX-like text of `size` bytes, distinct for each `i`: it compresses about 7x, as
    compiler output does (the corpus is not needed)."""
    rng = random.Random(i)
    lines = [b".visible .entry k%d(.param .u64 p0)\n{\n" % i]
    length = len(lines[0])
    while length < size:
        line = b"\t%s \t%%r%d, %%r%d;\n" % (rng.choice(_OPS), rng.randrange(8), rng.randrange(8))
        lines.append(line)
        length += len(line)
    return b"".join(lines)[:size]


@contextmanager
def full_disk(path: Path, pages: int) -> Iterator[list[int]]:
    """Every SQLite connection opened to `path` meanwhile may grow it to `pages` pages only,
    as if the disk held no more; yields the number of entries each committed transaction
    deleted (those that deleted any)."""
    deletes: list[int] = []

    def watch(connection: apsw.Connection) -> None:
        if connection.filename != str(path):
            return
        connection.pragma("max_page_count", pages)
        pending = [0]

        def update(operation: int, database: str, table: str, rowid: int) -> None:
            if table == "entries" and operation == apsw.SQLITE_DELETE:
                pending[0] += 1

        def commit() -> bool:
            if pending[0]:
                deletes.append(pending[0])
            pending[0] = 0
            return False

        def rollback() -> None:
            pending[0] = 0

        connection.set_update_hook(update)
        connection.set_commit_hook(commit)
        connection.set_rollback_hook(rollback)

    apsw.connection_hooks.append(watch)
    try:
        yield deletes
    finally:
        apsw.connection_hooks.remove(watch)


def test_a_full_disk_evicts_compressed_entries_a_few_at_a_time(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # A step is counted in bytes as stored: counted in the callers' bytes, each of its
    # transactions deleted about as many entries again as the blobs compress, and needed
    # that much more log on a disk with no room for one.
    with (
        full_disk(cache_path, 120) as deletes,
        PipelineCache.open(cache_path, max_bytes=None) as cache,
    ):
        for i in range(900):
            cache.write(i.to_bytes(32, "big"), fingerprint, kernel_text(i))  # never raises
            cache.flush()
        stats = cache.stats()
        assert cache.read((899).to_bytes(32, "big"), fingerprint) == kernel_text(899)
    assert stats.compression_ratio > 4
    assert stats.total_evictions > 0
    assert sum(deletes) == stats.total_evictions
    assert max(deletes) <= 2 * FULL_DISK_STEP_ENTRIES, deletes


def test_a_full_disk_eviction_frees_a_quarter_of_the_bytes_as_stored(
    cache: PipelineCache, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "FULL_DISK_EVICTION_S", 3600.0)  # not the clock's test
    for i in range(200):
        cache.write(i.to_bytes(32, "big"), fingerprint, kernel_text(i))
    cache.flush()
    before = cache.stats()
    assert before.compression_ratio > 4
    connection = connection_of(cache)
    plan = FullDiskEviction.of(connection, incoming=16_000)
    steps = []
    while (step := plan.next_step()) > 0:
        with connection:
            steps.append(plan.evict(connection, step))
    after = cache.stats()
    # About `FULL_DISK_STEP_ENTRIES` entries a transaction, and a quarter of the blobs as
    # stored (the incoming bytes are less): a step more at most.
    assert all(1 <= count <= FULL_DISK_STEP_ENTRIES + 1 for count in steps), steps
    assert plan.freed == before.stored_bytes - after.stored_bytes
    step_bytes = before.stored_bytes // before.entries * FULL_DISK_STEP_ENTRIES
    assert before.stored_bytes // 4 <= plan.freed <= before.stored_bytes // 4 + step_bytes
    assert 50 <= sum(steps) <= 50 + FULL_DISK_STEP_ENTRIES + 1
    assert after.entries == before.entries - sum(steps)


@pytest.mark.parametrize(
    ("reading", "bound"), [(False, 8 * 64), (True, 32 * 64)], ids=["alone", "beside-a-reader"]
)
def test_a_stream_of_durable_writes_keeps_the_log_short(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
    reading: bool,
    bound: int,
) -> None:
    # SQLite starts the log over only for a writer that finds every page of it copied,
    # which a checkpoint running beside writes that never pause seldom leaves: the log
    # must not grow for ever, with or without a thread reading all the time. Before the
    # fix 600 commits (7 pages each) grew it to 3,500 pages alone and to 1,500-2,300
    # beside the reader, with no restart; after, at most about 330 and 1,300 on a machine
    # whose two cores were kept busy, with about 30 restarts.
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 64)
    done = count_checkpoints(monkeypatch, cache_path)
    restarts = count_log_restarts(monkeypatch, cache_path)
    wal = Path(str(cache_path) + "-wal")
    stop = threading.Event()
    commits = 600
    with PipelineCache.open(cache_path) as cache:
        first = os.urandom(32)
        cache.write(first, fingerprint, os.urandom(4096))
        cache.flush()

        def read_all_the_time() -> None:
            while not stop.is_set():
                assert cache.read(first, fingerprint) is not None

        reader = threading.Thread(target=read_all_the_time)
        if reading:
            reader.start()
        largest = 0
        try:
            for _ in range(commits):
                cache.write(os.urandom(32), fingerprint, os.urandom(4096))
                cache.flush()
                largest = max(largest, wal.stat().st_size)
        finally:
            stop.set()
            if reading:
                reader.join()
        pages = largest // 16384
        assert pages < bound, f"the log grew to {pages} pages"
        assert restarts.count(0) >= 10, f"the log started over {restarts.count(0)} times"
        assert len(done) < commits // 3, f"{len(done)} checkpoints for {commits} commits"


def test_under_a_small_cap_the_log_is_kept_in_proportion(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # The log was checkpointed at 16 MiB whatever the cap, and kept its largest size: a
    # 4 MiB cache took 25 MiB on disk (19 MiB of log) after 24 MiB of writes.
    cap = 4 << 20
    wal = Path(str(cache_path) + "-wal")
    with PipelineCache.open(cache_path, max_bytes=cap, compression="off") as cache:
        for i in range(1500):
            cache.write(os.urandom(32), fingerprint, os.urandom(4096))
            if i % 100 == 99:
                cache.flush()
        for _ in range(50):  # the next writer after a checkpoint cuts the log back
            cache.write(os.urandom(32), fingerprint, os.urandom(4096))
            cache.flush()
            if wal.stat().st_size <= cap // 2:
                break
            time.sleep(0.1)
        assert wal.stat().st_size <= cap // 2
        assert cache.stats().stored_bytes <= cap


def test_a_stream_of_large_commits_is_not_held_back_to_start_the_log_over(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1 MiB blob commits about 70 pages: such a stream is mostly its own data in the
    # log, and holding it back for a RESTART would cost as long as copying it.
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 64)
    done = count_checkpoints(monkeypatch, cache_path)
    restarts = count_log_restarts(monkeypatch, cache_path)
    blob = os.urandom(1 << 20)
    with PipelineCache.open(cache_path, compression="off") as cache:
        for i in range(40):
            cache.write(i.to_bytes(32, "big"), fingerprint, blob)
        cache.flush()
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
    assert done, "no checkpoint ran"
    # Held back once the log holds LOG_BOUND_FACTOR thresholds, not for every blob.
    assert len(restarts) < 40, (len(restarts), len(done))


def test_large_commits_back_to_back_keep_the_log_bounded(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # Groups of 10 entries under a small cap (each commit evicts too: hundreds of pages)
    # never let a copy catch up, and the log was never started over: 1.2 GiB in 5 s.
    wal = Path(str(cache_path) + "-wal")
    largest = 0
    with PipelineCache.open(cache_path, max_bytes=8 << 20, compression="off") as cache:
        for _ in range(400):
            cache.write_many([(os.urandom(32), os.urandom(4000)) for _ in range(10)], fingerprint)
            largest = max(largest, wal.stat().st_size)
    # Checkpointed at 2 MiB, started over past 8 thresholds (16 MiB) whatever the commits;
    # it grew past 70 MiB before.
    assert largest < 48 << 20, f"the log grew to {largest >> 20} MiB"


def frames_not_copied(path: Path) -> int:
    """Frames of the log not yet copied into the database, from the WAL index in `-shm`:
    its header's mxFrame (offset 16) less the checkpoint's nBackfill (offset 96), both
    native-endian u32 (SQLite's file format documents the layout)."""
    header = Path(f"{path}-shm").read_bytes()[:100]
    return int.from_bytes(header[16:20], sys.byteorder) - int.from_bytes(
        header[96:100], sys.byteorder
    )


def test_a_group_committed_before_the_hold_is_copied_without_it(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread decides on a RESTART from a copy that found the log caught up, then holds
    # this object's writes back for it. A group committed in between (a bulk install's
    # next one) was copied under the hold: every write waited for it, 100-250 ms a group
    # of 64 MiB (an invalidation right after a 1 GiB install took 50-57 ms, not 1.4-1.9).
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 64)
    under_hold: list[int] = []
    original_restart = cache_module.restart_log

    def restart(connection: apsw.Connection) -> int:
        under_hold.append(frames_not_copied(cache_path))
        return original_restart(connection)

    monkeypatch.setattr(cache_module, "restart_log", restart)
    original_copy = PipelineCache._copy_log
    group = [(os.urandom(32), os.urandom(64 << 10)) for _ in range(40)]  # ~170 pages

    def copy_then_a_group(cache: PipelineCache) -> tuple[int, int]:
        copied = original_copy(cache)
        if group:
            cache.write_many([group.pop() for _ in range(len(group))], fingerprint)
        return copied

    monkeypatch.setattr(PipelineCache, "_copy_log", copy_then_a_group)
    with PipelineCache.open(cache_path, compression="off") as cache:
        deadline = time.monotonic() + 30
        while (group or not under_hold) and time.monotonic() < deadline:
            cache.write(os.urandom(32), fingerprint, os.urandom(4096))
            cache.flush()  # small durable commits: a RESTART is due after each copy
    assert not group and under_hold, "no RESTART after the group"
    assert max(under_hold) <= checkpointer.caught_up_pages(), under_hold


_DURABLE_WRITER = """
import os, sys
from pathlib import Path
from vyre_sqlcache import DeviceFingerprint, PipelineCache
path, tag = Path(sys.argv[1]), int(sys.argv[2])
wal = Path(f"{path}-wal")
fingerprint = DeviceFingerprint.from_parts(0x10DE, 0x2684, "two writers")
largest = 0
with PipelineCache.open(path) as cache:
    for i in range(2000):
        cache.write(bytes([tag]) + i.to_bytes(31, "big"), fingerprint, os.urandom(4096))
        cache.flush()
        largest = max(largest, wal.stat().st_size)
print(largest // 16384)
"""


def test_durable_writes_of_two_processes_keep_the_log_short(cache_path: Path) -> None:
    # Each process holds back only its own commits for a RESTART, and starts the log over
    # with a commit of its own at once: left to the next writer (the other process's,
    # often), the log grew to 5,000-6,500 pages in 1,500 writes each; bounded, about
    # 1,100-2,200 at the default threshold of 1,024.
    PipelineCache.open(cache_path).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _DURABLE_WRITER, str(cache_path), str(tag)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in (1, 2)
    ]
    results = [writer.communicate(timeout=300) for writer in writers]
    for writer, (out, err) in zip(writers, results, strict=True):
        assert writer.returncode == 0, err
        assert int(out) < 4 * 1024, f"the log grew to {out.strip()} pages"
    fingerprint = DeviceFingerprint.from_parts(0x10DE, 0x2684, "two writers")
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 4000
        assert cache.read(bytes([2]) + (1999).to_bytes(31, "big"), fingerprint) is not None


def test_a_restart_starts_the_log_over_before_any_other_write(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # SQLite starts the log over at the first write after a RESTART checkpoint, and only
    # if nobody reads the log then: left to the next writer (another process's, often),
    # that mostly failed, so `restart_log` makes that write itself.
    with PipelineCache.open(cache_path) as cache:
        for i in range(20):
            cache.write(i.to_bytes(32, "big"), fingerprint, os.urandom(8192))
        cache.flush()
        other = apsw.Connection(str(cache_path))
        try:
            other.execute("SELECT count(*) FROM meta").fetchall()  # opens the log
            logged, _ = other.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            assert logged > 20
            assert checkpointer.restart_log(other) == 0
            pages, _ = other.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            assert pages <= 2, f"the log still holds {pages} of {logged} pages"
        finally:
            other.close()
        assert cache.read((7).to_bytes(32, "big"), fingerprint) is not None


def test_compact_truncates_the_log_though_another_checkpoint_runs(cache_path: Path) -> None:
    # The VACUUM writes the whole file into the log, which wakes the checkpoint thread;
    # its copy made compact's own TRUNCATE checkpoint busy (SQLite waits for no other
    # checkpointer), and that was ignored: the log stayed at the file's size, and
    # compact() said the cache took twice its size (4 of 6 runs of an 89 MB cache).
    fp = DeviceFingerprint.from_parts(1, 2, "compact")
    with PipelineCache.open(cache_path, max_bytes=None) as cache:
        for _ in range(10):
            cache.write_many([(os.urandom(32), os.urandom(16_000)) for _ in range(100)], fp)
    wal = Path(f"{cache_path}-wal")
    other = apsw.Connection(str(cache_path))
    stop = threading.Event()

    def checkpoint_on() -> None:  # as another process's checkpoint thread would
        while not stop.is_set():
            with contextlib.suppress(apsw.Error):
                other.pragma("wal_checkpoint", "PASSIVE")

    thread = threading.Thread(target=checkpoint_on)
    thread.start()
    try:
        for _ in range(3):
            with PipelineCache.open(cache_path, write_behind=False) as cache:
                _, after = cache.compact()
                assert not wal.exists() or wal.stat().st_size == 0
                assert after == cache_path.stat().st_size
    finally:
        stop.set()
        thread.join()
        other.close()


def test_compact_beside_a_reader_of_an_old_snapshot_waits_no_more_than_it_says(
    cache_path: Path,
) -> None:
    # Each TRUNCATE checkpoint waited out the whole busy timeout (10 s) for the reader:
    # 10-20 s in all, against the 5 s compact gives its log.
    fp = DeviceFingerprint.from_parts(1, 2, "compact")
    with PipelineCache.open(cache_path, max_bytes=None) as cache:
        cache.write_many([(os.urandom(32), os.urandom(4000)) for _ in range(200)], fp)
        cache.flush()
        reader = apsw.Connection(str(cache_path))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM entries").fetchall()  # holds its snapshot
        try:
            cache.write_many([(os.urandom(32), os.urandom(4000)) for _ in range(200)], fp)
            cache.flush()
            start = time.monotonic()
            cache.compact()
            took = time.monotonic() - start
        finally:
            reader.execute("ROLLBACK")
            reader.close()
    assert took < COMPACT_TRUNCATE_WAIT_S + 3  # (not a speed: one busy wait took 10 s)


def test_a_reader_left_in_a_transaction_is_named_and_the_log_cut_back_after(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sqlite3 shell left inside BEGIN held every checkpoint back: the log grew by 13 MB
    # a second with no word said, and kept its 825 MB until the cache closed (SQLite's
    # journal_size_limit -1 never cuts a log back).
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 64)  # 1 MiB
    keep = checkpointer.LOG_KEEP_FACTOR * 64 * 16384
    wal = Path(f"{cache_path}-wal")
    with PipelineCache.open(cache_path, compression="off") as cache:
        cache.write(os.urandom(32), fingerprint, b"first")
        cache.flush()
        shell = apsw.Connection(str(cache_path))
        shell.execute("BEGIN")
        shell.execute("SELECT count(*) FROM entries").fetchall()
        caplog.set_level("WARNING", logger="vyre_sqlcache")
        try:
            for _ in range(20):
                cache.write_many(
                    [(os.urandom(32), os.urandom(40_000)) for _ in range(10)], fingerprint
                )
                cache.flush()
            deadline = time.monotonic() + 10
            while "read transaction open" not in caplog.text:
                assert time.monotonic() < deadline, "nothing said of the reader"
                cache.write(os.urandom(32), fingerprint, os.urandom(40_000))
                cache.flush()
                time.sleep(0.01)
            assert str(cache_path) in caplog.text
            assert wal.stat().st_size > 4 * keep
        finally:
            shell.execute("COMMIT")
            shell.close()
        deadline = time.monotonic() + 10
        while wal.stat().st_size > keep:
            assert time.monotonic() < deadline, f"the log kept {wal.stat().st_size} bytes"
            cache.write(os.urandom(32), fingerprint, os.urandom(40_000))
            cache.flush()
            time.sleep(0.01)
