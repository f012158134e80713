"""The size cap: LRU eviction in the inserting transaction, coalesced access times, stats."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import apsw
import pytest

from vyre_sqlcache import (
    BlobTooLargeError,
    DeviceFingerprint,
    PipelineCache,
    _bookkeeping,
)

from .helpers import connection_of

BLOB = 10_000


@pytest.fixture
def capped(cache_path: Path) -> Iterator[PipelineCache]:
    # Eviction runs in the commit: these tests look right after each write, so every
    # write commits before it returns.
    with PipelineCache.open(cache_path, max_bytes=10 * BLOB, write_behind=False) as cache:
        yield cache


def write_slowly(cache: PipelineCache, fingerprint: DeviceFingerprint, count: int) -> list[bytes]:
    digests = []
    for _ in range(count):
        digest = os.urandom(32)
        cache.write(digest, fingerprint, os.urandom(BLOB))
        digests.append(digest)
        time.sleep(0.003)  # distinct access times, so LRU order is known
    return digests


def test_cap_holds_after_every_commit(
    capped: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    for _ in range(60):
        capped.write(
            os.urandom(32),
            fingerprint,
            os.urandom(BLOB // 2 + int.from_bytes(os.urandom(2), "big") % BLOB),
        )
        stats = capped.stats()
        assert stats.blob_bytes <= 10 * BLOB
    assert capped.stats().evictions > 0
    assert capped.stats().total_evictions == capped.stats().evictions


def test_least_recently_used_entries_go_first(
    capped: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digests = write_slowly(capped, fingerprint, 10)
    assert capped.read(digests[0], fingerprint) is not None  # now the most recent
    time.sleep(0.003)
    capped.write(os.urandom(32), fingerprint, os.urandom(BLOB))
    present = [capped.read(d, fingerprint) is not None for d in digests]
    # The oldest untouched entries were evicted (one more than needed: the slack).
    assert present == [True, False, False] + [True] * 7


def test_entries_stamped_while_the_clock_was_ahead_go_first(
    capped: PipelineCache, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written while the clock was 10 years ahead (then set right), they outlived every
    # entry used since: the hot set was evicted instead.
    from vyre_sqlcache import cache as cache_module

    real = cache_module._now_ms
    monkeypatch.setattr(cache_module, "_now_ms", lambda: real() + 10 * 365 * 86_400_000)
    future = write_slowly(capped, fingerprint, 3)
    monkeypatch.setattr(cache_module, "_now_ms", real)
    recent = write_slowly(capped, fingerprint, 7)
    capped.write(os.urandom(32), fingerprint, os.urandom(BLOB))
    assert all(capped.read(d, fingerprint) is not None for d in recent)
    assert sum(capped.read(d, fingerprint) is None for d in future) == 2


def test_blob_over_the_cap_is_refused(
    capped: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    capped.write(os.urandom(32), fingerprint, b"small")
    with pytest.raises(BlobTooLargeError, match=r"size cap of 100000 bytes"):
        capped.write(os.urandom(32), fingerprint, os.urandom(10 * BLOB + 1))  # incompressible
    assert len(capped) == 1


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-5, ValueError), ("1G", TypeError), (1.5, TypeError)]
)
def test_bad_caps_are_refused(cache_path: Path, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_bytes"):
        PipelineCache.open(cache_path, max_bytes=value)  # type: ignore[arg-type]


def test_eviction_is_one_delete_statement(
    capped: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    write_slowly(capped, fingerprint, 10)
    statements: list[str] = []
    connection = connection_of(capped)
    connection.trace_v2(apsw.SQLITE_TRACE_STMT, lambda event: statements.append(event["sql"]))
    try:
        capped.write(os.urandom(32), fingerprint, os.urandom(5 * BLOB))
    finally:
        connection.trace_v2(0, None)
    deletes = [s for s in statements if s.startswith("DELETE FROM entries")]
    assert len(deletes) == 1
    assert capped.stats().evictions >= 5


READ_TXN = ("BEGIN", "COMMIT")


def test_reads_do_not_write_until_the_touch_interval(
    cache: PipelineCache,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"x")
    cache.flush()  # committed: the reads below come from the file
    statements: list[str] = []
    connection = connection_of(cache)
    connection.trace_v2(apsw.SQLITE_TRACE_STMT, lambda event: statements.append(event["sql"]))
    for _ in range(100):
        assert cache.read(digest, fingerprint) == b"x"
    # Reads share held read transactions (plain BEGIN ... COMMIT) and write nothing.
    assert not [s for s in statements if not s.startswith("SELECT") and s not in READ_TXN]
    # Once the interval has passed, the next read writes the buffered hits.
    later = time.monotonic() + 2 * _bookkeeping.TOUCH_INTERVAL_S
    monkeypatch.setattr(_bookkeeping, "time", SimpleNamespace(monotonic=lambda: later))
    cache.read(digest, fingerprint)
    connection.trace_v2(0, None)
    assert any(s.startswith("UPDATE entries SET accessed_ms") for s in statements)
    other = apsw.Connection(str(cache_path))
    assert other.execute("SELECT hits FROM entries").fetchone() == (101,)
    assert dict(other.execute("SELECT name, value FROM meta"))["hits"] == 101
    other.close()


def test_touch_interval_is_a_few_seconds() -> None:
    assert 1 <= _bookkeeping.TOUCH_INTERVAL_S <= 10


def test_stats_count_this_process_and_keep_totals(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest, fingerprint, b"12345")
        cache.read(digest, fingerprint)
        cache.read(os.urandom(32), fingerprint)
        cache.flush()
        stats = cache.stats()
        assert (stats.entries, stats.blob_bytes, stats.hits, stats.misses) == (1, 5, 1, 1)
        assert stats.file_bytes > 0 and stats.total_flushes == 1
    with PipelineCache.open(cache_path) as cache:
        cache.read(digest, fingerprint)
        stats = cache.stats()
        assert (stats.hits, stats.misses) == (1, 0)
        assert (stats.total_hits, stats.total_misses) == (2, 1)


def test_replacing_an_entry_keeps_the_byte_total_exact(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, bytes(100))
    cache.write(digest, fingerprint, bytes(40))
    cache.write(os.urandom(32), fingerprint, bytes(7))
    assert (cache.stats().entries, cache.stats().blob_bytes) == (2, 47)
    cache.invalidate_impacted([1], [digest], fingerprint)
    assert (cache.stats().entries, cache.stats().blob_bytes) == (1, 7)


def test_counters_at_their_limit_never_make_writes_fail(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # A hand-edited (or ancient) counter at the int64 maximum saturates, not overflows.
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"x")
    cache.flush()
    top = 2**63 - 1
    raw = apsw.Connection(str(cache_path))
    raw.execute("UPDATE meta SET value = ? WHERE name IN ('hits', 'misses', 'flushes')", (top,))
    raw.execute("UPDATE entries SET hits = ?", (top,))
    raw.close()
    for _ in range(3):
        assert cache.read(digest, fingerprint) == b"x"
        assert cache.read(os.urandom(32), fingerprint) is None
        cache.write(os.urandom(32), fingerprint, b"more")
        cache.flush()
    stats = cache.stats()
    assert (stats.total_hits, stats.total_misses, stats.total_flushes) == (top, top, top)


@pytest.mark.parametrize("write_behind", [True, False])
def test_writes_committed_together_keep_the_cap(
    cache_path: Path, fingerprint: DeviceFingerprint, write_behind: bool
) -> None:
    """Queued writes commit in one transaction: together they may pass the cap, and the
    oldest of them give way as if each had been committed alone."""
    cap, size, count = 64_000, 4_000, 40
    blobs = [os.urandom(size) for _ in range(count)]
    with PipelineCache.open(
        cache_path, max_bytes=cap, compression="off", write_behind=write_behind
    ) as cache:
        cache.write(b"\xff" * 32, fingerprint, os.urandom(size))  # an older entry
        cache.flush()
        items = [(index.to_bytes(32, "big"), blob) for index, blob in enumerate(blobs)]
        for digest, blob in items:  # queued, or each committed alone
            cache.write(digest, fingerprint, blob)
        cache.flush()
        stats = cache.stats()
        assert stats.stored_bytes <= cap
        assert cache.read(b"\xff" * 32, fingerprint) is None
        read = [cache.read(digest, fingerprint) for digest, _ in items]
        kept = [index for index, got in enumerate(read) if got is not None]
        assert all(read[index] == blobs[index] for index in kept)  # never other bytes
        assert kept[-1] == count - 1
        if write_behind:  # one transaction: exactly the newest stay
            assert kept == list(range(count - len(kept), count))
        assert len(kept) * size > cap * 0.8
        assert stats.total_evictions == count + 1 - len(kept)
        assert stats.evictions == count + 1 - len(kept)  # this object's count too


def test_a_key_written_twice_in_one_group_over_the_cap_keeps_its_last_bytes(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    cap, size = 64_000, 30_000
    with PipelineCache.open(cache_path, max_bytes=cap, compression="off") as cache:
        last = os.urandom(size)
        for blob in (os.urandom(size), os.urandom(size), last):
            cache.write(b"\1" * 32, fingerprint, blob)  # one queued entry, replaced
        cache.write(b"\2" * 32, fingerprint, os.urandom(size))
        cache.write(b"\3" * 32, fingerprint, os.urandom(size))
        cache.flush()
        assert cache.stats().stored_bytes <= cap
        assert cache.read(b"\1" * 32, fingerprint) in (None, last)
        assert cache.read(b"\3" * 32, fingerprint) is not None
