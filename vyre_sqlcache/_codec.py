"""Blob compression: zstd per entry where it pays, with dictionaries trained per scope.

Pure functions and small objects only: no SQL (that is `_rows`), no files. A `Codec`
decides per entry, on the bytes alone, whether to store it raw or as one zstd frame,
with or without a dictionary; `decode` turns a stored blob back into the caller's
bytes, never allocating more than the size recorded beside it.

The `zstandard` package is optional (the `zstd` extra): without it `auto` means raw,
an explicit level is refused at open, and compressed entries read as misses.

The constants below were chosen by measurement on `shared/corpus` (Triton 3.6 and
CuPy 14.2 output) on the project's 2-core machine; see README "Compression".
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

try:
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None  # type: ignore[assignment]

__all__ = [
    "CODEC_ZSTD",
    "DEFAULT_LEVEL",
    "DICTIONARY_BYTES",
    "DICTIONARY_SHARE",
    "MAX_LEVEL",
    "MIN_LEVEL",
    "Codec",
    "DecodeError",
    "Dictionary",
    "Encoded",
    "Scope",
    "Unavailable",
    "available",
    "decode",
    "parse_compression",
    "train",
]

#: The name stored in `blobs.codec` for a zstd frame.
CODEC_ZSTD: Final = "zstd"

MIN_LEVEL: Final = 1
MAX_LEVEL: Final = 22
#: The level `auto` uses: zstd's own default. On the corpus, level 1 gave 7.56x at
#: 540 MB/s, level 3 7.65x at 190 MB/s, level 6 8.4x at 86 MB/s; decompression runs
#: at about the same speed whatever the level (about 1.3 GB/s on this machine).
DEFAULT_LEVEL: Final = 3

#: An entry is stored compressed only when that saves at least this fraction of its
#: bytes (ZFS's rule too): below it every read pays for decompression to save little.
#: Every file of the corpus saved at least 46 %; random or already-compressed bytes
#: save nothing, so the threshold only decides the rare blob in between.
MIN_SAVING: Final = 1 / 8
#: Blobs smaller than this stay raw: a frame's header is most of what they would save.
MIN_COMPRESS_BYTES: Final = 64

#: Blobs from this size on are probed first: a few slices spread over the blob are
#: compressed at level 1 and, if they save less than `PROBE_MIN_SAVING`, the blob is
#: stored raw without compressing it whole. zstd already gives up quickly on random
#: bytes (13 µs for 64 KiB, 154 µs for 1 MiB at level 3); the probe takes 5-7 µs.
PROBE_FROM_BYTES: Final = 64 * 1024
PROBE_SLICES: Final = 4
PROBE_SLICE_BYTES: Final = 1024
#: Slices compress worse than the whole blob: the corpus's worst probe still saved
#: 48 %, random bytes save nothing (the probe's frame makes them 0.2 % larger).
PROBE_MIN_SAVING: Final = 0.05

#: Dictionary size. On the corpus's small blobs (under 16 KiB) a 64 KiB dictionary
#: gave 7.1x against 6.2x for 32 KiB and 5.6x for 16 KiB (plain zstd: 4.0x).
DICTIONARY_BYTES: Final = 64 * 1024
#: A scope trains its first dictionary once this many entries were written to it,
#: then again after `RETRAIN_FACTOR` times as many, up to `RETRAINS` times (32, 256,
#: 2,048 entries): 32 samples already gave small blobs 5.9x (plain 4.0x), 64 gave
#: 7.1x, more gave no more on one workload; a dictionary trained on one family of
#: kernels helps another much less (softmax blobs: 10.9x with a softmax dictionary,
#: 4.9x with a matmul one), so later dictionaries follow what the cache now holds.
TRAIN_AFTER: Final = 32
#: Under a size cap, the dictionaries of every scope together take at most this
#: fraction of it (1/8): each scope of a file (a backend on a device, or a namespace)
#: trains its own, and twelve namespaces once took 1.5 MiB of a 1 MiB cap.
DICTIONARY_SHARE: Final = 8
#: No dictionary is trained under a size cap below this: one takes `DICTIONARY_BYTES`
#: of it for good, more than it saves there (under a 140 KB cap a dictionary left 6
#: entries where raw storage kept 19).
MIN_CAP_FOR_DICTIONARY: Final = DICTIONARY_SHARE * DICTIONARY_BYTES
RETRAIN_FACTOR: Final = 8
RETRAINS: Final = 2
#: Training samples: the scope's most recent entries, each cut to its first bytes
#: (whole 100 KiB LLVM files drowned the small ones: cut to 16 KiB, 64 samples gave
#: 9.2x overall against 8.7x whole), read up to a total of stored bytes.
SAMPLE_ENTRIES: Final = 256
SAMPLE_PREFIX_BYTES: Final = 16 * 1024
SAMPLE_STORED_BYTES: Final = 32 * 1024 * 1024
#: A new dictionary is kept only if it makes a quarter of the samples, held out of its
#: training, at least this much smaller than plain zstd does (the corpus's small
#: blobs: 1.5x smaller); a scope whose samples plain zstd cannot shrink by
#: `MIN_SAVING` (random or already-compressed blobs) trains none at all.
DICTIONARY_MIN_GAIN: Final = 0.10
#: zstd's cover parameters, fixed: as good as its parameter search on the corpus and
#: ten times faster (10-40 ms against 0.1-0.9 s for 32-256 samples).
_COVER_K: Final = 1024
_COVER_D: Final = 8

#: Dictionaries kept loaded per process (64 KiB each, plus zstd's tables).
_LOADED_MAX: Final = 64


class DecodeError(Exception):
    """A stored blob cannot be turned back into the caller's bytes: it is damaged."""


class Unavailable(DecodeError):
    """A compressed blob, but this process has no zstandard: a miss, not damage."""


def available() -> bool:
    """Whether the zstandard package is importable."""
    return zstandard is not None


def parse_compression(value: Any, name: str = "compression") -> int | None:
    """A compression setting as the zstd level to use, or None for off.

    Accepts 'auto' (level `DEFAULT_LEVEL` when zstandard is installed, else off),
    'off', or a level from 1 to 22 (an int or its digits). Raises TypeError or
    ValueError naming `name`, the value and what is allowed; ValueError for an
    explicit level without zstandard installed.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(
            f"{name} must be 'auto', 'off' or a zstd level from {MIN_LEVEL} to {MAX_LEVEL}, "
            f"got {type(value).__name__} {value!r}"
        )
    text = value.strip().lower() if isinstance(value, str) else value
    if text == "auto":
        return DEFAULT_LEVEL if available() else None
    if text == "off":
        return None
    level: int | None = None
    if isinstance(text, int):
        level = text
    elif text.isascii() and text.isdigit():
        level = int(text)
    if level is None or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(
            f"{name} must be 'auto', 'off' or a zstd level from {MIN_LEVEL} to {MAX_LEVEL}, "
            f"got {value!r}"
        )
    if not available():
        raise ValueError(
            f"{name} asks for zstd level {level}, but the zstandard package is not "
            "installed: pip install 'vyre-sqlcache[zstd]', or use 'auto' (raw without it)"
        )
    return level


class Scope(NamedTuple):
    """Entries that share dictionaries: one backend on one device (None: not known).

    A named tuple, not a dataclass: a group commit makes and hashes one an entry three
    times, and a frozen dataclass's Python-level `__init__`, `__hash__` and `__eq__`
    cost 3 µs of it (a tuple's 1 µs).
    """

    backend: str | None
    vendor: int | None
    device: int | None

    @property
    def name(self) -> str:
        """A readable name, e.g. 'vulkan:0x10de:0x2684' ('-' for what is not known)."""
        vendor = "-" if self.vendor is None else f"0x{self.vendor:04x}"
        device = "-" if self.device is None else f"0x{self.device:04x}"
        return f"{self.backend or '-'}:{vendor}:{device}"


@dataclass(frozen=True, slots=True)
class Encoded:
    """A blob as it is to be stored: `codec` None for raw bytes."""

    data: bytes
    codec: str | None = None
    dict_id: int | None = None


class Dictionary:
    """A trained dictionary as loaded from the file (its checksum already checked)."""

    __slots__ = ("_zstd", "checksum", "data", "id")

    def __init__(self, dict_id: int, data: bytes, checksum: bytes) -> None:
        self.id = dict_id
        self.data = data
        self.checksum = checksum
        self._zstd: Any = None

    def zstd(self) -> Any:
        """zstandard's dictionary object (made once; it is safe to share across threads)."""
        if self._zstd is None:
            self._zstd = zstandard.ZstdCompressionDict(self.data)
        return self._zstd


class _Loaded:
    """Dictionaries loaded per file, shared by the process's caches of that file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, int], Dictionary] = {}

    def get(self, where: str, dict_id: int) -> Dictionary | None:
        with self._lock:
            return self._items.get((where, dict_id))

    def put(self, where: str, dictionary: Dictionary) -> None:
        with self._lock:
            if len(self._items) >= _LOADED_MAX:
                self._items.pop(next(iter(self._items)))
            self._items[where, dictionary.id] = dictionary

    def forget(self, where: str, dict_id: int) -> None:
        with self._lock:
            self._items.pop((where, dict_id), None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: Dictionaries this process loaded, by (file, id). Ids are never reused in a file;
#: a file replaced under the same name is caught by the frame's dictionary id and,
#: at the latest, by the entry's checksum (`_rows` then loads the row again).
LOADED = _Loaded()

# zstandard's compressors and decompressors are not for concurrent use: one per thread.
_local = threading.local()


def _frame_options() -> dict[str, Any]:
    # The row keeps the raw size and a checksum; a frame that used a dictionary names it
    # (4 bytes) so that a dictionary loaded from a replaced file is caught by zstd.
    return {"write_content_size": False, "write_checksum": False}


def _compressor(level: int, dictionary: Dictionary | None) -> Any:
    cache: dict[tuple[int, int | None], tuple[Any, Any]] = _local.__dict__.setdefault(
        "compressors", {}
    )
    key = (level, None if dictionary is None else dictionary.id)
    found = cache.get(key)
    if found is not None and (dictionary is None or found[1] is dictionary):
        return found[0]
    if dictionary is None:
        compressor = zstandard.ZstdCompressor(level=level, write_dict_id=False, **_frame_options())
    else:
        compressor = zstandard.ZstdCompressor(
            level=level, dict_data=dictionary.zstd(), write_dict_id=True, **_frame_options()
        )
    if len(cache) >= 16:
        cache.clear()
    cache[key] = (compressor, dictionary)
    return compressor


def _decompressor(dictionary: Dictionary | None) -> Any:
    cache: dict[int | None, tuple[Any, Any]] = _local.__dict__.setdefault("decompressors", {})
    key = None if dictionary is None else dictionary.id
    found = cache.get(key)
    if found is not None and (dictionary is None or found[1] is dictionary):
        return found[0]
    if dictionary is None:
        decompressor = zstandard.ZstdDecompressor()
    else:
        decompressor = zstandard.ZstdDecompressor(dict_data=dictionary.zstd())
    if len(cache) >= 16:
        cache.clear()
    cache[key] = (decompressor, dictionary)
    return decompressor


class Codec:
    """The compression an open cache applies to what it writes (`level` None: off)."""

    def __init__(self, level: int | None) -> None:
        if level is not None and not available():
            raise ValueError("zstd compression needs the zstandard package")
        self.level = level

    @property
    def enabled(self) -> bool:
        return self.level is not None

    def __repr__(self) -> str:
        return f"Codec(level={self.level})"

    def encode(self, blob: bytes, dictionary: Dictionary | None = None) -> Encoded:
        """How to store `blob`: compressed if that saves at least `MIN_SAVING`, else raw."""
        level = self.level
        size = len(blob)
        if level is None or size < MIN_COMPRESS_BYTES:
            return Encoded(blob)
        if size >= PROBE_FROM_BYTES and not _probe_pays(blob):
            return Encoded(blob)
        frame = _compressor(level, dictionary).compress(blob)
        if len(frame) > size * (1 - MIN_SAVING):
            return Encoded(blob)
        return Encoded(frame, CODEC_ZSTD, None if dictionary is None else dictionary.id)


def _probe_pays(blob: bytes) -> bool:
    """Whether slices spread over `blob` save at least `PROBE_MIN_SAVING` at level 1."""
    step = len(blob) // PROBE_SLICES
    sample = b"".join(blob[i * step : i * step + PROBE_SLICE_BYTES] for i in range(PROBE_SLICES))
    return len(_compressor(1, None).compress(sample)) <= len(sample) * (1 - PROBE_MIN_SAVING)


def decode(
    codec: str | None, data: bytes, raw_size: int | None, dictionary: Dictionary | None
) -> bytes:
    """The caller's bytes of a stored blob; raises DecodeError if it cannot be decoded.

    A frame is decompressed into at most `raw_size` bytes (at most 64 MiB, from the
    row): a frame header claiming another size is damage, never an allocation.
    Raises Unavailable for a compressed blob without zstandard installed.
    """
    if codec is None:
        return data
    if codec != CODEC_ZSTD or raw_size is None or not 0 <= raw_size <= 64 * 1024 * 1024:
        raise DecodeError(f"unknown codec {codec!r} or raw size {raw_size!r}")
    if zstandard is None:
        raise Unavailable("a zstd-compressed blob, but zstandard is not installed")
    try:
        claimed = zstandard.frame_content_size(data)
        if claimed not in (-1, raw_size):
            raise DecodeError(f"the frame claims {claimed} bytes, the row {raw_size}")
        if dictionary is not None:
            wanted = zstandard.get_frame_parameters(data).dict_id
            if wanted not in (0, dictionary.zstd().dict_id()):
                raise DecodeError("the frame names another dictionary")
        output = _decompressor(dictionary).decompress(
            data, max_output_size=raw_size, allow_extra_data=False
        )
    except zstandard.ZstdError as error:
        raise DecodeError(str(error)) from error
    if len(output) != raw_size:
        raise DecodeError(f"the frame holds {len(output)} bytes, the row says {raw_size}")
    return bytes(output)


def prefix(codec: str | None, data: bytes, dictionary: Dictionary | None, size: int) -> bytes:
    """The first `size` bytes of a stored blob, decompressing only what that needs.

    For training samples: raises DecodeError (or Unavailable) as `decode` does.
    """
    if codec is None:
        return data[:size]
    if codec != CODEC_ZSTD:
        raise DecodeError(f"unknown codec {codec!r}")
    if zstandard is None:
        raise Unavailable("a zstd-compressed blob, but zstandard is not installed")
    try:
        with _decompressor(dictionary).stream_reader(data) as reader:
            return bytes(reader.read(size))
    except zstandard.ZstdError as error:
        raise DecodeError(str(error)) from error


def compresses(samples: Sequence[bytes]) -> bool:
    """Whether plain zstd makes `samples` together at least `MIN_SAVING` smaller."""
    if zstandard is None or not samples:
        return False
    plain = _compressor(DEFAULT_LEVEL, None)
    raw_bytes = sum(map(len, samples))
    return sum(len(plain.compress(sample)) for sample in samples) <= raw_bytes * (1 - MIN_SAVING)


def train(samples: Sequence[bytes]) -> bytes | None:
    """A `DICTIONARY_BYTES` dictionary trained on three quarters of `samples`, or None
    if it would not pay: the samples do not compress, the dictionary does not beat
    plain zstd on the quarter held out by `DICTIONARY_MIN_GAIN`, or zstd cannot train
    one from them (too few or too small)."""
    if zstandard is None or len(samples) < 8:
        return None
    held_out = list(samples[::4])
    training: list[bytes | bytearray | memoryview] = [
        sample for index, sample in enumerate(samples) if index % 4
    ]
    if not compresses(held_out):
        return None
    plain = _compressor(DEFAULT_LEVEL, None)
    plain_bytes = sum(len(plain.compress(sample)) for sample in held_out)
    try:
        trained = zstandard.train_dictionary(
            DICTIONARY_BYTES, training, k=_COVER_K, d=_COVER_D, level=DEFAULT_LEVEL
        )
    except zstandard.ZstdError:
        return None
    data = bytes(trained.as_bytes())
    if len(data) < 8:
        return None
    candidate = zstandard.ZstdCompressor(
        level=DEFAULT_LEVEL, dict_data=zstandard.ZstdCompressionDict(data), **_frame_options()
    )
    with_dictionary = sum(len(candidate.compress(sample)) for sample in held_out)
    return data if with_dictionary <= plain_bytes * (1 - DICTIONARY_MIN_GAIN) else None
