"""The web app under a sub-path of a reverse proxy (``node.http_root_path``).

uvicorn, given ``root_path``, hands the app each request with ``scope["path"]`` starting
with it (the ASGI way: ``/acwi/review/worklist`` for the proxy's ``/review/worklist``); the
routes match the rest. Whatever looks at a request's path to decide (the sign-in, the body
limits) looks at :func:`route_path`; whatever writes a URL of the app (links, forms,
redirects, cookie paths) puts :func:`root_path` in front.
"""

from __future__ import annotations

from starlette.types import Scope


def root_path(scope: Scope) -> str:
    """The path the app is published under: ``""`` at the host's root, else ``/acwi``
    (never a trailing ``/``). A mounted app's own ``root_path`` has its mount point added:
    ``app_root_path`` is the whole app's."""
    root = scope.get("app_root_path", scope.get("root_path", ""))
    return str(root or "").rstrip("/")


def route_path(scope: Scope) -> str:
    """The request's path within the app (``/review/worklist``): ``scope["path"]`` without
    :func:`root_path` in front, as the routes match it."""
    path = str(scope["path"])
    root = root_path(scope)
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def cookie_path(scope: Scope, path: str = "/") -> str:
    """A cookie's ``Path`` for the app's ``path`` (``/``: the whole app), under
    :func:`root_path`: the whole app's is ``/acwi`` rather than ``/acwi/``, so that ``/acwi``
    itself sends it too (and ``/acwi2`` does not: a cookie path matches whole segments)."""
    root = root_path(scope)
    return root + path if path != "/" else root or "/"
