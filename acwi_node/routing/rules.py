"""Match a completed study against the configured routes.

A route matches when every condition it states holds: for each given list (modality, SOP class,
body part, calling AE) at least one of the study's values is in the list. Comparison is
case-insensitive and ignores surrounding blanks (scanners differ). ``max_age_days`` holds when
the study's Study Date is at most that many days before ``today`` (the hospital's date,
:func:`hospital_today`: a Study Date is on the modality's clock, not the node's), or the study
has none. Routes are returned highest priority first, then in configuration order.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable, Sequence

from acwi_node.config import Route
from acwi_node.ledger import RoutedJob, StudyFacts


def _norm(values: Iterable[str]) -> set[str]:
    return {v.strip().upper() for v in values if v and v.strip()}


def study_age_days(study_date: str, today: dt.date) -> int | None:
    """Days from a ``YYYYMMDD`` Study Date to ``today``; None when it is no date."""
    try:
        return (today - dt.datetime.strptime(study_date, "%Y%m%d").date()).days
    except ValueError:
        return None


def hospital_today(zone: str, now: dt.datetime | None = None) -> dt.date:
    """The date on the hospital's clock (``zone``: ``monitoring.timezone``) at ``now`` (None:
    now; a naive ``now`` is UTC), whatever the node's own time zone."""
    if now is None:
        now = dt.datetime.now(dt.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    return now.astimezone(zoneinfo.ZoneInfo(zone)).date()


def _shown(values: Iterable[str]) -> str:
    return ", ".join(sorted(_norm(values))) or "none"


def why_not(route: Route, facts: StudyFacts, today: dt.date | None = None) -> str | None:
    """The first of the route's conditions the study fails, in words; None when it matches."""
    m = route.match
    if m.max_age_days is not None:
        age = study_age_days(facts.study_date, today or dt.date.today())
        if age is not None and age > m.max_age_days:
            return (
                f"Study Date {facts.study_date} is {age} days old (max_age_days {m.max_age_days})"
            )
    checks: list[tuple[str, list[str] | None, set[str]]] = [
        ("modality", m.modality, facts.modalities),
        ("sop_class_uid", m.sop_class_uid, facts.sop_classes),
        ("body_part", m.body_part, facts.body_parts),
        ("calling_ae", m.calling_ae, {facts.calling_ae}),
    ]
    for key, wanted, have in checks:
        if wanted is None:
            continue
        if not _norm(wanted) & _norm(have):
            return f"{key}: the study has {_shown(have)}, the route wants {_shown(wanted)}"
    return None


def route_matches(route: Route, facts: StudyFacts, today: dt.date | None = None) -> bool:
    return why_not(route, facts, today) is None


def decide_routes(
    routes: Sequence[Route], facts: StudyFacts, today: dt.date | None = None
) -> list[RoutedJob]:
    """The jobs a study gets: one per matching route (``today``: the node's local date)."""
    ordered = sorted(enumerate(routes), key=lambda ir: (-ir[1].priority, ir[0]))
    return [
        RoutedJob(
            route=r.name, model=r.model, destinations=list(r.destinations), priority=r.priority
        )
        for _, r in ordered
        if route_matches(r, facts, today)
    ]


def explain_no_route(
    routes: Sequence[Route], facts: StudyFacts, today: dt.date | None = None
) -> str:
    """Why no route takes the study: each route's first failing condition."""
    if not routes:
        return "no routes are configured"
    return "; ".join(f"{r.name}: {why_not(r, facts, today) or 'matches'}" for r in routes)
