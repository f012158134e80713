"""Connections: the one `connect()`, transactions, error translation, and the per-thread pool.

Every connection the package opens comes from `connect()`. A `ConnectionPool`
gives each thread its own connections to one cache file and owns their
lifecycle: they are reclaimed when their thread ends (threads made by C or Rust
thread pools included), and closed before the process forks and on `close()`,
once the calls under way in other threads have finished.

Why close before fork: SQLite keeps one lock state per file per process. A
child that inherited open connections inherits that state without the kernel
locks behind it, so either side can then believe it is alone on the file, and a
last close deletes the write-ahead log the other still uses. With no connection
open at the instant of fork, the child inherits nothing of SQLite's, and both
sides reopen lazily on their next call.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import apsw
import apsw.bestpractice

from . import (
    _cachefile,  # (also: its fork hook must run after ours)
    _rows,
    _snapshots,
)
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
    "READ_ERRORS",
    "ConnectionPool",
    "ForkRegistry",
    "Slot",
    "connect",
    "has_moved",
    "interrupts_held",
    "open_in_process",
    "retry_busy",
    "stop_if_interrupted",
    "transaction",
    "translate",
    "vacuum",
]

_getsignal: Callable[[int], Any]
_setsignal: Callable[[int, Any], Any]
try:
    # The C functions under `signal`'s: those convert each handler to an enum through a
    # ValueError for a function, 13 of the 16 µs a held block cost (every commit has one).
    import _signal  # type: ignore[import-not-found]

    _getsignal, _setsignal = _signal.getsignal, _signal.signal
except ImportError:  # not CPython
    _getsignal, _setsignal = signal.getsignal, signal.signal

log = logging.getLogger("vyre_sqlcache")

T = TypeVar("T")

#: Page size of new cache files: 16 KiB keeps a 4 KiB blob inside its b-tree
#: leaf (one page read a lookup) while wasting at most one page on larger blobs.
PAGE_SIZE = 16384
#: Memory-mapped reads avoid a copy through SQLite's page cache.
MMAP_BYTES = 1 << 30
#: How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 10_000
#: How long fork() and close() wait for other threads' calls to finish.
QUIESCE_TIMEOUT_S = 20.0


def connect(
    path: Path,
    *,
    readonly: bool = False,
    query_only: bool = False,
    immutable: bool = False,
    mmap: bool = True,
    vfs: str | None = None,
    pool: ConnectionPool | None = None,
) -> apsw.Connection:
    """Open `path` (through the named SQLite VFS, if any) with the settings every cache uses.

    `readonly` opens the file without write access; `query_only` refuses every change
    made through a writable connection. `immutable` is for read-only media with no
    write-ahead log to read: SQLite then needs no -shm file and takes no locks.
    `mmap=False` reads through SQLite's page cache instead of a memory map. `busy`
    replaces the busy timeout (it gets the number of earlier calls and returns
    whether to try again). Raises apsw errors as they come; callers `translate` them.
    """
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    if not readonly:
        flags |= apsw.SQLITE_OPEN_CREATE
    name = _cachefile.sqlite_name(path)
    if immutable:
        name = Path(path).as_uri() + "?immutable=1"
        flags |= apsw.SQLITE_OPEN_URI
    # The path is resolved by the caller; NOFOLLOW then refuses a link swapped in since.
    connection = apsw.Connection(name, flags=flags | apsw.SQLITE_OPEN_NOFOLLOW, vfs=vfs)
    try:
        # bestpractice, one piece at a time: apply() would install global hooks
        # on every apsw connection of the host application.
        if pool is None:
            connection.set_busy_timeout(BUSY_TIMEOUT_MS)
        else:
            wait_for_locks(connection, pool)
        apsw.bestpractice.connection_dqs(connection)
        apsw.bestpractice.connection_recursive_triggers(connection)
        # A cache file may come from anyone: never run code stored in its schema,
        # and refuse writes that could corrupt it deliberately.
        connection.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        connection.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
        connection.pragma("mmap_size", MMAP_BYTES if mmap else 0)
        if query_only:
            connection.pragma("query_only", True)
        if not readonly:
            # Commits survive a process crash; flush() adds a synced commit for power loss.
            connection.pragma("synchronous", "NORMAL")
            # Checkpoints run in a background thread (_checkpointer.py), not inside commits.
            connection.pragma("wal_autocheckpoint", 0)
            # Statement journals (every insert through the triggers needs one) in memory,
            # not in a temporary file: a fifth off a batch insert. VACUUM's copy of the
            # whole file must not follow them there (`vacuum`).
            connection.pragma("temp_store", "MEMORY")
    except BaseException:
        connection.close()
        raise
    return connection


def vacuum(connection: apsw.Connection, into: Path | None = None) -> None:
    """VACUUM (into a new file `into`, if given), its transient data on disk and not in
    memory (cache connections keep temporary data in memory); raises apsw errors, and
    KeyboardInterrupt on Ctrl-C within a few rows."""
    connection.pragma("temp_store", "FILE")
    # Python runs signal handlers only between bytecodes: a callback every few rows lets
    # Ctrl-C stop a copy of a large file (the VACUUM is rolled back) instead of after it.
    connection.set_progress_handler(_let_signals_in, VACUUM_PROGRESS_STEPS)
    try:
        if into is None:
            connection.execute("VACUUM")
        else:
            connection.execute("VACUUM INTO ?", (_cachefile.sqlite_name(into),))
    finally:
        connection.set_progress_handler(None)
        connection.pragma("temp_store", "MEMORY")


#: SQLite steps between two calls of the progress handler during a VACUUM: a copied row
#: takes a few, so a Ctrl-C stops it within a few dozen rows.
VACUUM_PROGRESS_STEPS = 256


def _let_signals_in() -> bool:
    return False


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


def has_moved(connection: apsw.Connection) -> bool:
    """Whether the file `connection` has open was deleted or renamed away since (its path
    now names another file, or none); False where the VFS cannot tell."""
    moved = ctypes.c_int(0)
    try:
        known = connection.file_control(
            "main", apsw.SQLITE_FCNTL_HAS_MOVED, ctypes.addressof(moved)
        )
    except apsw.Error:
        return False
    return bool(known and moved.value)


def end_transaction(connection: apsw.Connection) -> None:
    """Roll back whatever transaction the connection has open; never raises apsw errors."""
    with suppress(apsw.Error):  # (a closed connection has none)
        if not connection.get_autocommit():
            connection.execute("ROLLBACK")


class _Holder:
    """SIGINT's handler while an `interrupts_held` block runs: keeps the signals for the
    application's handler (`put_aside`), which gets them when the block ends.

    An exception of another signal handler (a SIGALRM timeout) can cut a block short
    between two of its steps, leaving this installed: once its block is over (`active`
    False, the first thing the block's end does) it puts the application's handler back
    and passes the signal on, so Ctrl-C is never swallowed.
    """

    def __init__(self, put_aside: Callable[[int, FrameType | None], Any]) -> None:
        self.put_aside = put_aside
        self.active = True
        self.held: list[tuple[int, FrameType | None]] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.active:
            self.held.append((signum, frame))
            return
        with suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, self.put_aside)
        self.put_aside(signum, frame)


#: The holder of the `interrupts_held` block of the main thread under way, if any
#: (nested blocks, a commit inside a transaction, leave the handler to it).
_holder: _Holder | None = None


def _holding() -> bool:
    return _holder is not None and _holder.active


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt now if Ctrl-C came during the `interrupts_held` block under
    way, instead of at its end: a long transaction's safe point (it rolls back), so that
    Ctrl-C stops a merge at once instead of being said after its commit."""
    holder = _holder
    if holder is not None and holder.active and holder.held:
        holder.held.clear()  # raised here, not again at the block's end
        raise KeyboardInterrupt


def _interrupts_after_fork_in_child() -> None:
    """A child forked by another thread while the main thread held Ctrl-C: its main thread
    is the forking one, in no such block, so it gets the application's handler back
    (else the inherited holder would swallow every Ctrl-C of the child)."""
    global _holder
    holder, _holder = _holder, None
    if holder is not None and holder.active:
        holder.active = False
        with suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, holder.put_aside)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_interrupts_after_fork_in_child)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, in the main thread.

    A KeyboardInterrupt between BEGIN and the end of a transaction would leave the
    write lock held for every process until this one exits. The signal is kept and
    delivered to the application's own handler as soon as the block has ended.
    """
    global _holder
    if _holding() or threading.current_thread() is not threading.main_thread():
        yield  # an outer block of the main thread holds it already
        return
    previous = _getsignal(signal.SIGINT)
    if isinstance(previous, _Holder):
        previous = previous.put_aside  # left by a block cut short: see `_Holder`
    if previous is None or previous in (signal.SIG_IGN, signal.SIG_DFL):
        yield
        return
    holder = _Holder(previous)
    try:
        # Inside the `try`: an exception landing right after the swap still ends the
        # block, which puts the application's handler back.
        _holder = holder
        try:
            _setsignal(signal.SIGINT, holder)
        except ValueError:  # not the main interpreter
            holder.active = False
        yield
    finally:
        # First, before any call where another handler's exception could land.
        holder.active = False
        if _holder is holder:
            _holder = None
        with suppress(ValueError, TypeError):
            if _getsignal(signal.SIGINT) is holder:
                _setsignal(signal.SIGINT, previous)
        if holder.held:
            previous(*holder.held[0])


@contextmanager
def transaction(
    connection: apsw.Connection, kind: str = "IMMEDIATE", *, wait: bool = True
) -> Iterator[None]:
    """Run the block in a `BEGIN <kind>` transaction: commit on success, roll back otherwise.

    BEGIN sits inside the `try`, and Ctrl-C is held for the transaction, so no path
    leaves a transaction (and its lock) open behind an exception. `wait=False` gives up
    at once (apsw.BusyError) where another process holds the lock.
    """
    waiter = None if wait else waiter_of(connection)
    with interrupts_held():
        try:
            if waiter is not None:
                waiter.patient = False
            _snapshots.end(connection)  # a held read snapshot (see _snapshots.py)
            connection.execute(f"BEGIN {kind}")
            yield
            connection.execute("COMMIT")
            if kind != "DEFERRED":
                _snapshots.changed()
        finally:
            # A failed COMMIT (a sync error, say) can leave the transaction open; the
            # original error is the one to report.
            end_transaction(connection)
            if waiter is not None:
                waiter.patient = True


_TRANSLATIONS: tuple[tuple[type[apsw.Error], type[CacheError], str], ...] = (
    (
        apsw.BusyError,
        CacheBusyError,
        "another process held its lock too long (the write lock, or the whole file, as "
        "a sqlite3 shell does after PRAGMA locking_mode=EXCLUSIVE); retry later",
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
        "the file is damaged; run 'vyre-sqlcache check --repair' to rebuild it, or delete it "
        "(it is only a cache)",
    ),
    (
        apsw.NotADBError,
        CorruptCacheError,
        "the file is not a SQLite database; delete it or choose another path",
    ),
)


#: What reading a cache file may raise: SQLite's errors, and apsw's for text that is not
#: UTF-8, which only damage leaves in a cache file (integrity_check does not see it).
READ_ERRORS = (apsw.Error, UnicodeDecodeError)


def translate(
    error: apsw.Error | UnicodeDecodeError,
    what: str,
    path: Path,
    connection: apsw.Connection | None = None,
) -> CacheError:
    """The `CacheError` subclass, with advice, that stands for an apsw error (met on
    `connection`, if given: its errno tells an I/O error that is a full file)."""
    if isinstance(error, UnicodeDecodeError) and what == "the query":
        return CacheError(
            f"{what} failed on {path}: a value of its result is text that is not UTF-8; "
            "the query made it (CAST of bytes AS TEXT: select the bytes instead), or an "
            "entry holds damaged text (`vyre-sqlcache check` finds it, --repair drops it)"
        )
    if isinstance(error, UnicodeDecodeError):
        return CorruptCacheError(
            f"{what} failed on {path}: an entry holds text that is not UTF-8, which only "
            "damage leaves; `vyre-sqlcache check --repair` (check(repair=True)) drops it"
        )
    if (
        connection is not None
        and isinstance(error, apsw.IOError)
        and connection.system_errno == errno.EFBIG
    ):
        # SQLite reports only ENOSPC as a full disk; the largest file the process may
        # write (RLIMIT_FSIZE, `ulimit -f`) or the file system allows is one too.
        limit = _cachefile.largest_file()
        size = max(_cachefile.file_size(Path(f"{path}{side}")) for side in ("", "-wal"))
        if limit is not None and size > limit:
            # Lowered below the file while it was open: no eviction shrinks the file.
            return CacheFullError(
                f"{what} failed on {path}: the file is {size} bytes, more than the largest "
                f"file this process may write now (`ulimit -f`: {limit} bytes), so its pages "
                "past that can never be written; raise the limit"
            )
        return CacheFullError(
            f"{what} failed on {path}: the file reached the largest size this process "
            "may write (the file size limit, `ulimit -f`, or the file system's); lower "
            "the cache's size cap or raise the limit"
        )
    if connection is not None and isinstance(error, apsw.IOError):
        # SQLite says only "disk I/O error"; the system's errno says which.
        code = connection.system_errno
        if code == errno.EROFS:
            return ReadOnlyCacheError(
                f"{what} failed on {path}: the file system that holds it became read-only "
                "(remounted so, as the kernel does after disk errors: see `dmesg`); it can "
                "still be read: open it with readonly=True, or give the cache a path on a "
                "writable disk"
            )
        if code == errno.EIO:
            return CacheError(
                f"{what} failed on {path}: the disk reported an input/output error (EIO: "
                "see `dmesg`); once the disk is sound, `vyre-sqlcache check` the file, or "
                "delete it (it is only a cache)"
            )
    if isinstance(error, apsw.CantOpenError) and _out_of_descriptors():
        return CacheError(
            f"{what} failed on {path}: this process has no file descriptor left (it may "
            f"open {_descriptor_limit()}); raise the limit (`ulimit -n`), or use the cache "
            "from fewer threads (each one's connections hold up to 4)"
        )
    for apsw_type, cache_type, advice in _TRANSLATIONS:
        if isinstance(error, apsw_type):
            return cache_type(f"{what} failed on {path}: {error}; {advice}")
    return CacheError(f"{what} failed on {path}: {error}")


#: Descriptors one thread's connections may hold (the file, its -wal, the -shm, and the
#: file again for a large read): with fewer spare, a failed open was for want of them.
CONNECTION_DESCRIPTORS = 4


def _out_of_descriptors() -> bool:
    """Whether this process is out of file descriptors (EMFILE, or ENFILE system-wide):
    SQLite says only "unable to open database file"."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    except OSError as error:
        return error.errno in (errno.EMFILE, errno.ENFILE)
    # A failed open gives back what it had opened first (the file, before its -wal
    # failed), and so may another thread's: a free descriptor now proves little.
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except (ImportError, OSError):
        return False
    return limit != resource.RLIM_INFINITY and limit - in_use < CONNECTION_DESCRIPTORS


def _descriptor_limit() -> int | str:
    """How many file descriptors this process may open (its soft limit), or "?"."""
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):
        return "?"


_slot_keys = itertools.count(1)

#: Numbers each call's busy mark, so that only that call's `finally` clears it (a call's
#: generator finalized late, by the cycle collector in another thread, leaves a later
#: call's mark alone).
next_call = itertools.count(1).__next__


class Slot:
    """One thread's connections to a cache file: the main one, its reusable cursor, and
    one without memory mapping for large blobs. `busy` is set while a call runs (to its
    number), under `lock`, which the snapshot reaper holds while it ends the snapshot of
    a slot not busy; the call clears it in a `finally` that takes no other step first, so
    that an exception landing anywhere (a signal handler's) never leaves it set. (A lock
    held for the whole call was left taken by one landing before the call's `try`.)
    `held_since` (monotonic seconds, 0.0 for none), `held_reads` and
    `held_generation` describe the main connection's held read snapshot."""

    __slots__ = (
        "__weakref__",
        "busy",
        "cursor",
        "held_generation",
        "held_reads",
        "held_since",
        "key",
        "large",
        "lock",
        "main",
        "reader",
        "watched",
    )

    def __init__(self) -> None:
        # Not id(self): a slot of an ended thread is freed, and a new one can get its
        # address before the pool has closed the dead one's connections.
        self.key = next(_slot_keys)
        self.main: apsw.Connection | None = None
        self.cursor: apsw.Cursor | None = None
        self.large: apsw.Connection | None = None
        self.busy = 0  # the number of the call under way, 0 for none
        self.lock = threading.Lock()
        self.held_since = 0.0
        self.held_reads = 0
        self.held_generation = 0
        self.reader: _rows.HeldReader | None = None  # of the held snapshot, if made yet
        self.watched = False  # known to the snapshot reaper

    def connections(self) -> list[apsw.Connection]:
        return [c for c in (self.main, self.large) if c is not None]


class Forkable(Protocol):
    def _before_fork(self) -> None: ...
    def _after_fork_in_parent(self) -> None: ...
    def _after_fork_in_child(self) -> None: ...


F = TypeVar("F", bound=Forkable)


class ForkRegistry(Generic[F]):
    """The live objects of a kind that prepare for every fork (weakly held), and the hooks
    that run their `_before_fork` and after-fork methods.

    Nothing joins between a fork's before and after hooks: an object made meanwhile in
    another thread would be forked unprepared, and "released" afterwards without having
    been locked (which raised, and left every object after it locked for ever). The
    after hooks release exactly the objects the before hook prepared.
    """

    def __init__(self) -> None:
        self._members: weakref.WeakSet[F] = weakref.WeakSet()
        self._joining = threading.Lock()  # held from before a fork to after it
        self._prepared: list[F] = []

    def add(self, member: F) -> None:
        with self._joining:
            self._members.add(member)

    def __iter__(self) -> Iterator[F]:
        return iter(list(self._members))

    def before_fork(self) -> None:
        self._joining.acquire()
        self._prepared.clear()
        for member in list(self._members):
            member._before_fork()
            self._prepared.append(member)

    def after_fork_in_parent(self) -> None:
        try:
            for member in self._prepared:
                member._after_fork_in_parent()
        finally:
            self._prepared.clear()
            self._joining.release()

    def after_fork_in_child(self) -> None:
        self._joining = threading.Lock()
        for member in list(self._members):
            member._after_fork_in_child()
        self._prepared.clear()

    def register_at_fork(self, after_in_child: Callable[[], None] | None = None) -> None:
        """Run the hooks at every fork (`after_in_child` too, after this one's)."""
        if not hasattr(os, "register_at_fork"):
            return

        def in_child() -> None:
            self.after_fork_in_child()
            if after_in_child is not None:
                after_in_child()

        os.register_at_fork(
            before=self.before_fork,
            after_in_parent=self.after_fork_in_parent,
            after_in_child=in_child,
        )


_pools: ForkRegistry[ConnectionPool] = ForkRegistry()


class ConnectionPool:
    """Per-thread connections to one file, opened on first use by `opener(mmap)`.

    A call runs in `call()` (or `enter()` inside a `try` whose `finally` clears the
    mark). `quiesce()` stops new calls, waits for those of other threads and closes
    every connection; it runs before every fork (both sides then reopen on their next
    call) and in `close()`.
    """

    def __init__(self, opener: Callable[[bool], apsw.Connection], path: Path) -> None:
        self._opener = opener
        self._path = path
        self._local = threading.local()
        self._slots: list[weakref.ref[Slot]] = []
        self._held: dict[int, list[apsw.Connection]] = {}  # slot.key -> its connections
        self._lock = threading.Lock()
        self._resume = threading.Condition(self._lock)
        self._paused = False
        self.closed = False
        #: No call waits for another process's lock past this `time.monotonic()` (close()
        #: sets it: its wait, the writer thread's commit under way included, is one
        #: busy timeout from the call); None: each wait is its own timeout.
        self.wait_until: float | None = None
        _pools.add(self)
        self._slot_freed = _on_slot_freed(weakref.ref(self))

    def writing_here(self) -> bool:
        """Whether a connection of this pool is inside a write transaction now: this
        process holds the write lock (another thread's call, or a transaction an
        asynchronous exception left open until its generator is collected)."""
        for ref in list(self._slots):
            slot = ref()
            connection = None if slot is None else slot.main
            if connection is not None:
                with suppress(apsw.Error):
                    if connection.txn_state() == apsw.SQLITE_TXN_WRITE:
                        return True
        return False

    # -- calls ---------------------------------------------------------------------

    def slot(self) -> Slot:
        """This thread's slot (made on its first use), not marked."""
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = Slot()
            with self._lock:
                self._slots.append(weakref.ref(slot, self._slot_freed))
        return slot

    @contextmanager
    def call(self) -> Iterator[Slot]:
        """One call's use of this thread's connections: the slot, entered (see `enter`)
        for the block. Raises CacheError once the pool is closed."""
        slot, call = self.slot(), next_call()
        try:
            self.enter(slot, call)
            yield slot
        finally:
            if slot.busy == call:
                slot.busy = 0

    def enter(self, slot: Slot, call: int) -> None:
        """Mark this thread's `slot` busy with `call` (from `next_call()`), for a call that
        clears the mark in a `finally` around this (`if slot.busy == call: slot.busy =
        0`, no function call first). Raises CacheError once the pool is closed."""
        with slot.lock:
            slot.busy = call
        if self._paused or self.closed:
            slot.busy = 0
            self._wait_for_resume()
            with slot.lock:
                slot.busy = call
        main = slot.main
        if main is not None:
            state = main.txn_state()
            if state == apsw.SQLITE_TXN_WRITE or (
                not slot.held_since
                # (a BEGIN that has read nothing yet is a transaction in state NONE)
                and (state != apsw.SQLITE_TXN_NONE or not main.get_autocommit())
            ):
                # An exception delivered asynchronously (Ctrl-C, say) ended an earlier call
                # of this thread inside a transaction or a statement: a snapshot kept open
                # would block checkpoints and make every later write fail as busy.
                self.reopen(slot)

    def enter_held(self, slot: Slot, call: int) -> bool:
        """Enter `slot` as `enter()` does if its held snapshot and its reader can serve one
        more read now (see `held_cursor`); whether it did (if not, the slot is left not
        marked, and `enter()` and `held_cursor()` must look). The common read's short way
        in; the same `finally` clears the mark."""
        if slot.reader is None:
            return False
        with slot.lock:  # (the reaper ends a snapshot only under it, if not busy)
            slot.busy = call
        if self._paused or self.closed:
            slot.busy = 0
            return False
        main, since, reader = slot.main, slot.held_since, slot.reader
        if (
            main is not None
            and since
            and reader is not None
            and reader.since == since
            and slot.held_reads < _snapshots.HOLD_READS
            and slot.held_generation == _snapshots.current_generation()
            and time.monotonic() - since < _snapshots.HOLD_S
            and not main.get_autocommit()
            and main.txn_state() != apsw.SQLITE_TXN_WRITE
        ):
            slot.held_reads += 1
            return True
        slot.busy = 0
        return False

    def reopen(self, slot: Slot) -> None:
        """Close a slot's connections (ending any transaction left open); the slot opens
        new ones on next use."""
        connections = slot.connections()
        slot.main = slot.cursor = slot.large = slot.reader = None
        slot.held_since = 0.0
        with self._lock:
            held = self._held.get(slot.key, [])
            self._held[slot.key] = [c for c in held if c not in connections]
        for connection in connections:
            end_transaction(connection)
            with suppress(apsw.Error):
                connection.close(True)

    def _wait_for_resume(self) -> None:
        with self._lock:  # (not the Condition: see `_wakeup`)
            while self._paused and not self.closed:
                self._resume.wait()
        if self.closed:
            raise CacheError(f"the cache {self._path} is closed; open it again to use it")

    def main(self, slot: Slot) -> apsw.Connection:
        """The slot's main connection, opened on first use, its held snapshot ended."""
        if slot.held_since:
            self.release(slot)
        if slot.main is None:
            # The cursor first: an exception landing between the two (an alarm's, handled
            # as a C call returns) must not leave a connection without its cursor.
            main = self._open(slot, mmap=True)
            slot.cursor = main.cursor()
            slot.main = main
        return slot.main

    def cursor(self, slot: Slot) -> apsw.Cursor:
        """The slot's reusable cursor on its main connection (saves making one a read),
        its held snapshot ended."""
        self.main(slot)
        assert slot.cursor is not None
        return slot.cursor

    def held_cursor(self, slot: Slot) -> apsw.Cursor:
        """The slot's cursor inside its held read snapshot (see `_snapshots`), begun anew
        when it has served its reads or its time, or this process changed the file."""
        main = slot.main
        since = slot.held_since
        if (
            main is not None
            and since
            and (
                slot.held_reads < _snapshots.HOLD_READS
                and slot.held_generation == _snapshots.current_generation()
                and time.monotonic() - since < _snapshots.HOLD_S
                and not main.get_autocommit()
            )
        ):
            slot.held_reads += 1
            assert slot.cursor is not None
            return slot.cursor
        main = self.main(slot)  # ends the stale snapshot
        if not main.get_autocommit() and not _snapshots.end(main, slot.reader):
            self.reopen(slot)
            main = self.main(slot)
        slot.held_generation = _snapshots.current_generation()
        assert slot.cursor is not None
        slot.cursor.execute("BEGIN")
        slot.held_since = time.monotonic()
        slot.held_reads = 1
        _snapshots.watch(slot)
        return slot.cursor

    def held_reader(self, slot: Slot) -> _rows.HeldReader:
        """The blob-handle reader of the slot's held snapshot (call right after
        `held_cursor`); raises apsw errors."""
        reader = slot.reader
        if reader is None or reader.since != slot.held_since:
            assert slot.main is not None
            reader = slot.reader = _rows.HeldReader(slot.main, slot.held_since)
        return reader

    def release(self, slot: Slot) -> None:
        """End the slot's held read snapshot, if any."""
        slot.held_since = 0.0
        main = slot.main
        if main is not None and not _snapshots.end(main, slot.reader):
            self.reopen(slot)

    def large(self, slot: Slot) -> apsw.Connection:
        """The slot's connection without memory mapping, for large blobs."""
        if slot.large is None:
            slot.large = self._open(slot, mmap=False)
        return slot.large

    def adopt(self, slot: Slot, connection: apsw.Connection) -> None:
        """Make `connection` (already checked by the caller) the slot's main connection."""
        slot.main = connection
        slot.cursor = connection.cursor()
        self._keep(slot, connection)

    def _open(self, slot: Slot, *, mmap: bool) -> apsw.Connection:
        connection = self._opener(mmap)
        self._keep(slot, connection)
        return connection

    def _keep(self, slot: Slot, connection: apsw.Connection) -> None:
        with self._lock:
            self._reclaim_locked()
            self._held.setdefault(slot.key, []).append(connection)

    def _reclaim_locked(self) -> None:
        """Close the connections of threads that have ended (their thread-local slot is
        gone), so short-lived threads, ours or a C thread pool's, leave no open files."""
        alive = []
        live_ids = set()
        for ref in self._slots:
            slot = ref()
            if slot is not None:
                alive.append(ref)
                live_ids.add(slot.key)
        self._slots = alive
        for key in [k for k in self._held if k not in live_ids]:
            for connection in self._held.pop(key):
                with suppress(apsw.Error):
                    connection.close()

    def end_ended_snapshots(self) -> None:
        """End the transactions left open on the connections of threads that have ended
        (a held snapshot, which would keep the log from starting over). Closing them is
        left to the next connection this pool opens (`_reclaim_locked`): a close from this
        thread, while the others follow a deleted file, could fold a log into the wrong
        file at the wrong moment."""
        with self._lock:  # (held: `_reclaim_locked` may be closing them)
            live = {slot.key for slot in (ref() for ref in self._slots) if slot is not None}
            for key, held in self._held.items():
                if key not in live:
                    for connection in held:
                        end_transaction(connection)

    def open_connections(self) -> int:
        """How many connections the pool holds now (threads that ended are reclaimed first)."""
        with self._lock:
            self._reclaim_locked()
            return sum(len(held) for held in self._held.values())

    # -- quiescing: fork and close ---------------------------------------------------

    def quiesce(
        self,
        timeout: float | None = None,
        last_look: Callable[[list[apsw.Connection]], None] | None = None,
    ) -> bool:
        """Pause new calls, wait for other threads' calls to end, close every connection.

        `last_look` is first handed the main connections, idle and out of any snapshot.
        Returns False (closing nothing, pausing nothing) if another thread's call did not
        end within `timeout` (default `QUIESCE_TIMEOUT_S`).
        """
        if timeout is None:
            timeout = QUIESCE_TIMEOUT_S
        with self._lock:
            self._paused = True
        me = getattr(self._local, "slot", None)
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while True:
            with self._lock:
                slots = [s for s in (ref() for ref in self._slots) if s is not None]
            if not any(s.busy for s in slots if s is not me):
                break
            if time.monotonic() > deadline:
                self.resume()  # nothing was closed: calls may go on
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        try:
            if last_look is not None:
                with _snapshots.paused():
                    idle = [
                        slot.main
                        for slot in slots
                        if slot.main is not None and _snapshots.end(slot.main, slot.reader)
                    ]
                last_look(idle)
        finally:
            self._close_all(slots)
        return True

    def _close_all(self, slots: list[Slot]) -> None:
        with self._lock:
            for slot in slots:
                # Closing a connection closes its blob handles (the slot's reader's).
                slot.main = slot.cursor = slot.large = slot.reader = None
                slot.held_since = 0.0
            held, self._held = self._held, {}
        with _snapshots.paused():  # the reaper may be ending a snapshot on one of them
            for connections in held.values():
                for connection in connections:
                    with suppress(apsw.Error):
                        connection.close()

    def resume(self) -> None:
        """Let calls run again after `quiesce()`."""
        with self._lock:  # (not the Condition: see `_wakeup`)
            self._paused = False
            self._resume.notify_all()

    def close(self) -> None:
        """Refuse new calls, let other threads' calls end, close every connection; idempotent."""
        with self._lock:  # (not the Condition: see `_wakeup`)
            self.closed = True
            self._resume.notify_all()
        if not self.quiesce():
            log.warning(
                "vyre-sqlcache: %s closed while another thread's call was still running; "
                "its connections close when that thread ends",
                self._path,
            )

    def should_wait(self) -> bool:
        """Whether a call waiting for another process's lock should go on waiting."""
        return not self.closed

    # -- fork ----------------------------------------------------------------------

    def _before_fork(self) -> None:
        self._forked_clean = self.closed or self.quiesce()
        if not self._forked_clean:
            log.warning(
                "vyre-sqlcache: forking while another thread's call on %s has run for over "
                "%.0f s; the child cannot use this cache",
                self._path,
                QUIESCE_TIMEOUT_S,
            )

    def _after_fork_in_parent(self) -> None:
        self.resume()

    def _after_fork_in_child(self) -> None:
        # Threads other than this one are gone: their locks and slots with them.
        self._lock = threading.Lock()
        self._resume = threading.Condition(self._lock)
        me = getattr(self._local, "slot", None)
        self._slots = [] if me is None else [weakref.ref(me)]
        if self._forked_clean:
            self._held = {}
            self._paused = False
        else:
            # The parent's connections stay open and unused here (closing them could
            # delete the parent's write-ahead log); this child may not use the file.
            self._held = {}
            self.closed = True

    _forked_clean = True


def _on_slot_freed(pool: weakref.ref[ConnectionPool]) -> Callable[[object], None]:
    """The weak reference callback of a pool's slots: a freed slot is an ended thread
    (its thread-local storage gone), whose snapshot the reaper then ends (see
    `_snapshots.thread_ended`: this takes no lock)."""

    def freed(_: object) -> None:
        alive = pool()
        if alive is not None and not alive.closed:
            _snapshots.thread_ended(alive)

    return freed


def open_in_process(path: Path) -> bool:
    """Whether a pool of this process has connections to `path` open, or may open them."""
    return any(not pool.closed and pool._path == path for pool in _pools)


_pools.register_at_fork()


class BusyWaiter:
    """A connection's busy handler: waits up to `timeout_ms` for another process's lock,
    gives up at once while not `patient` or once the pool closes (so close() never waits
    out someone else's lock)."""

    def __init__(self, pool: ConnectionPool, timeout_ms: int | None = None) -> None:
        self.pool = pool
        self.timeout_ms = BUSY_TIMEOUT_MS if timeout_ms is None else timeout_ms
        self.patient = True
        self._deadline = 0.0

    def __call__(self, prior_calls: int) -> bool:
        now = time.monotonic()
        if prior_calls == 0:
            self._deadline = now + self.timeout_ms / 1000
            until = self.pool.wait_until
            if until is not None:
                self._deadline = min(self._deadline, until)
        if not self.patient or not self.pool.should_wait() or now >= self._deadline:
            return False
        time.sleep(min(0.001 * (1 << min(prior_calls, 5)), 0.025))
        return True


_waiters: weakref.WeakKeyDictionary[apsw.Connection, BusyWaiter] = weakref.WeakKeyDictionary()


def wait_for_locks(connection: apsw.Connection, pool: ConnectionPool) -> None:
    """Give `connection` a `BusyWaiter` of its pool."""
    waiter = BusyWaiter(pool)
    connection.set_busy_handler(waiter)
    _waiters[connection] = waiter


def waiter_of(connection: apsw.Connection) -> BusyWaiter | None:
    """The connection's `BusyWaiter`, if it has one."""
    return _waiters.get(connection)
