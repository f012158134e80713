"""Every statement over the cache's tables: fetch, verify, insert, evict, delete, counters.

A schema change touches this module and a new file in `migrations/`, nothing else.
Functions run on a connection the caller gives them, inside the caller's
transaction where they change anything; they raise apsw errors as they come.
Compression itself (what to store, decoding, training) is `_codec`'s: this module
reads and writes what it decides, dictionaries included.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple

import apsw

from . import _checksums, _codec, _explain_sql
from ._codec import Codec, Dictionary, Encoded, Scope
from .keys import DeviceFingerprint, PipelineCacheKey, entry_id, entry_ids_of

__all__ = [
    "EVICTION_SLACK",
    "LARGE_BLOB_BYTES",
    "MAPPED_BLOB_BYTES",
    "Fetched",
    "HeldReader",
    "NewEntry",
    "Recompressed",
    "blob_bytes",
    "bump",
    "delete_entries",
    "dictionary_room",
    "drop",
    "drop_unused_dictionaries",
    "evict",
    "fetch",
    "insert",
    "invalidate",
    "owner",
    "purge",
    "recompress",
    "scopes",
    "setting",
    "store_setting",
    "stored_bytes",
    "totals",
    "train_dictionary",
    "verify",
    "write_access",
]

#: Blobs above this size are left out of the lookup's row and read with incremental
#: blob I/O, straight into the returned bytes (one copy instead of two).
LARGE_BLOB_BYTES = 256 * 1024
#: Blobs above this size are read by a connection without memory mapping, so that no
#: mapped file pages join the process's resident memory beside the result (a 64 MiB
#: read costs 1x its size, not 2x). Up to it, the mapped connection reads them: SQLite
#: then copies each overflow page from the map instead of one `pread` each, and a warm
#: first read of 1 MiB took 109-134 µs against 152-194 µs (files: 68-96 µs; the cost:
#: a cold read of a tenth of 300 x 1 MiB took 214-238 against 141-145 ms, as each
#: fault reads ahead; see README "Design").
MAPPED_BLOB_BYTES = 8 << 20

#: Eviction frees this share of the cap beyond what is needed, so that a full
#: cache does not evict on every write.
EVICTION_SLACK = 0.05

log = logging.getLogger("vyre_sqlcache")

#: A condition true unless the row id `{}` is tombstoned (invalidated or deleted, not yet
#: purged): every read, lookup and eviction adds it.
_LIVE = "NOT EXISTS (SELECT 1 FROM tombstones WHERE id = {})"
#: The same for a scan of `entries`.
_LIVE_ENTRY = "id NOT IN (SELECT id FROM tombstones)"
#: Tombstoned entries one purge transaction deletes: a few hundred rows and their blobs'
#: pages, so the write lock is held for milliseconds.
PURGE_BATCH = 256

# One statement a read-hit; a large blob is left out of the row.
# Text read back from a file may be damaged into invalid UTF-8: it is read as bytes and
# decoded leniently (a mangled algorithm name then fails the checksum like any damage).
_BLOB_COLUMNS = (
    "CAST(checksum_algo AS BLOB), checksum, "
    f"CASE WHEN length(data) <= {LARGE_BLOB_BYTES} THEN data END, CAST(codec AS BLOB), "
    "dict_id, raw_size"
)
_SELECT_BLOB = f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE id = ?1 AND {_LIVE.format('?1')}"
#: `_SELECT_BLOB` of many rows (`carray` of row ids), each with its id first.
_SELECT_BLOBS = f"SELECT id, {_BLOB_COLUMNS} FROM blobs WHERE id IN carray(?1) AND {_LIVE_ENTRY}"

_INSERT_ENTRY = """
INSERT INTO entries (
    id, entry_key, key_version, shader_hash, layout_hash, push_constant_size,
    workgroup_x, workgroup_y, workgroup_z, feature_flags, backend,
    vendor, device, driver_digest, program_digest, blob_size, created_ms, accessed_ms,
    stored_size, namespace, name
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    entry_key = excluded.entry_key, key_version = excluded.key_version,
    shader_hash = excluded.shader_hash, layout_hash = excluded.layout_hash,
    push_constant_size = excluded.push_constant_size, workgroup_x = excluded.workgroup_x,
    workgroup_y = excluded.workgroup_y, workgroup_z = excluded.workgroup_z,
    feature_flags = excluded.feature_flags, backend = excluded.backend,
    vendor = excluded.vendor, device = excluded.device, driver_digest = excluded.driver_digest,
    program_digest = excluded.program_digest, blob_size = excluded.blob_size,
    created_ms = excluded.created_ms, accessed_ms = excluded.accessed_ms, hits = 0,
    stored_size = excluded.stored_size, namespace = excluded.namespace, name = excluded.name
"""
_INSERT_BLOB = """
INSERT INTO blobs (id, checksum_algo, checksum, data, codec, dict_id, raw_size)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    checksum_algo = excluded.checksum_algo, checksum = excluded.checksum,
    data = excluded.data, codec = excluded.codec, dict_id = excluded.dict_id,
    raw_size = excluded.raw_size
"""
# Counters saturate at the int64 maximum: a hand-edited or ancient counter must never
# make every later write fail with an integer overflow.
_INT64_MAX = 2**63 - 1
_BUMP = (
    f"UPDATE meta SET value = CASE WHEN value > {_INT64_MAX} - ?1 THEN {_INT64_MAX} "
    "ELSE value + ?1 END WHERE name = ?2"
)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """One entry ready to insert: validated and keyed."""

    entry_key: bytes
    key: PipelineCacheKey | None
    fingerprint: DeviceFingerprint | None
    program_digest: bytes | None
    blob: bytes
    created_ms: int | None = None
    #: a named entry's (namespace, name) (`PipelineCache.put_named`); None otherwise
    named: tuple[str, str] | None = None

    @property
    def rowid(self) -> int:
        return entry_id(self.entry_key)

    @property
    def scope(self) -> Scope:
        """The entries it shares compression dictionaries with: its backend and device."""
        fp = self.fingerprint
        if self.named is not None:
            return Scope(self.named[0], None, None)  # a namespace is its own backend
        return Scope(
            None if self.key is None else self.key.backend,
            None if fp is None else fp.vendor,
            None if fp is None else fp.device,
        )

    def encode(self, codec: Codec | None, dictionary: Dictionary | None) -> Encoded:
        """The blob as it is to be stored (raw without a codec); a pure function."""
        return Encoded(self.blob) if codec is None else codec.encode(self.blob, dictionary)

    def params(
        self, now_ms: int, encoded: Encoded | None = None
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """Parameters of the entry row and the blob row, storing `encoded` (default raw).

        The checksum covers the entry key and the caller's bytes, whatever is stored.
        """
        stored = Encoded(self.blob) if encoded is None else encoded
        rowid = self.rowid
        when = now_ms if self.created_ms is None else self.created_ms
        k = self.key
        key_columns: tuple[Any, ...] = (
            (
                k.version,
                k.shader_hash,
                k.bind_group_layout_hash,
                k.push_constant_size,
                *k.workgroup_size,
                int(k.feature_flags),
                k.backend,
            )
            if k is not None
            else (None,) * 8 + (None if self.named is None else self.named[0],)
        )
        fp = self.fingerprint
        device = (None, None, None) if fp is None else (fp.vendor, fp.device, fp.driver_digest)
        entry = (
            rowid,
            self.entry_key,
            *key_columns,
            *device,
            self.program_digest,
            len(self.blob),
            when,
            when,
            len(stored.data),
            *((None, None) if self.named is None else self.named),
        )
        algo = _checksums.DEFAULT
        blob = (
            rowid,
            algo,
            _checksums.compute(algo, self.entry_key, self.blob),
            stored.data,
            stored.codec,
            stored.dict_id,
            None if stored.codec is None else len(self.blob),
        )
        return entry, blob


class Fetched(NamedTuple):
    """A stored blob as read and decoded, before its checksum is checked (a named tuple:
    one is made for every read, and a tuple is made in a third of a frozen dataclass's
    time).

    `damaged`: it could not be decoded (a bad frame, a missing or damaged dictionary);
    `data` is then empty and `verify` fails. `dictionary` names the dictionary it was
    decoded with, as (file, id), so that a failed check loads that dictionary again.
    """

    algo: str
    checksum: bytes
    data: bytes
    damaged: bool = False
    dictionary: tuple[str, int] | None = None


def _text(value: object) -> str:
    """A text column read as bytes, decoded leniently (damage gives a name nothing knows)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- reading ---------------------------------------------------------------------------


def fetch(cursor: apsw.Cursor, large: Any, entry_key: bytes) -> Fetched | None:
    """The stored blob of `entry_key`'s row, unverified, or None if the row is empty.

    `large()` gives the connection that reads blobs over `MAPPED_BLOB_BYTES`.
    """
    rowid = entry_id(entry_key)
    # fetchall, not fetchone: running the statement to its end resets it, so no read
    # transaction stays open between calls.
    rows = cursor.execute(_SELECT_BLOB, (rowid,)).fetchall()
    return _fetched(cursor, large, entry_key, rowid, rows[0]) if rows else None


def fetch_many(cursor: apsw.Cursor, large: Any, entry_keys: list[bytes]) -> list[Fetched | None]:
    """`fetch` of each of `entry_keys`, by one statement (a batch of misses costs one
    look, not one each); raises apsw errors."""
    if not entry_keys:
        return []  # (and carray refuses an empty array's buffer)
    ids = entry_ids_of(entry_keys)
    # Run to its end (the dict takes every row) before any large blob is opened.
    rows = {row[0]: row[1:] for row in cursor.execute(_SELECT_BLOBS, (apsw.carray(ids),))}
    found: list[Fetched | None] = []
    for key, rowid in zip(entry_keys, ids, strict=True):
        row = rows.get(rowid)
        found.append(None if row is None else _fetched(cursor, large, key, rowid, row))
    return found


def _fetched(
    cursor: apsw.Cursor, large: Any, entry_key: bytes, rowid: int, row: Sequence[Any]
) -> Fetched | None:
    """The `Fetched` of a row `_SELECT_BLOB` read (None: it cannot be decoded here)."""
    raw_algo, checksum, data, raw_codec, dict_id, raw_size = row
    algo = _text(raw_algo)
    codec = None if raw_codec is None else _text(raw_codec)
    if data is None:
        # The blob may be replaced between the select and this read: a checksum that
        # then fails is looked at again before anything is dropped.
        blob = cursor.connection.blob_open("main", "blobs", "data", rowid, False)
        if blob.length() > MAPPED_BLOB_BYTES:
            blob.close()
            blob = large().blob_open("main", "blobs", "data", rowid, False)
        try:
            data = blob.read()
        finally:
            blob.close()
    if codec is None:
        return Fetched(algo, checksum, data)
    connection = cursor.connection
    try:
        decoded = decode(connection, codec, dict_id, raw_size, data)
    except _codec.Unavailable:
        _warn_unavailable()
        return None
    except _codec.DecodeError as error:
        log.debug("vyre-sqlcache: entry %s cannot be decoded: %s", entry_key.hex(), error)
        return Fetched(algo, checksum, b"", damaged=True)
    used = None if dict_id is None else (connection.filename, int(dict_id))
    return Fetched(algo, checksum, decoded, dictionary=used)


#: How every zstd frame the cache stores begins (compressed entries are never magicless).
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_default_hasher, _DEFAULT_BYTES = _checksums.default_hasher, _checksums.DEFAULT_BYTES


class HeldReader:
    """Single reads inside one held read snapshot through two reused blob handles (the
    checksum and the data), moved from row to row without running a statement: about
    1.5 µs less than `fetch` a read.

    It serves what it can prove from those two columns, and answers None for everything
    else, which `fetch` then reads: a missing row, a blob over `MAPPED_BLOB_BYTES`, one
    that starts like a zstd frame (compressed entries need their row's codec, and a raw
    blob can start that way too), and every read of a snapshot that has tombstones (the
    handles cannot skip tombstoned rows; the purge empties the table soon after an
    invalidation). The checksum's length names its algorithm; the checksum is checked
    by the caller as for `fetch`, so a damaged row is still a miss.

    The handles keep a read transaction open even after COMMIT, so whoever ends the
    snapshot must `close()` this first (`_snapshots.end` does, handed the slot's reader).
    """

    __slots__ = ("_armed", "_checksum", "_connection", "_data", "_declined", "since", "usable")

    def __init__(self, connection: apsw.Connection, since: float) -> None:
        """Raises apsw errors (from the look at the tombstones, made in the snapshot)."""
        self._connection = connection
        self._checksum: apsw.Blob | None = None
        self._data: apsw.Blob | None = None
        # After a miss, the handles stay closed until `read` finds a row: a run of misses
        # would otherwise pay a failed move (an exception) on top of the statement each.
        self._armed = True
        # The row whose blob `verified` read and left to the statement (one that starts
        # like a zstd frame, or fails its checksum): `fetch` would only read it again.
        self._declined: int | None = None
        #: The held snapshot this reader belongs to (`Slot.held_since`).
        self.since = since
        self.usable = connection.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is None

    def read(self, cursor: apsw.Cursor, large: Any, entry_key: bytes) -> Fetched | None:
        """`fetch` of `entry_key` in this snapshot (`cursor` its statement's), through the
        handles where they can serve it."""
        fetched = self.fetch(entry_id(entry_key))
        if fetched is not None:
            return fetched
        fetched = fetch(cursor, large, entry_key)
        if fetched is not None:
            self._armed = True  # the row exists: the handles are worth moving again
        return fetched

    def fetch(self, rowid: int) -> Fetched | None:
        """The raw blob of row `rowid` and its checksum, unverified; None if `fetch` must
        read the row instead."""
        declined, self._declined = self._declined, None
        if not self.usable or not self._armed or declined == rowid:
            return None
        if self._checksum is None or self._data is None:
            try:
                connection = self._connection
                self._checksum = connection.blob_open("main", "blobs", "checksum", rowid, False)
                self._data = connection.blob_open("main", "blobs", "data", rowid, False)
            except apsw.Error:
                self._disarm()
                return None
        elif not self._moved(rowid):
            return None
        checksum, data = self._checksum, self._data
        length = data.length()
        if length > MAPPED_BLOB_BYTES:
            return None
        if length > LARGE_BLOB_BYTES:
            # A compressed one is read by `fetch`: look before reading it all twice.
            if data.read(4) == _ZSTD_MAGIC:
                return None
            data.seek(0)
        digest = checksum.read()
        algo = _checksums.BY_LENGTH.get(len(digest))
        blob = data.read()
        if algo is None or blob[:4] == _ZSTD_MAGIC:
            return None
        return Fetched(algo, digest, blob)

    def verified(self, entry_key: bytes, rowid: int) -> bytes | None:
        """The blob of `entry_key` (row `rowid`) if the open handles serve it raw and its
        XXH3 checksum holds; None for the full read to look (a miss, a blob that is large,
        compressed or under another algorithm than the default, damage). A blob it read
        and declined is left to the statement: the next `fetch` of that row does not
        read it again.

        `fetch` and `verify` in one step with no object made between them: the common
        read, a small raw blob, costs a third less.
        """
        checksum, data = self._checksum, self._data
        if checksum is None or data is None or not self.usable:
            return None
        try:  # (`_moved`, inline: this is the common read)
            checksum.reopen(rowid)
            data.reopen(rowid)
        except apsw.Error:
            self._disarm()
            return None
        if data.length() > LARGE_BLOB_BYTES:
            return None
        digest = checksum.read()
        if len(digest) != _DEFAULT_BYTES:
            return None
        blob = data.read()
        if blob[:4] != _ZSTD_MAGIC:
            hasher = _default_hasher(entry_key)
            hasher.update(blob)
            if hasher.digest() == digest:
                return blob
        self._declined = rowid
        return None

    def _moved(self, rowid: int) -> bool:
        """Move both handles to row `rowid`; False if they cannot (see `_disarm`)."""
        try:
            self._checksum.reopen(rowid)  # type: ignore[union-attr]
            self._data.reopen(rowid)  # type: ignore[union-attr]
        except apsw.Error:
            self._disarm()
            return False
        return True

    def _disarm(self) -> None:
        """After a handle failed to open or move: no such row (a miss), or damage, which
        `fetch` tells apart. A handle that failed to move is aborted for good: new ones
        are opened once `read` finds a row."""
        self.close()
        self._armed = False

    def close(self) -> None:
        """Close the handles (ending the read transaction they hold open)."""
        for handle in (self._checksum, self._data):
            if handle is not None:
                with suppress(apsw.Error):
                    handle.close()
        self._checksum = self._data = None


def verify(entry_key: bytes, fetched: Fetched) -> bool:
    """Whether the fetched bytes are the ones written under `entry_key`."""
    if fetched.damaged:
        return False
    if _checksums.matches(fetched.algo, fetched.checksum, entry_key, fetched.data):
        return True
    if fetched.dictionary is not None:
        # A dictionary loaded before the file was replaced would decode wrong bytes:
        # the second look (cache.py) loads it again.
        _codec.LOADED.forget(*fetched.dictionary)
    return False


_unavailable_warned = False


def _warn_unavailable() -> None:
    global _unavailable_warned
    if not _unavailable_warned:
        _unavailable_warned = True
        log.warning(
            "vyre-sqlcache: the cache holds zstd-compressed entries, but the zstandard "
            "package is not installed: they read as misses (pip install 'vyre-sqlcache[zstd]')"
        )


def decode(
    connection: apsw.Connection,
    codec: str | None,
    dict_id: int | None,
    raw_size: int | None,
    data: bytes,
) -> bytes:
    """The caller's bytes of a stored blob, loading its dictionary if it has one.

    Raises _codec.DecodeError for a blob that cannot be decoded (a damaged frame, a
    missing or damaged dictionary), _codec.Unavailable without zstandard.
    """
    if codec is None or dict_id is None:
        return _codec.decode(codec, data, raw_size, None)
    where = connection.filename
    cached = _codec.LOADED.get(where, dict_id)
    if cached is not None:
        try:
            return _codec.decode(codec, data, raw_size, cached)
        except _codec.Unavailable:
            raise
        except _codec.DecodeError:
            _codec.LOADED.forget(where, dict_id)  # perhaps another file's: load it again
    return _codec.decode(codec, data, raw_size, load_dictionary(connection, dict_id))


def owner(connection: apsw.Connection, entry_key: bytes) -> bytes | None:
    """The entry key of the row `entry_key` maps to (another key may share its row id)."""
    row = connection.execute(
        f"SELECT entry_key FROM entries WHERE id = ?1 AND {_LIVE.format('?1')}",
        (entry_id(entry_key),),
    ).fetchone()
    return None if row is None else bytes(row[0])


def totals(connection: apsw.Connection) -> dict[str, int]:
    """The cache-wide totals and counters kept in `meta`."""
    rows = connection.execute(
        "SELECT CAST(name AS BLOB), CASE typeof(value) WHEN 'integer' THEN value END FROM meta"
    ).fetchall()
    # A damaged row may hold anything: only integers count (a missing total reads as 0).
    return {_text(name): value for name, value in rows if isinstance(value, int)}


def blob_bytes(connection: apsw.Connection) -> int:
    """The total blob bytes, as the callers wrote them, kept by triggers in `meta`."""
    return totals_value(connection, "blob_bytes")


def stored_bytes(connection: apsw.Connection) -> int:
    """The bytes the size cap counts: the blobs as stored, and the dictionaries."""
    row = connection.execute(
        "SELECT coalesce(sum(value), 0) FROM meta "
        "WHERE name IN ('stored_bytes', 'dictionary_bytes')"
    ).fetchone()
    return 0 if row is None else int(row[0])


def totals_value(connection: apsw.Connection, name: str) -> int:
    row = connection.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


# -- settings kept in the file -----------------------------------------------------------

_SETTING_PREFIX = "setting:"
#: The file's size cap is kept as this setting (0: no cap).
CAP_SETTING = "max_bytes"


def setting(connection: apsw.Connection, name: str) -> int | None:
    """A setting stored in the file, or None if it was never stored."""
    row = connection.execute(
        "SELECT value FROM meta WHERE name = ?", (_SETTING_PREFIX + name,)
    ).fetchone()
    return None if row is None else int(row[0])


def store_setting(connection: apsw.Connection, name: str, value: int) -> None:
    """Keep a setting in the file, for every process and the command line."""
    connection.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (_SETTING_PREFIX + name, value)
    )


# -- writing ---------------------------------------------------------------------------


def insert(
    connection: apsw.Connection,
    entries: list[NewEntry],
    now_ms: int,
    cap: int | None,
    codec: Codec | None = None,
) -> int:
    """Insert (or replace) `entries`, first evicting what the cap needs; return evictions.

    With an enabled `codec` each blob is compressed where it pays, with its scope's
    dictionary if it has one, and a scope that has had enough writes since its last
    dictionary gets a new one (see `_codec.TRAIN_AFTER`).
    """
    if codec is not None and not codec.enabled:
        codec = None
    states: dict[Scope, _ScopeState] = {}
    if codec is not None:
        for scope in {entry.scope for entry in entries}:
            states[scope] = _scope_state(connection, scope)
    encoded = [
        entry.encode(codec, None if codec is None else states[entry.scope].dictionary)
        for entry in entries
    ]
    evicted = 0
    if cap is not None:
        entries, encoded, evicted = _newest_that_fit(connection, entries, encoded, cap)
        if not entries:
            return evicted
    ids = array("q", (entry.rowid for entry in entries))
    # A write of a tombstoned key brings it back: the trigger counts the old row live
    # again, and the upsert's resize trigger then counts the new sizes. The old row's
    # departure is recorded first (rarely: the table is mostly empty).
    if connection.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is not None:
        _explain_sql.record_tombstoned(connection, ids)
        connection.execute("DELETE FROM tombstones WHERE id IN carray(?)", (apsw.carray(ids),))
    if cap is not None:
        evicted += make_room(connection, ids, sum(len(e.data) for e in encoded), cap)
    params = [entry.params(now_ms, e) for entry, e in zip(entries, encoded, strict=True)]
    # In row id order: consecutive inserts then share leaves and the cursor's path, so a
    # group commit dirties (and logs) fewer pages. The sort is stable: of two writes of
    # one row, the later still lands last.
    params.sort(key=_by_rowid)
    connection.executemany(_INSERT_ENTRY, [p[0] for p in params])
    connection.executemany(_INSERT_BLOB, [p[1] for p in params])
    if codec is not None:
        written = Counter(entry.scope for entry in entries)
        group = sum(len(e.data) for e in encoded)
        trained = [
            _count_writes(connection, scope, count, states[scope], now_ms, cap, group)
            for scope, count in written.items()
        ]
        if cap is not None and any(trained):
            # The cap counts dictionaries too. The group is in place now: kept, not
            # passed as rows about to be replaced (their bytes were then subtracted as
            # if gone, and the eviction came out too small).
            evicted += make_room(connection, array("q"), 0, cap, keep=ids)
    return evicted


def _by_rowid(params: tuple[tuple[Any, ...], tuple[Any, ...]]) -> int:
    rowid: int = params[0][0]
    return rowid


def _newest_that_fit(
    connection: apsw.Connection,
    entries: list[NewEntry],
    encoded: list[Encoded],
    cap: int,
) -> tuple[list[NewEntry], list[Encoded], int]:
    """The newest of `entries` that fit under `cap` together, and how many of the others
    were evicted at once.

    Writes queued together commit in one transaction; had each committed alone, the
    cap would have evicted the older ones as the newer came. They leave the same way:
    evicted, any earlier version in the file with them (never kept as stale bytes).
    """
    # Dictionaries may take their share of the cap (more only in a file written without
    # this cap, where eviction then drops those no entry uses: see `make_room`).
    cap -= min(totals_value(connection, "dictionary_bytes"), cap // _codec.DICTIONARY_SHARE)
    if sum(len(e.data) for e in encoded) <= cap:
        return entries, encoded, 0
    kept: list[int] = []
    seen: set[bytes] = set()
    dropped: set[bytes] = set()
    total = 0
    for index in range(len(entries) - 1, -1, -1):
        key = entries[index].entry_key
        if key in seen or key in dropped:
            continue  # an older write of a key written again in the same group
        size = len(encoded[index].data)
        if total + size <= cap:
            total += size
            seen.add(key)
            kept.append(index)
        else:
            dropped.add(key)
    kept.reverse()
    kept_ids = {entries[i].rowid for i in kept}
    gone = array("q", (i for i in map(entry_id, dropped) if i not in kept_ids))
    if dropped:
        newest = {e.entry_key: e for e in entries if e.entry_key in dropped}
        _explain_sql.record_unwritten(
            connection, [e.params(0)[0][:16] for e in newest.values()], "evicted"
        )
    if gone:
        connection.execute(
            f"DELETE FROM entries WHERE id IN carray(?) AND {_LIVE_ENTRY}", (apsw.carray(gone),)
        )
    if dropped:
        bump(connection, "evictions", len(dropped))
    return [entries[i] for i in kept], [encoded[i] for i in kept], len(dropped)


def make_room(
    connection: apsw.Connection,
    ids: array[int],
    incoming: int,
    cap: int,
    keep: Iterable[int] = (),
) -> int:
    """Evict so that inserting `incoming` stored bytes under row `ids` keeps the stored
    bytes (blobs as stored, and dictionaries) under `cap`, never evicting `keep`.

    Returns how many entries were evicted.
    """
    total = stored_bytes(connection)
    if total + incoming <= cap:
        return 0
    row = (
        connection.execute(
            f"SELECT coalesce(sum(stored_size), 0) FROM entries WHERE id IN carray(?) "
            f"AND {_LIVE_ENTRY}",
            (apsw.carray(ids),),
        ).fetchone()
        if ids  # (carray refuses an empty array's buffer)
        else None
    )
    replaced = 0 if row is None else int(row[0])
    excess = total - replaced + incoming - cap
    if excess <= 0:
        return 0
    evicted = evict(connection, excess + int(cap * EVICTION_SLACK), keep={*ids, *keep})
    if stored_bytes(connection) - replaced + incoming > cap:
        # Entries alone could not make room: dictionaries trained without this cap (or
        # under a larger one) take more than their share; those no entry uses now go.
        drop_unused_dictionaries(connection, keep_newest=True)
    return evicted


#: Entries last used more than this far ahead of the clock are evicted first.
FUTURE_SLACK_MS = 86_400_000


def evict(connection: apsw.Connection, bytes_to_free: int, keep: set[int]) -> int:
    """Delete the least-recently-used entries not in `keep` until `bytes_to_free` stored
    bytes are freed (those last used more than `FUTURE_SLACK_MS` ahead of the clock
    first).

    The victims are chosen in batches along the LRU index and deleted by one statement.
    Returns how many entries were deleted.
    """
    victims: array[int] = array("q")
    freed = 0
    # Entries used "in the future" first: stamped while this host's clock was ahead (or by
    # one whose clock is), their age is unknown, and by their stamps they would outlive
    # everything used since.
    ahead = time.time_ns() // 1_000_000 + FUTURE_SLACK_MS
    cursor = connection.execute(
        f"SELECT id, stored_size FROM entries WHERE accessed_ms > ? AND {_LIVE_ENTRY} "
        "ORDER BY accessed_ms DESC, id",
        (ahead,),
    )
    try:
        for rowid, size in cursor:
            if freed >= bytes_to_free:
                break
            if rowid not in keep:
                victims.append(rowid)
                freed += size
    finally:
        cursor.close()
    early = set(victims)
    last: tuple[Any, ...] = (-(2**63), -(2**63))
    while freed < bytes_to_free:
        batch = connection.execute(
            "SELECT accessed_ms, id, stored_size FROM entries "
            f"WHERE (accessed_ms, id) > (?, ?) AND {_LIVE_ENTRY} "
            "ORDER BY accessed_ms, id LIMIT 256",
            last,
        ).fetchall()
        if not batch:
            break
        for accessed, rowid, size in batch:
            last = (accessed, rowid)
            if rowid in keep or rowid in early:
                continue
            assert isinstance(rowid, int) and isinstance(size, int)
            victims.append(rowid)
            freed += size
            if freed >= bytes_to_free:
                break
    if victims:
        _explain_sql.record_departures(connection, victims, "evicted")
        connection.execute("DELETE FROM entries WHERE id IN carray(?)", (apsw.carray(victims),))
        bump(connection, "evictions", len(victims))
    return len(victims)


def delete_entries(
    connection: apsw.Connection,
    entry_keys: list[bytes],
    now_ms: int,
    reason: str = "deleted",
) -> int:
    """Tombstone the live entries with these keys in one statement, noting `reason`
    ('deleted', or 'damaged' for a repair) and `now_ms` for the departure record; return
    how many."""
    ids = _tombstoned(
        connection.execute(
            "INSERT OR IGNORE INTO tombstones SELECT id FROM entries "
            f"WHERE id IN carray(?) AND entry_key IN carray(?) AND {_LIVE_ENTRY} RETURNING id",
            (apsw.carray(entry_ids_of(entry_keys)), apsw.carray(tuple(entry_keys))),
        )
    )
    _explain_sql.note_reasons(connection, ids, reason, now_ms)
    return len(ids)


def _tombstoned(cursor: apsw.Cursor) -> array[int]:
    """The row ids a tombstoning statement's RETURNING gives (those it tombstoned)."""
    return array("q", [rowid for (rowid,) in cursor])


def invalidate(
    connection: apsw.Connection, digests: list[bytes], fingerprint: DeviceFingerprint, now_ms: int
) -> int:
    """Tombstone a device's live entries of these checked program digests, written by
    digest or keyed, noting them as invalidated at `now_ms`; return how many."""
    ids = _tombstoned(
        connection.execute(
            "INSERT OR IGNORE INTO tombstones SELECT id FROM entries "
            "WHERE (id IN carray(?1) OR (key_version IS NOT NULL "
            "AND program_digest IS NOT NULL AND program_digest IN carray(?2) "
            f"AND vendor = ?3 AND device = ?4 AND driver_digest = ?5)) AND {_LIVE_ENTRY} "
            "RETURNING id",
            (
                apsw.carray(entry_ids_of(fingerprint.cache_keys(digests))),
                apsw.carray(tuple(digests)),
                fingerprint.vendor,
                fingerprint.device,
                fingerprint.driver_digest,
            ),
        )
    )
    _explain_sql.note_reasons(connection, ids, "invalidated", now_ms)
    return len(ids)


def purge(connection: apsw.Connection, limit: int = PURGE_BATCH, *, record: bool = True) -> int:
    """Delete up to `limit` tombstoned entries, their blobs and their tombstones; return
    how many tombstones were cleared (0: none left). The totals do not change: they
    stopped counting these entries when they were tombstoned. Their departures are
    recorded unless `record` is False (on a full disk, where the record gives way)."""
    ids = array(
        "q",
        (
            int(rowid)
            for (rowid,) in connection.execute(
                "SELECT id FROM tombstones ORDER BY id LIMIT ?", (limit,)
            )
        ),
    )
    if not ids:
        return 0
    if record:
        _explain_sql.record_tombstoned(connection, ids)
    # The entry first: its delete trigger skips the totals while the tombstone is there,
    # and the tombstone's trigger then finds no entry to count back.
    connection.execute("DELETE FROM entries WHERE id IN carray(?)", (apsw.carray(ids),))
    connection.execute("DELETE FROM blobs WHERE id IN carray(?)", (apsw.carray(ids),))
    connection.execute("DELETE FROM tombstones WHERE id IN carray(?)", (apsw.carray(ids),))
    return len(ids)


def tombstones(connection: apsw.Connection) -> int:
    """How many tombstoned entries wait for the purge."""
    row = connection.execute("SELECT count(*) FROM tombstones").fetchone()
    return 0 if row is None else int(row[0])


def drop(connection: apsw.Connection, entry_key: bytes) -> None:
    """Delete a damaged entry and count it as a checksum failure."""
    rowid = entry_id(entry_key)
    _explain_sql.record_departures(connection, (rowid,), "damaged")
    connection.execute("DELETE FROM entries WHERE id = ?", (rowid,))
    connection.execute("DELETE FROM blobs WHERE id = ?", (rowid,))
    bump(connection, "checksum_failures", 1)


def count_log_restart(connection: apsw.Connection) -> None:
    """Count a RESTART checkpoint in `meta` (`log_restarts`), in a commit of its own: the
    first write after the checkpoint, which starts the log over."""
    with connection:
        connection.execute(
            "INSERT INTO meta (name, value) VALUES ('log_restarts', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = min(value + 1, 1 << 62)"
        )


def bump(connection: apsw.Connection, name: str, count: int) -> None:
    """Add `count` to a counter (saturating: a counter never overflows into an error)."""
    connection.execute(_BUMP, (count, name))


def write_access(
    connection: apsw.Connection, touched: Mapping[int, int], misses: int, now_ms: int
) -> None:
    """Record access times and hit counts of row ids, and the hit and miss totals."""
    connection.executemany(
        f"UPDATE entries SET accessed_ms = ?1, hits = CASE WHEN hits > {_INT64_MAX} - ?2 "
        f"THEN {_INT64_MAX} ELSE hits + ?2 END WHERE id = ?3",
        [(now_ms, hits, rowid) for rowid, hits in touched.items()],
    )
    bump(connection, "hits", sum(touched.values()))
    bump(connection, "misses", misses)


def rowids(entry_keys: Iterable[bytes]) -> array[int]:
    """The row ids of entry keys, for carray."""
    return array("q", map(entry_id, entry_keys))


# -- compression: dictionaries, training, recompression ------------------------------------
#
# Dictionaries are rows of `dictionaries`, one scope (backend and device) each; a
# scope's current dictionary is its newest. Per scope, `meta` counts the writes since
# its last dictionary under `_WRITES` + the scope's name, and the trainings that gave
# none since (its blobs did not compress, or a dictionary did not help) under
# `_FAILURES` + the name: each failure multiplies the writes until the next attempt.

_WRITES = "dictionary_writes:"
_FAILURES = "dictionary_failures:"
#: The "entry key" a dictionary's checksum covers with its bytes.
_DICTIONARY_KEY = b"vyre-sqlcache dictionary"
_SCOPE = "backend IS ?1 AND vendor IS ?2 AND device IS ?3"


def _scope_params(scope: Scope) -> tuple[Any, ...]:
    return (scope.backend, scope.vendor, scope.device)


def load_dictionary(
    connection: apsw.Connection, dict_id: int, *, checksum: bytes | None = None
) -> Dictionary:
    """Dictionary `dict_id`, loaded once per process and file, its checksum checked.

    `checksum`: the row's, as the caller just read it. A dictionary loaded earlier under
    this id may be another file's: one deleted and made again at the path numbers its
    dictionaries from 1 again. Writes must never compress with it (every other process
    would fail to decode, and drop, what they wrote); reads find out by the frame's
    dictionary id or the entry's checksum. Raises _codec.DecodeError if it is missing or
    fails its checksum.
    """
    where = connection.filename
    cached = _codec.LOADED.get(where, dict_id)
    if cached is not None and (checksum is None or cached.checksum == checksum):
        return cached
    rows = connection.execute(
        "SELECT CAST(checksum_algo AS BLOB), checksum, data FROM dictionaries WHERE id = ?",
        (dict_id,),
    ).fetchall()
    if not rows:
        raise _codec.DecodeError(f"dictionary {dict_id} is missing")
    raw_algo, stored, data = rows[0]
    if not (
        isinstance(data, bytes)
        and isinstance(stored, bytes)
        and _checksums.matches(_text(raw_algo), stored, _DICTIONARY_KEY, data)
    ):
        raise _codec.DecodeError(f"dictionary {dict_id} fails its checksum")
    dictionary = Dictionary(dict_id, data, stored)
    _codec.LOADED.put(where, dictionary)
    return dictionary


def _newest_dictionary(
    connection: apsw.Connection, scope: Scope
) -> tuple[int | None, bytes | None, int]:
    """The id and checksum of the scope's newest dictionary (None: none) and how many it
    has."""
    row = connection.execute(
        f"SELECT id, checksum, (SELECT count(*) FROM dictionaries WHERE {_SCOPE}) "
        f"FROM dictionaries WHERE {_SCOPE} ORDER BY id DESC LIMIT 1",
        _scope_params(scope),
    ).fetchone()
    if row is None:
        return None, None, 0
    newest, checksum, count = row
    return int(newest), checksum if isinstance(checksum, bytes) else None, int(count)


@dataclass(frozen=True, slots=True)
class _ScopeState:
    """A scope's dictionaries: the current one (None: none, or the newest is damaged),
    the newest's id, and how many the scope has."""

    dictionary: Dictionary | None
    newest: int | None
    count: int


def _scope_state(connection: apsw.Connection, scope: Scope) -> _ScopeState:
    newest, checksum, count = _newest_dictionary(connection, scope)
    dictionary = None
    if newest is not None:
        try:
            dictionary = load_dictionary(connection, newest, checksum=checksum or b"")
        except _codec.DecodeError as error:
            log.warning("vyre-sqlcache: not compressing with %s", error)
    return _ScopeState(dictionary, newest, count)


def current_dictionary(connection: apsw.Connection, scope: Scope) -> Dictionary | None:
    """The dictionary new entries of `scope` are compressed with (None: none, or its
    newest is damaged: then the next write trains another)."""
    return _scope_state(connection, scope).dictionary


def _count_writes(
    connection: apsw.Connection,
    scope: Scope,
    count: int,
    state: _ScopeState,
    now_ms: int,
    cap: int | None = None,
    group: int = 0,
) -> bool:
    """Count `count` writes to `scope`; train its next dictionary when they are due (not
    under a `cap` too small for one: see `_codec.MIN_CAP_FOR_DICTIONARY`). Whether a
    dictionary was added."""
    name = _WRITES + scope.name
    row = connection.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2) "
        "ON CONFLICT (name) DO UPDATE SET value = min(value + ?2, 1 << 62) RETURNING value",
        (name, count),
    ).fetchone()
    writes = 0 if row is None else int(row[0])
    if cap is not None and cap < _codec.MIN_CAP_FOR_DICTIONARY:
        return False  # not even one fits the share: no training, no backoff
    if state.newest is not None and state.dictionary is None:
        due = _codec.TRAIN_AFTER  # the newest is damaged: replace it
    elif state.count <= _codec.RETRAINS:
        due = _codec.TRAIN_AFTER * _codec.RETRAIN_FACTOR**state.count
    else:
        return False
    if writes < due:
        return False
    # A scope of blobs that do not compress would otherwise pay a training (a read of
    # every sample, about 4 ms) every TRAIN_AFTER writes, for ever.
    failures_name = _FAILURES + scope.name
    failures = min(totals_value(connection, failures_name), _MAX_BACKOFF)
    if writes < due * _codec.RETRAIN_FACTOR**failures:
        return False
    # No room in the dictionaries' share of the cap counts as a training that gave none:
    # the next try waits as long (room may come as entries of other scopes leave).
    added = (
        dictionary_room(connection, cap, beside=group)
        and train_dictionary(connection, scope, now_ms) is not None
    )
    connection.execute("UPDATE meta SET value = 0 WHERE name = ?", (name,))
    if added:
        connection.execute("DELETE FROM meta WHERE name = ?", (failures_name,))
    else:
        connection.execute(
            "INSERT INTO meta (name, value) VALUES (?1, 1) "
            "ON CONFLICT (name) DO UPDATE SET value = min(value + 1, ?2)",
            (failures_name, _MAX_BACKOFF),
        )
    return added


#: Failed trainings beyond this do not lengthen the wait any more (8**6 x 32 writes).
_MAX_BACKOFF = 6


def train_dictionary(connection: apsw.Connection, scope: Scope, now_ms: int) -> int | None:
    """Train a dictionary on the scope's most recent entries and store it; its id, or
    None if zstd could not train one (too few or too small samples)."""
    rows = connection.execute(
        f"SELECT id, stored_size FROM entries WHERE {_SCOPE} AND {_LIVE_ENTRY} "
        "ORDER BY created_ms DESC, id DESC LIMIT ?4",
        (*_scope_params(scope), _codec.SAMPLE_ENTRIES),
    ).fetchall()
    chosen: list[int] = []
    budget = _codec.SAMPLE_STORED_BYTES
    for rowid, stored in rows:
        assert isinstance(stored, int)
        if stored <= budget:
            budget -= stored
            chosen.append(int(rowid))  # type: ignore[arg-type]
    # The quarter that `train` holds out is read first: samples that plain zstd cannot
    # shrink (random or already-compressed blobs) are then refused without reading the
    # other three quarters (22 ms of the 260 that 1,000 writes of 64 KiB took).
    held_out = _samples(connection, chosen[::4])
    if not _codec.compresses(held_out):
        return None
    rest = iter(_samples(connection, [rowid for i, rowid in enumerate(chosen) if i % 4]))
    samples: list[bytes] = []
    for sample in held_out:  # back in the order `train` splits
        samples.append(sample)
        samples.extend(islice(rest, 3))
    samples.extend(rest)
    data = _codec.train(samples)
    if data is None:
        return None
    algo = _checksums.DEFAULT
    connection.execute(
        "INSERT INTO dictionaries (backend, vendor, device, checksum_algo, checksum, data, "
        "samples, sample_bytes, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *_scope_params(scope),
            algo,
            _checksums.compute(algo, _DICTIONARY_KEY, data),
            data,
            len(samples),
            sum(map(len, samples)),
            now_ms,
        ),
    )
    dict_id = connection.last_insert_rowid()
    log.info(
        "vyre-sqlcache: trained dictionary %d for %s on %d entries",
        dict_id,
        scope.name,
        len(samples),
    )
    return dict_id


def _samples(connection: apsw.Connection, rowids: list[int]) -> list[bytes]:
    """The first `_codec.SAMPLE_PREFIX_BYTES` of each blob, in order (damaged ones left
    out: reads will drop them)."""
    samples: list[bytes] = []
    for rowid in rowids:
        blob = connection.execute(
            "SELECT codec, dict_id, data FROM blobs WHERE id = ?", (rowid,)
        ).fetchall()
        if not blob:
            continue
        codec, dict_id, data = blob[0]
        try:
            dictionary = None if dict_id is None else load_dictionary(connection, int(dict_id))
            sample = _codec.prefix(codec, data, dictionary, _codec.SAMPLE_PREFIX_BYTES)  # type: ignore[arg-type]
        except _codec.DecodeError:
            continue
        if sample:
            samples.append(sample)
    return samples


def scopes(connection: apsw.Connection) -> list[tuple[Scope, int]]:
    """Every scope that has entries, with how many."""
    rows = connection.execute(
        f"SELECT backend, vendor, device, count(*) FROM entries WHERE {_LIVE_ENTRY} "
        "GROUP BY backend, vendor, device"
    ).fetchall()
    return [(Scope(b, v, d), int(n)) for b, v, d, n in rows]  # type: ignore[arg-type]


def entry_ids(connection: apsw.Connection) -> list[int]:
    """Every entry's row id, in order."""
    return [
        int(rowid)
        for (rowid,) in connection.execute(
            f"SELECT id FROM entries WHERE {_LIVE_ENTRY} ORDER BY id"
        )
    ]


@dataclass
class Recompressed:
    """What `recompress` did to a batch of entries (sizes in stored bytes)."""

    rewritten: int = 0
    damaged: int = 0
    before: int = 0
    after: int = 0
    #: entries evicted because what was stored again no longer fitted the size cap
    evicted: int = 0
    #: entries left as they were: stored again, they would not have been smaller
    kept: int = 0


def recompress(
    connection: apsw.Connection, ids: Sequence[int], codec: Codec | None, into: Recompressed
) -> int:
    """Store the entries `ids` again as `codec` decides now, each with its scope's current
    dictionary, where that is smaller than what is stored (with no `codec`: raw, always);
    add what was done to `into` and return how many were rewritten. Entries that cannot be
    decoded or fail their checksum are left as they are (`into.damaged`)."""
    if codec is not None and not codec.enabled:
        codec = None
    current: dict[Scope, Dictionary | None] = {}
    rewritten = 0
    for rowid in ids:
        try:
            rows = connection.execute(
                "SELECT e.entry_key, e.backend, e.vendor, e.device, e.stored_size, "
                "b.checksum_algo, b.checksum, b.data, b.codec, b.dict_id, b.raw_size "
                "FROM entries AS e JOIN blobs AS b ON b.id = e.id WHERE e.id = ?",
                (rowid,),
            ).fetchall()
        except UnicodeDecodeError:
            into.damaged += 1  # text that is not UTF-8: `check --repair` drops the entry
            continue
        if not rows:
            continue
        key, backend, vendor, device, stored, algo, checksum, data, codec_name, dict_id, raw = rows[
            0
        ]
        try:
            blob = decode(connection, codec_name, dict_id, raw, data)  # type: ignore[arg-type]
        except _codec.Unavailable:
            raise  # not damage: the caller says what to install
        except _codec.DecodeError:
            into.damaged += 1
            continue
        if not _checksums.matches(str(algo), bytes(checksum), bytes(key), blob):  # type: ignore[arg-type]
            into.damaged += 1
            continue
        scope = Scope(backend, vendor, device)  # type: ignore[arg-type]
        if codec is not None and scope not in current:
            current[scope] = current_dictionary(connection, scope)
        encoded = Encoded(blob) if codec is None else codec.encode(blob, current[scope])
        if codec is not None and len(encoded.data) >= len(data):  # type: ignore[arg-type]
            # A dictionary trained on the newest entries may suit older kernels worse
            # than the one they were stored with (the corpus grew by a quarter).
            into.kept += 1
            continue
        connection.execute(
            "UPDATE blobs SET data = ?, codec = ?, dict_id = ?, raw_size = ? WHERE id = ?",
            (
                encoded.data,
                encoded.codec,
                encoded.dict_id,
                None if encoded.codec is None else len(blob),
                rowid,
            ),
        )
        connection.execute(
            "UPDATE entries SET stored_size = ? WHERE id = ?", (len(encoded.data), rowid)
        )
        rewritten += 1
        into.rewritten += 1
        into.before += stored if isinstance(stored, int) else 0
        into.after += len(encoded.data)
    return rewritten


def dictionary_room(connection: apsw.Connection, cap: int | None, beside: int = 0) -> bool:
    """Whether one more dictionary fits in the share of `cap` that dictionaries may take
    (`_codec.DICTIONARY_SHARE`), and beside the `beside` stored bytes of the group of
    writes just stored (which eviction keeps), once those no entry needs are deleted."""
    if cap is None:
        return True
    room = min(cap // _codec.DICTIONARY_SHARE, cap - beside) - _codec.DICTIONARY_BYTES
    if totals_value(connection, "dictionary_bytes") <= room:
        return True
    # (A scan of every blob's dictionary id: only when the share is full, and a scope
    # that finds no room waits as after a failed training.)
    drop_unused_dictionaries(connection, keep_newest=True)
    return totals_value(connection, "dictionary_bytes") <= room


def drop_unused_dictionaries(connection: apsw.Connection, *, keep_newest: bool) -> int:
    """Delete the dictionaries no blob uses (but, if `keep_newest`, the newest of each scope
    that has entries: its next writes use it); return how many."""
    newest = (
        "AND id NOT IN (SELECT max(d.id) FROM dictionaries AS d WHERE EXISTS "
        "(SELECT 1 FROM entries AS e WHERE e.backend IS d.backend AND e.vendor IS d.vendor "
        f"AND e.device IS d.device AND e.{_LIVE_ENTRY}) GROUP BY d.backend, d.vendor, d.device)"
    )
    connection.execute(
        "DELETE FROM dictionaries WHERE id NOT IN "
        f"(SELECT dict_id FROM blobs WHERE dict_id IS NOT NULL) {newest if keep_newest else ''}"
    )
    return connection.changes()


def reset_dictionary_writes(connection: apsw.Connection) -> None:
    """Start every scope's count of writes towards its next dictionary again."""
    connection.execute("UPDATE meta SET value = 0 WHERE name LIKE ?", (_WRITES + "%",))
    connection.execute("DELETE FROM meta WHERE name LIKE ?", (_FAILURES + "%",))


# -- compressed blob rows for `check` and its rebuild --------------------------------------

#: The `meta` totals that triggers keep (a copy of a file must not set them).
TRIGGER_TOTALS = ("entries", "blob_bytes", "stored_bytes", "dictionary_bytes")


def decoded_blob(
    connection: apsw.Connection,
    codec: str | None,
    dict_id: int | None,
    raw_size: int | None,
    data: bytes,
) -> bytes | None:
    """The caller's bytes of a blob row as stored, or None if it cannot be decoded (a
    damaged frame or dictionary): for `check`. Raises _codec.Unavailable for a
    compressed blob without zstandard installed (it cannot be checked, nor is it damaged)."""
    try:
        return decode(connection, codec, dict_id, raw_size, data)
    except _codec.Unavailable:
        raise
    except _codec.DecodeError:
        return None


def copy_dictionaries(source: apsw.Connection, target: apsw.Connection) -> int:
    """Copy the dictionaries that can be read, ids kept, before a rebuild copies the
    blobs that use them; return how many."""
    copied = 0
    try:
        rows = source.execute("SELECT * FROM dictionaries ORDER BY id").fetchall()
    except (apsw.CorruptError, apsw.NotADBError, apsw.IOError):
        return 0
    for row in rows:
        marks = ", ".join("?" * len(row))
        try:
            target.execute(f"INSERT INTO dictionaries VALUES ({marks})", row)
            copied += 1
        except apsw.ConstraintError:
            continue
    return copied


# -- inspection and maintenance (used by the command line) ---------------------------------
#
# Listings read the `pipelines_v` and `stats_v` views; `check` and its rebuild read
# rows one at a time so that a damaged page loses only what is on it.

#: `PipelineCache.entries(sort=...)` names and the `pipelines_v` column each sorts by,
#: largest (or newest) first.
ENTRY_SORTS: dict[str, str] = {
    "size": "blob_size",
    "created": "created_ms",
    "accessed": "accessed_ms",
    "hits": "hits",
}
#: `pipelines_v.kind` values.
ENTRY_KINDS = ("keyed", "program", "imported", "named")


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """Which entries a listing is about; every field given must match (None: any)."""

    backend: str | None = None
    vendor: int | None = None
    device: int | None = None
    #: every bit of this mask must be set in the entry's feature flags
    flags: int = 0
    min_size: int | None = None
    created_before_ms: int | None = None
    key_version: int | None = None
    kind: str | None = None
    #: lowercase hex program digests
    program_digests: tuple[str, ...] | None = None
    #: lowercase hex entry keys
    entry_keys: tuple[str, ...] | None = None
    #: named entries of this namespace only (`PipelineCache.put_named`)
    namespace: str | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause over `pipelines_v` ('' for every entry) and its parameters."""
        terms: list[str] = []
        params: dict[str, Any] = {}
        simple: tuple[tuple[str, Any, str], ...] = (
            ("backend", self.backend, "backend = :backend"),
            ("vendor", self.vendor, "vendor = :vendor"),
            ("device", self.device, "device = :device"),
            ("min_size", self.min_size, "blob_size >= :min_size"),
            ("before", self.created_before_ms, "created_ms < :before"),
            ("key_version", self.key_version, "key_version = :key_version"),
            ("kind", self.kind, "kind = :kind"),
            ("namespace", self.namespace, "namespace = :namespace"),
        )
        for name, value, term in simple:
            if value is not None:
                terms.append(term)
                params[name] = value
        if self.flags:
            terms.append("feature_bits & :flags = :flags")
            params["flags"] = self.flags
        for name, values, column in (
            ("digests", self.program_digests, "program_digest"),
            ("keys", self.entry_keys, "entry_key"),
        ):
            if values is not None:
                terms.append(f"{column} IN carray(:{name})")
                # carray refuses an empty array: one value no column can hold matches nothing
                params[name] = apsw.carray(values or ("",))
        return (f"WHERE {' AND '.join(terms)}" if terms else ""), params


def list_entries(
    connection: apsw.Connection,
    entry_filter: EntryFilter,
    *,
    sort: str = "created",
    reverse: bool = False,
    limit: int | None = None,
    after: tuple[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of `pipelines_v` that match, largest/newest first (`reverse`: the other way),
    ties by entry key.

    `after`: the (sort column, entry_key) of the last row of the previous page; only the
    rows after it in this order are listed (keyset pagination: every sort column is NOT
    NULL, and (column, entry_key) is unique).
    """
    where, params = entry_filter.where()
    column = ENTRY_SORTS[sort]
    order = "ASC" if reverse else "DESC"
    if after is not None:
        beyond = ">" if reverse else "<"
        page = (
            f"({column} {beyond} :after_value "
            f"OR ({column} = :after_value AND entry_key > :after_key))"
        )
        where = f"{where} AND {page}" if where else f"WHERE {page}"
        params["after_value"], params["after_key"] = after
    sql = f"SELECT * FROM pipelines_v {where} ORDER BY {column} {order}, entry_key"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    return _explain_sql.dicts(connection.execute(sql, params))


def device_totals(connection: apsw.Connection) -> list[dict[str, Any]]:
    """Rows of `stats_v`, most bytes first."""
    return _explain_sql.dicts(
        connection.execute("SELECT * FROM stats_v ORDER BY bytes DESC, backend, vendor")
    )


class WriteRefused(Exception):
    """`run_query` was given a statement that would write; nothing of it ran."""

    def __init__(self, statement: str) -> None:
        super().__init__(statement)
        self.statement = statement


@dataclass(frozen=True, slots=True)
class QueryResult:
    """The rows of one statement of `PipelineCache.query`, with its column names."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_query(connection: apsw.Connection, sql: str) -> list[QueryResult]:
    """Run `sql` (one or more statements); return the rows of each that has columns.

    Before each statement runs, one that would write (or attach another file) raises
    WriteRefused. Raises apsw errors for SQL that SQLite rejects.
    """
    results: list[QueryResult] = []
    for row in _read_only_rows(connection, sql, lambda c: results.append(QueryResult(c, []))):
        results[-1].rows.append(row)
    return [result for result in results if result.columns]


def iter_query(
    connection: apsw.Connection, sql: str
) -> Iterable[tuple[list[str], tuple[Any, ...]]]:
    """Run `sql` (one or more statements) as `run_query` does, yielding `(columns, row)`
    for each row as SQLite steps to it: nothing is collected.

    The statement (and so a read transaction) stays open until the generator is exhausted
    or closed; the caller gives it a connection of its own. Raises as `run_query`.
    """
    columns: list[str] = []

    def started(names: list[str]) -> None:
        nonlocal columns
        columns = names

    for row in _read_only_rows(connection, sql, started):
        yield columns, row


#: Pragmas whose argument names what to read, not a value to set.
_PRAGMAS_READ_WITH_AN_ARGUMENT = frozenset(
    {
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)


def _read_only_rows(
    connection: apsw.Connection, sql: str, started: Callable[[list[str]], object]
) -> Iterator[tuple[Any, ...]]:
    """The rows of `sql`, refusing (WriteRefused) any statement that would write, ATTACH,
    DETACH and a pragma given a value before it runs; `started(columns)` is called as each
    statement begins."""

    def before_each(cursor: apsw.Cursor, statement: str, bindings: Any) -> bool:
        if not cursor.is_readonly:
            raise WriteRefused(statement)
        try:
            columns = [name for name, _ in cursor.get_description()]
        except apsw.ExecutionCompleteError:
            columns = []
        started(columns)
        return True

    def authorize(operation: int, *names: str | None) -> int:
        # SQLite counts ATTACH as reading, but it creates the file it names; and a pragma
        # given a value as reading, but it changes the connection, which the cache writes
        # through (query_only, locking_mode, busy_timeout...).
        if operation in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH) or (
            operation == apsw.SQLITE_PRAGMA
            and names[1] is not None
            and str(names[0]).lower() not in _PRAGMAS_READ_WITH_AN_ARGUMENT
        ):
            raise WriteRefused(sql)
        return apsw.SQLITE_OK

    previous = connection.authorizer
    connection.authorizer = authorize
    cursor = connection.cursor()
    cursor.exec_trace = before_each
    try:
        for row in cursor.execute(sql):
            yield tuple(row)
    finally:
        cursor.close(True)
        connection.authorizer = previous


def recount_totals(connection: apsw.Connection) -> None:
    """Set the totals the triggers keep in `meta` (live entries, their sizes as written
    and as stored) from the entries themselves."""
    connection.execute(
        "INSERT OR REPLACE INTO meta (name, value) "
        f"SELECT 'entries', count(*) FROM entries WHERE {_LIVE_ENTRY} "
        "UNION ALL SELECT 'blob_bytes', coalesce(sum(blob_size), 0) FROM entries "
        f"WHERE {_LIVE_ENTRY} "
        "UNION ALL SELECT 'stored_bytes', coalesce(sum(stored_size), 0) FROM entries "
        f"WHERE {_LIVE_ENTRY}"
    )


def wrong_totals(connection: apsw.Connection) -> list[str]:
    """The totals the triggers keep in `meta` that differ from a count of the live
    entries, each as 'name: recorded N, counted M' (call in a read transaction)."""
    row = connection.execute(
        "SELECT count(*), coalesce(sum(blob_size), 0), coalesce(sum(stored_size), 0) "
        f"FROM entries WHERE {_LIVE_ENTRY}"
    ).fetchone()
    assert row is not None
    recorded = totals(connection)
    return [
        f"{name}: recorded {recorded.get(name, 'nothing')}, counted {count}"
        for name, count in zip(("entries", "blob_bytes", "stored_bytes"), row, strict=True)
        if recorded.get(name) != count
    ]


def stray_blobs(connection: apsw.Connection, candidates: Sequence[int]) -> list[int]:
    """The row ids among `candidates` of blobs that have no entry."""
    rows = connection.execute(
        "SELECT id FROM blobs WHERE id IN carray(?) AND id NOT IN (SELECT id FROM entries)",
        (apsw.carray(array("q", candidates)),),
    )
    return [int(rowid) for (rowid,) in rows]


def correct_records(
    connection: apsw.Connection, sizes: Sequence[tuple[int, int]], stray_blobs: Sequence[int]
) -> None:
    """Set the recorded size of entries (row id, size of their right bytes), delete blobs
    that still have no entry, and recount the totals in `meta`."""
    connection.executemany(
        f"UPDATE entries SET blob_size = ?2 WHERE id = ?1 AND {_LIVE_ENTRY}", sizes
    )
    if stray_blobs:
        connection.execute(
            "DELETE FROM blobs WHERE id IN carray(?) AND id NOT IN (SELECT id FROM entries)",
            (apsw.carray(array("q", stray_blobs)),),
        )
    recount_totals(connection)


def delete_rows(connection: apsw.Connection, ids: Sequence[int], now_ms: int, reason: str) -> int:
    """Tombstone the live entries with these row ids (whatever their keys), noting
    `reason`; return how many."""
    if not ids:
        return 0
    rowids = _tombstoned(
        connection.execute(
            f"INSERT OR IGNORE INTO tombstones SELECT id FROM entries "
            f"WHERE id IN carray(?) AND {_LIVE_ENTRY} RETURNING id",
            (apsw.carray(array("q", ids)),),
        )
    )
    _explain_sql.note_reasons(connection, rowids, reason, now_ms)
    return len(rowids)


def integrity_check(connection: apsw.Connection) -> list[str]:
    """SQLite's `PRAGMA integrity_check` answer: ['ok'] for a sound file."""
    try:
        return [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    except (apsw.CorruptError, apsw.NotADBError) as error:
        return [f"integrity_check stopped: {error}"]


@dataclass(frozen=True, slots=True)
class Listed:
    """An entry as `PipelineCache.iter_keys` lists it."""

    rowid: int
    #: the entry key, lower-case hex
    entry_key: str
    #: 'keyed', 'named', or 'program' (stored by program digest, or imported)
    kind: str
    created_ms: int


def export_page(connection: apsw.Connection, after: int | None, limit: int) -> list[Listed]:
    """Up to `limit` live entries in row id order, after row `after` (None: from the
    first). Keyset pagination on the primary key: reading or rewriting an entry does not
    move it, so an entry that stays is listed exactly once."""
    columns = (
        "SELECT id, lower(hex(entry_key)), namespace IS NOT NULL, key_version IS NOT NULL, "
        "created_ms FROM entries"
    )
    if after is None:
        rows = connection.execute(f"{columns} WHERE {_LIVE_ENTRY} ORDER BY id LIMIT ?", (limit,))
    else:
        rows = connection.execute(
            f"{columns} WHERE id > ? AND {_LIVE_ENTRY} ORDER BY id LIMIT ?", (after, limit)
        )
    return [
        Listed(int(i), str(k), "named" if named else "keyed" if keyed else "program", int(c))
        for i, k, named, keyed, c in rows
    ]


def live_ids(connection: apsw.Connection, ids: Iterable[int] | None, since_ms: int) -> list[int]:
    """The row ids of live entries among `ids`, or (`ids` None) of those created from
    `since_ms` on."""
    if ids is None:
        rows = connection.execute(
            f"SELECT id FROM entries WHERE created_ms >= ? AND {_LIVE_ENTRY}", (since_ms,)
        )
    else:
        wanted = array("q", ids)
        if not wanted:
            return []
        rows = connection.execute(
            f"SELECT id FROM entries WHERE id IN carray(?) AND {_LIVE_ENTRY}",
            (apsw.carray(wanted),),
        )
    return [int(rowid) for (rowid,) in rows]


def readable_ids(connection: apsw.Connection) -> tuple[list[int], bool]:
    """The row ids of live entries that can be found, and whether every scan ran to its
    end.

    On a damaged file a scan stops at the first bad page: the table, its LRU index and
    the blob table are each scanned, and what any of them found before stopping counts.
    Tombstoned entries are left out (they are neither checked nor copied by a rebuild).
    """
    found: set[int] = set()
    complete = True
    dead: set[int] = set()
    try:
        dead.update(int(rowid) for (rowid,) in connection.execute("SELECT id FROM tombstones"))
    except (apsw.CorruptError, apsw.NotADBError, apsw.IOError):
        complete = False
    for sql in (
        "SELECT id FROM entries",
        "SELECT id FROM entries INDEXED BY entries_lru WHERE accessed_ms IS NOT NULL",
        "SELECT id FROM blobs",
    ):
        try:
            for (rowid,) in connection.execute(sql):
                found.add(int(rowid))
        except (apsw.CorruptError, apsw.NotADBError, apsw.IOError):
            complete = False
    return sorted(found - dead), complete


@dataclass(frozen=True, slots=True)
class RawEntry:
    """An entry's row and its blob row, as stored (columns in table order)."""

    entry: tuple[Any, ...]
    #: (id, checksum_algo, checksum, data, codec, dict_id, raw_size), as stored
    blob: tuple[Any, ...] | None
    blob_size: int
    #: the caller's bytes, decoded from `blob` (None: no blob, or it cannot be decoded)
    decoded: bytes | None = None

    @property
    def entry_key(self) -> bytes:
        return bytes(self.entry[1])

    def sound(self) -> bool | None:
        """Whether the blob is there and matches its checksum and the entry (None: no blob)."""
        fault = self.fault()
        return None if fault == "no blob" else fault is None

    def fault(self) -> str | None:
        """What is wrong with the entry, or None: 'no blob'; 'bytes' (they fail their
        checksum, or cannot be decoded); 'place' (its row id is not its key's: reads do
        not find it there); 'size' (only its recorded size differs from its bytes, which
        are right)."""
        if self.blob is None:
            return "no blob"
        rowid, algo, checksum, *_ = self.blob
        data = self.decoded
        key = self.entry_key
        if data is None or not _checksums.matches(str(algo), bytes(checksum), key, data):
            return "bytes"
        if not rowid == self.entry[0] == entry_id(key):
            return "place"
        if len(data) != self.blob_size:
            return "size"
        return None


class DamagedText(apsw.CorruptError):
    """A row holding text that is not UTF-8: damage that SQLite's integrity_check does not
    see and that apsw cannot read. `entry_key` names the entry where it can be read."""

    def __init__(self, rowid: int, entry_key: bytes | None) -> None:
        super().__init__(f"entry {rowid} holds text that is not UTF-8 (damaged)")
        self.entry_key = entry_key


def raw_entry(connection: apsw.Connection, rowid: int) -> RawEntry | None:
    """The entry with this row id and its blob as stored, or None if there is no entry.

    Raises apsw errors where a page on the way is damaged (DamagedText for text that is
    not UTF-8), _codec.Unavailable for a compressed blob without zstandard installed.
    """
    try:
        entry = connection.execute(
            "SELECT blob_size, * FROM entries WHERE id = ?", (rowid,)
        ).fetchall()
        if not entry:
            return None
        blob = connection.execute(
            "SELECT id, checksum_algo, checksum, data, codec, dict_id, raw_size FROM blobs "
            "WHERE id = ?",
            (rowid,),
        ).fetchall()
    except UnicodeDecodeError as error:
        raise DamagedText(rowid, _entry_key_of(connection, rowid)) from error
    size, *row = entry[0]
    decoded = None
    if blob:
        _, _, _, data, codec, dict_id, raw_size = blob[0]
        decoded = decoded_blob(connection, codec, dict_id, raw_size, bytes(data))  # type: ignore[arg-type]
    return RawEntry(tuple(row), tuple(blob[0]) if blob else None, int(size), decoded)  # type: ignore[arg-type]


def _entry_key_of(connection: apsw.Connection, rowid: int) -> bytes | None:
    """The entry key of row `rowid` (a blob: readable whatever its text holds), or None."""
    try:
        row = connection.execute("SELECT entry_key FROM entries WHERE id = ?", (rowid,)).fetchone()
    except apsw.Error:
        return None
    key = None if row is None else row[0]
    return bytes(key) if isinstance(key, bytes) and len(key) == 32 else None


def insert_raw(connection: apsw.Connection, raw: RawEntry) -> None:
    """Insert an entry and its blob exactly as they were stored elsewhere."""
    marks = ", ".join("?" * len(raw.entry))
    connection.execute(f"INSERT INTO entries VALUES ({marks})", raw.entry)
    connection.execute(
        "INSERT INTO blobs (id, checksum_algo, checksum, data, codec, dict_id, raw_size) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        raw.blob,
    )


def readable_meta(connection: apsw.Connection) -> dict[str, int]:
    """The counters and settings of `meta` that can be read ({} if none can)."""
    try:
        return totals(connection)
    except (apsw.CorruptError, apsw.NotADBError, apsw.IOError):
        return {}


def restore_meta(connection: apsw.Connection, values: Mapping[str, int]) -> None:
    """Set counters and settings, except the totals the triggers keep."""
    connection.executemany(
        "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
        [(n, v) for n, v in values.items() if n not in TRIGGER_TOTALS],
    )


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `PipelineCache.check` found, and what its repair did.

    `integrity` is SQLite's `integrity_check` answer (['ok'] for a sound file);
    `damaged` and `missing_blob` list hex entry keys; `unreadable` counts entries on
    damaged pages. A repair drops bad entries from a sound file (`dropped`), or
    rebuilds a damaged file from its readable, checksum-verified entries (`rebuilt`:
    `kept` of them, `integrity_after` the new file's answer).
    """

    integrity: tuple[str, ...]
    checked: int = 0
    damaged: tuple[str, ...] = ()
    missing_blob: tuple[str, ...] = ()
    unreadable: int = 0
    dropped: int = 0
    rebuilt: bool = False
    kept: int = 0
    integrity_after: tuple[str, ...] | None = None
    #: hex keys of entries whose bytes are right but whose recorded size is not theirs
    wrong_size: tuple[str, ...] = ()
    #: blobs without an entry (no read reaches them; their space is never freed)
    stray_blobs: int = 0
    #: the totals in `meta` that differ from the entries (the size cap counts them),
    #: each as 'name: recorded N, counted M'
    wrong_totals: tuple[str, ...] = ()
    #: whether the repair corrected `wrong_size`, `stray_blobs` and `wrong_totals`
    corrected: bool = False

    @property
    def sound_file(self) -> bool:
        """Whether SQLite found the file's structure sound."""
        return self.integrity == ("ok",)

    @property
    def bad_entries(self) -> tuple[str, ...]:
        """Hex keys of the entries whose bytes are wrong or missing."""
        return self.damaged + self.missing_blob

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong now: a sound file whose bad entries (if any) were
        dropped, or a damaged file rebuilt into a sound one."""
        if self.rebuilt:
            return self.integrity_after == ("ok",)
        return (
            self.sound_file
            and self.unreadable == 0
            and len(self.bad_entries) == self.dropped
            and (self.corrected or not self.has_wrong_records)
        )

    @property
    def has_wrong_records(self) -> bool:
        """Whether records are wrong around right bytes: sizes, stray blobs, totals."""
        return bool(self.wrong_size or self.stray_blobs or self.wrong_totals)
