"""The node's HTTP API.

``GET /api/studies`` and ``GET /api/studies/{study_uid}`` show each study's state;
``GET /api/worklist`` lists the open review items; ``/healthz`` and ``/readyz`` serve probes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from sqlalchemy import text

from acwi_node import __version__
from acwi_node.config import Settings
from acwi_node.ledger import Ledger


def create_app(settings: Settings, ledger: Ledger | None = None) -> FastAPI:
    """The FastAPI application over the ledger."""
    db = ledger or Ledger(settings.database_url)
    app = FastAPI(title="ACWI Node", version=__version__, docs_url="/api/docs", redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "ledger": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

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
