"""Invalidation and deletion by tombstone: reads never serve a tombstoned entry, the
totals count live entries only, and a background purge deletes the rows later."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from tests.helpers import wait_purged
from vyre_sqlcache import DeviceFingerprint, PipelineCache, PipelineCacheKey, _checkpointer, _schema
from vyre_sqlcache._checksums import compute
from vyre_sqlcache.keys import entry_id

BLOB = 4096


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = apsw.Connection(str(path))
    try:
        return [tuple(row) for row in connection.execute(sql)]
    finally:
        connection.close()


def meta_and_recount(path: Path) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The live totals kept in `meta`, and the same totals counted from the rows."""
    connection = apsw.Connection(str(path))
    try:
        meta = dict(connection.execute("SELECT name, value FROM meta").fetchall())
        counted = connection.execute(
            "SELECT count(*), coalesce(sum(blob_size), 0), coalesce(sum(stored_size), 0) "
            "FROM entries WHERE id NOT IN (SELECT id FROM tombstones)"
        ).fetchone()
        assert counted is not None
        return (
            (int(meta["entries"]), int(meta["blob_bytes"]), int(meta["stored_bytes"])),
            (int(counted[0]), int(counted[1]), int(counted[2])),
        )
    finally:
        connection.close()


def assert_totals_right(path: Path) -> None:
    kept, counted = meta_and_recount(path)
    assert kept == counted


@pytest.fixture
def filled(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> Iterator[tuple[PipelineCache, list[bytes]]]:
    digests = [os.urandom(32) for _ in range(20)]
    cache.write_many([(d, os.urandom(BLOB)) for d in digests], fingerprint)
    cache.flush()
    yield cache, digests


def invalidate(
    cache: PipelineCache, fingerprint: DeviceFingerprint, digests: list[bytes], count: int
) -> int:
    mask = [1] * count + [0] * (len(digests) - count)
    return cache.invalidate_impacted(mask, digests, fingerprint)


def test_invalidated_entries_miss_at_once_here_and_in_another_connection(
    no_purge: None,
    filled: tuple[PipelineCache, list[bytes]],
    fingerprint: DeviceFingerprint,
    cache_path: Path,
) -> None:
    cache, digests = filled
    assert invalidate(cache, fingerprint, digests, 5) == 5
    assert invalidate(cache, fingerprint, digests, 5) == 0  # already gone
    for digest in digests[:5]:
        assert cache.read(digest, fingerprint) is None
    assert all(cache.read(d, fingerprint) is not None for d in digests[5:])
    with PipelineCache.open(cache_path) as other:
        assert [other.read(d, fingerprint) for d in digests[:5]] == [None] * 5
        assert len(other) == 15
    # the rows are still there, tombstoned, until the purge
    assert rows(cache_path, "SELECT count(*) FROM entries") == [(20,)]
    assert rows(cache_path, "SELECT count(*) FROM tombstones") == [(5,)]
    assert_totals_right(cache_path)


def test_deleted_keyed_entries_miss_in_get_contains_and_get_many(
    no_purge: None,
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
) -> None:
    keys = [make_key() for _ in range(4)]
    cache.put_many([(k, os.urandom(BLOB)) for k in keys], fingerprint)
    assert cache.delete(keys[0], fingerprint)
    assert not cache.delete(keys[0], fingerprint)
    entry_keys = [k.entry_key(fingerprint) for k in keys]
    assert cache.delete_entries(entry_keys[1:2]) == 1
    assert cache.get(keys[0], fingerprint) is None
    assert not cache.contains(keys[1], fingerprint)
    got = cache.get_many(keys, fingerprint)
    assert got[0] is None and got[1] is None and got[2] is not None and got[3] is not None
    assert cache.get_entry(entry_keys[0]) is None
    assert cache.check_entry(entry_keys[1]) is None
    assert cache.peek_entry(entry_keys[1]) is None


def test_stats_len_listing_views_and_check_count_live_entries(
    no_purge: None,
    filled: tuple[PipelineCache, list[bytes]],
    fingerprint: DeviceFingerprint,
    cache_path: Path,
) -> None:
    cache, digests = filled
    before = cache.stats()
    invalidate(cache, fingerprint, digests, 8)
    stats = cache.stats()
    assert len(cache) == stats.entries == 12
    assert stats.blob_bytes == before.blob_bytes - 8 * BLOB
    assert stats.stored_bytes == before.stored_bytes - 8 * BLOB
    assert len(cache.entries()) == 12
    assert rows(cache_path, "SELECT count(*) FROM pipelines_v") == [(12,)]
    assert rows(cache_path, "SELECT sum(entries), sum(bytes) FROM stats_v") == [(12, 12 * BLOB)]
    assert sum(row["entries"] for row in cache.device_totals()) == 12
    report = cache.check()
    assert report.ok and report.checked == 12
    assert_totals_right(cache_path)


def test_a_write_of_the_same_key_clears_its_tombstone(
    no_purge: None,
    filled: tuple[PipelineCache, list[bytes]],
    fingerprint: DeviceFingerprint,
    cache_path: Path,
) -> None:
    cache, digests = filled
    invalidate(cache, fingerprint, digests, 3)
    fresh = os.urandom(BLOB * 2)
    cache.write(digests[0], fingerprint, fresh)
    assert cache.read(digests[0], fingerprint) == fresh
    cache.flush()
    assert cache.read(digests[0], fingerprint) == fresh
    with PipelineCache.open(cache_path) as other:
        assert other.read(digests[0], fingerprint) == fresh
    stats = cache.stats()
    assert stats.entries == 18
    assert stats.blob_bytes == 17 * BLOB + len(fresh)
    assert rows(cache_path, "SELECT count(*) FROM tombstones") == [(2,)]
    assert_totals_right(cache_path)
    # and a purge now leaves it alone
    while cache._purge_batch():
        pass
    assert cache.read(digests[0], fingerprint) == fresh
    assert_totals_right(cache_path)


def test_the_purge_deletes_rows_and_blobs_and_keeps_the_totals(
    filled: tuple[PipelineCache, list[bytes]],
    fingerprint: DeviceFingerprint,
    cache_path: Path,
) -> None:
    cache, digests = filled
    assert invalidate(cache, fingerprint, digests, 10) == 10
    wait_purged(cache_path)
    assert rows(cache_path, "SELECT count(*), sum(blob_size) FROM entries") == [(10, 10 * BLOB)]
    assert rows(cache_path, "SELECT count(*) FROM blobs") == [(10,)]
    stats = cache.stats()
    assert (stats.entries, stats.blob_bytes) == (10, 10 * BLOB)
    assert_totals_right(cache_path)
    assert all(cache.read(d, fingerprint) is not None for d in digests[10:])


def test_the_purge_works_in_small_batches(
    no_purge: None,
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    cache_path: Path,
) -> None:
    digests = [os.urandom(32) for _ in range(600)]
    cache.write_many([(d, b"x" * 100) for d in digests], fingerprint)
    assert invalidate(cache, fingerprint, digests, 600) == 600
    batches = 0
    while cache._purge_batch():
        batches += 1
    assert batches == 2  # 256 + 256, then 88 (the last batch says none are left)
    assert rows(cache_path, "SELECT count(*) FROM entries") == [(0,)]
    assert rows(cache_path, "SELECT count(*) FROM blobs") == [(0,)]
    assert_totals_right(cache_path)


def test_close_purges_what_is_left(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_checkpointer.Checkpointer, "purge_soon", lambda self: None)
    digests = [os.urandom(32) for _ in range(10)]
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(d, os.urandom(BLOB)) for d in digests], fingerprint)
        invalidate(cache, fingerprint, digests, 4)
        assert rows(cache_path, "SELECT count(*) FROM tombstones") == [(4,)]
    assert rows(cache_path, "SELECT count(*) FROM tombstones") == [(0,)]
    assert rows(cache_path, "SELECT count(*) FROM entries") == [(6,)]
    assert_totals_right(cache_path)


def test_tombstones_committed_before_a_crash_stay_unreadable(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digests = [os.urandom(32) for _ in range(10)]
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(d, os.urandom(BLOB)) for d in digests], fingerprint)
    # A process that committed its tombstones and died before purging.
    dead = [entry_id(fingerprint.cache_key(d)) for d in digests[:4]]
    connection = apsw.Connection(str(cache_path))
    with connection:
        connection.executemany("INSERT INTO tombstones (id) VALUES (?)", [(i,) for i in dead])
    connection.close()
    assert_totals_right(cache_path)
    with PipelineCache.open(cache_path) as cache:
        assert [cache.read(d, fingerprint) for d in digests[:4]] == [None] * 4
        assert all(cache.read(d, fingerprint) is not None for d in digests[4:])
        assert len(cache) == 6
        wait_purged(cache_path)  # the next writer purges them
    assert rows(cache_path, "SELECT count(*) FROM entries") == [(6,)]
    assert_totals_right(cache_path)


def test_the_cap_counts_live_bytes_and_eviction_skips_tombstones(
    no_purge: None, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    with PipelineCache.open(cache_path, max_bytes=10 * BLOB, write_behind=False) as cache:
        digests = [os.urandom(32) for _ in range(10)]
        for digest in digests:
            cache.write(digest, fingerprint, os.urandom(BLOB))
        assert invalidate(cache, fingerprint, digests, 5) == 5
        # Five tombstoned entries take no room: five more writes fit without eviction.
        more = [os.urandom(32) for _ in range(5)]
        for digest in more:
            cache.write(digest, fingerprint, os.urandom(BLOB))
        assert cache.stats().evictions == 0
        assert all(cache.read(d, fingerprint) is not None for d in digests[5:] + more)
        assert_totals_right(cache_path)
        # Past the cap, only live entries are evicted, and each is counted once.
        cache.write(os.urandom(32), fingerprint, os.urandom(BLOB))
        evicted = cache.stats().evictions
        assert 1 <= evicted <= 2
        assert rows(cache_path, "SELECT count(*) FROM tombstones") == [(5,)]
        assert cache.stats().stored_bytes <= 10 * BLOB
        assert len(cache) == 11 - evicted
        assert_totals_right(cache_path)
        while cache._purge_batch():
            pass
        assert_totals_right(cache_path)
        assert len(cache) == 11 - evicted


def test_a_schema_3_file_migrates_and_its_entries_stay_readable(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    cache_path.parent.mkdir(parents=True)
    blob = os.urandom(BLOB)
    digest = os.urandom(32)
    key = fingerprint.cache_key(digest)
    connection = apsw.Connection(str(cache_path))
    try:
        connection.pragma("page_size", 16384)
        connection.pragma("journal_mode", "wal")
        for migration in _schema.migrations()[:3]:
            connection.execute(migration.sql)
        connection.pragma("user_version", 3)
        connection.execute(
            "INSERT INTO entries (id, entry_key, vendor, device, driver_digest, program_digest, "
            "blob_size, stored_size, created_ms, accessed_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
            (
                entry_id(key),
                key,
                fingerprint.vendor,
                fingerprint.device,
                fingerprint.driver_digest,
                digest,
                len(blob),
                len(blob),
            ),
        )
        connection.execute(
            "INSERT INTO blobs (id, checksum_algo, checksum, data) VALUES (?, 'xxh3-128', ?, ?)",
            (entry_id(key), compute("xxh3-128", key, blob), blob),
        )
    finally:
        connection.close()
    with PipelineCache.open(cache_path) as cache:
        assert cache.schema_version() == _schema.latest_version() >= 4
        assert cache.read(digest, fingerprint) == blob
        assert len(cache) == 1 and cache.stats().blob_bytes == BLOB
        assert cache.invalidate_impacted([1], [digest], fingerprint) == 1
        assert cache.read(digest, fingerprint) is None
        assert len(cache) == 0
    assert rows(cache_path, "SELECT count(*) FROM entries") == [(0,)]
    assert_totals_right(cache_path)
