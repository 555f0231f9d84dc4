"""SOP Classes by what they hold: the ones no model reads, which never re-open a study; the
single-frame image classes, whose frames cannot be referenced.

A PACS whose forwarding rule works on the study sends the node every object stored in it
after the images: a radiologist's key image note, a presentation state, a report SR, a PDF.
No model reads these (they hold no image), so they must not have the study analysed again,
nor supersede a case a radiologist may be reading: :func:`reads_nothing` says which.

An image of a class whose IOD has no Multi-frame Module (a radiograph, a CT or MR slice, a
Secondary Capture) is one frame: a reference to it names no frame (Referenced Frame Number is
allowed only for a multi-frame class, PS3.3 C.10.6 and the Image Reference Macro, and dciodvfy
reports it as an error otherwise). :func:`is_single_frame_class` says which.
"""

from __future__ import annotations

__all__ = [
    "NON_IMAGE_CLASS_PREFIXES",
    "SINGLE_FRAME_IMAGE_CLASSES",
    "is_single_frame_class",
    "reads_nothing",
]

_STORAGE = "1.2.840.10008.5.1.4.1.1."
#: SOP Class UIDs, or their beginnings (ending with a dot), of storage classes without an
#: image a model could read (PS3.4 B.5).
NON_IMAGE_CLASS_PREFIXES = (
    _STORAGE + "88.",  # structured reports, key object selection, CAD and dose reports
    _STORAGE + "11.",  # presentation states
    _STORAGE + "104.",  # encapsulated PDF, CDA, STL, OBJ, MTL
    _STORAGE + "9.",  # waveforms (ECG, audio, haemodynamic, ...)
    _STORAGE + "66",  # raw data (66), registrations, fiducials, segmentations (66.x)
    _STORAGE + "67",  # real world value mapping
    _STORAGE + "68.",  # surface scans: meshes and point clouds
    _STORAGE + "481.3",  # RT structure set
    _STORAGE + "481.4",  # RT beams treatment record
    _STORAGE + "481.5",  # RT plan
    _STORAGE + "481.6",  # RT brachy treatment record
    _STORAGE + "481.7",  # RT treatment summary record
    _STORAGE + "481.8",  # RT ion plan
    _STORAGE + "481.9",  # RT ion beams treatment record
    _STORAGE + "200.",  # protocols (CT defined procedure, performed imaging agent, ...)
    "1.2.840.10008.5.1.4.34.",  # second generation radiotherapy
)


def reads_nothing(sop_class_uid: str) -> bool:
    """Whether no model reads an instance of ``sop_class_uid``: a report, a key object note,
    a presentation state, a document, a waveform, a plan (not an image)."""
    uid = sop_class_uid.strip()
    for prefix in NON_IMAGE_CLASS_PREFIXES:
        if prefix.endswith("."):
            if uid.startswith(prefix):
                return True
        elif uid == prefix or uid.startswith(prefix + "."):
            return True
    return False


#: Storage SOP Classes of image IODs without the Multi-frame Module (PS3.3 Annex A): an
#: instance of one holds one frame, whatever its Number of Frames says.
SINGLE_FRAME_IMAGE_CLASSES = frozenset(
    {
        _STORAGE + "1",  # Computed Radiography Image (A.2)
        _STORAGE + "1.1",  # Digital X-Ray Image, For Presentation (A.26)
        _STORAGE + "1.1.1",  # Digital X-Ray Image, For Processing
        _STORAGE + "1.2",  # Digital Mammography X-Ray Image, For Presentation (A.27)
        _STORAGE + "1.2.1",  # Digital Mammography X-Ray Image, For Processing
        _STORAGE + "1.3",  # Digital Intra-Oral X-Ray Image, For Presentation (A.28)
        _STORAGE + "1.3.1",  # Digital Intra-Oral X-Ray Image, For Processing
        _STORAGE + "2",  # CT Image (A.3)
        _STORAGE + "4",  # MR Image (A.4)
        _STORAGE + "6",  # Ultrasound Image (retired)
        _STORAGE + "6.1",  # Ultrasound Image (A.6)
        _STORAGE + "7",  # Secondary Capture Image (A.8.1; not the multi-frame ones, 7.1-7.4)
        _STORAGE + "77.1.1",  # VL Endoscopic Image (A.32.1)
        _STORAGE + "77.1.2",  # VL Microscopic Image (A.32.2)
        _STORAGE + "77.1.3",  # VL Slide-Coordinates Microscopic Image (A.32.3)
        _STORAGE + "77.1.4",  # VL Photographic Image (A.32.4)
        _STORAGE + "77.1.5.7",  # Ophthalmic OCT En Face Image (A.86)
        _STORAGE + "77.1.7",  # Dermoscopic Photography Image (A.91)
        _STORAGE + "81.1",  # Ophthalmic Thickness Map (A.67)
        _STORAGE + "82.1",  # Corneal Topography Map (A.68)
        _STORAGE + "128",  # Positron Emission Tomography Image (A.21)
    }
)


def is_single_frame_class(sop_class_uid: str) -> bool:
    """Whether an instance of ``sop_class_uid`` is one frame: its IOD has no Multi-frame
    Module (:data:`SINGLE_FRAME_IMAGE_CLASSES`), so no reference to it may name a frame."""
    return sop_class_uid.strip("\x00 ") in SINGLE_FRAME_IMAGE_CLASSES
