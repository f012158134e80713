"""Pipeline identity: feature flags, cache keys, device fingerprints, entry keys.

Byte layouts follow vyre's `DiskPipelineCache` (see vyre-cache-format.md): a
fingerprint's driver digest and the directory cache's entry key are
byte-identical to the ones vyre computes.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3

__all__ = [
    "CURRENT_KEY_VERSION",
    "HASH_BYTES",
    "U32_MAX",
    "DeviceFingerprint",
    "FeatureFlags",
    "PipelineCacheKey",
    "coerce_digest",
    "entry_id",
    "entry_ids_of",
    "named_entry_key",
]

#: Version of the key format; entries keyed with another version are unreachable.
CURRENT_KEY_VERSION = 1
#: Length of every hash and digest (BLAKE3, 32 bytes).
HASH_BYTES = 32
U32_MAX = 0xFFFF_FFFF

_FINGERPRINT_DOMAIN = b"vyre-pipeline-device-fingerprint-v1\0"
_DIRECTORY_KEY_DOMAIN = b"vyre-disk-pipeline-cache-key-v1\0program\0"
# Our own domain: keyed entries can never collide with vyre directory keys.
_PIPELINE_KEY_DOMAIN = b"vyre-sqlcache-pipeline-key-v1\0"
# Entries named by a (namespace, name) pair, e.g. a Triton kernel's group: a domain
# of their own, so they never collide with pipeline or vyre directory keys.
_NAMED_KEY_DOMAIN = b"vyre-sqlcache-named-key-v1\0"
_LE32 = struct.Struct("<I")
#: Longest namespace and name of a named entry, in characters.
MAX_NAMESPACE_CHARS = 64
MAX_NAME_CHARS = 1024


class FeatureFlags(enum.IntFlag):
    """vyre's `PipelineFeatureFlags`: capability bits that are part of a pipeline's identity.

    Bits above the nine named ones are reserved by vyre and kept as they are (an
    `IntFlag` keeps unknown bits on every supported Python).
    """

    SUBGROUP_OPS = 1 << 0
    F16 = 1 << 1
    BF16 = 1 << 2
    TENSOR_CORES = 1 << 3
    ASYNC_COMPUTE = 1 << 4
    PUSH_CONSTANTS = 1 << 5
    INDIRECT_DISPATCH = 1 << 6
    SPECULATIVE = 1 << 7
    PERSISTENT_THREAD = 1 << 8

    def contains(self, other: FeatureFlags | int) -> bool:
        """Whether every bit of `other` is set here (vyre's `contains`)."""
        return (int(self) & int(other)) == int(other)


def check_u32(name: str, value: Any) -> int:
    """Return `value` if it is an int in 0..2**32-1; raise TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in 0..{U32_MAX}, got {type(value).__name__}")
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{name} must be in 0..{U32_MAX} (an unsigned 32-bit int), got {value}")
    return int(value)


def coerce_digest(name: str, value: Any) -> bytes:
    """Return a 32-byte hash from bytes-like or 64 hex characters; raise TypeError/ValueError."""
    if type(value) is bytes and len(value) == HASH_BYTES:
        return value
    if isinstance(value, str):
        if len(value) != 2 * HASH_BYTES:
            raise ValueError(
                f"{name} must be {2 * HASH_BYTES} hex characters ({HASH_BYTES} bytes), "
                f"got {len(value)} characters: {value[:80]!r}"
            )
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError(
                f"{name} must be {HASH_BYTES} bytes or {2 * HASH_BYTES} hex characters, "
                f"got the string {value[:80]!r} which is not hex"
            ) from None
        if len(raw) != HASH_BYTES or len(value) != 2 * HASH_BYTES:
            raise ValueError(
                f"{name} must be {2 * HASH_BYTES} hex characters ({HASH_BYTES} bytes), "
                f"got {len(value)} characters"
            )
        return raw
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) != HASH_BYTES:
            raise ValueError(f"{name} must be exactly {HASH_BYTES} bytes, got {len(raw)} bytes")
        return raw
    raise TypeError(
        f"{name} must be {HASH_BYTES} bytes or a {2 * HASH_BYTES}-character hex str, "
        f"got {type(value).__name__}"
    )


def entry_id(entry_key: bytes) -> int:
    """The table row id of an entry: the first 8 bytes of its entry key as a signed int64."""
    return int.from_bytes(entry_key[:8], "big", signed=True)


def entry_ids_of(entry_keys: Iterable[bytes]) -> array[int]:
    """`entry_id` of each of these 32-byte entry keys, as an array for `carray`."""
    ids = array("q", b"".join([key[:8] for key in entry_keys]))
    if sys.byteorder == "little":
        ids.byteswap()  # the keys' first 8 bytes are big-endian
    return ids


@dataclass(frozen=True, slots=True)
class DeviceFingerprint:
    """vyre's `PipelineDeviceFingerprint`: the adapter and driver a blob was compiled for."""

    vendor: int
    device: int
    driver_digest: bytes
    # Everything after the program digest in vyre's key input: the same for every key.
    _key_suffix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vendor", check_u32("vendor", self.vendor))
        object.__setattr__(self, "device", check_u32("device", self.device))
        object.__setattr__(
            self, "driver_digest", coerce_digest("driver_digest", self.driver_digest)
        )
        object.__setattr__(
            self,
            "_key_suffix",
            b"\0vendor\0"
            + _LE32.pack(self.vendor)
            + b"\0device\0"
            + _LE32.pack(self.device)
            + b"\0driver\0"
            + self.driver_digest,
        )

    @classmethod
    def from_parts(
        cls, vendor: int, device: int, revision: str, revision_extra: str = ""
    ) -> DeviceFingerprint:
        """Build a fingerprint as vyre does, hashing the driver revision strings.

        Raises TypeError/ValueError for a vendor or device outside u32 or non-str revisions.
        """
        for name, text in (("revision", revision), ("revision_extra", revision_extra)):
            if not isinstance(text, str):
                raise TypeError(f"{name} must be a str, got {type(text).__name__}")
        digest = blake3.blake3(
            _FINGERPRINT_DOMAIN
            + revision.encode("utf-8", "surrogatepass")
            + b"\0extra\0"
            + revision_extra.encode("utf-8", "surrogatepass")
        ).digest()
        return cls(vendor, device, digest)

    def cache_key(self, program_digest: bytes | str) -> bytes:
        """vyre's directory-cache entry key for `program_digest` on this device.

        Raises TypeError/ValueError if `program_digest` is not 32 bytes (or 64 hex chars).
        """
        digest = (
            program_digest
            if type(program_digest) is bytes and len(program_digest) == HASH_BYTES
            else coerce_digest("program_digest", program_digest)
        )
        return blake3.blake3(_DIRECTORY_KEY_DOMAIN + digest + self._key_suffix).digest()

    def cache_keys(self, program_digests: Iterable[bytes | str]) -> list[bytes]:
        """`cache_key` of each program digest, in order.

        Raises TypeError/ValueError naming the first digest that is not 32 bytes (or 64
        hex chars).
        """
        head, tail, hasher = _DIRECTORY_KEY_DOMAIN, self._key_suffix, blake3.blake3
        return [
            hasher(
                head
                + (
                    digest
                    if type(digest) is bytes and len(digest) == HASH_BYTES
                    else coerce_digest(f"program_digests[{index}]", digest)
                )
                + tail
            ).digest()
            for index, digest in enumerate(program_digests)
        ]


def _workgroup(value: Any) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"workgroup_size must be a sequence of 3 ints, got {type(value).__name__}")
    items = tuple(value)
    if len(items) != 3:
        raise ValueError(f"workgroup_size must have exactly 3 items (x, y, z), got {len(items)}")
    x, y, z = (check_u32(f"workgroup_size[{i}]", v) for i, v in enumerate(items))
    return (x, y, z)


@dataclass(frozen=True, slots=True)
class PipelineCacheKey:
    """vyre's `PipelineCacheKey`: everything that makes two compiled pipelines differ."""

    shader_hash: bytes
    bind_group_layout_hash: bytes
    push_constant_size: int
    workgroup_size: tuple[int, int, int]
    feature_flags: FeatureFlags
    backend: str
    version: int = CURRENT_KEY_VERSION
    _encoded: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "shader_hash", coerce_digest("shader_hash", self.shader_hash))
        set_(
            self,
            "bind_group_layout_hash",
            coerce_digest("bind_group_layout_hash", self.bind_group_layout_hash),
        )
        set_(self, "push_constant_size", check_u32("push_constant_size", self.push_constant_size))
        set_(self, "workgroup_size", _workgroup(self.workgroup_size))
        set_(self, "feature_flags", FeatureFlags(check_u32("feature_flags", self.feature_flags)))
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a non-empty str, got {type(self.backend).__name__}")
        if not self.backend:
            raise ValueError("backend must be a non-empty str, got ''")
        if self.backend.startswith("\x00"):
            # SQLite counts the characters before the first NUL: the schema sees ''.
            raise ValueError(f"backend must not start with a NUL character, got {self.backend!r}")
        try:
            backend_bytes = self.backend.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"backend must be valid Unicode text, got {self.backend!r} "
                "(it contains a lone surrogate)"
            ) from None
        set_(self, "version", check_u32("version", self.version))
        set_(
            self,
            "_encoded",
            b"".join(
                (
                    _LE32.pack(self.version),
                    self.shader_hash,
                    self.bind_group_layout_hash,
                    _LE32.pack(self.push_constant_size),
                    *(_LE32.pack(v) for v in self.workgroup_size),
                    _LE32.pack(int(self.feature_flags)),
                    _LE32.pack(len(backend_bytes)),
                    backend_bytes,
                )
            ),
        )

    def entry_key(self, fingerprint: DeviceFingerprint) -> bytes:
        """The 32-byte identity of this pipeline on `fingerprint`'s device."""
        return blake3.blake3(
            _PIPELINE_KEY_DOMAIN
            + self._encoded
            + _LE32.pack(fingerprint.vendor)
            + _LE32.pack(fingerprint.device)
            + fingerprint.driver_digest
        ).digest()


def check_text(name: str, value: Any, most: int) -> str:
    """Return `value` if it is a str of 1..`most` characters, valid Unicode, not starting
    with NUL; raise TypeError/ValueError naming `name` otherwise."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str of 1 to {most} characters, got {type(value).__name__}"
        )
    if not 1 <= len(value) <= most:
        raise ValueError(
            f"{name} must be 1 to {most} characters long, got {len(value)}: {value[:80]!r}"
        )
    if "\x00" in value:
        # SQLite counts the characters before the first NUL: the schema would see less.
        raise ValueError(f"{name} must not contain a NUL character, got {value[:80]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{name} must be valid Unicode text, got {value[:80]!r} (it contains a lone surrogate)"
        ) from None
    return value


def named_entry_key(namespace: str, name: str) -> bytes:
    """The 32-byte entry key of the entry `name` in `namespace` (see `put_named`).

    Raises TypeError/ValueError for a namespace or name that is not 1..64 or 1..1024
    characters of valid text without NUL.
    """
    space = check_text("namespace", namespace, MAX_NAMESPACE_CHARS).encode("utf-8")
    label = check_text("name", name, MAX_NAME_CHARS).encode("utf-8")
    return blake3.blake3(
        _NAMED_KEY_DOMAIN + _LE32.pack(len(space)) + space + _LE32.pack(len(label)) + label
    ).digest()
