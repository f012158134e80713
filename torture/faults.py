"""Injected faults: a VFS that fails reads, writes and syncs, or fills the disk."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vyre_sqlcache import CacheError, PipelineCache

from .common import (
    FINGERPRINT,
    add_detail,
    blob_size,
    bump,
    check_file,
    child_command,
    child_options,
    entry_key_of,
    invalidate_slots,
    is_keyed,
    moved_aside,
    pipeline_key,
    read_slot,
    sha,
    write_slots,
)
from .shims import FaultPlan, FaultyVFS, registered


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
            add_detail(self.report.details, f"slot {slot}: a write that raised took effect")
        else:
            self.report.wrong += 1
            add_detail(self.report.details, f"slot {slot}: read {sha(got)}, not what was written")

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
            bump(self.report.undocumented_calls, name)
            add_detail(self.report.details, f"{name} raised {type(error).__name__}: {error}")

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
        # Each write commits before it returns: the model judges every call by what it
        # returned (write-behind under faults has tests of its own).
        cache = round_.cache = PipelineCache.open(
            path, max_bytes=cap, vfs=vfs.name, write_behind=False
        )
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
        add_detail(report.details, f"after {plan.describe()}: {type(error).__name__}: {error}")
        return
    if got != blob:
        report.not_recovered += 1
        add_detail(report.details, f"after {plan.describe()}: a new write read back {sha(got)}")


def _verify_after_faults(
    path: Path, round_: _FaultRound, plan: FaultPlan, report: FaultReport
) -> None:
    written: dict[bytes, set[bytes]] = {}  # what each key may hold: bytes written to it
    for slot in range(round_.slots):
        blobs = written.setdefault(entry_key_of(slot), set(round_.refused.get(slot, ())))
        last = round_.model.get(slot)
        if last is not None:
            blobs.add(last)
    checked = check_file(path, lambda key, blob: blob in written.get(key, ()))
    if not checked.ok:
        report.corrupt_after += 1
        problems = checked.integrity[:2] + checked.problems[:2]
        add_detail(report.details, f"after {plan.describe()}: {problems}")
        return
    with PipelineCache.open(path, max_bytes=None) as cache:
        if moved_aside(path):
            report.moved_aside += 1
            add_detail(report.details, f"after {plan.describe()}: a sound file was moved aside")
        round_.cache = cache
        for slot in range(round_.slots):
            round_.expect(slot, read_slot(cache, slot))


def run_faults(workdir: Path, rounds: int, *, seed: int = 0) -> FaultReport:
    """Run `rounds` fault rounds in a child process (so that a crash is a finding, not
    the end of the run); return what they found."""
    workdir.mkdir(parents=True, exist_ok=True)
    child = subprocess.run(
        child_command("child-faults", workdir, rounds, seed),
        capture_output=True,
        timeout=60 + 20 * rounds,
        **child_options(),
    )
    if child.returncode != 0:
        report = FaultReport(process_died=1)
        add_detail(
            report.details, f"fault child exited {child.returncode}: {child.stderr[-2000:]!r}"
        )
        return report
    return FaultReport(**json.loads(child.stdout.decode().strip().splitlines()[-1]))


def faults_child(workdir: Path, rounds: int, seed: int) -> int:
    rng = random.Random(seed)
    report = FaultReport()
    for index in range(rounds):
        _fault_round(workdir, rng, index, report)
        report.rounds += 1
        for path in workdir.glob(f"faults-{index}.sqlite3*"):
            path.unlink()
    print(json.dumps(asdict(report)))
    return 0
