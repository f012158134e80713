"""The cache file on disk: where it is, what may be done to it, its side files, healing.

A damaged cache file is moved aside, never deleted, and replaced by a new one;
only a file that is recognisably a damaged cache is moved (see `is_damaged_cache`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Final

import apsw

from .config import expand_home

try:
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]
from .errors import CacheBusyError, CacheError, CorruptCacheError, NotACacheError

__all__ = [
    "HEAD_BYTES",
    "KEEP_CORRUPT_COPIES",
    "RECHECK_INTERVAL_S",
    "SIDE_FILES",
    "CacheFile",
    "FileWatch",
    "cache_part",
    "has_side_files",
    "header_damage",
    "inode",
    "is_not_sqlite",
    "looks_like_damaged_pages",
    "make_file_if_missing",
    "move_aside",
    "needs_check_marker",
    "network_file_system",
    "os_name",
    "read_head",
    "remove_foreign_side_files",
    "remove_own_side_files",
    "resolve",
    "sqlite_name",
]

log = logging.getLogger("vyre_sqlcache")

#: Files SQLite keeps beside a database in WAL mode.
SIDE_FILES = ("-wal", "-shm")
#: Damaged files moved aside are kept for a post-mortem, the newest few only.
KEEP_CORRUPT_COPIES = 3
#: How long a reader that cannot write the cache's folder goes without looking whether
#: the owner changed the file (it also looks after every miss); see `FileWatch`.
RECHECK_INTERVAL_S = 0.1

_MAGIC = b"SQLite format 3\0"


def resolve(path: str | Path) -> Path:
    """The one absolute name of a cache file: `~` expanded, every symbolic link resolved.

    Resolving links (in the folders and the file itself) gives every name of the file
    the same -wal and -shm, which SQLite names after the path it is given; an absolute
    path keeps threads opened after an `os.chdir` on the same file. Raises CacheError
    for a relative path once the current folder is deleted.
    """
    try:
        return Path(os.path.realpath(expand_home(path)))
    except FileNotFoundError as error:  # os.getcwd() of a deleted folder
        raise CacheError(
            f"cannot resolve the relative path {path}: the current folder no longer exists; "
            "give an absolute path, or change to an existing folder first"
        ) from error


def sqlite_name(path: str | Path) -> str:
    """The name to give SQLite for `path`: the str whose UTF-8 is the path's bytes on
    disk. apsw passes SQLite UTF-8, and Python makes the bytes with the locale's encoding
    (in a C locale without UTF-8 mode, ASCII with escapes): `str(path)` would name
    another file, or none. Raises CacheError for a path whose bytes are not UTF-8."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CacheError(
            f"the path of cache file {os.fsdecode(raw)!r} holds bytes that are not UTF-8, "
            "and SQLite opens UTF-8 paths only; choose another path or rename the folder"
        ) from error


def os_name(name: str) -> str:
    """The path for `os` functions of a file SQLite names `name` (`sqlite_name` undone)."""
    return os.fsdecode(name.encode("utf-8", "surrogateescape"))


#: How many bytes of a file `read_head` reads: SQLite's header.
HEAD_BYTES = 100
#: How long `read_head` waits for a writer of the file's first page.
HEAD_WAIT_S = 10.0


def read_head(path: Path) -> bytes | None:
    """The first `HEAD_BYTES` of the file at `path` (fewer if it is shorter; b"" if it is
    missing or unreadable), read under SQLite's shared lock; None if a writer held the
    file for `HEAD_WAIT_S` (its first page may be half written).

    Read through SQLite's own file layer, not `open()`: closing any descriptor of a file
    drops every POSIX lock this process holds on it, its SQLite connections' included
    ("How To Corrupt An SQLite Database File", 2.2); SQLite keeps the descriptor until
    they are released. The lock: SQLite makes a new file by extending it with zeros,
    then writing the first page, under its exclusive lock; read between the two, a new
    cache looks like a damaged one.
    """
    deadline = time.monotonic() + HEAD_WAIT_S
    pause = 0.001
    while True:
        with _looking:
            head = _read_locked(path)
        if head is not None or time.monotonic() > deadline:
            return head
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _read_locked(path: Path) -> bytes | None:
    """`read_head`'s one try: the bytes, or None while a writer holds the file."""
    flags = [apsw.SQLITE_OPEN_MAIN_DB | apsw.SQLITE_OPEN_READONLY, 0]
    try:
        file = apsw.VFSFile("", sqlite_name(path), flags)
    except apsw.Error:
        return b""
    try:
        locked = _lock_shared(file)
        if locked is None:
            return None
        try:
            return bytes(file.xRead(min(HEAD_BYTES, file.xFileSize()), 0))
        finally:
            if locked:
                file.xUnlock(apsw.SQLITE_LOCK_NONE)
    except apsw.Error:
        return b""
    finally:
        file.xClose()


def _lock_shared(file: apsw.VFSFile) -> bool | None:
    """Take SQLite's shared lock on `file`: True once taken, False where the file system
    has no locks, None while a writer holds it."""
    try:
        file.xLock(apsw.SQLITE_LOCK_SHARED)
        return True
    except apsw.BusyError:
        return None
    except apsw.Error:
        return False


# Held while `read_head` has a file open, and taken before every fork. SQLite keeps
# one record of a file's locks per process: a child forked while a thread held the
# shared lock would inherit the record and not the lock, and its own connections would
# believe they hold a lock the kernel never gave them. (The connection pools close
# their connections before a fork for the same reason; `_connections` imports this
# module first, so this hook runs after theirs.)
_looking = threading.Lock()


def _looking_after_fork_in_child() -> None:
    global _looking
    _looking = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=lambda: _looking.acquire(),
        after_in_parent=lambda: _looking.release(),
        after_in_child=_looking_after_fork_in_child,
    )


def is_not_sqlite(head: bytes | None) -> bool:
    """Whether a file's first bytes (`read_head`) cannot be a SQLite database.

    Looked at before SQLite opens the file, because SQLite removes the -wal file of a
    database it cannot read, and a file moved aside should keep it.
    """
    if not head:
        return False
    return head[: len(_MAGIC)] != _MAGIC[: len(head)]


#: The first bytes of common binary documents: such a file at a path the caller chose
#: is the user's, never a damaged cache (a damaged cache's first page is zeros, or a
#: SQLite header with a few bytes changed, or garbage).
_DOCUMENT_MAGIC = (
    b"\x89PNG",  # PNG
    b"\xff\xd8\xff",  # JPEG
    b"GIF8",
    b"%PDF",
    b"PK\x03\x04",  # zip, and the formats made of one: docx, xlsx, jar, apk, wheels
    b"PK\x05\x06",  # an empty zip
    b"\x1f\x8b",  # gzip
    b"BZh",
    b"\xfd7zXZ\x00",  # xz
    b"7z\xbc\xaf\x27\x1c",
    b"\x28\xb5\x2f\xfd",  # zstd
    b"Rar!",
    b"\x7fELF",
    b"MZ",  # Windows executables
    b"\xca\xfe\xba\xbe",  # Java classes, Mach-O universal binaries
    b"\xcf\xfa\xed\xfe",  # Mach-O
    b"\xd0\xcf\x11\xe0",  # old Office documents
    b"RIFF",  # wav, avi, webp
    b"OggS",
    b"fLaC",
    b"ID3",  # mp3
    b"\x93NUMPY",
    b"PAR1",  # Parquet
    b"\x89HDF",
    b"QFI\xfb",  # qcow2 disk images
    b"\x00asm",  # WebAssembly
)
#: Name endings of documents, disk images and archives: a file so named is the user's
#: whatever its bytes (a disk image may well start with zeros).
# fmt: off
_DOCUMENT_SUFFIXES = frozenset((
    ".txt", ".md", ".rst", ".csv", ".json", ".xml", ".html", ".pdf", ".py", ".c", ".h", ".rs",
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg",
    ".mp3", ".wav", ".flac", ".ogg", ".mp4", ".mkv", ".mov", ".avi",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".jar", ".whl",
    ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods", ".odp",
    ".iso", ".img", ".dmg", ".qcow2", ".vmdk", ".vdi", ".exe", ".dll", ".so", ".dylib",
    ".npy", ".npz", ".pkl", ".pt", ".pth", ".onnx", ".safetensors", ".h5", ".hdf5", ".parquet",
))
# fmt: on


def looks_like_damaged_pages(path: Path, head: bytes | None) -> bool:
    """Whether a file that does not start as SQLite still looks like a damaged cache's
    pages (`head`: its first bytes, `read_head`), so that it may be moved aside from a
    path the caller chose:

    - never a file whose name ends like a document's (`.txt`, `.png`, `.zip`, `.img`...),
      nor one that starts with a known document's magic bytes (PNG, zip, gzip, ELF...);
    - a zeroed header (what a crash or a lost write leaves);
    - a whole number of 512-byte pages whose first 100 bytes are not text (a damaged
      header, or a page of garbage over it). A text document is never moved.

    A binary file of another kind, unnamed and unknown, whose size is a multiple of 512
    is taken for damaged pages: it is moved aside (kept, renamed), never deleted.
    """
    if path.suffix.lower() in _DOCUMENT_SUFFIXES or head is None or len(head) < HEAD_BYTES:
        return False
    try:
        size = os.stat(path).st_size
    except OSError:
        return False
    if not any(head):
        return True
    if head.startswith(_DOCUMENT_MAGIC):
        return False
    return size % 512 == 0 and not _is_text(head)


def _is_text(head: bytes) -> bool:
    """Whether bytes read as text: UTF-8 without control characters other than spacing (a
    b-tree page copied over the header decodes as UTF-8 but is full of NULs and controls)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # The 100 bytes may end inside a character.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\n\r\f" for ch in text)


#: Network file systems by their statfs magic number (linux/magic.h). FUSE is left out:
#: rootless containers run their local files through it.
_NETWORK_FILE_SYSTEMS = {
    0x6969: "NFS",
    0x517B: "SMB",
    0xFF534D42: "CIFS",
    0xFE534D42: "SMB2",
    0x5346414F: "AFS",
    0x6B414653: "AFS",
    0x00C36400: "Ceph",
    0x0BD00BD0: "Lustre",
    0x47504653: "GPFS",
    0x19830326: "BeeGFS",
    0x01021997: "9P",
    0x73757245: "Coda",
}


def network_file_system(folder: Path) -> str | None:
    """The name of the network file system `folder` is on; None for a local one, or where
    it cannot be told (only Linux's statfs is asked)."""
    magic = _file_system_magic(folder)
    return None if magic is None else _NETWORK_FILE_SYSTEMS.get(magic)


def _file_system_magic(folder: Path) -> int | None:
    """statfs's f_type for `folder` (Linux), or None."""
    libc = _libc()
    if libc is None:
        return None
    answer = ctypes.create_string_buffer(256)  # struct statfs, f_type its first field
    if libc.statfs(os.fsencode(folder), answer) != 0:
        return None
    return int(struct.unpack_from("l", answer)[0]) & 0xFFFFFFFF


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def cache_part(target: Path, cache: Path) -> str | None:
    """Which file of the cache at `cache` `target` names, by any path (a link, another
    mount of the folder): "the cache itself", "the cache's own -wal file", ...; or None."""
    resolved = target.resolve()
    for suffix in ("", *SIDE_FILES, "-journal"):
        part = Path(f"{cache}{suffix}")
        try:
            # Resolved both: a side file not made yet, named through a linked folder.
            same = resolved == part.resolve() or os.path.samefile(target, part)
        except OSError:  # one of them is not there
            same = False
        if same:
            return f"the cache's own {suffix} file" if suffix else "the cache itself"
    return None


def has_side_files(path: Path) -> bool:
    """Whether a -wal or -shm sits beside the file."""
    return any(Path(str(path) + side).exists() for side in SIDE_FILES)


def header_damage(header: bytes | None) -> str | None:
    """What is wrong with the fields of a SQLite header (`read_head`) that SQLite would not
    refuse at open but that leave the file unwritable or unreadable later; None if nothing.

    (A write version above 2 makes SQLite open the file read-only; a schema format
    above 4 fails every statement with 'unsupported file format'.)
    """
    if header is None or len(header) < HEAD_BYTES or not header.startswith(_MAGIC):
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

    Only the newest `KEEP_CORRUPT_COPIES` copies are kept. Raises CorruptCacheError if
    the main file cannot be renamed (another user's file in a shared folder, say).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, target)
    except OSError as error:
        raise CorruptCacheError(
            f"{path} {reason}, and this process cannot move it aside ({error}); ask the "
            "file's owner to open it (it then heals), or delete it, or use another path"
        ) from error
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


#: The longest addition to the cache file's name among the files the cache makes beside
#: it: a damaged copy's log, `<name>.corrupt-20261207T094800.123456Z-wal` (a rebuild's
#: `<name>.rebuild-<ns>-journal` is as long; `.needs-check` and `-wal` are shorter).
LONGEST_SUFFIX_BYTES: Final = len(".corrupt-20261207T094800.123456Z-wal")


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that `folder` (or its nearest existing parent)
    allows: 255 where the file system does not say."""
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            break
    return 255


@functools.cache
def longest_path() -> int:
    """The longest database path, in bytes, that SQLite's default VFS opens: its
    `mxPathname` less the 8 bytes SQLite keeps for a side file's suffix (pager.c)."""
    default = apsw.vfs_details()[0]  # the list starts with the default VFS
    return int(default["mxPathname"]) - 8


def _check_side_files(sides: list[Path]) -> None:
    """Raise CacheError for a -wal or -shm that SQLite would write through into something
    else: a link (symbolic or hard) to another file, or anything but a regular file."""
    for side in sides:
        try:
            info = os.lstat(side)
        except OSError:
            continue
        what = None
        if stat.S_ISLNK(info.st_mode):
            what = "a symbolic link"
        elif not stat.S_ISREG(info.st_mode):
            what = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
        elif info.st_nlink > 1:
            what = f"a file with {info.st_nlink} hard links"
        if what is not None:
            raise CacheError(
                f"{side} is {what}, where SQLite keeps the cache's "
                f"{'log' if side.name.endswith('-wal') else 'shared memory'} and would "
                "write into it; remove it (it is not the cache's) and open again"
            )


def largest_file() -> int | None:
    """The largest file this process may write (RLIMIT_FSIZE, `ulimit -f`); None: no limit.

    Past it a write fails with EFBIG, which SQLite reports as an I/O error, not as a
    full disk: the cache treats the limit as the size of its disk.
    """
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def no_free_inodes(folder: Path) -> bool:
    """Whether the file system of `folder` can hold no new file (no free inodes; False
    where it does not count them)."""
    try:
        look = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return look.f_files > 0 and look.f_favail == 0


def file_size(path: Path) -> int:
    """`path`'s size in bytes (0 where it cannot be looked at)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class CacheFile:
    """A cache file's resolved path and how it can be opened.

    `writable`: the process may write the file and its side files. `immutable`: the
    file has no write-ahead log to read and this process cannot create the -shm SQLite
    needs (its folder is not writable), so SQLite reads it without -shm and without
    locks, trusting it never to change. `watched`: such a reader on media that can
    change (not mounted read-only): the owner may rewrite the file under it, so it
    must watch the file (`FileWatch`) and must not map it into memory (a file that
    shrinks under a map kills the process with SIGBUS). `why`: what keeps a file that
    permissions would let this process write from being written (a file size limit, a
    file system out of inodes), for messages.
    """

    path: Path
    writable: bool
    immutable: bool
    watched: bool = False
    why: str | None = None

    @property
    def mappable(self) -> bool:
        """Whether connections may read the file through a memory map."""
        return not (self.immutable and self.watched)

    @classmethod
    def locate(cls, path: str | Path, *, create: bool) -> CacheFile:
        """Resolve `path` and find out how it may be opened.

        Raises CacheError for a folder, a FIFO, socket or device, a file with several
        hard links, a missing file when `create` is false, a folder that cannot be
        made, or a path SQLite cannot open (too long, or not UTF-8).
        """
        resolved = resolve(path)
        sqlite_name(resolved)  # (raises for bytes that are not UTF-8)
        longest = longest_path()
        length = len(os.fsencode(resolved))
        if length > longest:
            raise CacheError(
                f"the path of cache file {resolved} is {length} bytes long, and SQLite opens "
                f"paths of at most {longest} bytes; choose a file in a shallower folder (a "
                "symbolic link does not help: the path is resolved)"
            )
        name = len(os.fsencode(resolved.name))
        longest_name = name_max(resolved.parent) - LONGEST_SUFFIX_BYTES
        if name > longest_name:
            raise CacheError(
                f"the name of cache file {resolved} is {name} bytes long, and its folder "
                f"allows names of at most {longest_name} bytes for it (files the cache makes "
                f"beside it add up to {LONGEST_SUFFIX_BYTES} bytes, such as "
                "'.needs-check' or '-wal'); choose a shorter name"
            )
        try:
            info = os.stat(resolved)
        except (FileNotFoundError, NotADirectoryError):
            info = None  # (a file where a folder on the way should be: said below)
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
            except (FileExistsError, NotADirectoryError) as error:
                blocking = next(
                    (f for f in reversed(resolved.parents) if f.exists() and not f.is_dir()),
                    resolved.parent,
                )
                raise CacheError(
                    f"cannot create the folder of cache file {resolved}: {blocking} is a "
                    "file, not a folder; choose another path, or move that file away"
                ) from error
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
        _check_side_files(sides)
        folder_writable = os.access(resolved.parent, os.W_OK)
        why = None
        if not all(side.exists() for side in sides) and no_free_inodes(resolved.parent):
            # SQLite said only "unable to open database file", to readers too.
            folder_writable = False
            why = "its file system has no free inodes for its -wal and -shm (`df -i`)"
        writable = os.access(resolved, os.W_OK) and (
            folder_writable or all(side.exists() for side in sides)
        )
        limit = largest_file()
        largest = max(info.st_size, file_size(sides[0]))
        if writable and limit is not None and largest > limit:
            # Pages past the limit can never be written, nor the log checkpointed: every
            # write failed once the log had filled, and eviction could not help.
            writable = False
            why = (
                f"it is {largest} bytes, more than the largest file this process may "
                f"write (`ulimit -f`: {limit} bytes)"
            )
        if writable or folder_writable:
            return cls(resolved, writable=writable, immutable=False, why=why)
        # A reader that cannot create the -wal and -shm: with both there (the owner has
        # the file open), SQLite reads through them and sees every change; without, only
        # an immutable open reads the file, and it must be watched unless the medium
        # itself is read-only.
        wal = sides[0]
        no_log = not wal.exists() or wal.stat().st_size == 0
        readonly_medium = _medium_is_readonly(resolved)
        immutable = no_log and (readonly_medium or not sides[1].exists())
        return cls(
            resolved,
            writable=False,
            immutable=immutable,
            watched=not readonly_medium,
            why=why,
        )

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


def inode(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of the file at `path` now; None if there is none (or it
    cannot be looked at). A writer compares it with the file it has open: the path
    names another file once the cache was deleted or replaced by a rename."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


# SQLite's unix VFS locks bytes 120-127 of the -shm (its 8 WAL locks) and byte 128 (the
# "dead man switch" every connection holds while it has the -shm open): os_unix.c.
_SHM_LOCKS = (120, 9)
_FLOCK = "hhqqi4x"  # Linux's struct flock


def _shm_in_use(shm: Path) -> bool | None:
    """Whether a process holds one of SQLite's locks on the -shm (so uses it); None where
    that cannot be told (not Linux, or the file cannot be opened).

    Opening and closing a descriptor of the file drops every POSIX lock this process
    holds on it: the caller makes sure no connection of this process has it open.
    """
    if sys.platform != "linux" or struct.calcsize("P") != 8:
        return None  # `_FLOCK` is the layout of 64-bit Linux only
    import fcntl

    try:
        fd = os.open(shm, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        asked = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, *_SHM_LOCKS, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, asked)
        return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
    except OSError:
        return None
    finally:
        os.close(fd)


def _unused_empty_log(path: Path) -> list[Path] | None:
    """The -wal and -shm of `path` (those there) if they can go: the log holds nothing and
    no process uses the -shm; None if either is not so (or cannot be told)."""
    sides = [Path(f"{path}{side}") for side in SIDE_FILES]
    present = []
    for side in sides:
        try:
            info = os.lstat(side)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or (side.name.endswith("-wal") and info.st_size):
            return None
        present.append(side)
    shm = sides[1]
    if shm in present and _shm_in_use(shm) is not False:
        return None
    return present


def remove_foreign_side_files(path: Path) -> None:
    """Remove a -wal and -shm of `path` that this process may not write, where nothing
    depends on them (the log is empty, no process has them open); log a warning naming
    them where they stay.

    SQLite makes them as the user who first opens the file, a reader included (another
    user's read-only open, in a shared folder): the writer then opens them read-only and
    every write fails until they are gone. The caller makes sure no connection of this
    process has the file open.
    """
    sides = [Path(f"{path}{side}") for side in SIDE_FILES]
    foreign = [s for s in sides if s.exists() and not os.access(s, os.W_OK)]
    if not foreign:
        return
    names = " and ".join(str(s) for s in foreign)
    removable = _unused_empty_log(path)
    if removable is not None:
        try:
            for side in removable:
                side.unlink(missing_ok=True)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM):
                raise CacheError(f"cannot remove {names}: {error}") from error
        else:
            log.warning(
                "vyre-sqlcache: removed %s: unused and empty, made by another user (a "
                "read-only open), and not writable by this one",
                names,
            )
            return
    owners = set()
    for side in foreign:
        with contextlib.suppress(OSError):
            owners.add(side.stat().st_uid)
    log.warning(
        "vyre-sqlcache: %s belong to user id %s and this process may not write them, so "
        "writes to the cache will fail; %s. Remove them (or have that user, or an "
        "administrator, remove them) while nobody uses the cache",
        names,
        ", ".join(map(str, sorted(owners))) or "?",
        "they are in use or hold writes"
        if removable is None
        else "the folder does not let this user remove them",
    )


def remove_own_side_files(path: Path) -> None:
    """After a read-only open of another user's file: remove the -wal and -shm this
    process's user made, if nothing depends on them, so that they do not leave the
    file's owner unable to write (see `remove_foreign_side_files`). The caller makes
    sure no connection of this process has the file open."""
    try:
        if os.stat(path).st_uid == os.geteuid():
            return  # the owner's own side files: its writers can use them
    except (OSError, AttributeError):
        return
    sides = [Path(f"{path}{side}") for side in SIDE_FILES]
    try:
        if not all(os.lstat(side).st_uid == os.geteuid() for side in sides if side.exists()):
            return
    except OSError:
        return
    for side in _unused_empty_log(path) or []:
        with contextlib.suppress(OSError):
            side.unlink()


def make_file_if_missing(path: Path) -> None:
    """Make an empty cache file at `path` (SQLite fills it) if there is none, first
    removing a -wal and -shm left at the path by a deleted file, under an exclusive lock
    on the folder. Raises CacheError if a side file cannot be removed or the file cannot
    be made, CacheBusyError if another process held the lock for `MAKE_WAIT_S`.

    A process that found no file, then paused (preempted) before removing the side
    files, would otherwise remove those of a file that another process made meanwhile:
    the two would each write to a log of their own, and one's flushed writes be lost.
    """
    if inode(path) is not None:
        return
    with _folder_locked(path.parent):
        if inode(path) is not None:
            return  # made by another process while this one waited
        for side in SIDE_FILES:
            try:
                Path(f"{path}{side}").unlink()
            except (FileNotFoundError, NotADirectoryError):
                continue  # (its folder is gone, or a file now: nothing there to pair with)
            except OSError as error:
                raise CacheError(
                    f"{path} was deleted while in use, and its {side} file cannot be "
                    f"removed: {error}; remove it to go on"
                ) from error
            log.info("vyre-sqlcache: removed %s%s, left by a deleted cache file", path, side)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC | _NOFOLLOW
        try:
            os.close(os.open(path, flags, 0o644))
        except FileExistsError:
            pass  # made by a process that takes no lock (an older version, a sqlite3 shell)
        except OSError as error:
            raise CacheError(
                f"cannot create cache file {path}: {error}; choose a writable path"
            ) from error


#: How long making a missing cache file waits for another process making it.
MAKE_WAIT_S = 10.0
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive `flock` of `folder` (none where the folder cannot be opened, or
    without `fcntl`), held with `_looking`: a child forked meanwhile would inherit the
    descriptor, and with it the lock, for its whole life. Raises CacheBusyError after
    `MAKE_WAIT_S`."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | _CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield  # (a folder this user may write but not list: no lock, as before)
        return
    try:
        deadline = time.monotonic() + MAKE_WAIT_S
        while True:
            with _looking:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                except OSError:
                    yield  # a file system without flock: no lock, as before
                    return
                else:
                    try:
                        yield
                    finally:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    return
            if time.monotonic() > deadline:
                raise CacheBusyError(
                    f"another process has held a lock on {folder} for {MAKE_WAIT_S:g} s "
                    "while making a cache file there; retry later, or end that process"
                )
            from ._connections import stop_if_interrupted  # (it imports this module)

            stop_if_interrupted()  # nothing is done yet: Ctrl-C need not wait for the lock
            time.sleep(0.005)
    finally:
        os.close(fd)


def _state(file: CacheFile) -> tuple[object, ...]:
    """What a watched reader compares: which side files exist and, for an immutable
    open, the file's identity."""
    sides = tuple(os.path.exists(str(file.path) + side) for side in SIDE_FILES)
    return (file.identity() if file.immutable else None, *sides)


class FileWatch:
    """Keeps a reader that cannot write the cache's folder reading the file as it is now.

    Such a reader cannot create the -shm SQLite needs to read a file in WAL mode.
    While the owner has the file open, its -wal and -shm exist and the reader opens
    it normally (a read-only -shm: SQLite sees every change, and the reader's lock
    keeps the side files in place). With no -shm, the only way to read the file is
    `immutable`: SQLite then trusts it never to change, keeps its pages and its size,
    and would miss every entry ('malformed') once the owner compacts or rewrites it.

    So such a reader watches the file: at most every `RECHECK_INTERVAL_S`, and after
    each miss (`check(now=True)`), it compares the side files' presence and, while
    immutable, the file's identity (device, inode, size, modification time). When they
    changed it locates the file again (which may now open normally, or immutable
    again) and counts a new generation; the cache closes a thread's connections opened
    for an older generation before that thread's next read. A reader on read-only
    media, or one that can write the folder, is not watched (`active` is False).
    """

    def __init__(self, file: CacheFile) -> None:
        self.file = file
        self.generation = 0
        #: Whether this reader is watched at all; fixed for the cache object's life.
        self.active = file.watched
        self._seen = _state(file) if self.active else ()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def check(self, *, now: bool = False) -> int:
        """The generation to read with, after looking at the file if it is time to (or
        `now`); a new one (with `file` located again) when the file changed."""
        if not self.active:
            return self.generation
        moment = time.monotonic()
        if not now and moment - self._checked < RECHECK_INTERVAL_S:
            return self.generation
        self._checked = moment
        with self._lock:
            if _state(self.file) == self._seen:
                return self.generation
            try:
                located = CacheFile.locate(self.file.path, create=False)
            except CacheError as error:
                # Gone for now (the owner is replacing it): read on, and look again.
                log.debug("vyre-sqlcache: looking at %s again: %s", self.file.path, error)
                return self.generation
            log.debug("vyre-sqlcache: %s changed under a reader; reopening", self.file.path)
            # The file first, the generation second: a thread that sees the new
            # generation opens the new file.
            self.file = located
            self._seen = _state(located)
            self.generation += 1
            return self.generation
