"""Hits, misses and access times: counted in memory, written with the next write.

Recording an access must not turn a read into a write transaction, so reads
only update this buffer; it reaches the file inside the next write transaction,
or on its own at most every `TOUCH_INTERVAL_S` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import apsw

from . import _rows

__all__ = ["TOUCH_INTERVAL_S", "Bookkeeping", "Counts"]

#: Access times and hit counts are written from reads at most this often.
TOUCH_INTERVAL_S = 5.0


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
        self._touched: dict[int, int] = {}  # row id -> hits not yet written
        self._unwritten_misses = 0
        self._hits = self._misses = self._evictions = self._checksum_failures = 0
        self._next_write = time.monotonic() + TOUCH_INTERVAL_S
        #: More buffered bookkeeping written with this (the miss log, see `_explain`).
        self.also: Callable[[apsw.Connection], None] | None = None

    def hit(self, rowid: int) -> bool:
        """Count a hit on `rowid`; return whether buffered bookkeeping is due to be written."""
        with self._lock:
            self._hits += 1
            self._touched[rowid] = self._touched.get(rowid, 0) + 1
        return time.monotonic() >= self._next_write

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
            return Counts(self._hits, self._misses, self._evictions, self._checksum_failures)

    def unwritten(self) -> tuple[int, int]:
        """Hits and misses counted but not yet added to the file's totals."""
        with self._lock:
            return sum(self._touched.values()), self._unwritten_misses

    def write(self, connection: apsw.Connection, now_ms: int) -> None:
        """Write buffered access times, hit counts and totals inside the caller's transaction.

        If the write fails, the buffer is kept for the next try.
        """
        if self.also is not None:
            self.also(connection)
        with self._lock:
            touched, self._touched = self._touched, {}
            misses, self._unwritten_misses = self._unwritten_misses, 0
            self._next_write = time.monotonic() + TOUCH_INTERVAL_S
        if not touched and not misses:
            return
        try:
            _rows.write_access(connection, touched, misses, now_ms)
        except BaseException:
            with self._lock:
                for rowid, hits in touched.items():
                    self._touched[rowid] = self._touched.get(rowid, 0) + hits
                self._unwritten_misses += misses
            raise
