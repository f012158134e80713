"""Schema: migrations, versions, STRICT tables and CHECKs, concurrent creation."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import apsw
import pytest

from vyre_sqlcache import (
    CacheError,
    CorruptCacheError,
    DeviceFingerprint,
    NotACacheError,
    PipelineCache,
    SchemaTooNewError,
    _schema,
)
from vyre_sqlcache._connections import PAGE_SIZE
from vyre_sqlcache._schema import latest_version, migrations

from .helpers import sql_shell


def test_migrations_are_numbered_sql_files() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name.startswith("0001_") and "CREATE TABLE entries" in found[0].sql


def test_new_cache_has_the_latest_schema_in_wal_mode(
    cache: PipelineCache, cache_path: Path
) -> None:
    connection = apsw.Connection(str(cache_path))
    assert connection.pragma("user_version") == latest_version()
    assert connection.pragma("journal_mode") == "wal"
    assert connection.pragma("page_size") == PAGE_SIZE
    strict = {
        row[1]: row[5]
        for row in connection.execute("PRAGMA table_list")
        if row[1] in ("entries", "blobs", "meta")
    }
    assert strict == {"entries": 1, "blobs": 1, "meta": 1}
    connection.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("entry_key", b"short"),
        ("shader_hash", b"x" * 31),
        ("push_constant_size", -1),
        ("workgroup_x", 2**32),
        ("feature_flags", 2**32),
        ("vendor", -5),
        ("backend", ""),
        ("blob_size", 64 * 1024 * 1024 + 1),
        ("push_constant_size", "sixteen"),
    ],
)
def test_checks_refuse_bad_rows(
    cache: PipelineCache, cache_path: Path, column: str, value: object
) -> None:
    row = {
        "id": 1,
        "entry_key": bytes(32),
        "blob_size": 0,
        "created_ms": 0,
        "accessed_ms": 0,
    }
    row[column] = value
    connection = apsw.Connection(str(cache_path))
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    with pytest.raises(apsw.ConstraintError):
        connection.execute(f"INSERT INTO entries ({names}) VALUES ({marks})", tuple(row.values()))
    connection.close()


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_newer_schema_is_refused_and_never_written(cache_path: Path) -> None:
    PipelineCache.open(cache_path).close()
    connection = apsw.Connection(str(cache_path))
    connection.pragma("user_version", latest_version() + 1)
    connection.close()
    before = file_bytes(cache_path)
    for readonly in (False, True):
        with pytest.raises(SchemaTooNewError, match="upgrade vyre-sqlcache"):
            PipelineCache.open(cache_path, readonly=readonly)
    assert file_bytes(cache_path) == before


def test_foreign_database_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE notes(x); INSERT INTO notes VALUES (1)")
    connection.close()
    before = file_bytes(path)
    with pytest.raises(NotACacheError, match="not a vyre-sqlcache cache"):
        PipelineCache.open(path)
    assert file_bytes(path) == before


def test_empty_file_becomes_a_cache(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch()
    with PipelineCache.open(path) as cache:
        assert len(cache) == 0


def _open_at(path: str, barrier: multiprocessing.synchronize.Barrier, index: int) -> None:
    barrier.wait(timeout=30)
    fingerprint = DeviceFingerprint.from_parts(1, 2, "r")
    with PipelineCache.open(path) as cache:
        cache.write(bytes([index]) * 32, fingerprint, b"from %d" % index)
        cache.flush()


class _PausedFirstPage(apsw.VFS):
    """Writes a new file's first page as SQLite's unix VFS does with memory mapping on
    (the size hint first extends the file with zeros, then the page is written), and
    waits between the two until `go` is set."""

    def __init__(self, name: str, reached: Any, go: Any) -> None:
        self.reached, self.go = reached, go
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        return _PausedFile(self, name, flags)


class _PausedFile(apsw.VFSFile):
    def __init__(self, vfs: _PausedFirstPage, name: Any, flags: list[int]) -> None:
        self.vfs = vfs
        super().__init__("", name, flags)

    def xWrite(self, data: bytes, offset: int) -> None:
        if offset == 0 and self.xFileSize() == 0 and data.startswith(b"SQLite format 3"):
            self.xTruncate(len(data))
            self.vfs.reached.set()
            self.vfs.go.wait(30)
        super().xWrite(data, offset)


def _create_slowly(path: str, reached: Any, go: Any, done: Any) -> None:
    vfs = _PausedFirstPage("paused-first-page", reached, go)
    connection = apsw.Connection(path, vfs="paused-first-page")
    connection.pragma("journal_mode", "wal")
    connection.close()
    vfs.unregister()
    done.set()


@pytest.mark.parametrize("creator", ["thread", "process"])
def test_a_file_whose_first_page_is_being_written_is_not_taken_for_damage(
    tmp_path: Path, creator: str
) -> None:
    # Caught by the race below on a CI machine: another process opening the file in
    # that moment read zeros and moved the new cache aside as damaged.
    path = str(tmp_path / "new.sqlite3")
    if creator == "thread":
        reached, go, done = threading.Event(), threading.Event(), threading.Event()
        worker: Any = threading.Thread(target=_create_slowly, args=(path, reached, go, done))
    else:
        context = multiprocessing.get_context("spawn")
        reached, go, done = context.Event(), context.Event(), context.Event()
        worker = context.Process(target=_create_slowly, args=(path, reached, go, done))
    worker.start()
    try:
        assert reached.wait(30)
        first_page = Path(path).read_bytes()
        assert first_page and not any(first_page)
        threading.Timer(0.5, go.set).start()
        fingerprint = DeviceFingerprint.from_parts(1, 2, "r")
        with PipelineCache.open(path) as cache:
            cache.write(b"\1" * 32, fingerprint, b"written")
            assert done.wait(10)
    finally:
        go.set()
        worker.join(30)
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
    with PipelineCache.open(path) as cache:
        assert cache.read(b"\1" * 32, fingerprint) == b"written"


def test_processes_creating_one_file_at_once_all_succeed(tmp_path: Path) -> None:
    path = str(tmp_path / "race.sqlite3")
    context = multiprocessing.get_context("spawn")
    count = 4
    barrier = context.Barrier(count)
    processes = [context.Process(target=_open_at, args=(path, barrier, i)) for i in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * count
    fingerprint = DeviceFingerprint.from_parts(1, 2, "r")
    with PipelineCache.open(path) as cache:
        assert len(cache) == count
        for i in range(count):
            assert cache.read(bytes([i]) * 32, fingerprint) == b"from %d" % i


def test_opening_a_big_cache_does_not_scan_it(cache_path: Path) -> None:
    fingerprint = DeviceFingerprint.from_parts(1, 2, "r")
    with PipelineCache.open(cache_path) as cache:
        cache.put_many([], fingerprint)
        for _ in range(20):
            digests = [os.urandom(32) for _ in range(100)]
            for digest in digests:
                cache.write(digest, fingerprint, os.urandom(4096))
    size = cache_path.stat().st_size
    assert size > 8 * 1024 * 1024

    class CountingFile(apsw.VFSFile):  # type: ignore[misc]
        read = 0

        def xRead(self, amount: int, offset: int) -> bytes:
            CountingFile.read += amount
            return super().xRead(amount, offset)  # type: ignore[no-any-return]

    class CountingVFS(apsw.VFS):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__("counting", "")

        def xOpen(self, name: object, flags: list[int]) -> CountingFile:
            return CountingFile("", name, flags)

    vfs = CountingVFS()
    try:
        PipelineCache.open(cache_path, vfs="counting").close()
    finally:
        vfs.unregister()
    assert CountingFile.read < 256 * 1024, f"open read {CountingFile.read} of {size} bytes"


def test_the_shipped_schema_snapshot_is_what_the_migrations_build() -> None:
    snapshot = _schema.read_snapshot()
    built = _schema.built_schema(_schema.latest_version())
    assert snapshot == built, (
        "vyre_sqlcache/migrations/schema.json is out of date: "
        "run `python -c 'from vyre_sqlcache._schema import write_snapshot; write_snapshot()'` "
        "and commit it"
    )


@pytest.mark.parametrize("kind", ["a foreign database", "a text document", "a newer schema"])
def test_a_refused_open_leaves_the_file_alone_for_good(tmp_path: Path, kind: str) -> None:
    # The object open() made before refusing is dropped; nothing may touch the file after
    # (a cache dropped unclosed is closed by __del__: never one that failed to open).
    path = tmp_path / "refused.sqlite3"
    if kind == "a text document":
        path.write_text("notes\n" * 100)
    else:
        connection = apsw.Connection(str(path))
        if kind == "a foreign database":
            connection.execute("CREATE TABLE notes(x); INSERT INTO notes VALUES (1)")
        connection.close()
        if kind == "a newer schema":
            PipelineCache.open(path).close()
            connection = apsw.Connection(str(path))
            connection.pragma("user_version", latest_version() + 1)
            connection.close()
    before = path.read_bytes()
    threads = threading.active_count()
    refused = False
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:  # not pytest.raises: its traceback would keep the object alive
            PipelineCache.open(path)
        except CacheError:
            refused = True
        gc.collect()
    assert refused
    assert [str(w.message) for w in warned if "unclosed" in str(w.message)] == []
    time.sleep(0.5)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refused.sqlite3"]
    assert threading.active_count() <= threads


# -- what engineers do to a cache with SQL: their objects kept, ours rebuilt -----------------


def _filled(path: Path, fingerprint: DeviceFingerprint, count: int = 20) -> dict[bytes, bytes]:
    """A cache at `path` with `count` flushed entries; returns them."""
    written = {bytes([i]) * 32: os.urandom(100 + i) for i in range(1, count + 1)}
    with PipelineCache.open(path, compression="off") as cache:
        for digest, blob in written.items():
            cache.write(digest, fingerprint, blob)
        cache.flush()
    return written


def _objects(path: Path) -> set[tuple[str, str]]:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {
            (str(kind), str(name))
            for kind, name in connection.execute(
                "SELECT type, name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
            )
        }
    finally:
        connection.close()


def _moved_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX my_backend ON entries (backend)",
        "CREATE TABLE notes (x TEXT)",
        "CREATE VIEW big AS SELECT entry_key FROM pipelines_v WHERE bytes > 100",
        "CREATE TABLE notes (x TEXT); CREATE UNIQUE INDEX notes_x ON notes (x); "
        "CREATE TRIGGER notes_t AFTER INSERT ON notes BEGIN SELECT 1; END",
        "ANALYZE",
        # Triggers have a namespace of their own: these share names with our objects.
        "CREATE TABLE mine (x); "
        "CREATE TRIGGER entries_lru AFTER INSERT ON mine BEGIN SELECT 1; END; "
        "CREATE TRIGGER META AFTER INSERT ON mine BEGIN SELECT 1; END",
        "CREATE INDEX by_backend_nocase ON entries (backend COLLATE NOCASE, vendor DESC)",
    ],
)
def test_objects_an_engineer_adds_are_kept_with_every_entry(
    tmp_path: Path, fingerprint: DeviceFingerprint, sql: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    written = _filled(path, fingerprint)
    sql_shell(path, sql)
    before = _objects(path)
    with PipelineCache.open(path, readonly=True) as reader:
        assert all(reader.read(d, fingerprint) == b for d, b in written.items())
    with PipelineCache.open(path) as cache:
        assert all(cache.read(d, fingerprint) == b for d, b in written.items())
        cache.write(b"\xee" * 32, fingerprint, b"after")
        assert cache.stats().entries == len(written) + 1
    assert _objects(path) == before and _moved_aside(path) == []


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("DROP INDEX entries_lru", "entries_lru"),
        ("DROP VIEW stats_v", "stats_v"),
        ("DROP VIEW stats_v; CREATE VIEW stats_v AS SELECT 1 AS x", "stats_v"),
        ("DROP TRIGGER entries_delete_blob", "entries_delete_blob"),
        ("CREATE UNIQUE INDEX one_per_size ON entries (blob_size)", "one_per_size"),
        (
            "CREATE TABLE log (id INTEGER); CREATE TRIGGER log_ins AFTER INSERT ON entries "
            "BEGIN INSERT INTO log VALUES (new.id); END",
            "log_ins",
        ),
        ("PRAGMA user_version = 0", "user_version 0"),
        ("PRAGMA user_version = 5", "user_version 5"),
        # Named like our table, in the triggers' namespace: it refused every write.
        (
            "CREATE TRIGGER blobs BEFORE INSERT ON entries BEGIN SELECT RAISE(ABORT, 'no'); END",
            "trigger blobs",
        ),
        # Our table named in another case: the trigger escaped, and lost every new entry.
        (
            "CREATE TRIGGER eat AFTER INSERT ON Blobs BEGIN DELETE FROM blobs; END",
            "trigger eat",
        ),
        # A name that LIKE 'sqlite_%' took for SQLite's own: never looked at.
        ("CREATE INDEX sqlitexevil ON entries (blob_size) WHERE blob_size > 0", "sqlitexevil"),
        # Not UNIQUE, but its expression fails for every new row.
        (
            "CREATE INDEX later ON entries (CASE WHEN created_ms > {now} THEN json('x') END)",
            "index later",
        ),
    ],
)
def test_our_objects_changed_by_hand_are_rebuilt_by_a_writing_open_and_nothing_is_lost(
    tmp_path: Path, fingerprint: DeviceFingerprint, sql: str, named: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    written = _filled(path, fingerprint)
    expected = _objects(path)
    time.sleep(0.002)
    sql_shell(path, sql.replace("{now}", str(time.time_ns() // 1_000_000)))
    time.sleep(0.002)
    before = path.read_bytes()
    with pytest.raises(CorruptCacheError, match=f"{named}.*a writing open"):
        PipelineCache.open(path, readonly=True)
    assert path.read_bytes() == before  # a reader changes nothing
    with PipelineCache.open(path) as cache:
        assert all(cache.read(d, fingerprint) == b for d, b in written.items())
        # A UNIQUE index on sizes, kept, would refuse this one (same size as another).
        cache.write(b"\xee" * 32, fingerprint, os.urandom(101))
        cache.flush()
        assert cache.stats().entries == len(written) + 1
        assert len(cache.entries()) == len(written) + 1
        assert cache.invalidate_impacted([1], [b"\x01" * 32], fingerprint) == 1
    assert _moved_aside(path) == []
    assert _objects(path) - {("table", "log"), ("table", "mine")} == expected
    with PipelineCache.open(path, readonly=True) as reader:
        assert reader.stats().entries == len(written)
        assert reader.read(b"\xee" * 32, fingerprint) is not None


def test_a_changed_table_is_still_damage_named_in_the_message(
    tmp_path: Path, fingerprint: DeviceFingerprint
) -> None:
    path = tmp_path / "cache.sqlite3"
    _filled(path, fingerprint)
    sql_shell(path, "ALTER TABLE entries ADD COLUMN note TEXT")
    with pytest.raises(CorruptCacheError, match="damaged or missing: entries"):
        PipelineCache.open(path, strict=True)


def _live_stored_bytes(path: Path) -> int:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = connection.execute(
            "SELECT coalesce(sum(stored_size), 0) FROM entries "
            "WHERE id NOT IN (SELECT id FROM tombstones)"
        ).fetchone()
        assert row is not None
        return int(row[0])
    finally:
        connection.close()


@pytest.mark.parametrize(
    "sql", ["DELETE FROM meta WHERE name = 'stored_bytes'", "DROP TRIGGER entries_count_insert"]
)
def test_totals_broken_by_hand_are_recounted_and_the_cap_holds(
    tmp_path: Path, fingerprint: DeviceFingerprint, sql: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    with PipelineCache.open(path, compression="off") as cache:
        cache.write(b"\1" * 32, fingerprint, b"first")
        cache.flush()
        sql_shell(path, sql)  # while the cache is open: its writes then go uncounted
        for i in range(50):
            cache.write(i.to_bytes(32, "big"), fingerprint, os.urandom(1000))
    with PipelineCache.open(path, max_bytes=20_000, compression="off") as cache:
        for i in range(50, 300):
            cache.write(i.to_bytes(32, "big"), fingerprint, os.urandom(1000))
        cache.flush()
        stored = cache.stats().stored_bytes
    assert 0 < stored <= 20_000
    assert stored == _live_stored_bytes(path)


def test_a_writing_open_of_a_file_with_the_users_own_objects_takes_no_write_lock(
    tmp_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # Nothing to rebuild: such an open must not wait for another process's write lock
    # (it began a write transaction at every open, and waited up to 10 s).
    path = tmp_path / "cache.sqlite3"
    written = _filled(path, fingerprint)
    sql_shell(path, "CREATE INDEX my_backend ON entries (backend)")
    blocker = apsw.Connection(str(path))
    blocker.execute("BEGIN IMMEDIATE")
    try:
        start = time.monotonic()
        with PipelineCache.open(path) as cache:
            assert all(cache.read(d, fingerprint) == b for d, b in written.items())
        assert time.monotonic() - start < 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
