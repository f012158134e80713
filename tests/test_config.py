"""Settings from the environment: VYRE_SQLCACHE_PATH, _MAX_SIZE and _DISABLE."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "12X", "lots", "\u0661\u0662\u0663"])
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


@pytest.mark.parametrize("existing", [False, True])
def test_a_cap_from_the_environment_is_never_stored_in_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, existing: bool
) -> None:
    # A one-off VYRE_SQLCACHE_MAX_SIZE=1M (a test, a CI job) capped the user's cache for
    # good: every later process without it evicted down to 1 MiB.
    path = tmp_path / "c.sqlite3"
    if existing:
        PipelineCache.open(path, max_bytes=5 << 20).close()
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "1M")
    with PipelineCache.open(path) as cache:
        assert cache.max_bytes == 1 << 20
    monkeypatch.delenv("VYRE_SQLCACHE_MAX_SIZE")
    with PipelineCache.open(path) as cache:
        assert cache.max_bytes == (5 << 20 if existing else DEFAULT_MAX_BYTES)


def test_explicit_arguments_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_PATH", str(tmp_path / "env.sqlite3"))
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "2M")
    with PipelineCache.open(tmp_path / "arg.sqlite3", max_bytes=None) as cache:
        assert cache.path == tmp_path / "arg.sqlite3"
        assert cache.max_bytes is None
    assert not (tmp_path / "env.sqlite3").exists()


@pytest.mark.parametrize(
    ("variable", "value", "argument"),
    [
        ("VYRE_SQLCACHE_PATH", "~nosuchuser-here/x", {}),  # the path is given
        ("VYRE_SQLCACHE_MAX_SIZE", "bogus", {"max_bytes": 1 << 30}),
        ("VYRE_SQLCACHE_COMPRESSION", "bogus", {"compression": "off"}),
        ("VYRE_SQLCACHE_LOG_MISSES", "bogus", {"log_misses": False}),
        ("VYRE_SQLCACHE_REMOTE", "http://not-redis", {"remote": None}),
        ("VYRE_SQLCACHE_LAYERS", "~nosuchuser-here/x", {"layers": []}),
    ],
)
def test_an_explicit_argument_wins_over_a_malformed_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, argument: Any
) -> None:
    # Every variable was read and checked, also one the argument replaced: the open failed
    # with a ValueError naming a variable it did not use.
    monkeypatch.setenv(variable, value)
    with PipelineCache.open(tmp_path / "c.sqlite3", **argument) as cache:
        cache.write(b"\1" * 32, DeviceFingerprint.from_parts(1, 2, "x"), b"blob")
    with pytest.raises(ValueError, match=variable):
        PipelineCache.open(tmp_path / "d.sqlite3" if argument else None)


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


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="a POSIX password database")
def test_a_user_without_a_home_folder_gets_errors_that_say_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A container run as a user id with no entry in /etc/passwd and no HOME.
    import pwd

    from vyre_sqlcache import CacheError, cli

    def no_entry(uid: int) -> Any:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for name in ("HOME", "XDG_CACHE_HOME", "VYRE_SQLCACHE_PATH", "VYRE_SQLCACHE_LAYERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(CacheError, match="set VYRE_SQLCACHE_PATH or XDG_CACHE_HOME"):
        PipelineCache.open()
    with pytest.raises(ValueError, match=r"path is '~/c\.sqlite3', which starts with ~"):
        PipelineCache.open("~/c.sqlite3")
    monkeypatch.setenv("VYRE_SQLCACHE_LAYERS", "~/bundle.sqlite3")
    with pytest.raises(ValueError, match=r"VYRE_SQLCACHE_LAYERS is '~/bundle\.sqlite3'"):
        PipelineCache.open(tmp_path / "c.sqlite3")
    monkeypatch.delenv("VYRE_SQLCACHE_LAYERS")
    assert cli.main(["--help"]) == 0
    assert "VYRE_SQLCACHE_PATH" in capsys.readouterr().out
    assert cli.main(["info"]) == 1
    assert "set VYRE_SQLCACHE_PATH or XDG_CACHE_HOME" in capsys.readouterr().err
    with PipelineCache.open(tmp_path / "c.sqlite3") as cache:  # a path given: no home needed
        cache.put_named("ns", "name", b"works")
        assert cache.get_named("ns", "name") == b"works"


@pytest.mark.parametrize(
    "name",
    [
        "VYRE_SQLCACHE_PATH",
        "VYRE_SQLCACHE_MAX_SIZE",
        "VYRE_SQLCACHE_COMPRESSION",
        "VYRE_SQLCACHE_DISABLE",
        "VYRE_SQLCACHE_LAYERS",
        "VYRE_SQLCACHE_LOG_MISSES",
        "VYRE_SQLCACHE_REMOTE",
    ],
)
@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_a_blank_variable_is_unset(name: str, blank: str) -> None:
    # Each variable alike: blank is unset (the size and compression refused " ", while
    # the path and the switch took it for unset), not a file named " ".
    assert Settings.from_environment({name: blank}) == Settings()


def test_a_zero_cap_from_the_environment_says_what_the_variable_allows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "0")
    with pytest.raises(ValueError, match="VYRE_SQLCACHE_MAX_SIZE must be from 1 byte") as raised:
        PipelineCache.open(tmp_path / "c.sqlite3")
    assert "None" not in str(raised.value)  # a variable cannot say None


def test_spaces_around_layer_paths_are_not_part_of_them(tmp_path: Path) -> None:
    # "a.layer: b.layer" looked for " b.layer", as VYRE_SQLCACHE_PATH is stripped.
    value = f"{tmp_path / 'a.layer'}{os.pathsep} {tmp_path / 'b.layer'} "
    settings = Settings.from_environment({"VYRE_SQLCACHE_LAYERS": value})
    assert settings.layers == (tmp_path / "a.layer", tmp_path / "b.layer")


def test_a_remote_key_of_raw_bytes_is_taken_as_its_bytes() -> None:
    # os.environ holds bytes that are not UTF-8 as surrogates: encoding them raised a bare
    # UnicodeEncodeError naming no variable.
    raw = bytes(range(0xEF, 0xFF))  # 16 bytes, not UTF-8
    env = {"VYRE_SQLCACHE_REMOTE": "redis://127.0.0.1:1/0"}
    env["VYRE_SQLCACHE_REMOTE_KEY"] = raw.decode("utf-8", "surrogateescape")
    remote = Settings.from_environment(env).remote
    assert remote is not None and remote.key == raw


@pytest.mark.parametrize("prefix", ["x" * 201, b"\xff:".decode("utf-8", "surrogateescape")])
def test_a_bad_remote_prefix_names_its_own_variable(prefix: str) -> None:
    # It named VYRE_SQLCACHE_REMOTE; one that is not UTF-8 was taken, and every call failed.
    env = {"VYRE_SQLCACHE_REMOTE": "redis://127.0.0.1:1/0", "VYRE_SQLCACHE_REMOTE_PREFIX": prefix}
    with pytest.raises(ValueError, match=r"^VYRE_SQLCACHE_REMOTE_PREFIX: remote prefix must be"):
        Settings.from_environment(env)
