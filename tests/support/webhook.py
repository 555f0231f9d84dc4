"""A webhook receiver for tests: an HTTP server on a free loopback port that records each
POST (path, headers, JSON body) and answers with the statuses it is given, then 200."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class WebhookServer:
    """``tls``: a folder for a throw-away PKI (:func:`~tests.support.certs.make_pki`): the
    server then speaks HTTPS as ``localhost``, its CA in :attr:`ca_file`."""

    def __init__(self, tls: Path | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers: deque[int] = deque()
        #: Seconds each answer waits (a slow webhook).
        self.delay_s = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                owner.received.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                )
                time.sleep(owner.delay_s)
                status = owner.answers.popleft() if owner.answers else 200
                answer = b'{"ok": true}' if status < 300 else b"refused: try later"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks/acwi"
        self.ca_file: Path | None = None
        if tls is not None:
            from tests.support.certs import make_pki

            pki = make_pki(tls)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pki.server.cert, pki.server.key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.port}/hooks/acwi"
            self.ca_file = pki.ca
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[tuple[str, str]]:
        """(event, study UID or "") of each POST, in order."""
        return [(r["json"]["event"], r["json"].get("study_uid", "")) for r in self.received]
