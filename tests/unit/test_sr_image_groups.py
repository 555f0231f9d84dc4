"""The SR's per-image measurement groups encoded from a template (results/image_groups.py):
byte for byte the document highdicom builds group by group, or highdicom's groups where a
template cannot describe an image."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID, generate_uid

from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty
from acwi_node.results import content_templates, image_groups
from acwi_node.results.encoding import encode_items, encode_part10
from acwi_node.results.sr import _image_groups, _label_codes, build_sr, summarise_sr
from acwi_node.results.uids import result_uids
from tests.support.dx import make_dx
from tests.unit.test_sr import LABELS, MODEL

CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def _study(images: int, *, seed: int = 7) -> tuple[list[Dataset], StudyAnalysis]:
    """``images`` DX and CR images in two series, every value different, the fourth image
    without a probability for one label."""
    rng = random.Random(seed)
    study_uid = generate_uid()
    series = [generate_uid(), generate_uid()]
    sources = []
    for n in range(1, images + 1):
        ds = make_dx(study_uid, series[n % 2], n, rows=32, columns=32)
        if n % 2:
            ds.SOPClassUID = CR_IMAGE
            ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE
        sources.append(ds)
    results = []
    for n, ds in enumerate(sources, start=1):
        labels = [label for label in LABELS if not (n == 4 and label == "nodule")]
        weights = [rng.random() + 0.01 for _ in labels]
        total = sum(weights)
        results.append(
            ImageResult(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                probabilities={label: w / total for label, w in zip(labels, weights, strict=True)},
                uncertainty=Uncertainty(
                    entropy=rng.random() * 1.4,
                    epistemic=rng.random() / 7,
                    aleatoric=rng.random(),
                    score=rng.choice([0.0, 1.0, rng.random()]),
                ),
                heatmap=np.zeros((32, 32), dtype=np.float32),
                ood_score=rng.random() * 1e-7 if n == 2 else rng.random() * 40,
            )
        )
    return sources, study_analysis(results)


def study_analysis(images: list[ImageResult]) -> StudyAnalysis:
    """A study-level result over ``images`` (its own values do not matter here)."""
    return StudyAnalysis(
        model=MODEL,
        labels=list(LABELS),
        images=images,
        probabilities={label: 0.25 for label in LABELS},
        predicted_label="effusion",
        uncertainty=Uncertainty(entropy=0.9, epistemic=0.1, aleatoric=0.8, score=0.4),
        ood_score=0.3,
        needs_review=False,
        finding_labels=["effusion"],
        skipped={},
    )


def _same_times(document: Dataset, reference: Dataset) -> None:
    """Give ``reference`` the creation times of ``document`` (nothing else may differ)."""
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        setattr(reference, keyword, getattr(document, keyword))
    for ours, theirs in zip(
        reference.ContributingEquipmentSequence,
        document.ContributingEquipmentSequence,
        strict=True,
    ):
        if "ContributionDateTime" in theirs:
            ours.ContributionDateTime = theirs.ContributionDateTime


def _measurements_container(document: Dataset) -> Dataset:
    return next(
        item
        for item in document.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010"
    )


def _from_template(document: Dataset) -> bool:
    """Whether the per-image groups of ``document`` are template bytes (not parsed yet)."""
    return isinstance(_measurements_container(document).get_item(0x0040A730), RawDataElement)


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_many_images_make_the_document_highdicom_builds() -> None:
    sources, analysis = _study(12)
    document = build_sr(sources, analysis)
    assert _from_template(document)
    reference = build_sr(sources, analysis, check_all=True)
    assert not _from_template(reference)
    _same_times(document, reference)
    encoded = encode_part10(document)
    assert encoded == encode_part10(reference)
    assert _from_template(document)  # encoding wrote the bytes as they are
    # pydicom's own writer parses the template bytes and writes the same document.
    assert _saved(document) == encoded


def test_values_read_back_from_template_groups() -> None:
    sources, analysis = _study(6, seed=11)
    document = pydicom.dcmread(io.BytesIO(encode_part10(build_sr(sources, analysis))))
    summary = summarise_sr(document)
    assert len(summary["image_probabilities"]) == 6
    for image in analysis.images:
        uid = image.sop_instance_uid
        assert summary["image_probabilities"][uid] == pytest.approx(image.probabilities)
        numbers = summary["image_uncertainty"][uid]
        assert numbers["entropy"] == pytest.approx(image.uncertainty.entropy)
        assert numbers["score"] == pytest.approx(image.uncertainty.score)
        assert numbers["ood_score"] == pytest.approx(image.ood_score)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_image_with_a_value_that_is_not_finite_fails_as_highdicom_does(value: float) -> None:
    sources, analysis = _study(3)
    images = list(analysis.images)
    images[1] = replace(images[1], ood_score=value)
    analysis = replace(analysis, images=images)
    with pytest.raises(ValueError, match="non-finite"):
        build_sr(sources, analysis, check_all=True)
    with pytest.raises(ValueError, match="non-finite"):
        build_sr(sources, analysis)


def test_labels_that_are_not_ascii_are_left_to_highdicom() -> None:
    sources, analysis = _study(3)
    renamed = {label: f"{label} é" for label in LABELS}
    analysis = replace(
        analysis,
        labels=[renamed[label] for label in LABELS],
        probabilities={renamed[k]: v for k, v in analysis.probabilities.items()},
        predicted_label=renamed["effusion"],
        finding_labels=[renamed["effusion"]],
        images=[
            replace(image, probabilities={renamed[k]: v for k, v in image.probabilities.items()})
            for image in analysis.images
        ],
    )
    document = build_sr(sources, analysis)
    assert not _from_template(document)
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)


def _builder(
    sources: Sequence[Dataset], analysis: StudyAnalysis
) -> tuple[Any, image_groups.GroupBuilder]:
    uids = result_uids(str(sources[0].StudyInstanceUID), MODEL.name, MODEL.version)
    codes = _label_codes(analysis.labels)

    def build(number: int, image: ImageResult, source: Dataset) -> Sequence[Any]:
        return _image_groups(number, image, source, analysis, uids, codes)

    return uids, build


def test_a_template_that_misses_a_value_is_not_used() -> None:
    """A builder whose groups leave out a value the template would replace (here the summary
    group, with its identifier and uncertainty values): no template, highdicom's groups."""
    sources, analysis = _study(3)
    uids, build = _builder(sources, analysis)

    def without_summary(number: int, image: ImageResult, source: Dataset) -> Sequence[Any]:
        return list(build(number, image, source))[:-1]

    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    assert image_groups.encode_image_groups(analysis, uids, without_summary, by_uid, None) is None
    assert image_groups.encode_image_groups(analysis, uids, build, by_uid, None) is not None


def test_template_groups_are_the_builders_groups() -> None:
    """Each image's bytes are those of its groups built by highdicom and encoded."""
    sources, analysis = _study(5, seed=3)
    uids, build = _builder(sources, analysis)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    encoded = image_groups.encode_image_groups(analysis, uids, build, by_uid, None)
    expected = b"".join(
        encode_items([group[0] for group in build(n, image, by_uid[image.sop_instance_uid])], None)
        for n, image in enumerate(analysis.images, start=1)
    )
    assert encoded == expected


def test_a_single_image_is_rendered_from_a_template() -> None:
    """One image: its groups come from a template too (kept for the next studies)."""
    sources, analysis = _study(1)
    document = build_sr(sources, analysis)
    assert _from_template(document)
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)


@pytest.mark.parametrize("images", [1, 5])
def test_a_template_made_for_another_study_makes_the_document_highdicom_builds(
    images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Templates are kept across studies: a later study (another study UID, so other tracking
    UIDs; other values, images and SOP classes) is rendered from the earlier one's templates
    without building any, and its document is byte for byte highdicom's."""
    content_templates.forget_templates()
    first_sources, first = _study(6, seed=21)
    build_sr(first_sources, first)
    made: list[tuple[str, ...]] = []
    original = image_groups._template

    def counted(labels: Sequence[str], *args: Any) -> Any:
        made.append(tuple(labels))
        return original(labels, *args)

    monkeypatch.setattr(image_groups, "_template", counted)
    sources, analysis = _study(images, seed=22)
    document = build_sr(sources, analysis)
    assert _from_template(document)
    assert made == []
    reference = build_sr(sources, analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    # Another model version: its own templates.
    other = replace(analysis, model=replace(analysis.model, version="9.9.9"))
    document = build_sr(sources, other)
    assert made and len(set(made)) == len(made)
    reference = build_sr(sources, other, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)


def test_kept_templates_are_bounded() -> None:
    content_templates.forget_templates()
    for n in range(content_templates.KEPT_TEMPLATES + 5):
        content_templates.kept_template(("key", n), lambda: None)
    assert content_templates.kept_templates() == content_templates.KEPT_TEMPLATES
    made: list[int] = []
    content_templates.kept_template(("key", 0), lambda: made.append(0))  # dropped: made again
    content_templates.kept_template(("key", 9), lambda: made.append(9))  # kept
    assert made == [0]
    content_templates.forget_templates()
    assert content_templates.kept_templates() == 0
