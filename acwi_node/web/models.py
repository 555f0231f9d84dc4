"""``GET /api/models`` (any signed-in account): the models the node runs, their versions and
each version's analyses (:mod:`acwi_node.model_overview`); the Models page shows the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import ConfigDict

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.model_overview import ModelOverview, models_overview


@dataclass(frozen=True)
class ModelsAnswer:
    """The answer of ``GET /api/models`` (its schema in the OpenAPI document)."""

    __pydantic_config__ = ConfigDict(use_attribute_docstrings=True)

    models: list[ModelOverview] = field(default_factory=list)
    """Each model name the routes use, by name."""


def models_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()

    @router.get("/api/models", response_model=ModelsAnswer)
    async def models() -> dict[str, Any]:
        """Each model name the routes use: where its running version comes from
        (``registry``, ``config``, ``bundled``, ``missing``), the routes that run it live and
        as a shadow, and its versions (running, installed, or met in the ledger), each with
        its manifest's labels, thresholds and training, its analyses, the last one's time,
        how many were withdrawn from the PACS and how many a recall
        (``POST /api/models/{name}/{version}/recall``) would withdraw now. A version that
        loads but should be renumbered (a moving version such as ``latest``, installed or
        configured before the node refused one) has a ``warning`` saying how, and so has
        its model while it is the one running."""
        found = await run_in_threadpool(models_overview, settings, db)
        return {"models": [m.as_json() for m in found]}

    return router
