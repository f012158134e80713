"""Test helpers that look inside a cache: the only place the tests touch its internals.

Each is named for what a test needs to see or do that the public API does not
offer (a raw connection for pragmas and tracing, a count of open connections, a
crash without a close); keep them few.
"""

from __future__ import annotations

from typing import Any

import apsw

from vyre_sqlcache import PipelineCache

__all__ = [
    "abandon",
    "connection_of",
    "count_checkpoints",
    "fresh_triton_process",
    "open_connections",
    "without_mask_copies",
]


def connection_of(cache: PipelineCache) -> apsw.Connection:
    """This thread's main SQLite connection of `cache` (opened if needed)."""
    pool: Any = cache._pool
    slot = pool.enter()
    try:
        connection: apsw.Connection = pool.main(slot)
        return connection
    finally:
        pool.leave(slot)


def open_connections(cache: PipelineCache) -> int:
    """How many SQLite connections `cache` holds open now."""
    count: int = cache._pool.open_connections()
    return count


def abandon(cache: PipelineCache) -> None:
    """Drop a cache's connections without the checkpoint close() does, as a crash would."""
    cache._writer.stop()  # its queue is lost, as in a crash
    cache._checkpointer.stop()
    cache._pool.close()


def count_checkpoints(monkeypatch: Any) -> list[None]:
    """A list that gains an item each time a cache's background thread checkpoints."""
    done: list[None] = []
    original = PipelineCache._checkpoint_passive

    def counting(cache: PipelineCache) -> None:
        original(cache)
        done.append(None)

    monkeypatch.setattr(PipelineCache, "_checkpoint_passive", counting)
    return done


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
