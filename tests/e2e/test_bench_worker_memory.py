"""bench.worker_memory runs the analyse task on small CT series in fresh processes and reports
what each adds to the loaded worker (no figure is asserted beyond its being measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.worker_memory import main

pytestmark = pytest.mark.e2e


def test_the_worker_memory_bench_reports_each_series(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    assert main(["--slices", "2,6", "--size", "64", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["slices"] for r in report["results"]] == [2, 6]
    for r in report["results"]:
        assert r["baseline_mib"] > 100  # the model and its libraries are loaded
        assert r["peak_above_baseline_mib"] >= 0 and r["seconds"] > 0
    assert report["marginal_mib_per_slice"] is not None
    assert report["machine"]["cpus"] >= 1


def test_the_bench_sends_a_series_as_one_multi_frame_image(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    assert main(["--slices", "3", "--size", "64", "--enhanced", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["enhanced"] is True and result["slices"] == 3
