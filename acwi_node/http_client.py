"""HTTP(S) connections to a web service, directly or through an HTTP proxy.

A DICOMweb destination or source (:mod:`acwi_node.export.dicomweb`) and a notification webhook
(:mod:`acwi_node.notify.sender`) reach their service alike: ``https`` through a CONNECT tunnel
of the proxy (its credentials on the CONNECT), ``http`` by asking the proxy for the whole URL
(absolute form). Anything with a ``proxy`` (``http://host:port`` or None) and a ``tls``
(:class:`~acwi_node.config.DestinationTls` or None) is such a peer (:class:`Peer`).
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from acwi_node.config import DestinationTls


class Peer(Protocol):
    """A web service's connection settings."""

    @property
    def proxy(self) -> str | None: ...

    @property
    def tls(self) -> DestinationTls | None: ...


@dataclass(frozen=True)
class Target:
    """A service's URL, taken apart."""

    scheme: str
    host: str
    port: int
    path: str  # the base path, without a trailing slash


def target_of(url: str) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    return Target(scheme, parts.hostname or "", port, parts.path.rstrip("/"))


def connect(
    peer: Peer, target: Target, timeout_s: float, tunnel_headers: dict[str, str]
) -> http.client.HTTPConnection:
    """A connection to the service, or to its proxy: a CONNECT tunnel for ``https`` (with
    ``tunnel_headers``, the proxy's credentials); for ``http`` the requests then name the whole
    URL (:func:`request_target`)."""
    host, port = target.host, target.port
    if peer.proxy is not None:
        proxy = urlsplit(peer.proxy)
        host, port = proxy.hostname or "", proxy.port or 80
    if target.scheme == "https":
        tls = peer.tls
        context = tls.context() if tls is not None else ssl.create_default_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout_s, context=context
        )
        if peer.proxy is not None:
            conn.set_tunnel(target.host, target.port, headers=tunnel_headers)
        return conn
    return http.client.HTTPConnection(host, port, timeout=timeout_s)


def request_target(peer: Peer, target: Target, path: str) -> str:
    """The request line's target for ``path`` under the service's base path: absolute (the
    whole URL) for plain ``http`` through a proxy, else the path alone."""
    full = f"{target.path}{path}"
    if peer.proxy is not None and target.scheme == "http":
        return f"http://{target.host}:{target.port}{full}"
    return full
