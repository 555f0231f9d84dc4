"""Turnaround: last instance to results stored, per route and step, read from the ledger
(SQLite and PostgreSQL); and where people read it: ``acwi-node monitor``,
``GET /api/monitoring``, the Monitoring page, the dashboard and the metrics."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from acwi_node.cli import main
from acwi_node.config import MonitoringSettings, Settings
from acwi_node.ledger import Ledger, ResultFile, RoutedJob
from acwi_node.ledger.models import Instance, Job, Study, utcnow
from acwi_node.ledger.repository import STAT_PRIORITY
from acwi_node.ledger.trace import study_trace
from acwi_node.model_overview import models_overview
from acwi_node.monitoring.drift import Status
from acwi_node.monitoring.turnaround import (
    ALL,
    STAT,
    RouteTurnaround,
    TurnaroundMonitor,
    duration,
    format_turnaround,
    percentile,
)
from acwi_node.notify.events import slow_payload
from acwi_node.observability.metrics import ledger_registry
from acwi_node.web.api import create_app
from tests.support.review_case import add_user, sign_in
from tests.support.study_flow import SR, dx_record, timed_study

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)
HOUR_BEFORE = NOW - dt.timedelta(hours=1)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1 .. 20
    assert percentile(values, 50) == 10.0 and percentile(values, 95) == 19.0
    assert percentile(values[::-1], 95) == 19.0 and percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None
    assert [duration(s) for s in (None, 4.25, 390.0, 9000.0)] == ["-", "4.2 s", "6.5 min", "2.5 h"]


def monitor(ledger: Ledger, **cfg: float) -> TurnaroundMonitor:
    return TurnaroundMonitor(ledger, MonitoringSettings.model_validate(cfg))


def seconds(route: RouteTurnaround, step: str) -> tuple[float | None, float | None, float | None]:
    f = route.step(step)
    return f.p50, f.p95, f.max


def test_each_step_is_read_from_the_ledgers_times(ledger_node: tuple[Settings, Ledger]) -> None:
    _, ledger = ledger_node
    for n in range(10):  # analyses of 1 to 10 s; the tenth study is STAT
        timed_study(
            ledger,
            f"1.2.{n}",
            steps=(2.0, 0.5, n + 1.0, 1.0),
            priority=STAT_PRIORITY * (n == 9),
            at=HOUR_BEFORE,
        )
    timed_study(ledger, "1.3.1", route="ct", steps=(5.0, 0.0, 60.0, 2.0), at=HOUR_BEFORE)
    report = monitor(ledger).report(now=NOW)
    assert [r.route for r in report.routes] == [ALL, STAT, "chest", "ct"]
    stat = report.routes[1]  # the STAT studies of every route, against their own goal
    assert (stat.studies, stat.stat, stat.status, stat.goal_s) == (1, 1, Status.TOO_FEW, 120.0)
    assert seconds(stat, "total") == (13.5, 13.5, 13.5)
    chest = report.routes[2]
    assert (chest.studies, chest.stat, chest.overdue) == (10, 1, 0)
    assert seconds(chest, "completion") == (2.0, 2.0, 2.0)
    assert seconds(chest, "queue") == (0.5, 0.5, 0.5)
    assert seconds(chest, "analysis") == (5.0, 10.0, 10.0)
    assert seconds(chest, "delivery") == (1.0, 1.0, 1.0)
    assert seconds(chest, "total") == (8.5, 13.5, 13.5)
    assert chest.status is Status.STABLE
    ct = report.routes[3]
    assert (ct.studies, ct.status) == (1, Status.TOO_FEW)  # one study: not read
    assert seconds(ct, "total") == (67.0, 67.0, 67.0)
    assert report.overall.studies == 11 and seconds(report.overall, "total")[2] == 67.0
    assert report.status is Status.STABLE


def test_a_route_is_slow_when_its_95th_percentile_passes_the_goal(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _, ledger = ledger_node
    for n in range(20):  # one in twenty slow is the 95th percentile's business, two are not
        timed_study(
            ledger, f"1.2.{n}", steps=(2.0, 1.0, 1.0, 1.0 if n < 18 else 600.0), at=HOUR_BEFORE
        )
    report = monitor(ledger, turnaround_goal_s=300).report(now=NOW)
    assert report.routes[1].status is Status.SHIFTED and report.status is Status.SHIFTED
    assert seconds(report.routes[1], "delivery")[1] == 600.0
    assert monitor(ledger, turnaround_goal_s=700).report(now=NOW).status is Status.STABLE
    # Too few studies to read the percentile: not slow.
    few = monitor(ledger, turnaround_goal_s=300, turnaround_min_studies=21).report(now=NOW)
    assert few.status is Status.TOO_FEW


def test_stat_studies_are_held_to_their_own_goal(ledger_node: tuple[Settings, Ledger]) -> None:
    """Five STAT studies in 3.5 min: within the routine goal (5 min), their route is fine;
    over the STAT goal (2 min), the ``stat`` row is slow, and so is the report, in every place
    it is read. A STAT study on its way for 3 min is overdue as STAT, not for its route."""
    settings, ledger = ledger_node
    hour_ago = utcnow() - dt.timedelta(hours=1)
    for n in range(5):
        timed_study(ledger, f"1.2.{n}", steps=(2.0, 0.5, 1.0, 1.0), at=hour_ago)
        timed_study(ledger, f"1.3.{n}", steps=(2.0, 200.0, 6.0, 2.0), at=hour_ago,
                    priority=STAT_PRIORITY)  # fmt: skip
    report = monitor(ledger).report()
    stat, chest = report.routes[1], report.routes[2]
    assert (stat.route, stat.studies, stat.status) == (STAT, 5, Status.SHIFTED)
    assert seconds(stat, "queue") == (200.0, 200.0, 200.0)
    assert (chest.route, chest.studies, chest.stat, chest.status) == ("chest", 10, 5, Status.STABLE)
    assert report.status is Status.SHIFTED
    assert "STAT studies, all routes (goal 2.0 min)" in format_turnaround(report)
    assert monitor(ledger, turnaround_stat_goal_s=300).report().status is Status.STABLE
    text = slow_payload(settings, report, stat, utcnow())["text"]
    assert "results of STAT studies are slow: 95th percentile 3.5 min" in text
    assert "(goal 2.0 min); the longest step: queue (3.3 min)" in text

    registry = ledger_registry(settings, ledger)
    assert registry.get_sample_value("acwi_turnaround_status", {"route": "stat"}) == 2
    assert registry.get_sample_value("acwi_turnaround_status", {"route": "chest"}) == 0
    settings = settings.model_copy(
        update={"review": settings.review.model_copy(update={"cookie_secure": False})}
    )
    add_user(ledger)
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client)
        page = client.get("/review/monitoring").text
        assert "STAT studies, all routes (goal 2.0 min)" in page
        assert "slow: STAT studies</td>" in client.get("/review/dashboard").text

    timed_study(ledger, "1.4.1", at=utcnow() - dt.timedelta(minutes=3), stored=False,
                priority=STAT_PRIORITY)  # fmt: skip
    timed_study(ledger, "1.4.2", at=utcnow() - dt.timedelta(minutes=3), stored=False)
    waiting = monitor(ledger, turnaround_hours=1).report(now=utcnow() + dt.timedelta(hours=2))
    assert [(r.route, r.overdue, r.status) for r in waiting.routes] == [
        (ALL, 2, Status.WATCH), (STAT, 1, Status.WATCH), ("chest", 2, Status.WATCH),
    ]  # fmt: skip
    fresh = monitor(ledger).report()  # 3 minutes: over the STAT goal, not the routine one
    assert [(r.route, r.overdue) for r in fresh.routes] == [(ALL, 0), (STAT, 1), ("chest", 0)]


def test_studies_still_on_their_way_past_the_goal_are_overdue(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _, ledger = ledger_node
    timed_study(ledger, "1.2.1", at=utcnow() - dt.timedelta(minutes=30), stored=False)
    timed_study(ledger, "1.2.2", at=utcnow() - dt.timedelta(seconds=20), stored=False)
    waiting = ledger.record_instance(dx_record("1.2.3", "1.2.3.1"), first_in_association=False)
    routed = RoutedJob(route="ct", model="default", destinations=["pacs"], priority=0)
    ledger.complete_study(waiting.study_id, 1, lambda facts: [routed])  # queued, never taken
    with ledger.session() as s:
        s.execute(update(Instance).where(Instance.study_id == waiting.study_id).values(
            received_at=utcnow() - dt.timedelta(hours=3)))  # fmt: skip
    report = monitor(ledger, turnaround_goal_s=300).report()
    assert [(r.route, r.studies, r.overdue, r.status) for r in report.routes] == [
        (ALL, 0, 2, Status.WATCH),
        ("chest", 0, 1, Status.WATCH),
        ("ct", 0, 1, Status.WATCH),
    ]


def test_the_window_and_reprocessing_leave_studies_out(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _, ledger = ledger_node
    day = dt.timedelta(days=1)
    timed_study(ledger, "1.2.1", at=HOUR_BEFORE)
    timed_study(ledger, "1.2.2", at=NOW - dt.timedelta(hours=30))  # stored before the last 24 h
    timed_study(ledger, "1.2.3", at=HOUR_BEFORE)
    # Received three days ago, stored an hour ago (the PACS was down): in the window.
    timed_study(ledger, "1.2.4", at=NOW - 3 * day, steps=(1.0, 1.0, 1.0, 3 * 86400 - 3600.0))
    # Reprocessed: its new generation has no instance of its own, no PACS waited for it.
    generation = ledger.reprocess_study("1.2.3")
    with ledger.session() as s:
        study_id = s.scalars(select(Study.id).where(Study.study_uid == "1.2.3")).one()
    (job_id,) = ledger.complete_study(
        study_id, generation, lambda facts: [RoutedJob("chest", "default", ["pacs"], 0)]
    )
    assert ledger.claim_job(job_id, lease_s=3600) is not None
    ledger.finish_analysis(
        job_id, results=[], summary={"predicted_label": "normal"}, needs_review=False,
        review_reason="",
    )  # fmt: skip
    # 1.2.1, 1.2.3's first analysis and 1.2.4; not 1.2.2, nor 1.2.3's reprocessing.
    report = monitor(ledger).report(now=NOW)
    assert report.overall.studies == 3 and report.status is Status.TOO_FEW
    assert seconds(report.overall, "total")[2] == 3 * 86400 - 3600 + 3.0


def test_a_verified_sr_stored_later_neither_counts_nor_moves_a_study(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A radiologist's verified SR (or a rejection note) is stored days after the analysis's
    results: the study keeps its own turnaround, in its own window, and is never overdue."""
    _, ledger = ledger_node
    job_id = timed_study(ledger, "1.2.5", at=NOW - dt.timedelta(days=3))
    timed_study(ledger, "1.2.6", at=HOUR_BEFORE)
    ledger.attach_result(job_id, ResultFile("sr-verified", "1.2.5.78", SR, "1.2.5/v.dcm"))
    # waiting in the outbox, three days after its last instance: not overdue
    assert monitor(ledger).report(now=NOW).overall.overdue == 0
    for d in ledger.due_deliveries():
        ledger.record_delivery(d.id, delivered=True, status=0, error="", max_attempts=3,
                               backoff_s=1)  # fmt: skip
    with ledger.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(finished_at=HOUR_BEFORE))
    # stored an hour ago, but its results three days ago: not in the last 24 hours
    report = monitor(ledger).report(now=NOW)
    assert report.overall.studies == 1
    assert seconds(report.overall, "total")[2] == 5.0


def test_a_report_forwarded_after_completion_is_no_instance_the_study_waited_for(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The PACS forwards a key image note an hour later: kept in the study without re-opening
    it, it moves neither the turnaround nor the study's trace."""
    _, ledger = ledger_node
    timed_study(ledger, "1.2.7", at=HOUR_BEFORE)
    kos = replace(dx_record("1.2.7", "1.2.7.9"), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.59")
    assert ledger.record_instance(kos, first_in_association=False).kept
    with ledger.session() as s:
        s.execute(update(Instance).where(Instance.sop_instance_uid == "1.2.7.9").values(
            received_at=HOUR_BEFORE + dt.timedelta(minutes=30)))  # fmt: skip
        s.execute(update(Study).where(Study.study_uid == "1.2.7").values(
            completed_at=HOUR_BEFORE + dt.timedelta(seconds=2)))  # fmt: skip
    report = monitor(ledger).report(now=NOW)
    assert seconds(report.overall, "total") == (5.0, 5.0, 5.0)
    assert seconds(report.overall, "completion") == (2.0, 2.0, 2.0)
    trace = study_trace(ledger, "1.2.7")
    assert trace is not None
    assert [(st.name, st.seconds) for st in trace.turnaround][0] == (
        "last instance to complete",
        2.0,
    )
    assert trace.turnaround[-1].seconds == 5.0
    assert "2.0 s after the last instance" in trace.render()


def test_monitor_api_pages_and_metrics_tell_a_slow_route(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    now = utcnow()
    for n in range(6):
        timed_study(
            ledger, f"1.2.{n}", at=now - dt.timedelta(hours=1), steps=(2.0, 1.0, 1.0, 400.0)
        )
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
    )
    assert main(["--config", str(config), "monitor"]) == 1
    out = capsys.readouterr().out
    assert "turnaround: SLOW  (results stored in the last 24 h, last instance to stored;" in out
    assert re.search(r"chest +6 +2\.0 s / 2\.0 s .* 6\.7 min / 6\.7 min +0 +slow", out), out
    assert main(["--config", str(config), "monitor", "--json"]) == 1
    body = json.loads(capsys.readouterr().out)["turnaround"]
    assert body["status"] == "shifted" and body["goal_s"] == 300.0
    assert body["routes"][1]["steps"][-1] == {"step": "total", "p50": 404.0, "p95": 404.0,
                                               "max": 404.0}  # fmt: skip
    known = models_overview(settings, ledger)[0].versions[0].name  # the node's running model
    assert main(["--config", str(config), "monitor", "--model", known, "--json"]) == 0
    assert "turnaround" not in json.loads(capsys.readouterr().out)

    settings = settings.model_copy(
        update={"review": settings.review.model_copy(update={"cookie_secure": False})}
    )
    registry = ledger_registry(settings, ledger)
    assert registry.get_sample_value("acwi_turnaround_status", {"route": "chest"}) == 2
    assert registry.get_sample_value("acwi_turnaround_studies", {"route": "all"}) == 6
    assert registry.get_sample_value("acwi_turnaround_overdue", {"route": "chest"}) == 0
    labels = {"route": "chest", "step": "delivery", "quantile": "0.95"}
    assert registry.get_sample_value("acwi_turnaround_seconds", labels) == 400.0

    add_user(ledger)
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client)
        turnaround = client.get("/api/monitoring").json()["turnaround"]
        assert [(r["route"], r["status"]) for r in turnaround["routes"]] == [
            ("all", "shifted"),
            ("chest", "shifted"),
        ]
        page = client.get("/review/monitoring").text
        assert 'id="turnaround"' in page and 'status status-shifted">slow</span>' in page
        assert '<td class="num">6.7 min / 6.7 min</td>' in page
        dashboard = client.get("/review/dashboard").text
        assert (
            '<td id="q-turnaround">median 6.7 min, 95th percentile 6.7 min over 6 studies'
            " (goal 5.0 min); slow: chest</td>"
        ) in dashboard
