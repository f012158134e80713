"""`PipelineCache`: compiled pipeline blobs in one WAL-mode SQLite file."""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import apsw
import platformdirs

from . import checksums
from .connection import connect, immediate, sqlite_errors
from .errors import BlobTooLargeError, CacheError, ReadOnlyCacheError
from .keys import DeviceFingerprint, PipelineCacheKey, check_u32, coerce_digest, entry_id
from .schema import prepare

__all__ = ["MAX_BLOB_BYTES", "PipelineCache"]

log = logging.getLogger("vyre_sqlcache")

#: Largest blob a cache stores, as vyre's `MAX_DISK_PIPELINE_BLOB_BYTES` (64 MiB).
MAX_BLOB_BYTES = 64 * 1024 * 1024

_INSERT_ENTRY = """
INSERT OR REPLACE INTO entries (
    id, entry_key, key_version, shader_hash, layout_hash, push_constant_size,
    workgroup_x, workgroup_y, workgroup_z, feature_flags, backend,
    vendor, device, driver_digest, program_digest, blob_size, created_ms, accessed_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_BLOB = (
    "INSERT OR REPLACE INTO blobs (id, checksum_algo, checksum, data) VALUES (?, ?, ?, ?)"
)
_SELECT_BLOB = "SELECT checksum_algo, checksum, data FROM blobs WHERE id = ?"


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


@dataclass(frozen=True, slots=True)
class _Row:
    """One entry ready to insert: validated, keyed and checksummed."""

    entry_key: bytes
    key: PipelineCacheKey | None
    fingerprint: DeviceFingerprint
    program_digest: bytes | None
    blob: bytes

    def params(self, now_ms: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        rowid = entry_id(self.entry_key)
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
        entry = (
            rowid,
            self.entry_key,
            *key_columns,
            fp.vendor,
            fp.device,
            fp.driver_digest,
            self.program_digest,
            len(self.blob),
            now_ms,
            now_ms,
        )
        algo = checksums.DEFAULT
        blob = (rowid, algo, checksums.compute(algo, self.entry_key, self.blob), self.blob)
        return entry, blob


class PipelineCache:
    """A pipeline cache in one SQLite file, shared safely by threads and processes.

    Create it with `PipelineCache.open()`; use it as a context manager or call `close()`.
    """

    def __init__(self, connection: apsw.Connection, path: Path, *, readonly: bool) -> None:
        """Wrap an open, migrated connection; use `PipelineCache.open` instead."""
        self._connection = connection
        self._path = path
        self._readonly = readonly
        # One connection serves every thread; the lock keeps one thread's
        # transaction from interleaving with another's statements.
        self._lock = threading.RLock()
        self._unflushed = 0
        self._closed = False

    # -- opening and closing -------------------------------------------------------

    @staticmethod
    def default_path() -> Path:
        """The per-user cache file: `<user cache dir>/vyre/pipelines.sqlite3`."""
        return platformdirs.user_cache_path("vyre", appauthor=False) / "pipelines.sqlite3"

    @classmethod
    def open(
        cls, path: str | Path | None = None, *, readonly: bool = False, vfs: str | None = None
    ) -> PipelineCache:
        """Open (creating if needed) the cache at `path`, or at `default_path()` when None.

        `vfs` names a registered SQLite VFS to do the file I/O (for tests and special
        storage); the default is the operating system's.

        Raises SchemaTooNewError for a file from a newer vyre-sqlcache, CorruptCacheError
        for a file that is not a cache, and CacheError if the file cannot be opened.
        """
        resolved = cls.default_path() if path is None else Path(path)
        if not readonly:
            try:
                resolved.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CacheError(
                    f"cannot create the folder of cache file {resolved}: {error}; "
                    "choose a writable path"
                ) from error
        with sqlite_errors("opening the cache", resolved):
            connection = connect(resolved, readonly=readonly, vfs=vfs)
            try:
                prepare(connection, str(resolved), readonly=readonly)
            except BaseException:
                connection.close()
                raise
        return cls(connection, resolved, readonly=readonly)

    def close(self) -> None:
        """Checkpoint the write-ahead log into the main file and close; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self._readonly:
                    with sqlite_errors("checkpointing on close", self._path):
                        self._connection.pragma("wal_checkpoint", "TRUNCATE")
            finally:
                self._connection.close()

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
        """Whether writes are refused."""
        return self._readonly

    # -- the vyre API: entries by program digest -----------------------------------

    def write(
        self, program_digest: bytes | str, fingerprint: DeviceFingerprint, blob: bytes
    ) -> None:
        """Store `blob` for a program on a device, atomically (durable after `flush()`).

        Raises BlobTooLargeError over 64 MiB, TypeError/ValueError for bad arguments,
        ReadOnlyCacheError on a read-only cache; nothing is written when it raises.
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
        with self._lock:
            self._check_open()
            if self._unflushed == 0:
                return
            connection = self._connection
            with sqlite_errors("flushing", self._path):
                # One commit with synchronous=FULL syncs the write-ahead log, and
                # with it every frame committed before: ours and other processes'.
                connection.pragma("synchronous", "FULL")
                try:
                    with immediate(connection):
                        connection.execute(
                            "UPDATE meta SET value = value + 1 WHERE name = 'flushes'"
                        )
                finally:
                    connection.pragma("synchronous", "NORMAL")
            self._unflushed = 0

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
        if not impacted:
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
        """The blobs of many keys (None for each miss), read in one transaction."""
        fp = _check_fingerprint(fingerprint)
        entry_keys = [_check_key(k).entry_key(fp) for k in keys]
        with self._lock:
            self._check_open()
            with sqlite_errors("reading entries", self._path):
                self._connection.execute("BEGIN")
                try:
                    return [self._load(k) for k in entry_keys]
                finally:
                    self._connection.execute("COMMIT")

    def contains(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Whether an entry is stored under `key` on a device (its bytes are not verified)."""
        entry_key = _check_key(key).entry_key(_check_fingerprint(fingerprint))
        with self._lock:
            self._check_open()
            with sqlite_errors("looking up an entry", self._path):
                row = self._connection.execute(
                    "SELECT entry_key FROM entries WHERE id = ?", (entry_id(entry_key),)
                ).fetchone()
        return row is not None and row[0] == entry_key

    def delete(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Delete the entry under `key` on a device; return whether there was one."""
        entry_key = _check_key(key).entry_key(_check_fingerprint(fingerprint))
        with self._write_transaction("deleting an entry") as connection:
            connection.execute(
                "DELETE FROM entries WHERE id = ? AND entry_key = ?",
                (entry_id(entry_key), entry_key),
            )
            return connection.changes() > 0

    def __len__(self) -> int:
        """The number of entries."""
        with self._lock:
            self._check_open()
            with sqlite_errors("counting entries", self._path):
                row = self._connection.execute("SELECT count(*) FROM entries").fetchone()
        assert row is not None
        return int(row[0])

    # -- internals -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError(f"the cache {self._path} is closed; open it again to use it")

    def _check_writable(self) -> None:
        if self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; open it without readonly=True, "
                "from a process that may write the file, to store entries"
            )

    @contextmanager
    def _write_transaction(self, what: str) -> Iterator[apsw.Connection]:
        with self._lock:
            self._check_open()
            self._check_writable()
            with sqlite_errors(what, self._path), immediate(self._connection):
                yield self._connection

    def _insert(self, rows: list[_Row]) -> None:
        if not rows:
            return
        now = _now_ms()
        params = [row.params(now) for row in rows]
        with self._write_transaction("storing entries") as connection:
            connection.executemany(_INSERT_ENTRY, [p[0] for p in params])
            connection.executemany(_INSERT_BLOB, [p[1] for p in params])
        self._unflushed += len(rows)

    def _load(self, entry_key: bytes) -> bytes | None:
        with self._lock:
            self._check_open()
            with sqlite_errors("reading an entry", self._path):
                row = self._connection.execute(_SELECT_BLOB, (entry_id(entry_key),)).fetchone()
                if row is None:
                    return None
                algo, checksum, data = row
                if checksums.matches(algo, checksum, entry_key, data):
                    return data  # type: ignore[no-any-return]
                self._on_mismatch(entry_key, algo)
                return None

    def _on_mismatch(self, entry_key: bytes, algo: str) -> None:
        """Drop an entry whose bytes fail their checksum, unless the row is another key's."""
        owner = self._connection.execute(
            "SELECT entry_key FROM entries WHERE id = ?", (entry_id(entry_key),)
        ).fetchone()
        if owner is not None and owner[0] != entry_key:
            return  # another key shares the row id: a miss for us, not damage
        log.warning(
            "vyre-sqlcache: entry %s in %s failed its %s checksum; dropping it (it will be "
            "recompiled)",
            entry_key.hex(),
            self._path,
            algo,
        )
        if self._readonly:
            return
        with immediate(self._connection):
            self._connection.execute("DELETE FROM entries WHERE id = ?", (entry_id(entry_key),))
            self._connection.execute("DELETE FROM blobs WHERE id = ?", (entry_id(entry_key),))
            self._connection.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'checksum_failures'"
            )
