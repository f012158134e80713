"""Test helpers that look inside a cache: the only place the tests touch its internals.

Each is named for what a test needs to see or do that the public API does not
offer (a raw connection for pragmas and tracing, a count of open connections, a
crash without a close); keep them few.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

from vyre_sqlcache import PipelineCache

__all__ = [
    "abandon",
    "connection_of",
    "count_checkpoints",
    "damage_blob",
    "forget_missing_redis_warning",
    "fresh_triton_process",
    "locked_for_others",
    "open_connections",
    "remote_decode",
    "remote_header",
    "remote_value",
    "run_script",
    "without_mask_copies",
]


# argv: path. Prints whether a process other than this one holds a lock in SQLite's lock
# range of the file (F_GETLK answers only for other processes' locks).
_LOCK_PROBE = """
import fcntl, os, struct, sys
layout = "hhqqi4x"  # struct flock on Linux
fd = os.open(sys.argv[1], os.O_RDONLY)
asked = struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0x40000000, 512, 0)
answer = fcntl.fcntl(fd, fcntl.F_GETLK, asked)
print(struct.unpack(layout, answer)[0] != fcntl.F_UNLCK)
"""


def locked_for_others(path: Any) -> bool:
    """Whether this process (or any other but the probe) holds a SQLite lock on the file
    (Linux's struct flock)."""
    probe = run_script(_LOCK_PROBE, str(path), timeout=60)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return probe.stdout.strip() == "True"


def run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `script` in a fresh interpreter that imports what this one does; its result."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def sql_shell(path: Any, *statements: str) -> None:
    """What an engineer types into a SQL shell: each statement run to its end on a plain
    connection of its own (not defensive, its own settings), the cache closed or open
    elsewhere."""
    connection = apsw.Connection(str(path))
    try:
        for statement in statements:
            connection.execute(statement).fetchall()
    finally:
        connection.close()


def overwrite_page(path: Path, page_sql: str, data: Callable[[int], bytes], at: int = 0) -> None:
    """Damage one page of a cache file at rest: `data(page_size)` written at offset `at`
    of the page whose number `page_sql` gives (run on a plain connection)."""
    connection = apsw.Connection(str(path))
    try:
        (page,) = connection.execute(page_sql).fetchone()
        page_size = int(connection.pragma("page_size"))
    finally:
        connection.close()
    with open(path, "r+b") as file:
        file.seek((page - 1) * page_size + at)
        file.write(data(page_size))


def connection_of(cache: PipelineCache) -> apsw.Connection:
    """This thread's main SQLite connection of `cache` (opened if needed)."""
    pool: Any = cache._pool
    with pool.call() as slot:
        connection: apsw.Connection = pool.main(slot)
        return connection


def flush_once_recovered(cache: PipelineCache) -> None:
    """`flush()` once what stopped the commits is gone: the first call may report, once,
    the error a background commit met meanwhile (as promised), and the next must work."""
    from vyre_sqlcache import CacheError

    try:
        cache.flush()
    except CacheError as error:
        assert "queued earlier" in str(error), error
        cache.flush()


def open_connections(cache: PipelineCache) -> int:
    """How many SQLite connections `cache` holds open now."""
    count: int = cache._pool.open_connections()
    return count


def abandon(cache: PipelineCache) -> None:
    """Drop a cache's connections without the checkpoint close() does, as a crash would."""
    cache._writer.stop()  # its queue is lost, as in a crash
    cache._checkpointer.stop()
    cache._pool.close()


def freeze(cache: PipelineCache) -> None:
    """Stop a cache's threads and leave its connections open, as a crash stops everything:
    nothing it queued reaches the file afterwards (closing the last connection would let
    SQLite checkpoint the log, which a crash does not)."""
    cache._writer.stop()  # its queue is lost, as in a crash
    cache._checkpointer.stop()


def count_checkpoints(monkeypatch: Any, path: Path) -> list[None]:
    """A list that gains an item each time the background thread of a cache of `path`
    checkpoints (caches that earlier tests left to the collector may checkpoint too)."""
    done: list[None] = []
    original = PipelineCache._copy_log

    def counting(cache: PipelineCache) -> tuple[int, int]:
        copied = original(cache)
        if cache.path == path.resolve():
            done.append(None)
        return copied

    monkeypatch.setattr(PipelineCache, "_copy_log", counting)
    return done


def count_log_restarts(monkeypatch: Any, path: Path) -> list[int]:
    """A list that gains, each time the background thread of a cache of `path` has the
    log start over, the pages that RESTART left (0: done)."""
    left: list[int] = []
    original = PipelineCache._restart_log

    def counting(cache: PipelineCache, ready: Any) -> int | None:
        pages = original(cache, ready)
        if pages is not None and cache.path == path.resolve():
            left.append(pages)
        return pages

    monkeypatch.setattr(PipelineCache, "_restart_log", counting)
    return left


def remote_value(
    entry_key: bytes, blob: bytes, key: bytes | None = None, *, compress: bool = True
) -> bytes:
    """The shared tier's value of an entry, as an upload writes it (to plant variants)."""
    from vyre_sqlcache import _remote_format

    value: bytes = _remote_format.encode(entry_key, blob, key, compress=compress)
    return value


def remote_decode(value: bytes, entry_key: bytes, key: bytes | None, max_raw: int) -> bytes:
    """A remote value's checked bytes; raises ValueError where a fetch would refuse it."""
    from vyre_sqlcache import _remote_format

    try:
        data: bytes = _remote_format.decode(value, entry_key, key, max_raw)
    except _remote_format.Rejected as why:
        raise ValueError(str(why)) from why
    return data


def remote_header() -> Any:
    """The `struct.Struct` of a remote value's fixed header, and its magic."""
    from vyre_sqlcache import _remote_format

    return _remote_format.HEADER, _remote_format.MAGIC


def forget_missing_redis_warning(monkeypatch: Any) -> None:
    """Let the next cache warn again that redis-py is missing (it warns once a process)."""
    monkeypatch.setattr("vyre_sqlcache._remote._warned_missing", False)


def without_mask_copies(monkeypatch: Any) -> None:
    """Make layer reads ask the user's file for masks at every hit, as with an apsw
    older than 3.47 (no `Connection.data_version`)."""
    from vyre_sqlcache import _layers

    monkeypatch.setattr(_layers, "_HAS_DATA_VERSION", False)


def fresh_triton_process() -> None:
    """Make `vyre_sqlcache.triton` start over as a new process would: its exit work runs
    (held files stored, cache closed, folder removed) and its state is forgotten."""
    from vyre_sqlcache import triton

    state: Any = triton
    state._PROCESS.at_exit()
    state._PROCESS = state._Process()


def damage_blob(cache: PipelineCache, entry_key: bytes) -> None:
    """Flip the first byte of an entry's stored blob with SQL, as damage on disk would
    (the entry must be committed)."""
    from vyre_sqlcache.keys import entry_id

    connection = connection_of(cache)
    rowid = entry_id(entry_key)
    (data,) = connection.execute("SELECT data FROM blobs WHERE id = ?", (rowid,)).fetchone()
    damaged = bytes([data[0] ^ 0xFF]) + data[1:]
    connection.execute("UPDATE blobs SET data = ? WHERE id = ?", (damaged, rowid))


def wait_purged(path: Any, timeout: float = 10.0) -> None:
    """Wait until the background purge has emptied the file's `tombstones`."""
    deadline = time.monotonic() + timeout
    while True:
        connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            (left,) = connection.execute("SELECT count(*) FROM tombstones").fetchone()
        finally:
            connection.close()
        if left == 0:
            return
        assert time.monotonic() < deadline, f"the purge left {left} tombstones"
        time.sleep(0.02)


def back_to_schema(path: Any, version: int) -> None:
    """Turn a closed cache file of the latest schema into exactly what `version` wrote,
    where the migrations since only added objects (tables, indexes, triggers, views)."""
    from vyre_sqlcache import _schema

    kept = {bytes(name).decode() for _, name, _, _ in _schema.built_schema(version)}
    connection = apsw.Connection(str(path))
    try:
        with connection:
            added = connection.execute(
                "SELECT type, name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' "
                "ORDER BY type = 'table'"  # triggers, views and indexes before their tables
            ).fetchall()
            for kind, name in added:
                if name not in kept:
                    connection.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
            connection.execute(f"PRAGMA user_version = {version}")
    finally:
        connection.close()


def schema_file(path: Any, version: int, *, wal: bool = True) -> None:
    """A new, empty cache file of an old schema `version`, as the migrations made it: 16 KiB
    pages, in WAL mode as the library creates a file, or not (as `bundle` leaves one)."""
    from vyre_sqlcache import _schema

    connection = apsw.Connection(str(path))
    try:
        connection.pragma("page_size", 16384)
        if wal:
            connection.pragma("journal_mode", "wal")
        with connection:
            for migration in _schema.migrations()[:version]:
                connection.execute(migration.sql)
            connection.execute(f"PRAGMA user_version = {version}")
    finally:
        connection.close()


def refuse_threads(monkeypatch: Any) -> None:
    """Have every thread of the package fail to start, as at the process's thread limit
    (RLIMIT_NPROC), where CPython's Thread.start raises this RuntimeError."""
    import threading

    start = threading.Thread.start

    def refused(thread: threading.Thread) -> None:
        if thread.name.startswith("vyre-sqlcache"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refused)
