"""The addresses the node's listeners bind (:func:`acwi_node.tcp.listening_socket`): ``::``
takes IPv6 and IPv4 connections on every listener (the DICOM port of one process did, those
of several processes, the HL7 listener and the web app's took IPv6 only, and the health
servers could not bind an IPv6 address at all), an IPv6 address its own family, and what
``acwi-node health`` and the logs write for them."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from acwi_node.config import Settings, load_settings
from acwi_node.hl7.listener import MllpListener
from acwi_node.hl7.mllp import frame, read_frame_sync
from acwi_node.ingest.listeners import bind_listener
from acwi_node.ledger import Ledger
from acwi_node.observability.health import OpsServer, Readiness
from acwi_node.observability.probe import health_url
from acwi_node.tcp import host_port, listening_socket


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
needs_dual_stack = pytest.mark.skipif(
    not (_ipv6_loopback() and socket.has_dualstack_ipv6()), reason="no dual-stack sockets here"
)


def _connects(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5):
            return True
    except OSError:
        return False


@needs_dual_stack
def test_the_unspecified_ipv6_address_takes_both_families() -> None:
    with listening_socket("::", 0) as sock:
        port = sock.getsockname()[1]
        assert _connects("127.0.0.1", port)
        assert _connects("::1", port)


@needs_ipv6
def test_an_ipv6_address_and_a_host_name_bind_their_family() -> None:
    with listening_socket("::1", 0) as sock:
        assert sock.family == socket.AF_INET6
        assert _connects("::1", sock.getsockname()[1])
    with listening_socket("127.0.0.1", 0) as sock:
        assert sock.family == socket.AF_INET
    with listening_socket("localhost", 0) as sock:
        assert _connects(sock.getsockname()[0], sock.getsockname()[1])


def test_a_host_name_that_does_not_resolve_is_an_os_error() -> None:
    with pytest.raises(OSError):
        listening_socket("no-such-host.invalid", 0)


@needs_dual_stack
def test_listener_processes_socket_takes_ipv4_on_the_unspecified_ipv6_address() -> None:
    with bind_listener("::", 0) as sock:
        assert _connects("127.0.0.1", sock.getsockname()[1])


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


@needs_dual_stack
@pytest.mark.parametrize("host", ["::", "::1"])
def test_health_server_binds_ipv6(host: str) -> None:
    server = OpsServer(Readiness("worker"), host, 0).start()
    try:
        assert _get(f"http://[::1]:{server.port}/healthz") == 200
        if host == "::":
            assert _get(f"http://127.0.0.1:{server.port}/healthz") == 200
    finally:
        server.stop()


@pytest.fixture
def hl7_on_any_address(tmp_path: Path) -> Iterator[MllpListener]:
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data"}, hl7={"listen_host": "::", "listen_port": 0}
    )
    ledger = Ledger(settings.database_url)
    listener = MllpListener(settings, ledger).start()
    yield listener
    listener.stop()
    ledger.dispose()


@needs_dual_stack
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_hl7_listener_on_the_unspecified_ipv6_address_answers_both_families(
    hl7_on_any_address: MllpListener, address: str
) -> None:
    message = b"MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||ADT^A01|C1|P|2.5\rPID|1||X"
    with socket.create_connection((address, hl7_on_any_address.port), timeout=5) as sock:
        sock.sendall(frame(message))
        ack = read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode()
    assert ack.startswith("MSH|") and "\rMSA|" in ack


def _settings(tmp_path: Path, host: str) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path, "http_host": host, "http_port": 8080},
        observability={"ops_host": host, "worker_port": 9101},
    )


@pytest.mark.parametrize(
    ("host", "web", "worker"),
    [
        ("::1", "http://[::1]:8080/readyz", "http://[::1]:9101/readyz"),
        ("::", "http://[::1]:8080/readyz", "http://[::1]:9101/readyz"),
        ("0.0.0.0", "http://127.0.0.1:8080/readyz", "http://127.0.0.1:9101/readyz"),
        ("10.1.2.3", "http://10.1.2.3:8080/readyz", "http://10.1.2.3:9101/readyz"),
        ("node.hospital", "http://node.hospital:8080/readyz", "http://node.hospital:9101/readyz"),
    ],
)
def test_health_urls_write_ipv6_addresses_in_brackets(
    tmp_path: Path, host: str, web: str, worker: str
) -> None:
    settings = _settings(tmp_path, host)
    assert health_url(settings, "web") == web
    assert health_url(settings, "worker") == worker


def test_host_port() -> None:
    assert host_port("::", 104) == "[::]:104"
    assert host_port("fe80::1%eth0", 104) == "[fe80::1%eth0]:104"
    assert host_port("10.0.0.1", 104) == "10.0.0.1:104"
    assert host_port("pacs.hospital", 104) == "pacs.hospital:104"
