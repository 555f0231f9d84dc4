"""Studies arriving: the drop statistics, and the studies of each source and route against
the same hours of the weeks before, as the ledger holds them (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from acwi_node.config import MonitoringSettings
from acwi_node.ledger import Ledger
from acwi_node.monitoring.drift import Status, drop_status, poisson_cdf
from acwi_node.monitoring.traffic import Flow, TrafficMonitor, describe
from tests.support.arrivals import WEEK, Arrivals

NOW = dt.datetime(2026, 12, 7, 10, 0, 0)  # a Monday morning
LEVELS: dict[str, Any] = {"min_weeks": 2, "min_drop": 0.5, "p_watch": 0.01, "p_shift": 0.001}


# ---------------------------------------------------------------------------- statistics
def test_poisson_lower_tail_matches_the_sums() -> None:
    assert poisson_cdf(0, 9.75) == pytest.approx(math.exp(-9.75))
    assert poisson_cdf(2, 1.0) == pytest.approx(math.exp(-1.0) * 2.5)
    assert poisson_cdf(3, 10.0) == pytest.approx(0.010336, rel=1e-4)
    # a mean of thousands neither underflows nor loses the tail: against the plain sum in
    # 60-digit decimals, where e^-5000 is no zero
    with localcontext() as ctx:
        ctx.prec = 60
        term = total = Decimal(-5000).exp()
        for i in range(1, 4801):
            term = term * 5000 / i
            total += term
    assert poisson_cdf(4800, 5000.0) == pytest.approx(float(total), rel=1e-9)
    assert poisson_cdf(10_000, 5000.0) == 1.0
    assert poisson_cdf(0, 0.0) == 1.0
    assert poisson_cdf(-1, 3.0) == 0.0


def test_a_drop_counts_only_below_every_week_before_and_unlikely_by_chance() -> None:
    # a busy source that sent nothing: shifted
    expected, p, status = drop_status(0, [10, 9, 11, 10], **LEVELS)
    assert expected == pytest.approx(10.0)
    assert p == pytest.approx(math.exp(-10.0))
    assert status is Status.SHIFTED
    # two where ten are usual: to be watched (p 0.0028); three: chance enough (p 0.0103)
    assert drop_status(2, [10, 9, 11, 10], **LEVELS)[2] is Status.WATCH
    assert drop_status(3, [10, 9, 11, 10], **LEVELS)[2] is Status.STABLE
    # a week as quiet before (a holiday) makes quiet ordinary, however busy the others
    assert drop_status(0, [40, 0, 38, 41], **LEVELS)[2] is Status.STABLE
    # a quiet source's silence is no evidence (p 0.08)
    assert drop_status(0, [2, 3, 2, 3], **LEVELS)[2] is Status.STABLE
    # a small dip of a large count is significant but no drop (min_drop)
    assert drop_status(900, [1000, 1010, 990, 1000], **LEVELS)[2] is Status.STABLE
    assert drop_status(400, [1000, 1010, 990, 1000], **LEVELS)[2] is Status.SHIFTED
    # one week before is too few to know the usual
    assert drop_status(0, [50], **LEVELS) == (None, None, Status.TOO_FEW)


def test_the_horizons_and_weeks_are_checked_at_start_up() -> None:
    with pytest.raises(ValueError, match="traffic_min_weeks"):
        MonitoringSettings(traffic_weeks=2, traffic_min_weeks=3)
    with pytest.raises(ValueError, match="1 to 168"):
        MonitoringSettings(traffic_hours=[0])
    with pytest.raises(ValueError, match="repeat"):
        MonitoringSettings(traffic_hours=[2, 2])


# ---------------------------------------------------------------------------- the ledger
def _flow(flows: list[Flow], kind: str, name: str) -> Flow:
    return next(f for f in flows if f.kind == kind and f.name == name)


def _started(arrivals: Arrivals, weeks: int = 5) -> None:
    """The node's first study, ``weeks`` weeks and a day ago."""
    arrivals.add(NOW - WEEK * weeks - dt.timedelta(days=1), "OLDCR")


def test_a_busy_source_that_stopped_is_told_and_the_others_are_not(db: Ledger) -> None:
    arrivals = Arrivals(db)
    _started(arrivals)
    arrivals.weekly(NOW, "CT1", [0, 10, 9, 11, 10], route="ct-chest")
    arrivals.weekly(NOW, "CR2", [6, 5, 6, 5, 6], route="chest")
    report = TrafficMonitor(db, MonitoringSettings(), routes=["chest", "ct-chest"]).report(NOW)

    assert report.weeks_covered == 4
    ct1 = _flow(report.flows, "source", "CT1")
    assert ct1.status is Status.SHIFTED
    two_hours = ct1.windows[0]
    assert (two_hours.hours, two_hours.studies, two_hours.history) == (2, 0, (10, 9, 11, 10))
    assert two_hours.expected == pytest.approx(10.0)
    assert describe(ct1) == "0 in the last 2 h, 10.0 expected (10, 9, 11, 10 the weeks before)"
    # its route got nothing either; the other source and route are as usual
    assert _flow(report.flows, "route", "ct-chest").status is Status.SHIFTED
    assert _flow(report.flows, "source", "CR2").status is Status.STABLE
    assert _flow(report.flows, "route", "chest").status is Status.STABLE
    # all studies: 6 where 14 to 17 came: p 0.0055, to be watched
    assert _flow(report.flows, "node", "all").status is Status.WATCH
    assert report.status is Status.SHIFTED
    assert [f.name for f in report.dropped()] == ["CT1", "ct-chest", "CT1 -> ct-chest"]
    assert report.dropped()[-1].title == "Studies from CT1 for route 'ct-chest'"
    # the node first, then the sources and the routes, the most concerning first
    assert [(f.kind, f.name) for f in report.flows][:3] == [
        ("node", "all"),
        ("source", "CT1"),
        ("source", "CR2"),
    ]
    as_json = report.as_json()
    assert as_json["status"] == "shifted"
    assert as_json["flows"][1]["windows"][0] == {
        "hours": 2,
        "studies": 0,
        "history": [10, 9, 11, 10],
        "expected": 10.0,
        "p_value": pytest.approx(math.exp(-10.0), rel=1e-2),
        "status": "shifted",
    }


def test_studies_that_arrive_but_no_longer_reach_their_route(db: Ledger) -> None:
    """A new protocol spells Body Part Examined differently: the source sends as ever, its
    studies are not routed."""
    arrivals = Arrivals(db)
    _started(arrivals)
    arrivals.weekly(NOW, "CR2", [0, 12, 10, 11, 12], route="chest")
    arrivals.weekly(NOW, "CR2", [11])  # now: received, not routed
    report = TrafficMonitor(db, MonitoringSettings(), routes=["chest"]).report(NOW)
    assert _flow(report.flows, "source", "CR2").status is Status.STABLE
    assert _flow(report.flows, "node", "all").status is Status.STABLE
    chest = _flow(report.flows, "route", "chest")
    assert chest.status is Status.SHIFTED
    assert chest.title == "Studies for route 'chest'"
    assert _flow(report.flows, "path", "CR2 -> chest").status is Status.SHIFTED


def test_one_sources_studies_that_no_longer_reach_their_route(db: Ledger) -> None:
    """One ward's studies stop matching; the route still gets the others' studies, as many
    as it lost is within the route's own variation: the path tells it."""
    arrivals = Arrivals(db)
    _started(arrivals)
    arrivals.weekly(NOW, "ER_DR", [30, 28, 34, 26, 31], route="chest")
    arrivals.weekly(NOW, "WARD_CR", [0, 9, 10, 8, 9], route="chest")
    arrivals.weekly(NOW, "WARD_CR", [9])  # received, not routed
    report = TrafficMonitor(db, MonitoringSettings(), routes=["chest"]).report(NOW)
    assert _flow(report.flows, "source", "WARD_CR").status is Status.STABLE
    assert _flow(report.flows, "route", "chest").status is Status.STABLE  # 30 of 37-40
    ward = _flow(report.flows, "path", "WARD_CR -> chest")
    assert ward.status is Status.SHIFTED and ward.windows[0].history == (9, 10, 8, 9)
    assert _flow(report.flows, "path", "ER_DR -> chest").status is Status.STABLE
    assert [(f.kind, f.name) for f in report.flows][-2:] == [
        ("path", "WARD_CR -> chest"),
        ("path", "ER_DR -> chest"),
    ]  # the most concerning first


def test_a_quiet_source_is_told_by_the_day_not_the_hours(db: Ledger) -> None:
    """Seven studies a day, one in the last two hours: none in them is ordinary, none all
    day is not."""
    arrivals = Arrivals(db)
    _started(arrivals)
    for week in range(1, 5):
        for hour in (1, 5, 9, 13, 17, 21, 23):  # seven studies a day, spread out
            arrivals.add(NOW - WEEK * week - dt.timedelta(hours=hour), "US3")
    # the horizons in any order: the shortest first
    report = TrafficMonitor(db, MonitoringSettings(traffic_hours=[24, 2])).report(NOW)
    us3 = _flow(report.flows, "source", "US3")
    hours2, day = us3.windows
    assert (hours2.hours, hours2.history, hours2.status) == (2, (1, 1, 1, 1), Status.STABLE)
    assert (day.hours, day.history, day.studies) == (24, (7, 7, 7, 7), 0)
    assert day.status is Status.SHIFTED  # p e^-7 = 0.0009
    assert us3.telling is day


def test_too_few_weeks_on_a_new_node_and_a_source_not_seen_before(db: Ledger) -> None:
    arrivals = Arrivals(db)
    arrivals.add(NOW - WEEK - dt.timedelta(days=1), "CT1", 20)
    arrivals.weekly(NOW, "CT1", [0, 20])
    report = TrafficMonitor(db, MonitoringSettings()).report(NOW)
    assert report.weeks_covered == 1
    assert report.status is Status.TOO_FEW
    assert _flow(report.flows, "source", "CT1").windows[0].history == (20,)
    # with a week enough, the same silence is told
    one_week = MonitoringSettings(traffic_min_weeks=1)
    assert TrafficMonitor(db, one_week).report(NOW).status is Status.SHIFTED
    # a source sending for the first time has nothing to drop from
    arrivals.add(NOW - dt.timedelta(minutes=5), "NEWMR", 3)
    assert _flow(TrafficMonitor(db, one_week).report(NOW).flows, "source", "NEWMR").status is (
        Status.STABLE
    )


def test_only_configured_routes_are_read(db: Ledger) -> None:
    arrivals = Arrivals(db)
    _started(arrivals)
    arrivals.weekly(NOW, "CR2", [0, 12, 10, 11, 12], route="retired")
    report = TrafficMonitor(db, MonitoringSettings(), routes=["chest"]).report(NOW)
    routes = [f.name for f in report.flows if f.kind == "route"]
    assert routes == ["chest"]  # listed, though it never got a study: as usual, none
    assert _flow(report.flows, "route", "chest").windows[0].history == (0, 0, 0, 0)
    assert _flow(report.flows, "route", "chest").status is Status.STABLE


def test_an_empty_ledger_compares_nothing(db: Ledger) -> None:
    report = TrafficMonitor(db, MonitoringSettings()).report(NOW)
    assert report.weeks_covered == 0
    assert [(f.kind, f.name, f.status) for f in report.flows] == [("node", "all", Status.TOO_FEW)]


def test_the_same_hours_are_the_hospitals_wall_clock_hours_across_a_clock_change(
    db: Ledger,
) -> None:
    """Summer time ended on 25 October 2026 in Berlin. A Monday's studies come from 08:00
    local; at 09:00 on the Monday after, the last two hours are 07:00 to 09:00 there, as on
    the Mondays before, not the UTC hours that were 08:00 to 10:00 there."""
    berlin = ZoneInfo("Europe/Berlin")

    def utc(local: dt.datetime) -> dt.datetime:
        aware = local.replace(tzinfo=berlin).astimezone(dt.timezone.utc)
        return aware.replace(tzinfo=None)

    arrivals = Arrivals(db)
    arrivals.add(utc(dt.datetime(2026, 9, 20, 12, 0)), "OLDCR")
    monday = dt.datetime(2026, 10, 26)
    for week in range(5):
        day = monday - WEEK * week
        for hour, minute in ((8, 15), (8, 45)) + (((9, 15), (9, 45)) if week else ()):
            arrivals.add(utc(day.replace(hour=hour, minute=minute)), "CR2", 10)
    now = utc(monday.replace(hour=9))
    local = TrafficMonitor(db, MonitoringSettings(timezone="Europe/Berlin")).report(now)
    cr2 = _flow(local.flows, "source", "CR2").windows[0]
    assert (cr2.studies, cr2.history, cr2.status) == (20, (20, 20, 20, 20), Status.STABLE)
    # in UTC the Mondays before are read an hour later in their day: a drop from nothing
    in_utc = TrafficMonitor(db, MonitoringSettings()).report(now)
    cr2 = _flow(in_utc.flows, "source", "CR2").windows[0]
    assert (cr2.studies, cr2.history, cr2.status) == (20, (40, 40, 40, 40), Status.SHIFTED)
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        MonitoringSettings(timezone="Mars/Olympus")


@pytest.mark.parametrize(
    ("local_now", "hours_now"),
    [
        # the night the clocks go forward (2026-03-29, 02:00 CET -> 03:00 CEST): at 03:30 the
        # last two wall-clock hours (01:30 to 03:30) held one real hour
        (dt.datetime(2026, 3, 29, 3, 30), 1),
        # the night they go back (2026-10-25, 03:00 CEST -> 02:00 CET): at 03:30 the last two
        # wall-clock hours held three real hours
        (dt.datetime(2026, 10, 25, 3, 30), 3),
    ],
)
def test_the_night_the_clocks_change_is_counted_per_real_hour(
    db: Ledger, local_now: dt.datetime, hours_now: int
) -> None:
    """A busy source sending as steadily as ever (50 studies an hour) is not read as dropped
    because the same wall-clock hours hold an hour less (or more) that night; one that
    stopped is still told."""
    berlin = ZoneInfo("Europe/Berlin")

    def utc(local: dt.datetime) -> dt.datetime:
        aware = local.replace(tzinfo=berlin).astimezone(dt.timezone.utc)
        return aware.replace(tzinfo=None)

    arrivals = Arrivals(db)
    now = utc(local_now)
    arrivals.add(now - WEEK * 5 - dt.timedelta(days=1), "OLDCR")
    for week in range(1, 5):
        end = utc(local_now - WEEK * week)
        for hour in range(2):
            arrivals.add(end - dt.timedelta(minutes=30 + 60 * hour), "STEADY", 50)
            arrivals.add(end - dt.timedelta(minutes=30 + 60 * hour), "STOPPED", 50)
    for hour in range(hours_now):
        arrivals.add(now - dt.timedelta(minutes=30 + 60 * hour), "STEADY", 50)
    report = TrafficMonitor(db, MonitoringSettings(timezone="Europe/Berlin")).report(now)
    steady = _flow(report.flows, "source", "STEADY").windows[0]
    assert steady.hours == 2
    assert (steady.studies, steady.history) == (50 * hours_now, (100, 100, 100, 100))
    assert steady.expected == pytest.approx(50 * hours_now)
    assert steady.status == Status.STABLE
    stopped = _flow(report.flows, "source", "STOPPED").windows[0]
    assert (stopped.studies, stopped.status) == (0, Status.SHIFTED)
