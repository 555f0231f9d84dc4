"""Who is reading an open case: the worklist and the case page tell the other radiologists
(``review.reading_claim_s``), so that two do not read the same case at once. A hint, never a
lock. On SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.review.store import ReviewStore, SessionInfo, WorklistFilters
from acwi_node.web.api import create_app
from tests.support.review_case import PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, dx_record, receive


def _open_case(settings: Settings, ledger: Ledger, study: str = "1.2.3") -> int:
    receive(settings, ledger, study, f"{study}.1")
    analyse(settings, ledger, study, needs_review=True)
    (item,) = [i["id"] for i in ledger.worklist() if i["study_uid"] == study]
    return int(item)


@contextmanager
def two_readers(settings: Settings, ledger: Ledger) -> Iterator[tuple[TestClient, TestClient, str]]:
    """Jane and Rick, radiologists, each signed in to the review app in a browser of their
    own; with Jane's form token."""
    add_user(ledger)
    add_user(ledger, "rick.roe")
    app = create_app(settings, ledger)
    with (
        TestClient(app, base_url="https://testserver") as jane,
        TestClient(app, base_url="https://testserver") as rick,
    ):
        jane_csrf = sign_in(jane)
        sign_in(rick, "rick.roe")
        yield jane, rick, jane_csrf


def test_the_first_to_open_a_case_reads_it_until_the_claim_lapses(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    item = _open_case(settings, ledger)
    store = ReviewStore(ledger)
    t0 = utcnow()
    assert store.open_for_reading(item, "jane", claim_s=600, now=t0) is None  # hers
    assert store.worklist(claim_s=600, now=t0)["items"][0]["reading"]["user"] == "jane"
    # rick opens it a minute later: told jane is reading it; it stays hers
    other = store.open_for_reading(item, "rick", claim_s=600, now=t0 + dt.timedelta(seconds=60))
    assert other is not None and other["user"] == "jane"
    assert other["since"].startswith(t0.isoformat(timespec="seconds"))
    # jane opens it again: still hers, from then
    later = t0 + dt.timedelta(seconds=500)
    assert store.open_for_reading(item, "jane", claim_s=600, now=later) is None
    assert store.open_for_reading(item, "rick", claim_s=600, now=later + dt.timedelta(seconds=599))
    # ten minutes after she last opened it, the claim lapses: rick's now
    lapsed = later + dt.timedelta(seconds=601)
    assert store.worklist(claim_s=600, now=lapsed)["items"][0]["reading"] is None
    assert store.open_for_reading(item, "rick", claim_s=600, now=lapsed) is None
    assert store.case(item, claim_s=600, now=lapsed)["reading"]["user"] == "rick"  # type: ignore[index]
    # leaving: only the reader can, and then nobody reads it
    assert not store.stop_reading(item, "jane")
    assert store.stop_reading(item, "rick")
    assert store.worklist(claim_s=600, now=lapsed)["items"][0]["reading"] is None
    # claims off: nothing recorded, nothing shown
    assert store.open_for_reading(item, "jane", claim_s=0) is None
    assert store.worklist(claim_s=600)["items"][0]["reading"] is None


def test_a_verdict_ends_the_reading(ledger_node: tuple[Settings, Ledger]) -> None:
    """An escalation asks for a second reader: nobody is reading the case after it. A closed
    case is read by nobody and cannot be claimed."""
    settings, ledger = ledger_node
    item = _open_case(settings, ledger)
    store = ReviewStore(ledger)
    add_user(ledger)
    user = store.get_user("jane.doe")
    assert user is not None
    jane = SessionInfo(user.id, user.name, user.role, "", utcnow())
    assert store.open_for_reading(item, "jane.doe", claim_s=600) is None
    store.claim_verdict(
        item, user=jane, action="escalate", label="", model_label="nodule", reason="unsure"
    )
    assert store.worklist(claim_s=600)["items"][0]["reading"] is None
    assert store.open_for_reading(item, "rick", claim_s=600) is None
    store.claim_verdict(
        item, user=jane, action="confirm", label="nodule", model_label="nodule", reason=""
    )
    assert store.case(item, claim_s=600)["reading"] is None  # type: ignore[index]
    assert store.open_for_reading(item, "jane.doe", claim_s=600) is None
    assert store.case(item, claim_s=600)["reading"] is None  # type: ignore[index]


def test_the_pages_and_the_api_tell_the_others(ledger_node: tuple[Settings, Ledger]) -> None:
    """Jane opens the case: her worklist says she is reading it, Rick's and the API's say
    she is; Rick opening it is told so, with the time. She leaves it: nobody is."""
    settings, ledger = ledger_node
    item = _open_case(settings, ledger)
    with two_readers(settings, ledger) as (jane, rick, jane_csrf):
        page = jane.get(f"/review/cases/{item}").text
        assert "Leave it for the others" in page and "reading-notice" not in page
        worklist = jane.get("/review/worklist").text
        assert "you are reading it" in worklist
        # it reloads itself (review.worklist_refresh_s), so new cases show without a click
        assert '<meta http-equiv="refresh" content="60; url=/review/worklist?auto=1">' in worklist
        assert 'id="refreshed">As of ' in worklist and "reloads every 60 s" in worklist
        assert "being read by jane.doe" in rick.get("/review/worklist").text
        listed = rick.get("/api/worklist", auth=("rick.roe", PASSWORD)).json()["items"]
        assert [i["reading"]["user"] for i in listed] == ["jane.doe"]
        told = rick.get(f"/review/cases/{item}").text
        assert 'id="reading-notice"' in told and "jane.doe opened this case at" in told
        assert "Leave it for the others" not in told
        case = rick.get(f"/api/review/cases/{item}", auth=("rick.roe", PASSWORD)).json()
        assert case["reading"]["user"] == "jane.doe"  # reading through the API claims nothing

        forged = jane.post(f"/review/cases/{item}/leave", data={"csrf_token": "x"})
        assert forged.status_code == 403
        left = jane.post(
            f"/review/cases/{item}/leave",
            data={"csrf_token": jane_csrf},
            follow_redirects=False,
        )
        assert left.status_code == 303 and left.headers["location"] == "/review/worklist"
        assert "being read by" not in rick.get("/review/worklist").text
        now_his = rick.get(f"/review/cases/{item}").text
        assert "reading-notice" not in now_his and "Leave it for the others" in now_his
        assert "you are reading it" in rick.get("/review/worklist").text


def test_a_worklist_that_does_not_reload_itself(ledger_node: tuple[Settings, Ledger]) -> None:
    base, ledger = ledger_node
    settings = load_settings(
        None,
        node={"data_dir": base.data_dir, "database_url": base.database_url},
        review={"worklist_refresh_s": 0},
    )
    add_user(ledger)
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client)
        page = client.get("/review/worklist").text
        assert 'http-equiv="refresh"' not in page and "reloads every" not in page


def _case_from(settings: Settings, ledger: Ledger, study: str, ae: str) -> int:
    ledger.record_instance(dx_record(study, f"{study}.1", ae=ae), first_in_association=False)
    analyse(settings, ledger, study, needs_review=True)
    (item,) = [i["id"] for i in ledger.worklist() if i["study_uid"] == study]
    return int(item)


def test_the_next_case_is_the_next_of_the_readers_list_that_nobody_else_reads(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """After a verdict the reader may open the next case at once: the worklist's next, under
    the filters the reader chose, skipping a case another radiologist is reading and one the
    reader escalated (it waits for a second reader)."""
    settings, ledger = ledger_node
    first = _case_from(settings, ledger, "1.2.1", "MOD")
    other_site = _case_from(settings, ledger, "1.2.2", "OTHER")
    ricks = _case_from(settings, ledger, "1.2.3", "MOD")
    escalated = _case_from(settings, ledger, "1.2.4", "MOD")
    last = _case_from(settings, ledger, "1.2.5", "MOD")
    with two_readers(settings, ledger) as (jane, rick, csrf):
        assert rick.get(f"/review/cases/{ricks}").status_code == 200  # rick reads it
        kept = jane.post(  # escalated, staying on the case as before
            f"/review/cases/{escalated}/verdict",
            data={"csrf_token": csrf, "action": "escalate", "reason": "a second look"},
            follow_redirects=False,
        )
        assert kept.headers["location"] == f"/review/cases/{escalated}"
        # the worklist filtered to one site: each case link carries the filter
        listed = jane.get("/review/worklist?calling_ae=MOD").text
        assert f'href="/review/cases/{first}?list=calling_ae%3DMOD"' in listed
        page = jane.get(f"/review/cases/{first}?list=calling_ae%3DMOD").text
        assert 'name="list" value="calling_ae=MOD"' in page
        assert 'id="submit-next"' in page

        def then_next(item: int, query: str) -> str:
            answer = jane.post(
                f"/review/cases/{item}/verdict",
                data={
                    "csrf_token": csrf,
                    "action": "escalate",
                    "reason": "unsure",
                    "then": "next",
                    "list": query,
                },
                follow_redirects=False,
            )
            assert answer.status_code == 303
            return str(answer.headers["location"])

        # not the other site's, not rick's, not the one she escalated: the last
        assert then_next(first, "calling_ae=MOD") == f"/review/cases/{last}?list=calling_ae%3DMOD"
        # nothing left of her list: back to it, filtered
        assert then_next(last, "calling_ae=MOD") == "/review/worklist?calling_ae=MOD"
        # unfiltered, the other site's case is next; a forged filter is dropped
        store = ReviewStore(ledger)
        assert store.next_case("jane.doe", after=-1, claim_s=600) == other_site
        assert WorklistFilters.from_query("calling_ae=MOD&x=<b>&kind=").query() == (
            "calling_ae=MOD"
        )
        # rick's claim lapsed or left: his case is hers to take next
        left = rick.post(
            f"/review/cases/{ricks}/leave",
            data={"csrf_token": sign_in(rick, "rick.roe"), "list": "calling_ae=MOD"},
            follow_redirects=False,
        )
        assert left.headers["location"] == "/review/worklist?calling_ae=MOD"
        assert (
            store.next_case(
                "jane.doe", after=-1, filters=WorklistFilters(calling_ae="MOD"), claim_s=600
            )
            == ricks
        )
