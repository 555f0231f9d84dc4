"""The C-STORE fast path over real associations: which thread serves, what the sender gets back.

A C-STORE the fast path takes runs its handler on the association's DUL thread
(:class:`EventDrivenDUL`); one left to pynetdicom runs on the association's own thread.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.reactor import EventDrivenDUL
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from tests.integration.test_scp import SC, make_sc
from tests.support import raw_dicom as raw
from tests.support.ports import free_port

ECHO = "1.2.840.10008.1.1"


class Node:
    """A StorageSCP whose C-STORE handler records the thread it ran on (and may be replaced)."""

    def __init__(
        self, tmp_path: Path, log_level: str = "INFO", max_pdu: int = 4096, reactor: str = "event"
    ) -> None:
        self.settings: Settings = load_settings(
            None,
            node={
                "data_dir": tmp_path / "data",
                "dicom_host": "127.0.0.1",
                "dicom_port": free_port(),
                "log_level": log_level,
            },
            ingest={
                "fsync": False,
                "network_timeout_s": 5,
                "acse_timeout_s": 5,
                "max_pdu_size": max_pdu,
                "reactor": reactor,
            },
        )
        self.ledger = Ledger(self.settings.database_url)
        self.scp = StorageSCP(self.settings, self.ledger, Spool(self.settings.spool_dir))
        self.threads: list[str] = []
        self.handler: Callable[[Any], Any] | None = None
        real = self.scp.handle_store

        def spy(event: Any) -> Any:
            current = threading.current_thread()
            self.threads.append("dul" if isinstance(current, EventDrivenDUL) else "assoc")
            return (self.handler or real)(event)

        self.scp.handle_store = spy  # type: ignore[method-assign]
        self.scp.start(block=False)

    def associate(self) -> Any:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(SC, ExplicitVRLittleEndian)
        ae.add_requested_context(ECHO)
        assoc = ae.associate("127.0.0.1", self.settings.node.dicom_port, ae_title="ACWI")
        assert assoc.is_established
        return assoc

    def close(self) -> None:
        self.scp.stop()
        self.ledger.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def big_sc(study: str, side: int = 96) -> Dataset:
    ds = make_sc(study)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side // 256)
    return ds


def test_stores_over_many_pdus_take_the_fast_path_and_land_intact(node: Node) -> None:
    study = generate_uid()
    datasets = [big_sc(study) for _ in range(3)]  # 9 KB of pixels: three 4 KB PDUs or more
    assoc = node.associate()
    try:
        assert int(assoc.send_c_store(datasets[0]).Status) == 0
        assert int(assoc.send_c_echo().Status) == 0  # pynetdicom's path, in between
        for ds in datasets[1:]:
            assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    assert node.threads == ["dul"] * 3
    study_row = node.ledger.get_study(study)
    assert study_row is not None and study_row["instances"] == 3
    for ds in datasets:
        back = dcmread(node.settings.spool_dir / study / f"{ds.SOPInstanceUID}.dcm")
        assert back.PixelData == ds.PixelData
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_refusals_are_answered_on_the_fast_path(node: Node) -> None:
    ds = make_sc("1.2.826.0.1.3680043.9.7/../x")
    assoc = node.associate()
    try:
        status = int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
    assert node.threads == ["dul"]
    assert status >= 0xA000  # a failure, not a crash or a silent success


def test_a_status_data_set_goes_through_pynetdicoms_encoder(node: Node) -> None:
    def out_of_room(event: Any) -> Dataset:
        status = Dataset()
        status.Status = 0xA700
        status.ErrorComment = "spool full"
        return status

    node.handler = out_of_room
    assoc = node.associate()
    try:
        response = assoc.send_c_store(make_sc(generate_uid()))
    finally:
        assoc.release()
    assert int(response.Status) == 0xA700
    assert response.ErrorComment == "spool full"


def test_a_handler_that_raises_is_answered_0xc211(node: Node) -> None:
    def broken(event: Any) -> int:
        raise RuntimeError("boom")

    node.handler = broken
    assoc = node.associate()
    try:
        assert int(assoc.send_c_store(make_sc(generate_uid())).Status) == 0xC211
        node.handler = None
        assert int(assoc.send_c_store(make_sc(generate_uid())).Status) == 0  # still serving
    finally:
        assoc.release()


def test_debug_logging_of_pdus_turns_the_fast_path_off(tmp_path: Path) -> None:
    level = pynetdicom_config.LOG_HANDLER_LEVEL
    node = Node(tmp_path, log_level="DEBUG")
    try:
        assoc = node.associate()
        try:
            assert int(assoc.send_c_store(make_sc(generate_uid())).Status) == 0
        finally:
            assoc.release()
        assert node.threads == ["assoc"]
    finally:
        node.close()
        pynetdicom_config.LOG_HANDLER_LEVEL = level


def test_a_command_inside_a_data_set_aborts_only_that_association(node: Node) -> None:
    assoc = node.associate()
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == SC)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = SC
    request.AffectedSOPInstanceUID = generate_uid()
    request.Priority = 0
    request.DataSet = BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    command = b"".join(
        data[1:]
        for p_data in message.encode_msg(context_id, 0)
        for _, data in p_data.presentation_data_value_list
        if data[0] & 0x01
    )

    def p_data(control: int, data: bytes) -> bytes:
        pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
        return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv

    sock = assoc.dul.socket.socket
    sock.sendall(p_data(0x03, command) + p_data(0x00, b"\x08\x00") + p_data(0x03, command))
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted
    assert node.threads == []  # the broken request never reached the handler

    again = node.associate()
    try:
        assert int(again.send_c_store(make_sc(generate_uid())).Status) == 0
    finally:
        again.release()


@pytest.fixture(
    params=[("INFO", "event"), ("DEBUG", "event"), ("INFO", "polling")],
    ids=["fast-path", "pynetdicom-path", "polling-reactor"],
)
def either_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """The node with the fast path on, with it off (PDU logging at DEBUG): every message then
    takes pynetdicom's path, and with pynetdicom's own polling loops (``ingest.reactor``)."""
    level = pynetdicom_config.LOG_HANDLER_LEVEL
    log_level, reactor = request.param
    n = Node(tmp_path, log_level=log_level, reactor=reactor)
    yield n
    n.close()
    pynetdicom_config.LOG_HANDLER_LEVEL = level


def associated(node: Node) -> socket.socket:
    sock = raw.connect(node.settings.node.dicom_port)
    sock.sendall(raw.associate_rq())
    assert raw.read_pdu(sock)[0] == raw.A_ASSOCIATE_AC
    return sock


def acceptors_ended() -> bool:
    """Whether the in-process SCP's association threads have all ended (waited for a while)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(t.name.startswith("AcceptorThread") for t in threading.enumerate()):
            return True
        time.sleep(0.02)
    return False


def problems(node: Node, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The warnings and errors logged; at DEBUG the node's own only (pynetdicom's DEBUG
    handlers, which print every message received, fail on a request missing an element)."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and (node.settings.node.log_level != "DEBUG" or r.name.startswith("acwi_node"))
    ]


def test_a_command_set_that_is_no_command_gets_an_a_abort_and_one_log_line(
    either_path: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom raised from the state machine: the association's DUL thread died (two
    tracebacks, the second printed past the log filters) and the peer saw the connection
    close without an A-ABORT."""
    node = either_path
    died: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    with caplog.at_level(logging.WARNING), associated(node) as sock:
        sock.sendall(raw.p_data((1, 0x03, bytes(range(1, 65)))))
        assert raw.read_pdu(sock)[0] == raw.A_ABORT
        assert acceptors_ended()
    assert died == []
    assert not [r for r in caplog.records if r.name == "pynetdicom.fsm"]
    (line,) = problems(node, caplog)
    assert line.name == "acwi_node.ingest" and line.exc_info is None
    assert "not a DIMSE command (no Command Field): aborting it" in line.getMessage()
    assert node.threads == []
    again = node.associate()
    try:
        assert int(again.send_c_store(make_sc(generate_uid())).Status) == 0
    finally:
        again.release()


def test_a_c_store_request_without_its_affected_sop_instance_uid_is_answered_at_once(
    either_path: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom dropped it ("Received unexpected C-STORE service message") and the sender
    waited for the network timeout: now a failure response, and the association goes on."""
    node = either_path
    with caplog.at_level(logging.WARNING), associated(node) as sock:
        command = raw.store_command(message_id=7, sop_instance=None)
        sock.sendall(raw.p_data((1, 0x03, command), (1, 0x02, b"\x08\x00\x18\x00UI\x00\x00")))
        kind, body = raw.read_pdu(sock)
        assert kind == raw.P_DATA_TF
        response = raw.command_elements(body)
        assert response[0x0100] == struct.pack("<H", 0x8001)  # C-STORE-RSP
        assert response[0x0120] == struct.pack("<H", 7)  # to message 7
        assert response[0x0900] == struct.pack("<H", 0xC000)  # Error: Cannot understand
        assert 0x1000 not in response
        sock.sendall(raw.RELEASE_RQ)
        assert raw.read_pdu(sock)[0] == raw.A_RELEASE_RP
    (line,) = problems(node, caplog)
    assert "without AffectedSOPInstanceUID: refused with 0xC000" in line.getMessage()
    assert node.threads == []  # no handler ran


def test_a_c_store_request_without_a_message_id_is_aborted_at_once(
    either_path: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node = either_path
    with caplog.at_level(logging.WARNING), associated(node) as sock:
        command = raw.store_command(message_id=None, sop_instance=generate_uid())
        sock.sendall(raw.p_data((1, 0x03, command), (1, 0x02, b"\x08\x00\x18\x00UI\x00\x00")))
        assert raw.read_pdu(sock)[0] == raw.A_ABORT
    messages = [r.getMessage() for r in problems(node, caplog)]
    assert messages == [
        "C-STORE request from RAWPEER (127.0.0.1) without MessageID, which cannot be answered: "
        "aborting the association"
    ]
