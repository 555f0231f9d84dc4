"""A stand-in for a node process's ops endpoint: ``GET /readyz`` answers ready, any other path
404, on a loopback port of its own."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ready = self.path == "/readyz"
        body = b'{"status":"ready"}' if ready else b"{}"
        self.send_response(200 if ready else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def ready_endpoint() -> Iterator[int]:
    """Serve the stand-in while the block runs; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
