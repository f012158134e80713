"""Injected I/O faults: every call returns, misses or raises a CacheError; the cache recovers.

`FaultyVFS` (in torture) fails reads, writes or syncs with apsw.IOError, or
writes with apsw.FullError, on the calls a `FaultPlan` picks. The long version is
`python -m torture --faults 60`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest

from torture.common import (
    FINGERPRINT,
    check_file,
    entry_key_of,
    invalidate_slots,
    pipeline_key,
    program_digest,
    read_slot,
    write_slots,
)
from torture.faults import run_faults
from torture.shims import FaultPlan, FaultyVFS, registered
from vyre_sqlcache import CacheError, CacheFullError, PipelineCache, ReadOnlyCacheError

KINDS = ["read", "write", "sync", "full"]
#: Slots 0..7: four program entries (0, 1, 2, 4...) and keyed ones (3, 7).
BLOBS = {slot: os.urandom(2000 + 7000 * slot) for slot in range(8)}


@pytest.fixture
def faulty(request: pytest.FixtureRequest) -> Iterator[FaultyVFS]:
    with registered(FaultyVFS(f"faulty-{request.node.name}")) as vfs:
        try:
            yield vfs
        finally:
            vfs.disarm()  # connections a failed test left open close without faults


def populated(path: Path, vfs: FaultyVFS) -> PipelineCache:
    """A cache object on the faulty VFS, with a cold page cache: its reads reach the VFS."""
    with PipelineCache.open(path, max_bytes=None) as cache:
        for slot, blob in BLOBS.items():
            write_slots(cache, [(slot, blob)])
    # Each write commits before it returns, so that a fault is raised by the call that met it.
    return PipelineCache.open(path, max_bytes=None, vfs=vfs.name, write_behind=False)


def public_calls(cache: PipelineCache, vfs: FaultyVFS) -> dict[str, Callable[[], object]]:
    """One use of every public call (reads return what they read)."""
    new = os.urandom(5000)
    return {
        "open": lambda: PipelineCache.open(cache.path, max_bytes=None, vfs=vfs.name).close(),
        "write": lambda: cache.write(program_digest(100), FINGERPRINT, new),
        "write_many": lambda: write_slots(cache, [(101, new), (102, new)]),
        "put": lambda: cache.put(pipeline_key(103), FINGERPRINT, new),
        "put_many": lambda: write_slots(cache, [(107, new), (111, new)]),
        "put_entry": lambda: cache.put_entry(os.urandom(32), new),
        "read": lambda: {0: read_slot(cache, 0), 5: read_slot(cache, 5)},
        "get": lambda: {3: read_slot(cache, 3)},
        "get_many": lambda: dict(
            zip(
                (3, 7), cache.get_many([pipeline_key(3), pipeline_key(7)], FINGERPRINT), strict=True
            )
        ),
        "get_entry": lambda: {6: cache.get_entry(entry_key_of(6))},
        "contains": lambda: cache.contains(pipeline_key(7), FINGERPRINT),
        "check_entry": lambda: cache.check_entry(entry_key_of(1)),
        "stats": cache.stats,
        "len": lambda: len(cache),
        "delete": lambda: cache.delete(pipeline_key(7), FINGERPRINT),
        "delete_entries": lambda: cache.delete_entries([entry_key_of(2)]),
        "invalidate_impacted": lambda: invalidate_slots(cache, [4, 5], [1, 0]),
        "flush": cache.flush,
    }


def check_reads(result: object) -> None:
    """A read under faults is a miss or the right bytes, never other bytes."""
    if isinstance(result, dict):
        for slot, got in result.items():
            assert got is None or got == BLOBS[slot], f"slot {slot} read wrong bytes"


def still_right(cache: PipelineCache) -> None:
    for slot, blob in BLOBS.items():
        assert read_slot(cache, slot) in (None, blob)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_every_public_call_returns_misses_or_raises_a_cache_error(
    tmp_path: Path, faulty: FaultyVFS, kind: str, every: int
) -> None:
    path = tmp_path / "cache.sqlite3"
    cache = populated(path, faulty)
    faulty.arm(FaultPlan(frozenset({kind}), every=every))
    raised: dict[str, str] = {}
    for name, call in public_calls(cache, faulty).items():
        try:
            check_reads(call())
        except CacheError as error:  # anything else fails the test
            raised[name] = type(error).__name__
    assert faulty.injected > 0
    if kind == "full" and every == 1:
        assert raised["write"] == CacheFullError.__name__
    faulty.disarm()

    # Once the faults stop, the same object works again.
    blob = os.urandom(9000)
    write_slots(cache, [(200, blob)])
    assert read_slot(cache, 200) == blob
    cache.flush()
    still_right(cache)
    cache.close()

    # The file is sound, and a normal open neither heals nor loses what was right.
    checked = check_file(path)
    assert checked.ok, (checked.integrity, checked.problems)
    with PipelineCache.open(path) as reopened:
        assert not list(tmp_path.glob("*.corrupt-*")), "a sound file was moved aside"
        assert read_slot(reopened, 200) == blob
        still_right(reopened)


@pytest.mark.parametrize("kind", ["read", "write", "full"])
def test_opening_under_faults_raises_a_cache_error_and_never_moves_the_file(
    tmp_path: Path, faulty: FaultyVFS, kind: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    populated(path, faulty).close()
    faulty.arm(FaultPlan(frozenset({kind})))
    with contextlib.suppress(CacheError):
        PipelineCache.open(path, vfs=faulty.name).close()
    faulty.disarm()
    assert not list(tmp_path.glob("*.corrupt-*"))
    with PipelineCache.open(path) as reopened:
        still_right(reopened)
        assert len(reopened) == len(BLOBS)


def test_creating_a_cache_on_a_full_disk_raises_cache_error(
    tmp_path: Path, faulty: FaultyVFS
) -> None:
    faulty.arm(FaultPlan(frozenset({"full"})))
    with pytest.raises(CacheError):
        PipelineCache.open(tmp_path / "new.sqlite3", vfs=faulty.name)
    faulty.disarm()
    with PipelineCache.open(tmp_path / "new.sqlite3", vfs=faulty.name) as cache:
        write_slots(cache, [(0, b"fits now")])
        assert read_slot(cache, 0) == b"fits now"


@pytest.mark.parametrize(
    ("code", "error", "says"),
    [
        (errno.EROFS, ReadOnlyCacheError, "became read-only"),
        (errno.EIO, CacheError, "input/output error"),
    ],
)
def test_a_write_failing_with_a_system_error_says_which(
    tmp_path: Path, faulty: FaultyVFS, code: int, error: type[CacheError], says: str
) -> None:
    # SQLite's own message is "disk I/O error" whatever the system said.
    cache = populated(tmp_path / "cache.sqlite3", faulty)
    faulty.arm(FaultPlan(frozenset({"write"}), errno=code))
    with pytest.raises(error, match=says):
        write_slots(cache, [(300, b"refused")])
    slot, blob = next(iter(BLOBS.items()))
    assert read_slot(cache, slot) == blob  # reads go on
    faulty.disarm()
    write_slots(cache, [(300, b"written once the file system is back")])
    assert read_slot(cache, 300) == b"written once the file system is back"
    cache.close()


def test_get_many_under_read_faults_misses_or_raises_a_cache_error(
    tmp_path: Path, faulty: FaultyVFS
) -> None:
    cache = populated(tmp_path / "cache.sqlite3", faulty)
    keyed = [3, 7]
    faulty.arm(FaultPlan(frozenset({"read"})))
    try:
        got = cache.get_many([pipeline_key(s) for s in keyed], FINGERPRINT)
        assert all(g in (None, BLOBS[s]) for s, g in zip(keyed, got, strict=True))
    except CacheError:
        pass
    faulty.disarm()
    assert cache.get_many([pipeline_key(s) for s in keyed], FINGERPRINT) == [
        BLOBS[3],
        BLOBS[7],
    ]
    cache.close()


def test_random_fault_rounds(tmp_path: Path) -> None:
    report = run_faults(tmp_path, 12, seed=4)
    assert report.rounds == 12 and report.faults_injected > 50
    assert not report.undocumented_calls, report.details
    assert (report.wrong, report.failed_write_took_effect) == (0, 0), report.details
    assert (report.not_recovered, report.corrupt_after) == (0, 0), report.details
    assert (report.moved_aside, report.process_died) == (0, 0), report.details


def test_the_file_checker_flags_bad_checksums_and_bytes_the_model_never_wrote(
    tmp_path: Path,
) -> None:
    # The checker itself: the library's check_entry finds bytes that no longer match their
    # checksum, and the trial's model finds bytes it did not write under that key.
    path = tmp_path / "cache.sqlite3"
    with PipelineCache.open(path, max_bytes=None) as cache:
        write_slots(cache, [(0, BLOBS[0]), (1, BLOBS[1])])
    sound = check_file(path, lambda key, blob: blob == BLOBS[0 if key == entry_key_of(0) else 1])
    assert sound.ok and sound.entries == 2, sound.problems
    model = {entry_key_of(0): BLOBS[1], entry_key_of(1): BLOBS[1]}  # slot 0 "holds" BLOBS[1]
    wrong = check_file(path, lambda key, blob: model[key] == blob)
    assert wrong.sound and wrong.problems == [
        f"entry {entry_key_of(0).hex()[:16]} holds bytes the trial did not write there"
    ]
    damaged = bytes([BLOBS[1][0] ^ 0xFF]) + BLOBS[1][1:]  # same size: only the checksum tells
    connection = apsw.Connection(str(path))
    try:
        connection.execute(
            "UPDATE blobs SET data = ? WHERE id = (SELECT id FROM entries WHERE entry_key = ?)",
            (damaged, entry_key_of(1)),
        )
    finally:
        connection.close()
    bad = check_file(path)
    assert bad.sound and bad.problems == [f"entry {entry_key_of(1).hex()[:16]} fails its checksum"]
