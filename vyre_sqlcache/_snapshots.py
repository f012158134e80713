"""Held read snapshots: a thread's single reads share one read transaction for a while.

Beginning and ending a read transaction is most of what a small read costs in SQLite
(the WAL index is consulted and a read mark taken each time; see
`shared/reference/sqlite-read-path.md`). So the single reads of one thread (`read`,
`get`) share one read transaction, the thread's *held snapshot*, within bounds:

- at most `HOLD_READS` reads and `HOLD_S` seconds, after which the next read starts a
  new snapshot: another process's change is seen within `HOLD_S`;
- every write transaction this process commits (writes, invalidations, deletes, the
  purge) bumps `generation`, and a read whose snapshot began before it starts a new
  one: this process sees its own changes at once;
- a thread that stops reading does not keep its snapshot: the reaper thread ends
  snapshots held past `HOLD_S` by threads that are not in a call, and those of
  threads that have ended, so no checkpoint waits on one for much longer than
  `HOLD_S`;
- any other use of the connection (a transaction, a query) ends the snapshot first.

Reads in a snapshot go through blob handles where they can (`_rows.HeldReader`, kept
on the slot). An open handle keeps its read transaction even after COMMIT, so every
path that ends a snapshot hands `end()` the slot's reader to close first.

The snapshot lives on the slot's main connection; `ConnectionPool` (in
`_connections.py`) decides when it is valid and the reaper here ends stale ones.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import apsw

from . import _wakeup

if TYPE_CHECKING:
    from ._connections import Slot

__all__ = [
    "HOLD_READS",
    "HOLD_S",
    "changed",
    "current_generation",
    "end",
    "end_ended",
    "paused",
    "thread_ended",
    "watch",
]

log = logging.getLogger("vyre_sqlcache")

#: How long one held snapshot serves reads: another process's change is seen this late.
HOLD_S = 0.010
#: How many reads one held snapshot serves at most.
HOLD_READS = 64
#: How long the reaper sleeps at most, so that it ends the snapshots of threads that have
#: ended (noted without waking it, see `_Reaper.thread_ended`).
IDLE_WAKE_S = 0.5

_counter = itertools.count(1)
_generation = 0


def changed() -> None:
    """Note that this process committed a change: held snapshots begun before are stale."""
    global _generation
    # next() on a count is atomic under the GIL: concurrent writers never reuse a value.
    _generation = next(_counter)


def current_generation() -> int:
    """The value `changed()` last set."""
    return _generation


class _Reader(Protocol):
    def close(self) -> None: ...


class _Pool(Protocol):
    def end_ended_snapshots(self) -> None: ...


def end(connection: apsw.Connection, reader: _Reader | None = None) -> bool:
    """End a read transaction left open on `connection`, closing the snapshot's `reader`
    (its blob handles) first; whether none is open now.

    A write transaction is never ended here (False): committing it is not ours to do.
    """
    if reader is not None:
        reader.close()
    if connection.get_autocommit():
        return True
    if connection.txn_state() == apsw.SQLITE_TXN_WRITE:
        return False
    try:
        connection.execute("COMMIT")
    except apsw.Error:
        # A statement interrupted mid-step (Ctrl-C) makes COMMIT busy; ROLLBACK aborts it.
        try:
            connection.execute("ROLLBACK")
        except apsw.Error as error:
            log.debug("vyre-sqlcache: ending a held read snapshot: %s", error)
    return connection.get_autocommit()


class _Reaper:
    """One daemon thread per process that ends the held snapshots of idle threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        self._wake = _wakeup.Wakeup()
        self._thread: threading.Thread | None = None
        # Set by the thread before it looks at the slots and sleeps with nothing due.
        self._idle = False
        # Pools a thread of which has ended (appended from weak reference callbacks,
        # which may run anywhere: no lock is taken there).
        self._ended: deque[weakref.ref[_Pool]] = deque()

    def watch(self, slot: Slot) -> None:
        """Have the thread end `slot`'s snapshot once it is held past `HOLD_S` unused
        (call after setting `slot.held_since`)."""
        if not slot.watched:
            with self._lock:
                self._slots.add(slot)
                slot.watched = True
                thread = self._thread
                if thread is None or not thread.is_alive():
                    thread = self._thread = threading.Thread(
                        target=self._run, name="vyre-sqlcache snapshots", daemon=True
                    )
                    try:
                        _wakeup.start(thread)
                    except _wakeup.CannotStart as error:
                        # Read on: the thread's own next read ends a stale snapshot, and
                        # a later read tries to start the reaper again.
                        self._thread = None
                        self._slots.discard(slot)
                        slot.watched = False
                        _wakeup.cannot_start(
                            "a snapshot a thread holds is ended by its next read, not after "
                            "10 ms (checkpoints wait for it)",
                            error,
                        )
                        return
            self._wake.set()
        elif self._idle:
            # A sleeping thread with something due wakes by itself, and every snapshot
            # it does not know of yet is due later than what it waits for.
            self._idle = False
            self._wake.set()

    def thread_ended(self, pool: _Pool) -> None:
        """Note that a thread of `pool` has ended: the slot of an ended thread is gone, and
        with it the reaper's look at its snapshot, which would otherwise stay open (and the
        log grow) until another thread of this process opens a connection. Called from a
        weak reference callback, which the cycle collector may run in any thread at any
        moment, ours holding one of our locks included: it takes no lock (an append to a deque),
        and wakes nothing. `end_ended` ends those snapshots: this thread at its next wake
        (within `IDLE_WAKE_S`), and the checkpoint thread before it copies the log."""
        self._ended.append(weakref.ref(pool))

    def end_ended(self) -> None:
        """End the snapshots of the threads noted by `thread_ended`."""
        while self._ended:
            try:
                pool = self._ended.popleft()()
            except IndexError:  # (taken by another thread meanwhile)
                return
            if pool is not None:
                pool.end_ended_snapshots()

    def _run(self) -> None:
        timeout: float | None = None
        while True:
            self._wake.wait(IDLE_WAKE_S if timeout is None else min(timeout, IDLE_WAKE_S))
            self._wake.clear()
            # Before the look at the slots: a snapshot begun after the look sees it set.
            self._idle = True
            try:
                self.end_ended()
                timeout = self._reap()
            except Exception as error:  # never let the thread die: snapshots would stay held
                log.debug("vyre-sqlcache: ending held snapshots: %s", error)
                timeout = HOLD_S
            if timeout is not None:
                self._idle = False

    def _reap(self) -> float | None:
        """End stale snapshots of idle slots; the seconds until the next one is due."""
        now = time.monotonic()
        next_due: float | None = None
        with self._lock:
            for slot in list(self._slots):
                since = slot.held_since
                if not since:
                    continue
                due = since + HOLD_S
                if now < due:
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                # The slot's owner marks each call busy under this lock: a slot not busy
                # while it is held begins no call until the snapshot is ended.
                if not slot.lock.acquire(blocking=False):
                    next_due = now + HOLD_S if next_due is None else min(next_due, now + HOLD_S)
                    continue
                try:
                    if slot.busy:
                        next_due = now + HOLD_S if next_due is None else min(next_due, now + HOLD_S)
                        continue
                    main = slot.main
                    if slot.held_since == since:
                        slot.held_since = 0.0
                        if main is not None:
                            end(main, slot.reader)
                finally:
                    slot.lock.release()
        return None if next_due is None else max(0.0, next_due - time.monotonic()) + 0.0005

    def paused(self) -> AbstractContextManager[bool]:
        """Keep the thread from ending snapshots while the `with` block closes connections.
        (The lock itself, not a generator holding it: an exception of a signal handler
        landing as a generator's `__enter__` returns leaves its lock taken.)"""
        return self._lock

    def before_fork(self) -> None:
        # The thread takes slot locks only while holding this one: none is held at fork.
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        # The thread is gone: the next snapshot of each slot registers it again.
        for slot in list(self._slots):
            slot.watched = False
        self._lock = threading.Lock()
        self._slots = weakref.WeakSet()
        self._wake = _wakeup.Wakeup()
        self._thread = None
        self._idle = False
        self._ended = deque()


_reaper = _Reaper()
watch = _reaper.watch
paused = _reaper.paused
thread_ended = _reaper.thread_ended
end_ended = _reaper.end_ended

if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_reaper.before_fork,
        after_in_parent=_reaper.after_fork_in_parent,
        after_in_child=_reaper.after_fork_in_child,
    )
