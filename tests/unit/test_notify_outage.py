"""``[[notify]]`` webhooks that answer nothing, or point elsewhere (``acwi_node/notify/sender.py``):
a webhook that takes the connection and never answers holds up one POST's timeout a pass, not
one per notification, and delays no other webhook's; a redirect fails at once and says where
it points. On SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import pytest
from sqlalchemy import select, update

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Notification, utcnow
from acwi_node.notify import Notifier
from tests.support.webhook import WebhookServer
from tests.unit.test_notify import _case, _settings


class _Silent:
    """A webhook server that takes each connection and never answers; ``connections`` counts
    them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.held: list[socket.socket] = []
        Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.held.append(conn)

    @property
    def connections(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[_Silent]:
    server = _Silent()
    try:
        yield server
    finally:
        server.close()


def _rows(ledger: Ledger, target: str) -> list[Notification]:
    with ledger.session() as s:
        rows = s.scalars(select(Notification).where(Notification.target == target)).all()
        s.expunge_all()
        return list(rows)


def test_a_webhook_that_never_answers_costs_one_timeout_a_pass(
    ledger_node: tuple[Settings, Ledger], silent: _Silent
) -> None:
    """Four cases for a webhook that never answers and for a chat channel: the pass POSTs
    once to the silent webhook (one timeout), the chat channel gets all four, and each of the
    silent webhook's notifications has the outage's attempt and error."""
    base, ledger = ledger_node
    with WebhookServer() as chat:
        settings = _settings(
            base,
            {"name": "pager", "url": silent.url, "timeout_s": 1},
            {"name": "chat", "url": chat.url},
        )
        for n in range(4):
            _case(settings, ledger, f"1.2.{n + 1}")
        notifier = Notifier(settings, ledger)
        assert notifier.tick() == 8
        assert silent.connections == 1
        assert sorted(chat.events()) == [("review", f"1.2.{n + 1}") for n in range(4)]
        pager = _rows(ledger, "pager")
        assert len(pager) == 4
        for row in pager:
            assert (row.state.value, row.attempts, row.outage_attempts) == ("pending", 0, 1)
            assert row.unreachable_since is not None
            assert "timed out" in row.last_error


class _Redirect(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(301)
        self.send_header("Location", "https://chat.example.org/hooks/acwi")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_redirect_fails_at_once_and_says_where_it_points(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    base, ledger = ledger_node
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/acwi"
        settings = _settings(base, {"name": "chat", "url": url})
        _case(settings, ledger, "1.2.3")
        Notifier(settings, ledger).tick()
        (row,) = _rows(ledger, "chat")
        assert (row.state.value, row.attempts, row.last_status) == ("failed", 1, 301)
        assert row.last_error == "HTTP 301 Moved Permanently to https://chat.example.org/hooks/acwi"
    finally:
        server.shutdown()
        server.server_close()


def test_a_notifier_that_stalled_past_its_claim_records_nothing_over_the_next_takers(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """Exporter A's POST hangs past its claim; exporter B takes the notification over and
    delivers it. A's answer (a redirect: failed for good) is then not recorded over B's."""
    base, ledger = ledger_node
    others: list[Notifier] = []
    posts: list[int] = []

    class _TakenOver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server name)
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            posts.append(1)
            if len(posts) == 1:  # A's POST: it hangs past its claim, and B takes it over
                with ledger.session() as s:
                    s.execute(
                        update(Notification).values(
                            next_attempt_at=utcnow() - dt.timedelta(seconds=1)
                        )
                    )
                others[0].tick()
                self.send_response(301)
                self.send_header("Location", "https://chat.example.org/hooks/acwi")
            else:
                self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), _TakenOver)
    Thread(target=server.serve_forever, daemon=True).start()
    other_ledger = Ledger(ledger.url)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/acwi"
        settings = _settings(base, {"name": "chat", "url": url})
        _case(settings, ledger, "1.2.3")
        others.append(Notifier(settings, other_ledger))
        Notifier(settings, ledger).tick()
        assert len(posts) == 2
        (row,) = _rows(ledger, "chat")
        assert (row.state.value, row.attempts, row.last_status) == ("delivered", 1, 204)
    finally:
        server.shutdown()
        other_ledger.dispose()
