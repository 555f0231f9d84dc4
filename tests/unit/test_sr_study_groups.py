"""The SR's study-level measurement groups encoded from a template kept across studies
(results/study_groups.py): byte for byte the document highdicom builds, whatever the study's
values, review flag, predicted class and number of images."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement

from acwi_node.inference.types import StudyAnalysis, Uncertainty
from acwi_node.results import content_templates, study_groups
from acwi_node.results.encoding import encode_part10
from acwi_node.results.sr import build_sr, summarise_sr
from tests.unit.test_sr_image_groups import _measurements_container, _same_times, _study


def _as_highdicom_builds_it(sources: Sequence[Any], analysis: StudyAnalysis) -> bytes:
    """The document built by build_sr, checked against highdicom's; its bytes."""
    document = build_sr(sources, analysis)
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    encoded = encode_part10(document)
    assert encoded == encode_part10(reference)
    return encoded


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images of each study-level template made (none kept before the test)."""
    content_templates.forget_templates()
    counts: list[int] = []
    original = study_groups._template

    def counted(analysis: StudyAnalysis, count: int, *args: Any) -> Any:
        counts.append(count)
        return original(analysis, count, *args)

    monkeypatch.setattr(study_groups, "_template", counted)
    return counts


@pytest.mark.parametrize("images", [1, 7])
def test_study_groups_from_a_template_make_highdicoms_document(
    images: int, made: list[int]
) -> None:
    sources, analysis = _study(images, seed=31)
    build_sr(sources, analysis)  # the key's first study: highdicom's groups, no template
    assert made == []
    document = build_sr(sources, analysis)
    assert isinstance(_measurements_container(document).get_item(0x0040A730), RawDataElement)
    _as_highdicom_builds_it(sources, analysis)
    assert made == [images]


def test_a_key_met_once_makes_no_template_and_leaks_nothing(made: list[int]) -> None:
    """A CT's image count seldom comes back: its first study is highdicom's alone (no
    template made); the second study of that count makes one, and a third, with other UIDs,
    values and a flag, gets nothing of the second's."""
    sources, analysis = _study(5, seed=71)
    _as_highdicom_builds_it(sources, analysis)
    assert made == []
    other_sources, other = _study(5, seed=72)
    _as_highdicom_builds_it(other_sources, other)
    assert made == [5]
    third_sources, third = _study(5, seed=73)
    encoded = _as_highdicom_builds_it(third_sources, third)
    assert made == [5]
    for ds in other_sources:
        assert str(ds.SOPInstanceUID).encode() not in encoded
    assert str(third_sources[4].SOPInstanceUID).encode() in encoded


def test_a_later_study_is_rendered_from_the_kept_template(made: list[int]) -> None:
    """Another study (other UIDs, values, SOP classes) with as many images, the same review
    flag and predicted class: no template made; with another flag, class or count: one each."""
    first_sources, first = _study(3, seed=41)
    build_sr(first_sources, first)
    build_sr(first_sources, first)  # a key's second study makes its template
    assert made == [3]
    sources, analysis = _study(3, seed=42)
    analysis = replace(
        analysis,
        probabilities={"normal": 0.125, "effusion": 0.1, "nodule": 0.0001234, "atelectasis": 0.77},
        uncertainty=Uncertainty(entropy=1e-9, epistemic=0.3333333, aleatoric=12.5, score=0.0),
        ood_score=123456.789,
    )
    encoded = _as_highdicom_builds_it(sources, analysis)
    assert made == [3]
    summary = summarise_sr(pydicom.dcmread(io.BytesIO(encoded)))
    assert summary["probabilities"]["nodule"] == pytest.approx(0.0001234)
    assert summary["ood_score"] == pytest.approx(123456.789)
    assert summary["needs_review"] is False

    for _ in range(2):  # each new key: highdicom's first, a template the second time
        _as_highdicom_builds_it(sources, replace(analysis, needs_review=True))
        _as_highdicom_builds_it(sources, replace(analysis, predicted_label="normal"))
        _as_highdicom_builds_it(sources[:2], replace(analysis, images=analysis.images[:2]))
    assert made == [3, 3, 3, 2]


def test_a_predicted_class_that_is_no_label_has_no_evaluation(made: list[int]) -> None:
    sources, analysis = _study(2, seed=51)
    for _ in range(2):
        _as_highdicom_builds_it(sources, replace(analysis, predicted_label="not a label"))
    assert made == [2]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_study_value_that_is_not_finite_fails_as_highdicom_does(
    value: float, made: list[int]
) -> None:
    sources, analysis = _study(2, seed=61)
    analysis = replace(analysis, ood_score=value)
    with pytest.raises(ValueError, match="non-finite"):
        build_sr(sources, analysis, check_all=True)
    with pytest.raises(ValueError, match="non-finite"):
        build_sr(sources, analysis)
    assert made == []
