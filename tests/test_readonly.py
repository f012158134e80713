"""Read-only caches: asked for, without write permission, and on read-only media."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vyre_sqlcache import CorruptCacheError, DeviceFingerprint, PipelineCache, ReadOnlyCacheError
from vyre_sqlcache._cachefile import needs_check_marker

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
        except ReadOnlyCacheError:
            pass
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
        ]
        for call in calls:
            with pytest.raises(ReadOnlyCacheError, match="read-only"):
                call()
        cache.flush()  # nothing pending: fine
    assert stored.read_bytes() == before
    assert sorted(p.name for p in stored.parent.iterdir()) == [stored.name]


def test_readonly_open_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    from vyre_sqlcache import CacheError

    with pytest.raises(CacheError, match="does not exist, and a read-only cache cannot"):
        PipelineCache.open(tmp_path / "missing.sqlite3", readonly=True)
    assert not (tmp_path / "missing.sqlite3").exists()


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
