"""Bundle (a cache into a read-only layer file) and merge (cache files into a cache)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import (
    SCHEMA_VERSION,
    CacheError,
    CacheFullError,
    CorruptCacheError,
    DeviceFingerprint,
    FeatureFlags,
    PipelineCache,
    PipelineCacheKey,
    ReadOnlyCacheError,
    SchemaTooNewError,
    _schema,
)
from vyre_sqlcache.cli import main

from .corpus_blobs import blobs
from .helpers import back_to_schema, overwrite_page, run_script, schema_file


def key_of(n: int) -> bytes:
    return hashlib.sha256(b"entry %d" % n).digest()


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def damage(path: Path, entry_key: bytes) -> None:
    """Make an entry fail its checksum (its stored bytes changed under it)."""
    connection = apsw.Connection(str(path))
    connection.execute(
        "UPDATE blobs SET checksum = zeroblob(16) WHERE id = "
        "(SELECT id FROM entries WHERE entry_key = ?)",
        (entry_key,),
    )
    connection.close()


def header(path: Path) -> tuple[int, int]:
    """(file format write version: 1 rollback journal, 2 WAL; free-list pages)."""
    head = path.read_bytes()[:40]
    return head[18], struct.unpack(">I", head[36:40])[0]


# -- bundle ---------------------------------------------------------------------------------

FINGERPRINTS = {
    "nvidia": DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14"),
    "nvidia-new-driver": DeviceFingerprint.from_parts(0x10DE, 0x2684, "555.42.02"),
    "amd": DeviceFingerprint.from_parts(0x1002, 0x744C, "mesa 24.0.5"),
}


def _key(n: int, backend: str, version: int) -> PipelineCacheKey:
    return PipelineCacheKey(
        shader_hash=hashlib.sha256(b"shader %d" % n).digest(),
        bind_group_layout_hash=bytes(32),
        push_constant_size=16,
        workgroup_size=(64, 1, 1),
        feature_flags=FeatureFlags.F16,
        backend=backend,
        version=version,
    )


@pytest.fixture
def populated(cache_path: Path) -> tuple[Path, list[tuple[str, str, int, bytes]]]:
    """A closed cache of keyed entries over 3 fingerprints, 2 backends, 2 key versions;
    returns its path and (fingerprint name, backend, version, entry key) per entry."""
    rows = []
    corpus = blobs()
    with PipelineCache.open(cache_path) as cache:
        n = 0
        for name, fp in FINGERPRINTS.items():
            for backend in ("vulkan", "metal"):
                for version in (1, 2):
                    key = _key(n, backend, version)
                    cache.put(key, fp, corpus[n % len(corpus)])
                    rows.append((name, backend, version, key.entry_key(fp)))
                    n += 1
    return cache_path, rows


@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        ({}, lambda name, backend, version: True),
        ({"backend": "metal"}, lambda name, backend, version: backend == "metal"),
        ({"vendor": 0x1002}, lambda name, backend, version: name == "amd"),
        ({"device": 0x2684}, lambda name, backend, version: name != "amd"),
        (
            {"driver": FINGERPRINTS["nvidia-new-driver"].driver_digest},
            lambda name, backend, version: name == "nvidia-new-driver",
        ),
        ({"key_version": 2}, lambda name, backend, version: version == 2),
        (
            {"vendor": 0x10DE, "backend": "vulkan", "key_version": 1},
            lambda name, backend, version: name != "amd" and backend == "vulkan" and version == 1,
        ),
    ],
    ids=["all", "backend", "vendor", "device", "driver", "key-version", "several"],
)
def test_bundle_takes_the_entries_that_match_every_filter(
    tmp_path: Path,
    populated: tuple[Path, list[tuple[str, str, int, bytes]]],
    filters: dict[str, object],
    keep: Callable[[str, str, int], bool],
) -> None:
    path, rows = populated
    out = tmp_path / "out.layer"
    with PipelineCache.open(path, readonly=True) as cache:
        report = cache.bundle(out, **filters)  # type: ignore[arg-type]
    expected = {key for name, backend, version, key in rows if keep(name, backend, version)}
    with PipelineCache.open(out, readonly=True) as layer:
        got = {bytes.fromhex(row["entry_key"]) for row in layer.entries()}
        assert all(layer.check_entry(key) for key in got)
    assert got == expected and report.entries == len(expected) and report.skipped_bad == 0


def test_a_bundle_is_one_vacuumed_file_marked_as_a_layer(
    tmp_path: Path, populated: tuple[Path, list[tuple[str, str, int, bytes]]]
) -> None:
    path, rows = populated
    out = tmp_path / "ship" / "pipelines.layer"
    out.parent.mkdir()
    with PipelineCache.open(path) as cache:
        cache.delete_entries([rows[0][3]])  # a tombstoned entry is not bundled
        report = cache.bundle(out)
    assert report.entries == len(rows) - 1 and report.path == out
    assert os.listdir(out.parent) == ["pipelines.layer"]  # no temporary file, -wal or -shm
    assert header(out) == (1, 0)  # rollback journal (readers need no -shm), no free pages
    assert report.file_bytes == out.stat().st_size
    with PipelineCache.open(out, readonly=True) as layer:
        info = dict(layer.query("SELECT setting, value FROM info_v")[0].rows)
        assert info == {"layer": 1} and len(layer) == len(rows) - 1
    assert os.listdir(out.parent) == ["pipelines.layer"]


def test_bundle_skips_and_counts_damaged_entries(
    tmp_path: Path, populated: tuple[Path, list[tuple[str, str, int, bytes]]]
) -> None:
    path, rows = populated
    for row in rows[:2]:
        damage(path, row[3])
    with PipelineCache.open(path, readonly=True) as cache:
        report = cache.bundle(tmp_path / "out.layer")
    assert (report.entries, report.skipped_bad) == (len(rows) - 2, 2)
    with PipelineCache.open(tmp_path / "out.layer", readonly=True) as layer:
        assert {bytes.fromhex(r["entry_key"]) for r in layer.entries()} == {r[3] for r in rows[2:]}


def test_bundle_keeps_compressed_entries_as_stored_with_their_dictionaries(
    tmp_path: Path, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    pytest.importorskip("zstandard")
    corpus = blobs()
    pairs = [(key_of(n), corpus[n]) for n in range(48)]  # enough to train a dictionary
    with PipelineCache.open(cache_path, compression="auto", write_behind=False) as cache:
        cache.write_many(pairs[:40], fingerprint)
        cache.write_many(pairs[40:], fingerprint)  # written with the trained dictionary
        stored = {r["entry_key"]: r["stored_size"] for r in cache.entries()}
        assert cache.stats().dictionary_bytes > 0
        report = cache.bundle(tmp_path / "out.layer")
    assert report.dictionaries >= 1
    with PipelineCache.open(tmp_path / "out.layer", readonly=True) as layer:
        assert {r["entry_key"]: r["stored_size"] for r in layer.entries()} == stored
        assert layer.stats().dictionary_bytes > 0
    with PipelineCache.open(tmp_path / "user.sqlite3", layers=[tmp_path / "out.layer"]) as user:
        assert [user.read(d, fingerprint) for d, _ in pairs] == [b for _, b in pairs]
    # Merged, compressed entries are stored with the destination's own dictionaries.
    with PipelineCache.open(tmp_path / "merged.sqlite3", compression="off") as merged:
        assert merged.merge([cache_path]).added == len(pairs)
        assert [merged.read(d, fingerprint) for d, _ in pairs] == [b for _, b in pairs]
        assert merged.stats().dictionary_bytes == 0 and merged.check().ok


def test_bundle_refuses_to_overwrite_unless_asked(
    tmp_path: Path, populated: tuple[Path, list[tuple[str, str, int, bytes]]]
) -> None:
    path, rows = populated
    out = tmp_path / "out.layer"
    out.write_bytes(b"an earlier release")
    with PipelineCache.open(path, readonly=True) as cache:
        with pytest.raises(FileExistsError, match=r"overwrite=True"):
            cache.bundle(out)
        assert out.read_bytes() == b"an earlier release"
        with pytest.raises(ValueError, match=r"vendor"):
            cache.bundle(tmp_path / "other.layer", vendor=-1)
        assert cache.bundle(out, overwrite=True).entries == len(rows)
    assert sorted(os.listdir(tmp_path)) == ["cache", "out.layer"]


# -- merge ----------------------------------------------------------------------------------


def make_source(path: Path, entries: list[tuple[int, bytes, int]]) -> Path:
    """A closed cache with bare entries (n, blob, created_ms)."""
    with PipelineCache.open(path) as cache:
        cache.put_entries([(key_of(n), blob, created) for n, blob, created in entries])
    return path


def test_merge_overlapping_sources_newest_created_wins(tmp_path: Path, cache_path: Path) -> None:
    a = make_source(tmp_path / "a.sqlite3", [(n, b"a%d" % n, 1000) for n in range(6)])
    b = make_source(tmp_path / "b.sqlite3", [(n, b"b%d" % n, 2000) for n in range(3, 9)])
    c = make_source(tmp_path / "c.sqlite3", [(1, b"c1 tie", 1000)])
    with PipelineCache.open(cache_path) as dest:
        dest.put_entries([(key_of(0), b"dest0", 5000), (key_of(8), b"dest8", 1500)])
        report = dest.merge([a, b, c])
        got = {n: dest.get_entry(key_of(n)) for n in range(9)}
    assert (report.added, report.replaced, report.kept_existing, report.skipped_bad) == (7, 4, 2, 0)
    assert report.sources == [str(a), str(b), str(c)]
    assert got == {
        0: b"dest0",  # the destination's is newer
        1: b"a1",  # a tie keeps what is there
        2: b"a2",
        **{n: b"b%d" % n for n in range(3, 9)},  # b is newer than a and than dest's 8
    }


def test_merge_keeps_named_entries_named(tmp_path: Path, cache_path: Path) -> None:
    source = tmp_path / "src.sqlite3"
    with PipelineCache.open(source) as cache:
        cache.put_named("triton", "matmul-a", b"kernel a")
        cache.put_group("triton", "matmul-b", {"a.cubin": b"cubin", "a.json": b"{}"})
    with PipelineCache.open(cache_path) as dest:
        assert dest.merge([source]).added == 2
        listed = {(e["namespace"], e["name"]) for e in dest.entries(namespace="triton")}
        assert listed == {("triton", "matmul-a"), ("triton", "matmul-b")}
        assert dest.get_named("triton", "matmul-a") == b"kernel a"
        assert dest.get_group("triton", "matmul-b") == {"a.cubin": b"cubin", "a.json": b"{}"}
    # A name that is not the one its key was made from is not admitted under that name.
    connection = apsw.Connection(str(source))
    connection.execute("UPDATE entries SET name = 'matmul-z' WHERE name = 'matmul-a'")
    connection.close()
    with PipelineCache.open(tmp_path / "other.sqlite3") as dest:
        report = dest.merge([source])
        assert (report.added, report.skipped_bad) == (1, 1)
        assert dest.get_named("triton", "matmul-z") is None


def test_merge_skips_and_counts_damaged_entries(tmp_path: Path, cache_path: Path) -> None:
    corpus = blobs()
    source = make_source(tmp_path / "src.sqlite3", [(n, corpus[n], 1000) for n in range(10)])
    damage(source, key_of(4))
    with PipelineCache.open(cache_path) as dest:
        report = dest.merge([source])
        assert dest.get_entry(key_of(4)) is None and dest.get_entry(key_of(5)) == corpus[5]
        assert dest.check().ok
    assert (report.added, report.skipped_bad) == (9, 1)


def test_merge_respects_the_destinations_cap(tmp_path: Path, cache_path: Path) -> None:
    corpus = blobs()
    cap = 96 * 1024
    source = make_source(tmp_path / "src.sqlite3", [(n, corpus[n], 1000 + n) for n in range(64)])
    with PipelineCache.open(cache_path, max_bytes=cap, compression="off") as dest:
        dest.put_entry(key_of(1000), b"the destination's own", created_ms=1)
        report = dest.merge([source])
        stats = dest.stats()
        assert stats.stored_bytes + stats.dictionary_bytes <= cap
        assert report.added == 64 and report.evicted > 0
        assert stats.evictions == report.evicted
        assert stats.entries == 65 - report.evicted
        # The newest merged entries are the ones the LRU kept.
        assert dest.get_entry(key_of(63)) == corpus[63]
        assert dest.check().ok


def test_merge_leaves_its_sources_unchanged(
    tmp_path: Path, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    corpus = blobs()
    closed = make_source(
        tmp_path / "closed" / "a.sqlite3", [(n, corpus[n], 1000) for n in range(8)]
    )
    # A source another cache object has open, with its write-ahead log beside it.
    live_path = tmp_path / "live" / "b.sqlite3"
    with PipelineCache.open(live_path, write_behind=False) as live:
        live.write_many([(key_of(100 + n), corpus[n]) for n in range(8)], fingerprint)
        wal = Path(f"{live_path}-wal")
        assert wal.stat().st_size > 0
        before = (
            file_state(closed),
            sorted(os.listdir(closed.parent)),
            file_state(live_path),
            file_state(wal),
        )
        with PipelineCache.open(cache_path) as dest:
            report = dest.merge([closed, live_path])
            assert dest.read(key_of(103), fingerprint) == corpus[3]
        after = (
            file_state(closed),
            sorted(os.listdir(closed.parent)),
            file_state(live_path),
            file_state(wal),
        )
    assert report.added == 16
    assert after == before


@pytest.mark.parametrize("version", range(_schema.OLDEST_READABLE, SCHEMA_VERSION))
def test_merge_reads_a_source_of_an_older_schema(
    tmp_path: Path, cache_path: Path, version: int
) -> None:
    source = make_source(tmp_path / "old.sqlite3", [(n, b"s%d" % n, 1000) for n in range(3)])
    back_to_schema(source, version)
    with PipelineCache.open(cache_path) as dest:
        assert dest.merge([source]).added == 3
        assert [dest.get_entry(key_of(n)) for n in range(3)] == [b"s0", b"s1", b"s2"]


@pytest.mark.parametrize("kind", ["missing", "not-a-cache", "newer", "older", "itself"])
def test_merge_refuses_a_source_it_cannot_read(tmp_path: Path, cache_path: Path, kind: str) -> None:
    source = tmp_path / f"{kind}.sqlite3"
    if kind == "not-a-cache":
        connection = apsw.Connection(str(source))
        connection.execute("CREATE TABLE notes (text TEXT)")
        connection.close()
    elif kind == "newer":
        make_source(source, [(1, b"x", 1)])
        connection = apsw.Connection(str(source))
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.close()
    elif kind == "older":
        schema_file(source, _schema.OLDEST_READABLE - 1)
    elif kind == "itself":
        source = cache_path
    with PipelineCache.open(cache_path) as dest:
        dest.put_entry(key_of(1), b"mine")
        with pytest.raises(CacheError):
            dest.merge([source])
        assert dest.get_entry(key_of(1)) == b"mine" and len(dest) == 1


def test_merge_from_a_newer_librarys_file_says_so(tmp_path: Path, cache_path: Path) -> None:
    source = make_source(tmp_path / "newer.sqlite3", [(1, b"x", 1)])
    connection = apsw.Connection(str(source))
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with (
        PipelineCache.open(cache_path) as dest,
        pytest.raises(SchemaTooNewError, match="merge with that version") as raised,
    ):
        dest.merge([source])
    assert "cache path" not in str(raised.value)


def test_merge_into_a_read_only_cache_is_refused(tmp_path: Path, cache_path: Path) -> None:
    source = make_source(tmp_path / "src.sqlite3", [(1, b"x", 1)])
    make_source(cache_path, [])
    with PipelineCache.open(cache_path, readonly=True) as dest:
        with pytest.raises(ReadOnlyCacheError, match=r"merging"):
            dest.merge([source])
        with pytest.raises(TypeError, match=r"sources"):
            dest.merge(str(source))  # type: ignore[arg-type]


# -- copy -----------------------------------------------------------------------------------

# argv: path. Writes entry i (digest key_of(i), 64 KiB derived from i, stored raw) for ever,
# flushing every 10 and then printing how many are flushed: checkpoints run all along.
WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    with PipelineCache.open(sys.argv[1], compression="off") as cache:
        i = 0
        while True:
            digest = hashlib.sha256(b"entry %d" % i).digest()
            cache.write(digest, fp, hashlib.sha512(digest).digest() * 1024)
            i += 1
            if i % 10 == 0:
                cache.flush()
                print(i, flush=True)
    """
)


def side_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(path.name + "-*"))


def test_a_copy_made_while_another_process_writes_is_whole(
    cache_path: Path, tmp_path: Path
) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(cache_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert writer.stdout is not None
    try:
        copies = []
        assert writer.stdout.readline(), "the writer stopped"  # the file exists now
        with PipelineCache.open(cache_path, readonly=True) as cache:
            for n in range(4):
                flushed = 0
                while flushed < 300 * (n + 1):  # about 19 MiB more each time: checkpoints
                    line = writer.stdout.readline()
                    assert line, "the writer stopped"
                    flushed = int(line)
                out = tmp_path / f"copy{n}.sqlite3"
                report = cache.copy(out)
                copies.append((out, flushed, report))
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    for out, flushed, report in copies:
        assert header(out)[0] == 1 and side_files(out) == []  # one file, no log beside it
        connection = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        connection.close()
        with PipelineCache.open(out, readonly=True) as copy:
            assert len(copy) == report.entries >= flushed
            for i in range(report.entries):
                digest = key_of(i)
                assert copy.read(digest, fp) == hashlib.sha512(digest).digest() * 1024, i


def test_a_copy_holds_queued_writes_and_settings_and_is_a_cache_of_its_own(
    cache_path: Path, tmp_path: Path
) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    out = tmp_path / "copy.sqlite3"
    with PipelineCache.open(cache_path, max_bytes=50 << 20) as cache:
        for i in range(20):
            cache.write(key_of(i), fp, b"blob %d" % i)  # queued, never flushed
        report = cache.copy(out)
        cache.write(key_of(99), fp, b"after the copy")
    assert (report.path, report.entries, report.file_bytes) == (out, 20, out.stat().st_size)
    assert report.blob_bytes == sum(len(b"blob %d" % i) for i in range(20))
    assert side_files(out) == []
    with PipelineCache.open(out) as copy:
        assert copy.file_max_bytes() == 50 << 20
        assert [copy.read(key_of(i), fp) for i in range(20)] == [b"blob %d" % i for i in range(20)]
        assert copy.read(key_of(99), fp) is None
        copy.write(key_of(100), fp, b"written to the copy")
        assert copy.check().ok
    with PipelineCache.open(cache_path, readonly=True) as cache:
        assert cache.read(key_of(100), fp) is None and len(cache) == 21


def test_copy_refuses_an_existing_file_a_folder_and_a_missing_folder(
    populated: tuple[Path, list[tuple[str, str, int, bytes]]], tmp_path: Path
) -> None:
    path, rows = populated
    out = tmp_path / "out.sqlite3"
    out.write_bytes(b"last week's copy")
    (tmp_path / "folder").mkdir()
    with PipelineCache.open(path, readonly=True) as cache:
        with pytest.raises(FileExistsError, match=r"overwrite=True"):
            cache.copy(out)
        assert out.read_bytes() == b"last week's copy"
        with pytest.raises(CacheError, match=r"is a folder"):
            cache.copy(tmp_path / "folder")
        with pytest.raises(CacheError, match=r"does not exist; make it first"):
            cache.copy(tmp_path / "nowhere" / "out.sqlite3")
        with pytest.raises(ValueError, match=r"the cache itself"):
            cache.copy(path)
        assert cache.copy(out, overwrite=True).entries == len(rows)
    assert sorted(os.listdir(tmp_path)) == ["cache", "folder", "out.sqlite3"]


def test_ctrl_c_stops_a_copy_under_way_and_leaves_nothing(cache_path: Path, tmp_path: Path) -> None:
    # Python runs a signal handler between bytecodes only: without a progress handler the
    # whole VACUUM INTO ran, every page written, before Ctrl-C was seen.
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    with PipelineCache.open(cache_path, compression="off") as cache:
        for i in range(600):
            cache.write(key_of(i), fp, os.urandom(64 << 10))
    out = tmp_path / "out" / "copy.sqlite3"
    out.parent.mkdir()
    largest = 0

    def press_ctrl_c_once_under_way() -> None:
        nonlocal largest
        deadline = time.monotonic() + 30
        sent = False
        while time.monotonic() < deadline:
            sizes = []
            for part in out.parent.glob(".copy.sqlite3.copy-*"):
                with contextlib.suppress(FileNotFoundError):  # removed by the interrupted copy
                    sizes.append(part.stat().st_size)
            if sizes:
                largest = max(largest, *sizes)
                if not sent and largest > 1 << 20:
                    os.kill(os.getpid(), signal.SIGINT)
                    sent = True
            elif sent:
                return
            time.sleep(0.0005)

    with PipelineCache.open(cache_path, readonly=True) as cache:
        watcher = threading.Thread(target=press_ctrl_c_once_under_way)
        watcher.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                cache.copy(out)
        finally:
            watcher.join()
        assert os.listdir(out.parent) == []
        assert 0 < largest < 20 << 20  # of about 40 MiB
        assert cache.read(key_of(7), fp) is not None and len(cache) == 600
        assert cache.copy(out).entries == 600  # the next one runs to its end


@pytest.mark.parametrize("method", ["copy", "bundle"])
@pytest.mark.parametrize("side", ["-wal", "-shm"])
def test_an_output_over_the_caches_own_log_is_refused(
    cache_path: Path, method: str, side: str
) -> None:
    # Renamed over the live log, it would leave a second process pairing the file with
    # a database where its log should be (two logs for one file: corruption).
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    with PipelineCache.open(cache_path) as cache:
        cache.write(key_of(1), fp, b"kept")
        cache.flush()
        log = Path(f"{cache_path}{side}")
        before = log.read_bytes()
        with pytest.raises(ValueError, match=rf"the cache's own {side} file"):
            getattr(cache, method)(log, overwrite=True)
        assert log.read_bytes() == before
        assert cache.read(key_of(1), fp) == b"kept"


@pytest.mark.parametrize("method", ["copy", "bundle"])
def test_an_output_beside_a_left_over_log_is_refused(
    populated: tuple[Path, list[tuple[str, str, int, bytes]]], tmp_path: Path, method: str
) -> None:
    # A new file there would be paired with that log by the next program to open it.
    path, _ = populated
    out = tmp_path / "out.sqlite3"
    Path(f"{out}-wal").write_bytes(b"a log of another database")
    with (
        PipelineCache.open(path, readonly=True) as cache,
        pytest.raises(CacheError, match=r"out.sqlite3-wal exists"),
    ):
        getattr(cache, method)(out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["cache", "out.sqlite3-wal"]


@pytest.mark.parametrize("method", ["copy", "bundle"])
def test_an_output_that_is_not_a_regular_file_is_refused_even_with_overwrite(
    populated: tuple[Path, list[tuple[str, str, int, bytes]]], tmp_path: Path, method: str
) -> None:
    # Renamed over, a FIFO (or, as root, /dev/null) would have been replaced by the file.
    path, _ = populated
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    with (
        PipelineCache.open(path, readonly=True) as cache,
        pytest.raises(CacheError, match=r"not a regular file"),
    ):
        getattr(cache, method)(fifo, overwrite=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["cache", "out.fifo"]


# argv: path, out. Copies under a file size limit smaller than the copy; prints the error.
COPY_OVER_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    from vyre_sqlcache import CacheError, PipelineCache
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with PipelineCache.open(sys.argv[1], readonly=True) as cache:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            cache.copy(sys.argv[2])
        except CacheError as error:
            print(type(error).__name__, error)
    """
)


def test_a_copy_that_does_not_fit_raises_cache_full_and_leaves_nothing(
    cache_path: Path, tmp_path: Path
) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    with PipelineCache.open(cache_path, compression="off") as cache:
        for i in range(40):
            cache.write(key_of(i), fp, os.urandom(64 << 10))
    out = tmp_path / "out" / "copy.sqlite3"
    out.parent.mkdir()
    done = run_script(COPY_OVER_LIMIT, str(cache_path), str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(CacheFullError.__name__), done.stdout
    assert "no room for it" in done.stdout and "file size limit" in done.stdout
    assert str(out) in done.stdout and "size cap" not in done.stdout
    assert os.listdir(out.parent) == []


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["bundle", "copy"])
@pytest.mark.parametrize("spelling", ["same", "relative", "link"])
def test_cli_refuses_to_write_over_the_cache_itself_in_one_line(
    populated: tuple[Path, list[tuple[str, str, int, bytes]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    spelling: str,
) -> None:
    path, _ = populated
    before = file_state(path)
    monkeypatch.chdir(path.parent)
    out = {"same": str(path), "relative": f"./{path.name}", "link": "link.sqlite3"}[spelling]
    if spelling == "link":
        os.symlink(path, path.parent / "link.sqlite3")
    assert main(["--path", str(path), command, "-o", out, "--force"]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and err.count("\n") == 1 and "Traceback" not in err
    assert "is the cache itself" in err
    assert file_state(path) == before


@pytest.mark.parametrize("command", ["bundle", "copy"])
def test_cli_force_through_a_link_replaces_the_file_it_names(
    tmp_path: Path,
    populated: tuple[Path, list[tuple[str, str, int, bytes]]],
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    # A backup path that is a link to another disk: the link was replaced by a new file
    # beside it, and the file it names, the backup, silently kept its old contents.
    path, rows = populated
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "real.sqlite3").write_bytes(b"the old backup")
    link = tmp_path / "backup.sqlite3"
    link.symlink_to(backups / "real.sqlite3")
    assert main(["--path", str(path), command, "-o", str(link), "--force"]) == 0
    assert str(backups / "real.sqlite3") in capsys.readouterr().out
    assert link.is_symlink()
    with PipelineCache.open(backups / "real.sqlite3", readonly=True) as copy:
        assert len(copy) == len(rows)


@pytest.mark.parametrize("command", ["bundle", "copy"])
def test_cli_force_onto_a_loop_of_links_says_so_in_one_line(
    populated: tuple[Path, list[tuple[str, str, int, bytes]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    # A traceback (RuntimeError: Symlink loop), exit 1.
    path, _ = populated
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["--path", str(path), command, "-o", str(tmp_path / "a"), "--force"]) == 1
    err = capsys.readouterr().err
    assert "a symbolic link that names no file" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["bundle", "copy"])
def test_cli_says_why_a_folder_refuses_the_file(
    populated: tuple[Path, list[tuple[str, str, int, bytes]]],
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    # /sys refuses a new file even to root: "unable to open database: <a temporary name>"
    # named neither the cause nor the folder.
    path, _ = populated
    assert main(["--path", str(path), command, "-o", "/sys/vyre-test.sqlite3"]) == 1
    err = capsys.readouterr().err
    # (the reason is the system's: permission denied, or a read-only file system)
    assert "in the folder /sys;" in err and "a folder this user can write" in err, err
    assert "vyre-test.sqlite3." not in err  # no temporary name
    assert not [name for name in os.listdir("/sys") if "vyre-test" in name]


def test_cli_bundle_and_merge(
    tmp_path: Path,
    populated: tuple[Path, list[tuple[str, str, int, bytes]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, rows = populated
    out = tmp_path / "amd.layer"
    assert main(["--path", str(path), "bundle", "-o", str(out), "--vendor", "0x1002"]) == 0
    assert "bundled 4 entries" in capsys.readouterr().out
    assert main(["--path", str(path), "bundle", "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (
        main(["--path", str(path), "bundle", "-o", str(out), "--force", "--driver", "555.42.02"])
        == 0
    )
    assert "bundled 4 entries" in capsys.readouterr().out

    other = make_source(tmp_path / "other.sqlite3", [(n, b"other %d" % n, 1000) for n in range(3)])
    into = tmp_path / "merged.sqlite3"
    assert main(["merge", str(path), str(other), "--into", str(into)]) == 0
    printed = capsys.readouterr().out
    assert f"merged 2 caches into {into}" in printed and f"{len(rows) + 3} added" in printed
    # Without --into: the cache of --path / $VYRE_SQLCACHE_PATH.
    monkeypatch.setenv("VYRE_SQLCACHE_PATH", str(tmp_path / "default.sqlite3"))
    assert main(["merge", str(other)]) == 0
    assert "3 added" in capsys.readouterr().out
    with PipelineCache.open(tmp_path / "default.sqlite3", readonly=True) as merged:
        assert merged.get_entry(key_of(2)) == b"other 2"
    assert main(["merge", str(tmp_path / "nothing-here.sqlite3"), "--into", str(into)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_copy_of_a_damaged_cache_names_the_cache_not_the_copy(
    cache_path: Path, tmp_path: Path
) -> None:
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(os.urandom(32), os.urandom(3000)) for _ in range(200)], fp)
    overwrite_page(  # an interior page of `blobs`, overwritten
        cache_path,
        "SELECT rootpage FROM sqlite_schema WHERE name = 'blobs'",
        lambda size: os.urandom(size - 200),
        at=100,
    )
    out = tmp_path / "copy.sqlite3"
    with (
        PipelineCache.open(cache_path, readonly=True) as cache,
        pytest.raises(CorruptCacheError, match=rf"the cache {cache_path} has damaged pages"),
    ):
        cache.copy(out)
    assert not out.exists()


def test_ctrl_c_stops_a_merge_at_once_and_keeps_nothing_of_its_source(tmp_path: Path) -> None:
    # Held until the source's transaction committed, Ctrl-C was said ("interrupted",
    # status 130) only after every entry had been merged.
    fp = DeviceFingerprint.from_parts(1, 2, "merge")
    source = tmp_path / "source.sqlite3"
    with PipelineCache.open(source, max_bytes=None) as cache:
        for _ in range(30):
            cache.write_many([(os.urandom(32), os.urandom(1000)) for _ in range(1000)], fp)
    into = tmp_path / "into.sqlite3"
    PipelineCache.open(into).close()
    process = subprocess.Popen(
        [sys.executable, "-m", "vyre_sqlcache", "merge", str(source), "--into", str(into)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # well past starting and importing
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[11]) + int(fields[12]) >= 1.0 * ticks or process.poll() is not None:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err == b"vyre-sqlcache: interrupted\n"
    with PipelineCache.open(into, readonly=True) as cache:
        assert len(cache) == 0
