"""Reliability torture: kills, power cuts, contention, injected faults and corrupt files.

A cache may lose its contents by design, but it may never return wrong bytes, never lose
a write it acknowledged as durable, and never take the application down. This module
checks those three promises the hard way, and prints the figures::

    python -m vyre_sqlcache.torture --kills 500 --corruptions 1000 --seconds 30 --seed 1

Four kinds of trials, each also run with small counts by the test suite:

- **kills** (`run_kills`): a child process writes, overwrites, invalidates and flushes
  in a loop, logging every call before it makes it and every acknowledgement after; it
  is killed with SIGKILL at random moments (some while it starts or opens the file). Half
  the rounds also cut the power: the child does its I/O through `SyncTrackingVFS`, and
  `power_cut` then puts back every file as of its last sync. After each kill the file
  must pass `integrity_check`, and every key must read as its last acknowledged version
  (committed for a kill, flushed for a power cut) or a later, unacknowledged one.
- **contention** (`run_contention`): processes run mixed reads, writes, batches,
  invalidations and flushes on one small-capped file: no error may reach a caller, a
  read returns a miss or bytes written for that key, a process's own write is never
  gone unless something was evicted meanwhile, and the cap holds after every write.
- **faults** (`run_faults`): `FaultyVFS` fails reads, writes or syncs, or reports a full
  disk, on chosen calls. Every public call must return, raise a `CacheError`, or miss;
  once the faults stop the same cache object must work, and the file must be sound.
- **corruptions** (`run_corruptions`): copies of a populated cache (closed cleanly, or
  with a write-ahead log left as by a crash) get random bytes, whole pages of chosen
  b-trees, the header, WAL frames or the length damaged; a worker process opens and reads
  each one. It must never crash, never return wrong bytes, and heal or raise as documented.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import apsw

from . import checksums
from .errors import CacheError, SchemaTooNewError
from .keys import DeviceFingerprint, FeatureFlags, PipelineCacheKey
from .schema import latest_version
from .store import PipelineCache

__all__ = [
    "FINGERPRINT",
    "ContentionReport",
    "CorruptionReport",
    "FaultPlan",
    "FaultReport",
    "FaultyVFS",
    "FileCheck",
    "KillReport",
    "SyncTrackingVFS",
    "Template",
    "TrialWorker",
    "check_file",
    "corruption_trial",
    "damage",
    "entry_key_of",
    "main",
    "make_template",
    "mark_synced",
    "power_cut",
    "read_slot",
    "run_contention",
    "run_corruptions",
    "run_faults",
    "run_kills",
    "trial_in_subprocess",
    "write_slots",
]

#: The device every trial writes for.
FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2684, "torture 1.0")
#: Suffix of the copy of a file as of its last sync (`SyncTrackingVFS`).
SYNCED = ".synced"
#: How many lines of detail a report keeps about each kind of failure.
MAX_DETAILS = 8
#: A user_version at most this far past ours may be a newer library's (SchemaTooNewError
#: is then right); further, or negative, it can only be a damaged header.
PLAUSIBLE_VERSIONS_AHEAD = 1000


# -- VFS shims: a disk that forgets unsynced writes, and a disk that fails -------------


def _filename(name: Any) -> str | None:
    if name is None:
        return None
    return str(name.filename()) if isinstance(name, apsw.URIFilename) else str(name)


def _copy_atomically(source: str, target: str) -> None:
    """Copy `source` over `target` so that a kill mid-copy leaves the old `target` whole."""
    temporary = target + ".tmp"
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


class _SyncTrackingFile(apsw.VFSFile):
    def __init__(self, vfs: SyncTrackingVFS, name: Any, flags: list[int]) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs = vfs
        self._path = _filename(name)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
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
        super().__init__(name, base)

    def xOpen(self, name: Any, flags: list[int]) -> _SyncTrackingFile:
        return _SyncTrackingFile(self, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        super().xDelete(filename, syncdir)
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
        Path(str(synced) + ".tmp").unlink(missing_ok=True)
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
    """

    kinds: frozenset[str]
    every: int = 1
    after: int = 0

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
R = TypeVar("R")


@contextmanager
def registered(vfs: V) -> Iterator[V]:
    """Unregister a VFS when the block ends."""
    try:
        yield vfs
    finally:
        vfs.unregister()


# -- slots: numbered keys, written by digest (`write`) or by key (`put`) ----------------


def _hash32(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def is_keyed(slot: int) -> bool:
    """Every fourth slot is a `PipelineCacheKey` entry; the others are program entries."""
    return slot % 4 == 3


def program_digest(slot: int) -> bytes:
    """The program digest of a slot (keyed slots carry it, for invalidation)."""
    return _hash32("program", slot)


def pipeline_key(slot: int) -> PipelineCacheKey:
    """The `PipelineCacheKey` of a keyed slot."""
    return PipelineCacheKey(
        shader_hash=_hash32("shader", slot),
        bind_group_layout_hash=_hash32("layout", slot % 7),
        push_constant_size=16 * (slot % 5),
        workgroup_size=(64, 1 + slot % 3, 1),
        feature_flags=FeatureFlags.SUBGROUP_OPS | FeatureFlags(slot % 512),
        backend="vulkan",
    )


def entry_key_of(slot: int) -> bytes:
    """The entry key a slot is stored under."""
    if is_keyed(slot):
        return pipeline_key(slot).entry_key(FINGERPRINT)
    return FINGERPRINT.cache_key(program_digest(slot))


def write_slots(cache: PipelineCache, items: Sequence[tuple[int, bytes]]) -> None:
    """Store slots of one kind in one transaction (`write_many` or `put_many`)."""
    if is_keyed(items[0][0]):
        cache.put_many(
            [(pipeline_key(s), blob, program_digest(s)) for s, blob in items], FINGERPRINT
        )
    else:
        cache.write_many([(program_digest(s), blob) for s, blob in items], FINGERPRINT)


def read_slot(cache: PipelineCache, slot: int) -> bytes | None:
    """Read a slot through the API it was written with."""
    if is_keyed(slot):
        return cache.get(pipeline_key(slot), FINGERPRINT)
    return cache.read(program_digest(slot), FINGERPRINT)


def invalidate_slots(cache: PipelineCache, slots: Sequence[int], mask: Sequence[int]) -> int:
    """`invalidate_impacted` over the slots' program digests."""
    return cache.invalidate_impacted(mask, [program_digest(s) for s in slots], FINGERPRINT)


def sha(blob: bytes | None) -> str | None:
    """A short fingerprint of a blob for logs and models (None stays None)."""
    return None if blob is None else hashlib.sha256(blob).hexdigest()[:32]


def blob_size(rng: random.Random, largest: int = 256 * 1024) -> int:
    """A blob size: mostly small, often a few pages, sometimes up to `largest`."""
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(0, 4096)
    if roll < 0.85:
        return rng.randint(4097, min(64 * 1024, largest))
    return rng.randint(min(64 * 1024, largest), largest)


def tagged_blob(entry_key: bytes, nonce: int, size: int) -> bytes:
    """Bytes that prove which key and version they were written for (see `tag_matches`)."""
    body = random.Random(entry_key + nonce.to_bytes(8, "big")).randbytes(max(0, size - 8))
    return nonce.to_bytes(8, "big") + body


def tag_matches(entry_key: bytes, blob: bytes) -> bool:
    """Whether `blob` is a whole `tagged_blob` of this key (any version)."""
    if len(blob) < 8:
        return False
    return tagged_blob(entry_key, int.from_bytes(blob[:8], "big"), len(blob)) == blob


# -- checking a file from outside the library ------------------------------------------


@dataclass
class FileCheck:
    """What a raw look at a cache file found."""

    integrity: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    entry_keys: set[bytes] = field(default_factory=set)
    entries: int = 0
    blob_bytes: int = 0

    @property
    def sound(self) -> bool:
        return self.integrity == ["ok"]

    @property
    def ok(self) -> bool:
        return self.sound and not self.problems


def check_file(path: Path) -> FileCheck:
    """Check a cache file with a plain connection: `integrity_check`, the counters kept in
    `meta` against the rows, sizes against the blobs, every checksum, no orphans."""
    found = FileCheck()
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        connection.set_busy_timeout(10_000)
        found.integrity = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
        if not found.sound:
            return found
        meta = {str(n): int(v) for n, v in connection.execute("SELECT name, value FROM meta")}
        count, sizes = connection.execute(
            "SELECT count(*), coalesce(sum(blob_size), 0) FROM entries"
        ).fetchone() or (0, 0)
        found.entries, found.blob_bytes = int(count), int(sizes)
        if meta.get("entries") != count or meta.get("blob_bytes") != sizes:
            found.problems.append(
                f"meta says {meta.get('entries')} entries / {meta.get('blob_bytes')} bytes, "
                f"rows say {count} / {sizes}"
            )
        rows = connection.execute(
            "SELECT e.entry_key, e.blob_size, b.checksum_algo, b.checksum, b.data "
            "FROM entries e LEFT JOIN blobs b USING (id)"
        )
        for entry_key, size, algo, checksum, data in rows:
            assert isinstance(entry_key, bytes)
            found.entry_keys.add(entry_key)
            if data is None:
                found.problems.append(f"entry {entry_key.hex()[:16]} has no blob")
            elif len(data) != size:
                found.problems.append(f"entry {entry_key.hex()[:16]} size {size} != {len(data)}")
            elif not checksums.matches(algo, checksum, entry_key, data):
                found.problems.append(f"entry {entry_key.hex()[:16]} fails its checksum")
        (orphans,) = connection.execute(
            "SELECT count(*) FROM blobs WHERE id NOT IN (SELECT id FROM entries)"
        ).fetchone() or (0,)
        if orphans:
            found.problems.append(f"{orphans} blobs without an entry")
    finally:
        connection.close()
    return found


def _moved_aside(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.parent.glob(path.name + ".corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    )


def _remove_cache_files(path: Path) -> None:
    """Start a trial from no file (a reused work folder may hold an earlier run's)."""
    for old in path.parent.glob(path.name + "*"):
        if old.is_file():
            old.unlink()


def _child_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "vyre_sqlcache.torture", *map(str, args)]


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _note(details: list[str], text: str) -> None:
    if len(details) < MAX_DETAILS:
        details.append(text)


# -- kills and power cuts ----------------------------------------------------------------

# The child's log, one line a record, written before (W, D) and after (C, F) each call:
#   R             the cache is open
#   W slot sha    about to store these bytes in the slot
#   D slot        about to invalidate the slot
#   C             the store or invalidation above returned (committed)
#   F             flush() returned: everything before it is durable
#   E message     a call raised: the child stops (a failure of the trial)


@dataclass
class KillReport:
    """What the kill trials found."""

    kills: int = 0
    power_cuts: int = 0
    killed_before_open: int = 0
    acknowledged_checked: int = 0
    lost: int = 0
    wrong: int = 0
    stale: int = 0
    corrupt: int = 0
    healed: int = 0
    child_errors: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.lost + self.wrong + self.stale + self.corrupt + self.healed + self.child_errors


@dataclass
class _Version:
    sha: str | None
    level: int  # 0 asked for, 1 committed, 2 flushed (durable)


COMMITTED, FLUSHED = 1, 2
#: The kill trials write at most this many slots (about 11 MB of blobs), then overwrite.
KILL_SLOTS = 300


class _KillModel:
    """Per slot, the versions since the last check; the first one is known durable."""

    def __init__(self) -> None:
        self.history: dict[int, list[_Version]] = {}

    @property
    def next_slot(self) -> int:
        return max(self.history, default=-1) + 1

    def replay(self, lines: list[str]) -> list[str]:
        """Apply a child's log; return its error lines."""
        pending: list[_Version] = []
        committed: list[_Version] = []
        errors = []
        for line in lines:
            kind, *rest = line.split()
            if kind in ("W", "D"):
                version = _Version(rest[1] if kind == "W" else None, 0)
                self.history.setdefault(int(rest[0]), [_Version(None, FLUSHED)]).append(version)
                pending.append(version)
            elif kind == "C":
                for version in pending:
                    version.level = COMMITTED
                committed += pending
                pending = []
            elif kind == "F":
                for version in committed:
                    version.level = FLUSHED
                committed = []
            elif kind == "E":
                errors.append(line)
        return errors

    def judge(self, slot: int, observed: str | None, required: int, report: KillReport) -> None:
        """Check what a slot reads after a crash, then make that its durable state."""
        versions = self.history[slot]
        last = max(i for i, v in enumerate(versions) if v.level >= required)
        report.acknowledged_checked += sum(1 for v in versions[1:] if v.level >= required)
        allowed = {v.sha for v in versions[last:]}
        if observed not in allowed:
            older = {v.sha for v in versions[:last]}
            if observed in older:
                if versions[last].sha is None:
                    report.stale += 1
                    what = "an invalidated version came back"
                else:
                    report.lost += 1
                    what = "an acknowledged write was lost"
            else:
                report.wrong += 1
                what = "bytes never written for this slot"
            _note(report.details, f"slot {slot}: {what} (read {observed}, allowed {allowed})")
        self.history[slot] = [_Version(observed, FLUSHED)]


def _read_log(path: Path) -> list[str]:
    """The complete lines of a child's log (a line cut by the kill is dropped)."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def _wait_ready(log: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with suppress(FileNotFoundError):
            if log.read_bytes().startswith(b"R\n"):
                return True
        time.sleep(0.005)
    return False


def _kill_once(
    path: Path,
    log: Path,
    rng: random.Random,
    first_slot: int,
    cut_power: bool,
    invalidations: bool,
) -> tuple[bool, str]:
    """Start a writing child, kill it at a random moment; return (killed before it
    opened the cache, what it printed if it stopped on its own)."""
    log.unlink(missing_ok=True)
    stderr_path = log.with_suffix(".stderr")
    command = _child_command(
        "child-kill", path, log, rng.getrandbits(64), first_slot, int(cut_power), int(invalidations)
    )
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        early = rng.random() < 0.15
        if early:  # may land while Python starts, or while the cache opens or recovers
            time.sleep(rng.uniform(0.0, 0.4))
        elif _wait_ready(log, process):
            time.sleep(rng.uniform(0.0, 0.25))
        process.send_signal(signal.SIGKILL)
        returncode = process.wait()
    message = ""
    if returncode != -signal.SIGKILL:
        message = f"child exited with {returncode}: " + stderr_path.read_text()[-2000:]
    return early and "R" not in _read_log(log), message


def _check_after_kill(path: Path, model: _KillModel, required: int, report: KillReport) -> None:
    """Integrity, then every slot of the model read through a fresh cache object."""
    if path.exists():
        checked = check_file(path)
        if not checked.sound:
            report.corrupt += 1
            _note(report.details, f"integrity_check after a kill: {checked.integrity[:3]}")
            return
        unknown = checked.entry_keys - {entry_key_of(s) for s in model.history}
        if unknown:
            report.wrong += len(unknown)
            _note(report.details, f"{len(unknown)} entries under keys never written")
    before = len(_moved_aside(path))
    with PipelineCache.open(path, max_bytes=None) as cache:
        if len(_moved_aside(path)) > before:
            report.healed += 1
            _note(report.details, "the file was moved aside after a kill")
        for slot in sorted(model.history):
            model.judge(slot, sha(read_slot(cache, slot)), required, report)


def run_kills(
    workdir: Path,
    kills: int,
    *,
    seed: int = 0,
    power_cut_share: float = 0.5,
    invalidations: bool = True,
    progress: Callable[[str], None] | None = None,
) -> KillReport:
    """Kill a writing child `kills` times (a share of them with a power cut) and check
    after each kill that nothing acknowledged is lost and nothing wrong is read.

    `invalidations=False` leaves `invalidate_impacted` out of the child's calls.
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kills.sqlite3"
    log = workdir / "kills.log"
    _remove_cache_files(path)
    model = _KillModel()
    report = KillReport()
    for round_ in range(kills):
        cut_power = rng.random() < power_cut_share
        if cut_power:
            mark_synced(path)  # what the last check left is on the disk
        early, message = _kill_once(path, log, rng, model.next_slot, cut_power, invalidations)
        if cut_power:
            power_cut(path)
            report.power_cuts += 1
        report.kills += 1
        report.killed_before_open += early
        errors = model.replay(_read_log(log))
        if message or errors:
            report.child_errors += 1
            _note(report.details, (message or "; ".join(errors))[:500])
        _check_after_kill(path, model, FLUSHED if cut_power else COMMITTED, report)
        if progress is not None and (round_ + 1) % 25 == 0:
            progress(f"kills: {round_ + 1}/{kills}, failures so far {report.failures}")
    return report


def _kill_child(
    path: Path, log: Path, seed: int, first_slot: int, cut_power: bool, invalidations: bool
) -> int:
    """The writing child of a kill trial: loops until it is killed."""
    rng = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    vfs = SyncTrackingVFS() if cut_power else None
    try:
        cache = PipelineCache.open(path, max_bytes=None, vfs=None if vfs is None else vfs.name)
        emit("R")
        slots = first_slot
        while True:
            roll = rng.random()
            if roll < 0.2:
                cache.flush()
                emit("F")
                continue
            if roll < 0.3 and slots and invalidations:
                chosen = rng.sample(range(slots), min(slots, rng.randint(1, 4)))
                mask = [rng.choice((0, 1, 1)) for _ in chosen]
                for slot, hit in zip(chosen, mask, strict=True):
                    if hit:
                        emit(f"D {slot}")
                invalidate_slots(cache, chosen, mask)
                emit("C")
                if rng.random() < 0.5:
                    cache.flush()
                    emit("F")
                continue
            count = 1 if roll < 0.8 else rng.randint(2, 6)
            keyed = rng.random() < 0.25
            items: list[tuple[int, bytes]] = []
            for _ in range(count):
                if slots < KILL_SLOTS and (slots == 0 or rng.random() < 0.5):
                    slot = slots
                    slots += 1
                else:
                    slot = rng.randrange(slots)
                if is_keyed(slot) == keyed and slot not in dict(items):
                    items.append((slot, rng.randbytes(blob_size(rng))))
            if not items:
                continue
            for slot, blob in items:
                emit(f"W {slot} {sha(blob)}")
            write_slots(cache, items)
            emit("C")
    except Exception as error:
        emit(f"E {type(error).__name__}: {error}".replace("\n", " "))
        return 3


# -- contention --------------------------------------------------------------------------


@dataclass
class ContentionReport:
    """What the contention trial found (summed over its processes)."""

    processes: int = 0
    seconds: float = 0.0
    cap: int = 0
    operations: int = 0
    writes: int = 0
    reads: int = 0
    hits: int = 0
    evictions: int = 0
    errors: int = 0
    lost: int = 0
    wrong: int = 0
    cap_exceeded: int = 0
    slowest_close_s: float = 0.0
    file_problems: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.errors + self.lost + self.wrong + self.cap_exceeded + self.file_problems


#: Slots every process writes and reads; each process also has slots of its own.
SHARED_SLOTS = 48
OWN_SLOTS = 32


def _own_slots(worker: int) -> range:
    start = 1000 * (worker + 1)
    return range(start, start + OWN_SLOTS)


class _Contender:
    """One process of the contention trial: random calls, each one checked."""

    def __init__(self, cache: PipelineCache, rng: random.Random, worker: int) -> None:
        self.cache = cache
        self.rng = rng
        self.worker = worker
        self.report = ContentionReport(processes=1)
        self.own = _own_slots(worker)
        # own slot -> (last bytes written or None, total evictions seen before that write)
        self.last: dict[int, tuple[bytes | None, int]] = {}
        self.nonce = worker << 40

    def pick(self) -> int:
        if self.rng.random() < 0.5:
            return self.rng.randrange(SHARED_SLOTS)
        return self.rng.choice(self.own)

    def blob_for(self, slot: int) -> bytes:
        self.nonce += 1
        return tagged_blob(entry_key_of(slot), self.nonce, blob_size(self.rng, 192 * 1024))

    def judge(self, slot: int, got: bytes | None) -> None:
        """A read is a miss or bytes of that key; an own slot reads its last write, or a
        miss if anything was evicted since that write."""
        report = self.report
        report.reads += 1
        report.hits += got is not None
        if got is not None and not tag_matches(entry_key_of(slot), got):
            report.wrong += 1
            _note(report.details, f"worker {self.worker}: slot {slot} read foreign bytes")
            return
        if slot not in self.last:
            return
        expected, evictions_before = self.last[slot]
        if got == expected:
            return
        if got is None and self.cache.stats().total_evictions > evictions_before:
            return
        report.lost += 1
        what = "an invalidated entry came back" if expected is None else "a write was lost"
        _note(report.details, f"worker {self.worker}: own slot {slot}: {what} (read {sha(got)})")

    def write(self, slots: list[int]) -> None:
        evictions = self.cache.stats().total_evictions
        items = [(s, self.blob_for(s)) for s in slots]
        write_slots(self.cache, items)
        self.report.writes += len(items)
        for slot, blob in items:
            if slot in self.own:
                self.last[slot] = (blob, evictions)
        blob_bytes = self.cache.stats().blob_bytes
        if self.cache.max_bytes is not None and blob_bytes > self.cache.max_bytes:
            self.report.cap_exceeded += 1
            _note(self.report.details, f"worker {self.worker}: {blob_bytes} blob bytes > cap")
        if self.rng.random() < 0.5:
            slot = items[-1][0]
            self.judge(slot, read_slot(self.cache, slot))

    def step(self) -> None:
        """One random call."""
        rng, cache = self.rng, self.cache
        roll = rng.random()
        if roll < 0.35:
            slot = self.pick()
            self.judge(slot, read_slot(cache, slot))
        elif roll < 0.42:
            slots = list({s for s in (self.pick() for _ in range(5)) if is_keyed(s)})
            got = cache.get_many([pipeline_key(s) for s in slots], FINGERPRINT)
            for slot, blob in zip(slots, got, strict=True):
                self.judge(slot, blob)
        elif roll < 0.72:
            self.write([self.pick()])
        elif roll < 0.80:
            first = self.pick()
            batch = {s for s in (self.pick() for _ in range(6)) if is_keyed(s) == is_keyed(first)}
            self.write(sorted(batch | {first}))
        elif roll < 0.90:
            slots = list({self.pick() for _ in range(rng.randint(1, 4))})
            mask = [rng.choice((0, 1)) for _ in slots]
            invalidate_slots(cache, slots, mask)
            for slot, hit in zip(slots, mask, strict=True):
                if hit and slot in self.own:
                    self.last[slot] = (None, 0)
        elif roll < 0.95:
            cache.flush()
        else:
            slot = self.pick()
            cache.contains(pipeline_key(slot), FINGERPRINT)
            cache.stats()
        self.report.operations += 1


def _contention_child(path: Path, seconds: float, seed: int, worker: int, cap: int) -> int:
    """One process of the contention trial; prints its report as JSON."""
    rng = random.Random(seed)
    cache = PipelineCache.open(path, max_bytes=cap)
    contender = _Contender(cache, rng, worker)
    report = contender.report
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            contender.step()
        except Exception as error:
            report.errors += 1
            _note(report.details, f"worker {worker}: {type(error).__name__}: {error}")
    report.evictions = cache.stats().evictions
    started = time.monotonic()
    cache.close()
    report.slowest_close_s = time.monotonic() - started
    print(json.dumps(asdict(report)))
    return 0


def run_contention(
    workdir: Path,
    seconds: float,
    *,
    processes: int = 4,
    cap: int = 4 << 20,
    seed: int = 0,
) -> ContentionReport:
    """`processes` processes hammer one file capped at `cap` blob bytes for `seconds`."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "contention.sqlite3"
    _remove_cache_files(path)
    with PipelineCache.open(path, max_bytes=cap):
        pass  # created once, so that the workers race on use, not on creation
    rng = random.Random(seed)
    children = [
        subprocess.Popen(
            _child_command("child-contend", path, seconds, rng.getrandbits(64), worker, cap),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for worker in range(processes)
    ]
    total = ContentionReport(seconds=seconds, cap=cap)
    for child in children:
        out, err = child.communicate(timeout=seconds + 120)
        if child.returncode != 0:
            total.errors += 1
            _note(total.details, f"worker exited {child.returncode}: {err.decode()[-1000:]}")
            continue
        part = json.loads(out.decode().strip().splitlines()[-1])
        for name in ("processes", "operations", "writes", "reads", "hits", "evictions"):
            setattr(total, name, getattr(total, name) + part[name])
        for name in ("errors", "lost", "wrong", "cap_exceeded"):
            setattr(total, name, getattr(total, name) + part[name])
        total.slowest_close_s = max(total.slowest_close_s, part["slowest_close_s"])
        for detail in part["details"]:
            _note(total.details, detail)
    checked = check_file(path)
    if not checked.ok or checked.blob_bytes > cap:
        total.file_problems += 1
        _note(total.details, f"file at the end: {checked.integrity[:3]} {checked.problems[:3]}")
        if checked.blob_bytes > cap:
            _note(total.details, f"file at the end holds {checked.blob_bytes} bytes > cap")
    return total


# -- injected faults -----------------------------------------------------------------------


@dataclass
class FaultReport:
    """What the fault trials found."""

    rounds: int = 0
    faults_injected: int = 0
    calls: int = 0
    raised: int = 0
    misses: int = 0
    undocumented: int = 0
    undocumented_calls: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    failed_write_took_effect: int = 0
    not_recovered: int = 0
    corrupt_after: int = 0
    moved_aside: int = 0
    process_died: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return (
            self.undocumented
            + self.wrong
            + self.failed_write_took_effect
            + self.not_recovered
            + self.corrupt_after
            + self.moved_aside
            + self.process_died
        )


class _FaultRound:
    """One cache under one fault plan: random public calls, each result checked."""

    def __init__(
        self, cache: PipelineCache, rng: random.Random, report: FaultReport, vfs: str | None
    ) -> None:
        self.cache = cache
        self.vfs = vfs
        self.rng = rng
        self.report = report
        self.model: dict[int, bytes | None] = {}  # the last acknowledged bytes per slot
        self.refused: dict[int, set[bytes]] = {}  # bytes of writes that raised
        self.slots = 0

    def pick(self, new: float = 0.3) -> int:
        if self.slots == 0 or self.rng.random() < new:
            self.slots += 1
            return self.slots - 1
        return self.rng.randrange(self.slots)

    def expect(self, slot: int, got: bytes | None) -> None:
        if got is None:
            self.report.misses += 1
            return
        if got == self.model.get(slot):
            return
        if got in self.refused.get(slot, ()):
            self.report.failed_write_took_effect += 1
            _note(self.report.details, f"slot {slot}: a write that raised took effect")
        else:
            self.report.wrong += 1
            _note(self.report.details, f"slot {slot}: read {sha(got)}, not what was written")

    def write(self, slots: list[int]) -> None:
        items = [(s, self.rng.randbytes(blob_size(self.rng, 96 * 1024))) for s in slots]
        try:
            write_slots(self.cache, items)
        except CacheError:
            for slot, blob in items:
                self.refused.setdefault(slot, set()).add(blob)
            raise
        self.model.update(items)

    def call(self, name: str, operation: Callable[[], object]) -> None:
        """Run one public call: it returns, or raises a CacheError (counted), nothing else."""
        self.report.calls += 1
        try:
            operation()
        except CacheError:
            self.report.raised += 1
        except Exception as error:
            self.report.undocumented += 1
            _count(self.report.undocumented_calls, name)
            _note(self.report.details, f"{name} raised {type(error).__name__}: {error}")

    def same_kind(self, first: int, count: int) -> list[int]:
        """`first` and up to `count - 1` more slots of its kind, for one batch."""
        more = {self.pick() for _ in range(count)}
        return sorted({s for s in more if is_keyed(s) == is_keyed(first)} | {first})

    def operations(self, slot: int) -> dict[str, Callable[[], object]]:
        """Every public call, as one random use each."""
        cache = self.cache
        keyed = [s for s in range(self.slots) if is_keyed(s)][:6]

        def get_many() -> None:
            got = cache.get_many([pipeline_key(s) for s in keyed], FINGERPRINT)
            for one, blob in zip(keyed, got, strict=True):
                self.expect(one, blob)

        def forget(call: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                call()
                self.model[slot] = None  # only once the call returned

            return run

        return {
            "write": lambda: self.write([slot]),
            "write_many": lambda: self.write(self.same_kind(slot, 4)),
            "read": lambda: self.expect(slot, read_slot(cache, slot)),
            "get_entry": lambda: self.expect(slot, cache.get_entry(entry_key_of(slot))),
            "get_many": get_many,
            "contains": lambda: cache.contains(pipeline_key(slot), FINGERPRINT),
            "check_entry": lambda: cache.check_entry(entry_key_of(slot)),
            "delete_entries": forget(lambda: cache.delete_entries([entry_key_of(slot)])),
            "invalidate": forget(lambda: invalidate_slots(cache, [slot], [1])),
            "stats": lambda: (cache.stats(), len(cache)),
            "flush": cache.flush,
            "open": lambda: PipelineCache.open(cache.path, max_bytes=None, vfs=self.vfs).close(),
        }

    def step(self) -> None:
        """One random public call under faults."""
        name = self.rng.choice(_FAULT_CALLS)
        slot = self.pick(0.3 if name.startswith("write") else 0.0)
        self.call(name, self.operations(slot)[name])


#: The calls a fault round makes, writes and reads more often than the rest.
_FAULT_CALLS = (
    ["write"] * 3 + ["write_many", "read", "read", "get_entry", "get_many", "contains"]
    + ["check_entry", "delete_entries", "invalidate", "stats", "flush", "open"]
)  # fmt: skip


def _fault_round(workdir: Path, rng: random.Random, index: int, report: FaultReport) -> None:
    """One round: populate, arm a random plan, random calls, disarm, recover, verify."""
    path = workdir / f"faults-{index}.sqlite3"
    kinds = rng.choice([["read"], ["write"], ["sync"], ["full"], ["read", "write", "sync"]])
    plan = FaultPlan(frozenset(kinds), every=rng.choice([1, 2, 3, 5, 7]), after=rng.randint(0, 40))
    cap = rng.choice([None, 2 << 20])
    with registered(FaultyVFS(f"torture-faulty-{index}")) as vfs:
        cache = PipelineCache.open(path, max_bytes=cap)
        round_ = _FaultRound(cache, rng, report, vfs.name)
        for _ in range(12):
            round_.write([round_.pick(1.0)])
        cache.close()
        # A new object has a cold page cache, so that its reads reach the VFS.
        cache = round_.cache = PipelineCache.open(path, max_bytes=cap, vfs=vfs.name)
        injected = vfs.injected
        vfs.arm(plan)
        for _ in range(40):
            round_.step()
        # close() is not called under faults: SQLite ignores errors of the checkpoint in
        # sqlite3_close, but apsw re-raises what a Python VFS raised (a shim artifact).
        vfs.disarm()
        report.faults_injected += vfs.injected - injected
        _recover(round_, plan, report)
        cache.close()
    _verify_after_faults(path, round_, plan, report)


def _recover(round_: _FaultRound, plan: FaultPlan, report: FaultReport) -> None:
    """With the faults stopped, the same object must write, read and flush again."""
    cache = round_.cache
    slot = round_.pick(1.0)
    blob = os.urandom(5000 + slot)
    try:
        write_slots(cache, [(slot, blob)])
        round_.model[slot] = blob
        got = read_slot(cache, slot)
        cache.flush()
        cache.stats()
    except Exception as error:
        report.not_recovered += 1
        _note(report.details, f"after {plan.describe()}: {type(error).__name__}: {error}")
        return
    if got != blob:
        report.not_recovered += 1
        _note(report.details, f"after {plan.describe()}: a new write read back {sha(got)}")


def _verify_after_faults(
    path: Path, round_: _FaultRound, plan: FaultPlan, report: FaultReport
) -> None:
    checked = check_file(path)
    if not checked.ok:
        report.corrupt_after += 1
        problems = checked.integrity[:2] + checked.problems[:2]
        _note(report.details, f"after {plan.describe()}: {problems}")
        return
    with PipelineCache.open(path, max_bytes=None) as cache:
        if _moved_aside(path):
            report.moved_aside += 1
            _note(report.details, f"after {plan.describe()}: a sound file was moved aside")
        round_.cache = cache
        for slot in range(round_.slots):
            round_.expect(slot, read_slot(cache, slot))


def run_faults(workdir: Path, rounds: int, *, seed: int = 0) -> FaultReport:
    """Run `rounds` fault rounds in a child process (so that a crash is a finding, not
    the end of the run); return what they found."""
    workdir.mkdir(parents=True, exist_ok=True)
    child = subprocess.run(
        _child_command("child-faults", workdir, rounds, seed),
        capture_output=True,
        timeout=60 + 20 * rounds,
    )
    if child.returncode != 0:
        report = FaultReport(process_died=1)
        _note(report.details, f"fault child exited {child.returncode}: {child.stderr[-2000:]!r}")
        return report
    return FaultReport(**json.loads(child.stdout.decode().strip().splitlines()[-1]))


def _faults_child(workdir: Path, rounds: int, seed: int) -> int:
    rng = random.Random(seed)
    report = FaultReport()
    for index in range(rounds):
        _fault_round(workdir, rng, index, report)
        report.rounds += 1
        for path in workdir.glob(f"faults-{index}.sqlite3*"):
            path.unlink()
    print(json.dumps(asdict(report)))
    return 0


# -- corrupt files -------------------------------------------------------------------------


@dataclass
class CorruptionReport:
    """What the corruption trials found."""

    files: int = 0
    healed_at_open: int = 0
    healed_after_use: int = 0
    raised_at_open: dict[str, int] = field(default_factory=dict)
    damage_met_kept: int = 0
    opened_fine: int = 0
    reads: int = 0
    right: int = 0
    misses: int = 0
    wrong: int = 0
    crashed: int = 0
    hung: int = 0
    undocumented: int = 0
    undocumented_calls: dict[str, int] = field(default_factory=dict)
    unusable: int = 0
    unusable_reasons: dict[str, int] = field(default_factory=dict)
    left_damaged: int = 0
    damage: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.wrong + self.crashed + self.hung + self.undocumented + self.unusable


@dataclass
class Template:
    """A populated cache to damage copies of, with what each slot may read as."""

    folder: Path
    name: str
    allowed: dict[int, list[str | None]]
    pages: dict[str, list[int]]
    page_size: int
    with_wal: bool

    @property
    def database(self) -> Path:
        return self.folder / self.name


def _template_sizes(slot: int, rng: random.Random) -> int:
    if slot < 40:
        return rng.randint(0, 4096)  # inside a b-tree leaf
    if slot < 60:
        return rng.randint(20_000, 100_000)  # overflow pages
    return rng.randint(300_000, 600_000)  # read by incremental blob I/O


def _store(
    cache: PipelineCache, items: list[tuple[int, bytes]], allowed: dict[int, list[str | None]]
) -> None:
    for keyed in (False, True):
        part = [(s, b) for s, b in items if is_keyed(s) == keyed]
        if part:
            write_slots(cache, part)
    for slot, blob in items:
        allowed.setdefault(slot, []).append(str(sha(blob)))


def _page_map(database: Path) -> tuple[dict[str, list[int]], int]:
    """Pages by `table:pagetype` (from dbstat), and the page size."""
    connection = apsw.Connection(str(database))
    try:
        pages: dict[str, list[int]] = {}
        for name, pageno, pagetype in connection.execute(
            "SELECT name, pageno, pagetype FROM dbstat"
        ):
            pages.setdefault(f"{name}:{pagetype}", []).append(int(pageno))
        page_size = int(connection.pragma("page_size"))
    finally:
        connection.close()
    return pages, page_size


def make_template(folder: Path, *, with_wal: bool, seed: int = 0) -> Template:
    """A cache of 64 slots (small, overflowing and large blobs, by digest and by key),
    closed cleanly, or (`with_wal`) with later writes left in a write-ahead log."""
    rng = random.Random(seed)
    shutil.rmtree(folder, ignore_errors=True)
    source = folder / "source" / "cache.sqlite3"
    source.parent.mkdir(parents=True, exist_ok=True)
    target = folder / "template"
    target.mkdir(exist_ok=True)
    allowed: dict[int, list[str | None]] = {}
    with PipelineCache.open(source, max_bytes=None) as cache:
        items = [(s, rng.randbytes(_template_sizes(s, rng))) for s in range(64)]
        for start in range(0, 64, 16):
            _store(cache, items[start : start + 16], allowed)
    if not with_wal:
        pages, page_size = _page_map(source)
        shutil.copyfile(source, target / "cache.sqlite3")
        return Template(target, "cache.sqlite3", allowed, pages, page_size, False)
    cache = PipelineCache.open(source, max_bytes=None)
    overwrite = rng.sample(range(64), 12) + list(range(64, 72))
    _store(cache, [(s, rng.randbytes(_template_sizes(s % 64, rng))) for s in overwrite], allowed)
    invalidated = rng.sample(range(64), 3)
    invalidate_slots(cache, invalidated, [1, 1, 1])
    for slot in invalidated:
        allowed[slot].append(None)
    pages, page_size = _page_map(source)
    # What a crash leaves: the main file and the log, no shared-memory index.
    for suffix in ("", "-wal"):
        shutil.copyfile(str(source) + suffix, str(target / "cache.sqlite3") + suffix)
    cache.close()
    return Template(target, "cache.sqlite3", allowed, pages, page_size, True)


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def _damage_page(path: Path, template: Template, rng: random.Random) -> str:
    group = rng.choice(sorted(template.pages))
    page = rng.choice(template.pages[group])
    size = template.page_size
    start = (page - 1) * size
    how = rng.choice(["random", "zeros", "scribble", "other-page"])
    if how == "random":
        _overwrite(path, start, rng.randbytes(size))
    elif how == "zeros":
        _overwrite(path, start, bytes(size))
    elif how == "scribble":
        for _ in range(rng.randint(1, 8)):
            _overwrite(path, start + rng.randrange(size), rng.randbytes(rng.randint(1, 8)))
    else:  # a misdirected write: another page's bytes land here
        other = rng.choice([p for group in template.pages.values() for p in group])
        with open(path, "rb") as file:
            file.seek((other - 1) * size)
            _overwrite(path, start, file.read(size))
    return f"page {page} ({group}) {how}"


def _damage_wal(path: Path, template: Template, rng: random.Random) -> str:
    wal = Path(str(path) + "-wal")
    size = wal.stat().st_size
    frame_size = 24 + template.page_size
    frames = max(1, (size - 32) // frame_size)
    how = rng.choice(["header", "frame-header", "frame-data", "frame-zeros", "truncate"])
    frame = rng.randrange(frames)
    start = 32 + frame * frame_size
    if how == "header":
        _overwrite(wal, rng.randrange(32), rng.randbytes(rng.randint(1, 4)))
    elif how == "frame-header":
        _overwrite(wal, start + rng.randrange(24), rng.randbytes(rng.randint(1, 4)))
    elif how == "frame-data":
        _overwrite(wal, start + 24 + rng.randrange(template.page_size), rng.randbytes(8))
    elif how == "frame-zeros":
        _overwrite(wal, start, bytes(frame_size))
    else:
        os.truncate(wal, rng.randrange(size))
    return f"wal {how} (frame {frame} of {frames})"


def damage(path: Path, template: Template, rng: random.Random) -> tuple[str, str]:
    """Damage a copy of the template in one random way; return the kind and the details."""
    kinds = ["header", "page", "page", "page", "bytes", "sector", "truncate"]
    if template.with_wal:
        kinds += ["wal", "wal", "wal"]
    kind = rng.choice(kinds)
    size = path.stat().st_size
    if kind == "header":
        for _ in range(rng.randint(1, 4)):
            _overwrite(path, rng.randrange(100), rng.randbytes(1))
        return kind, "header bytes"
    if kind == "page":
        return kind, _damage_page(path, template, rng)
    if kind == "bytes":
        spots = rng.randint(1, 32)
        for _ in range(spots):
            _overwrite(path, rng.randrange(size), rng.randbytes(rng.randint(1, 16)))
        return kind, f"{spots} random spots"
    if kind == "sector":
        sector = rng.choice([512, 4096])
        _overwrite(path, rng.randrange(size // sector) * sector, bytes(sector))
        return kind, f"a zeroed {sector}-byte sector"
    if kind == "truncate":
        os.truncate(path, rng.randrange(size))
        return kind, "truncated"
    return kind, _damage_wal(path, template, rng)


def _ignore(_: object) -> None:
    """Discard a result (a call made only for its errors)."""


def _trial_calls(
    cache: PipelineCache, allowed: dict[int, list[str | None]], result: dict[str, Any]
) -> None:
    """Read every slot through several APIs; then write and read a new one."""

    def judge(slot: int, got: bytes | None) -> None:
        result["reads"] += 1
        if got is None:
            result["right" if None in allowed[slot] else "misses"] += 1
        elif sha(got) in allowed[slot]:
            result["right"] += 1
        else:
            result["wrong"] += 1

    def guarded(name: str, call: Callable[[], None]) -> None:
        try:
            call()
        except CacheError:
            result["met_damage"] = True
        except Exception as error:
            result["undocumented"].append(f"{name}: {type(error).__name__}: {error}")

    slots = sorted(allowed, key=lambda s: hash((s, result["seed"])))
    for slot in slots:
        guarded("read", lambda s=slot: judge(s, read_slot(cache, s)))  # type: ignore[misc]
        guarded("get_entry", lambda s=slot: judge(s, cache.get_entry(entry_key_of(s))))  # type: ignore[misc]
    keyed = [s for s in slots if is_keyed(s)]

    def get_many() -> None:
        got = cache.get_many([pipeline_key(s) for s in keyed], FINGERPRINT)
        for slot, blob in zip(keyed, got, strict=True):
            judge(slot, blob)

    guarded("get_many", get_many)
    guarded("contains", lambda: _ignore(cache.contains(pipeline_key(3), FINGERPRINT)))
    guarded("check_entry", lambda: _ignore(cache.check_entry(entry_key_of(1))))
    guarded("stats", lambda: _ignore(cache.stats()))
    blob = os.urandom(3000)

    def write_and_read() -> None:
        write_slots(cache, [(10_000, blob)])
        if read_slot(cache, 10_000) != blob:
            result["undocumented"].append("a new write did not read back")

    guarded("write", write_and_read)
    guarded("invalidate", lambda: _ignore(invalidate_slots(cache, [5], [1])))


def _marked(path: Path) -> bool:
    """Whether the cache left its marker asking the next open to verify the file."""
    return path.with_name(path.name + ".needs-check").exists()


def _user_version(path: Path) -> int:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(connection.pragma("user_version"))
    finally:
        connection.close()


def _usable(path: Path, result: dict[str, Any]) -> None:
    """Open again (healing if the last session found damage): it must work."""
    before = len(_moved_aside(path))
    try:
        with PipelineCache.open(path, max_bytes=None) as cache:
            result["healed_later"] = len(_moved_aside(path)) > before
            blob = os.urandom(2000)
            write_slots(cache, [(20_000, blob)])
            if read_slot(cache, 20_000) != blob:
                result["unusable"] = "a write did not read back"
    except SchemaTooNewError as error:
        # A damaged user_version that could be a newer library's is refused as documented
        # (it cannot be told from one); an impossible one must be healed.
        if not 0 <= _user_version(path) <= latest_version() + PLAUSIBLE_VERSIONS_AHEAD:
            result["unusable"] = f"{type(error).__name__}: {error}"
    except Exception as error:
        result["unusable"] = f"{type(error).__name__}: {error}"


def corruption_trial(
    path: Path, allowed: dict[int, list[str | None]], *, strict: bool, seed: int
) -> dict[str, Any]:
    """Open a damaged cache, read everything, write; open it again; say what happened."""
    result: dict[str, Any] = {
        "seed": seed, "reads": 0, "right": 0, "misses": 0, "wrong": 0, "undocumented": [],
        "raised": None, "healed": False, "met_damage": False, "healed_later": False,
        "unusable": None, "left_damaged": False,
    }  # fmt: skip
    try:
        cache = PipelineCache.open(path, max_bytes=None, strict=strict)
    except CacheError as error:
        result["raised"] = type(error).__name__
    except Exception as error:
        result["undocumented"].append(f"open: {type(error).__name__}: {error}")
    else:
        result["healed"] = bool(_moved_aside(path))
        if strict and result["healed"]:
            result["undocumented"].append("strict=True moved the file aside")
        _trial_calls(cache, allowed, result)
        with suppress(CacheError):
            result["met_damage"] |= cache.stats().checksum_failures > 0
        try:
            cache.close()
        except Exception as error:
            result["undocumented"].append(f"close: {type(error).__name__}: {error}")
        result["met_damage"] = result["met_damage"] or _marked(path)
    if not strict:
        _usable(path, result)
    if path.exists():
        with suppress(apsw.Error):
            result["left_damaged"] = not check_file(path).sound
    return result


def _merge_trial(report: CorruptionReport, result: dict[str, Any], what: str) -> None:
    for name in ("reads", "right", "misses", "wrong"):
        setattr(report, name, getattr(report, name) + result[name])
    if result["wrong"]:
        _note(report.details, f"{what}: {result['wrong']} wrong reads")
    if result["undocumented"]:
        report.undocumented += 1
        for text in result["undocumented"]:
            _count(report.undocumented_calls, text.split(":")[0])
        _note(report.details, f"{what}: {result['undocumented'][:2]}")
    if result["unusable"]:
        report.unusable += 1
        _count(report.unusable_reasons, result["unusable"].split(":")[0])
        _note(report.details, f"{what}: unusable after reopening: {result['unusable']}")
    report.left_damaged += bool(result["left_damaged"])
    if result["raised"]:
        name = result["raised"]
        report.raised_at_open[name] = report.raised_at_open.get(name, 0) + 1
    elif result["healed"]:
        report.healed_at_open += 1
    elif result["met_damage"] and result["healed_later"]:
        report.healed_after_use += 1
    elif result["met_damage"]:
        report.damage_met_kept += 1
    else:
        report.opened_fine += 1


class TrialWorker:
    """A child process that runs corruption trials sent to it, one JSON line each way."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr = open(workdir / "worker.stderr", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            _child_command("child-corrupt"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """The trial's result, or why there is none ('crashed ...' or 'hung')."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write((json.dumps(job) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if line:
            result: dict[str, Any] = json.loads(line)
            return result
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            return "hung"
        return f"crashed (exit {self.process.returncode})"

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)
        self.stderr.close()


def trial_in_subprocess(
    path: Path, allowed: dict[int, list[str | None]], *, strict: bool = False, timeout: float = 120
) -> dict[str, Any] | str:
    """`corruption_trial` in a fresh process: its result, or 'crashed ...' / 'hung'."""
    model = path.with_name(path.name + ".model.json")
    model.write_text(json.dumps(allowed))
    worker = TrialWorker(path.parent)
    try:
        job = {"path": str(path), "model": str(model), "strict": strict, "seed": 0}
        return worker.run(job, timeout)
    finally:
        worker.close()
        model.unlink(missing_ok=True)


def _corruption_child() -> int:
    """Run trials read from stdin until it closes."""
    import logging

    logging.getLogger("vyre_sqlcache").setLevel(logging.ERROR)
    models: dict[str, dict[int, list[str | None]]] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["model"] not in models:
            raw = json.loads(Path(job["model"]).read_text())
            models[job["model"]] = {int(k): v for k, v in raw.items()}
        result = corruption_trial(
            Path(job["path"]), models[job["model"]], strict=job["strict"], seed=job["seed"]
        )
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def run_corruptions(
    workdir: Path,
    count: int,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CorruptionReport:
    """Damage `count` copies of two populated caches and try each in a worker process."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    templates = [
        make_template(workdir / "clean", with_wal=False, seed=seed),
        make_template(workdir / "wal", with_wal=True, seed=seed + 1),
    ]
    for template in templates:
        (template.folder / "model.json").write_text(json.dumps(template.allowed))
    report = CorruptionReport()
    worker: TrialWorker | None = None
    try:
        for trial in range(count):
            template = rng.choice(templates)
            folder = workdir / "trial"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(template.folder, folder, ignore=shutil.ignore_patterns("*.json"))
            path = folder / template.name
            kind, what = damage(path, template, rng)
            report.damage[kind] = report.damage.get(kind, 0) + 1
            strict = rng.random() < 0.2
            job = {
                "path": str(path),
                "model": str(template.folder / "model.json"),
                "strict": strict,
                "seed": rng.getrandbits(32),
            }
            worker = worker or TrialWorker(workdir)
            result = worker.run(job, timeout=120)
            report.files += 1
            label = f"{'wal' if template.with_wal else 'clean'} copy, {what}, strict={strict}"
            if isinstance(result, str):
                report.crashed += result.startswith("crashed")
                report.hung += result == "hung"
                _note(report.details, f"{label}: {result}")
                worker.close()
                worker = None
                shutil.copytree(folder, workdir / f"failed-{trial}", dirs_exist_ok=True)
                continue
            _merge_trial(report, result, label)
            if progress is not None and (trial + 1) % 100 == 0:
                progress(f"corruptions: {trial + 1}/{count}, failures so far {report.failures}")
    finally:
        if worker is not None:
            worker.close()
    return report


# -- the command ---------------------------------------------------------------------------


def _child_main(argv: list[str]) -> int:
    """The hidden commands the trials start child processes with."""
    command, *args = argv
    if command == "child-kill":
        path, log, seed, first, cut, invalidate = args
        return _kill_child(
            Path(path), Path(log), int(seed), int(first), bool(int(cut)), bool(int(invalidate))
        )
    if command == "child-contend":
        path, seconds, seed, worker, cap = args
        return _contention_child(Path(path), float(seconds), int(seed), int(worker), int(cap))
    if command == "child-faults":
        workdir, rounds, seed = args
        return _faults_child(Path(workdir), int(rounds), int(seed))
    if command == "child-corrupt":
        return _corruption_child()
    raise SystemExit(f"unknown child command {command}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vyre_sqlcache.torture",
        description="Kill, power-cut, contention, fault and corruption trials of vyre-sqlcache. "
        "Prints a table of figures; exits 1 if anything acknowledged was lost, any wrong "
        "bytes were returned, or any call failed in an undocumented way.",
    )
    parser.add_argument("--kills", type=int, default=500, help="kills of a writing child (500)")
    parser.add_argument(
        "--corruptions", type=int, default=1000, help="damaged files to open (1000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="length of the contention trial (30)"
    )
    parser.add_argument("--processes", type=int, default=4, help="contending processes (4)")
    parser.add_argument("--faults", type=int, default=60, help="fault-injection rounds (60)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


Row = tuple[str, str, object]


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "0"


def _kill_rows(r: KillReport) -> list[Row]:
    return [
        ("kills", "kills survived (of which with a power cut)", f"{r.kills} ({r.power_cuts})"),
        ("kills", "killed before the cache was open", r.killed_before_open),
        ("kills", "acknowledged writes and invalidations checked", r.acknowledged_checked),
        ("kills", "**acknowledged writes lost**", r.lost),
        ("kills", "**acknowledged invalidations undone**", r.stale),
        ("kills", "**wrong bytes returned**", r.wrong),
        ("kills", "**files failing integrity_check**", r.corrupt),
        ("kills", "**files moved aside / writer errors**", f"{r.healed} / {r.child_errors}"),
    ]


def _contention_rows(r: ContentionReport) -> list[Row]:
    return [
        ("contention", "processes x seconds, cap", f"{r.processes} x {r.seconds:g} s, {r.cap} B"),
        ("contention", "calls (writes / reads, hits)",
         f"{r.operations} ({r.writes} / {r.reads}, {r.hits})"),
        ("contention", "entries evicted", r.evictions),
        ("contention", "**errors reaching a caller**", r.errors),
        ("contention", "**acknowledged writes lost**", r.lost),
        ("contention", "**wrong bytes returned**", r.wrong),
        ("contention", "**cap exceeded after a write**", r.cap_exceeded),
        ("contention", "**file problems at the end**", r.file_problems),
        ("contention", "slowest close()", f"{r.slowest_close_s:.2f} s"),
    ]  # fmt: skip


def _fault_rows(r: FaultReport) -> list[Row]:
    return [
        ("faults", "rounds, faults injected", f"{r.rounds}, {r.faults_injected}"),
        ("faults", "calls under faults: raised CacheError / misses",
         f"{r.calls}: {r.raised} / {r.misses}"),
        ("faults", "**undocumented exceptions** (by call)",
         f"{r.undocumented} ({_tally(r.undocumented_calls)})"),
        ("faults", "**wrong bytes returned**", r.wrong),
        ("faults", "**writes that raised but took effect**", r.failed_write_took_effect),
        ("faults", "**not working after faults stopped**", r.not_recovered),
        ("faults", "**files corrupt / moved aside after faults**",
         f"{r.corrupt_after} / {r.moved_aside}"),
        ("faults", "**process deaths**", r.process_died),
    ]  # fmt: skip


def _corruption_rows(r: CorruptionReport) -> list[Row]:
    return [
        ("corruption", "corrupt files tried (by damage)", f"{r.files} ({_tally(r.damage)})"),
        ("corruption", "healed at open (moved aside)", r.healed_at_open),
        ("corruption", "damage met in use, healed at the next open", r.healed_after_use),
        ("corruption", "damage met in use, bad entries dropped, file kept", r.damage_met_kept),
        ("corruption", "raised at open", _tally(r.raised_at_open)),
        ("corruption", "opened fine, no damage met", r.opened_fine),
        ("corruption", "reads: right / miss", f"{r.reads}: {r.right} / {r.misses}"),
        ("corruption", "**wrong bytes returned**", r.wrong),
        ("corruption", "**crashes / hangs**", f"{r.crashed} / {r.hung}"),
        ("corruption", "**undocumented exceptions** (by call)",
         f"{r.undocumented} ({_tally(r.undocumented_calls)})"),
        ("corruption", "**unusable after reopening** (by error)",
         f"{r.unusable} ({_tally(r.unusable_reasons)})"),
        ("corruption", "files still failing integrity_check at the end", r.left_damaged),
    ]  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of (trial, figure, value) rows."""
    lines = ["| trial | figure | value |", "| --- | --- | ---: |"]
    lines += [f"| {trial} | {figure} | {value} |" for trial, figure, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every trial, print the figures, return 1 if anything was lost or wrong."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0].startswith("child-"):
        return _child_main(args_list)
    args = _parser().parse_args(args_list)
    seed = random.randrange(1 << 32) if args.seed is None else args.seed

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    timings: dict[str, float] = {}

    def timed(name: str, run: Callable[[], R]) -> R:
        started = time.monotonic()
        result = run()
        timings[name] = time.monotonic() - started
        progress(f"{name} done in {timings[name]:.0f} s")
        return result

    with tempfile.TemporaryDirectory(prefix="vyre-torture-") as scratch:
        work = args.workdir or Path(scratch)
        kills = timed(
            "kills", lambda: run_kills(work / "kills", args.kills, seed=seed, progress=progress)
        )
        contention = timed(
            "contention",
            lambda: run_contention(
                work / "contention", args.seconds, processes=args.processes, seed=seed
            ),
        )
        faults = timed("faults", lambda: run_faults(work / "faults", args.faults, seed=seed))
        corrupt = timed(
            "corruption",
            lambda: run_corruptions(
                work / "corruption", args.corruptions, seed=seed, progress=progress
            ),
        )
    reports: list[Any] = [kills, contention, faults, corrupt]
    failures = sum(report.failures for report in reports)
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"vyre-sqlcache torture, seed {seed} ({spent})")
    print()
    rows = _kill_rows(kills) + _contention_rows(contention)
    print(format_table(rows + _fault_rows(faults) + _corruption_rows(corrupt)))
    print()
    for report in reports:
        for detail in report.details:
            print(f"- {type(report).__name__}: {detail}")
    print("PASS: nothing lost, nothing wrong" if failures == 0 else f"FAIL: {failures} failures")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
