"""BulkReadSocket: PDUs read in few calls (read-ahead, straight on the descriptor), sends on
the descriptor, with pynetdicom's contract kept."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from acwi_node.ingest.reactor import READ_AHEAD, RECV_CHUNK, BulkReadSocket
from acwi_node.tcp import TCP_QUICKACK as QUICKACK


class _Recorder:
    """A socket stand-in that returns what the peer sent in the pieces it sent it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0
        #: What happened, in order: "read", or the socket option set.
        self.log: list[object] = []

    def recv_into(self, buffer: memoryview, n: int) -> int:
        self.calls += 1
        self.log.append("read")
        return self.sock.recv_into(buffer, n)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.log.append((level, option, value))


@pytest.fixture
def pair() -> Iterator[tuple[BulkReadSocket, _Recorder, socket.socket]]:
    ours, theirs = socket.socketpair()
    bulk = BulkReadSocket.__new__(BulkReadSocket)  # no association: only recv() is tested
    recorder = _Recorder(ours)
    bulk.socket = recorder  # type: ignore[assignment]
    yield bulk, recorder, theirs
    ours.close()
    theirs.close()


def test_reads_exactly_what_is_asked_in_few_calls(pair: Any) -> None:
    bulk, recorder, peer = pair
    body = bytes(range(256)) * 2048  # 512 KiB, more than one read's worth
    sender = threading.Thread(target=peer.sendall, args=(body + b"next",))
    sender.start()
    assert bytes(bulk.recv(len(body))) == body
    sender.join()
    assert bytes(bulk.recv(4)) == b"next"  # nothing of the next PDU was taken
    assert recorder.calls < len(body) // 4096  # pynetdicom reads 4096 bytes a call


def test_a_broken_connection_returns_what_arrived(pair: Any) -> None:
    bulk, _, peer = pair
    peer.sendall(b"abc")
    peer.close()
    # A PDU declaring 4 GB: the node gets the 3 bytes, never a 4 GB buffer.
    assert bytes(bulk.recv(0xFFFFFFFF)) == b"abc"


def test_the_buffer_grows_with_what_arrives(pair: Any) -> None:
    """A PDU longer than one read's buffer: the buffer grows as its bytes come, to exactly
    the PDU."""
    bulk, _, peer = pair
    body = bytes(range(251)) * (3 * RECV_CHUNK // 251 + 7)
    sender = threading.Thread(target=peer.sendall, args=(body + b"!",))
    sender.start()
    got = bulk.recv(len(body))
    sender.join()
    assert len(got) == len(body) and bytes(got) == body
    assert bytes(bulk.recv(1)) == b"!"


def test_no_single_read_asks_for_more_than_the_chunk(pair: Any) -> None:
    bulk, recorder, peer = pair
    asked: list[int] = []
    real = recorder.recv_into

    def spy(buffer: memoryview, n: int) -> int:
        asked.append(n)
        return real(buffer, n)

    recorder.recv_into = spy
    peer.sendall(b"x" * 10)
    peer.close()
    bulk.recv(0xFFFFFFFF)
    assert asked and max(asked) <= RECV_CHUNK


def _pdu(body: bytes) -> bytes:
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def test_small_pdus_that_came_together_take_one_read(pair: Any) -> None:
    """A small instance's command and data set PDUs, sent at once: the first header's read
    takes both, and the other three reads come from memory."""
    bulk, recorder, peer = pair
    command, data_set = b"c" * 180, b"d" * 1200
    peer.sendall(_pdu(command) + _pdu(data_set))
    time.sleep(0.05)  # both PDUs are in the socket before the first read
    for body in (command, data_set):
        header = bulk.recv(6)
        assert struct.unpack(">BBI", header)[2] == len(body)
        assert bytes(bulk.recv(len(body))) == body
    assert recorder.calls == 1


def test_read_ahead_data_counts_as_ready(pair: Any) -> None:
    """``select`` cannot see data already read ahead: ``ready`` must, or the DUL would wait
    for the peer while a PDU sits in memory."""
    bulk, _, peer = pair
    peer.sendall(_pdu(b"x" * 10) + _pdu(b"y" * 10))
    time.sleep(0.05)
    assert bytes(bulk.recv(6 + 10))[6:] == b"x" * 10
    assert bulk.buffered and bulk.ready
    assert bytes(bulk.recv(16))[6:] == b"y" * 10
    assert not bulk.buffered


def test_a_large_body_is_not_read_past(pair: Any) -> None:
    """Bodies of READ_AHEAD bytes or more are read to their end only: no copy of what
    follows them."""
    bulk, _, peer = pair
    body = b"z" * READ_AHEAD
    sender = threading.Thread(target=peer.sendall, args=(body + b"after",))
    sender.start()
    assert bytes(bulk.recv(len(body))) == body
    sender.join()
    assert not bulk.buffered
    assert bytes(bulk.recv(5)) == b"after"


class _Association:
    """What BulkReadSocket.send needs of an association: handlers and the DUL's queue."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.dul = type("Dul", (), {"event_queue": queue.Queue()})()

    def get_handlers(self, event: Any) -> list[Any]:
        return [(lambda e: self.sent.append(bytes(e.data)), None)]

    def _abort_nonblocking(self) -> None:  # what pynetdicom's trigger sets aside
        pass

    _abort_blocking = _abort_nonblocking


@pytest.fixture
def real_pair() -> Iterator[tuple[BulkReadSocket, _Association, socket.socket]]:
    """A BulkReadSocket on a real socket with a timeout (non-blocking underneath), as the
    SCP's accepted sockets are."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    bulk = BulkReadSocket.__new__(BulkReadSocket)
    assoc = _Association()
    bulk._assoc = assoc  # type: ignore[assignment]
    bulk.socket = ours
    yield bulk, assoc, theirs
    ours.close()
    theirs.close()


def test_reading_the_descriptor_waits_for_data_not_there_yet(real_pair: Any) -> None:
    """Nothing to read yet: the direct read finds the descriptor empty and the socket's own
    read waits (with its timeout) for the peer."""
    bulk, _, peer = real_pair
    timer = threading.Timer(0.2, peer.sendall, args=(_pdu(b"late"),))
    timer.start()
    assert bytes(bulk.recv(10)) == _pdu(b"late")
    timer.join()


def test_the_timeout_still_applies(real_pair: Any) -> None:
    bulk, _, _ = real_pair
    bulk.socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        bulk.recv(6)


def test_a_send_larger_than_the_socket_buffer_arrives_whole(real_pair: Any) -> None:
    """The direct write takes what fits; the rest waits for room through the socket."""
    bulk, assoc, peer = real_pair
    payload = bytes(range(256)) * (16 * 4096)  # 16 MiB, far over a socket buffer
    received = bytearray()

    def drain() -> None:
        while len(received) < len(payload):
            received.extend(peer.recv(1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    bulk.send(payload)
    reader.join(timeout=30)
    assert bytes(received) == payload
    assert assoc.sent == [payload]  # EVT_DATA_SENT, once, with every byte
    assert assoc.dul.event_queue.empty()


def test_a_send_to_a_closed_peer_is_a_transport_event(real_pair: Any) -> None:
    bulk, assoc, peer = real_pair
    peer.close()
    bulk.send(b"x" * (4 << 20))
    assert assoc.dul.event_queue.get_nowait() == "Evt17"
    assert assoc.sent == []


needs_quickack = pytest.mark.skipif(
    QUICKACK is None, reason="no TCP_QUICKACK on this platform (it is Linux's)"
)


@needs_quickack
def test_a_quick_ack_is_asked_for_before_every_read(pair: Any) -> None:
    """Senders with Nagle's algorithm on hold a C-STORE's data PDU until its command PDU is
    acknowledged: every read first asks the kernel to acknowledge at once."""
    bulk, recorder, peer = pair
    body = bytes(range(256)) * 1024
    sender = threading.Thread(target=peer.sendall, args=(body,))
    sender.start()
    assert bytes(bulk.recv(len(body))) == body
    sender.join()
    reads = recorder.log.count("read")
    assert reads >= 1
    for at, entry in enumerate(recorder.log):
        if entry == "read":
            assert recorder.log[at - 1] == (socket.IPPROTO_TCP, QUICKACK, 1), recorder.log


@needs_quickack
def test_quick_ack_on_tcp_and_other_sockets() -> None:
    from acwi_node.tcp import quick_ack

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    assert QUICKACK is not None
    with server, client, accepted:
        quick_ack(accepted)
        assert accepted.getsockopt(socket.IPPROTO_TCP, QUICKACK) == 1
    unix, other = socket.socketpair()
    with unix, other:
        quick_ack(unix)  # not TCP: nothing, no error
    quick_ack(None)
    quick_ack(accepted)  # closed: nothing, no error


@needs_quickack
def test_the_requestors_socket_asks_for_a_quick_ack_before_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exporter's associations read the PACS's answers the same way."""
    from pynetdicom.transport import AssociationSocket

    from acwi_node.ingest.reactor import QuickAckSocket

    log: list[object] = []

    def read(self: AssociationSocket, nr_bytes: int) -> bytearray:
        log.append("read")
        return bytearray()

    monkeypatch.setattr(AssociationSocket, "recv", read)
    sock = QuickAckSocket.__new__(QuickAckSocket)
    recorder = _Recorder(socket.socket())
    recorder.log = log
    sock.socket = recorder  # type: ignore[assignment]
    sock.recv(6)
    assert log == [(socket.IPPROTO_TCP, QUICKACK, 1), "read"]
    recorder.sock.close()
