"""Part 10 bytes of a result object built in memory."""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Iterator
from typing import Any

from pydicom import Dataset, dcmwrite
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr_element,
    write_data_element,
    write_file_meta_info,
)
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR


def _as_it_is(element: DataElement | RawDataElement, implicit: bool, little: bool) -> bool:
    """Whether ``element`` is a sequence still in the bytes it was read or encoded in, in the
    encoding being written: such bytes are written as they are, never parsed (pydicom's
    ``correct_ambiguous_vr`` would parse them; an SR's per-image groups are such bytes, see
    :mod:`.image_groups`)."""
    return (
        isinstance(element, RawDataElement)
        and element.VR == "SQ"
        and element.is_implicit_VR == implicit
        and element.is_little_endian == little
    )


def _datasets(ds: Dataset, implicit: bool, little: bool) -> Iterator[Dataset]:
    yield ds
    for tag in list(ds.keys()):
        if _as_it_is(ds.get_item(tag), implicit, little):
            continue
        element = ds[tag]  # converted, as iterating the dataset converts every element
        if element.VR == "SQ":
            for item in element.value:
                yield from _datasets(item, implicit, little)


def _correct_ambiguous_vr(
    ds: Dataset, implicit: bool, little: bool, ancestors: list[Dataset]
) -> None:
    """pydicom's ``correct_ambiguous_vr``, leaving sequences written as they are unparsed."""
    for element in ds.elements():
        if element.VR == "SQ":
            if _as_it_is(element, implicit, little):
                continue
            for item in ds[element.tag].value:
                ancestors.insert(0, item)
                _correct_ambiguous_vr(item, implicit, little, ancestors)
        elif element.VR in AMBIGUOUS_VR:
            correct_ambiguous_vr_element(element, ds, little, ancestors)
    del ancestors[0]


def encode_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (its file meta's transfer syntax), as ``dcmwrite`` writes it.

    ``dcmwrite`` corrects ambiguous VRs in every dataset whose original encoding differs from
    the one written, which is every dataset of an object built in memory, and the correction
    recurses into every sequence: a nested item is corrected once for each level above it. An
    SR with a deep content tree (a 100-slice CT's has about 9,400 content items) spent most of
    its 2-3 s of encoding there. Here the whole tree is corrected once, and each dataset is then
    marked as being in the encoding it is written in, so ``dcmwrite`` writes it as it is.

    In explicit VR little endian (every object the node writes), the items of each top-level
    sequence are encoded by :func:`encode_items` and handed to ``dcmwrite`` as the sequence's
    raw value: pydicom's writer spends about 25 us on each element, and an SR's content tree
    has 90,000 of them. So are the top-level elements of an object in explicit VR little
    endian (:func:`_explicit_little_part10`: a heatmap's 50 or so, most of ``dcmwrite``'s time
    for one), after the file meta information ``dcmwrite`` would write. Marking and encoding
    change nothing in ``ds``; the bytes are ``dcmwrite``'s (the tests compare).
    """
    syntax = ds.file_meta.TransferSyntaxUID
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    _correct_ambiguous_vr(ds, implicit, little, [ds])
    for item in _datasets(ds, implicit, little):
        item.set_original_encoding(implicit, little, item._character_set)
    if syntax == ExplicitVRLittleEndian and not any(tag >> 16 in (0, 2) for tag in ds._dict):
        return _explicit_little_part10(ds)
    replaced: dict[BaseTag, Any] = {}
    if not implicit and little:
        encodings = ds.get("SpecificCharacterSet")
        for tag in list(ds.keys()):
            element = ds.get_item(tag)
            if isinstance(element, DataElement) and element.VR == "SQ" and element.value:
                raw = RawDataElement(
                    tag,
                    "SQ",
                    0xFFFFFFFF if element.is_undefined_length else 0,  # 0: "not undefined"
                    encode_items(element.value, encodings),
                    0,
                    False,
                    True,
                    True,
                    False,
                )
                replaced[tag] = element
                ds._dict[tag] = raw
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
    finally:
        ds._dict.update(replaced)
    return buffer.getvalue()


def _explicit_little_part10(ds: Dataset) -> bytes:
    """``ds`` (explicit VR little endian, marked as such by :func:`encode_part10`) as
    ``dcmwrite(..., enforce_file_format=True)`` writes it: the preamble, the file meta
    information as it completes and writes it (from a copy: ``ds.file_meta`` is left as it
    is), then every element in tag order, encoded here where :func:`encode_element` can
    (the rest, Pixel Data among them, by pydicom's element writer)."""
    # a copy of each element, not of the whole (a deep copy took a third of the time)
    file_meta = FileMetaDataset()
    for element in ds.file_meta.elements():
        file_meta[element.tag] = copy.copy(element)
    meta_class = file_meta.get("MediaStorageSOPClassUID", None)
    ds_class = ds.get("SOPClassUID", None)
    if meta_class is None or (ds_class and ds_class != meta_class):
        file_meta.MediaStorageSOPClassUID = ds_class
    meta_instance = file_meta.get("MediaStorageSOPInstanceUID", None)
    ds_instance = ds.get("SOPInstanceUID", None)
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        file_meta.MediaStorageSOPInstanceUID = ds_instance
    validate_file_meta(file_meta, enforce_standard=True)
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        raise ValueError(f"'{type(ds).__name__}.preamble' must be 128-bytes long")
    if "PixelData" in ds:  # as dcmwrite marks it for a transfer syntax not compressed
        ds["PixelData"].is_undefined_length = False
    meta = DicomBytesIO()
    meta.is_implicit_VR, meta.is_little_endian = False, True
    write_file_meta_info(meta, file_meta, enforce_standard=True)
    body = _encode_dataset(ds, default_encoding)
    return b"".join((preamble or b"\x00" * 128, b"DICM", meta.getvalue(), body))


# ------------------------------------------------------------------ the fast encoder
#: VRs with a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OW", "OV", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
#: pydicom's write_string: the value as it is, padded with a space (UI: a NUL).
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR", "UI"})
#: pydicom's write_text: encoded in the dataset's character set; ASCII is the same in all.
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_NUMBERS = {"US": "<H", "UL": "<L", "SS": "<h", "SL": "<l", "FD": "<d", "FL": "<f"}
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_UNDEFINED = 0xFFFFFFFF


def encode_items(items: DicomSequence | list[Dataset], encodings: Any) -> bytes:
    """The items of a sequence (explicit VR little endian, without the sequence's own header),
    byte for byte as pydicom's ``write_sequence`` writes them for a dataset in the character
    set ``encodings`` (the ``SpecificCharacterSet`` of the dataset holding the sequence)."""
    out: list[bytes] = []
    for item in items:
        body = _encode_dataset(item, encodings)
        if getattr(item, "is_undefined_length_sequence_item", False):
            out += (_ITEM, struct.pack("<L", _UNDEFINED), body, _ITEM_END)
        else:
            out += (_ITEM, struct.pack("<L", len(body)), body)
    return b"".join(out)


def _encode_dataset(ds: Dataset, parent_encodings: Any) -> bytes:
    encodings = ds.get("SpecificCharacterSet", parent_encodings)
    out: list[bytes] = []
    for tag in sorted(ds.keys(), key=int):  # as pydicom's order, without Tag.__lt__ per pair
        if tag.element == 0 and tag.group > 6:  # retired group lengths: never written
            continue
        element = ds.get_item(tag)
        encoded = encode_element(element, encodings) if type(element) is DataElement else None
        if encoded is None:  # anything unusual: pydicom's own writer
            fallback = DicomBytesIO()
            fallback.is_little_endian, fallback.is_implicit_VR = True, False
            write_data_element(fallback, element, encodings)
            encoded = fallback.getvalue()
        out.append(encoded)
    return b"".join(out)


def encode_element(element: DataElement, encodings: Any) -> bytes | None:
    """One element as pydicom writes it, or None for a case left to pydicom."""
    vr = element.VR
    value = element.value
    if vr == "SQ":
        if not isinstance(value, DicomSequence | list):
            return None
        body = encode_items(value, encodings)
        if element.is_undefined_length:
            return _header(element.tag, vr, _UNDEFINED) + body + _SEQUENCE_END
        return _header(element.tag, vr, len(body)) + body
    if vr in _NUMBERS:
        # one number, or several (a SCOORD's Graphic Data): each packed in turn, as pydicom's
        # write_numbers does
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        if not values or any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
            return None
        try:
            raw = struct.pack("<" + _NUMBERS[vr][1] * len(values), *values)
        except struct.error:
            return None  # out of range: pydicom's writer says so
    else:
        if vr in ("DS", "IS") and isinstance(value, int | float) and not isinstance(value, bool):
            # pydicom's write_number_string: the string the value was made from, if any.
            text = value.original_string if hasattr(value, "original_string") else str(value)
        elif vr in _STRING_VRS or vr in _TEXT_VRS or vr in ("DS", "IS"):
            text = value
        else:
            return None
        if not isinstance(text, str) or not text or not text.isascii():
            return None
        raw = text.encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
    if vr not in _LONG_VRS and len(raw) > 0xFFFF:
        return None  # pydicom writes it as UN, with a warning
    return _header(element.tag, vr, len(raw)) + raw


def _header(tag: int, vr: str, length: int) -> bytes:
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, number, vr.encode("ascii"), 0, length)
    return struct.pack("<HH2sH", group, number, vr.encode("ascii"), length)
