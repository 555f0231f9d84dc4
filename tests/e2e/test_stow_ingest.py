"""End to end: a PACS sends a study by DICOMweb (Orthanc's DICOMweb client, STOW-RS to
``/dicomweb/studies`` with a ``sender`` account); the node analyses it and its SR and heatmaps
come back to the PACS, as for a study sent by C-STORE."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.e2e.test_study_roundtrip import check_results, node_config
from tests.support.node import (
    NodeProcesses,
    add_api_user,
    wait_port,
    wait_study_state,
    write_config,
)
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

SENDER = ("pacs-web", "stow-s3cret-password")


def test_a_study_sent_by_stow_rs_comes_back_analysed(tmp_path: Path) -> None:
    with OrthancServer(node_ae="ACWI", node_port=free_port()) as orthanc:
        orthanc.require_dicomweb()
        cfg = node_config(tmp_path, orthanc)
        config = write_config(tmp_path / "acwi.toml", cfg)
        add_api_user(config, SENDER, role="sender")
        study_uid = generate_uid()
        files = write_study(tmp_path / "study", n_images=2, seed=9, study_instance_uid=study_uid)
        study_id = ""
        for f in files:
            study_id = orthanc.upload(f)["ParentStudy"]
        with NodeProcesses(config, ["serve"], tmp_path) as nodes:
            port = cfg["node"]["http_port"]
            wait_port("127.0.0.1", port)
            orthanc.client.put(
                "/dicom-web/servers/acwi",
                json={
                    "Url": f"http://127.0.0.1:{port}/dicomweb/",
                    "Username": SENDER[0],
                    "Password": SENDER[1],
                },
            ).raise_for_status()
            sent = orthanc.post_json(
                "/dicom-web/servers/acwi/stow", {"Resources": [study_id], "Synchronous": True}
            )
            assert sent is not None
            ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
            wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
            view = ledger.get_study(study_uid)
            assert view is not None and view["calling_ae"] == SENDER[0][:16]
            summary = check_results(orthanc, ledger, study_uid, files, tmp_path)
            assert len(summary["images"]) == 2
            ledger.dispose()
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
        assert SENDER[1] not in logs
        assert "PHANTOM" not in logs  # no patient name in any log line
