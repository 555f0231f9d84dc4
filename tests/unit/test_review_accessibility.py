"""Review pages and WCAG 2.2 AA: what the HTML itself must say (the browser test checks
focus, reflow and the session warning's behaviour in Chromium)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from acwi_node.config import load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import WebSession, utcnow
from acwi_node.review import auth, views
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from tests.support.review_case import sign_in
from tests.support.study_flow import analyse, deliver, receive
from tests.unit.test_review_pages import PASSWORD, _case, _node

HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Ledger, int]]:
    settings, ledger = _node(tmp_path)
    item = _case(settings, ledger)
    ReviewStore(ledger).add_user("root", auth.hash_password(PASSWORD), "admin")
    with TestClient(create_app(settings, ledger)) as c:
        yield c, ledger, item
    ledger.dispose()


class _Outline(HTMLParser):
    """The page's language, title, landmarks and headings."""

    def __init__(self) -> None:
        super().__init__()
        self.lang = ""
        self.tags: list[str] = []
        self.headings: list[int] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "html":
            self.lang = dict(attrs).get("lang") or ""
        elif re.fullmatch(r"h[1-6]", tag):
            self.headings.append(int(tag[1]))
        self._in_title = tag == "title"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


def _outline(html: str) -> _Outline:
    found = _Outline()
    found.feed(html)
    return found


TEMPLATES = Path(views.__file__).parent / "templates"


class _FirstFocus(HTMLParser):
    """The first element of the page's body that Tab reaches, and each element's attributes
    by id."""

    def __init__(self) -> None:
        super().__init__()
        self.first: tuple[str, dict[str, str | None]] | None = None
        self.by_id: dict[str, tuple[str, dict[str, str | None]]] = {}
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.by_id[str(found["id"])] = (tag, found)
        self._in_body = self._in_body or tag == "body"
        focusable = (
            (tag == "a" and "href" in found)
            or (tag == "input" and found.get("type") != "hidden")
            or tag in ("button", "select", "textarea", "summary")
            or (found.get("tabindex") or "").isdigit()  # 0 or more: in the Tab order
        )
        if self._in_body and self.first is None and focusable:
            self.first = (tag, found)


def _assert_skip_link_first(html: str) -> None:
    page = _FirstFocus()
    page.feed(html)
    assert page.first is not None, html
    tag, attrs = page.first
    assert (tag, attrs.get("href"), attrs.get("class")) == ("a", "#main", "skip-link"), attrs
    assert page.by_id["main"][0] == "main" and page.by_id["main"][1].get("tabindex") == "-1"


def test_every_page_begins_with_a_link_past_the_header(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """WCAG 2.4.1: a keyboard user tabbed through the header's links and the sign-out on
    every page before reaching the worklist. The first Tab of every page now reaches "Skip to
    main content", which moves the focus to the page's ``<main>`` (the browser test presses
    it). Every full page template is ``base.html`` or extends it."""
    c, _ledger, item = client
    base = (TEMPLATES / "base.html").read_text()
    assert '<a class="skip-link" href="#main">Skip to main content</a>' in base
    for template in sorted(TEMPLATES.glob("*.html")):
        text = template.read_text()
        assert template.name == "base.html" or text.startswith('{% extends "base.html" %}'), (
            template.name
        )
    _assert_skip_link_first(c.get("/login").text)
    sign_in(c, "root")
    for path in (
        "/review/worklist",
        f"/review/cases/{item}",
        "/review/decided",
        "/review/dashboard",
        "/review/studies",
        "/review/monitoring",
        "/review/models",
        "/review/no-such-page",
    ):
        _assert_skip_link_first(c.get(path, headers=HTML).text)


def test_a_refused_form_gets_a_page_like_the_other_error_pages(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """A form whose token expired (a page left open over a restart, a second tab signed out)
    was answered with a bare ``<title>Forbidden</title><p>...``: no language (3.1.1), no
    heading or main region, no way back. Every error page now has them."""
    c, _ledger, item = client
    c.get("/login")
    expired = c.post("/login", data={"username": "jane", "password": "x"}, headers=HTML)
    csrf = sign_in(c, "root")
    refused = [
        expired,
        c.post("/logout", data={"csrf_token": "0" * 64}, headers=HTML),
        c.post(f"/review/cases/{item}/verdict", data={"action": "confirm"}, headers=HTML),
        c.get("/review/no-such-page", headers=HTML),
    ]
    for page in refused:
        assert page.status_code in (403, 404), page.text
        outline = _outline(page.text)
        assert outline.lang == "en", page.text
        assert outline.title.endswith(" - ACWI Node review"), page.text
        assert "main" in outline.tags and outline.headings == [1], page.text
        assert 'href="/review/worklist"' in page.text
    assert "the sign-in form expired" in expired.text
    assert c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303


def test_figures_tables_and_findings_read_as_they_show(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """A screen reader read a case's probabilities twice, the second time as the raw float
    (``0.6 0.600``): the bar (``<meter>``) had no name and repeated the figure beside it; it
    is hidden from the accessibility tree now. A study's turnaround table had no header
    cell: its steps are row headers, under column headers. A model's finding labels were
    told apart by bold type alone; they say so in words too."""
    c, _ledger, item = client
    sign_in(c, "jane")
    models = c.get("/review/models").text  # findings were told by bold type alone
    assert re.search(r'<strong>\w+</strong><span class="visually-hidden"> \(finding\)', models)
    case = c.get(f"/review/cases/{item}").text
    meters = re.findall(r"<meter [^>]*>", case)
    assert meters and all('aria-hidden="true"' in m for m in meters), meters
    uid = "1.2.826.0.1.3680043.10.1.1"
    study = c.get(f"/review/studies/{uid}").text
    table = study[study.index('<table class="turnaround">') :]
    table = table[: table.index("</table>")]
    assert '<th scope="col">Step</th>' in table
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
    assert len(rows) > 1 and all(r.startswith("<th") for r in rows), rows


def test_every_page_warns_before_the_session_ends_and_can_keep_it(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """WCAG 2.2.1: a reader writing a verdict's reason was signed out after
    ``idle_timeout_s`` without a word, and the verdict refused. Every page of a session says
    how long it lasts (the script warns two minutes before, read out at once), and
    ``/review/session``, the warning's "Stay signed in", starts the idle time again."""
    c, ledger, item = client
    sign_in(c, "jane")
    for path in ("/review/worklist", f"/review/cases/{item}", "/review/monitoring"):
        page = c.get(path).text
        warning = re.search(r'<div id="session-warning" [^>]*aria-live="assertive"[^>]*>', page)
        assert warning is not None, path
        idle = re.search(r'data-idle-left-s="(\d+)"', warning.group(0))
        lifetime = re.search(r'data-lifetime-left-s="(\d+)"', warning.group(0))
        assert idle and lifetime and 'data-idle-timeout-s="1800"' in warning.group(0)
        assert 1790 <= int(idle.group(1)) <= 1800 and int(lifetime.group(1)) > 8 * 3600 - 60
    with ledger.session() as s:  # ten minutes without a request
        s.execute(update(WebSession).values(last_seen_at=utcnow() - dt.timedelta(minutes=10)))
    # the worklist reloading itself does not count as the reader's doing: 20 minutes left
    reloaded = c.get("/review/worklist?auto=1").text
    left = re.search(r'data-idle-left-s="(\d+)"', reloaded)
    assert left is not None and 1190 <= int(left.group(1)) <= 1200
    kept = c.get("/review/session")
    assert kept.status_code == 200 and kept.headers["cache-control"] == "no-store"
    assert 1790 <= kept.json()["idle_left_s"] <= 1800
    assert kept.json()["idle_timeout_s"] == 1800
    assert "session-warning" not in c.get("/login").text  # nobody's session to warn of


def test_a_refused_administrators_form_comes_back_as_typed(tmp_path: Path) -> None:
    """WCAG 3.3.7 and 3.3.1: an administrator's retrieval refused for a mistyped date, a
    withdrawal or a recall refused for its note came back with an empty form (the withdrawal
    and the recall folded away), to type it all again; each keeps what was typed now, open,
    and its fields point at the reason."""
    source = {"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 104}
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        review={"cookie_secure": False},
        sources=[source],
        destinations=[{**source, "host": "127.0.0.1"}],
    )
    ledger = Ledger(settings.database_url)

    def form_of(html: str, action: str) -> str:
        found = html[html.index(f'<form method="post" action="{action}"') :]
        return found[: found.index("</form>")]

    try:
        receive(settings, ledger, "1.2.3", "1.2.3.1")
        analyse(settings, ledger, "1.2.3")
        deliver(ledger)
        ReviewStore(ledger).add_user("root", auth.hash_password(PASSWORD), "admin")
        with TestClient(create_app(settings, ledger)) as c:
            csrf = sign_in(c, "root")
            assert 'aria-describedby="page-error"' not in c.get("/review/dashboard").text
            typed = {"accession_number": "A<1>", "study_date": "2026-12-01", "modality": "CT"}
            refused = c.post(
                "/review/retrievals", data={"csrf_token": csrf, "source": "pacs", **typed}
            )
            assert refused.status_code == 422
            assert 'id="page-error" role="alert"' in refused.text
            form = form_of(refused.text, "/review/retrievals")
            assert "<option selected>pacs</option>" in form
            assert 'value="A&lt;1&gt;" aria-describedby="page-error"' in form
            assert 'value="2026-12-01" aria-describedby="page-error"' in form
            assert 'value="CT" aria-describedby="page-error"' in form
            assert form.count('aria-describedby="page-error"') == 5
            note = "wrong\x07patient"  # a control character: refused
            withdraw = c.post(
                "/review/studies/1.2.3/withdraw",
                data={"csrf_token": csrf, "reason": "quality", "note": note},
            )
            assert withdraw.status_code == 422, withdraw.text
            assert '<details class="withdraw" open>' in withdraw.text
            form = form_of(withdraw.text, "/review/studies/1.2.3/withdraw")
            assert '<option value="quality" selected>' in form
            assert f'required aria-describedby="page-error">{note}</textarea>' in form
            recall = c.post(
                "/review/models/recall",
                data={"csrf_token": csrf, "name": "acwi-dianet-chest", "version": "1.0.0",
                      "reason": "quality", "note": "kept"},
            )  # fmt: skip
            assert recall.status_code == 422, recall.text  # the box not ticked
            assert '<details class="withdraw recall" open>' in recall.text
            form = form_of(recall.text, "/review/models/recall")
            assert '<option value="quality" selected>' in form
            assert 'required aria-describedby="page-error">kept</textarea>' in form
            assert '<details class="withdraw recall" open>' not in c.get("/review/models").text
    finally:
        ledger.dispose()
