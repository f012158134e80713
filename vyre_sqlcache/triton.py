"""Triton's kernel cache in the vyre-sqlcache file.

Set `TRITON_CACHE_MANAGER=vyre_sqlcache.triton:CacheManager` and Triton keeps every
kernel it compiles as ONE named entry (namespace 'triton') of the cache file that
`PipelineCache.open()` opens (`$VYRE_SQLCACHE_PATH`, else the per-user default):
compressed, checksummed, under the size cap with LRU eviction, and shared by every
process and tier of that cache.

Triton reads the files of a kernel by path, so a hit is written out once per process
into a private folder (see `materialised_folder`), laid out as Triton's own cache
(`<folder>/<kernel hash>/<file>`) so that torch Inductor's static launcher finds its
cubins there when `TRITON_CACHE_DIR` names the folder (`install()` arranges that).

How Triton's calls map onto the cache:

- `get_group(f)`: the group entry `<key>/__grp__<f>`: all of a kernel's files in one
  read, written out together, and remembered for the rest of the process.
- `put(data, f)`: written out at once (Triton needs the path back) and held in memory
  by this manager. Triton's `compile` always ends with `put_group`, which stores the
  held files with the group as one entry in one transaction. A file no group claims
  (the launcher and utility modules of `triton.runtime.build`, the autotuner's
  timings) is stored as an entry of its own, `<key>/<f>`, when the manager is dropped
  (Triton drops it as soon as the call that made it returns) or at exit. Storing each
  `put` at once would write every kernel file twice; waiting for the group alone
  would lose the modules no group claims.
- `get_file(f)`: this process's earlier answer, else the entry `<key>/<f>`, else the
  file `f` of the group `<key>/__grp__<stem of f>.json` (Triton's own layout), else a
  miss. The launcher module Triton asks for once per kernel is read once per process.

A cache that cannot be opened or written (another program's file at the path, a
read-only folder, a full disk) never stops Triton: reads miss, writes are dropped,
and one warning says why. `TRITON_KERNEL_OVERRIDE` and `TRITON_KERNEL_DUMP` managers
stay Triton's own folders (they are for people to read and edit, not caches).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    from triton.runtime.cache import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        CacheManager as _TritonCacheManager,
    )
    from triton.runtime.cache import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        FileCacheManager as _FileCacheManager,
    )
except ImportError as _error:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "vyre_sqlcache.triton needs Triton (3.0 or newer): pip install 'vyre-sqlcache[triton]'"
    ) from _error

from .cache import PipelineCache
from .errors import CacheError

__all__ = ["NAMESPACE", "CacheManager", "cache", "install", "materialised_folder"]

log = logging.getLogger("vyre_sqlcache")

#: The namespace of Triton's entries in the cache file (`ls --namespace triton`).
NAMESPACE = "triton"
#: `TRITON_CACHE_MANAGER`'s value for this manager.
MANAGER = "vyre_sqlcache.triton:CacheManager"
_GROUP_PREFIX = "__grp__"
#: Folders of processes that ended without removing theirs, and half-made folders, are
#: removed by the next process once this old (a folder is locked while it is made).
_STALE_UNLOCKED_S = 60.0
_LOCK_NAME = ".lock"


def _root_name() -> str:
    return f"vyre-sqlcache-triton-{os.getuid()}"


#: A memory-backed folder with less room than this is passed over for the temporary
#: folder: Docker gives a container a /dev/shm of 64 MiB, which a process's kernels fill.
MIN_FREE_MEMORY_BYTES = 128 << 20


def _free_bytes(folder: str) -> int:
    try:
        found = os.statvfs(folder)
    except OSError:
        return 0
    return found.f_bavail * found.f_frsize


def _private_root(*, memory: bool = True) -> Path:
    """The folder that holds every process's folder: in `$XDG_RUNTIME_DIR`, else
    `/dev/shm` (with `MIN_FREE_MEMORY_BYTES` free), else the temporary folder
    (memory-backed where possible: the files are a per-process copy, never the cache;
    not `memory`: the temporary folder). Made 0700 and checked to be ours, so another
    user cannot plant it; if it is not ours, a fresh private temporary folder."""
    disk = tempfile.gettempdir()
    bases = [os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm", disk] if memory else [disk]
    for base in bases:
        if not base or not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
            continue
        if base != disk and _free_bytes(base) < MIN_FREE_MEMORY_BYTES:
            continue
        root = Path(base) / _root_name()
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o700)
        try:
            info = os.lstat(root)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
            return root
        log.warning("vyre-sqlcache: %s is not a private folder of this user; not using it", root)
    return Path(tempfile.mkdtemp(prefix=_root_name() + "-"))


def _held_by_a_live_process(folder: Path) -> bool:
    """Whether a live process holds `folder`'s lock (a process holds its folder's lock
    from creation to exit; the kernel releases it when the process dies)."""
    try:
        fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


def _sweep(root: Path, keep: Path) -> None:
    """Remove the folders of processes that have ended (their lock is free)."""
    try:
        children = list(root.iterdir())
    except OSError:
        return
    for child in children:
        if child == keep or child.is_symlink() or not child.is_dir():
            continue
        lock = child / _LOCK_NAME
        if not lock.exists():
            # A folder being made right now has no lock for a moment: only old ones go.
            with contextlib.suppress(OSError):
                if time.time() - child.stat().st_mtime > _STALE_UNLOCKED_S:
                    shutil.rmtree(child, ignore_errors=True)
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live process's
        try:
            shutil.rmtree(child, ignore_errors=True)
            log.debug("vyre-sqlcache: removed %s, left by a process that ended", child)
        finally:
            os.close(fd)


def _ours(path: str) -> bool:
    """Whether `path` is a live process's materialisation folder (a `TRITON_CACHE_DIR`
    inherited from the process that made it, which this process may share)."""
    folder = Path(path)
    return folder.parent.name == _root_name() and _held_by_a_live_process(folder)


class _Process:
    """This process's state: the cache object, the folder, and what was written out."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cache: PipelineCache | None = None
        self.unavailable: str | None = None  # why the cache could not be opened
        self.folder: Path | None = None
        self.owner_pid = 0  # the pid that made `folder` (only it removes it)
        self.lock_fd: int | None = None
        #: (key, file name) -> path written out in this process; (key, '__grp__' + name)
        #: -> {file name: path}
        self.files: dict[tuple[str, str], str] = {}
        self.groups: dict[tuple[str, str], dict[str, str]] = {}
        self.warned: set[str] = set()
        #: files held by live managers, stored at exit if no group claimed them
        self.orphans: dict[int, weakref.finalize[Any, Any]] = {}
        self.exit_registered = False
        #: folders left for one on disk once theirs was full: (folder, lock, owner pid),
        #: removed at exit (the paths handed out in them stay good until then)
        self.retired: list[tuple[Path, int | None, int]] = []
        self.on_disk = False

    # -- the cache ------------------------------------------------------------------

    def open_cache(self) -> PipelineCache | None:
        """The process-wide cache object, opened on first use (None: it cannot be)."""
        found = self.cache
        if found is not None or self.unavailable is not None:
            return found
        with self.lock:
            if self.cache is None and self.unavailable is None:
                try:
                    self.cache = PipelineCache.open()
                except (CacheError, OSError, ValueError) as error:
                    self.unavailable = str(error)
                    log.warning(
                        "vyre-sqlcache: Triton's kernels are not cached (%s); Triton "
                        "compiles as if the cache were empty",
                        error,
                    )
                self.register_exit()
            return self.cache

    def warn_once(self, what: str, error: BaseException) -> None:
        if what not in self.warned:
            self.warned.add(what)
            log.warning("vyre-sqlcache: %s failed (%s); Triton goes on without it", what, error)

    def register_exit(self) -> None:
        if not self.exit_registered:
            self.exit_registered = True
            atexit.register(self.at_exit)

    def at_exit(self) -> None:
        """Store what no group claimed, close the cache (committing its queue), and
        remove this process's folder."""
        for finalizer in list(self.orphans.values()):
            finalizer()
        if self.cache is not None:
            # A forked child closes the object it shares with its parent too: the library
            # makes either side's close safe.
            with contextlib.suppress(CacheError):
                self.cache.close()
        self.remove_folder()

    # -- the folder -----------------------------------------------------------------

    def folder_now(self) -> Path:
        """This process's materialisation folder, made on first use (see the module)."""
        folder = self.folder
        if folder is not None and folder.is_dir():
            return folder
        with self.lock:
            if self.folder is not None and self.folder.is_dir():
                return self.folder
            inherited = os.environ.get("TRITON_CACHE_DIR")
            if inherited and _ours(inherited):
                self.folder = Path(inherited)  # shared with the process that made it
                return self.folder
            self.folder = self.make_folder()
            if inherited is None or Path(inherited).parent.name == _root_name():
                # Inductor's static launcher looks for cubins under TRITON_CACHE_DIR; a
                # value that named a folder of ours that is gone is ours to replace.
                os.environ["TRITON_CACHE_DIR"] = str(self.folder)
            return self.folder

    def make_folder(self, *, memory: bool = True) -> Path:
        root = _private_root(memory=memory)
        folder = root / f"{os.getpid()}-{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
        fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.lock_fd = fd
        self.owner_pid = os.getpid()
        self.register_exit()
        _sweep(root, keep=folder)
        return folder

    def move_to_disk(self, error: OSError) -> bool:
        """Go on in a new folder in the temporary folder once this one is full (a small
        memory-backed one); whether there was one to go to."""
        with self.lock:
            if self.on_disk:
                return False
            self.on_disk = True
            if self.folder is not None:
                self.retired.append((self.folder, self.lock_fd, self.owner_pid))
                self.lock_fd = None
            old = self.folder
            self.folder = self.make_folder(memory=False)
            if old is not None and os.environ.get("TRITON_CACHE_DIR") == str(old):
                os.environ["TRITON_CACHE_DIR"] = str(self.folder)
            log.warning(
                "vyre-sqlcache: writing Triton's files out to %s failed (%s); they go to %s "
                "from now on",
                old,
                error,
                self.folder,
            )
            return True

    def remove_folder(self) -> None:
        for folder, fd, owner in self.retired:
            if owner == os.getpid():
                shutil.rmtree(folder, ignore_errors=True)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.retired = []
        if self.folder is not None and self.owner_pid == os.getpid():
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self.lock_fd is not None and self.owner_pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None

    def after_fork_in_child(self) -> None:
        """A forked child forgets the parent's folder (the parent removes it at its exit)
        and what it wrote; it shares the folder while the parent lives, through
        `TRITON_CACHE_DIR`, or makes its own. The cache object stays: the library
        reopens its connections in the child."""
        self.lock = threading.RLock()
        for fd in [self.lock_fd, *(fd for _, fd, _ in self.retired)]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # the parent still holds the lock
        self.lock_fd = None
        self.retired = []
        self.on_disk = False
        self.folder = None
        self.files = {}
        self.groups = {}
        self.orphans = {}

    # -- writing files out ----------------------------------------------------------

    def write_out(self, key: str, name: str, data: bytes, *, replace: bool) -> str:
        """Write a file to `<folder>/<key>/<name>` (atomically: a temporary name, then a
        rename); unless `replace`, a file already there is kept (whoever wrote it wrote
        the same bytes: every file under a key is made from that key)."""
        _plain("file name", name)
        remade = False
        while True:
            folder = self.folder_now() / key
            path = folder / name
            temporary: Path | None = None
            try:
                if not replace and path.exists():
                    return str(path)
                folder.mkdir(mode=0o700, exist_ok=True)
                temporary = folder / f".{name[:100]}.tmp.{os.getpid()}.{secrets.token_hex(6)}"
                with open(temporary, "wb") as handle:
                    handle.write(data)
                os.replace(temporary, path)
                return str(path)
            except FileNotFoundError:
                # The folder went away (its owner ended): make our own, once.
                if remade:
                    raise
                remade = True
                with self.lock:
                    self.folder = None
            except OSError as error:
                if temporary is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)  # (a part written into a full folder)
                if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.move_to_disk(error):
                    raise


_PROCESS = _Process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _PROCESS.after_fork_in_child())


def cache() -> PipelineCache | None:
    """The cache object Triton's kernels go to in this process (None: it cannot be opened)."""
    return _PROCESS.open_cache()


def materialised_folder() -> Path:
    """This process's folder of written-out kernel files (made on first use)."""
    return _PROCESS.folder_now()


def install() -> Path:
    """Route Triton's cache, and torch Inductor's static launcher, through vyre-sqlcache:
    sets `TRITON_CACHE_MANAGER` and, unless set already, `TRITON_CACHE_DIR` to this
    process's folder, so compile workers started later share it. Call it before the
    first `torch.compile` or Triton kernel. Returns the folder."""
    os.environ["TRITON_CACHE_MANAGER"] = MANAGER
    return _PROCESS.folder_now()


def _store_orphans(key: str, held: dict[str, bytes]) -> None:
    """Store the files a manager held that no group claimed, each as its own entry."""
    _PROCESS.orphans.pop(id(held), None)
    if not held:
        return
    target = _PROCESS.open_cache()
    if target is None:
        return
    try:
        for name, data in list(held.items()):
            target.put_named(NAMESPACE, f"{key}/{name}", data)
        target.flush()
    except (CacheError, ValueError) as error:
        _PROCESS.warn_once("storing a Triton file", error)
    held.clear()


def _plain(what: str, value: str) -> str:
    """`value` if it can name one file or folder inside another (it is used as one)."""
    if not value or "/" in value or "\x00" in value or value in (".", ".."):
        raise ValueError(
            f"{what} must be a plain file name (no '/' or NUL, not '.' or '..'), got {value!r}"
        )
    return value


def _as_bytes(data: Any) -> bytes:
    # As Triton's FileCacheManager: bytes stay, anything else is written as its text.
    return data if isinstance(data, bytes) else str(data).encode("utf-8")


class CacheManager(_TritonCacheManager):  # type: ignore[misc]
    """Triton's `CacheManager` over the vyre-sqlcache file; see the module docstring.

    Triton makes one per kernel hash: `CacheManager(key, override=False, dump=False)`.
    """

    def __init__(self, key: str, override: bool = False, dump: bool = False) -> None:
        super().__init__(key, override=override, dump=dump)
        self.key = _plain("key", str(key))
        # Debug folders (TRITON_KERNEL_OVERRIDE, TRITON_KERNEL_DUMP) stay Triton's.
        self._delegate = (
            _FileCacheManager(key, override=override, dump=dump) if override or dump else None
        )
        self._held: dict[str, bytes] = {}
        if self._delegate is None:
            finalizer = weakref.finalize(self, _store_orphans, self.key, self._held)
            finalizer.atexit = False  # `_Process.at_exit` runs it, before the cache closes
            _PROCESS.orphans[id(self._held)] = finalizer
            _PROCESS.register_exit()

    def _named(self, name: str) -> str:
        return f"{self.key}/{name}"

    def _guard(self, what: str, run: Callable[[PipelineCache], Any]) -> Any:
        """`run(cache)`, or None when the cache is unavailable or the call fails."""
        target = _PROCESS.open_cache()
        if target is None:
            return None
        try:
            return run(target)
        except (CacheError, ValueError, OSError) as error:
            _PROCESS.warn_once(what, error)
            return None

    def get_file(self, filename: str) -> str | None:
        """The path of the file `filename` of this key, written out, or None."""
        if self._delegate is not None:
            return self._delegate.get_file(filename)  # type: ignore[no-any-return]
        remembered = _PROCESS.files.get((self.key, filename))
        if remembered is not None and os.path.exists(remembered):
            return remembered
        data = self._guard(
            "reading a Triton file", lambda c: c.get_named(NAMESPACE, self._named(filename))
        )
        if data is None:
            stem = filename.rsplit(".", 1)[0]
            group = self.get_group(f"{stem}.json")
            return None if group is None else group.get(filename)
        try:
            path = _PROCESS.write_out(self.key, filename, data, replace=False)
        except (OSError, ValueError) as error:
            # A full disk or a name the file system refuses: a miss, never a failed
            # compile (Triton's own manager writes nothing on a read).
            _PROCESS.warn_once("writing out a Triton file", error)
            return None
        _PROCESS.files[(self.key, filename)] = path
        return path

    def get_group(self, filename: str) -> dict[str, str] | None:
        """The paths of the files of the group `filename` (a kernel), written out, or None."""
        if self._delegate is not None:
            return self._delegate.get_group(filename)  # type: ignore[no-any-return]
        index = (self.key, _GROUP_PREFIX + filename)
        remembered = _PROCESS.groups.get(index)
        if remembered is not None and all(os.path.exists(p) for p in remembered.values()):
            return dict(remembered)
        files = self._guard(
            "reading a Triton kernel",
            lambda c: c.get_group(NAMESPACE, self._named(_GROUP_PREFIX + filename)),
        )
        if files is None:
            return None
        try:
            paths = {
                name: _PROCESS.write_out(self.key, name, data, replace=False)
                for name, data in files.items()
            }
        except (OSError, ValueError) as error:
            _PROCESS.warn_once("writing out a Triton kernel", error)  # a miss, as above
            return None
        _PROCESS.groups[index] = paths
        for name, path in paths.items():
            _PROCESS.files[(self.key, name)] = path
        return dict(paths)

    def put(self, data: Any, filename: str, binary: bool = True) -> str:
        """Write the file out and hold it for `put_group` (see the module); its path."""
        if self._delegate is not None:
            return self._delegate.put(data, filename, binary=binary)  # type: ignore[no-any-return]
        raw = _as_bytes(data)
        path = _PROCESS.write_out(self.key, filename, raw, replace=True)
        self._held[filename] = raw
        _PROCESS.files[(self.key, filename)] = path
        return path

    def _store_group(self, target: PipelineCache, filename: str, files: dict[str, bytes]) -> None:
        target.put_group(NAMESPACE, self._named(_GROUP_PREFIX + filename), files)
        # Flushed: the kernel is in the file when Triton goes on, whatever ends this
        # process next (a compile worker leaves with os._exit, skipping atexit). One
        # synced commit costs milliseconds; the compile before it took far longer.
        target.flush()

    def put_group(self, filename: str, group: Mapping[str, str]) -> str:
        """Store the group's files as ONE entry (one transaction); the path of its index."""
        if self._delegate is not None:
            return self._delegate.put_group(filename, group)  # type: ignore[no-any-return]
        files: dict[str, bytes] = {}
        for name, path in group.items():
            held = self._held.pop(name, None)
            if held is None:
                try:
                    held = Path(path).read_bytes()
                except OSError as error:
                    # Not stored: the next process compiles the kernel again.
                    _PROCESS.warn_once("reading a Triton file for its group", error)
                    break
            files[name] = held
        else:
            self._guard("storing a Triton kernel", lambda c: self._store_group(c, filename, files))
        _PROCESS.groups[(self.key, _GROUP_PREFIX + filename)] = dict(group)
        index = json.dumps({"child_paths": dict(group)}).encode("utf-8")
        return _PROCESS.write_out(self.key, _GROUP_PREFIX + filename, index, replace=True)
