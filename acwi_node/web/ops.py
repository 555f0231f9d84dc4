"""Operations endpoints of the web process: ``/healthz``, ``/readyz`` and ``/metrics``.

``/metrics`` serves the ledger-derived metrics (studies, instances, jobs, deliveries, review rate,
broker queue length; see :mod:`acwi_node.observability.metrics`), computed from the ledger on
every scrape, plus the web process's own process-local metrics.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.observability.health import Readiness, broker_check, ledger_check
from acwi_node.observability.metrics import CONTENT_TYPE, ledger_registry, process_metrics


def web_readiness(settings: Settings, ledger: Ledger) -> Readiness:
    """The web process is ready when the ledger and the broker answer."""
    return (
        Readiness("web").add("ledger", ledger_check(ledger)).add("broker", broker_check(settings))
    )


def ops_router(settings: Settings, ledger: Ledger) -> APIRouter:
    """The router the node's FastAPI app includes."""
    router = APIRouter(tags=["operations"])
    readiness = web_readiness(settings, ledger)
    registry = ledger_registry(settings, ledger)

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "kind": "web"}

    @router.get(
        "/readyz",
        responses={503: {"description": "Not ready: the checks that failed, as for 200"}},
    )
    def readyz() -> JSONResponse:
        ready, body = readiness.evaluate()
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            }
        },
    )
    def metrics() -> Response:
        payload = generate_latest(registry) + process_metrics()  # every web process's
        return Response(payload, media_type=CONTENT_TYPE)

    return router
