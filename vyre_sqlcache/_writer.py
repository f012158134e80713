"""Write-behind: a write returns once its entry is queued; a thread commits queued entries
in groups, so a thousand small writes cost a handful of commits instead of a thousand.

The queue is a map from entry key to entry that reads of this process look at first,
so a queued entry is read back at once. Commits are serialised by one lock and take
the whole queue in one transaction (a `write_many` stays whole, but for what the cap or
a full disk evicts of it), so a later version of an entry is never overwritten by an
earlier one. The queue is bounded: a
caller that finds it full commits it itself, which also keeps a caller that loops on
`write()` holding the GIL from starving the thread. An error of a background commit
is kept and raised by the next call; the entries stay queued and are retried.

Before a fork the queue is committed and both locks are taken, so the child never
inherits a lock held by a thread it does not have. At a normal exit the queues are
committed too (the thread is a daemon and dies with the interpreter), also in a worker
that multiprocessing forked and ends with `os._exit`.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from typing import Any

from . import _wakeup
from ._connections import ForkRegistry  # (its fork hooks are registered before ours)
from ._rows import NewEntry
from .errors import CacheBusyError, CacheError

__all__ = [
    "GROUP_DELAY_S",
    "MAX_GROUP_DELAY_S",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_ENTRIES",
    "Dropped",
    "WriteBehind",
]

log = logging.getLogger("vyre_sqlcache")

#: How long the thread gathers writes before it commits them: a lone write is seen by
#: other processes after about this long, plus the commit.
GROUP_DELAY_S = 0.003
#: While writes keep coming, the thread gathers them on, up to this long from the first:
#: a burst committed as one group inserts its rows in order, where groups committed
#: beside the caller's loop land between each other's rows and split their pages (1,000
#: writes of 4 KiB and a flush: 61 µs an entry in groups of 512, 37 µs in one).
MAX_GROUP_DELAY_S = 0.010
#: A caller that finds this many entries (or bytes) queued commits them itself.
MAX_QUEUED_ENTRIES = 2048
MAX_QUEUED_BYTES = 16 << 20


#: What the thread's commit returns when it found a commit that met another process's lock
#: ahead of it: it did not try.
BEHIND_BUSY: Any = object()


class Dropped(CacheError):
    """Raised by `commit` once the cache object is being collected: its close(), which
    the collection starts, commits the queue."""


#: `commit(entries, durable, extra)` commits `entries` (and runs `extra` on the
#: connection) in one transaction, synced to disk when `durable`; returns extra's result.
Commit = Callable[[list[NewEntry], bool, Any, str], Any]


class WriteBehind:
    """The queue of one cache object and the thread that commits it."""

    def __init__(
        self,
        commit: Commit,
        before_fork: Callable[[], None] | None = None,
        writing_here: Callable[[], bool] = lambda: False,
    ) -> None:
        self._commit = commit
        # Whether this process holds the write lock itself (see `commit`).
        self._writing_here = writing_here
        # Run before every fork under the commit lock, after the queue is committed.
        self._before_fork_hook = before_fork
        #: Entries waiting to be committed, by entry key: read it, change it only here.
        self.queue: dict[bytes, NewEntry] = {}
        self._queued_bytes = 0
        self._error: CacheError | None = None
        # Commits that gave up on another process's lock, and the last one's error.
        self._busy = 0
        self._busy_error: CacheBusyError | None = None
        self._stopped = False
        # Set by the cache's close() before its last commit: later writes raise.
        self._refusing: str | None = None
        # Set by the cache's close() once its last commit is done or its loss logged.
        self.settled = False
        self._thread: threading.Thread | None = None
        self._reset_locks()
        _writers.add(self)

    def _reset_locks(self) -> None:
        self._lock = threading.Lock()  # guards the queue
        self._wake = threading.Condition(self._lock)
        self._committing = threading.Lock()  # one commit at a time, in queue order
        self._starting = threading.Lock()

    # -- the caller's side -------------------------------------------------------------

    def get(self, entry_key: bytes) -> NewEntry | None:
        """The queued entry of `entry_key`, if one is waiting to be committed."""
        return self.queue.get(entry_key)

    def __len__(self) -> int:
        return len(self.queue)

    def put(self, entries: list[NewEntry]) -> None:
        """Queue `entries` (visible to `get` at once); commit the queue here if it is full.

        Raises the error of an earlier background commit, once, with `entries` queued all
        the same, as the writes that error is about are.
        """
        with self._lock:
            if self._refusing is not None:
                raise CacheError(self._refusing)
            for entry in entries:
                old = self.queue.pop(entry.entry_key, None)
                if old is not None:
                    self._queued_bytes -= len(old.blob)
                self.queue[entry.entry_key] = entry
                self._queued_bytes += len(entry.blob)
            full = len(self.queue) >= MAX_QUEUED_ENTRIES or self._queued_bytes >= MAX_QUEUED_BYTES
            if not full:
                self._wake.notify()
        # Once the commit at exit has run, nothing would commit a queued entry: the
        # application's own atexit handlers that run after ours write through.
        if full or _exiting:
            self.commit()
        elif self._thread is None or not self._thread.is_alive():
            try:
                self.start()
            except _wakeup.CannotStart as error:
                _wakeup.cannot_start("writes are committed by their callers", error)
                self.commit()
        self.raise_error()

    def commit(
        self,
        entries: list[NewEntry] | None = None,
        *,
        durable: bool = False,
        extra: Any = None,
        what: str = "storing entries",
        background: bool = False,
    ) -> Any:
        """Commit the queue, then `entries`, and run `extra` on the connection, all in one
        transaction (`what` it is, for errors); return what `extra` returned. Raises
        CacheError types; on error the queue stays as it was.

        `background`: the thread's own commit. Its error is kept for the next call to
        raise (a later commit that goes through forgets it: the writes it was about are
        in). Behind a commit that met another process's lock, it returns `BEHIND_BUSY`
        without trying: that commit's caller was told, and the thread waits a while.
        """
        busy = self._busy
        with self._committing:
            if self._busy != busy and self._busy_error is not None and not self._writing_here():
                if background:
                    return BEHIND_BUSY
                # The commit this call waited for waited out another process's lock for
                # the whole busy timeout: waiting as long again doubled what a flush()
                # promised (10 s). Said here, so not again by the next call. Not where
                # this process holds the lock itself: a transaction an exception left
                # open is let go once its generator is collected, during the wait.
                told = self._busy_error
                if self._error is told:
                    self._error = None
                raise CacheBusyError(str(told))
            with self._lock:
                batch = list(self.queue.values())
            if not batch and not entries and extra is None and not durable:
                return None
            try:
                result = self._commit([*batch, *(entries or [])], durable, extra, what)
            except Dropped:
                raise
            except CacheError as error:
                if isinstance(error, CacheBusyError):
                    self._busy += 1
                    self._busy_error = error
                if background:
                    self._error = error  # before another commit can go through
                raise
            with self._lock:
                for entry in batch:
                    if self.queue.get(entry.entry_key) is entry:
                        del self.queue[entry.entry_key]
                        self._queued_bytes -= len(entry.blob)
                if batch:
                    self._error = None  # what a kept error was about is in now
            return result

    def held(self) -> AbstractContextManager[bool]:
        """No commit of this queue runs in the `with` block (one under way is waited for).
        (The lock itself: see `_snapshots.paused`.)"""
        return self._committing

    def commit_at_exit(self) -> None:
        """Commit what is queued as the process ends; a failure is logged, never raised.
        Nothing once `settled`: close() committed the queue or logged its loss (a close
        under way in another thread is waited for, by the commit lock)."""
        if not self.queue or self.settled:
            return
        try:
            self.commit()
        except CacheError as error:
            log.warning(
                "vyre-sqlcache: %d queued writes were lost at exit: %s", len(self.queue), error
            )

    def raise_error(self) -> None:
        """Raise (once) the error a background commit met."""
        error, self._error = self._error, None
        if error is not None:
            raise type(error)(f"a write queued earlier could not be committed yet: {error}")

    def refuse(self, reason: str) -> None:
        """Raise CacheError(`reason`) from every later `put`; what is queued stays queued.
        Close() calls it before its last commit, so that a write racing the close is
        either in that commit or refused, never queued after it and lost."""
        with self._lock:
            self._refusing = reason

    def stop(self) -> None:
        """Stop the thread (it finishes a commit under way); queued entries stay queued."""
        with self._lock:
            self._stopped = True
            self._wake.notify()
            thread = self._thread
        if (
            thread is not None
            and thread.ident is not None
            and thread is not threading.current_thread()
        ):
            thread.join(30)

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread if it is not running (a cache that may write starts it at open,
        so that no write pays for it; a forked child starts its own on its first write)."""
        with self._starting:
            if self._stopped or (self._thread is not None and self._thread.is_alive()):
                return
            thread = threading.Thread(target=self._run, name="vyre-sqlcache writer", daemon=True)
            _wakeup.start(thread)
            self._thread = thread

    def _run(self) -> None:
        pause = GROUP_DELAY_S
        while True:
            with self._lock:
                while not self.queue and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
            self._gather(pause)
            if self._stopped:
                return  # close() commits the queue itself
            backoff = min(max(pause * 4, 0.05), 2.0)
            try:
                behind = self.commit(background=True) is BEHIND_BUSY
                pause = backoff if behind else GROUP_DELAY_S
            except Dropped:
                return  # not a failure: the queue is the close's to commit
            except CacheError as error:
                log.warning("vyre-sqlcache: committing queued writes failed: %s", error)
                pause = backoff
            except BaseException as error:  # never let the thread die silently
                log.warning("vyre-sqlcache: the writer thread stopped: %r", error)
                return

    def _gather(self, pause: float) -> None:
        """Sleep `pause`, then on while the queue grows, until `MAX_GROUP_DELAY_S`."""
        deadline = time.monotonic() + max(pause, MAX_GROUP_DELAY_S)
        step = pause
        while True:
            queued = len(self.queue)
            time.sleep(step)
            left = deadline - time.monotonic()
            if left <= 0 or len(self.queue) in (queued, 0) or self._stopped:
                return
            step = min(GROUP_DELAY_S, left)

    # -- fork ----------------------------------------------------------------------------

    def _before_fork(self) -> None:
        with suppress(CacheError):
            self.commit()
        self._committing.acquire()
        if self._before_fork_hook is not None:
            with suppress(CacheError):
                self._before_fork_hook()
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()
        self._committing.release()

    def _after_fork_in_child(self) -> None:
        # The parent commits its own queue; the child starts with an empty one.
        self._reset_locks()
        self.queue = {}
        self._queued_bytes = 0
        self._thread = None


_writers: ForkRegistry[WriteBehind] = ForkRegistry()


#: Whether the commit at exit has run: later writes are committed by their callers.
_exiting = False


def _commit_at_exit() -> None:
    """Commit every writer's queue: `write()` returning promised other processes the entry
    within milliseconds, and a normal exit is no crash."""
    global _exiting
    _exiting = True
    for writer in _writers:
        writer.commit_at_exit()


atexit.register(_commit_at_exit)

_after_fork_armed = False


def _arm_for_multiprocessing() -> None:
    """Have a worker process of multiprocessing commit its queues when it ends.

    A worker that multiprocessing forks (or that its fork server forks) ends with
    `os._exit`, so no atexit, after the finalizers registered in it run. At its start it
    drops the finalizers it inherited and then runs its after-fork callbacks: one of
    those registers the finalizer. A worker that imports this module after its start
    gets it directly. Only once multiprocessing is imported: it is, in its workers.
    """
    global _after_fork_armed
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    util.Finalize(None, _commit_at_exit, exitpriority=0)
    if not _after_fork_armed:
        _after_fork_armed = True
        util.register_after_fork(_commit_at_exit, _finalize_worker)


def _finalize_worker(_: object) -> None:
    sys.modules["multiprocessing.util"].Finalize(None, _commit_at_exit, exitpriority=0)


_arm_for_multiprocessing()

# Registered after the connection pool's hooks (this module imports after it), so this
# before-hook runs first: the queue is committed before the pool closes its connections.
_writers.register_at_fork(after_in_child=_arm_for_multiprocessing)
