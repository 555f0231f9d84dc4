"""``GET /api/models`` (any signed-in account): the models the node runs, their versions and
each version's analyses (:mod:`acwi_node.model_overview`); the Models page shows the same."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.model_overview import models_overview


def models_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()

    @router.get("/api/models")
    async def models() -> dict[str, Any]:
        """Each model name the routes use: where its running version comes from
        (``registry``, ``config``, ``bundled``, ``missing``), the routes that run it live and
        as a shadow, and its versions (running, installed, or met in the ledger), each with
        its manifest's labels, thresholds and training, its analyses, the last one's time,
        how many were withdrawn from the PACS and how many a recall
        (``POST /api/models/{name}/{version}/recall``) would withdraw now."""
        found = await run_in_threadpool(models_overview, settings, db)
        return {"models": [m.as_json() for m in found]}

    return router
