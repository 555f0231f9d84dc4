"""Per-image SR content encoded from a template: highdicom builds it once, for a stand-in whose
variable values are sentinels, and every image's is the template's bytes with its own values.

An SR holds, for every analysed image, content items that differ between images in a few
values only: its measurement groups (:mod:`.image_groups`) and its Image Library entry
(:mod:`.image_library`). highdicom builds each image's items one pydicom data set at a time
(10-20 ms an image). Here the stand-in's items are encoded (:func:`~.encoding.encode_items`,
explicit VR little endian, as the SR is written), the sentinels' elements are found in the
bytes (:func:`template`), and :meth:`Template.render` writes an image's items as the
template's bytes with that image's elements in place of the sentinels' and the lengths of the
items and sequences around them adjusted. What a template does not replace (units, methods,
relationship types, every code but those read from the image itself) is highdicom's, built and
checked by it.

A *role* names a variable value: a kind (the element it is written in, :data:`KINDS`) and a
name. The callers give the stand-in's value of every role; a role whose value is not found in
the bytes makes :func:`template` return None, and the caller leaves that content to highdicom.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import Tag

from acwi_node.results.encoding import encode_element, encode_items

#: A variable value: (kind, name); the kind says where it is written (:data:`KINDS`).
Role = tuple[str, str]

#: Each kind of role: the tag and VR of the element holding its value.
KINDS: dict[str, tuple[int, str]] = {
    "instance": (0x00081155, "UI"),  # Referenced SOP Instance UID
    "class": (0x00081150, "UI"),  # Referenced SOP Class UID
    "frame": (0x00081160, "IS"),  # Referenced Frame Number
    "uid": (0x0040A124, "UI"),  # UID (a UIDREF item's value)
    "text": (0x0040A160, "UT"),  # Text Value
    "ds": (0x0040A30A, "DS"),  # Numeric Value
    "fd": (0x0040A161, "FD"),  # Floating Point Value
    "graphic": (0x00700022, "FL"),  # Graphic Data (a SCOORD's points)
    "code": (0x00080100, "SH"),  # Code Value
    "longcode": (0x00080119, "UC"),  # Long Code Value
    "urncode": (0x00080120, "UR"),  # URN Code Value
    "scheme": (0x00080102, "SH"),  # Coding Scheme Designator
    "version": (0x00080103, "SH"),  # Coding Scheme Version
    "meaning": (0x00080104, "LO"),  # Code Meaning
}

#: Content Sequence (0040,A730).
CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
_ITEM = 0xFFFEE000
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OW", b"OV", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class _Slot:
    """A variable element of the template: the bytes it spans and what goes there."""

    start: int
    end: int
    tag: int
    vr: str
    role: Role


@dataclass(frozen=True)
class _Length:
    """A length field of an item or a sequence around slots: where, its size, its value."""

    at: int
    size: int
    value: int
    #: Indexes (in the template's slots) of the slots inside it.
    slots: tuple[int, ...]


class Template:
    """One image's content items, encoded, with their variable parts marked."""

    def __init__(self, data: bytes, slots: list[_Slot], lengths: list[_Length]) -> None:
        self.data = data
        self.slots = slots
        self.lengths = lengths
        # What replaces which bytes, in order: (start, end, "slot" or "length", its index).
        cuts: list[tuple[int, int, str, int]] = [
            (s.start, s.end, "slot", i) for i, s in enumerate(slots)
        ]
        cuts += [(n.at, n.at + n.size, "length", i) for i, n in enumerate(lengths)]
        cuts.sort()
        self._cuts = cuts

    def render(self, values: Mapping[Role, Any], encodings: Any) -> bytes | None:
        """The items with ``values`` (by role); None where an element cannot be encoded."""
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


def append_encoded(container: Dataset, encoded: bytes, encodings: Any) -> None:
    """Append encoded items (explicit VR little endian) to ``container``'s Content Sequence,
    which becomes raw bytes: written as they are (:func:`~.encoding.encode_part10`), read back
    by pydicom when something looks inside."""
    set_encoded(container, encode_items(container.ContentSequence, encodings) + encoded)


def set_encoded(container: Dataset, encoded: bytes) -> None:
    """Make encoded items (explicit VR little endian) ``container``'s Content Sequence."""
    container[CONTENT_SEQUENCE] = RawDataElement(
        CONTENT_SEQUENCE, "SQ", len(encoded), encoded, 0, False, True, True, False
    )


#: Templates kept for later documents, the least recently used dropped first.
KEPT_TEMPLATES = 128
_kept: OrderedDict[Hashable, Template | None] = OrderedDict()
_kept_lock = threading.Lock()


#: Keys met once, whose templates are made the next time (``second_time``).
_met: OrderedDict[Hashable, None] = OrderedDict()


def kept_template(
    key: Hashable, make: Callable[[], Template | None], *, second_time: bool = False
) -> Template | None:
    """The template kept under ``key``, made (by ``make``) and kept now if there is none; None:
    no template can be made for that key. A template holds nothing of the document it was made
    for but what its roles replace, so the key is what its other bytes depend on (the callers
    say what that is). ``second_time``: the first time a key is met, return None (the caller
    builds its content with highdicom) and only note it; make the template the second time.
    For keys that seldom come back (a CT's image count), making a template first costs more
    than highdicom's content alone."""
    with _kept_lock:
        if key in _kept:
            _kept.move_to_end(key)
            return _kept[key]
        if second_time and key not in _met:
            _met[key] = None
            while len(_met) > KEPT_TEMPLATES:
                _met.popitem(last=False)
            return None
        _met.pop(key, None)
    made = make()  # outside the lock: highdicom's build is the slow part
    with _kept_lock:
        _kept[key] = made
        while len(_kept) > KEPT_TEMPLATES:
            _kept.popitem(last=False)
    return made


def kept_templates() -> int:
    """How many templates are kept."""
    with _kept_lock:
        return len(_kept)


def forget_templates() -> None:
    """Drop every kept template (tests; nothing else needs to)."""
    with _kept_lock:
        _kept.clear()
        _met.clear()


def encodings_key(encodings: Any) -> Hashable:
    """A character set (a Specific Character Set value) as part of a key."""
    if encodings is None or isinstance(encodings, str):
        return encodings
    return tuple(str(e) for e in encodings)


def template(
    items: Sequence[Dataset], sentinels: Mapping[Role, Any], encodings: Any
) -> Template | None:
    """The template of content ``items`` built for a stand-in whose values are ``sentinels``
    (by role); None if one of them is not found in the encoded items (a value may be found
    several times: an image's UIDs are referenced by each of its groups)."""
    data = encode_items(list(items), encodings)
    wanted: dict[tuple[int, bytes], Role] = {}
    for role, value in sentinels.items():
        tag, vr = KINDS[role[0]]
        element = encode_element(DataElement(tag, vr, value), encodings)
        if element is None:
            return None
        wanted[(tag, element)] = role
    if len(wanted) != len(sentinels):  # two roles written alike: neither could be told apart
        return None
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
    return Template(
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
