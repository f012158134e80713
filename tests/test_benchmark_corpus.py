"""The corpus benchmark (`python -m benchmarks.corpus`) runs end to end on a few kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("zstandard")
pytest.importorskip("diskcache")

from benchmarks import corpus


@pytest.mark.skipif(not corpus.DEFAULT_TARBALL.is_file(), reason="no shared/corpus here")
def test_the_corpus_benchmark_runs_on_a_few_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        corpus.main(
            ["--kernels", "4", "--rounds", "1", "--workdir", str(tmp_path), "--out", str(out)]
        )
        == 0
    )
    results = json.loads((out / "corpus.json").read_text())
    files = results["sets"]["files"]["stores"]
    assert set(files) == set(corpus.STORES)
    assert files["vyre-auto"]["totals"]["ratio"] > 2
    assert files["vyre-auto"]["disk_bytes"] < files["vyre-off"]["disk_bytes"]
    assert "## kernels" in capsys.readouterr().out
