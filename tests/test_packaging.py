"""The built wheel carries the migrations and works in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("vyre_sqlcache-*.whl")
    return built


def test_wheel_contains_the_migrations_and_the_type_marker(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    sql = sorted(n for n in names if n.endswith(".sql"))
    expected = sorted(
        f"vyre_sqlcache/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")
    )
    assert sql == expected and sql
    assert "vyre_sqlcache/py.typed" in names


def test_wheel_installs_and_opens_a_cache_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    script = textwrap.dedent(
        """
        import os, sys, vyre_sqlcache
        from vyre_sqlcache import PipelineCache, DeviceFingerprint
        from vyre_sqlcache.schema import migrations
        assert "site-packages" in vyre_sqlcache.__file__, vyre_sqlcache.__file__
        fp = DeviceFingerprint.from_parts(1, 2, "r")
        with PipelineCache.open(sys.argv[1]) as cache:
            cache.write(b"d" * 32, fp, b"blob")
            cache.flush()
            assert cache.read(b"d" * 32, fp) == b"blob"
        print(len(migrations()))
        """
    )
    result = subprocess.run(
        [str(python), "-c", script, str(tmp_path / "c.sqlite3")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(list((ROOT / "migrations").glob("*.sql")))
