"""`PipelineCache`: compiled pipeline blobs in one WAL-mode SQLite file."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import apsw
import platformdirs

from . import checksums
from .config import DEFAULT_MAX_BYTES, ENV_MAX_SIZE, Settings
from .connection import BUSY_TIMEOUT_MS, connect, immediate, translate
from .errors import (
    BlobTooLargeError,
    CacheError,
    CacheFullError,
    CorruptCacheError,
    ReadOnlyCacheError,
)
from .healing import move_aside, needs_check_marker
from .keys import DeviceFingerprint, PipelineCacheKey, check_u32, coerce_digest, entry_id
from .schema import prepare

__all__ = ["MAX_BLOB_BYTES", "CacheStats", "PipelineCache"]

log = logging.getLogger("vyre_sqlcache")

#: Largest blob a cache stores, as vyre's `MAX_DISK_PIPELINE_BLOB_BYTES` (64 MiB).
MAX_BLOB_BYTES = 64 * 1024 * 1024
#: Last-access times and hit counts are written at most this often from reads.
TOUCH_INTERVAL_S = 5.0
#: Blobs above this size are read with incremental blob I/O instead of in the row.
LARGE_BLOB_BYTES = 256 * 1024
#: Eviction frees this share of the cap beyond what is needed, so that a full
#: cache does not evict on every write.
EVICTION_SLACK = 0.05

_UNSET: Final[Any] = object()

_INSERT_ENTRY = """
INSERT INTO entries (
    id, entry_key, key_version, shader_hash, layout_hash, push_constant_size,
    workgroup_x, workgroup_y, workgroup_z, feature_flags, backend,
    vendor, device, driver_digest, program_digest, blob_size, created_ms, accessed_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    entry_key = excluded.entry_key, key_version = excluded.key_version,
    shader_hash = excluded.shader_hash, layout_hash = excluded.layout_hash,
    push_constant_size = excluded.push_constant_size, workgroup_x = excluded.workgroup_x,
    workgroup_y = excluded.workgroup_y, workgroup_z = excluded.workgroup_z,
    feature_flags = excluded.feature_flags, backend = excluded.backend,
    vendor = excluded.vendor, device = excluded.device, driver_digest = excluded.driver_digest,
    program_digest = excluded.program_digest, blob_size = excluded.blob_size,
    created_ms = excluded.created_ms, accessed_ms = excluded.accessed_ms, hits = 0
"""
_INSERT_BLOB = (
    "INSERT OR REPLACE INTO blobs (id, checksum_algo, checksum, data) VALUES (?, ?, ?, ?)"
)
# One statement a read-hit; a large blob stays out of the row and is read
# straight into its result with incremental blob I/O.
_SELECT_BLOB = (
    "SELECT checksum_algo, checksum, length(data), "
    f"CASE WHEN length(data) <= {LARGE_BLOB_BYTES} THEN data END FROM blobs WHERE id = ?"
)
_BUMP_META = "UPDATE meta SET value = value + ? WHERE name = ?"
_BLOB_BYTES = "SELECT value FROM meta WHERE name = 'blob_bytes'"
_COUNTERS = ("hits", "misses", "evictions", "checksum_failures")

# Bumped in a forked child: connections must never cross a fork.
_fork_generation = 0
# Connections inherited through fork are kept referenced so they are never
# closed (a close could checkpoint or delete the parent's write-ahead log).
_abandoned: list[apsw.Connection] = []


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _scalar(connection: apsw.Connection, sql: str, params: tuple[Any, ...] = ()) -> int:
    row = connection.execute(sql, params).fetchone()
    return 0 if row is None else int(row[0])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_blob(blob: Any) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, bytearray or memoryview, got {type(blob).__name__}")
    size = memoryview(blob).nbytes
    if size > MAX_BLOB_BYTES:
        raise BlobTooLargeError(
            f"blob is {size} bytes, over the {MAX_BLOB_BYTES}-byte (64 MiB) limit of a "
            "pipeline cache entry; nothing was written"
        )
    return bytes(blob)


def _check_fingerprint(fingerprint: Any) -> DeviceFingerprint:
    if not isinstance(fingerprint, DeviceFingerprint):
        raise TypeError(
            f"fingerprint must be a DeviceFingerprint, got {type(fingerprint).__name__}"
        )
    return fingerprint


def _check_key(key: Any) -> PipelineCacheKey:
    if not isinstance(key, PipelineCacheKey):
        raise TypeError(f"key must be a PipelineCacheKey, got {type(key).__name__}")
    return key


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


@dataclass(frozen=True, slots=True)
class _Row:
    """One entry ready to insert: validated and keyed."""

    entry_key: bytes
    key: PipelineCacheKey | None
    fingerprint: DeviceFingerprint | None
    program_digest: bytes | None
    blob: bytes
    created_ms: int | None = None

    def params(self, now_ms: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        rowid = entry_id(self.entry_key)
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
            else (None,) * 9
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
        )
        algo = checksums.DEFAULT
        blob = (rowid, algo, checksums.compute(algo, self.entry_key, self.blob), self.blob)
        return entry, blob


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
        immutable: bool,
        max_bytes: int | None,
        disabled: bool,
        vfs: str | None,
    ) -> None:
        """Set up a cache object; use `PipelineCache.open` instead."""
        self._path = path
        self._readonly = readonly
        self._immutable = immutable
        self._max_bytes = max_bytes
        self._disabled = disabled
        self._vfs = vfs
        self._closed = False
        self._reset_connections()
        # Shared by every thread; guarded by _lock.
        self._unflushed = 0
        self._touched: dict[int, int] = {}
        self._pending: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._next_touch_write = time.monotonic() + TOUCH_INTERVAL_S

    def _reset_connections(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[tuple[weakref.ref[threading.Thread], apsw.Connection]] = []
        self._generation = _fork_generation

    # -- opening and closing -------------------------------------------------------

    @staticmethod
    def default_path() -> Path:
        """The per-user cache file: `<user cache dir>/vyre/pipelines.sqlite3`."""
        return platformdirs.user_cache_path("vyre", appauthor=False) / "pipelines.sqlite3"

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
        if path is None:
            path = settings.path or cls.default_path()
        resolved = Path(path).expanduser()
        if max_bytes is _UNSET:
            max_bytes = DEFAULT_MAX_BYTES if settings.max_bytes is None else settings.max_bytes
            if max_bytes < 1:
                raise ValueError(f"{ENV_MAX_SIZE} must be at least 1 byte, got {max_bytes}")
        cap = _check_max_bytes(max_bytes)
        options: dict[str, Any] = {"max_bytes": cap, "vfs": vfs}
        if settings.disabled:
            return cls(resolved, readonly=True, immutable=False, disabled=True, **options)
        immutable = False
        if not readonly:
            readonly = cls._must_open_readonly(resolved)
            if readonly:
                log.info("vyre-sqlcache: %s is not writable; opening it read-only", resolved)
        if readonly:
            immutable = cls._needs_immutable(resolved)
        cache = cls(resolved, readonly=readonly, immutable=immutable, disabled=False, **options)
        try:
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
            folder_ok = os.access(path.parent, os.W_OK) or all(
                Path(str(path) + side).exists() for side in ("-wal", "-shm")
            )
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
                prepare(connection, where, readonly=self._readonly)
                if verify or marker.exists():
                    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
                    if problems != ["ok"]:
                        raise CorruptCacheError(
                            f"{where} fails quick_check: {'; '.join(problems[:3])}"
                        )
                    marker.unlink(missing_ok=True)
            except BaseException:
                connection.close()
                raise
        except apsw.Error as error:
            raise translate(error, "opening the cache", self._path) from error
        self._adopt(connection)

    def _open_connection(self) -> apsw.Connection:
        return connect(
            self._path, readonly=self._readonly, immutable=self._immutable, vfs=self._vfs
        )

    def _adopt(self, connection: apsw.Connection) -> None:
        self._local.connection = connection
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
        connection: apsw.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            try:
                connection = self._open_connection()
            except apsw.Error as error:
                raise translate(error, "opening a connection", self._path) from error
            self._adopt(connection)
        return connection

    def close(self) -> None:
        """Write pending bookkeeping, checkpoint into the main file and close; idempotent."""
        if self._closed or self._disabled:
            self._closed = True
            return
        try:
            if not self._readonly and self._generation == _fork_generation:
                connection = self._connection()
                self._write_bookkeeping_now(connection, wait=False)
                try:
                    connection.pragma("wal_checkpoint", "TRUNCATE")
                except apsw.Error as error:
                    log.warning(
                        "vyre-sqlcache: checkpoint on close of %s failed: %s", self._path, error
                    )
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
        fp = _check_fingerprint(fingerprint)
        digest = coerce_digest("program_digest", program_digest)
        data = _check_blob(blob)
        self._insert([_Row(fp.cache_key(digest), None, fp, digest, data)])

    def read(self, program_digest: bytes | str, fingerprint: DeviceFingerprint) -> bytes | None:
        """The blob stored for a program on a device, or None on a miss.

        Raises TypeError/ValueError for bad arguments; a damaged entry is a miss.
        """
        fp = _check_fingerprint(fingerprint)
        return self._load(fp.cache_key(program_digest))

    def flush(self) -> None:
        """Make every earlier write of this object durable (survives power loss).

        Raises CacheError if the sync fails; the writes stay pending and the next
        `flush()` retries them.
        """
        if self._disabled:
            return
        connection = self._connection()
        with self._lock:
            if self._unflushed == 0:
                return
            flushing = self._unflushed
        try:
            # One commit with synchronous=FULL syncs the write-ahead log, and with it
            # every frame committed before: this object's and other processes'.
            connection.pragma("synchronous", "FULL")
            try:
                with immediate(connection):
                    self._write_bookkeeping(connection)
                    connection.execute(_BUMP_META, (1, "flushes"))
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
        fp = _check_fingerprint(fingerprint)
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
                "DELETE FROM entries WHERE id IN carray(?1) OR (program_digest IN carray(?2) "
                "AND vendor = ?3 AND device = ?4 AND driver_digest = ?5)",
                (
                    apsw.carray(ids),
                    apsw.carray(tuple(impacted)),
                    fp.vendor,
                    fp.device,
                    fp.driver_digest,
                ),
            )
            return connection.changes()

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
        fp = _check_fingerprint(fingerprint)
        rows = []
        for item in items:
            key = _check_key(item[0])
            data = _check_blob(item[1])
            raw_digest = item[2] if len(item) > 2 else None
            digest = None if raw_digest is None else coerce_digest("program_digest", raw_digest)
            rows.append(_Row(key.entry_key(fp), key, fp, digest, data))
        self._insert(rows)

    def get(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bytes | None:
        """The blob stored under `key` on a device, or None on a miss.

        Raises TypeError for bad arguments; a damaged entry is a miss.
        """
        return self._load(_check_key(key).entry_key(_check_fingerprint(fingerprint)))

    def get_many(
        self, keys: Iterable[PipelineCacheKey], fingerprint: DeviceFingerprint
    ) -> list[bytes | None]:
        """The blobs of many keys (None for each miss), read from one snapshot."""
        fp = _check_fingerprint(fingerprint)
        entry_keys = [_check_key(k).entry_key(fp) for k in keys]
        if self._disabled:
            return [self._load(k) for k in entry_keys]
        connection = self._connection()
        try:
            connection.execute("BEGIN")
        except apsw.Error as error:
            raise translate(error, "reading entries", self._path) from error
        try:
            results = [self._fetch(connection, k) for k in entry_keys]
        finally:
            connection.execute("COMMIT")
        return [self._verified(k, r) for k, r in zip(entry_keys, results, strict=True)]

    def contains(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Whether an entry is stored under `key` on a device (its bytes are not verified)."""
        entry_key = _check_key(key).entry_key(_check_fingerprint(fingerprint))
        if self._disabled:
            return False
        connection = self._connection()
        try:
            row = connection.execute(
                "SELECT entry_key FROM entries WHERE id = ?", (entry_id(entry_key),)
            ).fetchone()
        except apsw.Error as error:
            raise translate(error, "looking up an entry", self._path) from error
        return row is not None and row[0] == entry_key

    def delete(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Delete the entry under `key` on a device; return whether there was one."""
        entry_key = _check_key(key).entry_key(_check_fingerprint(fingerprint))
        if self._disabled:
            return False
        with self._write_transaction("deleting an entry") as connection:
            connection.execute(
                "DELETE FROM entries WHERE id = ? AND entry_key = ?",
                (entry_id(entry_key), entry_key),
            )
            return connection.changes() > 0

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
        data = _check_blob(blob)
        if created_ms is not None and (
            isinstance(created_ms, bool) or not isinstance(created_ms, int)
        ):
            raise TypeError(f"created_ms must be an int or None, got {type(created_ms).__name__}")
        self._insert([_Row(key, None, None, None, data, created_ms)])

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
            return connection.changes()

    def check_entry(self, entry_key: bytes | str) -> bool | None:
        """Whether an entry's bytes match its checksum (None: no such entry); changes nothing."""
        key = coerce_digest("entry_key", entry_key)
        if self._disabled:
            return None
        fetched = self._fetch(self._connection(), key)
        if fetched is None:
            return None
        return checksums.matches(fetched[0], fetched[1], key, fetched[2])

    def __len__(self) -> int:
        """The number of entries."""
        return self.stats().entries

    def stats(self) -> CacheStats:
        """Sizes and counters: this object's hits/misses/evictions/checksum failures, and
        the totals kept in the file (which include this object's once written)."""
        with self._lock:
            counts = Counter(self._counts)
        totals: dict[str, int] = {}
        file_bytes = 0
        if not self._disabled:
            connection = self._connection()
            try:
                totals = dict(connection.execute("SELECT name, value FROM meta"))
            except apsw.Error as error:
                raise translate(error, "reading statistics", self._path) from error
            for suffix in ("", "-wal"):
                with suppress(FileNotFoundError):
                    file_bytes += os.stat(str(self._path) + suffix).st_size
        with self._lock:
            pending = Counter(self._pending)
        return CacheStats(
            path=self._path,
            entries=totals.get("entries", 0),
            blob_bytes=totals.get("blob_bytes", 0),
            file_bytes=file_bytes,
            max_bytes=self._max_bytes,
            hits=counts["hits"],
            misses=counts["misses"],
            evictions=counts["evictions"],
            checksum_failures=counts["checksum_failures"],
            total_hits=totals.get("hits", 0) + pending["hits"],
            total_misses=totals.get("misses", 0) + pending["misses"],
            total_evictions=totals.get("evictions", 0),
            total_checksum_failures=totals.get("checksum_failures", 0),
            total_flushes=totals.get("flushes", 0),
        )

    # -- internals: writing --------------------------------------------------------

    @contextmanager
    def _write_transaction(self, what: str) -> Iterator[apsw.Connection]:
        if self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; open it without readonly=True, "
                "from a process that may write the file, to change it"
            )
        connection = self._connection()
        try:
            with immediate(connection):
                self._write_bookkeeping(connection)
                yield connection
        except apsw.Error as error:
            self._note_damage(error)
            raise translate(error, what, self._path) from error

    def _insert(self, rows: list[_Row]) -> None:
        if not rows:
            return
        cap = self._max_bytes
        if cap is not None:
            incoming = sum(len(row.blob) for row in rows)
            if incoming > cap:
                raise BlobTooLargeError(
                    f"{'blob is' if len(rows) == 1 else f'{len(rows)} blobs are'} {incoming} "
                    f"bytes, over the cache's size cap of {cap} bytes (max_bytes / "
                    f"{ENV_MAX_SIZE}); raise the cap to store it; nothing was written"
                )
        if self._disabled:
            return
        now = _now_ms()
        params = [row.params(now) for row in rows]
        ids = array("q", (p[0][0] for p in params))
        for attempt in range(2):
            try:
                with self._write_transaction("storing entries") as connection:
                    if cap is not None:
                        self._make_room(connection, ids, incoming, cap)
                    connection.executemany(_INSERT_ENTRY, [p[0] for p in params])
                    connection.executemany(_INSERT_BLOB, [p[1] for p in params])
                break
            except CacheFullError:
                if attempt or not self._evict_for_full_disk(sum(len(r.blob) for r in rows)):
                    raise
                log.warning("vyre-sqlcache: %s hit a full disk; evicted and retrying", self._path)
        with self._lock:
            self._unflushed += len(rows)

    def _make_room(
        self, connection: apsw.Connection, ids: array[int], incoming: int, cap: int
    ) -> None:
        """Evict least-recently-used entries so that the insert keeps blob bytes under `cap`."""
        total = _scalar(connection, _BLOB_BYTES)
        replaced = _scalar(
            connection,
            "SELECT coalesce(sum(blob_size), 0) FROM entries WHERE id IN carray(?)",
            (apsw.carray(ids),),
        )
        excess = total - replaced + incoming - cap
        if excess > 0:
            self._evict(connection, excess + int(cap * EVICTION_SLACK), keep=set(ids))

    def _evict(self, connection: apsw.Connection, bytes_to_free: int, keep: set[int]) -> int:
        """Delete least-recently-used entries (in one statement) until enough bytes are free."""
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
                assert isinstance(rowid, int) and isinstance(size, int)
                if rowid in keep:
                    continue
                victims.append(rowid)
                freed += size
                if freed >= bytes_to_free:
                    break
        if victims:
            connection.execute("DELETE FROM entries WHERE id IN carray(?)", (apsw.carray(victims),))
            connection.execute(_BUMP_META, (len(victims), "evictions"))
            with self._lock:
                self._counts["evictions"] += len(victims)
        return len(victims)

    def _evict_for_full_disk(self, incoming: int) -> bool:
        """Free room after SQLITE_FULL: at least `incoming` bytes, at least a quarter."""
        try:
            with self._write_transaction("evicting for a full disk") as connection:
                total = _scalar(connection, _BLOB_BYTES)
                return self._evict(connection, max(incoming, total // 4), keep=set()) > 0
        except CacheError:
            return False

    # -- internals: reading ----------------------------------------------------------

    def _fetch(
        self, connection: apsw.Connection, entry_key: bytes
    ) -> tuple[str, bytes, bytes] | None:
        """The (checksum algorithm, checksum, data) of an entry, unverified, or None."""
        rowid = entry_id(entry_key)
        try:
            row = connection.execute(_SELECT_BLOB, (rowid,)).fetchone()
            if row is None:
                return None
            algo, checksum, size, data = row
            if data is None:
                with connection.blob_open("main", "blobs", "data", rowid, False) as blob:
                    data = blob.read(size)
        except apsw.Error as error:
            # A read never takes the application down: damage or I/O trouble is a miss.
            self._note_damage(error)
            log.warning(
                "vyre-sqlcache: reading %s from %s failed: %s", entry_key.hex(), self._path, error
            )
            return None
        return algo, checksum, data

    def _load(self, entry_key: bytes) -> bytes | None:
        if self._disabled:
            with self._lock:
                self._counts["misses"] += 1
            return None
        return self._verified(entry_key, self._fetch(self._connection(), entry_key))

    def _verified(self, entry_key: bytes, fetched: tuple[str, bytes, bytes] | None) -> bytes | None:
        """Return `data` if its checksum holds, recording the hit or miss; None otherwise."""
        rowid = entry_id(entry_key)
        algo, checksum, data = fetched if fetched is not None else (None, b"", b"")
        ok = algo is not None and checksums.matches(algo, checksum, entry_key, data)
        with self._lock:
            if ok:
                self._counts["hits"] += 1
                self._pending["hits"] += 1
                self._touched[rowid] = self._touched.get(rowid, 0) + 1
            else:
                self._counts["misses"] += 1
                self._pending["misses"] += 1
            due = time.monotonic() >= self._next_touch_write
        if algo is not None and not ok:
            self._on_mismatch(entry_key, algo)
        elif due and not self._readonly:
            self._write_bookkeeping_now(self._connection(), wait=False)
        return data if ok else None

    def _on_mismatch(self, entry_key: bytes, algo: str) -> None:
        """Drop an entry whose bytes fail their checksum, unless the row is another key's."""
        rowid = entry_id(entry_key)
        connection = self._connection()
        try:
            owner = connection.execute(
                "SELECT entry_key FROM entries WHERE id = ?", (rowid,)
            ).fetchone()
        except apsw.Error:
            owner = None
        if owner is not None and owner[0] != entry_key:
            return  # another key shares the row id: a miss for us, not damage
        log.warning(
            "vyre-sqlcache: entry %s in %s failed its %s checksum; dropping it (it will be "
            "recompiled)",
            entry_key.hex(),
            self._path,
            algo,
        )
        with self._lock:
            self._counts["checksum_failures"] += 1
        if self._readonly:
            return
        try:
            with self._write_transaction("dropping a damaged entry") as connection:
                connection.execute("DELETE FROM entries WHERE id = ?", (rowid,))
                connection.execute("DELETE FROM blobs WHERE id = ?", (rowid,))
                connection.execute(_BUMP_META, (1, "checksum_failures"))
        except CacheError as error:
            log.warning("vyre-sqlcache: could not drop the damaged entry: %s", error)

    # -- internals: bookkeeping -----------------------------------------------------

    def _write_bookkeeping(self, connection: apsw.Connection) -> None:
        """Write buffered access times, hit counts and counters, inside the caller's txn."""
        with self._lock:
            touched, self._touched = self._touched, {}
            pending, self._pending = self._pending, Counter()
            self._next_touch_write = time.monotonic() + TOUCH_INTERVAL_S
        if not touched and not pending:
            return
        try:
            now = _now_ms()
            connection.executemany(
                "UPDATE entries SET accessed_ms = ?, hits = hits + ? WHERE id = ?",
                [(now, hits, rowid) for rowid, hits in touched.items()],
            )
            connection.executemany(
                _BUMP_META, [(delta, name) for name, delta in pending.items() if delta]
            )
        except BaseException:
            with self._lock:  # not written: keep them for the next write
                for rowid, hits in touched.items():
                    self._touched[rowid] = self._touched.get(rowid, 0) + hits
                self._pending.update(pending)
            raise

    def _write_bookkeeping_now(self, connection: apsw.Connection, *, wait: bool) -> None:
        """Write buffered bookkeeping in its own transaction; never blocks a read for long."""
        if not wait:
            connection.set_busy_timeout(0)
        try:
            with immediate(connection):
                self._write_bookkeeping(connection)
        except apsw.Error as error:
            # Bookkeeping is best effort: a busy or read-only file keeps it for later.
            log.debug("vyre-sqlcache: access times not written yet: %s", error)
        finally:
            if not wait:
                connection.set_busy_timeout(BUSY_TIMEOUT_MS)

    def _note_damage(self, error: apsw.Error) -> None:
        """Ask the next open to verify the file when SQLite met a damaged page."""
        if isinstance(error, (apsw.CorruptError, apsw.NotADBError)) and not self._readonly:
            with suppress(OSError):
                needs_check_marker(self._path).touch()
