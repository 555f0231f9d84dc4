"""DICOM TLS: who gets in to the storage SCP, and the SCU's sending to TLS destinations.

The SCP is the node's own listener; senders are pynetdicom and DCMTK's storescu. Destinations
are a pynetdicom TLS SCP and Debian's Orthanc with DICOM TLS on.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.export import send_files
from acwi_node.export.scu import echo
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.tls import client_context, server_context
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE, write_secondary_capture
from tests.support.answer_threads import record_answer_threads
from tests.support.certs import Pair, Pki, make_pki
from tests.support.dcmtk import require_dcmtk_tool, storescu
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


NodeFactory = Callable[..., tuple[Settings, Ledger]]


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[NodeFactory]:
    started: list[tuple[StorageSCP, Ledger]] = []

    def start(**tls: Any) -> tuple[Settings, Ledger]:
        settings = load_settings(
            None,
            node={
                "data_dir": tmp_path / f"data{len(started)}",
                "dicom_host": "127.0.0.1",
                "dicom_port": free_port(),
            },
            ingest={
                "fsync": False,
                "network_timeout_s": 5,
                "acse_timeout_s": 5,
                "tls": {
                    "enabled": True,
                    "cert_file": pki.server.cert,
                    "key_file": pki.server.key,
                    "ca_file": pki.ca,
                    "handshake_timeout_s": 2,
                    **tls,
                },
            },
        )
        ledger = Ledger(settings.database_url)
        scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
        scp.start(block=False)
        started.append((scp, ledger))
        return settings, ledger

    yield start
    for scp, ledger in started:
        scp.stop()
        ledger.dispose()


def _client(pki: Pki, pair: Pair | None, *, ca: Path | None = None) -> ssl.SSLContext:
    return client_context(
        ca_file=ca or pki.ca,
        cert_file=pair.cert if pair else None,
        key_file=pair.key if pair else None,
        verify_hostname=True,
    )


def _store(settings: Settings, ctx: ssl.SSLContext | None, path: Path) -> int | None:
    """C-STORE one file over TLS (``ctx``) or plain TCP; None when no association."""
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(SECONDARY_CAPTURE_IMAGE_STORAGE)
    tls_args = (ctx, "localhost") if ctx is not None else None
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI", tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(dcmread(path))
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def _image(tmp_path: Path) -> tuple[Path, str]:
    study = generate_uid()
    return write_secondary_capture(tmp_path / f"{study}.dcm", study_uid=study), study


def test_trusted_client_certificate_is_let_in(
    tls_node: NodeFactory, pki: Pki, tmp_path: Path
) -> None:
    settings, ledger = tls_node()
    path, study = _image(tmp_path)
    assert _store(settings, _client(pki, pki.client), path) == 0
    record = ledger.get_study(study)
    assert record is not None and record["instances"] == 1


def test_a_tls_association_is_answered_by_its_dul_thread(
    tls_node: NodeFactory, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS the A-ASSOCIATE-AC and the A-RELEASE-RP leave from the DUL thread, which does
    all of the connection's I/O (a plain TCP association's thread sends them itself: test_scp)."""
    sent = record_answer_threads(monkeypatch)
    settings, ledger = tls_node()
    path, study = _image(tmp_path)
    assert _store(settings, _client(pki, pki.client), path) == 0
    deadline = time.monotonic() + 5
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [(0x02, "EventDrivenDUL"), (0x06, "EventDrivenDUL")]
    record = ledger.get_study(study)
    assert record is not None and record["instances"] == 1


@pytest.mark.parametrize(
    "who", ["no client certificate", "certificate from an unknown CA", "plain TCP"]
)
def test_untrusted_senders_are_refused_and_the_node_keeps_serving(
    tls_node: NodeFactory, pki: Pki, tmp_path: Path, who: str
) -> None:
    settings, ledger = tls_node()
    path, study = _image(tmp_path)
    ctx = {
        "no client certificate": _client(pki, None),
        "certificate from an unknown CA": _client(pki, pki.rogue_client),
        "plain TCP": None,
    }[who]
    assert _store(settings, ctx, path) is None
    assert ledger.get_study(study) is None
    assert list(settings.spool_dir.glob("*/*.dcm")) == []
    # The next, trusted, sender still gets in.
    good, good_study = _image(tmp_path)
    assert _store(settings, _client(pki, pki.client), good) == 0
    assert ledger.get_study(good_study) is not None


def test_client_certificate_optional_when_not_required(
    tls_node: NodeFactory, pki: Pki, tmp_path: Path
) -> None:
    settings, _ = tls_node(require_client_cert=False)
    path, _study = _image(tmp_path)
    assert _store(settings, _client(pki, None), path) == 0
    # A presented certificate is still checked: one from an unknown CA fails.
    other, _ = _image(tmp_path)
    assert _store(settings, _client(pki, pki.rogue_client), other) is None


def test_a_silent_connection_does_not_block_the_next_sender(
    tls_node: NodeFactory, pki: Pki, tmp_path: Path
) -> None:
    """The handshake runs in the connection's thread: a peer that never starts it is harmless.

    The node waits 20 s for a handshake, the sender only 5 s for its association: were the
    silent peer's handshake blocking the accept loop, the sender would give up first.
    """
    settings, _ = tls_node(handshake_timeout_s=20)
    silent = socket.create_connection(("127.0.0.1", settings.node.dicom_port))
    try:
        path, _study = _image(tmp_path)
        assert _store(settings, _client(pki, pki.client), path) == 0
    finally:
        silent.close()


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(tls_node: NodeFactory) -> None:
    settings, _ = tls_node(handshake_timeout_s=1)
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as silent:
        silent.settimeout(30)
        assert silent.recv(1) == b""  # closed by the node, not by this side's timeout


def test_dcmtk_storescu_over_tls(tls_node: NodeFactory, pki: Pki, tmp_path: Path) -> None:
    require_dcmtk_tool("storescu")
    settings, ledger = tls_node()
    path, study = _image(tmp_path)
    tls_args = ["+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca)]
    done = storescu("127.0.0.1", settings.node.dicom_port, "ACWI", path, extra_args=tls_args)
    assert done.returncode == 0, done.stdout + done.stderr
    record = ledger.get_study(study)
    assert record is not None and record["instances"] == 1
    # Anonymous TLS (no client certificate) is refused; the study gains nothing.
    other, other_study = _image(tmp_path)
    refused = storescu(
        "127.0.0.1",
        settings.node.dicom_port,
        "ACWI",
        other,
        extra_args=["+tla", "+cf", str(pki.ca)],
    )
    assert refused.returncode != 0
    assert ledger.get_study(other_study) is None


# ----------------------------------------------------------------------------------- the SCU
class _TlsScp:
    """A pynetdicom storage SCP on TLS, as a stand-in PACS."""

    def __init__(self, pki: Pki, server: Pair, *, require_client_cert: bool) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(VERIFICATION)
        self.ae.add_supported_context(SECONDARY_CAPTURE_IMAGE_STORAGE)
        self.ctx = server_context(
            cert_file=server.cert,
            key_file=server.key,
            ca_file=pki.ca,
            require_client_cert=require_client_cert,
        )

    def _on_store(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        self.received.append(str(request.AffectedSOPInstanceUID))
        return 0

    def __enter__(self) -> _TlsScp:
        self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.ctx,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.ae.shutdown()


def _send(port: int, path: Path, ctx: ssl.SSLContext, *, name: str = "localhost") -> Any:
    return send_files(
        [path],
        called_ae="PACS",
        host="127.0.0.1",
        port=port,
        calling_ae="ACWI",
        timeout_s=5,
        tls=(ctx, name),
    )


def test_scu_sends_over_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    path, _ = _image(tmp_path)
    with _TlsScp(pki, pki.server, require_client_cert=True) as pacs:
        report = _send(pacs.port, path, _client(pki, pki.client))
        assert report.all_delivered and report.error is None
        assert pacs.received == [str(dcmread(path).SOPInstanceUID)]
        tls = (_client(pki, pki.client), "localhost")
        assert echo("PACS", "127.0.0.1", pacs.port, "ACWI", tls=tls)


@pytest.mark.parametrize(
    "case", ["untrusted destination", "wrong host name", "no client certificate"]
)
def test_scu_refuses_or_is_refused_with_a_clear_reason(pki: Pki, tmp_path: Path, case: str) -> None:
    path, _ = _image(tmp_path)
    server = pki.rogue_server if case == "untrusted destination" else pki.server
    client = None if case == "no client certificate" else pki.client
    name = "pacs.example.org" if case == "wrong host name" else "localhost"
    expected = {
        "untrusted destination": "not trusted",
        "wrong host name": "not trusted",
        "no client certificate": "TLS handshake",
    }[case]
    with _TlsScp(pki, server, require_client_cert=True) as pacs:
        report = _send(pacs.port, path, _client(pki, client), name=name)
        assert not report.association_ok and not report.all_delivered
        assert report.error is not None and expected in report.error, report.error
        assert pacs.received == []


def test_exporter_delivers_to_orthanc_over_tls(pki: Pki, tmp_path: Path) -> None:
    """Debian's Orthanc (DCMTK's TLS layer) as the destination, requiring our certificate."""
    require_orthanc()
    overrides = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server.cert),
        "DicomTlsPrivateKey": str(pki.server.key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    path, study = _image(tmp_path)
    with OrthancServer(node_port=free_port(), overrides=overrides) as orthanc:

        def send(client: Pair | None) -> Any:
            return send_files(
                [path],
                called_ae=orthanc.aet,
                host="127.0.0.1",
                port=orthanc.dicom_port,
                calling_ae="ACWI",
                timeout_s=10,
                tls=(_client(pki, client), "localhost"),
            )

        refused = send(None)
        assert not refused.all_delivered
        assert orthanc.find_study(study) is None
        report = send(pki.client)
        assert report.all_delivered, report
        assert orthanc.find_study(study) is not None


# ------------------------------------------------------------------------- configuration
def test_tls_configuration_is_checked_at_start_up(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_settings(None, ingest={"tls": {"enabled": True}})
    with pytest.raises(ConfigError, match="require_client_cert needs ca_file"):
        load_settings(
            None,
            ingest={
                "tls": {"enabled": True, "cert_file": pki.server.cert, "key_file": pki.server.key}
            },
        )
    # The line names the missing file (the ssl module's error names none).
    for missing in (
        {"cert_file": tmp_path / "missing.crt"},
        {"key_file": tmp_path / "missing.key"},
    ):
        with pytest.raises(ConfigError, match=re.escape(f"not found: {tmp_path}/missing")):
            load_settings(
                None,
                ingest={
                    "tls": {
                        "enabled": True,
                        "cert_file": pki.server.cert,
                        "key_file": pki.server.key,
                        "ca_file": pki.ca,
                        **missing,
                    }
                },
            )
    with pytest.raises(ConfigError, match="cannot load the certificate"):
        load_settings(
            None,
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "pacs",
                    "port": 2762,
                    # a key that does not match the certificate
                    "tls": {"cert_file": pki.client.cert, "key_file": pki.server.key},
                }
            ],
        )
    # Disabled TLS needs nothing.
    assert load_settings(None).ingest.tls.enabled is False
