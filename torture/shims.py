"""Disks that misbehave on purpose: one forgets unsynced writes, one fails on cue."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import apsw

#: Suffix of the copy of a file as of its last sync (`SyncTrackingVFS`).
SYNCED = ".synced"
#: Suffix of a copy being made.
TEMPORARY = ".tmp"


def _filename(name: Any) -> str | None:
    if name is None:
        return None
    return str(name.filename()) if isinstance(name, apsw.URIFilename) else str(name)


def _copy_atomically(source: str, target: str) -> None:
    """Copy `source` over `target` so that a kill mid-copy leaves the old `target` whole."""
    temporary = target + TEMPORARY
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


class _SyncTrackingFile(apsw.VFSFile):
    def __init__(self, vfs: SyncTrackingVFS, name: Any, flags: list[int]) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs = vfs
        self._path = _filename(name)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
        # Threads sync at once (a flush and the checkpoint thread): one copy at a
        # time, each taken after its own sync, so the last copy is the newest.
        with self._vfs.copying:
            if self._path is not None:
                # What a sync makes durable is the file as it is now.
                _copy_atomically(self._path, self._path + SYNCED)
            self._vfs.syncs += 1


class SyncTrackingVFS(apsw.VFS):
    """Passes everything through, and keeps a copy of each file as of its last xSync.

    The same convention as `tests/vfs.py` (`<file>.synced`), with copies made atomically
    so that a process killed in the middle of a sync leaves the previous copy intact.
    """

    def __init__(self, name: str = "torture-sync", base: str = "") -> None:
        self.base = base
        self.name = name
        self.syncs = 0
        self.copying = threading.Lock()
        super().__init__(name, base)

    def xOpen(self, name: Any, flags: list[int]) -> _SyncTrackingFile:
        return _SyncTrackingFile(self, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        super().xDelete(filename, syncdir)
        with self.copying:
            Path(filename + SYNCED).unlink(missing_ok=True)


def power_cut(database: Path) -> None:
    """Replace the database and its WAL by their last synced contents, as a power cut would."""
    for suffix in ("", "-wal", "-journal"):
        path = Path(str(database) + suffix)
        synced = Path(str(path) + SYNCED)
        if synced.exists():
            os.replace(synced, path)
        else:
            path.unlink(missing_ok=True)
        Path(str(synced) + TEMPORARY).unlink(missing_ok=True)
    # The shared-memory index is rebuilt from the WAL after a crash.
    Path(str(database) + "-shm").unlink(missing_ok=True)


def mark_synced(database: Path) -> None:
    """Record the files as they are now as synced: the state a power cut goes back to."""
    for suffix in ("", "-wal", "-journal"):
        path = Path(str(database) + suffix)
        synced = Path(str(path) + SYNCED)
        if path.exists():
            _copy_atomically(str(path), str(synced))
        else:
            synced.unlink(missing_ok=True)


@dataclass(frozen=True)
class FaultPlan:
    """Which I/O calls fail: of the calls of `kinds`, the first `after` pass, then every
    `every`-th one fails (every=1: all of them).

    Kinds: `read` (xRead raises apsw.IOError), `write` (xWrite raises apsw.IOError),
    `sync` (xSync raises apsw.IOError), `full` (xWrite and xTruncate raise apsw.FullError).
    `errno`: the system error the VFS then reports (`Connection.system_errno`), as the
    OS would have, e.g. EROFS from a file system remounted read-only; 0 for none.
    """

    kinds: frozenset[str]
    every: int = 1
    after: int = 0
    errno: int = 0

    def describe(self) -> str:
        return f"{'+'.join(sorted(self.kinds))} every {self.every} after {self.after}"


class _FaultyFile(apsw.VFSFile):
    def __init__(self, vfs: FaultyVFS, name: Any, flags: list[int]) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs = vfs

    def xRead(self, amount: int, offset: int) -> bytes:
        self._vfs.maybe_fail("read")
        data: bytes = super().xRead(amount, offset)
        return data

    def xWrite(self, data: bytes, offset: int) -> None:
        self._vfs.maybe_fail("write")
        super().xWrite(data, offset)

    def xTruncate(self, size: int) -> None:
        self._vfs.maybe_fail("truncate")
        super().xTruncate(size)

    def xSync(self, flags: int) -> None:
        self._vfs.maybe_fail("sync")
        super().xSync(flags)


class FaultyVFS(apsw.VFS):
    """Passes I/O through to the default VFS, failing the calls `plan` picks while armed."""

    def __init__(self, name: str = "torture-faulty", base: str = "") -> None:
        self.base = base
        self.name = name
        self.plan: FaultPlan | None = None
        self.calls = 0  # calls of the planned kinds since armed
        self.injected = 0  # faults raised, ever
        super().__init__(name, base)

    def xOpen(self, name: Any, flags: list[int]) -> _FaultyFile:
        return _FaultyFile(self, name, flags)

    def xGetLastError(self) -> tuple[int, str | None]:
        if self.plan is not None and self.plan.errno and self.injected:
            return self.plan.errno, os.strerror(self.plan.errno)
        last: tuple[int, str | None] = super().xGetLastError()
        return last

    def arm(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.calls = 0

    def disarm(self) -> None:
        self.plan = None

    def maybe_fail(self, call: str) -> None:
        """Raise the planned fault for this I/O call, if it is one the plan picks."""
        plan = self.plan
        if plan is None:
            return
        if call == "read" and "read" in plan.kinds:
            error: type[apsw.Error] = apsw.IOError
        elif call in ("write", "truncate") and "full" in plan.kinds:
            error = apsw.FullError
        elif call in ("write", "sync") and call in plan.kinds:
            error = apsw.IOError
        else:
            return
        self.calls += 1
        passed = self.calls - plan.after
        if passed > 0 and passed % plan.every == 0:
            self.injected += 1
            raise error(f"injected {call} fault ({plan.describe()})")


V = TypeVar("V", bound=apsw.VFS)


@contextmanager
def registered(vfs: V) -> Iterator[V]:
    """Unregister a VFS when the block ends."""
    try:
        yield vfs
    finally:
        vfs.unregister()
