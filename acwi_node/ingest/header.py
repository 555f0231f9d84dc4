"""The few header attributes the SCP needs from a received data set, read without pydicom.

For each C-STORE the SCP needs ten attributes, all in groups 0008 to 0020 near the start of
the data set (UIDs, study date, modality, body part, the manufacturer, which tells the node's own
results apart, and the patient's name and ID, which it only uses to keep them out of the logs).
pydicom's reader costs about half a millisecond per instance even when told which tags to
read; walking the elements with ``struct`` costs a tenth of that.

:func:`scan_header` handles little endian data sets, implicit or explicit VR (every
transfer syntax the SCP accepts but deflated and big endian), sequences of defined or undefined
length, nested to any depth (walked without recursion), and the character sets whose decoding
needs no escape sequences. For anything else it returns None and the SCP asks pydicom
(:func:`pydicom_header`), so the result is always pydicom's (``tests/unit/test_header.py``
compares the two on every kind of file the tests have).

A deflated data set (Deflated Explicit VR Little Endian) is inflated only as far as the header
attributes go (:func:`deflated_header`), never whole: a megabyte that inflates to gigabytes (a
"deflate bomb") costs no more memory than a small instance. The attributes must lie within the
first :data:`DEFLATED_HEADER_LIMIT` bytes of the inflated data set (they are in its first
kilobytes in practice); a data set whose attributes do not, or whose deflate stream is corrupt,
cannot be understood (:class:`HeaderError`). The data set is stored as received all the same,
its bytes not inflated beyond the header.

A multi-frame image without Body Part Examined, of a class that may have functional groups,
is walked on to its Shared Functional Groups Sequence (and its Per-frame one only where the
shared group has no Frame Anatomy) for the body parts its Frame Anatomy regions name
(:data:`FRAME_BODY_PART`, :func:`body_part`); no other image is read past group 0020.

:func:`dataset_header` chooses between the three for the SCP and STOW-RS.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping

from pydicom import dcmread
from pydicom.tag import Tag

from acwi_node.anatomy import (
    BODY_PART_MAX,
    FRAME_ANATOMY_ITEMS_MAX,
    image_body_parts,
    joined_body_parts,
    may_have_functional_groups,
    region_body_part,
)

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
#: The header's key for the body parts an image without Body Part Examined names in its Frame
#: Anatomy functional groups (:func:`~acwi_node.anatomy.image_body_parts`; "" for none).
FRAME_BODY_PART = "FrameBodyPart"
_SHARED_GROUPS, _PER_FRAME_GROUPS = 0x52009229, 0x52009230
_FRAME_ANATOMY, _ANATOMIC_REGION = 0x00209071, 0x00082218
_CODE_VALUE, _CODING_SCHEME = 0x00080100, 0x00080102
_SPECIFIC_CHARACTER_SET = 0x00080005
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
_NOT_LITTLE_ENDIAN_EXPLICIT = {
    DEFLATED,
    "1.2.840.10008.1.2.2",  # big endian
}
#: How much of a deflated data set is inflated, at most, to find the header attributes.
DEFLATED_HEADER_LIMIT = 4 << 20
#: The first amount inflated; each further step inflates as much again as there is (the
#: scan starts over each time: doubling keeps that within twice the inflated size).
_INFLATE_FIRST = 16 << 10
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

_HEADER_TAGS = [Tag(t >> 16, t & 0xFFFF) for t in (*WANTED, _SHARED_GROUPS, _PER_FRAME_GROUPS)]

_U16U16 = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_IMPLICIT_HEADER = struct.Struct("<HHI")
_EXPLICIT_HEADER = struct.Struct("<HH2sH")


class HeaderError(ValueError):
    """A data set whose header attributes cannot be read; the message names what is wrong with
    it, never a value from it."""


class _Unsupported(Exception):
    """The data set needs pydicom (undecodable character set, multiple values, odd layout)."""


#: Why a little endian data set cut short before its UIDs cannot be read.
TRUNCATED = (
    "the data set ends inside an element before its UIDs (cut short, or an element's length"
    " is wrong)"
)


class _Truncated(_Unsupported):
    """The data set ends inside an element before the wanted ones end."""


class _NeedMore(Exception):
    """The inflated part of a deflated data set ends before the header attributes do."""


_Bytes = bytes | bytearray | memoryview


def _tag_at(data: _Bytes, pos: int) -> int:
    group, element = _U16U16.unpack_from(data, pos)
    return int(group << 16 | element)


def _skip_undefined_sequence(data: _Bytes, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence starting at ``pos``; returns the offset
    after its sequence delimiter. Nested sequences are followed with a stack, not recursion:
    any depth costs no more than its bytes (raises ``struct.error`` past the end)."""
    in_item: list[bool] = [False]  # per open level: inside an item (else between items)
    while in_item:
        tag = _tag_at(data, pos)
        if not in_item[-1]:
            length = _U32.unpack_from(data, pos + 4)[0]
            pos += 8
            if tag == _SEQUENCE_END:
                in_item.pop()
            elif tag != _ITEM:
                raise _Unsupported("unexpected element in a sequence")
            elif length == _UNDEFINED:
                in_item[-1] = True
            else:
                pos += length
            continue
        if tag == _ITEM_END:  # the end of an item of undefined length
            pos += 8
            in_item[-1] = False
            continue
        _tag, _vr, _start, length, pos = _element_header(data, pos, implicit)
        if length == _UNDEFINED:
            in_item.append(False)  # a sequence inside the item
        else:
            pos += length
    return pos


def _element_header(data: _Bytes, pos: int, implicit: bool) -> tuple[int, bytes, int, int, int]:
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
    """The wanted attributes (stripped text, "" when absent) and :data:`FRAME_BODY_PART` of an
    encoded data set (no file meta; bytes, or a view into a larger buffer, which is not
    copied), or None when only pydicom can read them."""
    if transfer_syntax in _NOT_LITTLE_ENDIAN_EXPLICIT:
        return None
    try:
        return _read(dataset, transfer_syntax == _IMPLICIT_LE)
    except (_Unsupported, struct.error, UnicodeDecodeError):
        return None


def _read(dataset: _Bytes, implicit: bool) -> dict[str, str]:
    """:func:`_walk`, :func:`_decode` and, where the image may name its anatomy in its
    functional groups alone, :func:`_frame_body_parts` on a whole data set."""
    found, charset, end = _walk(dataset, implicit, complete=True)
    values = _decode(found, charset)
    values[FRAME_BODY_PART] = ""
    if _wants_frame_anatomy(values):
        # a data set cut short in its functional groups: their anatomy unread, no more
        with contextlib.suppress(_Truncated, struct.error):
            values[FRAME_BODY_PART] = _frame_body_parts(dataset, end, implicit, complete=True)
    return values


def _wants_frame_anatomy(values: dict[str, str]) -> bool:
    """Whether an image's header must be read on, to its functional groups: it has no Body
    Part Examined, and is of a class that may have functional groups (never a CT or MR slice,
    a radiograph, a secondary capture)."""
    return not values["BodyPartExamined"] and may_have_functional_groups(values["SOPClassUID"])


def _element_at(data: _Bytes, pos: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, value offset, length) of the element at ``pos``."""
    tag, _vr, start, length, _ = _element_header(data, pos, implicit)
    return tag, start, length


def _find(
    data: _Bytes, pos: int, length: int, implicit: bool, wanted: tuple[int, ...]
) -> tuple[dict[int, tuple[int, int]], int]:
    """The ``wanted`` elements (value offset, length) of the item whose elements start at
    ``pos`` (``length``: the item's, or undefined), and the offset after the item."""
    found: dict[int, tuple[int, int]] = {}
    size = len(data)
    if length != _UNDEFINED:
        end = pos + length
        if end > size:
            raise _Truncated
        last = max(wanted)
        while pos < end:
            tag, start, value_length = _element_at(data, pos, implicit)
            if tag > last:  # elements are in ascending order: the rest are not wanted
                break
            if tag in wanted:
                found[tag] = (start, value_length)
            if value_length == _UNDEFINED:
                pos = _skip_undefined_sequence(data, start, implicit)
                continue
            pos = start + value_length
        return found, end
    while True:
        tag = _tag_at(data, pos)
        if tag == _ITEM_END:
            return found, pos + 8
        tag, start, value_length = _element_at(data, pos, implicit)
        if value_length == _UNDEFINED:
            if tag in wanted:
                found[tag] = (start, value_length)
            pos = _skip_undefined_sequence(data, start, implicit)
            continue
        if start + value_length > size:
            raise _Truncated
        if tag in wanted:
            found[tag] = (start, value_length)
        pos = start + value_length


def _items(
    data: _Bytes, start: int, length: int, implicit: bool, wanted: tuple[int, ...]
) -> Iterator[dict[int, tuple[int, int]]]:
    """Each item's ``wanted`` elements (:func:`_find`) of the sequence whose value starts at
    ``start`` (``length``: the sequence's, or undefined)."""
    pos = start
    end = None if length == _UNDEFINED else start + length
    while end is None or pos < end:
        tag, item_length = _U16U16.unpack_from(data, pos), _U32.unpack_from(data, pos + 4)[0]
        tag = tag[0] << 16 | tag[1]
        pos += 8
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise _Unsupported("unexpected element in a sequence")
        found, pos = _find(data, pos, item_length, implicit, wanted)
        yield found


def _first_item(
    data: _Bytes, element: tuple[int, int], implicit: bool, wanted: tuple[int, ...]
) -> dict[int, tuple[int, int]] | None:
    """The first item's ``wanted`` elements of a sequence (value offset, length); None for a
    sequence without items."""
    return next(_items(data, element[0], element[1], implicit, wanted), None)


def _anatomy_term(data: _Bytes, anatomy: tuple[int, int], implicit: bool) -> str | None:
    """The body part term of a Frame Anatomy Sequence's region (its first item's first
    Anatomic Region item, :func:`~acwi_node.anatomy.region_body_part`); "" for none, None
    for a sequence without items."""
    item = _first_item(data, anatomy, implicit, (_ANATOMIC_REGION,))
    if item is None:
        return None
    if _ANATOMIC_REGION not in item:
        return ""
    code = _first_item(data, item[_ANATOMIC_REGION], implicit, (_CODE_VALUE, _CODING_SCHEME))
    if not code:
        return ""
    text = {}
    for tag in (_CODE_VALUE, _CODING_SCHEME):
        start, length = code.get(tag, (0, 0))
        if length == _UNDEFINED:
            return ""
        text[tag] = bytes(data[start : start + length]).decode("latin-1")
    return region_body_part(text[_CODING_SCHEME], text[_CODE_VALUE])


def _frame_body_parts(data: _Bytes, pos: int, implicit: bool, *, complete: bool) -> str:
    """The body parts (:func:`~acwi_node.anatomy.image_body_parts`) an image names in its
    Frame Anatomy functional groups, walking on from ``pos`` (where :func:`_walk` stopped):
    the elements up to the Shared Functional Groups Sequence are skipped, as are the other
    functional groups in it; the Per-frame one is read only where the shared one has no
    Frame Anatomy (at most :data:`~acwi_node.anatomy.FRAME_ANATOMY_ITEMS_MAX` items).

    Raises :class:`_Truncated` (or ``struct.error``) where ``data`` ends inside an element,
    :class:`_NeedMore` where it ends and is not ``complete``."""
    end = len(data)
    while pos + 8 <= end:
        tag, start, length = _element_at(data, pos, implicit)
        if tag > _PER_FRAME_GROUPS:  # past where the functional groups would be
            return ""
        if tag == _SHARED_GROUPS:
            group = _first_item(data, (start, length), implicit, (_FRAME_ANATOMY,))
            if group and _FRAME_ANATOMY in group:
                term = _anatomy_term(data, group[_FRAME_ANATOMY], implicit)
                if term is not None:  # the shared group has Frame Anatomy: the frames'
                    return term
        elif tag == _PER_FRAME_GROUPS:
            terms: dict[str, None] = {}  # in frame order, once each
            known: dict[bytes, str] = {}  # the frames' Frame Anatomy, as encoded: mostly alike
            groups = _items(data, start, length, implicit, (_FRAME_ANATOMY,))
            for group in itertools.islice(groups, FRAME_ANATOMY_ITEMS_MAX):
                anatomy = group.get(_FRAME_ANATOMY)
                if anatomy is None:
                    continue
                if anatomy[1] == _UNDEFINED:
                    terms[_anatomy_term(data, anatomy, implicit) or ""] = None
                    continue
                encoded = bytes(data[anatomy[0] : anatomy[0] + anatomy[1]])
                term = known.get(encoded)
                if term is None:
                    term = known[encoded] = _anatomy_term(data, anatomy, implicit) or ""
                terms[term] = None
            return joined_body_parts(list(terms))
        if length == _UNDEFINED:
            pos = _skip_undefined_sequence(data, start, implicit)
        else:
            pos = start + length
    if pos > end:
        raise _Truncated
    if not complete:
        raise _NeedMore
    return ""


def body_part(header: Mapping[str, str]) -> str:
    """The body parts routing matches a received image by (backslash-separated, within the
    ledger's 64 characters): its Body Part Examined, else those of its Frame Anatomy
    functional groups (:data:`FRAME_BODY_PART`)."""
    return header.get("BodyPartExamined", "")[:BODY_PART_MAX] or header.get(FRAME_BODY_PART, "")


def _walk(
    dataset: _Bytes, implicit: bool, *, complete: bool
) -> tuple[dict[str, bytes], bytes, int]:
    """The wanted elements' values, the Specific Character Set's value and the offset where
    the elements after the wanted ones start (or the data set ends).

    ``complete`` False: ``dataset`` is the start of a longer data set (what is inflated so far
    of a deflated one); raises :class:`_NeedMore` (or ``struct.error``) where it ends too soon.
    """
    found: dict[str, bytes] = {}
    charset = b""
    pos, end = 0, len(dataset)
    # The element headers are read inline (this runs for every instance received): the tag
    # and length of an implicit VR element, or the tag, VR and short length of an explicit one.
    implicit_header = _IMPLICIT_HEADER.unpack_from
    explicit_header = _EXPLICIT_HEADER.unpack_from
    u32 = _U32.unpack_from
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
            return found, charset, pos
        if length == _UNDEFINED:
            pos = _skip_undefined_sequence(dataset, start, implicit)
            continue
        value_end = start + length
        if value_end > end:
            if complete:
                raise _Truncated
            raise _NeedMore
        if tag == _SPECIFIC_CHARACTER_SET:
            charset = bytes(dataset[start:value_end])
        keyword = WANTED.get(tag)
        if keyword is not None:
            found[keyword] = bytes(dataset[start:value_end])  # of a bytes slice: no copy
        pos = value_end
    if not complete:
        raise _NeedMore
    return found, charset, pos


def _decode(found: dict[str, bytes], charset: bytes) -> dict[str, str]:
    name = charset.decode("ascii").strip(" \x00")
    if name not in _CHARSETS:
        raise _Unsupported("character set with code extensions")
    encoding = _CHARSETS[name]
    values: dict[str, str] = {}
    for keyword in WANTED.values():
        raw = found.get(keyword)
        text = raw.decode(encoding).strip(" \x00") if raw else ""
        if "\\" in text:
            raise _Unsupported("more than one value")
        values[keyword] = text
    return values


def deflated_header(
    deflated: bytes | memoryview, *, limit: int = DEFLATED_HEADER_LIMIT
) -> dict[str, str]:
    """The wanted attributes of a deflated data set (its encoded bytes after the file meta:
    raw deflate, PS3.5 A.5), inflated step by step only as far as they go, at most ``limit``
    bytes (never the whole data set: memory stays within about twice ``limit``); and
    :data:`FRAME_BODY_PART`, where the functional groups lie within ``limit`` ("" otherwise).

    Raises :class:`HeaderError` for a corrupt deflate stream, one that ends before the
    attributes do, and attributes not within ``limit`` inflated bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pending: bytes | memoryview = deflated
    step = _INFLATE_FIRST
    values: dict[str, str] | None = None  # the wanted attributes, once inflated that far
    while True:
        try:
            chunk = inflater.decompress(pending, step)
        except zlib.error:
            raise HeaderError("the deflated data set is not a valid deflate stream") from None
        inflated += chunk
        pending = inflater.unconsumed_tail
        ended = inflater.eof or (not pending and len(chunk) < step)
        try:
            # A stream cut short (no final block) holds no complete data set.
            found, charset, end = _walk(inflated, False, complete=inflater.eof)
            values = _decode(found, charset)
            values[FRAME_BODY_PART] = ""
            if not _wants_frame_anatomy(values):
                return values
            values[FRAME_BODY_PART] = _frame_body_parts(inflated, end, False, complete=inflater.eof)
            return values
        except (_NeedMore, _Truncated, struct.error):
            if values is not None and (ended or len(inflated) >= limit):
                return values  # the functional groups not within reach: their anatomy unread
            if ended:
                raise HeaderError("the deflated data set ends inside its header") from None
        except (_Unsupported, UnicodeDecodeError):
            # Code extensions, several values, an odd layout: pydicom reads what is inflated.
            return _pydicom_dataset_header(bytes(inflated))
        if len(inflated) >= limit:
            raise HeaderError(
                f"the header attributes of the deflated data set are not within its first"
                f" {limit >> 20 or 1} MiB inflated"
            )
        step = min(max(step, len(inflated)), limit - len(inflated))


def _pydicom_dataset_header(explicit_le: bytes) -> dict[str, str]:
    """pydicom's reading of the wanted attributes of an explicit VR little endian data set
    (the inflated start of a deflated one: it may end inside an element after them)."""
    from acwi_node.ingest.part10 import file_meta_prefix

    try:
        return pydicom_header(file_meta_prefix("1.2", "1.2", _EXPLICIT_LE) + explicit_le)
    except Exception as exc:
        raise HeaderError(describe(exc)) from exc


def describe(exc: BaseException) -> str:
    """One line on why a data set could not be read, for the log."""
    if isinstance(exc, HeaderError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "sequences nested too deeply to read"
    if isinstance(exc, zlib.error):
        return "not a valid deflate stream"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def dataset_header(
    dataset: bytes | memoryview, transfer_syntax: str, part10: Callable[[], bytes]
) -> dict[str, str]:
    """The wanted attributes of a received data set (encoded, without file meta) in
    ``transfer_syntax``: :func:`deflated_header` for a deflated one, :func:`scan_header`, else
    pydicom on the whole instance (``part10`` makes it, only then). Raises
    :class:`HeaderError` for a data set none of them can read (whatever pydicom raised)."""
    if transfer_syntax == DEFLATED:
        return deflated_header(dataset)
    truncated = False
    if transfer_syntax not in _NOT_LITTLE_ENDIAN_EXPLICIT:
        try:
            return _read(dataset, transfer_syntax == _IMPLICIT_LE)
        except _Truncated:
            truncated = True
        except (_Unsupported, struct.error, UnicodeDecodeError):
            pass
    try:
        header = pydicom_header(part10())
    except Exception as exc:
        raise HeaderError(describe(exc)) from exc
    if truncated and not (header["SOPInstanceUID"] and header["StudyInstanceUID"]):
        # What pydicom read of it ends where the bytes do: say why the UIDs are missing.
        raise HeaderError(TRUNCATED)
    return header


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
    values[FRAME_BODY_PART] = "" if values["BodyPartExamined"] else image_body_parts(ds)
    return values
