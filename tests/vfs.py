"""apsw VFS shims for tests: a disk that loses whatever was not synced."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import apsw

_SYNCED = ".synced"


def _filename(name: Any) -> str:
    return name.filename() if isinstance(name, apsw.URIFilename) else str(name)


class _SyncTrackingFile(apsw.VFSFile):  # type: ignore[misc]
    def __init__(self, vfs: SyncTrackingVFS, name: Any, flags: list[int]) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs = vfs
        self._path = _filename(name)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
        # What a sync makes durable is the file as it is now.
        shutil.copyfile(self._path, self._path + _SYNCED)
        self._vfs.syncs += 1


class SyncTrackingVFS(apsw.VFS):  # type: ignore[misc]
    """Passes everything through, and keeps a copy of each file as of its last xSync."""

    def __init__(self, name: str = "synctrack", base: str = "") -> None:
        self.base = base
        self.name = name
        self.syncs = 0
        super().__init__(name, base)

    def xOpen(self, name: Any, flags: list[int]) -> _SyncTrackingFile:
        return _SyncTrackingFile(self, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        super().xDelete(filename, syncdir)
        Path(filename + _SYNCED).unlink(missing_ok=True)


def power_cut(database: Path) -> None:
    """Replace the database and its WAL by their last synced contents, as a power cut would."""
    for suffix in ("", "-wal", "-journal"):
        path = Path(str(database) + suffix)
        synced = Path(str(path) + _SYNCED)
        if synced.exists():
            os.replace(synced, path)
        else:
            path.unlink(missing_ok=True)
    # The shared-memory index is rebuilt from the WAL after a crash.
    Path(str(database) + "-shm").unlink(missing_ok=True)


def abandon(cache: Any) -> None:
    """Drop a cache's connections without the checkpoint close() does, as a crash would."""
    cache._closed = True
    for _, connection in cache._connections:
        connection.close()
