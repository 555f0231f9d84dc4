"""End to end: a study already in the PACS, retrieved on request (``acwi-node studies retrieve``),
comes back to the PACS as a TID 1500 SR and heatmaps.

The node runs as ``serve``; Orthanc holds the study and knows the node as a modality. The quiet
period is an hour: only the end of the C-MOVE can complete the study.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.e2e.test_study_roundtrip import check_results, node_config, orthanc  # noqa: F401
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.e2e


def test_a_study_retrieved_from_the_pacs_is_analysed_and_answered(
    tmp_path: Path,
    orthanc: OrthancServer,  # noqa: F811
) -> None:
    cfg = node_config(tmp_path, orthanc)
    cfg["completion"] = {"quiet_period_s": 3600, "max_wait_s": 3600}
    cfg["sources"] = [
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    ]
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study", n_images=2, label="nodule", site=1, seed=11,
        study_instance_uid=study_uid, accession_number="RQE2E1",
    )  # fmt: skip
    for path in files:  # in the PACS before the node ever saw it
        orthanc.client.post("/instances", content=path.read_bytes()).raise_for_status()
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        cli = [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "studies"]
        retrieve = subprocess.run(
            [*cli, "retrieve", "pacs", "--accession", "RQE2E1", "--wait", "120"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert retrieve.returncode == 0, retrieve.stdout + retrieve.stderr + nodes.log_text()
        assert "done" in retrieve.stdout and "2 instance(s)" in retrieve.stdout
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        check_results(orthanc, ledger, study_uid, files, tmp_path)
        st = ledger.get_study(study_uid)
        assert st is not None and st["calling_ae"] == orthanc.aet  # sent by the PACS
        listing = subprocess.run(
            [*cli, "retrievals", "--json"], capture_output=True, text=True, timeout=60, check=True
        )
        (retrieval,) = json.loads(listing.stdout)
        assert retrieval["study_uids"] == [study_uid]
        assert (retrieval["state"], retrieval["instances_completed"]) == ("done", 2)
        ledger.dispose()
    audit = (tmp_path / "data" / "audit" / "audit.jsonl").read_text()
    queried = [json.loads(line) for line in audit.splitlines() if "studies_queried" in line]
    assert [r["study_uids"] for r in queried] == [[study_uid]]
