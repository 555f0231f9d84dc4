"""Realistic DICOM source images for the result writers' tests."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_dx(
    study_uid: str,
    series_uid: str | None = None,
    number: int = 1,
    *,
    rows: int = 96,
    columns: int = 80,
    monochrome1: bool = False,
    pixels: np.ndarray | None = None,
    window: bool = True,
) -> Dataset:
    """A small 16-bit (12 stored) DX For Presentation image with a real DX header.

    ``pixels`` (rows x columns) defaults to a pattern covering the 12-bit range; ``window``
    False leaves out Window Center/Width.
    """
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101600"
    ds.ContentTime = "101700"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Example Imaging"
    ds.InstitutionName = "Example Hospital"
    ds.ReferringPhysicianName = "Doe^Referrer"
    ds.StationName = "DXROOM1"
    ds.StudyDescription = "XR CHEST 2 VIEWS"
    ds.SeriesDescription = "CHEST"
    ds.ManufacturerModelName = "DX-1000"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = "SN123"
    ds.SoftwareVersions = "1.0"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.PositionerType = ""
    ds.ViewPosition = "PA" if number == 1 else "LL"
    ds.ViewCodeSequence = Sequence(
        [
            code_item("399348003", "SCT", "postero-anterior")
            if number == 1
            else code_item("399173006", "SCT", "left lateral")
        ]
    )
    ds.AcquisitionContextSequence = Sequence()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "STUDY1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.PatientOrientation = ["L", "F"] if number == 1 else ["A", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([code_item("51185008", "SCT", "Chest")])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    if window:
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    if pixels is None:
        yy, xx = np.mgrid[0:rows, 0:columns]
        pixels = (yy * 29 + xx * 13) % 4096
    ds.PixelData = np.asarray(pixels, dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds
