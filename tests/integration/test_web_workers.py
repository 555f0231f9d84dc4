"""``acwi-node web`` with ``node.http_workers = 2``: two processes share the port; STOW-RS
requests land in both, and ``/metrics`` and the audit trail count every one of them."""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.common import write_small_instances
from tests.support.node import NodeProcesses, add_api_user, wait_port, write_config
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

SENDER = ("pacs-web", "pacs-web-password-1")


def stow(port: int, files: list[Path]) -> int:
    boundary = secrets.token_hex(8)
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + f.read_bytes()
            + b"\r\n"
            for f in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/dicomweb/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": "Basic " + base64.b64encode(":".join(SENDER).encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return int(answer.status)


def test_two_web_processes_share_the_port_and_their_counts(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "dicom_port": free_port(),
                "http_port": port,
                "http_workers": 2,
                "data_dir": str(tmp_path / "data"),
                "log_level": "INFO",
            }
        },
    )
    add_api_user(config, SENDER, role="sender")
    files = write_small_instances(tmp_path / "small", 40, per_study=10)
    with NodeProcesses(config, ["web"], tmp_path) as node:
        wait_port("127.0.0.1", port, 60)
        deadline = time.monotonic() + 60
        while node.logs["web"].read_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, node.log_text()
            time.sleep(0.1)
        # Eight requests, four at a time, until both processes have taken some (the kernel
        # hands each connection to whichever is waiting).
        sent, serving = 0, set[str]()
        while len(serving) < 2:
            assert sent < 80, "one process took every request"
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(lambda i: stow(port, files[i : i + 5]), range(0, 40, 5)))
            assert statuses == [200] * 8, node.log_text()
            sent += 8
            serving = set(re.findall(r"\[web (\d+)\] STOW-RS from", node.logs["web"].read_text()))
        node.assert_alive()
        for _ in range(10):  # whichever process answers the scrape, it counts them all
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert f'acwi_web_stow_requests_total{{status="200"}} {sent}.0' in text
            assert (
                f'acwi_scp_instances_received_total{{calling_ae="pacs-web"}} {sent * 5}.0' in text
            )
    assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == 40
    records = [
        json.loads(line)
        for line in (tmp_path / "data" / "audit" / "audit.jsonl").read_text().splitlines()
    ]
    received = [r for r in records if "STOW-RS" in json.dumps(r)]
    assert len(received) == sent  # written by the worker processes, into the node's trail


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack sockets here")
@pytest.mark.parametrize("workers", [1, 2])
def test_web_on_the_unspecified_ipv6_address_takes_ipv4_and_ipv6(
    tmp_path: Path, workers: int
) -> None:
    """``http_host = "::"``: one process took IPv6 connections only (uvicorn's own binding),
    where several took both."""
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "http_host": "::",
                "http_port": port,
                "http_workers": workers,
                "data_dir": str(tmp_path / "data"),
            }
        },
    )
    with NodeProcesses(config, ["web"], tmp_path) as nodes:
        wait_port("::1", port)
        for address in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=10) as answer:
                assert answer.status == 200, nodes.log_text()
