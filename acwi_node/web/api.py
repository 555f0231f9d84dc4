"""The node's HTTP API.

``GET /api/studies`` and ``GET /api/studies/{study_uid}`` show each study's state, and
``GET /api/studies/{study_uid}/trace`` what happened to it, step by step;
``POST /api/studies/{study_uid}/resend`` and ``.../reprocess`` (administrators) send a study's
results again or analyse it again, ``.../withdraw`` takes them back from the PACS
(:mod:`acwi_node.web.withdrawals`, with ``POST /api/models/{name}/{version}/recall``);
``GET /api/destinations`` (administrators) shows each destination's outbox;
``POST /api/retrievals`` (administrators) retrieves studies from a source PACS and
``GET /api/retrievals`` shows how far each got
(:mod:`acwi_node.web.retrievals`); ``GET /api/feedback/export.zip`` (administrators) downloads
the reviewed cases, de-identified (:mod:`acwi_node.web.feedback`); ``GET /api/worklist`` lists
the open review items, ``GET /api/review/decided`` the closed ones,
``GET /api/review/cases/{id}`` one case and ``POST .../verdict`` and
``.../amend`` a radiologist's verdict on it (:mod:`acwi_node.web.review_api`), and
``GET /api/review/agreement`` how often the radiologists agreed with the model
(:mod:`acwi_node.review.quality`);
``/healthz``, ``/readyz`` and ``/metrics`` (:mod:`acwi_node.web.ops`) serve probes and
Prometheus; ``POST /dicomweb/studies`` (:mod:`acwi_node.web.stow`) stores studies sent by
DICOMweb. The review web app (:mod:`acwi_node.review.views`) adds its pages; every other path
needs a signed-in user (the JSON API also accepts HTTP Basic credentials of a local account).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from acwi_node import __version__
from acwi_node.config import Settings
from acwi_node.ledger import Ledger, NoSuchStudy, StudyActionRefused, StudyState
from acwi_node.ledger.trace import study_trace
from acwi_node.review.inputs import plain_path_and_query
from acwi_node.review.store import (
    WORKLIST_MAX_PER_PAGE,
    WORKLIST_PER_PAGE,
    ReviewStore,
    WorklistFilters,
    worklist_page,
)
from acwi_node.review.views import destination_outboxes, error_page, install_review, wants_page
from acwi_node.web.feedback import feedback_router
from acwi_node.web.guards import (
    ApiLimits,
    GuardsFirst,
    HeadAsGet,
    StrictTransport,
    admin_json_request,
    admin_user,
    document_access,
    server_failed,
)
from acwi_node.web.models import models_router
from acwi_node.web.monitoring import monitoring_router
from acwi_node.web.ops import ops_router
from acwi_node.web.retrievals import retrievals_router
from acwi_node.web.review_api import review_router
from acwi_node.web.stow import stow_router
from acwi_node.web.withdrawals import withdrawals_router

log = logging.getLogger("acwi_node.api")


def app_in_worker() -> FastAPI:
    """The app of one of several web processes (``node.http_workers``): the settings, logging
    and audit trail of ``acwi-node web``, from the environment it handed down."""
    from acwi_node.audit import configure_audit
    from acwi_node.config import load_settings
    from acwi_node.observability.logging import setup_logging

    settings = load_settings()
    setup_logging(settings, "web")
    configure_audit(settings, "web")
    return create_app(settings)


async def request_invalid(request: Request, exc: Exception) -> Response:
    """A request the handler's parameters refuse.

    A path parameter that is not valid (a case id beyond what the ledger's keys hold, or no
    number at all: :data:`~acwi_node.review.inputs.RowId`; text with a control character, a
    NUL that PostgreSQL cannot compare among them:
    :func:`~acwi_node.review.inputs.plain_path_and_query`) names nothing there can be: 404.
    Anything else (a query value with a control character too) is FastAPI's 422 with the
    errors, less what JSON cannot carry: a NaN or Infinity in the body, or an unpaired
    surrogate, is left out of the error it belongs to rather than failing the answer."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(tuple(error.get("loc") or ())[:1] == ("path",) for error in errors):
        if wants_page(request):  # a browser's review page: as any other 404 of one
            return await error_page(request, 404, "Not Found")
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    return JSONResponse({"detail": [_reportable(error) for error in errors]}, status_code=422)


def _reportable(error: Mapping[str, Any]) -> dict[str, Any]:
    """One validation error as the 422 answer gives it: each of its parts (``type``, ``loc``,
    ``msg``, ``input``, ``ctx``) that JSON can carry."""
    out: dict[str, Any] = {}
    for key, value in error.items():
        encoded = jsonable_encoder(value)
        try:
            json.dumps(encoded, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError):  # NaN, Infinity; an unpaired surrogate (UnicodeError)
            continue
        out[key] = encoded
    return out


def create_app(settings: Settings, ledger: Ledger | None = None) -> FastAPI:
    """The FastAPI application over the ledger."""
    db = ledger or Ledger(settings.ledger_url)
    app = FastAPI(
        title="ACWI Node",
        version=__version__,
        # No browsable Swagger UI: FastAPI's page loads its script from a public CDN (a
        # floating version, no integrity check) into the node's origin, where a signed-in
        # reader's session may decide cases and an administrator's export patients' images;
        # and it needs inline script, which the pages' Content-Security-Policy refuses. Its
        # OAuth2 redirect page (/docs/oauth2-redirect) goes with it.
        docs_url=None,
        # under /api/, where HTTP Basic credentials do: a program can fetch it
        openapi_url="/api/openapi.json",
        redoc_url=None,
        # every route, those to come too: a path parameter or a query value with a control
        # character (a NUL, which PostgreSQL refuses) is a 404 or a 422, never a lookup
        dependencies=[Depends(plain_path_and_query)],
    )
    # inside the sign-in: who may call a route is checked before its body is read
    app.add_middleware(GuardsFirst)
    # The review web app, and sign-in for everything but /healthz, /readyz and /metrics.
    install_review(app, settings, db)

    app.include_router(ops_router(settings, db))  # /healthz, /readyz, /metrics

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """A client that closed its connection before its request's body ended: a line, not
        a traceback; nobody is left to read the answer."""
        log.info("%s %s: the client closed the connection", request.method, request.url.path)
        return JSONResponse({"detail": "the connection closed"}, status_code=400)

    app.add_exception_handler(RequestValidationError, request_invalid)
    # an error nothing else answered, the sign-in's too: JSON, no traceback; 503 for the ledger
    app.add_exception_handler(Exception, server_failed)
    # outside the sign-in: a body too large is refused unread, every answer kept from caches
    app.add_middleware(ApiLimits)
    tls = settings.node.http_tls
    if tls.enabled and tls.hsts_max_age_days > 0:  # every answer, errors too
        app.add_middleware(StrictTransport, max_age_s=tls.hsts_max_age_days * 86_400)
    # outermost: HEAD is answered as GET, without the body (load balancers, monitoring)
    app.add_middleware(HeadAsGet)

    app.include_router(stow_router(settings, db))  # STOW-RS: POST /dicomweb/studies
    app.include_router(retrievals_router(settings, db))  # /api/retrievals
    # POST /api/studies/{uid}/withdraw, /api/models/{name}/{version}/recall
    app.include_router(withdrawals_router(settings, db))
    app.include_router(feedback_router(settings, db))  # /api/feedback/export.zip
    app.include_router(review_router(settings, db))  # /api/review/cases/{id}[/verdict|/amend]
    app.include_router(monitoring_router(settings, db))  # /api/monitoring[/baselines/...]
    app.include_router(models_router(settings, db))  # GET /api/models

    @app.get("/api/studies")
    def studies(
        limit: int = Query(200, ge=1, le=5000),
        state: Annotated[
            StudyState | None, Query(description="only the studies in this state")
        ] = None,
        calling_ae: str = Query(
            "",
            max_length=16,
            description="only those this AE sent (first, or the current generation)",
        ),
        uid: str = Query("", max_length=64, description="a Study Instance UID's beginning"),
    ) -> dict[str, Any]:
        """The latest studies first, and how many studies are in each state."""
        found = db.list_studies(
            limit=limit, state=state.value if state else "", calling_ae=calling_ae, uid=uid
        )
        return {"studies": found, "counts": db.counts()}

    @app.get("/api/studies/{study_uid}", responses={404: {"description": "No such study"}})
    def study(study_uid: str) -> dict[str, Any]:
        found = db.get_study(study_uid)
        if found is None:
            raise HTTPException(status_code=404, detail="no such study")
        return found

    @app.get("/api/studies/{study_uid}/trace", responses={404: {"description": "No such study"}})
    def trace(study_uid: str) -> dict[str, Any]:
        """What happened to the study, step by step, generation by generation: received,
        completed (and by what), routed, analysed, delivered to each destination, sent to the
        RIS, reviewed; and how long each step of its latest analysis took."""
        found = study_trace(db, study_uid)
        if found is None:
            raise HTTPException(status_code=404, detail="no such study")
        return found.as_json()

    def _study_action(request: Request, study_uid: str, act: Callable[[str], int]) -> int:
        name = admin_json_request(request)
        try:
            value = act(study_uid)
        except NoSuchStudy as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except StudyActionRefused as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        log.info("%s: %s (%d) by %s", study_uid, request.url.path.rsplit("/", 1)[-1], value, name)
        return value

    #: What the OpenAPI document says of an administrator's action (the handler reads no body
    #: but insists on its media type: FastAPI cannot infer either).
    admin_action: dict[str, Any] = {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "description": "An empty JSON object: the media type keeps cross-site forms out",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
        "responses": {
            403: {"description": "Not an administrator"},
            415: {"description": "Not sent as application/json"},
        },
    }
    study_action: dict[str, Any] = {
        **admin_action,
        "responses": {
            **admin_action["responses"],
            404: {"description": "No such study"},
            409: {"description": "The study's state does not allow it (detail)"},
        },
        "dependencies": [Depends(admin_json_request)],
    }

    @app.post("/api/studies/{study_uid}/resend", **study_action)
    def resend(study_uid: str, request: Request) -> dict[str, Any]:
        """The study's results go to their destinations again (after a PACS outage longer
        than ``exporter.max_attempts`` allowed, or objects the PACS lost)."""
        count = _study_action(request, study_uid, db.resend_results)
        return {"deliveries": count, "study": db.get_study(study_uid)}

    @app.post("/api/studies/{study_uid}/reprocess", **study_action)
    def reprocess(study_uid: str, request: Request) -> dict[str, Any]:
        """The study goes through routing and analysis again, as a new generation."""
        generation = _study_action(request, study_uid, db.reprocess_study)
        return {"generation": generation, "study": db.get_study(study_uid)}

    @app.get("/api/destinations", responses={403: {"description": "Not an administrator"}})
    def destinations(request: Request) -> dict[str, Any]:
        """Administrators: each result destination's outbox, and the RIS's (as on the
        dashboard): results waiting, failed for good, the last delivered, the latest error."""
        admin_user(request)
        return {"destinations": destination_outboxes(ReviewStore(db), settings)}

    @app.post(
        "/api/destinations/{name}/retry",
        **{
            **admin_action,
            "responses": {**admin_action["responses"], 404: {"description": "No such destination"}},
        },
    )
    def retry_destination(name: str, user: str = Depends(admin_json_request)) -> dict[str, Any]:
        """Every delivery to the destination that failed for good goes back to the outbox,
        its attempts counted from zero (after an outage longer than
        ``exporter.outage_patience_s``, or once its configuration is mended): the current
        results of each study and every rejection note owed, never withdrawn results."""
        retried = db.retry_failed(name)
        if not retried.deliveries and name not in {d.name for d in settings.destinations}:
            raise HTTPException(status_code=404, detail=f"no destination named {name}")
        log.info("%s: %d failed deliveries retried by %s", name, retried.deliveries, user)
        return {"deliveries": retried.deliveries, "study_uids": retried.study_uids}

    @app.get("/api/worklist")
    def worklist(
        request: Request,
        modality: str = Query("", max_length=64),
        calling_ae: str = Query("", max_length=64),
        model: str = Query("", max_length=64),
        state: Annotated[
            StudyState | None, Query(description="only the cases of studies in this state")
        ] = None,
        kind: Annotated[
            Literal["flagged", "sample"] | None,
            Query(description="flagged: the model asked for review; sample: quality control"),
        ] = None,
        page: Annotated[int, Query(ge=1, le=1_000_000, description="the page, from 1")] = 1,
        per_page: Annotated[
            int,
            Query(ge=1, le=WORKLIST_MAX_PER_PAGE, description="cases a page"),
        ] = WORKLIST_PER_PAGE,
    ) -> dict[str, Any]:
        """The open review cases in the worklist page's order (escalated, priority, flagged
        before quality-control samples, oldest, then by id), with its filters, a page at a
        time: each case's figures, ``escalated``, and ``reading`` (who opened it in the last
        ``review.reading_claim_s`` seconds, else null). ``count``: the cases under the
        filters, on every page; ``total``: before the filters; ``counts``: per filter value,
        over every open case; ``page``, ``per_page``, ``pages``; ``next`` and ``previous``:
        the address of the next and the previous page with the same filters, or null (a
        page past the last has no items)."""
        filters = WorklistFilters(
            modality, calling_ae, model, state.value if state else "", kind or ""
        )
        found = worklist_page(
            ReviewStore(db).worklist(filters, claim_s=settings.review.reading_claim_s),
            page,
            per_page,
        )

        def at(number: int) -> str:
            query = {k: v for k, v in request.query_params.items() if k != "page"}
            return "/api/worklist?" + urlencode({**query, "page": str(number)})

        return {
            **found,
            "next": at(page + 1) if page < found["pages"] else None,
            "previous": at(min(page - 1, found["pages"])) if page > 1 else None,
        }

    @app.get("/api/review/agreement")
    def review_agreement(days: int = Query(90, ge=1, le=3650)) -> dict[str, Any]:
        """The radiologists' final verdicts of the last ``days`` days per model version and
        kind of case (``flagged``: the model asked for review; ``sample``: a quality-control
        sample of the studies it was sure of): verdicts, agreements, the agreement rate with
        its 95 % Wilson interval and the commonest corrections."""
        return {
            "days": days,
            "quality_sample_percent": settings.review.quality_sample_percent,
            "rows": ReviewStore(db).agreement(days=days),
        }

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with how to sign in and every error the API answers."""
        if app.openapi_schema is None:
            app.openapi_schema = document_access(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
