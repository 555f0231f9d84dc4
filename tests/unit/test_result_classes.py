"""The result objects for an image of every image storage SOP Class the node reads: the SR
(both ways of writing it), the heatmap secondary capture and the parametric map are written,
reference the source in its own class, and validate as well as their source does.

highdicom copies a result's patient and study from the source by the source's IOD, looked up
by its class: an image of a class missing from its tables (a retired ultrasound image, say)
made every writer raise KeyError, and the study had no results at all.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from acwi_node.dicom_classes import is_single_frame_class
from acwi_node.inference.types import ModelIdentity
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.parametric_map import build_parametric_maps
from acwi_node.results.sr import LesionRegion, Verification, build_sr, build_verified_sr
from tests.support.dx import make_dx
from tests.support.image_classes import (
    MULTI_FRAME_CLASSES,
    image_classes,
    make_image,
    study_analysis,
)
from tests.unit.test_sr import needs_dciodvfy

MODEL = ModelIdentity(name="cxr-triage", version="2.1.0", weights_sha256="9f2c4e1ab37d")
S = "1.2.840.10008.5.1.4.1.1."
CLASSES = image_classes()
#: Classes highdicom 0.28 has no IOD for.
RETIRED_US = S + "6"
RETIRED_US_MULTI_FRAME = S + "3"
#: Multi-frame classes dicom3tools' dciodvfy (1.00, 2022) does not know are multi-frame: it
#: reports each reference to a frame of their images (Referenced Frame Number) as an error.
#: Their IODs are multi-frame (PS3.3; retired ones as they were), and a result for a frame
#: must say which.
UNKNOWN_TO_DCIODVFY = frozenset(
    S + suffix
    for suffix in (
        "3", "5", "77.2", "501.1", "601.2", "481.23", "481.24", "6.3", "77.1.5.8", "77.1.8",
        "77.1.9",
    )
)  # fmt: skip
_FRAME_NOT_MULTI_FRAME = (
    "Shall not be present for Referenced SOP Class that is not multi-frame - attribute "
    "<ReferencedFrameNumber>"
)


def _walk(items: object) -> Iterator[Dataset]:
    for item in items or []:  # type: ignore[attr-defined]
        yield item
        for element in item:
            if element.VR == "SQ":
                yield from _walk(element.value)


def _references(ds: Dataset) -> set[tuple[str, str]]:
    """Every (instance, class) a dataset references, at any depth."""
    return {
        (str(item.ReferencedSOPInstanceUID), str(item.ReferencedSOPClassUID))
        for item in _walk([ds])
        if "ReferencedSOPInstanceUID" in item and "ReferencedSOPClassUID" in item
    }


def _evidence(sr: Dataset) -> list[tuple[str, str]]:
    return [
        (str(ref.ReferencedSOPInstanceUID), str(ref.ReferencedSOPClassUID))
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]


def _library(sr: Dataset) -> list[tuple[str, str]]:
    library = next(
        (
            item
            for item in sr.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "111028"
        ),
        Dataset(),
    )
    return [
        (
            str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
            str(entry.ReferencedSOPSequence[0].ReferencedSOPClassUID),
        )
        for group in library.get("ContentSequence") or []
        for entry in group.ContentSequence
        if entry.ValueType == "IMAGE"
    ]


def _with_geometry(ds: Dataset) -> Dataset:
    """``ds`` in a frame of reference, with a plane: what a parametric map needs."""
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    return ds


def test_the_classes_are_every_image_class_the_node_reads() -> None:
    """Retired, current, single- and multi-frame classes; the two lists of multi-frame
    classes agree."""
    assert RETIRED_US in CLASSES and RETIRED_US_MULTI_FRAME in CLASSES
    assert S + "1.1" in CLASSES and S + "2.1" in CLASSES and S + "81.1" in CLASSES
    assert all(uid in MULTI_FRAME_CLASSES for uid in UNKNOWN_TO_DCIODVFY)
    for uid in CLASSES:
        assert is_single_frame_class(uid) is not (uid in MULTI_FRAME_CLASSES) or uid in {
            S + "77.1",  # VL Image Storage - Trial (retired)
            S + "501.2.1",  # DICOS Digital X-Ray Image, For Presentation
            S + "501.2.2",  # For Processing
            S + "601.1",  # Eddy Current Image
        }, uid


@pytest.mark.parametrize("sop_class", CLASSES)
def test_every_result_is_written_and_references_the_source_in_its_own_class(
    sop_class: str,
) -> None:
    """The SR (templated and built by highdicom) with an AI region, and the heatmap of its
    first image (frame): written; the source in the SR's evidence, in its Image Library where
    it has an entry, and in every reference of both, all in its own class."""
    source = make_image(sop_class)
    analysis = study_analysis([source], MODEL)
    own = (str(source.SOPInstanceUID), sop_class)
    for check_all in (False, True):
        sr = build_sr([source], analysis, check_all=check_all, region_fraction=0.5)
        assert _evidence(sr) == [own]
        assert set(_library(sr)) <= {own}
        assert _references(sr) == {own}
    image = analysis.images[0]
    heatmap = build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)
    assert heatmap.PatientID == source.PatientID
    assert heatmap.StudyInstanceUID == source.StudyInstanceUID
    assert _references(heatmap) == {own}


@pytest.mark.parametrize(
    "sop_class",
    [RETIRED_US, S + "5", S + "12.3", S + "77.1", S + "501.2.1", S + "601.1"],
)
def test_a_retired_class_images_results_copy_its_patient_and_study(sop_class: str) -> None:
    """An image of a class highdicom has no IOD for (retired Ultrasound, Nuclear Medicine and
    X-Ray Angiographic Bi-Plane, VL Image - Trial; DICOS, eddy current): its SR and heatmap
    copy its patient and study as any image's, its optional descriptions too."""
    source = make_image(sop_class)
    source.IssuerOfPatientID = "HOSP"
    source.StudyDescription = "US ABDOMEN"
    analysis = study_analysis([source], MODEL)
    sr = build_sr([source], analysis)
    image = analysis.images[0]
    heatmap = build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)
    for result in (sr, heatmap):
        for keyword in (
            "PatientName",
            "PatientID",
            "IssuerOfPatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyDescription",
            "AccessionNumber",
        ):
            assert result[keyword].value == source[keyword].value, keyword
        assert result.SOPClassUID != sop_class  # an SR, a secondary capture


def test_a_study_beginning_with_a_retired_class_image_lists_every_source() -> None:
    """A retired ultrasound image first, a DX image after: both in the evidence and the Image
    Library, each in its own class."""
    first = make_image(RETIRED_US)
    second = make_dx(str(first.StudyInstanceUID), rows=40, columns=36)
    sources = [first, second]
    analysis = study_analysis(sources, MODEL)
    expected = [(str(ds.SOPInstanceUID), str(ds.SOPClassUID)) for ds in sources]
    for check_all in (False, True):
        sr = build_sr(sources, analysis, check_all=check_all, region_fraction=0.5)
        assert sorted(_evidence(sr)) == sorted(expected)
        assert sorted(_library(sr)) == sorted(expected)


def test_a_verified_sr_with_a_box_on_a_retired_class_image() -> None:
    """The radiologist's lesion box on a frame of a retired Ultrasound Multi-frame image:
    the verified SR is written, its box and evidence in the image's own class."""
    source = make_image(RETIRED_US_MULTI_FRAME)
    analysis = study_analysis([source], MODEL)
    sr = build_sr([source], analysis, region_fraction=0.5)
    verdict = Verification(
        "Doe^Jane",
        "Example Hospital",
        "confirm",
        "effusion",
        "",
        dt.datetime(2024, 1, 16, 9, 30),
        regions=(LesionRegion(str(source.SOPInstanceUID), 2, (2, 3, 12, 13)),),
    )
    verified = build_verified_sr(sr, [source], verdict)
    own = (str(source.SOPInstanceUID), RETIRED_US_MULTI_FRAME)
    assert _evidence(verified) == [own]
    refs = {r for r in _references(verified) if r[0] == own[0]}
    assert refs == {own}


def test_a_retired_class_image_in_a_frame_of_reference_gets_a_parametric_map() -> None:
    """A retired ultrasound image with a plane in a frame of reference: its parametric map is
    written (highdicom's KeyError left it out), its source references in the image's class."""
    source = _with_geometry(make_image(RETIRED_US))
    analysis = study_analysis([source], MODEL)
    maps = build_parametric_maps([source], analysis)
    assert len(maps) == 1
    assert maps[0].PatientID == source.PatientID
    assert _references(maps[0]) == {(str(source.SOPInstanceUID), RETIRED_US)}


def _new_errors(result: Dataset, source_errors: Counter[str], sop_class: str) -> list[str]:
    from acwi_node.results.validate import run_dciodvfy

    errors = Counter(run_dciodvfy(result).errors) - source_errors
    if sop_class in UNKNOWN_TO_DCIODVFY:
        del errors[_FRAME_NOT_MULTI_FRAME]
    return sorted(errors)


@needs_dciodvfy
@pytest.mark.parametrize("sop_class", CLASSES)
def test_dciodvfy_finds_no_error_in_the_results_the_source_has_not(sop_class: str) -> None:
    """The SR, the heatmap and (an image in a frame of reference) the parametric map of an
    image of each class: no error dciodvfy does not find in the source too (but its
    complaint about a frame of a multi-frame class it does not know)."""
    from acwi_node.results.validate import run_dciodvfy

    source = make_image(sop_class)
    if "FrameOfReferenceUID" not in source and int(source.get("NumberOfFrames", 1)) == 1:
        source = _with_geometry(source)
    source_errors = Counter(run_dciodvfy(source).errors)
    analysis = study_analysis([source], MODEL)
    sr = build_sr([source], analysis, region_fraction=0.5)
    assert _new_errors(sr, source_errors, sop_class) == []
    image = analysis.images[0]
    heatmap = build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)
    assert _new_errors(heatmap, source_errors, sop_class) == []
    for pmap in build_parametric_maps([source], analysis):
        assert _new_errors(pmap, source_errors, sop_class) == []
    assert np.any(heatmap.pixel_array)
