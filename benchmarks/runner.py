"""Runs workloads over the stores in rotated order and keeps the medians."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.stores import STORES, VyreStore, make_store, store_available
from benchmarks.workloads import WORKLOADS, Config, Fixtures, Sample

Progress = Callable[[str], None]


def rotated(stores: Sequence[str], round_index: int) -> list[str]:
    """The stores' order in a round: shifted by one each round."""
    shift = round_index % len(stores) if stores else 0
    return [*stores[shift:], *stores[:shift]]


def settle() -> None:
    """Write back every dirty page now, untimed.

    Populating a store leaves hundreds of MB for the kernel to write back; its
    flusher threads would otherwise take a core (of two here) from whatever is
    timed next.
    """
    sync = getattr(os, "sync", None)
    if sync is not None:
        sync()


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Median of the rounds' values (and of each extra figure)."""
    extra_keys = sorted({key for sample in samples for key in sample.extra})
    return {
        "median": statistics.median(sample.value for sample in samples),
        "rounds": [sample.value for sample in samples],
        **{
            key: statistics.median(sample.extra[key] for sample in samples if key in sample.extra)
            for key in extra_keys
        },
    }


def run(config: Config, workloads: Sequence[str], progress: Progress) -> dict[str, Any]:
    """Run ``workloads`` and return the results document (see ``report``)."""
    stores = [name for name in config.stores if name in STORES]
    unavailable = {name: why for name in stores if (why := store_available(name))}
    stores = [name for name in stores if name not in unavailable]
    fixtures = Fixtures(config)
    results: dict[str, Any] = {}
    for workload_name in workloads:
        workload = WORKLOADS[workload_name](config, fixtures)
        names = [
            name for name in stores if workload.only_stores is None or name in workload.only_stores
        ]
        cases: dict[str, dict[str, Any]] = {}
        for case in workload.cases():
            tag = f"{workload.name} [{case.label}]"
            states: dict[str, Any] = {}
            errors: dict[str, str] = {}
            for name in names:
                progress(f"{tag} preparing {name}")
                try:
                    states[name] = workload.prepare(name, case)
                except Exception as error:  # reported, the run goes on
                    errors[name] = _describe(error)
                    progress(f"{tag} {name} FAILED: {errors[name]}")
            samples: dict[str, list[Sample]] = {name: [] for name in names}
            rounds = config.rounds if workload.repeat else 1
            for round_index in range(rounds):
                for name in rotated(names, round_index):
                    if name in errors:
                        continue
                    settle()
                    try:
                        sample = workload.measure(name, case, states[name], round_index)
                    except Exception as error:
                        errors[name] = _describe(error)
                        progress(f"{tag} {name} FAILED: {errors[name]}")
                        continue
                    samples[name].append(sample)
                    progress(
                        f"{tag} round {round_index + 1}/{rounds} {name}: "
                        f"{sample.value:.4g} {workload.unit}"
                    )
            cases[case.label] = {
                name: {"error": errors[name]} if name in errors else summarize(samples[name])
                for name in names
            }
        results[workload.name] = {
            "title": workload.title,
            "unit": workload.unit,
            "better": workload.better,
            "headline": workload.headline,
            "description": workload.description,
            "stores": names,
            "cases": cases,
        }
    return {
        "meta": environment(config, workloads, unavailable),
        "stores": {name: STORES[name].notes for name in stores},
        "results": results,
        "fixture_populate_times": fixtures.timings,
    }


def _describe(error: Exception) -> str:
    """One line naming the error and where it came from."""
    frame = traceback.extract_tb(error.__traceback__)[-1:]
    where = f" at {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
    return f"{type(error).__name__}: {error}{where}"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def filesystem(path: Path) -> str:
    """Type of the filesystem holding ``path`` (Linux ``/proc/mounts``)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                mount_point = fields[1]
                inside = resolved == mount_point or resolved.startswith(
                    mount_point.rstrip("/") + "/"
                )
                if inside and len(mount_point) >= len(best):
                    best, kind = mount_point, fields[2]
    except OSError:
        pass
    return kind


def key_derivation_matches(config: Config) -> bool | None:
    """Whether the port's BLAKE3 entry key equals the package's (None: no package)."""
    if store_available("vyre-sqlcache"):
        return None
    store = make_store("vyre-sqlcache", config.workdir, config.fingerprint)
    assert isinstance(store, VyreStore)
    port = config.fingerprint.port()
    digests = [bytes([i]) * 32 for i in range(4)]
    return all(store.cache_key(d) == port.cache_key(d) for d in digests)


def environment(
    config: Config, workloads: Sequence[str], unavailable: dict[str, str]
) -> dict[str, Any]:
    """Machine, interpreter and library versions, and the run's settings."""
    try:
        import apsw

        sqlite_version: str | None = apsw.sqlite_lib_version()
        apsw_version: str | None = apsw.apsw_version()
    except ImportError:
        sqlite_version = apsw_version = None
    package = sys.modules.get("vyre_sqlcache")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite_version,
        "apsw": apsw_version,
        "versions": {
            "vyre-sqlcache": _version("vyre-sqlcache") or getattr(package, "__version__", None),
            "diskcache": _version("diskcache"),
            "lmdb": _version("lmdb"),
            "blake3": _version("blake3"),
            "matplotlib": _version("matplotlib"),
        },
        "workdir": str(config.workdir),
        "workdir_filesystem": filesystem(config.workdir),
        "key_derivation_matches_vyre": key_derivation_matches(config),
        "unavailable_stores": unavailable,
        "settings": {
            "workloads": list(workloads),
            "stores": list(config.stores),
            "sizes": list(config.sizes),
            "n": config.n,
            "rounds": config.rounds,
            "quick": config.quick,
            "tiny": config.tiny,
            "seed": config.seed,
            "cold_cases": [list(case) for case in config.cold_cases],
            "durable_writes": config.durable_writes,
            "subprocess_runs": config.subprocess_runs,
            "open_entries": config.open_entries,
            "scale_counts": list(config.scale_counts),
            "scale_sample": config.scale_sample,
            "memory_blob": config.memory_blob,
        },
    }
