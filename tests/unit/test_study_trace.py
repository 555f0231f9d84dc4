"""A study's trace: what happened to it, step by step, read from the ledger (SQLite and
PostgreSQL); what completed it; and where people read it (the command, the API, the pages)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from acwi_node.cli import main
from acwi_node.config import Route, RouteMatch, Settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.mpps import CompletionSignals
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Delivery,
    Hl7Order,
    Instance,
    Job,
    Study,
    User,
    Verdict,
)
from acwi_node.ledger.trace import Level, study_trace
from acwi_node.web.api import create_app
from tests.support.review_case import PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, deliver, dx_record, receive, route_all, study_id
from tests.unit.test_study_actions import fail_deliveries

T0 = dt.datetime(2026, 12, 1, 9, 0, 0)


def events(ledger: Ledger, study: str) -> list[tuple[int, str, str, Level]]:
    trace = study_trace(ledger, study)
    assert trace is not None
    return [(e.generation, e.kind, e.text, e.level) for e in trace.events]


def texts(ledger: Ledger, study: str, kind: str) -> list[str]:
    return [text for _, k, text, _ in events(ledger, study) if k == kind]


def test_a_study_with_no_row_has_no_trace(ledger_node: tuple[Settings, Ledger]) -> None:
    assert study_trace(ledger_node[1], "9.9.9") is None


def test_the_trace_tells_a_study_from_its_instances_to_its_results_stored(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    for n in (1, 2):
        receive(settings, ledger, "1.2.3", f"1.2.3.{n}")
    ledger.record_instance(dx_record("1.2.3", "1.2.3.3", ae="WARD_CR"), first_in_association=True)
    ledger.association_released([study_id(ledger, "1.2.3")])
    job_id = analyse(settings, ledger, "1.2.3", needs_review=True)
    deliver(ledger)

    (from_mod, from_ward) = texts(ledger, "1.2.3", "received")
    assert from_mod.startswith("2 instance(s) in 1 series (DX) from MOD")
    assert from_ward == "1 instance(s) in 1 series (DX) from WARD_CR"
    assert texts(ledger, "1.2.3", "routed") == ["route chest: model default"]
    (analysed,) = texts(ledger, "1.2.3", "analysed")
    assert analysed == (
        "route chest: acwi-dianet-chest 1.0.0 says nodule (p=0.70, uncertainty 0.40) from 0"
        " image(s); needs review"
    )
    assert texts(ledger, "1.2.3", "delivery") == ["1 of 1 object(s) (1 sr) stored by pacs"]
    assert texts(ledger, "1.2.3", "review") == ["case 1 on the worklist: uncertain"]
    assert texts(ledger, "1.2.3", "job") == ["route chest: delivered"]
    trace = study_trace(ledger, "1.2.3")
    assert trace is not None
    assert trace.study["status"] == "needs_review" and trace.study["instances"] == 3
    # In time order: received, complete, routed, analysis, analysed, ..., delivered.
    kinds = [e.kind for e in trace.events]
    assert kinds.index("received") < kinds.index("completed") < kinds.index("routed")
    assert kinds.index("analysing") < kinds.index("analysed") < kinds.index("delivery")
    assert all(e.at is not None for e in trace.events)
    assert [s.name for s in trace.turnaround][-1] == "last instance to results stored"
    assert all(s.seconds is not None for s in trace.turnaround)

    # A radiologist's verdict, as the review store records it.
    add_user(ledger, "jane.doe")
    with ledger.session() as s:
        user = s.scalars(select(User)).one()
        s.add(
            Verdict(
                review_item_id=1, study_id=study_id(ledger, "1.2.3"), job_id=job_id,
                user_id=user.id, user_name="jane.doe", action="override", label="normal",
                model_label="nodule",
            )
        )  # fmt: skip
    assert texts(ledger, "1.2.3", "verdict") == ["jane.doe overrode normal"]


def test_the_turnaround_is_read_from_each_steps_time(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    job_id = analyse(settings, ledger, "1.2.3")
    deliver(ledger)
    at = {"received": T0, "completed": T0 + dt.timedelta(seconds=2)}
    with ledger.session() as s:
        s.execute(update(Instance).values(received_at=T0))
        s.execute(update(Study).values(completed_at=at["completed"]))
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                created_at=at["completed"],
                started_at=T0 + dt.timedelta(seconds=2.5),
                analysed_at=T0 + dt.timedelta(seconds=4),
                finished_at=T0 + dt.timedelta(seconds=4.75),
            )
        )
        s.execute(update(Delivery).values(delivered_at=T0 + dt.timedelta(seconds=4.75)))
    trace = study_trace(ledger, "1.2.3")
    assert trace is not None
    assert [(st.name, st.seconds) for st in trace.turnaround] == [
        ("last instance to complete", 2.0),
        ("complete to analysis started", 0.5),
        ("analysis", 1.5),
        ("results to stored by every destination", 0.75),
        ("last instance to results stored", 4.75),
    ]
    assert "complete, 2.0 s after the last instance" in texts(ledger, "1.2.3", "completed")[0]
    text = trace.render()
    assert "last instance to results stored" in text and "4.8 s" in text


def test_failed_and_awaited_deliveries_say_why(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    for d in ledger.due_deliveries():
        ledger.record_delivery(
            d.id, delivered=False, status=None, error="connection refused", max_attempts=3,
            backoff_s=60,
        )  # fmt: skip
    (waiting,) = [e for e in events(ledger, "1.2.3") if e[1] == "delivery"]
    assert waiting[3] == Level.WAITING
    assert waiting[2].startswith("1 object(s) waiting for pacs, next attempt ")
    assert waiting[2].endswith(", 1 attempt(s) so far: connection refused")
    with ledger.session() as s:
        s.execute(update(Delivery).values(next_attempt_at=T0))
    for d in ledger.due_deliveries():
        ledger.record_delivery(
            d.id, delivered=False, status=0xA700, error="out of resources", max_attempts=2,
            backoff_s=60,
        )  # fmt: skip
    trace = study_trace(ledger, "1.2.3")
    assert trace is not None and trace.study["state"] == "failed"
    failed = [e for e in trace.events if e.level == Level.FAILED]
    assert [e.text for e in failed] == [
        "1 object(s) to pacs failed after 2 attempt(s) (0xA700): out of resources",
        "route chest: failed: delivery to pacs failed (0xA700): out of resources",
    ]
    # Not stored: the turnaround stops at the analysis.
    assert trace.turnaround[-1].seconds is None


def test_a_reprocessed_study_is_told_generation_by_generation(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3", needs_review=True)
    deliver(ledger)
    assert ledger.reprocess_study("1.2.3") == 2
    waiting = events(ledger, "1.2.3")[-1]
    assert waiting[:2] == (2, "completed") and waiting[3] == Level.WAITING
    analyse(settings, ledger, "1.2.3")
    got = events(ledger, "1.2.3")
    assert {g for g, *_ in got} == {1, 2}
    assert [(g, t) for g, k, t, _ in got if k == "completed"] == [
        (1, got[1][2]),
        (2, "complete: reprocessing asked for (no new instances)"),
    ]
    # The first generation's worklist case gave way: its reason is told as it was.
    assert [t for g, k, t, _ in got if k == "review"] == [
        "case 1 on the worklist: needs review",
        "case 1 closed: superseded",
    ]
    generations = [g for g, *_ in got]
    assert generations == sorted(generations)


def test_a_study_no_route_takes_says_why(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    ledger.complete_study(
        study_id(ledger, "1.2.3"), 1, lambda facts: [], lambda facts: "chest: modality CT",
        by="quiet_period",
    )  # fmt: skip
    failed = [(k, t) for _, k, t, level in events(ledger, "1.2.3") if level == Level.FAILED]
    assert failed == [("routed", "no routing rule matches this study: chest: modality CT")]


def test_an_hl7_order_is_told_without_its_patient(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    with ledger.session() as s:
        s.add(
            Hl7Order(
                accession_number="ACC99", study_uid="1.2.3", priority="S", expected_images=1,
                patient_id="PID-CANARY", patient_name="CANARY^PATIENT", birth_date="19700101",
            )
        )  # fmt: skip
    assert texts(ledger, "1.2.3", "order") == [
        "HL7 order received: STAT, 1 image(s) announced (scheduled)"
    ]
    trace = study_trace(ledger, "1.2.3")
    assert trace is not None
    dumped = json.dumps(trace.as_json()) + trace.render()
    assert "CANARY" not in dumped and "ACC99" not in dumped and "19700101" not in dumped


# ------------------------------------------------------------------ what completed it
def completed_by(ledger: Ledger, study: str) -> str:
    trace = study_trace(ledger, study)
    assert trace is not None
    return str(trace.study["completed_by"])


def test_the_ledger_records_what_completed_a_study(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    quiet = ledger.record_instance(dx_record("1.2.3", "1.2.3.1"), first_in_association=True)
    ledger.association_released([quiet.study_id])
    ledger.complete_study(quiet.study_id, 1, route_all, by="quiet_period")
    assert completed_by(ledger, "1.2.3") == "quiet_period"
    assert texts(ledger, "1.2.3", "completed")[0].startswith(
        "complete: no instance and no open association for the quiet period, "
    )
    # Still sending: the quiet period read is the upper bound on waiting.
    held = ledger.record_instance(dx_record("1.2.4", "1.2.4.1"), first_in_association=True)
    ledger.complete_study(held.study_id, 1, route_all, by="quiet_period")
    assert completed_by(ledger, "1.2.4") == "max_wait"
    # A re-opened study waits for completion again: nothing is said to have completed it.
    ledger.record_instance(dx_record("1.2.3", "1.2.3.2"), first_in_association=False)
    assert completed_by(ledger, "1.2.4") == "max_wait" and completed_by(ledger, "1.2.3") == ""
    # Its second generation completes by another signal: each generation tells its own.
    ledger.association_released([quiet.study_id])
    ledger.complete_study(quiet.study_id, 2, route_all, by="release")
    assert [text.split(",")[0] for text in texts(ledger, "1.2.3", "completed")] == [
        "complete: no instance and no open association for the quiet period",
        "complete: its sender released the association (a release-complete sender)",
    ]


def test_the_completion_loop_records_the_signal_that_came_first(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    signals = CompletionSignals(ledger)
    service = CompletionService(
        settings, ledger, Celery("trace-test", broker="memory://"), signals=signals
    )
    service.decide = route_all  # type: ignore[method-assign]
    # A release-complete sender: its release completes the study before the quiet period.
    released = ledger.record_instance(dx_record("1.2.3", "1.2.3.1"), first_in_association=True)
    signals.released([released.study_id])
    ledger.association_released([released.study_id])
    # An HL7 order announced one image, and it came.
    ordered = ledger.record_instance(dx_record("1.2.4", "1.2.4.1"), first_in_association=True)
    ledger.association_released([ordered.study_id])
    with ledger.session() as s:
        s.add(Hl7Order(accession_number="A1", study_uid="1.2.4", expected_images=1))
    # Neither: the quiet period (set to 0 s here) completes it.
    quiet = ledger.record_instance(dx_record("1.2.5", "1.2.5.1"), first_in_association=True)
    ledger.association_released([quiet.study_id])
    settings.completion.quiet_period_s = 0
    assert len(service.tick()) == 3
    assert [completed_by(ledger, uid) for uid in ("1.2.3", "1.2.4", "1.2.5")] == [
        "release",
        "hl7_order",
        "quiet_period",
    ]


def test_a_study_another_ae_sends_again_is_routed_and_shown_as_that_aes(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    """A modality sent the study, which no route took (the one route takes the PACS's
    studies); the PACS sends it again: the completion loop routes the new generation as the
    PACS's, and ``studies show`` names the PACS, and the modality as the first sender."""
    settings, ledger = ledger_node
    settings.routes = [Route(name="from-pacs", match=RouteMatch(calling_ae=["PACS2"]))]
    settings.completion.quiet_period_s = 0
    service = CompletionService(settings, ledger, Celery("sender-test", broker="memory://"))
    sent = replace(dx_record("1.2.3", "1.2.3.1", ae="MOD1"), crc32=1)
    r = ledger.record_instance(sent, first_in_association=True)
    ledger.association_released([r.study_id])
    assert service.tick() == []
    view = ledger.get_study("1.2.3")
    assert view is not None and view["state"] == "not_routed"
    assert "the study has MOD1, the route wants PACS2" in view["reason"]

    # The same instance, sent again by the PACS: a new generation, the PACS's.
    again = ledger.record_instance(replace(sent, calling_ae="PACS2"), first_in_association=True)
    assert again.reopened
    ledger.association_released([r.study_id])
    (job_id,) = service.tick()
    view = ledger.get_study("1.2.3")
    assert view is not None and view["state"] == "queued"
    assert [(j["id"], j["route"], j["generation"]) for j in view["jobs"]] == [
        (job_id, "from-pacs", 2)
    ]
    assert (view["calling_ae"], view["generation_calling_ae"]) == ("MOD1", "PACS2")
    assert texts(ledger, "1.2.3", "received") == ["1 instance(s) in 1 series (DX) from PACS2"]
    config = settings.data_dir.parent / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
    )
    assert main(["--config", str(config), "studies", "show", "1.2.3"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  state queued, generation 2, 1 instance(s), DX from PACS2 (first sent by MOD1)"
    )


# ------------------------------------------------------------------ where it is read
def test_studies_show_prints_the_trace_and_fails_for_an_unknown_study(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    deliver(ledger)
    config = settings.data_dir.parent / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
    )
    assert main(["--config", str(config), "studies", "show", "1.2.3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study 1.2.3\n  state delivered, generation 1, 1 instance(s), DX")
    assert "stored by pacs" in out and "turnaround of the latest analysis" in out
    assert main(["--config", str(config), "studies", "show", "1.2.3", "9.9.9", "--json"]) == 1
    captured = capsys.readouterr()
    assert "9.9.9: not in the ledger" in captured.err
    (shown,) = json.loads(captured.out)
    assert shown["study"]["study_uid"] == "1.2.3"
    assert {e["kind"] for e in shown["events"]} >= {"received", "completed", "delivery"}


def test_the_api_gives_the_trace_and_finds_studies(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)
    receive(settings, ledger, "1.2.4", "1.2.4.1")
    add_user(ledger, "jane.doe")
    auth = ("jane.doe", PASSWORD)
    with TestClient(create_app(settings, ledger)) as client:
        assert client.get("/api/studies/1.2.3/trace").status_code == 401
        answer = client.get("/api/studies/1.2.3/trace", auth=auth)
        assert answer.status_code == 200
        body: dict[str, Any] = answer.json()
        assert body["study"]["state"] == "failed"
        assert any(e["level"] == "failed" and e["kind"] == "delivery" for e in body["events"])
        assert client.get("/api/studies/9.9.9/trace", auth=auth).status_code == 404

        def found(**query: str) -> list[str]:
            answer = client.get("/api/studies", params=query, auth=auth)
            assert answer.status_code == 200, answer.text
            return [st["study_uid"] for st in answer.json()["studies"]]

        assert found() == ["1.2.4", "1.2.3"]
        assert found(state="failed") == ["1.2.3"]
        assert found(uid="1.2.4") == ["1.2.4"]
        assert found(uid="1.2.%") == []  # a LIKE wildcard is read as itself
        assert found(calling_ae="MOD") == ["1.2.4", "1.2.3"]
        assert found(calling_ae="CT1") == []
        assert client.get("/api/studies?state=lost", auth=auth).status_code == 422


def test_the_studies_pages_find_a_study_and_tell_its_trace(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger, error="association rejected")
    receive(settings, ledger, "1.2.4", "1.2.4.1")
    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "jane.doe")
        page = client.get("/review/studies")
        assert page.status_code == 200
        assert '<a href="/review/studies/1.2.3">1.2.3</a>' in page.text
        assert '<a href="/review/studies/1.2.4">1.2.4</a>' in page.text
        page = client.get("/review/studies", params={"state": "failed"})
        assert "/review/studies/1.2.3" in page.text and "/review/studies/1.2.4" not in page.text
        study = client.get("/review/studies/1.2.3")
        assert study.status_code == 200
        assert "association rejected" in study.text and 'class="level-failed"' in study.text
        assert "Reprocess" not in study.text  # a radiologist sees, an administrator acts
        assert client.get("/review/studies/9.9.9").status_code == 404

    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        csrf = sign_in(client, "ada.admin")
        # The dashboard's failed studies lead to the trace.
        assert '<a href="/review/studies/1.2.3">1.2.3</a>' in client.get("/review/dashboard").text
        study = client.get("/review/studies/1.2.3")
        assert 'action="/review/studies/1.2.3/resend"' in study.text
        assert 'action="/review/studies/1.2.3/reprocess"' in study.text
        assert "/resend" not in client.get("/review/studies/1.2.4").text  # still receiving
        answer = client.post(
            "/review/studies/1.2.3/resend",
            data={"csrf_token": csrf, "next": "study"},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/review/studies/1.2.3?done=resend"
        page = client.get(answer.headers["location"])
        assert "back in the outbox" in page.text and "waiting for pacs" in page.text
        # A name that is not one of the two actions is no action at all.
        other = client.post("/review/studies/1.2.3/retrieve", data={"csrf_token": csrf})
        assert other.status_code == 404
