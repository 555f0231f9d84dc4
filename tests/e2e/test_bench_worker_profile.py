"""bench.worker_profile runs the analyse task on a small synthetic CT in a fresh process and
reports where its time went, stage by stage (no figure is asserted beyond its being measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.worker_profile import STAGES, main

pytestmark = pytest.mark.e2e


def test_the_worker_profile_bench_reports_each_stage(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    assert main(["--slices", "3", "--size", "64", "--studies", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]["3"]
    assert run["total"] > 0 and run["model"] > 0 and run["sr"] > 0 and run["heatmaps"] > 0
    assert run["total"] >= sum(run[s] for s in STAGES if s not in ("total", "gc")) * 0.99
    assert set(report["medians"]["3"]) == {*STAGES, "collections"}
