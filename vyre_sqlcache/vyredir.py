"""vyre's directory cache (`DiskPipelineCache`): import it into a cache, export a cache as one.

Layout (see vyre-cache-format.md): `<root>/<hex[0:2]>/<hex>.bin` holds the bare blob of
the entry whose 32-byte key has the lowercase hex `hex`; writers make it atomically from
`<hex>.bin.tmp.<pid>.<counter>`. The file's modification time is the entry's creation
time, both ways.

Both directions work through the public `PipelineCache` API, and neither follows a
symbolic link inside the tree: someone else may control the folder (root importing a
user's cache, a shared export folder). Import opens every file relative to its
folder's descriptor with `O_NOFOLLOW` and checks that what it opened is the regular
file it scanned; export creates and opens its folders with `O_NOFOLLOW` and writes
each file relative to its folder's descriptor, so a folder or file swapped for a link
is refused, never written through. The root folder itself is the caller's choice and
may be a link.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import MAX_BLOB_BYTES, PipelineCache
from .errors import BlobTooLargeError, CacheError, CorruptCacheError

__all__ = [
    "DirEntry",
    "ExportReport",
    "ImportReport",
    "entry_path",
    "export_dir",
    "import_dir",
    "read_bounded",
    "scan",
    "write_atomic",
]

_FOLDER = re.compile(r"^[0-9a-f]{2}$")
_ENTRY = re.compile(r"^([0-9a-f]{64})\.bin$")
_TEMPORARY = re.compile(r"\.bin\.tmp\.")

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: A folder inside the tree: never through a link.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
#: An entry file: never through a link, and never blocking on a FIFO swapped in.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC

#: Entries are imported in transactions of up to this many blob bytes (and entries).
IMPORT_BATCH_BYTES = 64 * 1024 * 1024
IMPORT_BATCH_ENTRIES = 1000
#: Entries are exported in batches of up to this many blob bytes (and entries): each
#: batch's files are written, synced together, then renamed into place.
EXPORT_BATCH_BYTES = 64 * 1024 * 1024
EXPORT_BATCH_ENTRIES = 2000
#: Rows per page when listing the cache's entries.
LIST_PAGE = 2000

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
    """One entry file of a vyre directory cache, as scanned."""

    path: Path
    entry_key: bytes
    size: int
    mtime_ms: int
    #: (st_dev, st_ino) of the file scanned: the file opened later must be this one
    identity: tuple[int, int]

    @property
    def folder(self) -> str:
        return self.path.parent.name

    @property
    def name(self) -> str:
        return self.path.name


def _why(error: OSError) -> str:
    return error.strerror or str(error)


#: Errors that say the process has too many files open: no file's fault, so they stop
#: the command instead of skipping one file after another.
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _out_of_descriptors(error: OSError, root: Path) -> CacheError:
    return CacheError(
        f"cannot read the vyre cache folder {root}: {_why(error)}; raise this process's "
        "limit of open files (`ulimit -n`) and run it again (what was imported stays)"
    )


class _Tree:
    """A vyre directory cache opened for reading: the root's descriptor, and the one of
    the folder being read (a descriptor a folder would need 257 of them: more than
    macOS allows by default)."""

    def __init__(self, root: Path, stack: ExitStack) -> None:
        self.root = root
        self._stack = stack
        self._identities: dict[str, tuple[int, int]] = {}  # each folder as scanned
        self._open: tuple[str, int] | None = None  # the folder being read
        try:
            self._fd = self._keep(os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC))
        except OSError as error:
            if error.errno in _OUT_OF_DESCRIPTORS:
                raise _out_of_descriptors(error, root) from error
            raise CacheError(
                f"{root} is not a folder that can be read ({_why(error)}); give the root of "
                "a vyre pipeline cache"
            ) from error
        stack.callback(self._close_folder)

    def _keep(self, fd: int) -> int:
        self._stack.callback(os.close, fd)
        return fd

    def _close_folder(self) -> None:
        if self._open is not None:
            os.close(self._open[1])
            self._open = None

    def scan(self, note: Note) -> tuple[list[DirEntry], int]:
        found: list[DirEntry] = []
        skipped = 0

        def skip(path: Path, reason: str) -> None:
            nonlocal skipped
            skipped += 1
            note(f"skipped {path}: {reason}")

        try:
            with os.scandir(self._fd) as top:
                folders = sorted(top, key=lambda e: e.name)
            for folder in folders:
                where = self.root / folder.name
                if not (_FOLDER.match(folder.name) and folder.is_dir(follow_symlinks=False)):
                    skip(where, "not a folder named by two lowercase hex digits")
                    continue
                try:
                    fd = os.open(folder.name, _FOLDER_FLAGS, dir_fd=self._fd)
                except OSError as error:
                    if error.errno in _OUT_OF_DESCRIPTORS:
                        raise _out_of_descriptors(error, self.root) from error
                    skip(where, f"cannot be opened as a folder: {_why(error)}")
                    continue
                try:
                    opened = os.fstat(fd)
                    scanned = folder.stat(follow_symlinks=False)
                    if (opened.st_dev, opened.st_ino) != (scanned.st_dev, scanned.st_ino):
                        skip(where, "was replaced by another folder since it was scanned")
                        continue
                    self._identities[folder.name] = (opened.st_dev, opened.st_ino)
                    with os.scandir(fd) as inside:
                        items = sorted(inside, key=lambda e: e.name)
                    for item in items:  # (their stat goes through `fd`)
                        entry = _entry(item, where)
                        if isinstance(entry, str):
                            skip(where / item.name, entry)
                        else:
                            found.append(entry)
                finally:
                    os.close(fd)
        except CacheError:
            raise
        except OSError as error:
            if error.errno in _OUT_OF_DESCRIPTORS:
                raise _out_of_descriptors(error, self.root) from error
            raise CacheError(f"cannot read the vyre cache folder {self.root}: {error}") from error
        return found, skipped

    def _folder(self, name: str) -> int | str:
        """The descriptor of a scanned folder (opened again, one at a time: files are read
        in the scan's order), or why it cannot be read. Raises CacheError when the
        process is out of descriptors."""
        if self._open is not None and self._open[0] == name:
            return self._open[1]
        self._close_folder()
        try:
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=self._fd)
        except OSError as error:
            if error.errno in _OUT_OF_DESCRIPTORS:
                raise _out_of_descriptors(error, self.root) from error
            return f"its folder cannot be opened: {_why(error)}"
        self._open = (name, fd)
        try:
            info = os.fstat(fd)
        except OSError as error:
            return f"its folder cannot be looked at: {_why(error)}"
        if (info.st_dev, info.st_ino) != self._identities.get(name):
            return "its folder was replaced by another folder since it was scanned"
        return fd

    def read(self, item: DirEntry) -> tuple[bytes, int] | str:
        """The bytes and modification time (ms) of a scanned file, or why it was not read.

        Opened relative to its folder's descriptor with O_NOFOLLOW, so a link swapped in
        since the scan is refused, and checked to be the very file scanned. Raises
        CacheError when the process is out of descriptors.
        """
        folder = self._folder(item.folder)
        if isinstance(folder, str):
            return folder
        try:
            fd = os.open(item.name, _READ_FLAGS, dir_fd=folder)
        except OSError as error:
            if error.errno in _OUT_OF_DESCRIPTORS:
                raise _out_of_descriptors(error, self.root) from error
            return f"cannot be opened: {_why(error)}"
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != item.identity:
                return "was replaced by another file since it was scanned"
            data = read_bounded(fd)
        except OSError as error:
            return f"cannot be read: {_why(error)}"
        finally:
            os.close(fd)
        if len(data) > MAX_BLOB_BYTES:
            return f"over the {MAX_BLOB_BYTES}-byte limit"
        return data, info.st_mtime_ns // 1_000_000


@contextmanager
def _tree(root: Path) -> Iterator[_Tree]:
    with ExitStack() as stack:
        yield _Tree(root, stack)


def _entry(found: os.DirEntry[str], folder: Path) -> DirEntry | str:
    """The entry a file in a two-hex folder holds, or why it is not one to import."""
    if _TEMPORARY.search(found.name):
        return "a temporary file of an unfinished write"
    match = _ENTRY.match(found.name)
    if match is None:
        return "the name is not <64 lowercase hex>.bin"
    if match.group(1)[:2] != folder.name:
        return f"the key does not start with its folder's name {folder.name!r}"
    try:
        if not found.is_file(follow_symlinks=False):
            return "not a regular file"
        info = found.stat(follow_symlinks=False)
    except OSError as error:
        return f"cannot be read: {_why(error)}"
    if info.st_size > MAX_BLOB_BYTES:
        return f"{info.st_size} bytes, over the {MAX_BLOB_BYTES}-byte limit"
    key = bytes.fromhex(match.group(1))
    return DirEntry(
        folder / found.name,
        key,
        info.st_size,
        info.st_mtime_ns // 1_000_000,
        (info.st_dev, found.inode()),
    )


def scan(root: Path, note: Note = _ignore) -> tuple[list[DirEntry], int]:
    """The entry files under `root`, in key order, and how many other paths were skipped.

    Every skipped path is passed to `note` with the reason. Raises CacheError if `root`
    is not a readable folder.
    """
    with _tree(root) as tree:
        return tree.scan(note)


@dataclass
class ImportReport:
    """What `import_dir` did: `imported` entries written, of which `evicted` were gone
    again at the end (evicted by the size cap, to make room for later ones)."""

    imported: int = 0
    unchanged: int = 0
    skipped: int = 0
    evicted: int = 0

    @property
    def kept(self) -> int:
        """How many of the imported entries are in the cache at the end."""
        return self.imported - self.evicted


def _known(cache: PipelineCache) -> dict[bytes, tuple[int, int] | str]:
    """(blob size, created ms) of every entry without key columns, and the kind of every
    other entry ('keyed', 'named'), by entry key (listed page by page: only these are
    kept of each entry)."""
    known: dict[bytes, tuple[int, int] | str] = {}
    for row in cache.iter_entries(page=LIST_PAGE):
        kind = row["kind"]
        known[bytes.fromhex(row["entry_key"])] = (
            kind if kind in ("keyed", "named") else (int(row["blob_size"]), int(row["created_ms"]))
        )
    return known


def import_dir(
    cache: PipelineCache,
    root: Path,
    *,
    progress: Progress = _no_progress,
    note: Note = _ignore,
) -> ImportReport:
    """Import every entry file under `root` into `cache`, keeping each file's mtime as its
    creation time. An entry already imported with the same size and time is left as it is,
    so importing twice changes nothing.

    Entries are written in transactions of up to 64 MiB and made durable once at the end.
    Skipped files (temporary, too large, misnamed, links, replaced since the scan, over
    the cache's cap) are passed to `note`. Raises CacheError if `root` cannot be read or
    the cache cannot be written.
    """
    report = ImportReport()
    stored: list[bytes] = []
    batch: list[tuple[bytes, bytes, int | None]] = []
    batch_bytes = 0
    cap = cache.max_bytes
    limit = IMPORT_BATCH_BYTES if cap is None else min(IMPORT_BATCH_BYTES, cap)

    def skip(path: Path, reason: str) -> None:
        report.skipped += 1
        note(f"skipped {path}: {reason}")

    def store() -> None:
        nonlocal batch_bytes
        try:
            cache.put_entries(batch)
            stored.extend(key for key, _, _ in batch)
        except BlobTooLargeError:
            # The file's cap shrank since: what still fits goes in one by one.
            for key, data, created in batch:
                try:
                    cache.put_entries([(key, data, created)])
                    stored.append(key)
                except BlobTooLargeError as error:
                    skip(entry_path(root, key), str(error))
        batch.clear()
        batch_bytes = 0

    evictions = cache.stats().total_evictions  # unchanged at the end: none evicted
    with _tree(root) as tree:
        files, report.skipped = tree.scan(note)
        known = _known(cache)
        for item in progress(files, len(files), "importing"):
            there = known.get(item.entry_key)
            if there == (item.size, item.mtime_ms):
                report.unchanged += 1
                continue
            if isinstance(there, str):
                # A file named by such an entry's key is not vyre's (vyre never writes
                # one): replaced, the entry would lose its key columns or its name, and
                # lookups would serve the folder's bytes.
                skip(
                    item.path,
                    f"the cache holds a {there} entry under this key, which an "
                    "import never replaces",
                )
                continue
            # Compressed, a file over the cap may still fit: the store decides then.
            if cap is not None and item.size > cap and cache.compression == "off":
                skip(item.path, f"{item.size} bytes, over the cache's size cap of {cap} bytes")
                continue
            read = tree.read(item)
            if isinstance(read, str):
                skip(item.path, read)
                continue
            data, mtime_ms = read
            if batch and (batch_bytes + len(data) > limit or len(batch) >= IMPORT_BATCH_ENTRIES):
                store()
            batch.append((item.entry_key, data, mtime_ms))
            batch_bytes += len(data)
        if batch:
            store()
    report.imported = len(stored)
    if stored:
        cache.flush()
        if cache.stats().total_evictions != evictions:
            present = sum(1 for _ in cache.iter_entries(entry_keys=stored, page=LIST_PAGE))
            report.evicted = report.imported - present
    return report


def _write_at(folder: int, name: str, data: bytes, mtime_ms: int) -> None:
    """Write `name` in the folder open as `folder` as vyre does: a temporary file beside
    it (never through a link), synced, given its mtime, then renamed over `name`."""
    temporary = f"{name}.tmp.{os.getpid()}.{next(_counter)}"
    fd = os.open(temporary, _WRITE_FLAGS, 0o666, dir_fd=folder)
    try:
        with open(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
        os.fsync(fd)
        ns = mtime_ms * 1_000_000
        os.utime(fd, ns=(ns, ns))
        os.close(fd)
        fd = -1
        os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
        raise


def write_atomic(path: Path, data: bytes, mtime_ms: int) -> None:
    """Write `path` as vyre does: a temporary file beside it, synced, then renamed over it.

    The file gets `mtime_ms` as its modification time before it appears; neither the
    temporary file nor `path` is written through a symbolic link.
    """
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        _write_at(folder, path.name, data, mtime_ms)
    finally:
        os.close(folder)


def _sync(fd: int) -> None:
    """Make renames in a folder durable (where the platform can sync folders)."""
    with suppress(OSError):
        os.fsync(fd)


def _syncfs_call() -> Callable[[int], int] | None:
    """Linux's syncfs(2) (every file of one file system to storage, in one call), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_SYNCFS = _syncfs_call()


def _syncfs(fd: int) -> None:
    """Write every file of the file system holding `fd` to storage; raise OSError."""
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncing the export folder: {os.strerror(code)}")


class _Batch:
    """Files of one export batch: written to temporary names, synced, then renamed.

    With syncfs (Linux) the batch's files are written without a sync each, the file
    system is synced once, then every file is renamed into place; elsewhere each file is
    synced before it is closed, as `write_atomic` does. Either way a name `<hex>.bin`
    only ever points at bytes already on storage: a crash leaves whole entry files, or
    temporary files (`<hex>.bin.tmp.<pid>.<n>`, which vyre and `import_dir` ignore).
    """

    def __init__(self, top: int) -> None:
        self._top = top
        self._pending: list[tuple[int, str, str]] = []  # (folder, temporary, name)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, folder: int, name: str, data: bytes, mtime_ms: int) -> None:
        temporary = f"{name}.tmp.{os.getpid()}.{next(_counter)}"
        # Noted first: an interrupt landing as the file is made (it may show as the call
        # raising) must not leave it behind; a name of this process's, it is ours to remove.
        self._pending.append((folder, temporary, name))
        fd = os.open(temporary, _WRITE_FLAGS, 0o666, dir_fd=folder)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if _SYNCFS is None:
                os.fsync(fd)
            ns = mtime_ms * 1_000_000
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)
        self.bytes += len(data)

    def commit(self) -> None:
        """Sync the batch's files, then rename each into place."""
        if not self._pending:
            return
        if _SYNCFS is not None:
            _syncfs(self._top)
        while self._pending:
            folder, temporary, name = self._pending[-1]
            os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
            self._pending.pop()
        self.bytes = 0

    def discard(self) -> None:
        """Remove the temporary files not renamed (after an error)."""
        for folder, temporary, _ in self._pending:
            with suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
        self._pending.clear()
        self.bytes = 0


@dataclass
class ExportReport:
    """What `export_dir` did: `damaged` lists hex keys whose bytes failed their checksum;
    `refused` the folders of the tree that are links (or not folders), with the number
    of entries not written into them."""

    exported: int = 0
    #: entry files not written because a folder stands at their path
    blocked: list[str] = field(default_factory=list)
    keyed: int = 0
    #: named entries (`put_named`, `put_group`: Triton's kernels), which vyre never asks for
    named: int = 0
    damaged: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)


def export_dir(
    cache: PipelineCache, root: Path, *, progress: Progress = _no_progress
) -> ExportReport:
    """Write every entry a vyre build can look up (those without key columns) under `root`.

    Lists the cache page by page and reads with `peek_entry`, so memory stays bounded and
    nothing in the cache changes (no hits, no access times). Bytes that fail their
    checksum are not written; they are listed in the report. Entries stored by
    `PipelineCacheKey` and named entries (`put_named`, `put_group`) are counted, not
    written: vyre's directory cache never looks them up (their keys come from other
    hashes), and imported back they would lose their names. A folder of the tree that
    is a symbolic link (or not a folder) is refused: nothing is written into it. Raises
    OSError if `root` cannot be written.

    Files are written in batches (`EXPORT_BATCH_ENTRIES`, `EXPORT_BATCH_BYTES`), each
    file to a temporary name first; a batch is synced to storage together, then renamed
    into place, and every folder is synced once at the end (see `_Batch`). A crash at any
    point leaves only whole entry files and temporary files; after a crash before the
    end, some renames may not have reached storage, so entries may be missing (export
    again), never cut short.
    """
    report = ExportReport()
    # By row id: no sort, and reads meanwhile do not move an entry (as by access time).
    rows = cache.iter_keys(page=LIST_PAGE)
    root.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        stack.callback(os.close, top)
        folders: dict[str, int | None] = {}
        batch = _Batch(top)

        def folder_of(name: str) -> int | None:
            if name not in folders:
                with suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=top)
                try:
                    fd = os.open(name, _FOLDER_FLAGS, dir_fd=top)
                except OSError as error:
                    if error.errno in _OUT_OF_DESCRIPTORS:
                        raise CacheError(
                            f"cannot export to {root}: {_why(error)}; an export keeps each "
                            "of up to 256 folders open: raise this process's limit of open "
                            "files (`ulimit -n`, 300 or more) and export again"
                        ) from error
                    if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    folders[name] = None  # a link or a file: refused
                else:
                    stack.callback(os.close, fd)
                    folders[name] = fd
            return folders[name]

        try:
            for row in progress(rows, len(cache), "exporting"):
                if row.kind == "keyed":
                    report.keyed += 1
                    continue
                if row.kind == "named":
                    report.named += 1
                    continue
                key = row.entry_key
                try:
                    data = cache.peek_entry(key)
                except CorruptCacheError:
                    report.damaged.append(key)
                    continue
                if data is None:
                    continue  # deleted since the page was listed
                folder = folder_of(key[:2])
                if folder is None:
                    where = str(root / key[:2])
                    report.refused[where] = report.refused.get(where, 0) + 1
                    continue
                if _is_folder(f"{key}.bin", folder):
                    report.blocked.append(str(root / key[:2] / f"{key}.bin"))
                    continue
                batch.add(folder, f"{key}.bin", data, row.created_ms)
                report.exported += 1
                if len(batch) >= EXPORT_BATCH_ENTRIES or batch.bytes >= EXPORT_BATCH_BYTES:
                    batch.commit()
            batch.commit()
        except OSError as error:
            batch.discard()
            raise _named_in(error, root) from error
        except BaseException:
            batch.discard()
            raise
        for fd in folders.values():
            if fd is not None:
                _sync(fd)
        _sync(top)
    return report


def _is_folder(name: str, folder: int) -> bool:
    """Whether `name` in the folder open as `folder` is a folder (not through a link)."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _named_in(error: OSError, root: Path) -> OSError:
    """`error` of a call relative to the tree's folders, naming its file under `root` (an
    entry folder is named by its first two characters: `ab`, `ab/abcd….bin.tmp.1.2`)."""
    name = error.filename
    if not isinstance(name, str) or os.path.isabs(name):
        return error
    path = root / name if len(name) <= 2 else root / name[:2] / name
    return type(error)(error.errno, error.strerror, str(path))


def read_bounded(fd: int) -> bytes:
    """At most MAX_BLOB_BYTES + 1 bytes from `fd`: enough to tell that it is too large.

    Raises OSError as os.read does.
    """
    chunks = []
    left = MAX_BLOB_BYTES + 1
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
