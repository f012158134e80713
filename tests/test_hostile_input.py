"""Hostile input: bad arguments get their documented exception and change nothing; files
prepared by someone else are refused or handled without running their code."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vyre_sqlcache import (
    MAX_BLOB_BYTES,
    BlobTooLargeError,
    CacheError,
    CorruptCacheError,
    DeviceFingerprint,
    FeatureFlags,
    NotACacheError,
    PipelineCache,
    PipelineCacheKey,
    SchemaTooNewError,
)
from vyre_sqlcache import (
    _checksums as checksums,
)
from vyre_sqlcache._schema import latest_version
from vyre_sqlcache.keys import entry_id

from .helpers import connection_of, sql_shell
from .vfs import dump


def tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """`dump` less the checkpoint thread's own counter, which a commit of its may bump at
    any time (`log_restarts`: under a small cap the log starts over often)."""
    rows = dump(path)
    rows["meta"] = [row for row in rows["meta"] if row[0] != "log_restarts"]
    return rows


FP = DeviceFingerprint.from_parts(0x10DE, 0x2684, "hostile")
# Derandomized: CI sees the same examples every run (to explore, set derandomize=False
# and raise max_examples).
HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ----------------------------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(),
    st.text(max_size=70),
    st.binary(max_size=70),
    st.lists(st.integers(), min_size=2, max_size=4),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.dictionaries(st.integers(), st.integers(), max_size=2),
    st.builds(object),
    st.just(FeatureFlags.F16),
    st.just(b"\x00" * 33),
)
hex_text = st.text(alphabet="0123456789abcdefABCDEF xyz\n\u0660", max_size=70)
digests = st.one_of(junk, st.binary(min_size=30, max_size=34), hex_text, st.binary().map(bytearray))
u32s = st.one_of(junk, st.integers(min_value=-(2**70), max_value=2**70))
blobs = st.one_of(junk, st.binary(max_size=64), st.binary(max_size=64).map(memoryview))
item = st.one_of(junk, st.tuples(digests, blobs), st.tuples(junk, junk, junk))
items = st.one_of(junk, st.lists(item, max_size=3))


def key(**fields: Any) -> PipelineCacheKey:
    values: dict[str, Any] = {
        "shader_hash": b"\x11" * 32,
        "bind_group_layout_hash": b"\x22" * 32,
        "push_constant_size": 16,
        "workgroup_size": (64, 1, 1),
        "feature_flags": FeatureFlags.SUBGROUP_OPS,
        "backend": "vulkan",
    }
    values.update(fields)
    return PipelineCacheKey(**values)


# -- a cache every example of a property shares ------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineCache]:
    path = tmp_path_factory.mktemp("hostile") / "cache.sqlite3"
    with PipelineCache.open(path, max_bytes=1 << 20) as cache:
        cache.write_many([(bytes([i]) * 32, os.urandom(100 * i)) for i in range(1, 9)], FP)
        cache.put(key(), FP, b"keyed", program_digest=b"\x01" * 32)
        yield cache


def purged(cache: PipelineCache) -> None:
    """Purge the tombstoned entries here, so that the background purge changes nothing
    while a test compares the file before and after a call (a batch short of full
    leaves none)."""
    while cache._purge_batch():
        pass


def rejects_and_changes_nothing(cache: PipelineCache, call: Callable[[], object]) -> None:
    """`call` either works (the junk happened to be valid) or raises TypeError/ValueError
    (BlobTooLargeError is one) and leaves every table as it was."""
    cache.flush()  # earlier examples' queued writes reach the file first
    purged(cache)  # and the entries they invalidated or deleted are purged
    before = tables(cache.path)
    try:
        call()
    except (TypeError, ValueError):
        cache.flush()  # nothing queued either
        assert tables(cache.path) == before
    # Any other exception fails the test.


# -- bad arguments --------------------------------------------------------------------------

KEY_FIELDS = {
    "shader_hash": digests,
    "bind_group_layout_hash": digests,
    "push_constant_size": u32s,
    "workgroup_size": st.one_of(junk, st.lists(u32s, max_size=4), st.tuples(u32s, u32s, u32s)),
    "feature_flags": u32s,
    "backend": st.one_of(junk, st.text(max_size=20)),
    "version": u32s,
}


@HYPOTHESIS
@given(data=st.data(), field=st.sampled_from(sorted(KEY_FIELDS)))
def test_a_key_field_gets_type_or_value_error(data: st.DataObject, field: str) -> None:
    value = data.draw(KEY_FIELDS[field])
    try:
        made = key(**{field: value})
    except (TypeError, ValueError):
        return
    assert len(made.entry_key(FP)) == 32


@HYPOTHESIS
@given(vendor=u32s, device=u32s, driver=digests, revision=st.one_of(junk, st.text(max_size=20)))
def test_a_fingerprint_gets_type_or_value_error(
    vendor: Any, device: Any, driver: Any, revision: Any
) -> None:
    for build in (
        lambda: DeviceFingerprint(vendor, device, driver),
        lambda: DeviceFingerprint.from_parts(vendor, device, revision),
        lambda: DeviceFingerprint.from_parts(1, 2, "r", revision),
    ):
        try:
            made = build()
        except (TypeError, ValueError):
            continue
        assert len(made.cache_key(b"\0" * 32)) == 32


Draw = Callable[[st.SearchStrategy[Any]], Any]
created_ms = st.one_of(junk, st.integers(-(2**70), 2**70))

#: Every public call of a cache, with one argument drawn from a hostile strategy.
CALLS: dict[str, Callable[[PipelineCache, Draw], object]] = {
    "write.digest": lambda c, draw: c.write(draw(digests), FP, b"x"),
    "write.fingerprint": lambda c, draw: c.write(b"\5" * 32, draw(junk), b"x"),
    "write.blob": lambda c, draw: c.write(b"\5" * 32, FP, draw(blobs)),
    "write_many": lambda c, draw: c.write_many(draw(items), FP),
    "read.digest": lambda c, draw: c.read(draw(digests), FP),
    "read.fingerprint": lambda c, draw: c.read(b"\1" * 32, draw(junk)),
    "put.key": lambda c, draw: c.put(draw(junk), FP, b"x"),
    "put.blob": lambda c, draw: c.put(key(), FP, draw(blobs)),
    "put.program_digest": lambda c, draw: c.put(key(), FP, b"x", program_digest=draw(digests)),
    "put_many": lambda c, draw: c.put_many(draw(items), FP),
    "get": lambda c, draw: c.get(draw(junk), FP),
    "get_many": lambda c, draw: c.get_many(draw(st.one_of(junk, st.lists(junk))), FP),
    "contains": lambda c, draw: c.contains(draw(junk), FP),
    "delete": lambda c, draw: c.delete(draw(junk), FP),
    "invalidate.mask": lambda c, draw: c.invalidate_impacted(
        draw(st.one_of(junk, st.lists(u32s, min_size=2, max_size=2))),
        [b"\1" * 32, b"\2" * 32],
        FP,
    ),
    "invalidate.digests": lambda c, draw: c.invalidate_impacted(
        [1, 1], draw(st.one_of(junk, st.lists(digests, min_size=2, max_size=2))), FP
    ),
    "invalidate.fingerprint": lambda c, draw: c.invalidate_impacted([1], [b"\1" * 32], draw(junk)),
    "get_entry": lambda c, draw: c.get_entry(draw(digests)),
    "put_entry.key": lambda c, draw: c.put_entry(draw(digests), b"x"),
    "put_entry.blob": lambda c, draw: c.put_entry(b"\7" * 32, draw(blobs)),
    "put_entry.created_ms": lambda c, draw: c.put_entry(
        b"\7" * 32, b"x", created_ms=draw(created_ms)
    ),
    "delete_entries": lambda c, draw: c.delete_entries(draw(st.one_of(junk, st.lists(digests)))),
    "delete_where.vendor": lambda c, draw: c.delete_where(vendor=draw(u32s)),
    "delete_where.backend": lambda c, draw: c.delete_where(backend=draw(junk)),
    "delete_where.kind": lambda c, draw: c.delete_where(kind=draw(junk)),
    "delete_where.flags": lambda c, draw: c.delete_where(flags=draw(u32s)),
    "delete_where.program_digests": lambda c, draw: c.delete_where(
        program_digests=draw(st.one_of(junk, st.lists(digests)))
    ),
    "check_entry": lambda c, draw: c.check_entry(draw(digests)),
}


@settings(HYPOTHESIS, max_examples=300)
@given(data=st.data(), name=st.sampled_from(sorted(CALLS)))
def test_every_call_rejects_junk_and_changes_nothing(
    shared: PipelineCache, data: st.DataObject, name: str
) -> None:
    rejects_and_changes_nothing(shared, lambda: CALLS[name](shared, data.draw))


@HYPOTHESIS
@given(max_bytes=junk)
def test_open_rejects_a_junk_cap_before_creating_anything(tmp_path: Path, max_bytes: Any) -> None:
    path = tmp_path / f"cap-{os.urandom(4).hex()}" / "cache.sqlite3"
    try:
        PipelineCache.open(path, max_bytes=max_bytes).close()
    except (TypeError, ValueError):
        assert not path.exists()


@HYPOTHESIS
@given(digest=st.binary(min_size=32, max_size=32), blob=st.binary(max_size=300))
def test_str_and_bytes_digests_name_the_same_entry(
    shared: PipelineCache, digest: bytes, blob: bytes
) -> None:
    shared.write(digest.hex().upper(), FP, blob)
    for spelling in (digest, bytearray(digest), memoryview(digest), digest.hex()):
        assert shared.read(spelling, FP) == blob
    assert shared.get_entry(FP.cache_key(digest).hex()) == blob
    assert shared.delete_entries([FP.cache_key(digest).hex()]) == 1


SPELLINGS = {"bytes": bytes, "bytearray": bytearray, "hex": bytes.hex}


@HYPOTHESIS
@given(
    mask=st.lists(st.sampled_from([0, 1, 2, 0xFFFF_FFFF]), min_size=1, max_size=6),
    spellings=st.lists(st.sampled_from(sorted(SPELLINGS)), min_size=6, max_size=6),
)
def test_mask_values_choose_exactly_the_non_zero_digests(
    shared: PipelineCache, mask: list[int], spellings: list[str]
) -> None:
    digests_ = [bytes([0x80 + i]) * 32 for i in range(len(mask))]
    shared.write_many([(d, d) for d in digests_], FP)
    # All bytes or mixed spellings: the checks at C speed and the loop agree.
    spelled = [SPELLINGS[how](d) for how, d in zip(spellings, digests_, strict=False)]
    assert shared.invalidate_impacted(mask, spelled, FP) == sum(1 for m in mask if m)
    for value, digest in zip(mask, digests_, strict=True):
        assert shared.read(digest, FP) == (None if value else digest)
    shared.delete_entries([FP.cache_key(d) for d in digests_])


@HYPOTHESIS
@given(backend=st.text(min_size=1, max_size=40).filter(lambda s: not s.startswith("\x00")))
def test_any_unicode_backend_is_refused_or_round_trips(shared: PipelineCache, backend: str) -> None:
    try:
        made = key(backend=backend)
    except ValueError:  # lone surrogates
        return
    shared.put(made, FP, backend.encode("utf-8"))
    assert shared.get(made, FP) == backend.encode("utf-8")
    assert shared.delete(made, FP)


@pytest.mark.parametrize("backend", ["\x00", "\x00vulkan"])
def test_a_backend_with_nul_is_refused_or_round_trips(tmp_path: Path, backend: str) -> None:
    with PipelineCache.open(tmp_path / "cache.sqlite3") as cache:
        try:
            made = key(backend=backend)
        except ValueError:
            return
        cache.put(made, FP, b"blob")
        assert cache.get(made, FP) == b"blob"


@pytest.mark.parametrize(
    "item",
    [(), (key(),), [key()], "", {1: b"blob"}],
    ids=["empty", "key-only", "list", "empty-str", "mapping"],
)
def test_put_many_with_a_short_item_gets_type_or_value_error(
    shared: PipelineCache, item: Any
) -> None:
    purged(shared)
    before = tables(shared.path)
    with pytest.raises((TypeError, ValueError)):
        shared.put_many([item], FP)
    assert tables(shared.path) == before


@pytest.mark.parametrize("created_ms", [2**63, -(2**63) - 1, 10**30])
def test_put_entry_with_an_out_of_range_time_gets_value_error(
    shared: PipelineCache, created_ms: int
) -> None:
    before = tables(shared.path)
    with pytest.raises(ValueError):
        shared.put_entry(b"\7" * 32, b"x", created_ms=created_ms)
    assert tables(shared.path) == before


def test_blobs_over_the_limit_or_the_cap_are_refused(tmp_path: Path) -> None:
    with PipelineCache.open(tmp_path / "cache.sqlite3", max_bytes=1000) as cache:
        cache.write(b"\1" * 32, FP, b"kept")
        cache.flush()
        before = tables(cache.path)
        with pytest.raises(BlobTooLargeError):
            cache.write(b"\2" * 32, FP, os.urandom(1001))  # incompressible
        with pytest.raises(BlobTooLargeError):
            cache.write_many([(b"\2" * 32, os.urandom(600)), (b"\3" * 32, os.urandom(600))], FP)
        big = bytearray(MAX_BLOB_BYTES + 1)
        for call in (
            lambda: cache.write(b"\2" * 32, FP, big),
            lambda: cache.put(key(), FP, memoryview(big)),
            lambda: cache.put_entry(b"\2" * 32, big),
        ):
            with pytest.raises(BlobTooLargeError, match="64 MiB"):
                call()
        assert tables(cache.path) == before


# -- files prepared by someone else ----------------------------------------------------------


def made_cache(path: Path) -> Path:
    with PipelineCache.open(path) as cache:
        cache.write(b"\1" * 32, FP, b"hello")
    return path


def plant(path: Path, *statements: str) -> None:
    """Change a closed cache file with a plain connection (not defensive, schema trusted)."""
    sql_shell(path, *statements)


def planted_file(path: Path) -> Path:
    """Where the planted file is now: still at `path`, or moved aside by healing."""
    moved = sorted(path.parent.glob(path.name + ".corrupt-*[0-9Z]"))
    return moved[0] if moved else path


@pytest.fixture
def evil_calls() -> Iterator[list[object]]:
    """Every connection apsw opens gets a function `evil()` that records its calls
    (registered without SQLITE_INNOCUOUS, as an application's own functions would be)."""
    calls: list[object] = []

    def hook(connection: apsw.Connection) -> None:
        connection.create_scalar_function("evil", lambda *args: calls.append(args) or 1, -1)

    apsw.connection_hooks.append(hook)
    try:
        yield calls
    finally:
        apsw.connection_hooks.remove(hook)


def test_connections_are_defensive_and_distrust_the_schema(tmp_path: Path) -> None:
    with PipelineCache.open(tmp_path / "cache.sqlite3") as cache:
        connection = connection_of(cache)
        assert connection.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, -1) == 1
        assert connection.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, -1) == 0
        with pytest.raises(apsw.Error):  # defensive: the schema cannot be rewritten
            connection.execute("PRAGMA writable_schema = ON; DELETE FROM sqlite_schema")


def test_a_planted_trigger_or_view_calling_a_function_never_runs_it(
    tmp_path: Path, evil_calls: list[object]
) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    plant(
        path,
        "CREATE TRIGGER evil_insert AFTER INSERT ON entries BEGIN SELECT evil(new.id); END",
        "CREATE TRIGGER evil_update AFTER UPDATE ON entries BEGIN SELECT evil(new.id); END",
        "CREATE VIEW evil_view AS SELECT evil('view') AS x",
    )
    try:
        with PipelineCache.open(path) as cache:
            assert cache.read(b"\1" * 32, FP) in (None, b"hello")
            for call in (
                lambda: cache.write(b"\2" * 32, FP, b"planted"),
                lambda: cache.invalidate_impacted([1], [b"\1" * 32], FP),
                cache.flush,
                cache.stats,
            ):
                with suppress(CacheError):  # refused ('unsafe use of evil()'), never run
                    call()
    except (NotACacheError, CorruptCacheError):
        pass  # refused at open
    assert evil_calls == []


def test_a_planted_trigger_that_writes_never_runs(tmp_path: Path) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    plant(
        path,
        "CREATE TABLE loot (data BLOB)",
        "CREATE TRIGGER steal AFTER INSERT ON blobs BEGIN "
        "INSERT INTO loot VALUES (new.data); "
        "UPDATE meta SET value = -1000000000 WHERE name = 'blob_bytes'; END",
    )
    with suppress(NotACacheError, CorruptCacheError), PipelineCache.open(path) as cache:
        cache.write(b"\2" * 32, FP, b"secret" * 100)  # refused, healed or handled
    rows = dump(planted_file(path))
    assert rows["loot"] == []
    assert ("blob_bytes", 5) in rows["meta"] or ("blob_bytes", 605) in rows["meta"]


def test_a_wrong_schema_is_refused_or_handled_without_writing(tmp_path: Path) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    plant(path, "DROP TABLE blobs", "CREATE TABLE blobs (id INTEGER PRIMARY KEY, data TEXT)")
    before = dump(path)
    with suppress(NotACacheError, CorruptCacheError), PipelineCache.open(path) as cache:
        assert cache.read(b"\1" * 32, FP) is None
        with suppress(CacheError):  # writes fail (or work on a new cache, if it healed)
            cache.write(b"\2" * 32, FP, b"x")
    assert dump(planted_file(path)) == before  # the planted file is never written


def test_a_wrong_schema_is_refused_at_open(tmp_path: Path) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    plant(path, "DROP TABLE blobs", "CREATE TABLE blobs (id INTEGER PRIMARY KEY, data TEXT)")
    with pytest.raises((NotACacheError, CorruptCacheError)):
        PipelineCache.open(path, strict=True)


@pytest.mark.parametrize("ahead", [1, 500])
def test_a_newer_user_version_is_refused_and_the_file_untouched(tmp_path: Path, ahead: int) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    plant(path, f"PRAGMA user_version = {latest_version() + ahead}")
    before = path.read_bytes()
    with pytest.raises(SchemaTooNewError):
        PipelineCache.open(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("version", [2**31 - 1, -2])
def test_a_user_version_out_of_any_range_is_set_back_and_nothing_lost(
    tmp_path: Path, version: int
) -> None:
    # The tables are the latest schema's: a header damaged or edited by hand. It made the
    # file unusable (negative) or moved it aside (huge), every entry lost.
    path = made_cache(tmp_path / "cache.sqlite3")
    plant(path, f"PRAGMA user_version = {version}")
    before = dump(path)
    with pytest.raises(CorruptCacheError, match=f"user_version {version}"):
        PipelineCache.open(path, readonly=True)
    assert dump(path) == before  # a reader changes nothing
    with PipelineCache.open(path, strict=True) as cache:
        assert cache.read(b"\1" * 32, FP) == b"hello"
        assert cache.schema_version() == latest_version()
    assert list(path.parent.glob("cache.sqlite3.corrupt-*")) == []


def planted_entry(path: Path, digest: bytes, data: bytes, blob_size: int) -> None:
    """An entry written by hand, with a right checksum and the given blob_size."""
    entry_key = FP.cache_key(digest)
    rowid = entry_id(entry_key)
    checksum = checksums.compute(checksums.DEFAULT, entry_key, data)
    plant(
        path,
        f"INSERT INTO entries (id, entry_key, vendor, device, driver_digest, program_digest, "
        f"blob_size, created_ms, accessed_ms, stored_size) VALUES ({rowid}, "
        f"x'{entry_key.hex()}', {FP.vendor}, {FP.device}, x'{FP.driver_digest.hex()}', "
        f"x'{digest.hex()}', {blob_size}, 0, 0, {len(data)})",
        f"INSERT INTO blobs (id, checksum_algo, checksum, data) VALUES ({rowid}, "
        f"'{checksums.DEFAULT}', x'{checksum.hex()}', x'{data.hex()}')",
    )


def test_a_planted_blob_larger_than_the_cap_is_read_right_then_evicted(tmp_path: Path) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    data = os.urandom(300_000)
    planted_entry(path, b"\x09" * 32, data, len(data))
    with PipelineCache.open(path, max_bytes=100_000) as cache:
        assert cache.read(b"\x09" * 32, FP) == data  # right bytes, whatever the cap
        cache.write(b"\x0a" * 32, FP, b"new" * 1000)
        assert cache.stats().blob_bytes <= 100_000
        assert cache.read(b"\x09" * 32, FP) is None
    assert dump(path)["meta"]


def test_bytes_filed_under_another_key_are_a_miss(tmp_path: Path) -> None:
    path = made_cache(tmp_path / "cache.sqlite3")
    with PipelineCache.open(path) as cache:
        cache.write(b"\2" * 32, FP, b"other bytes")
    victim, donor = (entry_id(FP.cache_key(bytes([b]) * 32)) for b in (1, 2))
    plant(
        path,
        f"UPDATE blobs SET (checksum, data) = (SELECT checksum, data FROM blobs "
        f"WHERE id = {donor}) WHERE id = {victim}",
    )
    with PipelineCache.open(path) as cache:
        assert cache.read(b"\1" * 32, FP) is None  # the checksum covers the key
        assert cache.read(b"\2" * 32, FP) == b"other bytes"
        assert cache.stats().checksum_failures == 1


@pytest.mark.parametrize(
    ("call", "item"),
    [
        ("write_many", b"\1" * 32),
        ("write_many", (b"\1" * 32,)),
        ("write_many", (b"\1" * 32, b"x", 3)),
        ("put_entries", (b"\1" * 32, b"x")),
        ("put_entries", "not an item"),
    ],
)
def test_a_batch_item_of_the_wrong_shape_names_the_item_and_the_shape(
    shared: PipelineCache, call: str, item: Any
) -> None:
    shared.flush()
    purged(shared)
    before = tables(shared.path)
    good = (b"\2" * 32, b"fine") if call == "write_many" else (b"\2" * 32, b"fine", None)
    batch = [good, item]
    with pytest.raises(TypeError, match=rf"{call} items must be \(.*\) tuples; item 1 is"):
        shared.write_many(batch, FP) if call == "write_many" else shared.put_entries(batch)
    shared.flush()
    assert tables(shared.path) == before


def test_a_released_memoryview_is_refused_by_name(shared: PipelineCache) -> None:
    view = memoryview(b"gone")
    view.release()
    shared.flush()
    purged(shared)
    before = tables(shared.path)
    with pytest.raises(ValueError, match="blob is a released memoryview"):
        shared.write(b"\3" * 32, FP, view)
    shared.flush()
    assert tables(shared.path) == before


def test_one_key_twice_in_a_batch_is_measured_once_against_the_cap(tmp_path: Path) -> None:
    # Only the last write of a key is stored: two 6-byte writes fit a 10-byte cap.
    with PipelineCache.open(tmp_path / "c.sqlite3", max_bytes=10, compression="off") as cache:
        cache.write_many([(b"\4" * 32, b"first!"), (b"\4" * 32, b"second")], FP)
        assert cache.read(b"\4" * 32, FP) == b"second"


def test_a_negative_cap_in_the_file_is_not_obeyed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite3"
    PipelineCache.open(path, max_bytes=1 << 20).close()
    raw = apsw.Connection(str(path))
    raw.execute("UPDATE meta SET value = -5 WHERE name = 'setting:max_bytes'")
    assert raw.changes() == 1
    raw.close()
    with PipelineCache.open(path, compression="off") as cache:
        for i in range(3):
            cache.write(bytes([i]) * 32, FP, b"blob")
            cache.flush()
        assert [cache.read(bytes([i]) * 32, FP) for i in range(3)] == [b"blob"] * 3
    warned = [r for r in caplog.records if "size cap of -5 bytes" in r.getMessage()]
    assert len(warned) == 1
