"""flush(): what it acknowledged survives a power cut that loses every unsynced byte."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import DeviceFingerprint, PipelineCache
from vyre_sqlcache import _checkpointer as checkpointer

from .helpers import freeze
from .vfs import SyncTrackingVFS, abandon, power_cut


@pytest.fixture
def sync_vfs() -> Iterator[SyncTrackingVFS]:
    vfs = SyncTrackingVFS()
    yield vfs
    vfs.unregister()


def reopen_after_power_cut(path: Path, crashed: PipelineCache) -> PipelineCache:
    # Everything stops at a power cut: the old object's threads must not write into the
    # file the survivor opens (a queued write following the path there, say).
    freeze(crashed)
    power_cut(path)
    return PipelineCache.open(path)


def test_flushed_writes_survive_a_power_cut(
    cache_path: Path, fingerprint: DeviceFingerprint, sync_vfs: SyncTrackingVFS
) -> None:
    cache_path.parent.mkdir(parents=True)
    blobs = {os.urandom(32): os.urandom(n * 997) for n in range(1, 60)}
    cache = PipelineCache.open(cache_path, vfs=sync_vfs.name)
    for digest, blob in blobs.items():
        cache.write(digest, fingerprint, blob)
    cache.flush()
    # Unflushed work after the flush may be lost; the flushed work may not.
    late = os.urandom(32)
    cache.write(late, fingerprint, b"late")
    with reopen_after_power_cut(cache_path, cache) as survivor:
        for digest, blob in blobs.items():
            assert survivor.read(digest, fingerprint) == blob
    abandon(cache)


def test_without_flush_the_shim_really_loses_writes(
    cache_path: Path, fingerprint: DeviceFingerprint, sync_vfs: SyncTrackingVFS
) -> None:
    # Shows the shim is strict enough to catch a flush() that did not sync: the write is
    # committed (no write-behind) but never synced.
    cache_path.parent.mkdir(parents=True)
    cache = PipelineCache.open(cache_path, vfs=sync_vfs.name, write_behind=False)
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"never flushed")
    with reopen_after_power_cut(cache_path, cache) as survivor:
        assert survivor.read(digest, fingerprint) is None
    abandon(cache)


def test_flush_with_nothing_pending_does_not_sync(
    cache_path: Path, fingerprint: DeviceFingerprint, sync_vfs: SyncTrackingVFS
) -> None:
    cache_path.parent.mkdir(parents=True)
    with PipelineCache.open(cache_path, vfs=sync_vfs.name) as cache:
        cache.write(os.urandom(32), fingerprint, b"x")
        cache.flush()
        syncs = sync_vfs.syncs
        cache.flush()
        assert sync_vfs.syncs == syncs


class FailingSyncVFS(SyncTrackingVFS):
    """Fails every sync while `failing` is set."""

    failing = False

    def xOpen(self, name: object, flags: list[int]) -> object:
        file = super().xOpen(name, flags)
        vfs = self
        original = file.xSync

        def sync(flags: int) -> None:
            if vfs.failing:
                raise apsw.IOError("injected sync failure")
            original(flags)

        file.xSync = sync  # type: ignore[method-assign]
        return file


def test_failed_flush_keeps_writes_pending_and_a_later_flush_retries(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    from vyre_sqlcache import CacheError

    cache_path.parent.mkdir(parents=True)
    vfs = FailingSyncVFS("failsync")
    try:
        cache = PipelineCache.open(cache_path, vfs=vfs.name)
        digest = os.urandom(32)
        cache.write(digest, fingerprint, b"must survive")
        vfs.failing = True
        with pytest.raises(CacheError):
            cache.flush()
        vfs.failing = False
        cache.flush()
        with reopen_after_power_cut(cache_path, cache) as survivor:
            assert survivor.read(digest, fingerprint) == b"must survive"
        abandon(cache)
    finally:
        vfs.unregister()


def test_flushed_writes_survive_a_power_cut_after_the_log_started_over(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    sync_vfs: SyncTrackingVFS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a short threshold the checkpoint thread has the log start over many times,
    # so later commits write over older frames of the same log file.
    monkeypatch.setattr(checkpointer, "WAL_CHECKPOINT_PAGES", 16)
    cache_path.parent.mkdir(parents=True)
    wal = Path(f"{cache_path}-wal")
    cache = PipelineCache.open(cache_path, vfs=sync_vfs.name)
    blobs = {os.urandom(32): os.urandom(3000 + n * 50) for n in range(150)}
    largest = 0
    for digest, blob in blobs.items():
        cache.write(digest, fingerprint, blob)
        cache.flush()
        largest = max(largest, wal.stat().st_size)
    # 150 commits of about 7 pages each: a log that never started over would be ~1,000.
    assert largest < 300 * 16384
    cache.write(os.urandom(32), fingerprint, b"late")
    with reopen_after_power_cut(cache_path, cache) as survivor:
        for digest, blob in blobs.items():
            assert survivor.read(digest, fingerprint) == blob
    abandon(cache)
