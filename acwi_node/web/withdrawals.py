"""``POST /api/studies/{study_uid}/withdraw`` and ``POST /api/models/{name}/{version}/recall``
(administrators, JSON): take AI results back from the PACS with rejection notes
(:mod:`acwi_node.export.withdrawal`)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from acwi_node.config import Settings
from acwi_node.export.withdrawal import MAX_NOTE, NoSuchModel, withdraw_results
from acwi_node.ledger import Ledger, NoSuchStudy, StudyActionRefused
from acwi_node.review.inputs import TypedText
from acwi_node.web.guards import admin_json_request

log = logging.getLogger("acwi_node.api")


class WithdrawalRequest(BaseModel):
    """Why the results are withdrawn: the rejection note's reason and the operator's words."""

    model_config = ConfigDict(extra="forbid")

    #: ``quality``: Rejected for Quality Reasons; ``safety``: Rejected for Patient Safety
    #: Reasons.
    reason: Literal["quality", "safety"] = "quality"
    #: Plain text: tabs and line breaks, no other control character.
    note: TypedText = Field(min_length=1, max_length=MAX_NOTE)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {"description": "Not an administrator"},
    409: {"description": "Nothing of it could be withdrawn (detail)"},
    415: {"description": "Not sent as application/json"},
    422: {"description": "No reason given, or an unknown one"},
}


def withdrawals_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()

    async def run(request: Request, body: WithdrawalRequest, user: str, **target: Any) -> Any:
        try:
            return await run_in_threadpool(
                lambda: withdraw_results(
                    settings,
                    db,
                    reason=body.reason,
                    note=body.note,
                    by=user,
                    address=request.client.host if request.client else "",
                    **target,
                )
            )
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except (NoSuchStudy, NoSuchModel) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except StudyActionRefused as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    @router.post(
        "/api/studies/{study_uid}/withdraw",
        responses={**_RESPONSES, 404: {"description": "No such study"}},
    )
    async def withdraw(
        study_uid: str,
        body: WithdrawalRequest,
        request: Request,
        user: str = Depends(admin_json_request),
    ) -> dict[str, Any]:
        """Withdraw the study's AI results from every destination that holds them: an IHE
        IOCM rejection note per destination, sent by the exporter; what still waits in the
        outbox is never sent. ``jobs`` tells each analysis's outcome."""
        report = await run(request, body, user, study_uid=study_uid)
        why = report.why_nothing()
        if why:
            raise HTTPException(status_code=409, detail=f"nothing withdrawn: {why}")
        log.info("%s: results withdrawn (%s) by %s", study_uid, body.reason, user)
        return {**report.as_json(), "study": db.get_study(study_uid)}

    @router.post(
        "/api/models/{name}/{version}/recall",
        responses={
            **_RESPONSES,
            404: {
                "description": "No such model version on the node (none analysed, running"
                " or installed)"
            },
        },
    )
    async def recall(
        name: str,
        version: str,
        body: WithdrawalRequest,
        request: Request,
        user: str = Depends(admin_json_request),
    ) -> dict[str, Any]:
        """Withdraw every result model ``name`` ``version`` gave (as ``acwi-node models
        recall``; reprocessing the studies is a separate request per study): 404 for a
        version the node does not know, 200 with nothing withdrawn for one that analysed
        nothing yet."""
        report = await run(request, body, user, model_name=name, model_version=version)
        log.info("model %s %s recalled by %s", name, version, user)
        return report.as_json()

    return router
