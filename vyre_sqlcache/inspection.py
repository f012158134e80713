"""Looking into a cache without changing it: a read-only connection, filtered listings of
the `pipelines_v` view, free SQL that may only read, and the `check` report."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import apsw

from ._connections import BUSY_TIMEOUT_MS, translate
from .cache import PipelineCache
from .errors import CacheError
from .keys import entry_id

__all__ = [
    "SORTS",
    "CheckReport",
    "EntryFilter",
    "QueryRefusedError",
    "QueryResult",
    "check",
    "describe",
    "has_entry",
    "list_entries",
    "matching_keys",
    "read_only",
    "run_query",
    "totals_by_device",
]

#: `ls --sort` names and the column each sorts by, largest (or newest) first.
SORTS: dict[str, str] = {
    "size": "blob_size",
    "created": "created_ms",
    "accessed": "accessed_ms",
    "hits": "hits",
}

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]


def _no_progress(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
    return items


class QueryRefusedError(CacheError):
    """A query given to `run_query` would change the cache; nothing was run."""


@contextmanager
def read_only(path: Path) -> Iterator[apsw.Connection]:
    """A connection to the cache at `path` that cannot write, whatever SQL it is given.

    Opened with SQLITE_OPEN_READONLY, `PRAGMA query_only`, defensive mode and an
    untrusted schema. Raises CacheError (translated) if it cannot be opened.
    """
    try:
        connection = apsw.Connection(
            str(path), flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_NOFOLLOW
        )
    except apsw.Error as error:
        raise translate(error, "opening a read-only connection", path) from error
    try:
        connection.set_busy_timeout(BUSY_TIMEOUT_MS)
        connection.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        connection.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
        connection.pragma("query_only", True)
        yield connection
    except apsw.Error as error:
        raise translate(error, "reading the cache", path) from error
    finally:
        connection.close()


@dataclass(frozen=True)
class EntryFilter:
    """Which entries a listing or an invalidation is about; every given field must match."""

    backend: str | None = None
    vendor: int | None = None
    device: int | None = None
    #: every bit of this mask must be set in the entry's feature flags
    flags: int = 0
    min_size: int | None = None
    created_before_ms: int | None = None
    key_version: int | None = None
    program_digests: tuple[bytes, ...] | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause over `pipelines_v` (or '' for all entries) and its parameters."""
        terms: list[str] = []
        params: dict[str, Any] = {}
        simple: tuple[tuple[str, Any, str], ...] = (
            ("backend", self.backend, "backend = :backend"),
            ("vendor", self.vendor, "vendor = :vendor"),
            ("device", self.device, "device = :device"),
            ("min_size", self.min_size, "blob_size >= :min_size"),
            ("before", self.created_before_ms, "created_ms < :before"),
            ("key_version", self.key_version, "key_version = :key_version"),
        )
        for name, value, term in simple:
            if value is not None:
                terms.append(term)
                params[name] = value
        if self.flags:
            terms.append("feature_bits & :flags = :flags")
            params["flags"] = self.flags
        if self.program_digests is not None:
            terms.append("program_digest IN (SELECT value FROM json_each(:digests))")
            params["digests"] = json.dumps([d.hex() for d in self.program_digests])
        return (f"WHERE {' AND '.join(terms)}" if terms else ""), params


def _rows(cursor: apsw.Cursor) -> list[dict[str, Any]]:
    columns = [name for name, _ in cursor.get_description()]
    return [dict(zip(columns, row, strict=True)) for row in cursor]


def list_entries(
    connection: apsw.Connection,
    entry_filter: EntryFilter,
    *,
    sort: Literal["size", "created", "accessed", "hits"] = "created",
    reverse: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of `pipelines_v` that match, largest/newest first (`reverse`: the other way)."""
    where, params = entry_filter.where()
    order = "ASC" if reverse else "DESC"
    sql = f"SELECT * FROM pipelines_v {where} ORDER BY {SORTS[sort]} {order}, entry_key"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    cursor = connection.execute(sql, params)
    try:
        return _rows(cursor)
    except apsw.ExecutionCompleteError:
        return []


def matching_keys(connection: apsw.Connection, entry_filter: EntryFilter) -> list[str]:
    """The hex entry keys of the entries that match."""
    where, params = entry_filter.where()
    rows = connection.execute(f"SELECT entry_key FROM pipelines_v {where}", params)
    return [str(row[0]) for row in rows]


def totals_by_device(connection: apsw.Connection) -> list[dict[str, Any]]:
    """Rows of `stats_v`, most bytes first."""
    cursor = connection.execute("SELECT * FROM stats_v ORDER BY bytes DESC, backend, vendor")
    try:
        return _rows(cursor)
    except apsw.ExecutionCompleteError:
        return []


@dataclass
class QueryResult:
    """The rows of one statement, with its column names."""

    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)


def run_query(connection: apsw.Connection, sql: str) -> list[QueryResult]:
    """Run `sql` (one or more statements) and return each statement's rows.

    Raises QueryRefusedError, before it runs, for any statement that would write, and
    apsw.Error for SQL that SQLite rejects.
    """
    results: list[QueryResult] = []

    def before_each(cursor: apsw.Cursor, statement: str, bindings: Any) -> bool:
        if not cursor.is_readonly:
            raise QueryRefusedError(
                f"refused to run {statement.strip()[:80]!r}: 'sql' only reads the cache "
                "(use rm, invalidate, check --repair or compact to change it)"
            )
        try:
            columns = [name for name, _ in cursor.get_description()]
        except apsw.ExecutionCompleteError:
            columns = []
        results.append(QueryResult(columns))
        return True

    cursor = connection.cursor()
    cursor.exec_trace = before_each
    for row in cursor.execute(sql):
        results[-1].rows.append(tuple(row))
    return [result for result in results if result.columns]


@dataclass
class CheckReport:
    """What `check` found: `integrity` is SQLite's answer (['ok'] when sound)."""

    integrity: list[str]
    checked: int = 0
    damaged: list[str] = field(default_factory=list)
    missing_blob: list[str] = field(default_factory=list)
    dropped: int = 0

    @property
    def sound_file(self) -> bool:
        return self.integrity == ["ok"]

    @property
    def bad_entries(self) -> list[str]:
        return self.damaged + self.missing_blob

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong now (bad entries count as fixed once dropped)."""
        return self.sound_file and len(self.bad_entries) == self.dropped


def has_entry(connection: apsw.Connection, entry_key: str) -> bool:
    """Whether the entry with this hex key exists (its bytes are not looked at)."""
    key = bytes.fromhex(entry_key)
    row = connection.execute(
        "SELECT 1 FROM entries WHERE id = ? AND entry_key = ?", (entry_id(key), key)
    ).fetchone()
    return row is not None


def _has_no_blob(connection: apsw.Connection, entry_key: str) -> bool:
    key = bytes.fromhex(entry_key)
    row = connection.execute(
        "SELECT 1 FROM entries WHERE id = ?1 AND entry_key = ?2 "
        "AND NOT EXISTS (SELECT 1 FROM blobs WHERE id = ?1)",
        (entry_id(key), key),
    ).fetchone()
    return row is not None


def check(
    cache: PipelineCache,
    connection: apsw.Connection,
    *,
    repair: bool = False,
    progress: Progress = _no_progress,
) -> CheckReport:
    """`PRAGMA integrity_check`, then every entry's checksum; with `repair`, drop bad entries.

    `connection` is a read-only connection to the same file; only `repair` changes it.
    """
    integrity = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    report = CheckReport(integrity)
    keys = [str(row[0]) for row in connection.execute("SELECT lower(hex(entry_key)) FROM entries")]
    for key in progress(keys, len(keys), "checking"):
        verdict = cache.check_entry(key)
        report.checked += 1
        if verdict is False:
            report.damaged.append(key)
        elif verdict is None and _has_no_blob(connection, key):
            report.missing_blob.append(key)
        # None otherwise: deleted by someone else since the list was made
    if repair and report.bad_entries:
        report.dropped = cache.delete_entries(report.bad_entries)
    return report


def describe(keys: Sequence[str], limit: int = 5) -> str:
    """A short list of keys for a message: the first few and how many more."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
