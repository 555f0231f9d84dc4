"""Procedure Reported (TID 1500) of the SR: the study's own coded procedures, read from the
source images, else the generic "Imaging procedure"."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from acwi_node.inference.types import StudyAnalysis
from acwi_node.results.encoding import encode_part10
from acwi_node.results.sr import build_sr, build_verified_sr
from tests.support.dcmtk import dsrdump_clean, require_dcmtk_tool
from tests.support.dx import code_item
from tests.unit.test_sr import make_study, needs_dciodvfy, verification
from tests.unit.test_sr_image_groups import _same_times

GENERIC = ("363679005", "SCT", "Imaging procedure")
CHEST_2_VIEWS = ("RPID16", "RADLEX", "XR Chest 2 Views")
CHEST_PA_LAT = ("36572-6", "LN", "XR Chest PA and Lateral")
_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")


def _requested(*codes: Dataset) -> Sequence:
    request = Dataset()
    request.RequestedProcedureCodeSequence = Sequence(list(codes))
    return Sequence([request])


def _procedures(document: Dataset) -> list[tuple[str, str, str]]:
    """Procedure Reported of ``document``: (value, scheme, meaning) of each, in order."""
    found: list[tuple[str, str, str]] = []
    for item in document.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) != ("DCM", "121058"):
            continue
        assert item.ValueType == "CODE"
        assert item.RelationshipType == "HAS CONCEPT MOD"
        code = item.ConceptCodeSequence[0]
        value = next(str(code[k].value) for k in _VALUES if k in code)
        found.append((value, str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
    return found


def _built(sources: list[Dataset], analysis: StudyAnalysis) -> Dataset:
    """The SR of the fast path (templates), checked to be byte for byte highdicom's own."""
    document = build_sr(sources, analysis, institution_name="Example Hospital")
    reference = build_sr(sources, analysis, institution_name="Example Hospital", check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    return pydicom.dcmread(io.BytesIO(encode_part10(document)))


def test_procedure_code_sequence_is_reported() -> None:
    sources, analysis = make_study()
    for ds in sources:
        ds.ProcedureCodeSequence = Sequence([code_item(*CHEST_2_VIEWS)])
    assert _procedures(_built(sources, analysis)) == [CHEST_2_VIEWS]


def test_requested_procedure_code_sequence_when_no_procedure_code() -> None:
    sources, analysis = make_study()
    for ds in sources:
        ds.RequestAttributesSequence = _requested(code_item(*CHEST_PA_LAT))
    assert _procedures(_built(sources, analysis)) == [CHEST_PA_LAT]


def test_requested_procedure_code_sequence_at_the_top_level() -> None:
    sources, analysis = make_study()
    sources[1].RequestedProcedureCodeSequence = Sequence([code_item(*CHEST_PA_LAT)])
    assert _procedures(_built(sources, analysis)) == [CHEST_PA_LAT]


def test_procedure_code_wins_over_the_requested_one() -> None:
    sources, analysis = make_study()
    sources[0].RequestAttributesSequence = _requested(code_item(*CHEST_PA_LAT))
    sources[1].ProcedureCodeSequence = Sequence([code_item(*CHEST_2_VIEWS)])
    assert _procedures(_built(sources, analysis)) == [CHEST_2_VIEWS]


def test_two_images_with_different_codes_report_both_once_in_order() -> None:
    sources, analysis = make_study()
    sources[0].ProcedureCodeSequence = Sequence([code_item(*CHEST_2_VIEWS)])
    sources[1].ProcedureCodeSequence = Sequence(
        [
            code_item(*CHEST_PA_LAT),
            code_item(*CHEST_2_VIEWS),
            code_item(CHEST_PA_LAT[0], "LN", "other name"),
        ]
    )
    sources[2].ProcedureCodeSequence = Sequence([code_item(*CHEST_2_VIEWS)])
    assert _procedures(_built(sources, analysis)) == [CHEST_2_VIEWS, CHEST_PA_LAT]


def _no_scheme() -> Dataset:
    item = Dataset()
    item.CodeValue = "P1"
    item.CodeMeaning = "Procedure without a scheme"
    return item


def _two_values() -> Dataset:
    item = code_item("P2", "99LOC", "Procedure with two code values")
    item.LongCodeValue = "P2-LONG-CODE-VALUE-123"
    return item


def _bad_version() -> Dataset:
    item = code_item("P3", "99LOC", "Procedure with a long scheme version")
    item.CodingSchemeVersion = "V" * 17
    return item


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(code_item("", "RADLEX", "Empty code value"), id="empty-value"),
        pytest.param(code_item("RPID16", "", "Empty scheme"), id="empty-scheme"),
        pytest.param(code_item("RPID16", "RADLEX", ""), id="empty-meaning"),
        pytest.param(code_item("RPID16", "RADLEX", "M" * 65), id="meaning-too-long-for-lo"),
        pytest.param(code_item("RPID16", "SCHEME-OVER-16-CH", "Long scheme"), id="scheme-too-long"),
        pytest.param(code_item("RP\tID", "RADLEX", "Control character"), id="control-character"),
        pytest.param(code_item("RPID16", "RADLEX", "X\x1b$BY"), id="escape-in-meaning"),
        pytest.param(_no_scheme(), id="missing-scheme"),
        pytest.param(_two_values(), id="two-code-values"),
        pytest.param(_bad_version(), id="scheme-version-too-long"),
        pytest.param(Dataset(), id="empty-item"),
    ],
)
def test_an_invalid_code_is_reported_as_the_generic_one(
    item: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """The code that is not usable becomes the generic one (once); a valid code beside it
    stays; nothing of the source's code is logged."""
    sources, analysis = make_study()
    sources[0].ProcedureCodeSequence = Sequence([item, code_item(*CHEST_2_VIEWS)])
    sources[1].ProcedureCodeSequence = Sequence([item])
    with caplog.at_level(logging.DEBUG):
        document = build_sr(sources, analysis)
    assert _procedures(document) == [GENERIC, CHEST_2_VIEWS]
    for value in item.values():
        if isinstance(value.value, str) and value.value:
            assert value.value not in caplog.text


def test_a_multi_valued_code_value_is_reported_as_the_generic_one() -> None:
    sources, analysis = make_study()
    item = code_item("A", "99LOC", "Two values")
    item.CodeValue = ["A", "B"]  # "A\\B" in the source
    sources[0].ProcedureCodeSequence = Sequence([item])
    assert _procedures(build_sr(sources, analysis)) == [GENERIC]


def test_no_procedure_code_is_the_generic_one() -> None:
    sources, analysis = make_study()
    for ds in sources:
        ds.ProcedureCodeSequence = Sequence()
    assert _procedures(_built(sources, analysis)) == [GENERIC]
    sources, analysis = make_study()
    assert _procedures(_built(sources, analysis)) == [GENERIC]


def _long_and_urn(urn_value: str) -> tuple[Dataset, Dataset]:
    """A code item with a Long Code Value and one with the URN Code Value ``urn_value``."""
    long_value = Dataset()
    long_value.LongCodeValue = "LOCAL-PROCEDURE-0000017"
    long_value.CodingSchemeDesignator = "99LOC"
    long_value.CodeMeaning = "Local procedure with a long code"
    urn = Dataset()
    urn.URNCodeValue = urn_value
    urn.CodingSchemeDesignator = "99URN"
    urn.CodeMeaning = "Procedure named by a URN"
    return long_value, urn


def test_long_and_urn_code_values() -> None:
    """A value over 16 characters is written as Long Code Value, a URN as URN Code Value (as
    the source has it), a short one as Code Value."""
    sources, analysis = make_study()
    long_value, urn = _long_and_urn("urn:oid:1.2.3")  # a URN of 16 characters or less stays a URN
    sources[0].ProcedureCodeSequence = Sequence([long_value, urn, code_item(*CHEST_2_VIEWS)])
    document = _built(sources, analysis)
    assert _procedures(document) == [
        ("LOCAL-PROCEDURE-0000017", "99LOC", "Local procedure with a long code"),
        ("urn:oid:1.2.3", "99URN", "Procedure named by a URN"),
        CHEST_2_VIEWS,
    ]
    written = [
        next(k for k in _VALUES if k in item.ConceptCodeSequence[0])
        for item in document.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert written == ["LongCodeValue", "URNCodeValue", "CodeValue"]


def test_a_meaning_the_sources_character_set_cannot_write_makes_the_sr_utf8() -> None:
    """A meaning from another source (or not in the first source's repertoire) is written as
    it is, in UTF-8; the verified SR keeps the procedures, in a character set that writes
    them."""
    sources, analysis = make_study()
    meaning = "Рентгенография грудной клетки"
    sources[1].ProcedureCodeSequence = Sequence([code_item("P1", "99LOC", meaning)])
    document = _built(sources, analysis)
    assert document.SpecificCharacterSet == "ISO_IR 192"
    assert _procedures(document) == [("P1", "99LOC", meaning)]
    verdict = verification()
    verified = build_verified_sr(document, sources, verdict)
    read = pydicom.dcmread(io.BytesIO(encode_part10(verified)))
    assert read.SpecificCharacterSet == "ISO_IR 192"
    assert _procedures(read) == [("P1", "99LOC", meaning)]


def _coded_study() -> tuple[list[Dataset], StudyAnalysis]:
    """A study whose images name four procedures: two short codes, a long one, a URN."""
    sources, analysis = make_study()
    long_value, urn = _long_and_urn("urn:oid:1.2.826.0.1.3680043.10.1137.5")
    sources[0].ProcedureCodeSequence = Sequence([code_item(*CHEST_2_VIEWS), long_value])
    sources[1].ProcedureCodeSequence = Sequence([code_item(*CHEST_PA_LAT), urn])
    return sources, analysis


def test_dcmtk_reads_the_procedures_without_a_complaint(tmp_path: Path) -> None:
    require_dcmtk_tool("dsrdump")
    sources, analysis = _coded_study()
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode_part10(build_sr(sources, analysis)))
    printed = dsrdump_clean(path)
    assert printed.count('CODE:(,,"Procedure reported")') == 4
    assert "(LOCAL-PROCEDURE-0000017,99LOC," in printed


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_with_procedure_codes() -> None:
    from acwi_node.results.validate import run_dciodvfy

    sources, analysis = _coded_study()
    document = build_sr(sources, analysis)
    assert len(_procedures(document)) == 4
    report = run_dciodvfy(document)
    assert report.iod == "Comprehensive3DSR"
    assert report.errors == [], report.output
