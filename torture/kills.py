"""Kills and power cuts of a writing child process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from vyre_sqlcache import PipelineCache

from .common import (
    add_detail,
    blob_size,
    check_file,
    child_command,
    child_options,
    entry_key_of,
    invalidate_slots,
    is_keyed,
    moved_aside,
    read_slot,
    remove_cache_files,
    sha,
    write_slots,
)
from .shims import SyncTrackingVFS, mark_synced, power_cut

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
    write_behind_kills: int = 0
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
            add_detail(report.details, f"slot {slot}: {what} (read {observed}, allowed {allowed})")
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
    write_behind: bool,
) -> tuple[bool, str]:
    """Start a writing child, kill it at a random moment; return (killed before it
    opened the cache, what it printed if it stopped on its own)."""
    log.unlink(missing_ok=True)
    stderr_path = log.with_suffix(".stderr")
    command = child_command(
        "child-kill",
        path,
        log,
        rng.getrandbits(64),
        first_slot,
        int(cut_power),
        int(invalidations),
        int(write_behind),
    )
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, **child_options()
        )
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
            add_detail(report.details, f"integrity_check after a kill: {checked.integrity[:3]}")
            return
        unknown = checked.entry_keys - {entry_key_of(s) for s in model.history}
        if unknown:
            report.wrong += len(unknown)
            add_detail(report.details, f"{len(unknown)} entries under keys never written")
    before = len(moved_aside(path))
    with PipelineCache.open(path, max_bytes=None) as cache:
        if len(moved_aside(path)) > before:
            report.healed += 1
            add_detail(report.details, "the file was moved aside after a kill")
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
    remove_cache_files(path)
    model = _KillModel()
    report = KillReport()
    for round_ in range(kills):
        cut_power = rng.random() < power_cut_share
        if cut_power:
            mark_synced(path)  # what the last check left is on the disk
        # Every other child queues its writes (write-behind): only what flush()
        # acknowledged must survive its kill; the others commit each write at once.
        write_behind = round_ % 2 == 1
        report.write_behind_kills += write_behind
        early, message = _kill_once(
            path, log, rng, model.next_slot, cut_power, invalidations, write_behind
        )
        if cut_power:
            power_cut(path)
            report.power_cuts += 1
        report.kills += 1
        report.killed_before_open += early
        errors = model.replay(_read_log(log))
        if message or errors:
            report.child_errors += 1
            add_detail(report.details, (message or "; ".join(errors))[:500])
        required = FLUSHED if cut_power or write_behind else COMMITTED
        _check_after_kill(path, model, required, report)
        if progress is not None and (round_ + 1) % 25 == 0:
            progress(f"kills: {round_ + 1}/{kills}, failures so far {report.failures}")
    return report


def kill_child(
    path: Path,
    log: Path,
    seed: int,
    first_slot: int,
    cut_power: bool,
    invalidations: bool,
    write_behind: bool = False,
) -> int:
    """The writing child of a kill trial: loops until it is killed."""
    rng = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    vfs = SyncTrackingVFS() if cut_power else None
    try:
        cache = PipelineCache.open(
            path,
            max_bytes=None,
            vfs=None if vfs is None else vfs.name,
            write_behind=write_behind,
        )
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
