"""A PACS that is down for a while (a restart, maintenance): the exporter keeps its results
pending without counting the attempts (``exporter.outage_patience_s``) and delivers them once
the real Orthanc is back; with no patience, they fail after ``max_attempts`` as before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pynetdicom import StoragePresentationContexts, evt
from sqlalchemy import select

from acwi_node.config import Settings
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Notification
from acwi_node.ledger.trace import study_trace
from acwi_node.notify import queue_events
from acwi_node.observability.metrics import ledger_registry
from acwi_node.review.store import ReviewStore
from acwi_node.tasks.analyse import run_job
from acwi_node.web.api import create_app
from models.data.synth import write_study
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port
from tests.support.review_case import add_user, review_settings, sign_in, store_and_route
from tests.support.scripted_scp import ScriptedScp

pytestmark = pytest.mark.integration

SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    require_orthanc()
    with OrthancServer(node_ae="ACWI", node_port=free_port()) as server:
        yield server


def _node(
    tmp_path: Path, orthanc: OrthancServer | None, patience: float, *, pacs_port: int = 0
) -> tuple[Settings, Ledger]:
    settings = review_settings(
        tmp_path,
        pacs_ae=orthanc.aet if orthanc else "SCRIPTED",
        pacs_port=orthanc.dicom_port if orthanc else pacs_port,
        notify=[
            {
                "name": "pacs-team",
                "url": "http://127.0.0.1:9/",
                "events": ["unreachable"],
                "min_outage_s": 0,
            }
        ],  # fmt: skip
        exporter={
            "timeout_s": 5,
            "max_attempts": 1,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.1,
            "outage_patience_s": patience,
        },
    )
    return settings, Ledger(settings.database_url)


def _analysed(settings: Settings, ledger: Ledger, tmp_path: Path) -> str:
    files = write_study(tmp_path / "study", n_images=1, label="nodule", seed=5, size=128)
    job_id, uid = store_and_route(settings, ledger, files)
    assert run_job(settings, ledger, job_id) == "analysed"
    return uid


def _deliveries(ledger: Ledger, uid: str) -> list[dict[str, object]]:
    view = ledger.get_study(uid)
    assert view is not None
    return [d for j in view["jobs"] for r in j["results"] for d in r["deliveries"]]


def _unreachable_count() -> float:
    labels = {"destination": "pacs", "outcome": "unreachable"}
    return REGISTRY.get_sample_value("acwi_exporter_delivery_attempts_total", labels) or 0.0


def test_results_wait_out_a_pacs_restart_and_are_delivered_once_it_is_back(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    settings, ledger = _node(tmp_path, orthanc, patience=3600)
    try:
        uid = _analysed(settings, ledger, tmp_path)
        exporter = Exporter(settings, ledger)
        orthanc.halt()
        before = _unreachable_count()
        for _ in range(3):  # max_attempts is 1: without the patience, the first one failed
            exporter.tick()
            time.sleep(0.15)
        deliveries = _deliveries(ledger, uid)
        assert deliveries and all(d["state"] == "pending" for d in deliveries), deliveries
        assert all(d["attempts"] == 0 and d["outage_attempts"] == 3 for d in deliveries)
        assert all(d["unreachable_since"] for d in deliveries)
        assert _unreachable_count() == before + 3 * len(deliveries)
        view = ledger.get_study(uid)
        assert view is not None and view["state"] == "exporting"
        trace = study_trace(ledger, uid)
        assert trace is not None
        assert any("pacs unreachable since" in e.text for e in trace.events), trace.events
        (outbox,) = ReviewStore(ledger).delivery_status(["pacs"])  # the dashboard's row
        assert outbox["unreachable_since"] and outbox["pending"] == len(deliveries)
        # told once per outage, however often the ledger is read; Prometheus has its length
        assert queue_events(settings, ledger) == 1 and queue_events(settings, ledger) == 0
        with ledger.session() as s:
            (note,) = s.scalars(select(Notification)).all()
            assert note.event == "unreachable" and note.payload["destination"] == "pacs"
            assert note.payload["waiting"] == len(deliveries)
            assert "pacs cannot be reached since" in note.payload["text"]
        gauge = ("acwi_destination_unreachable_seconds", {"destination": "pacs"})
        assert (ledger_registry(settings, ledger).get_sample_value(*gauge) or -1) >= 0
        add_user(ledger, "boss", "admin")
        with TestClient(create_app(settings, ledger)) as client:
            sign_in(client, "boss")
            dashboard = client.get("/review/dashboard").text
            assert '<strong class="outage">unreachable since' in dashboard

        orthanc.resume()
        time.sleep(0.15)
        exporter.tick()
        view = ledger.get_study(uid)
        assert view is not None and view["state"] == "delivered", _deliveries(ledger, uid)
        assert all(d["outage_attempts"] == 0 for d in _deliveries(ledger, uid))
        (outbox,) = ReviewStore(ledger).delivery_status(["pacs"])
        assert outbox["unreachable_since"] is None and outbox["pending"] == 0
        assert ledger_registry(settings, ledger).get_sample_value(*gauge) is None
        classes = [
            str(orthanc.instance_tags(i["ID"]).get("SOPClassUID", ""))
            for i in orthanc.study_instances(uid)
        ]
        assert SR in classes
    finally:
        ledger.dispose()


def test_without_patience_an_outage_fails_the_delivery_after_max_attempts(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    settings, ledger = _node(tmp_path, orthanc, patience=0)
    try:
        uid = _analysed(settings, ledger, tmp_path)
        orthanc.halt()
        Exporter(settings, ledger).tick()
        view = ledger.get_study(uid)
        assert view is not None and view["state"] == "failed"
        assert all(d["attempts"] == 1 for d in _deliveries(ledger, uid))
    finally:
        orthanc.resume()
        ledger.dispose()


STORAGE_CLASSES = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]


def test_a_pacs_that_goes_away_in_the_middle_of_a_delivery_is_an_outage(
    tmp_path: Path,
) -> None:
    """The PACS stores the first result, then stops (a restart) while the second is in
    flight: the second, never answered, and any left wait out the outage without counting
    an attempt (``max_attempts`` is 1: counted, they would have failed); the first is
    delivered and is not sent again once the PACS is back."""
    port = free_port()
    settings, ledger = _node(tmp_path, None, patience=3600, pacs_port=port)
    scps: list[ScriptedScp] = []

    def restarting(index: int, _ds: Dataset, event: evt.Event) -> int:
        if index == 2:
            scps[0].go_away(event)
        return 0x0000

    try:
        uid = _analysed(settings, ledger, tmp_path)
        exporter = Exporter(settings, ledger)
        before = _unreachable_count()
        with ScriptedScp(restarting, sop_classes=STORAGE_CLASSES, port=port) as scp:
            scps.append(scp)
            exporter.tick()
        deliveries = _deliveries(ledger, uid)
        assert len(deliveries) >= 2 and scp.calls == 2
        delivered = [d for d in deliveries if d["state"] == "delivered"]
        waiting = [d for d in deliveries if d["state"] == "pending"]
        assert len(delivered) == 1 and len(waiting) == len(deliveries) - 1, deliveries
        assert all(d["attempts"] == 0 and d["outage_attempts"] == 1 for d in waiting)
        assert all(d["unreachable_since"] for d in waiting)
        assert "a new association" in str(waiting[0]["last_error"])
        assert _unreachable_count() == before + len(waiting)

        time.sleep(0.15)
        with ScriptedScp(lambda *_: 0x0000, sop_classes=STORAGE_CLASSES, port=port) as back:
            exporter.tick()
        assert back.calls == len(waiting)  # the one stored is not sent again
        view = ledger.get_study(uid)
        assert view is not None and view["state"] == "delivered", _deliveries(ledger, uid)
        assert all(d["outage_attempts"] == 0 for d in _deliveries(ledger, uid))
    finally:
        ledger.dispose()
