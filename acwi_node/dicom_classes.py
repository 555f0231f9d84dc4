"""SOP Classes by what they hold: the ones no model reads, which never re-open a study.

A PACS whose forwarding rule works on the study sends the node every object stored in it
after the images: a radiologist's key image note, a presentation state, a report SR, a PDF.
No model reads these (they hold no image), so they must not have the study analysed again,
nor supersede a case a radiologist may be reading: :func:`reads_nothing` says which.
"""

from __future__ import annotations

__all__ = ["NON_IMAGE_CLASS_PREFIXES", "reads_nothing"]

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
