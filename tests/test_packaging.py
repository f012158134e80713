"""The built packages: the wheel holds the runtime package only (with its migrations),
its metadata is complete, and it works in a fresh virtual environment."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vyre_sqlcache"
VERSION = re.search(r'^__version__ = "([^"]+)"$', (PACKAGE / "__init__.py").read_text(), re.M)


def _version() -> str:
    assert VERSION is not None, "vyre_sqlcache/__init__.py sets no __version__"
    return VERSION.group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it (as pip and package indexes build)."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (built,) = dist.glob("vyre_sqlcache-*.whl")
    return built


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> Message:
    name = f"vyre_sqlcache-{_version()}.dist-info/METADATA"
    return Parser().parsestr(zipfile.ZipFile(wheel).read(name).decode())


def test_wheel_contains_the_migrations_and_the_type_marker(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    sql = sorted(n for n in names if n.endswith(".sql"))
    expected = sorted(
        f"vyre_sqlcache/migrations/{p.name}" for p in (PACKAGE / "migrations").glob("*.sql")
    )
    assert sql == expected and sql
    assert "vyre_sqlcache/py.typed" in names
    assert "vyre_sqlcache/migrations/schema.json" in names


def test_wheel_holds_only_the_runtime_package_and_its_metadata(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"vyre_sqlcache-{_version()}.dist-info"
    modules = sorted(f"vyre_sqlcache/{p.name}" for p in PACKAGE.glob("*.py"))
    package = sorted(n for n in names if n.startswith("vyre_sqlcache/"))
    # Every runtime module, the type marker and the migrations: no subpackage, nothing else.
    for name in package:
        path = PurePosixPath(name)
        module = len(path.parts) == 2 and (path.suffix == ".py" or path.name == "py.typed")
        migration = path.parent.as_posix() == "vyre_sqlcache/migrations" and (
            path.suffix == ".sql" or path.name == "schema.json"
        )
        assert module or migration, f"not runtime code: {name}"
    assert sorted(n for n in package if n.endswith(".py")) == modules
    # Apart from the package, only the metadata.
    assert {n for n in names if not n.startswith("vyre_sqlcache/")} == {
        f"{dist_info}/{part}"
        for part in ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE")
    }
    # No harness, test or benchmark code at any depth.
    for name in names:
        parts = set(PurePosixPath(name).parts[:-1])
        assert not parts & {"torture", "tests", "benchmarks", "demo", "docs"}, name


def test_metadata_is_complete_and_the_version_has_one_source(metadata: Message) -> None:
    assert metadata["Name"] == "vyre-sqlcache"
    assert metadata["Version"] == _version()
    assert metadata["License-Expression"] == "MIT"
    assert metadata["License-File"] == "LICENSE"
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["Keywords"] and "sqlite" in metadata["Keywords"]
    classifiers = metadata.get_all("Classifier") or []
    for classifier in [
        *(f"Programming Language :: Python :: 3.{minor}" for minor in range(10, 14)),
        "Operating System :: POSIX :: Linux",
        "License :: OSI Approved :: MIT License",
        "Topic :: Database",
        "Typing :: Typed",
    ]:
        assert classifier in classifiers
    # tqdm only draws progress bars: an extra, not a dependency.
    requires = metadata.get_all("Requires-Dist") or []
    assert "progress" in (metadata.get_all("Provides-Extra") or [])
    for requirement in requires:
        if requirement.startswith("tqdm"):
            assert "extra ==" in requirement, requirement


def test_the_description_has_no_link_that_breaks_on_a_package_index(
    metadata: Message,
) -> None:
    description = metadata.get_payload()
    assert isinstance(description, str)
    assert metadata["Description-Content-Type"].startswith("text/markdown")
    assert description.startswith("# vyre-sqlcache")
    # A package index shows the text without the files beside it: every link and image
    # must be absolute; the chart is named as a file of the source distribution.
    relative = re.findall(r"\]\((?!https?://)[^)]*\)", description)
    assert not relative
    assert "`docs/benchmarks.png` in the source distribution" in description
    assert "| target | latest run | three runs | |" in description  # the figures stay


def test_the_sdist_carries_the_harnesses_docs_and_license(dist: Path) -> None:
    (sdist,) = dist.glob("vyre_sqlcache-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {PurePosixPath(n).relative_to(f"vyre_sqlcache-{_version()}").as_posix()
                 for n in archive.getnames() if "/" in n}  # fmt: skip
    for name in (
        "LICENSE",
        "README.md",
        "docs/benchmarks.png",
        "torture/__main__.py",
        "torture/shims.py",
        "benchmarks/__main__.py",
        "tests/test_packaging.py",
        "vyre_sqlcache/__init__.py",
    ):
        assert name in names
    assert not [n for n in names if "__pycache__" in n]


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
        import importlib.util, sys, vyre_sqlcache
        from vyre_sqlcache import SCHEMA_VERSION, DeviceFingerprint, PipelineCache
        assert "site-packages" in vyre_sqlcache.__file__, vyre_sqlcache.__file__
        assert importlib.util.find_spec("tqdm") is None, "tqdm is an extra"
        assert importlib.util.find_spec("torture") is None
        fp = DeviceFingerprint.from_parts(1, 2, "r")
        with PipelineCache.open(sys.argv[1]) as cache:
            cache.write(b"d" * 32, fp, b"blob")
            cache.flush()
            assert cache.read(b"d" * 32, fp) == b"blob"
        print(SCHEMA_VERSION, vyre_sqlcache.__version__)
        """
    )
    cache = tmp_path / "c.sqlite3"
    result = subprocess.run(
        [str(python), "-c", script, str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    schema_version, version = result.stdout.split()
    assert int(schema_version) == len(list((PACKAGE / "migrations").glob("*.sql")))
    assert version == _version()
    # The command line works without tqdm: `check` (which draws a bar on a terminal).
    check = subprocess.run(
        [str(env_dir / "bin" / "vyre-sqlcache"), "check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"VYRE_SQLCACHE_PATH": str(cache), "PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 0, check.stdout + check.stderr
