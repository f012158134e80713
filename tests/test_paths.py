"""Paths as users have them: linked folders and files, relative paths, hard links, and
things at the path that are not files.

Every name of a cache file resolves to one absolute path before SQLite sees it
(`_cachefile.resolve`): SQLite names the -wal and -shm after the path it is given,
so two names of one file must never reach it, or each would get a log of its own
and commits made through one would be lost to the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import apsw
import pytest

from torture.deletions import run_deletions
from vyre_sqlcache import CacheError, DeviceFingerprint, NotACacheError, PipelineCache
from vyre_sqlcache import _connections as connections_module
from vyre_sqlcache import cache as cache_module
from vyre_sqlcache._cachefile import LONGEST_SUFFIX_BYTES

from .helpers import flush_once_recovered, locked_for_others, run_script

FP = DeviceFingerprint.from_parts(1, 2, "paths")

# argv: path, tag, count. Writes `count` blobs named by the tag, flushing after each
# (the other process writes at the same time), and prints the path the cache uses.
WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fp = DeviceFingerprint.from_parts(1, 2, "paths")
    with PipelineCache.open(path) as cache:
        for i in range(count):
            digest = hashlib.sha256(f"{tag}{i}".encode()).digest()
            cache.write(digest, fp, digest * 40)
            cache.flush()
        print(cache.path)
    """
)

# argv: path. Opens the path with a bounded wait and prints the outcome as JSON.
OPENER = textwrap.dedent(
    """
    import json, sys
    from vyre_sqlcache import PipelineCache
    try:
        PipelineCache.open(sys.argv[1]).close()
        print(json.dumps(["opened", ""]))
    except Exception as error:
        print(json.dumps([type(error).__name__, str(error)]))
    """
)


def digest_of(tag: str, i: int) -> bytes:
    import hashlib

    return hashlib.sha256(f"{tag}{i}".encode()).digest()


def child(script: str, *args: str, timeout: float = 60) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"the child did not finish in {timeout} s") from None
    assert process.returncode == 0, err[-3000:]
    return out.strip()


@pytest.fixture
def linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    """`~/.cache` as a link to a folder on another disk: (the real folder, the link)."""
    real = tmp_path / "other-disk" / "cache"
    real.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").symlink_to(real, target_is_directory=True)
    return real, home / ".cache"


def test_a_linked_folder_in_the_path_opens_and_works(linked_folder: tuple[Path, Path]) -> None:
    real, link = linked_folder
    given = link / "vyre" / "pipelines.sqlite3"  # the folder `vyre` is made through the link
    with PipelineCache.open(given) as cache:
        assert cache.path == real / "vyre" / "pipelines.sqlite3"
        cache.write(digest_of("a", 0), FP, b"through the link")
        cache.flush()
        assert cache.read(digest_of("a", 0), FP) == b"through the link"
    assert (real / "vyre" / "pipelines.sqlite3").is_file()
    with PipelineCache.open(given, readonly=True) as cache:
        assert cache.read(digest_of("a", 0), FP) == b"through the link"


def test_a_linked_file_is_resolved_to_its_target(tmp_path: Path) -> None:
    # Kept working, not refused: SQLite names the -wal after the path it is given, so
    # opening the link's own name would give the file a second log; resolved, every
    # name of the file opens the target, with the target's -wal and -shm.
    target = tmp_path / "real" / "pipelines.sqlite3"
    target.parent.mkdir()
    with PipelineCache.open(target) as cache:
        cache.write(digest_of("t", 0), FP, b"written at the target")
    link = tmp_path / "pipelines.sqlite3"
    link.symlink_to(target)
    with PipelineCache.open(link) as cache:
        assert cache.path == target
        cache.write(digest_of("l", 0), FP, b"written through the link")
        cache.flush()
        with PipelineCache.open(target) as other:
            assert other.read(digest_of("l", 0), FP) == b"written through the link"
        assert not Path(str(link) + "-wal").exists()
        assert not Path(str(link) + "-shm").exists()
        assert cache.read(digest_of("t", 0), FP) == b"written at the target"
    assert link.is_symlink()  # the link itself is left as it was


@pytest.mark.parametrize("linked", ["folder", "file"])
def test_two_processes_through_the_link_and_the_real_path_share_one_cache(
    tmp_path: Path, linked: str
) -> None:
    real_folder = tmp_path / "other-disk"
    real_folder.mkdir()
    real = real_folder / "pipelines.sqlite3"
    PipelineCache.open(real).close()
    if linked == "folder":
        (tmp_path / "cache").symlink_to(real_folder, target_is_directory=True)
        via_link = tmp_path / "cache" / "pipelines.sqlite3"
    else:
        via_link = tmp_path / "pipelines.sqlite3"
        via_link.symlink_to(real)
    count = 60
    first = child(WRITER, str(via_link), "link", str(count))
    second = child(WRITER, str(real), "real", str(count))
    assert finish(first) == finish(second) == str(real)
    with PipelineCache.open(via_link) as cache:
        for tag in ("link", "real"):
            for i in range(count):
                digest = digest_of(tag, i)
                assert cache.read(digest, FP) == digest * 40, (tag, i)
        assert len(cache) == 2 * count
    leftovers = sorted(p.name for p in tmp_path.rglob("*-wal"))
    assert leftovers == []


def test_a_relative_path_keeps_its_file_after_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    with PipelineCache.open(Path("rel") / "pipelines.sqlite3") as cache:
        assert cache.path == start / "rel" / "pipelines.sqlite3"
        cache.write(digest_of("c", 0), FP, b"before chdir")
        monkeypatch.chdir(elsewhere)
        errors: list[BaseException] = []

        def new_thread() -> None:
            try:
                cache.write(digest_of("c", 1), FP, b"after chdir, new thread")
                cache.flush()
                assert cache.read(digest_of("c", 0), FP) == b"before chdir"
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=new_thread)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
        assert errors == []
    assert list(elsewhere.iterdir()) == []  # no new, empty database in the new folder
    with PipelineCache.open(start / "rel" / "pipelines.sqlite3") as cache:
        assert cache.read(digest_of("c", 1), FP) == b"after chdir, new thread"


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_with_two_hard_links_is_refused(tmp_path: Path, readonly: bool) -> None:
    # Refused rather than followed: a hard link has no target to resolve to, and each
    # name would get a -wal of its own; commits made through one would be lost.
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(digest_of("h", 0), FP, b"kept")
    other = tmp_path / "second-name.sqlite3"
    os.link(path, other)
    before = path.read_bytes()
    for name in (path, other):
        with pytest.raises(CacheError, match="has 2 hard links; a cache file must have one name"):
            PipelineCache.open(name, readonly=readonly)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, path.name])
    other.unlink()
    with PipelineCache.open(path) as cache:  # one name again: it opens
        assert cache.read(digest_of("h", 0), FP) == b"kept"


def make_special(kind: str, path: Path) -> Any:
    """Put a FIFO, a listening UNIX socket or a link to /dev/null at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
        return None
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        return server
    path.symlink_to("/dev/null")
    return None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "device itself"])
def test_a_fifo_socket_or_device_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    # Opening a FIFO for reading blocks until a writer comes: the child must answer in
    # time, so this runs in a child process with a timeout.
    path = Path("/dev/null") if kind == "device itself" else tmp_path / "pipelines.sqlite3"
    held = None if kind == "device itself" else make_special(kind, path)
    try:
        name, message = json.loads(finish(child(OPENER, str(path)), timeout=30))
    finally:
        if held is not None:
            held.close()
    assert name == NotACacheError.__name__
    assert "is not a regular file (a FIFO, socket or device)" in message
    if kind != "device itself":
        mode = os.lstat(path).st_mode
        assert stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISLNK(mode)
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# -- a cache file deleted or replaced while open --------------------------------------------

# argv: path, then digests in hex. Prints, as JSON, which of them the cache at the path has.
READER = textwrap.dedent(
    """
    import json, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "paths")
    with PipelineCache.open(sys.argv[1]) as cache:
        print(json.dumps([cache.read(bytes.fromhex(d), fp) is not None for d in sys.argv[2:]]))
    """
)


def found_by_another_process(path: Path, digests: list[bytes]) -> list[bool]:
    out = subprocess.run(
        [sys.executable, "-c", READER, str(path), *(d.hex() for d in digests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: list[bool] = json.loads(out.stdout)
    return found


def remove_cache(path: Path, how: str) -> None:
    if how == "files":
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            (path.parent / name).unlink(missing_ok=True)
    elif how == "main file only":
        path.unlink()  # its -wal and -shm stay behind
    else:
        for child in path.parent.iterdir():
            child.unlink()
        path.parent.rmdir()


@pytest.mark.parametrize("how", ["files", "main file only", "folder"])
@pytest.mark.parametrize("write_behind", [True, False])
def test_a_cache_deleted_while_open_is_made_again_and_keeps_what_flush_acknowledged(
    tmp_path: Path, how: str, write_behind: bool, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache" / "pipelines.sqlite3"
    before, since, after = (digest_of(tag, 0) for tag in ("before", "since", "after"))
    with PipelineCache.open(path, write_behind=write_behind) as cache:
        cache.write(before, FP, b"flushed before the deletion")
        cache.flush()
        cache.write(since, FP, b"written, not flushed, before the deletion")
        cache.delete_entries([digest_of("absent", 0)])  # commits what is queued
        remove_cache(path, how)
        cache.write(after, FP, b"written after the deletion")
        cache.flush()
        assert "was deleted or replaced while open" in caplog.text
        # The deletion was meant: what was flushed before it is gone; nothing since is.
        assert found_by_another_process(path, [before, since, after]) == [False, True, True]
        assert cache.read(since, FP) == b"written, not flushed, before the deletion"
        assert cache.read(before, FP) is None
        cache.write(before, FP, b"again")
    assert found_by_another_process(path, [before, since, after]) == [True, True, True]
    with PipelineCache.open(path) as cache:
        assert cache.check().ok and len(cache) == 3


# argv: path, count. Opens a missing cache file, pausing (as a preempted process would)
# just before it removes a -wal left at the path, then writes `count` blobs and flushes.
PAUSED_OPENER = textwrap.dedent(
    """
    import hashlib, pathlib, sys, time
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    path, count = sys.argv[1], int(sys.argv[2])
    unlink = pathlib.Path.unlink
    def paused(self, *args, **kwargs):
        if str(self) == path + "-wal" and not getattr(paused, "done", False):
            paused.done = True
            print("paused", flush=True)
            time.sleep(1.5)
        return unlink(self, *args, **kwargs)
    pathlib.Path.unlink = paused
    fp = DeviceFingerprint.from_parts(1, 2, "paths")
    with PipelineCache.open(path) as cache:
        pathlib.Path.unlink = unlink
        for i in range(count):
            digest = hashlib.sha256(f"child{i}".encode()).digest()
            cache.write(digest, fp, digest * 40)
        cache.flush()
        print("flushed", flush=True)
        time.sleep(1)  # the other process writes meanwhile
    """
)


def test_two_processes_making_the_file_at_once_share_its_log(tmp_path: Path) -> None:
    # The second opener found no file, then paused; the first made the file and its
    # -wal and -shm meanwhile. Removing them (left by a deleted file, it thought) gave
    # each process a log of its own: the other's flushed writes were lost.
    path = tmp_path / "pipelines.sqlite3"
    opener = child(PAUSED_OPENER, str(path), "50")
    assert opener.stdout is not None
    assert opener.stdout.readline().strip() == "paused", finish(opener)
    with PipelineCache.open(path) as cache:
        for i in range(50):
            cache.write(digest_of("parent", i), FP, b"parent" * 100)
        cache.flush()
        assert opener.stdout.readline().strip() == "flushed", finish(opener)
        for i in range(50, 100):
            cache.write(digest_of("parent", i), FP, b"parent" * 100)
        cache.flush()
        assert cache.read(hashlib.sha256(b"child0").digest(), FP) is not None
    finish(opener)
    with PipelineCache.open(path) as cache:
        assert cache.check().ok and len(cache) == 150


# argv: path. Opens the cache, pausing (preempted) once its first connection has the
# file and before it notes which file that is; then writes 20 blobs and flushes.
PAUSED_IN_OPEN = textwrap.dedent(
    """
    import hashlib, sys, time
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    from vyre_sqlcache import cache as cache_module
    path = sys.argv[1]
    prepare = cache_module.prepare
    def paused(*args, **kwargs):
        prepare(*args, **kwargs)
        cache_module.prepare = prepare
        print("prepared", flush=True)
        time.sleep(1.5)
    cache_module.prepare = paused
    fp = DeviceFingerprint.from_parts(1, 2, "paths")
    with PipelineCache.open(path) as cache:
        for i in range(20):
            digest = hashlib.sha256(f"opener{i}".encode()).digest()
            cache.write(digest, fp, digest * 40)
        cache.flush()
    """
)


@pytest.mark.parametrize("then", ["nothing", "another process makes it"])
def test_a_cache_deleted_while_it_is_opened_keeps_what_flush_acknowledged(
    tmp_path: Path, then: str
) -> None:
    # The opener noted the inode at the path after its connection had the file: the
    # deleted file's, or none, so it never followed the path, and wrote on into the
    # deleted file, where close() lost every flushed write.
    path = tmp_path / "cache" / "pipelines.sqlite3"
    PipelineCache.open(path).close()
    opener = child(PAUSED_IN_OPEN, str(path))
    assert opener.stdout is not None
    assert opener.stdout.readline().strip() == "prepared", finish(opener)
    remove_cache(path, "folder")
    if then == "nothing":
        finish(opener)
    else:
        with PipelineCache.open(path) as cache:
            cache.write(digest_of("other", 0), FP, b"other")
            cache.flush()
            finish(opener)
    digests = [hashlib.sha256(f"opener{i}".encode()).digest() for i in range(20)]
    assert found_by_another_process(path, digests) == [True] * 20


@pytest.mark.parametrize("write_behind", [True, False])
def test_a_cache_deleted_while_open_is_made_again_at_close(
    tmp_path: Path, write_behind: bool
) -> None:
    path = tmp_path / "pipelines.sqlite3"
    digest = digest_of("at close", 0)
    cache = PipelineCache.open(path, write_behind=write_behind)
    cache.write(digest_of("first", 0), FP, b"first")
    cache.flush()
    remove_cache(path, "files")
    # queued at close (write-behind), or committed already into the deleted file
    cache.write(digest, FP, b"written after the deletion, never flushed")
    cache.close()
    assert found_by_another_process(path, [digest]) == [True]


def test_flush_after_the_path_became_a_folder_raises_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.sqlite3"
    digest = digest_of("kept", 0)
    with PipelineCache.open(path) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        remove_cache(path, "files")
        path.mkdir()
        cache.write(digest, FP, b"kept while the path is a folder")
        with pytest.raises(CacheError, match="is a folder"):
            cache.flush()
        path.rmdir()
        flush_once_recovered(cache)  # the writer thread's own try in between: reported once
    assert found_by_another_process(path, [digest]) == [True]


def test_flush_after_the_folder_became_a_file_names_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "pipelines.sqlite3"
    digest = digest_of("kept", 0)
    with PipelineCache.open(path) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        remove_cache(path, "folder")
        path.parent.write_bytes(b"someone's file where the folder was")
        cache.write(digest, FP, b"kept while the folder is a file")
        with pytest.raises(CacheError, match=r"cache is a file, not a folder"):
            cache.flush()
        assert path.parent.read_bytes() == b"someone's file where the folder was"
        path.parent.unlink()
        flush_once_recovered(cache)
    assert found_by_another_process(path, [digest]) == [True]


def test_entries_past_the_tracked_count_are_found_by_their_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "MAX_TRACKED_WRITES", 2)
    path = tmp_path / "pipelines.sqlite3"
    digests = [digest_of("many", i) for i in range(6)]
    with PipelineCache.open(path, write_behind=False) as cache:
        old_key = bytes(range(32))
        cache.put_entry(old_key, b"flushed long ago", created_ms=1)
        cache.flush()
        for digest in digests:
            cache.write(digest, FP, digest)
        remove_cache(path, "files")
        cache.flush()
        assert found_by_another_process(path, digests) == [True] * 6
    with PipelineCache.open(path) as cache:
        assert cache.get_entry(old_key) is None  # created before the flush: not written again


def test_two_cache_objects_on_a_deleted_file_meet_in_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path) as first, PipelineCache.open(path) as second:
        first.write(digest_of("first", 0), FP, b"first")
        second.write(digest_of("second", 0), FP, b"second")
        first.flush()
        second.flush()
        remove_cache(path, "files")
        second.write(digest_of("second", 1), FP, b"second, after")
        second.flush()  # makes the new file
        first.write(digest_of("first", 1), FP, b"first, after")
        first.flush()  # joins it, its log included
        assert first.read(digest_of("second", 1), FP) == b"second, after"
        assert second.read(digest_of("first", 1), FP) == b"first, after"
    found = found_by_another_process(
        path, [digest_of("first", 1), digest_of("second", 1), digest_of("first", 0)]
    )
    assert found == [True, True, False]
    with PipelineCache.open(path) as cache:
        assert cache.check().ok


def test_a_thread_first_calling_after_the_deletion_finds_a_usable_file(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.sqlite3"
    digest = digest_of("new thread", 0)
    with PipelineCache.open(path, write_behind=False) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        remove_cache(path, "files")
        outcome: list[object] = []

        def first_call() -> None:  # its first connection opens the path: a new, empty file
            try:
                cache.write(digest, FP, b"from a thread new to the cache")
                outcome.append(cache.read(digest, FP))
            except CacheError as error:
                outcome.append(error)

        thread = threading.Thread(target=first_call)
        thread.start()
        thread.join()
        assert outcome == [b"from a thread new to the cache"]
        cache.flush()
    assert found_by_another_process(path, [digest]) == [True]


def test_deleting_the_file_under_threads_at_work_loses_nothing_flushed_since(
    tmp_path: Path,
) -> None:
    # Three threads write and read while the file, its main file alone or its folder is
    # deleted every 0-50 ms, with flushes between (the torture's deletion trial).
    report = run_deletions(tmp_path, trials=2, seconds=2, seed=11)
    assert report.errors == [] and report.hangs == 0
    assert report.deletions > 10 and report.checked > 10
    assert (report.lost, report.wrong, report.not_ok) == (0, 0, 0)


def test_ctrl_c_while_the_deleted_file_is_left_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pipelines.sqlite3"
    digest = digest_of("interrupted", 0)
    read_back = cache_module.sound_entry

    def interrupted(*args: Any) -> Any:  # Ctrl-C while entries are read from the old file
        os.kill(os.getpid(), signal.SIGINT)
        return read_back(*args)

    monkeypatch.setattr(cache_module, "sound_entry", interrupted)
    with PipelineCache.open(path, write_behind=False) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        cache.write(digest, FP, b"committed into the file about to be deleted")
        remove_cache(path, "files")
        with pytest.raises(KeyboardInterrupt):
            cache.flush()
        monkeypatch.setattr(cache_module, "sound_entry", read_back)
        cache.flush()
    assert found_by_another_process(path, [digest]) == [True]


def test_a_new_connection_is_never_paired_with_the_deleted_files_log(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.sqlite3"
    before, since, threads = digest_of("before", 0), digest_of("since", 0), digest_of("t", 0)
    with PipelineCache.open(path, write_behind=False) as cache:
        cache.write(before, FP, b"flushed before the deletion")
        cache.flush()
        cache.write(since, FP, b"committed since the flush")
        remove_cache(path, "main file only")  # its -wal and -shm stay, in use
        outcome: list[object] = []

        def first_call() -> None:  # a thread's first connection, before the next commit
            try:
                outcome.append(cache.read(since, FP))
            except CacheError as error:
                outcome.append(str(error))
            # a write commits, which makes the file again first
            cache.write(threads, FP, b"from a thread new to the cache")
            outcome.append(cache.read(since, FP))

        thread = threading.Thread(target=first_call)
        thread.start()
        thread.join()
        assert outcome == [
            f"{path} was deleted while open; the next write or flush() makes it again",
            b"committed since the flush",
        ]
    assert found_by_another_process(path, [before, since, threads]) == [False, True, True]
    with PipelineCache.open(path) as cache:
        assert cache.check().ok and len(cache) == 2


def test_a_write_after_the_deletion_reaches_the_new_file_without_a_flush(tmp_path: Path) -> None:
    # Other processes see a write a few milliseconds later: a deleted file must not
    # hide it until the next flush.
    path = tmp_path / "pipelines.sqlite3"
    since, after = digest_of("since", 0), digest_of("after", 0)
    with PipelineCache.open(path, write_behind=False) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        cache.write(since, FP, b"committed before the deletion, not flushed")
        remove_cache(path, "files")
        cache.write(after, FP, b"committed after the deletion")
        assert found_by_another_process(path, [since, after]) == [True, True]


def test_another_process_opens_the_path_while_the_deleted_files_log_is_in_use(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        remove_cache(path, "main file only")  # this object still uses its -wal and -shm
        other = subprocess.run(
            [sys.executable, "-c", WRITER, str(path), "other", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 0, other.stderr[-500:]  # it failed: disk I/O error
        cache.write(digest_of("mine", 0), FP, b"mine")
        cache.flush()
        assert cache.read(digest_of("other", 2), FP) is not None
    others = [digest_of("other", i) for i in range(3)]
    assert found_by_another_process(path, [digest_of("mine", 0), *others]) == [True] * 4
    with PipelineCache.open(path) as cache:
        assert cache.check().ok and len(cache) == 4


def test_a_backup_moved_in_while_open_gets_what_was_written_since_the_flush(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pipelines.sqlite3"
    backup = tmp_path / "backup.sqlite3"
    with PipelineCache.open(backup) as other:
        other.write(digest_of("backup", 0), FP, b"in the backup")
    with PipelineCache.open(path, write_behind=False) as cache:
        cache.write(digest_of("flushed", 0), FP, b"flushed")
        cache.flush()
        cache.write(digest_of("since", 0), FP, b"since the flush")
        remove_cache(path, "files")
        os.replace(backup, path)  # a restore: the old file and its log out, a copy in
        cache.write(digest_of("after", 0), FP, b"after the restore")
        assert cache.read(digest_of("backup", 0), FP) == b"in the backup"
    digests = [digest_of(tag, 0) for tag in ("backup", "since", "after", "flushed")]
    assert found_by_another_process(path, digests) == [True, True, True, False]


class _HeldFile(apsw.VFSFile):
    def __init__(self, vfs: _HoldingVFS, name: Any, flags: list[int]) -> None:
        super().__init__("", name, flags)
        self._vfs = vfs

    def xRead(self, amount: int, offset: int) -> bytes:
        if threading.current_thread() is self._vfs.held_thread:
            self._vfs.holding.set()
            self._vfs.release.wait(30)
        data: bytes = super().xRead(amount, offset)
        return data


class _HoldingVFS(apsw.VFS):
    """Passes I/O through, holding the reads of one thread until released."""

    def __init__(self) -> None:
        self.held_thread: threading.Thread | None = None
        self.holding = threading.Event()
        self.release = threading.Event()
        self.name = "test-holding"
        super().__init__(self.name, "")

    def xOpen(self, name: Any, flags: list[int]) -> _HeldFile:
        return _HeldFile(self, name, flags)


def test_a_reopen_that_cannot_wait_for_another_threads_call_leaves_the_cache_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections_module, "QUIESCE_TIMEOUT_S", 0.3)
    vfs = _HoldingVFS()
    path = tmp_path / "pipelines.sqlite3"
    try:
        with PipelineCache.open(path, write_behind=False, vfs=vfs.name) as cache:
            cache.write(digest_of("first", 0), FP, b"first")
            cache.flush()
            reader = threading.Thread(target=lambda: cache.read(digest_of("first", 0), FP))
            vfs.held_thread = reader
            reader.start()  # its read is held inside SQLite: a call that does not end
            assert vfs.holding.wait(10)
            remove_cache(path, "files")
            with pytest.raises(CacheError, match="did not end in time"):
                cache.write(digest_of("after", 0), FP, b"after the deletion")
            # A call after that must not wait for a resume that never comes.
            outcome: list[object] = []
            probe = threading.Thread(
                target=lambda: outcome.append(cache.read(digest_of("other", 0), FP))
            )
            probe.start()
            probe.join(10)
            if not outcome:
                cache._pool.resume()  # only so that the test ends (and fails) instead of hanging
            assert outcome == [None], "a call after the failed reopen waited"
            vfs.release.set()
            reader.join(10)
            cache.write(digest_of("after", 0), FP, b"after the deletion")
            assert cache.read(digest_of("after", 0), FP) == b"after the deletion"
    finally:
        vfs.release.set()
        vfs.unregister()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_fork_right_after_the_deletion_loses_nothing_committed_since_the_flush(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pipelines.sqlite3"
    since = digest_of("since", 0)
    with PipelineCache.open(path, write_behind=False) as cache:
        cache.write(digest_of("first", 0), FP, b"first")
        cache.flush()
        cache.write(since, FP, b"committed before the deletion, not flushed")
        remove_cache(path, "files")
        child = os.fork()  # closes every connection, on both sides, before the next commit
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        cache.flush()
        assert cache.read(since, FP) == b"committed before the deletion, not flushed"
    assert found_by_another_process(path, [since]) == [True]


@pytest.mark.skipif(sys.platform != "linux", reason="the probe reads Linux's struct flock")
@pytest.mark.parametrize("how", ["open again", "open read-only", "open as a layer", "merge from"])
def test_looking_at_the_file_again_keeps_this_processs_locks_on_it(
    tmp_path: Path, how: str
) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds on it,
    # its SQLite connections' included (SQLite's "how to corrupt", 2.2): another
    # process could then take the file's exclusive lock, and its last close would
    # checkpoint and truncate the log under this process's readers.
    path = tmp_path / "cache.sqlite3"
    first = PipelineCache.open(path)
    first.write(digest_of("lock", 0), FP, b"first")
    first.flush()
    assert locked_for_others(path)
    other = tmp_path / "other.sqlite3"
    if how == "open again":
        second = PipelineCache.open(path)
    elif how == "open read-only":
        second = PipelineCache.open(path, readonly=True)
    elif how == "open as a layer":
        second = PipelineCache.open(other, layers=[path])
    else:
        second = PipelineCache.open(other)
        second.merge([path])
    try:
        assert second.read(digest_of("lock", 0), FP) == b"first"
        assert locked_for_others(path)
        assert first.read(digest_of("lock", 0), FP) == b"first"
    finally:
        second.close()
        first.close()


def path_of_length(folder: Path, length: int) -> Path:
    """A path under `folder` exactly `length` bytes long, in folders of 100 bytes."""
    path = str(folder.resolve())
    while length - len(path) > 110:
        path += "/" + "d" * 100
    return Path(path + "/" + "c" * (length - len(path) - 1))


@pytest.mark.parametrize("extra", [0, 1, 300])
def test_a_path_longer_than_sqlite_takes_is_refused_up_front(tmp_path: Path, extra: int) -> None:
    longest = apsw_longest_path()
    path = path_of_length(tmp_path, longest + extra)
    if extra == 0:
        with PipelineCache.open(path) as cache:
            cache.write(digest_of("long", 0), FP, b"fits")
        with PipelineCache.open(path) as cache:
            assert cache.read(digest_of("long", 0), FP) == b"fits"
        return
    with pytest.raises(CacheError, match=rf"{longest + extra} bytes long.*at most {longest}"):
        PipelineCache.open(path)
    assert list(tmp_path.iterdir()) == []  # no folder made for it


def apsw_longest_path() -> int:
    # pager.c refuses a database path whose length plus 8 exceeds the VFS's mxPathname.
    default = apsw.vfs_details()[0]
    return int(default["mxPathname"]) - 8


def test_a_relative_path_after_the_current_folder_was_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    script = textwrap.dedent(
        """
        import os, sys
        from vyre_sqlcache import CacheError, PipelineCache
        os.chdir(sys.argv[1])
        os.rmdir(sys.argv[1])
        try:
            PipelineCache.open("pipelines.sqlite3")
        except CacheError as error:
            print(error)
        """
    )
    said = finish(child(script, str(folder)))
    assert "pipelines.sqlite3" in said and "current folder" in said and "absolute" in said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="statfs is asked on Linux")
def test_the_file_system_type_is_the_one_stat_reports(tmp_path: Path) -> None:
    from vyre_sqlcache._cachefile import _file_system_magic, network_file_system

    told = subprocess.run(
        ["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert _file_system_magic(tmp_path) == int(told.stdout.strip(), 16)
    assert network_file_system(tmp_path) is None  # the tests run on a local disk


@pytest.mark.parametrize(
    ("magic", "name"), [(0x6969, "NFS"), (0xFF534D42, "CIFS"), (0x0BD00BD0, "Lustre")]
)
def test_a_cache_on_a_network_file_system_warns_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    magic: int,
    name: str,
) -> None:
    from vyre_sqlcache import _cachefile

    monkeypatch.setattr(_cachefile, "_file_system_magic", lambda folder: magic)
    path = tmp_path / "shared.sqlite3"
    with caplog.at_level(logging.WARNING, logger="vyre_sqlcache"):
        for i in range(2):
            with PipelineCache.open(path) as cache:
                cache.write(digest_of("shared", i), FP, b"works")
    said = [r.getMessage() for r in caplog.records if "network file system" in r.getMessage()]
    assert len(said) == 1, said
    assert name in said[0] and str(path) in said[0] and "several hosts" in said[0]
    with PipelineCache.open(path) as cache:
        assert [cache.read(digest_of("shared", i), FP) for i in range(2)] == [b"works"] * 2


@pytest.mark.skipif(sys.platform != "linux", reason="Linux file names may be any bytes")
def test_a_path_that_is_not_utf8_is_refused_with_a_reason(tmp_path: Path) -> None:
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))  # Latin-1, not UTF-8
    folder.mkdir()
    with pytest.raises(CacheError, match="not UTF-8"):
        PipelineCache.open(folder / "pipelines.sqlite3")
    assert list(folder.iterdir()) == []


# argv: path, copy's path. Writes and flushes one blob, then copies the cache.
IN_AN_ASCII_LOCALE = textwrap.dedent(
    """
    import os, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    with PipelineCache.open(sys.argv[1]) as cache:
        cache.write(bytes(32), DeviceFingerprint.from_parts(1, 2, "paths"), b"locale")
        cache.flush()
        cache.copy(sys.argv[2])
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes")
def test_a_utf8_path_opens_in_a_process_whose_locale_is_ascii(tmp_path: Path) -> None:
    # Python decodes the path's bytes as ASCII with escapes there (LC_ALL=C without UTF-8
    # mode): the name was refused as "not UTF-8", though its bytes are.
    path = tmp_path / "café" / "pipelines.sqlite3"
    copied = path.with_name("copié.sqlite3")  # (VACUUM INTO got the name as text, too)
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", IN_AN_ASCII_LOCALE, os.fsencode(path), os.fsencode(copied)],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(path.parent)) == [copied.name, path.name]  # none at other names
    for name in (path, copied):
        with PipelineCache.open(name) as cache:
            assert cache.read(bytes(32), FP) == b"locale"


@pytest.mark.parametrize("then", ["close", "flush", "read"])
def test_a_document_renamed_over_an_open_cache_is_never_written(tmp_path: Path, then: str) -> None:
    # The old file's -wal is still at the path after the rename: a connection opened
    # there would read the old pages through it and checkpoint them into the document.
    path = tmp_path / "pipelines.sqlite3"
    document = b"\x89PNG\r\n\x1a\n" + os.urandom(5000)
    cache = PipelineCache.open(path)
    try:
        cache.write(digest_of("flushed", 0), FP, b"flushed")
        cache.flush()
        cache.write(digest_of("since", 0), FP, b"since the flush")
        cache.stats()  # committed, not flushed: owed to the file at the path
        (tmp_path / "photo.png").write_bytes(document)
        os.replace(tmp_path / "photo.png", path)
        if then == "flush":
            with pytest.raises(CacheError, match="not a SQLite database"):
                cache.flush()
        elif then == "read":
            with pytest.raises(CacheError):
                cache.flush()
            with pytest.raises(CacheError):
                cache.read(digest_of("flushed", 0), FP)
    finally:
        cache.close()
    assert path.read_bytes() == document


@pytest.mark.parametrize("extra", [0, 1, 36])
def test_a_file_name_too_long_for_the_files_made_beside_it_is_refused_up_front(
    tmp_path: Path, extra: int
) -> None:
    # The cache names files after its own (`.needs-check`, `.corrupt-<time>-wal`, ...):
    # each must fit the folder's longest name, or an open fails halfway.
    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - LONGEST_SUFFIX_BYTES
    path = tmp_path / ("c" * (longest + extra))
    if extra == 0:
        with PipelineCache.open(path) as cache:
            cache.write(digest_of("long", 0), FP, b"fits")
            assert cache.check(repair=True).bad_entries == ()
        return
    with pytest.raises(CacheError, match=rf"{longest + extra} bytes long.*at most {longest}"):
        PipelineCache.open(path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def as_user(uid: int, work: Any) -> None:
    """Run `work()` in a forked child that is user `uid` (root only); assert it succeeded."""
    import traceback  # here: the child may not be allowed to read the standard library

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the other user's part failed (see stderr)"


@pytest.mark.skipif(
    not hasattr(os, "fork")
    or not hasattr(os, "geteuid")
    or os.geteuid() != 0
    or not os.path.isdir("/tmp"),
    reason="acting as two users needs root",
)
@pytest.mark.parametrize("folder_mode", [0o777, 0o1777])
@pytest.mark.parametrize("reader_ends", ["close", "exit"])
def test_another_users_read_only_open_leaves_the_owner_able_to_write(
    folder_mode: int, reader_ends: str
) -> None:
    # SQLite makes the -wal and -shm as the user who first opens the file, a reader
    # too; the owner's writer then opened them read-only and failed every write.
    import tempfile

    # Under /tmp, which every user may pass through (pytest's own folders are 0700).
    folder = Path(tempfile.mkdtemp(prefix="vyre-shared-", dir="/tmp"))
    try:
        # Every module the other users' calls import, imported here first: they may not
        # be allowed to read this interpreter's files (a virtual environment under /root).
        warm = folder / "warm.sqlite3"
        with PipelineCache.open(warm) as cache:
            cache.write(digest_of("warm", 0), FP, b"warm")
        with PipelineCache.open(warm, readonly=True) as cache:
            assert cache.read(digest_of("warm", 0), FP) == b"warm"
        folder.chmod(folder_mode)
        path = folder / "pipelines.sqlite3"

        def owner_writes(tag: str) -> None:
            with PipelineCache.open(path) as cache:
                cache.write(digest_of(tag, 0), FP, tag.encode() * 100)
                cache.flush()
                assert cache.read(digest_of("first", 0), FP) == b"first" * 100

        def reader_reads() -> None:
            cache = PipelineCache.open(path, readonly=True)
            assert cache.read(digest_of("first", 0), FP) == b"first" * 100
            if reader_ends == "exit":
                os._exit(0)  # no close(): what it made stays until the owner's next open
            cache.close()
            assert not any(Path(f"{path}{side}").exists() for side in ("-wal", "-shm"))

        as_user(1000, lambda: owner_writes("first"))
        as_user(1001, reader_reads)
        if reader_ends == "exit" and folder_mode == 0o1777:
            # The sticky folder lets only their owner remove them: the owner is told.
            with pytest.raises(AssertionError):
                as_user(1000, lambda: owner_writes("second"))
            return
        as_user(1000, lambda: owner_writes("second"))
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
@pytest.mark.parametrize("side", ["-wal", "-shm"])
@pytest.mark.parametrize("kind", ["hard link", "symbolic link", "folder", "fifo"])
@pytest.mark.parametrize("readonly", [False, True])
def test_a_side_file_that_is_not_the_caches_is_refused_and_left_alone(
    tmp_path: Path, side: str, kind: str, readonly: bool
) -> None:
    path = tmp_path / "pipelines.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(digest_of("kept", 0), FP, b"kept")
    victim = tmp_path / "notes.dat"
    victim.write_bytes(b"someone's notes " * 500)
    where = Path(f"{path}{side}")
    if kind == "hard link":
        os.link(victim, where)
    elif kind == "symbolic link":
        where.symlink_to(victim)
    elif kind == "folder":
        where.mkdir()
    else:
        os.mkfifo(where)
    with pytest.raises(CacheError, match=rf"{side} is .*remove it"):
        PipelineCache.open(path, readonly=readonly)
    assert victim.read_bytes() == b"someone's notes " * 500
    assert os.path.lexists(where)


@pytest.mark.parametrize(
    ("given", "error"),
    [(b"/tmp/c.sqlite3", TypeError), (123, TypeError), ("", ValueError)],
    ids=["bytes", "int", "empty"],
)
def test_a_path_that_is_not_one_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: Any, error: type[Exception]
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty path would have named the current folder
    with pytest.raises(error, match=r"^path "):
        PipelineCache.open(given)
    assert list(tmp_path.iterdir()) == []


CTRL_C_WHILE_THE_FOLDER_IS_LOCKED = textwrap.dedent(
    """
    import fcntl, os, signal, sys, threading, time
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    path = sys.argv[1]
    fp = DeviceFingerprint.from_parts(1, 2, "paths")
    cache = PipelineCache.open(path)
    cache.write(bytes(32), fp, b"before")
    cache.flush()
    for side in ("", "-wal", "-shm"):
        os.unlink(path + side)
    folder = os.open(os.path.dirname(path), os.O_RDONLY)
    fcntl.flock(folder, fcntl.LOCK_EX)  # another program's, for long
    cache.write(bytes([1]) * 32, fp, b"after the deletion")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    try:
        cache.flush()
        print("flushed")
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - start) < 5)
    fcntl.flock(folder, fcntl.LOCK_UN)
    cache.flush()
    print(cache.read(bytes([1]) * 32, fp) == b"after the deletion")
    cache.close()
    """
)


def test_ctrl_c_need_not_wait_for_another_programs_lock_on_the_folder(tmp_path: Path) -> None:
    # The cache's file is made again under an flock of its folder; Ctrl-C was held for
    # the whole wait for that lock (10 s) when another program held it.
    result = run_script(CTRL_C_WHILE_THE_FOLDER_IS_LOCKED, str(tmp_path / "c.sqlite3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["interrupted True", "True"]
