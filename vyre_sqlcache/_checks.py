"""Argument checks shared by every entry point: each names the argument, the value and
what is allowed, and raises before anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress
from typing import Any

from .errors import BlobTooLargeError
from .keys import HASH_BYTES, U32_MAX, DeviceFingerprint, PipelineCacheKey, check_u32, coerce_digest

__all__ = [
    "MAX_BLOB_BYTES",
    "check_blob",
    "check_created_ms",
    "check_fingerprint",
    "check_impact",
    "check_item",
    "check_key",
    "check_max_bytes",
]

#: Largest blob a cache stores, as vyre's `MAX_DISK_PIPELINE_BLOB_BYTES` (64 MiB).
MAX_BLOB_BYTES = 64 * 1024 * 1024


def check_blob(blob: Any) -> bytes:
    """`blob` as bytes; raise TypeError, or BlobTooLargeError over 64 MiB."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, bytearray or memoryview, got {type(blob).__name__}")
    try:
        size = memoryview(blob).nbytes
    except ValueError:  # a memoryview already released
        raise ValueError(
            "blob is a released memoryview, whose bytes are gone; pass bytes or a live view"
        ) from None
    if size > MAX_BLOB_BYTES:
        raise BlobTooLargeError(
            f"blob is {size} bytes, over the {MAX_BLOB_BYTES}-byte (64 MiB) limit of a "
            "pipeline cache entry; nothing was written"
        )
    return bytes(blob)


def check_item(item: Any, index: int, call: str, shape: str) -> tuple[Any, ...]:
    """`item` of a batch call as a tuple of the arity `shape` names ('(a, b)'); raise
    TypeError naming the call, the item's index and the shape otherwise."""
    arity = shape.count(",") + 1
    if not isinstance(item, (tuple, list)) or len(item) != arity:
        raise TypeError(
            f"{call} items must be {shape} tuples; item {index} is {type(item).__name__} "
            f"{item!r:.80}"
        )
    return tuple(item)


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
        none = " (or None for no cap)" if name == "max_bytes" else ""
        raise ValueError(f"{name} must be from 1 byte to 2**63-1 bytes{none}, got {value}")
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


def check_impact(impact_mask: Sequence[Any], program_digests: Sequence[Any]) -> list[bytes]:
    """The digests of `invalidate_impacted` whose mask value is non-zero; raise ValueError
    if the sequences differ in length, TypeError/ValueError naming the first bad mask value
    (an int in 0..2**32-1) or digest (32 bytes or 64 hex characters)."""
    if len(impact_mask) != len(program_digests):
        raise ValueError(
            f"impact_mask has {len(impact_mask)} values but program_digests has "
            f"{len(program_digests)}; they must have the same length (one mask value "
            "per digest)"
        )
    # The usual arguments (ints and 32-byte bytes) are checked at C speed: a Python loop
    # over a mask of 1,000 took a tenth of the invalidation.
    if (
        set(map(type, impact_mask)) <= {int}
        and set(map(type, program_digests)) <= {bytes}
        and set(map(len, program_digests)) <= {HASH_BYTES}
        and (not impact_mask or (min(impact_mask) >= 0 and max(impact_mask) <= U32_MAX))
    ):
        return list(compress(program_digests, impact_mask))
    impacted = []
    for index, (mask, raw) in enumerate(zip(impact_mask, program_digests, strict=True)):
        digest = coerce_digest(f"program_digests[{index}]", raw)
        if check_u32(f"impact_mask[{index}]", mask):
            impacted.append(digest)
    return impacted
