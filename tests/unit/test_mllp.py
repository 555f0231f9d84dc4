"""MLLP framing: frames, and what broken framing raises."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import cast

import pytest

from acwi_node.hl7.mllp import (
    END,
    START,
    FramingError,
    NoStartByte,
    Oversized,
    Truncated,
    frame,
    read_frame,
    read_frame_sync,
    stream_limit,
)
from acwi_node.tcp import TCP_QUICKACK as QUICKACK


def _read(data: bytes, *, max_bytes: int = 100, eof: bool = True) -> bytes | None:
    async def go() -> bytes | None:
        reader = asyncio.StreamReader(limit=stream_limit(max_bytes))
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await read_frame(reader, max_bytes=max_bytes, idle_timeout_s=1, read_timeout_s=0.2)

    return asyncio.run(go())


def test_frame_wraps_payload() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\x0d"


def test_frame_refuses_control_bytes_inside() -> None:
    with pytest.raises(ValueError):
        frame(b"MSH\x1c\x0d")


def test_reads_one_frame_and_then_the_next() -> None:
    async def go() -> list[bytes | None]:
        reader = asyncio.StreamReader(limit=stream_limit(100))
        reader.feed_data(frame(b"one") + frame(b"two"))
        reader.feed_eof()
        return [
            await read_frame(reader, max_bytes=100, idle_timeout_s=1.0, read_timeout_s=1.0)
            for _ in range(3)
        ]

    assert asyncio.run(go()) == [b"one", b"two", None]


def test_clean_close_between_messages_is_none() -> None:
    assert _read(b"") is None


def test_missing_start_byte() -> None:
    with pytest.raises(NoStartByte):
        _read(b"MSH|no start" + END)


def test_missing_end_bytes_at_close() -> None:
    with pytest.raises(Truncated):
        _read(START + b"MSH|never ends")


def test_missing_end_bytes_times_out_while_open() -> None:
    with pytest.raises((TimeoutError, asyncio.TimeoutError)):
        _read(START + b"MSH|never ends", eof=False)


def test_oversized_without_end() -> None:
    with pytest.raises(Oversized):
        _read(START + b"x" * 500, max_bytes=100, eof=False)


def test_oversized_with_end() -> None:
    with pytest.raises(Oversized):
        _read(frame(b"x" * 101), max_bytes=100)


def test_exact_cap_is_accepted() -> None:
    assert _read(frame(b"x" * 100), max_bytes=100) == b"x" * 100


def test_start_byte_inside_a_frame() -> None:
    with pytest.raises(FramingError):
        _read(START + b"a" + START + b"b" + END)


def test_sync_reader() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame(b"MSA|AA|1"))
        assert read_frame_sync(b, max_bytes=100, timeout_s=1) == b"MSA|AA|1"
        a.sendall(b"junk")
        with pytest.raises(NoStartByte):
            read_frame_sync(b, max_bytes=100, timeout_s=1)
        a.close()
        with pytest.raises(FramingError):
            read_frame_sync(b, max_bytes=100, timeout_s=1)


class _Recorder:
    """A socket stand-in for read_frame_sync that logs reads and the options set, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.log: list[object] = []

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.log.append((level, option, value))
        self.sock.setsockopt(level, option, value)

    def recv(self, n: int) -> bytes:
        self.log.append("read")
        return self.sock.recv(n)


@pytest.mark.skipif(QUICKACK is None, reason="no TCP_QUICKACK on this platform (it is Linux's)")
def test_the_client_asks_for_a_quick_ack_before_every_read() -> None:
    """A RIS with Nagle's algorithm on that writes its reply in parts holds each part until
    the one before is acknowledged: every read of the reply asks to acknowledge at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
        with peer, ours:
            recorder = _Recorder(ours)

            def send_in_parts() -> None:
                for part in (START, b"MSA|AA|1", END):
                    peer.sendall(part)
                    time.sleep(0.05)

            sender = threading.Thread(target=send_in_parts)
            sender.start()
            reply = read_frame_sync(cast(socket.socket, recorder), max_bytes=100, timeout_s=5)
            sender.join()
    assert reply == b"MSA|AA|1"
    reads = [at for at, entry in enumerate(recorder.log) if entry == "read"]
    assert len(reads) >= 2
    for at in reads:
        assert recorder.log[at - 1] == (socket.IPPROTO_TCP, QUICKACK, 1), recorder.log
