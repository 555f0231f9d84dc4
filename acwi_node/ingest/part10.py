"""The Part 10 header of a received instance, encoded directly (PS3.10 7.1).

The SCP stores each instance as preamble, ``DICM``, File Meta Information and the data set
exactly as received. pynetdicom builds the File Meta Information as a pydicom dataset and
encodes it with pydicom's writer, which costs more than everything else the SCP does for a
small instance; the group is seven fixed elements, so it is encoded here with ``struct``. The
bytes are identical to pynetdicom's (``tests/unit/test_part10.py`` compares them).
"""

from __future__ import annotations

import functools
import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_PREAMBLE = b"\x00" * 128 + b"DICM"
_VERSION = b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"


def _element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


_IMPLEMENTATION = _element(
    0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\x00"
) + _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")


@functools.lru_cache(maxsize=64)
def _class_and_syntax(sop_class_uid: str, transfer_syntax: str) -> tuple[bytes, bytes]:
    """The elements before and after the SOP Instance UID's, which an association's
    instances share (a few SOP classes, one transfer syntax each)."""
    before = _VERSION + _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00")
    after = _element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00") + _IMPLEMENTATION
    return before, after


def file_meta_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information for one instance.

    Raises ``ValueError`` for a value that is not ASCII or too long for its element (the caller
    then falls back to pynetdicom's encoder, which handles such values its own way).
    """
    before, after = _class_and_syntax(sop_class_uid, transfer_syntax)
    body = before + _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00") + after
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body
