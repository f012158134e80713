"""Write-behind: what `write()` returning means, when the file and other processes see a
write, what flush() and close() commit, and how errors of a background commit surface."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from torture.shims import FaultPlan, FaultyVFS, registered
from vyre_sqlcache import (
    CacheFullError,
    DeviceFingerprint,
    PipelineCache,
    PipelineCacheKey,
    ReadOnlyCacheError,
)
from vyre_sqlcache._writer import MAX_QUEUED_ENTRIES


def in_file(path: Path) -> int:
    """How many live entries another connection sees in the file (a tombstoned entry
    waits for the purge, unreadable)."""
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = connection.execute(
            "SELECT count(*) FROM entries WHERE id NOT IN (SELECT id FROM tombstones)"
        ).fetchone()
        assert row is not None
        return int(row[0])  # type: ignore[arg-type]
    finally:
        connection.close()


def wait_for(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


def test_a_queued_write_is_read_back_at_once_by_every_read_call(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: object
) -> None:
    key: PipelineCacheKey = make_key()  # type: ignore[operator]
    digest = os.urandom(32)
    cache.put(key, fingerprint, b"keyed")
    cache.write(digest, fingerprint, b"by digest")
    assert cache.get(key, fingerprint) == b"keyed"
    assert cache.contains(key, fingerprint)
    assert cache.get_many([key], fingerprint) == [b"keyed"]
    assert cache.read(digest, fingerprint) == b"by digest"
    assert cache.check_entry(fingerprint.cache_key(digest)) is True


def test_other_connections_see_a_write_once_the_thread_commits_it(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    cache.write(os.urandom(32), fingerprint, b"x" * 4096)
    assert wait_for(lambda: in_file(cache.path) == 1, timeout=5)


def test_writes_that_keep_coming_are_committed_while_they_come(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    # The thread gathers a burst into one group, but only up to MAX_GROUP_DELAY_S: a
    # steady stream of writes must not keep other processes from seeing any of them.
    seen_while_writing = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not seen_while_writing:
        for _ in range(20):
            cache.write(os.urandom(32), fingerprint, b"s" * 256)
            time.sleep(0.0005)
        seen_while_writing = in_file(cache.path)
    assert seen_while_writing > 0


@pytest.mark.parametrize("flushed", [True, False])
def test_another_object_on_the_file_sees_a_write_once_committed(
    cache: PipelineCache, fingerprint: DeviceFingerprint, flushed: bool
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache.path) as other:
        assert other.read(digest, fingerprint) is None
        cache.write(digest, fingerprint, b"from the first object")
        if flushed:
            cache.flush()
            assert other.read(digest, fingerprint) == b"from the first object"
        else:
            assert wait_for(lambda: other.read(digest, fingerprint) is not None, timeout=5)


def test_flush_commits_the_queue_and_close_drains_it(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    cache = PipelineCache.open(cache_path)
    cache.write_many([(os.urandom(32), b"a" * 100) for _ in range(50)], fingerprint)
    cache.flush()
    assert in_file(cache_path) == 50  # at once, no waiting
    cache.write_many([(os.urandom(32), b"b" * 100) for _ in range(50)], fingerprint)
    cache.close()
    assert in_file(cache_path) == 100


def test_a_full_queue_is_committed_by_the_caller(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    # However starved the thread is, at most the queue's bound waits for it.
    count = 4 * MAX_QUEUED_ENTRIES
    for _ in range(count):
        cache.write(os.urandom(32), fingerprint, b"q" * 64)
    assert in_file(cache.path) >= count - MAX_QUEUED_ENTRIES


def test_bad_input_raises_at_once_and_queues_nothing(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    good = os.urandom(32)
    with pytest.raises(ValueError, match="program_digest"):
        cache.write_many([(good, b"fine"), (b"short", b"bad digest")], fingerprint)
    assert cache.read(good, fingerprint) is None
    cache.flush()
    assert in_file(cache.path) == 0


def test_large_blobs_are_committed_before_write_returns(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    cache.write(os.urandom(32), fingerprint, os.urandom(300 * 1024))
    assert in_file(cache.path) == 1


def test_invalidation_reaches_queued_writes(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"stale")
    assert cache.invalidate_impacted([1], [digest], fingerprint) == 1
    assert cache.read(digest, fingerprint) is None
    cache.flush()
    assert in_file(cache.path) == 0


def test_a_read_only_cache_refuses_a_write_at_once(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    PipelineCache.open(cache_path).close()
    with (
        PipelineCache.open(cache_path, readonly=True) as cache,
        pytest.raises(ReadOnlyCacheError),
    ):
        cache.write(os.urandom(32), fingerprint, b"x")


@pytest.fixture
def faulty() -> Iterator[FaultyVFS]:
    with registered(FaultyVFS("writer-test-faulty")) as vfs:
        yield vfs


def test_an_error_of_a_background_commit_reaches_the_next_call(
    cache_path: Path, fingerprint: DeviceFingerprint, faulty: FaultyVFS
) -> None:
    PipelineCache.open(cache_path).close()
    cache = PipelineCache.open(cache_path, max_bytes=None, vfs=faulty.name)
    try:
        first = os.urandom(32)
        faulty.arm(FaultPlan(frozenset({"full"})))
        cache.write(first, fingerprint, b"queued while the disk is full")
        assert cache.read(first, fingerprint) == b"queued while the disk is full"
        # The thread's commit fails; the next call says so, once.
        with pytest.raises(CacheFullError, match="queued earlier"):
            assert wait_for(lambda: cache.write(os.urandom(32), fingerprint, b"n") and False, 5)
        with pytest.raises(CacheFullError):
            cache.flush()
        faulty.disarm()
        cache.flush()  # the queued write was kept and lands now
        assert cache.read(first, fingerprint) == b"queued while the disk is full"
    finally:
        faulty.disarm()
        cache.close()
    assert in_file(cache_path) >= 1
    with PipelineCache.open(cache_path) as reopened:
        assert reopened.read(first, fingerprint) == b"queued while the disk is full"


def test_without_write_behind_each_write_commits_before_it_returns(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    with PipelineCache.open(cache_path, write_behind=False) as cache:
        cache.write(os.urandom(32), fingerprint, b"x")
        assert in_file(cache_path) == 1
