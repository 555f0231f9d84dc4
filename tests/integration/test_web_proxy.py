"""``acwi-node web`` behind a reverse proxy: the client's address and the scheme come from
``X-Forwarded-For`` and ``X-Forwarded-Proto`` of the peers in ``node.http_trusted_proxies``
alone, for the sign-in throttle, the audit trail and the URLs the node answers with."""

from __future__ import annotations

import base64
import json
import secrets
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.common import write_small_instances
from tests.support.node import NodeProcesses, add_api_user, wait_port, write_config
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

SENDER = ("pacs-web", "pacs-web-password-1")
CLIENT = "203.0.113.7"
OTHER_CLIENT = "198.51.100.9"


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def _basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


def _stow(client: httpx.Client, url: str, file: Path, forwarded_for: str) -> dict[str, Any]:
    boundary = secrets.token_hex(8)
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + file.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    answer = client.post(
        url,
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": _basic(*SENDER),
            "X-Forwarded-For": forwarded_for,
            "X-Forwarded-Proto": "https",
        },
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.mark.parametrize(
    ("http_host", "trusted", "source", "workers", "taken"),
    [
        # a proxy on another host (127.0.0.2 plays it), trusted: the forwarded address counts
        ("127.0.0.1", ["127.0.0.2/32"], "127.0.0.2", 1, True),
        # the proxy on the node's host; two processes (uvicorn's workers, started apart)
        ("127.0.0.1", ["127.0.0.1/32"], "127.0.0.1", 2, True),
        # a dual-stack port: an IPv4 peer is ::ffff:127.0.0.1 there, still the one trusted
        ("::", ["127.0.0.1/32"], "127.0.0.1", 1, True),
        # a peer that is not the trusted proxy names any address it likes: ignored
        ("127.0.0.1", ["192.0.2.1"], "127.0.0.1", 1, False),
    ],
)
def test_forwarded_client_address_and_scheme_from_trusted_proxies_alone(
    tmp_path: Path, http_host: str, trusted: list[str], source: str, workers: int, taken: bool
) -> None:
    if source != "127.0.0.1" and not _can_bind(source):
        pytest.skip(f"this machine's OS cannot bind {source} (Linux routes all of 127/8)")
    if http_host == "::" and not socket.has_dualstack_ipv6():
        pytest.skip("this machine's OS has no dual-stack IPv6 sockets (IPV6_V6ONLY off)")
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "http_host": http_host,
                "http_port": port,
                "http_workers": workers,
                "http_trusted_proxies": trusted,
                "data_dir": str(tmp_path / "data"),
            },
            # the first failure from an address makes its next attempt wait
            "review": {"sign_in_address_free_failures": 1},
        },
    )
    add_api_user(config, SENDER, role="sender")
    file = write_small_instances(tmp_path / "small", 1)[0]
    base = f"http://127.0.0.1:{port}"
    # FORWARDED_ALLOW_IPS widened uvicorn's own default to every peer: not read by the node
    env = {"FORWARDED_ALLOW_IPS": "*"}
    transport = httpx.HTTPTransport(local_address=source)
    with (
        NodeProcesses(config, ["web"], tmp_path, env=env) as node,
        httpx.Client(transport=transport, timeout=30) as client,
    ):
        wait_port("127.0.0.1", port)
        # first: a success clears its address's failures, and a throttled address waits
        stored = _stow(client, f"{base}/dicomweb/studies", file, f"{OTHER_CLIENT}, {CLIENT}")
        statuses = []
        for name, address in [
            ("nobody-1", CLIENT),
            ("nobody-2", CLIENT),
            ("nobody-3", OTHER_CLIENT),
        ]:
            answer = client.get(
                f"{base}/api/studies",
                headers={"Authorization": _basic(name, "wrong"), "X-Forwarded-For": address},
            )
            statuses.append(answer.status_code)
        node.assert_alive()
    if workers == 1:  # each process counts an address's failures of its own
        # the same address waits after its first failure; another one is counted apart
        assert statuses == ([401, 429, 401] if taken else [401, 429, 429]), node.log_text()
    records = [
        json.loads(line)
        for line in (tmp_path / "data" / "audit" / "audit.jsonl").read_text().splitlines()
    ]
    failed = [r for r in records if r.get("detail", "").startswith("login_failed")]
    assert failed, records
    addresses = {p["address"] for r in failed for p in r["participants"] if p["requestor"]}
    peer = {"127.0.0.1", "::ffff:127.0.0.1"}
    if taken:
        assert CLIENT in addresses, failed
        assert not addresses & peer, failed
    else:
        assert addresses <= peer, failed
    received = [r for r in records if "STOW-RS" in r.get("detail", "")]
    assert received, records
    senders = {p["address"] for r in received for p in r["participants"] if p["requestor"]}
    # the address the trusted proxy appended (the last), not one its client made up (the first)
    assert senders == ({CLIENT} if taken else {"127.0.0.1"}), received
    retrieve_url = stored["00081190"]["Value"][0]
    scheme = "https" if taken else "http"
    assert retrieve_url.startswith(f"{scheme}://127.0.0.1:{port}/dicomweb/studies"), stored


@pytest.mark.parametrize("workers", [1, 2])
def test_under_a_path_of_a_shared_host(tmp_path: Path, workers: int) -> None:
    """``node.http_root_path``: the proxy (``location /acwi/ { proxy_pass .../; }``) strips
    ``/acwi`` and the node, run as in production (uvicorn given the root path, in one process
    or as uvicorn's workers), puts it back in its redirects, pages, cookies and STOW-RS
    answers; the probes still answer at the port's root."""
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "http_port": port,
                "http_workers": workers,
                "http_root_path": "/acwi",
                "data_dir": str(tmp_path / "data"),
            },
            "review": {"public_url": "https://apps.hospital.local/acwi"},
        },
    )
    add_api_user(config, SENDER, role="sender")
    file = write_small_instances(tmp_path / "small", 1)[0]
    base = f"http://127.0.0.1:{port}"  # what the proxy asks for: the path without /acwi
    proxied = {"X-Forwarded-Proto": "https", "Host": "apps.hospital.local"}
    with (
        NodeProcesses(config, ["web"], tmp_path) as node,
        httpx.Client(timeout=30, follow_redirects=False) as client,
    ):
        wait_port("127.0.0.1", port)
        assert client.get(f"{base}/healthz").status_code == 200
        signed_out = client.get(f"{base}/review/worklist", headers=proxied)
        assert signed_out.status_code == 303
        assert signed_out.headers["location"] == "/acwi/login?next=%2Freview%2Fworklist"
        login = client.get(f"{base}/login", headers=proxied)
        assert login.status_code == 200, login.text
        assert 'href="/acwi/static/review.css"' in login.text
        assert 'action="/acwi/login"' in login.text
        assert "Path=/acwi;" in login.headers["set-cookie"]
        assert client.get(f"{base}/static/review.css").status_code == 200
        stored = _stow(client, f"{base}/dicomweb/studies", file, CLIENT)
        node.assert_alive()
    # _stow sends no Host of the proxy's: the node's address, under the root path
    assert stored["00081190"]["Value"] == [f"https://127.0.0.1:{port}/acwi/dicomweb/studies"]
