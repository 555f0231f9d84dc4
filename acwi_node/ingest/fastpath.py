"""The C-STORE fast path: P-DATA-TF PDUs split into C-STORE requests and everything else.

pynetdicom turns every P-DATA-TF PDU into PDU objects, a primitive, a state-machine event and a
DIMSE message; decodes the command set with pydicom; hands the message to the association's
thread; builds the response primitive, encodes it with pydicom and hands it back to the DUL
thread to send. For a small instance that machinery costs more CPU than storing it.

The DUL (:mod:`.reactor`) passes each P-DATA-TF PDU's body to a :class:`PDataRouter`. The
router follows the messages in it, PDV by PDV:

* a C-STORE request whose command set arrives complete (the usual case: a command is a few
  hundred bytes), on an accepted presentation context, for a storage SOP class, is taken:
  its data set fragments are collected and the whole request is returned as a
  :class:`StoreRequest`, which the DUL serves on its own thread through the same
  ``EVT_C_STORE`` handler and answers with a response encoded here
  (:func:`store_response_pdu`, byte for byte what pynetdicom would send);
* every other message (C-ECHO, MPPS N-CREATE / N-SET, a command split over PDUs, anything
  odd) is returned as :class:`PassThrough` PDV items, which the DUL re-wraps in a P-DATA-TF PDU
  for pynetdicom's own path, unchanged.

A PDV out of place inside a taken C-STORE request (a command fragment, another presentation
context) is a protocol error (:class:`ProtocolError`); the DUL aborts the association, as the
DICOM upper layer does for an unexpected PDU.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
#: Command Data Set Type: no data set follows.
NO_DATA_SET = 0x0101

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<HHIH")
_PDV_HEADER = struct.Struct(">IBB")
_PDU_HEADER = struct.Struct(">BBI")


class ProtocolError(Exception):
    """The peer broke the P-DATA rules (PS3.8 9.3.5) inside a message the fast path took."""


@dataclass(slots=True)
class StoreRequest:
    """A C-STORE request taken by the fast path: its command, and then its data set."""

    context_id: int
    sop_class_uid: str
    sop_instance_uid: str
    message_id: int
    #: What the DUL attached when it accepted the command (pynetdicom's primitive and context).
    payload: Any = None
    data_set: bytes = b""


@dataclass(slots=True)
class PassThrough:
    """PDV items (each with its 4-byte length) for pynetdicom's own path, in order."""

    items: list[bytes] = field(default_factory=list)

    def pdu(self) -> bytes:
        """The items as one P-DATA-TF PDU."""
        body = b"".join(self.items)
        return _PDU_HEADER.pack(0x04, 0, len(body)) + body


#: Decides whether the fast path takes a request: the presentation context ID and the command
#: set's elements (by element number, group 0000) in, a StoreRequest or None (pass it on) out.
Acceptor = Callable[[int, dict[int, bytes]], "StoreRequest | None"]


def parse_command(data: bytes | bytearray | memoryview) -> dict[int, bytes] | None:
    """The elements of an implicit VR little endian command set, by element number.

    None for anything that is not a well-formed group 0000 command set; pynetdicom then gets it.
    """
    out: dict[int, bytes] = {}
    view = memoryview(data)
    end = len(view)
    offset = 0
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(view, offset)
        offset += 8
        if group != 0 or offset + length > end:
            return None
        out[element] = bytes(view[offset : offset + length])
        offset += length
    return out


def us_value(elements: dict[int, bytes], element: int) -> int | None:
    """An unsigned short element's value; None when absent or not two bytes long."""
    value = elements.get(element)
    if value is None or len(value) != 2:
        return None
    return int.from_bytes(value, "little")


def ui_value(elements: dict[int, bytes], element: int) -> str | None:
    """A UI (or AE) element's value without its padding; None when absent or not ASCII."""
    value = elements.get(element)
    if value is None:
        return None
    try:
        return value.rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError:
        return None


def has_data_set(elements: dict[int, bytes] | None) -> bool:
    """Whether a data set follows this command (assumed so when the command cannot be read)."""
    return elements is None or us_value(elements, 0x0800) != NO_DATA_SET


def _ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return _ELEMENT.pack(0, element, len(raw)) + raw


def store_response_command(request: StoreRequest, status: int) -> bytes:
    """The C-STORE-RSP command set (implicit VR little endian), elements in pynetdicom's order."""
    body = b"".join(
        (
            _ui(0x0002, request.sop_class_uid),
            _US.pack(0, 0x0100, 2, C_STORE_RSP),
            _US.pack(0, 0x0120, 2, request.message_id),
            _US.pack(0, 0x0800, 2, NO_DATA_SET),
            _US.pack(0, 0x0900, 2, status),
            _ui(0x1000, request.sop_instance_uid),
        )
    )
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def store_response_pdu(request: StoreRequest, status: int) -> bytes:
    """A P-DATA-TF PDU carrying the C-STORE-RSP in one PDV (command, last fragment)."""
    command = store_response_command(request, status)
    pdv = _PDV_HEADER.pack(len(command) + 2, request.context_id, 0x03) + command
    return _PDU_HEADER.pack(0x04, 0, len(pdv)) + pdv


_IDLE, _PASS, _TAKEN = 0, 1, 2


class PDataRouter:
    """Follows the DIMSE messages across P-DATA-TF PDUs; see the module's docstring."""

    def __init__(self, accept: Acceptor) -> None:
        self._accept = accept
        self._mode = _IDLE
        self._command = bytearray()  # command fragments of a passed-through message
        self._taken: StoreRequest | None = None
        self._chunks: list[memoryview] = []

    @property
    def between_messages(self) -> bool:
        """True when no message is part-way through."""
        return self._mode == _IDLE

    def feed(self, body: bytes | bytearray | memoryview) -> list[StoreRequest | PassThrough]:
        """Route one P-DATA-TF PDU (``body``: everything after its 6-byte header).

        Returns what to do, in order: complete C-STORE requests to serve, and PDV items for
        pynetdicom. Raises :class:`ProtocolError` for a PDV out of place in a taken request,
        or PDV items that do not fit the PDU.
        """
        view = memoryview(body)
        end = len(view)
        out: list[StoreRequest | PassThrough] = []
        passed: list[bytes] = []
        offset = 0
        while offset < end:
            if offset + 6 > end:
                raise ProtocolError("a PDV item's header is cut short")
            length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError("a PDV item's length does not fit its PDU")
            item = view[offset : offset + 4 + length]
            fragment = view[offset + 6 : offset + 4 + length]
            offset += 4 + length
            is_command = bool(control & 0x01)
            last = bool(control & 0x02)

            if self._mode == _TAKEN:
                taken = self._taken
                assert taken is not None
                if is_command or context_id != taken.context_id:
                    self._reset()
                    raise ProtocolError(
                        "a command fragment or another presentation context inside a "
                        "C-STORE request's data set"
                    )
                self._chunks.append(fragment)  # a view of the PDU: joined once, at the end
                if last:
                    taken.data_set = b"".join(self._chunks)
                    out.append(taken)
                    self._reset()
                continue

            if self._mode == _IDLE and is_command and last:
                elements = parse_command(fragment)
                request = self._accept(context_id, elements) if elements is not None else None
                if request is not None and has_data_set(elements):
                    if passed:
                        out.append(PassThrough(passed))
                        passed = []
                    self._taken, self._chunks, self._mode = request, [], _TAKEN
                    continue
                passed.append(bytes(item))
                self._mode = _PASS if has_data_set(elements) else _IDLE
                continue

            # pynetdicom's message: follow it to its end.
            passed.append(bytes(item))
            if is_command:
                if self._mode == _IDLE:
                    self._command = bytearray()
                    self._mode = _PASS
                self._command += fragment
                if last:
                    elements = parse_command(self._command)
                    self._command = bytearray()
                    if not has_data_set(elements):
                        self._mode = _IDLE
            elif last or self._mode == _IDLE:
                # The end of its data set, or a data set fragment with no command before it
                # (pynetdicom reports that one).
                self._mode = _IDLE
        if passed:
            out.append(PassThrough(passed))
        return out

    def _reset(self) -> None:
        self._mode = _IDLE
        self._taken = None
        self._chunks = []
