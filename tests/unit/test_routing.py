from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from acwi_node.config import Route, RouteMatch
from acwi_node.ledger import StudyFacts
from acwi_node.routing.rules import decide_routes, route_matches, study_age_days, why_not

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def facts(**kw: object) -> StudyFacts:
    base: dict[str, object] = {
        "study_uid": "1.2.3",
        "calling_ae": "MODALITY1",
        "modalities": {"DX"},
        "sop_classes": {DX},
        "body_parts": {"CHEST"},
    }
    base.update(kw)
    return StudyFacts(**base)  # type: ignore[arg-type]


def test_empty_match_matches_everything() -> None:
    assert route_matches(Route(name="all"), facts())


def test_each_condition_must_hold() -> None:
    r = Route(
        name="chest",
        match=RouteMatch(modality=["CR", "DX"], body_part=["chest"], calling_ae=["MODALITY1"]),
    )
    assert route_matches(r, facts())
    assert not route_matches(r, facts(modalities={"CT"}))
    assert not route_matches(r, facts(body_parts={"ABDOMEN"}))
    assert not route_matches(r, facts(calling_ae="OTHER"))


def test_sop_class_condition() -> None:
    r = Route(name="ct", match=RouteMatch(sop_class_uid=[CT]))
    assert not route_matches(r, facts())
    assert route_matches(r, facts(sop_classes={DX, CT}))


def test_case_and_blank_insensitive() -> None:
    r = Route(name="x", match=RouteMatch(modality=[" dx "], body_part=["Chest"]))
    assert route_matches(r, facts())


def test_decide_orders_by_priority_and_skips_non_matching() -> None:
    routes = [
        Route(name="low", priority=0, destinations=["a"]),
        Route(name="ct-only", match=RouteMatch(modality=["CT"])),
        Route(name="high", priority=5, model="other", destinations=["b"]),
    ]
    jobs = decide_routes(routes, facts())
    assert [j.route for j in jobs] == ["high", "low"]
    assert jobs[0].model == "other" and jobs[0].destinations == ["b"]


def test_no_rule_matches_gives_no_job() -> None:
    assert decide_routes([Route(name="ct", match=RouteMatch(modality=["CT"]))], facts()) == []


def test_max_age_days_leaves_priors_out() -> None:
    """A PACS that sends a patient's priors with the new study: a route with ``max_age_days``
    takes the new study only. Today's and the limit's own day match; a day more does not; a
    study without a (valid) Study Date matches, its age unknown."""
    r = Route(name="recent", match=RouteMatch(max_age_days=30))
    today = dt.date(2026, 12, 5)
    assert route_matches(r, facts(study_date="20261205"), today)
    assert route_matches(r, facts(study_date="20261105"), today)  # 30 days
    assert not route_matches(r, facts(study_date="20261104"), today)  # 31 days
    assert not route_matches(r, facts(study_date="20190101"), today)
    assert route_matches(r, facts(study_date=""), today)
    assert route_matches(r, facts(study_date="20261399"), today)  # not a date
    assert route_matches(Route(name="any"), facts(study_date="19990101"), today)
    assert decide_routes([r], facts(study_date="20190101"), today) == []
    assert study_age_days("20261204", today) == 1 and study_age_days("", today) is None


def test_max_age_days_is_not_negative() -> None:
    with pytest.raises(ValidationError):
        RouteMatch(max_age_days=-1)


def test_why_not_names_the_first_condition_the_study_fails() -> None:
    r = Route(
        name="chest",
        match=RouteMatch(modality=["DX"], sop_class_uid=[CT], body_part=["chest"]),
    )
    assert why_not(r, facts()) == (f"sop_class_uid: the study has {DX}, the route wants {CT}")
    r = Route(name="chest", match=RouteMatch(body_part=["Abdomen "]))
    assert why_not(r, facts(body_parts=set())) == (
        "body_part: the study has none, the route wants ABDOMEN"
    )
    assert why_not(Route(name="all"), facts()) is None
