"""The web surface as a browser meets it: every HTML page of the app, walked over its own
routes, carries the review pages' Content-Security-Policy and refuses framing, and loads no
script from another origin (a page that did would run it with the signed-in reader's
session: deciding cases, or an administrator's exporting the patients' images)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.web.api import create_app
from tests.support.review_case import CSRF, PASSWORD, add_user, sign_in

#: A script or a style sheet fetched from anywhere but the node itself.
FOREIGN = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


@pytest.fixture
def admin(ledger_node: tuple[Settings, Ledger]) -> Iterator[TestClient]:
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "ada")
        yield client


def _paths(client: TestClient, method: str) -> list[str]:
    """The paths of the app's routes that answer ``method``, as written (``{item_id}``)."""
    return sorted(
        {
            str(route.path)
            for route in iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
            if method in (getattr(route, "methods", None) or ()) and route.path
        }
    )


def _get_paths(client: TestClient) -> list[str]:
    return sorted({re.sub(r"\{[^}]+\}", "1", path) for path in _paths(client, "GET")})


def test_every_html_page_is_locked_down(admin: TestClient) -> None:
    """Signed in as an administrator (who sees every page), each GET route of the app that
    answers HTML: a Content-Security-Policy with no inline or foreign script and
    ``frame-ancestors 'none'``, ``X-Frame-Options: DENY``, ``Cache-Control: no-store``, and
    no ``<script>`` or style sheet from another origin. ``/api/docs`` (FastAPI's Swagger UI)
    loaded ``swagger-ui-dist@5`` from a public CDN into the node's origin, with inline script
    and none of these headers; so did its ``/docs/oauth2-redirect``."""
    html = []
    for path in _get_paths(admin):
        answer = admin.get(path, headers={"Accept": "text/html"}, follow_redirects=False)
        if not answer.headers.get("content-type", "").startswith("text/html"):
            continue
        html.append(path)
        csp = answer.headers.get("content-security-policy", "")
        directives = dict(
            (part.strip().split(" ", 1) + [""])[:2] for part in csp.split(";") if part.strip()
        )
        assert directives.get("script-src") == "'self'", (path, csp)
        assert directives.get("frame-ancestors") == "'none'", (path, csp)
        assert answer.headers.get("x-frame-options") == "DENY", path
        assert answer.headers.get("cache-control") == "no-store", path
        assert FOREIGN.search(answer.text) is None, (path, FOREIGN.search(answer.text))
    assert "/review/worklist" in html and "/login" in html  # the walk reached the pages


def test_no_swagger_ui_and_the_document_still_served(admin: TestClient) -> None:
    """The OpenAPI document stays (a client generator, any OpenAPI viewer reads it); the
    Swagger UI and its OAuth2 redirect page are gone."""
    assert admin.get("/api/openapi.json").status_code == 200
    assert admin.get("/api/docs").status_code == 404
    assert admin.get("/docs/oauth2-redirect").status_code == 404


#: The administrators' forms of the review pages, each as a path naming nothing that exists.
ADMIN_FORMS = [
    "/review/monitoring/baseline",
    "/review/models/recall",
    "/review/studies/1.2.3/resend",
    "/review/retrievals",
    "/review/destinations/no-such-destination/check",
    "/review/destinations/no-such-destination/retry",
]


def test_a_radiologist_is_refused_every_administrators_form(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """Every administrator's form of the review pages, posted by a radiologist with a valid
    CSRF token: 403, before anything it names is looked up (the destination check answered
    404 for a name no destination has, 403 for one that exists: which names do). Walked
    over the app's routes, so that a form to come is held to it too."""
    settings, ledger = ledger_node
    add_user(ledger)
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as reader:
        csrf = sign_in(reader)
        forms = [
            path
            for path in _paths(reader, "POST")
            if path.startswith("/review/") and not path.startswith("/review/cases/")
        ]  # /review/cases/...: the readers' own forms
        assert len(forms) == len(ADMIN_FORMS), sorted(forms)
        for path in ADMIN_FORMS:
            answer = reader.post(path, data={"csrf_token": csrf, "confirm": "1"})
            assert answer.status_code == 403, (path, answer.status_code)


def test_the_session_cookie_and_its_end(ledger_node: tuple[Settings, Ledger]) -> None:
    """What no test held before (it was right): the session cookie is HttpOnly, Secure (the
    default ``review.cookie_secure``), SameSite=Strict, for the whole site; a session id the
    browser held before signing in (one planted by someone else) is not the one it gets;
    signing out ends the session in the ledger, not just in the browser."""
    settings, ledger = ledger_node
    add_user(ledger)
    app = create_app(settings, ledger)
    with TestClient(app, base_url="https://testserver") as client:
        client.cookies.set("acwi_session", "planted-by-someone-else")
        page = client.get("/login")
        token = CSRF.search(page.text)
        assert token is not None
        answer = client.post(
            "/login",
            data={"csrf_token": token.group(1), "username": "jane.doe", "password": PASSWORD},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("acwi_session=")
        )
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags, cookie
        session = cookie.split(";")[0].split("=", 1)[1]
        assert session != "planted-by-someone-else" and len(session) >= 40
        csrf = CSRF.search(client.get("/review/worklist").text)
        assert csrf is not None
        client.post("/logout", data={"csrf_token": csrf.group(1)})
    replayed = TestClient(app, base_url="https://testserver")
    replayed.cookies.set("acwi_session", session)
    assert replayed.get("/api/worklist").status_code == 401


def test_a_page_form_after_the_session_ended_asks_for_no_basic_credentials(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A review page's form posted without a session (it ended while the reader read) got
    401 with ``WWW-Authenticate: Basic``: the browser asked for a user name and password
    that the pages do not take, and once given kept sending them to the node, sign-out or
    not (on a shared workstation, to the next reader's requests). Now 401 without the
    challenge (a page that says to sign in again, for a browser); ``/api/`` keeps it."""
    settings, ledger = ledger_node
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as anonymous:
        posts = [p for p in _paths(anonymous, "POST") if not p.startswith(("/api/", "/dicomweb/"))]
        assert "/review/cases/{item_id}/verdict" in posts
        for path in posts:
            if path == "/login":
                continue
            url = re.sub(r"\{[^}]+\}", "1", path)
            page = anonymous.post(url, data={"action": "confirm"}, headers={"Accept": "text/html"})
            assert page.status_code == 401, path
            assert "www-authenticate" not in page.headers, path
            assert "sign in again" in page.text
            assert "www-authenticate" not in anonymous.post(url, data={}).headers, path
        api = anonymous.post("/api/review/cases/1/verdict", json={"action": "confirm"})
        assert api.status_code == 401 and api.headers["www-authenticate"].startswith("Basic")
