"""Heatmaps written as Parametric Maps, for cross-sectional series (worker.parametric_maps)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from acwi_node.dicom_frames import frame_view
from acwi_node.inference.types import ImageResult, ModelIdentity, StudyAnalysis, Uncertainty
from acwi_node.results.encoding import encode_part10
from acwi_node.results.parametric_map import (
    PARAMETRIC_MAP_SERIES_NUMBER,
    STORED_MAX,
    build_parametric_maps,
    mappable,
)
from acwi_node.results.uids import result_uids
from models.data.synth import write_ct_series, write_enhanced_ct
from tests.support.dciodvfy import require_dciodvfy
from tests.support.dx import make_dx

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
MODEL = ModelIdentity(name="dianet", version="1.4.0", weights_sha256="9f2c4e1ab37d")
UNCERTAINTY = Uncertainty(entropy=0.6, epistemic=0.1, aleatoric=0.5, score=0.3)


def analysis_of(sources: list[Dataset], model: ModelIdentity = MODEL) -> StudyAnalysis:
    """Each image's heat a different random field, so that frames can be told apart."""
    rng = np.random.default_rng(3)
    images = [
        ImageResult(
            sop_instance_uid=str(s.SOPInstanceUID),
            sop_class_uid=str(s.SOPClassUID),
            series_instance_uid=str(s.SeriesInstanceUID),
            probabilities={"normal": 0.3, "nodule": 0.7},
            uncertainty=UNCERTAINTY,
            heatmap=rng.random((s.Rows, s.Columns)).astype(np.float32),
        )
        for s in sources
    ]
    return StudyAnalysis(
        model=model,
        labels=["normal", "nodule"],
        images=images,
        probabilities={"normal": 0.3, "nodule": 0.7},
        predicted_label="nodule",
        uncertainty=UNCERTAINTY,
        ood_score=0.1,
        needs_review=False,
        finding_labels=["nodule"],
    )


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    folder = tmp_path_factory.mktemp("ct")
    return [dcmread(p) for p in write_ct_series(folder, slices=6, size=64)]


def frames_by_source(pmap: Dataset) -> dict[str, np.ndarray]:
    """Each frame's heat (stored value through the real-world value mapping), by the SOP
    Instance UID of the image it was derived from."""
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    pixels = pmap.pixel_array.reshape(int(pmap.NumberOfFrames), pmap.Rows, pmap.Columns)
    out = {}
    for k, group in enumerate(pmap.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        out[str(source.ReferencedSOPInstanceUID)] = pixels[k] * float(
            mapping.RealWorldValueSlope
        ) + float(mapping.RealWorldValueIntercept)
    return out


def test_a_model_name_outside_the_source_character_set_is_written_in_utf8(
    ct: list[Dataset],
) -> None:
    source_charset = ct[0].SpecificCharacterSet
    assert source_charset == "ISO_IR 100"
    (plain,) = build_parametric_maps(ct, analysis_of(ct))
    assert plain.SpecificCharacterSet == source_charset
    named = ModelIdentity(name="胸部-triage", version="1.4.0", weights_sha256="9f2c4e1ab37d")
    (pmap,) = build_parametric_maps(ct, analysis_of(ct, named))
    assert pmap.SpecificCharacterSet == "ISO_IR 192"
    assert dcmread(io.BytesIO(encode_part10(pmap))).ManufacturerModelName == "胸部-triage"


def test_a_ct_series_gets_one_map_with_a_frame_per_image(ct: list[Dataset]) -> None:
    analysis = analysis_of(ct)
    (pmap,) = build_parametric_maps(ct, analysis)
    back = dcmread(io.BytesIO(encode_part10(pmap)))
    assert back.SOPClassUID == PARAMETRIC_MAP
    assert back.StudyInstanceUID == ct[0].StudyInstanceUID
    assert back.PatientID == ct[0].PatientID
    assert back.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert back.SeriesNumber == PARAMETRIC_MAP_SERIES_NUMBER
    assert int(back.NumberOfFrames) == len(ct) and (back.Rows, back.Columns) == (64, 64)
    heat = {im.sop_instance_uid: im.heatmap_array() for im in analysis.images}
    frames = frames_by_source(back)
    assert frames.keys() == heat.keys()
    for uid, frame in frames.items():
        assert np.abs(frame - heat[uid]).max() <= 0.5 / STORED_MAX + 1e-9
    positions = {
        tuple(float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient)
        for g in back.PerFrameFunctionalGroupsSequence
    }
    assert positions == {tuple(float(v) for v in s.ImagePositionPatient) for s in ct}


def test_contributing_equipment_describes_the_model(ct: list[Dataset]) -> None:
    """IHE AI Results (AIR): the model that produced the map is an item of the Contributing
    Equipment Sequence, Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"), after
    the source's acquisition equipment."""
    (pmap,) = build_parametric_maps(ct, analysis_of(ct))
    back = dcmread(io.BytesIO(encode_part10(pmap)))
    purposes = [
        (
            i.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
            i.PurposeOfReferenceCodeSequence[0].CodeValue,
        )
        for i in back.ContributingEquipmentSequence
    ]
    assert ("99IHE", "Newcode1") in purposes
    item = back.ContributingEquipmentSequence[purposes.index(("99IHE", "Newcode1"))]
    assert item.Manufacturer == MODEL.manufacturer
    assert item.ManufacturerModelName == MODEL.name
    assert item.SoftwareVersions == MODEL.version


def test_its_uids_are_derived_so_a_rerun_replaces_it(ct: list[Dataset]) -> None:
    (first,) = build_parametric_maps(ct, analysis_of(ct))
    (again,) = build_parametric_maps(ct, analysis_of(ct))
    (other,) = build_parametric_maps(ct, analysis_of(ct, replace(MODEL, version="1.5.0")))
    uids = result_uids(str(ct[0].StudyInstanceUID), MODEL.name, MODEL.version)
    assert first.SeriesInstanceUID == again.SeriesInstanceUID == uids.parametric_map_series_uid
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID


def test_radiographs_get_none_and_a_mixed_study_only_for_its_ct(ct: list[Dataset]) -> None:
    dx = make_dx(str(ct[0].StudyInstanceUID))
    assert not mappable(dx) and all(mappable(s) for s in ct)
    assert build_parametric_maps([dx], analysis_of([dx])) == []
    (pmap,) = build_parametric_maps([dx, *ct], analysis_of([dx, *ct]))
    assert int(pmap.NumberOfFrames) == len(ct)


def test_images_of_two_sizes_get_a_map_each(tmp_path: Path, ct: list[Dataset]) -> None:
    larger = [
        dcmread(p)
        for p in write_ct_series(tmp_path, slices=2, size=128, accession_number="ACC0002")
    ]
    for source in larger:  # the same series, another size
        source.SeriesInstanceUID = ct[0].SeriesInstanceUID
        source.StudyInstanceUID = ct[0].StudyInstanceUID
    maps = build_parametric_maps([*ct, *larger], analysis_of([*ct, *larger]))
    assert sorted((int(m.NumberOfFrames), m.Rows) for m in maps) == [(2, 128), (len(ct), 64)]
    assert len({m.SOPInstanceUID for m in maps}) == 2


def test_the_maps_series_names_only_the_side_and_body_part_all_its_maps_share(
    tmp_path: Path,
) -> None:
    """The maps of a study are one series, whose Laterality and Body Part Examined (General
    Series) a PACS keeps once: a series with maps of the left and the right knee says no
    side (empty: unknown) in each map, not one side in one map and the other in the next."""
    left, right = (
        [
            Dataset(dcmread(p))
            for p in write_ct_series(tmp_path / side, slices=2, size=64, accession_number=side)
        ]
        for side in ("L", "R")
    )
    for side, series in (("L", left), ("R", right)):
        for source in series:
            source.StudyInstanceUID = left[0].StudyInstanceUID
            source.BodyPartExamined = "KNEE"
            source.Laterality = side
    assert left[0].SeriesInstanceUID != right[0].SeriesInstanceUID
    (alone,) = build_parametric_maps(left, analysis_of(left))
    assert alone.Laterality == "L" and alone.BodyPartExamined == "KNEE"
    maps = build_parametric_maps([*left, *right], analysis_of([*left, *right]))
    assert len(maps) == 2 and len({m.SeriesInstanceUID for m in maps}) == 1
    assert [(m.Laterality, m.BodyPartExamined) for m in maps] == [("", "KNEE")] * 2
    for source in right:  # another body part: the series names none
        source.BodyPartExamined = "ANKLE"
    maps = build_parametric_maps([*left, *right], analysis_of([*left, *right]))
    assert [(m.Laterality, "BodyPartExamined" in m) for m in maps] == [("", False)] * 2


def test_a_series_whose_map_fails_is_logged_and_the_others_stand(
    tmp_path: Path, ct: list[Dataset], caplog: pytest.LogCaptureFixture
) -> None:
    other = [
        dcmread(p) for p in write_ct_series(tmp_path, slices=2, size=64, accession_number="ACC0003")
    ]
    analysis = analysis_of([*ct, *other])
    analysis.images[0].heatmap = np.zeros((8, 8), dtype=np.float32)  # the first series' fails
    with caplog.at_level("WARNING", logger="acwi_node.results"):
        (pmap,) = build_parametric_maps([*ct, *other], analysis)
    assert pmap.SOPInstanceUID != build_parametric_maps(ct, analysis_of(ct))[0].SOPInstanceUID
    assert int(pmap.NumberOfFrames) == len(other)
    assert f"no parametric map for {ct[0].SeriesInstanceUID}" in caplog.text
    assert "heatmap of" in caplog.text


def test_dciodvfy_reports_no_errors(ct: list[Dataset]) -> None:
    require_dciodvfy()
    from acwi_node.results.validate import run_dciodvfy

    (pmap,) = build_parametric_maps(ct, analysis_of(ct))
    report = run_dciodvfy(pmap)
    assert report.errors == [], report.output
    assert "ParametricMap" in report.iod


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return dcmread(write_enhanced_ct(tmp_path_factory.mktemp("enhanced"), slices=4, size=64))


def frame_analysis(image: Dataset, frames: list[int]) -> StudyAnalysis:
    """A result per frame of ``frames``, each heat a different random field."""
    rng = np.random.default_rng(5)
    one = analysis_of([image])
    return replace(
        one,
        images=[
            replace(
                one.images[0],
                frame_number=n,
                heatmap=rng.random((image.Rows, image.Columns)).astype(np.float32),
            )
            for n in frames
        ],
    )


def test_an_enhanced_ct_gets_a_map_whose_frames_are_its_frames(enhanced: Dataset) -> None:
    analysis = frame_analysis(enhanced, [1, 2, 3, 4])
    assert mappable(enhanced)
    (pmap,) = build_parametric_maps([enhanced], analysis)
    assert int(pmap.NumberOfFrames) == 4
    uids = result_uids(str(enhanced.StudyInstanceUID), MODEL.name, MODEL.version)
    assert pmap.SOPInstanceUID == uids.parametric_map_instance_uid(
        str(enhanced.SOPInstanceUID), 64, 64
    )
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    pixels = pmap.pixel_array.reshape(4, 64, 64) * float(mapping.RealWorldValueSlope)
    for k, (group, image) in enumerate(
        zip(pmap.PerFrameFunctionalGroupsSequence, analysis.images, strict=True)
    ):
        assert np.abs(pixels[k] - image.heatmap_array()).max() <= 0.5 / STORED_MAX + 1e-9
        n = k + 1
        plane = group.PlanePositionSequence[0].ImagePositionPatient
        own = frame_view(enhanced, n).ImagePositionPatient
        assert [float(v) for v in plane] == pytest.approx([float(v) for v in own])
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert int(source.ReferencedFrameNumber) == n
    require_dciodvfy()
    from acwi_node.results.validate import run_dciodvfy

    report = run_dciodvfy(pmap)
    assert report.errors == [], report.output


def test_an_enhanced_ct_with_a_frame_not_analysed_gets_no_map(
    enhanced: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="acwi_node.results"):
        assert build_parametric_maps([enhanced], frame_analysis(enhanced, [1, 2, 4])) == []
    assert "3 of its 4 frames analysed" in caplog.text


def _pixel_measures_per_frame(image: Dataset, spacings: list[list[float]]) -> Dataset:
    """``image`` (a copy) with its Pixel Measures in each frame's own functional group, of
    ``spacings``, as a scanner may write them, none shared."""
    import copy

    from pydicom.sequence import Sequence

    image = copy.deepcopy(image)
    shared = image.SharedFunctionalGroupsSequence[0]
    thickness = frame_view(image, 1).SliceThickness
    if "PixelMeasuresSequence" in shared:
        del shared.PixelMeasuresSequence
    for group, spacing in zip(image.PerFrameFunctionalGroupsSequence, spacings, strict=True):
        measures = Dataset()
        measures.PixelSpacing = spacing
        measures.SliceThickness = thickness
        group.PixelMeasuresSequence = Sequence([measures])
    return image


def test_an_enhanced_ct_with_pixel_measures_per_frame_gets_a_map(
    enhanced: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """highdicom reads a multi-frame source's Pixel Measures from its shared functional group
    alone: an image whose frames each had them (the same) got no map (AttributeError). The
    map now has them shared; frames whose spacing differs get no map, said why."""
    same = _pixel_measures_per_frame(enhanced, [[0.7, 0.7]] * 4)
    (pmap,) = build_parametric_maps([same], frame_analysis(same, [1, 2, 3, 4]))
    measures = pmap.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.7, 0.7]
    assert all("PixelMeasuresSequence" not in g for g in pmap.PerFrameFunctionalGroupsSequence)
    # the source is not changed
    assert "PixelMeasuresSequence" in same.PerFrameFunctionalGroupsSequence[0]
    require_dciodvfy()
    from acwi_node.results.validate import run_dciodvfy

    report = run_dciodvfy(pmap)
    assert report.errors == [], report.output

    differ = _pixel_measures_per_frame(enhanced, [[0.7, 0.7], [0.7, 0.7], [0.8, 0.8], [0.7, 0.7]])
    with caplog.at_level("INFO", logger="acwi_node.results"):
        assert build_parametric_maps([differ], frame_analysis(differ, [1, 2, 3, 4])) == []
    assert "differ in pixel spacing, slice thickness or orientation" in caplog.text
