"""The TID 1500 Comprehensive 3D SR written for a study, and reading it back."""

from __future__ import annotations

import copy
import datetime as dt
import io
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from acwi_node.inference.types import ImageResult, ModelIdentity, StudyAnalysis, Uncertainty
from acwi_node.results.encoding import encode_part10
from acwi_node.results.sr import (
    PRIVATE_SCHEME,
    LesionRegion,
    Verification,
    build_sr,
    build_verified_sr,
    finding_code,
    summarise_sr,
)
from acwi_node.results.uids import device_uid, result_uids
from tests.support.dcmtk import dsrdump_clean, require_dcmtk_tool
from tests.support.dx import make_dx

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
LABELS = ["normal", "effusion", "nodule", "atelectasis"]
MODEL = ModelIdentity(name="cxr-triage", version="2.1.0", weights_sha256="9f2c4e1ab37d")

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None and shutil.which("/usr/bin/dciodvfy") is None,
    reason="dicom3tools dciodvfy is not installed (/usr/bin/dciodvfy missing)",
)


def _image_result(source: Dataset, probabilities: list[float], ood: float) -> ImageResult:
    heatmap = np.zeros((source.Rows, source.Columns), dtype=np.float32)
    heatmap[10:30, 20:40] = 1.0
    total = sum(probabilities)
    return ImageResult(
        sop_instance_uid=str(source.SOPInstanceUID),
        sop_class_uid=str(source.SOPClassUID),
        series_instance_uid=str(source.SeriesInstanceUID),
        probabilities={label: p / total for label, p in zip(LABELS, probabilities, strict=True)},
        uncertainty=Uncertainty(entropy=0.91, epistemic=0.13, aleatoric=0.78, score=0.41),
        heatmap=heatmap,
        ood_score=ood,
    )


def make_study(*, skipped: bool = True) -> tuple[list[Dataset], StudyAnalysis]:
    """Three DX instances in one study: a PA (MONOCHROME2), a lateral (MONOCHROME1) and a third
    one that was received but skipped."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    sources = [
        make_dx(study_uid, series_uid, 1),
        make_dx(study_uid, series_uid, 2, monochrome1=True),
        make_dx(study_uid, series_uid, 3),
    ]
    images = [
        _image_result(sources[0], [0.1, 0.7, 0.15, 0.05], 0.21),
        _image_result(sources[1], [0.2, 0.5, 0.2, 0.1], 0.34),
    ]
    study_probabilities = {
        label: float(np.mean([image.probabilities[label] for image in images])) for label in LABELS
    }
    analysis = StudyAnalysis(
        model=MODEL,
        labels=list(LABELS),
        images=images,
        probabilities=study_probabilities,
        predicted_label="effusion",
        uncertainty=Uncertainty(entropy=0.97, epistemic=0.15, aleatoric=0.82, score=0.47),
        ood_score=0.28,
        needs_review=True,
        finding_labels=["effusion", "nodule", "atelectasis"],
        skipped={str(sources[2].SOPInstanceUID): "unsupported photometric"} if skipped else {},
    )
    return sources, analysis


Built = tuple[list[Dataset], StudyAnalysis, Dataset]


@pytest.fixture(scope="module")
def built() -> Built:
    """One study and its SR, shared by the tests that only read them."""
    sources, analysis = make_study()
    return sources, analysis, build_sr(sources, analysis, institution_name="Example Hospital")


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)


def _content_image_uids(ds: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _walk(ds)
        if item.ValueType == "IMAGE"
    }


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_sop_class_and_flags(built: Built) -> None:
    _, _, sr = built
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.file_meta.MediaStorageSOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesNumber == 9901
    assert sr.InstanceNumber == 1
    assert sr.Manufacturer == "ACWI Node"
    assert sr.SeriesDescription == "ACWI cxr-triage 2.1.0 AI result"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_same_study_and_patient(built: Built) -> None:
    sources, _, sr = built
    first = sources[0]
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
    ):
        assert sr[keyword].value == first[keyword].value, keyword
    assert sr.SeriesInstanceUID != first.SeriesInstanceUID
    assert sr.InstitutionName == "Example Hospital"


def test_every_source_referenced(built: Built) -> None:
    sources, analysis, sr = built
    all_uids = {str(ds.SOPInstanceUID) for ds in sources}
    analysed = {image.sop_instance_uid for image in analysis.images}

    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1
    assert evidence[0].StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for series in evidence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == all_uids
    assert "PertinentOtherEvidenceSequence" not in sr
    assert _content_image_uids(sr) == analysed

    summary = summarise_sr(sr)
    assert set(summary["referenced_sop_instance_uids"]) == all_uids
    assert set(summary["evidence_sop_instance_uids"]) == all_uids


def test_image_library_lists_analysed_images(built: Built) -> None:
    _, analysis, sr = built
    library = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    ]
    assert len(library) == 1
    uids = _content_image_uids(library[0])
    assert uids == {image.sop_instance_uid for image in analysis.images}


def test_measurement_groups_reference_their_images(built: Built) -> None:
    _, analysis, sr = built
    measurements = sr.ContentSequence[-1]
    assert measurements.ConceptNameCodeSequence[0].CodeValue == "126010"
    groups = list(measurements.ContentSequence)
    # per label + summary, for the study and for each analysed image
    assert len(groups) == (len(LABELS) + 1) * (1 + len(analysis.images))
    for group in groups:
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
        sources_in_group = [
            item
            for item in group.ContentSequence
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121112"
        ]
        assert sources_in_group
        names = {item.ConceptNameCodeSequence[0].CodeMeaning for item in _walk(group)}
        assert {
            "Tracking Identifier",
            "Tracking Unique Identifier",
            "Algorithm Name",
            "Algorithm Version",
        } <= names


def test_summarise_matches_analysis(built: Built) -> None:
    sources, analysis, sr = built
    summary = summarise_sr(_roundtrip(sr))
    assert summary["probabilities"] == analysis.probabilities
    assert summary["image_probabilities"] == {
        image.sop_instance_uid: image.probabilities for image in analysis.images
    }
    assert summary["uncertainty"] == {
        "entropy": analysis.uncertainty.entropy,
        "epistemic": analysis.uncertainty.epistemic,
        "aleatoric": analysis.uncertainty.aleatoric,
        "score": analysis.uncertainty.score,
    }
    assert summary["ood_score"] == analysis.ood_score
    for image in analysis.images:
        assert summary["image_uncertainty"][image.sop_instance_uid] == {
            "entropy": image.uncertainty.entropy,
            "epistemic": image.uncertainty.epistemic,
            "aleatoric": image.uncertainty.aleatoric,
            "score": image.uncertainty.score,
            "ood_score": image.ood_score,
        }
    assert summary["needs_review"] is True
    assert summary["predicted_label"] == "effusion"
    assert summary["model_name"] == MODEL.name
    assert summary["model_version"] == MODEL.version
    assert summary["study_instance_uid"] == sources[0].StudyInstanceUID


def test_needs_review_false_is_read_back() -> None:
    sources, analysis = make_study()
    analysis = replace(analysis, needs_review=False)
    assert summarise_sr(build_sr(sources, analysis))["needs_review"] is False


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_per_image_groups_appended_after_the_check_make_the_same_document(built: Built) -> None:
    """build_sr hands highdicom's document check the study-level groups only and appends the
    per-image ones afterwards; the document is the one highdicom builds from them all."""
    sources, analysis, fast = built
    checked = build_sr(sources, analysis, institution_name="Example Hospital", check_all=True)
    # Only the times of creation may differ.
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        setattr(checked, keyword, getattr(fast, keyword))
    for ours, theirs in zip(
        checked.ContributingEquipmentSequence, fast.ContributingEquipmentSequence, strict=True
    ):
        if "ContributionDateTime" in theirs:
            ours.ContributionDateTime = theirs.ContributionDateTime
    groups = list(_walk(fast))
    assert sum(1 for item in groups if item.get("RelationshipType") == "CONTAINS") > 8
    assert _encoded(fast) == _encoded(checked)


def test_encoded_as_dcmwrite_encodes_it(built: Built) -> None:
    """encode_part10 skips dcmwrite's repeated ambiguous-VR passes, not a byte of its output."""
    sources, analysis, _ = built
    document = build_sr(sources, analysis)
    reference = copy.deepcopy(document)
    assert encode_part10(document) == _encoded(reference)
    assert pydicom.dcmread(io.BytesIO(encode_part10(document))).SOPInstanceUID == (
        document.SOPInstanceUID
    )


def test_same_inputs_same_uids(built: Built) -> None:
    sources, analysis, first = built
    second = build_sr(sources, analysis)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    expected = result_uids(str(sources[0].StudyInstanceUID), MODEL.name, MODEL.version)
    assert first.SeriesInstanceUID == expected.sr_series_uid
    assert first.SOPInstanceUID == expected.sr_instance_uid

    tracking_first = [item.UID for item in _walk(first) if item.ValueType == "UIDREF"]
    tracking_second = [item.UID for item in _walk(second) if item.ValueType == "UIDREF"]
    assert tracking_first == tracking_second


def test_new_model_version_new_uids(built: Built) -> None:
    sources, analysis, first = built
    other = build_sr(sources, replace(analysis, model=replace(MODEL, version="2.2.0")))
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert first.SOPInstanceUID != other.SOPInstanceUID


def test_device_observer_identifies_model(built: Built) -> None:
    _, _, sr = built
    observation = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for item in sr.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observation["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"
    expected_uid = device_uid(MODEL.name, MODEL.version, MODEL.weights_sha256)
    device_item = observation["Device Observer UID"]
    assert str(device_item.UID) == expected_uid
    assert observation["Device Observer Name"].TextValue == MODEL.name
    assert observation["Device Observer Manufacturer"].TextValue == MODEL.manufacturer
    assert observation["Device Observer Model Name"].TextValue == "cxr-triage 2.1.0"


def _algorithm_items(ds: Dataset) -> list[Dataset]:
    return [
        item
        for item in ds.get("ContributingEquipmentSequence") or []
        if [(c.CodingSchemeDesignator, c.CodeValue) for c in item.PurposeOfReferenceCodeSequence]
        == [("99IHE", "Newcode1")]
    ]


def test_contributing_equipment_describes_the_model(built: Built) -> None:
    """IHE AI Results (AIR), General Result Encoding Requirements: each algorithm that produced
    the results is an item of the Contributing Equipment Sequence with Purpose of Reference
    (Newcode1, 99IHE, "Processing Algorithm"), Manufacturer, Manufacturer's Model Name and
    Software Versions, after the source images' acquisition equipment; the scheme is
    identified. (AIR's Device UID is not written: dciodvfy knows no such attribute there.)"""
    _, _, sr = built
    sr = _roundtrip(sr)
    items = _algorithm_items(sr)
    assert len(items) == 1
    item = items[0]
    assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert item.Manufacturer == MODEL.manufacturer
    assert item.ManufacturerModelName == MODEL.name
    assert item.SoftwareVersions == MODEL.version
    assert "DeviceUID" not in item
    purposes = [
        i.PurposeOfReferenceCodeSequence[0].CodeValue for i in sr.ContributingEquipmentSequence
    ]
    assert purposes[0] == "109101"  # the acquisition equipment first
    schemes = {str(i.CodingSchemeDesignator) for i in sr.CodingSchemeIdentificationSequence}
    assert {"99IHE", PRIVATE_SCHEME} <= schemes


#: When the radiologist verified the reports of these tests.
VERIFIED_AT = dt.datetime(2024, 1, 16, 9, 0, tzinfo=dt.UTC)


def verification(
    action: str = "confirm",
    label: str = "effusion",
    reason: str = "",
    regions: tuple[LesionRegion, ...] = (),
) -> Verification:
    """Doe^Jane's verdict at Example Hospital, at :data:`VERIFIED_AT`."""
    return Verification(
        "Doe^Jane", "Example Hospital", action, label, reason, VERIFIED_AT, regions=regions
    )


def test_verified_sr_keeps_the_model_equipment(built: Built) -> None:
    """The verified SR names the same algorithm, and so does one that verifies an SR written
    without the item (read from its device observer)."""
    sources, _, sr = built
    verdict = verification()
    unverified = pydicom.dcmread(io.BytesIO(encode_part10(sr)))
    expected = [
        (i.Manufacturer, i.ManufacturerModelName, i.SoftwareVersions)
        for i in _algorithm_items(unverified)
    ]
    assert len(expected) == 1
    older = copy.deepcopy(unverified)
    older.ContributingEquipmentSequence = [
        i for i in older.ContributingEquipmentSequence if not _algorithm_items_in([i])
    ]
    for document in (unverified, older):
        verified = _roundtrip(build_verified_sr(document, sources, verdict))
        got = [
            (i.Manufacturer, i.ManufacturerModelName, i.SoftwareVersions)
            for i in _algorithm_items(verified)
        ]
        assert got == expected


def _algorithm_items_in(items: list[Dataset]) -> list[Dataset]:
    holder = Dataset()
    holder.ContributingEquipmentSequence = items
    return _algorithm_items(holder)


def test_finding_codes() -> None:
    effusion = finding_code("Pleural_Effusion")
    assert (effusion.scheme_designator, effusion.value) == ("SCT", "60046008")
    assert finding_code("pneumothorax").value == "36118008"
    assert finding_code("normal").value == "17621005"
    local = finding_code("atelectasis")
    assert local.scheme_designator == PRIVATE_SCHEME
    assert local.meaning == "atelectasis"
    assert local.value == finding_code("atelectasis").value
    assert len(local.value) <= 16


def test_finding_codes_written_per_label(built: Built) -> None:
    _, _, sr = built
    findings = {
        (item.ConceptCodeSequence[0].CodingSchemeDesignator, item.ConceptCodeSequence[0].CodeValue)
        for item in _walk(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121071"
    }
    assert ("SCT", "60046008") in findings
    assert len(findings) == len(LABELS)
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes


def test_rejects_sources_from_two_studies() -> None:
    sources, analysis = make_study()
    stranger = make_dx(generate_uid(), generate_uid(), 1)
    with pytest.raises(ValueError, match="more than one study"):
        build_sr([*sources, stranger], analysis)


def test_rejects_result_for_unknown_image() -> None:
    sources, analysis = make_study()
    with pytest.raises(ValueError, match="not among the source"):
        build_sr(sources[1:], analysis)


def test_missing_type2_patient_attributes() -> None:
    sources, analysis = make_study()
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName"):
        del sources[0][keyword]
    sources[0].PatientSex = "U"
    sr = build_sr(sources, analysis)
    assert sources[0].PatientSex == "U"
    assert "PatientBirthDate" not in sources[0]
    assert sr.PatientBirthDate in ("", None)
    assert sr.PatientSex in ("", None)
    assert sr.PatientID == "PID0001"


def test_single_monochrome1_image_study() -> None:
    study_uid = generate_uid()
    source = make_dx(study_uid, generate_uid(), 1, monochrome1=True)
    image = _image_result(source, [0.6, 0.2, 0.1, 0.1], 0.05)
    analysis = StudyAnalysis(
        model=MODEL,
        labels=list(LABELS),
        images=[image],
        probabilities=dict(image.probabilities),
        predicted_label="normal",
        uncertainty=image.uncertainty,
        ood_score=image.ood_score,
        needs_review=False,
    )
    summary = summarise_sr(build_sr([source], analysis))
    assert summary["probabilities"] == image.probabilities
    assert summary["referenced_sop_instance_uids"] == [str(source.SOPInstanceUID)]
    assert summary["predicted_label"] == "normal"


def test_all_images_skipped_still_lists_evidence() -> None:
    sources, analysis = make_study()
    analysis = replace(analysis, images=[])
    summary = summarise_sr(build_sr(sources, analysis))
    assert summary["probabilities"] == analysis.probabilities
    assert summary["image_probabilities"] == {}
    assert set(summary["evidence_sop_instance_uids"]) == {str(ds.SOPInstanceUID) for ds in sources}


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(built: Built) -> None:
    from acwi_node.results.validate import run_dciodvfy

    _, _, sr = built
    report = run_dciodvfy(sr)
    assert report.iod == "Comprehensive3DSR"
    assert report.errors == [], report.output


def test_dcmtk_reads_the_sr_and_its_verified_successor_without_a_complaint(
    built: Built, tmp_path: Path
) -> None:
    """DCMTK's ``dsrdump`` reads each document as a viewer's SR module would: every content
    item of its value type, every relationship one the Comprehensive 3D SR IOD allows (it
    stops at the first that is not), every string of its VR. Nothing is reported: no error,
    no warning. The verified SR adds a lesion box (SCOORD) on an image."""
    require_dcmtk_tool("dsrdump")  # before building anything: skipped without DCMTK
    sources, _, sr = built
    box = LesionRegion(str(sources[0].SOPInstanceUID), None, (20, 10, 39, 29))
    verdict = verification("override", "nodule", "Nodule on the lateral view", (box,))
    unverified = pydicom.dcmread(io.BytesIO(encode_part10(sr)))
    verified = build_verified_sr(unverified, sources, verdict)
    for name, document in (("sr", sr), ("verified", verified)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode_part10(document))
        printed = dsrdump_clean(path)
        assert "Imaging Measurement Report" in printed
