"""vyre-sqlcache: compiled GPU pipeline blobs in one SQLite file.

A drop-in for vyre's file-per-blob `DiskPipelineCache`: WAL-mode SQLite, atomic
installs, durable `flush()`, checksummed reads and batched invalidation.
"""

from __future__ import annotations

from ._combine import BundleReport, CopyReport, MergeReport
from ._named import pack_group, unpack_group
from ._remote import RemoteSettings, RemoteStats, RemoteTier
from ._schema import latest_version as _latest_version
from .cache import MAX_BLOB_BYTES, CacheStats, PipelineCache
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
from .keys import (
    CURRENT_KEY_VERSION,
    DeviceFingerprint,
    FeatureFlags,
    PipelineCacheKey,
    named_entry_key,
)

__version__ = "0.1.0"

#: The schema version this library writes (`PRAGMA user_version` of its files).
SCHEMA_VERSION: int = _latest_version()

__all__ = [
    "CURRENT_KEY_VERSION",
    "MAX_BLOB_BYTES",
    "SCHEMA_VERSION",
    "BlobTooLargeError",
    "BundleReport",
    "CacheBusyError",
    "CacheError",
    "CacheFullError",
    "CacheStats",
    "CopyReport",
    "CorruptCacheError",
    "DeviceFingerprint",
    "FeatureFlags",
    "MergeReport",
    "NotACacheError",
    "PipelineCache",
    "PipelineCacheKey",
    "ReadOnlyCacheError",
    "RemoteSettings",
    "RemoteStats",
    "RemoteTier",
    "SchemaTooNewError",
    "__version__",
    "named_entry_key",
    "pack_group",
    "unpack_group",
]
