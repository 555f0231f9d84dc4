"""The node's HTTP API.

``GET /api/studies`` and ``GET /api/studies/{study_uid}`` show each study's state;
``GET /api/worklist`` lists the open review items; ``/healthz``, ``/readyz`` and ``/metrics``
(:mod:`acwi_node.web.ops`) serve probes and Prometheus. The review web app
(:mod:`acwi_node.review.views`) adds its pages; every other path needs a signed-in user (the
JSON API also accepts HTTP Basic credentials of a local account).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Query

from acwi_node import __version__
from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.review.views import install_review
from acwi_node.web.ops import ops_router


def create_app(settings: Settings, ledger: Ledger | None = None) -> FastAPI:
    """The FastAPI application over the ledger."""
    db = ledger or Ledger(settings.database_url)
    app = FastAPI(title="ACWI Node", version=__version__, docs_url="/api/docs", redoc_url=None)
    # The review web app, and sign-in for everything but /healthz, /readyz and /metrics.
    install_review(app, settings, db)

    app.include_router(ops_router(settings, db))  # /healthz, /readyz, /metrics

    @app.get("/api/studies")
    def studies(limit: int = Query(200, ge=1, le=5000)) -> dict[str, Any]:
        return {"studies": db.list_studies(limit=limit), "counts": db.counts()}

    @app.get("/api/studies/{study_uid}")
    def study(study_uid: str) -> dict[str, Any]:
        found = db.get_study(study_uid)
        if found is None:
            raise HTTPException(status_code=404, detail="no such study")
        return found

    @app.get("/api/worklist")
    def worklist() -> dict[str, Any]:
        items = db.worklist()
        return {"items": items, "count": len(items)}

    return app
