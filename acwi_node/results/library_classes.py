"""Image Library entries for images of the storage SOP Classes highdicom has no modality for.

highdicom (0.28) codes an Image Library entry's Modality (TID 1602 row 1, CID 29) from the
image's SOP Class UID, by a table of the classes it knows, and refuses any other ("SOP Class
UID does not identify a SOP Class for storage of an image information entity"); it checks too
that the class's IOD has pixel data, in its copy of PS3.3's tables. An image of a class missing
from that table would have no entry at all. For the image classes whose IOD fixes their
modality to one highdicom codes for another class (:data:`KNOWN_CLASSES`), the entry is built
for a stand-in of that other class (the modality code, the grouping by modality and frame of
reference, and the descriptors are what highdicom writes for it), and the entry's Referenced
SOP Class UID is then the image's own again (:func:`restore_classes`):

- Breast Projection X-Ray Image, For Presentation and For Processing (PS3.3 A.74; Modality
  MG): as Digital Mammography X-Ray Image, For Presentation and For Processing (MG,
  Mammography).
- Wide Field Ophthalmic Photography Stereographic Projection and 3D Coordinates Images
  (A.84, A.85; Modality OP): as Ophthalmic Photography 8 Bit Image (OP).
- The retired Ultrasound Image, Ultrasound Multi-frame Image, Nuclear Medicine Image and
  X-Ray Angiographic Bi-Plane Image Storage classes: as the current Ultrasound Image,
  Ultrasound Multi-frame Image, Nuclear Medicine Image and X-Ray Angiographic Image ones.

The other image classes highdicom does not know (Photoacoustic, Enhanced (Continuous) RT
Image, Dermoscopic Photography, Confocal Microscopy, the ophthalmic OCT En Face and B-scan
Volume Analysis images, Parametric Map) have a modality CID 29 codes no class highdicom knows
with, or none fixed by their IOD: their images are left out of the Image Library as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydicom import Dataset
from pydicom.dataelem import DataElement

__all__ = ["KNOWN_CLASSES", "in_known_class", "restore_classes"]

_STORAGE = "1.2.840.10008.5.1.4.1.1."

#: Each image storage SOP Class highdicom has no modality for, and the class it knows whose
#: IOD has the same modality (the entry is built as for an image of that class).
KNOWN_CLASSES: dict[str, str] = {
    # Breast Projection X-Ray Image (MG) -> Digital Mammography X-Ray Image (MG)
    _STORAGE + "13.1.4": _STORAGE + "1.2",  # For Presentation
    _STORAGE + "13.1.5": _STORAGE + "1.2.1",  # For Processing
    # Wide Field Ophthalmic Photography (OP) -> Ophthalmic Photography 8 Bit Image (OP)
    _STORAGE + "77.1.5.5": _STORAGE + "77.1.5.1",  # Stereographic Projection
    _STORAGE + "77.1.5.6": _STORAGE + "77.1.5.1",  # 3D Coordinates
    # retired classes -> their current ones
    _STORAGE + "6": _STORAGE + "6.1",  # Ultrasound Image
    _STORAGE + "3": _STORAGE + "3.1",  # Ultrasound Multi-frame Image
    _STORAGE + "5": _STORAGE + "20",  # Nuclear Medicine Image
    _STORAGE + "12.3": _STORAGE + "12.1",  # X-Ray Angiographic Bi-Plane Image
}

_SOP_CLASS = "SOPClassUID"
_SOP_CLASS_TAG = 0x00080016


def _class_of(ds: Dataset) -> str:
    value = ds.get(_SOP_CLASS)
    return str(value).strip("\x00 ") if value is not None else ""


def in_known_class(ds: Dataset) -> Dataset:
    """``ds``, or where highdicom has no modality for its class a shallow copy of it in the
    class of :data:`KNOWN_CLASSES` (``ds`` itself is left as it is)."""
    known = KNOWN_CLASSES.get(_class_of(ds))
    if known is None:
        return ds
    # a new dict of ``ds``'s elements (a copy.copy would share ``ds``'s) with a new class
    copied = Dataset(dict(ds.items()))
    copied[_SOP_CLASS_TAG] = DataElement(_SOP_CLASS_TAG, "UI", known)
    return copied


def _referenced(entry: Dataset) -> Dataset | None:
    seq = entry.get("ReferencedSOPSequence")
    return seq[0] if seq else None


def restore_classes(library: Dataset, images: Iterable[Dataset]) -> None:
    """Make the Referenced SOP Class UID of each entry of the Image Library container
    ``library`` (TID 1600) for one of ``images`` whose class highdicom does not know (built
    by :func:`in_known_class`) the image's own again."""
    classes: Mapping[str, str] = {
        str(ds.SOPInstanceUID): _class_of(ds) for ds in images if _class_of(ds) in KNOWN_CLASSES
    }
    if not classes:
        return
    for group in library.get("ContentSequence") or []:
        for entry in group.get("ContentSequence") or []:
            if entry.get("ValueType") != "IMAGE":
                continue
            reference = _referenced(entry)
            if reference is None:
                continue
            own = classes.get(str(reference.get("ReferencedSOPInstanceUID", "")))
            if own is not None:
                reference.ReferencedSOPClassUID = own
