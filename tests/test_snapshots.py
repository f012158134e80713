"""Held read snapshots: shared by a thread's reads, never stale for this process's own
changes, stale for another process's by at most `HOLD_S`, and never left held."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from tests.helpers import connection_of, run_script
from vyre_sqlcache import DeviceFingerprint, PipelineCache
from vyre_sqlcache._snapshots import HOLD_READS, HOLD_S


def digest(index: int) -> bytes:
    return index.to_bytes(32, "big")


@pytest.mark.parametrize("write_behind", [True, False])
@pytest.mark.parametrize("change", ["write", "invalidate", "delete"])
def test_this_process_sees_its_own_changes_at_once(
    cache_path: Path, fingerprint: DeviceFingerprint, write_behind: bool, change: str
) -> None:
    with PipelineCache.open(cache_path, write_behind=write_behind) as cache:
        cache.write(digest(1), fingerprint, b"one")
        cache.flush()
        reader_ready, changed, done = threading.Event(), threading.Event(), threading.Event()
        seen: list[bytes | None] = []

        def reader() -> None:
            # This thread's snapshot is held between the two reads; another thread changes.
            seen.append(cache.read(digest(1), fingerprint))
            reader_ready.set()
            changed.wait()
            seen.append(cache.read(digest(1), fingerprint))
            seen.append(cache.read(digest(2), fingerprint))
            done.set()

        thread = threading.Thread(target=reader)
        thread.start()
        reader_ready.wait()
        if change == "write":
            cache.write(digest(1), fingerprint, b"uno")
            cache.write(digest(2), fingerprint, b"two")
            cache.flush()  # committed and gone from the queue: reads come from the file
            expected = [b"one", b"uno", b"two"]
        elif change == "invalidate":
            assert cache.invalidate_impacted([1], [digest(1)], fingerprint) == 1
            expected = [b"one", None, None]
        else:
            assert cache.delete_entries([fingerprint.cache_key(digest(1))]) == 1
            expected = [b"one", None, None]
        changed.set()
        thread.join(10)
        assert done.is_set()
        assert seen == expected


CHILD = textwrap.dedent(
    """
    import sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(sys.argv[1], write_behind=False) as cache:
        cache.write(int(sys.argv[2]).to_bytes(32, "big"), fp, b"from the child")
    """
)


def write_in_another_process(path: Path, index: int) -> None:
    subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(index)],
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_another_process_s_write_is_seen_within_the_hold_time(cache_path: Path) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest(1), fp, b"here")
        cache.flush()
        assert cache.read(digest(1), fp) == b"here"  # a snapshot is held now
        write_in_another_process(cache_path, 2)
        time.sleep(2 * HOLD_S)
        assert cache.read(digest(2), fp) == b"from the child"


def test_reads_share_snapshots_within_the_read_bound(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    cache.write(digest(1), fingerprint, b"x")
    cache.flush()
    assert cache.read(digest(1), fingerprint) == b"x"
    statements: list[str] = []
    connection_of(cache).trace_v2(
        apsw.SQLITE_TRACE_STMT, lambda event: statements.append(event["sql"])
    )
    reads = 4 * HOLD_READS
    for _ in range(reads):
        assert cache.read(digest(1), fingerprint) == b"x"
    begins = statements.count("BEGIN")
    # At least one snapshot per HOLD_READS reads; far fewer than one a read (more than
    # the minimum only where the machine is so slow that HOLD_S passes first).
    assert reads // HOLD_READS <= begins <= reads // 4


def checkpoint_is_blocked(path: Path) -> bool:
    """Whether a full checkpoint must stop short: some reader holds an old snapshot."""
    connection = apsw.Connection(str(path))
    try:
        busy, _log, _done = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return bool(busy)
    finally:
        connection.close()


# Compressed entries are read with a statement, raw ones through blob handles, which keep
# a read transaction open until they are closed.
BLOBS = {"compressed": b"x" * 5000, "raw": os.urandom(5000)}


@pytest.mark.parametrize("stored", sorted(BLOBS))
@pytest.mark.parametrize("then", ["idles", "ends"])
def test_a_thread_that_stops_reading_does_not_keep_its_snapshot(
    cache_path: Path, stored: str, then: str
) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest(1), fp, BLOBS[stored])
        cache.flush()
        read, finish = threading.Event(), threading.Event()

        def read_then_stop() -> None:
            assert cache.read(digest(1), fp) is not None
            read.set()
            if then == "idles":
                finish.wait()  # alive, idle, never reading again

        # An ended thread's slot is gone with its thread-local storage; its connection,
        # kept by the pool, was left inside the snapshot until another thread of the
        # process opened a connection (none does here), and the log grew without bound.
        thread = threading.Thread(target=read_then_stop)
        thread.start()
        try:
            read.wait()
            if then == "ends":
                thread.join(10)
            write_in_another_process(cache_path, 2)  # log frames past the reader's snapshot
            deadline = time.monotonic() + 5
            while checkpoint_is_blocked(cache_path):
                assert time.monotonic() < deadline, "the thread's snapshot is still held"
                time.sleep(HOLD_S)
        finally:
            finish.set()
            thread.join(10)


def test_reads_in_a_held_snapshot_after_a_fork(cache_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("POSIX fork")
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest(1), fp, b"before")
        cache.flush()
        assert cache.read(digest(1), fp) == b"before"  # held when the process forks
        pid = os.fork()
        if pid == 0:  # the child reads and writes the same cache, then leaves at once
            code = 1
            try:
                cache.write(digest(2), fp, b"child")
                cache.flush()
                ok = cache.read(digest(1), fp) == b"before" and cache.read(digest(2), fp)
                code = 0 if ok == b"child" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        time.sleep(2 * HOLD_S)
        assert cache.read(digest(2), fp) == b"child"


INVALIDATE_CHILD = textwrap.dedent(
    """
    import sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(sys.argv[1]) as cache:
        digest = int(sys.argv[2]).to_bytes(32, "big")
        assert cache.invalidate_impacted([1], [digest], fp) == 1
    """
)


@pytest.mark.parametrize("stored", sorted(BLOBS))
def test_another_process_s_invalidation_is_seen_within_the_hold_time(
    cache_path: Path, stored: str
) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(digest(i), BLOBS[stored]) for i in (1, 2)], fp)
        cache.flush()
        assert cache.read(digest(1), fp) == BLOBS[stored]  # a snapshot is held now
        subprocess.run(
            [sys.executable, "-c", INVALIDATE_CHILD, str(cache_path), "2"],
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        time.sleep(2 * HOLD_S)
        # Tombstoned (or already purged) in the newer snapshot: never served again.
        for _ in range(3):
            assert cache.read(digest(2), fp) is None
            assert cache.read(digest(1), fp) == BLOBS[stored]


@pytest.mark.parametrize("stored", sorted(BLOBS))
def test_a_tombstone_left_by_another_process_hides_its_entry(cache_path: Path, stored: str) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "snap")
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(digest(i), BLOBS[stored]) for i in (1, 2)], fp)
        cache.flush()
        assert cache.read(digest(2), fp) == BLOBS[stored]  # a snapshot is held now
        # What an invalidating process leaves when it dies before its purge: a tombstone.
        other = apsw.Connection(str(cache_path))
        other.execute(
            "INSERT INTO tombstones (id) SELECT id FROM entries WHERE entry_key = ?",
            (fp.cache_key(digest(2)),),
        )
        other.close()
        time.sleep(2 * HOLD_S)
        for _ in range(3):
            assert cache.read(digest(2), fp) is None
            assert cache.read(digest(1), fp) == BLOBS[stored]


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def test_hits_and_misses_of_every_kind_in_one_snapshot(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    rng = random.Random(7)
    blobs = {
        1: b"",
        2: rng.randbytes(3000),
        3: ZSTD_MAGIC + rng.randbytes(3000),  # raw bytes that start like a zstd frame
        4: b"kernel void f() {}\n" * 500,  # compressed
        5: rng.randbytes(300 * 1024),  # over the size a statement's row carries
        6: ZSTD_MAGIC,
        7: ZSTD_MAGIC + rng.randbytes(300 * 1024),  # the same, starting like a zstd frame
        8: b"".join(b"kernel %d\n" % n + rng.randbytes(8) for n in range(200_000)),  # compressed
        9: rng.randbytes((8 << 20) + 1),  # over the size read through the mapping
    }
    cache.write_many([(digest(i), blob) for i, blob in blobs.items()], fingerprint)
    cache.flush()
    wanted = [*blobs, 100, 101, 102] * 20
    rng.shuffle(wanted)
    for index in wanted:
        assert cache.read(digest(index), fingerprint) == blobs.get(index)


@pytest.mark.parametrize(
    ("column", "damage"),
    [
        ("data", lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:]),
        ("data", lambda data: data[:-1]),
        ("data", lambda data: ZSTD_MAGIC + data[4:]),
        ("checksum", lambda checksum: bytes([checksum[0] ^ 1]) + checksum[1:]),
        ("checksum", lambda checksum: checksum * 2),  # a BLAKE3 checksum's length
    ],
)
def test_a_damaged_entry_read_through_the_blob_handles_is_a_miss(
    cache_path: Path, fingerprint: DeviceFingerprint, column: str, damage: Any
) -> None:
    rng = random.Random(3)
    blobs = {i: rng.randbytes(4000) for i in range(3)}
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(digest(i), blob) for i, blob in blobs.items()], fingerprint)
        cache.flush()
        rowid = int.from_bytes(fingerprint.cache_key(digest(1))[:8], "big", signed=True)
        other = apsw.Connection(str(cache_path))
        (value,) = other.execute(f"SELECT {column} FROM blobs WHERE id = ?", (rowid,)).fetchone()
        other.execute(f"UPDATE blobs SET {column} = ? WHERE id = ?", (damage(value), rowid))
        other.close()
        for _ in range(3):
            time.sleep(HOLD_S * 2)  # a new snapshot, which sees the damage
            assert cache.read(digest(0), fingerprint) == blobs[0]  # moves the handles
            assert cache.read(digest(1), fingerprint) is None
            assert cache.read(digest(2), fingerprint) == blobs[2]
        assert cache.stats().checksum_failures == 1  # dropped at the first read


# argv: path. A thread's slot outlives the thread in a reference cycle, and the cycle
# collector frees it while this thread holds the reaper's wake lock (as it does inside
# `Event.set` or `Event.wait`): the slot's callback must take no lock.
SLOT_FREED_UNDER_A_LOCK = textwrap.dedent(
    """
    import gc, os, sys, threading
    from vyre_sqlcache import PipelineCache, _snapshots
    cache = PipelineCache.open(sys.argv[1])
    key = os.urandom(32)
    cache.put_entry(key, b"x" * 1000)
    cache.flush()
    kept = []
    def read_and_leave_a_cycle():
        cache.get_entry(key)
        cycle = [cache._pool._local.slot]
        cycle.append(cycle)
    gc.disable()
    thread = threading.Thread(target=read_and_leave_a_cycle)
    thread.start()
    thread.join()
    with _snapshots._reaper._lock:
        gc.collect()
    cache.close()
    print("done")
    """
)


def test_a_slot_freed_by_the_cycle_collector_under_the_reapers_lock_deadlocks_nothing(
    cache_path: Path,
) -> None:
    # The callback woke the reaper with Event.set, which took the lock of the Event the
    # collector ran under: the thread hung for ever, and with it every thread that began
    # a snapshot after. It takes no lock (the reaper's own, held here, included).
    result = run_script(SLOT_FREED_UNDER_A_LOCK, str(cache_path), timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"
