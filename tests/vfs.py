"""Test helpers for files: a disk that loses whatever was not synced, crash copies, dumps.

The VFS shims themselves live in the reliability harness (`torture.shims`, beside the
package in the source tree), so that `python -m torture` has them too; this module
re-exports them for the tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import apsw

from torture.corruption import overwrite, page_map
from torture.shims import SyncTrackingVFS, power_cut

__all__ = [
    "SyncTrackingVFS",
    "abandon",
    "crash_copy",
    "dump",
    "overwrite",
    "page_map",
    "power_cut",
]


def abandon(cache: Any) -> None:
    """Drop a cache's connections without the checkpoint close() does, as a crash would."""
    from .helpers import abandon as drop

    drop(cache)


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
