"""Multi-frame images (Enhanced CT, a Legacy Converted Enhanced CT from a scanner that sends
enhanced objects) analysed frame by frame: the same inputs as the single-frame slices they
hold, a result per frame, SR groups and heatmaps that name their frame."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import RLELossless

from acwi_node.dicom_frames import frame_count, frame_pixels, frame_view, short_pixel_data
from acwi_node.dicom_pixels import read_deferred
from acwi_node.inference.analyser import Analyser, NothingToAnalyse, image_seed
from acwi_node.inference.manifest import default_model_dir, load_manifest
from acwi_node.inference.preprocess import (
    ImageUnit,
    PreprocessSpec,
    UnsupportedImage,
    image_units,
    modality_pixels,
    preprocess,
    preprocess_many,
    to_unit_range,
)
from acwi_node.inference.types import StudyAnalysis
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap import build_heatmap_sc, render_grey
from acwi_node.results.sr import build_sr, summarise_sr
from acwi_node.results.uids import result_uids
from models.data.dicom_dataset import load_unit_images, scan_folder
from models.data.synth import pad_outside_fov, write_ct_series, write_enhanced_ct
from models.evaluate import read_boxes
from tests.support.dciodvfy import dciodvfy_errors, dciodvfy_output
from tests.unit.test_sr_image_groups import _from_template, _same_times

SLICES = 4


@pytest.fixture(scope="module")
def analyser() -> Analyser:
    return Analyser.load(default_model_dir(), mc_samples=20, num_threads=2)


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, list[Dataset]]:
    """An Enhanced CT of four frames and the four single-frame slices it was made from, in
    frame order (matched by position: the converter orders frames by it)."""
    folder = tmp_path_factory.mktemp("enhanced")
    image: Dataset = pydicom.dcmread(write_enhanced_ct(folder / "mf", slices=SLICES, size=64))
    slices: list[Dataset] = [
        pydicom.dcmread(p) for p in write_ct_series(folder / "sf", slices=SLICES, size=64)
    ]
    by_z = {float(ds.ImagePositionPatient[2]): ds for ds in slices}
    ordered = [
        by_z[float(frame_view(image, n).ImagePositionPatient[2])] for n in range(1, SLICES + 1)
    ]
    return image, ordered


@pytest.fixture(scope="module")
def analysis(analyser: Analyser, enhanced: tuple[Dataset, list[Dataset]]) -> StudyAnalysis:
    return analyser.analyse([enhanced[0]])


def test_a_frame_reads_as_the_slice_it_was_made_from(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    image, slices = enhanced
    assert frame_count(image) == SLICES and "RescaleSlope" not in image
    for n, ds in enumerate(slices, start=1):
        view = frame_view(image, n)
        # its functional groups in their single-frame places
        assert [float(v) for v in view.ImagePositionPatient] == pytest.approx(
            [float(v) for v in ds.ImagePositionPatient]
        )
        assert float(view.RescaleIntercept) == float(ds.RescaleIntercept)
        assert [float(v) for v in view.PixelSpacing] == [float(v) for v in ds.PixelSpacing]
        assert list(view.WindowCenter) == list(ds.WindowCenter)
        assert "LOCALIZER" not in view.ImageType
        hu = apply_modality_lut(frame_pixels(image, n), view)
        assert np.array_equal(hu, apply_modality_lut(ds.pixel_array, ds))
    assert getattr(image, "_pixel_array", None) is None  # each frame decoded alone
    with pytest.raises(ValueError, match="frame 5 of an image of 4"):
        frame_view(image, 5)
    with pytest.raises(ValueError, match="frame 0"):
        frame_pixels(image, 0)


def test_an_enhanced_images_pixel_padding_value_pads_each_frame(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    """Pixel Padding Value is a top-level attribute of an enhanced image too (no functional
    group holds it): each frame padded with -2000 reads as its slice padded with -1000, in
    the model input and in the heatmap's grey."""
    image, slices = enhanced
    padded = [pad_outside_fov(ds, -2000) for ds in slices]
    mf = copy.deepcopy(image)
    rows, columns = int(mf.Rows), int(mf.Columns)
    frames = np.frombuffer(mf.PixelData, dtype="<i2").reshape(SLICES, rows, columns).copy()
    for n, ds in enumerate(padded):
        outside = ds.pixel_array == -2000
        frames[n][outside] = -2000
    mf.PixelData = frames.tobytes()
    mf.add_new(0x00280120, "SS", -2000)
    spec = PreprocessSpec(size=32)
    inputs = preprocess_many(image_units([mf]), spec)
    for n, ds in enumerate(slices, start=1):
        other = pad_outside_fov(ds, -1000)
        x = inputs[n - 1]
        assert isinstance(x, np.ndarray) and np.array_equal(x, preprocess(other, spec))
        assert np.array_equal(render_grey(mf, n, window="auto"), render_grey(other, window="auto"))


def test_a_frames_own_rescale_wins_over_the_shared_one(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    image = copy.deepcopy(enhanced[0])
    own = Dataset()
    own.RescaleIntercept = "-1000"
    own.RescaleSlope = "2"
    own.RescaleType = "HU"
    image.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = [own]
    assert float(frame_view(image, 3).RescaleSlope) == 2.0
    assert float(frame_view(image, 2).RescaleSlope) == 1.0  # the shared one
    stored = frame_pixels(image, 3).astype(np.float64)
    assert np.array_equal(
        apply_modality_lut(frame_pixels(image, 3), frame_view(image, 3)), stored * 2 - 1000
    )


def test_a_frames_voi_lut_in_its_functional_groups_draws_it(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    """A VOI LUT Sequence in a frame's Frame VOI LUT (the Frame VOI LUT With LUT Macro, PS3.3
    C.7.6.16.2.10b, of a breast projection X-ray image) draws the frame as a single-frame
    image's VOI LUT Sequence draws it, not in the percentile window."""
    image = copy.deepcopy(enhanced[0])
    lut = Dataset()
    lut.LUTDescriptor = [4096, 65536 - 1024, 12]  # from -1024 HU (signed pixels: SS)
    lut.LUTData = [min(4095, 4 * value) for value in range(4096)]
    groups = [*image.SharedFunctionalGroupsSequence, *image.PerFrameFunctionalGroupsSequence]
    for group in groups:
        for item in group.get("FrameVOILUTSequence", []):
            for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
                if keyword in item:
                    delattr(item, keyword)
            item.VOILUTSequence = [lut]
    for n, ds in enumerate(enhanced[1], start=1):
        flat = copy.deepcopy(ds)
        del flat.WindowCenter, flat.WindowWidth
        flat.VOILUTSequence = [lut]
        assert np.array_equal(render_grey(image, n), render_grey(flat))
        assert not np.array_equal(render_grey(flat), render_grey(flat, window="auto"))


def test_a_multi_frame_image_is_one_model_input_per_frame(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    image, slices = enhanced
    spec = default_spec()
    units = image_units([image, slices[0]])
    assert [(u.sop_instance_uid, u.frame_number) for u in units] == [
        *((str(image.SOPInstanceUID), n) for n in range(1, SLICES + 1)),
        (str(slices[0].SOPInstanceUID), None),
    ]
    inputs = preprocess_many(units, spec)
    for n, ds in enumerate(slices):
        x = inputs[n]
        assert isinstance(x, np.ndarray)
        assert np.array_equal(x, preprocess(ds, spec))
        assert np.array_equal(x, preprocess(image, spec, n + 1))
    again, first = inputs[SLICES], inputs[0]
    assert isinstance(again, np.ndarray) and isinstance(first, np.ndarray)
    assert np.array_equal(again, first)  # the same slice twice
    with pytest.raises(UnsupportedImage, match=r"multi-frame image \(4 frames\) read as one"):
        preprocess(image, spec)


def test_a_compressed_multi_frame_image_is_read_frame_by_frame(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    image, slices = enhanced
    compressed = copy.deepcopy(image)
    compressed.compress(RLELossless)
    spec = default_spec()
    for n, ds in enumerate(slices, start=1):
        assert np.array_equal(preprocess(compressed, spec, n), preprocess(ds, spec))


def test_header_refusals_of_a_multi_frame_image_are_given_once_or_per_frame(
    enhanced: tuple[Dataset, list[Dataset]],
) -> None:
    """A colour cine is refused once, as an image; a localizer frame of an Enhanced CT (its
    Frame Type) alone, the other frames read."""
    image = enhanced[0]
    colour = copy.deepcopy(image)
    colour.PhotometricInterpretation = "RGB"
    colour.SamplesPerPixel = 3
    assert image_units([colour]) == [ImageUnit(colour)]
    (refused,) = preprocess_many(image_units([colour]), default_spec())
    assert isinstance(refused, UnsupportedImage) and "greyscale" in str(refused)

    scout = copy.deepcopy(image)
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    scout.PerFrameFunctionalGroupsSequence[0].CTImageFrameTypeSequence = [frame_type]
    results = preprocess_many(image_units([scout]), default_spec())
    assert isinstance(results[0], UnsupportedImage)
    assert str(results[0]).startswith(f"{scout.SOPInstanceUID} frame 1: a localizer")
    assert all(isinstance(x, np.ndarray) for x in results[1:])
    assert list(scout.ImageType) == list(image.ImageType)  # the frame's view changed nothing


def test_each_frame_has_a_result_of_its_own(
    analyser: Analyser, enhanced: tuple[Dataset, list[Dataset]], analysis: StudyAnalysis
) -> None:
    image, slices = enhanced
    uid = str(image.SOPInstanceUID)
    assert [(im.sop_instance_uid, im.frame_number) for im in analysis.images] == [
        (uid, n) for n in range(1, SLICES + 1)
    ]
    assert [im.name for im in analysis.images] == [f"{uid} frame {n}" for n in range(1, 5)]
    assert analysis.skipped == {}
    # The backbone reads each frame as its slice: the same out-of-distribution scores.
    alone = analyser.analyse(slices)
    assert [im.ood_score for im in analysis.images] == pytest.approx(
        [im.ood_score for im in alone.images], rel=1e-6
    )
    # Each frame draws its own dropout masks, and again the same on a second analysis.
    seeds = {image_seed(str(image.StudyInstanceUID), uid, n) for n in range(1, SLICES + 1)}
    assert len(seeds) == SLICES
    assert image_seed("1.2", "1.2.3") != image_seed("1.2", "1.2.3", 1)
    again = analyser.analyse([image])
    assert [im.probabilities for im in again.images] == [im.probabilities for im in analysis.images]
    for im in analysis.images:
        assert im.heatmap_array().shape == (64, 64)


def test_the_sr_refers_to_each_frame(
    enhanced: tuple[Dataset, list[Dataset]], analysis: StudyAnalysis, tmp_path: Path
) -> None:
    image = enhanced[0]
    document = build_sr([image], analysis)
    assert _from_template(document)
    reference = build_sr([image], analysis, check_all=True)
    _same_times(document, reference)
    encoded = encode_part10(document)
    assert encoded == encode_part10(reference)  # the template's frame numbers are highdicom's
    read = pydicom.dcmread(io.BytesIO(encoded))
    summary = summarise_sr(read)
    uid = str(image.SOPInstanceUID)
    assert sorted(summary["image_probabilities"]) == [f"{uid} frame {n}" for n in range(1, 5)]
    for im in analysis.images:
        assert summary["image_probabilities"][im.name] == pytest.approx(im.probabilities)
    assert summary["evidence_sop_instance_uids"] == [uid]  # the image once
    frames = sorted(
        int(item.ReferencedSOPSequence[0].ReferencedFrameNumber)
        for item in _walk(read)
        if item.get("ValueType") == "IMAGE"
        and "ReferencedFrameNumber" in item.ReferencedSOPSequence[0]
    )
    # each frame's label groups and its summary group; the study groups name no frame
    groups = len(analysis.labels) + 1
    assert frames == [n for n in range(1, SLICES + 1) for _ in range(groups)]
    path = tmp_path / "sr.dcm"
    path.write_bytes(encoded)
    assert dciodvfy_errors(path) == []


def test_the_sr_lists_the_multi_frame_image_in_its_image_library(
    enhanced: tuple[Dataset, list[Dataset]], analysis: StudyAnalysis
) -> None:
    """The Image Library lists the image (a viewer finds the images an SR is about there),
    with the descriptors of any image: highdicom reads no geometry from functional groups."""
    image = enhanced[0]
    document = build_sr([image], analysis)
    reference = build_sr([image], analysis, check_all=True)
    _same_times(document, reference)
    assert encode_part10(document) == encode_part10(reference)
    (library,) = [
        item
        for item in document.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    ]
    (group,) = library.ContentSequence
    (entry,) = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    listed = entry.ReferencedSOPSequence[0]
    assert (listed.ReferencedSOPClassUID, listed.ReferencedSOPInstanceUID) == (
        image.SOPClassUID,
        image.SOPInstanceUID,
    )
    descriptors = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item for item in entry.ContentSequence
    }
    assert descriptors["Modality"].ConceptCodeSequence[0].CodeValue == "CT"
    assert image.FrameOfReferenceUID == descriptors["Frame of Reference UID"].UID
    assert float(descriptors["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue) == 64


def test_each_frames_heatmap_shows_and_references_its_frame(
    enhanced: tuple[Dataset, list[Dataset]], analysis: StudyAnalysis, tmp_path: Path
) -> None:
    image, slices = enhanced
    uids = result_uids(str(image.StudyInstanceUID), analysis.model.name, analysis.model.version)
    seen = set()
    for n, (result, ds) in enumerate(zip(analysis.images, slices, strict=True), start=1):
        assert np.array_equal(render_grey(image, n), render_grey(ds))
        sc = build_heatmap_sc(image, result.heatmap_array(), analysis, result, instance_number=n)
        assert sc.SOPInstanceUID == uids.heatmap_instance_uid(str(image.SOPInstanceUID), n)
        seen.add(str(sc.SOPInstanceUID))
        (reference,) = sc.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == image.SOPInstanceUID
        assert int(reference.ReferencedFrameNumber) == n
        assert f"Frame {n} of the source image." in sc.ImageComments
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in ds.PixelSpacing]
        # the Frame Anatomy group's chest (SCT 816094009), an unpaired region: no Laterality
        # (dciodvfy warned of the empty one written when the body part was not read there)
        assert sc.BodyPartExamined == "CHEST" and "Laterality" not in sc
        path = tmp_path / f"hm{n}.dcm"
        path.write_bytes(encode_part10(sc))
        assert dciodvfy_errors(path) == []
        assert "<Laterality>" not in dciodvfy_output(path)
    assert len(seen) == SLICES
    assert uids.heatmap_instance_uid("1.2.3") != uids.heatmap_instance_uid("1.2.3", 1)
    with pytest.raises(ValueError, match="frame 2 of a single-frame image"):
        render_grey(slices[0], 2)


def test_an_enhanced_image_of_one_frame_is_read_with_its_functional_groups(
    analyser: Analyser, tmp_path: Path
) -> None:
    """An Enhanced CT of a single frame keeps its rescale, window and pixel spacing in its
    functional groups, as one of several frames does: read, drawn and measured as the slice
    it was made from (not as stored values in a percentile window)."""
    image = pydicom.dcmread(write_enhanced_ct(tmp_path / "mf", slices=1, size=64))
    (ds,) = (pydicom.dcmread(p) for p in write_ct_series(tmp_path / "sf", slices=1, size=64))
    assert frame_count(image) == 1 and "RescaleIntercept" not in image
    assert "WindowCenter" not in image and "PixelSpacing" not in image
    assert np.array_equal(modality_pixels(image), modality_pixels(ds))
    assert np.array_equal(render_grey(image), render_grey(ds))
    flipped = copy.deepcopy(image)  # a negative slope inverts the grey scale the model reads
    flipped.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = -1
    assert np.array_equal(modality_pixels(flipped), -modality_pixels(ds) - 2048)
    (result,) = analyser.analyse([image]).images
    assert result.frame_number is None  # the image as a whole: no Referenced Frame Number
    sc = build_heatmap_sc(
        image, result.heatmap_array(), analyser.analyse([image]), result, instance_number=1
    )
    assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in ds.PixelSpacing]
    path = tmp_path / "hm.dcm"
    path.write_bytes(encode_part10(sc))
    assert dciodvfy_errors(path) == []


def test_the_truth_side_car_lists_each_frames_slice(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, slices=3, size=64, label="nodule")
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    image = pydicom.dcmread(path, stop_before_pixels=True)
    assert [f["frame_number"] for f in truth["frames"]] == [1, 2, 3]
    for n, frame in enumerate(truth["frames"], start=1):
        assert frame["sop_instance_uid"] == image.SOPInstanceUID
        assert frame["z_mm"] == pytest.approx(float(frame_view(image, n).ImagePositionPatient[2]))
        if frame["mask"]:
            assert (tmp_path / frame["mask"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".dcm") == [path.name]


def default_spec() -> PreprocessSpec:
    return load_manifest(default_model_dir()).preprocess_spec()


def _walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from _walk(item)


def test_a_labelled_folder_reads_a_multi_frame_image_as_one_image_per_frame(
    tmp_path: Path,
) -> None:
    """The training loader: a row without a frame number labels every frame, a frame's own
    row wins; each frame is loaded through the node's preprocessing; the evaluation reads
    each frame's lesion box from the image's truth side-car."""
    path = write_enhanced_ct(tmp_path, slices=3, size=64, label="nodule")
    image = pydicom.dcmread(path)
    sop = str(image.SOPInstanceUID)
    (tmp_path / "labels.csv").write_text(
        f"sop_instance_uid,frame_number,label\n{sop},,normal\n{sop},2,nodule\n"
    )
    items = scan_folder(tmp_path)
    assert [(i.frame_number, i.label, i.name) for i in items] == [
        (1, "normal", f"{sop} frame 1"),
        (2, "nodule", f"{sop} frame 2"),
        (3, "normal", f"{sop} frame 3"),
    ]
    spec = default_spec()
    units, kept, refused = load_unit_images(items, spec)
    assert kept == [0, 1, 2] and refused == {}
    for n in (1, 2, 3):
        assert np.array_equal(units[n - 1], to_unit_range(image, spec, n))
    truth = json.loads(path.with_suffix(".truth.json").read_text())["frames"]
    boxes = read_boxes(tmp_path, items)
    assert boxes == {
        f"{sop} frame {f['frame_number']}": (tuple(f["box"]),) for f in truth if f["box"]
    }
    assert boxes  # the nodule is in at least one frame


def test_an_image_with_fewer_frames_than_it_declares_is_refused_once(
    analyser: Analyser, enhanced: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    """A truncated or inconsistent multi-frame image: one reason for the image, not one per
    frame, told from the Pixel Data's length (read whole or left in the file alike)."""
    bad = copy.deepcopy(enhanced[0])
    bad.NumberOfFrames = 6
    path = tmp_path / "bad.dcm"
    bad.save_as(path)
    uid = str(bad.SOPInstanceUID)
    reason = f"{uid}: pixel data could not be decoded: 6 frames declared, the pixel data holds 4"
    for ds in (bad, read_deferred(path)):
        with pytest.raises(NothingToAnalyse) as refused:
            analyser.analyse([ds])
        assert refused.value.skipped == {uid: reason}
        assert str(refused.value) == f"no image could be analysed ({reason})"
    assert short_pixel_data(enhanced[0]) is None
