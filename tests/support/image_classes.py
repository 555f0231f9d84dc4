"""A small greyscale source image of any image storage SOP Class the node reads.

The classes are pydicom's image storage classes that :func:`~acwi_node.dicom_classes.
reads_nothing` lets a model read and whose IOD allows a greyscale image (the model reads no
colour image: :func:`~acwi_node.inference.image_checks.header_refusal`), retired ones
included. Each image has the modality of its IOD, one frame or two as its IOD is single- or
multi-frame, and for an enhanced IOD the functional groups the node reads its geometry from;
it is no complete instance of its IOD (the tests compare the results' validation with the
source's own).
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom._uid_dict import UID_dictionary
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

from acwi_node.dicom_classes import reads_nothing
from acwi_node.inference.types import ImageResult, ModelIdentity, StudyAnalysis, Uncertainty
from tests.support.dx import make_dx

__all__ = [
    "COLOUR_ONLY_CLASSES",
    "ENHANCED_CLASSES",
    "MULTI_FRAME_CLASSES",
    "image_classes",
    "make_image",
    "study_analysis",
]

S = "1.2.840.10008.5.1.4.1.1."
ROWS, COLUMNS = 40, 36

#: Image classes whose IOD allows no greyscale image (RGB or YBR only): the node reads none.
COLOUR_ONLY_CLASSES = frozenset(
    {S + "4.3", S + "7.4", S + "77.1.1.1", S + "77.1.2.1", S + "77.1.4.1", S + "77.1.7"}
)

#: Image classes whose IOD is multi-frame (the Multi-frame Module or the Multi-frame
#: Functional Groups Module; PS3.3 Annex A), retired and DICOS / DICONDE ones included.
MULTI_FRAME_CLASSES = frozenset(
    S + suffix
    for suffix in (
        "3", "3.1", "5", "20", "12.1", "12.1.1", "12.2", "12.2.1", "12.3", "128.1", "130",
        "13.1.1", "13.1.2", "13.1.3", "13.1.4", "13.1.5", "14.1", "14.2", "2.1", "2.2", "30",
        "4.1", "4.4", "481.1", "481.2", "481.23", "481.24", "501.1", "6.2", "6.3", "601.2",
        "7.1", "7.2", "7.3", "77.1.5.1", "77.1.5.2", "77.1.5.4", "77.1.5.5", "77.1.5.6",
        "77.1.5.8", "77.1.6", "77.1.8", "77.1.9", "77.2",
    )
)  # fmt: skip

#: Multi-frame classes whose IOD keeps each frame's geometry in functional groups.
ENHANCED_CLASSES = frozenset(
    S + suffix
    for suffix in (
        "12.1.1", "12.2.1", "128.1", "130", "13.1.1", "13.1.2", "13.1.3", "13.1.4", "13.1.5",
        "14.1", "14.2", "2.1", "2.2", "30", "4.1", "4.4", "481.23", "481.24", "501.1", "6.2",
        "6.3", "77.1.5.4", "77.1.5.5", "77.1.5.6", "77.1.5.8", "77.1.6", "77.1.8", "77.1.9",
    )
)  # fmt: skip

#: The modality of each class's IOD (or the usual one), by the longest class prefix.
_MODALITIES = {
    "1": "CR", "1.1": "DX", "1.2": "MG", "1.3": "IO", "12.1": "XA", "12.2": "RF",
    "12.3": "XA", "128": "PT", "130": "PT", "13.1.1": "XA", "13.1.2": "DX", "13.1.3": "MG",
    "13.1.4": "MG", "13.1.5": "MG", "14": "IVOCT", "2": "CT", "20": "NM", "3": "US",
    "30": "MR", "4": "MR", "481.1": "RTIMAGE", "481.2": "RTDOSE", "481.23": "RTIMAGE",
    "481.24": "RTIMAGE", "5": "NM", "501": "CT", "501.2": "DX", "6": "US", "6.3": "PA",
    "601": "EC", "7": "OT", "77": "XC", "77.1.1": "ES", "77.1.2": "GM", "77.1.3": "SM",
    "77.1.5": "OP", "77.1.5.4": "OPT", "77.1.5.7": "OPT", "77.1.5.8": "OPT", "77.1.6": "SM",
    "77.1.8": "CFM", "77.1.9": "CFM", "81": "OPM", "82": "OPM",
}  # fmt: skip
#: Image classes named "Map" (Pixel Data, no Multi-frame Module).
_MAPS = frozenset({S + "81.1", S + "82.1"})
#: Modalities whose images are in a frame of reference, with a position and orientation.
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT", "NM", "RTDOSE", "OPT", "PA", "IVOCT"})
#: What a DX image has that no other IOD's does.
_DX_ONLY = ("DetectorType", "ImagerPixelSpacing", "PositionerType", "ViewPosition")


def image_classes() -> list[str]:
    """The image storage classes pydicom knows whose images the node reads, in UID order."""
    found = []
    for uid, (name, kind, *_rest) in sorted(UID_dictionary.items()):
        if kind != "SOP Class" or not uid.startswith(S) or "Storage" not in name:
            continue
        if reads_nothing(uid) or uid in COLOUR_ONLY_CLASSES:
            continue
        if "Image" in name or uid in MULTI_FRAME_CLASSES or uid in _MAPS:
            found.append(uid)
    return found


def _modality(uid: str) -> str:
    suffix = uid[len(S) :]
    parts = suffix.split(".")
    for end in range(len(parts), 0, -1):
        found = _MODALITIES.get(".".join(parts[:end]))
        if found is not None:
            return found
    return "OT"


def make_image(uid: str, study_uid: str | None = None) -> Dataset:
    """A greyscale image of class ``uid`` (40 x 36 pixels, two frames for a multi-frame
    class), in study ``study_uid`` (None: a new one)."""
    ds = make_dx(study_uid or generate_uid(), generate_uid(), 1, rows=ROWS, columns=COLUMNS)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(uid)
    ds.Modality = _modality(uid)
    if ds.Modality not in {"DX", "MG", "IO"}:
        for keyword in (*_DX_ONLY, "PresentationIntentType"):
            delattr(ds, keyword)
    frames = 2 if uid in MULTI_FRAME_CLASSES else 1
    ds.PixelData = ds.PixelData * frames
    geometry = ds.Modality in _CROSS_SECTIONAL or uid in {S + "13.1.1", S + "13.1.3", S + "6.2"}
    enhanced = uid in ENHANCED_CLASSES
    if frames > 1:
        ds.NumberOfFrames = frames
        if not enhanced:
            ds.FrameIncrementPointer = 0x00181063  # Frame Time
            ds.FrameTime = 33.0
    if geometry or enhanced:
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
    if enhanced:
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing = [0.5, 0.5]
        measures.SliceThickness = 1.0
        shared.PixelMeasuresSequence = Sequence([measures])
        orientation = Dataset()
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PlaneOrientationSequence = Sequence([orientation])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per_frame = []
        for n in range(1, frames + 1):
            group = Dataset()
            content = Dataset()
            content.FrameAcquisitionNumber = n
            content.DimensionIndexValues = [n]
            group.FrameContentSequence = Sequence([content])
            position = Dataset()
            position.ImagePositionPatient = [0.0, 0.0, float(n)]
            group.PlanePositionSequence = Sequence([position])
            per_frame.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.ContentQualification = "PRODUCT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME" if geometry else "NONE", "NONE"]
    elif geometry:
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1.0
    return ds


def study_analysis(sources: list[Dataset], model: ModelIdentity) -> StudyAnalysis:
    """The model's result on ``sources``: per image, per frame of a multi-frame one, with a
    finding ("effusion") and a hot square in each heatmap."""
    heat = np.zeros((ROWS, COLUMNS), dtype=np.float32)
    heat[10:20, 10:20] = 1.0
    uncertainty = Uncertainty(entropy=0.5, epistemic=0.1, aleatoric=0.4, score=0.3)
    images = []
    for ds in sources:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for frame in [None] if frames == 1 else range(1, frames + 1):
            images.append(
                ImageResult(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    probabilities={"normal": 0.2, "effusion": 0.8},
                    uncertainty=uncertainty,
                    heatmap=heat,
                    ood_score=0.2,
                    frame_number=frame,
                )
            )
    return StudyAnalysis(
        model=model,
        labels=["normal", "effusion"],
        images=images,
        probabilities={"normal": 0.2, "effusion": 0.8},
        predicted_label="effusion",
        uncertainty=uncertainty,
        ood_score=0.2,
        needs_review=False,
        finding_labels=["effusion"],
        skipped={},
    )
