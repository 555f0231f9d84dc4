"""What every route of the web app does before its handler reads anything: who may call it is
checked before its body is read (401, 403, 415 whatever the body holds), a ``HEAD`` is
answered as the ``GET`` of its path, and a body past its path's limit is refused unread (the
review app's forms too; STOW-RS keeps its own limit). Walked over the app's own routes, so
that a route to come is held to the same."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.types import Message

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.review.lesion_boxes import MAX_BOXES
from acwi_node.review.verdicts import MAX_REASON
from acwi_node.review.views import MAX_FORM_BYTES as MAX_FORM_BODY
from acwi_node.web.api import create_app
from acwi_node.web.guards import MAX_API_BODY
from tests.support.review_case import PASSWORD, add_user, sign_in

ADMIN = ("ada", PASSWORD)
READER = ("jane.doe", PASSWORD)
SENDER = ("pacs", PASSWORD)
#: Who may call each ``/api/`` route that takes a body: every such route of the app is listed
#: (a new one must say who may call it).
MAY_CALL = {
    ("POST", "/api/retrievals"): "admin",
    ("POST", "/api/studies/{study_uid}/withdraw"): "admin",
    ("POST", "/api/studies/{study_uid}/resend"): "admin",
    ("POST", "/api/studies/{study_uid}/reprocess"): "admin",
    ("POST", "/api/models/{name}/{version}/recall"): "admin",
    ("POST", "/api/destinations/{name}/retry"): "admin",
    ("PUT", "/api/monitoring/baselines/{name}/{version}"): "admin",
    ("DELETE", "/api/monitoring/baselines/{name}/{version}"): "admin",
    ("POST", "/api/review/cases/{item_id}/verdict"): "reader",
    ("POST", "/api/review/cases/{item_id}/amend"): "reader",
}
#: Bodies no handler can take: JSON cut short, and bytes that are not even UTF-8.
BROKEN = [b'{"note": "x', b"\xff\xfe{"]
JSON = {"Content-Type": "application/json"}


def _routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    """Each (method, path) the app routes, those of the routers it includes too."""
    for route in iter_route_contexts(app.routes):
        for method in sorted(route.methods or ()):
            if route.path:
                yield method, route.path


def _concrete(path: str) -> str:
    for name in ("study_uid", "name", "version", "item_id", "retrieval_id", "sop"):
        path = path.replace(f"{{{name}}}", "1")
    return path


@pytest.fixture
def client(ledger_node: tuple[Settings, Ledger]) -> Iterator[TestClient]:
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    add_user(ledger, "jane.doe")
    add_user(ledger, "pacs", role="sender")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as test_client:
        yield test_client


def test_who_may_call_a_route_is_checked_before_its_body_is_read(client: TestClient) -> None:
    """No credentials or wrong ones: 401; a sender, or a radiologist at an administrators'
    route: 403; not JSON: 415; whatever the body holds (it was 422, or 400 for bytes that are
    not UTF-8, for a radiologist at an administrators' route). Only a caller with the right
    has the body judged."""
    routes = {
        (method, path)
        for method, path in _routes(client.app)  # type: ignore[arg-type]
        if path.startswith("/api/") and method in ("POST", "PUT", "PATCH", "DELETE")
    }
    assert routes == set(MAY_CALL)
    for (method, path), who in sorted(MAY_CALL.items()):
        url = _concrete(path)
        for n, body in enumerate(BROKEN):
            where = (method, path, body)
            auth: Any
            for auth, status in [
                (None, 401),
                ((f"nobody{n}{len(path)}{method}", "wrong password"), 401),
                (SENDER, 403),
                (READER, 403 if who == "admin" else None),
            ]:
                answer = client.request(method, url, content=body, headers=JSON, auth=auth)
                if status is None:  # a radiologist's verdict: the body is judged
                    assert answer.status_code in (400, 422), (*where, answer.text)
                else:
                    assert answer.status_code == status, (*where, auth, answer.text)
            as_text = client.request(
                method, url, content=body, headers={"Content-Type": "text/plain"}, auth=READER
            )
            assert as_text.status_code == (403 if who == "admin" else 415), (*where, as_text.text)
            judged = client.request(method, url, content=body, headers=JSON, auth=ADMIN)
            assert judged.status_code not in (401, 403, 415), (*where, judged.text)


def test_head_is_answered_as_get_without_a_body(client: TestClient) -> None:
    """Every GET route, signed in or not: HEAD gets the GET's status and media type and no
    body (it was 405); a path without GET still answers 405."""
    gets = sorted(
        {
            _concrete(path)
            for method, path in _routes(client.app)  # type: ignore[arg-type]
            if method == "GET"
        }
    )
    assert {"/healthz", "/readyz", "/metrics", "/api/studies", "/review/worklist"} <= set(gets)
    signed_in: Any
    for signed_in in (None, ADMIN):
        for path in gets:
            got = client.get(path, auth=signed_in, follow_redirects=False)
            head = client.head(path, auth=signed_in, follow_redirects=False)
            assert head.status_code == got.status_code, (path, signed_in, head.status_code)
            assert head.headers.get("content-type") == got.headers.get("content-type"), path
            assert head.content == b"", path
    sign_in(client, "ada")
    page = client.head("/review/worklist")
    assert page.status_code == 200 and page.content == b""
    assert page.headers["content-type"].startswith("text/html")
    only_post = client.head("/api/studies/1.2.3/resend", auth=ADMIN)
    assert only_post.status_code == 405 and "POST" in only_post.headers["allow"]


def _post(
    app: FastAPI,
    path: str,
    chunks: int,
    chunk: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (
        (b"content-type", b"application/x-www-form-urlencoded"),
    ),
) -> tuple[int, bytes, int]:
    """POST ``chunks`` times ``chunk`` to ``path`` (no Content-Length) straight to the ASGI
    app: the answer's status and body, and how many chunks the app read."""
    read = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal read
        if read < chunks:
            read += 1
            return {"type": "http.request", "body": chunk, "more_body": read < chunks}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, read


def test_a_form_past_its_limit_is_refused_unread(client: TestClient) -> None:
    """The sign-in form (which anyone may post) and the review app's forms: a body past
    MAX_FORM_BODY is refused with 413, declared or once that much came, not read whole (it
    was, up to any size, before the handler refused it); STOW-RS keeps its own limit."""
    app: FastAPI = client.app  # type: ignore[assignment]
    chunk = b"x" * 16384
    sign_in(client, "ada")
    form = (
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"cookie", f"acwi_session={client.cookies['acwi_session']}".encode()),
    )
    for path in ("/login", "/review/cases/1/verdict", "/review/models/recall", "/logout"):
        status, body, read = _post(app, path, 1000, chunk, form)  # 16 MB
        assert status == 413, (path, body)
        assert body == b'{"detail":"the body is larger than %d bytes"}' % MAX_FORM_BODY
        assert read <= MAX_FORM_BODY // len(chunk) + 1, (path, read)
    declared = client.post("/login", content=b"x" * (MAX_FORM_BODY + 1))
    assert declared.status_code == 413
    # under the limit, the form is the handler's (an expired sign-in form: 403)
    assert client.post("/login", data={"username": "ada"}).status_code == 403
    # STOW-RS reads past both limits (its own is dicomweb.max_request_bytes)
    stow = (
        (b"content-type", b'multipart/related; type="application/dicom"; boundary=b'),
        (b"authorization", b"Basic " + base64.b64encode(f"pacs:{PASSWORD}".encode())),
    )
    status, body, read = _post(
        app, "/dicomweb/studies", MAX_API_BODY // len(chunk) + 8, chunk, stow
    )
    assert status != 413 and read > MAX_API_BODY // len(chunk), (status, body)


def test_the_largest_verdict_form_fits_the_form_limit() -> None:
    """A verdict form at the most it can hold (a reason of MAX_REASON four-byte characters,
    MAX_BOXES lesion boxes each on its own image of a 64-character UID, the worklist filters)
    is well within MAX_FORM_BODY."""
    uid = "1." + "2" * 62
    form = {
        "csrf_token": "f" * 64,
        "action": "override",
        "label": "pneumothorax",
        "reason": "\U0001f600" * MAX_REASON,
        "list": "modality=CR&calling_ae=SITE&model=chest&state=exporting&kind=flagged",
        "then": "next",
        **{f"box:{uid}{i:02d} frame 999": "0.1234 0.1234 0.9876 0.9876" for i in range(MAX_BOXES)},
    }
    assert len(urlencode(form).encode()) < MAX_FORM_BODY // 2
