"""Importing and exporting vyre's directory cache: layout, mtimes, round trips, skips."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import MAX_BLOB_BYTES, DeviceFingerprint, PipelineCache, PipelineCacheKey
from vyre_sqlcache.errors import CacheError
from vyre_sqlcache.inspection import read_only
from vyre_sqlcache.vyredir import (
    ExportReport,
    ImportReport,
    entry_path,
    export_dir,
    import_dir,
    scan,
    write_atomic,
)

BASE_MS = 1_700_000_000_000


def make_vyre_tree(
    root: Path, fingerprint: DeviceFingerprint, count: int, seed: int = 1
) -> dict[bytes, bytes]:
    """A vyre directory cache of `count` entries for `fingerprint`: program digest -> blob.

    Sizes include empty files; mtimes are distinct milliseconds.
    """
    rng = random.Random(seed)
    programs = {}
    for index in range(count):
        digest = rng.randbytes(32)
        blob = rng.randbytes(rng.choice((0, 1, 100, 4096, 70_000)))
        path = entry_path(root, fingerprint.cache_key(digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        ns = (BASE_MS + index * 1_001) * 1_000_000
        os.utime(path, ns=(ns, ns))
        programs[digest] = blob
    return programs


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: relative name -> (bytes, mtime in ms)."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns // 10**6)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def do_import(cache: PipelineCache, root: Path, notes: list[str] | None = None) -> ImportReport:
    with read_only(cache.path) as connection:
        return import_dir(
            cache, connection, root, note=(notes.append if notes is not None else print)
        )


def do_export(cache: PipelineCache, root: Path) -> ExportReport:
    with read_only(cache.path) as connection:
        return export_dir(connection, root)


def snapshot(connection: apsw.Connection) -> list[object]:
    """Every entry's metadata and every counter: what a read must leave unchanged."""
    entries = connection.execute("SELECT * FROM entries ORDER BY id").fetchall()
    return [*entries, *connection.execute("SELECT * FROM meta ORDER BY name")]


def test_import_then_export_is_byte_identical(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    source = tmp_path / "vyre"
    programs = make_vyre_tree(source, fingerprint, 300)
    report = do_import(cache, source)
    assert (report.imported, report.unchanged, report.skipped) == (300, 0, 0)
    assert len(cache) == 300

    exported = do_export(cache, tmp_path / "out")
    assert (exported.exported, exported.keyed, exported.damaged) == (300, 0, [])
    before, after = tree(source), tree(tmp_path / "out")
    assert len(before) == len(programs) == 300
    assert after == before  # names, bytes and mtimes to the millisecond


def test_imported_entries_are_found_by_read_and_reached_by_invalidation(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    programs = make_vyre_tree(tmp_path / "vyre", fingerprint, 20)
    do_import(cache, tmp_path / "vyre")
    digests = list(programs)
    for digest, blob in programs.items():
        assert cache.read(digest, fingerprint) == blob
    mask = [index % 2 for index in range(len(digests))]
    assert cache.invalidate_impacted(mask, digests, fingerprint) == 10
    for digest, impacted in zip(digests, mask, strict=True):
        assert (cache.read(digest, fingerprint) is None) == bool(impacted)


def test_mtime_becomes_the_created_and_accessed_time(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    make_vyre_tree(tmp_path / "vyre", fingerprint, 3)
    do_import(cache, tmp_path / "vyre")
    with read_only(cache.path) as connection:
        rows = connection.execute(
            "SELECT created_ms, accessed_ms, kind FROM pipelines_v ORDER BY created_ms"
        ).fetchall()
    assert rows == [(BASE_MS + i * 1_001, BASE_MS + i * 1_001, "imported") for i in range(3)]


def test_importing_twice_changes_nothing(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    make_vyre_tree(tmp_path / "vyre", fingerprint, 50)
    do_import(cache, tmp_path / "vyre")
    everything = "SELECT * FROM entries JOIN blobs USING (id) ORDER BY id"
    with read_only(cache.path) as connection:
        first = connection.execute(everything).fetchall()
    again = do_import(cache, tmp_path / "vyre")
    assert (again.imported, again.unchanged) == (0, 50)
    with read_only(cache.path) as connection:
        assert connection.execute(everything).fetchall() == first


def test_a_changed_file_is_imported_again(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    make_vyre_tree(tmp_path / "vyre", fingerprint, 5)
    do_import(cache, tmp_path / "vyre")
    changed = sorted((tmp_path / "vyre").rglob("*.bin"))[0]
    changed.write_bytes(b"recompiled by a newer driver")
    report = do_import(cache, tmp_path / "vyre")
    assert (report.imported, report.unchanged) == (1, 4)
    assert cache.get_entry(changed.name[:64]) == b"recompiled by a newer driver"


def test_import_skips_and_reports_what_is_not_an_entry(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    root = tmp_path / "vyre"
    make_vyre_tree(root, fingerprint, 4)
    key = os.urandom(32).hex()
    folder = root / key[:2]
    folder.mkdir(exist_ok=True)
    junk = {
        folder / f"{key}.bin.tmp.4242.0": b"half written",
        folder / f"{key.upper()}.bin": b"upper case",
        folder / f"{key[:60]}.bin": b"short",
        folder / "notes.txt": b"notes",
        root / ("00" if key[:2] != "00" else "01") / f"{key}.bin": b"wrong folder",
        root / "README": b"top-level file",
        root / "zz" / f"{key}.bin": b"folder is not hex",
    }
    for path, data in junk.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    huge = folder / f"{key}.bin"
    with open(huge, "wb") as out:
        out.truncate(MAX_BLOB_BYTES + 1)  # sparse: no real disk space
    link = folder / f"{key[:-1]}{'1' if key.endswith('0') else '0'}.bin"
    link.symlink_to(huge)

    notes: list[str] = []
    report = do_import(cache, root, notes)
    assert report.imported == 4 and len(cache) == 4
    skipped_paths = set(junk) - {root / "zz" / f"{key}.bin"} | {root / "zz", huge}
    skipped_paths.add(link)
    assert report.skipped == len(skipped_paths) == len(notes)
    for path in skipped_paths:
        assert any(str(path) in note for note in notes), path
    assert any("over the 67108864-byte limit" in note for note in notes)
    assert any("temporary" in note for note in notes)


def test_scan_of_a_missing_folder_is_a_cache_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="is not a folder"):
        scan(tmp_path / "nope")


def test_export_leaves_keyed_entries_out_and_changes_nothing(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
    tmp_path: Path,
) -> None:
    cache.put(make_key(), fingerprint, b"keyed")
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"by program")
    cache.close()
    with read_only(cache.path) as connection:
        before = snapshot(connection)
    with PipelineCache.open(cache.path) as reopened:
        report = do_export(reopened, tmp_path / "out")
    assert (report.exported, report.keyed) == (1, 1)
    exported = tree(tmp_path / "out")
    assert {name: data for name, (data, _) in exported.items()} == {
        str(entry_path(Path(), fingerprint.cache_key(digest))): b"by program"
    }
    with read_only(cache.path) as connection:
        assert snapshot(connection) == before


def test_export_skips_damaged_entries(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    good, bad = os.urandom(32), os.urandom(32)
    cache.write(good, fingerprint, b"good bytes")
    cache.write(bad, fingerprint, b"bad bytes!")
    damaged = apsw.Connection(str(cache.path))
    damaged.execute(
        "UPDATE blobs SET data = zeroblob(10) WHERE id = "
        "(SELECT id FROM entries WHERE entry_key = ?)",
        (fingerprint.cache_key(bad),),
    )
    damaged.close()
    report = do_export(cache, tmp_path / "out")
    assert report.exported == 1 and report.damaged == [fingerprint.cache_key(bad).hex()]
    assert [name for name in tree(tmp_path / "out")] == [
        str(entry_path(Path(), fingerprint.cache_key(good)))
    ]


def test_export_replaces_an_older_file_atomically(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"new")
    old = entry_path(tmp_path / "out", fingerprint.cache_key(digest))
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old bytes")
    do_export(cache, tmp_path / "out")
    assert old.read_bytes() == b"new"
    assert [p.name for p in old.parent.iterdir()] == [old.name]  # no temporary file left


def test_write_atomic_sets_the_mtime_and_cleans_up_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "ab" / ("ab" + "0" * 62 + ".bin")
    path.parent.mkdir()
    write_atomic(path, b"blob", 1_600_000_000_123)
    assert path.read_bytes() == b"blob"
    assert path.stat().st_mtime_ns == 1_600_000_000_123 * 1_000_000
    with pytest.raises(OSError):
        write_atomic(tmp_path / "missing-folder" / "x.bin", b"blob", 0)
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes", 0)  # type: ignore[arg-type]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == b"blob"
