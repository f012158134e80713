"""The command line, through main(argv) and the installed console script."""

from __future__ import annotations

import ast
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import pytest

import vyre_sqlcache
from tests.test_vyredir import make_vyre_tree, read_only, tree
from vyre_sqlcache import DeviceFingerprint, FeatureFlags, PipelineCache, PipelineCacheKey
from vyre_sqlcache._schema import latest_version
from vyre_sqlcache.cli import main
from vyre_sqlcache.errors import CacheError, ReadOnlyCacheError, SchemaTooNewError
from vyre_sqlcache.vyredir import entry_path

from .helpers import schema_file


def test_demo_removes_its_entries_and_leaves_others(
    cache_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fingerprint = DeviceFingerprint.from_parts(1, 2, "user's driver")
    digest = os.urandom(32)
    with PipelineCache.open(cache_path) as cache:
        cache.write(digest, fingerprint, b"user's pipeline")
    assert main(["--path", str(cache_path), "demo", "--count", "40", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "wrote    40 pipelines" in out
    assert "read     40 pipelines" in out and "40 intact" in out
    assert "invalidated 10 pipelines by impact mask (10 marked); 10 now miss" in out
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 1
        assert cache.read(digest, fingerprint) == b"user's pipeline"


def test_demo_on_a_new_file_leaves_no_file(cache_path: Path) -> None:
    assert main(["--path", str(cache_path), "demo", "--count", "20"]) == 0
    assert not list(cache_path.parent.glob(cache_path.name + "*"))


def test_demo_keep_keeps_what_was_not_invalidated(cache_path: Path) -> None:
    assert main(["--path", str(cache_path), "demo", "--count", "20", "--keep"]) == 0
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--count", "0"], "argument --count: expected a whole number from 1 to 100000"),
        (["demo", "--count", "100001"], "argument --count: expected a whole number from 1 to "),
        (["demo", "--count", "lots"], "argument --count: expected a whole number from 1 to "),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in one_error_line(err)


def test_another_programs_database_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.db"
    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE notes (text)")
    connection.close()
    before = path.read_bytes()
    assert main(["--path", str(path), "demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a vyre-sqlcache cache" in err
    assert path.read_bytes() == before


def test_console_script_runs_the_demo(cache_path: Path) -> None:
    script = shutil.which("vyre-sqlcache", path=os.path.dirname(sys.executable))
    assert script is not None, "the console script is not installed"
    result = subprocess.run(
        [script, "--path", str(cache_path), "demo", "--count", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "30 intact" in result.stdout


def test_python_dash_m_runs(cache_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(cache_path), "demo", "--count", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# -- the inspection and maintenance commands ------------------------------------------------

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Filled:
    """A cache with five entries of every kind, by name; and a program digests file."""

    path: Path
    keys: dict[str, str]
    digests_file: Path

    def names(self, hex_keys: Iterable[str]) -> set[str]:
        by_key = {key: name for name, key in self.keys.items()}
        return {by_key[key] for key in hex_keys}


@pytest.fixture
def filled(
    cache_path: Path,
    tmp_path: Path,
    fingerprint: DeviceFingerprint,
    other_fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
) -> Filled:
    digests = {name: os.urandom(32) for name in ("nv_f16", "program", "imported")}
    keyed = {
        "nv_f16": (make_key(backend="vulkan", feature_flags=FeatureFlags.F16), fingerprint, 1000),
        "nv_sub": (make_key(backend="cuda"), fingerprint, 200),
        "amd_both": (
            make_key(feature_flags=FeatureFlags.F16 | FeatureFlags.SUBGROUP_OPS),
            other_fingerprint,
            5000,
        ),
    }
    keys: dict[str, str] = {}
    with PipelineCache.open(cache_path) as cache:
        for name, (key, fp, size) in keyed.items():
            cache.put(key, fp, os.urandom(size), program_digest=digests.get(name))
            keys[name] = key.entry_key(fp).hex()
        cache.write(digests["program"], fingerprint, os.urandom(300))
        keys["program"] = fingerprint.cache_key(digests["program"]).hex()
        imported = fingerprint.cache_key(digests["imported"])
        cache.put_entry(imported, os.urandom(50), created_ms=time.time_ns() // 10**6 - 10 * DAY_MS)
        keys["imported"] = imported.hex()
        time.sleep(0.01)  # the hits below are the latest accesses, by some milliseconds
        for _ in range(2):
            assert cache.get(keyed["nv_f16"][0], fingerprint) is not None
    digests_file = tmp_path / "digests.txt"
    digests_file.write_text(
        "# programs touched by the change\n" + "".join(f"{d.hex()}\n\n" for d in digests.values())
    )
    return Filled(cache_path, keys, digests_file)


class Cli:
    """`main` with captured output."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def run(self, path: Path, *argv: str) -> tuple[int, str, str]:
        """`main` on the cache at `path`: (exit status, stdout, stderr)."""
        self._capsys.readouterr()
        code = main(["--path", str(path), *argv])
        out, err = self._capsys.readouterr()
        return code, out, err

    def json(self, path: Path, *argv: str) -> Any:
        """The parsed `--json` output of a command that must succeed."""
        code, out, err = self.run(path, *argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def state(path: Path) -> list[Any]:
    """Everything a command could change: schema, entries, blobs, counters, user_version."""
    with read_only(path) as connection:
        return [
            connection.execute(sql).fetchall()
            for sql in (
                "SELECT type, name, sql FROM sqlite_schema ORDER BY name",
                "SELECT * FROM entries ORDER BY id",
                "SELECT * FROM blobs ORDER BY id",
                "SELECT * FROM meta ORDER BY name",
                "PRAGMA user_version",
            )
        ]


def test_info_and_ls_show_the_stored_bytes_and_the_ratio(
    cli: Cli, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    with PipelineCache.open(cache_path, compression="auto") as cache:
        cache.write_many([(os.urandom(32), b"kernel text " * 500) for _ in range(40)], fingerprint)
        stats = cache.stats()
    assert stats.stored_bytes < stats.blob_bytes == 40 * 6000
    info = cli.json(cache_path, "info")
    assert (info["stored_bytes"], info["dictionary_bytes"]) == (
        stats.stored_bytes,
        stats.dictionary_bytes,
    )
    assert info["compression_ratio"] == stats.compression_ratio > 1
    code, out, err = cli.run(cache_path, "info")
    assert code == 0, err
    assert f"stored bytes       {stats.stored_bytes} " in out
    assert f"{stats.compression_ratio:.2f}x smaller" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("-  0x"))
    assert row.split()[4:6] == ["240000", str(stats.stored_bytes)]
    code, out, err = cli.run(cache_path, "ls")
    assert code == 0, err
    header, first = out.splitlines()[:2]
    assert header.split()[9] == "stored"
    size, stored = first.split()[7:9]  # after the key, kind, backend, device, ...
    assert size == "6000" and 0 < int(stored) < 6000


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vyre-sqlcache: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["info", "stats"])
def test_info_human_and_json(cli: Cli, filled: Filled, command: str) -> None:
    code, out, err = cli.run(filled.path, command)
    assert code == 0, err
    assert f"path               {filled.path}" in out
    assert f"schema version     {vyre_sqlcache.SCHEMA_VERSION}" in out
    assert f"SQLite             {apsw.sqlite_lib_version()}" in out
    assert "entries            5" in out
    assert "hits / misses      2 / 0 (100.0% hits)" in out
    assert "size cap           1073741824 (1.0 GiB)" in out
    # backend, vendor, device, entries, bytes, stored (random bytes: stored raw), hits
    assert re.search(r"^vulkan\s+0x1002\s+0x744c\s+1\s+5000\s+5000\s+0\s", out, re.M), out

    info = cli.json(filled.path, command)
    assert info["entries"] == 5 and info["blob_bytes"] == 1000 + 200 + 5000 + 300 + 50
    assert info["schema_version"] == vyre_sqlcache.SCHEMA_VERSION and info["hits"] == 2
    groups = {(g["backend"], g["vendor_hex"], g["device_hex"]): g for g in info["by_device"]}
    assert set(groups) == {
        ("vulkan", "0x10de", "0x2684"),
        ("cuda", "0x10de", "0x2684"),
        (None, "0x10de", "0x2684"),
        ("vulkan", "0x1002", "0x744c"),
        (None, None, None),
    }
    assert groups["vulkan", "0x10de", "0x2684"]["hits"] == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"nv_f16", "nv_sub", "amd_both", "program", "imported"}),
        (["--backend", "vulkan"], {"nv_f16", "amd_both"}),
        (["--vendor", "0x10de"], {"nv_f16", "nv_sub", "program"}),
        (["--vendor", "4098"], {"amd_both"}),
        (["--device", "0x744C"], {"amd_both"}),
        (["--flag", "F16"], {"nv_f16", "amd_both"}),
        (["--flag", "f16", "--flag", "SUBGROUP_OPS"], {"amd_both"}),
        (["--flag", "0x100000"], set()),
        (["--min-size", "1000"], {"nv_f16", "amd_both"}),
        (["--min-size", "4K"], {"amd_both"}),
        (["--older-than", "7d"], {"imported"}),
        (["--older-than", "239h"], {"imported"}),
        (["--older-than", "11d"], set()),
        (["--backend", "vulkan", "--vendor", "0x10de"], {"nv_f16"}),
    ],
)
def test_ls_filters(cli: Cli, filled: Filled, args: list[str], expected: set[str]) -> None:
    rows = cli.json(filled.path, "ls", *args)
    assert filled.names(r["entry_key"] for r in rows) == expected
    code, out, _ = cli.run(filled.path, "ls", *args)
    assert code == 0
    assert filled.names(re.findall(r"^[0-9a-f]{64}", out, re.M)) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sort", "size", "--limit", "2"], ["amd_both", "nv_f16"]),
        (["--sort", "size", "--reverse", "--limit", "1"], ["imported"]),
        (["--sort", "hits", "--limit", "1"], ["nv_f16"]),
        (["--sort", "created", "--reverse", "--limit", "1"], ["imported"]),
        (["--sort", "accessed", "--limit", "1"], ["nv_f16"]),
    ],
)
def test_ls_sort_and_limit(cli: Cli, filled: Filled, args: list[str], expected: list[str]) -> None:
    rows = cli.json(filled.path, "ls", *args)
    by_key = {key: name for name, key in filled.keys.items()}
    assert [by_key[r["entry_key"]] for r in rows] == expected


def test_ls_human_table_shows_the_view(cli: Cli, filled: Filled) -> None:
    code, out, _ = cli.run(filled.path, "ls", "--vendor", "0x1002")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "entry", "key", "kind", "backend", "vendor", "device", "flags", "workgroup", "size",
        "stored", "created", "accessed", "hits", "name",
    ]  # fmt: skip
    assert row.split()[:9] == [
        filled.keys["amd_both"], "keyed", "vulkan", "0x1002", "0x744c", "SUBGROUP_OPS,F16",
        "64x1x1", "5000", "5000",
    ]  # fmt: skip


def test_names_that_would_steer_a_terminal_are_shown_escaped(cli: Cli, cache_path: Path) -> None:
    # Names come from merged caches and the shared tier: a newline forged a row of `ls`,
    # an escape sequence cleared the screen, a tab broke the per-backend table of `info`.
    forged = "real\n" + "0" * 64 + "  named  ns  FAKE ROW"
    with PipelineCache.open(cache_path) as cache:
        cache.put_named("ns", forged, b"1")
        cache.put_named("ns", "esc\x1b[2Jcleared\rCR\u202eevil", b"2")
        cache.put_named("n\ts", "tab", b"3")
        cache.put_named("ns", "real\\n" + "0" * 64, b"4")  # a backslash and an n
    code, out, _ = cli.run(cache_path, "ls")
    assert code == 0
    assert len(out.splitlines()) == 5  # the header and one line an entry
    assert "real\\\\n" + "0" * 64 in out  # shown doubled: never as the newline's escape
    assert "real\\n" + "0" * 64 in out
    assert "esc\\x1b[2Jcleared\\rCR\\u202eevil" in out
    code, out, _ = cli.run(cache_path, "info")
    assert code == 0
    assert "n\\ts" in out
    for shown in (out, cli.run(cache_path, "sql", "SELECT name FROM pipelines_v")[1]):
        assert not any(c in shown for c in "\x1b\r\t\u202e")


def test_put_get_rm_round_trip(cli: Cli, cache_path: Path, tmp_path: Path) -> None:
    key = os.urandom(32).hex()
    source = tmp_path / "blob.bin"
    source.write_bytes(b"\x03\x02\x23\x07 pipeline")
    code, out, err = cli.run(cache_path, "put", key.upper(), str(source))
    assert code == 0 and f"stored 13 bytes under {key}" in out, err
    code, _, err = cli.run(cache_path, "get", key, "-o", str(tmp_path / "back.bin"))
    assert code == 0, err
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    code, out, _ = cli.run(cache_path, "rm", key)
    assert code == 0 and "removed 1 entry" in out
    code, _, err = cli.run(cache_path, "get", key, "-o", str(tmp_path / "again.bin"))
    assert code == 1 and f"no entry with key {key}" in one_error_line(err)
    assert not (tmp_path / "again.bin").exists()


def test_get_to_stdout(filled: Filled, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with PipelineCache.open(filled.path) as cache:
        blob = cache.get_entry(filled.keys["program"])
    assert main(["--path", str(filled.path), "get", filled.keys["program"], "-o", "-"]) == 0
    assert capsysbinary.readouterr().out == blob


@pytest.mark.parametrize("output", ["the cache", "a link to it", "its -wal", "its -shm"])
def test_get_refuses_to_write_over_the_cache_or_its_log(
    cli: Cli, filled: Filled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    # A slip of the argument order or of a variable wrote a blob over the cache file.
    before = state(filled.path)
    with PipelineCache.open(filled.path) as holder:  # the log is there while it is open
        holder.peek_entry(filled.keys["program"])
        target = {
            "the cache": filled.path,
            "a link to it": tmp_path / "link.sqlite3",
            "its -wal": Path(f"{filled.path}-wal"),
            "its -shm": Path(f"{filled.path}-shm"),
        }[output]
        if output == "a link to it":
            target.symlink_to(filled.path)
        monkeypatch.chdir(tmp_path)
        code, out, err = cli.run(filled.path, "get", filled.keys["program"], "-o", str(target))
        expected = "the cache itself" if output in ("the cache", "a link to it") else output[4:]
        assert code == 2 and out == "" and expected in one_error_line(err)
    assert state(filled.path) == before


def test_get_writes_through_a_link_and_into_a_device_without_replacing_them(
    cli: Cli, filled: Filled, tmp_path: Path
) -> None:
    # The output is written beside and renamed into place, but a link stays a link (its
    # file gets the bytes) and a device stays a device (never replaced by a file).
    with PipelineCache.open(filled.path, readonly=True) as cache:
        blob = cache.peek_entry(filled.keys["program"])
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    code, _, err = cli.run(filled.path, "get", filled.keys["program"], "-o", str(link))
    assert code == 0, err
    assert link.is_symlink() and real.read_bytes() == blob
    code, _, err = cli.run(filled.path, "get", filled.keys["program"], "-o", os.devnull)
    assert code == 0, err
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".bin")) == [
        "link.bin",
        "real.bin",
    ]


def test_rm_removes_what_exists_and_reports_the_rest(cli: Cli, filled: Filled) -> None:
    missing = os.urandom(32).hex()
    code, out, err = cli.run(
        filled.path, "rm", filled.keys["nv_sub"], missing, filled.keys["program"]
    )
    assert code == 1 and "removed 2 entries" in out
    assert f"no entry with key {missing}" in one_error_line(err)
    rows = cli.json(filled.path, "ls")
    assert filled.names(r["entry_key"] for r in rows) == {"nv_f16", "amd_both", "imported"}


NVIDIA_DIGESTS = ["--program-digests", "{digests}", "--vendor", "0x10de", "--device", "0x2684"]


@pytest.mark.parametrize(
    ("args", "removed"),
    [
        (["--backend", "vulkan"], {"nv_f16", "amd_both"}),
        (["--device", "0x2684"], {"nv_f16", "nv_sub", "program"}),
        (["--vendor", "0x1002", "--device", "0x744c"], {"amd_both"}),
        (["--key-version", "1"], {"nv_f16", "nv_sub", "amd_both"}),
        (["--key-version", "2"], set()),
        (["--all"], {"nv_f16", "nv_sub", "amd_both", "program", "imported"}),
        # by program digest on any device: imported entries know no program digest
        (["--program-digests", "{digests}"], {"nv_f16", "program"}),
        (["--program-digests", "{digests}", "--backend", "vulkan"], {"nv_f16"}),
        # with the device's fingerprint, as invalidate_impacted: imported ones too
        (
            [*NVIDIA_DIGESTS, "--revision", "550.54.14"],
            {"nv_f16", "program", "imported"},
        ),
        (
            [*NVIDIA_DIGESTS, "--revision", "another driver"],
            set(),
        ),
    ],
)
def test_invalidate(cli: Cli, filled: Filled, args: list[str], removed: set[str]) -> None:
    argv = [a.replace("{digests}", str(filled.digests_file)) for a in args]
    code, out, err = cli.run(filled.path, "invalidate", *argv)
    assert code == 0, err
    assert f"invalidated {len(removed)} entr" in out
    left = filled.names(r["entry_key"] for r in cli.json(filled.path, "ls"))
    assert left == set(filled.keys) - removed


def test_sql_reads_through_the_views(cli: Cli, filled: Filled) -> None:
    query = "SELECT kind, count(*) AS n FROM pipelines_v GROUP BY kind ORDER BY kind"
    assert cli.json(filled.path, "sql", query) == [
        {"kind": "imported", "n": 1},
        {"kind": "keyed", "n": 3},
        {"kind": "program", "n": 1},
    ]
    code, out, _ = cli.run(filled.path, "sql", query)
    assert code == 0
    assert out.splitlines() == ["kind      n", "imported  1", "keyed     3", "program   1"]
    code, out, _ = cli.run(filled.path, "sql", "SELECT entry_key FROM entries WHERE 0")
    assert code == 0 and out.strip() == "entry_key"


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM entries",
        "UPDATE meta SET value = 0",
        "INSERT INTO meta VALUES ('x', 1)",
        "DROP VIEW pipelines_v",
        "CREATE TABLE t (x)",
        "PRAGMA user_version = 99",
        "PRAGMA journal_mode = DELETE",
        "SELECT 1; DELETE FROM blobs",
        "PRAGMA query_only = 0; DELETE FROM entries",
        "VACUUM",
        "VACUUM INTO '{tmp}/copy.sqlite3'",
        "ATTACH '{tmp}/other.sqlite3' AS o; CREATE TABLE o.t (x)",
        "REINDEX",
        "SELECT load_extension('x')",
        "SELECT nope FROM nowhere",
    ],
)
def test_sql_refuses_anything_but_reads(
    cli: Cli, filled: Filled, tmp_path: Path, query: str
) -> None:
    before = state(filled.path)
    code, out, err = cli.run(filled.path, "sql", query.replace("{tmp}", str(tmp_path)))
    assert code == 1 and out == ""
    one_error_line(err)
    assert state(filled.path) == before
    assert not (tmp_path / "copy.sqlite3").exists() and not (tmp_path / "other.sqlite3").exists()


def test_sql_says_why_a_write_is_refused(cli: Cli, filled: Filled) -> None:
    _, _, err = cli.run(filled.path, "sql", "DELETE FROM entries")
    assert "'sql' only reads the cache" in err


def _drop_blob(path: Path, entry_key: str) -> None:
    connection = apsw.Connection(str(path))
    connection.execute(
        "DELETE FROM blobs WHERE id = (SELECT id FROM entries WHERE entry_key = ?)",
        (bytes.fromhex(entry_key),),
    )
    connection.close()


def _damage_blob(path: Path, entry_key: str) -> None:
    connection = apsw.Connection(str(path))
    connection.execute(
        "UPDATE blobs SET data = zeroblob(length(data)) "
        "WHERE id = (SELECT id FROM entries WHERE entry_key = ?)",
        (bytes.fromhex(entry_key),),
    )
    connection.close()


@pytest.mark.parametrize(
    ("damage", "finding"),
    [
        (_damage_blob, "1 fail their checksum, 0 have no blob"),
        (_drop_blob, "0 fail their checksum, 1 have no blob"),
    ],
)
def test_check_finds_and_repairs_bad_entries(
    cli: Cli, filled: Filled, damage: Callable[[Path, str], None], finding: str
) -> None:
    code, out, err = cli.run(filled.path, "check")
    assert code == 0 and "integrity: ok" in out and "checked 5 entries: 0 fail" in out, err
    damage(filled.path, filled.keys["nv_sub"])

    code, out, err = cli.run(filled.path, "check")
    assert code == 1 and f"checked 5 entries: {finding}" in out
    assert filled.keys["nv_sub"] in out and "check --repair" in one_error_line(err)
    code, out, _ = cli.run(filled.path, "check", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["dropped"] == 0
    assert report["damaged"] + report["missing_blob"] == [filled.keys["nv_sub"]]

    code, out, err = cli.run(filled.path, "check", "--repair")
    assert code == 0 and "dropped 1 bad entries" in out, err
    assert cli.json(filled.path, "check") == {
        "ok": True,
        "integrity": ["ok"],
        "checked": 4,
        "damaged": [],
        "missing_blob": [],
        "unreadable": 0,
        "dropped": 0,
        "rebuilt": False,
        "kept": 0,
        "integrity_after": None,
        "wrong_size": [],
        "stray_blobs": 0,
        "wrong_totals": [],
        "corrected": False,
        "moved_aside": None,
    }


def test_check_reports_wrong_records_and_repair_corrects_them(cli: Cli, filled: Filled) -> None:
    connection = apsw.Connection(str(filled.path))
    connection.execute("UPDATE meta SET value = value + 7 WHERE name = 'blob_bytes'")
    connection.close()
    code, out, err = cli.run(filled.path, "check")
    assert code == 1 and "the totals in meta are wrong (blob_bytes: recorded" in out
    assert "'check --repair' corrects the totals" in one_error_line(err)
    code, out, err = cli.run(filled.path, "check", "--repair")
    assert code == 0 and out.rstrip().endswith(": corrected"), err
    code, out, _ = cli.run(filled.path, "check", "--json")
    assert code == 0 and json.loads(out)["wrong_totals"] == []


def test_compact_shrinks_the_file(
    cli: Cli,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
) -> None:
    keys = [make_key() for _ in range(100)]
    with PipelineCache.open(cache_path) as cache:
        cache.put_many([(k, os.urandom(20_000)) for k in keys], fingerprint)
        for key in keys[1:]:
            cache.delete(key, fingerprint)
    before = cache_path.stat().st_size
    code, out, err = cli.run(cache_path, "compact")
    assert code == 0 and f"compacted {cache_path}" in out, err
    assert cache_path.stat().st_size < before / 4
    assert not os.path.exists(f"{cache_path}-wal") or os.path.getsize(f"{cache_path}-wal") == 0
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 1 and cache.get(keys[0], fingerprint) is not None


COMPACT_MEMORY_CHILD = """
import os, sys
import apsw
from vyre_sqlcache import DeviceFingerprint, PipelineCache

fp = DeviceFingerprint.from_parts(1, 2, "compact")
digests = [i.to_bytes(32, "big") for i in range(600)]
with PipelineCache.open(sys.argv[1], compression="off") as cache:
    cache.write_many([(digest, os.urandom(64 * 1024)) for digest in digests], fp)
    cache.flush()
    cache.invalidate_impacted([i % 2 for i in range(600)], digests, fp)
    cache.flush()
    before, _ = apsw.status(apsw.SQLITE_STATUS_MEMORY_USED, True)
    cache.compact()
    _, peak = apsw.status(apsw.SQLITE_STATUS_MEMORY_USED)
    print(peak - before)
"""


@pytest.mark.parametrize(("setting", "compressed"), [("auto", True), ("12", True), ("off", False)])
def test_compact_recompress_stores_every_entry_again(
    cli: Cli, cache_path: Path, fingerprint: DeviceFingerprint, setting: str, compressed: bool
) -> None:
    blobs = {os.urandom(32): b"kernel %d text " % i * 400 for i in range(60)}
    start = "off" if compressed else "auto"
    with PipelineCache.open(cache_path, compression=start) as cache:
        cache.write_many(list(blobs.items()), fingerprint)
        raw = cache.stats().blob_bytes
    code, out, err = cli.run(cache_path, "compact", "--recompress", "--compression", setting)
    assert code == 0, err
    assert "recompressed 60 entries" in out and f"compacted {cache_path}" in out
    with PipelineCache.open(cache_path, readonly=True) as cache:
        stored = cache.stats().stored_bytes
        assert all(cache.read(d, fingerprint) == b for d, b in blobs.items())
    assert (stored < raw / 4) if compressed else (stored == raw)
    # at the same setting again, no entry gets smaller: all are kept as they are
    code, out, err = cli.run(cache_path, "compact", "--recompress", "--compression", setting)
    assert code == 0, err
    expected = "kept as they were (no smaller)"
    assert (
        ("recompressed 0 entries" in out and f"; 60 {expected}" in out)
        if compressed
        else ("recompressed 60 entries" in out and expected not in out)
    )
    with PipelineCache.open(cache_path, readonly=True) as cache:
        assert cache.stats().stored_bytes == stored


def test_compact_compression_without_recompress_is_a_usage_error(
    cli: Cli, cache_path: Path
) -> None:
    PipelineCache.open(cache_path).close()
    code, _, err = cli.run(cache_path, "compact", "--compression", "off")
    assert code == 2 and "--recompress" in one_error_line(err)
    code, _, err = cli.run(cache_path, "compact", "--recompress", "--compression", "fast")
    assert code == 2 and "'fast'" in one_error_line(err) and "1 to 22" in err


def test_compact_copies_the_file_on_disk_not_in_memory(cache_path: Path) -> None:
    # A VACUUM whose transient copy were in memory would take as much of SQLite's heap
    # as the live blobs (SQLite's own high-water mark, in a process of its own).
    out = subprocess.run(
        [sys.executable, "-c", COMPACT_MEMORY_CHILD, str(cache_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout
    live = 300 * 64 * 1024
    # About 8 MiB of page caches either way; 21 MiB with the copy in memory.
    assert int(out) < live // 2, f"compact took {int(out) >> 20} MiB of memory"


def test_import_and_export_dir(
    cli: Cli, cache_path: Path, tmp_path: Path, fingerprint: DeviceFingerprint
) -> None:
    programs = make_vyre_tree(tmp_path / "vyre", fingerprint, 30)
    key = next(iter(programs))
    temporary = entry_path(tmp_path / "vyre", fingerprint.cache_key(key))
    temporary = temporary.with_name(temporary.name + ".tmp.1.0")
    temporary.write_bytes(b"half")
    code, out, err = cli.run(cache_path, "import-dir", str(tmp_path / "vyre"))
    assert code == 0 and "imported 30 entries" in out and "(0 already there, 1 skipped)" in out
    assert str(temporary) in one_error_line(err)
    code, out, _ = cli.run(cache_path, "import-dir", str(tmp_path / "vyre"))
    assert code == 0 and "imported 0 entries" in out and "30 already there" in out

    code, out, err = cli.run(cache_path, "export-dir", str(tmp_path / "out"))
    assert code == 0 and "exported 30 entries" in out, err
    temporary.unlink()
    assert tree(tmp_path / "out") == tree(tmp_path / "vyre")


def test_export_dir_reports_damaged_entries(cli: Cli, filled: Filled, tmp_path: Path) -> None:
    _damage_blob(filled.path, filled.keys["program"])
    code, out, err = cli.run(filled.path, "export-dir", str(tmp_path / "out"))
    assert code == 1 and "exported 1 entries" in out and "3 keyed entries left out" in out
    assert filled.keys["program"] in one_error_line(err)


def test_progress_bars_show_on_a_terminal(
    cache_path: Path,
    tmp_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    make_vyre_tree(tmp_path / "vyre", fingerprint, 5)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["--path", str(cache_path), "import-dir", str(tmp_path / "vyre")]) == 0
    assert main(["--path", str(cache_path), "check"]) == 0
    assert "importing" in terminal.getvalue() and "checking" in terminal.getvalue()


def test_the_path_comes_from_the_environment(
    cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VYRE_SQLCACHE_PATH", str(cache_path))
    source = tmp_path / "blob.bin"
    source.write_bytes(b"blob")
    key = os.urandom(32).hex()
    assert main(["put", key, str(source)]) == 0
    with PipelineCache.open(cache_path) as cache:
        assert cache.get_entry(key) == b"blob"


KEY = "ab" * 32


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["get", "abc", "-o", "{tmp}/x"], "64 hex characters"),
        (["get", "zz" * 32, "-o", "{tmp}/x"], "not hex"),
        (["rm", KEY, "12"], "64 hex characters"),
        (["put", "12", "{tmp}/blob"], "64 hex characters"),
        (["ls", "--vendor", "0xZZ"], "--vendor: expected a number"),
        (["ls", "--device", "0x1FFFFFFFF"], "--device: expected a number in 0..0xffffffff"),
        (["ls", "--older-than", "7x"], "--older-than: expected a duration"),
        (["ls", "--flag", "NOPE"], "--flag: unknown feature flag 'NOPE'"),
        (["ls", "--min-size", "lots"], "--min-size: a size must be"),
        (["ls", "--limit", "0"], "--limit: expected a whole number"),
        (["invalidate"], "say what to invalidate"),
        (["invalidate", "--revision", "r", "--vendor", "1"], "--revision needs"),
    ],
)
def test_malformed_arguments_exit_2_with_one_line(
    cli: Cli, filled: Filled, tmp_path: Path, argv: list[str], message: str
) -> None:
    (tmp_path / "blob").write_bytes(b"blob")
    before = state(filled.path)
    code, out, err = cli.run(filled.path, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and out == ""
    assert message in one_error_line(err)
    assert state(filled.path) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["put", KEY, "{tmp}/missing.bin"], "cannot read"),
        (["put", KEY, "{tmp}"], "cannot read"),
        (["put", KEY, "{tmp}/huge.bin"], "over the 67108864-byte limit"),
        (["import-dir", "{tmp}/missing"], "is not a folder"),
        (["invalidate", "--program-digests", "{tmp}/missing.txt"], "cannot read program"),
        (["invalidate", "--program-digests", "{tmp}/bad.txt"], "line 2 must be 64 hex"),
        (["export-dir", "{tmp}/file"], "is not a folder"),
    ],
)
def test_bad_input_exits_1_with_one_line_and_changes_nothing(
    cli: Cli, filled: Filled, tmp_path: Path, argv: list[str], message: str
) -> None:
    with open(tmp_path / "huge.bin", "wb") as out:
        out.truncate(64 * 1024 * 1024 + 1)
    (tmp_path / "bad.txt").write_text(f"{KEY}\n{KEY[:10]}\n")
    (tmp_path / "file").write_text("not a folder")
    before = state(filled.path)
    code, out, err = cli.run(filled.path, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 1 and out == ""
    assert message in one_error_line(err)
    assert state(filled.path) == before


def _other_programs_database(path: Path) -> str:
    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE notes (text)")
    connection.close()
    return "not a vyre-sqlcache cache"


def _newer_cache(path: Path) -> str:
    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE future (x); PRAGMA user_version = 999")
    connection.close()
    return "schema version 999"


def _not_sqlite(path: Path) -> str:
    path.write_bytes(b"this is not a database, " * 200)
    return "not a SQLite database"


def _missing(path: Path) -> str:
    return "no cache at"


READING = [
    ["info"],
    ["ls"],
    ["sql", "SELECT 1"],
    ["check", "--repair"],
    ["compact"],
    ["rm", KEY],
    ["get", KEY, "-o", "{tmp}/out.bin"],
    ["invalidate", "--all"],
    ["export-dir", "{tmp}/out"],
]
#: Commands that create a cache where there is none.
CREATING = [["put", KEY, "{tmp}/blob.bin"], ["import-dir", "{tmp}/vyre"]]
UNUSABLE = [_other_programs_database, _newer_cache, _not_sqlite]


@pytest.mark.parametrize(
    ("make", "argv"),
    [(make, argv) for make in [*UNUSABLE, _missing] for argv in READING]
    + [(make, argv) for make in UNUSABLE for argv in CREATING],
    ids=lambda value: value[0] if isinstance(value, list) else value.__name__.strip("_"),
)
def test_a_file_that_is_not_a_usable_cache_is_one_line_and_untouched(
    cli: Cli, tmp_path: Path, argv: list[str], make: Callable[[Path], str]
) -> None:
    (tmp_path / "blob.bin").write_bytes(b"blob")
    (tmp_path / "vyre" / "ab").mkdir(parents=True)
    (tmp_path / "vyre" / "ab" / f"{KEY}.bin").write_bytes(b"blob")
    folder = tmp_path / "db"
    folder.mkdir()
    path = folder / "file.sqlite3"
    message = make(path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = cli.run(path, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 1 and out == ""
    assert message in one_error_line(err)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out").exists()


def test_console_script_commands_and_exit_statuses(cache_path: Path, tmp_path: Path) -> None:
    script = shutil.which("vyre-sqlcache", path=os.path.dirname(sys.executable))
    assert script is not None, "the console script is not installed"

    def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [script, "--path", str(cache_path), *argv], capture_output=True, timeout=120
        )

    (tmp_path / "blob.bin").write_bytes(b"\x00\x01 blob")
    assert cli("put", KEY, str(tmp_path / "blob.bin")).returncode == 0
    listed = cli("ls", "--json")
    assert listed.returncode == 0
    assert [row["entry_key"] for row in json.loads(listed.stdout)] == [KEY]
    got = cli("get", KEY, "-o", "-")
    assert got.returncode == 0 and got.stdout == b"\x00\x01 blob"
    refused = cli("sql", "DELETE FROM entries")
    assert refused.returncode == 1 and refused.stderr.startswith(b"vyre-sqlcache: refused")
    bad = cli("rm", "not-hex")
    assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1 and b"Traceback" not in bad.stderr
    assert cli("check").returncode == 0
    assert cli("rm", KEY).returncode == 0
    assert cli("get", KEY, "-o", "-").returncode == 1


# -- the library's inspection and maintenance API, used by the command line -------------------

PACKAGE = Path(__file__).resolve().parent.parent / "vyre_sqlcache"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` by name, with its bytes: what "writes nothing" compares."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def make_schema_1_cache(path: Path) -> None:
    """A cache file as the first release wrote it: migration 0001 only, user_version 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema_file(path, 1)


def damage_pages(path: Path, pages: Iterable[int], page_size: int = 16384) -> None:
    """Overwrite whole pages of a file at rest with random bytes."""
    with open(path, "r+b") as file:
        for page in pages:
            file.seek(page * page_size)
            file.write(os.urandom(page_size))


def test_repair_refuses_to_rebuild_a_file_a_newer_library_upgraded_meanwhile(
    cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # The rebuild, made with this library's migrations, put the file back to its schema
    # under the newer library's processes: their invalidations then failed.
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(os.urandom(32), os.urandom(5000)) for _ in range(200)], fingerprint)
        cache.flush()
        newer = apsw.Connection(str(cache_path))
        newer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        newer.execute(f"PRAGMA user_version = {latest_version() + 1}")
        damage_pages(cache_path, [20, 21])
        newer.close()
        with pytest.raises(SchemaTooNewError, match="repair it with that version"):
            cache.check(repair=True)
    check = apsw.Connection(str(cache_path), flags=apsw.SQLITE_OPEN_READONLY)
    assert check.pragma("user_version") == latest_version() + 1
    check.close()


def test_a_readonly_cache_never_migrates(cache_path: Path) -> None:
    make_schema_1_cache(cache_path)
    before = folder_bytes(cache_path.parent)
    with pytest.raises(CacheError, match="schema version 1 and needs upgrading"):
        PipelineCache.open(cache_path, readonly=True)
    assert folder_bytes(cache_path.parent) == before


def test_a_readonly_cache_writes_nothing(filled: Filled) -> None:
    before = folder_bytes(filled.path.parent)
    with PipelineCache.open(filled.path, readonly=True) as cache:
        for _ in range(3):
            for key in filled.keys.values():
                assert cache.get_entry(key) is not None
                assert cache.peek_entry(key) is not None
            assert cache.get_entry(os.urandom(32)) is None
            assert len(cache.entries()) == 5 and cache.device_totals()
            assert cache.query("SELECT count(*) FROM pipelines_v")[0].rows == [(5,)]
            assert cache.check().ok and cache.schema_version() == vyre_sqlcache.SCHEMA_VERSION
        assert (cache.stats().hits, cache.stats().misses) == (15, 3)  # peek_entry counts none
    assert folder_bytes(filled.path.parent) == before


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"limit": 2**63}, "limit must be from 1 to 2\\*\\*63-1"),
        ({"limit": 0}, "limit must be from 1"),
        ({"min_size": 10**30}, "min_size must be from 0"),
        ({"created_before_ms": -(2**64)}, "created_before_ms must be from"),
        ({"vendor": 2**32}, "vendor must be in 0..4294967295"),
        ({"flags": -1}, "flags must be in 0..4294967295"),
        ({"sort": "name"}, "sort must be one of size, created, accessed, hits"),
        ({"kind": "other"}, "kind must be one of keyed, program, imported"),
        ({"entry_keys": ["12"]}, "entry_keys\\[0\\] must be 64 hex"),
    ],
)
def test_entries_refuses_what_sqlite_cannot_hold(
    cache: PipelineCache, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cache.entries(**arguments)


def test_query_stops_at_its_timeout(cache: PipelineCache) -> None:
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT max(x) FROM n"
    start = time.monotonic()
    with pytest.raises(CacheError, match=r"longer than its timeout of 0\.3 s"):
        cache.query(endless, timeout=0.3)
    assert time.monotonic() - start < 5
    assert cache.query("SELECT 1 AS one")[0].rows == [(1,)]  # the connection is fine after


@pytest.mark.parametrize(
    "pragma",
    [
        "PRAGMA query_only = 1",
        "PRAGMA locking_mode = EXCLUSIVE",
        "PRAGMA busy_timeout = 0",
        "PRAGMA synchronous = OFF",
        "PRAGMA main.ignore_check_constraints = 1",
        "SELECT 1; PRAGMA cache_size = 1",
    ],
)
def test_query_refuses_a_pragma_that_sets_and_the_cache_works_on(
    cache_path: Path, fingerprint: DeviceFingerprint, pragma: str
) -> None:
    # query() runs on the thread's own connection, which the cache also writes through:
    # query_only made every later flush() fail as 'read-only', EXCLUSIVE locked every
    # other process out for as long as the application ran.
    with PipelineCache.open(cache_path) as cache:
        with pytest.raises(ReadOnlyCacheError, match="may only read"):
            cache.query(pragma)
        cache.write(b"\1" * 32, fingerprint, b"after")
        cache.flush()
        with PipelineCache.open(cache_path, readonly=True) as other:
            assert other.read(b"\1" * 32, fingerprint) == b"after"


@pytest.mark.parametrize(
    "pragma",
    [
        "PRAGMA table_info(entries)",
        "PRAGMA main.index_list('entries')",
        "PRAGMA integrity_check(1)",
        "PRAGMA page_size",
        "SELECT name FROM pragma_table_info('meta')",
    ],
)
def test_query_runs_pragmas_that_read(cache: PipelineCache, pragma: str) -> None:
    assert cache.query(pragma)[0].rows


def test_check_repair_rebuilds_a_file_with_damaged_pages(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
) -> None:
    keys = [make_key() for _ in range(200)]
    blobs = {key: os.urandom(5000) for key in keys}
    with PipelineCache.open(cache_path) as cache:
        cache.put_many(list(blobs.items()), fingerprint)
    damage_pages(cache_path, [20, 21, 40])
    with PipelineCache.open(cache_path, readonly=True, strict=True) as cache:
        report = cache.check()
        assert not report.ok and not report.sound_file
    with PipelineCache.open(cache_path, strict=True) as cache:
        report = cache.check(repair=True)
        assert report.rebuilt and report.ok and report.integrity_after == ("ok",)
        assert 150 < report.kept < 200
        assert cache.check() == type(report)(("ok",), checked=report.kept)
        found = cache.get_many(keys, fingerprint)
        assert sum(blob is not None for blob in found) == report.kept
        assert all(got in (None, blobs[key]) for key, got in zip(keys, found, strict=True))
        cache.put(keys[0], fingerprint, b"writes work again")
    assert sorted(p.name for p in cache_path.parent.iterdir()) == [cache_path.name]


# -- the command line as a client of the library ------------------------------------------------


@pytest.mark.parametrize("module", ["cli.py", "vyredir.py", "_cli_demo.py"])
def test_the_command_line_imports_only_the_public_api(module: str) -> None:
    allowed_modules = {"cache", "config", "errors", "keys", "vyredir", "_cli_demo"}
    public_names = set(vyre_sqlcache.__all__) | allowed_modules
    for node in ast.walk(ast.parse((PACKAGE / module).read_text())):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & {"apsw", "vyre_sqlcache"}
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:  # from . import X: the package's public names
                assert {a.name for a in node.names} <= public_names, ast.unparse(node)
            else:
                assert node.module in allowed_modules, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None and not node.module.startswith(("apsw", "vyre"))


def test_version_and_options_after_the_command(
    cli: Cli, filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("vyre-sqlcache 0.1.0 (SQLite ")
    assert main(["info", "--path", str(filled.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 5
    assert main(["ls", "--json", "--path", str(filled.path), "--limit", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_the_path_may_start_with_a_tilde(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "blob.bin").write_bytes(b"blob")
    code, _, err = cli.run(Path("~/c.sqlite3"), "put", KEY, str(tmp_path / "blob.bin"))
    assert code == 0, err
    assert (tmp_path / "c.sqlite3").exists()
    code, out, err = cli.run(Path("~/c.sqlite3"), "info")
    assert code == 0 and f"path               {tmp_path / 'c.sqlite3'}" in out, err


#: Commands that only look: they open the cache read-only and never write the file.
LOOKING = [
    ["info"],
    ["ls", "--sort", "hits"],
    ["sql", "SELECT * FROM pipelines_v"],
    ["get", "{imported}", "-o", "{tmp}/out.bin"],
    ["check"],
    ["export-dir", "{tmp}/out"],
]


def _args(argv: list[str], filled: Filled, tmp_path: Path) -> list[str]:
    return [
        a.replace("{tmp}", str(tmp_path)).replace("{imported}", filled.keys["imported"])
        for a in argv
    ]


@pytest.mark.parametrize("argv", LOOKING, ids=lambda argv: argv[0])
def test_looking_commands_never_write_the_file(
    cli: Cli, filled: Filled, tmp_path: Path, argv: list[str]
) -> None:
    before = folder_bytes(filled.path.parent)
    for _ in range(2):
        code, _, err = cli.run(filled.path, *_args(argv, filled, tmp_path))
        assert code == 0, err
    assert folder_bytes(filled.path.parent) == before


@pytest.mark.parametrize("argv", LOOKING, ids=lambda argv: argv[0])
def test_looking_commands_never_migrate(
    cli: Cli, cache_path: Path, tmp_path: Path, argv: list[str]
) -> None:
    make_schema_1_cache(cache_path)
    before = folder_bytes(cache_path.parent)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{imported}", KEY) for a in argv]
    code, out, err = cli.run(cache_path, *argv)
    assert code == 1 and out == ""
    assert "schema version 1 and needs upgrading" in one_error_line(err)
    assert folder_bytes(cache_path.parent) == before


def _leave_a_log(path: Path) -> None:
    """Leave committed pages in the -wal, as a writer that was killed does."""
    copy = path.with_name("copy")
    with PipelineCache.open(path) as cache:
        cache.put_entry(os.urandom(32), b"in the log only")
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
    for suffix in ("", "-wal"):
        os.replace(f"{copy}{suffix}", f"{path}{suffix}")


def test_looking_commands_leave_a_leftover_log_alone(cli: Cli, filled: Filled) -> None:
    _leave_a_log(filled.path)

    def file_and_log() -> dict[str, bytes]:
        # SQLite may add the -shm index of the log; the file and the log stay as found.
        return {k: v for k, v in folder_bytes(filled.path.parent).items() if k[-4:] != "-shm"}

    before = file_and_log()
    code, _, err = cli.run(filled.path, "info")
    assert code == 0, err
    assert file_and_log() == before


def test_info_shows_the_cap_kept_in_the_file(
    cli: Cli, cache_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with PipelineCache.open(cache_path, max_bytes=5 << 20):
        pass
    before = folder_bytes(cache_path.parent)
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", "2G")
    code, out, err = cli.run(cache_path, "info")
    assert code == 0, err
    assert re.search(
        r"^size cap\s+5242880 \(5\.0 MiB\); VYRE_SQLCACHE_MAX_SIZE gives 2147483648", out, re.M
    ), out
    assert cli.json(cache_path, "info")["max_bytes"] == 5 << 20
    assert folder_bytes(cache_path.parent) == before
    monkeypatch.delenv("VYRE_SQLCACHE_MAX_SIZE")
    with PipelineCache.open(cache_path, readonly=True) as cache:
        assert cache.max_bytes == 5 << 20  # the file's, with no argument or environment
    code, out, _ = cli.run(cache_path, "info")
    assert re.search(r"^size cap\s+5242880 \(5\.0 MiB\)$", out, re.M), out


# -- the demo on a real cache ---------------------------------------------------------------------


def _user_cache(path: Path, *, cap: int, entries: int = 400, size: int = 4096) -> None:
    """A cache with the user's entries, some read (hits, misses, access times), flushed."""
    keys = [os.urandom(32) for _ in range(entries)]
    with PipelineCache.open(path, max_bytes=cap) as cache:
        cache.put_entries([(k, os.urandom(size), None) for k in keys])
        for key in keys[::7]:
            assert cache.get_entry(key) is not None
        assert cache.get_entry(os.urandom(32)) is None
        cache.flush()


def test_demo_on_a_cache_at_its_cap_uses_a_temporary_file(cli: Cli, cache_path: Path) -> None:
    _user_cache(cache_path, cap=400 * 4096)  # at its cap, as a long-lived LRU cache sits
    before = state(cache_path)
    assert len(before[1]) == 400
    code, out, err = cli.run(cache_path, "demo")
    assert code == 0, err
    assert sorted(p.name for p in cache_path.parent.iterdir()) == [cache_path.name]
    assert "runs on a temporary file and leaves the cache as it is" in out
    assert "300 intact" in out and "(temporary)" in out
    assert state(cache_path) == before  # every entry, access time, hit and counter


def test_demo_counts_the_room_as_the_cap_does(
    cli: Cli, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # The room was counted in the blobs' own bytes, the dictionaries left out, where the
    # cap counts bytes as stored and the dictionaries: a compressed cache whose cap had
    # the blobs' bytes plus the demo's lost every entry to the demo's eviction.
    from vyre_sqlcache import _cli_demo

    words = [os.urandom(3).hex().encode() for _ in range(400)]
    pick = random.Random(5)
    with PipelineCache.open(cache_path, max_bytes=None) as cache:
        for _ in range(40):
            cache.write(os.urandom(32), fingerprint, b" ".join(pick.choices(words, k=80)))
        cache.flush()
        blob_bytes = cache.stats().blob_bytes
    demo_bytes = _cli_demo.Workload(seed=1, count=300).total_bytes
    with PipelineCache.open(cache_path, max_bytes=blob_bytes + demo_bytes):
        pass
    before = state(cache_path)
    code, out, err = cli.run(cache_path, "demo", "--seed", "1")
    assert code == 0, err
    assert "runs on a temporary file" in out and "300 intact" in out
    assert state(cache_path) == before


@pytest.mark.parametrize("keep", [False, True])
def test_demo_with_room_leaves_entries_and_counters_as_they_were(
    cli: Cli, cache_path: Path, keep: bool
) -> None:
    _user_cache(cache_path, cap=1 << 30)
    entries, blobs, meta = state(cache_path)[1:4]
    code, out, err = cli.run(cache_path, "demo", "--count", "50", *(["--keep"] if keep else []))
    assert code == 0, err
    assert "temporary" not in out and "50 intact" in out
    after_entries, after_blobs, after_meta = state(cache_path)[1:4]
    user = {row[0] for row in entries}
    assert [row for row in after_entries if row[0] in user] == entries
    assert [row for row in after_blobs if row[0] in user] == blobs
    counters = ("hits", "misses", "flushes", "evictions", "checksum_failures")
    assert [m for m in after_meta if m[0] in counters] == [m for m in meta if m[0] in counters]
    assert len(after_entries) == 400 + (50 - 13 if keep else 0)


def test_demo_on_the_default_path_leaves_nothing(tmp_path: Path) -> None:
    """The README's quick start: `vyre-sqlcache demo` with no cache yet."""
    script = shutil.which("vyre-sqlcache", path=os.path.dirname(sys.executable))
    assert script is not None, "the console script is not installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VYRE_SQLCACHE_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache-home")
    result = subprocess.run([script, "demo"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    default = tmp_path / "cache-home" / "vyre" / "pipelines.sqlite3"
    assert f"cache: {default}" in result.stdout and "300 intact" in result.stdout
    assert not (tmp_path / "cache-home").exists()  # nor the folders it made (empty ones were left)


# -- import-dir and check --repair tell what really happened --------------------------------------


def test_import_dir_under_a_cap_says_how_many_were_evicted(
    cli: Cli, cache_path: Path, tmp_path: Path, fingerprint: DeviceFingerprint
) -> None:
    with PipelineCache.open(cache_path, max_bytes=1 << 20):
        pass
    root = tmp_path / "vyre"
    for index in range(500):
        path = entry_path(root, fingerprint.cache_key(index.to_bytes(32, "big")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096))
    code, out, err = cli.run(cache_path, "import-dir", str(root))
    assert code == 0, err
    kept = len(cli.json(cache_path, "ls"))
    assert f"imported 500 entries from {root} (0 already there, 0 skipped)" in out
    assert f", of which {500 - kept} were evicted by the size cap of 1048576" in out
    assert f": {kept} are in the cache" in out


def test_check_repair_rebuilds_a_damaged_file_from_its_readable_entries(
    cli: Cli, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    digests = [os.urandom(32) for _ in range(300)]
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(d, os.urandom(5000)) for d in digests], fingerprint)
    damage_pages(cache_path, [30, 31, 60])
    code, out, err = cli.run(cache_path, "check")
    assert code == 1 and "'check --repair' rebuilds it" in one_error_line(err)
    code, out, err = cli.run(cache_path, "check", "--repair")
    assert code == 0, err
    match = re.search(
        r"rebuilt .* from its (\d+) readable entries whose checksums hold; "
        r"integrity now: ok",
        out,
    )
    assert match is not None, out
    kept = int(match.group(1))
    assert 250 < kept < 300
    assert cli.json(cache_path, "check")["ok"] is True
    assert len(cli.json(cache_path, "ls")) == kept
    (cache_path.parent / "blob.bin").write_bytes(b"new")
    assert cli.run(cache_path, "put", KEY, str(cache_path.parent / "blob.bin"))[0] == 0


def test_check_repair_of_a_file_that_cannot_be_opened_starts_an_empty_cache(
    cli: Cli, filled: Filled
) -> None:
    damage_pages(filled.path, [0], page_size=4096)  # the header and the schema
    code, out, err = cli.run(filled.path, "check")
    assert code == 1 and "is not a SQLite database" in one_error_line(err)
    code, out, err = cli.run(filled.path, "check", "--repair")
    assert code == 0 and "moved the damaged file aside" in out, err
    assert cli.json(filled.path, "info")["entries"] == 0
    assert len(list(filled.path.parent.glob(filled.path.name + ".corrupt-*"))) == 1


# -- bad input at the edges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "--limit", "99999999999999999999"], "argument --limit: expected a whole number"),
        (
            ["ls", "--older-than", "99999999999999999999d"],
            "argument --older-than: expected a duration of at most 1000000d",
        ),
        (["ls", "--min-size", "99999999999999999999T"], "argument --min-size: expected a size"),
        (["ls", "--vendor", "99999999999999999999"], "argument --vendor: expected a number in"),
        (["sql", "SELECT 1", "--timeout", "0"], "argument --timeout: expected seconds above 0"),
        (["sql", "SELECT 1", "--timeout", "nan"], "argument --timeout: expected seconds"),
    ],
)
def test_huge_numbers_are_one_line(cli: Cli, filled: Filled, argv: list[str], message: str) -> None:
    code, out, err = cli.run(filled.path, *argv)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def run_limited(argv: list[str], **options: Any) -> subprocess.CompletedProcess[bytes]:
    """The command line in a process of its own, with 1 GiB of address space at most."""
    limited = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
        "sys.argv[0] = 'vyre-sqlcache'; "
        "runpy.run_module('vyre_sqlcache', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", limited, *argv], capture_output=True, timeout=60, **options
    )


def test_put_refuses_a_device_or_a_fifo_at_once(cache_path: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source, message in [
        ("/dev/zero", b"/dev/zero is not a regular file"),
        (str(fifo), b"is not a regular file (a FIFO, socket or device)"),
    ]:
        result = run_limited(["--path", str(cache_path), "put", KEY, source])
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert result.stderr.count(b"\n") == 1
    assert not cache_path.exists()


def test_put_reads_standard_input_up_to_the_limit(cache_path: Path) -> None:
    too_much = run_limited(
        ["--path", str(cache_path), "put", KEY, "-"], input=b"\0" * (64 * 1024 * 1024 + 1)
    )
    assert too_much.returncode == 1
    assert b"standard input holds more than 67108864 bytes" in too_much.stderr
    assert not cache_path.exists()
    stored = run_limited(["--path", str(cache_path), "put", KEY, "-"], input=b"piped blob")
    assert stored.returncode == 0, stored.stderr
    with PipelineCache.open(cache_path) as cache:
        assert cache.get_entry(KEY) == b"piped blob"


ENDLESS = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT max(x) FROM n"


def test_sql_stops_at_its_timeout(cli: Cli, filled: Filled) -> None:
    start = time.monotonic()
    code, out, err = cli.run(filled.path, "sql", ENDLESS, "--timeout", "0.5")
    assert code == 1 and out == ""
    assert "longer than its timeout of 0.5 s" in one_error_line(err)
    assert time.monotonic() - start < 10


def test_sql_stops_on_ctrl_c(filled: Filled) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(filled.path), "sql", ENDLESS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Well into the query: past the CPU time that starting Python and importing take.
        ticks = os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[11]) + int(fields[12]) >= 1.5 * ticks:  # utime + stime
                break
            time.sleep(0.05)
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 130 and out == b""
    assert err == b"vyre-sqlcache: interrupted\n"


def default_handling(name: str) -> None:
    """In a child: the default action for signal `name`. A test run under nohup (or in the
    background) passes SIGHUP (or SIGINT) on ignored, and the command line leaves an
    ignored signal ignored, as nohup means."""
    signal.signal(getattr(signal, name), signal.SIG_DFL)


@pytest.mark.parametrize(
    ("ending", "times", "status", "said"),
    [
        ("SIGTERM", 1, 143, "ended by SIGTERM"),
        ("SIGHUP", 1, 129, "ended by SIGHUP"),
        ("SIGTERM", 2, 143, "ended by SIGTERM"),
        ("SIGINT", 2, 130, "interrupted"),
    ],
)
def test_sigterm_and_sighup_end_an_export_as_ctrl_c_does(
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    tmp_path: Path,
    ending: str,
    times: int,
    status: int,
    said: str,
) -> None:
    # Killed outright, export-dir left 1,700-1,900 temporary files that no later run
    # removed (and import-dir then listed each as skipped), with no message; a second
    # signal stopped the removal of the temporary files part way.
    with PipelineCache.open(cache_path) as cache:
        for _ in range(20):
            cache.write_many([(os.urandom(32), os.urandom(100)) for _ in range(1000)], fingerprint)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(cache_path), "export-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: default_handling(ending),
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.exists() and any(out.rglob("*.bin*"))):
            time.sleep(0.005)
        # Stopped first, so that a loaded machine cannot let the export end meanwhile.
        process.send_signal(signal.SIGSTOP)
        for _ in range(times):
            process.send_signal(getattr(signal, ending))
        process.send_signal(signal.SIGCONT)
        if times > 1:  # and once more after it resumed, as the ending begins
            time.sleep(0.001)
            process.send_signal(getattr(signal, ending))
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == status, err
    assert err == f"vyre-sqlcache: {said}\n".encode()
    assert [p.name for p in out.rglob("*") if ".tmp." in p.name] == []


@pytest.mark.parametrize("argv", [["ls", "--json"], ["info"], ["put", KEY, "-"]])
def test_a_closed_standard_output_is_said_before_anything_is_done(
    cache_path: Path, argv: list[str]
) -> None:
    PipelineCache.open(cache_path).close()
    done = subprocess.run(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(cache_path), *argv],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.decode().startswith("vyre-sqlcache: standard output is closed;")
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 0


def test_a_closed_standard_input_is_said(cache_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(cache_path), "put", KEY, "-"],
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr
        == b"vyre-sqlcache: standard input is closed; give a file, or pipe the bytes in\n"
    )


def test_output_the_encoding_cannot_hold_is_escaped_not_a_failure(filled: Filled) -> None:
    # An ASCII-only stdout (PYTHONIOENCODING=ascii, a C locale): a non-ASCII path in the
    # report made a command that had done its work exit 2, as a usage error.
    path = filled.path.parent / "caché.sqlite3"
    done = subprocess.run(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(path), "put", KEY, "-"],
        input=b"bytes",
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    info = subprocess.run(
        [sys.executable, "-m", "vyre_sqlcache", "--path", str(path), "info"],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert b"cach\\xe9" in info.stdout


def test_export_dir_refuses_a_linked_folder(cli: Cli, filled: Filled, tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    prefix = filled.keys["program"][:2]
    (out / prefix).symlink_to(elsewhere, target_is_directory=True)
    code, _, err = cli.run(filled.path, "export-dir", str(out))
    assert code == 1 and "is a symbolic link or not a folder" in one_error_line(err)
    assert list(elsewhere.iterdir()) == []


def test_export_dir_to_a_dangling_link_says_what_is_missing(
    cli: Cli, filled: Filled, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone", target_is_directory=True)
    code, _, err = cli.run(filled.path, "export-dir", str(out))
    assert code == 1
    assert "is a symbolic link to" in one_error_line(err) and "does not exist" in err
    assert not (tmp_path / "gone").exists()


# -- commands that stream: bounded memory, same output ---------------------------------


def _ok(cli: Cli, path: Path, *argv: str) -> str:
    """The standard output of a command that must succeed."""
    code, out, err = cli.run(path, *argv)
    assert code == 0, err
    return out


def fill(path: Path, count: int, *, same_time: int = 1) -> None:
    """`count` imported entries of a byte or two; `same_time` of them share each created
    time (ties that paging must not split or repeat)."""
    with PipelineCache.open(path, max_bytes=None, write_behind=False) as cache:
        for start in range(0, count, 10_000):
            cache.put_entries(
                [
                    (os.urandom(32), bytes(i % 3), 1_700_000_000_000 + i // same_time)
                    for i in range(start, min(count, start + 10_000))
                ]
            )
        cache.flush()


@pytest.mark.parametrize(
    "options",
    [[], ["--reverse"], ["--sort", "size"], ["--sort", "hits", "--limit", "2345"]],
)
def test_ls_json_pages_through_the_same_rows_as_a_single_listing(
    cache_path: Path, cli: Cli, options: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(cache_path, 2600, same_time=7)
    monkeypatch.setattr("vyre_sqlcache.cli._JSON_PAGE", 500)
    listed = json.loads(_ok(cli, cache_path, "ls", "--json", *options))
    sort = options[options.index("--sort") + 1] if "--sort" in options else "created"
    with PipelineCache.open(cache_path, readonly=True) as cache:
        expected = cache.entries(
            sort=sort, reverse="--reverse" in options, limit=2345 if "--limit" in options else None
        )
    assert listed == json.loads(json.dumps(expected))
    assert len({row["entry_key"] for row in listed}) == len(listed) == len(expected)


def test_json_output_is_the_indented_json_of_a_list(cache_path: Path, cli: Cli) -> None:
    fill(cache_path, 3)
    with PipelineCache.open(cache_path, readonly=True) as cache:
        rows = cache.entries()
    assert _ok(cli, cache_path, "ls", "--json") == json.dumps(rows, indent=2) + "\n"
    assert _ok(cli, cache_path, "ls", "--json", "--backend", "none") == "[]\n"
    assert _ok(cli, cache_path, "sql", "--json", "SELECT 1 AS a, x'00ff' AS b") == (
        '[\n  {\n    "a": 1,\n    "b": "00ff"\n  }\n]\n'
    )


def test_sql_json_streams_every_statements_rows(cache_path: Path, cli: Cli) -> None:
    fill(cache_path, 1500)
    query = "SELECT entry_key, blob_size FROM pipelines_v; SELECT count(*) AS n FROM entries"
    rows = json.loads(_ok(cli, cache_path, "sql", "--json", query))
    with PipelineCache.open(cache_path, readonly=True) as cache:
        results = cache.query(query)
    assert rows == [dict(zip(r.columns, row, strict=True)) for r in results for row in r.rows]
    assert len(rows) == 1501 and rows[-1] == {"n": 1500}


def test_sql_json_refuses_a_write_before_printing_anything(
    cache_path: Path, cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(cache_path, 3)
    assert main(["--path", str(cache_path), "sql", "--json", "DELETE FROM entries"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "only reads the cache" in err
    with PipelineCache.open(cache_path, readonly=True) as cache:
        assert len(cache) == 3


@pytest.mark.parametrize("page", [1, 7, 1000])
def test_iter_keys_lists_each_entry_once_though_others_read_and_rewrite_meanwhile(
    cache_path: Path, fingerprint: DeviceFingerprint, page: int
) -> None:
    digests = [os.urandom(32) for _ in range(40)]
    with PipelineCache.open(cache_path) as cache:
        cache.write_many([(d, b"first") for d in digests], fingerprint)
        cache.put_named("ns", "a name", b"named")
        cache.flush()
        listed = []
        for row in cache.iter_keys(page=page):
            listed.append(row)
            cache.read(random.choice(digests), fingerprint)  # a read moves no entry
            cache.write(random.choice(digests), fingerprint, b"again")  # nor a rewrite
            cache.flush()
        wanted = {fingerprint.cache_key(d).hex() for d in digests}
        assert sorted(r.entry_key for r in listed if r.kind == "program") == sorted(wanted)
        assert [r.kind for r in listed].count("named") == 1 and len(listed) == 41
        with pytest.raises(ValueError, match="page must be"):
            cache.iter_keys(page=0)


def test_iter_entries_reads_pages_in_short_transactions(cache_path: Path) -> None:
    fill(cache_path, 250, same_time=4)
    statements: list[str] = []
    with PipelineCache.open(cache_path, readonly=True) as cache:
        rows = cache.iter_entries(sort="created", page=100)
        assert not isinstance(rows, list)
        first = next(rows)

        # Between pages no read transaction is held: a writer truncates the log.
        with PipelineCache.open(cache_path, write_behind=False) as writer:
            writer.put_entry(os.urandom(32), b"new", created_ms=1)
            writer.flush()
        with read_only(cache_path) as other:
            busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0

        def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            statements.append(sql)
            return True

        apsw.connection_hooks.append(lambda c: setattr(c, "exec_trace", trace))
        try:
            cache.close()
            cache = PipelineCache.open(cache_path, readonly=True)
            listed = list(cache.iter_entries(sort="created", page=100))
        finally:
            apsw.connection_hooks.pop()
            cache.close()
    pages = [s for s in statements if "FROM pipelines_v" in s]
    assert len(pages) == 3 and all("LIMIT" in s for s in pages)
    assert first["created_ms"] == max(row["created_ms"] for row in listed)
    assert len(listed) == 251 and len({row["entry_key"] for row in listed}) == 251


def test_iter_query_refuses_a_write_and_ends_its_transaction_when_closed(
    cache_path: Path,
) -> None:
    fill(cache_path, 10)
    with PipelineCache.open(cache_path, readonly=True) as cache:
        with pytest.raises(ReadOnlyCacheError):
            next(cache.iter_query("DELETE FROM entries"))
        rows = cache.iter_query("SELECT * FROM entries")
        columns, _ = next(rows)
        assert "entry_key" in columns
        rows.close()  # type: ignore[attr-defined]
        with read_only(cache_path) as other:
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0


_LIMITED = """
import resource, sys
from vyre_sqlcache.cli import main
limit = int(sys.argv[1]) * 1024
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
status = main(sys.argv[2:])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmPeak"))
sys.stderr.write(f"peak {peak.split()[1]}\\n")
sys.exit(status)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_ls_and_sql_json_run_in_bounded_memory(cache_path: Path, tmp_path: Path) -> None:
    """40,000 rows as dicts take some 230 MB; the listings run within 64 MiB of what
    `info` needs (address space, not time: the limit makes a listing held whole fail)."""
    fill(cache_path, 40_000)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}

    def run(limit_kib: int, *argv: str) -> tuple[int, int, str]:
        out = tmp_path / "out.json"
        with out.open("wb") as sink:
            done = subprocess.run(
                [sys.executable, "-c", _LIMITED, str(limit_kib), "--path", str(cache_path), *argv],
                stdout=sink,
                stderr=subprocess.PIPE,
                env=env,
                check=False,
            )
        err = done.stderr.decode()
        peak = re.search(r"^peak (\d+)$", err, re.M)
        return done.returncode, int(peak.group(1)) if peak else 0, out.read_text()

    status, info_peak, _ = run(0, "info")
    assert status == 0 and info_peak > 0
    limit = info_peak + 64 * 1024
    for argv in (["ls", "--json"], ["sql", "--json", "SELECT * FROM pipelines_v"]):
        status, _, text = run(limit, *argv)
        assert status == 0, f"{argv} failed under a {limit} KiB limit"
        rows = json.loads(text)
        assert len(rows) == 40_000 and len({row["entry_key"] for row in rows}) == 40_000


@pytest.mark.parametrize("namespace", ["", "n" * 65])
def test_an_argument_the_library_refuses_is_a_one_line_usage_error(
    cli: Cli, filled: Filled, namespace: str
) -> None:
    code, _, err = cli.run(filled.path, "ls", "--namespace", namespace)
    assert code == 2 and "namespace must be 1 to 64 characters" in one_error_line(err)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="a POSIX device")
def test_invalidate_reads_program_digests_from_a_bounded_regular_file(
    cli: Cli, filled: Filled, tmp_path: Path
) -> None:
    # /dev/zero was read whole: memory grew past 9 GB in seconds.
    code, _, err = cli.run(filled.path, "invalidate", "--program-digests", "/dev/zero")
    assert code == 1 and "is not a regular file" in one_error_line(err)
    huge = tmp_path / "digests.txt"
    with open(huge, "wb") as file:
        file.truncate(65 << 20)  # sparse
    code, _, err = cli.run(filled.path, "invalidate", "--program-digests", str(huge))
    assert code == 1 and "limit of a digests file" in one_error_line(err)


def test_sql_json_keeps_every_column_and_stays_strict_json(cli: Cli, filled: Filled) -> None:
    # Two columns of one name came out as one; SQL's infinities as bare Infinity.
    code, out, err = cli.run(
        filled.path, "sql", "--json", "SELECT 1 AS a, 2 AS a, 1e999 AS x, -1e999 AS y, 0.5 AS z"
    )
    assert code == 0, err

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(out, parse_constant=refuse) == [
        {"a": 1, "a:2": 2, "x": "inf", "y": "-inf", "z": 0.5}
    ]


def test_demo_leaves_the_users_departure_record_as_it_was(cli: Cli, cache_path: Path) -> None:
    # The record is bounded (512 rows under a 4 MiB cap): the demo's deletions pushed
    # out the user's, and `explain` of a key the user had deleted said "never seen".
    fingerprint = DeviceFingerprint.from_parts(1, 2, "user's driver")
    digests = [os.urandom(32) for _ in range(600)]
    with PipelineCache.open(cache_path, max_bytes=4 << 20) as cache:
        cache.write_many([(d, b"user's pipeline") for d in digests], fingerprint)
        assert cache.invalidate_impacted([1] * 510, digests[:510], fingerprint) == 510
    before = json.loads(_ok(cli, cache_path, "sql", "--json", "SELECT * FROM departures_v"))
    assert len(before) == 510
    code, out, err = cli.run(cache_path, "demo", "--count", "50")
    assert code == 0 and "temporary" not in out, out + err
    after = json.loads(_ok(cli, cache_path, "sql", "--json", "SELECT * FROM departures_v"))
    assert after == before


def test_sql_that_makes_text_that_is_not_utf8_is_not_called_damage(
    cli: Cli, filled: Filled
) -> None:
    code, _, err = cli.run(filled.path, "sql", "SELECT CAST(x'ff' AS TEXT)")
    assert code == 1 and "the query made it" in one_error_line(err)
    code, out, err = cli.run(filled.path, "check")
    assert code == 0, out + err  # and the cache is sound


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux's /dev/full")
def test_get_to_a_full_device_says_which_in_one_line(cli: Cli, filled: Filled) -> None:
    # It said "[Errno 28] No space left on device", naming nothing.
    code, _, err = cli.run(filled.path, "get", filled.keys["program"], "-o", "/dev/full")
    line = one_error_line(err)
    assert code == 1 and "to /dev/full: No space left on device" in line and "Errno" not in line


def test_a_number_in_other_digits_says_what_is_allowed(cli: Cli, filled: Filled) -> None:
    # "²" passed str.isdigit, then int() refused it: "invalid parse value: '²'".
    code, _, err = cli.run(filled.path, "ls", "--limit", "\u00b2")
    assert code == 2 and "expected a whole number from 1 to" in err


@pytest.mark.parametrize("where", ["empty", "a folder", "a missing folder"])
def test_get_to_a_path_that_cannot_be_a_file_says_which(
    cli: Cli, filled: Filled, tmp_path: Path, where: str
) -> None:
    # `-o ""` said "[Errno 21] Is a directory: '.'", and a missing folder named the
    # temporary file written first.
    target = {
        "empty": "",
        "a folder": str(tmp_path),
        "a missing folder": str(tmp_path / "no" / "x"),
    }
    code, out, err = cli.run(filled.path, "get", filled.keys["program"], "-o", target[where])
    line = one_error_line(err)
    assert out == ""
    if where == "a missing folder":
        assert code == 1 and f"cannot write {target[where]} (a new file in " in line
        assert ".tmp" not in line
    elif where == "empty":
        assert code == 2 and "argument -o/--output: is empty; give the path" in line
    else:
        assert code == 2 and "is a folder or empty; give a file" in line


def test_more_ctrl_c_are_ignored_while_a_command_ends_and_end_it_again_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vyre_sqlcache import cli as cli_module

    monkeypatch.setattr(cli_module, "ENDING_S", 0.2)
    monkeypatch.setattr(cli_module._Ended, "interrupted", False)
    with pytest.raises(KeyboardInterrupt):
        cli_module._interrupt_once(signal.SIGINT, None)
    cli_module._interrupt_once(signal.SIGINT, None)  # the cleanup goes on
    time.sleep(0.3)
    with pytest.raises(KeyboardInterrupt):  # a command that still runs ends again
        cli_module._interrupt_once(signal.SIGINT, None)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["export-dir", ""], "DIR"),  # wrote 11 folders of files into the current folder
        (["import-dir", "  "], "DIR"),  # read the current folder
        (["put", "ab" * 32, ""], "FILE"),
        (["invalidate", "--program-digests", ""], "--program-digests"),
        (["merge", ""], "SRC"),
        (["copy", "-o", "-"], "-o/--output"),  # wrote a file named "-"
        (["bundle", "-o", "-"], "-o/--output"),
        (["copy", "-o", ""], "-o/--output"),
        (["get", "ab" * 32, "-o", ""], "-o/--output"),
    ],
)
def test_an_empty_path_or_stdout_where_a_file_is_written_is_a_usage_error(
    cli: Cli,
    filled: Filled,
    cache_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    named: str,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = state(cache_path)
    code, out, err = cli.run(cache_path, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
    assert f"argument {named}:" in err and "Traceback" not in err
    assert state(cache_path) == before and os.listdir(work) == []


def test_an_empty_cache_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--path", "", "info"]) == 2  # it said "... or None for the default", exit 1
    err = capsys.readouterr().err
    assert "argument --path: is empty" in err and "None" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["bundle", "-o", "x.layer", "--driver-extra", "vulkan-1.3"],  # bundled every driver
        ["invalidate", "--all", "--revision-extra", "vulkan-1.3"],
        ["explain", "--entry-key", "ab" * 32, "--revision-extra", "x"],
    ],
)
def test_an_option_without_the_one_it_qualifies_is_a_usage_error(
    cli: Cli,
    filled: Filled,
    cache_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    before = state(cache_path)
    code, out, err = cli.run(cache_path, *argv)
    assert code == 2 and out == "" and "qualifies" in err, (code, out, err)
    assert state(cache_path) == before and not (tmp_path / "x.layer").exists()
