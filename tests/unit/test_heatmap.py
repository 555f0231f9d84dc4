"""Heatmap overlays written as RGB Secondary Capture images."""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.pixels import apply_voi
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from acwi_node.inference.types import ImageResult, ModelIdentity, StudyAnalysis, Uncertainty
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap import MAX_DIMENSION, Window, build_heatmap_sc, render_grey
from acwi_node.results.uids import result_uids
from models.data.synth import pad_outside_fov, write_ct_series, write_enhanced_ct
from tests.support.dx import DX_FOR_PRESENTATION, make_dx

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MF_GREY_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LABELS = ["normal", "effusion", "pneumothorax"]
MODEL = ModelIdentity(name="cxr-triage", version="2.1.0", weights_sha256="9f2c4e1ab37d")
HOT = (slice(20, 44), slice(30, 54))

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None and shutil.which("/usr/bin/dciodvfy") is None,
    reason="dicom3tools dciodvfy is not installed (/usr/bin/dciodvfy missing)",
)


def _heat(rows: int, columns: int) -> np.ndarray:
    heat = np.zeros((rows, columns), dtype=np.float32)
    heat[HOT] = 1.0
    return heat


def _analysis(sources: list[Dataset], *, needs_review: bool = False) -> StudyAnalysis:
    images = [
        ImageResult(
            sop_instance_uid=str(source.SOPInstanceUID),
            sop_class_uid=str(source.SOPClassUID),
            series_instance_uid=str(source.SeriesInstanceUID),
            probabilities={"normal": 0.1, "effusion": 0.8, "pneumothorax": 0.1},
            uncertainty=Uncertainty(entropy=0.6, epistemic=0.1, aleatoric=0.5, score=0.3),
            heatmap=_heat(source.Rows, source.Columns),
            ood_score=0.1,
        )
        for source in sources
    ]
    return StudyAnalysis(
        model=MODEL,
        labels=list(LABELS),
        images=images,
        probabilities={"normal": 0.1, "effusion": 0.8, "pneumothorax": 0.1},
        predicted_label="effusion",
        uncertainty=Uncertainty(entropy=0.6, epistemic=0.1, aleatoric=0.5, score=0.3),
        ood_score=0.1,
        needs_review=needs_review,
        finding_labels=["effusion", "pneumothorax"],
    )


def _build(source: Dataset, analysis: StudyAnalysis, index: int = 0) -> Dataset:
    image = analysis.images[index]
    return build_heatmap_sc(
        source, image.heatmap_array(), analysis, image, instance_number=index + 1
    )


@pytest.fixture(scope="module")
def pair() -> tuple[list[Dataset], StudyAnalysis]:
    study_uid = generate_uid()
    sources = [make_dx(study_uid), make_dx(study_uid, monochrome1=True)]
    return sources, _analysis(sources)


def test_rgb_secondary_capture(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    sc = _build(sources[0], analysis)
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.file_meta.MediaStorageSOPClassUID == SECONDARY_CAPTURE
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SamplesPerPixel == 3
    assert sc.PlanarConfiguration == 0
    assert sc.BitsAllocated == 8
    assert sc.BitsStored == 8
    assert sc.HighBit == 7
    assert sc.PixelRepresentation == 0
    assert (sc.Rows, sc.Columns) == (sources[0].Rows, sources[0].Columns)
    assert sc.SeriesNumber == 9902
    assert sc.InstanceNumber == 1
    assert sc.ConversionType == "WSD"
    assert sc.BurnedInAnnotation == "NO"
    assert sc.Manufacturer == "ACWI Node"
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert sc.pixel_array.shape == (sources[0].Rows, sources[0].Columns, 3)
    assert sc.pixel_array.dtype == np.uint8


def test_pixels_survive_file_roundtrip(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    sc = _build(sources[0], analysis)
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    read = pydicom.dcmread(buffer)
    np.testing.assert_array_equal(read.pixel_array, sc.pixel_array)
    assert encode_part10(sc) == buffer.getvalue()  # what the worker writes


def test_same_study_and_patient(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    sc = _build(sources[0], analysis)
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
    ):
        assert sc[keyword].value == sources[0][keyword].value, keyword
    assert sc.SeriesInstanceUID != sources[0].SeriesInstanceUID


def test_uids_deterministic(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    first = _build(sources[0], analysis)
    again = _build(sources[0], analysis)
    other = _build(sources[1], analysis, 1)
    expected = result_uids(str(sources[0].StudyInstanceUID), MODEL.name, MODEL.version)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SOPInstanceUID == expected.heatmap_instance_uid(str(sources[0].SOPInstanceUID))
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.SeriesInstanceUID == expected.heatmap_series_uid == other.SeriesInstanceUID
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != expected.sr_series_uid


def test_references_source(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    sc = _build(sources[0], analysis)
    assert len(sc.SourceImageSequence) == 1
    reference = sc.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    assert reference.ReferencedSOPClassUID == DX_FOR_PRESENTATION
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert "AI heatmap" in sc.DerivationDescription


def test_comments_name_model_and_notice(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, _ = pair
    analysis = _analysis(sources, needs_review=True)
    sc = _build(sources[0], analysis)
    comments = str(sc.ImageComments)
    assert "cxr-triage" in comments
    assert "2.1.0" in comments
    assert "effusion" in comments
    assert "AI heatmap, not for primary diagnosis" in comments
    assert "review" in comments
    assert "cxr-triage" in str(sc.SeriesDescription)


def test_contributing_equipment_describes_the_model(
    pair: tuple[list[Dataset], StudyAnalysis],
) -> None:
    """IHE AI Results (AIR): the model that produced the heatmap is an item of the Contributing
    Equipment Sequence, Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm")."""
    sources, analysis = pair
    sc = pydicom.dcmread(io.BytesIO(encode_part10(_build(sources[0], analysis))))
    items = [
        item
        for item in sc.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    ]
    assert len(items) == 1
    assert items[0].PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    assert items[0].Manufacturer == analysis.model.manufacturer
    assert items[0].ManufacturerModelName == analysis.model.name
    assert items[0].SoftwareVersions == analysis.model.version


def test_hot_region_is_redder_and_brighter(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    for index, source in enumerate(sources):
        rgb = _build(source, analysis, index).pixel_array.astype(np.float64)
        redness = rgb[..., 0] - (rgb[..., 1] + rgb[..., 2]) / 2.0
        cold = np.ones(redness.shape, dtype=bool)
        cold[HOT] = False
        assert redness[HOT].mean() > 100.0
        assert abs(redness[cold].mean()) < 1.0
        grey = render_grey(source) * 255.0
        assert (rgb[..., 0][HOT] >= grey[HOT] - 1.0).all()
        assert rgb[..., 0][HOT].mean() > grey[HOT].mean() + 20.0


def test_cold_region_is_the_windowed_source(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    rgb = _build(sources[0], analysis).pixel_array
    cold = rgb[60:, :, :].astype(np.int16)
    assert (cold[..., 0] == cold[..., 1]).all()
    assert (cold[..., 1] == cold[..., 2]).all()
    expected = np.rint(render_grey(sources[0])[60:, :] * 255.0)
    np.testing.assert_allclose(cold[..., 0], expected, atol=1)


def test_monochrome1_is_inverted() -> None:
    study_uid = generate_uid()
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = (yy * 64).astype(np.uint16)
    mono2 = make_dx(study_uid, rows=64, columns=64, pixels=pixels)
    mono1 = make_dx(study_uid, rows=64, columns=64, pixels=pixels, monochrome1=True)
    grey2 = render_grey(mono2)
    grey1 = render_grey(mono1)
    np.testing.assert_allclose(grey1, 1.0 - grey2)
    assert grey2[0].mean() < grey2[-1].mean()
    assert grey1[0].mean() > grey1[-1].mean()


def test_padding_is_black_and_out_of_the_percentile_window(tmp_path: Path) -> None:
    """A slice padded outside its reconstruction circle with stored -2000 or -1000 (Pixel
    Padding Value): the same grey in the percentile window (no window in the file, or
    "auto"), the window that of the pixels inside the circle; padding black, in the file's
    window too. MONOCHROME1's padding, the high stored values, is black as well."""
    (path,) = write_ct_series(tmp_path, slices=1, size=64)
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation
    minus_2000, minus_1000 = pad_outside_fov(ds, -2000), pad_outside_fov(ds, -1000)
    outside = minus_2000.pixel_array == -2000
    grey = render_grey(minus_2000)
    assert np.array_equal(render_grey(minus_1000), grey)
    assert np.array_equal(render_grey(minus_1000, window="auto"), grey)
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    low, high = np.percentile(hu[~outside], [0.5, 99.5])
    expected = np.clip((hu - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(grey[~outside], expected[~outside], rtol=0, atol=1e-12)
    assert np.all(grey[outside] == 0.0)
    assert np.all(render_grey(minus_2000, window=(40.0, 400.0))[outside] == 0.0)
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))
    mono1 = make_dx(generate_uid(), rows=64, columns=64, pixels=pixels, monochrome1=True)
    mono1.add_new(0x00280120, "US", 4095)
    mono1.add_new(0x00280121, "US", 3968)
    grey1 = render_grey(mono1)
    assert np.all(grey1[:, -2:] == 0.0) and grey1[:, -3].min() > 0.0


def test_window_from_header_and_percentile_fallback() -> None:
    study_uid = generate_uid()
    pixels = np.full((32, 32), 2048, dtype=np.uint16)
    pixels[0, 0] = 0
    pixels[-1, -1] = 4095
    windowed = render_grey(make_dx(study_uid, rows=32, columns=32, pixels=pixels))
    assert windowed[5, 5] == pytest.approx(0.5, abs=0.01)

    ramp = np.tile(np.arange(1000, 1032, dtype=np.uint16), (32, 1))
    unwindowed = render_grey(make_dx(study_uid, rows=32, columns=32, pixels=ramp, window=False))
    assert unwindowed.min() == pytest.approx(0.0)
    assert unwindowed.max() == pytest.approx(1.0)
    assert (np.diff(unwindowed[0]) >= 0).all()


def test_voi_lut_sequence_without_window() -> None:
    study_uid = generate_uid()
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))
    source = make_dx(study_uid, rows=8, columns=64, pixels=pixels, window=False)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [min(4095, 2 * value) for value in range(4096)]
    source.VOILUTSequence = Sequence([item])
    grey = render_grey(source)
    assert grey[0, 0] == pytest.approx(0.0)
    assert grey[0, 16] == pytest.approx(2 * 1024 / 4095, abs=1e-6)
    assert (grey[0, 32:] == 1.0).all()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_narrow_sigmoid_window_is_drawn_without_an_overflow() -> None:
    """VOI LUT Function SIGMOID (PS3.3 C.11.2.1.3.1) of values far from a narrow window's
    centre: 0 and 1, as its formula's limits, and no numpy overflow warning (which fell back
    to the percentile window where warnings are errors)."""
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))
    source = make_dx(generate_uid(), rows=8, columns=64, pixels=pixels)
    source.WindowCenter = 2000
    source.WindowWidth = 10
    source.VOILUTFunction = "SIGMOID"
    grey = render_grey(source)
    values = pixels.astype(np.float64)
    near = np.abs(values - 2000) < 100  # where the formula needs no limit
    np.testing.assert_allclose(grey[near], 1.0 / (1.0 + np.exp(-4.0 * (values[near] - 2000) / 10)))
    assert (grey[values < 1900] < 1e-20).all() and (grey[values > 2100] == 1.0).all()
    assert grey[0, 0] == 0.0  # exp(800) is past float64's range


def test_rescale_is_applied() -> None:
    study_uid = generate_uid()
    pixels = np.full((16, 16), 100, dtype=np.uint16)
    source = make_dx(study_uid, rows=16, columns=16, pixels=pixels)
    source.RescaleIntercept = 1948  # 100 stored -> 2048, the window centre
    assert render_grey(source)[0, 0] == pytest.approx(0.5, abs=0.01)


def test_large_source_is_downscaled() -> None:
    study_uid = generate_uid()
    rows, columns = 2300, 1150
    source = make_dx(study_uid, rows=rows, columns=columns)
    source.PixelSpacing = [0.1, 0.1]
    analysis = _analysis([source])
    sc = _build(source, analysis)
    assert max(sc.Rows, sc.Columns) == MAX_DIMENSION
    assert sc.Rows == MAX_DIMENSION
    assert sc.Columns == round(columns * MAX_DIMENSION / rows)
    assert float(sc.PixelSpacing[0]) == pytest.approx(0.1 * rows / sc.Rows)
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_rejects_mismatched_image_result(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    image = analysis.images[1]
    with pytest.raises(ValueError, match="image result is for"):
        build_heatmap_sc(sources[0], image.heatmap_array(), analysis, image, instance_number=1)


def test_burned_in_source_is_flagged(pair: tuple[list[Dataset], StudyAnalysis]) -> None:
    sources, analysis = pair
    source = make_dx(str(sources[0].StudyInstanceUID))
    source.BurnedInAnnotation = "YES"
    sc = _build(source, _analysis([source]))
    assert sc.BurnedInAnnotation == "YES"


@needs_dciodvfy
@pytest.mark.parametrize("index", [0, 1], ids=["monochrome2", "monochrome1"])
def test_dciodvfy_reports_no_errors(pair: tuple[list[Dataset], StudyAnalysis], index: int) -> None:
    from acwi_node.results.validate import run_dciodvfy

    sources, analysis = pair
    report = run_dciodvfy(_build(sources[index], analysis, index))
    assert report.iod == "SCImage"
    assert report.errors == [], report.output


def test_blend_is_the_whole_image_formula_byte_for_byte() -> None:
    """blend_heatmap works channel by channel in place; its bytes are those of
    grey * (1 - alpha) + colour * alpha over the whole image, rounded and clipped."""
    from acwi_node.results.heatmap import MAX_ALPHA, blend_heatmap, colour_map

    rng = np.random.default_rng(7)
    for shape in [(512, 512), (7, 13)]:
        grey = rng.random(shape)
        heat = rng.random(shape) * 1.4 - 0.2  # outside [0, 1] too
        heat[0, 0] = np.nan
        clipped = np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0)
        alpha = (MAX_ALPHA * clipped)[..., None]
        rgb = grey[..., None] * (1.0 - alpha) + colour_map(clipped) * alpha
        expected = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        assert np.array_equal(blend_heatmap(grey, heat), expected)


def test_colour_channels_are_the_colour_map_bit_for_bit() -> None:
    """The closed forms of the colour map's segments give np.interp's values exactly: at every
    break point, a hair either side of each, and between them."""
    from acwi_node.results.heatmap import _CMAP_POSITIONS, _colour_channels, colour_map

    rng = np.random.default_rng(11)
    points = [0.0, 1.0, *_CMAP_POSITIONS]
    near = [np.nextafter(p, side) for p in _CMAP_POSITIONS for side in (-1.0, 2.0)]
    heat = np.concatenate([points, np.clip(near, 0.0, 1.0), rng.random(100_000)])
    heat = np.concatenate([heat, np.linspace(0.0, 1.0, 8 * 1024 + 1)])
    expected = colour_map(heat)
    channels = _colour_channels(heat.copy())
    for c in range(3):
        assert np.array_equal(channels[c], expected[..., c]), f"channel {c}"


def test_blend_in_blocks_of_rows_is_the_blend_of_the_whole_image() -> None:
    """Blocks of rows (any height, the last one short) give the bytes of one block."""
    from acwi_node.results import heatmap

    rng = np.random.default_rng(5)
    grey, heat = rng.random((77, 40)), rng.random((77, 40))
    original = heatmap._BLEND_ROWS
    try:
        heatmap._BLEND_ROWS = 77
        whole = heatmap.blend_heatmap(grey, heat)
        for rows in (1, 5, 32, 76):
            heatmap._BLEND_ROWS = rows
            assert np.array_equal(heatmap.blend_heatmap(grey, heat), whole)
    finally:
        heatmap._BLEND_ROWS = original


@pytest.mark.parametrize(
    ("body_part", "side", "laterality"),
    [
        ("CHEST", None, None),  # unpaired: absent
        ("HEAD", "", None),
        ("KNEE", "R", "R"),
        ("KNEE", None, ""),  # paired, side unknown: empty
        ("", None, ""),  # no body part: required, unknown
        ("BREAST", "L", "L"),
        ("chest", "U", None),  # the side "unpaired", as a radiograph's Image Laterality says
    ],
)
def test_laterality_follows_the_body_part(
    body_part: str, side: str | None, laterality: str | None
) -> None:
    source = make_dx(generate_uid())
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if keyword in source:
            delattr(source, keyword)
    if body_part:
        source.BodyPartExamined = body_part
    if side is not None:
        source.ImageLaterality = side
    sc = _build(source, _analysis([source]))
    assert sc.get("Laterality") == laterality


def test_the_heatmap_series_names_only_the_side_all_its_heatmaps_share() -> None:
    """The heatmaps of a study are one series, whose Laterality (General Series) a PACS keeps
    once and a mammography hanging protocol places the series by: with heatmaps of the left
    and the right breast, each says no side (empty: unknown), never the other breast's."""
    study_uid = generate_uid()
    left, right = make_dx(study_uid), make_dx(study_uid)
    for source, side in ((left, "L"), (right, "R")):
        source.BodyPartExamined = "BREAST"
        source.ImageLaterality = side
    analysis = _analysis([left, right])
    alone = build_heatmap_sc(
        right, _heat(right.Rows, right.Columns), analysis, analysis.images[1], instance_number=2
    )
    assert alone.Laterality == "R"
    heatmaps = [
        build_heatmap_sc(
            source,
            image.heatmap_array(),
            analysis,
            image,
            instance_number=n,
            series_sources=[left, right],
        )
        for n, (source, image) in enumerate(zip([left, right], analysis.images, strict=True), 1)
    ]
    assert len({sc.SeriesInstanceUID for sc in heatmaps}) == 1
    assert [(sc.Laterality, sc.BodyPartExamined) for sc in heatmaps] == [("", "BREAST")] * 2
    # both of one side: that side
    right.ImageLaterality = "L"
    sc = _build(right, analysis, 1)
    same = build_heatmap_sc(
        right,
        analysis.images[1].heatmap_array(),
        analysis,
        analysis.images[1],
        instance_number=2,
        series_sources=[left, right],
    )
    assert sc.Laterality == same.Laterality == "L"


@needs_dciodvfy
def test_a_heatmap_of_a_chest_ct_slice_validates(tmp_path: Path) -> None:
    """A CT slice of the chest carries no laterality: the heatmap's must be absent, not
    empty (dciodvfy: present when its condition is unsatisfied)."""
    from acwi_node.results.validate import run_dciodvfy

    source = pydicom.dcmread(write_ct_series(tmp_path, slices=1, size=64)[0])
    assert source.BodyPartExamined == "CHEST" and "Laterality" not in source
    report = run_dciodvfy(_build(source, _analysis([source])))
    assert report.errors == [], report.output


def test_a_heatmap_of_a_ct_slice_names_its_rows_and_columns_directions(tmp_path: Path) -> None:
    """A CT slice has no Patient Orientation (its plane orientation says it): the heatmap, a
    secondary capture without one, names the directions of its rows and columns from the
    slice's Image Orientation (Patient), so that a viewer shows the patient's left and
    right; a radiograph's own Patient Orientation is kept."""
    source = pydicom.dcmread(write_ct_series(tmp_path, slices=1, size=64)[0])
    assert "PatientOrientation" not in source
    assert [float(v) for v in source.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    sc = _read_back(_build(source, _analysis([source])))
    assert list(sc.PatientOrientation) == ["L", "P"]
    # a coronal slice; an oblique one: the most significant direction first
    source.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert list(_build(source, _analysis([source])).PatientOrientation) == ["L", "F"]
    source.ImageOrientationPatient = [-0.8, 0.6, 0, 0, 0, -1]
    assert list(_build(source, _analysis([source])).PatientOrientation) == ["RP", "F"]
    # no usable orientation: empty, as before
    source.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    assert _build(source, _analysis([source])).PatientOrientation == ""
    radiograph = make_dx(generate_uid())
    assert list(_build(radiograph, _analysis([radiograph])).PatientOrientation) == ["L", "F"]


def test_a_heatmap_of_an_enhanced_images_frame_names_its_directions(tmp_path: Path) -> None:
    """An enhanced image's orientation is in its functional groups (Plane Orientation): the
    heatmap of a frame names that frame's directions."""
    from models.data.synth import write_enhanced_ct

    source = pydicom.dcmread(write_enhanced_ct(tmp_path, slices=2, size=64))
    assert "ImageOrientationPatient" not in source and "PatientOrientation" not in source
    image = dataclasses.replace(_analysis([source]).images[0], frame_number=2)
    analysis = dataclasses.replace(_analysis([source]), images=[image])
    sc = build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)
    assert list(sc.PatientOrientation) == ["L", "P"]


def test_a_raw_heatmap_is_blended_as_blend_heatmap_blends_it(
    pair: tuple[list[Dataset], StudyAnalysis],
) -> None:
    """NaN, infinities and heat outside [0, 1] in a model's heatmap: the overlay's pixels are
    blend_heatmap's of the rendered source and the raw heat (NaN as 0, clipped), although
    build_heatmap_sc normalises the heat once and blends it without normalising again."""
    from acwi_node.results.heatmap import blend_heatmap

    sources, analysis = pair
    source, image = sources[0], analysis.images[0]
    rng = np.random.default_rng(3)
    raw = rng.normal(0.5, 0.8, size=(source.Rows, source.Columns))
    raw[0, :4] = [np.nan, np.inf, -np.inf, 7.0]
    raw[5:9, 5:9] = np.nan
    sc = build_heatmap_sc(source, raw, analysis, image, instance_number=1)
    expected = blend_heatmap(render_grey(source), raw)
    assert sc.PixelData[: expected.size] == expected.tobytes()


def _voi_lut_item(lut: np.ndarray, bits: int = 12, *, order: str = "<") -> Dataset:
    """A VOI LUT Sequence item whose LUT Data is OW bytes, as pydicom reads it from a file."""
    item = Dataset()
    item.LUTDescriptor = [len(lut) % 65536, 0, bits]
    item.add_new(0x00283006, "OW", np.asarray(lut).astype(f"{order}u2").tobytes())
    return item


def _read_back(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


_RAMP = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (40, 1))
_DOUBLING = np.minimum(4095, 2 * np.arange(4096))


@pytest.mark.parametrize(
    ("syntax", "order"),
    [
        (ExplicitVRLittleEndian, "<"),
        (ImplicitVRLittleEndian, "<"),
        (ExplicitVRBigEndian, ">"),
    ],
    ids=["explicit-le", "implicit-le", "explicit-be"],
)
def test_a_voi_lut_read_from_a_file_as_ow_bytes_is_applied(syntax: UID, order: str) -> None:
    """A radiograph with a VOI LUT Sequence and no window, read from its file: pydicom gives
    the LUT Data as OW bytes (in the data set's byte order), which are read as 16-bit entries
    and scaled by the descriptor's depth (12 bits: 0-4095), as pydicom's apply_voi maps them."""
    source = make_dx(generate_uid(), rows=40, columns=64, pixels=_RAMP, window=False)
    source.file_meta.TransferSyntaxUID = syntax
    source.PixelData = _RAMP.astype(f"{order}u2").tobytes()
    source.VOILUTSequence = Sequence([_voi_lut_item(_DOUBLING, order=order)])
    read = _read_back(source)
    assert isinstance(read.VOILUTSequence[0].LUTData, bytes)
    grey = render_grey(read)
    expected = apply_voi(read.pixel_array, read) / 4095.0
    np.testing.assert_allclose(grey, expected, atol=1e-12)
    assert grey[0, 16] == pytest.approx(2 * 1024 / 4095) and (grey[0, 32:] == 1.0).all()


def test_a_voi_lut_of_a_frame_is_read_with_its_files_byte_order() -> None:
    """A frame of a multi-frame image is read through a view of the frame without the file's
    transfer syntax: its VOI LUT's OW bytes are still read in the file's byte order."""
    source = make_dx(generate_uid(), rows=40, columns=64, pixels=_RAMP, window=False)
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = MF_GREY_WORD_SC
    source.NumberOfFrames = 2
    source.PixelData = np.stack([_RAMP, _RAMP[:, ::-1]]).astype("<u2").tobytes()
    source.VOILUTSequence = Sequence([_voi_lut_item(_DOUBLING)])
    read = _read_back(source)
    second = render_grey(read, 2)
    assert second[0, -1] == pytest.approx(0.0) and second[0, -17] == pytest.approx(2048 / 4095)


@pytest.mark.parametrize(
    "broken",
    ["short", "bits", "descriptor", "flat"],
)
def test_a_voi_lut_that_cannot_be_applied_falls_back_to_the_percentile_window(
    broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed VOI LUT (LUT Data shorter than its descriptor says, an impossible depth,
    a descriptor of two values, every entry the same) does not fail the heatmap: the image is
    shown in its percentile window, and one short log line says why, without the LUT's bytes."""
    source = make_dx(generate_uid(), rows=40, columns=64, pixels=_RAMP, window=False)
    item = _voi_lut_item(_DOUBLING)
    if broken == "short":
        item.LUTData = item.LUTData[:2000]
    elif broken == "bits":
        item.LUTDescriptor = [4096, 0, 0]
    elif broken == "descriptor":
        item.LUTDescriptor = [4096, 0]
    else:
        item.LUTData = np.full(4096, 7, dtype="<u2").tobytes()
    source.VOILUTSequence = Sequence([item])
    read = _read_back(source)
    with caplog.at_level(logging.WARNING, logger="acwi_node.results.heatmap"):
        grey = render_grey(read)
    np.testing.assert_array_equal(grey, render_grey(read, window="auto"))
    (record,) = [r for r in caplog.records if r.name == "acwi_node.results.heatmap"]
    message = record.getMessage()
    assert "percentile window instead" in message and str(read.SOPInstanceUID) in message
    assert len(message) < 300 and "\\x" not in message and "PID0001" not in message


@pytest.mark.parametrize(
    ("slope", "intercept"),
    [(None, None), (1, None), (["1", "2"], 0), ("nan", 0), (0, 0)],
    ids=["empty", "empty-intercept", "two-slopes", "nan", "zero-slope"],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_an_invalid_rescale_is_refused_with_the_reason(slope: object, intercept: object) -> None:
    """An empty, multi-valued or non-finite Rescale Slope or Intercept (or a slope of 0) is
    one reason, a ValueError, not a numpy error (preprocessing skipped such an image)."""
    source = make_dx(generate_uid())
    source.RescaleSlope = slope
    source.RescaleIntercept = intercept
    with pytest.raises(ValueError, match=r"invalid Rescale Slope/Intercept \(Rescale"):
        render_grey(source)


@needs_dciodvfy
def test_a_heatmap_of_a_radiograph_with_an_ow_voi_lut_validates() -> None:
    from acwi_node.results.validate import run_dciodvfy

    source = make_dx(generate_uid(), window=False)
    source.VOILUTSequence = Sequence([_voi_lut_item(_DOUBLING)])
    read = _read_back(source)
    report = run_dciodvfy(_build(read, _analysis([read])))
    assert report.errors == [], report.output


@needs_dciodvfy
def test_the_single_frame_classes_are_those_no_reference_may_name_a_frame_of() -> None:
    """:data:`SINGLE_FRAME_IMAGE_CLASSES` against dciodvfy: a reference naming a frame of an
    instance of each is an error ("not multi-frame"); of a multi-frame class it is not."""
    from acwi_node.dicom_classes import SINGLE_FRAME_IMAGE_CLASSES
    from acwi_node.results.validate import run_dciodvfy

    source = make_dx(generate_uid())
    source.NumberOfFrames = 2
    source.PixelData = source.PixelData * 2
    analysis = _analysis([source])
    image = dataclasses.replace(analysis.images[0], frame_number=2)
    sc = build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)
    refused = []
    for sop_class in [*sorted(SINGLE_FRAME_IMAGE_CLASSES), MF_GREY_WORD_SC, ENHANCED_CT]:
        sc.SourceImageSequence[0].ReferencedSOPClassUID = sop_class
        if any("not multi-frame" in e for e in run_dciodvfy(sc).errors):
            refused.append(sop_class)
    assert refused == sorted(SINGLE_FRAME_IMAGE_CLASSES)


def _drawing_sources() -> list[tuple[Dataset, Window | None]]:
    """Sources of 300 rows (more than one block of rows) in each way a source is drawn, each
    with the ``window`` render_grey is given: the file's window (MONOCHROME1 and
    MONOCHROME2, sigmoid), its VOI LUT, a malformed VOI LUT, the percentile window with a
    fractional rescale, with padding, a window chosen."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, (300, 70)).astype(np.uint16)
    study_uid = generate_uid()
    window = make_dx(study_uid, rows=300, columns=70, pixels=pixels)
    mono1 = make_dx(study_uid, rows=300, columns=70, pixels=pixels, monochrome1=True)
    sigmoid = make_dx(study_uid, rows=300, columns=70, pixels=pixels)
    sigmoid.WindowCenter, sigmoid.WindowWidth, sigmoid.VOILUTFunction = 1500, 800, "SIGMOID"
    lut = make_dx(study_uid, rows=300, columns=70, pixels=pixels, window=False)
    lut.VOILUTSequence = Sequence([_voi_lut_item(_DOUBLING)])
    broken = make_dx(study_uid, rows=300, columns=70, pixels=pixels, window=False)
    broken.VOILUTSequence = Sequence([_voi_lut_item(np.full(8, 7))])  # one value: unusable
    percentile = make_dx(study_uid, rows=300, columns=70, pixels=pixels, window=False)
    percentile.RescaleSlope, percentile.RescaleIntercept = "0.73", "-11.5"
    padded = make_dx(study_uid, rows=300, columns=70, pixels=pixels, window=False)
    padded.add_new(0x00280120, "US", 4000)
    padded.add_new(0x00280121, "US", 4095)
    return [
        (window, None),
        (mono1, None),
        (sigmoid, None),
        (lut, None),
        (broken, None),
        (percentile, None),
        (padded, None),
        (padded, "auto"),
        (mono1, (1000.0, 500.0)),
    ]


def test_a_source_drawn_in_blocks_of_rows_is_drawn_as_a_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """render_grey computes a block of rows at a time: the same grey levels, bit for bit, as
    the whole image at once, and as float32 the float64 values rounded."""
    from acwi_node.results import heatmap

    for source, window in _drawing_sources():
        monkeypatch.setattr(heatmap, "_RENDER_ROWS", 1 << 20)
        whole = render_grey(source, window=window)
        monkeypatch.setattr(heatmap, "_RENDER_ROWS", 7)
        assert np.array_equal(render_grey(source, window=window), whole)
        rounded = render_grey(source, window=window, dtype=np.float32)
        assert rounded.dtype == np.float32 and np.array_equal(rounded, whole.astype(np.float32))


def test_a_large_source_is_drawn_in_a_fraction_of_its_float64_size() -> None:
    """A source scaled down to 2048 is drawn in float32 a block of rows at a time and its heat
    made float32 after: the Secondary Capture's allocations peak under 24 bytes per source
    pixel (the float64 drawing: 34 with the file's window, 42 in the percentile window; a
    4096 x 3328 mammogram 442 and 547 MiB, now 143 and 151)."""
    import tracemalloc

    warm = make_dx(generate_uid(), rows=64, columns=64)  # the first SC loads highdicom's tables
    _build(warm, _analysis([warm]))
    rows, columns = 2600, 2100
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = ((yy * 3 + xx * 7) % 4096).astype(np.uint16)
    for window in (True, False):
        source = make_dx(generate_uid(), rows=rows, columns=columns, pixels=pixels, window=window)
        analysis = _analysis([source])
        heat = analysis.images[0].heatmap_array()
        tracemalloc.start()
        try:
            sc = build_heatmap_sc(source, heat, analysis, analysis.images[0], instance_number=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (sc.Rows, sc.Columns) == (2048, 1654)
        assert peak < 24 * rows * columns, peak / (rows * columns)


def _frame_heatmaps(source: Dataset) -> list[Dataset]:
    """The heatmap of each frame of the multi-frame ``source`` (one series)."""
    analysis = _analysis([source])
    images = [
        dataclasses.replace(analysis.images[0], frame_number=n)
        for n in range(1, int(source.NumberOfFrames) + 1)
    ]
    analysis = dataclasses.replace(analysis, images=images)
    return [
        build_heatmap_sc(
            source,
            image.heatmap_array(),
            analysis,
            image,
            instance_number=n,
            series_sources=[source],
        )
        for n, image in enumerate(images, start=1)
    ]


def _breast_projection(lateralities: list[str | None]) -> Dataset:
    """A Breast Projection X-Ray image (For Presentation) of 64 x 64 pixels whose frames have
    ``lateralities`` (Frame Laterality in each frame's Frame Anatomy, or shared by all)."""
    from tests.unit.test_sr_image_library import (
        BREAST_PROJECTION_FOR_PRESENTATION,
        _enhanced,
    )

    ds = _enhanced(
        generate_uid(),
        generate_uid(),
        1,
        lateralities,
        ("399162004", "SCT", "cranio-caudal"),
        sop_class=BREAST_PROJECTION_FOR_PRESENTATION,
    )
    ds.Rows, ds.Columns = 64, 64
    frames = np.arange(len(lateralities) * 64 * 64, dtype=np.uint16).reshape(-1, 64, 64)
    ds.PixelData = (frames % 4096).tobytes()
    return ds


def test_a_frames_heatmap_says_that_frames_side() -> None:
    """The heatmap of each frame of a breast image whose frames' lateralities differ (R, L, R)
    said frame 1's side (R) for all: the series' Laterality was the first frame's. Each says
    its own frame's side now (Image Laterality, the series' Laterality then absent, as
    dciodvfy wants it beside one); a frame without a side has none, and the series' Laterality
    of its heatmap is empty (unknown), as for heatmaps of both breasts."""
    heatmaps = _frame_heatmaps(_breast_projection(["R", "L", "R"]))
    assert [sc.get("ImageLaterality") for sc in heatmaps] == ["R", "L", "R"]
    assert [(sc.get("Laterality"), sc.BodyPartExamined) for sc in heatmaps] == [
        (None, "BREAST")
    ] * 3
    heatmaps = _frame_heatmaps(_breast_projection(["L", None]))
    assert [(sc.get("ImageLaterality"), sc.get("Laterality")) for sc in heatmaps] == [
        ("L", None),
        (None, ""),
    ]
    # frames that agree (shared by all): that side
    heatmaps = _frame_heatmaps(_breast_projection(["L", "L"]))
    assert [(sc.get("ImageLaterality"), sc.get("Laterality")) for sc in heatmaps] == [
        ("L", None)
    ] * 2
    # a single-frame radiograph's heatmap has the series' Laterality alone, as before
    radiograph = make_dx(generate_uid())
    radiograph.ImageLaterality = "R"
    sc = _build(radiograph, _analysis([radiograph]))
    assert sc.Laterality == "R" and "ImageLaterality" not in sc


def test_the_series_side_of_an_image_whose_frames_differ_is_unknown() -> None:
    """The series' Laterality (copy_anatomy) of an enhanced image is the side all its frames
    have: frames R and L give none (empty: unknown), not the first frame's R."""
    from acwi_node.results.headers import copy_anatomy, frame_laterality

    source = _breast_projection(["R", "L"])
    assert [frame_laterality(source, n) for n in (1, 2)] == ["R", "L"]
    assert frame_laterality(source) == ""
    result = Dataset()
    copy_anatomy(source, result)
    assert (result.BodyPartExamined, result.Laterality) == ("BREAST", "")
    assert frame_laterality(_breast_projection(["R", "R"])) == "R"


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_for_the_heatmaps_of_frames_of_either_side() -> None:
    from acwi_node.results.validate import run_dciodvfy

    for sc in _frame_heatmaps(_breast_projection(["R", "L", None])):
        report = run_dciodvfy(sc)
        assert report.iod == "SCImage"
        assert report.errors == [], report.output


def _chest_abdomen_pelvis(folder: Path) -> Dataset:
    """An enhanced CT of three frames, each of its own anatomic region (Frame Anatomy in its
    own functional group): chest, abdomen, pelvis; no Body Part Examined."""
    from tests.support.dx import code_item

    source = pydicom.dcmread(write_enhanced_ct(folder, slices=3, size=64))
    if "BodyPartExamined" in source:
        del source.BodyPartExamined
    regions = [
        ("816094009", "SCT", "Chest"),
        ("818981001", "SCT", "Abdomen"),
        ("816092008", "SCT", "Pelvis"),
    ]
    for group, region in zip(source.PerFrameFunctionalGroupsSequence, regions, strict=True):
        anatomy = Dataset()
        anatomy.AnatomicRegionSequence = Sequence([code_item(*region)])
        anatomy.FrameLaterality = "U"
        group.FrameAnatomySequence = Sequence([anatomy])
    return source


def test_a_frames_heatmap_names_that_frames_anatomy(tmp_path: Path) -> None:
    """The heatmaps of the frames of a chest-abdomen-pelvis CT all said CHEST (Body Part
    Examined from the first frame's Frame Anatomy). Each now names its own frame's region
    (Anatomic Region Sequence, General Image), and the series, whose frames differ, names no
    body part rather than a wrong one."""
    heatmaps = _frame_heatmaps(_chest_abdomen_pelvis(tmp_path))
    assert [
        [(c.CodeValue, c.CodeMeaning) for c in sc.AnatomicRegionSequence] for sc in heatmaps
    ] == [[("816094009", "Chest")], [("818981001", "Abdomen")], [("816092008", "Pelvis")]]
    assert [sc.get("BodyPartExamined") for sc in heatmaps] == [None] * 3
    # a single-frame source's heatmap has none
    radiograph = make_dx(generate_uid())
    assert "AnatomicRegionSequence" not in _build(radiograph, _analysis([radiograph]))


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_for_the_heatmaps_of_frames_of_different_regions(
    tmp_path: Path,
) -> None:
    from acwi_node.results.validate import run_dciodvfy

    for sc in _frame_heatmaps(_chest_abdomen_pelvis(tmp_path)):
        report = run_dciodvfy(sc)
        assert report.errors == [], report.output


def _signed_ct_slice(tmp_path: Path) -> Dataset:
    """A CT slice of signed stored values, some negative, with a rescale and a window."""
    (path,) = write_ct_series(tmp_path, slices=1, size=64)
    source = pydicom.dcmread(path)
    assert source.PixelRepresentation == 1 and int(source.pixel_array.min()) < 0
    return source


def test_a_source_drawn_once_for_each_stored_value_is_drawn_as_each_pixel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """render_grey draws each stored value from the lowest to the highest once and looks the
    pixels up: the same grey levels, bit for bit, as each pixel drawn, in every way a source
    is drawn (and a signed CT's negative values), in float64 and in float32."""
    from acwi_node.results import heatmap

    sources = [*_drawing_sources(), (_signed_ct_slice(tmp_path), None)]
    for source, window in sources:
        looked_up = render_grey(source, window=window)
        rounded = render_grey(source, window=window, dtype=np.float32)
        with monkeypatch.context() as patch:
            patch.setattr(heatmap, "_stored_value_domain", lambda _pixels: None)
            drawn = render_grey(source, window=window)
            drawn32 = render_grey(source, window=window, dtype=np.float32)
        assert np.array_equal(looked_up, drawn), source.SOPInstanceUID
        assert rounded.dtype == np.float32 and np.array_equal(rounded, drawn32)


def test_a_source_is_drawn_once_for_each_stored_value_not_each_pixel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The speed comes from here: a 300 x 70 source of 4,096 stored values has its modality
    values computed for those 4,096 (a CT slice's few thousand, not its 262,144 pixels); one
    with more values than pixels (or float pixels) is drawn pixel by pixel."""
    from acwi_node.results import heatmap

    sizes: list[int] = []
    original = heatmap.modality_values

    def counting(stored: np.ndarray, header: Dataset, *, little_endian: bool) -> np.ndarray:
        sizes.append(int(np.asarray(stored).size))
        return original(stored, header, little_endian=little_endian)

    monkeypatch.setattr(heatmap, "modality_values", counting)
    source, _ = _drawing_sources()[0]
    render_grey(source)
    assert sizes == [4096]
    sizes.clear()
    ct = _signed_ct_slice(tmp_path)
    render_grey(ct)
    low, high = int(ct.pixel_array.min()), int(ct.pixel_array.max())
    assert sizes == [high - low + 1]
    sizes.clear()
    sparse = make_dx(generate_uid(), rows=8, columns=8, pixels=np.full((8, 8), 4000, np.uint16))
    render_grey(sparse)  # 4,001 values from 0 up, 64 pixels: each pixel drawn
    assert sizes == [64]
