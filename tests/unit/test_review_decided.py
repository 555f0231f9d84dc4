"""The decided cases (``/review/decided``, ``GET /api/review/decided``): where a radiologist
finds a closed case again, with the verdict that stands. On SQLite and (integration)
PostgreSQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event, update

from acwi_node.config import Settings
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import ReviewItem, utcnow
from acwi_node.review.store import ReviewStore, SessionInfo
from acwi_node.web.api import create_app
from tests.support import write_secondary_capture
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


def _named_case(settings: Settings, ledger: Ledger, tmp_path: Path, study: str) -> int:
    """A case whose spooled image has a header: patient ``P^<study>``, accession ``A`` and the
    study UID's last six characters (as long as the one it replaces)."""
    item = _case(settings, ledger, study)
    image = write_secondary_capture(
        tmp_path / f"{study}.dcm", study_uid=study, patient_name=f"P^{study}"
    )
    data = image.read_bytes().replace(b"ACC0001", b"A" + study[-6:].encode())
    Spool(settings.spool_dir, fsync=False).store(study, f"{study}.1", data)
    return item


def test_the_case_lists_read_their_headers_with_the_same_queries_however_many_cases(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """The decided cases and the worklist show each case's patient name and accession from
    its first image: the paths of every listed case's images come in one query (it was three
    queries a case: 602 statements for the 200 cases a page lists)."""
    settings, ledger = ledger_node
    store = ReviewStore(ledger)
    add_user(ledger)
    jane = _session(store, "jane.doe")
    seen: list[str] = []

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def _seen(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    def statements(client: TestClient, page: str, studies: list[str]) -> int:
        seen.clear()
        text = client.get(page).text
        count = len(seen)
        for study in studies:  # what the page shows is unchanged
            assert f"P^{study}" in text and f"A{study[-6:]}" in text
        return count

    counts: dict[str, list[int]] = {"/review/worklist": [], "/review/decided": []}
    studies: list[str] = []
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client)
        for n in (1, 4):
            batch = [f"1.2.{len(studies) + k}.100{len(studies) + k:03d}" for k in range(n)]
            items = [_named_case(settings, ledger, tmp_path, study) for study in batch]
            studies += batch
            counts["/review/worklist"].append(statements(client, "/review/worklist", batch))
            for item in items:
                store.claim_verdict(
                    item, user=jane, action="confirm", label="nodule", model_label="nodule",
                    reason="r",
                )  # fmt: skip
            counts["/review/decided"].append(statements(client, "/review/decided", studies))
    one, five = counts["/review/decided"]
    assert one == five, counts
    assert counts["/review/worklist"][0] == counts["/review/worklist"][1], counts
