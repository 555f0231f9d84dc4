"""Stand-in classes for highdicom's look-ups of an image of a class it has no IOD for.

highdicom (0.28) copies a result's patient and study from its first source image by the
modules of that image's IOD, looked up by its SOP Class UID in its copy of PS3.3's tables
(``SOPClass.copy_patient_and_study_information``), and checks a region's source image
(``ImageRegion``) against its IOD the same way: for an image of a class missing from them (the
retired Ultrasound Image, Ultrasound Multi-frame Image, Nuclear Medicine Image, X-Ray
Angiographic Bi-Plane Image and VL Image / VL Multi-frame Image Storage - Trial classes, that
older modalities still send; DICOS and eddy current images) both raise ``KeyError``, and no
SR, heatmap or parametric map of the study could be written.

Every image IOD of those tables has the same Patient and Study modules (Patient, Clinical
Trial Subject, General Study, Patient Study, Clinical Trial Study): the copy is made as from an
image of :data:`PATIENT_STUDY_STAND_IN` (:func:`in_patient_study_class`), which copies the
attributes of those modules the image has. A region is checked as on an image of a class
highdicom knows that is single- or multi-frame as the image's is (:func:`region_class`). Only
highdicom sees the stand-ins: a result references the source in its own class
(:func:`restore_reference_classes` puts it back where highdicom wrote a stand-in's).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

from highdicom._standard_utils import get_sop_class_iod_map
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import (
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from acwi_node.dicom_classes import is_single_frame_class

__all__ = [
    "PATIENT_STUDY_STAND_IN",
    "in_patient_study_class",
    "patient_study_class",
    "region_class",
    "restore_reference_classes",
]

#: The class an image of a class highdicom has no IOD for is copied from as: Secondary
#: Capture Image, whose IOD has the Patient and Study modules of every image IOD.
PATIENT_STUDY_STAND_IN = str(SecondaryCaptureImageStorage)

_SOP_CLASS_TAG = 0x00080016


@functools.lru_cache(maxsize=128)
def patient_study_class(sop_class_uid: str) -> str:
    """``sop_class_uid`` where highdicom has its IOD, else :data:`PATIENT_STUDY_STAND_IN`: the
    class highdicom's patient and study copy may look up."""
    uid = sop_class_uid.strip("\x00 ")
    return uid if uid in get_sop_class_iod_map() else PATIENT_STUDY_STAND_IN


@functools.lru_cache(maxsize=128)
def region_class(sop_class_uid: str) -> str:
    """``sop_class_uid`` where highdicom has its IOD, else a class it has whose IOD is
    single-frame (Secondary Capture Image) or multi-frame (Multi-frame Grayscale Byte
    Secondary Capture Image) as ``sop_class_uid``'s is (:mod:`acwi_node.dicom_classes`):
    highdicom's region (``ImageRegion``) looks its source's class up to see whether a frame
    may be referenced."""
    uid = sop_class_uid.strip("\x00 ")
    if uid in get_sop_class_iod_map():
        return uid
    if is_single_frame_class(uid):
        return PATIENT_STUDY_STAND_IN
    return str(MultiFrameGrayscaleByteSecondaryCaptureImageStorage)


def _class_of(ds: Dataset) -> str:
    value = ds.get("SOPClassUID")
    return str(value).strip("\x00 ") if value is not None else ""


def in_patient_study_class(ds: Dataset) -> Dataset:
    """``ds``, or where highdicom has no IOD for its class a shallow copy of it in
    :data:`PATIENT_STUDY_STAND_IN` (``ds`` itself is left as it is)."""
    own = _class_of(ds)
    stand_in = patient_study_class(own) if own else own
    if stand_in == own:
        return ds
    copied = Dataset(dict(ds.items()))  # a new dict of the elements: ds keeps its class
    copied[_SOP_CLASS_TAG] = DataElement(_SOP_CLASS_TAG, "UI", stand_in)
    return copied


def _items(ds: Dataset, keywords: Iterable[str] | None) -> Iterator[Dataset]:
    """The items of ``ds``'s sequences (of ``keywords`` alone at the top level, where given),
    at every depth."""
    for element in ds.iterall() if keywords is None else ():
        if element.VR == "SQ":
            yield from element.value
    for keyword in keywords or ():
        for item in ds.get(keyword) or []:
            yield item
            for element in item.iterall():
                if element.VR == "SQ":
                    yield from element.value


def restore_reference_classes(
    result: Dataset, sources: Iterable[Dataset], keywords: Iterable[str] | None = None
) -> None:
    """Make the Referenced SOP Class UID of each reference of ``result`` to one of ``sources``
    whose class highdicom has no IOD for (written as :data:`PATIENT_STUDY_STAND_IN` by a
    copy from :func:`in_patient_study_class`) the source's own again. ``keywords``: the
    top-level sequences the references are in (None: every sequence of ``result``)."""
    own = {
        str(ds.SOPInstanceUID): _class_of(ds)
        for ds in sources
        if _class_of(ds) and patient_study_class(_class_of(ds)) != _class_of(ds)
    }
    if not own:
        return
    for item in _items(result, keywords):
        uid = item.get("ReferencedSOPInstanceUID")
        if uid is not None and str(uid) in own and "ReferencedSOPClassUID" in item:
            item.ReferencedSOPClassUID = own[str(uid)]
