"""vyre's directory cache (`DiskPipelineCache`): import it into a cache, export a cache as one.

Layout (see vyre-cache-format.md): `<root>/<hex[0:2]>/<hex>.bin` holds the bare blob of
the entry whose 32-byte key has the lowercase hex `hex`; writers make it atomically from
`<hex>.bin.tmp.<pid>.<counter>`. The file's modification time is the entry's creation
time, both ways.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from . import _checksums as checksums
from ._checks import MAX_BLOB_BYTES
from .cache import PipelineCache
from .errors import BlobTooLargeError, CacheError
from .keys import entry_id

__all__ = [
    "ExportReport",
    "ImportReport",
    "entry_path",
    "export_dir",
    "import_dir",
    "scan",
    "write_atomic",
]

_FOLDER = re.compile(r"^[0-9a-f]{2}$")
_ENTRY = re.compile(r"^([0-9a-f]{64})\.bin$")
_TEMPORARY = re.compile(r"\.bin\.tmp\.")

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]
Note = Callable[[str], None]
_counter = itertools.count()


def _no_progress(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
    return items


def _ignore(message: str) -> None:
    pass


def entry_path(root: Path, entry_key: bytes) -> Path:
    """Where vyre keeps the entry with this key under `root`."""
    name = entry_key.hex()
    return root / name[:2] / f"{name}.bin"


@dataclass(frozen=True)
class DirEntry:
    """One entry file of a vyre directory cache."""

    path: Path
    entry_key: bytes
    size: int
    mtime_ms: int


def _entry(found: os.DirEntry[str], folder: str) -> DirEntry | str:
    """The entry a file in a two-hex folder holds, or why it is not one to import."""
    if _TEMPORARY.search(found.name):
        return "a temporary file of an unfinished write"
    match = _ENTRY.match(found.name)
    if match is None:
        return "the name is not <64 lowercase hex>.bin"
    if match.group(1)[:2] != folder:
        return f"the key does not start with its folder's name {folder!r}"
    try:
        if not found.is_file(follow_symlinks=False):
            return "not a regular file"
        stat = found.stat(follow_symlinks=False)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if stat.st_size > MAX_BLOB_BYTES:
        return f"{stat.st_size} bytes, over the {MAX_BLOB_BYTES}-byte limit"
    key = bytes.fromhex(match.group(1))
    return DirEntry(Path(found.path), key, stat.st_size, stat.st_mtime_ns // 1_000_000)


def scan(root: Path, note: Note = _ignore) -> tuple[list[DirEntry], int]:
    """The entry files under `root`, in key order, and how many other paths were skipped.

    Every skipped path is passed to `note` with the reason. Raises CacheError if `root`
    is not a readable folder.
    """
    if not root.is_dir():
        raise CacheError(f"{root} is not a folder; give the root of a vyre pipeline cache")
    found: list[DirEntry] = []
    skipped = 0

    def skip(path: str, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        note(f"skipped {path}: {reason}")

    try:
        with os.scandir(root) as top:
            folders = sorted(top, key=lambda e: e.name)
        for folder in folders:
            if not (_FOLDER.match(folder.name) and folder.is_dir(follow_symlinks=False)):
                skip(folder.path, "not a folder named by two lowercase hex digits")
                continue
            with os.scandir(folder.path) as inside:
                for item in sorted(inside, key=lambda e: e.name):
                    entry = _entry(item, folder.name)
                    if isinstance(entry, str):
                        skip(item.path, entry)
                    else:
                        found.append(entry)
    except OSError as error:
        raise CacheError(f"cannot read the vyre cache folder {root}: {error}") from error
    return found, skipped


@dataclass
class ImportReport:
    """What `import_dir` did."""

    imported: int = 0
    unchanged: int = 0
    skipped: int = 0


def _known(connection: apsw.Connection) -> dict[bytes, tuple[int, int]]:
    """(blob size, created ms) of every entry without key columns, by entry key."""
    rows = connection.execute(
        "SELECT entry_key, blob_size, created_ms FROM entries WHERE key_version IS NULL"
    )
    return {bytes(k): (int(s), int(c)) for k, s, c in rows}


def import_dir(
    cache: PipelineCache,
    connection: apsw.Connection,
    root: Path,
    *,
    progress: Progress = _no_progress,
    note: Note = _ignore,
) -> ImportReport:
    """Import every entry file under `root` into `cache`, keeping each file's mtime as its
    creation time. An entry already imported with the same size and time is left as it is,
    so importing twice changes nothing. `connection` reads the same cache.

    Skipped files (temporary, too large, misnamed, vanished, over the cache's cap) are
    passed to `note`. Raises CacheError if the cache cannot be written.
    """
    files, skipped = scan(root, note)
    report = ImportReport(skipped=skipped)
    known = _known(connection)
    for item in progress(files, len(files), "importing"):
        if known.get(item.entry_key) == (item.size, item.mtime_ms):
            report.unchanged += 1
            continue
        try:
            data = item.path.read_bytes()
            cache.put_entry(item.entry_key, data, created_ms=item.mtime_ms)
        except (OSError, BlobTooLargeError) as error:
            report.skipped += 1
            note(f"skipped {item.path}: {error}")
            continue
        report.imported += 1
    if report.imported:
        cache.flush()
    return report


def write_atomic(path: Path, data: bytes, mtime_ms: int) -> None:
    """Write `path` as vyre does: a temporary file beside it, synced, then renamed over it.

    The file gets `mtime_ms` as its modification time before it appears.
    """
    temporary = path.with_name(f"{path.name}.tmp.{os.getpid()}.{next(_counter)}")
    try:
        with open(temporary, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        ns = mtime_ms * 1_000_000
        os.utime(temporary, ns=(ns, ns))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (where the platform can open folders)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@dataclass
class ExportReport:
    """What `export_dir` did: `damaged` lists hex keys whose bytes failed their checksum."""

    exported: int = 0
    keyed: int = 0
    damaged: list[str] = field(default_factory=list)


_BLOB = "SELECT checksum_algo, checksum, data FROM blobs WHERE id = ?"


def export_dir(
    connection: apsw.Connection, root: Path, *, progress: Progress = _no_progress
) -> ExportReport:
    """Write every entry a vyre build can look up (those without key columns) under `root`.

    Reads through `connection` (read-only) and changes nothing in the cache: no hits or
    access times. Bytes that fail their checksum are not written; they are listed in the
    report. Entries stored by `PipelineCacheKey` are counted, not written: vyre's
    directory cache never looks them up. Raises OSError if `root` cannot be written.
    """
    report = ExportReport()
    rows = connection.execute(
        "SELECT entry_key, created_ms, key_version IS NOT NULL FROM entries ORDER BY entry_key"
    ).fetchall()
    folders: set[Path] = set()
    for entry_key, created_ms, keyed in progress(rows, len(rows), "exporting"):
        if keyed:
            report.keyed += 1
            continue
        key = bytes(entry_key)
        blob = connection.execute(_BLOB, (entry_id(key),)).fetchone()
        if blob is None:
            continue  # deleted since the list was made
        algo, checksum, data = blob
        if not checksums.matches(str(algo), bytes(checksum), key, bytes(data)):
            report.damaged.append(key.hex())
            continue
        path = entry_path(root, key)
        if path.parent not in folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
        write_atomic(path, bytes(data), int(created_ms))
        report.exported += 1
    for folder in sorted(folders):
        _sync_folder(folder)
    _sync_folder(root)
    return report
