"""bench.turnaround runs end to end on one study of each kind: the JSON holds the figures and
where the time went, stage by stage (no speed is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.turnaround import STAGES, main
from tests.support.dcmtk import require_dcmtk_tool
from tests.support.orthanc import require_orthanc

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_the_turnaround_bench_reports_each_stage(tmp_path: Path) -> None:
    require_dcmtk_tool("storescu")
    require_orthanc()
    out = tmp_path / "turnaround.json"
    assert main(["--dx", "1", "--ct", "1", "--ct-slices", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["DX 1 image", "CT 3 slices"]
    assert list(report["stages"]) == ["DX 1 image", "CT 3 slices"]
    for name, figures in report["results"].items():
        assert figures["n"] == 1 and figures["p50"] > 0
        stages = report["stages"][name]
        assert list(stages) == list(STAGES)
        assert all(seconds >= 0 for seconds in stages.values()), stages
        assert stages["analysis"] > 0
        # The stages run from the last instance stored, a moment before the sender's exit.
        assert sum(stages.values()) == pytest.approx(figures["p50"], abs=2.0)


@pytest.mark.parametrize("signal", ["mpps", "release"])
def test_the_turnaround_bench_completes_studies_by_the_signal_asked_for(
    tmp_path: Path, signal: str
) -> None:
    """With ``--signal`` the quiet period is an hour: a study delivered within the bench's
    timeout was completed by the modality's MPPS COMPLETED or the sender's release, nothing
    else (the completion stage is checked against the hour, not timed)."""
    require_dcmtk_tool("storescu")
    require_orthanc()
    out = tmp_path / "turnaround.json"
    argv = ["--dx", "1", "--ct", "1", "--ct-slices", "3", "--signal", signal]
    assert main([*argv, "--timeout", "120", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["args"]["signal"] == signal
    assert list(report["results"]) == ["DX 1 image", "CT 3 slices"]
    for stages in report["stages"].values():
        assert stages["complete"] < 120  # not the quiet period (an hour)


def test_the_turnaround_bench_can_send_the_results_by_stow_rs(tmp_path: Path) -> None:
    require_dcmtk_tool("storescu")
    require_orthanc()
    out = tmp_path / "turnaround.json"
    assert main(["--dx", "1", "--ct", "0", "--dicomweb", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["args"]["dicomweb"] is True
    assert report["results"]["DX 1 image"]["n"] == 1


def test_the_turnaround_bench_can_send_the_studies_by_stow_rs(tmp_path: Path) -> None:
    """``--sender stow``: each study goes to the node's web process by STOW-RS; with the
    quiet period an hour, the modality's MPPS COMPLETED completes what STOW-RS stored."""
    require_orthanc()
    out = tmp_path / "turnaround.json"
    argv = ["--dx", "1", "--ct", "1", "--ct-slices", "3", "--sender", "stow", "--signal", "mpps"]
    assert main([*argv, "--timeout", "120", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["args"]["sender"] == "stow"
    assert list(report["results"]) == ["DX 1 image", "CT 3 slices"]
    for stages in report["stages"].values():
        assert stages["complete"] < 120
    with pytest.raises(SystemExit):  # a STOW-RS request is no association that ends a study
        main(["--sender", "stow", "--signal", "release"])
