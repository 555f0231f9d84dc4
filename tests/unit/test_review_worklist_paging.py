"""The worklist a page at a time (the page and ``GET /api/worklist``), in its order, with its
filters; and the reader's switch that stops the page reloading itself (WCAG 2.2.1). On SQLite
and (integration) PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.review import store, views
from acwi_node.review.store import ReviewStore, WorklistFilters
from acwi_node.web.api import create_app
from tests.support.review_case import PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, receive

CASES = 7


def _open_cases(settings: Settings, ledger: Ledger, n: int = CASES) -> list[int]:
    """``n`` open cases, in the worklist's order."""
    for k in range(n):
        study = f"1.2.3.{k + 1}"
        receive(settings, ledger, study, f"{study}.1")
        analyse(settings, ledger, study, needs_review=True)
    ids = [int(i["id"]) for i in ReviewStore(ledger).worklist()["items"]]
    assert len(ids) == n
    return ids


@contextmanager
def _reader(settings: Settings, ledger: Ledger) -> Iterator[TestClient]:
    add_user(ledger)
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client)
        yield client


def _listed(page: str) -> list[int]:
    return [int(n) for n in re.findall(r'href="/review/cases/(\d+)[^"]*" class="case-link"', page)]


def test_a_page_of_the_store_worklist() -> None:
    worklist_page = store.worklist_page
    found = {"items": list(range(120)), "total": 130, "counts": {}}
    first = worklist_page(found)
    assert first["items"] == list(range(store.WORKLIST_PER_PAGE)) and first["pages"] == 3
    assert first["count"] == 120 and first["total"] == 130 and first["page"] == 1
    assert worklist_page(found, 3)["items"] == list(range(100, 120))
    assert worklist_page(found, 4)["items"] == []  # past the last
    assert worklist_page(found, 1, 10_000)["per_page"] == store.WORKLIST_MAX_PER_PAGE
    assert worklist_page({"items": [], "total": 0, "counts": {}})["pages"] == 1


def test_the_worklist_page_shows_a_page_and_links_the_others(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A page of ``per_page`` cases in the worklist's order, "Page 2 of 3", named previous
    and next links that keep the filters and the page size; the filter form keeps the page
    size; a page past the last shows the last; only the page's image headers are read."""
    settings, ledger = ledger_node
    order = _open_cases(settings, ledger)
    with _reader(settings, ledger) as client:
        views._header.cache_clear()
        first = client.get("/review/worklist", params={"per_page": 3, "modality": "DX"})
        assert first.status_code == 200
        assert views._header.cache_info().misses == 3  # this page's cases, not all 7
        assert _listed(first.text) == order[:3]
        assert f"{CASES} of {CASES} open cases shown" in first.text
        assert '<nav class="pages" aria-label="Worklist pages">' in first.text
        assert "Page 1 of 3: cases 1 to 3 of 7." in first.text
        assert 'id="previous-page"' not in first.text
        assert (
            '<a href="/review/worklist?modality=DX&amp;page=2&amp;per_page=3" rel="next" '
            'id="next-page">Next page</a>'
        ) in first.text
        assert '<input type="hidden" name="per_page" value="3">' in first.text
        second = client.get("/review/worklist?modality=DX&page=2&per_page=3").text
        assert _listed(second) == order[3:6]
        assert "Page 2 of 3: cases 4 to 6 of 7." in second
        assert (
            '<a href="/review/worklist?modality=DX&amp;per_page=3" rel="prev" '
            'id="previous-page">Previous page</a>'
        ) in second
        assert 'href="/review/worklist?modality=DX&amp;page=3&amp;per_page=3"' in second
        for past in ("3", "40"):
            last = client.get(f"/review/worklist?modality=DX&page={past}&per_page=3").text
            assert _listed(last) == order[6:] and "Page 3 of 3: cases 7 to 7 of 7." in last
            assert 'id="next-page"' not in last
        whole = client.get("/review/worklist").text  # the default page size: one page
        assert _listed(whole) == order and 'class="pages"' not in whole
        assert 'name="per_page"' not in whole
        assert client.get("/review/worklist?per_page=0").status_code == 422
        assert client.get(
            f"/review/worklist?per_page={store.WORKLIST_MAX_PER_PAGE + 1}"
        ).status_code == (422)


def test_the_api_lists_a_page_with_links_to_the_next(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    order = _open_cases(settings, ledger)
    with _reader(settings, ledger) as client:
        auth = ("jane.doe", PASSWORD)
        whole = client.get("/api/worklist", auth=auth).json()
        assert [i["id"] for i in whole["items"]] == order
        assert (whole["page"], whole["per_page"], whole["pages"]) == (1, store.WORKLIST_PER_PAGE, 1)
        assert whole["count"] == whole["total"] == CASES
        assert whole["next"] is None and whole["previous"] is None
        first = client.get("/api/worklist?kind=flagged&per_page=3", auth=auth).json()
        assert first["next"] == "/api/worklist?kind=flagged&per_page=3&page=2"
        assert (first["count"], first["pages"], len(first["items"])) == (CASES, 3, 3)
        seen, at, number = [], "/api/worklist?kind=flagged&per_page=3", 0
        while at:  # following the next links
            body = client.get(at, auth=auth).json()
            number += 1
            assert body["page"] == number
            assert body["previous"] == (
                None if number == 1 else f"/api/worklist?kind=flagged&per_page=3&page={number - 1}"
            )
            seen += [i["id"] for i in body["items"]]
            at = body["next"]
        assert number == 3
        assert seen == order
        past = client.get("/api/worklist?page=9&per_page=3", auth=auth).json()
        assert past["items"] == [] and past["next"] is None
        assert past["previous"] == "/api/worklist?per_page=3&page=3"
        for bad in ("page=0", "per_page=0", f"per_page={store.WORKLIST_MAX_PER_PAGE + 1}"):
            assert client.get(f"/api/worklist?{bad}", auth=auth).status_code == 422, bad
    assert ReviewStore(ledger).worklist(WorklistFilters(kind="flagged"))["total"] == CASES


def test_the_reader_stops_and_restarts_the_reloading(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """WCAG 2.2.1: a link on the worklist stops its reloading, for that browser (a cookie),
    and says so; another starts it again. The page reloads itself at its own address."""
    settings, ledger = ledger_node
    _open_cases(settings, ledger, 1)
    with _reader(settings, ledger) as client:
        page = client.get("/review/worklist?kind=flagged").text
        assert (
            '<meta http-equiv="refresh" content="60; url=/review/worklist?kind=flagged&amp;auto=1">'
        ) in page
        assert (
            '<a href="/review/worklist?kind=flagged&amp;reload=off" id="reload-switch">'
            "Stop reloading the list</a>"
        ) in page
        stopped = client.get("/review/worklist?kind=flagged&reload=off")
        assert 'http-equiv="refresh"' not in stopped.text
        assert '<p class="notice" role="status">The worklist no longer reloads itself' in (
            stopped.text
        )
        cookie = stopped.headers["set-cookie"]
        assert cookie.startswith("acwi_worklist_reload=off;")
        assert "HttpOnly" in cookie and "Path=/review/" in cookie
        later = client.get("/review/worklist").text  # the browser's cookie keeps it off
        assert 'http-equiv="refresh"' not in later and 'role="status"' not in later
        assert "the list does not reload itself (you stopped it)" in later
        assert '<a href="/review/worklist?reload=on" id="reload-switch">' in later
        assert "Reload the list every 60 s</a>" in later
        again = client.get("/review/worklist?reload=on").text
        assert '<meta http-equiv="refresh" content="60; url=/review/worklist?auto=1">' in again
        assert '<p class="notice" role="status">The worklist reloads itself again.' in again
        assert (
            '<meta http-equiv="refresh" content="60; url=/review/worklist?auto=1">'
            in client.get("/review/worklist").text
        )
