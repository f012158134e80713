"""PipelineCache: the vyre API, the key API, checksums, atomicity and bad input."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
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
    DeviceFingerprint,
    FeatureFlags,
    PipelineCache,
    PipelineCacheKey,
)
from vyre_sqlcache.keys import entry_id

from .helpers import connection_of

KeyFactory = Callable[..., PipelineCacheKey]


def raw(path: Path) -> apsw.Connection:
    """A plain connection, as a person with the sqlite3 shell would have."""
    return apsw.Connection(str(path))


def snapshot(path: Path) -> list[tuple[Any, ...]]:
    connection = raw(path)
    try:
        return list(connection.execute("SELECT * FROM entries JOIN blobs USING (id) ORDER BY id"))
    finally:
        connection.close()


# -- the vyre API -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 4096, 65536, 256 * 1024, 256 * 1024 + 1, 1 << 20, 8 << 20, (8 << 20) + 1]
)
def test_write_then_read_returns_the_same_bytes(
    cache: PipelineCache, fingerprint: DeviceFingerprint, size: int
) -> None:
    digest = os.urandom(32)
    blob = os.urandom(size)
    cache.write(digest, fingerprint, blob)
    assert cache.read(digest, fingerprint) == blob
    assert cache.read(digest.hex(), fingerprint) == blob


def test_read_misses_for_unknown_digest_and_other_device(
    cache: PipelineCache, fingerprint: DeviceFingerprint, other_fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"blob")
    assert cache.read(os.urandom(32), fingerprint) is None
    assert cache.read(digest, other_fingerprint) is None


def test_write_replaces_and_survives_reopen(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest, fingerprint, b"first")
        cache.write(digest, fingerprint, b"second")
        assert len(cache) == 1
    with PipelineCache.open(cache_path) as cache:
        assert cache.read(digest, fingerprint) == b"second"


def test_accepts_bytearray_and_memoryview(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    a, b = os.urandom(32), os.urandom(32)
    cache.write(a, fingerprint, bytearray(b"abc"))
    cache.write(b, fingerprint, memoryview(b"defgh")[1:4])
    assert (cache.read(a, fingerprint), cache.read(b, fingerprint)) == (b"abc", b"efg")


def test_entries_record_their_key_columns(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint, make_key: KeyFactory
) -> None:
    key = make_key(workgroup_size=(8, 4, 2), feature_flags=FeatureFlags.F16 | (1 << 30))
    digest = os.urandom(32)
    cache.put(key, fingerprint, b"x" * 100, program_digest=digest)
    cache.flush()  # queued writes reach the file (and other connections)
    connection = raw(cache_path)
    row = connection.execute(
        "SELECT entry_key, key_version, shader_hash, layout_hash, push_constant_size, "
        "workgroup_x, workgroup_y, workgroup_z, feature_flags, backend, vendor, device, "
        "driver_digest, program_digest, blob_size FROM entries"
    ).fetchone()
    connection.close()
    assert row == (
        key.entry_key(fingerprint),
        key.version,
        key.shader_hash,
        key.bind_group_layout_hash,
        16,
        8,
        4,
        2,
        (1 << 30) | 2,
        "vulkan",
        fingerprint.vendor,
        fingerprint.device,
        fingerprint.driver_digest,
        digest,
        100,
    )


# -- blob size limit -------------------------------------------------------------------


def test_blob_over_the_limit_is_refused_and_nothing_is_written(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint, make_key: KeyFactory
) -> None:
    cache.write(os.urandom(32), fingerprint, b"existing")
    before = snapshot(cache_path)
    too_big = bytes(MAX_BLOB_BYTES + 1)
    with pytest.raises(BlobTooLargeError, match="67108864-byte"):
        cache.write(os.urandom(32), fingerprint, too_big)
    with pytest.raises(BlobTooLargeError):
        cache.put_many([(make_key(), b"ok"), (make_key(), too_big)], fingerprint)
    assert isinstance(BlobTooLargeError("x"), ValueError)
    assert snapshot(cache_path) == before


def test_blob_at_the_limit_is_stored(cache: PipelineCache, fingerprint: DeviceFingerprint) -> None:
    digest = os.urandom(32)
    blob = os.urandom(1024) * (MAX_BLOB_BYTES // 1024)
    cache.write(digest, fingerprint, blob)
    got = cache.read(digest, fingerprint)
    assert got is not None and hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()


# -- bad input leaves the cache unchanged ------------------------------------------------

BAD_CALLS: list[tuple[str, Callable[[PipelineCache, DeviceFingerprint], object], type, str]] = [
    ("digest length", lambda c, f: c.write(b"short", f, b"x"), ValueError, "program_digest"),
    ("digest type", lambda c, f: c.write(123, f, b"x"), TypeError, "program_digest"),
    ("blob type", lambda c, f: c.write(os.urandom(32), f, "text"), TypeError, "blob must be"),
    ("fingerprint", lambda c, f: c.write(os.urandom(32), None, b"x"), TypeError, "fingerprint"),
    ("read digest", lambda c, f: c.read("nothex", f), ValueError, "program_digest"),
    ("key type", lambda c, f: c.put("key", f, b"x"), TypeError, "key must be a PipelineCacheKey"),
    ("get key", lambda c, f: c.get(None, f), TypeError, "key must be"),
    (
        "mask length",
        lambda c, f: c.invalidate_impacted([1, 0], [os.urandom(32)], f),
        ValueError,
        "impact_mask has 2 values but program_digests has 1",
    ),
    (
        "mask value",
        lambda c, f: c.invalidate_impacted([-1], [os.urandom(32)], f),
        ValueError,
        r"impact_mask\[0\] must be in 0..4294967295",
    ),
    (
        "mask digest",
        lambda c, f: c.invalidate_impacted([1, 1], [os.urandom(32), b"x"], f),
        ValueError,
        r"program_digests\[1\]",
    ),
    (
        "mask bool",
        lambda c, f: c.invalidate_impacted([0, 0, True], [os.urandom(32)] * 3, f),
        TypeError,
        r"impact_mask\[2\] must be an int",
    ),
    (
        "mask too large",
        lambda c, f: c.invalidate_impacted([0, 2**32], [os.urandom(32)] * 2, f),
        ValueError,
        r"impact_mask\[1\] must be in 0..4294967295",
    ),
    (
        "mask float",
        lambda c, f: c.invalidate_impacted([1.0], [os.urandom(32)], f),
        TypeError,
        r"impact_mask\[0\] must be an int",
    ),
    (
        "masked-out digest",
        lambda c, f: c.invalidate_impacted([1, 0], [os.urandom(32), 7], f),
        TypeError,
        r"program_digests\[1\]",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"), [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS]
)
def test_bad_arguments_raise_and_change_nothing(
    cache: PipelineCache,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    call: Callable[[PipelineCache, DeviceFingerprint], object],
    error: type[Exception],
    message: str,
) -> None:
    cache.write(os.urandom(32), fingerprint, b"existing")
    before = snapshot(cache_path)
    with pytest.raises(error, match=message):
        call(cache, fingerprint)
    assert snapshot(cache_path) == before


# -- invalidate_impacted --------------------------------------------------------------


def test_invalidate_impacted_deletes_only_masked_digests_on_that_device(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    other_fingerprint: DeviceFingerprint,
    make_key: KeyFactory,
) -> None:
    digests = [os.urandom(32) for _ in range(10)]
    for digest in digests:
        cache.write(digest, fingerprint, b"a" + digest)
        cache.write(digest, other_fingerprint, b"b" + digest)
    keyed = make_key()
    cache.put(keyed, fingerprint, b"keyed", program_digest=digests[0])
    unlinked = make_key()
    cache.put(unlinked, fingerprint, b"unlinked")
    mask = [7, 0, 1, 0, 0, 0, 0, 0, 0, 2**32 - 1]

    assert cache.invalidate_impacted(mask, digests, fingerprint) == 4

    for value, digest in zip(mask, digests, strict=True):
        expected = None if value else b"a" + digest
        assert cache.read(digest, fingerprint) == expected
        assert cache.read(digest, other_fingerprint) == b"b" + digest
    assert not cache.contains(keyed, fingerprint)
    assert cache.get(unlinked, fingerprint) == b"unlinked"


@pytest.mark.parametrize("form", ["hex", "bytearray", "memoryview"])
def test_invalidate_takes_digests_in_every_accepted_form(
    cache: PipelineCache, fingerprint: DeviceFingerprint, form: str
) -> None:
    digests = [os.urandom(32) for _ in range(3)]
    cache.write_many([(digest, digest) for digest in digests], fingerprint)
    convert = {"hex": bytes.hex, "bytearray": bytearray, "memoryview": memoryview}[form]
    given = [convert(digest) for digest in digests]
    assert cache.invalidate_impacted([0, 1, 1], given, fingerprint) == 2
    assert [cache.read(d, fingerprint) for d in digests] == [digests[0], None, None]


def test_invalidate_with_nothing_impacted_is_a_no_op(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"x")
    assert cache.invalidate_impacted([], [], fingerprint) == 0
    assert cache.invalidate_impacted([0], [digest], fingerprint) == 0
    assert cache.read(digest, fingerprint) == b"x"


def test_invalidate_is_one_tombstone_statement(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digests = [os.urandom(32) for _ in range(200)]
    for digest in digests:
        cache.write(digest, fingerprint, b"x")
    statements: list[str] = []

    def trace(sql: str) -> None:
        statements.append(sql)

    connection_of(cache).trace_v2(apsw.SQLITE_TRACE_STMT, lambda event: trace(event["sql"]))
    try:
        cache.invalidate_impacted([1] * 200, digests, fingerprint)
    finally:
        connection_of(cache).trace_v2(0, None)
    marks = [s for s in statements if s.lstrip().upper().startswith("INSERT OR IGNORE INTO TOMB")]
    assert len(marks) == 1
    # the caller's transaction deletes nothing: the purge does, later
    assert not [s for s in statements if s.lstrip().upper().startswith("DELETE FROM ENTRIES")]
    assert len(cache) == 0


# -- the key API ----------------------------------------------------------------------


def test_put_get_contains_delete(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    other_fingerprint: DeviceFingerprint,
    make_key: KeyFactory,
) -> None:
    key = make_key()
    assert cache.get(key, fingerprint) is None
    assert not cache.contains(key, fingerprint)
    cache.put(key, fingerprint, b"pipeline")
    assert cache.get(key, fingerprint) == b"pipeline"
    assert cache.contains(key, fingerprint)
    assert not cache.contains(key, other_fingerprint)
    assert (
        cache.get(make_key(shader_hash=key.shader_hash, push_constant_size=32), fingerprint) is None
    )
    assert cache.delete(key, fingerprint)
    assert not cache.delete(key, fingerprint)
    assert cache.get(key, fingerprint) is None


def test_put_many_and_get_many(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: KeyFactory
) -> None:
    keys = [make_key() for _ in range(50)]
    blobs = [os.urandom(n) for n in range(50)]
    cache.put_many(zip(keys, blobs, strict=True), fingerprint)
    missing = make_key()
    assert cache.get_many([*keys, missing], fingerprint) == [*blobs, None]
    assert len(cache) == 50


_DIGESTS = [bytes([i]) * 32 for i in range(6)]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, len(_DIGESTS) - 1), st.binary(max_size=64)),
        min_size=1,
        max_size=30,
    ),
    write_behind=st.booleans(),
)
def test_the_last_write_of_a_key_in_one_group_wins(
    tmp_path: Path,
    fingerprint: DeviceFingerprint,
    writes: list[tuple[int, bytes]],
    write_behind: bool,
) -> None:
    # One call commits as one group, inserted in row id order: whatever the order, a key
    # reads back the bytes written to it last, also from another cache object.
    path = tmp_path / f"{os.urandom(4).hex()}.sqlite3"
    last = dict(writes)
    with PipelineCache.open(path, write_behind=write_behind) as cache:
        cache.write_many([(_DIGESTS[i], blob) for i, blob in writes], fingerprint)
        cache.flush()
        with PipelineCache.open(path) as other:
            for i, digest in enumerate(_DIGESTS):
                assert other.read(digest, fingerprint) == last.get(i)
            assert len(other) == len(last)


def test_unknown_flag_bits_round_trip(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint, make_key: KeyFactory
) -> None:
    key = make_key(feature_flags=(1 << 31) | (1 << 12) | 1)
    cache.put(key, fingerprint, b"x")
    cache.flush()  # queued writes reach the file (and other connections)
    connection = raw(cache_path)
    (flags,) = connection.execute("SELECT feature_flags FROM entries").fetchone()
    connection.close()
    assert flags == (1 << 31) | (1 << 12) | 1


# -- checksums ------------------------------------------------------------------------


def test_damaged_blob_is_a_miss_is_dropped_and_logged(
    cache: PipelineCache,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    digest, kept = os.urandom(32), os.urandom(32)
    cache.write(digest, fingerprint, b"good bytes")
    cache.write(kept, fingerprint, b"other")
    cache.flush()  # queued writes reach the file (and other connections)
    connection = raw(cache_path)
    connection.execute(
        "UPDATE blobs SET data = ? WHERE id = ?",
        (b"evil bytes", entry_id(fingerprint.cache_key(digest))),
    )
    connection.close()
    with caplog.at_level(logging.WARNING, logger="vyre_sqlcache"):
        assert cache.read(digest, fingerprint) is None
    assert "failed its xxh3-128 checksum" in caplog.text
    assert len(cache) == 1
    assert cache.read(kept, fingerprint) == b"other"
    connection = raw(cache_path)
    assert connection.execute(
        "SELECT value FROM meta WHERE name = 'checksum_failures'"
    ).fetchone() == (1,)
    connection.close()


def test_blob_moved_to_another_key_fails_its_checksum(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    a, b = os.urandom(32), os.urandom(32)
    cache.write(a, fingerprint, b"blob of a")
    cache.write(b, fingerprint, b"blob of b")
    cache.flush()  # queued writes reach the file (and other connections)
    id_a, id_b = (entry_id(fingerprint.cache_key(d)) for d in (a, b))
    connection = raw(cache_path)
    row = connection.execute(
        "SELECT checksum_algo, checksum, data FROM blobs WHERE id = ?", (id_a,)
    ).fetchone()
    connection.execute(
        "UPDATE blobs SET checksum_algo = ?, checksum = ?, data = ? WHERE id = ?", (*row, id_b)
    )
    connection.close()
    assert cache.read(b, fingerprint) is None
    assert cache.read(a, fingerprint) == b"blob of a"


def test_row_id_collision_is_a_miss_not_a_wipe(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"owner")
    owner_key = fingerprint.cache_key(digest)
    # Another key whose first 8 bytes (the row id) are the same.
    colliding = owner_key[:8] + bytes(24)
    assert cache.get_entry(colliding) is None
    assert cache.read(digest, fingerprint) == b"owner"


# -- atomicity --------------------------------------------------------------------------


def test_readers_never_see_a_partial_or_mixed_blob(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    versions = [bytes([i]) * (256 * 1024) for i in range(1, 8)]
    cache.write(digest, fingerprint, versions[0])
    driver = fingerprint.driver_digest.hex()
    reader = textwrap.dedent(
        f"""
        import sys, time
        from vyre_sqlcache import PipelineCache, DeviceFingerprint
        fp = DeviceFingerprint({fingerprint.vendor}, {fingerprint.device}, "{driver}")
        seen = set()
        deadline = time.monotonic() + 3
        with PipelineCache.open(sys.argv[1]) as cache:
            while time.monotonic() < deadline:
                blob = cache.read(bytes.fromhex("{digest.hex()}"), fp)
                assert blob is not None and len(blob) == 256 * 1024, len(blob or b"")
                assert blob == bytes([blob[0]]) * len(blob), "mixed blob"
                seen.add(blob[0])
                if len(seen) >= 4:
                    break
        print(len(seen))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", reader, str(cache_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        while process.poll() is None:
            for version in versions:
                cache.write(digest, fingerprint, version)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert int(out) >= 2


# -- lifecycle ------------------------------------------------------------------------


def test_closed_cache_raises_a_clear_error(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    cache = PipelineCache.open(cache_path)
    cache.close()
    cache.close()
    with pytest.raises(CacheError, match="is closed"):
        cache.read(os.urandom(32), fingerprint)


def test_close_leaves_one_file(cache_path: Path, fingerprint: DeviceFingerprint) -> None:
    with PipelineCache.open(cache_path) as cache:
        cache.write(os.urandom(32), fingerprint, os.urandom(100_000))
    wal = Path(str(cache_path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert cache_path.stat().st_size > 100_000


def test_default_path_is_in_the_user_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fingerprint: DeviceFingerprint
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "xdg" / "vyre" / "pipelines.sqlite3"
    if sys.platform == "linux":
        assert PipelineCache.default_path() == expected
    with PipelineCache.open() as cache:
        assert cache.path == PipelineCache.default_path()
        cache.write(os.urandom(32), fingerprint, b"x")
    assert PipelineCache.default_path().exists()


def test_threads_share_one_cache(cache: PipelineCache, fingerprint: DeviceFingerprint) -> None:
    import threading

    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(100):
                digest = hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=32).digest()
                cache.write(digest, fingerprint, digest * 3)
                assert cache.read(digest, fingerprint) == digest * 3
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(cache) == 400


def test_opening_a_folder_names_the_mistake(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="is a folder; give the path of a cache file"):
        PipelineCache.open(tmp_path)
    assert list(tmp_path.iterdir()) == []
