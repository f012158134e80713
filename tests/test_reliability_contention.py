"""Contention: processes share one small-capped file; no errors, nothing wrong, cap held.

The long version is `python -m torture --seconds 30`.
"""

from __future__ import annotations

import random
from pathlib import Path

from torture.common import entry_key_of, tag_matches, tagged_blob
from torture.contention import _Contender, run_contention
from vyre_sqlcache import PipelineCache


def test_four_processes_with_a_small_cap(tmp_path: Path) -> None:
    cap = 3 << 20
    report = run_contention(tmp_path, 3.0, processes=4, cap=cap, seed=3)
    assert report.details == []
    assert report.processes == 4
    assert (report.errors, report.lost, report.wrong) == (0, 0, 0)
    assert (report.cap_exceeded, report.file_problems) == (0, 0)
    # The trial did what it is for: many calls, reads that hit, and eviction at work.
    assert report.writes > 100 and report.hits > 50
    assert report.evictions > 0
    assert report.slowest_close_s < 5


def test_tagged_blobs_reveal_foreign_or_torn_bytes() -> None:
    mine, other = entry_key_of(0), entry_key_of(1)
    blob = tagged_blob(mine, 7, 5000)
    assert tag_matches(mine, blob)
    assert not tag_matches(other, blob)  # filed under the wrong key
    assert not tag_matches(mine, blob[:-1])  # cut short
    assert not tag_matches(mine, blob[:100] + b"\0" + blob[101:])  # one byte off
    assert not tag_matches(mine, b"")


def test_the_contender_flags_a_lost_own_write(tmp_path: Path) -> None:
    # The checker itself: an own write gone with no eviction since is reported.
    with PipelineCache.open(tmp_path / "cache.sqlite3", max_bytes=None) as cache:
        contender = _Contender(cache, random.Random(1), worker=0)
        slot = contender.own[0]
        contender.write([slot])
        contender.judge(slot, None)  # as if the write had vanished
        assert contender.report.lost == 1
        contender.judge(slot, tagged_blob(entry_key_of(slot + 1), 1, 100))
        assert contender.report.wrong == 1
