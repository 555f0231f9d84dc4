"""The decided cases (``/review/decided``, ``GET /api/review/decided``): where a radiologist
finds a closed case again, with the verdict that stands. On SQLite and (integration)
PostgreSQL."""

from __future__ import annotations

import datetime as dt

from fastapi.testclient import TestClient
from sqlalchemy import update

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import ReviewItem, utcnow
from acwi_node.review.store import ReviewStore, SessionInfo
from acwi_node.web.api import create_app
from tests.support.review_case import PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, receive


def _case(settings: Settings, ledger: Ledger, study: str) -> int:
    receive(settings, ledger, study, f"{study}.1")
    analyse(settings, ledger, study, needs_review=True)
    (item,) = [i["id"] for i in ledger.worklist() if i["study_uid"] == study]
    return int(item)


def _session(store: ReviewStore, name: str) -> SessionInfo:
    user = store.get_user(name)
    assert user is not None
    return SessionInfo(user.id, user.name, user.role, "", utcnow())


def test_decided_cases_latest_first_with_the_standing_verdict(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    store = ReviewStore(ledger)
    add_user(ledger)
    add_user(ledger, "rick.roe")
    jane, rick = _session(store, "jane.doe"), _session(store, "rick.roe")
    confirmed, amended, still_open, old = (
        _case(settings, ledger, f"1.2.{n}") for n in (1, 2, 3, 4)
    )

    def decide(item: int, who: SessionInfo, action: str, label: str) -> int:
        return store.claim_verdict(
            item, user=who, action=action, label=label, model_label="nodule", reason="r"
        )

    decide(old, jane, "confirm", "nodule")
    with ledger.session() as s:  # decided a month ago
        s.execute(
            update(ReviewItem)
            .where(ReviewItem.id == old)
            .values(closed_at=utcnow() - dt.timedelta(days=30))
        )
    decide(confirmed, jane, "confirm", "nodule")
    first = decide(amended, rick, "override", "normal")
    store.claim_amendment(
        amended, first, user=jane, action="confirm", label="nodule", model_label="nodule",
        reason="a nodule after all", sr_sop_instance_uid="2.25.9",
    )  # fmt: skip

    listed = store.decided(days=14)
    assert [i["id"] for i in listed] == [amended, confirmed]  # latest first; open and old not
    assert listed[0]["verdict"]["user"] == "jane.doe"  # the amendment stands
    assert (listed[0]["verdict"]["action"], listed[0]["amendments"]) == ("confirm", 1)
    assert (listed[1]["verdict"]["label"], listed[1]["amendments"]) == ("nodule", 0)
    assert [i["id"] for i in store.decided(days=60)] == [amended, confirmed, old]
    assert store.decided(reader="rick.roe") == []  # his verdict no longer stands
    assert len(store.decided(reader="jane.doe")) == 2
    assert [i["id"] for i in store.decided(limit=1)] == [amended]
    assert still_open not in {i["id"] for i in store.decided(days=365)}

    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "rick.roe")
        page = client.get("/review/decided").text
        assert 'href="/review/decided"' in page  # in the navigation
        assert f'href="/review/cases/{amended}"' in page
        assert f'href="/review/cases/{confirmed}"' in page
        assert f'href="/review/cases/{old}"' not in page
        assert "2 cases" in page and ">amended</span>" in page
        assert f'href="/review/cases/{old}"' in client.get("/review/decided?days=90").text
        mine = client.get("/review/decided?mine=true").text
        assert "0 cases" in mine and "No case was decided" in mine
        api = client.get(
            "/api/review/decided", params={"reader": "jane.doe"}, auth=("rick.roe", PASSWORD)
        ).json()
        assert api["count"] == 2 and [i["id"] for i in api["items"]] == [amended, confirmed]
