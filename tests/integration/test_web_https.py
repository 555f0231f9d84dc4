"""``acwi-node web`` with ``[node.http_tls]``: HTTPS on the web port, as a browser, a script and
the container's health check reach it; plain HTTP and old TLS versions get nothing."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from acwi_node.config import ConfigError, load_settings
from tests.integration.test_health import health_cli
from tests.support.certs import Pki, make_pki
from tests.support.node import NodeProcesses, add_api_user, wait_port, write_config
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_the_web_port_speaks_https_only(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "dicom_port": free_port(),
                "http_port": port,
                "data_dir": str(tmp_path / "data"),
                "http_tls": {
                    "enabled": True,
                    "cert_file": str(pki.server.cert),
                    "key_file": str(pki.server.key),
                },
            }
        },
    )
    with NodeProcesses(config, ["web"], tmp_path) as nodes:
        wait_port("127.0.0.1", port)
        base = f"https://127.0.0.1:{port}"
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(base_url=base, verify=trusted, timeout=20) as client:
            assert client.get("/healthz").status_code == 200
            # A browser keeps to HTTPS for this host a year, on every answer, errors too.
            assert client.get("/healthz").headers["strict-transport-security"] == (
                "max-age=31536000"
            )
            assert client.get("/api/nothing-here").headers["strict-transport-security"]
            user, password = add_api_user(config)
            assert client.get("/api/studies", auth=(user, password)).status_code == 200
            # The sign-in page's cookie is marked Secure (sent over HTTPS only).
            page = client.get("/login")
            assert page.status_code == 200
            assert re.search(r"(?i);\s*secure", page.headers["set-cookie"])
        # A client that does not trust the node's CA is refused by its own check.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(
                f"{base}/healthz", verify=ssl.create_default_context(cafile=str(pki.rogue_ca))
            )
        # Plain HTTP gets no answer, and TLS 1.1 no session.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/healthz")
            plain.getresponse().read()
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cafile=str(pki.ca))
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            old.wrap_socket(raw, server_hostname="127.0.0.1").close()
        # The container's health check speaks HTTPS to it.
        done = health_cli(config, "web")
        assert done.returncode == 0, done.stdout + done.stderr + nodes.log_text()
        nodes.assert_alive()


def test_https_without_a_usable_certificate_stops_at_start_up(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="needs cert_file and key_file"):
        load_settings(None, node={"data_dir": tmp_path, "http_tls": {"enabled": True}})
    with pytest.raises(ConfigError, match="http_tls"):
        load_settings(
            None,
            node={
                "data_dir": tmp_path,
                "http_tls": {
                    "enabled": True,
                    "cert_file": str(pki.server.cert),
                    "key_file": str(pki.client.key),  # not the certificate's key
                },
            },
        )
    off = load_settings(None, node={"data_dir": tmp_path})
    assert off.node.http_tls.enabled is False
