"""Damaged files: opening and reading never crash and never return wrong bytes; the cache
heals (moves the file aside) or, with strict=True, raises CorruptCacheError.

Every damaged file is opened and read in a worker process (`TrialWorker`), so a crash of
SQLite or of the library fails the test instead of killing pytest. The long version is
`python -m torture --corruptions 1000`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torture.common import FINGERPRINT, pipeline_key
from torture.corruption import (
    Template,
    TrialWorker,
    damage,
    make_template,
    run_corruptions,
)
from vyre_sqlcache import CacheError, CorruptCacheError, PipelineCache

from .vfs import overwrite


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    folder = tmp_path_factory.mktemp("templates")
    return {
        "clean": make_template(folder / "clean", with_wal=False, seed=1),
        "wal": make_template(folder / "wal", with_wal=True, seed=2),
    }


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrialWorker]:
    running = TrialWorker(tmp_path_factory.mktemp("worker"))
    yield running
    running.close()


def copy_of(template: Template, folder: Path) -> Path:
    shutil.copytree(template.folder, folder, ignore=shutil.ignore_patterns("*.json"))
    (folder / "model.json").write_text(json.dumps(template.allowed))
    return folder / template.name


def run_trial(worker: TrialWorker, path: Path, *, strict: bool = False) -> dict[str, Any]:
    job = {"path": str(path), "model": str(path.parent / "model.json"), "strict": strict}
    result = worker.run({**job, "seed": 0}, timeout=120)
    assert isinstance(result, dict), f"the worker {result}"  # crashed or hung
    return result


def assert_safe(result: dict[str, Any]) -> None:
    """No wrong bytes, no exception outside CacheError (get_many: the known bug)."""
    assert result["wrong"] == 0
    assert all(text.startswith("get_many:") for text in result["undocumented"]), result
    assert result["unusable"] is None, result["unusable"]


PAGE_GROUPS = [
    "sqlite_schema:leaf",
    "entries:leaf",
    "entries_lru:leaf",
    "entries_program:leaf",
    "blobs:internal",
    "blobs:leaf",
    "blobs:overflow",
    "meta:leaf",
]


@pytest.mark.parametrize("how", ["random", "zeros"])
@pytest.mark.parametrize("group", PAGE_GROUPS)
def test_a_damaged_page_of_any_b_tree(
    templates: dict[str, Template], worker: TrialWorker, tmp_path: Path, group: str, how: str
) -> None:
    template = templates["clean"]
    path = copy_of(template, tmp_path / "copy")
    page = template.pages[group][len(template.pages[group]) // 2]
    size = template.page_size
    overwrite(path, (page - 1) * size, os.urandom(size) if how == "random" else bytes(size))
    result = run_trial(worker, path)
    assert_safe(result)
    # The damage is noticed: healed at open, or met in use (then healed at the next open,
    # or the entries that failed their checksums dropped).
    assert result["healed"] or result["met_damage"]
    if group != "blobs:overflow":  # overflow damage fails checksums, not SQLite's checks
        assert result["healed"] or result["healed_later"]
    assert not result["left_damaged"]


@pytest.mark.parametrize("strict", [False, True])
def test_a_garbled_header(
    templates: dict[str, Template], worker: TrialWorker, tmp_path: Path, strict: bool
) -> None:
    path = copy_of(templates["clean"], tmp_path / "copy")
    overwrite(path, 16, b"\x00\x07")  # page size 7: not a database SQLite can read
    before = path.read_bytes()
    result = run_trial(worker, path, strict=strict)
    assert_safe(result)
    if strict:
        assert result["raised"] == CorruptCacheError.__name__
        assert path.read_bytes() == before  # strict never touches the file
        assert not list(path.parent.glob("*.corrupt-*"))
    else:
        assert result["healed"]
        assert len(list(path.parent.glob("*.corrupt-*"))) == 1


@pytest.mark.parametrize("how", ["header", "frame-header", "frame-data", "frame-zeros", "truncate"])
def test_a_damaged_write_ahead_log(
    templates: dict[str, Template], worker: TrialWorker, tmp_path: Path, how: str
) -> None:
    # A log cut or garbled at a frame ends the log there: the reads may go back to older
    # versions of an entry, but never to bytes that were not written for it.
    template = templates["wal"]
    path = copy_of(template, tmp_path / "copy")
    wal = Path(str(path) + "-wal")
    frame = 24 + template.page_size
    frames = (wal.stat().st_size - 32) // frame
    start = 32 + (frames // 2) * frame
    if how == "header":
        overwrite(wal, 8, os.urandom(4))  # page size field
    elif how == "frame-header":
        overwrite(wal, start + 16, os.urandom(4))  # a salt
    elif how == "frame-data":
        overwrite(wal, start + 24 + 1000, os.urandom(16))
    elif how == "frame-zeros":
        overwrite(wal, start, bytes(frame))
    else:
        os.truncate(wal, start + 100)
    result = run_trial(worker, path)
    assert_safe(result)
    assert result["raised"] is None and not result["left_damaged"]


def test_random_damage_of_many_copies(tmp_path: Path) -> None:
    report = run_corruptions(tmp_path, 40, seed=9)
    assert report.files == 40
    assert (report.wrong, report.crashed, report.hung) == (0, 0, 0), report.details
    assert not report.undocumented_calls, report.details
    # A damaged user_version that reads as a plausible newer version cannot be told from
    # a newer library's file: SchemaTooNewError (never written) is the documented answer.
    assert set(report.unusable_reasons) <= {"SchemaTooNewError"}, report.details
    outcomes = report.healed_at_open + report.healed_after_use + report.opened_fine
    assert outcomes + report.damage_met_kept + sum(report.raised_at_open.values()) == 40


def test_damage_kinds_cover_the_file_and_the_log(templates: dict[str, Template]) -> None:
    rng = random.Random(0)
    kinds = set()
    for _ in range(200):
        template = templates[rng.choice(["clean", "wal"])]
        folder = template.folder.parent / "damage-kinds"
        shutil.rmtree(folder, ignore_errors=True)
        path = copy_of(template, folder)
        kinds.add(damage(path, template, rng)[0])
    assert kinds == {"header", "page", "bytes", "sector", "truncate", "wal"}


HEADER_DAMAGE = {
    # offset in the file header: the bytes written there
    "write-version": (18, b"\x07"),  # SQLite opens it read-only: every write fails
    "schema-format": (47, b"\x07"),  # every statement: 'unsupported file format'
}


@pytest.mark.parametrize("field", sorted(HEADER_DAMAGE))
def test_a_damaged_header_field_heals(
    templates: dict[str, Template], tmp_path: Path, field: str
) -> None:
    offset, data = HEADER_DAMAGE[field]
    strict_copy = copy_of(templates["clean"], tmp_path / "strict")
    overwrite(strict_copy, offset, data)
    with pytest.raises(CorruptCacheError):
        PipelineCache.open(strict_copy, strict=True)
    path = copy_of(templates["clean"], tmp_path / "copy")
    overwrite(path, offset, data)
    with PipelineCache.open(path) as cache:  # heals: moved aside, a new cache
        cache.write(b"\1" * 32, FINGERPRINT, b"works")
        assert cache.read(b"\1" * 32, FINGERPRINT) == b"works"
    assert len(list(path.parent.glob("*.corrupt-*"))) == 1


@pytest.mark.parametrize("version", [0, -3, 0x7A3B_11C0])
def test_a_user_version_damaged_on_the_latest_schema_is_set_back_and_nothing_lost(
    templates: dict[str, Template], tmp_path: Path, version: int
) -> None:
    # Zero made the file "not a vyre-sqlcache cache", a huge one "too new", a negative
    # one failed the migrations: each moved aside, every entry lost.
    with PipelineCache.open(copy_of(templates["clean"], tmp_path / "sound")) as cache:
        entries = cache.stats().entries
    path = copy_of(templates["clean"], tmp_path / "copy")
    overwrite(path, 60, struct.pack(">i", version))
    with pytest.raises(CorruptCacheError, match=f"user_version {version}"):
        PipelineCache.open(path, readonly=True)
    with PipelineCache.open(path, strict=True) as cache:
        assert cache.check().ok
        assert cache.stats().entries == entries > 0
    assert list(path.parent.glob("*.corrupt-*")) == []


def test_get_many_on_a_damaged_page_misses(
    templates: dict[str, Template], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    template = templates["clean"]
    path = copy_of(template, tmp_path / "copy")
    (page,) = template.pages["blobs:internal"]
    overwrite(path, (page - 1) * template.page_size, bytes(template.page_size))
    keyed = [s for s in template.allowed if s % 4 == 3]
    with caplog.at_level(logging.ERROR), PipelineCache.open(path) as cache:
        try:
            got = cache.get_many([pipeline_key(s) for s in keyed], FINGERPRINT)
        except CacheError:
            return
        assert got == [None] * len(keyed)
