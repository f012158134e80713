"""Kills and power cuts: nothing acknowledged is lost, nothing never written is read.

The long version is `python -m torture --kills 500`; these run the same
trials with a handful of kills.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from torture.common import FINGERPRINT, check_file, read_slot, sha, write_slots
from torture.kills import KillReport, _KillModel, run_kills
from torture.shims import SyncTrackingVFS, mark_synced, power_cut, registered
from vyre_sqlcache import PipelineCache

from .vfs import abandon


@pytest.fixture
def sync_vfs() -> Iterator[SyncTrackingVFS]:
    with registered(SyncTrackingVFS("kill-test-sync")) as vfs:
        yield vfs


def assert_clean(report: KillReport) -> None:
    assert report.details == []
    assert (report.lost, report.wrong, report.stale) == (0, 0, 0)
    assert (report.corrupt, report.healed, report.child_errors) == (0, 0, 0)


@pytest.mark.parametrize("power_cut_share", [0.0, 1.0], ids=["sigkill", "power-cut"])
def test_a_killed_writer_loses_nothing_it_acknowledged(
    tmp_path: Path, power_cut_share: float
) -> None:
    report = run_kills(tmp_path, 6, seed=11, power_cut_share=power_cut_share)
    assert_clean(report)
    assert report.kills == 6
    assert report.power_cuts == (6 if power_cut_share else 0)
    assert report.acknowledged_checked > 0


def test_killed_while_invalidating_with_sigkill_only(tmp_path: Path) -> None:
    # Without a power cut, a committed invalidation survives (the OS keeps the pages).
    report = run_kills(tmp_path, 5, seed=5, power_cut_share=0.0, invalidations=True)
    assert_clean(report)


def test_the_power_cut_shim_loses_what_was_not_synced(
    tmp_path: Path, sync_vfs: SyncTrackingVFS
) -> None:
    # The shim must be strict, or the power-cut trials prove nothing.
    path = tmp_path / "cache.sqlite3"
    # Committed but never synced (no write-behind: a queued write is not even committed).
    cache = PipelineCache.open(path, max_bytes=None, vfs=sync_vfs.name, write_behind=False)
    write_slots(cache, [(0, b"flushed")])
    cache.flush()
    write_slots(cache, [(1, b"not flushed")])
    power_cut(path)
    abandon(cache)
    with PipelineCache.open(path) as survivor:
        assert read_slot(survivor, 0) == b"flushed"
        assert read_slot(survivor, 1) is None


def test_mark_synced_makes_the_current_files_what_a_power_cut_returns_to(
    tmp_path: Path, sync_vfs: SyncTrackingVFS
) -> None:
    path = tmp_path / "cache.sqlite3"
    with PipelineCache.open(path, max_bytes=None) as cache:
        write_slots(cache, [(0, b"written through the normal VFS")])
    mark_synced(path)
    cache = PipelineCache.open(path, max_bytes=None, vfs=sync_vfs.name, write_behind=False)
    write_slots(cache, [(1, b"lost")])
    power_cut(path)
    abandon(cache)
    assert check_file(path).ok
    with PipelineCache.open(path) as survivor:
        assert read_slot(survivor, 0) == b"written through the normal VFS"
        assert read_slot(survivor, 1) is None


def test_the_kill_checker_flags_lost_stale_and_wrong_reads() -> None:
    # The checker itself: a lost write, an undone invalidation and foreign bytes are caught.
    model = _KillModel()
    model.replay(["R", "W 0 aaa", "C", "F", "W 0 bbb", "C", "W 1 ccc", "C", "F", "D 1", "C", "F"])
    report = KillReport()
    model.judge(0, "aaa", 2, report)  # bbb was flushed: aaa is a lost write
    model.judge(1, "ccc", 2, report)  # the flushed invalidation was undone
    assert (report.lost, report.stale, report.wrong) == (1, 1, 0)
    model.replay(["W 0 ddd", "C", "W 0 eee"])  # ddd committed, eee only asked for
    fine = KillReport()
    model.judge(0, "eee", 1, fine)  # after a kill: the committed one or a later one
    assert fine.failures == 0
    model.replay(["W 0 fff", "C"])
    model.judge(0, "zzz", 1, report)
    assert report.wrong == 1
    assert report.acknowledged_checked == 5  # fine counted the sixth


@pytest.mark.parametrize("how", ["invalidate_impacted", "delete_entries"])
def test_a_flushed_invalidation_survives_a_power_cut(
    tmp_path: Path, sync_vfs: SyncTrackingVFS, how: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    digest = os.urandom(32)
    cache = PipelineCache.open(path, vfs=sync_vfs.name)
    cache.write(digest, FINGERPRINT, b"stale pipeline")
    cache.flush()
    if how == "invalidate_impacted":
        assert cache.invalidate_impacted([1], [digest], FINGERPRINT) == 1
    else:
        assert cache.delete_entries([FINGERPRINT.cache_key(digest)]) == 1
    cache.flush()  # acknowledged: the invalidation is durable
    power_cut(path)
    abandon(cache)
    with PipelineCache.open(path) as survivor:
        assert sha(survivor.read(digest, FINGERPRINT)) is None
