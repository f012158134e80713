"""Contention: several processes on one small-capped file."""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vyre_sqlcache import PipelineCache

from .common import (
    FINGERPRINT,
    add_detail,
    blob_size,
    check_file,
    child_command,
    child_options,
    entry_key_of,
    invalidate_slots,
    is_keyed,
    pipeline_key,
    read_slot,
    remove_cache_files,
    sha,
    tag_matches,
    tagged_blob,
    write_slots,
)


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

    def counted(self, slot: int, got: bytes | None) -> bool:
        """Count a read; whether it is a miss or bytes of that key (else it is wrong)."""
        report = self.report
        report.reads += 1
        report.hits += got is not None
        if got is not None and not tag_matches(entry_key_of(slot), got):
            report.wrong += 1
            add_detail(report.details, f"worker {self.worker}: slot {slot} read foreign bytes")
            return False
        return True

    def judge(self, slot: int, got: bytes | None) -> None:
        """A read is a miss or bytes of that key; an own slot reads its last write, or a
        miss if anything was evicted since that write."""
        report = self.report
        if not self.counted(slot, got) or slot not in self.last:
            return
        expected, evictions_before = self.last[slot]
        if got == expected:
            return
        if got is None and self.cache.stats().total_evictions > evictions_before:
            return
        report.lost += 1
        what = "an invalidated entry came back" if expected is None else "a write was lost"
        add_detail(
            report.details, f"worker {self.worker}: own slot {slot}: {what} (read {sha(got)})"
        )

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
            add_detail(self.report.details, f"worker {self.worker}: {blob_bytes} blob bytes > cap")
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


def contention_child(path: Path, seconds: float, seed: int, worker: int, cap: int) -> int:
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
            add_detail(report.details, f"worker {worker}: {type(error).__name__}: {error}")
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
    remove_cache_files(path)
    with PipelineCache.open(path, max_bytes=cap):
        pass  # created once, so that the workers race on use, not on creation
    rng = random.Random(seed)
    children = [
        subprocess.Popen(
            child_command("child-contend", path, seconds, rng.getrandbits(64), worker, cap),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **child_options(),
        )
        for worker in range(processes)
    ]
    total = ContentionReport(seconds=seconds, cap=cap)
    for child in children:
        out, err = child.communicate(timeout=seconds + 120)
        if child.returncode != 0:
            total.errors += 1
            add_detail(total.details, f"worker exited {child.returncode}: {err.decode()[-1000:]}")
            continue
        part = json.loads(out.decode().strip().splitlines()[-1])
        for name in ("processes", "operations", "writes", "reads", "hits", "evictions"):
            setattr(total, name, getattr(total, name) + part[name])
        for name in ("errors", "lost", "wrong", "cap_exceeded"):
            setattr(total, name, getattr(total, name) + part[name])
        total.slowest_close_s = max(total.slowest_close_s, part["slowest_close_s"])
        for detail in part["details"]:
            add_detail(total.details, detail)
    checked = check_file(path, tag_matches)
    if not checked.ok or checked.blob_bytes > cap:
        total.file_problems += 1
        add_detail(
            total.details, f"file at the end: {checked.integrity[:3]} {checked.problems[:3]}"
        )
        if checked.blob_bytes > cap:
            add_detail(total.details, f"file at the end holds {checked.blob_bytes} bytes > cap")
    return total
