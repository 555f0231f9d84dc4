"""The SR's Image Library entries encoded from templates (results/image_library.py): byte for
byte the library highdicom builds entry by entry, or highdicom's own where a template cannot
describe an image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty
from acwi_node.results.encoding import encode_part10
from acwi_node.results.image_library import plan_image_library
from acwi_node.results.sr import build_sr
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


def _analysis(sources: Sequence[Dataset]) -> StudyAnalysis:
    images = [
        ImageResult(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            probabilities={label: 0.25 for label in LABELS},
            uncertainty=Uncertainty(entropy=0.5, epistemic=0.1, aleatoric=0.4, score=0.3),
            heatmap=np.zeros((int(ds.Rows), int(ds.Columns)), dtype=np.float32),
            ood_score=0.2,
        )
        for ds in sources
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


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_for_templated_content() -> None:
    from acwi_node.results.validate import run_dciodvfy

    sources = _sources()
    document = build_sr(sources, _analysis(sources))
    assert all(_templated(group) for group in _library_groups(document))
    report = run_dciodvfy(document)
    assert report.iod == "Comprehensive3DSR"
    assert report.errors == [], report.output


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
