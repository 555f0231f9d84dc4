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
    "NON_IMAGE_CLASSES",
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


#: Storage SOP Classes, whole, of other IODs without image pixels (PS3.3 Annex A: no Image
#: Pixel Module): measurements, RT radiation sets, records and instructions, annotations,
#: displays, inventories, hanging protocols, palettes and implant templates; and the retired
#: standalone overlay, curve and LUT classes.
NON_IMAGE_CLASSES = frozenset(
    {
        _STORAGE + "4.2",  # MR Spectroscopy
        _STORAGE + "77.1.5.3",  # Stereometric Relationship
        _STORAGE + "78.1",  # Lensometry Measurements
        _STORAGE + "78.2",  # Autorefraction Measurements
        _STORAGE + "78.3",  # Keratometry Measurements
        _STORAGE + "78.4",  # Subjective Refraction Measurements
        _STORAGE + "78.5",  # Visual Acuity Measurements
        _STORAGE + "78.6",  # Spectacle Prescription Report
        _STORAGE + "78.7",  # Ophthalmic Axial Measurements
        _STORAGE + "78.8",  # Intraocular Lens Calculations
        _STORAGE + "79.1",  # Macular Grid Thickness and Volume Report
        _STORAGE + "80.1",  # Ophthalmic Visual Field Static Perimetry Measurements
        _STORAGE + "90.1",  # Content Assessment Results
        _STORAGE + "91.1",  # Microscopy Bulk Simple Annotations
        _STORAGE + "131",  # Basic Structured Display
        _STORAGE + "201.1",  # Inventory
        _STORAGE + "481.10",  # RT Physician Intent
        _STORAGE + "481.11",  # RT Segment Annotation
        _STORAGE + "481.12",  # RT Radiation Set
        _STORAGE + "481.13",  # C-Arm Photon-Electron Radiation
        _STORAGE + "481.14",  # Tomotherapeutic Radiation
        _STORAGE + "481.15",  # Robotic-Arm Radiation
        _STORAGE + "481.16",  # RT Radiation Record Set
        _STORAGE + "481.17",  # RT Radiation Salvage Record
        _STORAGE + "481.18",  # Tomotherapeutic Radiation Record
        _STORAGE + "481.19",  # C-Arm Photon-Electron Radiation Record
        _STORAGE + "481.20",  # Robotic Radiation Record
        _STORAGE + "481.21",  # RT Radiation Set Delivery Instruction
        _STORAGE + "481.22",  # RT Treatment Preparation
        _STORAGE + "481.25",  # RT Patient Position Acquisition Instruction
        "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol
        "1.2.840.10008.5.1.4.39.1",  # Color Palette
        "1.2.840.10008.5.1.4.43.1",  # Generic Implant Template
        "1.2.840.10008.5.1.4.44.1",  # Implant Assembly Template
        "1.2.840.10008.5.1.4.45.1",  # Implant Template Group
        "1.2.840.10008.1.3.10",  # Media Storage Directory (a DICOMDIR)
        _STORAGE + "8",  # Standalone Overlay (retired)
        _STORAGE + "9",  # Standalone Curve (retired)
        _STORAGE + "10",  # Standalone Modality LUT (retired)
        _STORAGE + "11",  # Standalone VOI LUT (retired)
        _STORAGE + "129",  # Standalone PET Curve (retired)
    }
)


def reads_nothing(sop_class_uid: str) -> bool:
    """Whether no model reads an instance of ``sop_class_uid``: a report, a key object note,
    a presentation state, a document, a waveform, a plan, a measurement (not an image)."""
    uid = sop_class_uid.strip()
    if uid in NON_IMAGE_CLASSES:
        return True
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
