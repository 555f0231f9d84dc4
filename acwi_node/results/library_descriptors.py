"""The Image Library entry descriptors the node adds to highdicom's: a projection radiograph's
Image Laterality and Image View, with its modifiers.

highdicom's entry (TID 1601/1602) describes an image by its modality, frame of reference, rows
and columns and, for a projection radiograph, its patient orientation and imager pixel spacing
(TID 1603). A mammography study's four views (left and right, cranio-caudal and medio-lateral
oblique) are alike in all of these; what tells them apart is the image's laterality and view,
which the entry of a projection radiograph (Modality CR, DX, IO, MG, PX, RF, RG or XA: TID
1602's condition for TID 1603) says here too:

- Image Laterality (111027, DCM), TID 1602 row 3: CODE, HAS ACQ CONTEXT, from CID 244: the
  image's Image Laterality (0020,0062) R, L or B (Right, Left, Bilateral), else its frames'
  Frame Laterality (0020,9072), else the series' Laterality (0020,0060) R or L; "U" (an
  unpaired body part) or any other value has no code. An enhanced multi-frame image (Breast
  Tomosynthesis, Breast Projection X-Ray, Enhanced XA or XRF: PS3.3 A.55, A.74, A.47, A.48)
  has no Image Laterality: each frame's is the Frame Laterality of the Frame Anatomy
  Sequence (0020,9071) in its functional groups (C.7.6.16.2.8; Type 1, per frame or shared
  by all). It is the image's only where every frame has the same one: frames that disagree,
  or some without one, give no laterality at all (not the series', nor an Image Laterality
  that contradicts them), since no single value would be true of the whole image.
- Image View (111031, DCM), TID 1603 row 1: CODE, HAS ACQ CONTEXT, the first item of the
  image's View Code Sequence (0054,0220) (at the top level in the enhanced breast images too:
  their Breast View Module, C.8.21.6), with an Image View Modifier (111032, DCM), TID 1603
  row 2: CODE, HAS CONCEPT MOD, below it for each item of that item's View Modifier Code
  Sequence (0054,0222).

A code is written as the source has it (:func:`~.codes.usable_code`); a value that is
not usable (a laterality "X", a view code without a meaning) is left out, a modifier without
a usable view with it; the SR is written all the same. The items follow highdicom's own
descriptors in the entry, as highdicom's ``additional_descriptors`` would put them (TID 1600's
order is not significant), and the same items are added to highdicom's entries and to the
templates' (:mod:`.image_library`), so that both write the same bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContentItem,
    ContentSequence,
    RelationshipTypeValues,
)
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from acwi_node.dicom_frames import frame_count, functional_groups
from acwi_node.results.codes import code_items, usable_code

#: The modalities of projection radiography (PS3.16 TID 1602 row 13: TID 1603 is included for
#: these; highdicom's projection descriptors are written for the same).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
#: Image Laterality (0020,0062) values and their CID 244 codes.
_IMAGE_LATERALITY = {
    "R": codes.cid244.Right,
    "L": codes.cid244.Left,
    "B": codes.cid244.Bilateral,
}
#: Laterality (0020,0060) values (its Enumerated Values: R, L) and their CID 244 codes.
_SERIES_LATERALITY = {"R": codes.cid244.Right, "L": codes.cid244.Left}
#: The value type of the Image Library's entries (TID 1601 row 1).
_IMAGE = "IMAGE"


@dataclass(frozen=True)
class LibraryDescriptors:
    """What the node adds to an image's Image Library entry."""

    laterality: CodedConcept | None = None
    view: CodedConcept | None = None
    #: The view's modifiers (none without a view).
    modifiers: tuple[CodedConcept, ...] = ()

    def codes(self) -> list[CodedConcept]:
        """Every code written: the laterality, the view, its modifiers."""
        found = [code for code in (self.laterality, self.view) if code is not None]
        return [*found, *self.modifiers]

    def items(self) -> list[ContentItem]:
        """The content items, in order: Image Laterality, Image View (its modifiers below)."""
        items: list[ContentItem] = []
        if self.laterality is not None:
            items.append(
                CodeContentItem(
                    name=codes.DCM.ImageLaterality,
                    value=copy.deepcopy(self.laterality),
                    relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
        if self.view is not None:
            view = CodeContentItem(
                name=codes.DCM.ImageView,
                value=copy.deepcopy(self.view),
                relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
            if self.modifiers:
                view.ContentSequence = ContentSequence(
                    [
                        CodeContentItem(
                            name=codes.DCM.ImageViewModifier,
                            value=copy.deepcopy(modifier),
                            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
                        )
                        for modifier in self.modifiers
                    ]
                )
            items.append(view)
        return items


NO_DESCRIPTORS = LibraryDescriptors()


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a source's malformed value never stops the SR
        return None
    return value.strip(" ") if isinstance(value, str) else None


#: The functional group sequences (PS3.3 C.7.6.16).
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
#: What :func:`_frame_laterality` says of frames whose lateralities differ.
_DISAGREE = "disagree"


def _frame_laterality(ds: Dataset) -> str | None:
    """The Frame Laterality (0020,9072) every frame of ``ds`` has (its Frame Anatomy Sequence
    in its own functional groups, else in the shared ones), as it is written ("" for a frame
    without one); :data:`_DISAGREE` where frames differ; None for an image without a Frame
    Anatomy Sequence in its functional groups."""
    try:
        if not any(isinstance(ds.get(name), Sequence) for name in _FUNCTIONAL_GROUPS):
            return None
        found: set[str] = set()
        anatomy = False
        for number in range(1, frame_count(ds) + 1):
            value = ""
            for group in functional_groups(ds, number):
                items = group.get("FrameAnatomySequence")
                if isinstance(items, Sequence) and len(items) > 0:
                    anatomy = True
                    value = _text(items[0], "FrameLaterality") or ""
            found.add(value)
            if len(found) > 1:
                return _DISAGREE
    except Exception:  # a malformed functional group never stops the SR
        return _DISAGREE
    return found.pop() if anatomy and found else None


def _laterality(ds: Dataset) -> CodedConcept | None:
    image = _IMAGE_LATERALITY.get(_text(ds, "ImageLaterality") or "")
    frames = _frame_laterality(ds)
    if frames == _DISAGREE:
        return None
    framed = _IMAGE_LATERALITY.get(frames or "")
    if image is not None and framed is not None and image != framed:
        return None  # the image and its frames contradict each other
    code = image or framed
    if code is None:
        code = _SERIES_LATERALITY.get(_text(ds, "Laterality") or "")
    if code is None:
        return None
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def library_descriptors(ds: Dataset) -> LibraryDescriptors:
    """What the node adds to the Image Library entry of the image ``ds`` (nothing but for a
    projection radiograph with a usable laterality or view)."""
    if _text(ds, "Modality") not in PROJECTION_MODALITIES:
        return NO_DESCRIPTORS
    view: CodedConcept | None = None
    modifiers: tuple[CodedConcept, ...] = ()
    views = code_items(ds, "ViewCodeSequence")
    if views:
        view = usable_code(views[0])
        if view is not None:
            found = (usable_code(item) for item in code_items(views[0], "ViewModifierCodeSequence"))
            modifiers = tuple(code for code in found if code is not None)
    return LibraryDescriptors(_laterality(ds), view, modifiers)


def _referenced_uid(item: Dataset) -> str | None:
    seq = item.get("ReferencedSOPSequence")
    return str(seq[0].ReferencedSOPInstanceUID) if seq else None


def add_descriptors(library: Dataset, descriptors: Mapping[str, LibraryDescriptors]) -> None:
    """Append to each entry of the Image Library container ``library`` (TID 1600, its groups'
    IMAGE items) the items of its image's ``descriptors`` (by SOP Instance UID)."""
    for group in library.get("ContentSequence") or []:
        for entry in group.get("ContentSequence") or []:
            if entry.get("ValueType") != _IMAGE:
                continue
            found = descriptors.get(_referenced_uid(entry) or "")
            if found is None:
                continue
            items = found.items()
            if not items:
                continue
            if "ContentSequence" not in entry:
                entry.ContentSequence = ContentSequence()
            for item in items:
                entry.ContentSequence.append(item)


def descriptors_of(images: Iterable[Dataset]) -> dict[str, LibraryDescriptors]:
    """Each image's descriptors, by SOP Instance UID."""
    return {str(ds.SOPInstanceUID): library_descriptors(ds) for ds in images}
