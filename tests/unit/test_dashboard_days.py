"""The dashboard's "per site and day" table counts the hospital's days (``monitoring.timezone``),
not UTC's: a study received at 00:30 in Berlin or 04:00 in Kolkata is that day's."""

from __future__ import annotations

import datetime as dt

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Study, StudyState
from acwi_node.review.store import ReviewStore


def _received(ledger: Ledger, *moments: dt.datetime) -> None:
    with ledger.session() as s:
        for n, moment in enumerate(moments):
            s.add(
                Study(
                    study_uid=f"1.2.3.{n}",
                    state=StudyState.DELIVERED,
                    calling_ae="SITEA",
                    first_received_at=moment,
                    last_received_at=moment,
                )
            )
        s.commit()


def _per_day(ledger: Ledger, now: dt.datetime, zone: str, days: int = 14) -> dict[str, int]:
    rows = ReviewStore(ledger).dashboard(days=days, now=now, timezone=zone)["rows"]
    return {r["day"]: r["received"] for r in rows}


def test_days_are_the_hospitals_across_the_fall_back(ledger: Ledger) -> None:
    # Berlin, 2026-10-25: 03:00 CEST -> 02:00 CET at 01:00 UTC (a 25-hour day)
    _received(
        ledger,
        dt.datetime(2026, 10, 24, 21, 59),  # 23:59 CEST on the 24th
        dt.datetime(2026, 10, 24, 22, 0),  # 00:00 CEST on the 25th
        dt.datetime(2026, 10, 25, 0, 30),  # 02:30 CEST
        dt.datetime(2026, 10, 25, 1, 30),  # 02:30 CET, the second
        dt.datetime(2026, 10, 25, 22, 59),  # 23:59 CET on the 25th
        dt.datetime(2026, 10, 25, 23, 0),  # 00:00 CET on the 26th
    )
    now = dt.datetime(2026, 10, 26, 12, 0)
    assert _per_day(ledger, now, "Europe/Berlin") == {
        "2026-10-24": 1,
        "2026-10-25": 4,
        "2026-10-26": 1,
    }
    assert _per_day(ledger, now, "UTC") == {"2026-10-24": 2, "2026-10-25": 4}


def test_days_are_the_hospitals_half_an_hour_off_utc(ledger: Ledger) -> None:
    _received(
        ledger,
        dt.datetime(2026, 3, 28, 18, 29),  # 23:59 IST on the 28th
        dt.datetime(2026, 3, 28, 18, 30),  # 00:00 IST on the 29th
        dt.datetime(2026, 3, 29, 4, 0),  # 09:30 IST on the 29th
    )
    assert _per_day(ledger, dt.datetime(2026, 3, 29, 5, 0), "Asia/Kolkata") == {
        "2026-03-28": 1,
        "2026-03-29": 2,
    }


def test_the_first_day_shown_starts_at_the_hospitals_midnight(ledger: Ledger) -> None:
    """``days=1``: yesterday and today, from yesterday's midnight in New York (04:00 UTC in
    summer): a study at 03:00 UTC that day (23:00 the day before in New York) is not shown."""
    _received(
        ledger,
        dt.datetime(2026, 7, 9, 3, 0),  # 23:00 EDT on the 8th
        dt.datetime(2026, 7, 9, 4, 0),  # 00:00 EDT on the 9th
    )
    now = dt.datetime(2026, 7, 10, 15, 0)  # 11:00 EDT on the 10th
    assert _per_day(ledger, now, "America/New_York", days=1) == {"2026-07-09": 1}
