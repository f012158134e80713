"""`python -m torture`: runs every trial and prints the figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torture import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_command_prints_a_table_of_every_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # From another folder, with a relative work folder: the children it starts
    # (`python -m torture child-...`) still find the harness and the files.
    monkeypatch.chdir(tmp_path)
    argv = ["--kills", "2", "--corruptions", "6", "--seconds", "1", "--faults", "2", "--forks", "2"]
    argv += ["--interrupts", "1", "--interrupt-seconds", "1", "--deletions", "1"]
    argv += ["--deletion-seconds", "1", "--tier-seconds", "2"]
    code = main([*argv, "--seed", "5", "--workdir", "work", "--quiet"])
    out = capsys.readouterr().out
    assert out.startswith("vyre-sqlcache torture, seed 5 (kills ")
    assert "| trial | figure | value |" in out
    trials = ("kills", "contention", "faults", "corruption", "fork", "interrupts", "deletions")
    trials += ("tiers",)
    for trial in trials:
        assert f"| {trial} |" in out
    assert "| kills | kills survived (of which with a power cut) | 2 (" in out
    assert "| corruption | corrupt files tried (by damage) | 6 (" in out
    # Exit status 1 and FAIL exactly when a bold (must be zero) figure is not.
    assert (code, out.rstrip().splitlines()[-1].split(":")[0]) in ((0, "PASS"), (1, "FAIL"))


def test_the_command_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torture", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m torture ")
    options = ("--kills", "--corruptions", "--seconds", "--forks", "--interrupts", "--deletions")
    options += ("--tier-seconds",)
    for option in (*options, "--seed"):
        assert option in done.stdout


def test_the_harness_uses_only_the_public_api_of_the_library() -> None:
    # It lives outside the package, and the package's private modules may change.
    for source in sorted((ROOT / "torture").glob("*.py")):
        text = source.read_text()
        assert "from vyre_sqlcache." not in text, source.name
        assert "import vyre_sqlcache." not in text, source.name
