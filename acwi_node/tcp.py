"""TCP options the node sets on its connections: DICOM associations (accepted and requested)
and HL7 MLLP (the listener and the ORU client)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Any, Protocol


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


#: Connections the kernel queues before a listener accepts them.
BACKLOG = 128


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (an IPv6 one with or without a ``%zone``); None for a host
    name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def host_port(host: str, port: int) -> str:
    """``host:port`` as URLs and logs write it: an IPv6 address in brackets (``[::1]:104``)."""
    literal = ip_literal(host)
    return f"[{host}]:{port}" if literal is not None and literal.version == 6 else f"{host}:{port}"


def listening_socket(host: str, port: int, *, backlog: int = BACKLOG) -> socket.socket:
    """A TCP socket listening on ``host`` and ``port``, as every listener of the node binds:

    * an IPv4 address (``0.0.0.0``, ``127.0.0.1``) or ``""`` (every IPv4 address): IPv4;
    * ``::`` (every address): IPv6 and IPv4 alike (dual stack) where the system allows it,
      as the DICOM listener of one process always took them; an IPv6 address (``::1``): IPv6;
    * a host name: the first address it resolves to.

    Raises :class:`OSError` (``socket.gaierror`` for a name that does not resolve)."""
    family = socket.AF_INET
    address: Any = (host, port)
    dual_stack = False
    literal = ip_literal(host)
    if literal is not None and literal.version == 6:
        family = socket.AF_INET6
        dual_stack = literal.is_unspecified and socket.has_dualstack_ipv6()
    elif literal is None and host:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, address = found[0][0], found[0][4]
    return socket.create_server(address, family=family, backlog=backlog, dualstack_ipv6=dual_stack)
