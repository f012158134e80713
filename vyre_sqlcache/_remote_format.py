"""The remote entry format: a small fixed binary header, then the blob; never pickle.

A value in the shared tier is data only, checked before anything of it is used:

    magic "VYRC" | version u8 | flags u8 | codec u8 | checksum algo u8
    | entry key (32) | raw size u64 | stored size u64 | checksum (16)
    | HMAC-SHA256 (32, only with the SIGNED flag) | stored bytes

The checksum is XXH3-128 over the entry key and the caller's (raw) bytes, as in the
local file, so bytes planted under another key fail as surely as damaged ones. The
HMAC, with a team key, covers the header up to it and the stored bytes. A reader
refuses a value unless every field is what it expects: the magic and version, the key
it asked for, the stored size equal to what follows, a raw size within its limit, a
codec it knows, bounded decompression giving exactly the raw size, the checksum, and,
when it has a team key, a valid signature (an unsigned value is refused then).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from . import _checksums, _codec

__all__ = ["HEADER", "MAGIC", "VERSION", "Rejected", "decode", "encode"]

MAGIC: Final = b"VYRC"
VERSION: Final = 1
FLAG_SIGNED: Final = 0x01
CODEC_RAW: Final = 0
CODEC_ZSTD: Final = 1
ALGO_XXH3_128: Final = 1
_ALGO_NAMES: Final = {ALGO_XXH3_128: "xxh3-128"}
HEADER: Final = struct.Struct(">4sBBBB32sQQ16s")
MAC_BYTES: Final = 32
ZSTD_LEVEL: Final = 3


class Rejected(Exception):
    """A remote value that failed a check; its message names the check."""


def encode(entry_key: bytes, blob: bytes, key: bytes | None, *, compress: bool) -> bytes:
    """The remote value of an entry: header, optional HMAC, stored bytes."""
    codec, stored = CODEC_RAW, blob
    if compress and _codec.available():
        # The local file's rule: zstd only where it saves at least 1/8 (probed first on
        # large blobs, so random bytes are not compressed whole for nothing).
        encoded = _codec.Codec(ZSTD_LEVEL).encode(blob)
        if encoded.codec is not None:
            codec, stored = CODEC_ZSTD, encoded.data
    checksum = _checksums.compute("xxh3-128", entry_key, blob)
    flags = FLAG_SIGNED if key is not None else 0
    header = HEADER.pack(
        MAGIC, VERSION, flags, codec, ALGO_XXH3_128, entry_key, len(blob), len(stored), checksum
    )
    if key is None:
        return header + stored
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(stored)
    return header + mac.digest() + stored


def decode(value: bytes, entry_key: bytes, key: bytes | None, max_raw: int) -> bytes:
    """The caller's bytes of a remote value asked for under `entry_key`, all checks passed.

    Raises Rejected naming the first check that failed.
    """
    if len(value) < HEADER.size:
        raise Rejected(f"{len(value)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, flags, codec, algo, found_key, raw_size, stored_size, checksum = (
        HEADER.unpack_from(value)
    )
    if magic != MAGIC:
        raise Rejected("not a vyre-sqlcache entry (bad magic)")
    if version != VERSION:
        raise Rejected(f"format version {version}, this library reads {VERSION}")
    if found_key != entry_key:
        raise Rejected("the value is another entry's")
    if flags & ~FLAG_SIGNED:
        raise Rejected(f"unknown flags {flags:#x}")
    if raw_size > max_raw:
        raise Rejected(f"raw size {raw_size} is over the limit of {max_raw} bytes")
    start = HEADER.size + (MAC_BYTES if flags & FLAG_SIGNED else 0)
    if len(value) - start != stored_size:
        raise Rejected(f"{len(value) - start} stored bytes where the header says {stored_size}")
    if key is not None:
        if not flags & FLAG_SIGNED:
            raise Rejected("unsigned, and this cache has a team key")
        mac = hmac.new(key, memoryview(value)[: HEADER.size], hashlib.sha256)
        mac.update(memoryview(value)[start:])
        if not hmac.compare_digest(mac.digest(), value[HEADER.size : start]):
            raise Rejected("wrong signature (HMAC-SHA256 with the team key)")
    stored = value[start:]
    if codec == CODEC_RAW:
        if stored_size != raw_size:
            raise Rejected("raw entry whose sizes differ")
        data = stored
    elif codec == CODEC_ZSTD:
        try:
            # Into at most the header's raw size (itself bounded): never the frame's claim.
            data = _codec.decode(_codec.CODEC_ZSTD, stored, raw_size, None)
        except _codec.DecodeError as error:
            raise Rejected(f"zstd frame not decodable: {error}") from None
    else:
        raise Rejected(f"unknown codec {codec}")
    name = _ALGO_NAMES.get(algo)
    if name is None:
        raise Rejected(f"unknown checksum algorithm {algo}")
    if not _checksums.matches(name, checksum, entry_key, data):
        raise Rejected(f"{name} checksum mismatch")
    return data
