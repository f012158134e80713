"""Read-only layers: searched after the user's file, verified, masked by the user's
invalidations, never written; bad layers are skipped with one warning."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import (
    SCHEMA_VERSION,
    DeviceFingerprint,
    PipelineCache,
    PipelineCacheKey,
    ReadOnlyCacheError,
    _schema,
)
from vyre_sqlcache.config import ENV_LAYERS

from .corpus_blobs import blobs
from .helpers import (
    back_to_schema,
    overwrite_page,
    run_script,
    schema_file,
    without_mask_copies,
)

Items = list[tuple[bytes, bytes]]


def digest(n: int) -> bytes:
    return hashlib.sha256(b"program %d" % n).digest()


def items(start: int, count: int, salt: int = 0) -> Items:
    """(program digest, blob) pairs of corpus bytes; `salt` gives other bytes per digest."""
    corpus = blobs()
    return [
        (digest(n), corpus[(n + salt) % len(corpus)] + b"#%d" % salt)
        for n in range(start, start + count)
    ]


@pytest.fixture
def make_layer(tmp_path: Path, fingerprint: DeviceFingerprint) -> Callable[..., Path]:
    """Bundle a layer at tmp_path/<name> from the given (digest, blob) pairs."""

    def make(name: str, pairs: Items, fp: DeviceFingerprint | None = None) -> Path:
        source = tmp_path / "ci" / f"{name}.sqlite3"
        with PipelineCache.open(source) as ci:
            ci.write_many(pairs, fp or fingerprint)
            out = tmp_path / "layers" / name
            out.parent.mkdir(exist_ok=True)
            ci.bundle(out)
        return out

    return make


def file_state(path: Path) -> tuple[bytes, int, list[str]]:
    """A file's bytes, mtime and the names beside it: what "left unchanged" compares."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))


def damage_checksum(layer: Path, entry_key: bytes) -> None:
    connection = apsw.Connection(str(layer))
    connection.execute(
        "UPDATE blobs SET checksum = zeroblob(16) WHERE id = "
        "(SELECT id FROM entries WHERE entry_key = ?)",
        (entry_key,),
    )
    connection.close()


# -- order and verification -------------------------------------------------------------


def test_reads_search_the_users_file_then_the_layers_in_order(
    cache_path: Path, fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    first = make_layer("first", items(0, 10, salt=1))
    second = make_layer("second", items(5, 10, salt=2))
    with PipelineCache.open(cache_path, layers=[first, second]) as cache:
        cache.write(digest(0), fingerprint, b"the user's own")
        assert cache.read(digest(0), fingerprint) == b"the user's own"  # file first
        assert cache.read(digest(6), fingerprint) == items(6, 1, salt=1)[0][1]  # first layer
        assert cache.read(digest(12), fingerprint) == items(12, 1, salt=2)[0][1]  # second
        assert cache.read(digest(99), fingerprint) is None
        stats = cache.stats()
    assert (stats.hits, stats.layer_hits, stats.misses) == (3, 2, 1)


def test_get_many_reads_across_the_file_and_the_layers(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    make_key: Callable[..., PipelineCacheKey],
) -> None:
    keys = [make_key() for _ in range(6)]
    source = cache_path.parent.parent / "ci" / "keyed.sqlite3"
    with PipelineCache.open(source) as ci:
        ci.put_many([(k, b"layer %d" % i) for i, k in enumerate(keys[:4])], fingerprint)
        layer = cache_path.parent.parent / "keyed.layer"
        ci.bundle(layer)
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        cache.put(keys[1], fingerprint, b"user 1")
        cache.put(keys[4], fingerprint, b"user 4")
        got = cache.get_many(keys, fingerprint)
        assert got == [b"layer 0", b"user 1", b"layer 2", b"layer 3", b"user 4", None]
        assert [cache.contains(k, fingerprint) for k in keys] == [True] * 5 + [False]
        assert cache.stats().layer_hits == 3


def test_a_damaged_layer_entry_is_a_miss_and_the_layer_is_left_as_it_was(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pairs = items(0, 4)
    layer = make_layer("damaged", pairs)
    backup = make_layer("backup", items(0, 4, salt=3))
    damage_checksum(layer, fingerprint.cache_key(digest(1)))
    before = file_state(layer)
    with PipelineCache.open(cache_path, layers=[layer, backup]) as cache:
        assert cache.read(digest(0), fingerprint) == pairs[0][1]
        # The damaged entry is never served; the next layer's entry is.
        assert cache.read(digest(1), fingerprint) == items(1, 1, salt=3)[0][1]
        assert cache.stats().checksum_failures == 1
        with PipelineCache.open(cache_path.with_name("alone.sqlite3"), layers=[layer]) as alone:
            assert alone.read(digest(1), fingerprint) is None
            assert alone.get_entry(fingerprint.cache_key(digest(1))) is None
    assert "failed its xxh3-128 checksum" in caplog.text
    assert file_state(layer) == before


def test_writes_go_to_the_users_file_only(
    cache_path: Path, fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    layer = make_layer("layer", items(0, 4))
    before = file_state(layer)
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        for n in range(8):
            assert cache.read(digest(n), fingerprint) is not None or n >= 4
        cache.write(digest(2), fingerprint, b"mine")
        cache.write_many(items(10, 5), fingerprint)
        cache.flush()
        assert len(cache) == 6  # the layer's entries are not the user's
    assert file_state(layer) == before


# -- bad layers ---------------------------------------------------------------------------


def _missing(folder: Path) -> Path:
    return folder / "no-such-layer"


def _garbage(folder: Path) -> Path:
    path = folder / "garbage.layer"
    path.write_bytes(blobs()[0] * 4)
    return path


def _zeroed(folder: Path) -> Path:
    path = folder / "zeroed.layer"
    path.write_bytes(bytes(4 * 16384))
    return path


def _fifo(folder: Path) -> Path:
    path = folder / "fifo.layer"
    os.mkfifo(path)
    return path


def _folder(folder: Path) -> Path:
    path = folder / "a-folder"
    path.mkdir()
    return path


def _other_program(folder: Path) -> Path:
    path = folder / "other.sqlite3"
    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()
    return path


def _newer_schema(folder: Path) -> Path:
    path = folder / "newer.layer"
    with PipelineCache.open(folder / "newer-source.sqlite3") as source:
        source.put_entry(b"\x01" * 32, b"from the future")
        source.bundle(path)
    connection = apsw.Connection(str(path))
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    return path


def _older_schema(folder: Path) -> Path:
    path = folder / "older.layer"
    schema_file(path, _schema.OLDEST_READABLE - 1, wal=False)
    return path


@pytest.mark.parametrize("version", range(_schema.OLDEST_READABLE, SCHEMA_VERSION))
def test_a_layer_bundled_by_an_older_schema_is_read(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
    version: int,
) -> None:
    """A warm cache shipped with an application outlives an upgrade of the library."""
    pairs = items(0, 3)
    layer = make_layer("shipped", pairs)
    back_to_schema(layer, version)
    with (
        caplog.at_level(logging.WARNING, logger="vyre_sqlcache"),
        PipelineCache.open(cache_path, layers=[layer]) as cache,
    ):
        assert [cache.read(d, fingerprint) for d, _ in pairs] == [b for _, b in pairs]
        assert cache.invalidate_impacted([1], [pairs[0][0]], fingerprint) == 1
        assert cache.read(pairs[0][0], fingerprint) is None
    assert caplog.records == []


@pytest.mark.parametrize(
    "make_bad",
    [_missing, _garbage, _zeroed, _fifo, _folder, _other_program, _newer_schema, _older_schema],
    ids=lambda f: f.__name__.strip("_"),
)
def test_an_unusable_layer_is_skipped_with_one_warning(
    tmp_path: Path,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
    make_bad: Callable[[Path], Path],
) -> None:
    good = make_layer("good", items(0, 2))
    bad = make_bad(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with (
        caplog.at_level(logging.WARNING, logger="vyre_sqlcache"),
        PipelineCache.open(cache_path, layers=[bad, good]) as cache,
    ):
        assert cache.read(digest(1), fingerprint) == items(1, 1)[0][1]
        assert cache.read(digest(5), fingerprint) is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert str(bad.name) in warnings[0].getMessage() and "skipping" in warnings[0].getMessage()
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "cache"])  # nothing moved aside


def test_a_layer_of_a_newer_library_says_to_upgrade(
    tmp_path: Path, cache_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It said "point it at another cache path", the advice for the cache file itself.
    bad = _newer_schema(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vyre_sqlcache"):
        PipelineCache.open(cache_path, layers=[bad]).close()
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "bundled by a newer vyre-sqlcache" in message and "cache path" not in message


def test_layers_from_the_environment(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = make_layer("first", items(0, 2, salt=1))
    second = make_layer("second", items(0, 4, salt=2))
    monkeypatch.setenv(ENV_LAYERS, os.pathsep.join([str(first), "", str(second)]))
    with PipelineCache.open(cache_path) as cache:
        assert cache.read(digest(0), fingerprint) == items(0, 1, salt=1)[0][1]
        assert cache.read(digest(3), fingerprint) == items(3, 1, salt=2)[0][1]
    # An explicit list wins over the environment.
    with PipelineCache.open(cache_path, layers=[]) as cache:
        assert cache.read(digest(0), fingerprint) is None


@pytest.mark.parametrize("bad", ["one/path.layer", b"bytes", [3], [""], None.__class__])
def test_layers_must_be_a_list_of_paths(cache_path: Path, bad: object) -> None:
    with pytest.raises(TypeError, match=r"layers"):
        PipelineCache.open(cache_path, layers=bad)  # type: ignore[arg-type]
    assert not cache_path.exists()


def test_a_layer_file_is_refused_for_writes_and_read_read_only(
    fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    layer = make_layer("layer", items(0, 3))
    before = file_state(layer)
    with pytest.raises(ReadOnlyCacheError, match=r"read-only layer .*readonly=True.*layers="):
        PipelineCache.open(layer)
    with PipelineCache.open(layer, readonly=True) as reader:
        assert reader.read(digest(2), fingerprint) == items(2, 1)[0][1]
        assert reader.query("SELECT value FROM info_v WHERE setting = 'layer'")[0].rows == [(1,)]
    assert file_state(layer) == before


# -- invalidation and deletion mask layer entries ---------------------------------------


def test_invalidation_masks_layer_entries_for_this_user_only(
    tmp_path: Path,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    other_fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    make_key: Callable[..., PipelineCacheKey],
) -> None:
    source = tmp_path / "ci" / "mixed.sqlite3"
    source.parent.mkdir()
    key = make_key()
    with PipelineCache.open(source) as ci:
        ci.write_many(items(0, 4), fingerprint)
        ci.write_many(items(0, 4, salt=5), other_fingerprint)
        ci.put(key, fingerprint, b"keyed of program 1", program_digest=digest(1))
        layer = tmp_path / "mixed.layer"
        ci.bundle(layer)
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        cache.write(digest(1), fingerprint, b"user's copy of 1")
        # Program 1 on this device: the user's entry, the layer's program entry (hidden
        # behind the user's, counted once) and the layer's keyed entry.
        assert (
            cache.invalidate_impacted([0, 1, 0], [digest(0), digest(1), digest(2)], fingerprint)
            == 2
        )
        assert cache.read(digest(1), fingerprint) is None
        assert cache.get(key, fingerprint) is None and not cache.contains(key, fingerprint)
        assert cache.read(digest(0), fingerprint) == items(0, 1)[0][1]
        assert cache.read(digest(1), other_fingerprint) == items(1, 1, salt=5)[0][1]
        # Invalidating again reaches nothing new.
        assert cache.invalidate_impacted([1], [digest(1)], fingerprint) == 0
        masks = cache.query("SELECT entry_key FROM layer_masks_v ORDER BY entry_key")[0].rows
        assert {bytes.fromhex(k) for (k,) in masks} == {
            fingerprint.cache_key(digest(1)),
            key.entry_key(fingerprint),
        }
    # Masks live in the user's file: another user's cache still reads the layer.
    with PipelineCache.open(tmp_path / "someone-else.sqlite3", layers=[layer]) as other:
        assert other.read(digest(1), fingerprint) == items(1, 1)[0][1]
    with PipelineCache.open(cache_path, layers=[layer]) as again:
        assert again.read(digest(1), fingerprint) is None


def test_a_new_write_is_served_and_the_same_bytes_unmask_the_layer(
    cache_path: Path, fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    pairs = items(0, 3)
    layer = make_layer("layer", pairs)
    with PipelineCache.open(cache_path, layers=[layer], write_behind=False) as cache:
        assert cache.invalidate_impacted([1, 1], [digest(0), digest(1)], fingerprint) == 2

        def masked() -> set[str]:
            return {row[0] for row in cache.query("SELECT entry_key FROM layer_masks_v")[0].rows}

        cache.write(digest(0), fingerprint, b"recompiled differently")
        assert cache.read(digest(0), fingerprint) == b"recompiled differently"
        # Other bytes: the layer's stale copy stays hidden should the new one go.
        assert fingerprint.cache_key(digest(0)).hex() in masked()
        cache.write(digest(1), fingerprint, pairs[1][1])  # the same bytes as the layer's
        assert masked() == {fingerprint.cache_key(digest(0)).hex()}
        cache.delete_entries([fingerprint.cache_key(digest(0))])
        assert cache.read(digest(0), fingerprint) is None  # the stale layer copy stays hidden


def test_delete_masks_the_layer_entry(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
    tmp_path: Path,
) -> None:
    key, kept = make_key(), make_key()
    source = tmp_path / "ci.sqlite3"
    with PipelineCache.open(source) as ci:
        ci.put_many([(key, b"a"), (kept, b"b")], fingerprint)
        ci.bundle(tmp_path / "keys.layer")
    with PipelineCache.open(cache_path, layers=[tmp_path / "keys.layer"]) as cache:
        assert cache.contains(key, fingerprint)
        assert cache.delete(key, fingerprint) is True
        assert not cache.contains(key, fingerprint) and cache.get(key, fingerprint) is None
        assert cache.delete(key, fingerprint) is False
        assert cache.get(kept, fingerprint) == b"b"


# -- a shipped layer on a read-only folder, read by an unprivileged user -------------------

_UNPRIVILEGED = textwrap.dedent(
    """
    import json, logging, os, sys
    import vyre_sqlcache  # noqa: F401  (imported while the interpreter can read it)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        pass
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    logging.basicConfig(level=logging.WARNING)
    layer, user, digests = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    fp = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
    with PipelineCache.open(user, layers=[layer]) as cache:
        got = [cache.read(bytes.fromhex(d), fp) for d in digests]
        cache.write(bytes.fromhex(digests[0]), fp, b"user's own")
        stats = cache.stats()
    print(json.dumps({
        "uid": os.geteuid(),
        "got": [None if g is None else g.hex() for g in got],
        "layer_hits": stats.layer_hits,
    }))
    """
)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder outside pytest's (0700) temporary tree that `nobody` can reach."""
    folder = Path(tempfile.mkdtemp(prefix="vyre-layer-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in folder.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder)


def test_a_bundled_layer_on_a_read_only_folder_serves_an_unprivileged_user(
    shared_folder: Path, fingerprint: DeviceFingerprint
) -> None:
    pairs = items(0, 40)  # enough of one device for a trained dictionary
    app = shared_folder / "app" / "share"
    app.mkdir(parents=True)
    with PipelineCache.open(shared_folder / "ci.sqlite3") as ci:
        ci.write_many(pairs, fingerprint)
        ci.write_many(items(100, 40), fingerprint)
        report = ci.bundle(app / "pipelines.layer")
    assert report.entries == 80
    layer = app / "pipelines.layer"
    layer.chmod(0o444)
    app.chmod(0o555)
    home = shared_folder / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    before = file_state(layer)
    wanted = [digest(n).hex() for n in (0, 7, 39, 500)]
    result = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED, str(layer), str(home / "cache.sqlite3"), *wanted],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    import json

    answer = json.loads(result.stdout)
    if os.geteuid() == 0:
        assert answer["uid"] == 65534
    assert answer["got"] == [pairs[0][1].hex(), pairs[7][1].hex(), pairs[39][1].hex(), None]
    assert answer["layer_hits"] == 3
    assert "WARNING" not in result.stderr, result.stderr
    assert file_state(layer) == before  # no -shm, -wal or journal beside it
    assert stat.S_IMODE(app.stat().st_mode) == 0o555
    with PipelineCache.open(home / "cache.sqlite3", readonly=True) as user:
        assert user.read(digest(0), fingerprint) == b"user's own"


@pytest.mark.parametrize("copied", [True, False], ids=["masks-copied", "masks-asked"])
def test_a_mask_committed_by_another_connection_is_seen_at_the_next_read(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    copied: bool,
) -> None:
    if not copied:
        without_mask_copies(monkeypatch)
    layer = make_layer("layer", items(0, 3))
    with (
        PipelineCache.open(cache_path, layers=[layer]) as reader,
        PipelineCache.open(cache_path, layers=[layer]) as other,
    ):
        assert reader.read(digest(1), fingerprint) is not None  # the masks are copied now
        assert other.invalidate_impacted([1], [digest(1)], fingerprint) == 1
        assert reader.read(digest(1), fingerprint) is None
        assert reader.get_entry(fingerprint.cache_key(digest(1))) is None
        assert reader.read(digest(2), fingerprint) == items(2, 1)[0][1]
        other.write(digest(1), fingerprint, b"new")
        other.flush()
        assert reader.read(digest(1), fingerprint) == b"new"


def test_many_masks_are_asked_of_the_file_at_each_layer_hit(
    cache_path: Path, fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    layer = make_layer("big", items(0, 300))
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        assert cache.invalidate_impacted([1] * 280, [digest(n) for n in range(280)], fingerprint)
        assert cache.query("SELECT count(*) FROM layer_masks_v")[0].rows == [(280,)]
        got = cache.get_many([], fingerprint)
        assert got == []
        assert cache.read(digest(5), fingerprint) is None
        assert cache.read(digest(290), fingerprint) == items(290, 1)[0][1]
        assert [cache.read(digest(n), fingerprint) is None for n in (0, 279, 280)] == [
            True,
            True,
            False,
        ]


def test_both_sides_of_a_fork_read_through_the_layers(
    cache_path: Path, fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    pairs = items(0, 4)
    layer = make_layer("layer", pairs)
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        assert cache.read(digest(0), fingerprint) == pairs[0][1]  # connections open
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            ok = False
            try:
                ok = [cache.read(digest(n), fingerprint) for n in range(4)] == [b for _, b in pairs]
                cache.invalidate_impacted([1], [digest(3)], fingerprint)
                ok = ok and cache.read(digest(3), fingerprint) is None
                cache.close()
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert cache.read(digest(1), fingerprint) == pairs[1][1]
        assert cache.read(digest(3), fingerprint) is None  # the child's mask, in the file


def test_the_layer_views_read_in_a_plain_sqlite_client(
    tmp_path: Path,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
) -> None:
    import sqlite3

    layer = make_layer("layer", items(0, 2))
    with PipelineCache.open(cache_path, layers=[layer], max_bytes=1 << 20) as cache:
        cache.invalidate_impacted([1], [digest(1)], fingerprint)
    with sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True) as plain:
        masks = plain.execute("SELECT entry_key, length(checksum), masked FROM layer_masks_v")
        assert [(k, n) for k, n, _ in masks] == [(fingerprint.cache_key(digest(1)).hex(), 32)]
        assert plain.execute("SELECT * FROM info_v").fetchall() == [("max_bytes", 1 << 20)]
    with sqlite3.connect(f"file:{layer}?mode=ro", uri=True) as plain:
        assert plain.execute("SELECT * FROM info_v").fetchall() == [("layer", 1)]


def test_a_rebuilt_user_file_keeps_its_layer_masks(
    cache_path: Path, fingerprint: DeviceFingerprint, make_layer: Callable[..., Path]
) -> None:
    layer = make_layer("layer", items(0, 4))
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        cache.write_many(items(10, 20), fingerprint)
        assert cache.invalidate_impacted([1, 1], [digest(0), digest(1)], fingerprint) == 2
    # Damage a page of the LRU index: the file fails integrity_check and is rebuilt.
    overwrite_page(
        cache_path,
        "SELECT rootpage FROM sqlite_schema WHERE name = 'entries_lru'",
        lambda size: b"\xff" * 64,
        at=8,
    )
    with PipelineCache.open(cache_path, layers=[layer]) as cache:
        report = cache.check(repair=True)
        assert report.rebuilt and report.ok
        assert cache.read(digest(0), fingerprint) is None
        assert cache.read(digest(1), fingerprint) is None
        assert cache.read(digest(2), fingerprint) == items(2, 1)[0][1]


def test_a_layer_with_damaged_pages_reads_right_or_misses_and_warns_once(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_layer: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Incompressible bytes: the layer has pages to damage whatever its entries compress to.
    pairs = [(digest(n), random.Random(n).randbytes(8000)) for n in range(64)]
    layer = make_layer("layer", pairs)
    connection = apsw.Connection(str(layer), flags=apsw.SQLITE_OPEN_READONLY)
    pages = [p for (p,) in connection.execute("SELECT pageno FROM dbstat WHERE name = 'blobs'")]
    connection.close()
    with open(layer, "r+b") as file:  # garbage over every other page of the second half
        for page in sorted(pages)[len(pages) // 2 :: 2]:  # of the blobs (not the schema's)
            file.seek((page - 1) * 16384)
            file.write(b"\xa5" * 16384)
    with (
        caplog.at_level(logging.WARNING, logger="vyre_sqlcache"),
        PipelineCache.open(cache_path, layers=[layer]) as cache,
    ):
        got = [cache.read(d, fingerprint) for d, _ in pairs] * 2
        got += cache.get_many([], fingerprint)
    assert all(g in (None, b) for g, (_, b) in zip(got, pairs * 2, strict=True))
    assert None in got and any(g is not None for g in got)
    failures = [r for r in caplog.records if "reading layer" in r.getMessage()]
    assert len(failures) == 1


#: A layer bundled, read through a cache, then cut short in place by another path to the
#: same file (argv[2]: the writable path; argv[1]: the one the cache reads, which a
#: read-only bind mount may make immutable), and read again. Prints the hits after.
LAYER_CUT_SHORT_IN_PLACE = textwrap.dedent(
    """
    import os, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
    seen, writable, folder = sys.argv[1:4]
    with PipelineCache.open(os.path.join(folder, "u.sqlite3"), layers=[seen]) as cache:
        before = sum(cache.read(bytes([i]) * 32, fp) is not None for i in range(100))
        assert before == 100, before
        os.truncate(writable, 4096)
        after = [cache.read(bytes([i]) * 32, fp) for i in range(100)]
        wrong = sum(a is not None and a != bytes([i]) * 20000 for i, a in enumerate(after))
        print("after", sum(a is not None for a in after), "wrong", wrong)
    """
)


def bundled_layer(folder: Path) -> Path:
    with PipelineCache.open(folder / "ci.sqlite3") as ci:
        fp = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
        ci.write_many([(bytes([i]) * 32, bytes([i]) * 20000) for i in range(100)], fp)
        ci.flush()
        ci.bundle(folder / "app.layer")
    return folder / "app.layer"


@pytest.mark.parametrize("where", ["a writable folder", "a read-only bind mount"])
def test_a_layer_cut_short_in_place_is_a_miss_never_a_crash(tmp_path: Path, where: str) -> None:
    # Read through a memory map, a layer truncated in place (`cp` of a smaller one over
    # it) killed the process with SIGBUS: held in exclusive locking mode (as `bundle`
    # writes layers), SQLite never looked at its size again; on a read-only mount it was
    # opened immutable, yet the host could still change it.
    source = tmp_path / "src"
    source.mkdir()
    layer = bundled_layer(source)
    seen = layer
    if where == "a read-only bind mount":
        mounted = tmp_path / "ro"
        mounted.mkdir()
        bind = subprocess.run(["mount", "--bind", str(source), str(mounted)], capture_output=True)
        if bind.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {bind.stderr!r}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], check=True)
        seen = mounted / layer.name
    try:
        result = run_script(LAYER_CUT_SHORT_IN_PLACE, str(seen), str(layer), str(tmp_path))
    finally:
        if seen != layer:
            subprocess.run(["umount", "-l", str(seen.parent)], capture_output=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split()[-2:] == ["wrong", "0"]  # (misses, or verified bytes)


def test_cli_rm_reaches_a_layer_entry(
    tmp_path: Path,
    make_layer: Callable[..., Path],
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `rm` deleted only keys it found in the user's file: a layer's entry was "no entry"
    # (status 1) and stayed served, though `delete_entries` reaches layers.
    from vyre_sqlcache.cli import main

    pairs = [(digest(n), b"layer %d" % n) for n in range(3)]
    layer = make_layer("app.layer", pairs)
    user = tmp_path / "user.sqlite3"
    PipelineCache.open(user).close()
    monkeypatch.setenv(ENV_LAYERS, str(layer))
    key = fingerprint.cache_key(digest(1)).hex()
    missing = os.urandom(32).hex()
    assert main(["rm", "--path", str(user), key, missing]) == 1
    out, err = capsys.readouterr()
    assert "removed 1 entry" in out and missing in err and key not in err
    with PipelineCache.open(user) as cache:
        assert [cache.read(d, fingerprint) for d, _ in pairs] == [b"layer 0", None, b"layer 2"]


def test_filtered_invalidation_reaches_the_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `invalidate --device/--all/...` listed the user's file only: a layer's matching
    # entries stayed served, and the command said nothing of them.
    from vyre_sqlcache.cli import main

    one, other = (DeviceFingerprint.from_parts(0x10DE, device, "550") for device in (1, 2))
    source = tmp_path / "ci.sqlite3"
    with PipelineCache.open(source) as ci:
        ci.write_many(items(0, 4), one)
        ci.write_many(items(4, 2), other)
        ci.bundle(tmp_path / "app.layer")
    user = tmp_path / "user.sqlite3"
    with PipelineCache.open(user) as cache:
        cache.write_many(items(10, 1), one)
        cache.write_many(items(0, 1, salt=1), one)  # a key the layer has too: counted once
    monkeypatch.setenv(ENV_LAYERS, str(tmp_path / "app.layer"))
    with PipelineCache.open(user) as cache, pytest.raises(ValueError, match="everything=True"):
        cache.delete_where()
    assert main(["invalidate", "--path", str(user), "--device", "0x1"]) == 0
    assert "invalidated 5 entries" in capsys.readouterr().out
    with PipelineCache.open(user) as cache:
        assert [cache.read(d, one) for d, _ in items(0, 4) + items(10, 1)] == [None] * 5
        assert [cache.read(d, other) for d, _ in items(4, 2)] == [b for _, b in items(4, 2)]
    assert main(["invalidate", "--path", str(user), "--all"]) == 0
    assert "invalidated 2 entries" in capsys.readouterr().out
    with PipelineCache.open(user) as cache:
        assert [cache.read(d, other) for d, _ in items(4, 2)] == [None, None]


def test_cli_get_reads_the_layers_of_a_user_who_has_no_cache_yet(
    tmp_path: Path,
    make_layer: Callable[..., Path],
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A fresh machine with the application's layer installed: `get` said "no cache".
    from vyre_sqlcache.cli import main

    first = make_layer("first.layer", [(digest(0), b"first")])
    second = make_layer("second.layer", [(digest(0), b"second"), (digest(1), b"only here")])
    user = tmp_path / "none" / "user.sqlite3"
    monkeypatch.setenv(
        ENV_LAYERS, os.pathsep.join([str(tmp_path / "gone.layer"), str(first), str(second)])
    )
    out = tmp_path / "out.bin"
    for n, expected in [(0, b"first"), (1, b"only here")]:
        key = fingerprint.cache_key(digest(n)).hex()
        assert main(["get", "--path", str(user), key, "-o", str(out)]) == 0
        assert out.read_bytes() == expected
    assert not user.parent.exists()  # nothing made
    capsys.readouterr()
    missing = fingerprint.cache_key(digest(2)).hex()
    assert main(["get", "--path", str(user), missing, "-o", str(out)]) == 1
    assert "no layer holds an entry with key" in capsys.readouterr().err
    key = fingerprint.cache_key(digest(0)).hex()
    assert main(["get", "--path", str(user), key, "-o", str(second)]) == 2  # never over a layer
    assert "is the layer itself" in capsys.readouterr().err
    with PipelineCache.open(tmp_path / "check.sqlite3", layers=[second]) as cache:
        assert cache.read(digest(1), fingerprint) == b"only here"
    monkeypatch.delenv(ENV_LAYERS)
    assert main(["get", "--path", str(user), key, "-o", str(out)]) == 1
    assert "no cache at" in capsys.readouterr().err


def test_cli_get_serves_a_layer_entry_until_it_is_removed(
    tmp_path: Path,
    make_layer: Callable[..., Path],
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `get` looked in the user's file only: "no entry" for a key that every read, and
    # `explain`, served from a layer.
    from vyre_sqlcache.cli import main

    layer = make_layer("app.layer", [(digest(0), b"from the layer")])
    user = tmp_path / "user.sqlite3"
    PipelineCache.open(user).close()
    monkeypatch.setenv(ENV_LAYERS, str(layer))
    key = fingerprint.cache_key(digest(0)).hex()
    out = tmp_path / "out.bin"
    assert main(["get", "--path", str(user), key, "-o", str(out)]) == 0
    assert out.read_bytes() == b"from the layer"
    with PipelineCache.open(user) as cache:
        assert cache.peek_entry(key) is None  # the file's own entries only, as documented
        assert cache.peek_entry(key, layers=True) == b"from the layer"
        assert cache.stats().hits == 0
    assert main(["rm", "--path", str(user), key]) == 0
    capsys.readouterr()
    assert main(["get", "--path", str(user), key, "-o", str(out)]) == 1
    assert "no entry" in capsys.readouterr().err
    # Nor over a layer, or its side files, where the user has a file too.
    before = layer.read_bytes()
    link = tmp_path / "link.layer"
    link.symlink_to(layer)
    folder = tmp_path / "linked-folder"  # a side file not made yet, through a linked folder
    folder.symlink_to(layer.parent, target_is_directory=True)
    for target, says in [
        (layer, "the layer itself"),
        (link, "the layer itself"),
        (Path(f"{layer}-wal"), "-wal file"),
    ]:
        assert main(["get", "--path", str(user), key, "-o", str(target)]) == 2
        assert says in capsys.readouterr().err
    monkeypatch.setenv(ENV_LAYERS, str(folder / layer.name))  # named through the link
    for target in (folder / f"{layer.name}-journal", Path(f"{layer}-journal")):
        assert main(["get", "--path", str(user), key, "-o", str(target)]) == 2
        assert "-journal file" in capsys.readouterr().err
    assert layer.read_bytes() == before
