"""`PipelineCache`: compiled pipeline blobs in one WAL-mode SQLite file.

This module orchestrates: it checks arguments (`_checks`), finds and heals the
file (`_cachefile`), borrows this thread's connection (`_connections`), runs the
statements (`_rows`) in transactions, and counts (`_bookkeeping`). It holds no
SQL of its own.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
import weakref
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import apsw
import platformdirs

from . import _codec, _connections, _explain_sql, _layers, _remote, _rows, _snapshots, _wakeup
from ._bookkeeping import Bookkeeping
from ._cachefile import (
    HEAD_WAIT_S,
    CacheFile,
    FileWatch,
    has_side_files,
    header_damage,
    inode,
    is_not_sqlite,
    looks_like_damaged_pages,
    make_file_if_missing,
    move_aside,
    needs_check_marker,
    network_file_system,
    read_head,
    remove_foreign_side_files,
    remove_own_side_files,
)
from ._checkpointer import (
    FULL_DISK_STEP_ENTRIES,
    Checkpointer,
    FullDiskEviction,
    copy_log,
    restart_log,
)
from ._checks import (
    MAX_BLOB_BYTES,
    check_blob,
    check_created_ms,
    check_fingerprint,
    check_impact,
    check_item,
    check_key,
    check_max_bytes,
)
from ._combine import sound_entry
from ._connections import (
    READ_ERRORS,
    ConnectionPool,
    Slot,
    connect,
    has_moved,
    interrupts_held,
    next_call,
    open_in_process,
    retry_busy,
    transaction,
    translate,
    waiter_of,
)
from ._explain import CacheExplain, MissLog
from ._maintenance import CacheMaintenance
from ._named import NamedEntries
from ._rows import NewEntry
from ._schema import prepare
from ._writer import Dropped, WriteBehind
from .config import (
    DEFAULT_COMPRESSION,
    DEFAULT_MAX_BYTES,
    ENV_COMPRESSION,
    ENV_MAX_SIZE,
    ENV_PATH,
    Settings,
    expand_home,
)
from .errors import (
    BlobTooLargeError,
    CacheBusyError,
    CacheError,
    CacheFullError,
    CorruptCacheError,
    NotACacheError,
    ReadOnlyCacheError,
)
from .keys import (
    DeviceFingerprint,
    PipelineCacheKey,
    coerce_digest,
    entry_id,
)

__all__ = ["MAX_BLOB_BYTES", "CacheStats", "PipelineCache"]

log = logging.getLogger("vyre_sqlcache")

_UNSET: Final[Any] = object()

#: Blobs from this size on are committed by the caller, not queued: a commit of a large
#: blob costs more than the queue saves.
DIRECT_WRITE_BYTES = 256 * 1024
#: How long `close()` goes on purging tombstoned entries the background purge left.
PURGE_AT_CLOSE_S = 0.2
T = TypeVar("T")


#: Row ids of writes since the last flush kept beyond this: then entries created since
#: the flush (less `CLOCK_SLACK_MS`) are what a reopen writes again.
MAX_TRACKED_WRITES: Final = 1 << 16
CLOCK_SLACK_MS: Final = 2000


#: `_inode` of a cache whose file left the path as it was opened: no file has it.
MOVED: Final = (-1, -1)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    #: bytes the blobs take as stored (compressed or raw); `blob_bytes` is what callers
    #: wrote and read back. The size cap counts `stored_bytes + dictionary_bytes`.
    stored_bytes: int = 0
    #: bytes of the trained compression dictionaries kept in the file
    dictionary_bytes: int = 0
    #: blob_bytes / stored_bytes (1.0 for an empty or uncompressed cache)
    compression_ratio: float = 1.0
    #: what this object writes: 'off' or 'zstd-<level>'
    compression: str = "off"
    #: hits of this object served by a read-only layer (also counted in `hits`)
    layer_hits: int = 0
    #: the shared tier's counters, None without a remote (see README "Sharing a cache")
    remote: _remote.RemoteStats | None = None


class _Callback:
    """A cache's method, called through a weak reference: the thread or pool holding it
    does not keep the cache alive. Raises CacheError once the cache is gone."""

    __slots__ = ("_name", "_reference")

    def __init__(self, cache: PipelineCache, name: str) -> None:
        self._name = name
        self._reference: Callable[[], PipelineCache | None] = weakref.ref(cache)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self._reference()
        if cache is None:
            raise Dropped("the cache object was dropped; open the cache again")
        return getattr(cache, self._name)(*args, **kwargs)

    def pin(self, cache: PipelineCache) -> None:
        """Reach `cache` strongly from now on: the garbage collector clears the weak
        references to a cycle before its __del__ runs, and close() needs them."""
        self._reference = lambda: cache


def _close_dropped(cache: PipelineCache) -> None:
    """Close a cache its owner dropped without close(); a failure is logged (a thread's
    uncaught exception would print a traceback no caller asked for)."""
    try:
        cache.close()
    except Exception as error:
        log.warning("vyre-sqlcache: closing %s, dropped unclosed, failed: %s", cache.path, error)


#: Cache files this process has warned about being on a network file system.
_warned_network: set[Path] = set()


def _warn_if_shared_between_hosts(path: Path) -> None:
    """Warn, once per file and process, that a file on a network file system must not be
    used from several hosts: SQLite's write-ahead log keeps its index in shared memory
    (the -shm), which one host's processes share and other hosts never see."""
    if path in _warned_network:
        return
    name = network_file_system(path.parent)
    if name is None:
        return
    _warned_network.add(path)
    log.warning(
        "vyre-sqlcache: %s is on a network file system (%s): the processes of one host may "
        "share it, never those of several hosts (SQLite's write-ahead log keeps its index "
        "in each host's memory, so their commits would damage the file); give each host a "
        "local path (VYRE_SQLCACHE_PATH), and share what one host compiled through a layer "
        "or a Redis tier",
        path,
        name,
    )


class PipelineCache(CacheMaintenance, NamedEntries, CacheExplain):
    """A pipeline cache in one SQLite file, shared safely by threads and processes.

    Create it with `PipelineCache.open()`; use it as a context manager or call `close()`.
    Each thread gets its own SQLite connection, so readers in different threads run in
    parallel (apsw releases the GIL inside SQLite) and a transaction is never shared.
    """

    def __init__(
        self,
        file: CacheFile,
        *,
        readonly: bool,
        max_bytes: int | Any | None,
        vfs: str | None,
        write_behind: bool = True,
    ) -> None:
        """Set up a cache object; use `PipelineCache.open` instead."""
        self._file = file
        self._path = file.path
        self._readonly = readonly or not file.writable
        # An explicit cap (argument or environment) wins for this object; otherwise the
        # file's own, read in every write transaction.
        self._cap_override: int | Any | None = max_bytes
        self._cap: int | None = DEFAULT_MAX_BYTES if max_bytes is _UNSET else max_bytes
        self._bad_cap: int | None = None  # a cap in the file that cannot be, once warned
        self._read_failures: set[str] = set()  # the kinds of read failure logged
        self._vfs = vfs
        self._books = Bookkeeping()
        self._lock = threading.Lock()  # guards _unflushed
        self._unflushed = 0
        # Its threads and pool reach back through weak references: a cache dropped
        # without close() is collected, and closed by __del__, as a file is.
        self._callbacks = {
            name: _Callback(self, name)
            for name in (
                "_copy_log",
                "_restart_log",
                "_purge_batch",
                "_connect",
                "_commit_entries",
                "_follow_before_fork",
            )
        }
        self._checkpointer = Checkpointer(
            self._callbacks["_copy_log"],
            self._callbacks["_restart_log"],
            self._callbacks["_purge_batch"],
            where=str(file.path),
        )
        self._pool = ConnectionPool(self._callbacks["_connect"], file.path)
        wal = Path(f"{file.path}-wal")
        self._leftover_log = wal.exists() and wal.stat().st_size > 0
        # A reader that cannot write the folder reopens when the owner changes the file.
        self._watch = FileWatch(file)
        self._generation = threading.local()  # the watch's generation this thread reads
        self._codec = _codec.Codec(None)
        self._write_behind = write_behind
        self._writer = WriteBehind(
            self._callbacks["_commit_entries"],
            self._callbacks["_follow_before_fork"],
            self._pool.writing_here,
        )
        self._layers = _layers.Layers((), self._books.checksum_failed)
        self._remote: _remote.RemoteTier | None = None
        self._miss_log: MissLog | None = None  # see `open(log_misses=...)`
        # The file this object has open, and what it writes again should the path come to
        # name another file (see `_follow_the_path`): the row ids committed since the last
        # flush (None: too many to track, then those created since `_flushed_ms`).
        self._inode: tuple[int, int] | None = None
        self._since_flush: set[int] | None = set()
        self._flushed_ms = _now_ms()
        self._reopen_due = False  # the old file is closed, the one at the path not opened
        # Read from the old file once the path named another, until committed to the new.
        self._rescued: list[NewEntry] | None = None
        self._made = True  # (__del__ leaves alone an object an exception cut short here)

    # -- opening and closing -------------------------------------------------------

    @staticmethod
    def default_path() -> Path:
        """The per-user cache file: `<user cache dir>/vyre/pipelines.sqlite3`. Raises
        CacheError where the user has no home folder to find it in."""
        try:
            folder = platformdirs.user_cache_path("vyre", appauthor=False)
        except RuntimeError:
            raise CacheError(
                "the default cache file lies in the user's cache folder, which cannot be "
                "found: HOME is not set, and the password database has no home folder for "
                f"this user; set {ENV_PATH} or XDG_CACHE_HOME, or give a path"
            ) from None
        return folder / "pipelines.sqlite3"

    @classmethod
    def resolve_path(cls, path: str | Path | None, settings: Settings | None = None) -> Path:
        """The file `open(path)` uses: `path`, else `$VYRE_SQLCACHE_PATH`, else the default
        (`~` expanded; symbolic links are resolved when the file is opened)."""
        if path is None:
            settings = Settings.from_environment() if settings is None else settings
            path = settings.path or cls.default_path()
        elif not isinstance(path, (str, PathLike)) or isinstance(os.fspath(path), bytes):
            raise TypeError(
                f"path must be a str or os.PathLike path (or None for the default), got "
                f"{type(path).__name__} {path!r:.80}"
            )
        elif not os.fspath(path):
            raise ValueError("path is empty; give a cache file's path, or None for the default")
        return expand_home(path)

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
        write_behind: bool = True,
        compression: str | int = _UNSET,
        layers: Sequence[str | PathLike[str]] | None = None,
        remote: str | _remote.RemoteSettings | None = _UNSET,
        log_misses: bool | None = None,
    ) -> PipelineCache:
        """Open (creating if needed) the cache at `path`.

        `path=None` means `$VYRE_SQLCACHE_PATH`, else `default_path()`. `max_bytes` caps the
        blob bytes and is kept in the file for every process (default: `$VYRE_SQLCACHE_MAX_SIZE`
        for this process only, else the file's cap, else 1 GiB; None: no cap). A file that
        cannot be written opens read-only; `readonly=True` never changes the file. A damaged
        cache (failing `quick_check` when `verify=True` or after damage was met in use) is
        moved aside and replaced; `strict=True` raises CorruptCacheError instead.
        `VYRE_SQLCACHE_DISABLE=1` gives a cache that stores nothing. `vfs` names a SQLite VFS.
        With `write_behind` (the default) writes are queued and committed by a thread in
        groups a few milliseconds later; `flush()` commits and syncs; without it each write
        commits before it returns. `compression` is what this object writes: 'auto' (zstd
        where it saves at least 1/8, with dictionaries trained per backend and device; raw
        without the zstandard package), 'off', or a zstd level from 1 to 22 (default:
        `$VYRE_SQLCACHE_COMPRESSION`, else `config.DEFAULT_COMPRESSION`); every entry reads
        back whatever wrote it. `layers` are read-only cache files (made by `bundle`) read,
        in order, after this one on every miss (default: `$VYRE_SQLCACHE_LAYERS`); one that
        cannot be used is skipped with a warning. `remote` is a shared tier behind the file
        and its layers: a redis:// URL (with `$VYRE_SQLCACHE_REMOTE_MODE`, `_KEY`,
        `_TIMEOUT`), a `RemoteSettings`, or None for none (default:
        `$VYRE_SQLCACHE_REMOTE`); see README "Sharing a cache". `log_misses` keeps a bounded
        log of the misses of `get`, `get_many` and `read` in the file, for `misses()`
        (default: `$VYRE_SQLCACHE_LOG_MISSES`, else off; a read-only cache logs nothing).

        Raises SchemaTooNewError (file from a newer library), NotACacheError (another
        program's file or database, a FIFO or device), ReadOnlyCacheError (a layer file
        opened for writing), CorruptCacheError (with strict),
        ValueError/TypeError (malformed environment variable or argument), CacheError
        (cannot open: a folder, a file with several hard links, no permission),
        ImportError (a `remote` argument without the `remote` extra installed).
        """
        # Explicit arguments win: their variables are not read (a malformed one is no
        # reason to refuse an open that does not use it). A remote URL still takes the
        # environment's mode, key, timeout and prefix (below).
        given = {
            "path": path is not None,
            "max_bytes": max_bytes is not _UNSET,
            "compression": compression is not _UNSET,
            "layers": layers is not None,
            "log_misses": log_misses is not None,
            "remote": remote is not _UNSET,
        }
        settings = Settings.from_environment(ignore={name for name, yes in given.items() if yes})
        if log_misses is not None and not isinstance(log_misses, bool):
            raise TypeError(f"log_misses must be True, False or None, got {log_misses!r}")
        if compression is _UNSET:
            level = _codec.parse_compression(
                settings.compression or DEFAULT_COMPRESSION, ENV_COMPRESSION
            )
        else:
            level = _codec.parse_compression(compression)
        # A cap given as an argument is stored in the file for every process; one from the
        # environment applies to the processes that set it, and is never stored.
        store_cap = max_bytes is not _UNSET
        if max_bytes is _UNSET:
            if settings.max_bytes is not None:
                max_bytes = check_max_bytes(settings.max_bytes, ENV_MAX_SIZE)
        else:
            max_bytes = check_max_bytes(max_bytes)
        resolved = cls.resolve_path(path, settings)
        layer_paths = (
            settings.layers if layers is None else _layers.check_layer_paths("layers", layers)
        )
        if settings.disabled:
            from ._disabled import DisabledCache

            return DisabledCache(CacheFile(resolved, writable=False, immutable=False), max_bytes)
        # Before anything is made: a bad remote argument leaves no file behind.
        tier = _remote.open_tier(remote, settings.remote, given=remote is not _UNSET)
        file = CacheFile.locate(resolved, create=not readonly)
        _warn_if_shared_between_hosts(file.path)
        if file.writable and not readonly:
            # A process still using a deleted file keeps its log at the path: SQLite
            # would pair the new file with it (and fail with a disk I/O error).
            make_file_if_missing(file.path)
            if not open_in_process(file.path):
                remove_foreign_side_files(file.path)
        if not file.writable and not readonly:
            if file.why is not None:
                log.warning(
                    "vyre-sqlcache: %s cannot be written by this process: %s; opening it read-only",
                    file.path,
                    file.why,
                )
            else:
                log.info("vyre-sqlcache: %s is not writable; opening it read-only", file.path)
        cache = cls(
            file, readonly=readonly, max_bytes=max_bytes, vfs=vfs, write_behind=write_behind
        )
        cache._codec = _codec.Codec(level)
        if (settings.log_misses if log_misses is None else log_misses) and not cache._readonly:
            cache._miss_log = MissLog()
            cache._books.also = cache._miss_log.write
        try:
            try:
                cache._check_file_bytes(own=path is None)
                cache._first_connection(verify=verify, store_cap=store_cap)
            except CorruptCacheError as error:
                if strict or cache._readonly:
                    raise
                move_aside(file.path, f"is damaged ({error})")
                make_file_if_missing(file.path)
                cache._first_connection(verify=False, store_cap=store_cap)
            if layer_paths:
                cache._layers = _layers.open_layers(
                    layer_paths, cache._path, cache._books.checksum_failed, vfs
                )
        except BaseException:
            cache._discard()
            raise
        cache._remote = tier
        return cache

    def _discard(self) -> None:
        """Let go of an object that failed to open: its threads and connections end, and
        nothing more is done to the file (no bookkeeping, no checkpoint, no close by
        __del__)."""
        try:
            self._writer.stop()
            self._checkpointer.stop()
        finally:
            self._pool.close()

    def _check_file_bytes(self, *, own: bool) -> None:
        """Look at the file's first bytes before SQLite does (SQLite would remove the -wal of
        a file it cannot read). Raise CorruptCacheError for a damaged cache, NotACacheError
        for anything else that is not a SQLite database.

        Bytes that are not SQLite's are a damaged cache only where nothing else can be: at
        the library's own path (`own`: none was given), beside a -wal or -shm (which only
        SQLite makes), or in a file that looks like damaged pages (see
        `looks_like_damaged_pages`); a document at a path the caller chose is never moved.
        """
        path = self._path
        head = read_head(path)
        if head is None:
            # (A WAL writer never locks the file itself: this is a program holding it.)
            raise CacheBusyError(
                f"{path} has been locked by another process for {HEAD_WAIT_S:g} s: a "
                "program holding the whole file (a sqlite3 shell after PRAGMA "
                "locking_mode=EXCLUSIVE, or one that took the file out of WAL mode and "
                "writes); retry later, or end that program's session"
            )
        if is_not_sqlite(head):
            if own or has_side_files(path) or looks_like_damaged_pages(path, head):
                raise CorruptCacheError(f"{path} is not a SQLite database")
            raise NotACacheError(
                f"{path} is not a SQLite database, so not a vyre-sqlcache cache; choose "
                "another path, or delete the file if it is a damaged cache (it was not "
                "modified)"
            )
        damage = header_damage(head)
        if damage is not None:
            raise CorruptCacheError(f"{path} has a damaged header: {damage}")

    def _connect(self, mmap: bool, *, following: bool = False) -> apsw.Connection:
        """A new connection with this cache's settings; raises CacheError types.

        `following`: for `_open_the_path`, which has checked the file now at the path.
        """
        file = self._watch.file  # as last located (see `FileWatch`)
        if self._inode is not None and not following:
            now = inode(self._path)
            if self._reopen_due or (now != self._inode and has_side_files(self._path)):
                # The old file's -wal and -shm are still at the path, which this object's
                # open connections may use: SQLite would pair whatever file is there now
                # with them, read the old pages and, at the last close, checkpoint them
                # into it (a user's document renamed over the cache). The next commit
                # follows the path: it removes a log left without its file and makes the
                # file again, or opens the file now there, or says why it cannot.
                if now is None:
                    raise CacheError(
                        f"{self._path} was deleted while open; the next write or flush() "
                        "makes it again"
                    )
                raise CacheError(
                    f"{self._path} was replaced while open and the file now there is not "
                    "opened yet; the next write or flush() opens it, or says why it cannot"
                )
        try:
            connection = connect(
                self._path,
                readonly=not file.writable,
                query_only=self._readonly,
                immutable=file.immutable,
                mmap=mmap and file.mappable,
                vfs=self._vfs,
                pool=self._pool,
            )
        except apsw.Error as error:
            raise translate(error, "opening a connection", self._path) from error
        if not self._readonly:
            self._checkpointer.attach(connection)
            if self._inode is not None:
                self._prepare_if_new(connection)
        elif self._leftover_log:
            # A reader that closes last would fold a killed writer's log into the file:
            # a read-only cache leaves the file as it found it.
            connection.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        return connection

    def _inode_of(self, connection: apsw.Connection) -> tuple[int, int]:
        """The (device, inode) of the file `connection` has open: the path's, or `MOVED`
        where that file left the path while it was opened (deleted, or replaced), so that
        the next commit follows the path."""
        now = inode(self._path)  # first: a file that leaves after this, has_moved sees
        if now is None or has_moved(connection):
            return MOVED
        return now

    def _prepare_if_new(self, connection: apsw.Connection) -> None:
        """Give a file made since this object opened its own (the first deleted while
        open; see `_follow_the_path`) the cache's schema, so that a thread's first
        connection to it finds its tables. Closes `connection` and raises CacheError
        types when it cannot."""
        try:
            if connection.pragma("user_version") == 0:
                retry_busy(lambda: prepare(connection, str(self._path), readonly=False))
        except apsw.Error as error:
            connection.close()
            raise translate(error, "opening the cache again", self._path) from error
        except BaseException:
            connection.close()
            raise

    def _first_connection(self, *, verify: bool, store_cap: bool) -> None:
        """Open this thread's connection, check and migrate the file, settle the cap."""
        where = str(self._path)
        marker = needs_check_marker(self._path)
        connection = self._connect(True)
        try:
            if not self._readonly:
                _layers.refuse_layer_for_writes(connection, where)
            retry_busy(lambda: prepare(connection, where, readonly=self._readonly))
            # A reader cannot repair what quick_check would find, nor remove the marker:
            # it reads on, and every entry is still checksummed.
            if verify or (marker.exists() and not self._readonly):
                problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise CorruptCacheError(
                        f"{where} fails quick_check: {'; '.join(map(str, problems[:3]))}"
                    )
                with suppress(OSError):
                    marker.unlink(missing_ok=True)
            if store_cap and not self._readonly:
                with transaction(connection):
                    _rows.store_setting(connection, _rows.CAP_SETTING, self._cap or 0)
            self._settle_cap(connection)
            if not self._readonly:
                self._inode = self._inode_of(connection)
        except apsw.Error as error:
            connection.close()
            raise translate(error, "opening the cache", self._path) from error
        except BaseException:
            connection.close()
            raise
        with self._pool.call() as slot:
            self._pool.adopt(slot, connection)
        if self._write_behind and not self._readonly:
            try:
                self._writer.start()
            except _wakeup.CannotStart as error:  # the first write tries again
                _wakeup.cannot_start("writes are committed by their callers", error)
        if not self._readonly:
            # Started here, not by the first call that needs it: a thread started from a
            # caller's thread could be left half-started by an asynchronous exception
            # (Ctrl-C) delivered to that thread inside `Thread.start`.
            self._checkpointer.start()
            # Tombstones left by a process that ended before its purge.
            with suppress(apsw.Error):
                if _rows.tombstones(connection):
                    self._checkpointer.purge_soon()

    def _settle_cap(self, connection: apsw.Connection) -> None:
        """Take the file's cap unless this object was given one."""
        if self._cap_override is _UNSET:
            stored = _rows.setting(connection, _rows.CAP_SETTING)
            if stored is not None and stored < 0:
                # No version writes one (0 is no cap): a hand edit, or damage. Every write
                # would fail against it; the cap this object had stands.
                if stored != self._bad_cap:
                    self._bad_cap = stored
                    log.warning(
                        "vyre-sqlcache: %s holds a size cap of %d bytes, which cannot be; "
                        "using %s. Open it with max_bytes=... to store a cap again",
                        self._path,
                        stored,
                        "no cap" if self._cap is None else f"{self._cap} bytes",
                    )
            elif stored is not None:
                self._cap = stored or None
        self._checkpointer.fit_cap(self._cap)

    def __del__(self) -> None:
        # As a file object is: a cache dropped without close() is closed (its queue
        # committed), with a ResourceWarning. In a thread of its own: the last reference
        # may go anywhere, our own threads' locks held included, and close() takes them.
        # Not while the interpreter shuts down: its daemon threads are frozen by then,
        # and the queue was committed at exit.
        if not getattr(self, "_made", False) or self._pool.closed or sys.is_finalizing():
            return  # (made in part: it opened nothing yet)
        for callback in self._callbacks.values():
            callback.pin(self)
        with suppress(Exception):
            _wakeup.start(
                threading.Thread(
                    target=_close_dropped, args=(self,), name="vyre-sqlcache close", daemon=True
                )
            )
        with suppress(Exception):  # an error filter raises it; the close is under way
            warnings.warn(
                f"unclosed cache {self._path}", ResourceWarning, stacklevel=2, source=self
            )

    def close(self) -> None:
        """Write pending bookkeeping, checkpoint into the main file and close; idempotent.

        Never waits for another process: bookkeeping that cannot be written at once is
        dropped, and the checkpoint is skipped while another process holds the file.
        Other threads' calls under way finish first; later calls raise CacheError.
        """
        if self._pool.closed:
            return
        if not self._readonly:
            self._writer.refuse(f"the cache {self._path} is closed; open it again to use it")
            # One busy timeout from here for every wait of the close: the thread's commit
            # under way, then the close's own (it waited up to two).
            self._pool.wait_until = time.monotonic() + _connections.BUSY_TIMEOUT_MS / 1000
            try:
                # Ctrl-C from here to the commit's end leaves the object open, its queue
                # kept: close() again, or the exit, commits it.
                self._writer.stop()
                # Every commit follows the path (`_follow_the_path`); with writes committed
                # since the last flush into a file no longer at the path, the last commit
                # runs even with nothing queued.
                owed = self._since_flush is None or bool(self._since_flush)
                moved = owed and self._inode is not None and inode(self._path) != self._inode
                try:
                    self._writer.commit(extra=(lambda _connection: 0) if moved else None)
                except CacheError as error:
                    log.warning(
                        "vyre-sqlcache: %d queued writes to %s were lost at close: %s",
                        len(self._writer),
                        self._path,
                        error,
                    )
            except BaseException:
                self._pool.wait_until = None  # open still: its calls wait as before
                raise
            self._writer.settled = True  # nothing left for the exit to commit
        try:
            if not self._readonly:
                self._checkpointer.stop()
                with self._call() as slot:
                    connection = self._pool.main(slot)
                    self._write_bookkeeping(connection, wait=False)
                    self._purge_at_close(connection)
                    waiter = waiter_of(connection)
                    if waiter is not None:
                        waiter.timeout_ms = 100  # a quitting application does not wait
                    if self._miss_log is not None and len(self._miss_log):
                        # Misses found the lock taken: they may wait that long, no more.
                        self._write_bookkeeping(connection, wait=True)
                    try:
                        connection.pragma("wal_checkpoint", "TRUNCATE")
                    except apsw.Error as error:
                        log.info("vyre-sqlcache: checkpoint on close of %s: %s", self, error)
        except CacheError as error:
            log.warning("vyre-sqlcache: closing %s: %s", self._path, error)
        finally:
            if self._remote is not None:
                self._remote.close()  # sends what is queued, for a bounded time
            self._pool.close()
            self._layers.close()
            if self._readonly and not open_in_process(self._path):
                remove_own_side_files(self._path)

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

    def _not_copyable(self) -> TypeError:
        return TypeError(
            f"a PipelineCache cannot be copied or pickled (it holds open connections and "
            f"threads); use the same object, or pass its path and call "
            f"PipelineCache.open({str(self._path)!r}) in the other process"
        )

    def __copy__(self) -> PipelineCache:
        """Raises TypeError: a copy would share, and on collection close, this one's file."""
        raise self._not_copyable()

    def __deepcopy__(self, memo: Any) -> PipelineCache:
        """Raises TypeError (see `__copy__`)."""
        raise self._not_copyable()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Raises TypeError: open the cache by path in the other process instead."""
        raise self._not_copyable()

    @property
    def path(self) -> Path:
        """The cache file (absolute, symbolic links resolved)."""
        return self._path

    @property
    def readonly(self) -> bool:
        """Whether writes are refused (asked for, or the file cannot be written)."""
        return self._readonly

    @property
    def disabled(self) -> bool:
        """Whether the cache was disabled by `VYRE_SQLCACHE_DISABLE` (stores nothing)."""
        return False

    @property
    def max_bytes(self) -> int | None:
        """The cap on blob bytes this object applies, or None for no cap."""
        return self._cap

    # -- the vyre API: entries by program digest -----------------------------------

    def write(
        self, program_digest: bytes | str, fingerprint: DeviceFingerprint, blob: bytes
    ) -> None:
        """Store `blob` for a program on a device, atomically (durable after `flush()`).

        Raises BlobTooLargeError over 64 MiB or over the cap, TypeError/ValueError for bad
        arguments, ReadOnlyCacheError on a read-only cache (nothing is queued then), and
        CacheFullError or CacheBusyError for a commit that failed: an earlier background
        one's (raised once, by the next call) or this call's where it commits (a full
        queue, or a blob of 256 KiB or more, which is then not stored). Queued writes,
        this one's among them, stay queued and are retried.
        """
        self.write_many([(program_digest, blob)], fingerprint)

    def write_many(
        self, items: Iterable[tuple[bytes | str, bytes]], fingerprint: DeviceFingerprint
    ) -> None:
        """Store many `(program_digest, blob)` pairs in one transaction: all or none, but
        that the oldest of them may be evicted at once to keep the cap or, on a full
        disk, to fit (as if each had been committed alone).

        Raises as `write` does; for bad arguments, before anything is queued.
        """
        fp = check_fingerprint(fingerprint)
        entries = []
        for index, item in enumerate(items):
            program_digest, blob = check_item(item, index, "write_many", "(program_digest, blob)")
            digest = coerce_digest(f"program_digest (item {index})", program_digest)
            entries.append(NewEntry(fp.cache_key(digest), None, fp, digest, check_blob(blob)))
        self._store(entries)

    def read(self, program_digest: bytes | str, fingerprint: DeviceFingerprint) -> bytes | None:
        """The blob stored for a program on a device, or None on a miss.

        Raises TypeError/ValueError for bad arguments; a damaged entry is a miss.
        """
        fp = (
            fingerprint
            if type(fingerprint) is DeviceFingerprint
            else check_fingerprint(fingerprint)
        )
        entry_key = fp.cache_key(program_digest)
        blob = self._load(entry_key)
        if blob is None:
            blob = self._fetch_remote(entry_key, (None, fp, program_digest, None))
            if blob is None and self._miss_log is not None:
                digest = coerce_digest("program_digest", program_digest)
                self._missed("read", entry_key, fp, None, digest)
        return blob

    def flush(self) -> None:
        """Make every earlier write of this object durable (survives power loss).

        Raises CacheError if the sync fails; the writes stay pending and the next
        `flush()` retries them.
        """
        self._writer.raise_error()
        if self._unflushed == 0 and not len(self._writer):
            return
        # One commit with synchronous=FULL syncs the write-ahead log, and with it every
        # frame committed before: the queue's, this object's and other processes'.
        self._writer.commit(durable=True, extra=lambda c: _rows.bump(c, "flushes", 1))

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
        impacted = check_impact(impact_mask, program_digests)
        if not impacted:
            return 0
        if self._remote is not None:  # the shared tier is not invalidated: README says why
            self._remote.fence(fp.cache_keys(impacted))
        # Layers are read-only: what it reaches there is masked in the user's file, first
        # (so that `mask` counts only keys the file's own invalidation does not).
        found = self._layers.impacted(impacted, fp) if self._layers else []
        now = _now_ms()
        return self._change(
            "invalidating entries",
            lambda c: _layers.mask(c, found, now) + _rows.invalidate(c, impacted, fp, now),
        )

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
        """Store many `(key, blob[, program_digest])` items in one transaction, all or none
        as `write_many` stores.

        Raises as `write` does; for bad arguments, before anything is queued.
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
        self._store(entries)

    def get(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bytes | None:
        """The blob stored under `key` on a device, or None on a miss.

        Raises TypeError for bad arguments; a damaged entry is a miss.
        """
        key = key if type(key) is PipelineCacheKey else check_key(key)
        fp = (
            fingerprint
            if type(fingerprint) is DeviceFingerprint
            else check_fingerprint(fingerprint)
        )
        entry_key = key.entry_key(fp)
        blob = self._load(entry_key)
        if blob is None:
            blob = self._fetch_remote(entry_key, (key, fp, None, None))
            if blob is None and self._miss_log is not None:
                self._missed("get", entry_key, fp, key)
        return blob

    def get_many(
        self, keys: Iterable[PipelineCacheKey], fingerprint: DeviceFingerprint
    ) -> list[bytes | None]:
        """The blobs of many keys (None for each miss), read from one snapshot."""
        fp = check_fingerprint(fingerprint)
        checked = [check_key(k) for k in keys]
        blobs = self._load_many_or_fetch(
            [k.entry_key(fp) for k in checked], [(k, fp, None, None) for k in checked]
        )
        if self._miss_log is not None:
            for k, blob in zip(checked, blobs, strict=True):
                if blob is None:
                    self._missed("get_many", k.entry_key(fp), fp, k)
        return blobs

    def contains(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Whether an entry is stored under `key` on a device (its bytes are not verified)."""
        entry_key = check_key(key).entry_key(check_fingerprint(fingerprint))
        if self._writer.get(entry_key) is not None:
            return True
        if self._read("looking up an entry", lambda c: _rows.owner(c, entry_key)) == entry_key:
            return True
        return bool(self._layers) and self._read(
            "looking up layers",
            lambda c: self._layers.contains(entry_key, self._masks(c.cursor())),
        )

    def delete(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> bool:
        """Delete the entry under `key` on a device; return whether there was one."""
        entry_key = check_key(key).entry_key(check_fingerprint(fingerprint))
        return self.delete_entries([entry_key]) > 0

    # -- entries by bare entry key (inspection, vyre directory import and export) ----

    def get_entry(self, entry_key: bytes | str) -> bytes | None:
        """The verified blob of the entry with this 32-byte (or 64-hex) entry key, or None.

        Raises TypeError/ValueError for a malformed key; a damaged entry is a miss.
        """
        return self._load_or_fetch(coerce_digest("entry_key", entry_key), _remote.NO_ORIGIN)

    def put_entry(
        self, entry_key: bytes | str, blob: bytes, *, created_ms: int | None = None
    ) -> None:
        """Store `blob` under a bare entry key, as a vyre directory cache knows it.

        Such an entry has no key columns; `read` and `invalidate_impacted` still reach it,
        since its key is vyre's `fingerprint.cache_key(program_digest)`. `created_ms`
        (milliseconds since the epoch) also serves as its last access. Raises as `write`.
        """
        self.put_entries([(entry_key, blob, created_ms)])

    def put_entries(self, items: Iterable[tuple[bytes | str, bytes, int | None]]) -> int:
        """Store many `(entry_key, blob, created_ms)` entries in one transaction; return how
        many of them are in the cache afterwards (the cap may have evicted some of them).

        Raises as `write` does, before anything is written.
        """
        entries = [
            NewEntry(
                coerce_digest(f"entry_key (item {i})", key),
                None,
                None,
                None,
                check_blob(blob),
                check_created_ms(created),
            )
            for i, (key, blob, created) in (
                (i, check_item(item, i, "put_entries", "(entry_key, blob, created_ms)"))
                for i, item in enumerate(items)
            )
        ]
        if self._readonly:
            self._refuse_write()
        self._check_fits(entries)
        keys = [e.entry_key for e in entries]
        kept: int | None = self._writer.commit(
            entries, extra=lambda c: sum(_rows.owner(c, k) == k for k in keys)
        )
        return kept or 0

    def delete_entries(self, entry_keys: Iterable[bytes | str]) -> int:
        """Delete the entries with these entry keys in one statement; return how many."""
        keys = [coerce_digest(f"entry_keys[{i}]", k) for i, k in enumerate(entry_keys)]
        if not keys:
            return 0
        return self._delete(keys, self._layers.with_keys(keys) if self._layers else [])

    def _delete(self, keys: list[bytes], found: list[_layers.Found]) -> int:
        """Tombstone the user's entries of `keys` and hide the layer entries `found`, in one
        transaction; return how many distinct entries went."""
        if self._remote is not None:
            # As invalidations: the shared tier keeps its copy, this object fetches it no
            # more (README "Sharing a cache"); else the next read would bring it back.
            self._remote.fence([*keys, *(key for key, _ in found)])
        now = _now_ms()
        return self._change(
            "deleting entries",
            lambda c: (
                _layers.mask(c, found, now)
                + (_rows.delete_entries(c, keys, now) if keys else 0)  # (carray refuses [])
            ),
        )

    def check_entry(self, entry_key: bytes | str) -> bool | None:
        """Whether an entry's bytes match its checksum (None: no such entry); changes nothing."""
        key = coerce_digest("entry_key", entry_key)
        if self._writer.get(key) is not None:
            return True
        with self._call() as slot:
            fetched = self._fetch(slot, key)
        return None if fetched is None else _rows.verify(key, fetched)

    # -- size and counters -------------------------------------------------------------

    def __len__(self) -> int:
        """The number of entries."""
        return self.stats().entries

    def stats(self) -> CacheStats:
        """Sizes and counters: this object's hits, misses, evictions and checksum failures,
        and the totals kept in the file (which include this object's unwritten ones)."""
        if len(self._writer) and not self._readonly:
            self._writer.commit()  # the file's totals then count every write made
        counts = self._books.counts()
        totals = self._read("reading statistics", _rows.totals)
        hits, misses = self._books.unwritten()
        return CacheStats(
            path=self._path,
            entries=totals.get("entries", 0),
            blob_bytes=totals.get("blob_bytes", 0),
            file_bytes=self._file.file_bytes(),
            max_bytes=self._cap,
            hits=counts.hits,
            misses=counts.misses,
            evictions=counts.evictions,
            checksum_failures=counts.checksum_failures,
            total_hits=totals.get("hits", 0) + hits,
            total_misses=totals.get("misses", 0) + misses,
            total_evictions=totals.get("evictions", 0),
            total_checksum_failures=totals.get("checksum_failures", 0),
            total_flushes=totals.get("flushes", 0),
            stored_bytes=totals.get("stored_bytes", 0),
            dictionary_bytes=totals.get("dictionary_bytes", 0),
            compression_ratio=round(
                totals.get("blob_bytes", 0) / max(totals.get("stored_bytes", 0), 1), 3
            )
            if totals.get("stored_bytes", 0)
            else 1.0,
            compression=self.compression,
            layer_hits=self._layers.hits,
            remote=None if self._remote is None else self._remote.stats(),
        )

    @property
    def compression(self) -> str:
        """What this object writes: 'off' or 'zstd-<level>' (see `open`)."""
        level = self._codec.level
        return "off" if level is None else f"zstd-{level}"

    def recompress(self, *, batch: int = 64) -> _rows.Recompressed:
        """Store every entry again as this object's compression decides now: each backend
        and device with enough entries first gets a dictionary trained on them (while the
        dictionaries' share of the size cap has room), then each entry is rewritten where
        that makes it smaller (`batch` to a transaction, so other writers go on; `kept`
        counts the others), and the dictionaries no entry uses any more are deleted. With
        compression 'off' every entry is stored raw. Entries that fail their checksum are
        left for `check`; where the entries stored again take more room than the size cap
        allows, the least recently used are evicted (`evicted`).

        Returns the entries rewritten, those left damaged, and their stored bytes before
        and after; `compact()` then gives the freed pages back to the file system.
        Raises ReadOnlyCacheError on a read-only cache, CacheError types if it fails.
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a whole number of entries above 0, got {batch!r}")
        self._before_inspection()
        if self._readonly:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only; recompressing it needs write access"
            )
        codec = self._codec if self._codec.enabled else None
        report = _rows.Recompressed()

        def fit(connection: apsw.Connection) -> None:
            # Stored again (raw, or at another level), entries may take more room: the cap
            # counts what is on disk, so the least recently used make way, as for a write.
            self._settle_cap(connection)
            if self._cap is not None:
                evicted = _rows.make_room(connection, array("q"), 0, self._cap)
                report.evicted += evicted
                self._books.evicted(evicted)

        def train(connection: apsw.Connection) -> int:
            trained = 0
            self._settle_cap(connection)
            # The largest scopes first, while the dictionaries' share of the cap has room.
            for scope, count in sorted(_rows.scopes(connection), key=lambda sc: -sc[1]):
                if count >= _codec.TRAIN_AFTER and _rows.dictionary_room(connection, self._cap):
                    trained += _rows.train_dictionary(connection, scope, _now_ms()) is not None
            _rows.reset_dictionary_writes(connection)
            fit(connection)
            return trained

        if codec is not None:
            self._change("training dictionaries", train)
        ids = self._read("listing entries", _rows.entry_ids)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]

            def rewrite(connection: apsw.Connection, chunk: list[int] = chunk) -> int:
                rewritten = _rows.recompress(connection, chunk, codec, report)
                fit(connection)
                return rewritten

            try:
                self._change("recompressing entries", rewrite)
            except _codec.Unavailable as error:
                raise CacheError(
                    f"{self._path} holds zstd-compressed entries; recompressing them needs "
                    "the zstandard package: pip install 'vyre-sqlcache[zstd]' (each entry "
                    "is rewritten whole or not at all)"
                ) from error
        # Also a scope's new dictionary that no entry took (none got smaller with it).
        self._change(
            "deleting unused dictionaries",
            lambda c: _rows.drop_unused_dictionaries(c, keep_newest=False),
        )
        return report

    # -- internals: calls ------------------------------------------------------------

    def _call(self) -> AbstractContextManager[Slot]:
        """One call's use of this thread's connections (see ConnectionPool.call)."""
        return self._pool.call()

    def _read(
        self,
        what: str,
        run: Callable[[apsw.Connection], T],
        failed: Callable[[apsw.Error, apsw.Connection], CacheError] | None = None,
    ) -> T:
        """Run `run` on this thread's connection; apsw errors become CacheError types (those
        `failed` makes of them and the connection, if given)."""
        with self._call() as slot:
            if self._watch.active:
                self._reopened_if_changed(slot, now=False)
            connection = self._pool.main(slot)
            try:
                return run(connection)
            except UnicodeDecodeError as error:
                raise translate(error, what, self._path) from error
            except apsw.Error as error:
                if failed is not None:
                    raise failed(error, connection) from error
                raise translate(error, what, self._path) from error

    @contextmanager
    def _write_transaction(self, slot: Slot, what: str) -> Iterator[apsw.Connection]:
        """A `BEGIN IMMEDIATE` transaction on the slot's connection, bookkeeping first."""
        if self._readonly:
            self._refuse_write()
        connection = self._writing_connection(slot)
        try:
            self._checkpointer.ready(connection)
            with transaction(connection):
                # First: eviction in the block must see the latest access times.
                self._books.write(connection, _now_ms())
                yield connection
        except apsw.Error as error:
            self._note_damage(error)
            if self._pool.closed:
                raise CacheError(f"the cache {self._path} was closed during the call") from error
            raise translate(error, what, self._path, connection) from error

    def _writing_connection(self, slot: Slot) -> apsw.Connection:
        """The slot's main connection, holding no read lock outside a transaction: a
        statement or blob handle an interrupt left behind would make BEGIN IMMEDIATE fail
        at once (SQLITE_BUSY_SNAPSHOT) once another connection has written since."""
        connection = self._pool.main(slot)
        if connection.txn_state() != apsw.SQLITE_TXN_NONE and connection.get_autocommit():
            self._pool.reopen(slot)
            connection = self._pool.main(slot)
        return connection

    def _change(self, what: str, run: Callable[[apsw.Connection], int]) -> int:
        """Run a deleting statement in a write transaction, after the queued writes (so it
        reaches them too); return the rows it changed. Entries it tombstoned are purged
        later, by the checkpoint thread."""
        if self._readonly:
            self._refuse_write()
        changed: int = self._writer.commit(extra=run, what=what)
        if changed:
            self._checkpointer.purge_soon()
        return changed

    def _purge_batch(self) -> bool:
        """Delete one batch of tombstoned entries in a short transaction of its own (on the
        checkpoint thread); whether more may be left."""
        with self._call() as slot:
            connection = self._pool.main(slot)
            with transaction(connection):
                purged = _rows.purge(connection)
        return purged >= _rows.PURGE_BATCH

    @staticmethod
    def _purge_at_close(connection: apsw.Connection) -> None:
        """Purge what is left, for at most `PURGE_AT_CLOSE_S` and never waiting for the
        write lock; the next cache object that opens the file purges the rest."""
        deadline = time.monotonic() + PURGE_AT_CLOSE_S
        try:
            while time.monotonic() < deadline:
                with transaction(connection, wait=False):
                    if _rows.purge(connection) < _rows.PURGE_BATCH:
                        return
        except apsw.Error as error:
            log.debug("vyre-sqlcache: purge at close: %s", error)

    # -- internals: writing --------------------------------------------------------

    def _store(self, entries: list[NewEntry]) -> None:
        """Queue `entries` for the writer thread, or commit them here: large blobs (a copy
        in the queue would cost more than the commit saves) and without write-behind."""
        if not entries:
            return
        if self._readonly:
            self._refuse_write()
        self._check_fits(entries)
        if self._write_behind and all(len(e.blob) < DIRECT_WRITE_BYTES for e in entries):
            self._writer.put(entries)
        else:
            self._writer.commit(entries)

    def _commit_entries(
        self,
        entries: list[NewEntry],
        durable: bool,
        extra: Callable[[apsw.Connection], T] | None,
        what: str = "storing entries",
    ) -> T | None:
        """Insert `entries` and run `extra` in one transaction (synced when `durable`),
        evicting for the cap, and once for a full disk; return what `extra` returned.
        `what` the transaction does names it in errors."""
        entries = self._follow_the_path(entries)
        incoming = sum(len(entry.blob) for entry in entries)
        result: T | None = None
        split = False
        with self._call() as slot, interrupts_held():
            connection = self._writing_connection(slot)
            if durable:
                connection.pragma("synchronous", "FULL")
            try:
                for attempt in range(2):
                    try:
                        with self._write_transaction(slot, what) as connection:
                            if entries:
                                if self._cap_override is _UNSET:
                                    self._settle_cap(connection)
                                evicted = _rows.insert(
                                    connection, entries, _now_ms(), self._cap, self._codec
                                )
                                self._books.evicted(evicted)
                            if extra is not None:
                                result = extra(connection)
                        break
                    except CacheFullError:
                        if not attempt and self._checkpointer.refit(connection):
                            continue  # another program freed space since the last look
                        if not attempt and self._make_room_on_disk(slot, incoming):
                            log.warning(
                                "vyre-sqlcache: %s hit a full disk; evicted, retrying",
                                self._path,
                            )
                            continue
                        if len(entries) > 1:
                            split = True  # also where nothing could be evicted
                            break
                        raise
            except READ_ERRORS as error:
                raise translate(error, "flushing", self._path) from error
            finally:
                if durable:
                    with suppress(apsw.Error):
                        connection.pragma("synchronous", "NORMAL")
        if split:
            # A group larger than the disk's room: in halves, so a full disk does not
            # hold every queued write back (each a call of its own: calls never nest).
            half = len(entries) // 2
            self._commit_entries(entries[:half], False, None)
            return self._commit_entries(entries[half:], durable, extra, what)
        if self._remote is not None and entries:
            self._remote.upload(entries)  # queued for the shared tier; never blocks or raises
        changes = len(entries) + (result if isinstance(result, int) else 0)
        with self._lock:
            self._unflushed = 0 if durable else self._unflushed + changes
            self._rescued = None  # in the file at the path now
            if durable:
                self._since_flush = set()
                self._flushed_ms = _now_ms()
            elif self._since_flush is not None:
                self._since_flush.update(entry.rowid for entry in entries)
                if len(self._since_flush) > MAX_TRACKED_WRITES:
                    self._since_flush = None
        return result

    def _follow_the_path(self, entries: list[NewEntry]) -> list[NewEntry]:
        """`entries`, after those this object committed since its last flush if the path
        no longer names the file open (deleted, or replaced by a rename, while open):
        those are read from the old file, and every connection reopens on the file now at
        the path, made anew if missing. Raises CacheError if that cannot be opened; the
        next commit tries again."""
        rescued_before = self._rescued
        if self._inode is None or (rescued_before is None and inode(self._path) == self._inode):
            return entries
        if rescued_before is not None and not self._reopen_due:
            return [*rescued_before, *entries]  # reopened, but the commit failed
        first = rescued_before is None
        rescued: list[NewEntry] = []

        def last_look(connections: list[apsw.Connection]) -> None:
            if first:
                rescued.extend(self._written_since_flush(connections))

        # Ctrl-C between closing the old file and noting what was read from it would lose
        # those entries: the old file cannot be read again.
        with interrupts_held():
            if not self._pool.quiesce(last_look=last_look):
                raise CacheError(
                    f"{self._path} was deleted or replaced while open, and another thread's "
                    "call did not end in time to reopen it; flush() again"
                )
            # The old file is closed: its inode number may now be given to a new file.
            self._reopen_due = True
            try:
                if first:
                    self._rescued = rescued
                    log.warning(
                        "vyre-sqlcache: %s was deleted or replaced while open; writing to "
                        "the file now at that path, with the %d entries written since the "
                        "last flush",
                        self._path,
                        len(rescued),
                    )
                self._open_the_path()
            finally:
                self._pool.resume()
        return [*(self._rescued or []), *entries]

    def _follow_before_fork(self) -> None:
        """Follow a deleted file before a fork closes every connection (the old file's
        last readers): what is read from it is committed by the next commit, on either
        side (both write the same entries). Raises CacheError as `_follow_the_path`."""
        if not self._readonly and not self._pool.closed:
            self._follow_the_path([])

    def _written_since_flush(self, connections: list[apsw.Connection]) -> list[NewEntry]:
        """The sound entries this object committed since its last flush, read through one
        of `connections` still open on the old file (none if none is)."""
        for connection in connections:
            if not has_moved(connection):
                continue
            try:
                with transaction(connection, "DEFERRED"):
                    since = self._flushed_ms - CLOCK_SLACK_MS
                    ids = _rows.live_ids(connection, self._since_flush, since)
                    found = [sound_entry(connection, rowid) for rowid in ids]
                    return [entry for entry in found if entry is not None]
            except apsw.Error as error:
                log.warning("vyre-sqlcache: reading %s before reopening: %s", self._path, error)
        return []

    def _open_the_path(self) -> None:
        """Locate, create if missing and migrate the file at the path, all connections
        closed; this object's connections open it from now on. Raises CacheError types."""
        file = CacheFile.locate(self._path, create=True)
        if not file.writable:
            raise ReadOnlyCacheError(
                f"{self._path} was replaced while open by a file this process cannot write; "
                "make it writable or remove it"
            )
        make_file_if_missing(self._path)  # its log is the deleted file's, now closed
        self._file = self._watch.file = file
        self._check_file_bytes(own=False)
        connection = self._connect(True, following=True)
        try:
            retry_busy(lambda: prepare(connection, str(self._path), readonly=False))
            self._settle_cap(connection)
            opened = self._inode_of(connection)
        except apsw.Error as error:
            raise translate(error, "opening the cache again", self._path) from error
        finally:
            connection.close()
        self._inode = opened
        self._reopen_due = False

    def _refuse_write(self) -> None:
        if self._file.why is not None:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only: {self._file.why}; free what is "
                "missing or raise the limit, then open it again"
            )
        if self._file.writable:
            raise ReadOnlyCacheError(
                f"the cache {self._path} is open read-only (readonly=True); open it without "
                "readonly=True to change it"
            )
        raise ReadOnlyCacheError(
            f"the cache {self._path} is open read-only: this user may not write the file "
            "or its folder; change it as its owner, or fix the permissions"
        )

    def _check_fits(self, entries: list[NewEntry]) -> None:
        """Raise BlobTooLargeError if `entries` as stored would not fit under the cap."""
        cap = self._cap
        # Of one key written twice in a batch only the last write is stored.
        entries = list({e.entry_key: e for e in entries}.values())
        incoming = sum(len(e.blob) for e in entries)
        if cap is None or incoming <= cap:
            return
        stored = ""
        if self._codec.enabled:
            # The cap counts bytes as stored: compressing is the only way to know them,
            # and it is paid only by writes larger than the whole cap.
            size = sum(len(self._codec.encode(e.blob).data) for e in entries)
            if size <= cap:
                return
            stored = f" ({size} bytes as stored, compressed where it pays)"
        what = "blob is" if len(entries) == 1 else f"{len(entries)} blobs are"
        raise BlobTooLargeError(
            f"{what} {incoming} bytes{stored}, over the cache's size cap of {cap} bytes "
            f"(max_bytes / {ENV_MAX_SIZE}); raise the cap to store it; nothing was written"
        )

    def _make_room_on_disk(self, slot: Slot, incoming: int) -> bool:
        """After SQLITE_FULL: fold the log back and truncate it, then evict at least
        `incoming` bytes, and up to a quarter of the blobs, as stored, in small steps,
        truncating the log after each (one large eviction can need more log than the disk
        has left; see `FullDiskEviction`). Whether room was made.

        `incoming` is the callers' size of the blobs being written, not compressed again
        to learn their stored size: never less than that, so freeing it is enough.
        """
        connection = self._pool.main(slot)
        evicted = 0
        with self._checkpointer.evicting(connection):
            self._truncate_log(connection)
            # The record of departures and misses gives way first (and the purge below
            # records none: it may not have the room).
            with (
                suppress(CacheError),
                self._write_transaction(slot, "trimming the departure record"),
            ):
                _explain_sql.shrink(connection)
            # Tombstoned entries go first: they take space and are no longer counted.
            while True:
                try:
                    with self._write_transaction(slot, "purging for a full disk"):
                        purged = _rows.purge(connection, FULL_DISK_STEP_ENTRIES, record=False)
                except CacheError:
                    break
                self._truncate_log(connection)
                if purged == 0:
                    break
                evicted += purged
            plan = FullDiskEviction.of(connection, incoming)
            while (step := plan.next_step()) > 0:
                try:
                    with self._write_transaction(slot, "evicting for a full disk"):
                        count = plan.evict(connection, step)
                except CacheError:
                    break
                self._books.evicted(count)
                self._truncate_log(connection)
                if count == 0:
                    break
                evicted += count
        return evicted > 0

    @staticmethod
    def _truncate_log(connection: apsw.Connection) -> None:
        try:
            connection.pragma("wal_checkpoint", "TRUNCATE")
        except apsw.Error as error:
            log.debug("vyre-sqlcache: checkpoint after a full disk failed: %s", error)

    def _copy_log(self) -> tuple[int, int]:
        # An ended thread's snapshot would keep the copy from reaching the end of the log.
        _snapshots.end_ended()
        with self._call() as slot:
            return copy_log(self._pool.main(slot))

    def _restart_log(self, ready: Callable[[], bool]) -> int | None:
        # The copy ran beside this object's writes, whose pages it left behind: with them
        # held back, copy those and have the next write start the log over (unless the
        # checkpointer finds too much was committed since: None, nothing done).
        with self._writer.held():
            if not ready():
                return None
            with self._call() as slot:
                return restart_log(self._pool.main(slot))

    # -- internals: reading ----------------------------------------------------------

    def _load(self, entry_key: bytes) -> bytes | None:
        if self._writer.queue:
            queued = self._writer.get(entry_key)
            if queued is not None:
                self._books.hit(entry_id(entry_key))
                return queued.blob
        # (The pool's `call()`, spelled out: no generator on the common read's path.)
        slot, call = self._pool.slot(), next_call()
        try:
            if not self._watch.active and self._pool.enter_held(slot, call):
                # The common read, in few steps: the thread's held snapshot serves it.
                rowid = int.from_bytes(entry_key[:8], "big", signed=True)  # (entry_id, inline)
                try:
                    # (enter_held enters only a slot whose reader is ready)
                    blob = slot.reader.verified(entry_key, rowid)  # type: ignore[union-attr]
                except apsw.Error:
                    blob = None  # the full read meets it again, and says so
                if blob is None:
                    return self._load_in(slot, entry_key)
                if self._books.hit(rowid) and not self._readonly:
                    self._write_bookkeeping(self._pool.main(slot), wait=False)
                return blob
            self._pool.enter(slot, call)
            if self._watch.active:
                self._reopened_if_changed(slot, now=False)
            else:
                blob = self._read_held(slot, entry_key)
                if blob is not None:
                    return blob
            return self._load_in(slot, entry_key)
        finally:
            if slot.busy == call:
                slot.busy = 0

    def _load_in(self, slot: Slot, entry_key: bytes) -> bytes | None:
        """The full read of `entry_key` in the entered `slot` (the held snapshot's statement,
        then the layers), counted as a hit or a miss."""
        fetched = self._fetch(slot, entry_key, held=True)
        if fetched is None and self._watch.active and self._reopened_if_changed(slot, now=True):
            fetched = self._fetch(slot, entry_key, held=True)
        if fetched is None and self._layers:
            # The snapshot the miss was read in is held: the masks are read in it too.
            return self._from_layers(slot, entry_key, slot.cursor)
        return self._verified(slot, entry_key, fetched)

    def _read_held(self, slot: Slot, entry_key: bytes) -> bytes | None:
        """The common read in few steps: `entry_key`'s blob through the held snapshot's
        blob handles (its snapshot begun anew where due), verified, its hit counted; None,
        with nothing counted, for the full read to look (see `HeldReader.verified`)."""
        try:
            self._pool.held_cursor(slot)
            rowid = entry_id(entry_key)
            blob = self._pool.held_reader(slot).verified(entry_key, rowid)
        except apsw.Error:
            return None  # the full read meets it again, and says so
        if blob is not None and self._books.hit(rowid) and not self._readonly:
            self._write_bookkeeping(self._pool.main(slot), wait=False)
        return blob

    def _reopened_if_changed(self, slot: Slot, *, now: bool) -> bool:
        """For a reader that cannot write the cache's folder (see `FileWatch`): whether
        this thread's connections were closed, to reopen on next use, because the owner
        changed the file since they were opened. Looks at the file after a miss (`now`),
        else at most every `RECHECK_INTERVAL_S`."""
        generation = self._watch.check(now=now)
        if generation == getattr(self._generation, "seen", 0):
            return False
        self._generation.seen = generation
        self._pool.reopen(slot)
        return True

    # -- internals: the shared tier, asked after the local file misses ----------------------

    def _load_or_fetch(self, entry_key: bytes, origin: _remote.Origin) -> bytes | None:
        """`_load`, then the shared tier on a miss."""
        found = self._load(entry_key)
        return found if found is not None else self._fetch_remote(entry_key, origin)

    def _fetch_remote(self, entry_key: bytes, origin: _remote.Origin) -> bytes | None:
        """After a local miss, the shared tier's verified blob of `entry_key`, if any."""
        if self._remote is None:
            return None
        return self._from_remote([entry_key], [origin])[0]

    def _load_many_or_fetch(
        self, entry_keys: list[bytes], origins: list[_remote.Origin]
    ) -> list[bytes | None]:
        """`_load_many`, then one round trip to the shared tier for all its misses."""
        found = self._load_many(entry_keys)
        if self._remote is not None and None in found:
            misses = [i for i, blob in enumerate(found) if blob is None]
            fetched = self._from_remote(
                [entry_keys[i] for i in misses],
                [origins[i] for i in misses],
            )
            for i, blob in zip(misses, fetched, strict=True):
                found[i] = blob
        return found

    def _from_remote(
        self, entry_keys: list[bytes], origins: list[_remote.Origin]
    ) -> list[bytes | None]:
        """Ask the shared tier for local misses (one round trip, never raising); verified
        hits are queued for the local file, so the next read of them is local."""
        assert self._remote is not None
        found = self._remote.fetch(entry_keys)
        admitted: list[NewEntry] = [
            _remote.admitted(key, origin, blob)
            for key, origin, blob in zip(entry_keys, origins, found, strict=True)
            if blob is not None
        ]
        # A pending background error is the next write's or flush's to raise, not a read's.
        if admitted and not self._readonly and self._writer._error is None:
            try:
                self._check_fits(admitted)
                if self._write_behind:
                    self._writer.put(admitted)
                else:
                    self._writer.commit(admitted)
            except CacheError as error:
                log.info("vyre-sqlcache: remote entries not stored locally: %s", error)
        return found

    def _load_many(self, entry_keys: list[bytes]) -> list[bytes | None]:
        if any(self._writer.get(key) is not None for key in entry_keys):
            # One snapshot for all of them: the queue's entries join the file first.
            self._writer.commit()
        with self._call() as slot:
            if self._watch.active:
                self._reopened_if_changed(slot, now=False)
            connection = self._pool.main(slot)
            fetched: list[_rows.Fetched | None] = []
            try:
                with transaction(connection, "DEFERRED"):
                    cursor = connection.cursor()
                    try:
                        fetched = _rows.fetch_many(
                            cursor, lambda: self._pool.large(slot), entry_keys
                        )
                    except apsw.Error as error:
                        # Damage somewhere: key by key, so that it costs only its entries.
                        log.debug("vyre-sqlcache: a batch read of %s: %s", self._path, error)
                        fetched = [self._fetch(slot, k, cursor) for k in entry_keys]
            except apsw.Error as error:
                # A read that met damage may leave COMMIT failing: the reads are done.
                log.debug("vyre-sqlcache: ending a read of %s: %s", self._path, error)
                fetched += [None] * (len(entry_keys) - len(fetched))
            if self._watch.active and None in fetched:
                self._reopened_if_changed(slot, now=True)  # the next read sees the change
            if self._layers and None in fetched:
                missed = [k for k, f in zip(entry_keys, fetched, strict=True) if f is None]
                tiers = iter(self._load_from_tiers(slot, missed))
                return [
                    next(tiers) if f is None else self._verified(slot, k, f)
                    for k, f in zip(entry_keys, fetched, strict=True)
                ]
            return [self._verified(slot, k, f) for k, f in zip(entry_keys, fetched, strict=True)]

    def _load_from_tiers(self, slot: Slot, entry_keys: list[bytes]) -> list[bytes | None]:
        """Keys the user's file missed, looked up in the tiers after it, in order: the
        read-only layers (skipping what the user's masks hide); counts hits and misses."""
        try:
            cursor: apsw.Cursor | None = self._pool.cursor(slot)
        except apsw.Error as error:
            log.warning("vyre-sqlcache: reading the layer masks failed: %s", error)
            cursor = None
        found = self._layers.load(entry_keys, self._masks(cursor))
        return [
            self._counted(slot, key, lookup) for key, lookup in zip(entry_keys, found, strict=True)
        ]

    def _from_layers(
        self, slot: Slot, entry_key: bytes, cursor: apsw.Cursor | None
    ) -> bytes | None:
        """`_load_from_tiers` of one key, the masks read through `cursor`: a read's own."""
        return self._counted(slot, entry_key, self._layers.load_one(entry_key, self._masks(cursor)))

    def _counted(self, slot: Slot, entry_key: bytes, lookup: _layers.Lookup | None) -> bytes | None:
        """A layer lookup's bytes, counted as a hit, or None counted as a miss."""
        if lookup is None:
            self._books.miss()
            return None
        if self._books.hit(entry_id(entry_key)) and not self._readonly:
            self._write_bookkeeping(self._pool.main(slot), wait=False)
        return lookup.data

    def _explain_layers(self, entry_key: bytes, cursor: apsw.Cursor) -> tuple[Path, bool] | None:
        """The first layer holding `entry_key` with sound bytes, and whether the user's
        masks hide it there (no hit counted), or None: for `explain`."""
        masked = self._masks(cursor)
        for layer in self._layers.layers:
            got = layer.fetch_one(entry_key)
            if got is not None and _rows.verify(entry_key, got):
                return layer.path, masked(entry_key, got.checksum)
        return None

    def _masks(self, cursor: apsw.Cursor | None) -> Callable[[bytes, bytes], bool]:
        """Whether the user's file hides a layer entry; one it cannot answer for is hidden
        (bytes an invalidation may have reached are never served)."""

        def masked(entry_key: bytes, checksum: bytes) -> bool:
            if cursor is None:
                return True
            try:
                return self._layers.masks.masked(cursor, entry_key, checksum)
            except apsw.Error as error:
                log.warning("vyre-sqlcache: reading the layer masks failed: %s", error)
                return True

        return masked

    def _fetch(
        self, slot: Slot, entry_key: bytes, cursor: apsw.Cursor | None = None, *, held: bool = False
    ) -> _rows.Fetched | None:
        """The entry's stored bytes, unverified, or None; damage or I/O trouble is a miss.
        `held`: read in the thread's held snapshot (see `_snapshots`)."""
        try:
            if cursor is None and held:
                cursor = self._pool.held_cursor(slot)
                reader = self._pool.held_reader(slot)
                return reader.read(cursor, lambda: self._pool.large(slot), entry_key)
            if cursor is None:
                cursor = self._pool.cursor(slot)
            return _rows.fetch(cursor, lambda: self._pool.large(slot), entry_key)
        except apsw.Error as error:
            # A read never takes the application down: damage or I/O trouble is a miss.
            self._note_damage(error)
            # Once per kind of error: a process reading on in a damaged file moved aside
            # (it follows the path at its next commit) would log every read.
            kind = str(error)
            if kind in self._read_failures:
                log.debug("vyre-sqlcache: reading %s failed: %s", entry_key.hex(), error)
            else:
                self._read_failures.add(kind)
                log.warning(
                    "vyre-sqlcache: reading %s failed: %s (a miss; the same failure of "
                    "other reads is logged at debug level)",
                    entry_key.hex(),
                    error,
                )
            return None

    def _verified(
        self, slot: Slot, entry_key: bytes, fetched: _rows.Fetched | None
    ) -> bytes | None:
        """The fetched data if its checksum holds, counting the hit or miss; else None."""
        if fetched is None:
            self._books.miss()
            return None
        if not _rows.verify(entry_key, fetched):
            self._books.miss()
            self._on_mismatch(slot, entry_key, fetched.algo)
            return None
        if self._books.hit(entry_id(entry_key)) and not self._readonly:
            self._write_bookkeeping(self._pool.main(slot), wait=False)
        return fetched.data

    def _on_mismatch(self, slot: Slot, entry_key: bytes, algo: str) -> None:
        """Drop an entry whose bytes fail their checksum, once a locked second look agrees.

        The second look, under the write lock, rules out a blob replaced between two
        statements of the read, and a row that belongs to another key sharing the row id.
        """
        self._books.checksum_failed()
        if self._readonly:
            log.warning("vyre-sqlcache: entry %s failed its checksum", entry_key.hex())
            return
        try:
            with self._write_transaction(slot, "dropping a damaged entry") as connection:
                found = _rows.owner(connection, entry_key)
                if found is not None and found != entry_key:
                    return  # another key's row: a miss for us, not damage
                again = self._fetch(slot, entry_key, connection.cursor())
                if again is not None and _rows.verify(entry_key, again):
                    return  # replaced while we read: it is good now
                log.warning(
                    "vyre-sqlcache: entry %s in %s failed its %s checksum; dropping it "
                    "(it will be recompiled)",
                    entry_key.hex(),
                    self._path,
                    algo,
                )
                _rows.drop(connection, entry_key)
        except CacheError as error:
            log.warning("vyre-sqlcache: could not drop the damaged entry: %s", error)

    # -- internals: bookkeeping and damage --------------------------------------------

    def _write_bookkeeping(self, connection: apsw.Connection, *, wait: bool) -> None:
        """Write buffered bookkeeping in its own transaction; unless `wait`, only if the
        write lock is free at once (a read or a close never waits for it)."""
        try:
            with transaction(connection, wait=wait):
                self._books.write(connection, _now_ms())
        except apsw.Error as error:
            # Best effort: a busy or read-only file keeps the buffer for later.
            log.debug("vyre-sqlcache: access times not written yet: %s", error)

    def _note_damage(self, error: apsw.Error) -> None:
        """Ask the next open to verify the file when SQLite met a damaged page (of the
        file at the path: not of one moved aside or replaced while this object read it)."""
        if isinstance(error, (apsw.CorruptError, apsw.NotADBError)) and not self._readonly:
            if self._inode is not None and inode(self._path) != self._inode:
                return
            with suppress(OSError):
                needs_check_marker(self._path).touch()
