"""The layer benchmark (`python -m benchmarks.layers`) runs end to end on a few keys."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import layers


def test_the_layer_benchmark_runs_on_a_few_keys(tmp_path: Path) -> None:
    out = tmp_path / "layers.json"
    assert layers.main(["--count", "200", "--rounds", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["direct_us"] > 0 and figures["layer_us"] > 0
    assert abs(figures["ratio"] - figures["layer_us"] / figures["direct_us"]) < 0.02
    assert [len(figures["all"][mode]) for mode in ("direct", "layer")] == [2, 2]
