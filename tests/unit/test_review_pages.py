"""Review pages: every DICOM string is escaped, every POST needs its CSRF token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.review import auth, views
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from tests.support.dx import make_dx
from tests.support.review_case import CSRF, flagged_case, sign_in

CANARY_NAME = "<script>document.title='pwned'</script>^Canary"
CANARY_DESC = '"><img src=x onerror=alert(1)>'
PASSWORD = "correct horse battery"


def _case(settings: Settings, ledger: Ledger, images: list[dict[str, Any]] | None = None) -> int:
    ds = make_dx("1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2", 1)
    ds.PatientName = CANARY_NAME
    ds.StudyDescription = CANARY_DESC
    ds.AccessionNumber = "<i>ACC</i>"
    summary = {
        "model": {"name": "m", "version": "1"},
        "labels": ["normal", "<svg onload=alert(1)>"],
        "probabilities": {"normal": 0.4, "<svg onload=alert(1)>": 0.6},
        "predicted_label": "<svg onload=alert(1)>",
        "uncertainty": {"entropy": 0.6, "epistemic": 0.2, "aleatoric": 0.4, "score": 0.3},
        "uncertainty_threshold": 0.1,
        "ood_score": 1.2,
        "needs_review": True,
        "images": images or [],
        "skipped": {
            "2.25.9": "2.25.9: a localizer (scout) image, not analysed",
            "2.25.8": "2.25.8: pixel data could not be decoded: <b>bad</b>",
            "2.25.7": "not selected by route 'ct': Modality PT",
            "2.25.6": "not selected by route 'ct': Modality PT",
            "2.25.5": "not selected by route 'ct': Modality PT",
        },
    }
    return flagged_case(
        settings, ledger, ds, summary, calling_ae="<b>AE</b>", review_reason="<u>uncertain</u>"
    )


def _node(tmp_path: Path) -> tuple[Settings, Ledger]:
    """Settings and a ledger with one radiologist, ``jane``."""
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        review={"cookie_secure": False},
    )
    ledger = Ledger(settings.database_url)
    ReviewStore(ledger).add_user("jane", auth.hash_password(PASSWORD), "radiologist")
    return settings, ledger


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Ledger, int]]:
    settings, ledger = _node(tmp_path)
    item = _case(settings, ledger)
    with TestClient(create_app(settings, ledger)) as c:
        yield c, ledger, item
    ledger.dispose()


def _assert_escaped(html: str) -> None:
    for raw in ("<script>document", "<img src=x", "<svg onload", "<b>AE</b>", "<u>uncertain"):
        assert raw not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;^Canary" in html


def test_worklist_and_case_escape_dicom_text(client: tuple[TestClient, Ledger, int]) -> None:
    c, _ledger, item = client
    sign_in(c, "jane")
    worklist = c.get("/review/worklist")
    _assert_escaped(worklist.text)
    assert "&lt;b&gt;AE&lt;/b&gt;" in worklist.text
    page = c.get(f"/review/cases/{item}")
    assert page.status_code == 200
    _assert_escaped(page.text)
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "&lt;i&gt;ACC&lt;/i&gt;" in page.text
    assert "&lt;svg onload=alert(1)&gt;" in page.text
    # The images the model could not read, with the reasons (escaped too).
    assert "5 images of the study not analysed" in page.text
    assert "2.25.9: a localizer (scout) image, not analysed</li>" in page.text
    # A reason several images share: one line, with their count.
    assert page.text.count("Modality PT") == 1
    assert "not selected by route &#39;ct&#39;: Modality PT (3 images)" in page.text
    assert "could not be decoded: &lt;b&gt;bad&lt;/b&gt;" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_posts_without_csrf_token_are_rejected(client: tuple[TestClient, Ledger, int]) -> None:
    c, ledger, item = client
    # Sign-in without the pre-sign-in cookie's token.
    c.get("/login")
    refused = c.post(
        "/login", data={"username": "jane", "password": PASSWORD}, follow_redirects=False
    )
    assert refused.status_code == 403
    csrf = sign_in(c, "jane")
    for data in ({}, {"csrf_token": "0" * 64}, {"csrf_token": csrf[:-1] + "x"}):
        answer = c.post(
            f"/review/cases/{item}/verdict",
            data={**data, "action": "escalate", "reason": "r"},
            follow_redirects=False,
        )
        assert answer.status_code == 403
    assert not ReviewStore(ledger).case(item)["verdicts"]  # type: ignore[index]
    assert c.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert c.get("/review/worklist", follow_redirects=False).status_code == 200  # still in
    # The right token works, and an impossible verdict is refused without closing the item.
    answer = c.post(
        f"/review/cases/{item}/verdict",
        data={"csrf_token": csrf, "action": "confirm"},
        follow_redirects=False,
    )
    assert answer.status_code == 400
    assert "no AI result SR to verify" in answer.text
    assert ReviewStore(ledger).case(item)["state"] == "open"  # type: ignore[index]
    out = c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert c.get("/review/worklist", follow_redirects=False).status_code == 303
    # Without a session, a POST is answered 401 before any form is read.
    assert c.post(f"/review/cases/{item}/verdict", data={}).status_code == 401


def test_login_redirect_stays_local(client: tuple[TestClient, Ledger, int]) -> None:
    c, _ledger, _item = client
    token = CSRF.search(c.get("/login").text)
    assert token is not None
    done = c.post(
        "/login",
        data={
            "csrf_token": token.group(1),
            "username": "jane",
            "password": PASSWORD,
            "next": "//evil.example/",
        },
        follow_redirects=False,
    )
    assert done.headers["location"] == "/review/worklist"


def test_a_case_of_many_images_names_where_to_look_first(tmp_path: Path) -> None:
    """A CT's hundreds of slices: the page names the images with the highest probability of
    the predicted label and the most uncertain ones, linked to their figures, and loads each
    picture only when it is scrolled to."""
    settings, ledger = _node(tmp_path)
    label = "<svg onload=alert(1)>"
    p = [0.2, 0.9, 0.5, 0.95, 0.1]
    u = [0.01, 0.3, 0.2, 0.02, 0.25]
    images = [
        {
            "sop_instance_uid": "2.25.100",
            "frame_number": n + 1,
            "probabilities": {"normal": 1 - p[n], label: p[n]},
            "uncertainty_score": u[n],
            "ood_score": 0.5,
        }
        for n in range(5)
    ]
    item = _case(settings, ledger, images)
    try:
        with TestClient(create_app(settings, ledger)) as c:
            sign_in(c, "jane")
            page = c.get(f"/review/cases/{item}").text
    finally:
        ledger.dispose()
    leading = page[page.index('id="leading-images"') : page.index("</p>", page.index("leading"))]
    assert leading.index('href="#image-4"') < leading.index('href="#image-2"')
    assert leading.index('href="#image-2"') < leading.index('href="#image-3"')
    assert "most uncertain:" in leading and "(0.9500)" not in leading
    uncertain = leading[leading.index("most uncertain:") :]
    assert [uncertain.index(f'href="#image-{n}"') for n in (2, 5, 3)] == sorted(
        uncertain.index(f'href="#image-{n}"') for n in (2, 5, 3)
    )
    for n in range(1, 6):
        assert f'id="image-{n}"' in page
        assert f"/images/2.25.100.png?frame={n}" in page
    assert page.count('loading="lazy"') == 5  # no heatmap objects in this case


def test_a_refused_verdict_or_sign_in_points_the_form_at_the_reason(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """A screen reader names the override's label list, and a refused form says why where the
    reader is: the form's fields point at the error (aria-describedby) and keep what was typed
    (the user name; the verdict's choices and reason)."""
    c, _ledger, item = client
    token = CSRF.search(c.get("/login").text)
    assert token is not None
    refused = c.post(
        "/login",
        data={"csrf_token": token.group(1), "username": "jane", "password": "wrong", "next": "/"},
    )
    assert refused.status_code == 401
    assert 'id="page-error"' in refused.text
    assert '<input name="username" value="jane"' in refused.text
    assert refused.text.count('aria-describedby="page-error"') == 2
    csrf = sign_in(c, "jane")
    page = c.get(f"/review/cases/{item}").text
    assert 'aria-describedby="page-error"' not in page
    assert '<select name="label" aria-label="the finding instead of &lt;svg onload' in page
    answer = c.post(
        f"/review/cases/{item}/verdict",
        data={"csrf_token": csrf, "action": "override", "label": "normal", "reason": "kept"},
    )
    assert answer.status_code == 400
    assert '<fieldset aria-describedby="page-error">' in answer.text
    assert 'id="page-error" role="alert"' in answer.text
    assert ">kept</textarea>" in answer.text


def _contrast(foreground: str, background: str) -> float:
    """WCAG 2.1 contrast ratio of two ``#rgb``/``#rrggbb`` colours."""

    def luminance(colour: str) -> float:
        hex_ = colour.lstrip("#")
        if len(hex_) == 3:
            hex_ = "".join(c * 2 for c in hex_)
        channels = [int(hex_[i : i + 2], 16) / 255 for i in (0, 2, 4)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_secondary_text_is_readable_against_the_page() -> None:
    """Muted text (hints under the verdict form, "the list reloads every 60 s", replaced
    verdicts) meets WCAG AA contrast (4.5:1) on the page and in the table cells."""
    css = (views.HERE / "static" / "review.css").read_text()

    def colour(rule: str, prop: str = "color") -> str:
        found = re.search(re.escape(rule) + r"\s*\{[^}]*?\b" + prop + r":\s*(#[0-9a-fA-F]+)", css)
        assert found is not None, rule
        return found.group(1)

    page = colour("body", "background")
    for rule in (".muted", ".history li.superseded", "footer"):
        for background in (page, "#fff"):
            assert _contrast(colour(rule), background) >= 4.5, rule
    # inside an image's black frame
    assert _contrast(colour(".viewer .muted"), "#000") >= 4.5


def test_a_warning_is_told_in_words_readable_on_its_background() -> None:
    """A warning (the Models page's, of a version to renumber) says "Warning:" in its text; its
    background only repeats it, and the page's text stays 4.5:1 on it; a long path wraps."""
    css = (views.HERE / "static" / "review.css").read_text()
    text = re.search(r"\nbody\s*\{[^}]*?\bcolor:\s*(#[0-9a-fA-F]+)", "\n" + css)
    warning = re.search(r"\n\.warning\s*\{([^}]*)\}", css)
    assert text is not None and warning is not None
    background = re.search(r"background:\s*(#[0-9a-fA-F]+)", warning.group(1))
    assert background is not None
    assert _contrast(text.group(1), background.group(1)) >= 4.5
    assert "overflow-wrap: anywhere" in warning.group(1)
    template = (views.HERE / "templates" / "models.html").read_text()
    assert template.count('<p class="warning"><strong>Warning:</strong>') == 2


def test_every_table_column_has_a_header_a_screen_reader_reads(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """The columns of action buttons too (the administrator's dashboard)."""
    c, ledger, _item = client
    ReviewStore(ledger).add_user("root", auth.hash_password(PASSWORD), "admin")
    sign_in(c, "root")
    for path in ("/review/worklist", "/review/decided", "/review/dashboard", "/review/studies"):
        page = c.get(path)
        assert page.status_code == 200, path
        assert "<th></th>" not in page.text, path
        if path == "/review/dashboard":
            assert '<table class="outboxes">' in page.text
            assert '<table class="failed">' in page.text


def test_a_long_worklist_reads_each_header_once() -> None:
    """The worklist shows every open case's patient and accession from its image's header and
    reloads every minute: with 2000 open cases, the second load finds every header read."""
    paths = [f"/nonexistent/case-{n}.dcm" for n in range(2000)]
    views._header.cache_clear()
    try:
        for path in paths:
            views._header(path, 0)
        before = views._header.cache_info().hits
        for path in paths:
            views._header(path, 0)
        assert views._header.cache_info().hits - before == len(paths)
    finally:
        views._header.cache_clear()


def test_times_are_shown_on_the_hospitals_clock_with_their_offset(tmp_path: Path) -> None:
    """``monitoring.timezone``: the worklist, the decided cases and a case's verdicts show
    their times on the hospital's wall clock, each with its offset from UTC, not UTC
    unmarked."""
    assert views.wall_clock("2026-01-15T07:05:09Z", "Europe/Berlin") == "2026-01-15 08:05 +0100"
    assert views.wall_clock("2026-07-15T07:05:09Z", "Europe/Berlin") == "2026-07-15 09:05 +0200"
    assert views.wall_clock("2026-07-15T23:30:00", "UTC") == "2026-07-15 23:30 +0000"
    assert views.wall_clock("2026-07-15T23:30:00Z", "America/New_York", shown="%H:%M") == (
        "19:30 -0400"
    )
    assert views.wall_clock("", "UTC") == "" and views.wall_clock("soon", "UTC") == "soon"
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        review={"cookie_secure": False},
        monitoring={"timezone": "Asia/Kolkata"},
    )
    ledger = Ledger(settings.database_url)
    store = ReviewStore(ledger)
    store.add_user("jane", auth.hash_password(PASSWORD), "radiologist")
    item = _case(settings, ledger)
    try:
        with TestClient(create_app(settings, ledger)) as c:
            sign_in(c, "jane")
            received = store.worklist()["items"][0]["received_at"]
            worklist = c.get("/review/worklist").text
            assert f"<td>{views.wall_clock(received, 'Asia/Kolkata')}</td>" in worklist
            assert "+0530</td>" in worklist and received not in worklist
            assert re.search(r'id="refreshed">As of \d\d:\d\d \+0530;', worklist)
            csrf = CSRF.search(worklist)
            assert csrf is not None
            escalated = c.post(
                f"/review/cases/{item}/verdict",
                data={"csrf_token": csrf.group(1), "action": "escalate", "reason": "unsure"},
                follow_redirects=False,
            )
            assert escalated.status_code == 303, escalated.text
            case = c.get(f"/review/cases/{item}").text
            assert re.search(r"<li>\d{4}-\d\d-\d\d \d\d:\d\d \+0530: jane escalate", case)
    finally:
        ledger.dispose()


def test_a_stale_link_gives_a_browser_a_page_and_a_program_json(
    client: tuple[TestClient, Ledger, int],
) -> None:
    """A radiologist following a link to a case or study that is no longer there (or a
    mistyped one) got ``{"detail":"no such case"}``; a browser now gets a page with the
    reason and the way back to the worklist. Programs, and the API, get JSON as before."""
    c, _, item = client
    sign_in(c, "jane")
    html = {"Accept": "text/html,application/xhtml+xml"}
    for path, reason in [
        (f"/review/cases/{item + 1000}", "no such case"),
        ("/review/cases/not-a-number", "Not Found"),
        ("/review/studies/1.2.3.4", "no such study"),
        ("/review/no-such-page", "Not Found"),
        ("/nope/1", "Not Found"),  # no route at all: no page answers it
    ]:
        page = c.get(path, headers=html)
        assert page.status_code == 404, path
        assert page.headers["content-type"].startswith("text/html"), path
        assert page.headers["cache-control"] == "no-store"
        assert "<h1>Not found</h1>" in page.text and f"<p>{reason}</p>" in page.text, path
        assert 'href="/review/worklist"' in page.text
        program = c.get(path)  # no Accept: text/html
        assert (program.status_code, program.json()) == (404, {"detail": reason}), path
    for path in ("/api/studies/1.2.3.4", "/api/review/cases/999999", "/api/nope/1"):
        answer = c.get(path, headers=html)
        assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
