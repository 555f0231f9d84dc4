"""``acwi-node health`` (:mod:`acwi_node.observability.probe`) against a real HTTP endpoint."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from acwi_node.config import Settings, load_settings
from acwi_node.observability.probe import probe
from tests.support.ports import free_port


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status":"ready"}' if self.path == "/readyz" else b"{}"
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def worker_endpoint(tmp_path: Path) -> Iterator[Settings]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield load_settings(
            None,
            node={"data_dir": tmp_path / "data"},
            observability={"ops_host": "0.0.0.0", "worker_port": server.server_address[1]},
        )
    finally:
        server.shutdown()
        server.server_close()


def test_the_probe_reaches_the_node_with_a_proxy_set(
    worker_endpoint: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host (or container) with ``HTTP_PROXY``/``http_proxy`` set and no ``no_proxy`` for
    the loopback address: the probe asks the node itself (the proxy, here nothing listening,
    was asked instead and every health check failed)."""
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert probe(worker_endpoint, "worker", timeout_s=5) == 0
    assert '200 {"status":"ready"}' in capsys.readouterr().out
