"""De-identifying exported images (PS3.15 Basic Profile): no identifier left anywhere in the
written file, the same replacements with the same key, references between images kept, the
image the model reads unchanged, and no new dciodvfy error."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from acwi_node.config import BurnedInRegions
from acwi_node.inference.preprocess import PreprocessSpec, to_unit_range
from acwi_node.review.deidentify import (
    DeidentificationRefused,
    Deidentifier,
)
from models.data.synth import write_enhanced_ct
from tests.support.dciodvfy import dciodvfy_errors, require_dciodvfy
from tests.support.dx import make_dx

KEY = b"k" * 32
#: Identifying text put in every attribute below; none of it may survive.
CANARIES = (
    "CANARYNAME",
    "CANARYID",
    "19450203",
    "CANARYACC",
    "CANARYHOSP",
    "CANARYSTREET",
    "CANARYDOC",
    "CANARYOPER",
    "CANARYPRIV",
    "CANARYOTHER",
    "CANARYNESTED",
    "CANARYOVERLAY",
    "CANARYCOMMENT",
    "CANARYSTATION",
    "CANARYREQ",
)
UID_PATTERN = re.compile(r"^2\.25\.[1-9][0-9]{0,38}$")


def identified_dx(study_uid: str | None = None) -> Dataset:
    """A real DX header with identifiers in the places a modality puts them."""
    ds = make_dx(study_uid or generate_uid())
    ds.PatientName = "CANARYNAME^CANARYGIVEN"
    ds.PatientID = "CANARYID"
    ds.IssuerOfPatientID = "HOSPITAL"
    ds.PatientBirthDate = "19450203"
    ds.PatientAge = "079Y"
    ds.PatientSex = "F"
    ds.PatientWeight = "61"
    ds.PatientAddress = "1 CANARYSTREET"
    ds.AccessionNumber = "CANARYACC"
    ds.InstitutionName = "CANARYHOSP"
    ds.InstitutionAddress = "2 CANARYSTREET"
    ds.ReferringPhysicianName = "CANARYDOC^Who"
    ds.PerformingPhysicianName = "CANARYDOC^Other"
    ds.OperatorsName = "CANARYOPER"
    ds.StationName = "CANARYSTATION"
    ds.ImageComments = "CANARYCOMMENT seen by Dr X"
    other = Dataset()
    other.PatientID = "CANARYOTHER"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureID = "CANARYREQ"
    request.ScheduledProcedureStepID = "CANARYREQ2"
    ds.RequestAttributesSequence = Sequence([request])
    source = Dataset()
    source.ReferencedSOPClassUID = ds.SOPClassUID
    source.ReferencedSOPInstanceUID = "1.2.3.4.5.6"
    ds.SourceImageSequence = Sequence([source])
    # A Person Name the profile's table does not list, inside a sequence it does not list.
    ds.AnatomicRegionSequence[0].EvaluatorName = "CANARYNESTED^Person"
    ds.add_new(0x00091010, "LO", "CANARYPRIV")
    ds.add_new(0x00090010, "LO", "VENDOR")  # its private creator
    ds.add_new(0x60000022, "LO", "CANARYOVERLAY")  # Overlay Description
    ds.FrameOfReferenceUID = "1.2.3.4.5.7"
    return ds


def written(ds: Dataset, path: Path) -> bytes:
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_no_identifier_is_left_in_the_written_file(tmp_path: Path) -> None:
    ds = identified_dx()
    original = written(ds, tmp_path / "before.dcm")
    assert all(c.encode() in original for c in CANARIES if c != "CANARYREQ"), "a canary unset"
    Deidentifier(KEY).apply(ds)
    data = written(ds, tmp_path / "after.dcm")
    left = [c for c in CANARIES if c.encode() in data]
    assert left == []
    for private in (0x00091010, 0x00090010):
        assert private not in ds
    assert not any(elem.tag.group == 0x6000 for elem in ds)
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Profile" in " ".join(ds.DeidentificationMethod)
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113108"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_uids_are_replaced_the_same_way_every_time_and_references_hold() -> None:
    study = generate_uid()
    first, second = identified_dx(study), identified_dx(study)
    originals = {
        "study": first.StudyInstanceUID,
        "series": first.SeriesInstanceUID,
        "sop": first.SOPInstanceUID,
    }
    deid = Deidentifier(KEY)
    deid.apply(first)
    Deidentifier(KEY).apply(second)  # another export, the same key
    assert first.StudyInstanceUID == second.StudyInstanceUID == deid.uid(originals["study"])
    assert first.SeriesInstanceUID == deid.uid(originals["series"])
    assert first.SOPInstanceUID == deid.uid(originals["sop"])
    assert first.SOPInstanceUID != second.SOPInstanceUID  # two images stay two
    reference = first.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert reference == deid.uid("1.2.3.4.5.6")
    assert first.FrameOfReferenceUID == deid.uid("1.2.3.4.5.7")
    for uid in (first.StudyInstanceUID, first.SOPInstanceUID, reference):
        assert UID_PATTERN.match(uid) and len(uid) <= 64
    assert first.SOPClassUID == second.SOPClassUID  # the class is not an identifier
    other = identified_dx(study)
    Deidentifier(b"x" * 32).apply(other)
    assert other.StudyInstanceUID != first.StudyInstanceUID  # another key, other UIDs


def test_a_patient_keeps_one_pseudonym_that_depends_on_the_key_and_issuer() -> None:
    deid = Deidentifier(KEY)
    ds = identified_dx()
    deid.apply(ds)
    assert ds.PatientID == str(ds.PatientName) == deid.pseudonym("CANARYID", "HOSPITAL")
    assert ds.PatientID.startswith("ANON-") and len(ds.PatientID) <= 64
    assert deid.pseudonym("CANARYID", "HOSPITAL") != deid.pseudonym("CANARYID", "OTHER")
    assert deid.pseudonym("CANARYID") != Deidentifier(b"x" * 32).pseudonym("CANARYID")
    with pytest.raises(ValueError, match="16 bytes"):
        Deidentifier(b"short")


@pytest.mark.parametrize("retain", [True, False])
def test_patient_characteristics_are_kept_only_with_the_option(retain: bool) -> None:
    ds = identified_dx()
    Deidentifier(KEY, retain_patient_characteristics=retain).apply(ds)
    assert ("PatientAge" in ds) is retain
    assert ("PatientWeight" in ds) is retain
    if retain:
        assert (ds.PatientAge, ds.PatientSex) == ("079Y", "F")
    else:
        assert ds.get("PatientSex", "") == ""  # Type 2: present and empty
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert ("113108" in codes) is retain


def test_an_image_with_burned_in_annotation_is_refused() -> None:
    ds = identified_dx()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationRefused, match="Burned In Annotation"):
        Deidentifier(KEY).apply(ds)


def test_the_image_the_model_reads_is_unchanged(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path / "ct", slices=3, size=64)
    spec = PreprocessSpec(size=64)
    before = [to_unit_range(pydicom.dcmread(path), spec, n) for n in (1, 2, 3)]
    ds = pydicom.dcmread(path)
    Deidentifier(KEY).apply(ds)
    out = tmp_path / "deid.dcm"
    ds.save_as(out, enforce_file_format=True)
    after = [to_unit_range(pydicom.dcmread(out), spec, n) for n in (1, 2, 3)]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    frame = pydicom.dcmread(out).PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    assert frame.get("FrameAcquisitionDateTime", "19000101000000") == "19000101000000"


def _dated(patient_id: str, study_date: str, time: str = "101500") -> Dataset:
    ds = identified_dx()
    ds.PatientID = patient_id
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = time
    ds.AcquisitionDateTime = f"{study_date}{time}.123456+0100"
    ds.DateOfLastCalibration = [study_date, "20231231"]  # several values
    ds.InstanceCreationDate = "2024"  # not a readable date: the dummy
    ds.AnatomicRegionSequence[0].add_new(0x00400244, "DA", study_date)  # an item's date
    return ds


def test_dates_move_back_by_one_shift_per_patient_with_the_modified_dates_option(
    tmp_path: Path,
) -> None:
    """With ``shift_dates`` every date of a patient's images moves back by the same 365 to
    3,649 days (another patient's by another), times of day and intervals kept; the birth
    date is emptied as without the option; the method says so."""
    deid = Deidentifier(KEY, shift_dates=True)
    first, later = _dated("CANARYID", "20240115"), _dated("CANARYID", "20240301", "080000")
    other = _dated("PATIENT2", "20240115")
    for ds in (first, later, other):
        deid.apply(ds)

    def day(text: str) -> dt.date:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()

    shift = dt.date(2024, 1, 15) - day(first.StudyDate)
    assert 365 <= shift.days <= 3649
    assert dt.date(2024, 3, 1) - day(later.StudyDate) == shift  # one shift per patient
    assert day(later.StudyDate) - day(first.StudyDate) == dt.timedelta(days=46)  # the interval
    assert dt.date(2024, 1, 15) - day(other.StudyDate) != shift  # another patient's
    for ds in (first, later):
        moved = (day(ds.StudyDate) + shift).strftime("%Y%m%d")
        assert moved in ("20240115", "20240301")
        assert {ds.SeriesDate, ds.ContentDate, ds.AcquisitionDate} == {ds.StudyDate}
        assert ds.AnatomicRegionSequence[0][0x00400244].value == ds.StudyDate
    assert first.AcquisitionDateTime == f"{first.StudyDate}101500.123456+0100"  # time kept
    assert first.StudyTime == "101500" and later.StudyTime == "080000"
    assert list(first.DateOfLastCalibration) == [
        first.StudyDate,
        (dt.date(2023, 12, 31) - shift).strftime("%Y%m%d"),
    ]
    assert first.InstanceCreationDate == "19000101"
    assert first.get("PatientBirthDate", "") == ""
    assert first.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in first.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]
    assert "Modified Dates Option" in " ".join(first.DeidentificationMethod)
    data = written(first, tmp_path / "shifted.dcm")
    assert b"20240115" not in data and b"19450203" not in data
    # without the option the dates are emptied or dummies, as the profile's table says
    plain = _dated("CANARYID", "20240115")
    Deidentifier(KEY).apply(plain)
    assert plain.StudyDate == "" and plain.get("AcquisitionDateTime", "") in ("", "19000101000000")
    assert plain.LongitudinalTemporalInformationModified == "REMOVED"


@pytest.mark.parametrize("shift_dates", [False, True])
@pytest.mark.parametrize("kind", ["dx", "enhanced-ct"])
def test_no_new_dciodvfy_error(tmp_path: Path, kind: str, shift_dates: bool) -> None:
    require_dciodvfy()
    if kind == "dx":
        source = tmp_path / "dx.dcm"
        identified_dx().save_as(source, enforce_file_format=True)
    else:
        source = write_enhanced_ct(tmp_path / "ct", slices=2, size=64)
    ds = pydicom.dcmread(source)
    Deidentifier(KEY, shift_dates=shift_dates).apply(ds)
    out = tmp_path / "deid.dcm"
    ds.save_as(out, enforce_file_format=True)
    before = set(dciodvfy_errors(source))
    assert [e for e in dciodvfy_errors(out) if e not in before] == []


# ------------------------------------------------------------- Clean Pixel Data Option
def _text(monochrome1: bool) -> int:
    """The burned-in text's value: shown white (the lowest value for MONOCHROME1)."""
    return 0 if monochrome1 else TEXT


#: A device that burns the patient's name into the top left corner of its radiographs.
CORNER = BurnedInRegions(manufacturer="Acme Imaging", model="XR-9", regions=[[0, 0, 29, 9]])
TEXT = 4095  # the burned-in text: the brightest value


def _burned_dx(*, monochrome1: bool = False, flag: str | None = "YES") -> Dataset:
    pixels = np.full((96, 80), 1000, dtype=np.uint16)
    pixels[2:8, 1:28] = _text(monochrome1)  # the name, inside the region
    pixels[50:60, 40:50] = 3000  # anatomy, outside it
    ds = make_dx(generate_uid(), pixels=pixels, monochrome1=monochrome1)
    ds.Manufacturer = "ACME IMAGING"  # matched without regard to case
    ds.ManufacturerModelName = "XR-9"
    if flag is not None:
        ds.BurnedInAnnotation = flag
    return ds


@pytest.mark.parametrize("monochrome1", [False, True])
def test_the_regions_of_a_named_kind_of_image_are_blanked(monochrome1: bool) -> None:
    """The region turns black (the lowest value; the highest for MONOCHROME1) and nothing
    else changes; the image then says Burned In Annotation NO and names the option."""
    ds = _burned_dx(monochrome1=monochrome1)
    before = ds.pixel_array.copy()
    Deidentifier(KEY, burned_in=[CORNER]).apply(ds)
    after = ds.pixel_array
    black = before.max() if monochrome1 else before.min()
    assert (after[0:10, 0:30] == black).all()
    assert _text(monochrome1) not in after[0:10, 0:30]
    assert np.array_equal(after[10:, :], before[10:, :])
    assert np.array_equal(after[:10, 30:], before[:10, 30:])
    assert ds.BurnedInAnnotation == "NO"
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert "113101" in codes
    assert "Clean Pixel Data Option" in list(ds.DeidentificationMethod)
    assert "pixel data not cleaned" not in list(ds.DeidentificationMethod)


def test_an_image_of_another_kind_is_left_as_it_is_or_refused() -> None:
    """Another model: its pixels are untouched, and with Burned In Annotation YES the image is
    refused as before, the message naming the setting."""
    other = BurnedInRegions(manufacturer="Acme Imaging", model="XR-1", regions=[[0, 0, 9, 9]])
    plain = _burned_dx(flag=None)
    before = plain.pixel_array.copy()
    Deidentifier(KEY, burned_in=[other]).apply(plain)
    assert np.array_equal(plain.pixel_array, before)
    assert "113101" not in [i.CodeValue for i in plain.DeidentificationMethodCodeSequence]
    assert "pixel data not cleaned" in list(plain.DeidentificationMethod)
    with pytest.raises(DeidentificationRefused, match=r"feedback\.burned_in"):
        Deidentifier(KEY, burned_in=[other]).apply(_burned_dx())
    # a named kind is cleaned even when it does not say it carries text
    unsaid = _burned_dx(flag=None)
    Deidentifier(KEY, burned_in=[CORNER]).apply(unsaid)
    assert unsaid.BurnedInAnnotation == "NO" and TEXT not in unsaid.pixel_array[:10, :30]


def test_every_frame_is_blanked_and_compressed_pixels_are_stored_plain(tmp_path: Path) -> None:
    """An Enhanced CT's frames each lose the region; an RLE-compressed image is decoded,
    blanked and stored uncompressed (Explicit VR Little Endian)."""
    source = write_enhanced_ct(tmp_path / "ct", slices=3, size=64)
    ct = pydicom.dcmread(source)
    band = BurnedInRegions(modality="CT", rows=64, regions=[[0, 60, 63, 70]])  # cut at the edge
    before = ct.pixel_array.copy()
    Deidentifier(KEY, burned_in=[band]).apply(ct)
    after = ct.pixel_array
    assert after.shape == before.shape == (3, 64, 64)
    assert (after[:, 60:, :] == before.min()).all()
    assert np.array_equal(after[:, :60, :], before[:, :60, :])

    from pydicom.uid import RLELossless

    rle = _burned_dx()
    plain = rle.pixel_array.copy()
    rle.compress(RLELossless)
    Deidentifier(KEY, burned_in=[CORNER]).apply(rle)
    assert rle.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (rle.pixel_array[:10, :30] == plain.min()).all()
    assert np.array_equal(rle.pixel_array[10:], plain[10:])


def test_a_colour_image_is_blanked_to_black_in_every_channel() -> None:
    from acwi_node.review.pixel_cleaning import blank_regions

    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.set_pixel_data(np.full((20, 30, 3), 200, dtype=np.uint8), "RGB", 8)
    assert blank_regions(ds, [[0, 0, 9, 4], [25, 15, 99, 99]]) == 50 + 25
    pixels = ds.pixel_array
    assert (pixels[:5, :10] == 0).all() and (pixels[15:, 25:] == 0).all()
    assert (pixels[5:15, :] == 200).all() and ds.PhotometricInterpretation == "RGB"


def test_a_signature_must_name_its_images_and_give_whole_regions() -> None:
    with pytest.raises(ValueError, match="name the images"):
        BurnedInRegions(regions=[[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="x0 <= x1"):
        BurnedInRegions(modality="US", regions=[[5, 0, 1, 1]])
    with pytest.raises(ValueError, match="x0 <= x1"):
        BurnedInRegions(modality="US", regions=[[0, 0, 1]])
    with pytest.raises(ValueError):
        BurnedInRegions(modality="US", regions=[])


def test_a_cleaned_image_has_no_new_dciodvfy_error(tmp_path: Path) -> None:
    require_dciodvfy()
    source = tmp_path / "burned.dcm"
    _burned_dx().save_as(source, enforce_file_format=True)
    ds = pydicom.dcmread(source)
    Deidentifier(KEY, burned_in=[CORNER]).apply(ds)
    out = tmp_path / "clean.dcm"
    ds.save_as(out, enforce_file_format=True)
    before = set(dciodvfy_errors(source))
    assert [e for e in dciodvfy_errors(out) if e not in before] == []
