"""End to end: a route with a shadow model. A study sent by DCMTK storescu comes back to
Orthanc with the live model's SR and heatmaps alone; the shadow model (a new version of it)
analyses the study after them, in the node's own worker, and ``acwi-node monitor`` compares
the two."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import ShadowJob, ShadowState
from models.data.synth import write_study
from tests.e2e.test_study_roundtrip import check_results, node_config, orthanc, send_study
from tests.support.model_variant import model_variant
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.e2e
__all__ = ["orthanc"]  # the fixture


def test_a_shadow_model_analyses_and_sends_nothing(tmp_path: Path, orthanc: OrthancServer) -> None:
    cfg = node_config(tmp_path, orthanc)
    challenger = model_variant(tmp_path / "challenger", version="1.2.0-rc1")
    cfg["models"] = [{"name": "challenger", "manifest": str(challenger)}]
    cfg["routes"][0]["shadow_models"] = ["challenger"]
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study",
        n_images=2,
        label="nodule",
        site=1,
        seed=11,
        study_instance_uid=study_uid,
    )
    data = tmp_path / "data"
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        # one SR and a heatmap per image in the PACS: the live model's, nothing of the shadow's
        live = check_results(orthanc, ledger, study_uid, files, tmp_path)
        written = sorted(p.name for p in (data / "results" / study_uid).iterdir())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with ledger.session() as s:
                rows = s.scalars(select(ShadowJob)).all()
                states = [r.state for r in rows]
                summaries = [r.summary for r in rows]
            if states and all(st in (ShadowState.DONE, ShadowState.FAILED) for st in states):
                break
            nodes.assert_alive()
            time.sleep(0.25)
        assert states == [ShadowState.DONE]
        assert summaries[0]["model"]["version"] == "1.2.0-rc1"
        assert len(summaries[0]["images"]) == 2
        assert live["model"]["version"] == "1.1.0"
        monitor = subprocess.run(
            [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "monitor", "--json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        (report,) = json.loads(monitor.stdout)["shadow"]
        assert report["route"] == "chest" and report["studies"] == 1
        assert report["live"]["version"] == "1.1.0" and report["shadow"]["version"] == "1.2.0-rc1"
        assert report["label_agreement"] == 1.0  # the same weights
        ledger.dispose()
    # the shadow analysis wrote nothing: the results are the live model's alone
    assert sorted(p.name for p in (data / "results" / study_uid).iterdir()) == written
