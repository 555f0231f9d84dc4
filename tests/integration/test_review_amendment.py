"""Amending a closed case's verdict: the page, the ledger, the new verified SR, the RIS's
corrected result, and what the figures and the feedback export take from it.

Cases are synthetic studies analysed by the real analyse task; the RIS is a real MLLP peer (a
subprocess); the ledger is SQLite, and PostgreSQL in the last test.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from acwi_node.audit import audit_file, close_audit, configure_audit
from acwi_node.config import Settings
from acwi_node.hl7.client import OruSender
from acwi_node.hl7.messages import oru_observations
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Hl7Outbound,
    Result,
    Verdict,
    utcnow,
)
from acwi_node.results.sr import amended_sr_uid, summarise_sr
from acwi_node.review.feedback import export_feedback
from acwi_node.review.store import ReviewStore, SessionInfo, VerdictAmended
from acwi_node.review.verdicts import amend_verdict, submit_verdict
from acwi_node.web.api import create_app
from models.data.synth import write_study
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.mllp_peer import Peer
from tests.support.review_case import add_user, make_review_case, review_settings, sign_in

pytestmark = pytest.mark.integration

#: The first box (columns 32-63, rows 64-95 of 128 x 128) and the amended one (0-15, 0-15).
FIRST_BOX, AMENDED_BOX = "0.2500 0.5000 0.5000 0.7500", "0.0000 0.0000 0.1250 0.1250"


def _alert(page: str) -> str:
    found = re.search(r'role="alert">([^<]*)<', page)
    return found.group(1) if found else ""


def _obr_status(message: str) -> str:
    return next(seg for seg in message.split("\r") if seg.startswith("OBR")).split("|")[25]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    ris = Peer(tmp_path, "AA")
    yield ris
    ris.stop()


def test_a_radiologist_amends_a_closed_verdict(tmp_path: Path, peer: Peer) -> None:
    """A confirmed nodule with one box; a second radiologist finds it wrong, opens the amend
    form (the standing verdict's finding and box in it), and is refused without a reason, with
    nothing changed, with an escalation, or against a stale verdict; the amendment (another
    finding, the box moved) supersedes the verdict: a new verified SR (a new instance naming
    the one it replaces, no dciodvfy error) queued for the PACS, the RIS's result corrected
    (P, F, then C), the page's history, the agreement, the metrics and the feedback export
    counting the amended verdict alone, the audit naming it."""
    settings = review_settings(tmp_path, hl7={"ris": {"host": "127.0.0.1", "port": peer.port}})
    ledger = Ledger(settings.database_url)
    add_user(ledger)
    add_user(ledger, "rick.roe")
    configure_audit(settings, "web")
    files = write_study(tmp_path / "src", n_images=2, label="nodule", seed=7, size=128)
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    try:
        item, study_uid = make_review_case(settings, ledger, tmp_path, files=files)
        summary = ReviewStore(ledger).case(item)["summary"]  # type: ignore[index]
        assert summary["predicted_label"] == "nodule"
        other = next(lb for lb in summary["finding_labels"] if lb != "nodule")
        with TestClient(create_app(settings, ledger)) as client:
            csrf = sign_in(client)
            confirmed = client.post(
                f"/review/cases/{item}/verdict",
                data={"csrf_token": csrf, "action": "confirm", f"box:{sops[0]}": FIRST_BOX},
                follow_redirects=False,
            )
            assert confirmed.status_code == 303
            with ledger.session() as s:
                (first,) = s.scalars(select(Verdict)).all()
            closed = client.get(f"/review/cases/{item}").text
            assert 'id="amend-link"' in closed and "/amend" not in closed
            assert f'class="lesion-box marked" data-box="{FIRST_BOX}"' in closed

            csrf = sign_in(client, "rick.roe")
            form = client.get(f"/review/cases/{item}?amend=1").text
            assert f'action="/review/cases/{item}/amend"' in form
            assert f'name="amends" value="{first.id}"' in form
            assert 'value="confirm" checked' in form
            # the standing verdict's box is the form's to edit, not drawn as kept beside it
            assert f'data-image="{sops[0]}" data-drafted-box="{FIRST_BOX}"' in form
            assert 'class="lesion-box marked"' not in form and "Mark lesion" in form

            def amend(**fields: str) -> Any:
                return client.post(
                    f"/review/cases/{item}/amend",
                    data={"csrf_token": csrf, "amends": str(first.id), **fields},
                    follow_redirects=False,
                )

            kept, moved = {f"box:{sops[0]}": FIRST_BOX}, {f"box:{sops[0]}": AMENDED_BOX}
            for fields, said in [
                ({"action": "override", "label": other, **moved}, "needs a reason"),
                ({"action": "confirm", "reason": "x", **kept}, "changes nothing"),
                ({"action": "escalate", "reason": "unsure"}, "confirms or overrides"),
                ({"action": "override", "label": "normal", "reason": "x", **moved}, "a finding"),
                ({"action": "override", "label": other, "reason": "x", "amends": "x"}, "reload"),
            ]:  # fmt: skip
                refused = amend(**fields)
                assert refused.status_code in (400, 409), fields
                assert said in _alert(refused.text), (fields, _alert(refused.text))
            # a refused amendment comes back as typed, still an amendment
            assert f'action="/review/cases/{item}/amend"' in amend(action="override").text
            typed = amend(action="override", label=other, **moved).text
            assert f'data-drafted-box="{AMENDED_BOX}"' in typed
            assert f'<option value="{other}" selected>' in typed
            assert len(ReviewStore(ledger).case(item)["verdicts"]) == 1  # type: ignore[index]

            done = amend(action="override", label=other, reason="a <nipple> shadow", **moved)
            assert done.status_code == 303, _alert(done.text)
            assert done.headers["location"] == f"/review/cases/{item}?amended=1"
            page = client.get(done.headers["location"]).text
            assert "The verdict is amended" in page and "corrected result" in page
            assert "rick.roe amended the verdict: override as" in page
            assert "a &lt;nipple&gt; shadow" in page
            assert page.count("(replaced by an amendment on") == 1
            assert page.count("Verified SR, replaced by an amendment") == 1
            assert f'class="lesion-box marked" data-box="{AMENDED_BOX}"' in page
            assert FIRST_BOX not in page
            # a second amendment against the verdict the page showed first: stale
            stale = amend(action="confirm", reason="back to the nodule")
            assert stale.status_code == 409 and "reload" in _alert(stale.text)
            assert 'name="amends"' not in stale.text  # the page shows what stands now

            agreement = client.get("/api/review/agreement").json()["rows"]
            assert [(r["verdicts"], r["agreed"]) for r in agreement] == [(1, 0)]
            version = agreement[0]["version"]
            assert version
            metrics = client.get("/metrics").text
            assert (
                f'acwi_review_verdicts{{action="override",kind="flagged",model="review-model",'
                f'version="{version}"}} 1.0' in metrics
            )
            assert 'action="confirm",kind="flagged"' not in metrics
            assert (
                f'acwi_review_amendments{{model="review-model",version="{version}"}} 1.0' in metrics
            )

        with ledger.session() as s:
            verdicts = s.scalars(select(Verdict).order_by(Verdict.id)).all()
            assert [(v.action, v.label, v.user_name, v.amends_id) for v in verdicts] == [
                ("confirm", "nodule", "jane.doe", None),
                ("override", other, "rick.roe", first.id),
            ]
            assert verdicts[0].superseded_at is not None and verdicts[1].superseded_at is None
            assert verdicts[1].boxes == {sops[0]: [[0, 0, 15, 15]]}
            amended = s.scalars(
                select(Result).where(Result.sop_instance_uid == verdicts[1].sr_sop_instance_uid)
            ).one()
            assert amended.kind == "sr-verified"
            deliveries = s.scalars(select(Delivery).where(Delivery.result_id == amended.id)).all()
            assert [(d.destination, d.state.value) for d in deliveries] == [("pacs", "pending")]
            actions = [e.action for e in s.scalars(select(AuditEvent)).all()]
            assert "verdict:amend:override" in actions
        assert amended.sop_instance_uid == amended_sr_uid(first.sr_sop_instance_uid)
        path = settings.results_dir / amended.path
        ds = pydicom.dcmread(path)
        assert ds.VerificationFlag == "VERIFIED" and ds.InstanceNumber == 3
        assert str(ds.VerifyingObserverSequence[0].VerifyingObserverName) == "rick.roe^"
        predecessors = [
            str(r.ReferencedSOPInstanceUID)
            for r in ds.PredecessorDocumentsSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence
        ]
        assert predecessors[-1] == first.sr_sop_instance_uid
        read = summarise_sr(ds)
        assert read["verdict"] == {
            "action": "override",
            "label": other,
            "reason": "a <nipple> shadow",
            "regions": [{"image": sops[0], "box": [0, 0, 15, 15]}],
        }
        assert dciodvfy_errors(path) == []
        trail = [r for r in _trail(settings) if r["event"] == "verdict_recorded"]
        assert f"verdict {first.id} amended" in trail[-1]["detail"]

        # the RIS: the result (P), the verdict (F), then the amendment as a correction (C)
        sender = OruSender(settings, ledger)
        for _ in range(3):
            sender.tick()
        messages = peer.messages()
        assert [_obr_status(m) for m in messages] == ["P", "F", "C"]
        obs = oru_observations(messages[-1])
        assert obs["VERDICT"][0][1].startswith("DISAGREE^")
        assert obs["FINAL_FINDING"][0][1].startswith(f"{other}^")
        assert obs["LESION_BOX"] == [("1", "0^0^15^15")]
        assert obs["COMMENT"] == [("", "a <nipple> shadow")]
        control_ids = [m.split("\r", 1)[0].split("|")[9] for m in messages]
        assert len(set(control_ids)) == 3

        # a promised amendment whose builder died is built later, boxes and all
        with ledger.session() as s:
            row = s.scalars(select(Hl7Outbound).where(Hl7Outbound.kind.like("%-%-%"))).one()
            assert row.kind == f"verdict-{item}-{verdicts[1].id}"
            built, row.message, row.state = row.message, "", DeliveryState.PENDING
        assert sender.build_promised() == 1
        with ledger.session() as s:
            rebuilt = s.get_one(Hl7Outbound, row.id).message
        assert _obr_status(rebuilt) == "C"
        assert oru_observations(rebuilt) == oru_observations(built)

        # the feedback export takes the amended finding and box
        out = tmp_path / "feedback"
        export_feedback(settings, ledger, out, deidentify=False)
        with (out / "labels.csv").open() as fh:
            rows = {r["sop_instance_uid"]: r for r in csv.DictReader(fh)}
        assert {r["label"] for r in rows.values()} == {other}
        assert (rows[sops[0]]["box"], rows[sops[1]]["box"]) == ("0 0 15 15", "")
        assert study_uid in {r["study_instance_uid"] for r in rows.values()}
    finally:
        close_audit()
        ledger.dispose()


def _trail(settings: Settings) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in audit_file(settings).read_text().splitlines()]


def _user(ledger: Ledger, name: str) -> SessionInfo:
    found = ReviewStore(ledger).get_user(name)
    assert found is not None
    return SessionInfo(found.id, found.name, found.role, "", utcnow())


def test_an_amendment_whose_sr_cannot_be_stored_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verified SR of an amendment fails to store: the amendment is withdrawn (its promised
    ORU too) and the verdict it amended stands again, so a later amendment goes through."""
    settings = review_settings(tmp_path, hl7={"ris": {"host": "127.0.0.1", "port": 9}})
    ledger = Ledger(settings.database_url)
    try:
        add_user(ledger)
        item, _ = make_review_case(settings, ledger, tmp_path, seed=5)
        store = ReviewStore(ledger)
        jane = _user(ledger, "jane.doe")
        first = submit_verdict(settings, store, item, jane, action="confirm")
        predicted = store.case(item)["summary"]["predicted_label"]  # type: ignore[index]
        other = next(
            lb
            for lb in store.case(item)["summary"]["labels"]  # type: ignore[index]
            if lb != predicted
        )

        def refuse(*args: Any, **kwargs: Any) -> int:
            raise OSError("disk full")

        monkeypatch.setattr(ReviewStore, "attach_verified_sr", refuse)
        with pytest.raises(OSError, match="disk full"):
            amend_verdict(
                settings, store, item, jane, amends=first.verdict_id, action="override",
                label=other, reason="rib",
            )  # fmt: skip
        case = store.case(item)
        assert case is not None and case["current_verdict"] == first.verdict_id
        assert [(v["id"], v["superseded_at"]) for v in case["verdicts"]] == [
            (first.verdict_id, None)
        ]
        with ledger.session() as s:
            kinds = [o.kind for o in s.scalars(select(Hl7Outbound)).all()]
        assert kinds == ["result", f"verdict-{item}"]
        monkeypatch.undo()
        again = amend_verdict(
            settings, store, item, jane, amends=first.verdict_id, action="override",
            label=other, reason="rib",
        )  # fmt: skip
        assert store.case(item)["current_verdict"] == again.verdict_id  # type: ignore[index]
    finally:
        ledger.dispose()


def test_two_amendments_of_one_verdict_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """Two radiologists amend the same verdict from the same page: the first wins, the second
    is told the verdict changed (the conditional update, on PostgreSQL); amending the
    amendment then chains: a third verified SR naming the second."""
    settings = review_settings(tmp_path, database_url=postgres_url)
    ledger = Ledger(settings.database_url)
    try:
        add_user(ledger)
        add_user(ledger, "rick.roe")
        item, _ = make_review_case(settings, ledger, tmp_path, seed=6)
        store = ReviewStore(ledger)
        jane, rick = _user(ledger, "jane.doe"), _user(ledger, "rick.roe")
        first = submit_verdict(settings, store, item, jane, action="confirm")
        summary = store.case(item)["summary"]  # type: ignore[index]
        other = next(lb for lb in summary["labels"] if lb != summary["predicted_label"])
        second = amend_verdict(
            settings, store, item, rick, amends=first.verdict_id, action="override",
            label=other, reason="rib",
        )  # fmt: skip
        with pytest.raises(VerdictAmended):
            amend_verdict(
                settings, store, item, jane, amends=first.verdict_id, action="override",
                label=other, reason="same thought",
            )  # fmt: skip
        with pytest.raises(VerdictAmended):  # the store's own check, past the page's
            store.claim_amendment(
                item, first.verdict_id, user=jane, action="override", label=other,
                model_label=summary["predicted_label"], reason="x", sr_sop_instance_uid="2.25.1",
            )  # fmt: skip
        third = amend_verdict(
            settings, store, item, jane, amends=second.verdict_id, action="confirm",
            reason="it is a nodule after all",
        )  # fmt: skip
        assert third.sr_sop_instance_uid == amended_sr_uid(second.sr_sop_instance_uid)
        case = store.case(item)
        assert case is not None and case["current_verdict"] == third.verdict_id
        assert [v["amends"] for v in case["verdicts"]] == [
            None,
            first.verdict_id,
            second.verdict_id,
        ]
        (row,) = store.agreement()
        assert (row["verdicts"], row["agreed"]) == (1, 1)
        assert [c["label"] for c in store.reviewed_cases()] == [summary["predicted_label"]]
    finally:
        ledger.dispose()
