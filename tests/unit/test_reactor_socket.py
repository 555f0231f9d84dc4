"""BulkReadSocket: a PDU's body read in few calls, with pynetdicom's contract kept."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from acwi_node.ingest.reactor import RECV_CHUNK, BulkReadSocket


class _Recorder:
    """A socket stand-in that returns what the peer sent in the pieces it sent it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0

    def recv_into(self, buffer: memoryview, n: int) -> int:
        self.calls += 1
        return self.sock.recv_into(buffer, n)


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
