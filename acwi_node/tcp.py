"""TCP options the node sets on its connections: DICOM associations (accepted and requested)
and HL7 MLLP (the listener and the ORU client)."""

from __future__ import annotations

import contextlib
import socket
from typing import Protocol


class SocketOptions(Protocol):
    """A socket whose options can be set (``socket.socket``, asyncio's ``TransportSocket``)."""

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


#: ``TCP_QUICKACK`` where the platform has it (Linux), else None.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def quick_ack(sock: SocketOptions | None) -> None:
    """Acknowledge the next data that arrives at once rather than after the delayed-ACK timer
    (``TCP_QUICKACK``; Linux only: elsewhere nothing). The node sends each PDU at once
    (:func:`no_delay`), but many senders leave Nagle's algorithm on (DCMTK's tools and the
    SCPs built on them do unless ``TCP_NODELAY=1`` is in their environment): they hold a
    C-STORE's small data PDU back until the command PDU before it is acknowledged, and Linux
    delays that acknowledgement up to 40 ms, so such a sender's small instances came at about
    20 per second (storescp and Orthanc: 11). The kernel leaves quick-ack mode by itself, so
    this is asked again before every read (one system call, a microsecond)."""
    if TCP_QUICKACK is None or sock is None:
        return
    try:  # noqa: SIM105 (a read's hot path: no context manager made for it)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:  # not TCP (a Unix socket), or closed: nothing to acknowledge
        pass


def no_delay(sock: socket.socket | None) -> None:
    """Send each PDU at once (``TCP_NODELAY``). With Nagle's algorithm a PDU smaller than a
    segment waits until the peer acknowledges what was sent before, and the peer may delay
    that acknowledgement (up to 40 ms on Linux): the results of a 100-slice CT took 5.2-5.7 s
    to reach Orthanc, 3.8 s with this."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
