"""End to end: a study sent by DCMTK storescu comes back as an SR and heatmaps stored by STOW-RS
in a DICOMweb service (Orthanc's DICOMweb plugin, HTTP Basic authentication on), and
``acwi-node destinations check`` queries that service."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.e2e.test_study_roundtrip import check_results, node_config, send_study
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

USER = ("acwi", "web-s3cret")


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    with OrthancServer(node_ae="ACWI", node_port=free_port(), http_user=USER) as server:
        server.require_dicomweb()
        yield server


def test_results_reach_a_dicomweb_service(tmp_path: Path, orthanc: OrthancServer) -> None:
    password = tmp_path / "dicomweb-password"
    password.write_text(USER[1] + "\n")
    cfg = node_config(tmp_path, orthanc)
    cfg["destinations"] = [
        {
            "name": "pacs-web",
            "url": f"{orthanc.url}/dicom-web",
            "username": USER[0],
            "password_file": str(password),
        }
    ]
    cfg["routes"][0]["destinations"] = ["pacs-web"]
    config = write_config(tmp_path / "acwi.toml", cfg)
    checked = subprocess.run(
        [sys.executable, "-m", "acwi_node.cli", "--config", str(config)]
        + ["destinations", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (row,) = json.loads(checked.stdout)
    assert (row["name"], row["kind"], row["ok"]) == ("pacs-web", "dicomweb", True)
    assert USER[1] not in checked.stdout + checked.stderr

    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study", n_images=2, label="nodule", site=0, seed=5, study_instance_uid=study_uid
    )
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        summary = check_results(orthanc, ledger, study_uid, files, tmp_path)
        assert len(summary["images"]) == 2
        ledger.dispose()
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert USER[1] not in logs
