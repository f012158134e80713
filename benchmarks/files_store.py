"""A faithful Python port of vyre's Rust ``DiskPipelineCache`` (one file per blob).

This is the baseline vyre-sqlcache replaces. It follows
``shared/seed/disk_pipeline_cache.rs.txt`` and ``shared/reference/vyre-cache-format.md``:

- the entry key is derived on every call with BLAKE3, exactly as vyre does;
- an entry lives at ``<root>/<hex[0:2]>/<hex>.bin`` (``hex`` = 64 lowercase hex digits);
- a write creates the parent directory, writes ``<hex>.bin.tmp.<pid>.<counter>``
  and renames it over the entry, then remembers the path as pending;
- ``flush`` ``fdatasync``\\ s every pending file, then ``fsync``\\ s every parent
  directory, in chunks of ``available_parallelism`` threads as the Rust code does;
- a read is ``open`` + ``read``, bounded to 64 MiB;
- ``invalidate_impacted`` unlinks each impacted entry that exists.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

MAX_DISK_PIPELINE_BLOB_BYTES = 64 * 1024 * 1024
"""Largest blob written or read (``MAX_DISK_PIPELINE_BLOB_BYTES`` in the Rust source)."""

_FINGERPRINT_DOMAIN = b"vyre-pipeline-device-fingerprint-v1\0"
_KEY_DOMAIN = b"vyre-disk-pipeline-cache-key-v1\0program\0"
_TMP_COUNTER = itertools.count()


@dataclass(frozen=True)
class PipelineDeviceFingerprint:
    """Port of ``PipelineDeviceFingerprint``: vendor, device and a 32-byte driver digest."""

    vendor: int
    device: int
    driver_digest: bytes
    _key_suffix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.driver_digest) != 32:
            raise ValueError("driver_digest must be 32 bytes")
        # The bytes hashed after the program digest; constant for one fingerprint.
        suffix = (
            b"\0vendor\0"
            + struct.pack("<I", self.vendor)
            + b"\0device\0"
            + struct.pack("<I", self.device)
            + b"\0driver\0"
            + self.driver_digest
        )
        object.__setattr__(self, "_key_suffix", suffix)

    @classmethod
    def from_parts(
        cls, vendor: int, device: int, revision: str, revision_extra: str = ""
    ) -> PipelineDeviceFingerprint:
        """Build a fingerprint the way vyre's ``from_parts`` does."""
        digest = blake3.blake3(
            _FINGERPRINT_DOMAIN + revision.encode() + b"\0extra\0" + revision_extra.encode()
        ).digest()
        return cls(vendor, device, digest)

    def cache_key(self, program_digest: bytes) -> bytes:
        """The 32-byte entry key of ``program_digest`` on this device (BLAKE3)."""
        if len(program_digest) != 32:
            raise ValueError("program_digest must be 32 bytes")
        return blake3.blake3(_KEY_DOMAIN + program_digest + self._key_suffix).digest()


class DiskPipelineCache:
    """Port of ``DiskPipelineCache``: one file per blob under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.fspath(root)
        self._pending: list[str] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> DiskPipelineCache:
        """Open a cache rooted at ``root``, creating the directory."""
        os.makedirs(root, exist_ok=True)
        return cls(root)

    @property
    def root(self) -> str:
        """Root directory used by this cache."""
        return self._root

    def path_for(self, program_digest: bytes, fingerprint: PipelineDeviceFingerprint) -> str:
        """Derive the entry path: ``<root>/<hex[0:2]>/<hex>.bin``."""
        hex_key = fingerprint.cache_key(program_digest).hex()
        return os.path.join(self._root, hex_key[:2], hex_key + ".bin")

    def read(self, program_digest: bytes, fingerprint: PipelineDeviceFingerprint) -> bytes | None:
        """Read a cached blob; ``None`` on a miss."""
        try:
            return _read_bounded(
                self.path_for(program_digest, fingerprint),
                MAX_DISK_PIPELINE_BLOB_BYTES,
            )
        except FileNotFoundError:
            return None

    def write(
        self,
        program_digest: bytes,
        fingerprint: PipelineDeviceFingerprint,
        data: bytes,
    ) -> None:
        """Write a blob with an atomic install (tmp file + rename), not yet durable."""
        if len(data) > MAX_DISK_PIPELINE_BLOB_BYTES:
            raise ValueError(
                f"pipeline cache blob exceeds {MAX_DISK_PIPELINE_BLOB_BYTES} byte limit"
            )
        path = self.path_for(program_digest, fingerprint)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{next(_TMP_COUNTER)}"
        try:
            with open(tmp, "wb") as file:
                file.write(data)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        with self._lock:
            self._pending.append(path)

    def flush(self) -> None:
        """Durably flush every entry written since the last flush."""
        with self._lock:
            paths = sorted(set(self._pending))
            self._pending.clear()
        try:
            _flush_paths(paths)
        except BaseException:
            with self._lock:
                self._pending.extend(paths)
            raise

    def discard_pending(self) -> None:
        """Forget pending paths without syncing them (benchmark fixtures only)."""
        with self._lock:
            self._pending.clear()

    def invalidate_impacted(
        self,
        impact_mask: Sequence[int],
        program_digests: Sequence[bytes],
        fingerprint: PipelineDeviceFingerprint,
    ) -> None:
        """Remove the entries whose mask value is non-zero."""
        for index, is_impacted in enumerate(impact_mask):
            if is_impacted != 0 and index < len(program_digests):
                path = self.path_for(program_digests[index], fingerprint)
                if os.path.exists(path):
                    os.remove(path)


def _read_bounded(path: str, max_bytes: int) -> bytes:
    """``open`` + ``read`` the whole file, refusing files over ``max_bytes``."""
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"pipeline cache blob exceeds {max_bytes} byte limit")
        return file.readall()


def _fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_paths(paths: list[str]) -> None:
    """Sync each file's data, then each distinct parent directory."""
    _sync_bounded(paths, _fdatasync_path)
    parents = sorted({os.path.dirname(path) for path in paths})
    _sync_bounded(parents, _fsync_path)


def _sync_bounded(paths: list[str], sync: Callable[[str], None]) -> None:
    """Run ``sync`` over ``paths`` in chunks of up to ``cpu_count`` (max 16) threads.

    A chunk of one path is synced inline: Rust spawns a native thread for it
    (microseconds), a Python thread costs far more and would penalise the port.
    """
    if not paths:
        return
    workers = max(1, min(os.cpu_count() or 1, 16))
    if workers == 1 or len(paths) == 1:
        for path in paths:
            sync(path)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), workers):
            chunk = paths[start : start + workers]
            if len(chunk) == 1:
                sync(chunk[0])
            else:
                list(pool.map(sync, chunk))
