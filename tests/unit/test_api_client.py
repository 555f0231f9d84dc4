"""The JSON API as a program uses it: the OpenAPI document fetched with HTTP Basic
credentials, a body past the limit refused (413) unread, answers kept from caches, and a
ledger that does not answer told as a JSON 503 (never a traceback, never text)."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.web.api import create_app
from acwi_node.web.guards import MAX_API_BODY
from tests.support.ports import free_port
from tests.support.review_case import PASSWORD, add_user

READER = ("jane.doe", PASSWORD)
ADMIN = ("ada", PASSWORD)
JSON = {"content-type": "application/json"}


def _chunks(size: int) -> Iterator[bytes]:
    """A verdict whose reason is ``size`` bytes, sent in chunks (no Content-Length)."""
    yield b'{"action": "confirm", "reason": "'
    for _ in range(size // 65536):
        yield b"x" * 65536
    yield b'"}'


def test_the_openapi_document_is_fetched_with_basic_credentials(
    settings: Settings, ledger: Ledger
) -> None:
    add_user(ledger, "jane.doe")
    with TestClient(create_app(settings, ledger)) as client:
        assert client.get("/api/openapi.json").status_code == 401
        got = client.get("/api/openapi.json", auth=READER)
        assert got.status_code == 200
        assert "/api/studies" in got.json()["paths"]
        # no Swagger UI: its page's script came from a public CDN (tests/unit/test_web_security.py)
        assert client.get("/api/docs", auth=READER).status_code == 404


def test_a_body_past_the_limit_is_refused_whoever_reads_it(
    settings: Settings, ledger: Ledger
) -> None:
    """Declared too large: 413 before the sign-in reads anything; sent in chunks: 413 once
    that much came, not the 400 or the 422 of the handler that read it (which would give the
    whole reason back)."""
    add_user(ledger, "jane.doe")
    url = "/api/review/cases/1/verdict"
    with TestClient(create_app(settings, ledger)) as client:
        declared = client.post(url, content=b"{" + b" " * MAX_API_BODY + b"}", headers=JSON)
        assert declared.status_code == 413
        assert declared.json() == {"detail": f"the body is larger than {MAX_API_BODY} bytes"}
        chunked = client.post(url, content=_chunks(2 * MAX_API_BODY), headers=JSON, auth=READER)
        assert chunked.status_code == 413, chunked.text[:200]
        assert chunked.json()["detail"].startswith("the body is larger")
        # under the limit, the body is the handler's to judge
        small = client.post(url, content=_chunks(MAX_API_BODY // 2), headers=JSON, auth=READER)
        assert small.status_code == 422


def test_api_answers_are_kept_from_caches(settings: Settings, ledger: Ledger) -> None:
    add_user(ledger, "ada", role="admin")
    with TestClient(create_app(settings, ledger)) as client:
        for answer in (
            client.get("/api/studies", auth=ADMIN),
            client.get("/api/studies/1.2.3", auth=ADMIN),
            client.get("/api/studies"),
        ):
            assert answer.status_code in (200, 401, 404)
            assert answer.headers["cache-control"] == "no-store"
            assert answer.headers["x-content-type-options"] == "nosniff"
        # a path outside /api/ keeps its own headers
        assert "cache-control" not in client.get("/healthz").headers


def test_a_ledger_that_does_not_answer_is_a_json_503(settings: Settings) -> None:
    """The database down: the sign-in's lookup fails; the answer says so, as JSON."""
    down = Ledger(f"postgresql://acwi@127.0.0.1:{free_port()}/acwi", create=False)
    try:
        app = create_app(settings, down)
        with TestClient(app, raise_server_exceptions=False) as client:
            header = "Basic " + base64.b64encode(b"jane.doe:" + PASSWORD.encode()).decode()
            answer = client.get("/api/studies", headers={"authorization": header})
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["retry-after"] == "30"
            body: dict[str, Any] = answer.json()
            assert body == {"detail": "the node's ledger is not answering: try again later"}
            assert "Traceback" not in answer.text and "127.0.0.1" not in answer.text
    finally:
        down.dispose()


def test_a_ledger_on_a_full_disk_says_so(settings: Settings, ledger: Ledger) -> None:
    """SQLite's "database or disk is full" was answered "the ledger is not answering: try
    again later", which sent the operator looking for a database that was up."""
    add_user(ledger, "ada", role="admin")
    app = create_app(settings, ledger)
    full = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))

    @app.get("/api/full")
    def write_on_a_full_disk() -> None:
        raise full

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/api/full", auth=ADMIN)
    assert answer.status_code == 503
    assert answer.json() == {"detail": "the node's data disk is full: the ledger cannot write"}
