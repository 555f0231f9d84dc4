"""``/api/review/cases/{id}``: a review case as JSON, and a radiologist's verdict or amendment.

For a reading tool or a reporting system that works the worklist (``GET /api/worklist``)
without the review pages: ``GET`` gives the case (the model's figures per image, the verdicts
so far, the results and their deliveries; no patient data, as in the rest of the ledger);
``POST .../verdict`` records a verdict and ``POST .../amend`` amends a closed case's verdict,
exactly as the case page's forms do (:mod:`acwi_node.review.verdicts`): the verified SR written
and queued, the RIS told, the audit recorded. Lesion boxes are given in the images' own pixels,
``[x0, y0, x1, y1]`` inclusive per box, by image name (its SOP Instance UID, ``"<uid> frame
<n>"`` for a frame of a multi-frame image), as the ledger keeps them.

The POSTs are for radiologists and administrators, with a JSON body (its media type keeps
cross-site forms out); HTTP Basic credentials of a local account do for a program.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from acwi_node.config import Settings
from acwi_node.inference.types import unit_name
from acwi_node.ledger import Ledger
from acwi_node.review.inputs import RowId, TypedText
from acwi_node.review.store import (
    ItemClosed,
    ReviewError,
    ReviewStore,
    SessionInfo,
    VerdictAmended,
    frame_number_of,
)
from acwi_node.review.verdicts import MAX_REASON, VerdictOutcome, amend_verdict, submit_verdict
from acwi_node.web.guards import access_guard

log = logging.getLogger("acwi_node.api")

#: An image's lesion boxes: each ``[x0, y0, x1, y1]`` in its pixels, inclusive (by image
#: name: plain text, as every name the API is given).
PixelBoxes = dict[TypedText, list[list[StrictInt]]]


class VerdictRequest(BaseModel):
    """A verdict, as the case page's form gives it."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["confirm", "override", "escalate"]
    #: The right label, for an override (one of the model's labels).
    label: TypedText = ""
    #: Required to override or escalate; plain text (tabs and line breaks, no other control
    #: character).
    reason: TypedText = Field("", max_length=MAX_REASON)
    #: Lesion boxes by image name, with a confirmed or corrected finding.
    boxes: PixelBoxes = Field(default_factory=dict)


class AmendmentRequest(BaseModel):
    """An amendment of a closed case's verdict: what the amended verdict says, in full."""

    model_config = ConfigDict(extra="forbid")

    #: The id of the verdict it amends: the case's ``current_verdict`` as last read.
    amends: int
    action: Literal["confirm", "override"]
    label: TypedText = ""
    reason: TypedText = Field(min_length=1, max_length=MAX_REASON)
    #: Every lesion box the amended verdict keeps (those of the verdict it amends included).
    boxes: PixelBoxes = Field(default_factory=dict)


def case_json(case: dict[str, Any]) -> dict[str, Any]:
    """What the API gives of a review case (:meth:`ReviewStore.case`)."""
    summary = case["summary"]
    predicted = summary.get("predicted_label")
    images = []
    for im in summary.get("images") or []:
        sop, frame = str(im.get("sop_instance_uid", "")), frame_number_of(im)
        images.append(
            {
                "name": unit_name(sop, frame),
                "sop_instance_uid": sop,
                "frame_number": frame,
                "probabilities": im.get("probabilities") or {},
                "probability": float((im.get("probabilities") or {}).get(predicted, 0.0)),
                "uncertainty_score": float(im.get("uncertainty_score", 0.0)),
                "ood_score": float(im.get("ood_score", 0.0)),
            }
        )
    return {
        "id": case["id"],
        "state": case["state"],
        "kind": case["kind"],
        "reason": case["reason"],
        "priority": case["priority"],
        "created_at": case["created_at"],
        "closed_at": case["closed_at"],
        "study_uid": case["study_uid"],
        "modality": case["modality"],
        # who sent the generation the model read, and the study's first sender
        "calling_ae": case["calling_ae"],
        "first_calling_ae": case["first_calling_ae"],
        "body_part": case["body_part"],
        "instances": case["instances"],
        "images_deleted_at": case["images_deleted_at"],
        # who opened it in the last review.reading_claim_s seconds (reading it does not count)
        "reading": case["reading"],
        "model": summary.get("model") or {},
        "predicted_label": predicted,
        "labels": summary.get("labels") or [],
        "finding_labels": summary.get("finding_labels"),
        "probabilities": summary.get("probabilities") or {},
        "uncertainty": summary.get("uncertainty") or {},
        "ood_score": summary.get("ood_score"),
        "images": images,
        "verdicts": case["verdicts"],
        "current_verdict": case["current_verdict"],
        "results": [
            {k: r[k] for k in ("kind", "sop_instance_uid", "deliveries")} for r in case["results"]
        ],
    }


@access_guard
def reader_json_request(request: Request) -> SessionInfo:
    """A radiologist's or administrator's POST with a JSON body; 403 / 415 otherwise."""
    user: SessionInfo | None = getattr(request.state, "user", None)
    if user is None or user.role not in ("radiologist", "admin"):
        raise HTTPException(status_code=403, detail="radiologists and administrators only")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(status_code=415, detail="send Content-Type: application/json")
    return user


#: The signed-in radiologist or administrator of a JSON POST (:func:`reader_json_request`).
Reader = Annotated[SessionInfo, Depends(reader_json_request)]

_DECIDED: dict[int | str, dict[str, Any]] = {
    403: {"description": "Not a radiologist or administrator"},
    404: {"description": "No such case"},
    409: {"description": "The case is closed, or its verdict changed meanwhile (detail)"},
    415: {"description": "Not sent as application/json"},
    422: {"description": "A verdict the node refuses: the reason in detail"},
}


def review_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()
    store = ReviewStore(db)

    def _case(item_id: int) -> dict[str, Any]:
        case = store.case(item_id, claim_s=settings.review.reading_claim_s)
        if case is None:
            raise HTTPException(status_code=404, detail="no such case")
        return case

    def _answer(item_id: int, outcome: VerdictOutcome) -> dict[str, Any]:
        return {
            "verdict": {
                "id": outcome.verdict_id,
                "action": outcome.action,
                "label": outcome.label,
                "sr_sop_instance_uid": outcome.sr_sop_instance_uid,
                "deliveries": outcome.deliveries,
            },
            "case": case_json(_case(item_id)),
        }

    @router.get("/api/review/decided")
    def review_decided(
        days: int = Query(14, ge=1, le=3650),
        reader: str = Query("", max_length=64),
        limit: int = Query(200, ge=1, le=5000),
    ) -> dict[str, Any]:
        """The cases closed in the last ``days`` days, latest first: each with the verdict that
        stands and how many amendments it took; ``reader``: only that user's verdicts."""
        items = store.decided(days=days, reader=reader, limit=limit)
        return {"items": items, "count": len(items)}

    @router.get("/api/review/cases/{item_id}", responses={404: {"description": "No such case"}})
    def review_case(item_id: RowId, request: Request) -> dict[str, Any]:
        """A review case: the model's figures, the verdicts so far (``current_verdict``: the
        one that stands), the results and their deliveries."""
        case = _case(item_id)
        user: SessionInfo = request.state.user
        client = request.client.host if request.client else ""
        store.audit(user.user_name, "view_case", case["study_uid"], f"item {item_id}", client)
        return case_json(case)

    @router.post("/api/review/cases/{item_id}/verdict", responses=_DECIDED)
    def review_verdict(item_id: RowId, body: VerdictRequest, user: Reader) -> dict[str, Any]:
        """Confirm, override or escalate an open case (as the case page's form)."""
        _case(item_id)
        try:
            outcome = submit_verdict(
                settings, store, item_id, user, action=body.action, label=body.label,
                reason=body.reason, boxes=body.boxes,
            )  # fmt: skip
        except ItemClosed as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        except ReviewError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return _answer(item_id, outcome)

    @router.post("/api/review/cases/{item_id}/amend", responses=_DECIDED)
    def review_amendment(item_id: RowId, body: AmendmentRequest, user: Reader) -> dict[str, Any]:
        """Amend a closed case's verdict ``amends`` (its ``current_verdict``)."""
        _case(item_id)
        try:
            outcome = amend_verdict(
                settings, store, item_id, user, amends=body.amends, action=body.action,
                label=body.label, reason=body.reason, boxes=body.boxes,
            )  # fmt: skip
        except VerdictAmended as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        except ReviewError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return _answer(item_id, outcome)

    return router
