"""POST queued notifications to their ``[[notify]]`` webhooks, retrying with back-off.

A ``2xx`` answer delivers; ``408``, ``429``, ``5xx``, no answer or no connection is retried (5 s,
doubling, at most 5 minutes) and fails after the target's ``max_attempts``; any other answer
(``400``, ``401``, ``404``: the webhook refuses it as it is) fails at once. An attempt that did
not reach the webhook (no connection, no answer, ``502``-``504`` from it or a proxy) is an
outage: not counted, until the webhook has been unreachable for its ``outage_patience_s``. The
state, the last HTTP status and error are kept in the ledger; the log names the target and the
event, never the payload.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select

from acwi_node import __version__
from acwi_node.config import NotifyTarget, Settings
from acwi_node.http_client import connect, request_target, target_of
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import DeliveryState, Notification, utcnow
from acwi_node.ledger.repository import outage_attempt, outage_over
from acwi_node.monitoring.cached import MonitoringCaches
from acwi_node.notify.events import queue_events
from acwi_node.notify.formats import shape
from acwi_node.observability.logging import LoopFailures

log = logging.getLogger("acwi_node.notify")

BACKOFF_INITIAL_S = 5.0
BACKOFF_MAX_S = 300.0
#: Answers worth trying again: the webhook was busy or down, not refusing the message.
RETRYABLE = {408, 425, 429}
#: Answers that say the webhook was not reached: it, or the gateway or proxy before it, is
#: down (an outage, as no connection is).
UNREACHED = {502, 503, 504}


@dataclass(frozen=True)
class PostOutcome:
    """How one POST went: ``status`` (None without an answer), whether to try again, and
    whether the webhook was not reached at all (an outage)."""

    delivered: bool
    status: int | None
    error: str
    retry: bool
    unreachable: bool = False


def post_notification(target: NotifyTarget, payload: dict[str, Any]) -> PostOutcome:
    """POST ``payload`` as JSON, in the target's ``format``, to its URL (through its proxy,
    if it has one)."""
    parts = urlsplit(target.url)
    shaped = shape(target.format, payload)
    body = json.dumps(shaped, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"ACWI-Node/{__version__}",
        "Content-Length": str(len(body)),
    }
    tunnel: dict[str, str] = {}
    try:
        if target.token_file is not None:
            token = target.token_file.expanduser().read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        if target.proxy_username is not None and target.proxy_password_file is not None:
            password = target.proxy_password_file.expanduser().read_text().rstrip("\r\n")
            pair = f"{target.proxy_username}:{password}".encode()
            # on the CONNECT of an https URL, on the request itself of an http one
            where = tunnel if parts.scheme == "https" else headers
            where["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    except OSError as exc:
        return PostOutcome(False, None, f"credentials file: {exc.strerror or exc}", True)
    service = target_of(f"{parts.scheme}://{parts.netloc}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn = connect(target, service, target.timeout_s, tunnel)
        try:
            conn.request("POST", request_target(target, service, path), body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read(2048)
        finally:
            conn.close()
    except ssl.SSLError as exc:  # reached, and the TLS settings do not fit: no outage
        return PostOutcome(False, None, f"{type(exc).__name__}: {exc}", True)
    except (OSError, http.client.HTTPException) as exc:
        return PostOutcome(False, None, f"{type(exc).__name__}: {exc}", True, unreachable=True)
    status = response.status
    if 200 <= status < 300:
        return PostOutcome(True, status, "", False)
    text = answer.decode("utf-8", "replace").strip().splitlines()
    # a redirect is not followed (the POST would change to a GET on the way): where it
    # points is what the target's url should say
    location = response.getheader("Location") if 300 <= status < 400 else None
    error = f"HTTP {status} {response.reason}" + (f" to {location[:200]}" if location else "")
    error += f": {text[0][:200]}" if text else ""
    return PostOutcome(
        False,
        status,
        error,
        status in RETRYABLE or status >= 500,
        unreachable=status in UNREACHED,
    )


def backoff_s(attempts_so_far: int) -> float:
    """Seconds before the next attempt after ``attempts_so_far + 1`` failures."""
    return float(min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(attempts_so_far, 32)))


class Notifier:
    """Queues each target's events and sends the due notifications (the exporter runs it)."""

    def __init__(self, settings: Settings, ledger: Ledger, *, interval_s: float = 2.0) -> None:
        self.settings = settings
        self.ledger = ledger
        self.targets = {t.name: t for t in settings.notify}
        self.interval_s = interval_s
        self._stop = threading.Event()
        #: A ledger that is down logs a traceback, then a line a minute, not one a pass.
        self.failures = LoopFailures(log, "notify pass")
        # model monitoring reads weeks of summaries: at most every monitoring.refresh_s
        caches = MonitoringCaches(settings, ledger)
        self.monitoring, self.traffic, self.turnaround = (
            caches.monitoring,
            caches.traffic,
            caches.turnaround,
        )

    def tick(self, *, now: dt.datetime | None = None) -> int:
        """Queue what happened, then POST what is due; returns how many were attempted."""
        queue_events(
            self.settings,
            self.ledger,
            now=now,
            monitoring=self.monitoring.get,
            traffic=self.traffic.get,
            turnaround=self.turnaround.get,
        )
        now = now or utcnow()
        with self.ledger.session() as s:
            due = [
                (n.id, n.target, n.event, n.key, n.attempts, dict(n.payload))
                for n in s.scalars(
                    select(Notification)
                    .where(
                        Notification.state == DeliveryState.PENDING,
                        Notification.next_attempt_at <= now,
                    )
                    .order_by(Notification.id)
                    .limit(100)
                ).all()
            ]
        # The targets found unreachable in this pass: their other notifications are not
        # POSTed too (a webhook that never answers would hold the pass for each one's
        # timeout), but take the same outcome.
        unreachable: dict[str, PostOutcome] = {}
        for row_id, name, event, key, attempts, payload in due:
            if self._stop.is_set():
                break
            target = self.targets.get(name)
            claim = self._claim(row_id, now, target)
            if claim is None:
                continue  # another exporter process took it
            if target is None:
                outcome = PostOutcome(False, None, f"no [[notify]] named {name!r} now", False)
            elif name in unreachable:
                outcome = unreachable[name]
            else:
                outcome = post_notification(target, payload)
                if outcome.unreachable:
                    unreachable[name] = outcome
            state = self._record(row_id, target, attempts, outcome, claim)
            if outcome.delivered:
                log.info("notify %s: %s delivered", name, key)
            elif state == DeliveryState.FAILED:
                log.error("notify %s: %s (%s) failed: %s", name, key, event, outcome.error)
            else:
                log.warning("notify %s: %s: %s; retrying", name, key, outcome.error)
        return len(due)

    def _record(
        self,
        row_id: int,
        target: NotifyTarget | None,
        attempts: int,
        outcome: PostOutcome,
        claim: str | None = None,
    ) -> DeliveryState:
        """Keep how the attempt went; returns the notification's state after it. An outage
        (:func:`~acwi_node.ledger.repository.outage_attempt`) is not counted in ``attempts``
        until the webhook has been unreachable for its ``outage_patience_s``. Nothing is kept
        when ``claim`` is no longer the notification's (this process stalled past it, and
        another took the notification over: its outcome stands)."""
        now = utcnow()
        with self.ledger.session() as s:
            row = s.get_one(Notification, row_id, with_for_update=True)
            if claim is not None and row.claim_token != claim:
                log.warning(
                    "notify %s: another process took notification %d over (this one's claim"
                    " ran out): this attempt's outcome is not recorded",
                    row.target,
                    row_id,
                )
                return row.state
            row.claim_token = None
            row.last_status = outcome.status
            row.last_error = outcome.error[:2000]
            if outcome.unreachable and target is not None and target.outage_patience_s > 0:
                outage_attempt(
                    row,
                    error=outcome.error,
                    backoff_s=backoff_s(row.outage_attempts),
                    patience_s=target.outage_patience_s,
                    setting=f"notify {target.name} outage_patience_s",
                    now=now,
                )
                return row.state
            tried = attempts + 1
            final = not outcome.retry or target is None or tried >= target.max_attempts
            row.attempts = tried
            outage_over(row)
            if outcome.delivered:
                row.state = DeliveryState.DELIVERED
                row.delivered_at = now
            elif final:
                row.state = DeliveryState.FAILED
            else:
                row.next_attempt_at = now + dt.timedelta(seconds=backoff_s(attempts))
            return row.state

    def _claim(self, row_id: int, now: dt.datetime, target: NotifyTarget | None) -> str | None:
        """Take a due notification for one attempt: its next attempt moves past the attempt's
        longest wait, so that a second exporter process does not POST it too. The claim's
        token, or None (another process took it)."""
        lease = (target.timeout_s if target is not None else 0.0) + 60.0
        return self.ledger.claim_attempt(Notification, row_id, lease_s=lease, due_at=now)

    def run(self) -> None:
        """Tick until :meth:`stop`; an error in one pass is logged and the next goes on."""
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                self.failures.failed()
            else:
                self.failures.worked()
            self._stop.wait(self.failures.wait_s(self.interval_s))

    def stop(self) -> None:
        self._stop.set()
