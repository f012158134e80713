"""The disabled cache (`VYRE_SQLCACHE_DISABLE=1`): the same interface, nothing stored.

Arguments are still checked, so a program behaves the same with the cache off;
every read is a miss, every write is accepted and dropped.
"""

from __future__ import annotations

from typing import Any

from ._cachefile import CacheFile
from ._rows import NewEntry
from .cache import CacheStats, PipelineCache

__all__ = ["DisabledCache"]


class DisabledCache(PipelineCache):
    """A `PipelineCache` that stores nothing and never touches a file."""

    def __init__(self, file: CacheFile, max_bytes: int | Any | None) -> None:
        """Set up a disabled cache; `PipelineCache.open` makes one when asked to."""
        super().__init__(file, readonly=False, max_bytes=max_bytes, vfs=None)
        self._readonly = False
        self._closed = False

    @property
    def disabled(self) -> bool:
        """Always True: this cache stores nothing."""
        return True

    def close(self) -> None:
        """Nothing to close; idempotent."""
        self._closed = True

    def flush(self) -> None:
        """Nothing to make durable."""

    def contains(self, key: Any, fingerprint: Any) -> bool:
        """Always False, once the arguments are checked."""
        self.get(key, fingerprint)
        return False

    def check_entry(self, entry_key: bytes | str) -> bool | None:
        """Always None (no such entry)."""
        self.get_entry(entry_key)
        return None

    def stats(self) -> CacheStats:
        """This object's counters; the file's totals are all zero."""
        counts = self._books.counts()
        return CacheStats(
            path=self._path,
            entries=0,
            blob_bytes=0,
            file_bytes=0,
            max_bytes=self._cap,
            hits=counts.hits,
            misses=counts.misses,
            evictions=0,
            checksum_failures=0,
            total_hits=0,
            total_misses=0,
            total_evictions=0,
            total_checksum_failures=0,
            total_flushes=0,
        )

    def _store(self, entries: list[NewEntry]) -> None:
        self._check_fits(entries)

    def _load(self, entry_key: bytes) -> bytes | None:
        self._books.miss(persist=False)
        return None

    def _load_many(self, entry_keys: list[bytes]) -> list[bytes | None]:
        return [self._load(key) for key in entry_keys]

    def _change(self, what: str, run: Any) -> int:
        return 0

    def _commit_entries(
        self, entries: list[NewEntry], durable: bool, extra: Any, what: str = ""
    ) -> None:
        return None
