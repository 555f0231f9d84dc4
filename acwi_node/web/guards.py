"""Who may call what, and what the JSON API takes and answers: the checks its handlers share
(:func:`admin_user`, :func:`admin_json_request`), the limits and headers of every ``/api/``
request (:class:`ApiLimits`), the answer to an error nothing else answered
(:func:`server_failed`) and what the OpenAPI document says of signing in and of errors
(:func:`document_access`)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from acwi_node.review.store import SessionInfo

#: The largest request body the JSON API takes, in bytes: a verdict, a withdrawal or a
#: retrieval is a few kilobytes; a larger body is refused (413) before it is read whole.
MAX_API_BODY = 1 << 20

#: What every answer of the JSON API carries (patient-related data: kept by no cache).
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def admin_user(request: Request) -> str:
    """The signed-in administrator's user name; 403 for anyone else."""
    user: SessionInfo | None = getattr(request.state, "user", None)
    if user is None or user.role != "admin":
        raise HTTPException(status_code=403, detail="administrators only")
    return user.user_name


def admin_json_request(request: Request) -> str:
    """An administrator's POST with a JSON body: the content type keeps cross-site forms
    (which cannot send it without a CORS preflight the node never grants) out."""
    name = admin_user(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(status_code=415, detail="send Content-Type: application/json")
    return name


class BodyTooLarge(HTTPException):
    """A request body past :data:`MAX_API_BODY`."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail=f"the body is larger than {MAX_API_BODY} bytes")


def _with_api_headers(send: Send) -> Send:
    """``send``, each answer's start given :data:`API_HEADERS` (those already set stay)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in API_HEADERS.items():
                headers.setdefault(name, value)
        await send(message)

    return sending


class ApiLimits:
    """ASGI middleware of every ``/api/`` request: a body larger than :data:`MAX_API_BODY`
    is refused with 413 (by its Content-Length before anything is read, else once that much
    has come, whatever the handler reading it answered), and every answer carries
    :data:`API_HEADERS` (those a handler set stay)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith("/api/"):
            await self.app(scope, receive, send)
            return
        send = _with_api_headers(send)
        refusal = JSONResponse({"detail": BodyTooLarge().detail}, 413)
        declared = Headers(scope=scope).get("content-length", "").strip()
        if declared.isdigit() and int(declared) > MAX_API_BODY:
            await refusal(scope, receive, send)
            return
        received = 0
        exceeded = started = refused = False

        async def receive_limited() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_API_BODY:
                    exceeded = True
                    raise BodyTooLarge()
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


async def server_failed(request: Request, exc: Exception) -> Response:
    """The answer to an error nothing else answered (the traceback goes to the log, never to
    the client): 503 while the ledger does not answer (its database down, unreachable or
    locked: try again later), else 500; as JSON on ``/api/``, as text elsewhere."""
    if isinstance(exc, OperationalError | PoolTimeout):
        status, detail = 503, "the node's ledger is not answering: try again later"
        headers = {"Retry-After": "30"}
    else:
        status, detail, headers = 500, "Internal Server Error", {}
    if request.url.path.startswith("/api/"):
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
