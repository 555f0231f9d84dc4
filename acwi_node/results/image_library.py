"""The SR's Image Library (TID 1600) entries encoded from templates, not built one by one.

The Image Library lists every analysed image, each with its descriptors (TID 1601-1604: its
modality, frame of reference, rows and columns, and for a cross-sectional image its pixel
spacing, slice thickness, position and orientation, for a radiograph its patient orientation
and imager pixel spacing). highdicom builds each entry in about 10 ms (it checks the image's SOP
class against the standard's tables for each), a second for a 100-slice CT. The entries of a
series are alike but for the values read from each image, so highdicom builds one entry per
kind of image (its SOP class, modality, and which of those attributes it has, with how many
values of which type; for a projection radiograph, whether it has a laterality, a view and how
many view modifiers, :mod:`.library_descriptors`, and in which attributes each code's value and
version are written), for a stand-in whose values are sentinels (the codes' too), and every
image's entry is rendered from that template (:mod:`.content_templates`).

highdicom groups the entries by modality and frame of reference (Image Library Group
containers). Here highdicom builds the library for the first image of each group, and the other
images' entries are appended to their group's container, in the order highdicom would have
listed them; the laterality and view items are added to highdicom's entries as to the
stand-in's (:func:`describe`). Anything unusual leaves the whole library to highdicom: an
attribute with an empty value or a value of another type, a value that is not finite, text
outside ASCII (a code's too), a stand-in highdicom refuses, a sentinel not found. The tests
compare the bytes with highdicom's library (with the same laterality and view items added).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from highdicom.sr import CodedConcept, ImageLibrary, MeasurementReport
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DS, DSfloat

from acwi_node.results.codes import written_as
from acwi_node.results.content_templates import Role, Template, append_encoded, template
from acwi_node.results.library_classes import restore_classes
from acwi_node.results.library_descriptors import (
    LibraryDescriptors,
    add_descriptors,
    descriptors_of,
    library_descriptors,
)

#: What highdicom's entry reads from an image besides its SOP Class UID, Modality and Frame of
#: Reference UID: numbers (Numeric Value, and Floating Point Value for a decimal) and text.
_NUMBERS = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SpacingBetweenSlices",
    "ImagerPixelSpacing",
)
_TEXTS = ("PatientOrientation",)
_SENTINEL_INSTANCE = "1.2.826.0.1.3680043.10.1137.97531.11"
_SENTINEL_FRAME = "1.2.826.0.1.3680043.10.1137.97531.12"
_SENTINEL_BASE = 0.613917
_SENTINEL_STEP = 0.010203
_IMAGE_LIBRARY = ("DCM", "111028")
_MODALITY = ("DCM", "121139")

#: An attribute's shape: None (absent), or whether it is multi-valued and each value's kind
#: ("i" an integer, "f" a decimal, "s" text).
_Shape = tuple[bool, tuple[str, ...]] | None
#: A code's shape: the attribute its value is written in and whether it has a scheme version.
_CodeShape = tuple[str, bool]
#: The role kind (:data:`~.content_templates.KINDS`) of each attribute a code's value is in.
_VALUE_ROLES = {"CodeValue": "code", "LongCodeValue": "longcode", "URNCodeValue": "urncode"}


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "i"
    if isinstance(value, DSfloat) and math.isfinite(value):
        return "f"
    if isinstance(value, str) and value and value.isascii() and "\\" not in value:
        return "s"
    return None


def _shape(ds: Dataset, name: str) -> _Shape | str:
    """``name``'s shape in ``ds``; "unusual" for what templates leave to highdicom."""
    if name not in ds:
        return None
    value = ds[name].value
    multi = isinstance(value, MultiValue | list)
    kinds = tuple(_kind(v) for v in (value if multi else [value]))
    if not kinds or any(k is None for k in kinds):
        return "unusual"
    return (multi, tuple(k for k in kinds if k is not None))


@dataclass(frozen=True)
class _Kind:
    """What one template describes: images alike in everything but their values."""

    sop_class_uid: str
    modality: str | None
    frame_of_reference: bool
    shapes: tuple[_Shape, ...]
    #: The laterality and view codes the entry holds (:mod:`.library_descriptors`), each named
    #: ("laterality", "view", "modifier/<n>") with its shape.
    codes: tuple[tuple[str, _CodeShape], ...] = ()


def _named_codes(descriptors: LibraryDescriptors) -> list[tuple[str, CodedConcept]]:
    named: list[tuple[str, CodedConcept]] = []
    if descriptors.laterality is not None:
        named.append(("laterality", descriptors.laterality))
    if descriptors.view is not None:
        named.append(("view", descriptors.view))
    named += [(f"modifier/{i}", code) for i, code in enumerate(descriptors.modifiers)]
    return named


def _code_shape(code: CodedConcept) -> _CodeShape | None:
    """``code``'s shape; None for text outside ASCII (left to highdicom, as other text)."""
    texts = [str(code.get(keyword, "")) for keyword in (*_VALUE_ROLES, "CodingSchemeDesignator")]
    texts += [str(code.get("CodingSchemeVersion", "")), str(code.get("CodeMeaning", ""))]
    if not all(text.isascii() for text in texts):
        return None
    keyword = next(k for k in _VALUE_ROLES if k in code)
    return (keyword, "CodingSchemeVersion" in code)


def _kind_of(ds: Dataset) -> _Kind | None:
    named: list[tuple[str, _CodeShape]] = []
    for name, code in _named_codes(library_descriptors(ds)):
        code_shape = _code_shape(code)
        if code_shape is None:
            return None
        named.append((name, code_shape))
    shapes: list[_Shape] = []
    for name in (*_NUMBERS, *_TEXTS):
        shape = _shape(ds, name)
        if isinstance(shape, str):
            return None
        shapes.append(shape)
    modality = ds.get("Modality")
    frame = ds.get("FrameOfReferenceUID")
    if not isinstance(modality, str | None) or ("FrameOfReferenceUID" in ds and not frame):
        return None
    return _Kind(str(ds.SOPClassUID), modality, frame is not None, tuple(shapes), tuple(named))


def _roles(ds: Dataset, kind: _Kind, descriptors: LibraryDescriptors) -> dict[Role, Any]:
    """Each role's value in ``ds`` (an image of ``kind``) and its ``descriptors``."""
    roles: dict[Role, Any] = {("instance", ""): str(ds.SOPInstanceUID)}
    for name, code in _named_codes(descriptors):
        keyword = next(k for k in _VALUE_ROLES if k in code)
        roles[(_VALUE_ROLES[keyword], name)] = str(code.get(keyword))
        roles[("scheme", name)] = str(code.CodingSchemeDesignator)
        roles[("meaning", name)] = str(code.CodeMeaning)
        if "CodingSchemeVersion" in code:
            roles[("version", name)] = str(code.CodingSchemeVersion)
    if kind.frame_of_reference:
        roles[("uid", "frame")] = str(ds.FrameOfReferenceUID)
    for name, shape in zip((*_NUMBERS, *_TEXTS), kind.shapes, strict=True):
        if shape is None:
            continue
        value = ds[name].value
        values = list(value) if shape[0] else [value]
        for i, v in enumerate(values):
            if name in _TEXTS:
                roles[("text", f"{name}/{i}")] = str(v)
                continue
            roles[("ds", f"{name}/{i}")] = DS(v, auto_format=True)
            if isinstance(v, float):
                roles[("fd", f"{name}/{i}")] = float(v)
    return roles


def _stand_in(kind: _Kind) -> Dataset:
    """An image of ``kind`` whose every value is a sentinel."""
    ds = Dataset()
    ds.SOPClassUID = kind.sop_class_uid
    ds.SOPInstanceUID = _SENTINEL_INSTANCE
    if kind.modality is not None:
        ds.Modality = kind.modality
    if kind.frame_of_reference:
        ds.FrameOfReferenceUID = _SENTINEL_FRAME
    n = 0
    for name, shape in zip((*_NUMBERS, *_TEXTS), kind.shapes, strict=True):
        if shape is None:
            continue
        values: list[Any] = []
        for k in shape[1]:
            n += 1
            if k == "i":
                values.append(30001 + 2 * n)
            elif k == "f":
                values.append(DSfloat(round(_SENTINEL_BASE + _SENTINEL_STEP * n, 6)))
            else:
                values.append(f"SNT{n}Q")
        setattr(ds, name, values if shape[0] else values[0])
    return ds


def _sentinel_descriptors(kind: _Kind) -> LibraryDescriptors:
    """The laterality and view codes of a stand-in of ``kind``: every value a sentinel."""
    made: dict[str, CodedConcept] = {}
    for n, (name, (keyword, versioned)) in enumerate(kind.codes, start=1):
        value = {
            "CodeValue": f"SNC{n}Q",
            "LongCodeValue": f"SNCLONGSENTINEL{n:03d}Q",
            "URNCodeValue": f"urn:snc:{n}q",
        }[keyword]
        code = CodedConcept(value, f"SNS{n}Q", f"SNM{n}Q", f"SNV{n}Q" if versioned else None)
        made[name] = written_as(code, keyword, value)
    modifiers = [made[name] for name, _ in kind.codes if name.startswith("modifier/")]
    return LibraryDescriptors(made.get("laterality"), made.get("view"), tuple(modifiers))


def _entry(kind: _Kind) -> tuple[Dataset, tuple[str, str]] | None:
    """highdicom's entry (an IMAGE content item) for a stand-in of ``kind``, with the stand-in's
    laterality and view items, and the modality it is grouped by; None if highdicom refuses the
    stand-in."""
    try:
        library = ImageLibrary([_stand_in(kind)])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    add_descriptors(library[0], {_SENTINEL_INSTANCE: _sentinel_descriptors(kind)})
    group = library[0].ContentSequence[0]
    images = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    if len(images) != 1:
        return None
    entry = images[0]
    for item in entry.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) == _MODALITY:
            code = item.ConceptCodeSequence[0]
            return entry, (str(code.CodingSchemeDesignator), str(code.CodeValue))
    return None


def library_container(report: MeasurementReport) -> Dataset | None:
    """The Image Library container (TID 1600) of ``report``, None where it has none."""
    return next(
        (
            item
            for item in report[0].ContentSequence
            if item.ValueType == "CONTAINER"
            and (
                item.ConceptNameCodeSequence[0].CodingSchemeDesignator,
                item.ConceptNameCodeSequence[0].CodeValue,
            )
            == _IMAGE_LIBRARY
        ),
        None,
    )


def describe(report: MeasurementReport, images: Sequence[Dataset]) -> None:
    """Add to the entries highdicom wrote in ``report``'s Image Library the laterality and view
    of their images (among ``images``; :mod:`.library_descriptors`), and give the entries
    built for a stand-in of another class (:mod:`.library_classes`) their image's class."""
    library = library_container(report)
    if library is not None:
        restore_classes(library, images)
        add_descriptors(library, descriptors_of(images))


@dataclass
class LibraryPlan:
    """The Image Library of a document: the images highdicom lists (the first of each group)
    and, after it has, the others' entries to append (:meth:`append_to`)."""

    #: The first image of each group, in the order highdicom lists the groups.
    representatives: list[Dataset]
    #: Per group, the other images with their kind, in order.
    rest: list[list[tuple[Dataset, _Kind]]]
    #: highdicom's entry for a stand-in of each kind: its template.
    entries: dict[_Kind, Dataset]

    def append_to(self, report: MeasurementReport, encodings: Any) -> bool:
        """Append the other images' entries to their groups in ``report``'s Image Library;
        False (``report`` unchanged) where a template cannot describe them."""
        templates: dict[_Kind, Template | None] = {}
        rendered: list[bytes] = []
        for images in self.rest:
            parts: list[bytes] = []
            for ds, kind in images:
                if kind not in templates:
                    entry = self.entries[kind]
                    sentinels = _roles(_stand_in(kind), kind, _sentinel_descriptors(kind))
                    templates[kind] = template([entry], sentinels, encodings)
                found = templates[kind]
                roles = _roles(ds, kind, library_descriptors(ds))
                part = found.render(roles, encodings) if found is not None else None
                if part is None:
                    return False
                parts.append(part)
            rendered.append(b"".join(parts))
        library = library_container(report)
        if library is None:
            return False
        groups = list(library.ContentSequence)
        if len(groups) != len(rendered):
            return False
        for group, extra in zip(groups, rendered, strict=True):
            if extra:
                append_encoded(group, extra, encodings)
        return True


def plan_image_library(images: Sequence[Dataset]) -> LibraryPlan | None:
    """How to write the Image Library of ``images`` (distinct, in order) from templates; None
    where highdicom must build it all, or where no two images would share a group."""
    alike: dict[tuple[str, str | None, str | None], int] = {}
    for ds in images:
        key = (str(ds.SOPClassUID), ds.get("Modality"), ds.get("FrameOfReferenceUID"))
        alike[key] = alike.get(key, 0) + 1
    if max(alike.values(), default=0) < 2:
        return None  # no group of two: nothing a template would spare
    entries: dict[_Kind, Dataset] = {}
    modalities: dict[_Kind, tuple[str, str]] = {}
    groups: dict[tuple[tuple[str, str], str | None], list[tuple[Dataset, _Kind]]] = {}
    for ds in images:
        kind = _kind_of(ds)
        if kind is None:
            return None
        if kind not in entries:
            built = _entry(kind)
            if built is None:
                return None
            entries[kind], modalities[kind] = built
        frame = str(ds.FrameOfReferenceUID) if kind.frame_of_reference else None
        groups.setdefault((modalities[kind], frame), []).append((ds, kind))
    members = list(groups.values())
    return LibraryPlan(
        representatives=[group[0][0] for group in members],
        rest=[group[1:] for group in members],
        entries=entries,
    )
