"""Argument checks shared by every entry point: each names the argument, the value and
what is allowed, and raises before anything is written."""

from __future__ import annotations

from typing import Any

from .errors import BlobTooLargeError
from .keys import DeviceFingerprint, PipelineCacheKey

__all__ = [
    "MAX_BLOB_BYTES",
    "check_blob",
    "check_created_ms",
    "check_fingerprint",
    "check_key",
    "check_max_bytes",
]

#: Largest blob a cache stores, as vyre's `MAX_DISK_PIPELINE_BLOB_BYTES` (64 MiB).
MAX_BLOB_BYTES = 64 * 1024 * 1024


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


def check_max_bytes(value: Any, name: str = "max_bytes") -> int | None:
    """A size cap: an int of at least 1, or None for no cap; raise TypeError/ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if not 1 <= value < 2**63:
        raise ValueError(
            f"{name} must be from 1 byte to 2**63-1 bytes (or None for no cap), got {value}"
        )
    return value


def check_created_ms(value: Any) -> int | None:
    """A creation time in milliseconds since the epoch, or None; raise TypeError/ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"created_ms must be an int or None, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(
            f"created_ms must be milliseconds since the epoch in a signed 64-bit int, got {value}"
        )
    return value
