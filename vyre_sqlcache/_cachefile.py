"""The cache file on disk: where it is, what may be done to it, its side files, healing.

A damaged cache file is moved aside, never deleted, and replaced by a new one;
only a file that is recognisably a damaged cache is moved (see `is_damaged_cache`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import CacheError, NotACacheError

__all__ = [
    "KEEP_CORRUPT_COPIES",
    "SIDE_FILES",
    "CacheFile",
    "has_side_files",
    "header_damage",
    "is_not_sqlite",
    "looks_like_damaged_pages",
    "move_aside",
    "needs_check_marker",
    "resolve",
]

log = logging.getLogger("vyre_sqlcache")

#: Files SQLite keeps beside a database in WAL mode.
SIDE_FILES = ("-wal", "-shm")
#: Damaged files moved aside are kept for a post-mortem, the newest few only.
KEEP_CORRUPT_COPIES = 3

_MAGIC = b"SQLite format 3\0"


def resolve(path: str | Path) -> Path:
    """The one absolute name of a cache file: `~` expanded, every symbolic link resolved.

    Resolving links (in the folders and the file itself) gives every name of the file
    the same -wal and -shm, which SQLite names after the path it is given; an absolute
    path keeps threads opened after an `os.chdir` on the same file.
    """
    return Path(os.path.realpath(Path(path).expanduser()))


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


def looks_like_damaged_pages(path: Path) -> bool:
    """Whether a file that does not start as SQLite still looks like a database's pages: a
    zeroed header (what a crash leaves), or a whole number of 512-byte pages that does not
    start with text (a page of garbage over the header). A document starts with text."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as file:
            head = file.read(100)
    except OSError:
        return False
    if len(head) < 100:
        return False
    if not any(head):
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return size % 512 == 0
    return False


def has_side_files(path: Path) -> bool:
    """Whether a -wal or -shm sits beside the file."""
    return any(Path(str(path) + side).exists() for side in SIDE_FILES)


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


def corrupt_copies(path: Path) -> list[Path]:
    """The damaged copies of `path` moved aside so far, oldest first."""
    return sorted(p for p in path.parent.glob(path.name + ".corrupt-*") if p.name[-1] == "Z")


def move_aside(path: Path, reason: str) -> Path:
    """Rename `path` (and its -wal/-shm) to `<path>.corrupt-<UTC time>`; return the new name.

    Only the newest `KEEP_CORRUPT_COPIES` copies are kept. Raises OSError if the main
    file cannot be renamed.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, target)
    for suffix in SIDE_FILES:
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, Path(str(target) + suffix))
    needs_check_marker(path).unlink(missing_ok=True)
    for old in corrupt_copies(path)[:-KEEP_CORRUPT_COPIES]:
        for suffix in ("", *SIDE_FILES):
            Path(str(old) + suffix).unlink(missing_ok=True)
    log.warning(
        "vyre-sqlcache: %s %s; moved it to %s and started a new, empty cache",
        path,
        reason,
        target,
    )
    return target


def file_bytes(path: Path) -> int:
    """Bytes the cache takes on disk: the file and its write-ahead log."""
    total = 0
    for suffix in ("", SIDE_FILES[0]):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(str(path) + suffix).st_size
    return total


def _medium_is_readonly(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class CacheFile:
    """A cache file's resolved path and how it can be opened.

    `writable`: the process may write the file and its side files. `immutable`: the
    file is on read-only media and has no write-ahead log to read, so SQLite may read
    it without -shm and without locks (nothing can change it).
    """

    path: Path
    writable: bool
    immutable: bool

    @classmethod
    def locate(cls, path: str | Path, *, create: bool) -> CacheFile:
        """Resolve `path` and find out how it may be opened.

        Raises CacheError for a folder, a FIFO, socket or device, a file with several
        hard links, a missing file when `create` is false, or a folder that cannot be
        made.
        """
        resolved = resolve(path)
        try:
            info = os.stat(resolved)
        except FileNotFoundError:
            info = None
        except OSError as error:
            raise CacheError(f"cannot look at cache file {resolved}: {error}") from error
        if info is None:
            if not create:
                raise CacheError(
                    f"{resolved} does not exist, and a read-only cache cannot create it; "
                    "open it without readonly=True first, or check the path"
                )
            try:
                resolved.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CacheError(
                    f"cannot create the folder of cache file {resolved}: {error}; "
                    "choose a writable path"
                ) from error
            return cls(resolved, writable=True, immutable=False)
        if stat.S_ISDIR(info.st_mode):
            raise CacheError(
                f"{resolved} is a folder; give the path of a cache file, such as "
                f"{resolved / 'pipelines.sqlite3'}"
            )
        if not stat.S_ISREG(info.st_mode):
            raise NotACacheError(
                f"{resolved} is not a regular file (a FIFO, socket or device); "
                "give the path of a cache file"
            )
        if info.st_nlink > 1:
            # SQLite names the -wal after the path: two names of one file would each
            # get a log of their own, and commits made through one would be lost.
            raise CacheError(
                f"{resolved} has {info.st_nlink} hard links; a cache file must have one "
                "name (copy it instead of linking it, or use a symbolic link)"
            )
        sides = [Path(str(resolved) + side) for side in SIDE_FILES]
        folder_ok = all(side.exists() for side in sides) or os.access(resolved.parent, os.W_OK)
        writable = os.access(resolved, os.W_OK) and folder_ok
        immutable = False
        if not writable and not os.access(resolved.parent, os.W_OK):
            wal = sides[0]
            no_log = not wal.exists() or wal.stat().st_size == 0
            immutable = no_log and (_medium_is_readonly(resolved) or not sides[1].exists())
        return cls(resolved, writable=writable, immutable=immutable)

    def file_bytes(self) -> int:
        """Bytes the cache takes on disk: the file and its write-ahead log."""
        return file_bytes(self.path)

    def identity(self) -> tuple[int, int, int, int] | None:
        """What changes when another process rewrites the file (None if it is gone)."""
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
