"""Importing and exporting vyre's directory cache: layout, mtimes, round trips, skips."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw
import pytest

from vyre_sqlcache import (
    MAX_BLOB_BYTES,
    DeviceFingerprint,
    PipelineCache,
    PipelineCacheKey,
    vyredir,
)
from vyre_sqlcache.errors import CacheError
from vyre_sqlcache.vyredir import (
    DirEntry,
    ExportReport,
    ImportReport,
    entry_path,
    export_dir,
    import_dir,
    scan,
    write_atomic,
)

from .helpers import run_script

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


@contextmanager
def read_only(path: Path) -> Iterator[apsw.Connection]:
    """A connection that can only read the cache file, for looking at it from a test."""
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        yield connection
    finally:
        connection.close()


def do_import(cache: PipelineCache, root: Path, notes: list[str] | None = None) -> ImportReport:
    return import_dir(cache, root, note=(notes.append if notes is not None else print))


def do_export(cache: PipelineCache, root: Path) -> ExportReport:
    return export_dir(cache, root)


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


# argv: cache path, vyre folder, limit of open files. Imports under that limit.
IMPORT_UNDER_A_LIMIT = """
import resource, sys
from vyre_sqlcache import CacheError, PipelineCache
from vyre_sqlcache.vyredir import import_dir
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
with PipelineCache.open(sys.argv[1]) as cache:
    try:
        report = import_dir(cache, __import__("pathlib").Path(sys.argv[2]), note=lambda n: None)
        print(report.imported, report.skipped)
    except CacheError as error:
        print("CacheError", error)
"""


@pytest.mark.parametrize("limit", [64, 8, 6])
def test_import_under_a_low_limit_of_open_files_imports_all_or_says_why(
    tmp_path: Path, fingerprint: DeviceFingerprint, limit: int
) -> None:
    # A descriptor a folder (256 of them) made every folder past the limit "skipped",
    # with exit status 0; macOS allows 256 by default.
    programs = make_vyre_tree(tmp_path / "vyre", fingerprint, 700)
    folders = {fingerprint.cache_key(d).hex()[:2] for d in programs}
    assert len(folders) > 200
    result = run_script(
        IMPORT_UNDER_A_LIMIT, str(tmp_path / "c.sqlite3"), str(tmp_path / "vyre"), str(limit)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.strip()
    if limit == 64:
        assert out == f"{len(programs)} 0"
    else:  # too few for the cache and a folder or two: one clear error, not skips
        assert out.startswith("CacheError") and "ulimit -n" in out, out


def test_export_leaves_keyed_and_named_entries_out_and_changes_nothing(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
    tmp_path: Path,
) -> None:
    # vyre looks entries up by program digest only; a named entry (Triton's kernels)
    # imported back would lose its name.
    cache.put(make_key(), fingerprint, b"keyed")
    cache.put_named("triton", "k/kernel.cubin", b"named")
    cache.put_group("triton", "k/__grp__kernel.json", {"kernel.cubin": b"named"})
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"by program")
    cache.close()
    with read_only(cache.path) as connection:
        before = snapshot(connection)
    with PipelineCache.open(cache.path) as reopened:
        report = do_export(reopened, tmp_path / "out")
    assert (report.exported, report.keyed, report.named) == (1, 1, 2)
    exported = tree(tmp_path / "out")
    assert {name: data for name, (data, _) in exported.items()} == {
        str(entry_path(Path(), fingerprint.cache_key(digest))): b"by program"
    }
    with read_only(cache.path) as connection:
        assert snapshot(connection) == before


def test_export_gets_every_entry_while_another_process_reads_them(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read moves an entry's access time: listed by it, newest first, the entries read
    # during the export moved ahead of the listing, and were never exported (a backup
    # that left out what was in use, and said nothing).
    digests = [i.to_bytes(32, "big") for i in range(1, 301)]
    cache.write_many([(d, d * 3) for d in digests], fingerprint)
    cache.flush()
    monkeypatch.setattr(vyredir, "LIST_PAGE", 10)
    peek = PipelineCache.peek_entry

    def peek_while_read(self: PipelineCache, key: bytes | str) -> bytes | None:
        if key.endswith("0"):
            with PipelineCache.open(self.path) as reader:  # its access times written at close
                for digest in random.sample(digests, 10):
                    reader.read(digest, fingerprint)
        return peek(self, key)

    monkeypatch.setattr(PipelineCache, "peek_entry", peek_while_read)
    report = do_export(cache, tmp_path / "out")
    assert report.exported == len(digests)
    assert len(tree(tmp_path / "out")) == len(digests)


def test_export_skips_damaged_entries(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    good, bad = os.urandom(32), os.urandom(32)
    cache.write(good, fingerprint, b"good bytes")
    cache.write(bad, fingerprint, b"bad bytes!")
    cache.flush()  # queued writes reach the file (and other connections)
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


def test_import_under_a_cap_reports_what_the_cap_evicted(
    cache_path: Path, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    root = tmp_path / "vyre"
    for index in range(500):
        path = entry_path(root, fingerprint.cache_key(index.to_bytes(32, "big")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096))
    with PipelineCache.open(cache_path, max_bytes=1 << 20) as cache:
        report = do_import(cache, root)
        kept = len(cache)
    assert report.imported == 500 and 200 < kept < 256
    assert (report.evicted, report.kept) == (500 - kept, kept)


def test_import_writes_in_batches_under_the_cap(
    cache_path: Path, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    # 60 files of 20 KB under a 100 KB cap: batches must stay under the cap, or every
    # batch would be refused as too large.
    root = tmp_path / "vyre"
    for index in range(60):
        path = entry_path(root, fingerprint.cache_key(index.to_bytes(32, "big")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(20_000))
    notes: list[str] = []
    with PipelineCache.open(cache_path, max_bytes=100_000) as cache:
        report = do_import(cache, root, notes)
        assert report.imported == 60 and report.skipped == 0 and notes == []
        assert 0 < report.kept == len(cache) <= 5


class Swap:
    """A progress callback that changes the tree after the scan, before any file is read:
    what an attacker who owns the folder can do while root imports it."""

    def __init__(self, change: Callable[[list[DirEntry]], None]) -> None:
        self.change = change

    def __call__(self, items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
        files = list(items)
        self.change(files)
        return files


def _file_to_link(secret: Path) -> Callable[[list[DirEntry]], None]:
    def change(files: list[DirEntry]) -> None:
        files[0].path.unlink()
        files[0].path.symlink_to(secret)

    return change


def _folder_to_link(secret: Path) -> Callable[[list[DirEntry]], None]:
    def change(files: list[DirEntry]) -> None:
        folder = files[0].path.parent
        decoy = secret.parent / folder.name
        decoy.mkdir()
        (decoy / files[0].path.name).write_bytes(secret.read_bytes())
        folder.rename(folder.with_name("moved"))
        folder.symlink_to(decoy, target_is_directory=True)

    return change


def _file_to_fifo(secret: Path) -> Callable[[list[DirEntry]], None]:
    def change(files: list[DirEntry]) -> None:
        files[0].path.unlink()
        os.mkfifo(files[0].path)

    return change


def _file_to_hard_link(secret: Path) -> Callable[[list[DirEntry]], None]:
    def change(files: list[DirEntry]) -> None:
        files[0].path.unlink()
        os.link(secret, files[0].path)

    return change


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging for ever) if the block takes longer than `seconds`."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("swap", "imported"),
    [
        (_file_to_link, 4),
        (_file_to_hard_link, 4),
        (_file_to_fifo, 4),
        # a folder is opened again to be read, never through a link: its file is skipped
        (_folder_to_link, 4),
    ],
)
def test_import_reads_only_the_files_it_scanned(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    swap: Callable[[Path], Callable[[list[DirEntry]], None]],
    imported: int,
) -> None:
    secret = tmp_path / "private" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"root's private key")
    root = tmp_path / "vyre"
    programs = make_vyre_tree(root, fingerprint, 5)
    notes: list[str] = []
    with deadline(20):
        report = import_dir(cache, root, progress=Swap(swap(secret)), note=notes.append)
    assert report.imported == imported and report.skipped == len(notes) == 5 - imported
    stored = [cache.peek_entry(row["entry_key"]) for row in cache.entries()]
    assert len(stored) == imported and all(blob in programs.values() for blob in stored)


def test_export_never_writes_through_a_linked_folder(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    digests = [os.urandom(32) for _ in range(20)]
    cache.write_many([(d, b"blob " + d) for d in digests], fingerprint)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    prefix = fingerprint.cache_key(digests[0]).hex()[:2]
    (out / prefix).symlink_to(elsewhere, target_is_directory=True)
    report = do_export(cache, out)
    linked = sum(fingerprint.cache_key(d).hex()[:2] == prefix for d in digests)
    assert report.refused == {str(out / prefix): linked}
    assert report.exported == 20 - linked
    assert list(elsewhere.iterdir()) == []
    assert (out / prefix).is_symlink()


def test_export_replaces_a_linked_file_instead_of_writing_through_it(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"exported")
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    path = entry_path(tmp_path / "out", fingerprint.cache_key(digest))
    path.parent.mkdir(parents=True)
    path.symlink_to(victim)
    assert do_export(cache, tmp_path / "out").exported == 1
    assert victim.read_bytes() == b"not yours"
    assert not path.is_symlink() and path.read_bytes() == b"exported"


def test_import_writes_one_transaction_a_batch_not_a_file(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_vyre_tree(tmp_path / "vyre", fingerprint, 250)
    batches: list[int] = []
    store = cache.put_entries

    def counting(items: Iterable[tuple[bytes | str, bytes, int | None]]) -> int:
        items = list(items)
        batches.append(len(items))
        return store(items)

    monkeypatch.setattr(cache, "put_entries", counting)  # one transaction a call
    monkeypatch.setattr("vyre_sqlcache.vyredir.IMPORT_BATCH_ENTRIES", 100)
    assert do_import(cache, tmp_path / "vyre").imported == 250
    assert batches == [100, 100, 50]


def test_export_syncs_and_renames_in_batches_and_leaves_no_temporary_file(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    programs = make_vyre_tree(tmp_path / "vyre", fingerprint, 25)
    do_import(cache, tmp_path / "vyre")
    syncs: list[int] = []
    renamed: list[int] = []  # files already renamed into place at each sync
    out = tmp_path / "out"

    def counting_sync(fd: int) -> None:
        syncs.append(fd)
        renamed.append(sum(1 for _ in out.rglob("*.bin")))

    monkeypatch.setattr("vyre_sqlcache.vyredir.EXPORT_BATCH_ENTRIES", 10)
    monkeypatch.setattr("vyre_sqlcache.vyredir.LIST_PAGE", 7)
    if vyredir._SYNCFS is not None:
        monkeypatch.setattr("vyre_sqlcache.vyredir._syncfs", counting_sync)
    report = do_export(cache, out)
    assert report.exported == len(programs) == 25
    assert tree(out) == tree(tmp_path / "vyre")
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]
    if vyredir._SYNCFS is not None:
        # One sync a batch, and no file renamed into place before its batch's sync.
        assert len(syncs) == 3 and renamed == [0, 10, 20]


def test_a_failed_export_batch_leaves_whole_files_and_no_temporary_file(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_vyre_tree(tmp_path / "vyre", fingerprint, 25)
    do_import(cache, tmp_path / "vyre")
    source = tree(tmp_path / "vyre")
    monkeypatch.setattr("vyre_sqlcache.vyredir.EXPORT_BATCH_ENTRIES", 10)
    calls = 0
    utime = os.utime

    def failing(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 15:
            raise OSError(28, "No space left on device")
        utime(*args, **kwargs)

    monkeypatch.setattr("vyre_sqlcache.vyredir.os.utime", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        do_export(cache, out)
    written = tree(out)
    assert len(written) == 10  # the first batch, whole; none of the second
    assert all(source[name] == value for name, value in written.items())


@pytest.mark.parametrize(("compression", "imported"), [("auto", 1), ("off", 0)])
def test_a_file_over_the_cap_is_imported_when_it_fits_compressed(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    compression: str,
    imported: int,
) -> None:
    pytest.importorskip("zstandard")
    root = tmp_path / "vyre"
    path = entry_path(root, fingerprint.cache_key(bytes(32)))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\tld.global.f32 %r1, [%rd2];\n" * 10_000)  # 280 KB of PTX-like text
    notes: list[str] = []
    with PipelineCache.open(cache_path, max_bytes=100_000, compression=compression) as cache:
        report = do_import(cache, root, notes)
        assert (report.imported, report.skipped, len(cache)) == (imported, 1 - imported, imported)
    assert len(notes) == 1 - imported


def test_import_never_replaces_a_keyed_or_named_entry(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
    tmp_path: Path,
) -> None:
    # A folder of another user's, with files named by the keys of a named group and a
    # keyed entry (anyone can compute them): the import replaced both with its bytes, and
    # they fell out of the listings and filters while lookups served the folder's bytes.
    from vyre_sqlcache import named_entry_key

    key = make_key()
    cache.put(key, fingerprint, b"GOOD keyed")
    cache.put_group("triton", "abc/__grp__k.json", {"k.cubin": b"GOOD cubin"})
    planted = {
        key.entry_key(fingerprint): b"EVIL keyed",
        named_entry_key("triton", "abc/__grp__k.json"): b"EVIL group",
    }
    digest = os.urandom(32)
    planted[fingerprint.cache_key(digest)] = b"a vyre entry"
    root = tmp_path / "vyre"
    for entry_key, data in planted.items():
        path = entry_path(root, entry_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    notes: list[str] = []
    report = do_import(cache, root, notes)
    assert (report.imported, report.skipped) == (1, 2)
    assert sum("keyed entry under this key" in note for note in notes) == 1
    assert sum("named entry under this key" in note for note in notes) == 1
    assert cache.get(key, fingerprint) == b"GOOD keyed"
    assert cache.get_group("triton", "abc/__grp__k.json") == {"k.cubin": b"GOOD cubin"}
    assert cache.read(digest, fingerprint) == b"a vyre entry"
    assert sorted(row.kind for row in cache.iter_keys()) == ["keyed", "named", "program"]


def test_export_passes_over_a_folder_where_an_entry_file_goes(
    cache: PipelineCache, fingerprint: DeviceFingerprint, tmp_path: Path
) -> None:
    # One folder in the way stopped the whole export with "Is a directory" and a bare
    # temporary file name.
    digests = [os.urandom(32) for _ in range(7)]
    cache.write_many([(d, b"blob " + d) for d in digests], fingerprint)
    out = tmp_path / "out"
    blocked = entry_path(out, fingerprint.cache_key(digests[0]))
    blocked.mkdir(parents=True)
    report = do_export(cache, out)
    assert report.blocked == [str(blocked)]
    assert report.exported == 6
    assert blocked.is_dir()
    assert not [p for p in out.rglob("*.tmp.*")]


def test_an_export_error_names_the_file_under_the_folder(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "[Errno 13] Permission denied: 'e4'": neither DIR nor what to do.
    from vyre_sqlcache.cli import main

    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"exported")
    cache.close()
    real_open = os.open

    def refused(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if dir_fd is not None and ".tmp." in str(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr("vyre_sqlcache.vyredir.os.open", refused)
    out = tmp_path / "out"
    assert main(["--path", str(cache.path), "export-dir", str(out)]) == 1
    err = capsys.readouterr().err
    name = f"{fingerprint.cache_key(digest).hex()}.bin.tmp."
    assert f"cannot write {out / name[:2] / name}" in err
    assert "make it writable (or give another DIR)" in err
