"""Shared support for tests: external tools, Orthanc, ports and small DICOM objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")


def write_secondary_capture(
    path: Path,
    *,
    study_uid: str,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "Test Modality",
    series_number: int = 1,
    instance_number: int = 1,
    pixel_value: int = 0,
    rows: int = 16,
    columns: int = 16,
    patient_id: str = "TEST-0001",
    patient_name: str = "Test^Patient",
) -> Path:
    """Write a small, IOD-valid 8-bit Secondary Capture Image to ``path``.

    The pixel data is a ramp offset by ``pixel_value`` so that objects sharing
    a SOP Instance UID can be told apart by content.
    """
    sop_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.Laterality = ""
    ds.Manufacturer = manufacturer
    ds.ConversionType = "WSD"
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ramp = (np.arange(rows * columns, dtype=np.uint32) + pixel_value) % 256
    ds.PixelData = ramp.astype(np.uint8).tobytes()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
