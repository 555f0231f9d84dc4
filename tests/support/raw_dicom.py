"""DICOM upper layer PDUs and DIMSE command sets made by hand, for peers that break the rules
(a command set that is no command, a request missing a required element, an AE title that is
not one), and the PDUs the node answers with, read from the socket."""

from __future__ import annotations

import socket
import struct

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: PDU types (PS3.8 9.3.1).
A_ASSOCIATE_AC = 0x02
P_DATA_TF = 0x04
A_RELEASE_RP = 0x06
A_ABORT = 0x07


def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def associate_rq(
    *,
    calling: bytes = b"RAWPEER",
    called: bytes = b"ACWI",
    abstract_syntax: str = SECONDARY_CAPTURE,
    transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context (ID 1); the AE titles as the
    16 bytes given (padded with spaces)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16]
    body += b"\0" * 32 + _item(0x10, APPLICATION_CONTEXT.encode())
    proposed = _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode())
    body += _item(0x20, bytes([1, 0, 0, 0]) + proposed)
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (presentation context ID, message control header, data) items."""
    body = b"".join(
        struct.pack(">IBB", len(data) + 2, context_id, control) + data
        for context_id, control, data in pdvs
    )
    return struct.pack(">BBI", P_DATA_TF, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0"


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def store_command(
    *,
    message_id: int | None = 1,
    sop_class: str | None = SECONDARY_CAPTURE,
    sop_instance: str | None = None,
) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian) with a data set to follow; an
    element given as None is left out."""
    elements = b""
    if sop_class is not None:
        elements += _element(0x0002, _uid(sop_class))
    elements += _element(0x0100, struct.pack("<H", 0x0001))
    if message_id is not None:
        elements += _element(0x0110, struct.pack("<H", message_id))
    elements += _element(0x0700, struct.pack("<H", 0))
    elements += _element(0x0800, struct.pack("<H", 0x0000))
    if sop_instance is not None:
        elements += _element(0x1000, _uid(sop_instance))
    return _element(0x0000, struct.pack("<I", len(elements))) + elements


def read_pdu(sock: socket.socket) -> tuple[int | None, bytes]:
    """The next PDU's type and body; (None, b"") when the connection closed first."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return None, b""
        header += chunk
    kind, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return kind, body


def command_elements(p_data_body: bytes) -> dict[int, bytes]:
    """The command set elements (group 0000, by element number) of the first PDV of a
    P-DATA-TF PDU's body."""
    length = struct.unpack_from(">I", p_data_body, 0)[0]
    data = p_data_body[6 : 4 + length]
    out: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        _, element, size = struct.unpack_from("<HHI", data, offset)
        out[element] = data[offset + 8 : offset + 8 + size]
        offset += 8 + size
    return out


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
