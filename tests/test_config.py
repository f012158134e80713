"""Settings from the environment: VYRE_SQLCACHE_PATH, _MAX_SIZE and _DISABLE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vyre_sqlcache import DeviceFingerprint, PipelineCache
from vyre_sqlcache.config import DEFAULT_MAX_BYTES, Settings, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512K", 512 << 10),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("1T", 1 << 40),
        (" 64MiB ", 64 << 20),
        ("64MB", 64 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "12X", "lots"])
def test_parse_size_refuses_malformed_values(text: str) -> None:
    with pytest.raises(ValueError, match="512M or 2G"):
        parse_size(text)


def test_environment_variables_are_read() -> None:
    settings = Settings.from_environment(
        {
            "VYRE_SQLCACHE_PATH": "~/x.sqlite3",
            "VYRE_SQLCACHE_MAX_SIZE": "512M",
            "VYRE_SQLCACHE_DISABLE": "1",
        }
    )
    assert settings.path == Path("~/x.sqlite3").expanduser()
    assert settings.max_bytes == 512 << 20
    assert settings.disabled
    assert Settings.from_environment({}) == Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [("VYRE_SQLCACHE_MAX_SIZE", "huge"), ("VYRE_SQLCACHE_DISABLE", "maybe")],
)
def test_malformed_variables_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_environment({name: value})


def test_open_uses_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_PATH", str(tmp_path / "env.sqlite3"))
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "2M")
    with PipelineCache.open() as cache:
        assert cache.path == tmp_path / "env.sqlite3"
        assert cache.max_bytes == 2 << 20
    assert (tmp_path / "env.sqlite3").exists()


def test_explicit_arguments_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_PATH", str(tmp_path / "env.sqlite3"))
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "2M")
    with PipelineCache.open(tmp_path / "arg.sqlite3", max_bytes=None) as cache:
        assert cache.path == tmp_path / "arg.sqlite3"
        assert cache.max_bytes is None
    assert not (tmp_path / "env.sqlite3").exists()


def test_default_cap_is_one_gib(cache: PipelineCache) -> None:
    assert cache.max_bytes == DEFAULT_MAX_BYTES == 1 << 30


def test_malformed_environment_fails_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "1.5G")
    with pytest.raises(ValueError, match="VYRE_SQLCACHE_MAX_SIZE"):
        PipelineCache.open(tmp_path / "c.sqlite3")


def test_disabled_cache_stores_nothing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fingerprint: DeviceFingerprint,
    make_key: object,
) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_DISABLE", "1")
    path = tmp_path / "c.sqlite3"
    digest = os.urandom(32)
    with PipelineCache.open(path) as cache:
        assert cache.disabled
        cache.write(digest, fingerprint, b"blob")
        cache.flush()
        assert cache.read(digest, fingerprint) is None
        assert cache.invalidate_impacted([1], [digest], fingerprint) == 0
        assert len(cache) == 0
        assert cache.stats().misses == 1
        with pytest.raises(ValueError, match="program_digest"):
            cache.write(b"short", fingerprint, b"blob")
    assert not path.exists()
