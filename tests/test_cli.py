"""The command line, through main(argv) and the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from vyre_sqlcache import DeviceFingerprint, PipelineCache
from vyre_sqlcache.cli import main


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


def test_demo_keep_keeps_what_was_not_invalidated(cache_path: Path) -> None:
    assert main(["--path", str(cache_path), "demo", "--count", "20", "--keep"]) == 0
    with PipelineCache.open(cache_path) as cache:
        assert len(cache) == 15


@pytest.mark.parametrize("argv", [["demo", "--count", "0"], ["nope"], []])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


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
