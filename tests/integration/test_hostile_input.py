"""Bad input and protocol abuse against the storage SCP: a clear answer, nothing lost, and the
next association works."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from acwi_node.config import Settings
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ledger import Ledger
from tests.integration.test_scp import SC, make_sc, node, running_scp, send
from tests.support import raw_dicom as raw
from tests.support.association import rejected
from tests.support.dcmtk import storescu

__all__ = ["node"]  # the fixture, shared with test_scp

Node = tuple[Settings, Ledger, StorageSCP]


def next_association_works(settings: Settings, ledger: Ledger) -> None:
    study = generate_uid()
    assert send(settings, [make_sc(study)]) == [0x0000]
    view = ledger.get_study(study)
    assert view is not None and view["instances"] == 1


def no_partial_files(settings: Settings) -> None:
    assert list((settings.spool_dir / ".tmp").glob("*")) == []


def send_file(settings: Settings, path: Path) -> int:
    """C-STORE a Part-10 file as its raw bytes (pynetdicom does not re-encode a path)."""
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def test_truncated_file(node: Node, tmp_path: Path) -> None:
    settings, ledger, _ = node
    path = tmp_path / "whole.dcm"
    dcmwrite(path, make_sc(generate_uid()), enforce_file_format=True)
    raw = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: len(raw) - 40])  # inside the pixel data
    status = send_file(settings, cut)
    # Either refused as not understood, or kept as received: never a crash, never a stray file.
    assert status in (0x0000, 0xC000, 0xA900, 0xC210), hex(status)
    no_partial_files(settings)
    next_association_works(settings, ledger)


def test_bad_vr_and_missing_pixel_data(node: Node, tmp_path: Path) -> None:
    settings, ledger, _ = node
    no_pixels = make_sc(generate_uid())
    del no_pixels.PixelData
    assert send(settings, [no_pixels]) == [0x0000]  # kept; the analysis skips it with a reason
    path = tmp_path / "odd.dcm"
    dcmwrite(path, make_sc(generate_uid()), enforce_file_format=True)
    rows = b"\x28\x00\x10\x00US\x02\x00\x08\x00"
    raw = path.read_bytes()
    assert raw.count(rows) == 1
    # Rows with a 3-byte value: not a US value (as a broken modality would write it).
    path.write_bytes(raw.replace(rows, b"\x28\x00\x10\x00US\x03\x00\x01\x02\x03"))
    assert send_file(settings, path) in (0x0000, 0xC000)
    no_partial_files(settings)
    next_association_works(settings, ledger)


def test_multiframe_is_stored(node: Node) -> None:
    settings, ledger, _ = node
    ds = make_sc(generate_uid())
    ds.NumberOfFrames = 4
    ds.PixelData = np.zeros((4, 8, 8), dtype=np.uint8).tobytes()
    assert send(settings, [ds]) == [0x0000]
    next_association_works(settings, ledger)


def nested_sequences(levels: int) -> bytes:
    """(0040,A730) Content Sequence nested ``levels`` deep, undefined lengths, explicit VR LE."""
    open_level = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_level = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return open_level * levels + close_level * levels


def test_sequences_nested_beyond_250_levels(node: Node, tmp_path: Path) -> None:
    settings, ledger, _ = node
    ds = make_sc(generate_uid())
    pixels = ds.PixelData
    del ds.PixelData
    path = tmp_path / "deep.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    pixel_element = b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<L", len(pixels)) + pixels
    path.write_bytes(path.read_bytes() + nested_sequences(300) + pixel_element)
    # pydicom cannot read it back to send it, DCMTK's storescu can (and sends it as it is).
    done = storescu("127.0.0.1", settings.node.dicom_port, "ACWI", [path], extra_args=["-v"])
    out = done.stdout + done.stderr
    assert "Received Store Response (Success)" in out or "0xc000" in out.lower(), out
    no_partial_files(settings)
    next_association_works(settings, ledger)


def test_unsupported_transfer_syntax_is_refused_at_negotiation(node: Node) -> None:
    settings, ledger, _ = node
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(SC, "1.2.3.4.5.6.7.8.9")  # no such transfer syntax
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    if assoc.is_established:
        assert assoc.accepted_contexts == []
        assoc.release()
    next_association_works(settings, ledger)


def test_disk_full_answers_out_of_resources_and_leaves_no_file(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, ledger, _ = node
    import acwi_node.ingest.spool as spool_module

    real_writev = os.writev

    def full(fd: int, buffers: list[memoryview]) -> int:
        real_writev(fd, [bytes(buffers[0])[:10]])  # part of the file reaches the disk, then
        raise OSError(errno.ENOSPC, "No space left on device")  # ENOSPC

    monkeypatch.setattr(spool_module.os, "writev", full)
    study = generate_uid()
    kept, refused = make_sc(study), make_sc(study)
    # The first instance is durable in the ingest journal before its spool file is written,
    # so it is answered; its file fails after the answer, and from then on each file is
    # written before the answer: the next instance is refused.
    assert send(settings, [kept, refused]) == [0x0000, 0xA700]
    no_partial_files(settings)
    assert ledger.get_study(study) is None
    monkeypatch.setattr(spool_module.os, "writev", real_writev)
    next_association_works(settings, ledger)
    # The journal's checkpoint (every 2 s) writes the answered instance once it can.
    deadline = time.monotonic() + 30
    while ledger.instance_file(kept.SOPInstanceUID) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ledger.instance_file(kept.SOPInstanceUID) is not None
    assert (settings.spool_dir / study / f"{kept.SOPInstanceUID}.dcm").exists()
    assert ledger.instance_file(refused.SOPInstanceUID) is None


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sock.recv(4096) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def test_silent_connection_is_closed_after_the_artim_timeout(node: Node) -> None:
    settings, ledger, _ = node  # acse/network timeouts are 2 s in the fixture
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
        assert _closed_within(sock, 15), "a connection that sends nothing must be closed"
    next_association_works(settings, ledger)


@pytest.mark.parametrize(
    "sent", [b"", b"GET / HTTP/1.1\r\nHost: node\r\n\r\n"], ids=["nothing", "http"]
)
def test_connections_closed_before_a_request_free_their_slot_at_once(
    tmp_path: Path, sent: bytes
) -> None:
    """Port probes and health checks (connect, close, no PDU) and HTTP on the DICOM port hold
    no association slot: with two slots and three such connections, the next modality is
    accepted at once. pynetdicom's acceptor waited ``acse_timeout`` (30 s here) for the
    request that never came, its thread counted against ``ingest.max_associations``, and the
    node rejected the modality."""
    with running_scp(tmp_path, max_associations=2, allowed_calling_aes=["SENDER"]) as (
        settings,
        ledger,
        _,
    ):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
                if sent:
                    sock.sendall(sent)
                    assert _closed_within(sock, 15)
        deadline = time.monotonic() + 5
        while acceptor_threads() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert acceptor_threads() == []
        next_association_works(settings, ledger)


def test_silent_connections_hold_no_association_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that has sent no A-ASSOCIATE-RQ is not an association yet: with two slots,
    three open silent connections leave both to modalities. Under load the threads of probes
    already closed outlived their connections the same way, and the next modality, negotiating
    meanwhile, was rejected. The limit still counts the associations that asked."""
    with running_scp(tmp_path, max_associations=2, allowed_calling_aes=["SENDER"]) as (
        settings,
        ledger,
        _,
    ):
        address = ("127.0.0.1", settings.node.dicom_port)
        silent = [socket.create_connection(address) for _ in range(3)]
        held = []
        try:
            deadline = time.monotonic() + 10
            while len(acceptor_threads()) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(acceptor_threads()) == 3  # each has its thread, waiting for a request
            next_association_works(settings, ledger)
            while len(acceptor_threads()) > 3 and time.monotonic() < deadline + 10:
                time.sleep(0.02)  # that association's thread ends after its release

            ae = AE(ae_title="SENDER")
            ae.add_requested_context(SC, ExplicitVRLittleEndian)
            held = [ae.associate(*address, ae_title="ACWI") for _ in range(2)]
            assert all(assoc.is_established for assoc in held)
            third = ae.associate(*address, ae_title="ACWI")
            assert rejected(third)
            assert "no association slot free" in caplog.text
        finally:
            for sock in silent:
                sock.close()
            for assoc in held:
                assoc.release()


def acceptor_threads() -> list[str]:
    """The in-process SCP's association threads still running (pynetdicom names them)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("AcceptorThread")]


def test_pdu_declaring_a_huge_length(node: Node) -> None:
    settings, ledger, _ = node
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFF0) + b"\x00" * 64)
        assert _closed_within(sock, 15)
    next_association_works(settings, ledger)


def test_half_a_pdu_then_silence(node: Node) -> None:
    settings, ledger, _ = node
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 200) + b"\x00\x01")
        assert _closed_within(sock, 15)
    next_association_works(settings, ledger)


def test_http_on_the_dicom_port(node: Node) -> None:
    settings, ledger, _ = node
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
        assert _closed_within(sock, 15)
    next_association_works(settings, ledger)


@pytest.mark.parametrize(
    ("networks", "accepted"),
    [(["127.0.0.1"], True), (["127.0.0.0/8"], True), (["10.1.2.3", "192.168.0.0/16"], False)],
)
def test_host_check_binds_a_calling_ae_to_its_hosts(
    tmp_path: Path, networks: list[str], accepted: bool
) -> None:
    from acwi_node.config import load_settings
    from acwi_node.ingest.spool import Spool
    from tests.support.ports import free_port

    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "dicom_host": "127.0.0.1", "dicom_port": free_port()},
        ingest={"fsync": False, "calling_ae_hosts": {"CT1": networks}},
    )
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        for calling, expected in (("CT1", accepted), ("ELSEWHERE", False)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(SC)
            assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
            assert assoc.is_established is expected, calling
            if assoc.is_established:
                assert assoc.send_c_store(make_sc(generate_uid())).Status == 0x0000
                assoc.release()
            else:
                assert rejected(assoc), calling
    finally:
        scp.stop()
        ledger.dispose()


@pytest.mark.parametrize(
    ("title", "shown"),
    [
        (b"A'\nERROR forged!", '"A\'\\nERROR forged!"'),
        ("\u00c4\u00d6\u00dcAE\x1b[31m".encode("latin-1"), r"'\xc4\xd6\xdcAE\x1b[31m'"),
        (b"BACK\\SLASH", r"'BACK\\SLASH'"),
        (b" " * 16, "''"),
    ],
    ids=["line-break", "not-ascii", "backslash", "spaces"],
)
@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_a_calling_ae_title_that_is_no_ae_title_is_refused_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, title: bytes, shown: str, reactor: str
) -> None:
    """Before the allow-list is asked: pynetdicom logged such a title raw at ERROR (a line
    break in it forged a log line of its own) or, not in ASCII, with a traceback."""
    # Short timeouts: pynetdicom's polling loops end an aborted association's thread only
    # when its ARTIM timer (acse_timeout_s) runs out, and later tests count such threads.
    timeouts = {"acse_timeout_s": 2, "network_timeout_s": 2}
    with running_scp(tmp_path, reactor=reactor, **timeouts) as (settings, ledger, _):
        with caplog.at_level(logging.DEBUG), raw.connect(settings.node.dicom_port) as sock:
            sock.sendall(raw.associate_rq(calling=title))
            assert raw.read_pdu(sock)[0] == raw.A_ABORT
        logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.name for r in logged] == ["acwi_node.ingest"], [r.getMessage() for r in logged]
        assert logged[0].exc_info is None
        message = logged[0].getMessage()
        assert message.startswith(
            "association request from 127.0.0.1 refused: its calling AE title"
        )
        assert f"AE title {shown} is not a valid AE title" in message and "\n" not in message
        next_association_works(settings, ledger)
