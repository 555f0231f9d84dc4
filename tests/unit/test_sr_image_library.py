"""The SR's Image Library entries encoded from templates (results/image_library.py): byte for
byte the library highdicom builds entry by entry, or highdicom's own where a template cannot
describe an image."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence

import numpy as np
import pydicom
import pytest
from highdicom.sr import ImageLibrary
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, generate_uid

from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty
from acwi_node.results.encoding import encode_items, encode_part10
from acwi_node.results.image_library import plan_image_library
from acwi_node.results.library_descriptors import library_descriptors
from acwi_node.results.sr import Verification, build_sr, build_verified_sr, summarise_sr
from bench.common import ct_slice
from tests.support.dx import code_item, make_dx
from tests.unit.test_sr import LABELS, needs_dciodvfy
from tests.unit.test_sr_image_groups import _same_times, study_analysis


def _sources() -> list[Dataset]:
    """Two CT series in two frames of reference (six and three slices) and three DX images."""
    study = generate_uid()
    first, second = generate_uid(), generate_uid()
    frame_a, frame_b = generate_uid(), generate_uid()
    sources = [ct_slice(study, first, i, size=16, frame_of_reference_uid=frame_a) for i in range(6)]
    sources += [
        ct_slice(study, second, i, size=16, frame_of_reference_uid=frame_b) for i in range(3)
    ]
    sources[7].ImagePositionPatient = [-12.5, 33.25, -1024.125]  # values of other lengths
    sources[7].SliceThickness = 0.625
    dx_series = generate_uid()
    sources += [make_dx(study, dx_series, n, rows=24, columns=20) for n in range(1, 4)]
    return sources


def _analysis(sources: Sequence[Dataset], *, frames: bool = False) -> StudyAnalysis:
    """A result for each source; ``frames``: for each frame of each source instead, as the
    node analyses a multi-frame image."""
    images = [
        ImageResult(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            probabilities={label: 0.25 for label in LABELS},
            uncertainty=Uncertainty(entropy=0.5, epistemic=0.1, aleatoric=0.4, score=0.3),
            heatmap=np.zeros((int(ds.Rows), int(ds.Columns)), dtype=np.float32),
            ood_score=0.2,
            frame_number=n if frames else None,
        )
        for ds in sources
        for n in (range(1, int(ds.NumberOfFrames) + 1) if frames else [None])
    ]
    return study_analysis(images)


def _library_groups(document: Dataset) -> list[Dataset]:
    library = next(
        item
        for item in document.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    return list(library.ContentSequence)


def _templated(group: Dataset) -> bool:
    return isinstance(group.get_item(0x0040A730), RawDataElement)


def test_library_of_several_series_is_highdicoms() -> None:
    sources = _sources()
    analysis = _analysis(sources)
    plan = plan_image_library(sources)
    assert plan is not None
    # One group per frame of reference for the CT slices, one for the radiographs.
    assert [len(rest) + 1 for rest in plan.rest] == [6, 3, 3]
    document = build_sr(sources, analysis)
    groups = _library_groups(document)
    assert [_templated(group) for group in groups] == [True, True, True]
    reference = build_sr(sources, analysis, check_all=True)
    assert not any(_templated(group) for group in _library_groups(reference))
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    entries = [len(group.ContentSequence) for group in _library_groups(document)]
    assert entries == [6, 3, 3]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("SliceThickness", None), ("ImagePositionPatient", [1.0, 2.0]), ("Modality", None)],
)
def test_an_image_highdicom_cannot_describe_leaves_the_library_to_highdicom(
    keyword: str, value: object
) -> None:
    """An empty slice thickness, a position with two values, no modality: highdicom leaves
    the image out of the library (or refuses it), and so does the node."""
    sources = _sources()
    if value is None and keyword == "Modality":
        del sources[4].Modality
    else:
        setattr(sources[4], keyword, value)
    analysis = _analysis(sources)
    assert plan_image_library(sources) is None
    document = build_sr(sources, analysis)
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)


def test_templated_library_with_the_studys_procedures_is_highdicoms() -> None:
    """The sources' procedure codes (Procedure Reported, beside the Image Library in the root
    content) change nothing of the templated entries: the document is still highdicom's."""
    sources = _sources()
    for ds in sources:
        modality = str(ds.Modality)
        ds.ProcedureCodeSequence = DicomSequence(
            [code_item(f"P-{modality}", "99LOC", f"{modality} procedure")]
        )
    analysis = _analysis(sources)
    document = build_sr(sources, analysis)
    assert all(_templated(group) for group in _library_groups(document))
    reported = [
        item.ConceptCodeSequence[0].CodeValue
        for item in document.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert reported == ["P-CT", "P-DX"]
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)


# ---------------------------------------------------------------------------------------------
# Image Laterality and Image View (TID 1602 row 3, TID 1603 rows 1-2) of projection radiographs
# ---------------------------------------------------------------------------------------------

MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
_LATERALITY = ("DCM", "111027")
_VIEW = ("DCM", "111031")
_VIEW_MODIFIER = ("DCM", "111032")
_CC = ("399162004", "SCT", "cranio-caudal")
_MLO = ("399368009", "SCT", "medio-lateral oblique")
_MAGNIFICATION = ("399163009", "SCT", "Magnification")
_LEFT = ("7771000", "SCT", "Left")
_RIGHT = ("24028007", "SCT", "Right")


def _mammogram(
    study: str, series: str, number: int, laterality: str, view: tuple[str, str, str]
) -> Dataset:
    """A small MG For Presentation image: the DX header with MG's class, modality, laterality
    and view."""
    ds = make_dx(study, series, number, rows=24, columns=20)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.Modality = "MG"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.ViewPosition = "CC" if view == _CC else "MLO"
    ds.ViewCodeSequence = DicomSequence([code_item(*view)])
    ds.PatientOrientation = ["P", "L"] if laterality == "R" else ["A", "R"]
    return ds


def _four_views() -> list[Dataset]:
    """A screening mammogram: R CC, L CC, R MLO, L MLO (the right MLO magnified)."""
    study, series = generate_uid(), generate_uid()
    views = [("R", _CC), ("L", _CC), ("R", _MLO), ("L", _MLO)]
    sources = [
        _mammogram(study, series, n, side, view) for n, (side, view) in enumerate(views, start=1)
    ]
    sources[2].ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence(
        [code_item(*_MAGNIFICATION)]
    )
    return sources


def _code(item: Dataset) -> tuple[str, str, str]:
    code = item.ConceptCodeSequence[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return (str(value), str(code.CodingSchemeDesignator), str(code.CodeMeaning))


def _name(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return (str(name.CodingSchemeDesignator), str(name.CodeValue))


def _entries(document: Dataset) -> dict[str, Dataset]:
    """The Image Library's entries, by SOP Instance UID."""
    return {
        str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): entry
        for group in _library_groups(document)
        for entry in group.ContentSequence
        if entry.ValueType == "IMAGE"
    }


def _described(entry: Dataset) -> dict[str, object]:
    """What an entry says of its image's laterality and view."""
    found: dict[str, object] = {}
    for item in entry.ContentSequence:
        if _name(item) == _LATERALITY:
            assert item.ValueType == "CODE"
            assert item.RelationshipType == "HAS ACQ CONTEXT"
            found["laterality"] = _code(item)
        elif _name(item) == _VIEW:
            assert item.ValueType == "CODE"
            assert item.RelationshipType == "HAS ACQ CONTEXT"
            found["view"] = _code(item)
            modifiers = []
            for child in item.get("ContentSequence") or []:
                assert _name(child) == _VIEW_MODIFIER
                assert child.ValueType == "CODE"
                assert child.RelationshipType == "HAS CONCEPT MOD"
                modifiers.append(_code(child))
            found["modifiers"] = modifiers
    return found


def _same_as_highdicom(sources: list[Dataset]) -> Dataset:
    """The SR of ``sources`` (templates), asserted to be the one highdicom builds entry by
    entry."""
    analysis = _analysis(sources)
    document = build_sr(sources, analysis)
    reference = build_sr(sources, analysis, check_all=True)
    assert not any(_templated(group) for group in _library_groups(reference))
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    return document


def test_mammography_entries_say_each_views_laterality_and_view() -> None:
    sources = _four_views()
    document = _same_as_highdicom(sources)
    assert [_templated(group) for group in _library_groups(document)] == [True]
    entries = _entries(document)
    described = [_described(entries[str(ds.SOPInstanceUID)]) for ds in sources]
    assert described == [
        {"laterality": _RIGHT, "view": _CC, "modifiers": []},
        {"laterality": _LEFT, "view": _CC, "modifiers": []},
        {"laterality": _RIGHT, "view": _MLO, "modifiers": [_MAGNIFICATION]},
        {"laterality": _LEFT, "view": _MLO, "modifiers": []},
    ]
    # after highdicom's own descriptors (as its additional_descriptors would be), laterality
    # first
    names = [_name(item) for item in entries[str(sources[0].SOPInstanceUID)].ContentSequence]
    assert names[0] == ("DCM", "121139")  # Modality
    assert names[-2:] == [_LATERALITY, _VIEW]


def test_the_sr_reader_reads_a_mammogram_sr_back() -> None:
    sources = _four_views()
    buf = io.BytesIO()
    build_sr(sources, _analysis(sources)).save_as(buf, enforce_file_format=True)
    summary = summarise_sr(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    uids = sorted(str(ds.SOPInstanceUID) for ds in sources)
    assert summary["referenced_sop_instance_uids"] == uids
    assert sorted(summary["image_probabilities"]) == uids
    assert summary["probabilities"] == {label: 0.25 for label in LABELS}


def test_laterality_and_view_codes_written_as_the_source_has_them() -> None:
    """Laterality (0020,0060) where the image has no Image Laterality; a view's Long Code
    Value, URN Code Value and Coding Scheme Version as the source writes them; several
    modifiers: every shape of code the templates write, and highdicom's bytes."""
    sources = _four_views()
    del sources[0].ImageLaterality
    sources[0].Laterality = "R"
    sources[1].ImageLaterality = "B"
    long_view = code_item("", "RADLEX", "cranio-caudal (local)")
    del long_view.CodeValue
    long_view.LongCodeValue = "RID10000-LONG-CODE-VALUE"
    long_view.CodingSchemeVersion = "4.1"
    long_view.ViewModifierCodeSequence = DicomSequence(
        [code_item(*_MAGNIFICATION), code_item("399055006", "SCT", "Spot Compression")]
    )
    sources[1].ViewCodeSequence = DicomSequence([long_view])
    urn_view = Dataset()
    urn_view.URNCodeValue = "urn:oid:1.2.3.4.5"
    urn_view.CodingSchemeDesignator = "99LOC"
    urn_view.CodeMeaning = "local view"
    sources[3].ViewCodeSequence = DicomSequence([urn_view])
    document = _same_as_highdicom(sources)
    assert all(_templated(group) for group in _library_groups(document))
    entries = _entries(document)
    described = [_described(entries[str(ds.SOPInstanceUID)]) for ds in sources]
    assert described[0]["laterality"] == _RIGHT
    assert described[1] == {
        "laterality": ("51440002", "SCT", "Bilateral"),
        "view": ("RID10000-LONG-CODE-VALUE", "RADLEX", "cranio-caudal (local)"),
        "modifiers": [_MAGNIFICATION, ("399055006", "SCT", "Spot Compression")],
    }
    view_code = next(
        item.ConceptCodeSequence[0]
        for item in entries[str(sources[1].SOPInstanceUID)].ContentSequence
        if _name(item) == _VIEW
    )
    assert "CodeValue" not in view_code
    assert view_code.CodingSchemeVersion == "4.1"
    assert described[3]["view"] == ("urn:oid:1.2.3.4.5", "99LOC", "local view")


@pytest.mark.parametrize(
    "broken",
    ["laterality X", "laterality U", "view without meaning", "view of two values", "modifier"],
)
def test_an_unusable_laterality_or_view_is_left_out(broken: str) -> None:
    """A value the SR cannot write as it is leaves that descriptor out (a view's modifiers with
    it), never the SR; the other images keep theirs, and the library is highdicom's."""
    sources = _four_views()
    target = sources[2]  # R MLO, magnified
    expected = {"laterality": _RIGHT, "view": _MLO, "modifiers": [_MAGNIFICATION]}
    if broken == "laterality X":
        target.ImageLaterality = "X"
        del expected["laterality"]
    elif broken == "laterality U":
        target.ImageLaterality = "U"
        del expected["laterality"]
    elif broken == "view without meaning":
        del target.ViewCodeSequence[0].CodeMeaning
        del expected["view"], expected["modifiers"]
    elif broken == "view of two values":
        target.ViewCodeSequence[0].LongCodeValue = "399368009-AS-LONG-CODE"
        del expected["view"], expected["modifiers"]
    else:
        target.ViewCodeSequence[0].ViewModifierCodeSequence.insert(
            0, code_item("399163009", "SCT", "bad\\meaning")
        )
    document = _same_as_highdicom(sources)
    entries = _entries(document)
    assert _described(entries[str(target.SOPInstanceUID)]) == expected
    assert _described(entries[str(sources[3].SOPInstanceUID)]) == {
        "laterality": _LEFT,
        "view": _MLO,
        "modifiers": [],
    }


def test_a_dx_without_laterality_or_view_and_a_ct_keep_highdicoms_entries() -> None:
    """A radiograph without Image Laterality or a View Code Sequence, and a cross-sectional
    image (which has no TID 1603 view) even with a laterality: the entries highdicom writes,
    nothing added."""
    sources = _sources()
    for ds in sources:
        if ds.Modality == "DX":
            del ds.ViewCodeSequence
            del ds.ImageLaterality
        else:
            ds.Laterality = "R"
    document = _same_as_highdicom(sources)
    entries = _entries(document)
    own = ImageLibrary(sources)[0]
    expected = {
        str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): entry
        for group in own.ContentSequence
        for entry in group.ContentSequence
        if entry.ValueType == "IMAGE"
    }
    assert sorted(entries) == sorted(expected)
    encodings = document.get("SpecificCharacterSet")
    for uid, entry in entries.items():
        assert encode_items([entry], encodings) == encode_items([expected[uid]], encodings)
        assert _described(entry) == {}


def test_a_view_meaning_in_another_script_is_written_in_utf8() -> None:
    """A view's meaning the source's character set cannot write makes the SR UTF-8, as a
    procedure's does, and the verified SR keeps it."""
    sources = _four_views()
    sources[0].ViewCodeSequence = DicomSequence([code_item("CC-JA", "99LOC", "頭尾方向")])
    document = _same_as_highdicom(sources)
    assert document.SpecificCharacterSet == "ISO_IR 192"
    buf = io.BytesIO()
    document.save_as(buf, enforce_file_format=True)
    unverified = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    entries = _entries(unverified)
    assert _described(entries[str(sources[0].SOPInstanceUID)])["view"] == (
        "CC-JA",
        "99LOC",
        "頭尾方向",
    )
    verification = Verification(
        "Doe^Jane", "Example Hospital", "confirm", "nodule", "", dt.datetime(2026, 3, 4)
    )
    verified = build_verified_sr(unverified, sources, verification)
    assert verified.SpecificCharacterSet == "ISO_IR 192"


@needs_dciodvfy
@pytest.mark.parametrize("study", ["several series", "mammogram"])
def test_dciodvfy_reports_no_errors_for_templated_content(study: str) -> None:
    """A templated library, of several series and of a mammogram's four views (laterality,
    view and modifiers), passes dciodvfy."""
    from acwi_node.results.validate import run_dciodvfy

    sources = _sources() if study == "several series" else _four_views()
    document = build_sr(sources, _analysis(sources))
    assert all(_templated(group) for group in _library_groups(document))
    report = run_dciodvfy(document)
    assert report.iod == "Comprehensive3DSR"
    assert report.errors == [], report.output


# ---------------------------------------------------------------------------------------------
# Enhanced multi-frame projection images: the laterality in the frames' functional groups
# ---------------------------------------------------------------------------------------------

BREAST_TOMOSYNTHESIS = UID("1.2.840.10008.5.1.4.1.1.13.1.3")
BREAST_PROJECTION_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.13.1.4")
BREAST_PROJECTION_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.13.1.5")
ENHANCED_XA = UID("1.2.840.10008.5.1.4.1.1.12.1.1")
_FRAMES = 3
#: What a single-frame radiograph has at the top level and an enhanced image has in its
#: functional groups, or not at all.
_NOT_ENHANCED = (
    "ImageLaterality",
    "PatientOrientation",
    "ImagerPixelSpacing",
    "WindowCenter",
    "WindowWidth",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ViewPosition",
    "AnatomicRegionSequence",
    "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign",
    "PresentationLUTShape",
)


def _enhanced(
    study: str,
    series: str,
    number: int,
    lateralities: Sequence[str | None],
    view: tuple[str, str, str] | None,
    *,
    sop_class: UID = BREAST_TOMOSYNTHESIS,
    frame_of_reference: str | None = None,
) -> Dataset:
    """An enhanced multi-frame image of ``len(lateralities)`` frames as a breast tomosynthesis
    system (or a breast projection or XA system) writes it: the view at the top level (Breast
    View Module), each frame's Frame Laterality in a Frame Anatomy Sequence, shared where all
    frames have the same one, per frame otherwise (a None: that frame has no Frame Anatomy)."""
    ds = make_dx(study, series, number, rows=24, columns=20)
    for keyword in _NOT_ENHANCED:
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    mammography = sop_class != ENHANCED_XA
    ds.Modality = "MG" if mammography else "XA"
    ds.BodyPartExamined = "BREAST" if mammography else "HEART"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS" if mammography else "SINGLE", "NONE"]
    ds.FrameOfReferenceUID = frame_of_reference or generate_uid()
    ds.NumberOfFrames = len(lateralities)
    ds.PixelData = np.zeros((len(lateralities), 24, 20), dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    if view is None:
        del ds.ViewCodeSequence
    else:
        ds.ViewCodeSequence = DicomSequence([code_item(*view)])
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence()
        ds.BreastImplantPresent = "NO"
    region = ("76752008", "SCT", "Breast") if mammography else ("80891009", "SCT", "Heart")

    def anatomy(side: str) -> DicomSequence:
        item = Dataset()
        item.FrameLaterality = side
        item.AnatomicRegionSequence = DicomSequence([code_item(*region)])
        return DicomSequence([item])

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.1, 0.1]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = DicomSequence([measures])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 2048, 4096
    shared.FrameVOILUTSequence = DicomSequence([voi])
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared.XRay3DFrameTypeSequence = DicomSequence([frame_type])
    common = set(lateralities)
    if len(common) == 1 and None not in common:
        shared.FrameAnatomySequence = anatomy(str(lateralities[0]))
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for n, side in enumerate(lateralities, start=1):
        group = Dataset()
        content = Dataset()
        content.FrameAcquisitionNumber = n
        group.FrameContentSequence = DicomSequence([content])
        if "FrameAnatomySequence" not in shared and side is not None:
            group.FrameAnatomySequence = anatomy(side)
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return ds


def _tomosynthesis_views(*, one_frame_of_reference: bool = False) -> list[Dataset]:
    """A screening tomosynthesis: R CC, L CC, R MLO, L MLO (the last one's lateralities per
    frame); ``one_frame_of_reference``: all four in one (one Image Library group)."""
    study, series = generate_uid(), generate_uid()
    frame = generate_uid() if one_frame_of_reference else None
    views = [("R", _CC), ("L", _CC), ("R", _MLO), ("L", _MLO)]
    sources = [
        _enhanced(study, series, n, [side] * _FRAMES, view, frame_of_reference=frame)
        for n, (side, view) in enumerate(views, start=1)
    ]
    # the same laterality given per frame: the image's all the same
    last = sources[3]
    anatomy = last.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    del last.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    for group in last.PerFrameFunctionalGroupsSequence:
        group.FrameAnatomySequence = DicomSequence([Dataset(anatomy[0])])
    return sources


def _same_bytes_both_ways(sources: list[Dataset]) -> Dataset:
    """The SR of ``sources`` (a result per frame), asserted to be the one highdicom builds
    entry by entry."""
    analysis = _analysis(sources, frames=True)
    document = build_sr(sources, analysis)
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    return document


@pytest.mark.parametrize("one_frame_of_reference", [False, True])
def test_breast_tomosynthesis_entries_say_each_views_laterality_from_its_frames(
    one_frame_of_reference: bool,
) -> None:
    """A Breast Tomosynthesis Image has no Image Laterality: its frames' Frame Laterality
    (Frame Anatomy Sequence, shared or per frame) is the entry's Image Laterality, beside the
    view of its Breast View Module; both ways of writing the library give the same bytes."""
    sources = _tomosynthesis_views(one_frame_of_reference=one_frame_of_reference)
    assert all("ImageLaterality" not in ds and "Laterality" not in ds for ds in sources)
    document = _same_bytes_both_ways(sources)
    entries = _entries(document)
    described = [_described(entries[str(ds.SOPInstanceUID)]) for ds in sources]
    assert described == [
        {"laterality": _RIGHT, "view": _CC, "modifiers": []},
        {"laterality": _LEFT, "view": _CC, "modifiers": []},
        {"laterality": _RIGHT, "view": _MLO, "modifiers": []},
        {"laterality": _LEFT, "view": _MLO, "modifiers": []},
    ]


def test_an_enhanced_xa_entry_says_its_frames_laterality() -> None:
    """An Enhanced XA image keeps the laterality in the same functional group (and has no
    view)."""
    study, series = generate_uid(), generate_uid()
    sources = [
        _enhanced(study, series, n, ["L"] * _FRAMES, None, sop_class=ENHANCED_XA) for n in (1, 2)
    ]
    document = _same_bytes_both_ways(sources)
    entries = _entries(document)
    assert [_described(entries[str(ds.SOPInstanceUID)]) for ds in sources] == [
        {"laterality": _LEFT}
    ] * 2


def test_a_breast_projection_images_descriptors_come_from_its_frames() -> None:
    """A Breast Projection X-Ray image's laterality is its frames' too (per frame here), its
    view its Breast View Module's."""
    ds = _enhanced(
        generate_uid(),
        generate_uid(),
        1,
        ["B", "B"],
        _MLO,
        sop_class=BREAST_PROJECTION_FOR_PRESENTATION,
    )
    shared = ds.SharedFunctionalGroupsSequence[0]
    anatomy = shared.FrameAnatomySequence
    del shared.FrameAnatomySequence
    for group in ds.PerFrameFunctionalGroupsSequence:
        group.FrameAnatomySequence = DicomSequence([Dataset(anatomy[0])])
    found = library_descriptors(ds)
    assert found.laterality is not None and found.view is not None
    assert (found.laterality.value, found.laterality.meaning) == ("51440002", "Bilateral")
    assert (found.view.value, found.view.meaning) == (_MLO[0], _MLO[2])


@pytest.mark.parametrize(
    ("lateralities", "series", "image"),
    [
        (["R", "L", "R"], None, None),  # the frames disagree
        (["R", "L", "R"], "R", None),  # ... whatever the series says
        (["R", None, "R"], None, None),  # a frame without one
        (["L", "L", "L"], None, "R"),  # a top-level Image Laterality contradicts them
    ],
    ids=["frames disagree", "frames disagree, series R", "frame without", "image contradicts"],
)
def test_no_laterality_where_an_images_frames_do_not_agree(
    lateralities: list[str | None], series: str | None, image: str | None
) -> None:
    """An image whose frames do not all have the same laterality (or whose Image Laterality
    says another) has no Image Laterality in its entry, not one that is wrong for some of its
    frames; its view is written all the same, and the other images keep theirs."""
    sources = _tomosynthesis_views()
    target = _enhanced(
        str(sources[0].StudyInstanceUID),
        str(sources[0].SeriesInstanceUID),
        5,
        lateralities,
        _CC,
    )
    if series is not None:
        target.Laterality = series
    if image is not None:
        target.ImageLaterality = image
    sources.append(target)
    document = _same_bytes_both_ways(sources)
    entries = _entries(document)
    assert _described(entries[str(target.SOPInstanceUID)]) == {"view": _CC, "modifiers": []}
    assert _described(entries[str(sources[0].SOPInstanceUID)])["laterality"] == _RIGHT


def test_an_enhanced_image_without_frame_laterality_falls_back_to_the_series() -> None:
    """Frames whose laterality is U (unpaired) leave the series' Laterality to say it, as an
    Image Laterality of U does."""
    study, series = generate_uid(), generate_uid()
    sources = [_enhanced(study, series, n, ["U"] * _FRAMES, _CC) for n in (1, 2)]
    sources[0].Laterality = "L"
    document = _same_bytes_both_ways(sources)
    entries = _entries(document)
    assert _described(entries[str(sources[0].SOPInstanceUID)])["laterality"] == _LEFT
    assert "laterality" not in _described(entries[str(sources[1].SOPInstanceUID)])


@needs_dciodvfy
@pytest.mark.parametrize("one_frame_of_reference", [False, True])
def test_dciodvfy_reports_no_errors_for_a_tomosynthesis_library(
    one_frame_of_reference: bool,
) -> None:
    """The SR of a tomosynthesis study (entries with Image Laterality from the frames, frame
    references in the measurement groups) passes dciodvfy."""
    from acwi_node.results.validate import run_dciodvfy

    sources = _tomosynthesis_views(one_frame_of_reference=one_frame_of_reference)
    document = build_sr(sources, _analysis(sources, frames=True))
    assert all("laterality" in _described(e) for e in _entries(document).values())
    report = run_dciodvfy(document)
    assert report.iod == "Comprehensive3DSR"
    assert report.errors == [], report.output


# ---------------------------------------------------------------------------------------------
# Images of classes highdicom has no modality for (Breast Projection X-Ray): in the library
# ---------------------------------------------------------------------------------------------

_MODALITY = ("DCM", "121139")
_MAMMOGRAPHY = ("MG", "DCM", "Mammography")


def _breast_projection_views(*, one_frame_of_reference: bool = False) -> list[Dataset]:
    """A Breast Projection X-Ray study: R CC, L CC (For Presentation), R MLO, L MLO (For
    Processing; the last one's laterality per frame)."""
    study, series = generate_uid(), generate_uid()
    frame = generate_uid() if one_frame_of_reference else None
    views = [("R", _CC), ("L", _CC), ("R", _MLO), ("L", _MLO)]
    sources = [
        _enhanced(
            study,
            series,
            n,
            [side] * 2,
            view,
            sop_class=BREAST_PROJECTION_FOR_PRESENTATION
            if n <= 2
            else BREAST_PROJECTION_FOR_PROCESSING,
            frame_of_reference=frame,
        )
        for n, (side, view) in enumerate(views, start=1)
    ]
    last = sources[3]
    anatomy = last.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    del last.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    for group in last.PerFrameFunctionalGroupsSequence:
        group.FrameAnatomySequence = DicomSequence([Dataset(anatomy[0])])
    return sources


def _plain_items(entry: Dataset) -> dict[tuple[str, str], object]:
    """An entry's items other than the laterality and view: their values, by concept name."""
    found: dict[tuple[str, str], object] = {}
    for item in entry.ContentSequence:
        if _name(item) in (_LATERALITY, _VIEW):
            continue
        if item.ValueType == "CODE":
            found[_name(item)] = _code(item)
        elif item.ValueType == "UIDREF":
            found[_name(item)] = str(item.UID)
        elif item.ValueType == "NUM":
            found[_name(item)] = float(item.MeasuredValueSequence[0].NumericValue)
        else:
            found[_name(item)] = item.ValueType
    return found


@pytest.mark.parametrize("one_frame_of_reference", [False, True])
def test_breast_projection_images_are_in_the_image_library(one_frame_of_reference: bool) -> None:
    """highdicom has no modality for the Breast Projection X-Ray classes and refused them:
    the SR's library left them out (an SR of only such images had no library). Each has an
    entry now, in its own class, as an MG image's (Modality MG, frame of reference, rows and
    columns, its frames' laterality and its view), grouped by frame of reference; both ways of
    writing the library give the same bytes, and highdicom reads the SR back."""
    from highdicom.sr import Comprehensive3DSR

    sources = _breast_projection_views(one_frame_of_reference=one_frame_of_reference)
    document = _same_bytes_both_ways(sources)
    entries = _entries(document)
    assert list(entries) == [str(ds.SOPInstanceUID) for ds in sources]
    for ds in sources:
        entry = entries[str(ds.SOPInstanceUID)]
        assert entry.ReferencedSOPSequence[0].ReferencedSOPClassUID == ds.SOPClassUID
        assert _plain_items(entry) == {
            _MODALITY: _MAMMOGRAPHY,
            ("DCM", "112227"): str(ds.FrameOfReferenceUID),
            ("DCM", "110910"): 24.0,
            ("DCM", "110911"): 20.0,
        }
    assert [_described(entries[str(ds.SOPInstanceUID)]) for ds in sources] == [
        {"laterality": _RIGHT, "view": _CC, "modifiers": []},
        {"laterality": _LEFT, "view": _CC, "modifiers": []},
        {"laterality": _RIGHT, "view": _MLO, "modifiers": []},
        {"laterality": _LEFT, "view": _MLO, "modifiers": []},
    ]
    assert len(_library_groups(document)) == (1 if one_frame_of_reference else 4)
    assert all(ds.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.13.1.") for ds in sources)
    read = Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(encode_part10(document))))
    assert str(read.SOPInstanceUID) == str(document.SOPInstanceUID)


def test_breast_projection_images_beside_mammograms_share_their_modalitys_group() -> None:
    """Beside a mammogram's four views (a templated library), a Breast Projection X-Ray image
    in their frame of reference is in their group (Modality MG) with its own class; the same
    bytes both ways."""
    sources = _four_views()
    frame = generate_uid()
    for ds in sources:
        ds.FrameOfReferenceUID = frame
    projection = _enhanced(
        str(sources[0].StudyInstanceUID),
        generate_uid(),
        1,
        ["R", "R"],
        _CC,
        sop_class=BREAST_PROJECTION_FOR_PRESENTATION,
        frame_of_reference=frame,
    )
    sources.append(projection)
    # a result per image of the mammogram, per frame of the projection image
    analysis = study_analysis(
        [*_analysis(sources[:4]).images, *_analysis([projection], frames=True).images]
    )
    document = build_sr(sources, analysis)
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    groups = _library_groups(document)
    assert len(groups) == 1
    entry = _entries(document)[str(projection.SOPInstanceUID)]
    assert (
        entry.ReferencedSOPSequence[0].ReferencedSOPClassUID == BREAST_PROJECTION_FOR_PRESENTATION
    )
    assert _described(entry) == {"laterality": _RIGHT, "view": _CC, "modifiers": []}


def test_the_classes_described_as_others_are_those_highdicom_has_no_modality_for() -> None:
    """Each class of KNOWN_CLASSES is one highdicom refuses, described as one it codes; the
    source itself is left as it is."""
    from highdicom.sr.templates import _get_coded_modality

    from acwi_node.results.library_classes import KNOWN_CLASSES, in_known_class

    for unknown, known in KNOWN_CLASSES.items():
        with pytest.raises(ValueError, match="does not identify a SOP Class"):
            _get_coded_modality(unknown)
        _get_coded_modality(known)
    mammography = {
        _get_coded_modality(KNOWN_CLASSES[c]).value
        for c in (BREAST_PROJECTION_FOR_PRESENTATION, BREAST_PROJECTION_FOR_PROCESSING)
    }
    assert mammography == {"MG"}
    source = _breast_projection_views()[0]
    described = in_known_class(source)
    assert described.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
    assert source.SOPClassUID == BREAST_PROJECTION_FOR_PRESENTATION
    assert described.FrameOfReferenceUID == source.FrameOfReferenceUID


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_for_a_breast_projection_library() -> None:
    """The SR of a Breast Projection X-Ray study (its entries' classes those of the evidence)
    passes dciodvfy."""
    from acwi_node.results.validate import run_dciodvfy

    sources = _breast_projection_views()
    document = build_sr(sources, _analysis(sources, frames=True))
    assert len(_entries(document)) == len(sources)
    report = run_dciodvfy(document)
    assert report.iod == "Comprehensive3DSR"
    assert report.errors == [], report.output
