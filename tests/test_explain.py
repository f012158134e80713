"""Why did this miss? `explain`, the departure record and the miss log (migration 0007)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import damage_blob, wait_purged
from vyre_sqlcache import (
    CacheError,
    DeviceFingerprint,
    FeatureFlags,
    PipelineCache,
    PipelineCacheKey,
    _explain,
    _explain_sql,
)
from vyre_sqlcache.cli import main
from vyre_sqlcache.keys import entry_id

SQLITE3_SHELL = shutil.which("sqlite3")
BLOB = b"\x03\x02\x23\x07" + bytes(range(256)) * 4

Key = Callable[..., PipelineCacheKey]


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(row) for row in connection.execute(sql)]
    finally:
        connection.close()


@pytest.fixture
def logged(cache_path: Path) -> Iterator[PipelineCache]:
    """A fresh cache that logs its misses."""
    with PipelineCache.open(cache_path, log_misses=True) as opened:
        yield opened


# -- explain: one test per reason --------------------------------------------------------


def test_a_committed_entry_is_a_hit_in_the_file(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    cache.put(key, fingerprint, BLOB)
    cache.flush()
    hits = cache.stats().hits
    why = cache.explain(key, fingerprint)
    assert (why.outcome, why.reason, why.where) == ("hit", "hit", "file")
    assert why.entry_key == key.entry_key(fingerprint).hex()
    assert why.summary == "a hit: the entry is in the cache file"
    assert cache.stats().hits == hits  # explaining counts no hit


def test_a_queued_entry_is_a_hit(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    cache.put(key, fingerprint, BLOB)  # write-behind: queued, committed a little later
    why = cache.explain(key, fingerprint)
    assert why.outcome == "hit" and why.where in ("queue", "file")


def fill_past_the_cap(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> list[PipelineCacheKey]:
    """Forty 4 KiB entries, each committed alone, into a cache capped at 64 KiB: the
    oldest are evicted one by one. Returns their keys, oldest first."""
    keys = [make_key() for _ in range(40)]
    for key in keys:
        cache.put(key, fingerprint, os.urandom(4096))
        cache.flush()
    return keys


def test_evicted_under_a_small_cap(
    cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    with PipelineCache.open(cache_path, max_bytes=64 << 10, compression="off") as cache:
        keys = fill_past_the_cap(cache, fingerprint, make_key)
        assert cache.stats().evictions > 0
        first = cache.explain(keys[0], fingerprint)
        assert (first.outcome, first.reason) == ("miss", "evicted")
        assert first.departure is not None and first.departure.reason == "evicted"
        assert first.summary.startswith(f"evicted at {first.departure.at} ")
        assert cache.explain(keys[-1], fingerprint).reason == "hit"
        evicted = cache.stats().total_evictions  # (this object's count misses group evictions)
    # Every eviction is in the record, each with the entry's key columns.
    recorded = rows(cache_path, "SELECT count(*), count(shader_hash) FROM departures")
    assert recorded == [(evicted, evicted)]


def test_evicted_from_a_group_of_writes_over_the_cap(
    cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    with PipelineCache.open(cache_path, max_bytes=64 << 10, compression="off") as cache:
        keys = [make_key() for _ in range(40)]
        for key in keys:  # queued: the writer thread commits them in groups over the cap
            cache.put(key, fingerprint, os.urandom(4096))
        cache.flush()
        why = cache.explain(keys[0], fingerprint)
        assert (why.reason, why.departure is not None) == ("evicted", True)
        assert cache.explain(keys[-1], fingerprint).reason == "hit"
        evicted = cache.stats().total_evictions  # (this object's count misses group evictions)
    assert rows(cache_path, "SELECT count(*), count(DISTINCT entry_key) FROM departures") == [
        (evicted,) * 2
    ]


@pytest.mark.parametrize("purged", [False, True], ids=["tombstoned", "purged"])
def test_invalidated(
    cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key, purged: bool
) -> None:
    digest = os.urandom(32)
    key = make_key()
    with PipelineCache.open(cache_path) as cache:
        cache.put(key, fingerprint, BLOB, program_digest=digest)
        cache.write(digest, fingerprint, BLOB)
        assert cache.invalidate_impacted([1], [digest], fingerprint) == 2
        if not purged:
            for why in (
                cache.explain(key, fingerprint),
                cache.explain_program(digest, fingerprint),
            ):
                assert (why.outcome, why.reason) == ("miss", "invalidated"), why
    if purged:
        assert rows(cache_path, "SELECT count(*) FROM tombstones") == [(0,)]
        with PipelineCache.open(cache_path) as cache:
            for why in (
                cache.explain(key, fingerprint),
                cache.explain_program(digest, fingerprint),
            ):
                assert (why.outcome, why.reason) == ("miss", "invalidated"), why
                assert why.summary.startswith("invalidated at ")


def test_deleted(cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key) -> None:
    key = make_key()
    cache.put(key, fingerprint, BLOB)
    assert cache.delete(key, fingerprint)
    why = cache.explain(key, fingerprint)
    assert (why.outcome, why.reason) == ("miss", "deleted")
    assert why.departure is not None and why.departure.reason == "deleted"
    # Written again, it is a hit: the record does not outlive a new entry.
    cache.put(key, fingerprint, BLOB)
    cache.flush()
    assert cache.explain(key, fingerprint).reason == "hit"


def test_damaged_then_dropped(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    cache.put(key, fingerprint, BLOB)
    cache.flush()
    damage_blob(cache, key.entry_key(fingerprint))
    before = cache.explain(key, fingerprint)  # found by explain, left for the read to drop
    assert (before.outcome, before.reason, before.departure) == ("miss", "damaged", None)
    assert "next read drops it" in before.summary
    assert cache.get(key, fingerprint) is None  # the read drops it
    after = cache.explain(key, fingerprint)
    assert (after.outcome, after.reason) == ("miss", "damaged")
    assert after.departure is not None and after.departure.reason == "damaged"
    assert after.summary.startswith("damaged and dropped at ")


def test_check_repair_records_damaged_entries(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    cache.put(key, fingerprint, BLOB)
    cache.flush()
    damage_blob(cache, key.entry_key(fingerprint))
    assert cache.check(repair=True).dropped == 1
    assert cache.explain(key, fingerprint).reason == "damaged"


#: (what changes in the lookup, the field that differs, the reason)
VARIANTS: list[tuple[dict[str, Any], str, str]] = [
    ({"driver": "555.42.02"}, "driver", "other driver"),
    ({"device": 0x2685}, "device", "other device"),
    ({"version": 2}, "key_version", "other key version"),
    ({"bind_group_layout_hash": b"\x99" * 32}, "layout", "other layout"),
    ({"push_constant_size": 32}, "push_constant_size", "other push-constant size"),
    ({"workgroup_size": (128, 1, 1)}, "workgroup", "other workgroup"),
    ({"feature_flags": FeatureFlags.F16}, "feature_flags", "other feature flags"),
    ({"backend": "metal"}, "backend", "other backend"),
]


@pytest.mark.parametrize(("change", "field", "reason"), VARIANTS, ids=[v[2] for v in VARIANTS])
def test_another_field(
    cache: PipelineCache,
    make_key: Key,
    change: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    cached_fp = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
    key = make_key()
    cache.put(key, cached_fp, BLOB)
    cache.flush()
    fields = {
        "shader_hash": key.shader_hash,
        "bind_group_layout_hash": key.bind_group_layout_hash,
        "push_constant_size": key.push_constant_size,
        "workgroup_size": key.workgroup_size,
        "feature_flags": key.feature_flags,
        "backend": key.backend,
        "version": key.version,
    }
    asked_fp = DeviceFingerprint.from_parts(
        0x10DE, change.pop("device", 0x2684), change.pop("driver", "550.54.14")
    )
    asked = PipelineCacheKey(**{**fields, **change})  # type: ignore[arg-type]
    assert cache.get(asked, asked_fp) is None
    why = cache.explain(asked, asked_fp)
    assert (why.outcome, why.reason) == ("miss", reason)
    assert why.departure is None
    (nearest,) = why.nearest
    assert nearest.entry_key == key.entry_key(cached_fp).hex()
    assert nearest.fields == (field,)
    (difference,) = nearest.differences
    assert difference.cached != difference.asked
    assert difference.cached in why.summary and difference.asked in why.summary


def test_a_hit_in_a_layer_names_the_layer(
    tmp_path: Path, cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key, masked = make_key(), make_key()
    digest = os.urandom(32)
    layer = tmp_path / "app.layer"
    with PipelineCache.open(tmp_path / "ci.sqlite3") as ci:
        ci.put(key, fingerprint, BLOB)
        ci.put(masked, fingerprint, BLOB, program_digest=digest)
        ci.bundle(layer)
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        why = cache.explain(key, fingerprint)
        assert (why.outcome, why.where) == ("hit", f"layer {layer}")
        assert why.summary == f"a hit: served by the read-only layer {layer}"
        assert cache.stats().layer_hits == 0  # explaining counts no hit
        assert cache.invalidate_impacted([1], [digest], fingerprint) == 1
        assert cache.get(masked, fingerprint) is None
        hidden = cache.explain(masked, fingerprint)
        assert (hidden.outcome, hidden.reason) == ("miss", "invalidated")
        assert str(layer) in hidden.summary
        cache.put(masked, fingerprint, b"recompiled")  # a new entry is served first
        cache.flush()
        assert cache.explain(masked, fingerprint).where == "file"


def test_never_seen(cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key) -> None:
    cache.put(make_key(), fingerprint, BLOB)  # another shader
    why = cache.explain(make_key(), fingerprint)
    assert (why.outcome, why.reason, why.nearest, why.departure) == (
        "miss",
        "never seen",
        (),
        None,
    )
    assert why.summary.startswith("never seen: no entry of this shader")


def test_a_driver_update_counts_the_device_pipelines(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    keys = [make_key() for _ in range(3)]
    cache.put_many([(k, BLOB) for k in keys], fingerprint)
    cache.write(os.urandom(32), fingerprint, BLOB)  # by program digest: counts too
    cache.flush()
    updated = DeviceFingerprint.from_parts(fingerprint.vendor, fingerprint.device, "555.42.02")
    why = cache.explain(keys[0], updated)
    old, new = fingerprint.driver_digest.hex()[:12], updated.driver_digest.hex()[:12]
    assert why.summary == (
        f"a driver update: 4 pipelines of this device were compiled for driver {old}, you run {new}"
    )


def test_nearest_are_ranked_by_differing_fields_and_the_reason_by_priority(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    shader = os.urandom(32)
    asked = make_key(shader_hash=shader, push_constant_size=8, backend="vulkan")
    one = make_key(shader_hash=shader, bind_group_layout_hash=asked.bind_group_layout_hash)
    two = make_key(shader_hash=shader, backend="metal")
    updated = DeviceFingerprint.from_parts(fingerprint.vendor, fingerprint.device, "next")
    three = PipelineCacheKey(
        shader, asked.bind_group_layout_hash, 8, (64, 1, 1), asked.feature_flags, "vulkan", 0
    )
    cache.put(one, fingerprint, BLOB)  # push-constant size
    cache.put(two, fingerprint, BLOB)  # layout, push-constant size, backend
    cache.put(three, updated, BLOB)  # key version and driver
    cache.flush()
    why = cache.explain(asked, fingerprint)
    assert [n.fields for n in why.nearest] == [
        ("push_constant_size",),
        ("driver", "key_version"),
        ("backend", "layout", "push_constant_size"),
    ]
    assert why.reason == "other push-constant size"
    # With only the two-field entry as close, the driver comes before the key version.
    cache.delete(one, fingerprint)
    why = cache.explain(asked, fingerprint)
    assert why.reason == "other driver" and "also differs in key_version" in why.summary


def test_explain_program(cache: PipelineCache, fingerprint: DeviceFingerprint) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, BLOB)
    cache.flush()
    assert cache.explain_program(digest, fingerprint).reason == "hit"
    other_device = DeviceFingerprint.from_parts(0x1002, 0x744C, "550.54.14")
    why = cache.explain_program(digest.hex(), other_device)
    assert why.reason == "other device" and why.nearest[0].fields == ("device",)
    updated = DeviceFingerprint.from_parts(fingerprint.vendor, fingerprint.device, "next")
    assert cache.explain_program(digest, updated).reason == "other driver"
    assert cache.explain_program(os.urandom(32), fingerprint).reason == "never seen"


def test_explain_entry_takes_the_fields_from_the_record(
    logged: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    logged.put(key, fingerprint, BLOB)
    logged.flush()
    assert logged.explain_entry(key.entry_key(fingerprint)).reason == "hit"
    updated = DeviceFingerprint.from_parts(fingerprint.vendor, fingerprint.device, "next")
    missed = key.entry_key(updated)
    # Neither logged nor departed: nothing says what the key was.
    unknown = logged.explain_entry(missed)
    assert unknown.reason == "never seen" and "give the key fields" in unknown.summary
    assert logged.get(key, updated) is None  # now the miss log knows its fields
    assert logged.explain_entry(missed.hex()).reason == "other driver"
    logged.delete(key, fingerprint)
    departed = logged.explain_entry(key.entry_key(fingerprint))
    assert departed.reason == "deleted"


def test_explain_changes_nothing_in_the_file(
    cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    with PipelineCache.open(cache_path) as cache:
        cache.put(key, fingerprint, BLOB)
        cache.put(make_key(), fingerprint, BLOB)
    before = rows(cache_path, "SELECT * FROM entries ORDER BY id") + rows(
        cache_path, "SELECT * FROM meta ORDER BY name"
    )
    with PipelineCache.open(cache_path, readonly=True) as reader:
        assert reader.explain(key, fingerprint).reason == "hit"
        assert reader.explain(make_key(), fingerprint).reason == "never seen"
    after = rows(cache_path, "SELECT * FROM entries ORDER BY id") + rows(
        cache_path, "SELECT * FROM meta ORDER BY name"
    )
    assert before == after


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c, fp: c.explain(None, fp), TypeError, "key must be"),
        (lambda c, fp: c.explain_program(b"short", fp), ValueError, "program_digest"),
        (lambda c, fp: c.explain_program(os.urandom(32), "fp"), TypeError, "fingerprint"),
        (lambda c, fp: c.explain_entry("xyz"), ValueError, "entry_key"),
        (lambda c, fp: c.misses(limit=0), ValueError, "limit must be from 1 to 10000"),
        (lambda c, fp: c.misses(limit=True), TypeError, "limit must be an int"),
    ],
)
def test_bad_arguments_name_the_argument(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    call: Callable[[PipelineCache, Any], object],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        call(cache, fingerprint)


def test_a_disabled_cache_explains_nothing(
    monkeypatch: pytest.MonkeyPatch, cache_path: Path, make_key: Key
) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_DISABLE", "1")
    monkeypatch.setenv("VYRE_SQLCACHE_LOG_MISSES", "1")
    with PipelineCache.open(cache_path) as cache:
        fp = DeviceFingerprint.from_parts(1, 2, "x")
        assert cache.get(make_key(), fp) is None
        with pytest.raises(CacheError, match="disabled"):
            cache.explain(make_key(), fp)
        with pytest.raises(CacheError, match="disabled"):
            cache.misses()
    assert not cache_path.exists()


def test_explanations_are_validated_at_construction() -> None:
    key = "00" * 32
    with pytest.raises(ValueError, match="reason must be one of"):
        _explain.Explanation(key, "miss", "unlucky", "?")
    with pytest.raises(ValueError, match="does not go with"):
        _explain.Explanation(key, "hit", "evicted", "?", "file")
    with pytest.raises(ValueError, match="where is given exactly for a hit"):
        _explain.Explanation(key, "hit", "hit", "?")
    with pytest.raises(ValueError, match="entry_key"):
        _explain.Departure("00", "evicted", 0)
    with pytest.raises(ValueError, match="field must be one of"):
        _explain.Difference("colour", "red", "blue")


# -- the departure record ------------------------------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kept=st.integers(min_value=1, max_value=12),
    batches=st.lists(
        st.tuples(st.sampled_from(["deleted", "invalidated"]), st.integers(1, 6)), max_size=8
    ),
)
def test_the_departure_record_keeps_the_newest(
    monkeypatch: pytest.MonkeyPatch, kept: int, batches: list[tuple[str, int]]
) -> None:
    monkeypatch.setattr(_explain_sql, "KEPT_DEPARTURES", kept)
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    expected: list[tuple[bytes, str, int]] = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.sqlite3"
        with PipelineCache.open(path, compression="off") as cache:
            for batch, (reason, count) in enumerate(batches):
                digests = [os.urandom(32) for _ in range(count)]
                cache.write_many([(d, b"x" * 100) for d in digests], fp)
                if reason == "deleted":
                    cache.delete_entries([fp.cache_key(d) for d in digests])
                else:
                    cache.invalidate_impacted([1] * count, digests, fp)
                expected += [(fp.cache_key(d), reason, batch) for d in digests]
                # Departures are recorded in time order, to the millisecond.
                time.sleep(0.002)
            wait_purged(path)
        got = rows(path, "SELECT seq, entry_key, reason FROM departures ORDER BY seq")
    newest = expected[len(expected) - len(got) :]
    assert len(got) == min(kept, len(expected))
    # The newest rows, batch after batch (within a batch, in any order).
    assert [r for _, _, r in got] == [r for _, r, _ in newest]
    batch_of = {key: batch for key, _, batch in expected}
    assert [batch_of[bytes(k)] for _, k, _ in got] == [b for _, _, b in newest]
    assert [s for s, _, _ in got] == list(range(got[0][0], got[0][0] + len(got)) if got else [])


def test_a_departure_waiting_for_the_purge_is_explained_then_recorded(
    no_purge: None, cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key, digest = make_key(), os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.put(key, fingerprint, BLOB, program_digest=digest)
        assert cache.invalidate_impacted([1], [digest], fingerprint) == 1
        why = cache.explain(key, fingerprint)
        assert why.departure is not None and why.departure.reason == "invalidated"
        # Not copied yet: the tombstone carries it.
        assert rows(cache_path, "SELECT count(*) FROM departures") == [(0,)]
        cache.compact()  # purges first
    assert rows(cache_path, "SELECT count(*) FROM tombstone_reasons") == [(0,)]
    recorded = rows(cache_path, "SELECT seq, reason, entry_key, at FROM departures_v")
    assert recorded == [(1, "invalidated", key.entry_key(fingerprint).hex(), why.departure.at)]
    with PipelineCache.open(cache_path) as cache:
        assert cache.explain(key, fingerprint).departure == why.departure


def test_a_write_of_a_tombstoned_key_records_its_departure(
    no_purge: None, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest, fingerprint, b"old")
        cache.invalidate_impacted([1], [digest], fingerprint)
        cache.write(digest, fingerprint, b"new")
        cache.flush()
        assert cache.read(digest, fingerprint) == b"new"
    entry_key = fingerprint.cache_key(digest).hex()
    assert rows(cache_path, "SELECT seq, reason, entry_key, blob_size FROM departures_v") == [
        (1, "invalidated", entry_key, 3)
    ]


def test_a_tombstone_without_a_reason_is_purged_without_a_record(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    """A process of schema 7 that had the file open when it was migrated tombstones as it
    always did (and records its departures at once); the purge records none again."""
    digest = os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest, fingerprint, BLOB)
    connection = apsw.Connection(str(cache_path))
    with connection:  # schema 7's statement, word for word
        connection.execute(
            "INSERT OR IGNORE INTO tombstones SELECT id FROM entries "
            "WHERE id IN (?) AND id NOT IN (SELECT id FROM tombstones) RETURNING id",
            (entry_id(fingerprint.cache_key(digest)),),
        ).fetchall()
    connection.close()
    with PipelineCache.open(cache_path) as cache:
        assert cache.read(digest, fingerprint) is None
        wait_purged(cache_path)
    assert rows(cache_path, "SELECT count(*) FROM entries") == [(0,)]
    assert rows(cache_path, "SELECT count(*) FROM departures_v") == [(0,)]


def test_the_departure_record_keeps_ten_thousand(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    keys = [os.urandom(32) for _ in range(_explain_sql.KEPT_DEPARTURES + 50)]
    cache.put_entries([(k, b"x", None) for k in keys])
    assert cache.delete_entries(keys[:100]) == 100
    assert cache.delete_entries(keys[100:]) == len(keys) - 100
    wait_purged(cache.path)
    (count,) = rows(cache.path, "SELECT count(*) FROM departures")
    assert count == (_explain_sql.KEPT_DEPARTURES,)
    # The 50 oldest departures are gone from the record: those keys are never seen now.
    assert rows(cache.path, "SELECT min(seq) FROM departures") == [(51,)]


@pytest.mark.parametrize(
    ("cap", "kept"),
    [(512 << 10, _explain_sql.MIN_KEPT), (4 << 20, 512), (None, _explain_sql.KEPT_DEPARTURES)],
)
def test_a_small_cap_keeps_a_smaller_record(cache_path: Path, cap: int | None, kept: int) -> None:
    with PipelineCache.open(cache_path, max_bytes=cap) as cache:
        keys = [os.urandom(32) for _ in range(300)]
        cache.put_entries([(k, b"x", None) for k in keys])
        assert cache.delete_entries(keys) == 300
        wait_purged(cache_path)
        assert rows(cache_path, "SELECT count(*) FROM departures") == [(min(kept, 300),)]
        # A key pushed out of the record is "never seen", among as many as it keeps.
        summary = cache.explain_entry(os.urandom(32)).summary
        assert f"no departure among the newest {kept:,};" in summary, summary


# -- the miss log ---------------------------------------------------------------------------


def test_the_miss_log_is_off_by_default_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, cache_path: Path, make_key: Key
) -> None:
    monkeypatch.delenv("VYRE_SQLCACHE_LOG_MISSES", raising=False)
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    with PipelineCache.open(cache_path) as cache:
        for _ in range(3):
            assert cache.get(make_key(), fp) is None
            assert cache.read(os.urandom(32), fp) is None
            assert cache.get_many([make_key()], fp) == [None]
        cache.put(make_key(), fp, BLOB)  # a write transaction: bookkeeping is written
        cache.flush()
        assert cache.misses() == []
        assert cache.stats().misses == 9
    assert rows(cache_path, "SELECT count(*) FROM misses") == [(0,)]


@pytest.mark.parametrize(
    ("env", "argument", "logs"),
    [("1", None, True), ("true", None, True), ("0", None, False), ("1", False, False)],
)
def test_the_environment_turns_the_log_on_and_an_argument_wins(
    monkeypatch: pytest.MonkeyPatch,
    cache_path: Path,
    make_key: Key,
    env: str,
    argument: bool | None,
    logs: bool,
) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_LOG_MISSES", env)
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    with PipelineCache.open(cache_path, log_misses=argument) as cache:
        assert cache.get(make_key(), fp) is None
        assert len(cache.misses()) == logs


def test_a_bad_setting_is_refused(monkeypatch: pytest.MonkeyPatch, cache_path: Path) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_LOG_MISSES", "sometimes")
    with pytest.raises(ValueError, match="VYRE_SQLCACHE_LOG_MISSES must be 1 or 0"):
        PipelineCache.open(cache_path)
    monkeypatch.delenv("VYRE_SQLCACHE_LOG_MISSES")
    with pytest.raises(TypeError, match="log_misses must be True, False or None"):
        PipelineCache.open(cache_path, log_misses="yes")  # type: ignore[arg-type]


def test_misses_are_logged_per_call_and_explained_as_they_were(
    logged: PipelineCache, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    key = make_key()
    digest = os.urandom(32)
    hit = make_key()
    logged.put(hit, fingerprint, BLOB)
    logged.flush()
    assert logged.get(hit, fingerprint) == BLOB  # a hit is not logged
    assert logged.get(key, fingerprint) is None
    assert logged.read(digest, fingerprint) is None
    assert logged.get_many([hit, key], fingerprint) == [BLOB, None]
    # The application compiles and stores what missed: the log still says why it missed.
    logged.put(key, fingerprint, BLOB)
    logged.write(digest, fingerprint, BLOB)
    logged.flush()
    misses = logged.misses()
    assert [(m.call, m.entry_key) for m in misses] == [
        ("get_many", key.entry_key(fingerprint).hex()),
        ("read", fingerprint.cache_key(digest).hex()),
        ("get", key.entry_key(fingerprint).hex()),
    ]
    assert all(m.pid == os.getpid() for m in misses)
    assert all(m.explanation.reason == "never seen" for m in misses)
    assert logged.explain(key, fingerprint).reason == "hit"
    assert [m.entry_key for m in logged.misses(limit=1)] == [misses[0].entry_key]


def test_a_logged_miss_of_an_evicted_entry_says_evicted(
    cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key
) -> None:
    with PipelineCache.open(cache_path, max_bytes=64 << 10, compression="off") as cache:
        keys = fill_past_the_cap(cache, fingerprint, make_key)
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        assert cache.get(keys[0], fingerprint) is None
        cache.put(keys[0], fingerprint, os.urandom(4096))  # recompiled
        (miss,) = cache.misses()
        assert miss.explanation.reason == "evicted"


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kept=st.integers(min_value=1, max_value=8), count=st.integers(min_value=0, max_value=20))
def test_the_miss_log_keeps_the_newest(
    monkeypatch: pytest.MonkeyPatch, kept: int, count: int
) -> None:
    monkeypatch.setattr(_explain_sql, "KEPT_MISSES", kept)
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    digests = [os.urandom(32) for _ in range(count)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.sqlite3"
        with PipelineCache.open(path, log_misses=True) as cache:
            for i, digest in enumerate(digests):
                assert cache.read(digest, fp) is None
                if i % 3 == 0:
                    cache.write(os.urandom(32), fp, b"x")  # writes the buffer so far
        logged = rows(path, "SELECT program_digest FROM misses ORDER BY seq")
    assert [bytes(d) for (d,) in logged] == digests[-kept:]


def test_the_buffer_is_bounded_while_the_file_is_locked(
    monkeypatch: pytest.MonkeyPatch, cache_path: Path
) -> None:
    monkeypatch.setattr(_explain, "MISS_BUFFER", 10)
    monkeypatch.setattr(_explain, "MISS_WRITE_AT", 4)
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    digests = [os.urandom(32) for _ in range(35)]
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        locker = apsw.Connection(str(cache_path))
        locker.execute("BEGIN IMMEDIATE")
        try:
            for digest in digests:  # each due write finds the lock taken and waits not
                assert cache.read(digest, fp) is None
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        logged = [m.entry_key for m in cache.misses(limit=100)]
    assert logged == [fp.cache_key(d).hex() for d in reversed(digests[-10:])]


def test_a_failed_write_keeps_the_newest_misses(cache_path: Path) -> None:
    # Other threads refilled the buffer while its write failed: the rows put back pushed
    # the newest misses out instead of being dropped as the oldest.
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    PipelineCache.open(cache_path).close()
    log = _explain.MissLog()
    old = [i.to_bytes(32, "big") for i in range(10)]
    new = [i.to_bytes(32, "big") for i in range(100, 100 + _explain.MISS_BUFFER)]
    for key in old:
        log.record("get", key, fp)
    connection = apsw.Connection(str(cache_path))

    def refill_then_fail(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        for key in new:
            log.record("get", key, fp)
        return False  # the statement is aborted: the write fails

    connection.exec_trace = refill_then_fail
    with pytest.raises(apsw.ExecTraceAbort):
        log.write(connection)
    connection.exec_trace = None
    log.write(connection)
    connection.close()
    logged = [bytes(k) for (k,) in rows(cache_path, "SELECT entry_key FROM misses ORDER BY seq")]
    assert logged == new


def test_a_due_buffer_is_written_by_a_miss(cache_path: Path) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        for _ in range(_explain.MISS_WRITE_AT):
            assert cache.read(os.urandom(32), fp) is None
        # No write, no close: the miss that filled the buffer wrote it.
        assert rows(cache_path, "SELECT count(*) FROM misses") == [(_explain.MISS_WRITE_AT,)]


def test_a_readonly_cache_logs_nothing(cache_path: Path, fingerprint: DeviceFingerprint) -> None:
    with PipelineCache.open(cache_path) as cache:
        cache.write(os.urandom(32), fingerprint, BLOB)
    with PipelineCache.open(cache_path, readonly=True, log_misses=True) as reader:
        assert reader.read(os.urandom(32), fingerprint) is None
        assert reader.misses() == []
    assert rows(cache_path, "SELECT count(*) FROM misses") == [(0,)]


MISSING_CHILD = """
import os, sys
from vyre_sqlcache import DeviceFingerprint, PipelineCache
fp = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
with PipelineCache.open(sys.argv[1]) as cache:
    for _ in range(int(sys.argv[2])):
        assert cache.read(os.urandom(32), fp) is None
    print(os.getpid())
"""


def test_the_miss_log_across_processes(cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True)
    env = {**os.environ, "VYRE_SQLCACHE_LOG_MISSES": "1"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", MISSING_CHILD, str(cache_path), str(count)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for count in (3, 5, 7, 9)
    ]
    pids = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        pids.append(int(out))
    with PipelineCache.open(cache_path, readonly=True) as reader:
        by_pid = [m.pid for m in reader.misses()]
    # Four processes close at once: each waits for the others' lock to write its misses.
    counts = zip(pids, (3, 5, 7, 9), strict=True)
    assert sorted(by_pid) == sorted(p for p, n in counts for _ in range(n))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_does_not_log_its_parents_misses_again(cache_path: Path) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "x")
    before, in_child = os.urandom(32), os.urandom(32)
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        assert cache.read(before, fp) is None  # buffered in the parent
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                code = int(cache.read(in_child, fp) is not None)
                cache.close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    logged = rows(cache_path, "SELECT program_digest, pid FROM misses ORDER BY seq")
    assert sorted((bytes(d), p) for d, p in logged) == sorted(
        [(before, os.getpid()), (in_child, pid)]
    )


# -- the views -------------------------------------------------------------------------------


def _stdlib_rows(path: Path, sql: str) -> list[dict[str, Any]]:
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql)]
    finally:
        connection.close()


def _shell_rows(path: Path, sql: str) -> list[dict[str, Any]]:
    assert SQLITE3_SHELL is not None
    result = subprocess.run(
        [SQLITE3_SHELL, "-bail", "-json", str(path)],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else []  # type: ignore[no-any-return]


@pytest.fixture
def recorded(cache_path: Path, fingerprint: DeviceFingerprint, make_key: Key) -> Path:
    """A cache with one deleted keyed entry and one logged miss by program digest."""
    key = make_key(workgroup_size=(8, 4, 2), feature_flags=FeatureFlags.F16, backend="cuda")
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        cache.put(key, fingerprint, BLOB)
        cache.delete(key, fingerprint)
        assert cache.read(b"\x42" * 32, fingerprint) is None
    return cache_path


VIEW_QUERIES = (
    "SELECT entry_key, reason, kind, backend, vendor_hex, device_hex, feature_bits, "
    "workgroup, blob_size, at = strftime('%Y-%m-%dT%H:%M:%fZ', at_ms / 1000.0, 'unixepoch') "
    "AS at_ok FROM departures_v ORDER BY seq DESC",
    "SELECT call, vendor_hex, device_hex, program_digest, workgroup, pid, "
    "length(entry_key) AS key_chars FROM misses_v ORDER BY seq DESC",
)


def test_the_views_in_pythons_sqlite(recorded: Path, fingerprint: DeviceFingerprint) -> None:
    departures, misses = (_stdlib_rows(recorded, sql) for sql in VIEW_QUERIES)
    assert departures == [
        {
            "entry_key": departures[0]["entry_key"],
            "reason": "deleted",
            "kind": "keyed",
            "backend": "cuda",
            "vendor_hex": "0x10de",
            "device_hex": "0x2684",
            "feature_bits": 2,
            "workgroup": "8x4x2",
            "blob_size": len(BLOB),
            "at_ok": 1,
        }
    ]
    assert misses == [
        {
            "call": "read",
            "vendor_hex": "0x10de",
            "device_hex": "0x2684",
            "program_digest": "42" * 32,
            "workgroup": None,
            "pid": os.getpid(),
            "key_chars": 64,
        }
    ]


@pytest.mark.skipif(SQLITE3_SHELL is None, reason="no sqlite3 shell installed")
def test_the_views_in_the_sqlite3_shell(recorded: Path) -> None:
    for sql in VIEW_QUERIES:
        assert _shell_rows(recorded, sql + ";") == _stdlib_rows(recorded, sql)


# -- the command line -------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--path", str(path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_explain_by_key_fields_and_entry_key(
    capsys: pytest.CaptureFixture[str], cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    key = PipelineCacheKey(
        b"\x11" * 32,
        b"\x22" * 32,
        16,
        (64, 1, 1),
        FeatureFlags.SUBGROUP_OPS | FeatureFlags.F16,
        "vulkan",
    )
    with PipelineCache.open(cache_path) as cache:
        cache.put(key, fingerprint, BLOB)
    fields = [
        "--shader-hash", "11" * 32, "--layout-hash", "22" * 32, "--push-constant-size", "16",
        "--workgroup", "64x1x1", "--flag", "SUBGROUP_OPS", "--flag", "F16", "--backend", "vulkan",
        "--vendor", "0x10de", "--device", "0x2684",
    ]  # fmt: skip
    code, out, err = cli(capsys, cache_path, "explain", *fields, "--revision", "550.54.14")
    assert code == 0, err
    assert out.splitlines()[0] == "a hit: the entry is in the cache file"
    code, out, err = cli(capsys, cache_path, "explain", *fields, "--revision", "555.42.02")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("a driver update: 1 pipeline of this device was compiled for")
    assert "reason" in out and "other driver" in out and "driver" in lines[-1]
    updated = DeviceFingerprint.from_parts(0x10DE, 0x2684, "555.42.02")
    code, out, err = cli(
        capsys, cache_path, "explain", *fields, "--driver-digest", updated.driver_digest.hex(),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    answer = json.loads(out)
    assert answer["reason"] == "other driver"
    assert (
        answer["nearest"][0]["differences"]["driver"]["asked"] == updated.driver_digest.hex()[:12]
    )
    code, out, err = cli(
        capsys, cache_path, "explain", "--entry-key", key.entry_key(fingerprint).hex()
    )
    assert code == 0 and out.startswith("a hit"), err


def test_cli_explain_program(
    capsys: pytest.CaptureFixture[str], cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest, fingerprint, BLOB)
        cache.invalidate_impacted([1], [digest], fingerprint)
    code, out, err = cli(
        capsys, cache_path, "explain", "--program-digest", digest.hex(), "--vendor", "0x10de",
        "--device", "0x2684", "--revision", "550.54.14",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("invalidated at ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain"], "give --entry-key, --program-digest or --shader-hash"),
        (["explain", "--shader-hash", "11" * 32], "--shader-hash needs"),
        (["explain", "--entry-key", "zz"], "argument --entry-key"),
        (
            ["explain", "--program-digest", "11" * 32, "--vendor", "1", "--device", "2"],
            "needs --revision or --driver-digest",
        ),
        (["misses", "--limit", "0"], "argument --limit"),
    ],
)
def test_cli_usage_errors(
    capsys: pytest.CaptureFixture[str], cache_path: Path, argv: list[str], message: str
) -> None:
    with PipelineCache.open(cache_path):
        pass
    code, out, err = cli(capsys, cache_path, *argv)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_cli_misses(
    capsys: pytest.CaptureFixture[str],
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_key: Key,
) -> None:
    key = make_key()
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        cache.put(key, fingerprint, BLOB)
        cache.flush()
        updated = DeviceFingerprint.from_parts(fingerprint.vendor, fingerprint.device, "next")
        assert cache.get(key, updated) is None
        assert cache.read(os.urandom(32), fingerprint) is None
    code, out, err = cli(capsys, cache_path, "misses")
    assert code == 0, err
    lines = out.splitlines()
    assert " read " in lines[0] and "never seen" in lines[1]
    assert "never seen: never seen" not in out  # the reason once
    assert " get " in lines[2] and "a driver update" in lines[3]
    answer = json.loads(cli(capsys, cache_path, "misses", "--json", "--limit", "1")[1])
    assert [m["call"] for m in answer] == ["read"]
    assert answer[0]["explanation"]["reason"] == "never seen"
    assert answer[0]["pid"] == os.getpid()


def test_cli_explain_and_misses_never_write_the_file(
    capsys: pytest.CaptureFixture[str], cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache_path, log_misses=True) as cache:
        assert cache.read(digest, fingerprint) is None
    before = {p.name: p.read_bytes() for p in cache_path.parent.iterdir()}
    key = fingerprint.cache_key(digest).hex()
    for argv in (["explain", "--entry-key", key], ["misses"], ["misses", "--json"]):
        code, out, err = cli(capsys, cache_path, *argv)
        assert code == 0 and "never seen" in out, err
    assert {p.name: p.read_bytes() for p in cache_path.parent.iterdir()} == before
