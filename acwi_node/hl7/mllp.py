"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol): ``0x0b`` message ``0x1c 0x0d``.

Both sides of the node use it: the asyncio listener (:func:`read_frame`) and the blocking client
(:func:`read_frame_sync`). A frame that does not start with the start byte, that ends before its
end bytes, or that grows past the size cap raises :class:`FramingError`; the caller then closes the
connection, since the stream can no longer be trusted to be in step.
"""

from __future__ import annotations

import asyncio
import socket

from acwi_node.tcp import quick_ack

START = b"\x0b"
END = b"\x1c\x0d"


class FramingError(Exception):
    """The peer broke MLLP framing; the connection must be closed."""


class NoStartByte(FramingError):
    """A frame did not begin with 0x0b."""


class Oversized(FramingError):
    """A frame grew past the configured size cap before its end bytes."""


class Truncated(FramingError):
    """The connection ended inside a frame."""


def frame(payload: bytes) -> bytes:
    """Wrap one HL7 message (segments separated by ``\\r``) for the wire."""
    if START in payload or END in payload:
        raise ValueError("an HL7 message may not contain the MLLP start or end bytes")
    return START + payload + END


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_bytes: int,
    idle_timeout_s: float,
    read_timeout_s: float,
) -> bytes | None:
    """Read one framed message; None when the peer closed cleanly between messages.

    ``idle_timeout_s`` bounds the wait for the start byte, ``read_timeout_s`` the time from the
    start byte to the end bytes. Raises :class:`FramingError` or :class:`TimeoutError`.
    The reader must have been created with a ``limit`` of at least ``max_bytes + 2`` (see
    :func:`stream_limit`), which also bounds the memory one connection can hold.
    """
    first = await asyncio.wait_for(reader.read(1), idle_timeout_s)
    if not first:
        return None
    if first != START:
        raise NoStartByte(f"expected 0x0b, got 0x{first[0]:02x}")
    try:
        data = await asyncio.wait_for(reader.readuntil(END), read_timeout_s)
    except asyncio.LimitOverrunError:
        raise Oversized(f"message larger than {max_bytes} bytes") from None
    except asyncio.IncompleteReadError:
        raise Truncated("connection closed before the end of the frame") from None
    payload = data[: -len(END)]
    if len(payload) > max_bytes:
        raise Oversized(f"message larger than {max_bytes} bytes")
    if START in payload:
        raise FramingError("start byte inside a frame")
    return payload


def stream_limit(max_bytes: int) -> int:
    """The asyncio stream buffer limit for frames of at most ``max_bytes``."""
    return max_bytes + len(END) + 1


def read_frame_sync(sock: socket.socket, *, max_bytes: int, timeout_s: float) -> bytes:
    """Blocking counterpart of :func:`read_frame` for one reply (the client reads one ACK)."""
    sock.settimeout(timeout_s)
    quick_ack(sock)  # a peer with Nagle's algorithm on sends its reply's parts at once
    first = sock.recv(1)
    if not first:
        raise Truncated("connection closed before a reply")
    if first != START:
        raise NoStartByte(f"expected 0x0b, got 0x{first[0]:02x}")
    buf = bytearray()
    while True:
        quick_ack(sock)
        chunk = sock.recv(65536)
        if not chunk:
            raise Truncated("connection closed before the end of the reply")
        buf += chunk
        end = buf.find(END)
        if end >= 0:
            if end > max_bytes:
                raise Oversized(f"reply larger than {max_bytes} bytes")
            return bytes(buf[:end])
        if len(buf) > max_bytes + len(END):
            raise Oversized(f"reply larger than {max_bytes} bytes")
