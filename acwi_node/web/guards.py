"""Who may call what: the checks the JSON API's handlers share."""

from __future__ import annotations

from fastapi import HTTPException, Request

from acwi_node.review.store import SessionInfo


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
