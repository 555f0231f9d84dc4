"""``acwi-node health``: query a process kind's health endpoint; exit 0 when it is ready.

Kept free of heavy imports (no SQLAlchemy, no PyTorch): a container runs it every few seconds.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

from acwi_node.config import Settings
from acwi_node.tcp import host_port


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _opener() -> urllib.request.OpenerDirector:
    """What asks the node's own endpoints: never through a proxy (``HTTP_PROXY`` is often set
    for a whole hospital host or container, and a proxy cannot reach this host's loopback
    address: every probe failed), and over HTTPS without checking the certificate (it names
    the host others reach the node by, not this address; nothing secret is sent, and the
    answer is all that counts)."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_unverified())
    )


def _probe_host(host: str, port: int) -> str:
    """``host:port`` of a listener on ``host`` as this host reaches it: every address by
    loopback (``::`` by ``::1``: an IPv6 listener may take no IPv4), an IPv6 address in
    brackets."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host_port(host, port)


def health_url(settings: Settings, kind: str, *, live: bool = False) -> str:
    """The URL ``acwi-node health`` queries for a process kind.

    Raises :class:`ValueError` when that kind has no health endpoint configured.
    """
    path = "/healthz" if live else "/readyz"
    if kind in ("web", "serve"):
        if not settings.node.http_port:
            raise ValueError("the web process has no HTTP port (node.http_port = 0)")
        scheme = "https" if settings.node.http_tls.enabled else "http"
        return f"{scheme}://{_probe_host(settings.node.http_host, settings.node.http_port)}{path}"
    port = settings.observability.port_for(kind)
    if not port:
        raise ValueError(
            f"the {kind} process serves no health endpoint: set observability.{kind}_port"
        )
    return f"http://{_probe_host(settings.observability.ops_host, port)}{path}"


def probe(settings: Settings, kind: str, *, live: bool = False, timeout_s: float = 5.0) -> int:
    """Query a process kind's health endpoint; print its answer; 0 when healthy/ready, else 1.

    ``serve`` checks every process kind that has an endpoint configured (web always).
    """
    kinds = [kind]
    if kind == "serve":
        ops = settings.observability
        kinds = ["web"] + [k for k in ("scp", "worker", "exporter") if ops.port_for(k)]
    code = 0
    for one in kinds:
        try:
            url = health_url(settings, one, live=live)
        except ValueError as exc:
            print(f"{one}: {exc}")
            return 2
        try:
            with _opener().open(url, timeout=timeout_s) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:  # 503 and the like: the body says why
            status, body = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            print(f"{one}: {url} did not answer: {exc}")
            code = 1
            continue
        print(f"{one}: {status} {body.decode(errors='replace').strip()}")
        if status != 200:
            code = 1
    return code
