"""What result objects copy from their sources' headers (``acwi_node/results/headers.py``):
``copy_patient_and_study`` copies what highdicom's ``copy_patient_and_study_information``
copies, as copies, for sources of any shape; the values found in the field that highdicom
refuses or that fail validation (dates and times, Patient's Sex, Body Part Examined) are
cleaned in every result object: code sequences whose items are no usable code and optional
descriptions whose value their VR cannot hold too."""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from highdicom import SOPClass
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from acwi_node.ledger import Ledger
from acwi_node.results.codes import clean_code_sequences
from acwi_node.results.encoding import encode_part10
from acwi_node.results.headers import (
    copy_anatomy,
    copy_patient_and_study,
    frame_body_part,
    patient_study_header,
    source_header,
)
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.parametric_map import build_parametric_maps
from acwi_node.results.rejection import build_rejection_note
from acwi_node.results.sr import Verification, build_sr, build_verified_sr
from acwi_node.tasks import analyse
from models.data.synth import write_ct_series
from tests.support.dciodvfy import require_dciodvfy
from tests.support.dx import code_item, make_dx
from tests.support.review_case import review_settings, store_and_route
from tests.unit.test_parametric_map import analysis_of
from tests.unit.test_sr import make_study


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


# ---------------------------------------------------------------------------------------------
# Values found in the field, in every result object
# ---------------------------------------------------------------------------------------------


def as_read(ds: Dataset) -> Dataset:
    """``ds`` written and read back, as the node reads what it receives (its text decoded in
    its own character set)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the invalid values are the point
        ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def written(ds: Dataset) -> Dataset:
    """A result object as the node writes it, read back."""
    return dcmread(io.BytesIO(encode_part10(ds)))


def result_objects(
    edit: Callable[[Dataset], None], folder: Path, *, every_kind: bool = False
) -> dict[str, Dataset]:
    """Each kind of result object, written and read back, of sources edited by ``edit``: the
    SR and a heatmap of a radiograph study, the parametric map of a CT slice; with
    ``every_kind``, the verified SR too, and the rejection note of a heatmap that a release
    before this one wrote (which copied the source's attributes as sent)."""

    def edited(source: Dataset) -> Dataset:
        edit(source)
        return as_read(source)

    sources, analysis = make_study()
    sources = [edited(source) for source in sources]
    image = analysis.images[0]
    heatmap = build_heatmap_sc(
        sources[0], image.heatmap_array(), analysis, image, instance_number=1
    )
    ct = [edited(ct_slice(folder))]
    (pmap,) = build_parametric_maps(ct, analysis_of(ct))
    sr = build_sr(sources, analysis)
    results = {
        "sources": sources[0],
        "sr": written(sr),
        "heatmap": written(heatmap),
        "parametric map": written(pmap),
    }
    if every_kind:
        verdict = Verification(
            "Doe^Jane",
            "Example Hospital",
            "confirm",
            "effusion",
            "",
            dt.datetime(2024, 1, 16, tzinfo=dt.UTC),
        )
        results["verified sr"] = written(build_verified_sr(sr, sources, verdict))
        old_heatmap = written(heatmap)
        for keyword in ("ProcedureCodeSequence", "StudyDescription"):
            if keyword in sources[0]:  # as a release before this one copied it
                old_heatmap[keyword] = copy.deepcopy(sources[0][keyword])
        results["rejection note"] = written(build_rejection_note([old_heatmap], reason="quality"))
    return results


def validation_errors(results: dict[str, Dataset]) -> dict[str, list[str]]:
    """What dciodvfy finds wrong in each result object (not in its source)."""
    require_dciodvfy()
    from acwi_node.results.validate import run_dciodvfy

    return {kind: run_dciodvfy(ds).errors for kind, ds in results.items() if kind != "sources"}


NO_ERRORS: dict[str, list[str]] = {"sr": [], "heatmap": [], "parametric map": []}


@pytest.mark.parametrize(
    ("vr", "value", "expected"),
    [
        ("DA", "19670321", "19670321"),
        ("DA", " 19670321 ", "19670321"),
        ("DA", "1967-03-21", "19670321"),  # ISO 8601
        ("DA", "1967.03.21", "19670321"),  # ACR-NEMA
        ("DA", "00000000", ""),  # year 0
        ("DA", "19700230", ""),  # 30 February
        ("DA", "21/03/1967", ""),  # day and month: a guess
        ("DA", "1967-03.21", ""),
        ("DA", "+0010101", ""),  # pydicom reads it; DICOM does not
        ("DA", "196703", ""),
        ("TM", "101500", "101500"),
        ("TM", "10", "10"),
        ("TM", "101500.123456", "101500.123456"),
        ("TM", "10:15:00", "101500"),
        ("TM", "10:15", "1015"),
        ("TM", "10:15:00.5", "101500.5"),
        ("TM", "101500.1234567", "101500.123456"),  # below a microsecond: cut
        ("TM", "101500.", "101500"),
        ("TM", "240000", ""),
        ("TM", "1", ""),
        ("TM", "10h15", ""),
        ("DT", "20240115101500.123456+0100", "20240115101500.123456+0100"),
        ("DT", "2024", "2024"),
        ("DT", "2024-01-15T10:15", ""),
        ("DT", "20241315", ""),
    ],
)
def test_a_date_or_time_is_kept_repaired_or_empty(vr: str, value: str, expected: str) -> None:
    from acwi_node.results.headers import conformant_date_time

    assert conformant_date_time(vr, value) == expected


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientBirthDate", "00000000", ""),
        ("PatientBirthDate", "19700230", ""),
        ("PatientBirthDate", "1967-03-21", "19670321"),
        ("StudyDate", "2024-01-15", "20240115"),
        ("StudyTime", "10:15:00", "101500"),
        ("StudyTime", "101500.1234567", "101500.123456"),
        ("PatientBirthTime", "07:30", "0730"),
    ],
)
def test_results_of_a_source_with_a_non_conformant_date_or_time_are_written_and_valid(
    keyword: str, value: str, expected: str, tmp_path: Path
) -> None:
    """highdicom refused the whole study (the SR's constructor reads the dates with pydicom):
    every result object now has the date or time repaired where it can mean one thing only,
    else empty (Type 2), and validates."""
    results = result_objects(lambda ds: setattr(ds, keyword, value), tmp_path)
    assert str(results.pop("sources")[keyword].value) == value  # as the PACS sent it
    for kind, ds in results.items():
        assert str(ds[keyword].value) == expected, kind
    assert validation_errors(results) == NO_ERRORS


@pytest.mark.parametrize(("sex", "expected"), [("X", ""), ("m", "M"), (" f ", "F"), ("O", "O")])
def test_results_clean_the_patients_sex_the_heatmaps_too(
    sex: str, expected: str, tmp_path: Path
) -> None:
    """The SR and the parametric map cleaned Patient's Sex; the heatmaps copied it as sent."""
    results = result_objects(lambda ds: setattr(ds, "PatientSex", sex), tmp_path)
    del results["sources"]
    assert {kind: ds.PatientSex for kind, ds in results.items()} == dict.fromkeys(results, expected)
    assert validation_errors(results) == NO_ERRORS


def test_copy_patient_and_study_cleans_what_patient_study_header_cleans() -> None:
    source = make_dx(generate_uid())
    source.PatientSex = "m"
    source.PatientBirthDate = "1967-03-21"
    source.StudyDate = "00000000"
    source.StudyTime = "10:15:00"
    header = patient_study_header(source)
    copied = ours(source)
    for keyword, expected in {
        "PatientSex": "M",
        "PatientBirthDate": "19670321",
        "StudyDate": "",
        "StudyTime": "101500",
    }.items():
        assert copied[keyword].value == header[keyword].value == expected, keyword
    assert source.PatientSex == "m" and source.StudyDate == "00000000"  # the source as it was


@pytest.mark.parametrize("body_part", ["chest", " Chest ", "CHEST"])
def test_a_body_part_in_lower_case_is_written_and_looked_up_in_upper_case(
    body_part: str, tmp_path: Path
) -> None:
    """ "chest" was looked up as CHEST (unpaired: no Laterality) but written as sent: the
    heatmaps and the parametric map lacked the Laterality a body part that is not CHEST
    needs."""

    def edit(ds: Dataset) -> None:
        ds.BodyPartExamined = body_part
        for keyword in ("Laterality", "ImageLaterality"):
            if keyword in ds:
                delattr(ds, keyword)

    results = result_objects(edit, tmp_path)
    del results["sources"], results["sr"]  # the SR has no General Series anatomy
    for kind, ds in results.items():
        assert ds.BodyPartExamined == "CHEST", kind
        assert "Laterality" not in ds, kind
    assert validation_errors(results) == {"heatmap": [], "parametric map": []}


def test_copy_anatomy_writes_a_side_in_either_case() -> None:
    source = Dataset()
    source.BodyPartExamined = "breast"
    source.ImageLaterality = "l"
    result = Dataset()
    copy_anatomy(source, result)
    assert (result.BodyPartExamined, result.Laterality) == ("BREAST", "L")


def _enhanced_anatomy(code: tuple[str, str, str] | None, side: str, *, shared: bool) -> Dataset:
    """A source with a Frame Anatomy functional group (shared or the first frame's) of an
    anatomic region ``code`` (scheme, value, meaning) and Frame Laterality ``side``."""
    anatomy = Dataset()
    if code is not None:
        region = Dataset()
        region.CodingSchemeDesignator, region.CodeValue, region.CodeMeaning = code
        anatomy.AnatomicRegionSequence = [region]
    anatomy.FrameLaterality = side
    group = Dataset()
    group.FrameAnatomySequence = [anatomy]
    source = Dataset()
    if shared:
        source.SharedFunctionalGroupsSequence = [group]
    else:
        source.SharedFunctionalGroupsSequence = [Dataset()]
        source.PerFrameFunctionalGroupsSequence = [group, Dataset()]
    return source


@pytest.mark.parametrize(
    ("code", "side", "shared", "expected"),
    [
        # an unpaired region: Body Part Examined from its code, Laterality absent
        (("SCT", "816094009", "Chest"), "U", True, ("CHEST", None)),
        (("SCT", "816094009", "Chest"), "U", False, ("CHEST", None)),
        # a paired region: the frame's side
        (("SCT", "72696002", "Knee"), "L", True, ("KNEE", "L")),
        # both sides: not a value of Laterality, so unknown
        (("SCT", "76752008", "Breast"), "B", True, ("BREAST", "")),
        # a region of several words: its PS3.16 Annex L term
        (("SCT", "416775004", "Chest, Abdomen and Pelvis"), "U", True, ("CHESTABDPELVIS", None)),
        (("SCT", "122496007", "Lumbar spine"), "U", False, ("LSPINE", None)),
        # a region Annex L gives no term: no body part, the side still read
        (("SCT", "53505006", "Anus"), "R", True, (None, "R")),
        # no region: the side alone
        (None, "R", True, (None, "R")),
        (None, "U", True, (None, "")),
    ],
)
def test_an_enhanced_images_frame_anatomy_gives_body_part_and_side(
    code: tuple[str, str, str] | None,
    side: str,
    shared: bool,
    expected: tuple[str | None, str | None],
) -> None:
    """An Enhanced CT names its anatomy in the Frame Anatomy functional group, not in Body
    Part Examined: its heatmaps had an empty Laterality (dciodvfy: should be absent for an
    unpaired body part) and no body part."""
    result = Dataset()
    copy_anatomy(_enhanced_anatomy(code, side, shared=shared), result)
    assert (result.get("BodyPartExamined"), result.get("Laterality")) == expected


def test_a_sources_own_body_part_and_side_win_over_its_frame_anatomy() -> None:
    source = _enhanced_anatomy(("SCT", "72696002", "Knee"), "L", shared=True)
    source.BodyPartExamined = "HIP"
    source.ImageLaterality = "R"
    result = Dataset()
    copy_anatomy(source, result)
    assert (result.BodyPartExamined, result.Laterality) == ("HIP", "R")


@pytest.mark.parametrize("birth_date", ["1967-03-21", "19700230"])
def test_a_date_of_the_source_is_in_no_failure_reason_nor_log(
    birth_date: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real analyse task: a birth date highdicom could not read failed the study, with
    the date (patient data) in the ledger's reason and the worker's log. Now the study is
    analysed, and the date is nowhere."""
    source = make_dx(generate_uid())
    source.PatientBirthDate = birth_date
    path = tmp_path / "source.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.save_as(path, enforce_file_format=True)
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(settings, ledger, [path])
        caplog.clear()  # pydicom's warning of the test's own invalid value, written above
        with caplog.at_level(logging.DEBUG):
            outcome = analyse.run_job(settings, ledger, job_id)
        study = ledger.get_study(study_uid)
    finally:
        ledger.dispose()
    assert study is not None
    assert birth_date not in str(study.get("reason") or "")
    assert birth_date not in caplog.text
    assert outcome == "analysed" and study["state"] != "failed", study.get("reason")


# ---------------------------------------------------------------------------------------------
# Code sequences and descriptions found in the field, in every result object
# ---------------------------------------------------------------------------------------------

CHEST = ("RPID16", "RADLEX", "XR Chest 2 Views")
EVERY_KIND_VALID: dict[str, list[str]] = {
    kind: [] for kind in ("sr", "heatmap", "parametric map", "verified sr", "rejection note")
}


def _codes(ds: Dataset, keyword: str) -> list[tuple[str, str, str]] | None:
    if keyword not in ds:
        return None
    return [
        (
            str(item.get("CodeValue") or item.get("LongCodeValue")),
            str(item.CodingSchemeDesignator),
            str(item.CodeMeaning),
        )
        for item in ds[keyword].value
    ]


@pytest.mark.parametrize(
    "invalid",
    [
        pytest.param(("RPID17", "RADLEX", "M" * 65), id="meaning-over-64"),
        pytest.param(("", "RADLEX", "Empty code value"), id="empty-code-value"),
        pytest.param(("RPID17", "", "Empty scheme"), id="empty-scheme"),
        pytest.param(("RPID17", "RADLEX", ""), id="empty-meaning"),
    ],
)
def test_an_invalid_procedure_code_is_left_out_of_every_result_the_valid_one_kept(
    invalid: tuple[str, str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The source's Procedure Code Sequence was copied as sent into every result object,
    which then failed dciodvfy for the source's code; now the item that is no usable code is
    left out, the valid one kept, and nothing of the code is logged."""

    def edit(ds: Dataset) -> None:
        ds.ProcedureCodeSequence = [code_item(*invalid), code_item(*CHEST)]

    with caplog.at_level(logging.DEBUG):
        results = result_objects(edit, tmp_path, every_kind=True)
    assert len(results.pop("sources").ProcedureCodeSequence) == 2  # as the PACS sent it
    for kind, ds in results.items():
        assert _codes(ds, "ProcedureCodeSequence") == [CHEST], kind
    assert validation_errors(results) == EVERY_KIND_VALID
    for text in invalid:
        assert len(text) < 6 or text not in caplog.text


def test_a_code_sequence_left_without_a_valid_item_is_left_out(tmp_path: Path) -> None:
    """Optional code sequences of the Patient and Study modules (the Requesting Service's,
    the Admitting Diagnoses', one nested in the Referring Physician's identification) whose
    every item is invalid are left out; a Code Value over 16 characters is moved to Long Code
    Value."""

    def edit(ds: Dataset) -> None:
        ds.RequestingServiceCodeSequence = [code_item("", "99LOC", "No value")]
        ds.AdmittingDiagnosesCodeSequence = [code_item("D1", "99LOC", "")]
        person = Dataset()
        person.PersonIdentificationCodeSequence = [code_item("", "99LOC", "No value")]
        person.InstitutionName = "Example Hospital"
        ds.ReferringPhysicianIdentificationSequence = [person]
        ds.ProcedureCodeSequence = [code_item("LOCAL-PROCEDURE-17", "99LOC", "Chest")]

    results = result_objects(edit, tmp_path)
    del results["sources"]
    for kind, ds in results.items():
        for keyword in (
            "RequestingServiceCodeSequence",
            "AdmittingDiagnosesCodeSequence",
            "ReferringPhysicianIdentificationSequence",
        ):
            assert keyword not in ds, (kind, keyword)
        (procedure,) = ds.ProcedureCodeSequence
        assert "CodeValue" not in procedure, kind
        assert procedure.LongCodeValue == "LOCAL-PROCEDURE-17", kind
    assert validation_errors(results) == NO_ERRORS


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyDescription", "D" * 65),
        ("PatientComments", "first line\x01second"),
        ("PatientWeight", "72.50000000000001"),
        ("PatientAge", "61"),
        ("Occupation", "O" * 17),
    ],
)
def test_an_optional_description_its_vr_cannot_hold_is_left_out(
    keyword: str, value: str, tmp_path: Path
) -> None:
    results = result_objects(lambda ds: setattr(ds, keyword, value), tmp_path)
    assert str(results.pop("sources")[keyword].value) == value  # as the PACS sent it
    for kind, ds in results.items():
        assert keyword not in ds, kind
    assert validation_errors(results) == NO_ERRORS


def test_valid_descriptions_and_identifiers_are_copied_as_sent(tmp_path: Path) -> None:
    """A valid description is kept; an identifier is copied as sent even where its VR cannot
    hold it (an Accession Number of 17 characters): the archive files the result by it."""

    def edit(ds: Dataset) -> None:
        ds.StudyDescription = "D" * 64
        ds.PatientWeight = "72.5"
        ds.AccessionNumber = "A" * 17

    results = result_objects(edit, tmp_path)
    del results["sources"]
    for kind, ds in results.items():
        assert (ds.StudyDescription, str(ds.PatientWeight)) == ("D" * 64, "72.5"), kind
        assert ds.AccessionNumber == "A" * 17, kind


def test_a_malformed_code_sequence_never_stops_the_copy() -> None:
    ds = Dataset()
    ds.ProcedureCodeSequence = [Dataset(), code_item(*CHEST)]
    ds.ProcedureCodeSequence[0].CodeValue = ["A", "B"]
    nested = code_item(*CHEST)
    nested.EquivalentCodeSequence = [code_item("", "X", "")]
    ds.ReasonForPerformedProcedureCodeSequence = [nested]
    ds.PatientBreedCodeSequence = [code_item("", "X", "")]  # type 2C: kept, empty
    ds.StrainCodeSequence = []
    clean_code_sequences(ds)
    assert _codes(ds, "ProcedureCodeSequence") == [CHEST]
    (reason,) = ds.ReasonForPerformedProcedureCodeSequence
    assert "EquivalentCodeSequence" not in reason  # the code kept, its invalid equivalent not
    assert len(ds.PatientBreedCodeSequence) == 0
    assert len(ds.StrainCodeSequence) == 0


def _frames_of_regions(regions: list[tuple[str, str, str] | None]) -> Dataset:
    """An enhanced image whose frames each have a Frame Anatomy of their own, of the anatomic
    region in ``regions`` (scheme, value, meaning; None: a frame with no Frame Anatomy, which
    then has the shared one, of the chest)."""
    source = Dataset()
    source.NumberOfFrames = len(regions)
    shared = _enhanced_anatomy(("SCT", "816094009", "Chest"), "U", shared=True)
    source.SharedFunctionalGroupsSequence = shared.SharedFunctionalGroupsSequence
    groups = []
    for code in regions:
        group = Dataset()
        if code is not None:
            group = _enhanced_anatomy(code, "U", shared=True).SharedFunctionalGroupsSequence[0]
        groups.append(group)
    source.PerFrameFunctionalGroupsSequence = groups
    return source


def test_each_frame_has_its_own_body_part_and_the_image_the_one_they_share() -> None:
    """frame_body_part read the shared group, else the first frame's: a frame of the pelvis
    of a chest-abdomen-pelvis image was of the chest, and so was the image. Each frame has its
    own region now (its own group, else the shared one), and the image the one all share."""
    abdomen, pelvis = ("SCT", "818981001", "Abdomen"), ("SCT", "816092008", "Pelvis")
    source = _frames_of_regions([None, abdomen, pelvis])
    assert [frame_body_part(source, n) for n in (1, 2, 3)] == ["CHEST", "ABDOMEN", "PELVIS"]
    assert frame_body_part(source) == ""
    result = Dataset()
    copy_anatomy(source, result)
    assert "BodyPartExamined" not in result and result.Laterality == ""
    # a region of several words: its own term (PS3.16 Annex L), and none for the image
    several = _frames_of_regions([pelvis, ("SCT", "818982008", "Abdomen and Pelvis")])
    assert [frame_body_part(several, n) for n in (1, 2)] == ["PELVIS", "ABDOMENPELVIS"]
    assert frame_body_part(several) == ""
    # frames that agree: that body part, for the image and the series
    agree = _frames_of_regions([abdomen, abdomen, abdomen])
    assert frame_body_part(agree) == "ABDOMEN"
    copy_anatomy(agree, result)
    assert result.BodyPartExamined == "ABDOMEN" and "Laterality" not in result
