"""Routes' ``max_age_days`` counts the hospital's days (``monitoring.timezone``): a Study Date is
on the modality's clock, and the node's own clock (UTC in a container) is a day ahead of New
York's every evening."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
from celery import Celery

from acwi_node.config import Route, RouteMatch, Settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ledger import Ledger, StudyFacts
from acwi_node.routing.rules import hospital_today

ROUTE = Route(name="today", match=RouteMatch(max_age_days=1))


@pytest.fixture
def node_in_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("zone", "now", "today"),
    [
        ("America/New_York", dt.datetime(2026, 11, 2, 3, 30), dt.date(2026, 11, 1)),
        ("America/New_York", dt.datetime(2026, 11, 1, 5, 30), dt.date(2026, 11, 1)),  # 01:30 EDT
        ("America/New_York", dt.datetime(2026, 11, 1, 6, 30), dt.date(2026, 11, 1)),  # 01:30 EST
        ("Asia/Kolkata", dt.datetime(2026, 3, 28, 18, 30), dt.date(2026, 3, 29)),
        ("Asia/Kolkata", dt.datetime(2026, 3, 28, 18, 29), dt.date(2026, 3, 28)),
        ("Australia/Lord_Howe", dt.datetime(2026, 4, 4, 13, 0), dt.date(2026, 4, 5)),
        ("UTC", dt.datetime(2026, 3, 28, 23, 59), dt.date(2026, 3, 28)),
    ],
)
def test_hospital_today(zone: str, now: dt.datetime, today: dt.date) -> None:
    assert hospital_today(zone, now) == today
    assert hospital_today(zone, now.replace(tzinfo=dt.timezone.utc)) == today


def test_completion_routes_by_the_hospitals_date(
    settings: Settings, ledger: Ledger, node_in_utc: None
) -> None:
    """A study done yesterday evening in New York (Study Date the 1st), completing at 20:00 on
    the 2nd there (01:00 UTC on the 3rd): a day old on the hospital's clock, two on UTC's."""
    settings.routes = [ROUTE]
    settings.monitoring.timezone = "America/New_York"
    service = CompletionService(settings, ledger, Celery("tz-test", broker="memory://"))
    service.wall_clock = lambda: dt.datetime(2026, 12, 3, 1, 0)
    study = StudyFacts("1.2.3", "CT1", {"CT"}, set(), set(), study_date="20261201")
    assert [job.route for job in service.decide(study)] == ["today"]
    assert "matches" in service.explain(study)
    older = StudyFacts("1.2.4", "CT1", {"CT"}, set(), set(), study_date="20261130")
    assert service.decide(older) == []
