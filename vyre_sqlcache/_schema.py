"""Schema migrations: the numbered SQL files in `migrations/`, tracked by `PRAGMA user_version`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import apsw

from ._connections import PAGE_SIZE, transaction
from .errors import CacheError, CorruptCacheError, NotACacheError, SchemaTooNewError

__all__ = [
    "OLDEST_READABLE",
    "Migration",
    "latest_version",
    "migrations",
    "prepare",
    "readable",
    "schema_version",
]

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_FOLDER = Path(__file__).resolve().parent / "migrations"
#: The objects the migrations create at the latest version, so that a process opening
#: a cache does not apply them all in memory first (5 ms for seven of them); a test keeps
#: it equal to what the migrations build, and `write_snapshot()` writes it.
_SNAPSHOT = _FOLDER / "schema.json"


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file; applying it brings the schema to `version`."""

    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration in order, numbered 1, 2, ... without gaps.

    Raises RuntimeError if the files are missing or misnumbered (a broken install).
    """
    folder = _FOLDER
    if not folder.is_dir():
        raise RuntimeError(
            f"vyre-sqlcache cannot find its migrations in {folder}; reinstall the package"
        )
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise RuntimeError(f"migration file {path} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations in {folder} must be numbered 1..n, found {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this library writes."""
    return len(migrations())


#: The oldest schema of a file read without migrating it: a layer, a merge source, or a
#: cache opened read-only. The migrations since only added tables (7: the departure record
#: and the miss log; 8: tombstone reasons), which `explain` does without where they are
#: missing, so that a bundle shipped with an application stays usable, and read-only
#: tools keep reading, when the library is upgraded. A migration that changes what reads
#: use (the columns of `entries`, `blobs` or `dictionaries`) raises it to its own version.
OLDEST_READABLE = 6


def readable(version: int) -> bool:
    """Whether a file of this schema version can be read without migrating it."""
    return OLDEST_READABLE <= version <= latest_version()


def schema_version(connection: apsw.Connection) -> int:
    """The `user_version` recorded in the database (0 for a new, empty file)."""
    row = connection.execute("PRAGMA user_version").fetchone()
    assert row is not None
    return int(row[0])


#: A user_version at most this far past ours may be a newer library's; further, or
#: negative, it can only be a damaged header.
PLAUSIBLE_VERSIONS_AHEAD = 1000

_Schema = frozenset[tuple[bytes, ...]]
_COMMENT = re.compile(rb"--[^\n]*")


def _schema_objects(connection: apsw.Connection) -> _Schema:
    """The tables, indexes, triggers and views of the main database, as raw bytes (a damaged
    schema need not be UTF-8); comments and spacing in their SQL do not count."""
    rows = connection.execute(
        "SELECT CAST(type AS BLOB), CAST(name AS BLOB), CAST(tbl_name AS BLOB), "
        "CAST(sql AS BLOB) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return frozenset(
        (bytes(t), bytes(n), bytes(b), b" ".join(_COMMENT.sub(b"", bytes(s or b"")).split()))  # type: ignore[arg-type]
        for t, n, b, s in rows
    )


@cache
def expected_schema(version: int) -> _Schema:
    """The schema objects migrations 1..version create: the latest version's from the
    snapshot shipped beside them, any other built once in memory."""
    if version == latest_version():
        snapshot = read_snapshot()
        if snapshot is not None:
            return snapshot
    return built_schema(version)


def read_snapshot() -> _Schema | None:
    """The latest version's objects as `write_snapshot` kept them, or None if the file is
    missing, unreadable or of another version."""
    try:
        data = json.loads(_SNAPSHOT.read_text("utf-8"))
        if data["version"] != latest_version():
            return None
        return frozenset(tuple(str(part).encode("utf-8") for part in o) for o in data["objects"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_snapshot() -> Path:
    """Write the latest version's objects, as the migrations build them, to the snapshot."""
    objects = sorted([part.decode("utf-8") for part in o] for o in built_schema(latest_version()))
    text = json.dumps({"version": latest_version(), "objects": objects}, indent=1)
    _SNAPSHOT.write_text(text + "\n", "utf-8")
    return _SNAPSHOT


def built_schema(version: int) -> _Schema:
    """The schema objects migrations 1..version create, applied to a database in memory."""
    connection = apsw.Connection(":memory:")
    try:
        for migration in migrations()[:version]:
            connection.execute(migration.sql)
        return _schema_objects(connection)
    finally:
        connection.close()


def _check_not_newer(version: int, where: str) -> None:
    if version > latest_version():
        raise SchemaTooNewError(
            f"{where} has schema version {version}, but this vyre-sqlcache only knows "
            f"versions up to {latest_version()}; upgrade vyre-sqlcache, or point it at "
            "another cache path (the file was not modified)"
        )


def _check_is_ours(connection: apsw.Connection, where: str) -> None:
    row = connection.execute(
        "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
    ).fetchone()
    if row is not None and row[0]:
        raise NotACacheError(
            f"{where} is a SQLite database but not a vyre-sqlcache cache (it has other "
            "tables and no schema version); choose another path (the file was not modified)"
        )


def _checked_version(connection: apsw.Connection, where: str) -> int:
    """The file's schema version, once its objects are exactly those of that version.

    A plausible newer version is a newer library's file (SchemaTooNewError). A file with
    most of our objects but not exactly those of its version (a damaged header or schema,
    a planted trigger or view) is damaged (CorruptCacheError: moved aside, never run);
    anything else is another program's database (NotACacheError: never touched).
    """
    version = schema_version(connection)
    objects = _schema_objects(connection)
    latest = latest_version()
    if 0 <= version <= latest and objects == expected_schema(version):
        return version
    if latest < version <= latest + PLAUSIBLE_VERSIONS_AHEAD:
        _check_not_newer(version, where)
    if _mostly_ours(objects):
        raise CorruptCacheError(
            f"{where} has vyre-sqlcache's tables, but not exactly the schema of version "
            f"{version} (user_version): it is damaged, or something changed it"
        )
    if version == 0:
        _check_is_ours(connection, where)
    raise NotACacheError(
        f"{where} is a SQLite database but not a vyre-sqlcache cache (user_version "
        f"{version}, other tables); choose another path (the file was not modified)"
    )


def _mostly_ours(objects: _Schema) -> bool:
    """Whether at least half of our schema's objects (by type and name) are there: then
    the file is ours, damaged or tampered with, rather than another program's."""
    ours = {entry[:2] for entry in expected_schema(latest_version())}
    return 2 * len(ours & {entry[:2] for entry in objects}) >= len(ours)


def prepare(connection: apsw.Connection, where: str, *, readonly: bool) -> int:
    """Check the file is a cache this library can use, then bring its schema up to date.

    New files get `PAGE_SIZE` pages and WAL mode; pending migrations run in one
    `BEGIN IMMEDIATE` transaction. Nothing is written to a file that fails a check.
    Raises SchemaTooNewError for a file from a newer library, NotACacheError for a
    database that is not a cache, CacheError for a read-only cache that needs a migration.
    """
    # One read transaction, so that both looks see the same moment of the file.
    with transaction(connection, "DEFERRED"):
        version = _checked_version(connection, where)
    if readonly:
        if version == 0:  # (a database with other tables is refused above)
            raise CacheError(
                f"{where} is empty: nothing has been cached there yet (a writing open makes "
                "it a cache)"
            )
        if not readable(version):
            raise CacheError(
                f"{where} has schema version {version} and needs upgrading to "
                f"{latest_version()}, which a read-only open does not do; open it once "
                "for writing (without readonly=True, as a user who may write the file)"
            )
        return version
    # page_size only takes effect on a new, empty file; WAL mode is kept in the file.
    connection.pragma("page_size", PAGE_SIZE)
    connection.pragma("journal_mode", "wal")
    if version == latest_version():
        return version
    with transaction(connection):
        # Another process may have migrated between our look and our lock.
        version = _checked_version(connection, where)
        for migration in migrations()[version:]:
            connection.execute(migration.sql)
            # PRAGMA takes no bound parameters; the value is our own int.
            connection.execute(f"PRAGMA user_version = {migration.version:d}")
        return schema_version(connection)
