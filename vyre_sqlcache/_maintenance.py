"""Inspection and maintenance of a cache, for the command line and for people: listing
entries, read-only SQL, checking and rebuilding a damaged file, compacting, copying.

`CacheMaintenance` is a part of `PipelineCache` kept in its own module: the
everyday path (open, write, read, flush, close) stays in `cache.py`. On a cache
opened with readonly=True these methods read without writing anything: no
migration, no hits or access times, no marker files.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import apsw

from . import _codec, _combine, _layers, _rows
from ._cachefile import SIDE_FILES, cache_part, move_aside, needs_check_marker, os_name
from ._checkpointer import compact_shortfall
from ._connections import (
    READ_ERRORS,
    ConnectionPool,
    Slot,
    connect,
    retry_busy,
    transaction,
    translate,
    vacuum,
    waiter_of,
)
from ._writer import WriteBehind
from .config import DEFAULT_MAX_BYTES, expand_home
from .errors import (
    CacheError,
    CacheFullError,
    CorruptCacheError,
    ReadOnlyCacheError,
    SchemaTooNewError,
)
from .keys import MAX_NAMESPACE_CHARS, check_text, check_u32, coerce_digest

#: The faults of `RawEntry.fault` for which a repair drops an entry.
_BAD_FAULTS = frozenset({"no blob", "bytes", "place"})


def _fault_now(connection: apsw.Connection, rowid: int) -> tuple[str | None, int | None]:
    """What is wrong with the entry of this row id now (`RawEntry.fault`, None if nothing
    or no entry; "unreadable" where it cannot be read: left alone) and the size of its
    right bytes."""
    try:
        raw = _rows.raw_entry(connection, rowid)
    except _rows.DamagedText:
        return "bytes", None
    except (apsw.Error, _codec.Unavailable):
        return "unreadable", None
    if raw is None:
        return None, None
    return raw.fault(), None if raw.decoded is None else len(raw.decoded)


#: How long `compact` tries to truncate the log while other checkpoints copy it.
COMPACT_TRUNCATE_WAIT_S = 5.0
#: What reading a damaged page raises.
DAMAGE_ERRORS = (apsw.CorruptError, apsw.NotADBError, apsw.IOError, UnicodeDecodeError)

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = ["CacheMaintenance"]

log = logging.getLogger("vyre_sqlcache")
T = TypeVar("T")


class CacheMaintenance:
    """The inspection and maintenance methods of `PipelineCache` (see there)."""

    if TYPE_CHECKING:
        _path: Path
        _readonly: bool
        _pool: ConnectionPool
        _writer: WriteBehind
        _file: Any

        @property
        def disabled(self) -> bool: ...

        def delete_entries(self, entry_keys: Iterable[bytes | str]) -> int: ...

        def _delete(self, keys: list[bytes], found: list[_layers.Found]) -> int: ...

        def _refuse_write(self) -> None: ...

        def _masks(self, cursor: apsw.Cursor | None) -> Callable[[bytes, bytes], bool]: ...

        _layers: _layers.Layers

        def _read(
            self,
            what: str,
            run: Callable[[apsw.Connection], T],
            failed: Callable[[apsw.Error, apsw.Connection], CacheError] | None = None,
        ) -> T: ...

        def _change(self, what: str, run: Callable[[apsw.Connection], int]) -> int: ...

        def _call(self) -> AbstractContextManager[Slot]: ...

        @staticmethod
        def _truncate_log(connection: apsw.Connection) -> None: ...

        def _connect(self, mmap: bool) -> apsw.Connection: ...

        _cap: int | None
        _codec: _codec.Codec
        _books: Any

        def _change(self, what: str, run: Callable[[apsw.Connection], int]) -> int: ...

        def _settle_cap(self, connection: apsw.Connection) -> None: ...

    # -- inspection and maintenance (used by the command line) --------------------------
    #
    # On a cache opened with readonly=True these read without writing anything: no
    # migration, no hits or access times, no marker files.

    #: The `sort` names of `entries()`: largest, newest, most recently used, most hit.
    ENTRY_SORTS: Final[tuple[str, ...]] = tuple(_rows.ENTRY_SORTS)
    #: The `kind` names of `entries()`: stored by PipelineCacheKey, by program digest
    #: (`write`), or by bare entry key (`put_entry`, a vyre directory import).
    ENTRY_KINDS: Final[tuple[str, ...]] = _rows.ENTRY_KINDS

    @staticmethod
    def sqlite_version() -> str:
        """The version of the SQLite library the cache runs on."""
        return str(apsw.sqlite_lib_version())

    def schema_version(self) -> int:
        """The schema version of the file (`PRAGMA user_version`)."""
        from ._schema import schema_version

        self._before_inspection()
        return self._read("reading the schema version", schema_version)

    def file_max_bytes(self) -> int | None:
        """The size cap kept in the file, which every process that sets none of its own
        applies (the default where none was ever stored; None: no cap). `max_bytes` is the
        cap this object applies, which an argument or the environment may override."""
        self._before_inspection()
        stored = self._read("reading the size cap", lambda c: _rows.setting(c, _rows.CAP_SETTING))
        if stored is None:
            return DEFAULT_MAX_BYTES
        return stored or None

    #: Rows per page of `iter_entries`: each page is read in its own short transaction.
    ENTRY_PAGE: Final[int] = 1000

    def entries(
        self,
        *,
        backend: str | None = None,
        vendor: int | None = None,
        device: int | None = None,
        flags: int = 0,
        min_size: int | None = None,
        created_before_ms: int | None = None,
        key_version: int | None = None,
        kind: str | None = None,
        program_digests: Iterable[bytes | str] | None = None,
        entry_keys: Iterable[bytes | str] | None = None,
        sort: str = "created",
        reverse: bool = False,
        limit: int | None = None,
        namespace: str | None = None,
    ) -> list[dict[str, Any]]:
        """The entries that match every filter given, as rows of the `pipelines_v` view
        (hashes in lowercase hex), largest/newest first by `sort` (`reverse`: the other
        way; ties by entry key), at most `limit`. Counts no hit and changes nothing.

        `flags`: every bit must be set; `min_size`: blob bytes; `created_before_ms`:
        milliseconds since the epoch; `kind`: one of `ENTRY_KINDS`; `namespace`: named
        entries of that namespace only (`put_named`). Raises
        TypeError/ValueError naming a bad argument. The whole list is in memory at once:
        `iter_entries` lists a large cache page by page.
        """
        entry_filter, limit = self._listing(
            backend,
            vendor,
            device,
            flags,
            min_size,
            created_before_ms,
            key_version,
            kind,
            program_digests,
            entry_keys,
            sort,
            limit,
            namespace=namespace,
        )
        return self._read(
            "listing entries",
            lambda c: _rows.list_entries(c, entry_filter, sort=sort, reverse=reverse, limit=limit),
        )

    def iter_entries(
        self,
        *,
        backend: str | None = None,
        vendor: int | None = None,
        device: int | None = None,
        flags: int = 0,
        min_size: int | None = None,
        created_before_ms: int | None = None,
        key_version: int | None = None,
        kind: str | None = None,
        program_digests: Iterable[bytes | str] | None = None,
        entry_keys: Iterable[bytes | str] | None = None,
        sort: str = "created",
        reverse: bool = False,
        limit: int | None = None,
        page: int = ENTRY_PAGE,
        namespace: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The rows of `entries()` with the same arguments, in the same order, read `page`
        rows at a time: memory stays bounded however many entries there are.

        Each page is read in its own short read transaction (keyset pagination on the
        sort column and the entry key), so an iterator left unfinished holds no
        transaction and no lock. An entry changed by another writer between two pages
        may be listed in its old or its new place, twice or not at all; entries that do
        not change are listed exactly once. Arguments are checked at the call, before
        the first row is read.
        """
        entry_filter, limit = self._listing(
            backend,
            vendor,
            device,
            flags,
            min_size,
            created_before_ms,
            key_version,
            kind,
            program_digests,
            entry_keys,
            sort,
            limit,
            namespace=namespace,
        )
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ValueError(f"page must be a whole number of rows above 0, got {page!r}")
        column = _rows.ENTRY_SORTS[sort]

        def pages() -> Iterator[dict[str, Any]]:
            after: tuple[int, str] | None = None
            left = limit
            while left is None or left > 0:
                size = page if left is None else min(page, left)

                def read(
                    c: apsw.Connection, size: int = size, after: tuple[int, str] | None = after
                ) -> list[dict[str, Any]]:
                    return _rows.list_entries(
                        c, entry_filter, sort=sort, reverse=reverse, limit=size, after=after
                    )

                rows = self._read("listing entries", read)
                yield from rows
                if len(rows) < size:
                    return
                if left is not None:
                    left -= len(rows)
                last = rows[-1]
                after = (int(last[column]), str(last["entry_key"]))

        return pages()

    def iter_keys(self, *, page: int = ENTRY_PAGE) -> Iterator[_rows.Listed]:
        """Every entry once, as (`entry_key` hex, `kind`, `created_ms`), in the file's own
        order, `page` to a short read transaction: the cheapest listing, and one that
        reads or rewrites by other processes meanwhile do not disturb (an entry read
        meanwhile moves in the orders by access of `iter_entries`). Raises ValueError
        for a bad `page`, CacheError types if reading fails."""
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ValueError(f"page must be a whole number of rows above 0, got {page!r}")
        self._before_inspection()

        def pages() -> Iterator[_rows.Listed]:
            after: int | None = None
            while True:

                def read(c: apsw.Connection, after: int | None = after) -> list[_rows.Listed]:
                    return _rows.export_page(c, after, page)

                rows = self._read("listing entries", read)
                yield from rows
                if len(rows) < page:
                    return
                after = rows[-1].rowid

        return pages()

    def delete_where(
        self,
        *,
        backend: str | None = None,
        vendor: int | None = None,
        device: int | None = None,
        flags: int = 0,
        min_size: int | None = None,
        created_before_ms: int | None = None,
        key_version: int | None = None,
        kind: str | None = None,
        program_digests: Iterable[bytes | str] | None = None,
        namespace: str | None = None,
        everything: bool = False,
    ) -> int:
        """Delete every entry that matches all the filters given (those of `entries()`),
        in the user's file and, hidden for this user as `delete_entries` hides them, in
        its layers; return how many distinct entries went.

        Raises ValueError if no filter is given and `everything` is False,
        TypeError/ValueError naming a bad filter, ReadOnlyCacheError on a read-only cache.
        """
        entry_filter, _ = self._listing(
            backend, vendor, device, flags, min_size, created_before_ms, key_version, kind,
            program_digests, None, "created", None, namespace=namespace,
        )  # fmt: skip
        if self._readonly:
            self._refuse_write()  # also where nothing matches
        if entry_filter == _rows.EntryFilter() and not everything:
            raise ValueError(
                "no filter given: pass one (backend=, vendor=, ...), or everything=True to "
                "delete every entry"
            )
        keys = self._read(
            "listing entries",
            lambda c: [
                bytes.fromhex(row["entry_key"]) for row in _rows.list_entries(c, entry_filter)
            ],
        )
        found = []
        if self._layers:
            found = self._layers.matching(entry_filter) + self._layers.with_keys(keys)
        return self._delete(keys, found) if keys or found else 0

    def _listing(
        self,
        backend: str | None,
        vendor: int | None,
        device: int | None,
        flags: int,
        min_size: int | None,
        created_before_ms: int | None,
        key_version: int | None,
        kind: str | None,
        program_digests: Iterable[bytes | str] | None,
        entry_keys: Iterable[bytes | str] | None,
        sort: str,
        limit: int | None,
        *,
        namespace: str | None = None,
    ) -> tuple[_rows.EntryFilter, int | None]:
        """The checked filter and limit of `entries()` and `iter_entries()`."""
        self._before_inspection()
        if sort not in _rows.ENTRY_SORTS:
            raise ValueError(f"sort must be one of {', '.join(_rows.ENTRY_SORTS)}, got {sort!r}")
        if kind is not None and kind not in _rows.ENTRY_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_rows.ENTRY_KINDS)}, got {kind!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")

        def u32(name: str, value: int | None) -> int | None:
            return None if value is None else check_u32(name, value)

        def hexes(name: str, values: Iterable[bytes | str] | None) -> tuple[str, ...] | None:
            if values is None:
                return None
            return tuple(coerce_digest(f"{name}[{i}]", v).hex() for i, v in enumerate(values))

        entry_filter = _rows.EntryFilter(
            backend=backend,
            vendor=u32("vendor", vendor),
            device=u32("device", device),
            flags=check_u32("flags", flags),
            min_size=self._int64("min_size", min_size, low=0),
            created_before_ms=self._int64("created_before_ms", created_before_ms),
            key_version=u32("key_version", key_version),
            kind=kind,
            program_digests=hexes("program_digests", program_digests),
            entry_keys=hexes("entry_keys", entry_keys),
            namespace=None
            if namespace is None
            else check_text("namespace", namespace, MAX_NAMESPACE_CHARS),
        )
        return entry_filter, self._int64("limit", limit, low=1)

    def device_totals(self) -> list[dict[str, Any]]:
        """Entries, bytes, hits and last access per backend and device (rows of `stats_v`),
        most bytes first."""
        self._before_inspection()
        return self._read("reading totals", _rows.device_totals)

    def query(self, sql: str, *, timeout: float | None = None) -> list[_rows.QueryResult]:
        """Run SQL that only reads (one or more statements; the views `pipelines_v` and
        `stats_v` are there for it); return the rows of each statement that has columns.

        A statement that would write raises ReadOnlyCacheError before it runs. The query
        stops with CacheError after `timeout` seconds, and with KeyboardInterrupt on
        Ctrl-C. SQL that SQLite rejects raises CacheError.
        """
        self._before_inspection()
        if not isinstance(sql, str):
            raise TypeError(f"sql must be a str, got {type(sql).__name__}")
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
        ):
            raise ValueError(f"timeout must be a number of seconds above 0, or None; got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout

        def past_deadline() -> bool:
            # Called every few thousand SQLite steps: it also lets Python deliver Ctrl-C.
            return deadline is not None and time.monotonic() > deadline

        with self._call() as slot:
            connection = self._pool.main(slot)
            connection.set_progress_handler(past_deadline, 4096)
            try:
                return _rows.run_query(connection, sql)
            except _rows.WriteRefused as refused:
                raise ReadOnlyCacheError(
                    f"refused to run {refused.statement.strip()[:80]!r}: a query may only "
                    "read the cache; nothing was run"
                ) from None
            except apsw.InterruptError as error:
                if not past_deadline():
                    raise translate(error, "the query", self._path) from error
                raise CacheError(
                    f"the query ran longer than its timeout of {timeout:g} s and was stopped"
                ) from None
            except READ_ERRORS as error:
                raise translate(error, "the query", self._path) from error
            finally:
                connection.set_progress_handler(None)

    def iter_query(
        self, sql: str, *, timeout: float | None = None
    ) -> Iterator[tuple[list[str], tuple[Any, ...]]]:
        """Run SQL that only reads, as `query` does, yielding `(columns, row)` for each row
        of each statement as SQLite steps to it: a result of any size is never held in
        memory.

        The query runs on a connection of its own, in one read transaction (one snapshot)
        that lasts until the iterator is exhausted or closed: close an iterator left
        unfinished (`contextlib.closing`), since until then the write-ahead log cannot be
        checkpointed past it. An iterator dropped unfinished is closed when it is freed.
        `timeout` counts from the call to the end of the iteration. Bad arguments raise
        at the call; a statement that would write raises ReadOnlyCacheError from the
        first `next()`, before it runs.
        """
        self._before_inspection()
        if not isinstance(sql, str):
            raise TypeError(f"sql must be a str, got {type(sql).__name__}")
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
        ):
            raise ValueError(f"timeout must be a number of seconds above 0, or None; got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout

        def past_deadline() -> bool:
            return deadline is not None and time.monotonic() > deadline

        def rows() -> Iterator[tuple[list[str], tuple[Any, ...]]]:
            connection = self._connect(False)
            connection.set_progress_handler(past_deadline, 4096)
            try:
                yield from _rows.iter_query(connection, sql)
            except _rows.WriteRefused as refused:
                raise ReadOnlyCacheError(
                    f"refused to run {refused.statement.strip()[:80]!r}: a query may only "
                    "read the cache; nothing was run"
                ) from None
            except apsw.InterruptError as error:
                if not past_deadline():
                    raise translate(error, "the query", self._path) from error
                raise CacheError(
                    f"the query ran longer than its timeout of {timeout:g} s and was stopped"
                ) from None
            except READ_ERRORS as error:
                raise translate(error, "the query", self._path) from error
            finally:
                with suppress(apsw.Error):
                    connection.close()

        return rows()

    def peek_entry(self, entry_key: bytes | str, *, layers: bool = False) -> bytes | None:
        """The blob of the entry with this entry key, or None if there is none, read
        without counting a hit or changing anything; with `layers`, one the file lacks is
        looked up in the layers as a read does (what the user's file hides is not served).

        Raises CorruptCacheError if its bytes fail their checksum (the entry is left as
        it is), CacheError types if it cannot be read.
        """
        self._before_inspection()
        key = coerce_digest("entry_key", entry_key)
        with self._call() as slot:
            try:
                cursor = self._pool.cursor(slot)
                fetched = _rows.fetch(cursor, lambda: self._pool.large(slot), key)
                if fetched is None and layers and self._layers:
                    found = self._layers.peek(key, self._masks(cursor))
                    return None if found is None else found.data
                if fetched is None or _rows.verify(key, fetched):
                    return None if fetched is None else fetched.data
                if _rows.owner(self._pool.main(slot), key) != key:
                    return None  # the row belongs to another key sharing its row id
            except apsw.Error as error:
                raise translate(error, f"reading entry {key.hex()}", self._path) from error
        raise CorruptCacheError(
            f"entry {key.hex()} in {self._path} fails its {fetched.algo} checksum; "
            "'vyre-sqlcache check --repair' (or check(repair=True)) drops it"
        )

    @staticmethod
    def peek_layers(
        entry_key: bytes | str,
        layers: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
    ) -> bytes | None:
        """The blob of the entry with this entry key in the first of `layers` that holds
        a sound copy, or None: for a user who has no cache file yet (none is made). A
        layer that cannot be used is skipped with a warning, as at open.

        Raises TypeError/ValueError for a malformed key or layer list.
        """
        key = coerce_digest("entry_key", entry_key)
        paths = _layers.check_layer_paths("layers", layers)
        # No user file: nothing masks a layer's entry, and no layer can be that file.
        opened = _layers.open_layers(paths, own=Path(os.devnull), on_damage=lambda: None)
        try:
            found = opened.peek(key, lambda _key, _checksum: False)
        finally:
            opened.close()
        return None if found is None else found.data

    def check(
        self,
        *,
        repair: bool = False,
        progress: Callable[[list[int]], Iterable[int]] | None = None,
    ) -> _rows.CheckReport:
        """SQLite's `integrity_check`, then every entry's checksum; changes nothing unless
        `repair`.

        With `repair`, a sound file loses its bad entries; a damaged file is rebuilt from
        its readable entries whose checksums hold (copied into a new file, which is then
        written over this one through SQLite, so processes using the cache go on safely).
        `progress(row_ids)` may wrap the loop over entries (a progress bar). Raises
        ReadOnlyCacheError for `repair` on a read-only cache.
        """
        self._before_inspection()
        if repair and self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; repairing it needs write access"
            )
        with self._call() as slot:
            connection = self._pool.main(slot)
            integrity = tuple(_rows.integrity_check(connection))
            try:
                ids, complete = _rows.readable_ids(connection)
            except apsw.Error as error:
                raise translate(error, "listing entries", self._path) from error
            rescue = None
            if repair and (integrity != ("ok",) or not complete):
                rescue = self._rescue_start(connection)
            damaged: list[str] = []
            missing: list[str] = []
            bad_rows: list[int] = []  # row ids: a misplaced row is not found by its key
            resized: list[tuple[int, int]] = []
            wrong_size: list[str] = []
            strays: list[int] = []
            checked = unreadable = kept = 0
            try:
                for rowid in ids if progress is None else progress(ids):
                    try:
                        with transaction(connection, "DEFERRED"):
                            raw = _rows.raw_entry(connection, rowid)
                    except _rows.DamagedText as error:
                        checked += 1
                        if error.entry_key is None:
                            unreadable += 1
                        else:
                            damaged.append(error.entry_key.hex())
                            bad_rows.append(rowid)
                        continue
                    except apsw.Error:
                        checked += 1
                        unreadable += 1
                        continue
                    except _codec.Unavailable as error:
                        raise CacheError(
                            f"{self._path} holds zstd-compressed entries; checking them needs "
                            "the zstandard package: pip install 'vyre-sqlcache[zstd]'"
                        ) from error
                    if raw is None:
                        # A blob without its entry, or an entry deleted since the scan.
                        strays.append(rowid)
                        continue
                    checked += 1
                    fault = raw.fault()
                    if fault == "no blob":
                        missing.append(raw.entry_key.hex())
                        bad_rows.append(rowid)
                    elif fault in ("bytes", "place"):
                        damaged.append(raw.entry_key.hex())
                        bad_rows.append(rowid)
                    elif fault == "size" and rescue is None:
                        assert raw.decoded is not None
                        wrong_size.append(raw.entry_key.hex())
                        resized.append((rowid, len(raw.decoded)))
                    elif rescue is not None:
                        try:
                            _rows.insert_raw(rescue[1], raw)
                            kept += 1
                        except apsw.ConstraintError:
                            unreadable += 1
                if rescue is not None:
                    after = self._rescue_finish(slot, *rescue)
                    return _rows.CheckReport(
                        integrity,
                        checked,
                        tuple(damaged),
                        tuple(missing),
                        unreadable,
                        rebuilt=True,
                        kept=kept,
                        integrity_after=after,
                    )
            finally:
                if rescue is not None:
                    self._rescue_discard(*rescue)
            strays = self._stray_blobs(connection, strays)
            totals = self._wrong_totals(connection)
        dropped = 0
        corrected = False
        if repair and (bad_rows or resized or strays or totals):
            now = time.time_ns() // 1_000_000

            def correct(c: apsw.Connection) -> int:
                # Looked at again under the write lock: another process may have written
                # an entry again since the scan (right bytes, another size).
                faults = {rowid: _fault_now(c, rowid) for rowid in bad_rows}
                still_bad = [r for r, (f, _) in faults.items() if f in _BAD_FAULTS]
                sizes = []
                for rowid, _size in resized:
                    fault, size = _fault_now(c, rowid)
                    if fault == "size" and size is not None:
                        sizes.append((rowid, size))
                # Recorded as damaged in the departure record (see `explain`), not deleted.
                gone = _rows.delete_rows(c, still_bad, now, "damaged")
                _rows.correct_records(c, sizes, strays)
                return gone

            dropped = self._change("repairing entries", correct)
            corrected = True
        return _rows.CheckReport(
            integrity,
            checked,
            tuple(damaged),
            tuple(missing),
            unreadable,
            dropped,
            wrong_size=tuple(wrong_size),
            stray_blobs=len(strays),
            wrong_totals=tuple(totals),
            corrected=corrected,
        )

    def _stray_blobs(self, connection: apsw.Connection, candidates: list[int]) -> list[int]:
        """The row ids among `candidates` of blobs that have no entry (in one snapshot)."""
        if not candidates:
            return []
        try:
            with transaction(connection, "DEFERRED"):
                return _rows.stray_blobs(connection, candidates)
        except DAMAGE_ERRORS:
            return []  # a damaged file: integrity_check reports it, a repair rebuilds it
        except apsw.Error as error:
            raise translate(error, "looking for blobs without an entry", self._path) from error

    def _wrong_totals(self, connection: apsw.Connection) -> list[str]:
        """The totals in `meta` that differ from the entries ([] where damaged pages keep
        them from being counted: integrity_check reports those)."""
        try:
            with transaction(connection, "DEFERRED"):
                return _rows.wrong_totals(connection)
        except DAMAGE_ERRORS:
            return []
        except apsw.Error as error:
            raise translate(error, "counting the entries", self._path) from error

    def compact(self) -> tuple[int, int]:
        """Rewrite the file without free pages (VACUUM) and truncate its write-ahead log;
        return the bytes the cache took on disk before and after. Raises
        ReadOnlyCacheError on a read-only cache, CacheError types if it fails."""
        self._before_inspection()
        if self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; compacting it needs write access"
            )
        before = self._file.file_bytes()
        with self._call() as slot:
            connection = self._pool.main(slot)
            try:
                # Tombstoned entries are purged first, so that their pages are freed.
                while True:
                    with transaction(connection):
                        if _rows.purge(connection) == 0:
                            break
                # Its space counts as free for the VACUUM (a reader may keep it: no wait).
                self._truncate_log_within(connection, 0)
                shortfall = compact_shortfall(connection)
                if shortfall is not None:
                    raise CacheFullError(f"compacting {self._path}: {shortfall}")
                retry_busy(lambda: vacuum(connection))
                self._truncate_log_within(connection, COMPACT_TRUNCATE_WAIT_S)
            except apsw.Error as error:
                if not isinstance(error, apsw.BusyError):  # (busy: it would wait again)
                    self._truncate_log(connection)  # a failed VACUUM's log keeps the disk
                raise translate(error, "compacting", self._path) from error
        return before, self._file.file_bytes()

    def _truncate_log_within(self, connection: apsw.Connection, seconds: float) -> bool:
        """Truncate the log, trying for up to `seconds`; whether it was. SQLite answers
        busy at once while another checkpoint copies (the VACUUM's log wakes the
        checkpoint threads), and after a whole busy timeout (10 s) a try that a reader
        of an older snapshot holds up: so each try gives up at once."""
        waiter = waiter_of(connection)
        deadline = time.monotonic() + seconds
        try:
            if waiter is not None:
                waiter.patient = False
            while True:
                try:
                    if not connection.pragma("wal_checkpoint", "TRUNCATE")[0]:
                        return True
                except apsw.BusyError:
                    pass
                if time.monotonic() >= deadline:
                    log.info("vyre-sqlcache: %s: the log is in use; not truncated", self._path)
                    return False
                time.sleep(0.01)
        finally:
            if waiter is not None:
                waiter.patient = True

    # -- bundle and merge ------------------------------------------------------------------

    def bundle(
        self,
        out: str | os.PathLike[str],
        *,
        backend: str | None = None,
        vendor: int | None = None,
        device: int | None = None,
        driver: bytes | str | None = None,
        key_version: int | None = None,
        overwrite: bool = False,
    ) -> _combine.BundleReport:
        """Write the entries that match every filter given into a new read-only layer file
        at `out` (see `open(layers=...)`): each verified on the way (bad ones skipped and
        counted), compressed ones kept as stored with their dictionaries, written beside
        `out` and renamed into place, vacuumed, marked as a layer. `driver` is the
        fingerprint's 32-byte driver digest (or 64 hex).

        Raises FileExistsError if `out` exists (unless `overwrite`), TypeError/ValueError
        for a bad filter or an `out` that is the cache or its -wal or -shm, CacheError
        types if `out` has a log beside it or reading or writing fails (nothing is left
        at `out` then).
        """
        if backend is not None and (not isinstance(backend, str) or not backend):
            raise TypeError(f"backend must be a non-empty str or None, got {backend!r:.80}")
        wanted = _combine.BundleFilter(
            backend,
            None if vendor is None else check_u32("vendor", vendor),
            None if device is None else check_u32("device", device),
            None if driver is None else coerce_digest("driver", driver),
            None if key_version is None else check_u32("key_version", key_version),
        )
        target = self._output(out, overwrite, "layer file")
        self._before_inspection()
        report = self._write_beside(
            "bundle", target, lambda c, temporary: _combine.bundle_into(c, temporary, wanted)
        )
        return dataclasses.replace(report, path=target)

    def copy(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> _combine.CopyReport:
        """Write a snapshot of the whole cache file to a new file at `out`: every table as
        one read transaction saw it (this object's queued writes committed first),
        vacuumed, in one file with no -wal beside it; written beside `out`, synced and
        renamed into place, while other processes go on using the cache. A file copied
        with `cp` while a process writes the cache is usually torn.

        Raises FileExistsError if `out` exists (unless `overwrite`), ValueError if it is
        the cache or its -wal or -shm, CacheError types if `out` has a log beside it or
        reading or writing fails (CacheFullError for a full disk; nothing is left at
        `out` then).
        """
        target = self._output(out, overwrite, "copy")
        self._before_inspection()

        def copy_into(connection: apsw.Connection, temporary: Path) -> _combine.CopyReport:
            # A read-only cache's connections refuse VACUUM INTO, which writes no byte of
            # the cache (the file itself is opened read-only where it must be).
            if self._readonly:
                connection.pragma("query_only", False)
            try:
                return _combine.copy_into(connection, temporary)
            finally:
                if self._readonly:
                    connection.pragma("query_only", True)

        return dataclasses.replace(self._write_beside("copy", target, copy_into), path=target)

    def _write_beside(
        self, kind: str, target: Path, write: Callable[[apsw.Connection, Path], T]
    ) -> T:
        """`write(connection, temporary)` of a file of `kind` (a bundle, a copy) on this
        thread's connection to a temporary file beside `target`, then renamed over it;
        nothing is left at `target` if it raises (CacheError types)."""
        temporary = target.with_name(f".{target.name}.{kind}-{os.getpid()}-{time.time_ns()}")
        try:
            # Made here, empty (SQLite writes into an empty file as into a new one): where
            # the folder refuses it, SQLite's "unable to open database" said neither why
            # nor which folder.
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFullError(
                    f"cannot write the {kind} {target}: no room for a new file in the folder "
                    f"{target.parent} ({error.strerror}: no free space, or no free inodes, "
                    "`df -i`); free some, or write it elsewhere"
                ) from error
            raise CacheError(
                f"cannot write the {kind} {target}: {error.strerror or error} in the folder "
                f"{target.parent}; give a path in a folder this user can write"
            ) from error
        try:
            report = self._read(
                f"writing the {kind}",
                lambda connection: write(connection, temporary),
                lambda error, connection: self._writing_failed(kind, target, error, connection),
            )
            _combine.install(temporary, target)
        except OSError as error:
            raise CacheError(f"writing the {kind} {target} failed: {error}") from error
        finally:
            _combine.discard(temporary)
        return report

    def _writing_failed(
        self, kind: str, target: Path, error: apsw.Error, connection: apsw.Connection
    ) -> CacheError:
        """The error to raise for writing a file of `kind` from this cache: one with no
        room says what it needs (the cache's size cap is not the remedy). The connection's
        errno tells a file size limit from other I/O errors."""
        if isinstance(error, (apsw.CorruptError, apsw.NotADBError)):
            # Met reading this cache: the file being written is new.
            return CorruptCacheError(
                f"writing the {kind} {target} failed: the cache {self._path} has damaged "
                f"pages ({error}); `vyre-sqlcache check --repair` rebuilds it from its "
                f"readable entries, then write the {kind} again"
            )
        failure = translate(error, f"writing the {kind}", target, connection)
        if not isinstance(failure, CacheFullError):
            return failure
        return CacheFullError(
            f"writing the {kind} {target} failed: no room for it ({error}); it needs up to "
            f"{self._file.file_bytes()} bytes: free space on that disk, raise the file size "
            f"limit (`ulimit -f`), or write the {kind} elsewhere"
        )

    def own_file(self, path: str | os.PathLike[str]) -> str | None:
        """Which of this cache's files `path` names, by any path (a link, another mount):
        "the cache itself" or "the cache's own -wal file" (-shm, -journal); else None.
        For tools about to write a file: never over the cache."""
        return self.file_of(path, self._path)

    @staticmethod
    def file_of(path: str | os.PathLike[str], cache: str | os.PathLike[str]) -> str | None:
        """Which file of the cache (or layer) at `cache` `path` names, by any path, as
        `own_file` says; else None."""
        return cache_part(expand_home(os.fspath(path)).absolute(), expand_home(os.fspath(cache)))

    def _output(self, out: str | os.PathLike[str], overwrite: bool, kind: str) -> Path:
        """The absolute path of a file to write (through a link, the file it names; `kind`
        names it in errors); raises
        ValueError if it is the cache or one of its side files, CacheError for a folder,
        a device, FIFO or socket, a missing folder or a log beside it, FileExistsError if
        it exists and may not be replaced."""
        target = expand_home(os.fspath(out), name="out").absolute()
        if target.is_symlink():
            # The file the link names is the one replaced, as `get -o` writes: replacing
            # the link left a backup reached through it (on another disk, say) stale.
            try:
                target = target.resolve()
            except (RuntimeError, OSError) as error:  # (a loop: RuntimeError before 3.13)
                raise CacheError(
                    f"{target} is a symbolic link that names no file ({error}); give the "
                    f"path of the {kind} to write"
                ) from None
        part = self.own_file(target)
        if part is not None:
            raise ValueError(f"out ({target}) is {part}; give another file")
        for side in (*SIDE_FILES, "-journal"):
            if Path(f"{target}{side}").exists():
                # The next program to open the new file would pair it with that log.
                raise CacheError(
                    f"{target}{side} exists: a database at {target} is in use, or a crash "
                    f"left its {side} behind; give another path, or close what uses it and "
                    "remove the leftover"
                )
        if target.is_dir():
            raise CacheError(f"{target} is a folder; give the path of the {kind} to write")
        if target.exists() and not target.is_file():
            raise CacheError(
                f"{target} is not a regular file (a device, FIFO or socket); give the path "
                f"of the {kind} to write"
            )
        if not target.parent.is_dir():
            raise CacheError(
                f"the folder {target.parent} does not exist; make it first, or give a path "
                f"in an existing folder for the {kind}"
            )
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise FileExistsError(
                f"{target} exists; choose another path, or pass overwrite=True "
                "(--force) to replace it"
            )
        return target

    def merge(self, sources: Iterable[str | os.PathLike[str]]) -> _combine.MergeReport:
        """Admit the entries of other cache files into this one, one transaction per
        source. Sources are only read. Every incoming entry is verified (bad ones skipped
        and counted); of two entries under one key the newer `created_ms` wins (a tie
        keeps this cache's); this cache's cap holds, its LRU deciding what stays.

        Raises ReadOnlyCacheError on a read-only cache, TypeError for a bad source list,
        CacheError types for a source that is missing, not a cache or of another schema
        version (the sources before it stay merged), or if writing fails.
        """
        if isinstance(sources, (str, bytes, os.PathLike)):
            raise TypeError(
                f"sources must be a list of cache file paths, got {sources!r:.80}; "
                "for one source write [path]"
            )
        paths = [expand_home(os.fspath(s), name="sources") for s in sources]
        self._before_inspection()
        if self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; merging into it needs write access"
            )
        report = _combine.MergeReport()
        for path in paths:
            evicted = report.evicted
            with _combine.source(path) as connection:
                if Path(os_name(connection.filename)) == self._path:
                    raise CacheError(f"{path} is this cache itself; nothing to merge")

                def admit(target: apsw.Connection, source: apsw.Connection = connection) -> int:
                    self._settle_cap(target)
                    codec = self._codec if self._codec.enabled else None
                    return _combine.merge_from(
                        source, target, self._cap, codec, time.time_ns() // 1_000_000, report
                    )

                self._change(f"merging {path}", admit)
            self._books.evicted(report.evicted - evicted)
            report.sources.append(str(path))
        return report

    def _before_inspection(self) -> None:
        """Refuse a disabled cache; commit this object's queued writes, so that what it
        looks at includes every write it made."""
        if self.disabled:
            raise CacheError(
                "the cache is disabled by VYRE_SQLCACHE_DISABLE; unset it to look into the file"
            )
        if len(self._writer) and not self._readonly:
            self._writer.commit()

    @staticmethod
    def _int64(name: str, value: int | None, low: int = -(2**63)) -> int | None:
        """`value` if it is None or an int from `low` to 2**63-1; else TypeError/ValueError."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if not low <= value < 2**63:
            raise ValueError(f"{name} must be from {low} to 2**63-1, got {value}")
        return value

    def _rescue_start(self, live: apsw.Connection) -> tuple[Path, apsw.Connection]:
        """A new, empty cache file beside this one, with the same page size and schema, in
        an open transaction: the readable entries of a damaged file are copied into it."""
        from ._schema import latest_version, migrations, schema_version

        version = schema_version(live)
        if version > latest_version():
            # Rebuilt with our migrations, it would go back to our schema under the
            # newer library's processes, whose writes need its tables.
            raise SchemaTooNewError(
                f"{self._path} was upgraded to schema version {version} by a newer "
                f"vyre-sqlcache since this object opened it (this one knows versions up to "
                f"{latest_version()}); repair it with that version: 'vyre-sqlcache check "
                "--repair' from it (nothing was changed)"
            )
        temporary = self._path.with_name(f"{self._path.name}.rebuild-{time.time_ns()}")
        try:
            rescue = connect(temporary, mmap=False)
        except apsw.Error as error:
            raise translate(error, "creating a file to rebuild into", temporary) from error
        try:
            rescue.pragma("page_size", live.pragma("page_size"))
            rescue.pragma("journal_mode", "off")  # a failed rebuild deletes the file
            rescue.execute("BEGIN")
            for migration in migrations():
                rescue.execute(migration.sql)
                rescue.execute(f"PRAGMA user_version = {migration.version:d}")
            _rows.restore_meta(rescue, _rows.readable_meta(live))
            _rows.copy_dictionaries(live, rescue)
            _layers.copy_masks(live, rescue)
        except BaseException:
            self._rescue_discard(temporary, rescue)
            raise
        return temporary, rescue

    def _rescue_finish(
        self, slot: Slot, temporary: Path, rescue: apsw.Connection
    ) -> tuple[str, ...]:
        """Write the rebuilt file over the cache; return `integrity_check` of the result.

        The copy goes through SQLite's backup API, under the write lock, so connections of
        other processes see a new version of the file, as after any write. If the damaged
        file cannot take it, the file is moved aside and the rebuilt one renamed into place.
        """
        rescue.execute("COMMIT")
        live = self._pool.main(slot)
        try:

            def copy() -> None:
                with live.backup("main", rescue, "main") as backup:
                    backup.step(-1)

            retry_busy(copy)
        except apsw.Error as error:
            log.warning("vyre-sqlcache: could not rebuild %s in place: %s", self._path, error)
            rescue.pragma("journal_mode", "wal")
            rescue.close()
            if not self._pool.quiesce():
                raise CacheError(
                    f"could not rebuild {self._path}: another thread is using the cache"
                ) from error
            try:
                move_aside(self._path, f"could not be rebuilt in place ({error})")
                temporary.replace(self._path)
            finally:
                self._pool.resume()
            live = self._pool.main(slot)
        with suppress(apsw.Error):
            live.pragma("wal_checkpoint", "TRUNCATE")
        with suppress(OSError):
            needs_check_marker(self._path).unlink(missing_ok=True)
        return tuple(_rows.integrity_check(live))

    @staticmethod
    def _rescue_discard(temporary: Path, rescue: apsw.Connection) -> None:
        with suppress(apsw.Error):
            rescue.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            with suppress(OSError):
                Path(f"{temporary}{suffix}").unlink(missing_ok=True)
