"""How a cache talks to SQLite: connection setup, write transactions, error translation."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import apsw
import apsw.bestpractice

from .errors import (
    CacheBusyError,
    CacheError,
    CacheFullError,
    CorruptCacheError,
    ReadOnlyCacheError,
)

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MMAP_BYTES",
    "PAGE_SIZE",
    "connect",
    "immediate",
    "retry_busy",
    "translate",
]

T = TypeVar("T")

#: Page size of new cache files: 16 KiB keeps a 4 KiB blob inside its b-tree
#: leaf (one page read a lookup) while wasting at most one page on larger blobs.
PAGE_SIZE = 16384
#: Memory-mapped reads avoid a copy through SQLite's page cache.
MMAP_BYTES = 1 << 30
#: How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 10_000


def connect(
    path: Path,
    *,
    readonly: bool = False,
    query_only: bool = False,
    immutable: bool = False,
    mmap: bool = True,
    vfs: str | None = None,
) -> apsw.Connection:
    """Open `path` (through the named SQLite VFS, if any) with the settings every cache uses.

    `query_only` refuses every change made through this connection. `immutable` is for
    read-only media with no write-ahead log to read: SQLite then needs no -shm file and
    takes no locks. `mmap=False` reads through SQLite's page cache instead of a memory
    map. Raises apsw errors as they come; callers translate them with `translate`.
    """
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    if not readonly:
        flags |= apsw.SQLITE_OPEN_CREATE
    name = str(path)
    if immutable:
        name = Path(path).resolve().as_uri() + "?immutable=1"
        flags |= apsw.SQLITE_OPEN_URI
    connection = apsw.Connection(name, flags=flags | apsw.SQLITE_OPEN_NOFOLLOW, vfs=vfs)
    try:
        # bestpractice, one piece at a time: apply() would install global hooks
        # on every apsw connection of the host application.
        connection.set_busy_timeout(BUSY_TIMEOUT_MS)
        apsw.bestpractice.connection_dqs(connection)
        apsw.bestpractice.connection_recursive_triggers(connection)
        # A cache file may come from anyone: never run code stored in its schema,
        # and refuse writes that could corrupt it deliberately.
        connection.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        connection.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
        connection.pragma("mmap_size", MMAP_BYTES if mmap else 0)
        if query_only:
            connection.pragma("query_only", True)
        # Commits survive a process crash; flush() adds a synced commit for power loss.
        connection.pragma("synchronous", "NORMAL")
        # Checkpoints run in a background thread (checkpointer.py), not inside commits.
        connection.pragma("wal_autocheckpoint", 0)
    except BaseException:
        connection.close()
        raise
    return connection


def retry_busy(operation: Callable[[], T], timeout_s: float = BUSY_TIMEOUT_MS / 1000) -> T:
    """Run `operation`, retrying with growing sleeps while SQLite answers busy.

    SQLite returns SQLITE_BUSY without waiting where waiting could deadlock (a change
    of journal mode while another process creates the same file, say); this waits
    those out too, up to `timeout_s`, then lets apsw.BusyError through.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            return operation()
        except apsw.BusyError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.1)


@contextmanager
def immediate(connection: apsw.Connection) -> Iterator[None]:
    """Run the block in a `BEGIN IMMEDIATE` transaction: commit on success, roll back on error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (a sync error, say) can leave the transaction open.
        if not connection.get_autocommit():
            with suppress(apsw.Error):  # the original error is the one to report
                connection.execute("ROLLBACK")
        raise


_TRANSLATIONS: tuple[tuple[type[apsw.Error], type[CacheError], str], ...] = (
    (
        apsw.BusyError,
        CacheBusyError,
        "another process held the write lock too long; retry later",
    ),
    (
        apsw.FullError,
        CacheFullError,
        "the disk is full; free space or lower the cache's size cap",
    ),
    (
        apsw.ReadOnlyError,
        ReadOnlyCacheError,
        "the file or its folder cannot be written; open with readonly=True or fix its permissions",
    ),
    (
        apsw.CorruptError,
        CorruptCacheError,
        "the file is damaged; run 'vyre-sqlcache check' to see how, or delete it "
        "(it is only a cache)",
    ),
    (
        apsw.NotADBError,
        CorruptCacheError,
        "the file is not a SQLite database; delete it or choose another path",
    ),
)


def translate(error: apsw.Error, what: str, path: Path) -> CacheError:
    """The `CacheError` subclass, with advice, that stands for an apsw error."""
    for apsw_type, cache_type, advice in _TRANSLATIONS:
        if isinstance(error, apsw_type):
            return cache_type(f"{what} failed on {path}: {error}; {advice}")
    return CacheError(f"{what} failed on {path}: {error}")
