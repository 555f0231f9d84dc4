"""The review web app over HTTP (FastAPI TestClient) against a real ledger and real results.

Cases are synthetic studies analysed by the real analyse task; verdicts write real verified SRs;
one test sends the verified SR to a real Orthanc through the exporter.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from acwi_node.audit import audit_file, close_audit, configure_audit
from acwi_node.cli import build_parser
from acwi_node.config import BurnedInRegions, Settings
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import AuditEvent, Delivery, Result, Verdict
from acwi_node.results.heatmap import MAX_ALPHA, colour_map
from acwi_node.results.sr import summarise_sr
from acwi_node.review.commands import run as run_review_command
from acwi_node.review.feedback import ExportError, export_feedback
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from models.data.dicom_dataset import read_boxes, scan_folder
from models.data.synth import write_ct_series, write_enhanced_ct, write_study
from models.train import config_from_dict, train
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port
from tests.support.review_case import (
    CSRF,
    PASSWORD,
    add_user,
    make_review_case,
    review_settings,
    sign_in,
)

pytestmark = pytest.mark.integration

CANARY = "<script>alert('acwi')</script>^Evil"


def _predicted_and_other(ledger: Ledger, item_id: int) -> tuple[str, str]:
    case = ReviewStore(ledger).case(item_id)
    assert case is not None
    predicted = case["summary"]["predicted_label"]
    other = next(lbl for lbl in case["summary"]["labels"] if lbl != predicted)
    return predicted, other


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Settings, Ledger, TestClient]]:
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    add_user(ledger)
    configure_audit(settings, "web")
    try:
        with TestClient(create_app(settings, ledger)) as client:
            yield settings, ledger, client
    finally:
        close_audit()
        ledger.dispose()


def trail_records(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_file(settings).read_text().splitlines()]


def test_pages_and_api_need_sign_in(env: tuple[Settings, Ledger, TestClient]) -> None:
    settings, ledger, client = env
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/studies").status_code == 401
    assert client.get("/api/worklist").status_code == 401
    page = client.get("/review/worklist", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"].startswith("/login?next=")
    assert client.get("/api/studies", auth=("jane.doe", "wrong password!")).status_code == 401
    assert client.get("/api/studies", auth=("jane.doe", PASSWORD)).status_code == 200
    bad = client.post(
        "/login",
        data={"csrf_token": "forged", "username": "jane.doe", "password": PASSWORD},
        follow_redirects=False,
    )
    assert bad.status_code == 403
    assert "acwi_session" not in client.cookies


def test_wrong_password_and_disabled_user(env: tuple[Settings, Ledger, TestClient]) -> None:
    settings, ledger, client = env
    page = client.get("/login")
    token = CSRF.search(page.text)
    assert token is not None
    wrong = client.post(
        "/login",
        data={"csrf_token": token.group(1), "username": "jane.doe", "password": "nope-nope-nope"},
        follow_redirects=False,
    )
    assert wrong.status_code == 401
    assert "wrong password" in wrong.text
    sign_in(client)
    assert ReviewStore(ledger).set_disabled("jane.doe")
    assert client.get("/review/worklist", follow_redirects=False).status_code == 303
    with ledger.session() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent)).all()]
    assert "login_failed" in actions and "login" in actions
    # The same in the audit trail, with the outcome and the client's address.
    sign_ins = [r for r in trail_records(settings) if r["event"] == "user_signed_in"]
    assert [r["outcome"] for r in sign_ins] == ["minor_failure", "success"]
    assert sign_ins[0]["participants"][0] == {
        "type": "user",
        "id": "jane.doe",
        "requestor": True,
        "address": "testclient",
    }
    assert sign_ins[0]["event_id"]["code"] == "110114"


def test_worklist_case_and_override(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    settings, ledger, client = env
    routine, routine_uid = make_review_case(
        settings, ledger, tmp_path, patient_name=CANARY, calling_ae="SITEA", seed=1
    )
    stat, _ = make_review_case(
        settings, ledger, tmp_path, calling_ae="SITEB", seed=2, priority=5, label="effusion"
    )
    csrf = sign_in(client)

    page = client.get("/review/worklist")
    assert page.text.index(f"/review/cases/{stat}") < page.text.index(f"/review/cases/{routine}")
    assert "2 of 2 open cases shown" in page.text
    assert "<script>alert" not in page.text
    assert "&lt;script&gt;alert(" in page.text
    filtered = client.get("/review/worklist", params={"calling_ae": "SITEA"})
    assert "1 of 2 open cases shown" in filtered.text
    assert f'/review/cases/{stat}"' not in filtered.text
    assert "SITEB (1)" in filtered.text

    case = client.get(f"/review/cases/{routine}")
    assert case.status_code == 200
    assert "<script>alert" not in case.text
    assert "&lt;script&gt;alert(&#39;acwi&#39;)&lt;/script&gt;^Evil" in case.text
    assert "script-src 'self'" in case.headers["content-security-policy"]
    for word in ("Epistemic", "Aleatoric", "Out-of-distribution score", "UNVERIFIED"):
        assert word in case.text
    sops = list(
        dict.fromkeys(re.findall(rf"/review/cases/{routine}/images/([0-9.]+)\.png", case.text))
    )
    assert len(sops) == 2
    image = client.get(f"/review/cases/{routine}/images/{sops[0]}.png")
    assert image.headers["content-type"] == "image/png"
    grey = Image.open(io.BytesIO(image.content))
    assert grey.mode == "L" and grey.size == (128, 128)
    assert len(np.unique(np.asarray(grey))) > 16  # windowed, not blank
    heat = client.get(f"/review/cases/{routine}/heatmaps/{sops[0]}.png")
    assert heat.status_code == 200
    assert Image.open(io.BytesIO(heat.content)).mode == "RGB"
    overlay = client.get(f"/review/cases/{routine}/overlays/{sops[0]}.png")
    assert overlay.status_code == 200
    for answer in (case, image, heat, overlay):  # a patient's data: no cache keeps it
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert client.get(f"/review/cases/{routine}/images/1.2.3.png").status_code == 404

    predicted, other = _predicted_and_other(ledger, routine)
    # CSRF: a verdict without the form token is refused and changes nothing.
    forged = client.post(
        f"/review/cases/{routine}/verdict",
        data={"action": "override", "label": other, "reason": "x"},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    # An override needs a reason.
    missing = client.post(
        f"/review/cases/{routine}/verdict",
        data={"csrf_token": csrf, "action": "override", "label": other, "reason": ""},
        follow_redirects=False,
    )
    assert missing.status_code == 400
    assert "needs a reason" in missing.text
    assert ReviewStore(ledger).case(routine)["state"] == "open"  # type: ignore[index]

    done = client.post(
        f"/review/cases/{routine}/verdict",
        data={
            "csrf_token": csrf,
            "action": "override",
            "label": other,
            "reason": "<b>rib</b> overlap",
        },
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert done.headers["location"] == "/review/worklist"
    after = client.get("/review/worklist")
    assert "1 of 1 open case shown" in after.text
    assert f'/review/cases/{routine}"' not in after.text

    again = client.post(
        f"/review/cases/{routine}/verdict",
        data={"csrf_token": csrf, "action": "confirm"},
        follow_redirects=False,
    )
    assert again.status_code == 409

    with ledger.session() as s:
        verdicts = s.scalars(select(Verdict)).all()
        assert [(v.action, v.label, v.model_label, v.user_name) for v in verdicts] == [
            ("override", other, predicted, "jane.doe")
        ]
        verified = s.scalars(select(Result).where(Result.kind == "sr-verified")).one()
        original = s.scalars(
            select(Result).where(Result.kind == "sr", Result.job_id == verified.job_id)
        ).one()
        deliveries = s.scalars(select(Delivery).where(Delivery.result_id == verified.id)).all()
        assert [(d.destination, d.state.value) for d in deliveries] == [("pacs", "pending")]
        assert verified.sop_instance_uid == verdicts[0].sr_sop_instance_uid
        audit = [(e.action, e.study_uid) for e in s.scalars(select(AuditEvent)).all()]
    assert ("verdict:override", routine_uid) in audit
    assert ("view_case", routine_uid) in audit
    trail = trail_records(settings)
    viewed = [r for r in trail if r["event"] == "case_viewed"]
    assert viewed and viewed[0]["study_uids"] == [routine_uid]
    assert viewed[0]["action"] == "R" and viewed[0]["event_id"]["code"] == "110103"
    verdicts_trail = [r for r in trail if r["event"] == "verdict_recorded"]
    assert len(verdicts_trail) == 1 and verdicts_trail[0]["study_uids"] == [routine_uid]
    assert verdicts_trail[0]["participants"][0]["id"] == "jane.doe"
    assert "override" in verdicts_trail[0]["detail"]
    # The patient's name (the XSS canary) is nowhere in the trail.
    assert "alert" not in audit_file(settings).read_text()

    ds = pydicom.dcmread(settings.results_dir / verified.path)
    assert ds.VerificationFlag == "VERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.PreliminaryFlag == "FINAL"
    assert ds.VerifyingObserverSequence[0].VerifyingObserverName.family_name == "jane.doe"
    predecessor = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        original.sop_instance_uid
    )
    assert ds.SOPInstanceUID != original.sop_instance_uid
    read = summarise_sr(ds)
    assert read["verdict"] == {
        "action": "override",
        "label": other,
        "reason": "<b>rib</b> overlap",
        "regions": [],
    }
    assert read["verified"] and read["verifying_observer"] == "jane.doe^"

    closed = client.get(f"/review/cases/{routine}")
    assert "Verified SR" in closed.text and "This case is closed." in closed.text
    assert "&lt;b&gt;rib&lt;/b&gt; overlap" in closed.text

    export = export_feedback(settings, ledger, tmp_path / "feedback", deidentify=False)
    assert (export.cases, export.images, export.missing) == (1, 2, 0)
    items = scan_folder(tmp_path / "feedback")
    assert {i.label for i in items} == {other}
    assert {i.sop_instance_uid for i in items} == set(sops)
    with (tmp_path / "feedback" / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["calling_ae"] for r in rows} == {"SITEA"}


def test_escalate_keeps_case_on_top(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    settings, ledger, client = env
    stat, _ = make_review_case(settings, ledger, tmp_path, seed=3, priority=5)
    routine, _ = make_review_case(settings, ledger, tmp_path, seed=4)
    csrf = sign_in(client)
    no_reason = client.post(
        f"/review/cases/{routine}/verdict",
        data={"csrf_token": csrf, "action": "escalate", "reason": " "},
        follow_redirects=False,
    )
    assert no_reason.status_code == 400
    escalated = client.post(
        f"/review/cases/{routine}/verdict",
        data={"csrf_token": csrf, "action": "escalate", "reason": "needs a chest specialist"},
        follow_redirects=False,
    )
    assert escalated.status_code == 303
    items = ReviewStore(ledger).worklist()["items"]
    assert [(i["id"], i["escalated"]) for i in items] == [(routine, True), (stat, False)]
    with ledger.session() as s:
        assert s.scalars(select(Result).where(Result.kind == "sr-verified")).first() is None
    confirmed = client.post(
        f"/review/cases/{routine}/verdict",
        data={"csrf_token": csrf, "action": "confirm"},
        follow_redirects=False,
    )
    assert confirmed.status_code == 303
    assert [i["id"] for i in ReviewStore(ledger).worklist()["items"]] == [stat]


def test_dashboard_counts(env: tuple[Settings, Ledger, TestClient], tmp_path: Path) -> None:
    settings, ledger, client = env
    make_review_case(settings, ledger, tmp_path, seed=5, calling_ae="SITEA")
    make_review_case(settings, ledger, tmp_path, seed=6, calling_ae="SITEA")
    make_review_case(settings, ledger, tmp_path, seed=7, calling_ae="SITEB")
    data = ReviewStore(ledger).dashboard()
    by_site = {r["calling_ae"]: r for r in data["rows"]}
    assert by_site["SITEA"]["received"] == 2 and by_site["SITEA"]["analysed"] == 2
    assert by_site["SITEB"]["received"] == 1
    assert by_site["SITEA"]["review_rate"] == 1.0  # the test model sends everything to review
    assert by_site["SITEA"]["mean_uncertainty"] > 0
    assert data["queue"]["open_reviews"] == 3
    assert data["queue"]["pending_deliveries"] == 3 * 3  # SR + two heatmaps each
    sign_in(client)
    page = client.get("/review/dashboard")
    assert page.status_code == 200
    assert '<td id="q-reviews">3</td>' in page.text
    assert "SITEB" in page.text


def test_postgresql_confirm(postgres_url: str, tmp_path: Path) -> None:
    settings = review_settings(tmp_path, database_url=postgres_url)
    ledger = Ledger(settings.database_url)
    try:
        add_user(ledger, "dr.pg", role="admin")
        item, _ = make_review_case(settings, ledger, tmp_path, seed=8)
        predicted, _ = _predicted_and_other(ledger, item)
        with TestClient(create_app(settings, ledger)) as client:
            csrf = sign_in(client, "dr.pg")
            done = client.post(
                f"/review/cases/{item}/verdict",
                data={"csrf_token": csrf, "action": "confirm"},
                follow_redirects=False,
            )
            assert done.status_code == 303
            assert client.get("/api/worklist").json()["count"] == 0
            # the agreement rows read the model's version from the job summary (JSON path)
            (row,) = client.get("/api/review/agreement").json()["rows"]
            assert (row["model"], row["version"], row["kind"]) == (
                "acwi-dianet-chest", "1.1.0", "flagged"
            )  # fmt: skip
            assert (row["verdicts"], row["agreed"], row["sites"]) == (1, 1, [["SITEA", 1, 1]])
        with ledger.session() as s:
            verdict = s.scalars(select(Verdict)).one()
            assert (verdict.action, verdict.label) == ("confirm", predicted)
            assert s.scalars(select(Result).where(Result.kind == "sr-verified")).one()
    finally:
        ledger.dispose()


def test_verified_sr_reaches_orthanc(tmp_path: Path) -> None:
    """The exporter sends the verified SR by C-STORE to the job's destination; an amendment's
    verified SR joins it in the same series."""
    require_orthanc()
    with OrthancServer(node_ae="ACWI", node_port=free_port()) as orthanc:
        settings = review_settings(tmp_path, pacs_ae=orthanc.aet, pacs_port=orthanc.dicom_port)
        ledger = Ledger(settings.database_url)
        try:
            add_user(ledger)
            item, study_uid = make_review_case(settings, ledger, tmp_path, seed=9)
            exporter = Exporter(settings, ledger)
            assert exporter.tick() == 3  # unverified SR + 2 heatmaps
            with TestClient(create_app(settings, ledger)) as client:
                csrf = sign_in(client)
                done = client.post(
                    f"/review/cases/{item}/verdict",
                    data={"csrf_token": csrf, "action": "confirm"},
                    follow_redirects=False,
                )
                assert done.status_code == 303
            assert ledger.get_study(study_uid)["state"] == "exporting"  # type: ignore[index]
            assert exporter.tick() == 1
            assert ledger.get_study(study_uid)["state"] == "delivered"  # type: ignore[index]
            with ledger.session() as s:
                verified = s.scalars(select(Result).where(Result.kind == "sr-verified")).one()
                uid = verified.sop_instance_uid
            found = orthanc.client.post(
                "/tools/find",
                json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}, "Expand": True},
            ).json()
            assert len(found) == 1
            tags = orthanc.client.get(f"/instances/{found[0]['ID']}/simplified-tags").json()
            assert tags["VerificationFlag"] == "VERIFIED"
            assert tags["StudyInstanceUID"] == study_uid

            # the verdict amended: its new verified SR joins the same series in the PACS
            _, other = _predicted_and_other(ledger, item)
            with TestClient(create_app(settings, ledger)) as client:
                csrf = sign_in(client)
                with ledger.session() as s:
                    first = s.scalars(select(Verdict)).one()
                amended = client.post(
                    f"/review/cases/{item}/amend",
                    data={"csrf_token": csrf, "amends": str(first.id), "action": "override",
                          "label": other, "reason": "rib overlap"},
                    follow_redirects=False,
                )  # fmt: skip
                assert amended.status_code == 303
            assert exporter.tick() == 1
            assert ledger.get_study(study_uid)["state"] == "delivered"  # type: ignore[index]
            series = orthanc.client.get(f"/instances/{found[0]['ID']}/series").json()
            in_series = [
                orthanc.client.get(f"/instances/{i}/simplified-tags").json()
                for i in series["Instances"]
            ]
            verified_srs = sorted(
                (int(t["InstanceNumber"]), t["SOPInstanceUID"])
                for t in in_series
                if t.get("VerificationFlag") == "VERIFIED"
            )
            assert [n for n, _ in verified_srs] == [2, 3]
            assert verified_srs[0][1] == uid
            with ledger.session() as s:
                latest = s.scalars(select(Verdict).order_by(Verdict.id.desc())).first()
            assert latest is not None and verified_srs[1][1] == latest.sr_sop_instance_uid
        finally:
            ledger.dispose()


def test_verdict_is_queued_for_the_ris(tmp_path: Path) -> None:
    """With ``[hl7.ris]`` set, a verdict also queues an ORU^R01 carrying it, with the lesion
    box the radiologist marked (its image and its pixels)."""
    from acwi_node.hl7.messages import oru_observations
    from acwi_node.ledger.models import Hl7Outbound

    settings = review_settings(tmp_path, hl7={"ris": {"host": "127.0.0.1", "port": 2575}})
    ledger = Ledger(settings.database_url)
    try:
        add_user(ledger)
        item, _ = make_review_case(settings, ledger, tmp_path, seed=10)
        summary = ReviewStore(ledger).case(item)["summary"]  # type: ignore[index]
        predicted = summary["predicted_label"]
        other = next(label for label in summary["finding_labels"] if label != predicted)
        sop = summary["images"][0]["sop_instance_uid"]
        with TestClient(create_app(settings, ledger)) as client:
            csrf = sign_in(client)
            done = client.post(
                f"/review/cases/{item}/verdict",
                data={
                    "csrf_token": csrf,
                    "action": "override",
                    "label": other,
                    "reason": "rib",
                    f"box:{sop}": "0 0 0.5 0.5",
                },
                follow_redirects=False,
            )
            assert done.status_code == 303
        with ledger.session() as s:
            rows = {o.kind: o.message for o in s.scalars(select(Hl7Outbound)).all()}
            (kept,) = s.scalars(select(Verdict).where(Verdict.review_item_id == item)).all()
        assert f"verdict-{item}" in rows
        obs = oru_observations(rows[f"verdict-{item}"])
        assert obs["VERDICT"][0][1].startswith("DISAGREE^")
        assert obs["FINAL_FINDING"][0][1].startswith(f"{other}^")
        assert kept.boxes is not None and obs["LESION_IMAGE"] == [("1", sop)]
        ((box,),) = kept.boxes.values()
        assert obs["LESION_BOX"] == [("1", "^".join(str(v) for v in box))]
    finally:
        ledger.dispose()


def test_a_multi_frame_case_shows_each_frame_and_exports_a_row_per_frame(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """An Enhanced CT of three frames: the case page shows each frame with its heatmap, the
    pictures are asked for by frame number, and the feedback export copies the image once
    with a labelled row per frame, which the training loader reads as three images."""
    settings, ledger, client = env
    path = write_enhanced_ct(tmp_path / "ct", slices=3, size=64)
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    item, _ = make_review_case(settings, ledger, tmp_path, files=[path])
    csrf = sign_in(client)
    page = client.get(f"/review/cases/{item}")
    assert page.status_code == 200
    for n in (1, 2, 3):
        assert f"/images/{sop}.png?frame={n}" in page.text
        assert f"/overlays/{sop}.png?frame={n}" in page.text
        assert f"(frame {n})" in page.text
    first = client.get(f"/review/cases/{item}/images/{sop}.png?frame=1")
    third = client.get(f"/review/cases/{item}/images/{sop}.png?frame=3")
    assert first.status_code == third.status_code == 200
    assert first.content != third.content  # two slices of the chest
    assert Image.open(io.BytesIO(first.content)).size == (64, 64)
    assert client.get(f"/review/cases/{item}/images/{sop}.png?frame=4").status_code == 404
    assert client.get(f"/review/cases/{item}/images/{sop}.png?frame=0").status_code == 422
    heat = client.get(f"/review/cases/{item}/heatmaps/{sop}.png?frame=2")
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    assert client.get(f"/review/cases/{item}/heatmaps/{sop}.png").status_code == 404

    verdict = client.post(
        f"/review/cases/{item}/verdict",
        data={"csrf_token": csrf, "action": "confirm"},
        follow_redirects=False,
    )
    assert verdict.status_code == 303, verdict.text
    with ledger.session() as s:
        verified = s.scalars(select(Result).where(Result.kind == "sr-verified")).one()
    verified_path = settings.results_dir / verified.path
    read = summarise_sr(pydicom.dcmread(verified_path))
    assert read["verified"] and sorted(read["image_probabilities"]) == [
        f"{sop} frame {n}" for n in (1, 2, 3)
    ]
    assert dciodvfy_errors(verified_path) == []
    export = export_feedback(settings, ledger, tmp_path / "feedback", deidentify=False)
    assert (export.cases, export.images, export.missing) == (1, 3, 0)
    assert [p.name for p in (tmp_path / "feedback" / "images").iterdir()] == [f"{sop}.dcm"]
    with (tmp_path / "feedback" / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["sop_instance_uid"], r["frame_number"]) for r in rows] == [
        (sop, "1"),
        (sop, "2"),
        (sop, "3"),
    ]
    items = scan_folder(tmp_path / "feedback")
    assert [(i.sop_instance_uid, i.frame_number) for i in items] == [(sop, n) for n in (1, 2, 3)]


def _windows(page: str) -> list[str]:
    """The windows a case page offers (its window choice's option values)."""
    found = re.search(r'<select id="window-preset">(.*?)</select>', page, re.S)
    assert found is not None
    return re.findall(r'<option value="([a-z]*)"', found.group(1))


def test_a_ct_case_is_shown_in_the_window_the_reader_chooses(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """The case page offers a CT's windows; an image drawn in each differs; the heatmap is a
    transparent layer drawn over any of them, which over the file's window looks as the
    heatmap object does; without its map kept, the page shows the object itself."""
    settings, ledger, client = env
    files = write_ct_series(tmp_path / "ct", slices=2, size=64)
    item, study_uid = make_review_case(settings, ledger, tmp_path, files=files)
    sop = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    sign_in(client)
    page = client.get(f"/review/cases/{item}")
    assert page.status_code == 200
    assert _windows(page.text) == ["", "lung", "mediastinum", "abdomen", "bone", "brain", "auto"]
    assert f"/overlays/{sop}.png" in page.text and f"/heatmaps/{sop}.png" not in page.text

    def grey(window: str | None) -> np.ndarray:
        query = f"?window={window}" if window else ""
        answer = client.get(f"/review/cases/{item}/images/{sop}.png{query}")
        assert answer.status_code == 200, answer.text
        return np.asarray(Image.open(io.BytesIO(answer.content)), dtype=np.float64)

    pictures = {w: grey(w) for w in (None, "lung", "mediastinum", "bone", "auto")}
    # The synthetic CT's own window is the lung window (its first of two): the same picture.
    assert np.array_equal(pictures[None], pictures["lung"])
    for a in ("lung", "mediastinum", "bone", "auto"):
        for b in ("lung", "mediastinum", "bone", "auto"):
            if a != b:
                assert not np.array_equal(pictures[a], pictures[b]), (a, b)
    refused = client.get(f"/review/cases/{item}/images/{sop}.png?window=liver")
    assert refused.status_code == 422 and "lung" in refused.text

    answer = client.get(f"/review/cases/{item}/overlays/{sop}.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    layer = Image.open(io.BytesIO(answer.content))
    assert layer.mode == "RGBA" and layer.size == (64, 64)
    rgba = np.asarray(layer, dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    assert alpha.max() == pytest.approx(MAX_ALPHA, abs=1 / 255)  # where the heat is 1
    drawn = pictures[None][..., None] * (1.0 - alpha) + rgba[..., :3] * alpha
    burned = np.asarray(
        Image.open(io.BytesIO(client.get(f"/review/cases/{item}/heatmaps/{sop}.png").content)),
        dtype=np.float64,
    )
    assert np.abs(drawn - burned).mean() < 1.5  # the same picture, within rounding

    # Results written without the maps (an earlier version): the heatmap object is shown.
    for kept in (settings.results_dir / study_uid).glob("*.heat.npy"):
        kept.unlink()
    page = client.get(f"/review/cases/{item}")
    assert f"/heatmaps/{sop}.png" in page.text and f"/overlays/{sop}.png" not in page.text
    assert client.get(f"/review/cases/{item}/overlays/{sop}.png").status_code == 404


def test_a_radiograph_case_offers_the_automatic_window_alone(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    settings, ledger, client = env
    item, _ = make_review_case(settings, ledger, tmp_path)
    sign_in(client)
    page = client.get(f"/review/cases/{item}")
    assert _windows(page.text) == ["", "auto"]


def test_each_images_heatmap_controls_name_their_image(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """A screen reader tabbing through the images hears which image's heatmap a control
    shows or fades, not "heatmap" and "opacity" over and again."""
    settings, ledger, client = env
    item, _ = make_review_case(settings, ledger, tmp_path)
    sign_in(client)
    page = client.get(f"/review/cases/{item}").text
    for n in (1, 2):
        assert f'class="heatmap-toggle" checked aria-label="heatmap over image {n}"' in page
        assert f'value="100" aria-label="heatmap opacity, image {n}"' in page


def test_a_case_with_heatmaps_shows_their_colour_scale(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """The heatmap's colours carried its meaning alone (a jet-like map, its red and green
    hard to tell apart for colour-blind readers): the page names the scale's ends and shows
    it, as the overlays draw it."""
    settings, ledger, client = env
    item, _ = make_review_case(settings, ledger, tmp_path)
    sign_in(client)
    page = client.get(f"/review/cases/{item}").text
    assert page.count('src="/review/heatmap-scale.png"') == 1
    assert "0, none" in page and "1, strongest" in page and "not a probability" in page
    scale = client.get("/review/heatmap-scale.png")
    assert scale.status_code == 200 and scale.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(scale.content)).convert("RGB"))
    assert pixels.shape == (14, 256, 3)
    ends = np.rint(colour_map(np.array([0.0, 1.0])) * 255.0).astype(np.uint8)
    assert (pixels[0, 0] == ends[0]).all() and (pixels[0, -1] == ends[1]).all()


def test_heatmaps_in_a_colour_blind_safe_map(tmp_path: Path) -> None:
    """``worker.heatmap_colours = "cividis"``: the worker's secondary captures are drawn in it
    (named in Derivation Description; no dciodvfy error), and the case page's overlay and
    colour scale too, the scale described in words and asked for by the map's name (a
    browser keeps the scale a day)."""
    base = review_settings(tmp_path)
    settings = base.model_copy(
        update={"worker": base.worker.model_copy(update={"heatmap_colours": "cividis"})}
    )
    ledger = Ledger(settings.database_url)
    add_user(ledger)
    try:
        item, _ = make_review_case(settings, ledger, tmp_path)
        with ledger.session() as s:
            paths = s.scalars(select(Result.path).where(Result.kind == "heatmap")).all()
        assert len(paths) == 2
        for path in paths:
            sc = pydicom.dcmread(settings.results_dir / path)
            assert "(cividis colour map," in sc.DerivationDescription
            assert dciodvfy_errors(settings.results_dir / path) == []
        with TestClient(create_app(settings, ledger)) as client:
            sign_in(client)
            page = client.get(f"/review/cases/{item}").text
            assert 'src="/review/heatmap-scale.png?map=cividis"' in page
            assert "colour scale from dark blue (0, none) through grey to light yellow" in page
            sops = re.findall(rf"/review/cases/{item}/overlays/([0-9.]+)\.png", page)
            overlay = client.get(f"/review/cases/{item}/overlays/{sops[0]}.png")
            scale = client.get("/review/heatmap-scale.png?map=cividis")
    finally:
        ledger.dispose()
    rgba = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGBA")).reshape(-1, 4)
    palette = np.rint(colour_map(np.linspace(0.0, 1.0, 1025), "cividis") * 255.0)
    drawn = np.unique(rgba[rgba[:, 3] > 0][:, :3], axis=0).astype(float)
    # every colour drawn is cividis's (to a rounding), none jet's
    nearest = np.abs(drawn[:, None, :] - palette[None, :, :]).max(axis=2).min(axis=1)
    assert len(drawn) > 10 and nearest.max() <= 1.5, nearest.max()
    pixels = np.asarray(Image.open(io.BytesIO(scale.content)).convert("RGB"))
    assert pixels[0, -1].tolist() == palette[-1].tolist()


def confirm(client: TestClient, item: int) -> None:
    """Sign in as the radiologist and confirm the case's finding."""
    csrf = sign_in(client)
    verdict = client.post(
        f"/review/cases/{item}/verdict",
        data={"csrf_token": csrf, "action": "confirm"},
        follow_redirects=False,
    )
    assert verdict.status_code == 303, verdict.text


def test_a_radiologist_marks_the_lesion_and_training_learns_from_the_box(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """Boxes drawn on an image (two lesions, two boxes) go with the confirmed finding:
    refused with a normal verdict, an escalation, an image the case did not analyse or
    corners outside the image (the case stays open, the reason shown, the page back with the
    reader's choices and the boxes it can draw); kept in the image's pixels with the verdict,
    written into the verified SR as planar regions (no dciodvfy error), drawn over their image
    and named on the closed case's page, counted in the case's history and the audit; written
    in the de-identified export's box column for that image alone, under its new UID; and a
    training run on the export turns them into a lesion mask for the heatmap."""
    settings, ledger, client = env
    files = write_study(tmp_path / "src", n_images=2, label="nodule", seed=7, size=128)
    item, _ = make_review_case(settings, ledger, tmp_path, files=files)
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    predicted, _ = _predicted_and_other(ledger, item)
    assert predicted == "nodule"
    csrf = sign_in(client)
    page = client.get(f"/review/cases/{item}").text
    assert all(f'data-image="{sop}"' in page for sop in sops) and "Mark lesion" in page

    def verdict(**fields: str) -> Any:
        return client.post(
            f"/review/cases/{item}/verdict",
            data={"csrf_token": csrf, **fields},
            follow_redirects=False,
        )

    drafted = f'data-image="{sops[0]}" data-drafted-box="0.1000 0.1000 0.2000 0.2000"'
    for fields, said, drawn_again in [
        ({"action": "override", "label": "normal", "reason": "none"}, "goes with a finding", True),
        ({"action": "escalate", "reason": "unsure"}, "not an escalation", True),
        ({"action": "confirm", "box:1.2.3.4": "0.1 0.1 0.2 0.2"}, "did not analyse", False),
        ({"action": "confirm", f"box:{sops[0]}": "0.5 0.5 1.5 0.9"}, "within its image", False),
    ]:  # fmt: skip
        marks = {k: v for k, v in fields.items() if k.startswith("box:")}
        refused = verdict(**fields, **({} if marks else {f"box:{sops[0]}": "0.1 0.1 0.2 0.2"}))
        alert = re.search(r'role="alert">([^<]*)<', refused.text)
        assert refused.status_code == 400 and alert and said in alert.group(1), (fields, alert)
        # the page comes back with the box drawn again where it can be, and the choices made
        assert (drafted in refused.text) is drawn_again, fields
        assert f'value="{fields["action"]}" checked' in refused.text
    assert '<option value="normal" selected>' not in page
    first = verdict(
        action="override",
        label="normal",
        reason="no <nodule>",
        **{f"box:{sops[0]}": "0.1 0.1 0.2 0.2"},
    )
    assert '<option value="normal" selected>' in first.text
    assert ">no &lt;nodule&gt;</textarea>" in first.text  # the reason as typed, as text
    assert ReviewStore(ledger).case(item)["state"] == "open"  # type: ignore[index]

    # two lesions on the first image: two boxes
    accepted = verdict(action="confirm", **{f"box:{sops[0]}": "0.25 0.5 0.5 0.75;0 0 0.125 0.125"})
    assert accepted.status_code == 303, accepted.text
    with ledger.session() as s:
        (kept,) = s.scalars(select(Verdict).where(Verdict.review_item_id == item)).all()
        assert kept.boxes == {sops[0]: [[32, 64, 63, 95], [0, 0, 15, 15]]}
        verified = s.scalars(
            select(Result).where(Result.sop_instance_uid == kept.sr_sop_instance_uid)
        ).one()
    # the verified SR carries each box as a planar region of its image, for the PACS's viewers
    verified_path = settings.results_dir / verified.path
    read = summarise_sr(pydicom.dcmread(verified_path))
    assert read["verdict"]["regions"] == [
        {"image": sops[0], "box": [32, 64, 63, 95]},
        {"image": sops[0], "box": [0, 0, 15, 15]},
    ]
    assert dciodvfy_errors(verified_path) == []
    # the AI's regions (from the heatmaps, kept from the unverified SR) are not the reader's
    assert read["ai_regions"] and {r["label"] for r in read["ai_regions"]} == {"nodule"}
    assert {r["image"] for r in read["ai_regions"]} <= set(sops)
    closed = client.get(f"/review/cases/{item}").text
    assert "2 lesion boxes marked" in closed
    assert "verdict confirm as nodule, 2 lesion boxes;" in closed
    assert f"; {len(read['ai_regions'])} AI region" in closed
    # drawn back over its image (the picture's fractions of 128 x 128 pixels) and named
    assert closed.count('class="lesion-box marked" data-box="0.2500 0.5000 0.5000 0.7500"') == 1
    assert closed.count('class="lesion-box marked" data-box="0.0000 0.0000 0.1250 0.1250"') == 1
    assert "Lesion marked by jane.doe (nodule): columns 32-63, rows 64-95" in closed
    assert "Lesion marked by jane.doe (nodule): columns 0-15, rows 0-15" in closed
    assert "data-drafted-box" not in closed
    recorded = [r for r in trail_records(settings) if r["event"] == "verdict_recorded"]
    assert "2 lesion box(es)" in recorded[-1]["detail"]

    out = tmp_path / "feedback"
    assert export_feedback(settings, ledger, out).images == 2
    with (out / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    boxed = [r for r in rows if r["box"]]
    assert [r["box"] for r in boxed] == ["32 64 63 95; 0 0 15 15"]
    assert boxed[0]["sop_instance_uid"] not in sops  # the replaced UID
    items = scan_folder(out)
    assert read_boxes(out, items) == {
        boxed[0]["sop_instance_uid"]: ((32, 64, 63, 95), (0, 0, 15, 15))
    }
    config = config_from_dict(
        {
            "data": {"workers": 1, "sizes": [64], "allow_missing_labels": True},
            "preprocessing": {"input_size": 64},
            "model": {"widths": [8, 8, 16, 16, 32], "fpn_channels": 16,
                      "feature_channels": 16, "latent_dim": 8},
            "train": {"epochs": 1, "batch_size": 2, "threads": 1},
            "calibration": {"mc_samples": 2},
            "continual": {"fisher_images": 0},
            "localisation": {"cam_weight": 1.0},
        }
    )  # fmt: skip
    lines: list[str] = []
    trained = train(config, tmp_path / "model", data_dir=out, log=lines.append)
    assert "localisation: lesion boxes for 1 training images" in lines
    assert trained.history[0]["loc"] > 0


def test_the_feedback_export_is_de_identified(
    env: tuple[Settings, Ledger, TestClient],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """By default the exported images are de-identified: none of the source's identifiers (a
    name, an ID, an accession number, an institution, a private attribute, the study's UID,
    the sender's AE title) in any byte of the images or of labels.csv; the rows name the
    replaced UIDs, the files' own, and the training loader reads them; another export gives
    the same names; exact copies are refused in that folder."""
    settings, ledger, client = env
    files = write_study(
        tmp_path / "src",
        n_images=2,
        label="nodule",
        seed=7,
        size=128,
        patient_name="CANARYNAME^CANARYGIVEN",
        accession_number="CANARYACC",
    )
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID = "CANARYID"
        ds.InstitutionName = "CANARYHOSP"
        ds.add_new(0x00090010, "LO", "VENDOR")
        ds.add_new(0x00091010, "LO", "CANARYPRIV")
        ds.save_as(path)
    item, study_uid = make_review_case(settings, ledger, tmp_path, files=files)
    confirm(client, item)

    out = tmp_path / "feedback"
    args = build_parser().parse_args(["feedback", "export", str(out)])
    assert run_review_command(settings, args) == 0
    printed = capsys.readouterr().out
    assert "exported 2 image(s) of 1 reviewed case(s)" in printed and "de-identified" in printed
    exported = sorted((out / "images").iterdir())
    with (out / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    canaries = ("CANARYNAME", "CANARYID", "CANARYACC", "CANARYHOSP", "CANARYPRIV", "SITEA")
    for path in [*exported, out / "labels.csv"]:
        data = path.read_bytes()
        for canary in (*canaries, study_uid):
            assert canary.encode() not in data, (canary, path.name)
    assert {f"{r['sop_instance_uid']}.dcm" for r in rows} == {p.name for p in exported}
    assert {r["calling_ae"] for r in rows} == {""}
    assert {r["site"] for r in rows} == {"0"}
    pseudonyms = {r["patient"] for r in rows}
    assert len(pseudonyms) == 1 and next(iter(pseudonyms)).startswith("ANON-")
    for path in exported:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID == rows[0]["study_instance_uid"]
        assert ds.PatientID == rows[0]["patient"]
    items = scan_folder(out)
    assert {i.sop_instance_uid for i in items} == {r["sop_instance_uid"] for r in rows}
    method = json.loads((out / "deidentification.json").read_text())
    assert method["options"] == ["Retain Patient Characteristics Option"]
    trail = [r for r in trail_records(settings) if r["event"] == "feedback_exported"]
    assert trail and "de-identified" in trail[-1]["detail"]

    again = export_feedback(settings, ledger, out)
    assert (again.images, again.deidentified) == (2, True)
    assert sorted(p.name for p in (out / "images").iterdir()) == [p.name for p in exported]
    with pytest.raises(ExportError, match="de-identified export"):
        export_feedback(settings, ledger, out, deidentify=False)
    identified = build_parser().parse_args(["feedback", "export", "--identified", str(out)])
    assert run_review_command(settings, identified) == 1
    assert "another folder" in capsys.readouterr().err
    plain = export_feedback(settings, ledger, tmp_path / "identified", deidentify=False)
    assert plain.images == 2 and not plain.deidentified
    with pytest.raises(ExportError, match="with identifiers"):
        export_feedback(settings, ledger, tmp_path / "identified")

    # feedback.shift_dates: the dates move back, the same for the patient's images
    shifting = settings.model_copy(
        update={"feedback": settings.feedback.model_copy(update={"shift_dates": True})}
    )
    dated = export_feedback(shifting, ledger, tmp_path / "dated")
    assert dated.images == 2
    method = json.loads((tmp_path / "dated" / "deidentification.json").read_text())
    assert method["options"] == [
        "Retain Patient Characteristics Option",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ]
    source_date = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyDate)
    shifted = {
        str(pydicom.dcmread(path, stop_before_pixels=True).StudyDate)
        for path in (tmp_path / "dated" / "images").iterdir()
    }
    assert len(shifted) == 1 and source_date not in shifted and shifted != {""}


def test_burned_in_text_and_damaged_files_are_left_out_of_the_de_identified_export(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """An image marked as having burned-in annotation is withheld and a spool file damaged
    since the analysis is counted as missing; the other images are exported."""
    settings, ledger, client = env
    files = write_study(tmp_path / "src", n_images=3, label="nodule", seed=8, size=128)
    marked = pydicom.dcmread(files[0])
    marked.BurnedInAnnotation = "YES"
    marked.save_as(files[0])
    item, study_uid = make_review_case(settings, ledger, tmp_path, files=files)
    confirm(client, item)
    damaged_sop = str(pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
    relative = ReviewStore(ledger).instance_path(study_uid, damaged_sop)
    assert relative is not None
    damaged = settings.spool_dir / relative
    damaged.write_bytes(damaged.read_bytes()[:300])
    export = export_feedback(settings, ledger, tmp_path / "feedback")
    assert (export.images, export.withheld, export.missing) == (1, 1, 1)
    assert len(list((tmp_path / "feedback" / "images").iterdir())) == 1

    # [[feedback.burned_in]] names the images' kind (one device made them): their corner is
    # blanked, the marked one's too, which is now exported (the Clean Pixel Data Option)
    manufacturer = str(marked.get("Manufacturer", "") or "")
    cleaning = settings.model_copy(
        update={
            "feedback": settings.feedback.model_copy(
                update={
                    "burned_in": [
                        BurnedInRegions(
                            modality=str(marked.Modality),
                            manufacturer=manufacturer,
                            rows=int(marked.Rows),
                            regions=[[0, 0, 31, 15]],
                        )
                    ]
                }
            )
        }
    )
    out = tmp_path / "feedback-cleaned"
    export = export_feedback(cleaning, ledger, out)
    assert (export.images, export.withheld, export.missing, export.cleaned) == (2, 0, 1, 2)
    cleaned = [
        ds
        for ds in (pydicom.dcmread(p) for p in (out / "images").iterdir())
        if "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    ]
    assert len(cleaned) == 2 and {ds.BurnedInAnnotation for ds in cleaned} == {"NO"}
    for ds in cleaned:
        assert (ds.pixel_array[:16, :32] == ds.pixel_array.min()).all()
    method = json.loads((out / "deidentification.json").read_text())
    assert "Clean Pixel Data Option" in method["options"]
    assert method["burned_in"][0]["regions"] == [[0, 0, 31, 15]]


def test_an_administrator_downloads_the_de_identified_feedback_as_a_zip(
    env: tuple[Settings, Ledger, TestClient], tmp_path: Path
) -> None:
    """``GET /api/feedback/export.zip``: administrators only; the archive holds the export as
    the command line writes it, de-identified even where ``feedback.deidentify`` is off, and
    nothing is left behind in the data folder."""
    settings, ledger, client = env
    settings = settings.model_copy(
        update={"feedback": settings.feedback.model_copy(update={"deidentify": False})}
    )
    files = write_study(
        tmp_path / "src", n_images=2, label="nodule", seed=9, size=128,
        patient_name="CANARYNAME^CANARYGIVEN", accession_number="CANARYACC",
    )  # fmt: skip
    item, study_uid = make_review_case(settings, ledger, tmp_path, files=files)
    confirm(client, item)
    add_user(ledger, "ada.admin", role="admin")
    with TestClient(create_app(settings, ledger)) as api:  # feedback.deidentify off
        assert api.get("/api/feedback/export.zip", auth=("jane.doe", PASSWORD)).status_code == 403
        assert 'id="feedback-export"' not in client.get("/review/dashboard").text
        sign_in(api, "ada.admin")  # the dashboard's link, with the session's cookie
        assert 'href="/api/feedback/export.zip"' in api.get("/review/dashboard").text
        answer = api.get("/api/feedback/export.zip")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers["x-images"] == "2" and answer.headers["x-cases"] == "1"
    assert (answer.headers["x-withheld"], answer.headers["x-cleaned"]) == ("0", "0")
    assert "attachment" in answer.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(answer.content)) as zf:
        names = sorted(zf.namelist())
        images = [n for n in names if n.startswith("images/") and n.endswith(".dcm")]
        assert names == ["deidentification.json", *images, "labels.csv"] and len(images) == 2
        for name in names:
            data = zf.read(name)
            for canary in ("CANARYNAME", "CANARYACC", study_uid):
                assert canary.encode() not in data, (canary, name)
        assert pydicom.dcmread(io.BytesIO(zf.read(images[0]))).PatientIdentityRemoved == "YES"
    assert list((settings.data_dir / "tmp").iterdir()) == []
    trail = [r for r in trail_records(settings) if r["event"] == "feedback_exported"]
    assert trail and "over HTTP" in trail[-1]["detail"]
    assert trail[-1]["participants"][0]["id"] == "ada.admin"
