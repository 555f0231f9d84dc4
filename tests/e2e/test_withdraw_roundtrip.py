"""Withdrawing results, end to end: the bundled Orthanc (its routing script and all) routes a
study to ``acwi-node serve``, gets its SR and heatmaps back; an administrator withdraws them
(``acwi-node studies withdraw``); the exporter sends the rejection note and Orthanc deletes the
results it names, keeping the images and the note."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.e2e.test_study_roundtrip import SC_CLASS, SR_CLASS, node_config
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
NOTE = "analysed by mistake: wrong side"


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    """The production Orthanc configuration with its Lua script: it routes stable studies to
    the node and honours the node's rejection notes."""
    require_orthanc()
    with OrthancServer(node_ae="ACWI", node_port=free_port(), with_lua=True) as server:
        yield server


def classes_in(orthanc: OrthancServer, study_uid: str) -> list[str]:
    if orthanc.find_study(study_uid) is None:
        return []
    return sorted(
        str(orthanc.instance_tags(i["ID"]).get("SOPClassUID", ""))
        for i in orthanc.study_instances(study_uid)
    )


def test_withdrawn_results_leave_the_pacs(tmp_path: Path, orthanc: OrthancServer) -> None:
    cfg = node_config(tmp_path, orthanc)
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study", n_images=2, label="nodule", site=0, seed=21,
        study_instance_uid=study_uid,
    )  # fmt: skip
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        for f in files:  # the modality stores the study in the PACS, which routes it
            orthanc.upload(f)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        try:
            wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
            sources = [str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files]
            assert SC_CLASS not in sources and SR_CLASS not in sources
            orthanc.wait_for(
                lambda: (
                    classes_in(orthanc, study_uid)
                    == sorted([*sources, SR_CLASS, SC_CLASS, SC_CLASS])
                ),
                timeout_s=120,
                message="the 2 images, the SR and 2 heatmaps",
            )

            done = subprocess.run(
                [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "studies"]
                + ["withdraw", study_uid, "--reason", "quality", "--note", NOTE],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            assert "3 object(s) withdrawn, 1 rejection note(s) queued" in done.stdout

            # the exporter sends the note; Orthanc deletes the SR and heatmaps it names
            orthanc.wait_for(
                lambda: classes_in(orthanc, study_uid) == sorted([*sources, KOS_CLASS]),
                timeout_s=120,
                message="the source images and the rejection note, nothing else",
            )
            nodes.assert_alive()
            view = wait_study_state(ledger, study_uid, {"delivered"}, nodes, timeout_s=60)
            assert view["jobs"][0]["withdrawn"]["note"] == NOTE
            trace = subprocess.run(
                [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "studies"]
                + ["show", study_uid],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert "results withdrawn from the PACS by os:" in trace.stdout, trace.stdout
            assert "(1 rejection-note) stored by pacs" in trace.stdout, trace.stdout
        finally:
            ledger.dispose()
