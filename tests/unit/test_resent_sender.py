"""A study a modality sent (MOD1) and the PACS sent again (PACS2) is analysed as the PACS's
(README "Study states", "Who sent a generation"): what describes an analysis or a delivery
of the new generation names PACS2 (its notifications, the model monitoring's site, the
routes' traffic, the review worklist, case, dashboard, agreement and feedback export, the
study pages); the first generation's analysis stays MOD1's, and the study's arrival is
counted as MOD1's. On SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Notification, utcnow
from acwi_node.monitoring.report import ModelMonitor
from acwi_node.monitoring.traffic import TrafficMonitor
from acwi_node.notify import queue_events
from acwi_node.review import auth
from acwi_node.review.feedback import export_feedback
from acwi_node.review.store import ReviewStore, SessionInfo
from acwi_node.web.api import create_app
from tests.support.dx import make_dx
from tests.support.review_case import PASSWORD, flagged_case, sign_in
from tests.support.study_flow import analyse, deliver, receive


def _resent(settings: Settings, ledger: Ledger, study: str = "1.2.3") -> tuple[int, int]:
    """MOD1 sends the study, analysed and delivered; PACS2 sends its instance again: the
    second generation analysed, on the worklist. Returns the two jobs."""
    receive(settings, ledger, study, f"{study}.1", ae="MOD1")
    first = analyse(settings, ledger, study)
    deliver(ledger)
    receive(settings, ledger, study, f"{study}.1", ae="PACS2")
    second = analyse(settings, ledger, study, needs_review=True)
    view = ledger.get_study(study)
    assert view is not None and view["generation"] == 2
    assert (view["calling_ae"], view["generation_calling_ae"]) == ("MOD1", "PACS2")
    return first, second


def test_notifications_name_the_generations_sender(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    base, ledger = ledger_node
    settings = load_settings(
        None,
        node={"data_dir": base.data_dir, "database_url": base.database_url},
        ingest={"fsync": False},
        notify=[
            {"name": "pager", "url": "https://hooks.example.org/x",
             "events": ["review", "finding", "failed"], "labels": ["nodule"]},
        ],
    )  # fmt: skip
    _first, second = _resent(settings, ledger)
    queue_events(settings, ledger)
    assert ledger.fail_job(second, "the model cannot read this image")
    queue_events(settings, ledger)
    with ledger.session() as s:
        payloads = {n.payload["event"]: n.payload for n in s.scalars(select(Notification))}
    # the first generation's finding (MOD1's) and the second's review item, finding, failure
    assert sorted(payloads) == ["failed", "finding", "review"]
    for event in ("review", "failed"):
        payload = payloads[event]
        assert (payload["calling_ae"], payload["first_calling_ae"]) == ("PACS2", "MOD1")
        assert " DX from PACS2" in payload["text"], payload["text"]
    with ledger.session() as s:
        findings = sorted(
            (n.key, n.payload["calling_ae"], n.payload["text"])
            for n in s.scalars(select(Notification)) if n.payload["event"] == "finding"
        )  # fmt: skip
    assert [(ae, "a DX from " + ae in text) for _k, ae, text in findings] == [
        ("MOD1", True),
        ("PACS2", True),
    ]


def test_model_monitoring_and_the_routes_traffic_name_the_generations_sender(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    first, second = _resent(settings, ledger)
    samples = ModelMonitor(ledger, settings.monitoring)._samples()
    # the study's latest analysis counts (once per model version): the PACS's
    assert [(s.job_id, s.site) for s in samples] == [(second, "PACS2")]

    now = utcnow()
    counts = TrafficMonitor(ledger, settings.monitoring, routes=["chest"])._counts(
        now - dt.timedelta(hours=1), now + dt.timedelta(seconds=1)
    )
    # the study arrived once, from MOD1; each generation's job is its own sender's
    assert {k: n for k, n in counts.items() if k[0] in ("node", "source")} == {
        ("node", "all"): 1,
        ("source", "MOD1"): 1,
    }
    assert counts["path", "MOD1 -> chest"] == 1 and counts["path", "PACS2 -> chest"] == 1
    assert counts["route", "chest"] == 1  # one study, however many senders


def test_the_review_store_names_the_generation_the_model_read(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    _first, second = _resent(settings, ledger)
    store = ReviewStore(ledger)
    found = store.worklist()
    ((item,),) = [found["items"]]
    assert item["calling_ae"] == "PACS2" and found["counts"]["calling_ae"] == {"PACS2": 1}
    assert [i["calling_ae"] for i in ledger.worklist()] == ["PACS2"]
    case = store.case(item["id"])
    assert case is not None
    assert (case["calling_ae"], case["first_calling_ae"]) == ("PACS2", "MOD1")

    # received once, by its first sender; each analysis under its generation's sender
    rows = {r["calling_ae"]: r for r in store.dashboard()["rows"]}
    assert {ae: (r["received"], r["analysed"]) for ae, r in rows.items()} == {
        "MOD1": (1, 1),
        "PACS2": (0, 1),
    }

    user = store.add_user("jane", "x", "radiologist")
    jane = SessionInfo(user.id, user.name, user.role, "", utcnow())
    store.claim_verdict(
        item["id"], user=jane, action="confirm", label="nodule", model_label="nodule", reason=""
    )
    assert [d["calling_ae"] for d in store.decided()] == ["PACS2"]
    (row,) = store.agreement()
    assert [site for site, *_ in row["sites"]] == ["PACS2"]
    assert [c["calling_ae"] for c in store.reviewed_cases()] == ["PACS2"]

    assert ledger.fail_job(second, "the model cannot read this image")
    assert [(f["study_uid"], f["calling_ae"]) for f in store.failed_studies()] == [
        ("1.2.3", "PACS2")
    ]


def test_the_feedback_export_gives_each_generations_rows_its_senders_site(
    tmp_path: Path,
) -> None:
    """A case MOD1's study made, reviewed; the PACS sends the image again, and its case is
    reviewed too: each row is its own generation's sender's, each sender its own site."""
    settings = load_settings(None, node={"data_dir": tmp_path / "data"}, ingest={"fsync": False})
    ledger = Ledger(settings.database_url)
    try:
        ds = make_dx("1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.2", 1)
        sop = str(ds.SOPInstanceUID)
        summary = {
            "model": {"name": "m", "version": "1"},
            "labels": ["normal", "nodule"],
            "probabilities": {"normal": 0.4, "nodule": 0.6},
            "predicted_label": "nodule",
            "needs_review": True,
            "images": [{"sop_instance_uid": sop}],
        }
        store = ReviewStore(ledger)
        user = store.add_user("jane", "x", "radiologist")
        jane = SessionInfo(user.id, user.name, user.role, "", utcnow())
        for ae, label in (("MOD1", "nodule"), ("PACS2", "normal")):
            item = flagged_case(settings, ledger, ds, summary, calling_ae=ae)
            store.claim_verdict(
                item, user=jane, action="override" if label == "normal" else "confirm",
                label=label, model_label="nodule", reason="r",
            )  # fmt: skip
        view = ledger.get_study(str(ds.StudyInstanceUID))
        assert view is not None and view["generation"] == 2

        out = tmp_path / "feedback"
        assert export_feedback(settings, ledger, out, deidentify=False).images == 2
        with (out / "labels.csv").open(newline="") as fh:
            rows = [(r["calling_ae"], r["site"], r["label"]) for r in csv.DictReader(fh)]
        assert sorted(rows) == [("MOD1", "0", "nodule"), ("PACS2", "1", "normal")]
    finally:
        ledger.dispose()


def test_the_review_pages_name_the_generations_sender_and_the_first(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        review={"cookie_secure": False},
    )
    ledger = Ledger(settings.database_url)
    store = ReviewStore(ledger)
    store.add_user("jane", auth.hash_password(PASSWORD), "radiologist")
    ds = make_dx("1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.2", 1)
    summary = {"model": {"name": "m", "version": "1"}, "labels": ["normal", "nodule"],
               "probabilities": {"normal": 0.4, "nodule": 0.6}, "predicted_label": "nodule",
               "needs_review": True, "images": []}  # fmt: skip
    flagged_case(settings, ledger, ds, summary, calling_ae="MOD1")
    item = flagged_case(settings, ledger, ds, summary, calling_ae="PACS2")
    uid = str(ds.StudyInstanceUID)
    try:
        with TestClient(create_app(settings, ledger)) as c:
            sign_in(c, "jane")
            both = "PACS2 (first sent by MOD1)"
            case = c.get(f"/review/cases/{item}")
            assert f"DX from {both}</dd>" in case.text
            api = c.get(f"/api/review/cases/{item}").json()
            assert (api["calling_ae"], api["first_calling_ae"]) == ("PACS2", "MOD1")
            assert f"<dt>Sent by</dt><dd>{both}</dd>" in c.get(f"/review/studies/{uid}").text
            assert f"<td>{both}</td>" in c.get("/review/studies").text
            assert "<td>PACS2</td>" in c.get("/review/worklist").text
    finally:
        ledger.dispose()
