"""Who may call what, and what the JSON API takes and answers: the checks its handlers share
(:func:`admin_user`, :func:`admin_json_request`; :func:`access_guard` marks them, and
:class:`GuardsFirst` runs them before a request's body is read), the limits of every request
body and the headers of every ``/api/`` answer (:class:`ApiLimits`), ``HEAD`` answered as
``GET`` (:class:`HeadAsGet`), the answer to an error nothing else answered
(:func:`server_failed`) and what the OpenAPI document says of signing in and of errors
(:func:`document_access`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from acwi_node.review.store import SessionInfo
from acwi_node.web.paths import route_path

#: The largest request body the JSON API takes, in bytes: a verdict, a withdrawal or a
#: retrieval is a few kilobytes; a larger body is refused (413) before it is read whole.
MAX_API_BODY = 1 << 20

#: The largest body a review page's form may post (sign-in, a verdict with its lesion boxes,
#: an amendment, an administrator's action), in bytes: the largest, a verdict, is a few
#: kilobytes (a reason of at most 1000 characters, at most 20 lesion boxes).
MAX_FORM_BODY = 64 * 1024

#: The paths whose handlers enforce their own body limit: STOW-RS
#: (``dicomweb.max_request_bytes``).
OWN_BODY_LIMIT = ("/dicomweb/",)

G = TypeVar("G", bound=Callable[[Request], object])

#: The checks of who may call a route (:func:`access_guard`).
_GUARDS: set[Callable[[Request], object]] = set()


def access_guard(check: G) -> G:
    """Mark ``check`` (a dependency taking only the request: who signed in, the headers) as
    one that decides who may call a route: :class:`GuardsFirst` runs it before the request's
    body is read, so that a caller without the right gets 401, 403 or 415 whatever the body
    holds, never the body's 422."""
    _GUARDS.add(check)
    return check


#: What every answer of the JSON API carries (patient-related data: kept by no cache).
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@access_guard
def admin_user(request: Request) -> str:
    """The signed-in administrator's user name; 403 for anyone else."""
    user: SessionInfo | None = getattr(request.state, "user", None)
    if user is None or user.role != "admin":
        raise HTTPException(status_code=403, detail="administrators only")
    return user.user_name


@access_guard
def admin_json_request(request: Request) -> str:
    """An administrator's POST with a JSON body: the content type keeps cross-site forms
    (which cannot send it without a CORS preflight the node never grants) out."""
    name = admin_user(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(status_code=415, detail="send Content-Type: application/json")
    return name


class BodyTooLarge(HTTPException):
    """A request body past its path's limit (:func:`body_limit`)."""

    def __init__(self, limit: int = MAX_API_BODY) -> None:
        super().__init__(status_code=413, detail=f"the body is larger than {limit} bytes")


def body_limit(path: str) -> int | None:
    """The largest body a request to ``path`` may carry, in bytes: :data:`MAX_API_BODY` under
    ``/api/``, :data:`MAX_FORM_BODY` for the review app's pages and forms (``/login``,
    ``/review/...``); None under :data:`OWN_BODY_LIMIT`, whose handler holds its own."""
    if path.startswith("/api/"):
        return MAX_API_BODY
    if path.startswith(OWN_BODY_LIMIT):
        return None
    return MAX_FORM_BODY


def _with_api_headers(send: Send) -> Send:
    """``send``, each answer's start given :data:`API_HEADERS` (those already set stay)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in API_HEADERS.items():
                headers.setdefault(name, value)
        await send(message)

    return sending


class StrictTransport:
    """ASGI middleware of a node serving HTTPS: every answer carries
    ``Strict-Transport-Security`` (RFC 6797), so that a browser that reached the node once
    over HTTPS never sends a session cookie or a patient's page over plain HTTP to the same
    host (a link or a bookmark typed ``http://``, a network that rewrites the scheme) for
    ``max_age_s``. Not ``includeSubDomains``: the node names no other host of the hospital."""

    def __init__(self, app: ASGIApp, max_age_s: int) -> None:
        self.app = app
        self.value = f"max-age={max_age_s}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("Strict-Transport-Security", self.value)
            await send(message)

        await self.app(scope, receive, sending)


class ApiLimits:
    """ASGI middleware of every request: a body larger than its path's limit
    (:func:`body_limit`: 1 MiB for the JSON API, 64 KiB for the review app's forms) is
    refused with 413 (by its Content-Length before anything is read, else once that much has
    come, whatever the handler reading it answered), and every ``/api/`` answer carries
    :data:`API_HEADERS` (those a handler set stay)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)  # under node.http_root_path: the path within the app
        if path.startswith("/api/"):
            send = _with_api_headers(send)
        limit = body_limit(path)
        if limit is None:
            await self.app(scope, receive, send)
            return
        refusal = JSONResponse({"detail": BodyTooLarge(limit).detail}, 413)
        declared = Headers(scope=scope).get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            await refusal(scope, receive, send)
            return
        received = 0
        exceeded = started = refused = False

        async def receive_limited() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def send_or_refuse(message: Message) -> None:
            nonlocal started, refused
            if refused:  # the refusal went instead of the handler's answer
                return
            if message["type"] == "http.response.start":
                started = True
                if exceeded:  # however the handler that read the body failed
                    refused = True
                    await refusal(scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive_limited, send_or_refuse)
        except Exception:
            if not exceeded or started:
                raise
            await refusal(scope, receive, send)


def _guards_of(dependant: Dependant) -> Iterator[Callable[[Request], object]]:
    """The :func:`access_guard` checks among ``dependant``'s dependencies, at any depth."""
    for sub in dependant.dependencies:
        if sub.call in _GUARDS:
            yield sub.call
        yield from _guards_of(sub)


class GuardsFirst:
    """ASGI middleware, inside the sign-in (which has put the user on the request): a
    ``/api/`` request that may carry a body (any method but ``GET``, ``HEAD`` and
    ``OPTIONS``) goes through its route's :func:`access_guard` checks before anything reads
    its body. FastAPI reads and parses a body before it solves a route's dependencies: a
    radiologist's malformed JSON to an administrators' endpoint got 422, not 403. The route
    runs the same checks again as dependencies (they are cheap, and read no body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and route_path(scope).startswith("/api/")
            and scope["method"] not in ("GET", "HEAD", "OPTIONS")
        ):
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(scope: Scope) -> Response | None:
        """The answer of the first check of the route ``scope`` names that refuses it."""
        app = scope.get("app")
        if app is None:
            return None
        for route in iter_route_contexts(app.router.routes):
            match, _ = route.matches(scope)
            if match is not Match.FULL:
                continue
            dependant = getattr(route, "dependant", None)
            if dependant is None:
                return None
            request = Request(scope)
            for check in dict.fromkeys(_guards_of(dependant)):
                try:
                    check(request)
                except HTTPException as exc:
                    return JSONResponse(
                        {"detail": exc.detail}, exc.status_code, headers=exc.headers
                    )
            return None
        return None


class HeadAsGet:
    """ASGI middleware: a ``HEAD`` request is answered as its ``GET`` would be, without the
    body (status and headers, Content-Length included). FastAPI's routes answer only the
    methods they declare (``HEAD`` was 405), and load balancers and monitoring probe with
    ``HEAD``; a path without ``GET`` still answers 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


#: PostgreSQL's SQLSTATE for a full disk (class 53, insufficient resources).
PG_DISK_FULL = "53100"


def disk_full(exc: OperationalError) -> bool:
    """Whether the ledger's database failed for want of disk space: SQLite's "database or
    disk is full", PostgreSQL's ``disk_full``, or an ENOSPC either passed on."""
    orig = exc.orig
    text = str(orig)
    return (
        "database or disk is full" in text
        or getattr(orig, "sqlstate", None) == PG_DISK_FULL
        or "No space left on device" in text
    )


async def server_failed(request: Request, exc: Exception) -> Response:
    """The answer to an error nothing else answered (the traceback goes to the log, never to
    the client): 503 while the ledger does not answer (its database down, unreachable or
    locked: try again later; or its disk full, said so: waiting will not mend it), else 500;
    as JSON on ``/api/``, as text elsewhere."""
    if isinstance(exc, OperationalError) and disk_full(exc):
        status, detail = 503, "the node's data disk is full: the ledger cannot write"
        headers = {"Retry-After": "60"}
    elif isinstance(exc, OperationalError | PoolTimeout):
        status, detail = 503, "the node's ledger is not answering: try again later"
        headers = {"Retry-After": "30"}
    else:
        status, detail, headers = 500, "Internal Server Error", {}
    if route_path(request.scope).startswith("/api/"):
        return JSONResponse({"detail": detail}, status, headers={**headers, **API_HEADERS})
    return PlainTextResponse(detail, status, headers=headers)


#: The answers the sign-in gives every ``/api/`` path, as the OpenAPI document tells them.
_SIGN_IN_ANSWERS: dict[str, dict[str, Any]] = {
    "401": {"description": "No credentials, wrong ones, or a session that ended"},
    "403": {"description": "A sender account (it may only store studies)"},
    "429": {"description": "Too many failed sign-ins for this user name (Retry-After)"},
    "503": {"description": "The ledger is not answering: try again later (Retry-After)"},
}


def document_access(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (the app's OpenAPI document) with what FastAPI cannot infer of the JSON API:
    how to sign in (HTTP Basic, or the review app's session cookie), the answers the sign-in
    gives every path (401, 403, 429), the 413 of a body past :data:`MAX_API_BODY`, and the
    error body (``{"detail": ...}``: text, or the list of a request validation's errors)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(
        {
            "basic": {"type": "http", "scheme": "basic", "description": "A local account"},
            "session": {"type": "apiKey", "in": "cookie", "name": "acwi_session"},
        }
    )
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "string"}},
    }
    if "HTTPValidationError" in schemas:  # a handler's own 422 gives its reason as text
        detail = schemas["HTTPValidationError"]["properties"]["detail"]
        if "anyOf" not in detail:
            schemas["HTTPValidationError"]["properties"]["detail"] = {
                "anyOf": [{"type": "string"}, detail]
            }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            operation.setdefault("security", [{"basic": []}, {"session": []}])
            responses = operation.setdefault("responses", {})
            for status, answer in _SIGN_IN_ANSWERS.items():
                responses.setdefault(status, dict(answer))
            if method in ("post", "put", "patch"):
                responses.setdefault(
                    "413", {"description": f"A body larger than {MAX_API_BODY} bytes"}
                )
            for status, answer in responses.items():
                if status >= "400" and "content" not in answer:
                    answer["content"] = error
    return schema
