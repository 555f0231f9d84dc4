"""The audit trail: DICOM association events from the real SCP, the JSON-lines file, syslog
(RFC 5424 over UDP and TCP, carrying DICOM audit messages) and configuration changes."""

from __future__ import annotations

import json
import re
import socket
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from acwi_node.audit import (
    AuditEvent,
    Outcome,
    audit,
    audit_file,
    close_audit,
    configure_audit,
    note_configuration,
    remote_ae,
)
from acwi_node.audit.trail import SyslogSink
from acwi_node.config import Settings, load_settings
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE, write_secondary_capture
from tests.support.certs import make_pki
from tests.support.ports import free_port

CANARY_NAME = "Auditcanary^Wren"
CANARY_ID = "PID-AUDIT-7731"
SYSLOG_HEADER = re.compile(
    rb"^<85>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ acwi-node \d+ IHE\+RFC-3881 - \xef\xbb\xbf"
)


def records(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_file(settings).read_text().splitlines()]


def node_settings(tmp_path: Path, **extra: Any) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path / "data", "dicom_host": "127.0.0.1", "dicom_port": free_port()},
        ingest={
            "fsync": False,
            "allowed_calling_aes": ["SENDER"],
            "network_timeout_s": 3,
            "acse_timeout_s": 3,
            **extra.pop("ingest", {}),
        },
        **extra,
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Any]:
    started: list[tuple[StorageSCP, Ledger]] = []

    def start(settings: Settings) -> Settings:
        configure_audit(settings, "scp")
        ledger = Ledger(settings.database_url)
        scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
        scp.start(block=False)
        started.append((scp, ledger))
        return settings

    yield start
    for scp, ledger in started:
        scp.stop()
        ledger.dispose()
    close_audit()


def _send(settings: Settings, calling: str, paths: list[Path]) -> list[int] | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(SECONDARY_CAPTURE_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    if not assoc.is_established:
        return None
    statuses = [int(assoc.send_c_store(dcmread(p)).Status) for p in paths]
    assoc.release()
    return statuses


def _wait_for(settings: Settings, event: str, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [r for r in records(settings) if r["event"] == event]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {event} record in {records(settings)}")


@pytest.mark.parametrize("patient_id", [False, True])
def test_association_and_instances_are_audited(
    tmp_path: Path, running: Any, patient_id: bool
) -> None:
    settings = running(node_settings(tmp_path, audit={"patient_id": patient_id}))
    study = generate_uid()
    good = [
        write_secondary_capture(
            tmp_path / f"{i}.dcm",
            study_uid=study,
            patient_id=CANARY_ID,
            patient_name=CANARY_NAME,
        )
        for i in range(2)
    ]
    bad = tmp_path / "bad.dcm"
    ds = dcmread(good[0])
    ds.SOPInstanceUID = "1.2.3/../../etc"  # path-like: refused with 0xC001
    ds.save_as(bad)
    assert _send(settings, "SENDER", [*good, bad]) == [0, 0, 0xC001]
    assert _send(settings, "STRANGER", good) is None

    accepted = _wait_for(settings, "association_accepted")[0]
    assert accepted["participants"][0] == {
        "type": "ae",
        "id": "SENDER",
        "requestor": True,
        "address": "127.0.0.1",
    }
    assert accepted["event_id"]["code"] == "110113"
    assert accepted["event_type"]["meaning"] == "Node Authentication"
    received = _wait_for(settings, "instances_received")[0]
    assert received["study_uids"] == [study]
    assert received["instances"] == {study: 2}
    assert received["outcome"] == "minor_failure"
    assert received["action"] == "C" and received["event_id"]["code"] == "110104"
    assert "2 instance(s) stored, 1 refused" in received["detail"]
    rejected = _wait_for(settings, "association_rejected")[0]
    assert rejected["participants"][0]["id"] == "STRANGER"
    assert rejected["detail"] == "calling AE title not recognised"
    assert rejected["outcome"] == "minor_failure"

    text = audit_file(settings).read_text()
    assert "Auditcanary" not in text and "Wren" not in text  # names: never
    assert (CANARY_ID in text) is patient_id  # IDs: only when asked for
    assert stat.S_IMODE(audit_file(settings).stat().st_mode) == 0o600


def test_the_node_s_own_results_coming_back_are_audited_as_not_stored(
    tmp_path: Path, running: Any
) -> None:
    settings = running(node_settings(tmp_path))
    study = generate_uid()
    image = write_secondary_capture(tmp_path / "image.dcm", study_uid=study)
    results = [
        write_secondary_capture(
            tmp_path / f"result{i}.dcm",
            study_uid=study,
            manufacturer="ACWI Node",
            series_number=9902,
        )
        for i in range(2)
    ]
    assert _send(settings, "SENDER", [image, *results]) == [0, 0, 0]
    received = _wait_for(settings, "instances_received")[0]
    assert received["instances"] == {study: 1}
    assert received["outcome"] == "success"
    assert received["detail"] == "1 instance(s) stored, 2 of the node's own results not stored"
    # An association that brought nothing but results is on the record too.
    assert _send(settings, "SENDER", results[:1]) == [0]
    second = _wait_for(settings, "instances_received", 2)[1]
    assert "instances" not in second and "study_uids" not in second
    assert second["detail"] == "0 instance(s) stored, 1 of the node's own results not stored"


def test_failed_tls_handshake_is_audited(tmp_path: Path, running: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = running(
        node_settings(
            tmp_path,
            ingest={
                "tls": {
                    "enabled": True,
                    "cert_file": pki.server.cert,
                    "key_file": pki.server.key,
                    "ca_file": pki.ca,
                }
            },
        )
    )
    path = write_secondary_capture(tmp_path / "x.dcm", study_uid=generate_uid())
    assert _send(settings, "SENDER", [path]) is None  # plain DICOM on the TLS port
    rejected = _wait_for(settings, "association_rejected")[0]
    assert rejected["detail"].startswith("TLS handshake failed")
    assert rejected["participants"][0]["address"] == "127.0.0.1"


# ------------------------------------------------------------------------------------ syslog
class _Collector:
    """A syslog collector on loopback: UDP datagrams, or TCP with octet-counting frames."""

    def __init__(self, scheme: str, port: int = 0) -> None:
        self.scheme = scheme
        self.messages: list[bytes] = []
        self.got = threading.Condition()
        kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        if scheme == "tcp":
            self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _add(self, message: bytes) -> None:
        with self.got:
            self.messages.append(message)
            self.got.notify_all()

    def _serve(self) -> None:
        while True:
            try:
                if self.scheme == "udp":
                    self._add(self.sock.recvfrom(65535)[0])
                    continue
                conn, _ = self.sock.accept()
            except OSError:
                return
            buffer = b""
            with conn:
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while b" " in buffer:
                        length, _, rest = buffer.partition(b" ")
                        if len(rest) < int(length):
                            break
                        self._add(rest[: int(length)])
                        buffer = rest[int(length) :]

    def wait(self, count: int) -> list[bytes]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.messages) >= count, timeout=10), self.messages
            return list(self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
def test_syslog_carries_dicom_audit_messages(tmp_path: Path, scheme: str) -> None:
    collector = _Collector(scheme)
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        audit={"syslog_url": f"{scheme}://127.0.0.1:{collector.port}", "enterprise_site": "H1"},
    )
    configure_audit(settings, "exporter")
    try:
        audit(
            AuditEvent.RESULTS_SENT,
            participants=[remote_ae("PACS", "10.0.0.9", requestor=False)],
            study_uids=["1.2.3.4"],
            instances={"1.2.3.4": 5},
            detail="5 object(s) stored by pacs",
        )
        audit(AuditEvent.NODE_STOPPED, outcome=Outcome.SERIOUS_FAILURE)
        first, second = collector.wait(2)[:2]
    finally:
        close_audit()
        collector.close()
    assert SYSLOG_HEADER.match(first), first[:120]
    xml = ET.fromstring(first[SYSLOG_HEADER.match(first).end() :])  # type: ignore[union-attr]
    ident = xml.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "0"
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    assert event_id.get("codeSystemName") == "DCM"
    participants = xml.findall("ActiveParticipant")
    pacs = [p for p in participants if p.get("UserID") == "PACS"][0]
    assert pacs.get("UserIsRequestor") == "false"
    assert pacs.get("NetworkAccessPointID") == "10.0.0.9"
    assert pacs.get("NetworkAccessPointTypeCode") == "2"
    role = pacs.find("RoleIDCode")
    assert role is not None and role.get("csd-code") == "110152"
    source = xml.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditEnterpriseSiteID") == "H1"
    study = xml.find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == "1.2.3.4"
    type_code = study.find("ParticipantObjectIDTypeCode")
    assert type_code is not None and type_code.get("csd-code") == "110180"
    stop = ET.fromstring(second[SYSLOG_HEADER.match(second).end() :])  # type: ignore[union-attr]
    assert stop.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"  # type: ignore[union-attr]
    assert stop.find("EventIdentification").get("EventOutcomeIndicator") == "8"  # type: ignore[union-attr]
    # The same records are in the JSON-lines file.
    assert [r["event"] for r in records(settings)] == ["results_sent", "node_stopped"]


def test_syslog_collector_down_then_back(tmp_path: Path) -> None:
    """Messages wait in the queue while the TCP collector is down and arrive once it is back."""
    port = free_port()
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data"}, audit={"syslog_url": f"tcp://127.0.0.1:{port}"}
    )
    configure_audit(settings, "web")
    try:
        audit(AuditEvent.USER_SIGNED_IN, detail="while the collector is down")
        collector = _Collector("tcp", port)  # the collector comes up only now
        messages = collector.wait(1)
        assert b"while the collector is down" in messages[0]
        collector.close()
    finally:
        close_audit()


def test_a_record_the_audit_file_cannot_take_still_goes_to_the_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The data disk is full: the audit file cannot take the record, but the collector (on
    another host, not short of space) gets it; it got nothing, the record was lost."""
    collector = _Collector("udp")
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        audit={"syslog_url": f"udp://127.0.0.1:{collector.port}"},
    )
    trail = configure_audit(settings, "scp")
    assert trail is not None

    def full_disk(line: bytes) -> None:
        raise OSError(28, "No space left on device")

    try:
        monkeypatch.setattr(trail.file, "write", full_disk)
        audit(AuditEvent.ASSOCIATION_ACCEPTED, detail="while the data disk is full")
        messages = collector.wait(1)
        assert b"while the data disk is full" in messages[0]
        assert "could not record association_accepted" in caplog.text
    finally:
        close_audit()
        collector.close()


def test_a_record_too_long_for_one_udp_datagram_goes_in_parts_and_holds_nothing_up(
    tmp_path: Path,
) -> None:
    """A model recall names thousands of studies: over UDP its record goes as several messages,
    each naming some of them, and the records after it still reach the collector."""
    collector = _Collector("udp")
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        audit={"syslog_url": f"udp://127.0.0.1:{collector.port}"},
    )
    uids = [f"1.2.826.0.1.3680043.8.498.{i}.{i}.{i}" for i in range(300)]
    configure_audit(settings, "exporter")
    try:
        audit(AuditEvent.RESULTS_WITHDRAWN, study_uids=uids, detail="model recall")
        audit(AuditEvent.STUDY_DELETED, study_uids=["1.2.3"], detail="after the recall")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            b"after the recall" in m for m in collector.messages
        ):
            time.sleep(0.05)
        messages = list(collector.messages)
    finally:
        close_audit()
        collector.close()
    assert any(b"after the recall" in m for m in messages)
    parts = [m for m in messages if b"model recall" in m]
    assert len(parts) > 1
    named: list[str] = []
    for part in parts:
        assert len(part) <= 8192
        xml = ET.fromstring(part[SYSLOG_HEADER.match(part).end() :])  # type: ignore[union-attr]
        detail = xml.findtext("EventIdentification/EventOutcomeDescription") or ""
        assert re.fullmatch(rf"model recall \(part \d+ of {len(parts)}\)", detail), detail
        named += [
            o.get("ParticipantObjectID", "") for o in xml.findall("ParticipantObjectIdentification")
        ]
    assert sorted(named) == sorted(uids)
    # The file keeps the record whole.
    (recall,) = [r for r in records(settings) if r["event"] == "results_withdrawn"]
    assert recall["study_uids"] == uids and recall["detail"] == "model recall"


def test_a_long_detail_is_cut_short_to_fit_one_udp_datagram(tmp_path: Path) -> None:
    collector = _Collector("udp")
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        audit={"syslog_url": f"udp://127.0.0.1:{collector.port}"},
    )
    configure_audit(settings, "web")
    try:
        audit(AuditEvent.RESULTS_WITHDRAWN, study_uids=["1.2.3"], detail="note & " * 20_000)
        (message,) = collector.wait(1)
    finally:
        close_audit()
        collector.close()
    assert len(message) <= 8192
    xml = ET.fromstring(message[SYSLOG_HEADER.match(message).end() :])  # type: ignore[union-attr]
    detail = xml.findtext("EventIdentification/EventOutcomeDescription") or ""
    assert detail.startswith("note & note") and detail.endswith("...")


def test_a_message_the_transport_refuses_as_too_long_is_dropped_not_retried(
    tmp_path: Path,
) -> None:
    collector = _Collector("udp")
    sink = SyslogSink(f"udp://127.0.0.1:{collector.port}")
    try:
        sink.send(b"x" * 70_000)  # longer than any UDP datagram
        sink.send(b"the next one")
        assert collector.wait(1) == [b"the next one"]
        assert sink.dropped == 1
    finally:
        sink.close()
        collector.close()


# ----------------------------------------------------------------------- configuration changes
def test_configuration_changes_are_audited_by_key_name(tmp_path: Path) -> None:
    base: dict[str, Any] = {"node": {"data_dir": tmp_path / "data"}}
    first = load_settings(None, **base)
    configure_audit(first, "scp")
    try:
        assert note_configuration(first, "scp") == ["(first start)"]
        assert note_configuration(first, "worker") == []  # same configuration: nothing
        changed = load_settings(
            None, **base, ingest={"max_associations": 4, "allowed_calling_aes": ["CT1"]}
        )
        assert note_configuration(changed, "scp") == [
            "ingest.allowed_calling_aes",
            "ingest.max_associations",
        ]
    finally:
        close_audit()
    changes = [r for r in records(first) if r["event"] == "configuration_changed"]
    assert len(changes) == 2
    assert "ingest.max_associations" in changes[1]["detail"]
    assert "CT1" not in changes[1]["detail"]  # names of keys, not their values
    assert changes[1]["event_type"]["code"] == "110131"


def test_audit_off_writes_nothing(tmp_path: Path) -> None:
    settings = load_settings(None, node={"data_dir": tmp_path / "data"}, audit={"enabled": False})
    assert configure_audit(settings, "scp") is None
    audit(AuditEvent.NODE_STARTED)
    assert not audit_file(settings).exists()
