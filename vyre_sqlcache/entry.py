"""A new entry: its arguments validated, its key derived, its row and checksum made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import checksums
from .errors import BlobTooLargeError
from .keys import DeviceFingerprint, PipelineCacheKey, entry_id

__all__ = [
    "INSERT_BLOB",
    "INSERT_ENTRY",
    "MAX_BLOB_BYTES",
    "NewEntry",
    "check_blob",
    "check_fingerprint",
    "check_key",
]

#: Largest blob a cache stores, as vyre's `MAX_DISK_PIPELINE_BLOB_BYTES` (64 MiB).
MAX_BLOB_BYTES = 64 * 1024 * 1024

INSERT_ENTRY = """
INSERT INTO entries (
    id, entry_key, key_version, shader_hash, layout_hash, push_constant_size,
    workgroup_x, workgroup_y, workgroup_z, feature_flags, backend,
    vendor, device, driver_digest, program_digest, blob_size, created_ms, accessed_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    entry_key = excluded.entry_key, key_version = excluded.key_version,
    shader_hash = excluded.shader_hash, layout_hash = excluded.layout_hash,
    push_constant_size = excluded.push_constant_size, workgroup_x = excluded.workgroup_x,
    workgroup_y = excluded.workgroup_y, workgroup_z = excluded.workgroup_z,
    feature_flags = excluded.feature_flags, backend = excluded.backend,
    vendor = excluded.vendor, device = excluded.device, driver_digest = excluded.driver_digest,
    program_digest = excluded.program_digest, blob_size = excluded.blob_size,
    created_ms = excluded.created_ms, accessed_ms = excluded.accessed_ms, hits = 0
"""
INSERT_BLOB = "INSERT OR REPLACE INTO blobs (id, checksum_algo, checksum, data) VALUES (?, ?, ?, ?)"


def check_blob(blob: Any) -> bytes:
    """`blob` as bytes; raise TypeError, or BlobTooLargeError over 64 MiB."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, bytearray or memoryview, got {type(blob).__name__}")
    size = memoryview(blob).nbytes
    if size > MAX_BLOB_BYTES:
        raise BlobTooLargeError(
            f"blob is {size} bytes, over the {MAX_BLOB_BYTES}-byte (64 MiB) limit of a "
            "pipeline cache entry; nothing was written"
        )
    return bytes(blob)


def check_fingerprint(fingerprint: Any) -> DeviceFingerprint:
    """`fingerprint` if it is a DeviceFingerprint; raise TypeError otherwise."""
    if not isinstance(fingerprint, DeviceFingerprint):
        raise TypeError(
            f"fingerprint must be a DeviceFingerprint, got {type(fingerprint).__name__}"
        )
    return fingerprint


def check_key(key: Any) -> PipelineCacheKey:
    """`key` if it is a PipelineCacheKey; raise TypeError otherwise."""
    if not isinstance(key, PipelineCacheKey):
        raise TypeError(f"key must be a PipelineCacheKey, got {type(key).__name__}")
    return key


@dataclass(frozen=True, slots=True)
class NewEntry:
    """One entry ready to insert: validated and keyed."""

    entry_key: bytes
    key: PipelineCacheKey | None
    fingerprint: DeviceFingerprint | None
    program_digest: bytes | None
    blob: bytes
    created_ms: int | None = None

    @property
    def rowid(self) -> int:
        return entry_id(self.entry_key)

    def params(self, now_ms: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """Parameters of INSERT_ENTRY and INSERT_BLOB."""
        rowid = self.rowid
        when = now_ms if self.created_ms is None else self.created_ms
        k = self.key
        key_columns: tuple[Any, ...] = (
            (
                k.version,
                k.shader_hash,
                k.bind_group_layout_hash,
                k.push_constant_size,
                *k.workgroup_size,
                int(k.feature_flags),
                k.backend,
            )
            if k is not None
            else (None,) * 9
        )
        fp = self.fingerprint
        device = (None, None, None) if fp is None else (fp.vendor, fp.device, fp.driver_digest)
        entry = (
            rowid,
            self.entry_key,
            *key_columns,
            *device,
            self.program_digest,
            len(self.blob),
            when,
            when,
        )
        algo = checksums.DEFAULT
        blob = (rowid, algo, checksums.compute(algo, self.entry_key, self.blob), self.blob)
        return entry, blob
