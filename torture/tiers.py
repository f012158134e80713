"""The tiers: processes with files of their own, one shipped layer and one Redis that is
killed and started again while they work."""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vyre_sqlcache import CacheError, PipelineCache, RemoteSettings

from .common import (
    add_detail,
    check_file,
    child_command,
    child_options,
    entry_key_of,
    is_keyed,
    remove_cache_files,
    tag_matches,
    tagged_blob,
    write_slots,
)
from .contention import SHARED_SLOTS, _Contender
from .redis_server import RedisServer, find_redis_server


@dataclass
class TierReport:
    """What the tiers trial found (summed over its processes)."""

    processes: int = 0
    seconds: float = 0.0
    operations: int = 0
    reads: int = 0
    hits: int = 0
    remote_hits: int = 0
    layer_hits: int = 0
    evictions: int = 0
    redis_restarts: int = 0
    remote_values_checked: int = 0
    errors: int = 0
    lost: int = 0
    wrong: int = 0
    undone: int = 0
    rejected: int = 0
    file_problems: int = 0
    skipped: str = ""
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return (
            self.errors + self.lost + self.wrong + self.undone + self.rejected + self.file_problems
        )


class _TierContender(_Contender):
    """A contender whose file sits in front of a layer and a remote: what the file evicts
    may come back from the remote, as any version that was uploaded."""

    def __init__(self, cache: PipelineCache, rng: random.Random, worker: int) -> None:
        super().__init__(cache, rng, worker)
        self.undone = 0

    def judge(self, slot: int, got: bytes | None) -> None:
        report = self.report
        if not self.counted(slot, got) or slot not in self.last:
            return
        expected, evictions_before = self.last[slot]
        if got == expected:
            return
        if expected is None:
            # Invalidated: the remote is fenced for entries reached by key; keyed entries
            # reached through their program digest may come back from it (README).
            if not is_keyed(slot):
                self.undone += 1
                add_detail(report.details, f"worker {self.worker}: slot {slot} came back")
            return
        if self.cache.stats().total_evictions > evictions_before:
            return  # evicted since: a miss, or an older version from the remote
        report.lost += 1
        add_detail(report.details, f"worker {self.worker}: own slot {slot}: a write was lost")


def tiers_child(path: Path, layer: Path, url: str, seconds: float, seed: int, worker: int) -> int:
    """One process of the tiers trial; prints its report as JSON."""
    rng = random.Random(seed)
    cache = PipelineCache.open(path, max_bytes=2 << 20, layers=[layer], remote=url)
    contender = _TierContender(cache, rng, worker)
    report = contender.report
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            contender.step()
        except Exception as error:
            report.errors += 1
            add_detail(report.details, f"worker {worker}: {type(error).__name__}: {error}")
    stats = cache.stats()
    cache.close()
    remote = stats.remote
    part = TierReport(
        processes=1,
        operations=report.operations,
        reads=report.reads,
        hits=report.hits,
        remote_hits=0 if remote is None else remote.hits,
        layer_hits=stats.layer_hits,
        evictions=stats.evictions,
        errors=report.errors,
        lost=report.lost,
        wrong=report.wrong,
        undone=contender.undone,
        rejected=0 if remote is None else remote.rejected,
        details=report.details,
    )
    print(json.dumps(asdict(part)))
    return 0


def _make_layer(folder: Path, seed: int) -> Path:
    """A layer of the shared slots (each keyed and program slot, tagged), as shipped."""
    source = folder / "ci.sqlite3"
    remove_cache_files(source)
    rng = random.Random(seed)
    with PipelineCache.open(source, max_bytes=None) as ci:
        for slot in range(SHARED_SLOTS):
            write_slots(
                ci, [(slot, tagged_blob(entry_key_of(slot), 1 << 50, rng.randint(0, 9000)))]
            )
        layer = folder / "shipped.layer"
        ci.bundle(layer, overwrite=True)
    return layer


def _check_remote(server: RedisServer, folder: Path, total: TierReport) -> None:
    """Every value left in Redis, fetched through a fresh cache: verified and tagged."""
    prefix = RemoteSettings(server.url).prefix.encode()  # the default, as the workers use
    keys = [bytes(k) for k in server.client().scan_iter(match=prefix + b"*", count=1000)]
    path = folder / "audit.sqlite3"
    remove_cache_files(path)
    with PipelineCache.open(path, remote=server.url, max_bytes=None) as audit:
        for name in keys:
            entry_key = bytes.fromhex(name[len(prefix) :].decode())
            got = audit.get_entry(entry_key)
            total.remote_values_checked += got is not None
            if got is not None and not tag_matches(entry_key, got):
                total.wrong += 1
                add_detail(total.details, f"Redis holds foreign bytes under {entry_key.hex()[:16]}")
        remote = audit.stats().remote
        if remote is not None and remote.rejected:
            total.rejected += remote.rejected
            add_detail(total.details, f"{remote.rejected} values in Redis failed verification")


def run_tiers(workdir: Path, seconds: float, *, processes: int = 3, seed: int = 0) -> TierReport:
    """`processes` processes, each with its own small-capped file, the same layer and the
    same Redis, for `seconds`; Redis is killed and started again every second or so."""
    total = TierReport(seconds=seconds)
    if find_redis_server() is None:
        total.skipped = "redis-server is not installed (apt-get install redis-server)"
        return total
    workdir.mkdir(parents=True, exist_ok=True)
    layer = _make_layer(workdir, seed)
    rng = random.Random(seed)
    with RedisServer(workdir / "redis") as server:
        paths = [workdir / f"machine{worker}.sqlite3" for worker in range(processes)]
        for path in paths:
            remove_cache_files(path)
        children = [
            subprocess.Popen(
                child_command(
                    "child-tiers", path, layer, server.url, seconds, rng.getrandbits(64), worker
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                **child_options(),
            )
            for worker, path in enumerate(paths)
        ]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline - 1:
            time.sleep(rng.uniform(0.3, 1.2))
            server.kill()
            time.sleep(rng.uniform(0.0, 0.4))
            server.start()
            total.redis_restarts += 1
        for child in children:
            out, err = child.communicate(timeout=seconds + 120)
            if child.returncode != 0:
                total.errors += 1
                add_detail(
                    total.details, f"worker exited {child.returncode}: {err.decode()[-800:]}"
                )
                continue
            part = json.loads(out.decode().strip().splitlines()[-1])
            for name in (
                "processes", "operations", "reads", "hits", "remote_hits", "layer_hits",
                "evictions", "errors", "lost", "wrong", "undone", "rejected",
            ):  # fmt: skip
                setattr(total, name, getattr(total, name) + part[name])
            for detail in part["details"]:
                add_detail(total.details, detail)
        for path in paths:
            checked = check_file(path, tag_matches)
            if not checked.ok:
                total.file_problems += 1
                add_detail(
                    total.details, f"{path.name}: {checked.integrity[:3]} {checked.problems[:3]}"
                )
        try:
            _check_remote(server, workdir, total)
        except CacheError as error:
            total.errors += 1
            add_detail(total.details, f"checking Redis: {error}")
    return total


__all__ = ["TierReport", "run_tiers", "tiers_child"]
