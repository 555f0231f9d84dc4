"""A client that hangs up halfway: an ASGI request whose connection closes before its body ends."""

from __future__ import annotations

import asyncio
from typing import Any


def post_then_hang_up(app: Any, path: str, headers: dict[str, str], first_bytes: bytes) -> int:
    """POST ``first_bytes`` of a longer body (``headers`` should declare its length) to the
    ASGI ``app``, then close the connection; the status the app answered with."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": first_bytes, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("node.example", 443),
    }
    asyncio.run(app(scope, receive, send))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return int(start["status"])
