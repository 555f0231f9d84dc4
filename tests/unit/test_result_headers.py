"""What result objects copy from their sources' headers (``acwi_node/results/headers.py``):
``copy_patient_and_study`` copies what highdicom's ``copy_patient_and_study_information``
copies, as copies, for sources of any shape."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from highdicom import SOPClass
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from acwi_node.results.headers import copy_patient_and_study, source_header
from models.data.synth import write_ct_series
from tests.support.dx import make_dx


def result_object() -> SOPClass:
    return SOPClass(
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        sop_class_uid=SecondaryCaptureImageStorage,
        instance_number=1,
        modality="OT",
        manufacturer="ACWI",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def highdicoms_copy(source: Dataset) -> SOPClass:
    """The reference: highdicom's own copy, from a detached header."""
    result = result_object()
    result.copy_patient_and_study_information(source_header(source))
    return result


def ours(source: Dataset) -> SOPClass:
    result = result_object()
    copy_patient_and_study(source, result)
    return result


def same(a: Dataset, b: Dataset) -> None:
    skip = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}  # each object's own
    skip |= {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}
    keys_a = {e.keyword for e in a} - skip
    keys_b = {e.keyword for e in b} - skip
    assert keys_a == keys_b
    for keyword in keys_a:
        assert a[keyword].VR == b[keyword].VR, keyword
        assert a[keyword].value == b[keyword].value, keyword


def rich(source: Dataset) -> Dataset:
    """``source`` with more Patient and Study attributes, sequences among them, and some of
    the usual ones missing."""
    ds = copy.deepcopy(source)
    del ds.PatientBirthDate
    ds.PatientAge = "061Y"
    ds.PatientWeight = "72.5"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientComments = "comment"
    ds.ClinicalTrialSponsorName = "Sponsor"
    other = Dataset()
    other.PatientID = "OTHER1"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    code = Dataset()
    code.CodeValue = "RPID1"
    code.CodingSchemeDesignator = "99LOCAL"
    code.CodeMeaning = "Chest"
    ds.ProcedureCodeSequence = [code]
    ds.StudyDescription = "CHEST"
    return ds


def ct_slice(folder: Path) -> Dataset:
    return dcmread(write_ct_series(folder, slices=1, size=64, seed=1)[0])


@pytest.mark.parametrize("kind", ["dx", "dx-rich", "ct", "ct-rich"])
def test_the_same_attributes_and_values_as_highdicoms_copy(kind: str, tmp_path: Path) -> None:
    source = make_dx(generate_uid()) if kind.startswith("dx") else ct_slice(tmp_path)
    if kind.endswith("rich"):
        source = rich(source)
    same(ours(source), highdicoms_copy(source))
    assert "PatientAge" in ours(source) or not kind.endswith("rich")


def test_sources_of_one_shape_keep_their_own_values() -> None:
    """The attributes to copy are remembered per SOP class and shape, never the values."""
    first, second = make_dx(generate_uid()), make_dx(generate_uid())
    second.PatientName = "OTHER^PATIENT"
    second.AccessionNumber = "ACC0002"
    assert set(first.keys()) == set(second.keys())
    a, b = ours(first), ours(second)
    assert a.PatientName == first.PatientName and b.PatientName == "OTHER^PATIENT"
    assert b.AccessionNumber == "ACC0002"
    same(b, highdicoms_copy(second))


def test_the_result_shares_no_element_with_the_source() -> None:
    source = rich(make_dx(generate_uid()))
    result = ours(source)
    result.PatientName = "CHANGED^HERE"
    result.OtherPatientIDsSequence[0].PatientID = "CHANGED"
    result.ProcedureCodeSequence.append(Dataset())
    assert source.PatientName != "CHANGED^HERE"
    assert source.OtherPatientIDsSequence[0].PatientID == "OTHER1"
    assert len(source.ProcedureCodeSequence) == 1
