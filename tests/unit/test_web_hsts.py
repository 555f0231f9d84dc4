"""``Strict-Transport-Security`` on the answers of a node serving HTTPS, and only there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from acwi_node.config import load_settings
from acwi_node.ledger import Ledger
from acwi_node.web.api import create_app
from tests.support.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def answers(tmp_path: Path, http_tls: dict[str, Any]) -> list[dict[str, str]]:
    """The headers of a health check, a page that asks for a sign-in and an unknown path."""
    settings = load_settings(None, node={"data_dir": tmp_path, "http_tls": http_tls})
    ledger = Ledger(settings.database_url)
    try:
        with TestClient(create_app(settings, ledger), base_url="https://node.example") as client:
            return [
                dict(client.get(path, follow_redirects=False).headers)
                for path in ("/healthz", "/review/worklist", "/api/nothing-here")
            ]
    finally:
        ledger.dispose()


def tls(pki: Pki, **more: Any) -> dict[str, Any]:
    return {"enabled": True, "cert_file": pki.server.cert, "key_file": pki.server.key, **more}


def test_every_answer_over_https_keeps_the_browser_to_https(tmp_path: Path, pki: Pki) -> None:
    for headers in answers(tmp_path, tls(pki)):
        assert headers["strict-transport-security"] == "max-age=31536000"


def test_the_time_is_set_in_days_and_zero_sends_none(tmp_path: Path, pki: Pki) -> None:
    for headers in answers(tmp_path / "a", tls(pki, hsts_max_age_days=7)):
        assert headers["strict-transport-security"] == "max-age=604800"
    for headers in answers(tmp_path / "b", tls(pki, hsts_max_age_days=0)):
        assert "strict-transport-security" not in headers


def test_plain_http_sends_none(tmp_path: Path) -> None:
    """RFC 6797 8.1: a browser ignores it over HTTP; behind a TLS proxy, the proxy sends it."""
    for headers in answers(tmp_path, {"enabled": False}):
        assert "strict-transport-security" not in headers
