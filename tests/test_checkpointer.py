"""Background checkpoints: commits never checkpoint; a thread folds the log back."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import DeviceFingerprint, PipelineCache
from vyre_sqlcache import _checkpointer as checkpointer

from .helpers import connection_of, count_checkpoints


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
    done = count_checkpoints(monkeypatch)
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
    done = count_checkpoints(monkeypatch)
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
