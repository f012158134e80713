"""Fixtures shared by the test modules: fresh caches in tmp_path, keys and fingerprints."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, find_redis_server
from vyre_sqlcache import (
    DeviceFingerprint,
    FeatureFlags,
    PipelineCache,
    PipelineCacheKey,
    _checkpointer,
)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_arrives() -> None:
    """Ctrl-C tests send SIGINT, to this process and to children: a test run started in
    the background without job control (`cmd &` in a script) ignores it, and so would
    every child. A handler is reset to the default in children; an ignored signal is not."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "pipelines.sqlite3"


@pytest.fixture
def cache(cache_path: Path) -> Iterator[PipelineCache]:
    with PipelineCache.open(cache_path) as opened:
        yield opened


@pytest.fixture
def fingerprint() -> DeviceFingerprint:
    return DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")


@pytest.fixture
def other_fingerprint() -> DeviceFingerprint:
    return DeviceFingerprint.from_parts(0x1002, 0x744C, "mesa 24.0.5", "radv")


@pytest.fixture
def make_key() -> Callable[..., PipelineCacheKey]:
    """A factory of distinct, valid keys; keyword arguments override fields."""

    def make(**fields: object) -> PipelineCacheKey:
        values: dict[str, object] = {
            "shader_hash": os.urandom(32),
            "bind_group_layout_hash": os.urandom(32),
            "push_constant_size": 16,
            "workgroup_size": (64, 1, 1),
            "feature_flags": FeatureFlags.SUBGROUP_OPS,
            "backend": "vulkan",
        }
        values.update(fields)
        return PipelineCacheKey(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port (Debian's package), killed afterwards."""
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (.ci/run does)")
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def no_purge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tombstones stay until the test purges them (the background purge never runs)."""
    monkeypatch.setattr(_checkpointer.Checkpointer, "purge_soon", lambda self: None)
    monkeypatch.setattr(PipelineCache, "_purge_at_close", staticmethod(lambda connection: None))
