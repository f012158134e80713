"""Self-healing: a damaged cache file is moved aside, never deleted, and replaced by a new one."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["SIDE_FILES", "header_damage", "is_not_sqlite", "move_aside", "needs_check_marker"]

log = logging.getLogger("vyre_sqlcache")

#: Files SQLite keeps beside a database in WAL mode.
SIDE_FILES = ("-wal", "-shm")


_MAGIC = b"SQLite format 3\0"


def is_not_sqlite(path: Path) -> bool:
    """Whether `path` holds bytes that cannot be a SQLite database (a 16-byte look).

    Looked at before SQLite opens the file, because SQLite removes the -wal file of a
    database it cannot read, and a file moved aside should keep it.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(len(_MAGIC))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return False
    return bool(head) and head != _MAGIC[: len(head)]


def header_damage(path: Path) -> str | None:
    """What is wrong with the fields of a SQLite header that SQLite would not refuse at
    open but that leave the file unwritable or unreadable later; None if nothing.

    (A write version above 2 makes SQLite open the file read-only; a schema format
    above 4 fails every statement with 'unsupported file format'.)
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    if len(header) < 100 or not header.startswith(_MAGIC):
        return None  # empty, or not SQLite at all: is_not_sqlite's business
    if header[18] not in (1, 2) or header[19] not in (1, 2):
        return f"file format versions {header[18]}/{header[19]} (1 or 2 expected)"
    schema_format = int.from_bytes(header[44:48], "big")
    if schema_format > 4:
        return f"schema format {schema_format} (at most 4 expected)"
    encoding = int.from_bytes(header[56:60], "big")
    if encoding > 3:
        return f"text encoding {encoding} (1, 2 or 3 expected)"
    return None


def needs_check_marker(path: Path) -> Path:
    """The file whose presence asks the next open to verify the cache with quick_check.

    It is written only when a damaged page was met in use, so a healthy cache stays one file.
    """
    return path.with_name(path.name + ".needs-check")


def move_aside(path: Path, reason: str) -> Path:
    """Rename `path` (and its -wal/-shm) to `<path>.corrupt-<UTC time>`; return the new name.

    Raises OSError if the main file cannot be renamed.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, target)
    for suffix in SIDE_FILES:
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, Path(str(target) + suffix))
    needs_check_marker(path).unlink(missing_ok=True)
    log.warning(
        "vyre-sqlcache: %s %s; moved it to %s and started a new, empty cache",
        path,
        reason,
        target,
    )
    return target
