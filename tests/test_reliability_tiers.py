"""The tiers: files of their own in front of a shipped layer and a Redis that is killed and
started again; no errors, no wrong bytes, nothing acknowledged lost.

The long version is `python -m torture --tier-seconds 20`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from torture.common import entry_key_of, is_keyed, tagged_blob
from torture.redis_server import find_redis_server
from torture.tiers import _TierContender, run_tiers
from vyre_sqlcache import PipelineCache


@pytest.mark.skipif(
    find_redis_server() is None,
    reason="redis-server is not installed: apt-get install redis-server (.ci/run does)",
)
def test_three_machines_one_layer_and_a_restarting_redis(tmp_path: Path) -> None:
    report = run_tiers(tmp_path, 5.0, processes=3, seed=5)
    assert report.details == []
    assert report.processes == 3 and report.failures == 0
    # The trial did what it is for: Redis went away and came back, and every tier served.
    assert report.redis_restarts >= 2
    assert report.layer_hits > 0 and report.remote_hits > 0 and report.evictions > 0
    assert report.remote_values_checked > 0


def test_the_tier_contender_judges_what_each_tier_may_serve(tmp_path: Path) -> None:
    with PipelineCache.open(tmp_path / "cache.sqlite3", max_bytes=None) as cache:
        contender = _TierContender(cache, random.Random(1), worker=0)
        program, keyed = (next(s for s in contender.own if is_keyed(s) == k) for k in (False, True))
        for slot in (program, keyed):
            contender.write([slot])
            contender.last[slot] = (None, 0)  # as after its invalidation
            contender.judge(slot, tagged_blob(entry_key_of(slot), 1, 100))
        # A program entry is fenced from the remote; a keyed one may come back from it.
        assert contender.undone == 1
        contender.write([program])
        contender.judge(program, None)  # gone, with nothing evicted
        assert contender.report.lost == 1
        contender.judge(program, tagged_blob(entry_key_of(program + 1), 1, 100))
        assert contender.report.wrong == 1
