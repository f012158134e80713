"""The stores under comparison, each behind the same small adapter interface.

Every adapter is constructed with a root directory it owns and one device
fingerprint, and is called with 32-byte program digests, like vyre's cache.
Peers derive vyre's 32-byte entry key with BLAKE3 on every call (as the files
store does), so key derivation costs the same everywhere.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from benchmarks.files_store import DiskPipelineCache, PipelineDeviceFingerprint

try:  # The package under test; absent only while it is being written.
    import vyre_sqlcache
except ImportError:  # pragma: no cover - depends on the environment
    vyre_sqlcache = None  # type: ignore[assignment]
try:
    import diskcache  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    diskcache = None
try:
    import lmdb
except ImportError:  # pragma: no cover
    lmdb = None  # type: ignore[assignment]


LMDB_MAP_SIZE = 1 << 40
"""1 TiB of address space: LMDB's data file stays sparse and grows as used."""
POPULATE_BATCH_ENTRIES = 10_000
POPULATE_BATCH_BYTES = 64 * 1024 * 1024
"""Bounds of one write transaction when populating diskcache or LMDB."""


@dataclass(frozen=True)
class FingerprintSpec:
    """The parts of the one device fingerprint every store is used with."""

    vendor: int = 0x10DE
    device: int = 0x2684
    revision: str = "550.54.14"
    revision_extra: str = "vulkan-1.3.277"

    def port(self) -> PipelineDeviceFingerprint:
        """The fingerprint as the files-store port represents it."""
        return PipelineDeviceFingerprint.from_parts(
            self.vendor, self.device, self.revision, self.revision_extra
        )


class Store(ABC):
    """Adapter interface shared by every store in the benchmark."""

    name: ClassVar[str]
    notes: ClassVar[str] = ""

    def __init__(self, root: Path, fingerprint: FingerprintSpec) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint

    @abstractmethod
    def open(self) -> None:
        """Open (creating if needed) the store under ``root``."""

    @abstractmethod
    def close(self) -> None:
        """Close the store; later ``open`` calls start fresh."""

    @abstractmethod
    def write(self, digest: bytes, blob: bytes) -> None:
        """Store ``blob`` under ``digest`` (need not be durable yet)."""

    @abstractmethod
    def read(self, digest: bytes) -> bytes | None:
        """The blob stored under ``digest``, or ``None``."""

    @abstractmethod
    def flush(self) -> None:
        """Make every earlier write durable."""

    @abstractmethod
    def invalidate(self, mask: Sequence[int], digests: Sequence[bytes]) -> None:
        """Remove the entries of ``digests`` whose ``mask`` value is non-zero."""

    def write_batch(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store many entries through the store's batch API (one call each without one)."""
        for digest, blob in items:
            self.write(digest, blob)

    def populate(self, items: Iterable[tuple[bytes, bytes]], durable: bool) -> None:
        """Fill an open store through its batch path (untimed fixture setup).

        ``durable=False`` lets a store skip syncing when only reads follow.
        """
        for chunk in _chunks(items):
            self.write_batch(chunk)
        self.flush()

    def files(self) -> list[Path]:
        """Every file of the store (data, journals, locks), for fadvise and du."""
        found: list[Path] = []
        for directory, _dirs, names in os.walk(self.root):
            found.extend(Path(directory, name) for name in names)
        return found

    def disk_bytes(self) -> int:
        """Bytes allocated on disk (``st_blocks * 512``) by the store's files and
        directories (the files store's 256 fan-out directories are its cost)."""
        directories = [Path(directory) for directory, _dirs, _names in os.walk(self.root)]
        return sum(path.stat().st_blocks * 512 for path in [*directories, *self.files()])

    def __enter__(self) -> Store:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _require(module: Any, name: str) -> Any:
    if module is None:
        raise RuntimeError(f"{name} is not importable; install the bench extra")
    return module


class VyreStore(Store):
    """vyre-sqlcache through its public API: one ``.sqlite3`` file."""

    name = "vyre-sqlcache"
    notes = "public API: write/read/flush/invalidate_impacted on one .sqlite3 file"

    def __init__(self, root: Path, fingerprint: FingerprintSpec) -> None:
        super().__init__(root, fingerprint)
        package = _require(vyre_sqlcache, "vyre_sqlcache")
        self._fp = package.DeviceFingerprint.from_parts(
            fingerprint.vendor,
            fingerprint.device,
            fingerprint.revision,
            fingerprint.revision_extra,
        )
        self._cache: Any = None

    def open(self) -> None:
        self._cache = vyre_sqlcache.PipelineCache.open(self.root / "cache.sqlite3")

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def write(self, digest: bytes, blob: bytes) -> None:
        self._cache.write(digest, self._fp, blob)

    def write_batch(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self._cache.write_many(items, self._fp)

    def read(self, digest: bytes) -> bytes | None:
        blob: bytes | None = self._cache.read(digest, self._fp)
        return blob

    def flush(self) -> None:
        self._cache.flush()

    def invalidate(self, mask: Sequence[int], digests: Sequence[bytes]) -> None:
        self._cache.invalidate_impacted(mask, digests, self._fp)

    def cache_key(self, digest: bytes) -> bytes:
        """The package's own entry key, to check the port derives the same one."""
        return bytes(self._fp.cache_key(digest))


class FilesStore(Store):
    """The original design: the Rust ``DiskPipelineCache`` ported file for file."""

    name = "files"
    notes = "port of vyre's DiskPipelineCache: <root>/<2hex>/<64hex>.bin, tmp+rename"

    def __init__(self, root: Path, fingerprint: FingerprintSpec) -> None:
        super().__init__(root, fingerprint)
        self._fp = fingerprint.port()
        self._cache: DiskPipelineCache | None = None

    def open(self) -> None:
        self._cache = DiskPipelineCache.open(self.root)

    def close(self) -> None:
        self._cache = None

    def write(self, digest: bytes, blob: bytes) -> None:
        self._cache.write(digest, self._fp, blob)  # type: ignore[union-attr]

    def read(self, digest: bytes) -> bytes | None:
        return self._cache.read(digest, self._fp)  # type: ignore[union-attr]

    def flush(self) -> None:
        self._cache.flush()  # type: ignore[union-attr]

    def invalidate(self, mask: Sequence[int], digests: Sequence[bytes]) -> None:
        self._cache.invalidate_impacted(mask, digests, self._fp)  # type: ignore[union-attr]

    def populate(self, items: Iterable[tuple[bytes, bytes]], durable: bool) -> None:
        for digest, blob in items:
            self.write(digest, blob)
        if durable:
            self.flush()
        else:  # a million fdatasyncs would take minutes and change no read.
            self._cache.discard_pending()  # type: ignore[union-attr]


class DiskcacheStore(Store):
    """``diskcache.Cache(dir)`` with default settings; key = vyre's 32-byte key."""

    name = "diskcache"
    notes = (
        "diskcache.Cache defaults (SQLite WAL, synchronous=NORMAL, values >= 32 KiB "
        "in side files); flush does nothing extra: each set is committed but not "
        "synced, so not durable across a power cut"
    )

    def __init__(self, root: Path, fingerprint: FingerprintSpec) -> None:
        super().__init__(root, fingerprint)
        _require(diskcache, "diskcache")
        self._fp = fingerprint.port()
        self._cache: Any = None

    def open(self) -> None:
        self._cache = diskcache.Cache(str(self.root))

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def write(self, digest: bytes, blob: bytes) -> None:
        self._cache.set(self._fp.cache_key(digest), blob)

    def read(self, digest: bytes) -> bytes | None:
        return self._cache.get(self._fp.cache_key(digest))  # type: ignore[no-any-return]

    def flush(self) -> None:
        """Nothing: diskcache has no sync call; commits already happened."""

    def invalidate(self, mask: Sequence[int], digests: Sequence[bytes]) -> None:
        with self._cache.transact():
            for is_impacted, digest in zip(mask, digests, strict=False):
                if is_impacted:
                    self._cache.delete(self._fp.cache_key(digest))

    def write_batch(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        with self._cache.transact():
            for digest, blob in items:
                self.write(digest, blob)

    def populate(self, items: Iterable[tuple[bytes, bytes]], durable: bool) -> None:
        for chunk in _chunks(items):
            self.write_batch(chunk)


class LmdbStore(Store):
    """py-lmdb, the memory-mapped ceiling; key = vyre's 32-byte key."""

    name = "lmdb"
    notes = (
        "py-lmdb, map_size 1 TiB (sparse), sync=False so write commits without "
        "syncing and flush = env.sync(True); one read transaction per read"
    )

    def __init__(self, root: Path, fingerprint: FingerprintSpec) -> None:
        super().__init__(root, fingerprint)
        _require(lmdb, "lmdb")
        self._fp = fingerprint.port()
        self._env: Any = None

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)  # lmdb makes the last level only
        self._env = lmdb.open(str(self.root), map_size=LMDB_MAP_SIZE, sync=False)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def write(self, digest: bytes, blob: bytes) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(self._fp.cache_key(digest), blob)

    def read(self, digest: bytes) -> bytes | None:
        with self._env.begin() as txn:
            return txn.get(self._fp.cache_key(digest))  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._env.sync(True)

    def invalidate(self, mask: Sequence[int], digests: Sequence[bytes]) -> None:
        with self._env.begin(write=True) as txn:
            for is_impacted, digest in zip(mask, digests, strict=False):
                if is_impacted:
                    txn.delete(self._fp.cache_key(digest))

    def write_batch(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        with self._env.begin(write=True) as txn:
            for digest, blob in items:
                txn.put(self._fp.cache_key(digest), blob)

    def populate(self, items: Iterable[tuple[bytes, bytes]], durable: bool) -> None:
        for chunk in _chunks(items):
            self.write_batch(chunk)
        if durable:
            self.flush()


def _chunks(
    items: Iterable[tuple[bytes, bytes]],
) -> Iterator[list[tuple[bytes, bytes]]]:
    """Group items into batches bounded in count and in bytes."""
    chunk: list[tuple[bytes, bytes]] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += len(item[1])
        if len(chunk) >= POPULATE_BATCH_ENTRIES or size >= POPULATE_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


STORES: dict[str, type[Store]] = {
    cls.name: cls for cls in (VyreStore, FilesStore, DiskcacheStore, LmdbStore)
}
"""Every store, in the order the report lists them (vyre-sqlcache first)."""


def make_store(name: str, root: Path, fingerprint: FingerprintSpec) -> Store:
    """Build the adapter called ``name`` over ``root``."""
    return STORES[name](root, fingerprint)


def store_available(name: str) -> str | None:
    """``None`` if store ``name`` can run here, else why not."""
    module = {
        "vyre-sqlcache": vyre_sqlcache,
        "diskcache": diskcache,
        "lmdb": lmdb,
    }.get(name, True)
    return None if module is not None else f"{name}: its package is not importable"
