"""The review case API (``/api/review/cases/{id}``): a reading tool's view of a case, and its
verdicts and amendments, over HTTP Basic against a real ledger and real analyses."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import AuditEvent, Result, Verdict
from acwi_node.results.sr import summarise_sr
from acwi_node.web.api import create_app
from models.data.synth import write_study
from tests.support.review_case import PASSWORD, add_user, make_review_case, review_settings

pytestmark = pytest.mark.integration

READER = ("jane.doe", PASSWORD)
CANARY = "CANARY^APIPATIENT"


def test_a_reading_tool_reads_a_case_and_gives_and_amends_its_verdict(tmp_path: Path) -> None:
    """GET gives the case without patient data (and is audited); a verdict with boxes in the
    image's pixels is refused with the reason where it cannot be kept, and kept as given where
    it can (the verified SR's regions the same pixels); a second verdict is a conflict; an
    amendment against a stale verdict is a conflict, a valid one replaces the verdict. Only
    radiologists and administrators may decide, with a JSON body."""
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    try:
        add_user(ledger)
        add_user(ledger, "pacs", role="sender")
        files = write_study(
            tmp_path / "src", n_images=2, label="nodule", seed=7, size=128, patient_name=CANARY
        )
        sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
        item, study_uid = make_review_case(settings, ledger, tmp_path, files=files)
        with TestClient(create_app(settings, ledger)) as client:
            assert client.get(f"/api/review/cases/{item}").status_code == 401
            got = client.get(f"/api/review/cases/{item}", auth=READER)
            assert got.status_code == 200
            case = got.json()
            assert "APIPATIENT" not in got.text  # the ledger's data, no patient's
            assert (case["id"], case["state"], case["kind"], case["study_uid"]) == (
                item, "open", "flagged", study_uid
            )  # fmt: skip
            assert case["predicted_label"] == "nodule" and case["verdicts"] == []
            assert [im["name"] for im in case["images"]] == sops
            assert all(0.0 <= im["probability"] <= 1.0 for im in case["images"])
            assert {r["kind"] for r in case["results"]} >= {"sr", "heatmap"}
            assert client.get("/api/review/cases/99999", auth=READER).status_code == 404
            with ledger.session() as s:
                viewed = s.scalars(select(AuditEvent).where(AuditEvent.action == "view_case")).all()
            assert [(e.user_name, e.study_uid) for e in viewed] == [("jane.doe", study_uid)]

            url = f"/api/review/cases/{item}/verdict"
            as_form = client.post(url, data={"action": "confirm"}, auth=READER)
            assert as_form.status_code == 415
            sender = client.post(url, json={"action": "confirm"}, auth=("pacs", PASSWORD))
            assert sender.status_code == 403
            for body, said in [
                ({"action": "confirm", "boxes": {sops[0]: [[0, 0, 128, 10]]}}, "within its image"),
                ({"action": "confirm", "boxes": {sops[0]: [[9, 0, 8, 10]]}}, "first column"),
                ({"action": "confirm", "boxes": {sops[0]: [[1, 2, 3]]}}, "four whole numbers"),
                ({"action": "confirm", "boxes": {"1.2.3.4": [[1, 2, 3, 4]]}}, "did not analyse"),
                ({"action": "escalate", "reason": "x", "boxes": {sops[0]: [[1, 2, 3, 4]]}},
                 "not an escalation"),
                ({"action": "override", "label": "normal"}, "needs a reason"),
            ]:  # fmt: skip
                refused = client.post(url, json=body, auth=READER)
                assert refused.status_code == 422, (body, refused.text)
                assert said in refused.json()["detail"], (body, refused.text)
            floats = client.post(
                url, json={"action": "confirm", "boxes": {sops[0]: [[1.5, 2, 3, 4]]}}, auth=READER
            )
            assert floats.status_code == 422  # whole pixels only
            assert client.get(f"/api/review/cases/{item}", auth=READER).json()["state"] == "open"

            boxes = {sops[0]: [[33, 64, 63, 95], [0, 0, 0, 0]], sops[1]: [[127, 120, 127, 127]]}
            done = client.post(url, json={"action": "confirm", "boxes": boxes}, auth=READER)
            assert done.status_code == 200, done.text
            answer = done.json()
            assert answer["verdict"]["action"] == "confirm"
            assert answer["verdict"]["label"] == "nodule"
            assert answer["verdict"]["deliveries"] == 1
            assert answer["case"]["state"] == "closed"
            first = answer["case"]["current_verdict"]
            assert answer["case"]["verdicts"][0]["boxes"] == boxes  # kept as given, pixel-exact
            again = client.post(url, json={"action": "confirm"}, auth=READER)
            assert again.status_code == 409

            amend = f"/api/review/cases/{item}/amend"
            other = next(lb for lb in case["finding_labels"] if lb != "nodule")
            change = {"action": "override", "label": other, "reason": "an effusion", "boxes": {}}
            assert (
                client.post(amend, json={**change, "amends": first + 1}, auth=READER).status_code
                == 409
            )
            no_reason = client.post(
                amend, json={**change, "amends": first, "reason": ""}, auth=READER
            )
            assert no_reason.status_code == 422
            same = {"action": "confirm", "reason": "x", "boxes": boxes, "amends": first}
            unchanged = client.post(amend, json=same, auth=READER)
            assert unchanged.status_code == 422 and "changes nothing" in unchanged.json()["detail"]
            amended = client.post(amend, json={**change, "amends": first}, auth=READER)
            assert amended.status_code == 200, amended.text
            after = amended.json()["case"]
            assert after["current_verdict"] == amended.json()["verdict"]["id"] != first
            assert [(v["action"], v["amends"]) for v in after["verdicts"]] == [
                ("confirm", None),
                ("override", first),
            ]
            assert after["verdicts"][0]["superseded_at"] is not None
        with ledger.session() as s:
            kept = s.get_one(Verdict, first)
            verified = s.scalars(
                select(Result).where(Result.sop_instance_uid == kept.sr_sop_instance_uid)
            ).one()
        regions = summarise_sr(pydicom.dcmread(settings.results_dir / verified.path))["verdict"][
            "regions"
        ]
        assert regions == [
            {"image": sops[0], "box": [33, 64, 63, 95]},
            {"image": sops[0], "box": [0, 0, 0, 0]},
            {"image": sops[1], "box": [127, 120, 127, 127]},
        ]
    finally:
        ledger.dispose()
