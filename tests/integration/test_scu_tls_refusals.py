"""A DICOM TLS destination the node's configuration does not fit (its certificate from another
CA, another host name, a PACS that speaks plain DICOM) is an answer, not an outage: the
exporter counts the attempts and the delivery fails after ``max_attempts`` with the reason,
instead of waiting for ``exporter.outage_patience_s`` (a day) and calling the PACS
unreachable. A PACS that cannot be connected to still is an outage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pynetdicom import AE

from acwi_node.config import Settings, load_settings
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import Ledger
from tests.integration.test_dicom_tls import _client, _image, _send, _TlsScp
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE
from tests.support.certs import Pki, make_pki
from tests.support.ports import free_port
from tests.unit.test_outbox_destinations import _analysed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("case", ["untrusted destination", "wrong host name", "plain DICOM"])
def test_a_tls_handshake_the_pacs_refuses_is_no_outage(pki: Pki, tmp_path: Path, case: str) -> None:
    path, _ = _image(tmp_path)
    name = "pacs.example.org" if case == "wrong host name" else "localhost"
    if case == "plain DICOM":
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SECONDARY_CAPTURE_IMAGE_STORAGE)
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False)
        assert server is not None
        try:
            report = _send(port, path, _client(pki, pki.client), name=name)
        finally:
            server.shutdown()
    else:
        cert = pki.rogue_server if case == "untrusted destination" else pki.server
        with _TlsScp(pki, cert, require_client_cert=True) as pacs:
            report = _send(pacs.port, path, _client(pki, pki.client), name=name)
    assert not report.association_ok and report.error is not None
    assert "TLS" in report.error
    assert not report.unreachable, report.error
    assert not any(o.unreachable for o in report.outcomes.values())


def test_the_exporter_fails_such_a_delivery_after_max_attempts(pki: Pki, tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        with _TlsScp(pki, pki.rogue_server, require_client_cert=True) as pacs:
            settings: Settings = load_settings(
                None,
                node={"data_dir": tmp_path / "data", "database_url": ledger.url},
                destinations=[
                    {
                        "name": "pacs",
                        "ae_title": "PACS",
                        "host": "127.0.0.1",
                        "port": pacs.port,
                        "tls": {
                            "ca_file": pki.ca,
                            "cert_file": pki.client.cert,
                            "key_file": pki.client.key,
                            "server_name": "localhost",
                        },
                    }
                ],
                exporter={
                    "timeout_s": 5,
                    "max_attempts": 2,
                    "backoff_initial_s": 0.01,
                    "backoff_max_s": 0.01,
                    "withdraw_replaced": False,
                },
            )
            _analysed(settings, ledger, "1.2.3", 1)
            exporter = Exporter(settings, ledger)
            exporter.tick()
            time.sleep(0.1)
            exporter.tick()  # after the back-off
            view = ledger.get_study("1.2.3")
            assert view is not None
            (delivery,) = view["jobs"][0]["results"][0]["deliveries"]
            assert (delivery["state"], delivery["attempts"], delivery["outage_attempts"]) == (
                "failed",
                2,
                0,
            )
            assert delivery["unreachable_since"] is None
            assert "is not trusted" in delivery["last_error"]
            assert view["state"] == "failed"
            assert pacs.received == []
    finally:
        ledger.dispose()
