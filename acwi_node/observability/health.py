"""Liveness, readiness and metrics over HTTP for the scp, worker and exporter processes.

Each of these processes may run a small HTTP server (``observability.<kind>_port``, 0 = none) on
``observability.ops_host``:

* ``GET /healthz``: 200 while the process runs (liveness).
* ``GET /readyz``: 200 when every readiness check passes, else 503; the JSON body names each
  check and what it found. Checks per kind: ``ledger`` and ``broker`` reachable (all kinds),
  ``listening`` (scp: the DICOM listener is up), ``completion_loop`` (scp), ``models`` (worker:
  the route models are loaded and their weights verified), ``outbox_loop`` (exporter: the outbox
  loop made a pass within ``observability.loop_stale_s``), ``retention`` (exporter: storage
  retention's sweeps are not failing one after another).
* ``GET /metrics``: this process's own Prometheus metrics.
* ``HEAD`` of each: the status and headers of its ``GET``, no body (load balancers probe so).

The web process serves the same ``/healthz`` and ``/readyz`` and the ledger-derived metrics from
its FastAPI app (:mod:`acwi_node.web.ops`). ``acwi-node health --kind KIND``
(:mod:`acwi_node.observability.probe`) queries any of them and exits 0 when ready: usable as a
container health check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import text

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.model_registry import is_fixed_version
from acwi_node.tcp import host_port, listening_socket

log = logging.getLogger("acwi_node.health")

#: A readiness check: returns (ok, detail). It must not raise (a raise counts as not ok).
Check = Callable[[], tuple[bool, str]]


def ledger_check(ledger: Ledger) -> Check:
    def check() -> tuple[bool, str]:
        with ledger.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True, "reachable"

    return check


def broker_check(settings: Settings) -> Check:
    """Redis answers PING; the embedded broker's folder exists; other brokers connect."""

    def check() -> tuple[bool, str]:
        url = settings.broker_url
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(
                url,
                password=settings.broker_password,
                socket_timeout=2,
                socket_connect_timeout=2,
            )
            try:
                client.ping()
            finally:
                client.close()
            return True, "reachable"
        if url.startswith("filesystem://"):
            folder = settings.embedded_broker_dir / "queue"
            if folder.is_dir():
                return True, "embedded"
            if settings.data_dir.is_dir():
                return True, "embedded (no message sent yet)"
            return False, f"data directory {settings.data_dir} is missing"
        from kombu import Connection

        with Connection(url, password=settings.broker_password, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True, "reachable"

    return check


def loop_check(last_pass: Callable[[], float | None], stale_s: float) -> Check:
    """A background loop is alive when its last pass (``time.monotonic()``) is recent."""

    def check() -> tuple[bool, str]:
        last = last_pass()
        if last is None:
            return False, "has not run yet"
        age = time.monotonic() - last
        if age > stale_s:
            return False, f"no pass for {age:.0f} s"
        return True, f"last pass {age:.1f} s ago"

    return check


#: A readiness check that has not answered in this many seconds is not ok: a database server
#: that does not answer holds a query until its connection gives up (half a minute, see
#: :data:`acwi_node.ledger.repository.POSTGRES_CONNECT_ARGS`), and a probe that hangs that long
#: says nothing. The check goes on in the background, and is not started again until it ends.
CHECK_TIMEOUT_S = 5.0


class _Running:
    """One readiness check, run on a thread of its own."""

    def __init__(self, check: Check) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.result: tuple[bool, str] | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(
            target=self._run, args=(check,), name="readiness-check", daemon=True
        )
        self.thread.start()

    def _run(self, check: Check) -> None:
        try:
            self.result = check()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()


@dataclass
class Readiness:
    """Named readiness checks of one process kind."""

    kind: str
    checks: dict[str, Check] = field(default_factory=dict)
    #: Seconds a check may take before it counts as not ok (:data:`CHECK_TIMEOUT_S`).
    timeout_s: float = CHECK_TIMEOUT_S
    #: The error each check last raised (logged when it changes).
    _raised: dict[str, str] = field(default_factory=dict)
    #: The checks under way, by name: one that outlived its probe is not started again.
    _running: dict[str, _Running] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, check: Check) -> Readiness:
        self.checks[name] = check
        return self

    def evaluate(self) -> tuple[bool, dict[str, Any]]:
        """Run every check. A check that raises is not ok, and its answer names the error's
        type alone: ``/readyz`` answers anyone who asks, and a driver's message names the
        database's host, port, name and user (``connection to server at "10.0.0.5", port
        5432 failed``). The message goes to the log, once each time it changes. A check that
        has not answered in :attr:`timeout_s` is not ok (:data:`CHECK_TIMEOUT_S`)."""
        with self._lock:  # probes that come together share the checks under way
            return self._evaluate()

    def _evaluate(self) -> tuple[bool, dict[str, Any]]:
        results: dict[str, Any] = {}
        ready = True
        for name, check in self.checks.items():  # all at once: a probe waits timeout_s at most
            if name not in self._running:
                self._running[name] = _Running(check)
        for name in self.checks:
            running = self._running[name]
            if not running.done.wait(max(0.0, running.started + self.timeout_s - time.monotonic())):
                message = "no answer"
                if self._raised.get(name) != message:
                    self._raised[name] = message
                    log.warning("readiness check %s has not answered in %g s", name, self.timeout_s)
                ready = False
                age = time.monotonic() - running.started
                results[name] = {"ok": False, "detail": f"no answer for {age:.0f} s"}
                continue
            del self._running[name]
            try:
                if running.error is not None:
                    raise running.error
                ok, detail = running.result or (False, "no result")
                self._raised.pop(name, None)
            except Exception as exc:
                message = " ".join(str(exc).split())[:500]
                if self._raised.get(name) != message:
                    self._raised[name] = message
                    log.warning(
                        "readiness check %s failed: %s: %s", name, type(exc).__name__, message
                    )
                ok, detail = False, f"{type(exc).__name__} (the log says more)"
            ready = ready and ok
            results[name] = {"ok": ok, "detail": detail}
        body = {"status": "ready" if ready else "unavailable", "kind": self.kind, "checks": results}
        return ready, body


class OpsServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` for one process, on a daemon thread."""

    def __init__(self, readiness: Readiness, host: str, port: int) -> None:
        from acwi_node.observability.metrics import CONTENT_TYPE, process_metrics

        self.readiness = readiness
        readiness_ref = readiness

        class Handler(BaseHTTPRequestHandler):
            #: False for a HEAD request: the status and headers of its GET, no body.
            with_body = True

            def do_HEAD(self) -> None:  # noqa: N802 (load balancers and monitoring probe so)
                self.with_body = False
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, {"status": "ok", "kind": readiness_ref.kind})
                elif path == "/readyz":
                    ready, body = readiness_ref.evaluate()
                    self._send(200 if ready else 503, body)
                elif path == "/metrics":
                    payload = process_metrics()
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.with_body:
                        self.wfile.write(payload)
                else:
                    self._send(404, {"detail": "not found"})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.with_body:
                    self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # probes every few seconds would flood the log

        # bound as every listener of the node (an IPv6 address, ``::`` for IPv6 and IPv4):
        # http.server's own binding is IPv4 only
        self._server = ThreadingHTTPServer((host, port), Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = listening_socket(host, port)
        self._server.server_address = self._server.socket.getsockname()
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        self._thread.start()
        log.info(
            "%s health and metrics on http://%s (/healthz, /readyz, /metrics)",
            self.readiness.kind,
            host_port(str(self._server.server_address[0]), self.port),
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_ops_server(settings: Settings, readiness: Readiness) -> OpsServer | None:
    """Start the health/metrics server of a process kind when its port is configured."""
    port = settings.observability.port_for(readiness.kind)
    if not port:
        return None
    return OpsServer(readiness, settings.observability.ops_host, port).start()


# ------------------------------------------------------------- readiness per process kind
def _ledger_for_checks(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url, create=False)


def scp_readiness(settings: Settings, ledger: Ledger, scp: Any, completion: Any) -> Readiness:
    """scp: ledger, broker, the DICOM listener is up, the completion loop runs."""
    return (
        Readiness("scp")
        .add("ledger", ledger_check(ledger))
        .add("broker", broker_check(settings))
        .add(
            "listening",
            lambda: (
                (True, f"DICOM on port {settings.node.dicom_port}")
                if scp.listening
                else (False, "the DICOM listener is not running")
            ),
        )
        .add(
            "completion_loop",
            loop_check(lambda: completion.last_pass, settings.observability.loop_stale_s),
        )
    )


#: Storage retention sweeps that must fail in a row before the exporter is not ready: one
#: failed sweep (a database restart) is tried again at the next interval.
RETENTION_FAILURES_UNREADY = 3


def retention_check(retention: Any) -> Check:
    """Storage retention is not failing sweep after sweep (a data disk that only fills)."""

    def check() -> tuple[bool, str]:
        failed = retention.failed_in_a_row
        if failed >= RETENTION_FAILURES_UNREADY:
            error = retention.last_error
            return False, f"{failed} sweeps in a row failed ({error}; the log says more)"
        last = retention.last_sweep
        if last is None:
            done = "no sweep finished yet"
        else:
            done = f"last sweep {time.monotonic() - last:.0f} s ago"
        return True, done + (f"; {failed} failed since" if failed else "")

    return check


def exporter_readiness(
    settings: Settings, ledger: Ledger, exporter: Any, retention: Any = None
) -> Readiness:
    """exporter: ledger, the outbox loop made a pass recently, and storage retention (which
    runs beside it) is not failing sweep after sweep."""
    readiness = (
        Readiness("exporter")
        .add("ledger", ledger_check(ledger))
        .add(
            "outbox_loop",
            loop_check(lambda: exporter.last_pass, settings.observability.loop_stale_s),
        )
    )
    if retention is not None:
        readiness.add("retention", retention_check(retention))
    return readiness


#: Said after a model's status (``/readyz``'s ``models`` check, still ok) when its version is
#: a moving name such as ``latest`` (:func:`~acwi_node.inference.manifest.
#: moving_version_warning`).
MOVING_VERSION_NOTE = (
    "warning: its version is a moving name, to renumber: the log and the Models page say how"
)


class ModelPreload:
    """The worker's models: loaded (solo pool) or verified (prefork) before it takes tasks.

    The models are those the routes name (``[[routes]] model``; a worker that takes only the
    shadow queue, ``worker.queues = ["shadow"]``: their ``shadow_models``), resolved like the
    analyse task does (:meth:`Settings.model_manifest`). With ``load`` the analysers are put
    into the task's cache, so the first study does not pay for it; without, each manifest is
    validated and its weights' SHA-256 checked (a prefork pool must not fork after loading
    PyTorch models). Either way the ledger must not know the model's name and version as other
    weights (:mod:`acwi_node.ledger.model_versions`): the first load records them.
    """

    def __init__(self, settings: Settings, *, load: bool) -> None:
        self.settings = settings
        self.load = load
        if list(settings.worker.queues) == ["shadow"]:
            self.names = sorted({m for r in settings.routes for m in r.shadow_models})
        else:
            self.names = sorted({r.model for r in settings.routes})
        self.status: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.done = False

    def run(self) -> None:
        from acwi_node.inference.manifest import load_manifest

        for name in self.names:
            try:
                if self.load:
                    from acwi_node.tasks.analyse import get_analyser

                    manifest = get_analyser(self.settings, name).manifest
                else:
                    from acwi_node.tasks.analyse import claim_model_version

                    path = self.settings.model_manifest(name)
                    manifest = load_manifest(path, existing=True)
                    claim_model_version(self.settings, manifest, path)
                self.status[name] = (
                    f"{manifest.name} {manifest.version} "
                    f"sha256 {manifest.weights_sha256[:16]} {'loaded' if self.load else 'verified'}"
                )
                if not is_fixed_version(manifest.version):
                    # ready all the same (the model works); the log and the Models page say
                    # how to renumber it (the manifest's path is not for an unsigned probe)
                    self.status[name] += f" ({MOVING_VERSION_NOTE})"
                log.info("model %s: %s", name, self.status[name])
            except Exception as exc:
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                log.error("model %s cannot be loaded: %s", name, exc)
        self.done = True

    def check(self) -> tuple[bool, str]:
        if not self.done:
            return False, "loading"
        if self.failed:
            return False, "; ".join(f"{k}: {v}" for k, v in self.failed.items())
        if not self.names:
            return True, "no route names a model"
        return True, "; ".join(f"{k}: {v}" for k, v in self.status.items())


def worker_readiness(settings: Settings, preload: ModelPreload) -> Readiness:
    """worker: ledger, broker, and every route's model loaded (or verified)."""
    return (
        Readiness("worker")
        .add("ledger", ledger_check(_ledger_for_checks(settings)))
        .add("broker", broker_check(settings))
        .add("models", preload.check)
    )


def start_ops_server_safely(settings: Settings, readiness: Readiness) -> OpsServer | None:
    """:func:`start_ops_server`, logging (not raising) when the port is taken."""
    try:
        return start_ops_server(settings, readiness)
    except OSError as exc:
        log.error(
            "%s: cannot serve health and metrics on port %d: %s",
            readiness.kind,
            settings.observability.port_for(readiness.kind),
            exc,
        )
        return None
