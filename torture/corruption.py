"""Corrupt files: copies of a cache damaged on purpose, opened in a worker."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from vyre_sqlcache import SCHEMA_VERSION, CacheError, PipelineCache, SchemaTooNewError

from .common import (
    FINGERPRINT,
    add_detail,
    bump,
    check_file,
    child_command,
    child_options,
    entry_key_of,
    invalidate_slots,
    is_keyed,
    moved_aside,
    pipeline_key,
    read_slot,
    sha,
    write_slots,
)

#: A `user_version` this far above the library's `SCHEMA_VERSION` may be a newer
#: library's file, which the library refuses (`SchemaTooNewError`) and never writes; a
#: damaged one beyond it must be healed. The library's own rule, restated here.
PLAUSIBLE_VERSIONS_AHEAD = 1000


@dataclass
class CorruptionReport:
    """What the corruption trials found."""

    files: int = 0
    healed_at_open: int = 0
    healed_after_use: int = 0
    raised_at_open: dict[str, int] = field(default_factory=dict)
    damage_met_kept: int = 0
    opened_fine: int = 0
    reads: int = 0
    right: int = 0
    misses: int = 0
    wrong: int = 0
    crashed: int = 0
    hung: int = 0
    undocumented: int = 0
    undocumented_calls: dict[str, int] = field(default_factory=dict)
    unusable: int = 0
    unusable_reasons: dict[str, int] = field(default_factory=dict)
    left_damaged: int = 0
    damage: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.wrong + self.crashed + self.hung + self.undocumented + self.unusable


@dataclass
class Template:
    """A populated cache to damage copies of, with what each slot may read as."""

    folder: Path
    name: str
    allowed: dict[int, list[str | None]]
    pages: dict[str, list[int]]
    page_size: int
    with_wal: bool

    @property
    def database(self) -> Path:
        return self.folder / self.name


def _template_sizes(slot: int, rng: random.Random) -> int:
    if slot < 40:
        return rng.randint(0, 4096)  # inside a b-tree leaf
    if slot < 60:
        return rng.randint(20_000, 100_000)  # overflow pages
    return rng.randint(300_000, 600_000)  # read by incremental blob I/O


def _store(
    cache: PipelineCache, items: list[tuple[int, bytes]], allowed: dict[int, list[str | None]]
) -> None:
    for keyed in (False, True):
        part = [(s, b) for s, b in items if is_keyed(s) == keyed]
        if part:
            write_slots(cache, part)
    for slot, blob in items:
        allowed.setdefault(slot, []).append(str(sha(blob)))


def page_map(database: Path) -> tuple[dict[str, list[int]], int]:
    """Pages by `table:pagetype` (from dbstat), and the page size."""
    connection = apsw.Connection(str(database))
    try:
        pages: dict[str, list[int]] = {}
        for name, pageno, pagetype in connection.execute(
            "SELECT name, pageno, pagetype FROM dbstat"
        ):
            pages.setdefault(f"{name}:{pagetype}", []).append(int(pageno))
        page_size = int(connection.pragma("page_size"))
    finally:
        connection.close()
    return pages, page_size


def make_template(folder: Path, *, with_wal: bool, seed: int = 0) -> Template:
    """A cache of 64 slots (small, overflowing and large blobs, by digest and by key),
    closed cleanly, or (`with_wal`) with later writes left in a write-ahead log."""
    rng = random.Random(seed)
    shutil.rmtree(folder, ignore_errors=True)
    source = folder / "source" / "cache.sqlite3"
    source.parent.mkdir(parents=True, exist_ok=True)
    target = folder / "template"
    target.mkdir(exist_ok=True)
    allowed: dict[int, list[str | None]] = {}
    with PipelineCache.open(source, max_bytes=None) as cache:
        items = [(s, rng.randbytes(_template_sizes(s, rng))) for s in range(64)]
        for start in range(0, 64, 16):
            _store(cache, items[start : start + 16], allowed)
    if not with_wal:
        pages, page_size = page_map(source)
        shutil.copyfile(source, target / "cache.sqlite3")
        return Template(target, "cache.sqlite3", allowed, pages, page_size, False)
    cache = PipelineCache.open(source, max_bytes=None)
    overwrite = rng.sample(range(64), 12) + list(range(64, 72))
    _store(cache, [(s, rng.randbytes(_template_sizes(s % 64, rng))) for s in overwrite], allowed)
    invalidated = rng.sample(range(64), 3)
    invalidate_slots(cache, invalidated, [1, 1, 1])
    for slot in invalidated:
        allowed[slot].append(None)
    pages, page_size = page_map(source)
    # What a crash leaves: the main file and the log, no shared-memory index.
    for suffix in ("", "-wal"):
        shutil.copyfile(str(source) + suffix, str(target / "cache.sqlite3") + suffix)
    cache.close()
    return Template(target, "cache.sqlite3", allowed, pages, page_size, True)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of a file, in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def _damage_page(path: Path, template: Template, rng: random.Random) -> str:
    group = rng.choice(sorted(template.pages))
    page = rng.choice(template.pages[group])
    size = template.page_size
    start = (page - 1) * size
    how = rng.choice(["random", "zeros", "scribble", "other-page"])
    if how == "random":
        overwrite(path, start, rng.randbytes(size))
    elif how == "zeros":
        overwrite(path, start, bytes(size))
    elif how == "scribble":
        for _ in range(rng.randint(1, 8)):
            overwrite(path, start + rng.randrange(size), rng.randbytes(rng.randint(1, 8)))
    else:  # a misdirected write: another page's bytes land here
        other = rng.choice([p for group in template.pages.values() for p in group])
        with open(path, "rb") as file:
            file.seek((other - 1) * size)
            overwrite(path, start, file.read(size))
    return f"page {page} ({group}) {how}"


def _damage_wal(path: Path, template: Template, rng: random.Random) -> str:
    wal = Path(str(path) + "-wal")
    size = wal.stat().st_size
    frame_size = 24 + template.page_size
    frames = max(1, (size - 32) // frame_size)
    how = rng.choice(["header", "frame-header", "frame-data", "frame-zeros", "truncate"])
    frame = rng.randrange(frames)
    start = 32 + frame * frame_size
    if how == "header":
        overwrite(wal, rng.randrange(32), rng.randbytes(rng.randint(1, 4)))
    elif how == "frame-header":
        overwrite(wal, start + rng.randrange(24), rng.randbytes(rng.randint(1, 4)))
    elif how == "frame-data":
        overwrite(wal, start + 24 + rng.randrange(template.page_size), rng.randbytes(8))
    elif how == "frame-zeros":
        overwrite(wal, start, bytes(frame_size))
    else:
        os.truncate(wal, rng.randrange(size))
    return f"wal {how} (frame {frame} of {frames})"


def damage(path: Path, template: Template, rng: random.Random) -> tuple[str, str]:
    """Damage a copy of the template in one random way; return the kind and the details."""
    kinds = ["header", "page", "page", "page", "bytes", "sector", "truncate"]
    if template.with_wal:
        kinds += ["wal", "wal", "wal"]
    kind = rng.choice(kinds)
    size = path.stat().st_size
    if kind == "header":
        for _ in range(rng.randint(1, 4)):
            overwrite(path, rng.randrange(100), rng.randbytes(1))
        return kind, "header bytes"
    if kind == "page":
        return kind, _damage_page(path, template, rng)
    if kind == "bytes":
        spots = rng.randint(1, 32)
        for _ in range(spots):
            overwrite(path, rng.randrange(size), rng.randbytes(rng.randint(1, 16)))
        return kind, f"{spots} random spots"
    if kind == "sector":
        sector = rng.choice([512, 4096])
        overwrite(path, rng.randrange(size // sector) * sector, bytes(sector))
        return kind, f"a zeroed {sector}-byte sector"
    if kind == "truncate":
        os.truncate(path, rng.randrange(size))
        return kind, "truncated"
    return kind, _damage_wal(path, template, rng)


def _ignore(_: object) -> None:
    """Discard a result (a call made only for its errors)."""


def _trial_calls(
    cache: PipelineCache, allowed: dict[int, list[str | None]], result: dict[str, Any]
) -> None:
    """Read every slot through several APIs; then write and read a new one."""

    def judge(slot: int, got: bytes | None) -> None:
        result["reads"] += 1
        if got is None:
            result["right" if None in allowed[slot] else "misses"] += 1
        elif sha(got) in allowed[slot]:
            result["right"] += 1
        else:
            result["wrong"] += 1

    def guarded(name: str, call: Callable[[], None]) -> None:
        try:
            call()
        except CacheError:
            result["met_damage"] = True
        except Exception as error:
            result["undocumented"].append(f"{name}: {type(error).__name__}: {error}")

    slots = sorted(allowed, key=lambda s: hash((s, result["seed"])))
    for slot in slots:
        guarded("read", lambda s=slot: judge(s, read_slot(cache, s)))  # type: ignore[misc]
        guarded("get_entry", lambda s=slot: judge(s, cache.get_entry(entry_key_of(s))))  # type: ignore[misc]
    keyed = [s for s in slots if is_keyed(s)]

    def get_many() -> None:
        got = cache.get_many([pipeline_key(s) for s in keyed], FINGERPRINT)
        for slot, blob in zip(keyed, got, strict=True):
            judge(slot, blob)

    guarded("get_many", get_many)
    guarded("contains", lambda: _ignore(cache.contains(pipeline_key(3), FINGERPRINT)))
    guarded("check_entry", lambda: _ignore(cache.check_entry(entry_key_of(1))))
    guarded("stats", lambda: _ignore(cache.stats()))
    blob = os.urandom(3000)

    def write_and_read() -> None:
        write_slots(cache, [(10_000, blob)])
        if read_slot(cache, 10_000) != blob:
            result["undocumented"].append("a new write did not read back")

    guarded("write", write_and_read)
    guarded("invalidate", lambda: _ignore(invalidate_slots(cache, [5], [1])))


def _marked(path: Path) -> bool:
    """Whether the cache left its marker asking the next open to verify the file."""
    return path.with_name(path.name + ".needs-check").exists()


def _user_version(path: Path) -> int:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(connection.pragma("user_version"))
    finally:
        connection.close()


def _usable(path: Path, result: dict[str, Any]) -> None:
    """Open again (healing if the last session found damage): it must work."""
    before = len(moved_aside(path))
    try:
        with PipelineCache.open(path, max_bytes=None) as cache:
            result["healed_later"] = len(moved_aside(path)) > before
            blob = os.urandom(2000)
            write_slots(cache, [(20_000, blob)])
            if read_slot(cache, 20_000) != blob:
                result["unusable"] = "a write did not read back"
    except SchemaTooNewError as error:
        # A damaged user_version that could be a newer library's is refused as documented
        # (it cannot be told from one); an impossible one must be healed.
        if not 0 <= _user_version(path) <= SCHEMA_VERSION + PLAUSIBLE_VERSIONS_AHEAD:
            result["unusable"] = f"{type(error).__name__}: {error}"
    except Exception as error:
        result["unusable"] = f"{type(error).__name__}: {error}"


def corruption_trial(
    path: Path, allowed: dict[int, list[str | None]], *, strict: bool, seed: int
) -> dict[str, Any]:
    """Open a damaged cache, read everything, write; open it again; say what happened."""
    result: dict[str, Any] = {
        "seed": seed, "reads": 0, "right": 0, "misses": 0, "wrong": 0, "undocumented": [],
        "raised": None, "healed": False, "met_damage": False, "healed_later": False,
        "unusable": None, "left_damaged": False,
    }  # fmt: skip
    try:
        cache = PipelineCache.open(path, max_bytes=None, strict=strict)
    except CacheError as error:
        result["raised"] = type(error).__name__
    except Exception as error:
        result["undocumented"].append(f"open: {type(error).__name__}: {error}")
    else:
        result["healed"] = bool(moved_aside(path))
        if strict and result["healed"]:
            result["undocumented"].append("strict=True moved the file aside")
        _trial_calls(cache, allowed, result)
        with suppress(CacheError):
            result["met_damage"] |= cache.stats().checksum_failures > 0
        try:
            cache.close()
        except Exception as error:
            result["undocumented"].append(f"close: {type(error).__name__}: {error}")
        result["met_damage"] = result["met_damage"] or _marked(path)
    if not strict:
        _usable(path, result)
    if path.exists():
        with suppress(apsw.Error):
            result["left_damaged"] = not check_file(path).sound
    return result


def _merge_trial(report: CorruptionReport, result: dict[str, Any], what: str) -> None:
    for name in ("reads", "right", "misses", "wrong"):
        setattr(report, name, getattr(report, name) + result[name])
    if result["wrong"]:
        add_detail(report.details, f"{what}: {result['wrong']} wrong reads")
    if result["undocumented"]:
        report.undocumented += 1
        for text in result["undocumented"]:
            bump(report.undocumented_calls, text.split(":")[0])
        add_detail(report.details, f"{what}: {result['undocumented'][:2]}")
    if result["unusable"]:
        report.unusable += 1
        bump(report.unusable_reasons, result["unusable"].split(":")[0])
        add_detail(report.details, f"{what}: unusable after reopening: {result['unusable']}")
    report.left_damaged += bool(result["left_damaged"])
    if result["raised"]:
        name = result["raised"]
        report.raised_at_open[name] = report.raised_at_open.get(name, 0) + 1
    elif result["healed"]:
        report.healed_at_open += 1
    elif result["met_damage"] and result["healed_later"]:
        report.healed_after_use += 1
    elif result["met_damage"]:
        report.damage_met_kept += 1
    else:
        report.opened_fine += 1


class TrialWorker:
    """A child process that runs corruption trials sent to it, one JSON line each way."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr = open(workdir / "worker.stderr", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            child_command("child-corrupt"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            **child_options(),
        )

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """The trial's result, or why there is none ('crashed ...' or 'hung')."""
        assert self.process.stdin is not None and self.process.stdout is not None
        # The worker runs in the source tree (`child_options`): it needs absolute paths.
        job = {**job, "path": os.path.abspath(job["path"]), "model": os.path.abspath(job["model"])}
        try:
            self.process.stdin.write((json.dumps(job) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if line:
            result: dict[str, Any] = json.loads(line)
            return result
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            return "hung"
        return f"crashed (exit {self.process.returncode})"

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self.stderr.close()


def trial_in_subprocess(
    path: Path, allowed: dict[int, list[str | None]], *, strict: bool = False, timeout: float = 120
) -> dict[str, Any] | str:
    """`corruption_trial` in a fresh process: its result, or 'crashed ...' / 'hung'."""
    model = path.with_name(path.name + ".model.json")
    model.write_text(json.dumps(allowed))
    worker = TrialWorker(path.parent)
    try:
        job = {"path": str(path), "model": str(model), "strict": strict, "seed": 0}
        return worker.run(job, timeout)
    finally:
        worker.close()
        model.unlink(missing_ok=True)


def corruption_child() -> int:
    """Run trials read from stdin until it closes."""
    import logging

    logging.getLogger("vyre_sqlcache").setLevel(logging.ERROR)
    models: dict[str, dict[int, list[str | None]]] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["model"] not in models:
            raw = json.loads(Path(job["model"]).read_text())
            models[job["model"]] = {int(k): v for k, v in raw.items()}
        result = corruption_trial(
            Path(job["path"]), models[job["model"]], strict=job["strict"], seed=job["seed"]
        )
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def run_corruptions(
    workdir: Path,
    count: int,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CorruptionReport:
    """Damage `count` copies of two populated caches and try each in a worker process."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    templates = [
        make_template(workdir / "clean", with_wal=False, seed=seed),
        make_template(workdir / "wal", with_wal=True, seed=seed + 1),
    ]
    for template in templates:
        (template.folder / "model.json").write_text(json.dumps(template.allowed))
    report = CorruptionReport()
    worker: TrialWorker | None = None
    try:
        for trial in range(count):
            template = rng.choice(templates)
            folder = workdir / "trial"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(template.folder, folder, ignore=shutil.ignore_patterns("*.json"))
            path = folder / template.name
            kind, what = damage(path, template, rng)
            report.damage[kind] = report.damage.get(kind, 0) + 1
            strict = rng.random() < 0.2
            job = {
                "path": str(path),
                "model": str(template.folder / "model.json"),
                "strict": strict,
                "seed": rng.getrandbits(32),
            }
            worker = worker or TrialWorker(workdir)
            result = worker.run(job, timeout=120)
            report.files += 1
            label = f"{'wal' if template.with_wal else 'clean'} copy, {what}, strict={strict}"
            if isinstance(result, str):
                report.crashed += result.startswith("crashed")
                report.hung += result == "hung"
                add_detail(report.details, f"{label}: {result}")
                worker.close()
                worker = None
                shutil.copytree(folder, workdir / f"failed-{trial}", dirs_exist_ok=True)
                continue
            _merge_trial(report, result, label)
            if progress is not None and (trial + 1) % 100 == 0:
                progress(f"corruptions: {trial + 1}/{count}, failures so far {report.failures}")
    finally:
        if worker is not None:
            worker.close()
    return report
