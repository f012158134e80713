"""`PipelineCache`: compiled pipeline blobs in one WAL-mode SQLite file."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import apsw
import platformdirs

from . import checksums
from .bookkeeping import BUMP_META, Bookkeeping
from .checkpointer import Checkpointer
from .config import DEFAULT_MAX_BYTES, ENV_MAX_SIZE, Settings
from .connection import BUSY_TIMEOUT_MS, connect, immediate, retry_busy, translate
from .entry import (
    INSERT_BLOB,
    INSERT_ENTRY,
    MAX_BLOB_BYTES,
    NewEntry,
    check_blob,
    check_fingerprint,
    check_key,
)
from .errors import (
    BlobTooLargeError,
    CacheError,
    CacheFullError,
    CorruptCacheError,
    ReadOnlyCacheError,
)
from .eviction import blob_bytes, evict, make_room
from .healing import header_damage, is_not_sqlite, move_aside, needs_check_marker
from .keys import DeviceFingerprint, PipelineCacheKey, check_u32, coerce_digest, entry_id
from .schema import prepare

__all__ = ["MAX_BLOB_BYTES", "CacheStats", "PipelineCache"]

log = logging.getLogger("vyre_sqlcache")

#: Blobs above this size are left out of the lookup's row and read with incremental
#: blob I/O, straight into the returned bytes (one copy instead of two), by a
#: connection without memory mapping: SQLite then reads each overflow page with one
#: pread instead of faulting the mapping in 4 KiB at a time (a first read of 1 MiB
#: took 72 µs instead of 110 µs), and no mapped file pages join the process's
#: resident memory beside the result.
LARGE_BLOB_BYTES = 256 * 1024

_UNSET: Final[Any] = object()

# One statement a read-hit; a large blob is left out of the row.
_SELECT_BLOB = (
    "SELECT checksum_algo, checksum, "
    f"CASE WHEN length(data) <= {LARGE_BLOB_BYTES} THEN data END FROM blobs WHERE id = ?"
)

# Bumped in a forked child: connections must never cross a fork.
_fork_generation = 0
# Connections inherited through fork stay referenced so they are never closed:
# a close could checkpoint or delete the parent's write-ahead log.
_abandoned: list[apsw.Connection] = []


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_max_bytes(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_bytes must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"max_bytes must be at least 1 byte (or None for no cap), got {value}")
    return value


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A cache's size and counters; `total_*` are kept in the file across processes."""

    path: Path
    entries: int
    blob_bytes: int
    file_bytes: int
    max_bytes: int | None
    hits: int
    misses: int
    evictions: int
    checksum_failures: int
    total_hits: int
    total_misses: int
    total_evictions: int
    total_checksum_failures: int
    total_flushes: int


class PipelineCache:
    """A pipeline cache in one SQLite file, shared safely by threads and processes.

    Create it with `PipelineCache.open()`; use it as a context manager or call `close()`.
    Each thread gets its own SQLite connection, so readers in different threads run in
    parallel (apsw releases the GIL inside SQLite) and a transaction is never shared.
    """

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool,
        file_readonly: bool,
        immutable: bool,
        max_bytes: int | None,
        disabled: bool,
        vfs: str | None,
    ) -> None:
        """Set up a cache object; use `PipelineCache.open` instead."""
        self._path = path
        self._readonly = readonly  # writes are refused
        self._file_readonly = file_readonly  # the OS will not let us write the file
        self._immutable = immutable
        self._max_bytes = max_bytes
        self._disabled = disabled
        self._vfs = vfs
        self._closed = False
        self._books = Bookkeeping()
        self._unflushed = 0
        self._reset_connections()

    def _reset_connections(self) -> None:
        self._lock = threading.Lock()  # guards _connections and _unflushed
        self._local = threading.local()
        self._connections: list[tuple[weakref.ref[threading.Thread], apsw.Connection]] = []
        self._checkpointer = Checkpointer(lambda: self._open_connection(mmap=False))
        self._generation = _fork_generation

    # -- opening and closing -------------------------------------------------------

    @staticmethod
    def default_path() -> Path:
        """The per-user cache file: `<user cache dir>/vyre/pipelines.sqlite3`."""
        return platformdirs.user_cache_path("vyre", appauthor=False) / "pipelines.sqlite3"

    @classmethod
    def resolve_path(cls, path: str | Path | None, settings: Settings | None = None) -> Path:
        """The file `open(path)` uses: `path`, else `$VYRE_SQLCACHE_PATH`, else the default."""
        if path is None:
            settings = Settings.from_environment() if settings is None else settings
            path = settings.path or cls.default_path()
        return Path(path).expanduser()

    @classmethod
    def open(
        cls,
        path: str | Path | None = None,
        *,
        max_bytes: int | None = _UNSET,
        readonly: bool = False,
        strict: bool = False,
        verify: bool = False,
        vfs: str | None = None,
    ) -> PipelineCache:
        """Open (creating if needed) the cache at `path`.

        `path=None` means `$VYRE_SQLCACHE_PATH`, else `default_path()`. `max_bytes` caps the
        blob bytes (default `$VYRE_SQLCACHE_MAX_SIZE`, else 1 GiB; None: no cap). A file that
        cannot be written opens read-only. A damaged file (not a database, or failing
        `quick_check` when `verify=True` or after damage was met in use) is moved aside and
        replaced; `strict=True` raises CorruptCacheError instead. `VYRE_SQLCACHE_DISABLE=1`
        gives a cache that stores nothing. `vfs` names a SQLite VFS to do the I/O.

        Raises SchemaTooNewError (file from a newer library), NotACacheError (another
        program's database), CorruptCacheError (with strict), ValueError (malformed
        environment variable or argument), CacheError (cannot open).
        """
        settings = Settings.from_environment()
        resolved = cls.resolve_path(path, settings)
        if max_bytes is _UNSET:
            max_bytes = DEFAULT_MAX_BYTES if settings.max_bytes is None else settings.max_bytes
            if max_bytes < 1:
                raise ValueError(f"{ENV_MAX_SIZE} must be at least 1 byte, got {max_bytes}")
        options: dict[str, Any] = {"max_bytes": _check_max_bytes(max_bytes), "vfs": vfs}
        if settings.disabled:
            return cls(
                resolved,
                readonly=True,
                file_readonly=True,
                immutable=False,
                disabled=True,
                **options,
            )
        if resolved.is_dir():
            raise CacheError(
                f"{resolved} is a folder; give the path of a cache file, such as "
                f"{resolved / 'pipelines.sqlite3'}"
            )
        if readonly and not resolved.exists():
            raise CacheError(
                f"{resolved} does not exist, and a read-only cache cannot create it; "
                "open it without readonly=True first, or check the path"
            )
        # A cache asked to be read-only but on a writable file still opens the file for
        # writing, with SQLite's query_only set: its last close can then fold the
        # write-ahead log back into the file, leaving one file at rest.
        file_readonly = cls._must_open_readonly(resolved)
        if file_readonly and not readonly:
            log.info("vyre-sqlcache: %s is not writable; opening it read-only", resolved)
        readonly = readonly or file_readonly
        immutable = file_readonly and cls._needs_immutable(resolved)
        cache = cls(
            resolved,
            readonly=readonly,
            file_readonly=file_readonly,
            immutable=immutable,
            disabled=False,
            **options,
        )
        try:
            if is_not_sqlite(resolved):
                raise CorruptCacheError(f"{resolved} is not a SQLite database")
            damage = header_damage(resolved)
            if damage is not None:
                raise CorruptCacheError(f"{resolved} has a damaged header: {damage}")
            cache._first_connection(verify=verify)
        except CorruptCacheError as error:
            if strict or readonly:
                raise
            move_aside(resolved, f"is damaged ({error})")
            cache._first_connection(verify=False)
        return cache

    @staticmethod
    def _must_open_readonly(path: Path) -> bool:
        """Whether the file (or, for a new one, its folder) cannot be written."""
        if path.exists():
            sides_exist = all(Path(str(path) + side).exists() for side in ("-wal", "-shm"))
            folder_ok = sides_exist or os.access(path.parent, os.W_OK)
            return not (os.access(path, os.W_OK) and folder_ok)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(
                f"cannot create the folder of cache file {path}: {error}; choose a writable path"
            ) from error
        return False

    @staticmethod
    def _needs_immutable(path: Path) -> bool:
        """Read-only media: no -shm can be made, and no write-ahead log holds rows to read."""
        if os.access(path.parent, os.W_OK):
            return False
        wal = Path(str(path) + "-wal")
        return not wal.exists() or wal.stat().st_size == 0

    def _first_connection(self, *, verify: bool) -> None:
        """Open this thread's connection, check and migrate the file; raise CacheError types."""
        where = str(self._path)
        marker = needs_check_marker(self._path)
        try:
            connection = self._open_connection()
            try:
                retry_busy(lambda: prepare(connection, where, readonly=self._readonly))
                if verify or marker.exists():
                    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
                    if problems != ["ok"]:
                        raise CorruptCacheError(
                            f"{where} fails quick_check: {'; '.join(map(str, problems[:3]))}"
                        )
                    marker.unlink(missing_ok=True)
            except BaseException:
                connection.close()
                raise
        except apsw.Error as error:
            raise translate(error, "opening the cache", self._path) from error
        self._local.connection = connection
        self._local.cursor = connection.cursor()
        self._register(connection)

    def _open_connection(self, *, mmap: bool = True) -> apsw.Connection:
        connection = connect(
            self._path,
            readonly=self._file_readonly,
            query_only=self._readonly,
            immutable=self._immutable,
            mmap=mmap,
            vfs=self._vfs,
        )
        if not self._readonly:
            connection.set_wal_hook(self._checkpointer.wal_hook)
        return connection

    def _register(self, connection: apsw.Connection) -> None:
        with self._lock:
            # Connections of threads that have ended are closed here, so a program
            # that starts many short-lived threads does not collect open files.
            alive = []
            for thread_ref, other in self._connections:
                thread = thread_ref()
                if thread is not None and thread.is_alive():
                    alive.append((thread_ref, other))
                else:
                    other.close()
            alive.append((weakref.ref(threading.current_thread()), connection))
            self._connections = alive

    def _connection(self) -> apsw.Connection:
        """This thread's connection, opened on first use; raise CacheError if closed."""
        if self._closed:
            raise CacheError(f"the cache {self._path} is closed; open it again to use it")
        if self._generation != _fork_generation:
            # A forked child: the parent's connections are not ours to use or close.
            _abandoned.extend(connection for _, connection in self._connections)
            self._reset_connections()
            self._books.reset_lock()
        connection: apsw.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._new_connection(mmap=True)
            self._local.connection = connection
            self._local.cursor = connection.cursor()
        return connection

    def _cursor(self) -> apsw.Cursor:
        """This thread's reusable cursor on its connection (saves a cursor a read)."""
        self._connection()
        cursor: apsw.Cursor = self._local.cursor
        return cursor

    def _large_blob_connection(self) -> apsw.Connection:
        """This thread's connection without memory mapping, for large blobs."""
        self._connection()  # the same checks, and a fork resets both
        connection: apsw.Connection | None = getattr(self._local, "large", None)
        if connection is None:
            connection = self._new_connection(mmap=False)
            self._local.large = connection
        return connection

    def _new_connection(self, *, mmap: bool) -> apsw.Connection:
        try:
            connection = self._open_connection(mmap=mmap)
        except apsw.Error as error:
            raise translate(error, "opening a connection", self._path) from error
        self._register(connection)
        return connection

    def close(self) -> None:
        """Write pending bookkeeping, checkpoint into the main file and close; idempotent."""
        if self._closed or self._disabled:
            self._closed = True
            return
        try:
            if not self._readonly and self._generation == _fork_generation:
                self._checkpointer.stop()
                connection = self._connection()
                self._write_bookkeeping_now(connection)
                # Another process reading the file would hold the checkpoint up for the
                # whole busy timeout: an application that is quitting should not wait.
                connection.set_busy_timeout(100)
                try:
                    connection.pragma("wal_checkpoint", "TRUNCATE")
                except apsw.Error as error:
                    log.warning("vyre-sqlcache: checkpoint on close of %s failed: %s", self, error)
        finally:
            self._closed = True
            with self._lock:
                if self._generation == _fork_generation:
                    for _, connection in self._connections:
                        connection.close()
                self._connections = []

    def __enter__(self) -> PipelineCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PipelineCache({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The cache file."""
        return self._path

    @property
    def readonly(self) -> bool:
        """Whether writes are refused (asked for, or the file cannot be written)."""
        return self._readonly and not self._disabled

    @property
    def disabled(self) -> bool:
        """Whether the cache was disabled by `VYRE_SQLCACHE_DISABLE` (stores nothing)."""
        return self._disabled

    @property
    def max_bytes(self) -> int | None:
        """The cap on blob bytes, or None for no cap."""
        return self._max_bytes

    # -- the vyre API: entries by program digest -----------------------------------

    def write(
        self, program_digest: bytes | str, fingerprint: DeviceFingerprint, blob: bytes
    ) -> None:
        """Store `blob` for a program on a device, atomically (durable after `flush()`).

        Raises BlobTooLargeError over 64 MiB or over the cap, TypeError/ValueError for bad
        arguments, ReadOnlyCacheError on a read-only cache, CacheFullError when the disk is
        full even after eviction; nothing is written when it raises.
        """
        self.write_many([(program_digest, blob)], fingerprint)

    def write_many(
        self, items: Iterable[tuple[bytes | str, bytes]], fingerprint: DeviceFingerprint
    ) -> None:
        """Store many `(program_digest, blob)` pairs in one transaction: all or none.

        Raises as `write` does, before anything is written.
        """
        fp = check_fingerprint(fingerprint)
        entries = []
        for index, (program_digest, blob) in enumerate(items):
            digest = coerce_digest(f"program_digest (item {index})", program_digest)
            entries.append(NewEntry(fp.cache_key(digest), None, fp, digest, check_blob(blob)))
        self._insert(entries)

    def read(self, program_digest: bytes | str, fingerprint: DeviceFingerprint) -> bytes | None:
        """The blob stored for a program on a device, or None on a miss.

        Raises TypeError/ValueError for bad arguments; a damaged entry is a miss.
        """
        return self._load(check_fingerprint(fingerprint).cache_key(program_digest))

    def flush(self) -> None:
        """Make every earlier write of this object durable (survives power loss).

        Raises CacheError if the sync fails; the writes stay pending and the next
        `flush()` retries them.
        """
        if self._disabled:
            return
        connection = self._connection()
        with self._lock:
            flushing = self._unflushed
        if flushing == 0:
            return
        try:
            # One commit with synchronous=FULL syncs the write-ahead log, and with it
            # every frame committed before: this object's and other processes'.
            connection.pragma("synchronous", "FULL")
            try:
                with immediate(connection):
                    self._books.write(connection, _now_ms())
                    connection.execute(BUMP_META, (1, "flushes"))
            finally:
                connection.pragma("synchronous", "NORMAL")
        except apsw.Error as error:
            raise translate(error, "flushing", self._path) from error
        with self._lock:
            self._unflushed -= flushing

    def invalidate_impacted(
        self,
        impact_mask: Sequence[int],
        program_digests: Sequence[bytes | str],
        fingerprint: DeviceFingerprint,
    ) -> int:
        """Delete this device's entries of every digest whose mask value is non-zero.

        Reaches entries written with `write`, imported ones, and keyed entries given a
        `program_digest`. Returns how many entries were deleted. Raises ValueError if the
        two sequences differ in length, TypeError/ValueError for a bad mask value or digest.
        """
        fp = check_fingerprint(fingerprint)
        if len(impact_mask) != len(program_digests):
            raise ValueError(
                f"impact_mask has {len(impact_mask)} values but program_digests has "
                f"{len(program_digests)}; they must have the same length (one mask value "
                "per digest)"
            )
        impacted: list[bytes] = []
        for index, (mask, raw) in enumerate(zip(impact_mask, program_digests, strict=True)):
            digest = coerce_digest(f"program_digests[{index}]", raw)
            if check_u32(f"impact_mask[{index}]", mask):
                impacted.append(digest)
        if not impacted or self._disabled:
            return 0
        ids = array("q", (entry_id(fp.cache_key(d)) for d in impacted))
        with self._write_transaction("invalidating entries") as connection:
            connection.execute(
                "DELETE FROM entries WHERE id IN carray(?1) OR (key_version IS NOT NULL "
                "AND program_digest IS NOT NULL AND program_digest IN carray(?2) "
                "AND vendor = ?3 AND device = ?4 AND driver_digest = ?5)",
                (
                    apsw.carray(ids),
                    apsw.carray(tuple(impacted)),
                    fp.vendor,
                    fp.device,
                    fp.driver_digest,
                ),
            )
            removed = connection.changes()
        self._note_unflushed(removed)
        return removed

    # -- the key API: entries by PipelineCacheKey -------------------------------------

    def put(
        self,
        key: PipelineCacheKey,
        fingerprint: DeviceFingerprint,
        blob: bytes,
        program_digest: bytes | str | None = None,
    ) -> None:
        """Store `blob` under `key` on a device, atomically (durable after `flush()`).

        `program_digest` links the entry to its program for `invalidate_impacted`.
        Raises as `write` does.
        """
        self.put_many([(key, blob, program_digest)], fingerprint)

    def put_many(
        self,
        items: Iterable[tuple[PipelineCacheKey, bytes] | tuple[PipelineCacheKey, bytes, Any]],
        fingerprint: DeviceFingerprint,
    ) -> None:
        """Store many `(key, blob[, program_digest])` items in one transaction: all or none.

        Raises as `write` does, before anything is written.
        """
        fp = check_fingerprint(fingerprint)
        entries = []
        for index, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(
                    f"put_many items must be (key, blob) or (key, blob, program_digest) "
                    f"tuples; item {index} is {type(item).__name__} {item!r:.80}"
                )
            key = check_key(item[0])
            data = check_blob(item[1])
            raw_digest = item[2] if len(item) > 2 else None
            digest = None if raw_digest is None else coerce_digest("program_digest", raw_digest)
            entries.append(NewEntry(key.entry_key(fp), key, fp, digest, data))
        self._insert(entries)

    def get(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bytes | None:
        """The blob stored under `key` on a device, or None on a miss.

        Raises TypeError for bad arguments; a damaged entry is a miss.
        """
        return self._load(check_key(key).entry_key(check_fingerprint(fingerprint)))

    def get_many(
        self, keys: Iterable[PipelineCacheKey], fingerprint: DeviceFingerprint
    ) -> list[bytes | None]:
        """The blobs of many keys (None for each miss), read from one snapshot."""
        fp = check_fingerprint(fingerprint)
        entry_keys = [check_key(k).entry_key(fp) for k in keys]
        if self._disabled:
            return [self._load(k) for k in entry_keys]
        connection = self._connection()
        try:
            connection.execute("BEGIN")
        except apsw.Error as error:
            raise translate(error, "reading entries", self._path) from error
        try:
            cursor = connection.cursor()
            fetched = [self._fetch(cursor, k) for k in entry_keys]
        finally:
            # SQLite rolls the transaction back itself after an I/O error, and a read
            # that met damage may leave COMMIT failing: end it without raising.
            if not connection.get_autocommit():
                try:
                    connection.execute("COMMIT")
                except apsw.Error:
                    with suppress(apsw.Error):
                        connection.execute("ROLLBACK")
        return [self._verified(k, f) for k, f in zip(entry_keys, fetched, strict=True)]

    def contains(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Whether an entry is stored under `key` on a device (its bytes are not verified)."""
        entry_key = check_key(key).entry_key(check_fingerprint(fingerprint))
        if self._disabled:
            return False
        try:
            row = (
                self._connection()
                .execute("SELECT entry_key FROM entries WHERE id = ?", (entry_id(entry_key),))
                .fetchone()
            )
        except apsw.Error as error:
            raise translate(error, "looking up an entry", self._path) from error
        return row is not None and row[0] == entry_key

    def delete(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Delete the entry under `key` on a device; return whether there was one."""
        entry_key = check_key(key).entry_key(check_fingerprint(fingerprint))
        return self.delete_entries([entry_key]) > 0

    # -- entries by bare entry key (inspection, vyre directory import and export) ----

    def get_entry(self, entry_key: bytes | str) -> bytes | None:
        """The verified blob of the entry with this 32-byte (or 64-hex) entry key, or None.

        Raises TypeError/ValueError for a malformed key; a damaged entry is a miss.
        """
        return self._load(coerce_digest("entry_key", entry_key))

    def put_entry(
        self, entry_key: bytes | str, blob: bytes, *, created_ms: int | None = None
    ) -> None:
        """Store `blob` under a bare entry key, as a vyre directory cache knows it.

        Such an entry has no key columns; `read` and `invalidate_impacted` still reach it,
        since its key is vyre's `fingerprint.cache_key(program_digest)`. `created_ms`
        (milliseconds since the epoch) also serves as its last access. Raises as `write`.
        """
        key = coerce_digest("entry_key", entry_key)
        data = check_blob(blob)
        if created_ms is not None and (
            isinstance(created_ms, bool) or not isinstance(created_ms, int)
        ):
            raise TypeError(f"created_ms must be an int or None, got {type(created_ms).__name__}")
        if created_ms is not None and not -(2**63) <= created_ms < 2**63:
            raise ValueError(
                f"created_ms must be milliseconds since the epoch in a signed 64-bit int, "
                f"got {created_ms}"
            )
        self._insert([NewEntry(key, None, None, None, data, created_ms)])

    def delete_entries(self, entry_keys: Iterable[bytes | str]) -> int:
        """Delete the entries with these entry keys in one statement; return how many."""
        keys = [coerce_digest(f"entry_keys[{i}]", k) for i, k in enumerate(entry_keys)]
        if not keys or self._disabled:
            return 0
        with self._write_transaction("deleting entries") as connection:
            connection.execute(
                "DELETE FROM entries WHERE id IN carray(?) AND entry_key IN carray(?)",
                (apsw.carray(array("q", map(entry_id, keys))), apsw.carray(tuple(keys))),
            )
            removed = connection.changes()
        self._note_unflushed(removed)
        return removed

    def check_entry(self, entry_key: bytes | str) -> bool | None:
        """Whether an entry's bytes match its checksum (None: no such entry); changes nothing."""
        key = coerce_digest("entry_key", entry_key)
        if self._disabled:
            return None
        fetched = self._fetch(self._cursor(), key)
        return None if fetched is None else checksums.matches(*fetched[:2], key, fetched[2])

    # -- size and counters -------------------------------------------------------------

    def __len__(self) -> int:
        """The number of entries."""
        return self.stats().entries

    def stats(self) -> CacheStats:
        """Sizes and counters: this object's hits, misses, evictions and checksum failures,
        and the totals kept in the file (which include this object's unwritten ones)."""
        counts = self._books.counts()
        totals: dict[str, int] = {}
        file_bytes = 0
        if not self._disabled:
            try:
                rows = self._connection().execute("SELECT name, value FROM meta").fetchall()
            except apsw.Error as error:
                raise translate(error, "reading statistics", self._path) from error
            totals = {str(name): int(value) for name, value in rows}  # type: ignore[arg-type]
            for suffix in ("", "-wal"):
                with suppress(FileNotFoundError):
                    file_bytes += os.stat(str(self._path) + suffix).st_size
        hits, misses = self._books.unwritten()
        return CacheStats(
            path=self._path,
            entries=totals.get("entries", 0),
            blob_bytes=totals.get("blob_bytes", 0),
            file_bytes=file_bytes,
            max_bytes=self._max_bytes,
            hits=counts.hits,
            misses=counts.misses,
            evictions=counts.evictions,
            checksum_failures=counts.checksum_failures,
            total_hits=totals.get("hits", 0) + hits,
            total_misses=totals.get("misses", 0) + misses,
            total_evictions=totals.get("evictions", 0),
            total_checksum_failures=totals.get("checksum_failures", 0),
            total_flushes=totals.get("flushes", 0),
        )

    # -- internals: writing --------------------------------------------------------

    @contextmanager
    def _write_transaction(self, what: str) -> Iterator[apsw.Connection]:
        """A `BEGIN IMMEDIATE` transaction on this thread's connection, bookkeeping first."""
        if self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; open it without readonly=True, "
                "from a process that may write the file, to change it"
            )
        connection = self._connection()
        try:
            with immediate(connection):
                self._books.write(connection, _now_ms())
                yield connection
        except apsw.Error as error:
            self._note_damage(error)
            raise translate(error, what, self._path) from error

    def _insert(self, entries: list[NewEntry]) -> None:
        if not entries:
            return
        incoming = sum(len(entry.blob) for entry in entries)
        cap = self._max_bytes
        if cap is not None and incoming > cap:
            what = "blob is" if len(entries) == 1 else f"{len(entries)} blobs are"
            raise BlobTooLargeError(
                f"{what} {incoming} bytes, over the cache's size cap of {cap} bytes "
                f"(max_bytes / {ENV_MAX_SIZE}); raise the cap to store it; nothing was written"
            )
        if self._disabled:
            return
        now = _now_ms()
        params = [entry.params(now) for entry in entries]
        ids = array("q", (entry.rowid for entry in entries))
        for attempt in range(2):
            try:
                with self._write_transaction("storing entries") as connection:
                    if cap is not None:
                        self._books.evicted(make_room(connection, ids, incoming, cap))
                    connection.executemany(INSERT_ENTRY, [p[0] for p in params])
                    connection.executemany(INSERT_BLOB, [p[1] for p in params])
                break
            except CacheFullError:
                if attempt or not self._evict_for_full_disk(incoming):
                    raise
                log.warning("vyre-sqlcache: %s hit a full disk; evicted and retrying", self._path)
        self._note_unflushed(len(entries))

    def _note_unflushed(self, changes: int) -> None:
        """Count changes the next flush() must make durable (stores and deletions alike)."""
        if changes:
            with self._lock:
                self._unflushed += changes

    def _evict_for_full_disk(self, incoming: int) -> bool:
        """Free room after SQLITE_FULL: at least `incoming` bytes and a quarter of the blobs."""
        try:
            with self._write_transaction("evicting for a full disk") as connection:
                evicted = evict(connection, max(incoming, blob_bytes(connection) // 4), set())
        except CacheError:
            return False
        self._books.evicted(evicted)
        return evicted > 0

    # -- internals: reading ----------------------------------------------------------

    def _load(self, entry_key: bytes) -> bytes | None:
        if self._disabled:
            self._books.miss(persist=False)
            return None
        return self._verified(entry_key, self._fetch(self._cursor(), entry_key))

    def _fetch(self, cursor: apsw.Cursor, entry_key: bytes) -> tuple[str, bytes, bytes] | None:
        """The (checksum algorithm, checksum, data) of an entry, unverified, or None."""
        rowid = entry_id(entry_key)
        try:
            # fetchall, not fetchone: running the statement to its end resets it, so
            # no read transaction stays open between calls.
            rows = cursor.execute(_SELECT_BLOB, (rowid,)).fetchall()
            if not rows:
                return None
            algo, checksum, data = rows[0]
            if data is None:
                connection = self._large_blob_connection()
                # The blob may be replaced between the select and this read: a checksum
                # that then fails is looked at again before anything is dropped.
                blob = connection.blob_open("main", "blobs", "data", rowid, False)
                try:
                    data = blob.read()
                finally:
                    blob.close()
        except apsw.Error as error:
            # A read never takes the application down: damage or I/O trouble is a miss.
            self._note_damage(error)
            log.warning("vyre-sqlcache: reading %s failed: %s", entry_key.hex(), error)
            return None
        return algo, checksum, data  # type: ignore[return-value]

    def _verified(self, entry_key: bytes, fetched: tuple[str, bytes, bytes] | None) -> bytes | None:
        """The fetched data if its checksum holds, counting the hit or miss; else None."""
        if fetched is None:
            self._books.miss()
            return None
        algo, checksum, data = fetched
        if not checksums.matches(algo, checksum, entry_key, data):
            self._books.miss()
            self._on_mismatch(entry_key, algo)
            return None
        if self._books.hit(entry_id(entry_key)) and not self._readonly:
            self._write_bookkeeping_now(self._connection(), wait=False)
        return data

    def _on_mismatch(self, entry_key: bytes, algo: str) -> None:
        """Drop an entry whose bytes fail their checksum, once a locked second look agrees.

        The second look, under the write lock, rules out a blob replaced between two
        statements of the read, and a row that belongs to another key sharing the row id.
        """
        self._books.checksum_failed()
        if self._readonly:
            log.warning("vyre-sqlcache: entry %s failed its checksum", entry_key.hex())
            return
        rowid = entry_id(entry_key)
        try:
            with self._write_transaction("dropping a damaged entry") as connection:
                owner = connection.execute(
                    "SELECT entry_key FROM entries WHERE id = ?", (rowid,)
                ).fetchone()
                if owner is not None and owner[0] != entry_key:
                    return  # another key's row: a miss for us, not damage
                again = self._fetch(connection.cursor(), entry_key)
                if again is not None and checksums.matches(*again[:2], entry_key, again[2]):
                    return  # replaced while we read: it is good now
                log.warning(
                    "vyre-sqlcache: entry %s in %s failed its %s checksum; dropping it "
                    "(it will be recompiled)",
                    entry_key.hex(),
                    self._path,
                    algo,
                )
                connection.execute("DELETE FROM entries WHERE id = ?", (rowid,))
                connection.execute("DELETE FROM blobs WHERE id = ?", (rowid,))
                connection.execute(BUMP_META, (1, "checksum_failures"))
        except CacheError as error:
            log.warning("vyre-sqlcache: could not drop the damaged entry: %s", error)

    # -- internals: bookkeeping and damage --------------------------------------------

    def _write_bookkeeping_now(self, connection: apsw.Connection, *, wait: bool = True) -> None:
        """Write buffered bookkeeping in its own transaction; from a read, never wait."""
        if not wait:
            connection.set_busy_timeout(0)
        try:
            with immediate(connection):
                self._books.write(connection, _now_ms())
        except apsw.Error as error:
            # Best effort: a busy or read-only file keeps the buffer for later.
            log.debug("vyre-sqlcache: access times not written yet: %s", error)
        finally:
            if not wait:
                connection.set_busy_timeout(BUSY_TIMEOUT_MS)

    def _note_damage(self, error: apsw.Error) -> None:
        """Ask the next open to verify the file when SQLite met a damaged page."""
        if isinstance(error, (apsw.CorruptError, apsw.NotADBError)) and not self._readonly:
            with suppress(OSError):
                needs_check_marker(self._path).touch()
