"""The exceptions vyre-sqlcache raises; every one is a `CacheError`."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error raised by vyre-sqlcache."""


class BlobTooLargeError(CacheError, ValueError):
    """A blob is larger than the cache accepts; nothing was written."""


class SchemaTooNewError(CacheError):
    """The cache file was written by a newer vyre-sqlcache; it is left untouched."""


class CorruptCacheError(CacheError):
    """The cache file is damaged or is not a vyre-sqlcache database."""


class NotACacheError(CacheError):
    """The path holds a SQLite database of something else; it is left untouched."""


class ReadOnlyCacheError(CacheError):
    """A write was asked of a cache that is open read-only."""


class CacheFullError(CacheError):
    """The disk (or the database's page limit) is full; the write was not made."""


class CacheBusyError(CacheError):
    """Another process held the cache's write lock for longer than the busy timeout."""
