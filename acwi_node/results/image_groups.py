"""The per-image measurement groups of an SR, encoded from a template instead of built one by one.

A result SR holds, for every analysed image, one TID 1501 measurement group per label and an
uncertainty summary group (see :mod:`.sr`): about 80 content items and 600 data elements per
image, all alike but for a dozen values. Building them with highdicom's templates costs
10-20 ms per image (pydicom's per-element bookkeeping and highdicom's content-item checks), so
a 100-slice CT's groups took 1.5-2 s, most of building its SR, and encoding them another
half second.

Here highdicom builds the groups once, for a stand-in image whose every variable value is a
sentinel; :func:`~.encoding.encode_items` encodes them (explicit VR little endian, as the SR is
written); the sentinels are found in the bytes, and each image's groups are the template's
bytes with its own values' elements in place of the sentinels' and the lengths of the items and
sequences around them adjusted. The variable values are the tracking UIDs, the summary group's
tracking identifier ("Image N summary"), each measurement's numeric value (Numeric Value, DS,
and Floating Point Value, FD, as highdicom writes them) and the source image's SOP Class and
Instance UIDs. Everything else (codes, algorithm identification, methods, units, relationship
types) is the template's, built and checked by highdicom.

Whatever the template cannot describe is left to highdicom: an image with a value that is not
finite is built by highdicom (and fails there as it would have); a template in which a sentinel
is not found, or a label that is not ASCII, makes :func:`encode_image_groups`
return None and the caller builds every group with highdicom. The tests compare the bytes with
highdicom's for studies of many images, values and SOP classes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.valuerep import DS

from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty
from acwi_node.results.encoding import encode_element, encode_items
from acwi_node.results.uids import ResultUIDs

#: Builds one image's groups (highdicom content items) for (image number, image, source).
GroupBuilder = Callable[[int, ImageResult, Dataset], Sequence[Any]]

#: Tags of the values a template replaces.
_UID = 0x0040A124  # UID (tracking unique identifier), UI
_TEXT = 0x0040A160  # Text Value (tracking identifier), UT
_NUMERIC = 0x0040A30A  # Numeric Value, DS
_FLOAT = 0x0040A161  # Floating Point Value, FD
_CLASS = 0x00081150  # Referenced SOP Class UID, UI
_INSTANCE = 0x00081155  # Referenced SOP Instance UID, UI

_ITEM = 0xFFFEE000
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OW", b"OV", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF

#: The stand-in image's values: none of them can occur in a template otherwise.
_SENTINEL_INSTANCE = "1.2.826.0.1.3680043.10.1137.97531.1"
_SENTINEL_CLASS = "1.2.826.0.1.3680043.10.1137.97531.2"
_SENTINEL_NUMBER = 975319753
#: Sentinel measurement values: distinct, with six significant digits (DS and FD unique).
_SENTINEL_BASE = 0.713917
_SENTINEL_STEP = 0.010203
#: The uncertainty fields of an image's summary group, in the order of :mod:`.sr`'s
#: ``_UNCERTAINTY_FIELDS`` (the order does not matter here: values are found by sentinel).
_UNCERTAINTY = ("entropy", "epistemic", "aleatoric", "score")


@dataclass(frozen=True)
class _Slot:
    """A variable element of the template: the bytes it spans and what goes there."""

    start: int
    end: int
    tag: int
    vr: str
    role: tuple[str, str]


@dataclass(frozen=True)
class _Length:
    """A length field of an item or a sequence around slots: where, its size, its value."""

    at: int
    size: int
    value: int
    #: Indexes (in the template's slots) of the slots inside it.
    slots: tuple[int, ...]


class _Template:
    """One image's groups for one set of labels, as bytes with their variable parts marked."""

    def __init__(self, data: bytes, slots: list[_Slot], lengths: list[_Length]) -> None:
        self.data = data
        self.slots = slots
        self.lengths = lengths
        # The bytes between the changes, in order: (start, end, what follows: a slot index, a
        # length index, or None at the end).
        cuts: list[tuple[int, int, str, int]] = [
            (s.start, s.end, "slot", i) for i, s in enumerate(slots)
        ]
        cuts += [(n.at, n.at + n.size, "length", i) for i, n in enumerate(lengths)]
        cuts.sort()
        self._cuts = cuts

    def render(self, values: Mapping[tuple[str, str], Any], encodings: Any) -> bytes | None:
        """The groups with ``values`` (by role); None where an element cannot be encoded."""
        encoded: list[bytes] = []
        for slot in self.slots:
            element = encode_element(DataElement(slot.tag, slot.vr, values[slot.role]), encodings)
            if element is None:
                return None
            encoded.append(element)
        deltas = [len(e) - (s.end - s.start) for e, s in zip(encoded, self.slots, strict=True)]
        out: list[bytes] = []
        pos = 0
        data = self.data
        for start, end, kind, index in self._cuts:
            out.append(data[pos:start])
            if kind == "slot":
                out.append(encoded[index])
            else:
                field = self.lengths[index]
                value = field.value + sum(deltas[i] for i in field.slots)
                out.append(struct.pack("<L" if field.size == 4 else "<H", value))
            pos = end
        out.append(data[pos:])
        return b"".join(out)


def _sentinel_image(labels: Sequence[str], example: ImageResult) -> ImageResult:
    """The stand-in image: ``example`` with every variable value a sentinel."""
    values = iter(_SENTINEL_BASE + _SENTINEL_STEP * k for k in range(len(labels) + 8))
    return replace(
        example,
        sop_instance_uid=_SENTINEL_INSTANCE,
        sop_class_uid=_SENTINEL_CLASS,
        probabilities={label: round(next(values), 6) for label in labels},
        uncertainty=Uncertainty(**{name: round(next(values), 6) for name in _UNCERTAINTY}),
        ood_score=round(next(values), 6),
    )


def _roles(
    image: ImageResult, source: Dataset, number: int, uids: ResultUIDs
) -> dict[tuple[str, str], Any]:
    """Each role's value for ``image`` (read from ``source``, number ``number``)."""
    scope = image.sop_instance_uid
    roles: dict[tuple[str, str], Any] = {
        ("instance", ""): str(source.SOPInstanceUID),
        ("class", ""): str(source.SOPClassUID),
        ("summary_text", ""): f"Image {number} summary",
        ("summary_uid", ""): uids.summary_tracking_uid(scope),
        ("ds", "ood"): DS(float(image.ood_score), auto_format=True),
        ("fd", "ood"): float(image.ood_score),
    }
    for label, probability in image.probabilities.items():
        roles[("uid", label)] = uids.tracking_uid(label, scope)
        roles[("ds", "p:" + label)] = DS(float(probability), auto_format=True)
        roles[("fd", "p:" + label)] = float(probability)
    for name in _UNCERTAINTY:
        value = float(getattr(image.uncertainty, name))
        roles[("ds", "u:" + name)] = DS(value, auto_format=True)
        roles[("fd", "u:" + name)] = value
    return roles


def _finite(image: ImageResult) -> bool:
    values = [*image.probabilities.values(), image.ood_score]
    values += [getattr(image.uncertainty, name) for name in _UNCERTAINTY]
    return all(math.isfinite(float(v)) for v in values)


def _build_template(
    labels: Sequence[str],
    example: ImageResult,
    build: GroupBuilder,
    uids: ResultUIDs,
    encodings: Any,
) -> _Template | None:
    """The template for images with ``labels``, or None if a sentinel is not found (the source
    image's UIDs are in every group; every other value in one)."""
    image = _sentinel_image(labels, example)
    source = Dataset()
    source.SOPClassUID = _SENTINEL_CLASS
    source.SOPInstanceUID = _SENTINEL_INSTANCE
    groups = build(_SENTINEL_NUMBER, image, source)
    data = encode_items([group[0] for group in groups], encodings)
    wanted: dict[tuple[int, bytes], tuple[str, str]] = {}
    for role, value in _roles(image, source, _SENTINEL_NUMBER, uids).items():
        kind = role[0]
        tag, vr = {
            "instance": (_INSTANCE, "UI"),
            "class": (_CLASS, "UI"),
            "summary_text": (_TEXT, "UT"),
            "summary_uid": (_UID, "UI"),
            "uid": (_UID, "UI"),
            "ds": (_NUMERIC, "DS"),
            "fd": (_FLOAT, "FD"),
        }[kind]
        element = encode_element(DataElement(tag, vr, value), encodings)
        if element is None:
            return None
        wanted[(tag, element)] = role
    parsed = _parse(data)
    if parsed is None:
        return None
    elements, lengths = parsed
    slots: list[_Slot] = []
    inside: list[list[int]] = [[] for _ in lengths]
    for start, end, tag, vr, enclosing in elements:
        found = wanted.get((tag, data[start:end]))
        if found is None:
            continue
        for index in enclosing:
            inside[index].append(len(slots))
        slots.append(_Slot(start, end, tag, vr, found))
    if {slot.role for slot in slots} != set(wanted.values()):  # a sentinel not found
        return None
    return _Template(
        data,
        slots,
        [
            _Length(at, size, value, tuple(inside[i]))
            for i, (at, size, value) in enumerate(lengths)
            if inside[i]
        ],
    )


_Element = tuple[int, int, int, str, tuple[int, ...]]


def _parse(data: bytes) -> tuple[list[_Element], list[tuple[int, int, int]]] | None:
    """The elements of encoded items (explicit VR little endian): each element's (start, end,
    tag, VR, indexes of the length fields around it), and every length field (where, size,
    value). None for anything but defined lengths."""
    elements: list[_Element] = []
    lengths: list[tuple[int, int, int]] = []

    def items(pos: int, end: int, enclosing: tuple[int, ...]) -> bool:
        while pos < end:
            group, number, length = struct.unpack_from("<HHL", data, pos)
            if (group << 16 | number) != _ITEM or length == _UNDEFINED:
                return False
            lengths.append((pos + 4, 4, length))
            if not elements_of(pos + 8, pos + 8 + length, (*enclosing, len(lengths) - 1)):
                return False
            pos += 8 + length
        return pos == end

    def elements_of(pos: int, end: int, enclosing: tuple[int, ...]) -> bool:
        while pos < end:
            group, number = struct.unpack_from("<HH", data, pos)
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                at, size = pos + 8, 4
                (length,) = struct.unpack_from("<L", data, at)
            else:
                at, size = pos + 6, 2
                (length,) = struct.unpack_from("<H", data, at)
            if length == _UNDEFINED:
                return False
            value = at + size
            if vr == b"SQ":
                lengths.append((at, size, length))
                if not items(value, value + length, (*enclosing, len(lengths) - 1)):
                    return False
            else:
                elements.append(
                    (pos, value + length, group << 16 | number, vr.decode("ascii"), enclosing)
                )
            pos = value + length
        return pos == end

    return (elements, lengths) if items(0, len(data), ()) else None


def encode_image_groups(
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    build: GroupBuilder,
    sources: Mapping[str, Dataset],
    encodings: Any,
) -> bytes | None:
    """Every analysed image's groups, encoded as items of the Imaging Measurements container's
    Content Sequence, in the document's order; None: build them all with highdicom."""
    if not all(label.isascii() for label in analysis.labels):
        return None
    templates: dict[tuple[str, ...], _Template | None] = {}
    out: list[bytes] = []
    for number, image in enumerate(analysis.images, start=1):
        labels = tuple(label for label in analysis.labels if label in image.probabilities)
        source = sources[image.sop_instance_uid]
        rendered: bytes | None = None
        if _finite(image):
            if labels not in templates:
                templates[labels] = _build_template(labels, image, build, uids, encodings)
            template = templates[labels]
            if template is None:
                return None
            rendered = template.render(_roles(image, source, number, uids), encodings)
        if rendered is None:
            groups = build(number, image, source)
            rendered = encode_items([group[0] for group in groups], encodings)
        out.append(rendered)
    return b"".join(out)
