"""Hits, misses and access times: counted in memory, written with the next write.

Recording an access must not turn a read into a write transaction, so reads
only update this buffer; it reaches the file inside the next write transaction,
or on its own at most every `TOUCH_INTERVAL_S` seconds.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import apsw

from . import _rows

__all__ = ["FOLD_AT", "TOUCH_INTERVAL_S", "Bookkeeping", "Counts"]

#: Access times and hit counts are written from reads at most this often.
TOUCH_INTERVAL_S = 5.0
#: Hits are noted in a deque and counted into the buffer once this many are waiting.
FOLD_AT = 4096


@dataclass(frozen=True, slots=True)
class Counts:
    """What one cache object has counted since it was opened."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    checksum_failures: int = 0


class Bookkeeping:
    """Thread-safe counters and a buffer of touched row ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._touched: Counter[int] = Counter()  # row id -> hits not yet written
        # A hit is one append (atomic, no lock): a lock and a dict update were a tenth of
        # a small read. Counted into `_touched` under the lock, by `FOLD_AT` and on a look.
        self._recent: deque[int] = deque()
        self._unwritten_misses = 0
        self._hits = self._misses = self._evictions = self._checksum_failures = 0
        self._next_write = time.monotonic() + TOUCH_INTERVAL_S
        #: More buffered bookkeeping written with this (the miss log, see `_explain`).
        self.also: Callable[[apsw.Connection], None] | None = None
        _all.add(self)

    def hit(self, rowid: int) -> bool:
        """Count a hit on `rowid`; return whether buffered bookkeeping is due to be written."""
        recent = self._recent
        recent.append(rowid)
        if len(recent) >= FOLD_AT:
            with self._lock:
                self._fold()
        return time.monotonic() >= self._next_write

    def _fold(self) -> None:
        """Count the hits noted since the last fold into the buffer (hold the lock)."""
        recent = self._recent
        # Each popleft is atomic: hits appended meanwhile wait for the next fold.
        hits = [recent.popleft() for _ in range(len(recent))]
        self._hits += len(hits)
        self._touched.update(hits)

    def miss(self, *, persist: bool = True) -> None:
        """Count a miss (`persist=False`: for this object only, as a disabled cache does)."""
        with self._lock:
            self._misses += 1
            self._unwritten_misses += persist

    def evicted(self, count: int) -> None:
        with self._lock:
            self._evictions += count

    def checksum_failed(self) -> None:
        with self._lock:
            self._checksum_failures += 1

    def counts(self) -> Counts:
        """This object's counters."""
        with self._lock:
            self._fold()
            return Counts(self._hits, self._misses, self._evictions, self._checksum_failures)

    def unwritten(self) -> tuple[int, int]:
        """Hits and misses counted but not yet added to the file's totals."""
        with self._lock:
            self._fold()
            return sum(self._touched.values()), self._unwritten_misses

    def write(self, connection: apsw.Connection, now_ms: int) -> None:
        """Write buffered access times, hit counts and totals inside the caller's transaction.

        If the write fails, the buffer is kept for the next try.
        """
        if self.also is not None:
            self.also(connection)
        with self._lock:
            self._fold()
            touched, self._touched = self._touched, Counter()
            misses, self._unwritten_misses = self._unwritten_misses, 0
            self._next_write = time.monotonic() + TOUCH_INTERVAL_S
        if not touched and not misses:
            return
        try:
            _rows.write_access(connection, touched, misses, now_ms)
        except BaseException:
            with self._lock:
                self._touched.update(touched)
                self._unwritten_misses += misses
            raise

    def _after_fork_in_child(self) -> None:
        # A thread that held the lock at the fork (folding, say) is gone in the child.
        self._lock = threading.Lock()
        # The parent writes what it had not written yet; written here too, the file's
        # totals counted those hits and misses twice. This object's counters keep them.
        self._fold()
        self._touched = Counter()
        self._unwritten_misses = 0


_all: weakref.WeakSet[Bookkeeping] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for books in list(_all):
        books._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
