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


# -- helpers for the reliability and hostile-input tests ---------------------------------


def crash_copy(database: Path, target: Path) -> None:
    """Copy a live cache's file and write-ahead log, as a crash would leave them (no -shm).

    Take it while the cache is open: closing would fold the log into the file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        source = Path(str(database) + suffix)
        if source.exists():
            shutil.copyfile(source, Path(str(target) + suffix))


def dump(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, the schema and user_version, read without changing a byte."""
    uri = database.resolve().as_uri() + "?mode=ro"
    connection = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        schema = connection.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name"
        ).fetchall()
        tables = [name for kind, name, _, _ in schema if kind == "table"]
        result: dict[str, list[tuple[Any, ...]]] = {"sqlite_schema": schema}
        for table in tables:
            result[table] = connection.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
        result["user_version"] = connection.execute("PRAGMA user_version").fetchall()
        return result
    finally:
        connection.close()


def page_map(database: Path) -> tuple[dict[str, list[int]], int]:
    """The pages of each b-tree as `{'table:leaf'|'table:internal'|'table:overflow': [pageno]}`
    (from SQLite's dbstat), and the page size."""
    connection = apsw.Connection(str(database))
    try:
        pages: dict[str, list[int]] = {}
        for name, pageno, pagetype in connection.execute(
            "SELECT name, pageno, pagetype FROM dbstat"
        ):
            pages.setdefault(f"{name}:{pagetype}", []).append(int(pageno))
        return pages, int(connection.pragma("page_size"))
    finally:
        connection.close()


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of a file, in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)
