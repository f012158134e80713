"""Read-only caches: asked for, without write permission, and on read-only media."""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vyre_sqlcache import (
    SCHEMA_VERSION,
    CacheError,
    CorruptCacheError,
    DeviceFingerprint,
    FeatureFlags,
    PipelineCache,
    PipelineCacheKey,
    ReadOnlyCacheError,
    _schema,
)
from vyre_sqlcache._cachefile import RECHECK_INTERVAL_S, needs_check_marker
from vyre_sqlcache.cli import main

from .helpers import back_to_schema, schema_file

DIGEST = bytes(range(32))
# Over 256 KiB: read by the connection without a memory map, which must open read-only too.
LARGE_DIGEST = bytes(range(1, 33))
LARGE_BLOB = bytes(range(256)) * 1200

# Run in a child process: opens the cache, checks reads and refused writes, prints
# the files of the folder afterwards.
CHILD = textwrap.dedent(
    """
    import os, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache, ReadOnlyCacheError
    path = sys.argv[1]
    fp = DeviceFingerprint.from_parts(1, 2, "r")
    with PipelineCache.open(path) as cache:
        assert cache.readonly, "expected a read-only cache"
        assert cache.read(bytes(range(32)), fp) == b"stored blob"
        assert cache.read(bytes(range(1, 33)), fp) == bytes(range(256)) * 1200
        assert cache.read(bytes(32), fp) is None
        try:
            cache.write(bytes(32), fp, b"x")
        except ReadOnlyCacheError as error:
            # the cause is the permissions, not an argument this caller never passed
            assert "may not write the file" in str(error), error
            assert "readonly=True" not in str(error), error
        else:
            raise AssertionError("write was accepted")
    print(sorted(os.listdir(os.path.dirname(path))))
    """
)


@pytest.fixture
def stored() -> Iterator[Path]:
    # Not under tmp_path: its parents are private to root, and one test reads the
    # cache as another user.
    folder = Path(tempfile.mkdtemp(prefix="vyre-ro-"))
    os.chmod(folder, 0o755)
    path = folder / "pipelines.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(DIGEST, DeviceFingerprint.from_parts(1, 2, "r"), b"stored blob")
        cache.write(LARGE_DIGEST, DeviceFingerprint.from_parts(1, 2, "r"), LARGE_BLOB)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def test_readonly_reads_and_refuses_writes(stored: Path, fingerprint: DeviceFingerprint) -> None:
    before = stored.read_bytes()
    fp = DeviceFingerprint.from_parts(1, 2, "r")
    with PipelineCache.open(stored, readonly=True) as cache:
        assert cache.readonly
        assert cache.read(DIGEST, fp) == b"stored blob"
        assert cache.read(LARGE_DIGEST, fp) == LARGE_BLOB
        calls = [
            lambda: cache.write(DIGEST, fp, b"new"),
            lambda: cache.invalidate_impacted([1], [DIGEST], fp),
            lambda: cache.put_entry(bytes(32), b"x"),
            lambda: cache.delete_entries([bytes(32)]),
            lambda: cache.delete_where(everything=True),
        ]
        for call in calls:
            with pytest.raises(ReadOnlyCacheError, match=r"read-only \(readonly=True\)"):
                call()
        cache.flush()  # nothing pending: fine
    assert stored.read_bytes() == before
    assert sorted(p.name for p in stored.parent.iterdir()) == [stored.name]


def test_readonly_open_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    from vyre_sqlcache import CacheError

    with pytest.raises(CacheError, match="does not exist, and a read-only cache cannot"):
        PipelineCache.open(tmp_path / "missing.sqlite3", readonly=True)
    assert not (tmp_path / "missing.sqlite3").exists()


def test_readonly_open_of_an_empty_file_says_it_is_empty(tmp_path: Path) -> None:
    from vyre_sqlcache import CacheError

    path = tmp_path / "empty.sqlite3"
    path.touch()
    with pytest.raises(CacheError, match="is empty: nothing has been cached there yet"):
        PipelineCache.open(path, readonly=True)
    assert [p.name for p in tmp_path.iterdir()] == ["empty.sqlite3"]
    assert path.stat().st_size == 0


def run_child(*prefix: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_without_write_permission_the_cache_opens_read_only(stored: Path) -> None:
    os.chmod(stored.parent, 0o755)
    os.chmod(stored, 0o644)
    if os.geteuid() == 0:
        # Root ignores permissions: run the child as nobody.
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop root in this test"
        result = run_child(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", path=stored)
    else:
        os.chmod(stored.parent, 0o555)
        os.chmod(stored, 0o444)
        try:
            result = run_child(path=stored)
        finally:
            os.chmod(stored.parent, 0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([stored.name])


def can_bind_mount_read_only(tmp_path: Path) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run(
        [
            unshare,
            "-rm",
            "sh",
            "-c",
            f"mount --bind {tmp_path} {tmp_path} && mount -o remount,ro,bind {tmp_path}",
        ],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def test_on_read_only_media_the_cache_opens_immutable(stored: Path) -> None:
    if not can_bind_mount_read_only(stored.parent):
        pytest.skip("this machine allows no user-namespace mounts (unshare -rm)")
    folder = stored.parent
    script = (
        f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && "
        f"exec {sys.executable} -c '{CHILD}' {stored}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([stored.name])


# -- another user: the owner's marker, and a file the owner changes ------------------------

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="acting as another user (nobody) needs root",
)

# The start of every child that acts as another user: imports first (the interpreter's
# own files may be unreadable to nobody), then drops to nobody.
AS_NOBODY = textwrap.dedent(
    """
    import hashlib, json, os, random, select, sys, time
    import apsw
    import vyre_sqlcache, vyre_sqlcache.cache
    from vyre_sqlcache import (
        CacheError, CorruptCacheError, DeviceFingerprint, FeatureFlags, PipelineCache,
        PipelineCacheKey, ReadOnlyCacheError
    )
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    """
)

# argv: path, readonly ("1"/"0"). Opens, reads DIGEST, prints the outcome as JSON.
MARKED = AS_NOBODY + textwrap.dedent(
    """
    fp = DeviceFingerprint.from_parts(1, 2, "r")
    try:
        with PipelineCache.open(sys.argv[1], readonly=sys.argv[2] == "1") as cache:
            print(json.dumps(["read", cache.read(bytes(range(32)), fp) == b"stored blob"]))
    except Exception as error:
        print(json.dumps([type(error).__name__, str(error)]))
    """
)


def as_nobody(script: str, *args: str, timeout: float = 60) -> list[Any]:
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out: list[Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@needs_root
@pytest.mark.parametrize("readonly", ["1", "0"], ids=["readonly", "default"])
def test_the_owners_needs_check_marker_does_not_stop_another_user(
    stored: Path, readonly: str
) -> None:
    marker = needs_check_marker(stored)
    marker.touch()  # left by the owner, who met a damaged page
    before = stored.read_bytes()
    assert as_nobody(MARKED, str(stored), readonly) == ["read", True]
    assert marker.exists()  # only the owner (or a user who may) removes it
    assert stored.read_bytes() == before


@needs_root
def test_a_damaged_file_another_user_cannot_move_is_a_cache_error(stored: Path) -> None:
    # A shared folder (sticky, like /tmp): another user may write the file but not
    # rename the owner's; the file is damaged and marked. A CacheError says so, where a
    # bare PermissionError came before.
    os.chmod(stored.parent, 0o1777)
    os.chmod(stored, 0o666)
    with open(stored, "r+b") as file:
        file.seek(16384)  # the second page: the first b-tree page after the header
        file.write(os.urandom(16384))
    needs_check_marker(stored).touch()
    name, message = as_nobody(MARKED, str(stored), "0")
    assert name == CorruptCacheError.__name__
    assert "cannot move it aside" in message
    assert sorted(p.name for p in stored.parent.iterdir()) == sorted(
        [stored.name, needs_check_marker(stored).name]
    )


# A reader as nobody in a folder it cannot write: reads the blobs asked on stdin
# ("GEN FIRST LAST" per line) and answers one letter each: R right, N none, W wrong.
READER = AS_NOBODY + textwrap.dedent(
    """
    fp = DeviceFingerprint.from_parts(1, 2, "r")
    cache = PipelineCache.open(sys.argv[1])
    assert cache.readonly
    def blob(gen, i):
        size = 300_000 if i % 25 == 0 else 3000 + i
        return random.Random(f"{gen}:{i}").randbytes(size)  # incompressible
    def key(i):
        digest = hashlib.sha256(b"%d" % i).digest()
        return PipelineCacheKey(digest, digest[::-1], 0, (1, 1, 1), FeatureFlags(0), "vulkan")
    print("ready", flush=True)
    for line in sys.stdin:
        what, gen, first, last = line.split()
        ids = range(int(first), int(last))
        if what == "many":  # one snapshot; misses look at the file for the next call
            got = cache.get_many([key(i) for i in ids], fp)
        else:
            got = [cache.get(key(i), fp) for i in ids]
        print("".join(
            "N" if g is None else "R" if g == blob(gen, i) else "W" for i, g in zip(ids, got)
        ), flush=True)
    cache.close()
    """
)


def blob(gen: str, i: int) -> bytes:
    size = 300_000 if i % 25 == 0 else 3000 + i
    return random.Random(f"{gen}:{i}").randbytes(size)  # incompressible


def key(i: int) -> PipelineCacheKey:
    digest = hashlib.sha256(b"%d" % i).digest()
    return PipelineCacheKey(digest, digest[::-1], 0, (1, 1, 1), FeatureFlags(0), "vulkan")


def entry_keys(ids: range) -> list[bytes]:
    return [key(i).entry_key(FP) for i in ids]


def write(path: Path, gen: str, ids: range, *, keep_open: bool = False) -> PipelineCache:
    cache = PipelineCache.open(path, max_bytes=None)
    cache.put_many([(key(i), blob(gen, i)) for i in ids], FP)
    cache.flush()
    if not keep_open:
        cache.close()
    return cache


class Reader:
    """The READER child, asked over a pipe with a bounded wait for each answer."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", READER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert self.answer() == "ready"

    def answer(self, timeout: float = 60) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            raise AssertionError(f"the reader did not answer in {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            assert self.process.stderr is not None
            raise AssertionError(f"the reader ended: {self.process.stderr.read()[-3000:]}")
        return line.strip()

    def read(self, gen: str, ids: range, what: str = "one") -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{what} {gen} {ids.start} {ids.stop}\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        assert self.process.returncode == 0


FP = DeviceFingerprint.from_parts(1, 2, "r")


@needs_root
def test_a_reader_that_cannot_write_the_folder_reads_on_as_the_owner_changes_the_file(
    stored: Path,
) -> None:
    # The reader opens while the owner has the file closed: no -shm to read through, so
    # it opens the file immutable and must notice every change the owner makes.
    write(stored, "a", range(0, 100))
    reader = Reader(stored)
    try:
        assert reader.read("a", range(0, 100)) == "R" * 100
        # The owner deletes half and compacts (the file shrinks), then writes more.
        with PipelineCache.open(stored) as owner:
            owner.delete_entries(entry_keys(range(0, 50)))
        with PipelineCache.open(stored) as owner:
            before, after = owner.compact()
        assert after < before
        write(stored, "a", range(100, 150))
        assert reader.read("a", range(0, 150)) == "N" * 50 + "R" * 100
        assert reader.read("a", range(0, 150), "many") == "N" * 50 + "R" * 100
        write(stored, "a", range(150, 170))  # closed again: the reader is immutable again
        time.sleep(2 * RECHECK_INTERVAL_S)  # get_many looks before it reads
        assert reader.read("a", range(100, 170), "many") == "R" * 70
        # The owner replaces the file with another one (a new inode).
        fresh = stored.with_name("fresh.sqlite3")
        write(fresh, "b", range(0, 60))
        os.replace(fresh, stored)
        assert reader.read("b", range(0, 60)) == "R" * 60
        assert reader.read("a", range(60, 150)) == "N" * 90
        # The owner keeps it open and writes: the reader reads through the -wal.
        owner = write(stored, "c", range(200, 260), keep_open=True)
        try:
            assert reader.read("c", range(200, 260)) == "R" * 60
            owner.put_many([(key(i), blob("c", i)) for i in range(260, 300)], FP)
            owner.flush()
            assert reader.read("c", range(200, 300)) == "R" * 100
        finally:
            owner.close()
        with PipelineCache.open(stored) as owner:
            owner.delete_entries(entry_keys(range(200, 250)))
            owner.compact()
        assert reader.read("c", range(200, 300)) == "N" * 50 + "R" * 50
        assert reader.read("b", range(0, 60)) == "R" * 60
    finally:
        reader.close()


# -- files of an older schema ------------------------------------------------------------


@pytest.mark.parametrize("version", range(_schema.OLDEST_READABLE, SCHEMA_VERSION))
def test_a_file_of_an_older_schema_is_read_as_it_is(
    tmp_path: Path, fingerprint: DeviceFingerprint, make_key: Any, version: int
) -> None:
    """After an upgrade of the library, read-only tools read what the application has not
    opened (and so migrated) yet: the file is never changed."""
    path = tmp_path / "older.sqlite3"
    key, gone, digest = make_key(), make_key(), os.urandom(32)
    with PipelineCache.open(path) as cache:
        cache.put(key, fingerprint, b"kept")
        cache.put(gone, fingerprint, b"gone")
        cache.write(digest, fingerprint, b"by digest")
        assert cache.delete(gone, fingerprint)
    back_to_schema(path, version)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with PipelineCache.open(path, readonly=True) as cache:
        assert cache.schema_version() == version
        assert cache.get(key, fingerprint) == b"kept"
        assert cache.read(digest, fingerprint) == b"by digest"
        assert cache.get(gone, fingerprint) is None and len(cache) == 2
        assert cache.check().ok
        assert cache.explain(key, fingerprint).reason == "hit"
        # Schema 7 kept the departure record; schema 6 had none.
        expected = "deleted" if version >= 7 else "never seen"
        assert cache.explain(gone, fingerprint).reason == expected
        assert cache.misses() == []
        with pytest.raises(ReadOnlyCacheError):
            cache.put(make_key(), fingerprint, b"x")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main(["info", "--path", str(path)]) == 0


def test_a_file_older_than_the_oldest_readable_schema_is_refused_read_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    schema_file(path, _schema.OLDEST_READABLE - 1)
    before = path.read_bytes()
    # (also reached by a user who may not write the file: the advice says both)
    with pytest.raises(CacheError, match=r"needs upgrading .* as a user who may write the file"):
        PipelineCache.open(path, readonly=True)
    assert path.read_bytes() == before
