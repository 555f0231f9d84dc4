"""Operator actions on a study: its results sent again, the study routed and analysed again.
In the ledger (SQLite and PostgreSQL), from the command line and over the HTTP API."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE
from sqlalchemy import select

from acwi_node.cli import main
from acwi_node.config import Destination, Settings
from acwi_node.ledger import Ledger, StudyActionRefused
from acwi_node.ledger.models import ReviewItem
from acwi_node.retention import DiskSpace, Retention
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from tests.support.ports import free_port
from tests.support.review_case import CSRF, PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, deliver, receive, route_all, study_id
from tests.unit.test_retention import later


def fail_deliveries(ledger: Ledger, *, error: str = "refused") -> None:
    """Every due delivery tried once, failed for good with ``error``."""
    for d in ledger.due_deliveries():
        ledger.record_delivery(
            d.id, delivered=False, status=None, error=error, max_attempts=1, backoff_s=1
        )


def deliveries(ledger: Ledger, study: str) -> list[tuple[str, int]]:
    view = ledger.get_study(study)
    assert view is not None
    return [
        (d["state"], d["attempts"])
        for j in view["jobs"]
        for r in j["results"]
        for d in r["deliveries"]
    ]


def test_results_that_failed_for_good_go_out_again(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)
    view = ledger.get_study("1.2.3")
    assert view is not None and view["state"] == "failed" and "refused" in view["reason"]
    assert deliveries(ledger, "1.2.3") == [("failed", 1)]

    assert ledger.resend_results("1.2.3") == 1
    view = ledger.get_study("1.2.3")
    assert view is not None and view["state"] == "exporting" and view["reason"] == ""
    assert deliveries(ledger, "1.2.3") == [("pending", 0)]
    assert [d.study_uid for d in ledger.due_deliveries()] == ["1.2.3"]
    deliver(ledger)
    assert ledger.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]
    # Delivered results can be sent again too (the PACS lost them).
    assert ledger.resend_results("1.2.3") == 1
    assert deliveries(ledger, "1.2.3") == [("pending", 0)]


def test_resend_refuses_what_it_cannot_do(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    with pytest.raises(StudyActionRefused, match="no such study"):
        ledger.resend_results("9.9.9")
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    with pytest.raises(StudyActionRefused, match="the study is receiving"):
        ledger.resend_results("1.2.3")
    (job_id,) = ledger.complete_study(study_id(ledger, "1.2.3"), 1, route_all)
    ledger.fail_job(job_id, "analysis failed: nothing analysable")
    with pytest.raises(StudyActionRefused, match="reprocess it instead"):
        ledger.resend_results("1.2.3")
    # Files deleted by storage retention: neither action can work.
    Retention(settings, ledger, space=lambda: DiskSpace(900, 1000), clock=later(200)).sweep()
    for action in (ledger.resend_results, ledger.reprocess_study):
        with pytest.raises(StudyActionRefused, match="send it again from the PACS"):
            action("1.2.3")


def test_a_reprocessed_study_is_routed_and_analysed_again_as_a_new_generation(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    receive(settings, ledger, "1.2.3", "1.2.3.2")
    analyse(settings, ledger, "1.2.3", needs_review=True)
    deliver(ledger)
    receive(settings, ledger, "1.2.4", "1.2.4.1")
    with pytest.raises(StudyActionRefused, match="the study is receiving"):
        ledger.reprocess_study("1.2.4")

    assert ledger.reprocess_study("1.2.3") == 2
    view = ledger.get_study("1.2.3")
    assert view is not None and (view["state"], view["generation"]) == ("receiving", 2)
    sid = study_id(ledger, "1.2.3")
    assert (sid, 2) in ledger.studies_due(quiet_period_s=0, max_wait_s=3600)
    (job_id,) = ledger.complete_study(sid, 2, route_all)
    assert ledger.job_inputs(job_id) == ("1.2.3", ["1.2.3/1.2.3.1.dcm", "1.2.3/1.2.3.2.dcm"])
    with ledger.session() as s:  # the old job's worklist item gave way to the new analysis
        assert [(r.state.value, r.reason) for r in s.scalars(select(ReviewItem))] == [
            ("closed", "superseded")
        ]
    with pytest.raises(StudyActionRefused, match="the study is queued"):
        ledger.reprocess_study("1.2.3")


def test_a_study_no_rule_routed_is_reprocessed_after_the_rules_change(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    assert ledger.complete_study(study_id(ledger, "1.2.3"), 1, lambda facts: []) == []
    assert ledger.get_study("1.2.3")["state"] == "not_routed"  # type: ignore[index]
    assert ledger.reprocess_study("1.2.3") == 2
    assert len(ledger.complete_study(study_id(ledger, "1.2.3"), 2, route_all)) == 1


def test_the_command_line_reports_each_study(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)
    config = settings.data_dir.parent / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
    )
    assert main(["--config", str(config), "studies", "resend", "1.2.3", "9.9.9"]) == 1
    captured = capsys.readouterr()
    assert "1.2.3: 1 result deliveries back in the outbox" in captured.out
    assert "9.9.9: no such study" in captured.err
    deliver(ledger)
    assert main(["--config", str(config), "studies", "reprocess", "1.2.3"]) == 0
    assert "1.2.3: reprocessing as generation 2" in capsys.readouterr().out


def test_the_api_lets_administrators_act_on_json_requests_only(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)
    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    admin, radiologist = ("ada.admin", PASSWORD), ("jane.doe", PASSWORD)
    with TestClient(create_app(settings, ledger)) as client:
        url = "/api/studies/1.2.3/resend"
        assert client.post(url, json={}).status_code == 401
        assert client.post(url, json={}, auth=radiologist).status_code == 403
        # A form post (what a cross-site page can send without a preflight) is refused.
        assert client.post(url, data={"x": "1"}, auth=admin).status_code == 415
        answer = client.post(url, json={}, auth=admin)
        assert answer.status_code == 200, answer.text
        assert answer.json()["deliveries"] == 1
        assert answer.json()["study"]["state"] == "exporting"
        refused = client.post("/api/studies/1.2.3/reprocess", json={}, auth=admin)
        assert refused.status_code == 409 and "exporting" in refused.json()["detail"]
        deliver(ledger)
        answer = client.post("/api/studies/1.2.3/reprocess", json={}, auth=admin)
        assert answer.status_code == 200 and answer.json()["generation"] == 2
        # a study the node does not hold is not found, as by withdraw and GET (not a 409)
        for action in ("resend", "reprocess", "withdraw"):
            missing = client.post(
                f"/api/studies/9.9.9/{action}", json={"note": "wrong study"}, auth=admin
            )
            assert missing.status_code == 404, (action, missing.text)
            assert missing.json()["detail"] == "no such study"


def test_administrators_resend_and_reprocess_failed_studies_from_the_dashboard(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)  # delivery failed: resend and reprocess offered
    receive(settings, ledger, "1.2.4", "1.2.4.1")
    (job_id,) = ledger.complete_study(study_id(ledger, "1.2.4"), 1, route_all)
    ledger.fail_job(job_id, "analysis failed: nothing analysable")  # reprocess only
    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "jane.doe")
        page = client.get("/review/dashboard")
        assert page.status_code == 200 and "Failed studies" not in page.text
        csrf = CSRF.search(page.text)
        assert csrf is not None
        refused = client.post("/review/studies/1.2.3/resend", data={"csrf_token": csrf.group(1)})
        assert refused.status_code == 403

    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        csrf_token = sign_in(client, "ada.admin")
        html = client.get("/review/dashboard").text
        assert "Failed studies" in html and "nothing analysable" in html
        assert '<td id="q-deleted">0</td>' in html
        assert re.search(r'<td id="q-disk">\d+%</td>', html)
        assert 'action="/review/studies/1.2.3/resend"' in html
        assert 'action="/review/studies/1.2.4/resend"' not in html
        assert 'action="/review/studies/1.2.4/reprocess"' in html
        forged = client.post("/review/studies/1.2.3/resend", data={"csrf_token": "x"})
        assert forged.status_code == 403
        assert deliveries(ledger, "1.2.3") == [("failed", 1)]
        done = client.post(
            "/review/studies/1.2.3/resend",
            data={"csrf_token": csrf_token},
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"].endswith("done=resend")
        assert deliveries(ledger, "1.2.3") == [("pending", 0)]
        assert "back in the outbox" in client.get(done.headers["location"]).text
        again = client.post("/review/studies/1.2.3/resend", data={"csrf_token": csrf_token})
        assert again.status_code == 409 and "the study is exporting" in again.text
        missing = client.post("/review/studies/9.9.9/resend", data={"csrf_token": csrf_token})
        assert missing.status_code == 404 and "9.9.9: no such study" in missing.text
        done = client.post(
            "/review/studies/1.2.4/reprocess",
            data={"csrf_token": csrf_token},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert ledger.get_study("1.2.4")["generation"] == 2  # type: ignore[index]
        assert (
            client.post("/review/studies/1.2.4/delete", data={"csrf_token": csrf_token}).status_code
            == 404
        )


def test_administrators_see_each_destination_s_outbox_on_the_dashboard(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)  # failed for good: "refused"
    receive(settings, ledger, "1.2.4", "1.2.4.1")
    analyse(settings, ledger, "1.2.4")
    deliver(ledger)
    receive(settings, ledger, "1.2.5", "1.2.5.1")
    analyse(settings, ledger, "1.2.5")  # waiting
    rows = ReviewStore(ledger).delivery_status(["archive", "pacs"])
    assert [(r["name"], r["configured"], r["pending"], r["failed"]) for r in rows] == [
        ("archive", True, 0, 0),
        ("pacs", True, 1, 1),
    ]
    assert rows[0]["last_delivered_at"] is None and rows[0]["last_error"] == ""
    assert rows[1]["last_delivered_at"] is not None and rows[1]["last_error"] == "refused"
    # A destination removed from the configuration still shows while its outbox holds results.
    (gone,) = ReviewStore(ledger).delivery_status([])
    assert (gone["name"], gone["configured"], gone["failed"]) == ("pacs", False, 1)
    assert ledger.resend_results("1.2.3") == 1
    (resent,) = ReviewStore(ledger).delivery_status(["pacs"])
    assert resent["failed"] == 0 and resent["pending"] == 2
    # The resent result's error was before the resend: none shows until it is tried again.
    assert resent["last_error"] == ""

    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "jane.doe")
        assert "<h2>Destinations</h2>" not in client.get("/review/dashboard").text
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "ada.admin")
        page = client.get("/review/dashboard").text
        assert "<h2>Destinations</h2>" in page
        row = re.search(r'<tr id="outbox-pacs">(.*?)</tr>', page, re.S)
        assert row is not None
        cells = re.findall(r"<td>(.*?)</td>", row.group(1), re.S)
        # Two waiting (one resent, its earlier error not shown), none failed, delivered once.
        assert cells[:3] == ["pacs (no longer configured)", "2", "0"]
        assert cells[3] != "-" and cells[4] == "-"
    with TestClient(create_app(settings, ledger)) as client:
        assert client.get("/api/destinations").status_code == 401
        assert client.get("/api/destinations", auth=("jane.doe", PASSWORD)).status_code == 403
        answer = client.get("/api/destinations", auth=("ada.admin", PASSWORD))
        assert answer.status_code == 200
        ((name, waiting),) = [(r["name"], r["pending"]) for r in answer.json()["destinations"]]
        assert (name, waiting) == ("pacs", 2)
    fail_deliveries(ledger, error="association rejected")
    assert ReviewStore(ledger).delivery_status(["pacs"])[0]["last_error"] == (
        "association rejected"
    )


def test_administrators_check_a_destination_from_the_dashboard(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The dashboard's Check button C-ECHOes a destination: a Verification SCP answers; a port
    nobody listens on gives the reason."""
    settings, ledger = ledger_node
    peer = AE(ae_title="ECHOSCP")
    peer.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    settings = settings.model_copy(
        update={
            "destinations": [
                Destination(name="pacs", ae_title="ECHOSCP", host="127.0.0.1", port=port),
                Destination(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port()),
                Destination(name="web", url=f"http://127.0.0.1:{free_port()}/dicom-web"),
            ]
        }
    )
    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    try:
        with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
            csrf = sign_in(client, "jane.doe")
            refused = client.post("/review/destinations/pacs/check", data={"csrf_token": csrf})
            assert refused.status_code == 403
        with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
            csrf = sign_in(client, "ada.admin")
            page = client.get("/review/dashboard").text
            assert 'action="/review/destinations/pacs/check"' in page
            assert 'action="/review/destinations/down/check"' in page
            rows = dict(re.findall(r'<tr id="outbox-(\w+)">(.*?)</tr>', page, re.S))
            assert f"ECHOSCP@127.0.0.1:{port}" in rows["pacs"] and "Check (C-ECHO)" in rows["pacs"]
            assert "/dicom-web" in rows["web"] and "Check (QIDO-RS)" in rows["web"]
            api = {r["name"]: r for r in client.get("/api/destinations").json()["destinations"]}
            assert (api["web"]["check"], api["pacs"]["check"]) == ("QIDO-RS", "C-ECHO")
            assert api["pacs"]["where"] == f"ECHOSCP@127.0.0.1:{port}"
            web = client.post("/review/destinations/web/check", data={"csrf_token": csrf})
            assert web.status_code == 502 and "QIDO-RS failed: ConnectionRefused" in web.text
            ok = client.post("/review/destinations/pacs/check", data={"csrf_token": csrf})
            assert ok.status_code == 200
            assert f"pacs (ECHOSCP@127.0.0.1:{port}): C-ECHO ok, " in ok.text
            down = client.post("/review/destinations/down/check", data={"csrf_token": csrf})
            assert down.status_code == 502 and "connection refused" in down.text
            forged = client.post("/review/destinations/pacs/check", data={"csrf_token": "x"})
            assert forged.status_code == 403
            missing = client.post("/review/destinations/nope/check", data={"csrf_token": csrf})
            assert missing.status_code == 404
    finally:
        server.shutdown()
