"""Every statement of "why did this miss?": the departure record, the miss log, and the
lookups `explain` makes (migrations 0007 and 0008).

Functions run on a connection the caller gives them, inside the caller's transaction
where they change anything; they raise apsw errors as they come. Departures are
recorded by `_rows`, one `INSERT ... SELECT` a batch: where entries leave at once
(eviction, a damaged entry dropped), and for a tombstoned entry where its tombstone
goes (the purge, or a write of the same key), from the reason noted beside it
(`tombstone_reasons`, migration 0008).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from typing import Any

import apsw

from .keys import entry_id

__all__ = [
    "DEPARTURE_REASONS",
    "KEPT_DEPARTURES",
    "KEPT_MISSES",
    "MISS_CALLS",
    "departure",
    "entry_state",
    "kept_rows",
    "miss_for",
    "nearest_by_program",
    "nearest_by_shader",
    "note_reasons",
    "recent_misses",
    "record_departures",
    "record_misses",
    "record_tombstoned",
    "record_unwritten",
    "same_device_count",
    "shrink",
]

#: Rows each table keeps at most: the newest, by `seq`; older ones are deleted by the
#: statement that adds rows, in the same transaction.
KEPT_DEPARTURES = 10_000
KEPT_MISSES = 10_000
#: Under a small size cap each table keeps fewer rows, so that it takes at most about
#: 1/`CAP_SHARE` of the cap (a row takes about `ROW_BYTES` with its index entry), but
#: never fewer than `MIN_KEPT`: the cap counts blobs, and on a small disk (a few MiB)
#: ten thousand rows would be a large part of the file.
CAP_SHARE = 32
ROW_BYTES = 256
MIN_KEPT = 64
#: `departures.reason` values (the schema's CHECK).
DEPARTURE_REASONS = ("evicted", "invalidated", "deleted", "damaged")
#: `misses.call` values (the schema's CHECK).
MISS_CALLS = ("get", "get_many", "read")

_LIVE = "NOT EXISTS (SELECT 1 FROM tombstones WHERE id = entries.id)"
_KEY_COLUMNS = (
    "key_version, shader_hash, layout_hash, push_constant_size, workgroup_x, workgroup_y, "
    "workgroup_z, feature_flags, backend, vendor, device, driver_digest, program_digest"
)
#: The columns `entry_state`, `departure` and the nearest-entry lookups return.
_ROW_COLUMNS = f"entry_key, {_KEY_COLUMNS}, created_ms"


def _later_tables(connection: apsw.Connection) -> frozenset[str]:
    """Which of the tables later than the oldest readable schema the file has: a cache
    opened read-only may be of schema 6 (no `departures`, no `misses`) or 7 (no
    `tombstone_reasons`; see `_schema.OLDEST_READABLE`)."""
    return frozenset(
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' "
            "AND name IN ('departures', 'misses', 'tombstone_reasons')"
        )
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def kept_rows(connection: apsw.Connection, most: int) -> int:
    """How many rows a table keeps under the file's size cap (see `CAP_SHARE`)."""
    from . import _rows  # which imports this module

    cap = _rows.setting(connection, _rows.CAP_SETTING)
    if cap == 0:  # no cap
        return most
    if cap is None:
        from .config import DEFAULT_MAX_BYTES

        cap = DEFAULT_MAX_BYTES
    return min(most, max(MIN_KEPT, cap // (CAP_SHARE * ROW_BYTES)))


def _trim(connection: apsw.Connection, table: str, most: int) -> None:
    kept = kept_rows(connection, most)
    # `seq` only grows while the table has rows, so the newest `kept` are a range.
    connection.execute(
        f"DELETE FROM {table} WHERE seq <= (SELECT max(seq) FROM {table}) - ?", (kept,)
    )


# -- writing -------------------------------------------------------------------------


#: The backend of `vyre-sqlcache demo`'s synthetic entries: their departures are not
#: recorded. The demo must leave a user's cache as it found it, and the record is bounded:
#: its rows would push out the user's, which `explain` reads.
DEMO_BACKEND = "demo"
_NOT_DEMO = f"backend IS NOT '{DEMO_BACKEND}'"


def record_departures(
    connection: apsw.Connection, ids: Sequence[int], reason: str, now_ms: int | None = None
) -> None:
    """Record that the entries with these row ids leave, and why; call it before their
    rows are deleted. One statement for the batch; the record keeps its newest
    `KEPT_DEPARTURES` rows."""
    if not ids:
        return
    carray_ids = ids if isinstance(ids, array) else array("q", ids)
    connection.execute(
        f"INSERT INTO departures (id, {_ROW_COLUMNS}, blob_size, reason, at_ms) "
        f"SELECT id, {_ROW_COLUMNS}, blob_size, ?2, ?3 FROM entries "
        f"WHERE id IN carray(?1) AND {_NOT_DEMO}",
        (apsw.carray(carray_ids), reason, _now_ms() if now_ms is None else now_ms),
    )
    _trim(connection, "departures", KEPT_DEPARTURES)


def note_reasons(connection: apsw.Connection, ids: Sequence[int], reason: str, now_ms: int) -> None:
    """Note why and when the entries with these row ids were just tombstoned; their
    departures are recorded from it when their tombstones go (`record_tombstoned`)."""
    if not ids:
        return
    carray_ids = ids if isinstance(ids, array) else array("q", ids)
    connection.execute(
        "INSERT OR REPLACE INTO tombstone_reasons (id, reason, at_ms) "
        "SELECT value, ?2, ?3 FROM carray(?1)",
        (apsw.carray(carray_ids), reason, now_ms),
    )


def record_tombstoned(connection: apsw.Connection, ids: Sequence[int]) -> None:
    """Record the departures noted for the tombstones of these row ids; call it before the
    tombstones or the entries' rows are deleted. Tombstones without a reason (written by
    schema 7, which recorded the departure at once) are skipped."""
    if not ids:
        return
    carray_ids = ids if isinstance(ids, array) else array("q", ids)
    connection.execute(
        f"INSERT INTO departures (id, {_ROW_COLUMNS}, blob_size, reason, at_ms) "
        f"SELECT e.id, {_ROW_COLUMNS}, blob_size, r.reason, r.at_ms "
        "FROM tombstone_reasons AS r JOIN entries AS e ON e.id = r.id "
        f"WHERE r.id IN carray(?1) AND e.{_NOT_DEMO} ORDER BY r.at_ms, r.id",
        (apsw.carray(carray_ids),),
    )
    if connection.changes():
        _trim(connection, "departures", KEPT_DEPARTURES)


def record_unwritten(
    connection: apsw.Connection, rows: Sequence[tuple[Any, ...]], reason: str
) -> None:
    """Record entries that leave before their rows were written (a group of writes over
    the cap): `rows` hold (id, entry_key, the 13 key columns, blob_size)."""
    if not rows:
        return
    now = _now_ms()
    connection.executemany(
        f"INSERT INTO departures (id, entry_key, {_KEY_COLUMNS}, blob_size, reason, at_ms) "
        f"VALUES ({', '.join('?' * 18)})",
        [(*row, reason, now) for row in rows],
    )
    _trim(connection, "departures", KEPT_DEPARTURES)


_INSERT_MISS = (
    "INSERT INTO misses (at_ms, call, entry_key, pid, key_version, shader_hash, layout_hash, "
    "push_constant_size, workgroup_x, workgroup_y, workgroup_z, feature_flags, backend, "
    "vendor, device, driver_digest, program_digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def record_misses(connection: apsw.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add rows to the miss log (the columns of `_INSERT_MISS`); it keeps its newest
    `KEPT_MISSES`."""
    if not rows:
        return
    connection.executemany(_INSERT_MISS, rows)
    _trim(connection, "misses", KEPT_MISSES)


def shrink(connection: apsw.Connection) -> None:
    """Cut the departure record and the miss log to their newest `MIN_KEPT` rows (a
    full disk: the blobs' room first)."""
    for table in ("departures", "misses"):
        connection.execute(
            f"DELETE FROM {table} WHERE seq <= (SELECT max(seq) FROM {table}) - ?", (MIN_KEPT,)
        )


# -- the lookups of explain ------------------------------------------------------------


def dicts(cursor: apsw.Cursor) -> list[dict[str, Any]]:
    """The rows of an executed statement as dicts by column name ([] for none)."""
    try:
        columns = [name for name, _ in cursor.get_description()]
    except apsw.ExecutionCompleteError:
        return []
    return [dict(zip(columns, row, strict=True)) for row in cursor]


def _dict(cursor: apsw.Cursor) -> dict[str, Any] | None:
    rows = dicts(cursor)
    return rows[0] if rows else None


def entry_state(connection: apsw.Connection, entry_key: bytes) -> dict[str, Any] | None:
    """The row of `entry_key` (its key columns, `created_ms` and `tombstoned`), or None."""
    return _dict(
        connection.execute(
            f"SELECT {_ROW_COLUMNS}, "
            "EXISTS (SELECT 1 FROM tombstones WHERE id = ?1) AS tombstoned "
            "FROM entries WHERE id = ?1 AND entry_key = ?2",
            (entry_id(entry_key), entry_key),
        )
    )


def departure(
    connection: apsw.Connection, entry_key: bytes, before_ms: int | None
) -> dict[str, Any] | None:
    """The newest departure of `entry_key` (at or before `before_ms`, if given), or None:
    one noted with its tombstone, waiting for the purge, or a recorded one."""
    params = (entry_id(entry_key), entry_key, 2**63 - 1 if before_ms is None else before_ms)
    tables = _later_tables(connection)
    if "tombstone_reasons" in tables:
        pending = _dict(
            connection.execute(
                f"SELECT {_ROW_COLUMNS}, r.reason AS reason, r.at_ms AS at_ms "
                "FROM tombstone_reasons AS r JOIN entries AS e ON e.id = r.id "
                "WHERE r.id = ?1 AND e.entry_key = ?2 AND r.at_ms <= ?3",
                params,
            )
        )
        if pending is not None:
            return pending
    if "departures" not in tables:
        return None
    return _dict(
        connection.execute(
            f"SELECT {_ROW_COLUMNS}, reason, at_ms FROM departures "
            "WHERE id = ?1 AND entry_key = ?2 AND at_ms <= ?3 ORDER BY seq DESC LIMIT 1",
            params,
        )
    )


def nearest_by_shader(
    connection: apsw.Connection, asked: dict[str, Any], before_ms: int | None, limit: int
) -> list[dict[str, Any]]:
    """Live keyed entries of the asked shader (created before `before_ms`, if given),
    fewest differing fields first, then newest; `asked` holds the key columns.

    A scan of `entries` (metadata only): `explain` is for people, and an index on the
    shader would cost every insert a page.
    """
    differing = (
        "(key_version IS NOT :key_version) + (backend IS NOT :backend) "
        "+ (layout_hash IS NOT :layout_hash) + (push_constant_size IS NOT :push_constant_size) "
        "+ (workgroup_x IS NOT :workgroup_x OR workgroup_y IS NOT :workgroup_y "
        "   OR workgroup_z IS NOT :workgroup_z) "
        "+ (feature_flags IS NOT :feature_flags) "
        "+ (vendor IS NOT :vendor OR device IS NOT :device) "
        "+ (driver_digest IS NOT :driver_digest)"
    )
    params = {
        **{name: asked.get(name) for name in _KEY_COLUMNS.split(", ")},
        "entry_key": asked["entry_key"],
        "before": 2**63 - 1 if before_ms is None else before_ms,
        "limit": limit,
    }
    return dicts(
        connection.execute(
            f"{_candidates(connection, 'shader_hash = :shader_hash')} SELECT * FROM candidates "
            "WHERE key_version IS NOT NULL AND entry_key != :entry_key "
            f"AND created_ms < :before ORDER BY {differing}, created_ms DESC, entry_key "
            "LIMIT :limit",
            params,
        )
    )


def _candidates(connection: apsw.Connection, match: str) -> str:
    """A `candidates` CTE: the entries that `match` and were live at `:before` - the
    live ones, the tombstoned ones noted as leaving at or after it, and those the
    departure record says left at or after it (all live ones when `:before` is the
    largest int64); of those, what the file's schema keeps."""
    tables = _later_tables(connection)
    live = _LIVE
    if "tombstone_reasons" in tables:
        live = (
            f"({_LIVE} OR EXISTS (SELECT 1 FROM tombstone_reasons AS r "
            "WHERE r.id = entries.id AND r.at_ms >= :before))"
        )
    departed = ""
    if "departures" in tables:
        departed = (
            f" UNION ALL SELECT {_ROW_COLUMNS} FROM departures WHERE {match} AND at_ms >= :before"
        )
    entries = f"SELECT {_ROW_COLUMNS} FROM entries WHERE {match} AND {live}"
    return f"WITH candidates AS ({entries}{departed})"


def nearest_by_program(
    connection: apsw.Connection, asked: dict[str, Any], before_ms: int | None, limit: int
) -> list[dict[str, Any]]:
    """Live entries stored by the asked program digest (`write`) on other devices or
    drivers, as `nearest_by_shader` orders them."""
    return dicts(
        connection.execute(
            f"{_candidates(connection, 'program_digest = :program_digest')} "
            "SELECT * FROM candidates "
            "WHERE key_version IS NULL AND entry_key != :entry_key AND created_ms < :before "
            "ORDER BY (vendor IS NOT :vendor OR device IS NOT :device) "
            "+ (driver_digest IS NOT :driver_digest), created_ms DESC, entry_key LIMIT :limit",
            {
                "program_digest": asked["program_digest"],
                "entry_key": asked["entry_key"],
                "vendor": asked["vendor"],
                "device": asked["device"],
                "driver_digest": asked["driver_digest"],
                "before": 2**63 - 1 if before_ms is None else before_ms,
                "limit": limit,
            },
        )
    )


def same_device_count(
    connection: apsw.Connection,
    vendor: int,
    device: int,
    driver_digest: bytes,
    before_ms: int | None,
) -> int:
    """How many entries a device has for one driver (live now, or at `before_ms`)."""
    match = "vendor = :vendor AND device = :device AND driver_digest = :driver"
    row = connection.execute(
        f"{_candidates(connection, match)} SELECT count(*) FROM candidates "
        "WHERE created_ms < :before",
        {
            "vendor": vendor,
            "device": device,
            "driver": driver_digest,
            "before": 2**63 - 1 if before_ms is None else before_ms,
        },
    ).fetchone()
    return 0 if row is None else int(row[0])


_MISS_COLUMNS = (
    "seq, at_ms, call, entry_key, pid, key_version, shader_hash, layout_hash, "
    "push_constant_size, workgroup_x, workgroup_y, workgroup_z, feature_flags, backend, "
    "vendor, device, driver_digest, program_digest"
)


def recent_misses(connection: apsw.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` rows of the miss log, newest first."""
    if "misses" not in _later_tables(connection):
        return []
    return dicts(
        connection.execute(
            f"SELECT {_MISS_COLUMNS} FROM misses ORDER BY seq DESC LIMIT ?", (limit,)
        )
    )


def miss_for(connection: apsw.Connection, entry_key: bytes) -> dict[str, Any] | None:
    """The newest miss-log row of `entry_key`, or None."""
    if "misses" not in _later_tables(connection):
        return None
    return _dict(
        connection.execute(
            f"SELECT {_MISS_COLUMNS} FROM misses WHERE entry_key = ? ORDER BY seq DESC LIMIT 1",
            (entry_key,),
        )
    )
