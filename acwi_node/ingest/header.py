"""The few header attributes the SCP needs from a received data set, read without pydicom.

For each C-STORE the SCP needs ten attributes, all in groups 0008 to 0020 near the start of
the data set (UIDs, study date, modality, body part, the manufacturer, which tells the node's own
results apart, and the patient's name and ID, which it only uses to keep them out of the logs).
pydicom's reader costs about half a millisecond per instance even when told which tags to
read; walking the elements with ``struct`` costs a tenth of that.

:func:`scan_header` handles little endian data sets, implicit or explicit VR (every
transfer syntax the SCP accepts but deflated and big endian), sequences of defined or undefined
length, and the character sets whose decoding needs no escape sequences. For anything else it
returns None and the SCP asks pydicom (:func:`pydicom_header`), so the result is always pydicom's
(``tests/unit/test_header.py`` compares the two on every kind of file the tests have).
"""

from __future__ import annotations

import io
import struct

from pydicom import dcmread
from pydicom.tag import Tag

#: Keyword -> (group << 16 | element) of the attributes read.
WANTED: dict[int, str] = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080060: "Modality",
    0x00080070: "Manufacturer",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00180015: "BodyPartExamined",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LAST = max(WANTED)
_SPECIFIC_CHARACTER_SET = 0x00080005
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_LITTLE_ENDIAN_EXPLICIT = {
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.2",  # big endian
}
#: Explicit VRs whose length is 4 bytes, after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Character sets whose values decode without code extensions, and how.
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

_HEADER_TAGS = [Tag(t >> 16, t & 0xFFFF) for t in WANTED]

_U16U16 = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_IMPLICIT_HEADER = struct.Struct("<HHI")
_EXPLICIT_HEADER = struct.Struct("<HH2sH")


class _Unsupported(Exception):
    """The data set needs pydicom (undecodable character set, multiple values, odd layout)."""


def _tag_at(data: bytes | memoryview, pos: int) -> int:
    group, element = _U16U16.unpack_from(data, pos)
    return int(group << 16 | element)


def _skip_undefined_sequence(data: bytes | memoryview, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence starting at ``pos``; returns the offset
    after its sequence delimiter."""
    while True:
        tag = _tag_at(data, pos)
        length = _U32.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported("unexpected element in a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        while _tag_at(data, pos) != _ITEM_END:  # an item of undefined length
            pos = _skip_element(data, pos, implicit)
        pos += 8


def _skip_element(data: bytes | memoryview, pos: int, implicit: bool) -> int:
    _tag, _vr, _start, length, pos = _element_header(data, pos, implicit)
    if length == _UNDEFINED:
        return _skip_undefined_sequence(data, pos, implicit)
    return pos + length


def _element_header(
    data: bytes | memoryview, pos: int, implicit: bool
) -> tuple[int, bytes, int, int, int]:
    """(tag, VR or b"", value offset, length, value offset)."""
    tag = _tag_at(data, pos)
    if implicit:
        length = _U32.unpack_from(data, pos + 4)[0]
        return tag, b"", pos + 8, length, pos + 8
    vr = bytes(data[pos + 4 : pos + 6])
    if vr in LONG_VRS:
        length = _U32.unpack_from(data, pos + 8)[0]
        return tag, vr, pos + 12, length, pos + 12
    length = _U16.unpack_from(data, pos + 6)[0]
    return tag, vr, pos + 8, length, pos + 8


def scan_header(dataset: bytes | memoryview, transfer_syntax: str) -> dict[str, str] | None:
    """The wanted attributes (stripped text, "" when absent) of an encoded data set (no file
    meta; bytes, or a view into a larger buffer, which is not copied), or None when only
    pydicom can read them."""
    if transfer_syntax in _NOT_LITTLE_ENDIAN_EXPLICIT:
        return None
    implicit = transfer_syntax == _IMPLICIT_LE
    found: dict[str, bytes] = {}
    encoding = "latin-1"
    pos, end = 0, len(dataset)
    # The element headers are read inline (this runs for every instance received): the tag
    # and length of an implicit VR element, or the tag, VR and short length of an explicit one.
    implicit_header = _IMPLICIT_HEADER.unpack_from
    explicit_header = _EXPLICIT_HEADER.unpack_from
    u32 = _U32.unpack_from
    try:
        while pos + 8 <= end:
            if implicit:
                group, element, length = implicit_header(dataset, pos)
                start = pos + 8
            else:
                group, element, vr, length = explicit_header(dataset, pos)
                if vr in LONG_VRS:
                    length = u32(dataset, pos + 8)[0]
                    start = pos + 12
                else:
                    start = pos + 8
            tag = group << 16 | element
            if tag > _LAST:
                break
            if length == _UNDEFINED:
                pos = _skip_undefined_sequence(dataset, start, implicit)
                continue
            pos = start + length
            if pos > end:
                raise _Unsupported("truncated")
            if tag == _SPECIFIC_CHARACTER_SET:
                charset = bytes(dataset[start:pos]).decode("ascii").strip(" \x00")
                if charset not in _CHARSETS:
                    raise _Unsupported("character set with code extensions")
                encoding = _CHARSETS[charset]
            keyword = WANTED.get(tag)
            if keyword is not None:
                found[keyword] = bytes(dataset[start:pos])  # of a bytes slice: no copy
        values: dict[str, str] = {}
        for keyword in WANTED.values():
            raw = found.get(keyword)
            text = raw.decode(encoding).strip(" \x00") if raw else ""
            if "\\" in text:
                raise _Unsupported("more than one value")
            values[keyword] = text
        return values
    except (_Unsupported, struct.error, UnicodeDecodeError, RecursionError):
        return None


def study_date(header: dict[str, str]) -> str:
    """The header's Study Date as ``YYYYMMDD``, or "" when it is absent or not a date (the
    ledger keeps it for routing: ``match.max_age_days``)."""
    value = header.get("StudyDate", "")
    return value if len(value) == 8 and value.isdigit() else ""


def pydicom_header(part10: bytes) -> dict[str, str]:
    ds = dcmread(io.BytesIO(part10), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    values: dict[str, str] = {}
    for keyword in WANTED.values():
        value = ds.get(keyword, "")
        values[keyword] = str(value).strip() if value is not None else ""
    return values
