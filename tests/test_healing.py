"""Self-healing: damaged files are moved aside; a full disk evicts and retries."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import (
    CacheFullError,
    CorruptCacheError,
    DeviceFingerprint,
    NotACacheError,
    PipelineCache,
    PipelineCacheKey,
)
from vyre_sqlcache._cachefile import KEEP_CORRUPT_COPIES, needs_check_marker
from vyre_sqlcache.keys import entry_id

from .helpers import connection_of, overwrite_page, sql_shell


def blob_of(digest: bytes) -> bytes:
    return random.Random(digest).randbytes(3200)  # incompressible


def populate(path: Path, fingerprint: DeviceFingerprint, count: int = 200) -> list[bytes]:
    digests = [os.urandom(32) for _ in range(count)]
    with PipelineCache.open(path) as cache:
        cache.write_many([(d, blob_of(d)) for d in digests], fingerprint)
    return digests


def aside(path: Path) -> list[Path]:
    moved = path.parent.glob(path.name + ".corrupt-*")
    return sorted(p for p in moved if not p.name.endswith(("-wal", "-shm")))


@pytest.mark.parametrize(
    "content",
    [b"not a database" * 1000, b"SQLite format 3\x00" + b"\xff" * 5000, b"\x00" * 100],
    ids=["text", "bad-header", "zeros"],
)
def test_a_file_that_is_not_a_database_is_moved_aside(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    content: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(content)
    Path(str(cache_path) + "-wal").write_bytes(b"stale wal")
    with caplog.at_level(logging.WARNING, logger="vyre_sqlcache"):
        cache = PipelineCache.open(cache_path)
    with cache:
        digest = os.urandom(32)
        cache.write(digest, fingerprint, b"fresh")
        assert cache.read(digest, fingerprint) == b"fresh"
    (moved,) = aside(cache_path)
    assert moved.read_bytes() == content
    if not content.startswith(b"SQLite"):  # SQLite itself drops the -wal of the other
        assert Path(str(moved) + "-wal").read_bytes() == b"stale wal"
    assert "moved it to" in caplog.text


def test_strict_raises_and_leaves_the_file(cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(b"\0" * 4096)  # a zeroed first page: a damaged cache
    with pytest.raises(CorruptCacheError, match="not a SQLite database"):
        PipelineCache.open(cache_path, strict=True)
    assert cache_path.read_bytes() == b"\0" * 4096
    assert not aside(cache_path)


NOTES = b"my notes, not a cache\n" * 100
# Binary documents whose size is a whole number of 512-byte pages, as a cache's is.
PNG = b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(8 * 512 - 8)
ZIP = b"PK\x03\x04" + random.Random(2).randbytes(4 * 512 - 4)
UNNAMED_BINARY = b"\x01\x02vyre" + random.Random(3).randbytes(4 * 512 - 6)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", NOTES),
        ("pipelines.sqlite3", NOTES),  # text is never a cache's first page
        ("picture.png", PNG),
        ("pipelines.sqlite3", PNG),  # a known document's first bytes
        ("archive.zip", ZIP),
        ("disk.img", bytes(8 * 512)),  # zeros, but named as a disk image
        ("weights.npy", UNNAMED_BINARY),  # unknown bytes, named as a document
    ],
    ids=["text", "text-named-as-cache", "png", "png-named-as-cache", "zip", "img", "npy"],
)
def test_another_programs_file_is_never_moved(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NotACacheError, match="not a SQLite database"):
        PipelineCache.open(path)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_damaged_first_page_at_a_chosen_path_is_moved_aside(
    tmp_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # A page of garbage over the header, no -wal beside it: unknown binary bytes in a
    # whole number of pages, not named as a document: a damaged cache.
    path = tmp_path / "pipelines.sqlite3"
    populate(path, fingerprint, 20)
    with open(path, "r+b") as file:
        file.write(random.Random(4).randbytes(16384))
    with PipelineCache.open(path) as cache:
        assert len(cache) == 0
    assert len(aside(path)) == 1


@pytest.mark.parametrize("name", ["pipelines.sqlite3", "notes.txt"])
def test_an_empty_file_becomes_a_new_cache(
    tmp_path: Path, fingerprint: DeviceFingerprint, name: str
) -> None:
    # An empty file holds nothing to lose: SQLite makes it a new database in place.
    path = tmp_path / name
    path.touch()
    with PipelineCache.open(path) as cache:
        cache.write(bytes(32), fingerprint, b"stored")
        assert cache.read(bytes(32), fingerprint) == b"stored"
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_damaged_copies_do_not_pile_up(cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True)
    for round_ in range(KEEP_CORRUPT_COPIES + 3):
        cache_path.write_bytes(b"\0" * 4096)
        PipelineCache.open(cache_path).close()
        assert len(aside(cache_path)) == min(round_ + 1, KEEP_CORRUPT_COPIES)


def damage_btree_page(path: Path) -> None:
    """Overwrite an interior page of the `blobs` table with garbage."""
    overwrite_page(
        path,
        "SELECT rootpage FROM sqlite_schema WHERE name = 'blobs'",
        lambda size: os.urandom(size - 200),
        at=100,
    )


def test_verify_moves_a_file_failing_quick_check_aside(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    populate(cache_path, fingerprint)
    damage_btree_page(cache_path)
    with PipelineCache.open(cache_path, verify=True) as cache:
        assert len(cache) == 0
    assert len(aside(cache_path)) == 1


def test_damage_met_in_use_is_a_miss_and_heals_at_the_next_open(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digests = populate(cache_path, fingerprint)
    damage_btree_page(cache_path)
    with PipelineCache.open(cache_path) as cache:  # opening does not scan
        results = [cache.read(d, fingerprint) for d in digests]
    # Never wrong bytes: each read is the right blob or a miss.
    assert all(r is None or r == blob_of(d) for r, d in zip(results, digests, strict=True))
    assert None in results
    assert needs_check_marker(cache_path).exists()
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 0
        cache.write(digests[0], fingerprint, b"again")
    assert len(aside(cache_path)) == 1
    assert not needs_check_marker(cache_path).exists()


def test_damage_met_by_a_batch_read_costs_only_the_damaged_entry(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # get_many reads its keys with one statement; damage that fails the statement must
    # not turn the sound entries of the batch into misses.
    keys = [
        PipelineCacheKey(bytes([i]) * 32, bytes([i]) * 32, 0, (64, 1, 1), 0, "vulkan")
        for i in range(20)
    ]
    blobs = [os.urandom(100_000 if i == 7 else 3_000) for i in range(20)]
    with PipelineCache.open(cache_path, compression="off") as cache:
        cache.put_many(list(zip(keys, blobs, strict=True)), fingerprint)
    # Entry 7 is the only one large enough for overflow pages: break its chain.
    overwrite_page(
        cache_path,
        "SELECT min(pageno) FROM dbstat WHERE name = 'blobs' AND pagetype = 'overflow'",
        bytes,
    )
    with PipelineCache.open(cache_path) as cache:
        got = cache.get_many(keys, fingerprint)
    assert got == [None if i == 7 else blob for i, blob in enumerate(blobs)]


def test_damage_met_by_many_reads_is_logged_once(
    cache_path: Path, fingerprint: DeviceFingerprint, caplog: pytest.LogCaptureFixture
) -> None:
    digests = populate(cache_path, fingerprint)
    damage_btree_page(cache_path)
    caplog.set_level(logging.WARNING, logger="vyre_sqlcache")
    with PipelineCache.open(cache_path) as cache:
        for _ in range(3):
            results = [cache.read(d, fingerprint) for d in digests]
    assert results.count(None) > 10
    failed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(failed) == 1


def test_damage_met_in_a_file_moved_aside_leaves_the_new_one_unmarked(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # Another process moved the damaged file aside and made a new one: the reader reads
    # on in the old file until its next commit, and its damage is not the new file's.
    digests = populate(cache_path, fingerprint)
    with PipelineCache.open(cache_path) as reader:
        assert reader.read(digests[0], fingerprint) == blob_of(digests[0])
        damage_btree_page(cache_path)
        os.replace(cache_path, cache_path.with_name("moved-aside.sqlite3"))
        PipelineCache.open(cache_path).close()  # the new, healthy file
        results = [reader.read(d, fingerprint) for d in digests]
        assert None in results
    assert not needs_check_marker(cache_path).exists()


def fill_until_full(cache: PipelineCache, fingerprint: DeviceFingerprint) -> list[bytes]:
    written = []
    for _ in range(1000):
        digest = os.urandom(32)
        try:
            cache.write(digest, fingerprint, os.urandom(20_000))
        except CacheFullError:
            break
        written.append(digest)
    return written


@contextmanager
def page_limit(path: Path, pages: int) -> Iterator[None]:
    """Every SQLite connection opened to `path` meanwhile may grow it to `pages` pages
    only, as if the disk held no more (whichever thread's connection commits)."""

    def limit(connection: apsw.Connection) -> None:
        if connection.filename == str(path):
            connection.pragma("max_page_count", pages)

    apsw.connection_hooks.append(limit)
    try:
        yield
    finally:
        apsw.connection_hooks.remove(limit)


def test_a_full_disk_evicts_and_retries(cache_path: Path, fingerprint: DeviceFingerprint) -> None:
    # A real full disk: test_full_disk.py; here SQLite's page limit stands for it.
    with page_limit(cache_path, 200), PipelineCache.open(cache_path, max_bytes=None) as cache:
        written = []
        for _ in range(400):
            digest = os.urandom(32)
            cache.write(digest, fingerprint, os.urandom(20_000))  # never raises: evicts
            written.append(digest)
        assert cache.stats().evictions > 0
        assert cache.read(written[-1], fingerprint) is not None
        assert connection_of(cache).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_group_larger_than_an_empty_caches_room_goes_in_as_far_as_it_fits(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # Nothing to evict before the first commit: the group is split, not refused.
    items = [(os.urandom(32), os.urandom(20_000)) for _ in range(400)]
    with page_limit(cache_path, 200), PipelineCache.open(cache_path, max_bytes=None) as cache:
        cache.write_many(items, fingerprint)
        cache.flush()
        assert cache.read(items[-1][0], fingerprint) == items[-1][1]
        assert 0 < cache.stats().entries < len(items)
        assert connection_of(cache).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_blob_that_cannot_fit_raises_cache_full_and_the_cache_stays_usable(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache_path, max_bytes=None) as cache:
        cache.write(digest, fingerprint, b"kept")
        connection_of(cache).pragma("max_page_count", 40)
        with pytest.raises(CacheFullError, match="disk is full"):
            cache.write(os.urandom(32), fingerprint, os.urandom(2_000_000))
        assert connection_of(cache).execute("PRAGMA integrity_check").fetchone() == ("ok",)
        cache.write(os.urandom(32), fingerprint, b"small still fits")
    with PipelineCache.open(cache_path) as cache:
        assert cache.stats().entries >= 1


def test_a_misdirected_write_over_the_header_is_healed(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # Another page's bytes over page 1 decode as UTF-8 (NULs and control bytes): a
    # damaged cache, not a text document.
    populate(cache_path, fingerprint, count=50)
    data = cache_path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    leaf = b"\x0d\x00\x00\x00\x01\x3f\x70\x00"  # a b-tree leaf header, valid UTF-8
    cache_path.write_bytes(leaf + bytes(page - len(leaf)) + data[page:])
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 0
    assert len(aside(cache_path)) == 1


@pytest.mark.parametrize(
    "damage",
    [
        "INSERT INTO meta (name, value) VALUES (CAST(X'ff00fe41' AS TEXT), 1)",
        "UPDATE blobs SET checksum_algo = CAST(X'c3ff' AS TEXT)",
    ],
    ids=["meta-name", "checksum-algo"],
)
def test_text_damaged_into_invalid_utf8_is_a_miss_not_an_exception(
    cache_path: Path, fingerprint: DeviceFingerprint, damage: str
) -> None:
    digests = populate(cache_path, fingerprint, count=5)
    raw = apsw.Connection(str(cache_path))
    raw.pragma("ignore_check_constraints", True)
    raw.execute(damage)
    raw.close()
    with PipelineCache.open(cache_path) as cache:
        assert cache.stats().entries in (0, 5)
        for digest in digests:
            assert cache.read(digest, fingerprint) in (None, blob_of(digest))


@pytest.mark.parametrize(
    ("table", "column"),
    [("blobs", "checksum_algo"), ("blobs", "codec"), ("entries", "backend")],
)
def test_check_repair_drops_an_entry_whose_text_is_not_utf8(
    cache_path: Path, fingerprint: DeviceFingerprint, tmp_path: Path, table: str, column: str
) -> None:
    # Damage SQLite's integrity_check does not see: apsw cannot make a str of the bytes.
    digests = populate(cache_path, fingerprint, count=5)
    with PipelineCache.open(cache_path) as cache:
        keys = [entry["entry_key"] for entry in cache.entries()]
    victim = keys[2]
    raw = apsw.Connection(str(cache_path))
    raw.pragma("ignore_check_constraints", True)
    (rowid,) = raw.execute(
        "SELECT id FROM entries WHERE entry_key = ?", (bytes.fromhex(victim),)
    ).fetchall()[0]
    raw.execute(f"UPDATE {table} SET {column} = CAST(X'96c3' AS TEXT) WHERE id = ?", (rowid,))
    raw.close()
    with PipelineCache.open(cache_path) as cache:
        if table == "entries":  # listed by `ls`: the error says what to do
            with pytest.raises(CorruptCacheError, match="check --repair"):
                cache.entries()
        # (integrity_check sees a CHECK constraint broken in `blobs`: the repair rebuilds)
        assert cache.check().bad_entries == (victim,)
        repaired = cache.check(repair=True)
        assert (repaired.dropped, repaired.kept) == ((1, 0) if table == "entries" else (0, 4))
        assert cache.check().bad_entries == ()
        assert sorted(entry["entry_key"] for entry in cache.entries()) == sorted(
            key for key in keys if key != victim
        )
        found = [cache.read(digest, fingerprint) for digest in digests]
        assert sum(blob == blob_of(d) for d, blob in zip(digests, found, strict=True)) == 4
        cache.bundle(tmp_path / "bundle.sqlite3")
    with PipelineCache.open(tmp_path / "merged.sqlite3") as merged:
        assert merged.merge([cache_path]).added == 4


# (edit, what check reports, what reads serve after the repair: of 5 entries)
HAND_EDITS = {
    "a recorded size off by one": (
        "UPDATE entries SET blob_size = blob_size + 1 WHERE id IN "
        "(SELECT id FROM entries ORDER BY id LIMIT 2)",
        lambda r: len(r.wrong_size) == 2 and not r.bad_entries,
        5,
    ),
    "rows moved off their key's id": (
        "UPDATE entries SET id = id + 1 WHERE id = (SELECT max(id) FROM entries)",
        lambda r: len(r.missing_blob) == 1 and r.stray_blobs == 1,
        4,
    ),
    "a key changed": (
        "UPDATE entries SET entry_key = randomblob(32) WHERE id = (SELECT min(id) FROM entries)",
        lambda r: len(r.damaged) == 1,
        4,
    ),
    "a total set by hand": (
        "UPDATE meta SET value = 0 WHERE name = 'stored_bytes'",
        lambda r: r.wrong_totals == (f"stored_bytes: recorded 0, counted {5 * 3200}",),
        5,
    ),
    "an entry deleted without its blob": (
        "DROP TRIGGER entries_delete_blob; "
        "DELETE FROM entries WHERE id = (SELECT min(id) FROM entries)",
        lambda r: r.stray_blobs == 1,
        4,
    ),
}


@pytest.mark.parametrize("edit", sorted(HAND_EDITS))
def test_check_reports_records_edited_by_hand_and_repair_puts_them_right(
    cache_path: Path, fingerprint: DeviceFingerprint, edit: str
) -> None:
    # The recorded size and the totals feed the size cap; a row off its key's id is never
    # read, and its blob's space never freed. Before, the repair dropped right bytes
    # over a size, and could not drop a moved row ('dropped 0', exit 1 every time).
    sql, reported, served = HAND_EDITS[edit]
    digests = populate(cache_path, fingerprint, count=5)
    with PipelineCache.open(cache_path, compression="off") as cache:
        sql_shell(cache_path, sql)
        found = cache.check()
        assert reported(found) and not found.ok
        repaired = cache.check(repair=True)
        assert repaired.ok
        after = cache.check()
        assert after.ok and not after.has_wrong_records and not after.bad_entries
        blobs = [cache.read(digest, fingerprint) for digest in digests]
        assert sum(b == blob_of(d) for d, b in zip(digests, blobs, strict=True)) == served
        assert all(b in (None, blob_of(d)) for d, b in zip(digests, blobs, strict=True))
        stats = cache.stats()
        assert (stats.entries, stats.stored_bytes) == (served, served * 3200)


def test_check_reports_damaged_entry_pages_without_raising(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # Counting the entries for the totals met the damaged page and raised "counting the
    # entries failed" instead of reporting the damage.
    populate(cache_path, fingerprint, count=400)
    overwrite_page(
        cache_path,
        "SELECT pageno FROM dbstat WHERE name = 'entries' AND pagetype = 'leaf' "
        "ORDER BY pageno LIMIT 1",
        lambda size: os.urandom(size - 100),
        at=100,
    )
    with PipelineCache.open(cache_path, readonly=True, strict=True) as cache:
        report = cache.check()
    assert not report.sound_file and not report.ok


@pytest.mark.parametrize("found", ["damaged", "wrong size"])
def test_repair_leaves_an_entry_written_again_since_the_scan(
    cache_path: Path, fingerprint: DeviceFingerprint, found: str
) -> None:
    # The repair acted on what the scan had found: an entry another process had written
    # again with right bytes was dropped, or given the size of its old bytes.
    digests = populate(cache_path, fingerprint, count=5)
    victim = digests[2]
    sql = (
        "UPDATE blobs SET data = zeroblob(length(data)) WHERE id = ?"
        if found == "damaged"
        else "UPDATE entries SET blob_size = blob_size + 1 WHERE id = ?"
    )
    raw = apsw.Connection(str(cache_path))
    raw.execute(sql, (entry_id(fingerprint.cache_key(victim)),))
    raw.close()
    again = os.urandom(5000)

    def written_again_after_the_scan(ids: list[int]) -> Iterator[int]:
        yield from ids
        with PipelineCache.open(cache_path) as other:
            other.write(victim, fingerprint, again)
            other.flush()

    with PipelineCache.open(cache_path, compression="off") as cache:
        report = cache.check(repair=True, progress=written_again_after_the_scan)
        assert report.bad_entries or report.wrong_size  # what the scan found
        assert cache.read(victim, fingerprint) == again
        after = cache.check()
        assert after.ok and not after.wrong_size and not after.bad_entries
