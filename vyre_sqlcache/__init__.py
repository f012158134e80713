"""vyre-sqlcache: compiled GPU pipeline blobs in one SQLite file.

A drop-in for vyre's file-per-blob `DiskPipelineCache`: WAL-mode SQLite, atomic
installs, durable `flush()`, checksummed reads and batched invalidation.
"""

from __future__ import annotations

from .errors import (
    BlobTooLargeError,
    CacheBusyError,
    CacheError,
    CacheFullError,
    CorruptCacheError,
    NotACacheError,
    ReadOnlyCacheError,
    SchemaTooNewError,
)
from .keys import CURRENT_KEY_VERSION, DeviceFingerprint, FeatureFlags, PipelineCacheKey
from .store import MAX_BLOB_BYTES, CacheStats, PipelineCache

__version__ = "0.1.0"

__all__ = [
    "CURRENT_KEY_VERSION",
    "MAX_BLOB_BYTES",
    "BlobTooLargeError",
    "CacheBusyError",
    "CacheError",
    "CacheFullError",
    "CacheStats",
    "CorruptCacheError",
    "DeviceFingerprint",
    "FeatureFlags",
    "NotACacheError",
    "PipelineCache",
    "PipelineCacheKey",
    "ReadOnlyCacheError",
    "SchemaTooNewError",
    "__version__",
]
