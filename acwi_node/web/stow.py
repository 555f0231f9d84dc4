"""``POST /dicomweb/studies[/{study}]``: the STOW-RS origin server (:mod:`acwi_node.ingest.stow`).

The body is streamed into a file beside the spool (``<spool>/.tmp/``, never held in memory
whole, refused with 413 past ``[dicomweb] max_request_bytes``), then its parts are stored from
that file, mapped into memory, in a worker thread; the file is removed as soon as its objects
are in their spool files (before the flush, which would otherwise write it to disk too), or
afterwards whatever happened. Only accounts with the ``sender`` or ``admin`` role may post
(HTTP Basic, as for the JSON API); the response is ``application/dicom+json``, or
``application/dicom+xml`` for a client whose ``Accept`` header prefers it (406, before anything
is read, for one that accepts neither).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from acwi_node.config import Settings
from acwi_node.ingest.holders import HOLDERS_DIR, HolderName, release_gone_holders
from acwi_node.ingest.spool import Spool, is_safe_uid
from acwi_node.ingest.stow import BodyFile, MultipartError, StowReceiver, boundary_of
from acwi_node.ledger import Ledger
from acwi_node.observability import metrics
from acwi_node.review.store import SessionInfo

log = logging.getLogger("acwi_node.ingest")

#: Roles that may store studies by STOW-RS.
SENDER_ROLES = ("sender", "admin")
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
#: The media ranges that name each response type, the most specific first.
_MEDIA_RANGES = {
    DICOM_JSON: (DICOM_JSON, "application/json", "application/*", "*/*"),
    DICOM_XML: (DICOM_XML, "application/*", "*/*"),
}


def response_type(accept: str | None) -> str | None:
    """The response's media type for a request's ``Accept`` header (RFC 9110 12.5.1): DICOM
    JSON unless the client prefers DICOM XML; None when it accepts neither. Each type takes
    the quality of the most specific range that names it (``application/dicom+json;q=0,
    */*`` excludes JSON); ties go to JSON."""
    if accept is None or not accept.strip():
        return DICOM_JSON
    qualities: dict[str, float] = {}
    for item in accept.split(","):
        media_range, *params = (piece.strip() for piece in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        qualities.setdefault(media_range.lower(), quality)
    best, best_quality = None, 0.0
    for media_type, ranges in _MEDIA_RANGES.items():
        quality = next((qualities[r] for r in ranges if r in qualities), 0.0)
        if quality > best_quality:
            best, best_quality = media_type, quality
    return best


def _refused(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _stored_doc(outcome: str) -> dict[str, Any]:
    return {
        "description": outcome + " DICOM JSON (PS3.18 Table 10.5.3-2): Referenced SOP Sequence"
        " (0008,1199) of the objects stored, Failed SOP Sequence (0008,1198) with a Failure"
        " Reason (0008,1197) each for those refused, Retrieve URL (0008,1190); or the same in"
        " the Native DICOM Model (application/dicom+xml) where the Accept header prefers it",
        "content": {
            DICOM_JSON: {"schema": {"type": "object"}},
            DICOM_XML: {"schema": {"type": "string"}},
        },
    }


def _refusal_doc(outcome: str) -> dict[str, Any]:
    return {
        "description": outcome + "; nothing stored",
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"detail": {"type": "string"}}}
            }
        },
    }


#: What the OpenAPI document (``/api/openapi.json``) says of the two STOW-RS paths: the
#: handler reads the body itself (streamed to a file), so FastAPI cannot infer it, nor the
#: answers.
OPENAPI: dict[str, Any] = {
    "tags": ["DICOMweb"],
    "response_class": Response,  # no application/json of FastAPI's own beside DICOM JSON
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "Part 10 DICOM objects, one per part (PS3.18 10.5.1)",
            "content": {
                'multipart/related; type="application/dicom"': {
                    "schema": {"type": "string", "format": "binary"}
                }
            },
        }
    },
    "responses": {
        200: _stored_doc("Every object stored."),
        202: _stored_doc("Some objects stored."),
        409: _stored_doc("No object stored."),
        400: _refusal_doc(
            "Not a multipart body, one cut short, or a study in the URL that is no UID"
        ),
        401: _refusal_doc("No or wrong credentials (HTTP Basic, or a session)"),
        403: _refusal_doc("An account without the sender or admin role, or STOW-RS turned off"),
        406: _refusal_doc("An Accept header that takes neither DICOM JSON nor DICOM XML"),
        413: _refusal_doc("A body larger than dicomweb.max_request_bytes"),
        415: _refusal_doc("A media type other than multipart/related of application/dicom"),
        429: _refusal_doc("Sign-in attempts throttled (Retry-After says when to try again)"),
        503: _refusal_doc("The body cannot be kept while it is stored (disk full)"),
    },
}


def stow_router(settings: Settings, ledger: Ledger) -> APIRouter:
    """The STOW-RS routes."""
    router = APIRouter()
    spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
    # the requests this process has open, under its name: released by whoever finds it gone
    holder = HolderName(spool.root / HOLDERS_DIR, "stow")
    receiver = StowReceiver(
        ledger, spool, audit_patient_id=settings.audit.patient_id, holder=holder
    )
    limit = settings.dicomweb.max_request_bytes

    def started() -> None:
        """What a web process (this one's predecessor) killed with requests open held goes."""
        try:
            release_gone_holders(spool.root, ledger.release_holder)
        except Exception:  # the scp process's completion loop sweeps them too
            log.exception("STOW-RS: could not release what stopped processes held")

    def stopped() -> None:
        """Every request has ended: what this process still holds (an end it could not
        record, the ledger down just then) goes now."""
        holder.close(ledger.release_holder)

    router.add_event_handler("startup", started)
    router.add_event_handler("shutdown", stopped)

    async def store(request: Request, study_uid: str | None) -> Response:
        user: SessionInfo | None = getattr(request.state, "user", None)
        if user is None or user.role not in SENDER_ROLES:
            return _refused(403, "storing studies needs an account with the sender role")
        if not settings.dicomweb.stow_enabled:
            return _refused(403, "STOW-RS is turned off ([dicomweb] stow_enabled)")
        if study_uid is not None and not is_safe_uid(study_uid):
            return _refused(400, "the study in the URL is not a valid UID")
        media_type = response_type(request.headers.get("accept"))
        if media_type is None:
            return _refused(406, f"the response is {DICOM_JSON} or {DICOM_XML}")
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
        except MultipartError as exc:
            return _refused(415, str(exc))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _refused(413, f"the body is larger than {limit} bytes")
        try:
            body = BodyFile(spool)
        except OSError as exc:
            log.error("STOW-RS: cannot keep a request's body: %s", exc.strerror or exc)
            return _refused(503, f"cannot store now: {exc.strerror or exc}")
        try:
            received = 0
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        return _refused(413, f"the body is larger than {limit} bytes")
                    view = memoryview(chunk)
                    try:
                        while view:
                            view = view[os.write(body.fd, view) :]
                    except OSError as exc:  # a full disk: nothing of the request is stored
                        log.error("STOW-RS: cannot keep a request's body: %s", exc.strerror or exc)
                        return _refused(503, f"cannot store now: {exc.strerror or exc}")
            except ClientDisconnect:  # nobody to answer; nothing of the request is stored
                log.warning(
                    "STOW-RS from %s: the connection closed after %d bytes, before the body"
                    " ended; nothing stored",
                    user.user_name[:16],
                    received,
                )
                return _refused(400, "the connection closed before the body ended")
            address = request.client.host if request.client is not None else ""
            try:
                result = await run_in_threadpool(
                    receiver.receive_file, body, boundary, user.user_name, address, study_uid
                )
            except MultipartError as exc:
                log.warning("STOW-RS from %s: %s", user.user_name[:16], exc)
                return _refused(400, f"not a multipart body of DICOM objects: {exc}")
        finally:
            body.discard()
        base = str(request.base_url).rstrip("/") + "/dicomweb/studies"
        notes = ""
        if result.unchanged:
            notes += f", {result.unchanged} sent again unchanged (their studies not re-opened)"
        if result.kept:
            notes += f", {result.kept} object(s) no model reads (their studies not re-opened)"
        if result.dropped:
            notes += f", {result.dropped} written by ACWI Node (its results) not stored"
        log.info(
            "STOW-RS from %s: %d stored, %d refused%s",
            user.user_name[:16],
            len(result.stored) - result.dropped,
            len(result.failed),
            notes,
        )
        url = base if study_uid is None else f"{base}/{study_uid}"
        if media_type == DICOM_XML:
            return Response(result.response_xml(url), result.status, media_type=DICOM_XML)
        return JSONResponse(result.response(url), result.status, media_type=DICOM_JSON)

    async def counted(request: Request, study_uid: str | None) -> Response:
        began = time.monotonic()
        response = await store(request, study_uid)
        metrics.STOW_REQUESTS.labels(str(response.status_code)).inc()
        metrics.STOW_REQUEST_SECONDS.observe(time.monotonic() - began)
        return response

    @router.post("/dicomweb/studies", **OPENAPI)
    async def store_studies(request: Request) -> Response:
        """Store the DICOM objects of a ``multipart/related`` body (STOW-RS)."""
        return await counted(request, None)

    @router.post("/dicomweb/studies/{study_uid}", **OPENAPI)
    async def store_study(request: Request, study_uid: str) -> Response:
        """Store the objects of one study; an object of another study is refused (0xA900)."""
        return await counted(request, study_uid)

    return router
