"""bench.stow runs end to end on a few instances: Orthanc's DICOMweb plugin and the node's
STOW-RS take them all, in rounds of alternating order, and the JSON holds every round (no speed
is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.stow import main

pytestmark = pytest.mark.e2e


def test_the_stow_bench_runs_and_writes_every_round(tmp_path: Path) -> None:
    out = tmp_path / "stow.json"
    code = main(["--ct", "2", "--small", "7", "--per-request", "3", "--repeat", "2",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["set"] for r in report["results"]] == ["2 CT 512x512x16", "7 small"]
    for result in report["results"]:
        assert len(result["rounds"]) == 2
        for measured in result["rounds"]:
            assert set(measured) == {"orthanc", "node"}
            assert all(v > 0 for v in measured.values())


def test_the_stow_bench_sends_over_several_connections(tmp_path: Path) -> None:
    """``--connections 3``: seven objects split over three connections at once, every one
    stored in each target (measure checks the counts)."""
    out = tmp_path / "stow.json"
    code = main(["--ct", "0", "--small", "7", "--per-request", "2", "--connections", "3",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["args"]["connections"] == 3
    (result,) = report["results"]
    assert all(v > 0 for v in result["rounds"][0].values())
