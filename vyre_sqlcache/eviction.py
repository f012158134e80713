"""The size cap: least-recently-used entries leave in one statement, inside the insert's txn."""

from __future__ import annotations

from array import array
from typing import Any

import apsw

from .bookkeeping import BUMP_META

__all__ = ["EVICTION_SLACK", "blob_bytes", "evict", "make_room"]

#: Eviction frees this share of the cap beyond what is needed, so that a full
#: cache does not evict on every write.
EVICTION_SLACK = 0.05


def _scalar(connection: apsw.Connection, sql: str, params: tuple[Any, ...] = ()) -> int:
    row = connection.execute(sql, params).fetchone()
    return 0 if row is None else int(row[0])


def blob_bytes(connection: apsw.Connection) -> int:
    """The total blob bytes, kept by triggers in `meta`."""
    return _scalar(connection, "SELECT value FROM meta WHERE name = 'blob_bytes'")


def make_room(connection: apsw.Connection, ids: array[int], incoming: int, cap: int) -> int:
    """Evict so that inserting `incoming` bytes under row `ids` keeps blob bytes under `cap`.

    Returns how many entries were evicted. Run inside the inserting transaction.
    """
    total = blob_bytes(connection)
    if total + incoming <= cap:
        return 0
    replaced = _scalar(
        connection,
        "SELECT coalesce(sum(blob_size), 0) FROM entries WHERE id IN carray(?)",
        (apsw.carray(ids),),
    )
    excess = total - replaced + incoming - cap
    if excess <= 0:
        return 0
    return evict(connection, excess + int(cap * EVICTION_SLACK), keep=set(ids))


def evict(connection: apsw.Connection, bytes_to_free: int, keep: set[int]) -> int:
    """Delete the least-recently-used entries not in `keep` until `bytes_to_free` are freed.

    The victims are chosen in batches along the LRU index and deleted by one statement.
    Returns how many entries were deleted.
    """
    victims: array[int] = array("q")
    freed = 0
    last: tuple[Any, ...] = (-(2**63), -(2**63))
    while freed < bytes_to_free:
        batch = connection.execute(
            "SELECT accessed_ms, id, blob_size FROM entries "
            "WHERE (accessed_ms, id) > (?, ?) ORDER BY accessed_ms, id LIMIT 256",
            last,
        ).fetchall()
        if not batch:
            break
        for accessed, rowid, size in batch:
            last = (accessed, rowid)
            if rowid in keep:
                continue
            assert isinstance(rowid, int) and isinstance(size, int)
            victims.append(rowid)
            freed += size
            if freed >= bytes_to_free:
                break
    if victims:
        connection.execute("DELETE FROM entries WHERE id IN carray(?)", (apsw.carray(victims),))
        connection.execute(BUMP_META, (len(victims), "evictions"))
    return len(victims)
