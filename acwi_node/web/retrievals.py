"""``/api/retrievals``: retrieve studies from a ``[[sources]]`` PACS, and follow each request.

``POST`` (administrators, JSON) queues a retrieval, which the ``scp`` process runs (C-FIND,
then C-MOVE to the node); ``GET`` lists the latest ones, ``GET /api/retrievals/{id}`` one.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict

from acwi_node.config import Settings
from acwi_node.ingest.retrieval import QueryError, check_query
from acwi_node.ledger import Ledger
from acwi_node.ledger.retrievals import Retrievals
from acwi_node.review.inputs import RowId
from acwi_node.web.guards import admin_json_request

log = logging.getLogger("acwi_node.api")


class RetrievalRequest(BaseModel):
    """What to retrieve: a source and Study-level matching keys (a study UID, an accession
    number or a study date among them)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    study_uid: str | None = None
    accession_number: str | None = None
    #: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either end may be left open).
    study_date: str | None = None
    #: With one of the others: only studies holding this modality (Modalities in Study).
    modality: str | None = None


def retrievals_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()
    retrievals = Retrievals(db)

    @router.post(
        "/api/retrievals",
        status_code=202,
        responses={
            403: {"description": "Not an administrator"},
            415: {"description": "Not sent as application/json"},
            422: {"description": "No such source, or a query the node will not send (detail)"},
        },
    )
    def request_retrieval(
        body: RetrievalRequest, user: str = Depends(admin_json_request)
    ) -> dict[str, Any]:
        """Queue a retrieval; the answer is the request as queued (``state`` "queued")."""
        names = ", ".join(s.name for s in settings.sources) or "none"
        if body.source not in {s.name for s in settings.sources}:
            raise HTTPException(
                status_code=422, detail=f"no source named {body.source!r} (configured: {names})"
            )
        try:
            query = check_query(body.model_dump(exclude={"source"}))
        except QueryError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        rid = retrievals.request(body.source, query, requested_by=user)
        log.info("retrieval %d from %s queued by %s", rid, body.source, user)
        view = retrievals.get(rid)
        assert view is not None
        return {"retrieval": view.as_json()}

    @router.get("/api/retrievals")
    def list_retrievals(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """The latest retrievals, newest first, and how many there are in each state."""
        return {
            "retrievals": [v.as_json() for v in retrievals.recent(limit)],
            "counts": retrievals.counts(),
        }

    @router.get("/api/retrievals/{retrieval_id}", responses={404: {"description": "No such"}})
    def one_retrieval(retrieval_id: RowId) -> dict[str, Any]:
        view = retrievals.get(retrieval_id)
        if view is None:
            raise HTTPException(status_code=404, detail="no such retrieval")
        return {"retrieval": view.as_json(), "studies": _study_states(db, view.study_uids)}

    return router


def _study_states(db: Ledger, study_uids: list[str]) -> list[dict[str, Any]]:
    """Each study the retrieval found, and its state on the node now (None: nothing came)."""
    held = Retrievals(db).study_states(study_uids)
    return [
        {"study_uid": uid, "state": held[uid].state if uid in held else None} for uid in study_uids
    ]
