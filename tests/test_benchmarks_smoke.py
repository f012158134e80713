"""Smoke test of the benchmark suite: a --tiny run, then the report's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diskcache")
pytest.importorskip("lmdb")
pytest.importorskip("matplotlib")

from benchmarks.__main__ import main
from benchmarks.stores import STORES
from benchmarks.workloads import WORKLOADS


def test_tiny_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "work"
    argv = ["--tiny", "--sizes", "4KiB", "--rounds", "2", "--out", str(out)]
    assert main([*argv, "--workdir", str(work)]) == 0

    doc = json.loads((out / "benchmarks.json").read_text(encoding="utf-8"))
    assert doc["meta"]["key_derivation_matches_vyre"] is True
    assert doc["meta"]["sqlite"]
    assert list(doc["results"]) == list(WORKLOADS)
    for name, workload in doc["results"].items():
        expected = WORKLOADS[name].only_stores or tuple(STORES)
        assert workload["stores"] == [store for store in STORES if store in expected]
        assert workload["cases"], name
        for label, by_store in workload["cases"].items():
            assert list(by_store) == workload["stores"], (name, label)
            for store, figures in by_store.items():
                assert "error" not in figures, (name, label, store, figures)
                assert figures["median"] > 0, (name, label, store)
                rounds = 1 if name == "disk_usage" else 2
                assert len(figures["rounds"]) == rounds, (name, label, store)
            peers = {store for store in workload["stores"] if store != "vyre-sqlcache"}
            assert set(doc["ratios"][name][label]) == peers, (name, label)

    markdown = (out / "benchmarks.md").read_text(encoding="utf-8")
    assert "SQLite" in markdown
    for name in WORKLOADS:
        assert f"`{name}`" in markdown
    assert (out / "benchmarks.png").read_bytes().startswith(b"\x89PNG")
    assert list(work.iterdir()) == []  # the run removed its stores
