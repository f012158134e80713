"""Schema migrations: the numbered SQL files in `migrations/`, tracked by `PRAGMA user_version`."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import apsw

from ._connections import PAGE_SIZE, transaction
from ._rows import recount_totals
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

log = logging.getLogger("vyre_sqlcache")


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
        "CAST(sql AS BLOB) FROM sqlite_schema WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!'"
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
        "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!'"
    ).fetchone()
    if row is not None and row[0]:
        raise NotACacheError(
            f"{where} is a SQLite database but not a vyre-sqlcache cache (it has other "
            "tables and no schema version); choose another path (the file was not modified)"
        )


def _checked_version(connection: apsw.Connection, where: str, *, heal: bool = False) -> int:
    """The file's schema version, once its objects are those of that version (see
    `_look`)."""
    return _look(connection, where, heal=heal)[0]


def _look(connection: apsw.Connection, where: str, *, heal: bool = False) -> tuple[int, bool]:
    """The file's schema version, once its objects are those of that version, and whether
    they are as they should be (exactly ours, or ours and the user's own beside them).

    Objects of the user's own beside ours (a table, a view, an index on our tables that is
    not UNIQUE) are left alone. With `heal` (a writing open, which then calls `_heal` in
    its transaction), our views, indexes and triggers that are missing or changed, and
    triggers or UNIQUE indexes someone added to our tables, are accepted too; without it
    they make the file damaged. A plausible newer version is a newer library's file
    (SchemaTooNewError). A file with most of our objects but tables that are not exactly
    those of its version (a damaged header or schema) is damaged (CorruptCacheError:
    moved aside, never run); anything else is another program's database
    (NotACacheError: never touched).
    """
    version = schema_version(connection)
    objects = _schema_objects(connection)
    latest = latest_version()
    if 0 <= version <= latest and objects == expected_schema(version):
        return version, True
    differences = _differences(objects, version, connection) if 0 < version <= latest else None
    if differences is not None and not differences.damaged:
        work = bool(differences.rebuild or differences.drop)
        if heal or not work:
            return version, not work  # (the user's own objects alone: nothing to do)
        raise CorruptCacheError(
            f"{where}: {differences.describe()}; a writing open of the cache, or "
            "'vyre-sqlcache check --repair', rebuilds them (the entries are kept)"
        )
    if latest < version <= latest + PLAUSIBLE_VERSIONS_AHEAD:
        _check_not_newer(version, where)
    if version != latest and objects:
        # user_version set by hand (or damaged) on a file whose objects are the latest's.
        found = _differences(objects, latest, connection)
        if not found.damaged:
            if heal:
                return latest, False
            raise CorruptCacheError(
                f"{where} has user_version {version}, but the tables of schema version "
                f"{latest}; a writing open of the cache, or 'vyre-sqlcache check --repair', "
                "sets it back (the entries are kept)"
            )
    if _mostly_ours(objects):
        what = "" if differences is None else f" ({differences.describe()})"
        raise CorruptCacheError(
            f"{where} has vyre-sqlcache's tables, but not exactly the schema of version "
            f"{version} (user_version){what}: it is damaged, or something changed it"
        )
    if version == 0:
        _check_is_ours(connection, where)
    raise NotACacheError(
        f"{where} is a SQLite database but not a vyre-sqlcache cache (user_version "
        f"{version}, other tables); choose another path (the file was not modified)"
    )


@dataclass(frozen=True)
class _Differences:
    """How a file's schema objects differ from those of its version (names as text)."""

    #: Our tables missing or changed, objects of ours of the wrong type or of another
    #: version, names that are not text: the file is damaged.
    damaged: tuple[str, ...]
    #: Our views, indexes and triggers missing or changed: a writing open rebuilds them.
    rebuild: tuple[str, ...]
    #: (type, name) of triggers and UNIQUE indexes added to our tables, which would run
    #: inside our transactions or refuse our rows: a writing open drops them.
    drop: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        """The differences in a few words, naming the objects."""
        parts = []
        for label, names in (
            ("damaged or missing", self.damaged),
            ("missing or changed", self.rebuild),
            ("added to its tables", tuple(f"{kind} {name}" for kind, name in self.drop)),
        ):
            if names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


def _key(entry: tuple[bytes, ...]) -> tuple[bool, bytes]:
    """A schema object's identity as SQLite sees it: triggers have a namespace of their
    own beside tables, views and indexes, and names are compared without ASCII case."""
    return entry[0] == b"trigger", entry[1].lower()


def _differences(
    objects: _Schema, version: int, connection: apsw.Connection | None = None
) -> _Differences:
    """Compare a file's objects with those version `version` of the schema has (with the
    `connection`, an index added to our tables is looked into: see `_harmless_index`)."""
    expected = {_key(entry): entry for entry in expected_schema(version)}
    found = {_key(entry): entry for entry in objects}
    # A name of ours from another version means a wrong user_version, not a user's object.
    reserved = expected.keys() | {_key(entry) for entry in expected_schema(latest_version())}
    tables = {entry[1].lower() for entry in expected.values() if entry[0] == b"table"}
    damaged: list[str] = []
    rebuild: list[str] = []
    drop: list[tuple[str, str]] = []
    for key, want in expected.items():
        have = found.get(key)
        if have == want:
            continue
        if want[0] == b"table" or (have is not None and (have[0], have[1]) != want[:2]):
            damaged.append(_text(want[1]))
        else:
            rebuild.append(_text(want[1]))
    for key, have in found.items():
        if key in expected:
            continue
        kind, name, table = have[0], have[1], have[2].lower()
        if key in reserved or not _is_text(name):
            damaged.append(_text(name))
        elif table in tables and (
            kind == b"trigger"
            or (kind == b"index" and not _harmless_index(connection, _text(name)))
        ):
            drop.append((_text(kind), _text(name)))
    return _Differences(tuple(sorted(damaged)), tuple(sorted(rebuild)), tuple(sorted(drop)))


#: The collations every connection has.
_BUILT_IN_COLLATIONS = frozenset({"binary", "nocase", "rtrim"})


def _harmless_index(connection: apsw.Connection | None, name: str) -> bool:
    """Whether an index someone added to one of our tables can never refuse our rows: not
    UNIQUE, not partial, on plain columns with built-in collations (an expression, a
    WHERE clause or a collation can fail every insert, with a function our connections
    lack, say). Without a connection, none is taken as harmless."""
    if connection is None:
        return False
    try:
        columns = connection.execute(
            "SELECT cid, coll, key FROM pragma_index_xinfo(?)", (name,)
        ).fetchall()
        listed = connection.execute(
            "SELECT i.[unique], i.partial FROM sqlite_schema AS s, "
            "pragma_index_list(s.tbl_name) AS i WHERE s.type = 'index' AND s.name = ?1 "
            "AND i.name = s.name",
            (name,),
        ).fetchall()
    except apsw.Error:
        return False
    if len(listed) != 1 or listed[0][0] or listed[0][1]:
        return False
    # Key columns: -2 is an expression; -1 the row id.
    return all(
        cid != -2 and str(coll).lower() in _BUILT_IN_COLLATIONS for cid, coll, key in columns if key
    )


def _text(raw: bytes) -> str:
    """A schema name as text (bytes that are not UTF-8 shown escaped)."""
    return raw.decode("utf-8", "backslashreplace")


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _heal(connection: apsw.Connection, version: int, where: str) -> bool:
    """Inside the migration transaction, after `_look(heal=True)` accepted the file: drop
    the triggers and UNIQUE indexes added to our tables and rebuild our views, indexes and
    triggers that are missing or changed; return whether anything was (the totals those
    triggers keep are then to be recounted). Logs what it did."""
    differences = _differences(_schema_objects(connection), version, connection)
    if not (differences.rebuild or differences.drop):
        return False
    for kind, name in differences.drop:
        connection.execute(f"DROP {kind.upper()} IF EXISTS {_quoted(name)}")
    rebuild = set(differences.rebuild)
    built = built_sql(version)
    for kind, name, _sql in reversed(built):
        if name in rebuild:
            connection.execute(f"DROP {kind.upper()} IF EXISTS {_quoted(name)}")
    for _kind, name, sql in built:
        if name in rebuild:
            connection.execute(sql)
    log.warning(
        "vyre-sqlcache: %s: %s; rebuilt or dropped them (the entries are kept)",
        where,
        differences.describe(),
    )
    return True


def _totals_kept(connection: apsw.Connection) -> bool:
    """Whether `meta` has a row for each total the triggers keep (someone may have
    deleted one: the size cap would then count nothing)."""
    row = connection.execute(
        "SELECT count(*) FROM meta WHERE name IN ('entries', 'blob_bytes', 'stored_bytes')"
    ).fetchone()
    return row is not None and row[0] == 3


def built_sql(version: int) -> list[tuple[str, str, str]]:
    """(type, name, sql) of the objects migrations 1..version create, in the order
    SQLite keeps them (one that depends on another comes after it)."""
    connection = apsw.Connection(":memory:")
    try:
        for migration in migrations()[:version]:
            connection.execute(migration.sql)
        return [
            (str(kind), str(name), str(sql))
            for kind, name, sql in connection.execute(
                "SELECT type, name, sql FROM sqlite_schema "
                "WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!' AND sql IS NOT NULL ORDER BY rowid"
            )
        ]
    finally:
        connection.close()


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
        version, exact = _look(connection, where, heal=not readonly)
        counted = version < latest_version() or _totals_kept(connection)
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
                "for writing, as a user who may write the file (without readonly=True; "
                "from the command line, any command that writes, such as compact)"
            )
        return version
    # page_size only takes effect on a new, empty file; WAL mode is kept in the file.
    connection.pragma("page_size", PAGE_SIZE)
    connection.pragma("journal_mode", "wal")
    if version == latest_version() and exact and counted:
        return version
    with transaction(connection):
        # Another process may have migrated (or healed) between our look and our lock.
        version, exact = _look(connection, where, heal=True)
        healed = not exact and _heal(connection, version, where)
        if schema_version(connection) != version:
            log.warning(
                "vyre-sqlcache: %s: user_version was %d, set back to %d (its tables are "
                "those of version %d)",
                where,
                schema_version(connection),
                version,
                version,
            )
            connection.execute(f"PRAGMA user_version = {version:d}")
            healed = True
        for migration in migrations()[version:]:
            connection.execute(migration.sql)
            # PRAGMA takes no bound parameters; the value is our own int.
            connection.execute(f"PRAGMA user_version = {migration.version:d}")
        if healed or not _totals_kept(connection):
            recount_totals(connection)
        return schema_version(connection)
