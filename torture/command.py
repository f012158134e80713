"""`python -m torture`: every trial, and the table of figures."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .contention import ContentionReport, contention_child, run_contention
from .corruption import CorruptionReport, corruption_child, run_corruptions
from .deletions import DeletionReport, deletion_child, run_deletions
from .faults import FaultReport, faults_child, run_faults
from .kills import KillReport, kill_child, run_kills
from .lifecycle import ForkReport, InterruptReport, run_fork_trials, run_interrupt_trials
from .tiers import TierReport, run_tiers, tiers_child


def _child_main(argv: list[str]) -> int:
    """The hidden commands the trials start child processes with."""
    command, *args = argv
    if command == "child-kill":
        path, log, seed, first, cut, invalidate, behind = args
        return kill_child(
            Path(path),
            Path(log),
            int(seed),
            int(first),
            bool(int(cut)),
            bool(int(invalidate)),
            bool(int(behind)),
        )
    if command == "child-contend":
        path, seconds, seed, worker, cap = args
        return contention_child(Path(path), float(seconds), int(seed), int(worker), int(cap))
    if command == "child-faults":
        workdir, rounds, seed = args
        return faults_child(Path(workdir), int(rounds), int(seed))
    if command == "child-corrupt":
        return corruption_child()
    if command == "child-tiers":
        path, layer, url, seconds, seed, worker = args
        return tiers_child(Path(path), Path(layer), url, float(seconds), int(seed), int(worker))
    if command == "child-delete":
        path, seconds, seed = args
        return deletion_child(Path(path), float(seconds), int(seed))
    raise SystemExit(f"unknown child command {command}")


R = TypeVar("R")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torture",
        description="Kill, power-cut, contention, fault, corruption, fork, interrupt, "
        "deletion and tier (layer and Redis) trials "
        "of vyre-sqlcache. "
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
    parser.add_argument(
        "--forks", type=int, default=200, help="fork trials with threads at work (200)"
    )
    parser.add_argument("--interrupts", type=int, default=6, help="trials of random Ctrl-C (6)")
    parser.add_argument("--interrupt-seconds", type=float, default=5.0, help="length of each (5)")
    parser.add_argument(
        "--deletions", type=int, default=6, help="trials deleting the file in use (6)"
    )
    parser.add_argument("--deletion-seconds", type=float, default=5.0, help="length of each (5)")
    parser.add_argument(
        "--tier-seconds",
        type=float,
        default=20.0,
        help="length of the tiers trial, Redis restarted all along (20)",
    )
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
        ("kills", "of which with write-behind (only flushed writes count)", r.write_behind_kills),
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


def _fork_rows(r: ForkReport) -> list[Row]:
    return [
        ("fork", "trials (5 variants in turn)", r.trials),
        ("fork", "acknowledged writes checked", r.checked),
        ("fork", "**hangs**", r.hangs),
        ("fork", "**trials failing**", len(r.errors)),
        ("fork", "**acknowledged writes lost / wrong bytes**", f"{r.lost} / {r.wrong}"),
        ("fork", "**files failing integrity_check**", r.not_ok),
    ]


def _interrupt_rows(r: InterruptReport) -> list[Row]:
    return [
        ("interrupts", "trials x seconds, Ctrl-C caught",
         f"{r.trials} x {r.seconds:g} s, {r.caught}"),
        ("interrupts", "acknowledged writes checked", r.checked),
        ("interrupts", "**hangs / trials failing**", f"{r.hangs} / {len(r.errors)}"),
        ("interrupts", "**acknowledged writes lost / wrong bytes**", f"{r.lost} / {r.wrong}"),
        ("interrupts", "**files failing integrity_check**", r.not_ok),
        ("interrupts", "slowest write of another process meanwhile",
         f"{r.slowest_other_write_s * 1000:.0f} ms"),
    ]  # fmt: skip


def _deletion_rows(r: DeletionReport) -> list[Row]:
    return [
        ("deletions", "trials x seconds, files deleted in use",
         f"{r.trials} x {r.seconds:g} s, {r.deletions}"),
        ("deletions", "writes; flushes (that raised CacheError)",
         f"{r.writes}; {r.flushes} ({r.failed_flushes})"),
        ("deletions", "writes owed after the last deletion, checked", r.checked),
        ("deletions", "calls that raised CacheError", r.cache_errors),
        ("deletions", "**hangs / undocumented exceptions**", f"{r.hangs} / {len(r.errors)}"),
        ("deletions", "**acknowledged writes lost / wrong bytes**", f"{r.lost} / {r.wrong}"),
        ("deletions", "**files failing integrity_check**", r.not_ok),
    ]  # fmt: skip


def _tier_rows(r: TierReport) -> list[Row]:
    if r.skipped:
        return [("tiers", "not run", r.skipped)]
    return [
        ("tiers", "processes x seconds (a file each, one layer, one Redis)",
         f"{r.processes} x {r.seconds:g} s"),
        ("tiers", "Redis killed and started again", r.redis_restarts),
        ("tiers", "calls; reads, hits (from the layer / Redis)",
         f"{r.operations}; {r.reads}, {r.hits} ({r.layer_hits} / {r.remote_hits})"),
        ("tiers", "entries evicted from the files", r.evictions),
        ("tiers", "values left in Redis fetched and checked", r.remote_values_checked),
        ("tiers", "**errors reaching a caller**", r.errors),
        ("tiers", "**acknowledged writes lost / invalidations undone**", f"{r.lost} / {r.undone}"),
        ("tiers", "**wrong bytes returned**", r.wrong),
        ("tiers", "**Redis values failing verification**", r.rejected),
        ("tiers", "**file problems at the end**", r.file_problems),
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
        forks = timed("forks", lambda: run_fork_trials(work / "forks", args.forks, seed=seed))
        interrupts = timed(
            "interrupts",
            lambda: run_interrupt_trials(
                work / "interrupts", args.interrupts, args.interrupt_seconds, seed=seed
            ),
        )
        deletions = timed(
            "deletions",
            lambda: run_deletions(
                work / "deletions", args.deletions, args.deletion_seconds, seed=seed
            ),
        )
        tiers = timed("tiers", lambda: run_tiers(work / "tiers", args.tier_seconds, seed=seed))
    reports: list[Any] = [kills, contention, faults, corrupt, forks, interrupts, deletions, tiers]
    failures = sum(report.failures for report in reports)
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"vyre-sqlcache torture, seed {seed} ({spent})")
    print()
    rows = _kill_rows(kills) + _contention_rows(contention)
    rows += _fault_rows(faults) + _corruption_rows(corrupt)
    rows += _fork_rows(forks) + _interrupt_rows(interrupts) + _deletion_rows(deletions)
    rows += _tier_rows(tiers)
    print(format_table(rows))
    print()
    for report in reports:
        for detail in report.details:
            print(f"- {type(report).__name__}: {detail}")
    print("PASS: nothing lost, nothing wrong" if failures == 0 else f"FAIL: {failures} failures")
    return 0 if failures == 0 else 1
