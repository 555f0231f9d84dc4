"""Source images' headers, as the result objects copy patient, study and geometry from them."""

from __future__ import annotations

import copy

from pydicom import Dataset

__all__ = ["PATIENT_STUDY_TYPE2", "patient_study_header", "source_header"]

#: Patient and study attributes of type 2 in every result object; a source without one
#: (non-conformant, but stored all the same) gives it empty.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEX_VALUES = {"M", "F", "O"}
_PIXEL_DATA = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"}


def source_header(source: Dataset) -> Dataset:
    """Deep copy of ``source`` without its pixel data."""
    header = Dataset()
    for element in source:
        if element.keyword not in _PIXEL_DATA:
            header.add(copy.deepcopy(element))
    return header


def patient_study_header(source: Dataset) -> Dataset:
    """:func:`source_header`, with absent Type 2 patient/study attributes empty (as the IODs
    allow) and a Patient's Sex outside the enumerated values empty (unknown): what a result
    object copies its patient and study from."""
    header = source_header(source)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    sex = str(header.PatientSex or "").strip().upper()
    header.PatientSex = sex if sex in _PATIENT_SEX_VALUES else ""
    return header
