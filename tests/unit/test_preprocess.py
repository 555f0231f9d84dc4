"""The shared preprocessing: modality LUT, MONOCHROME1, windowing, resize, refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEGBaseline8Bit

from acwi_node.inference.preprocess import (
    ImageUnit,
    PreprocessSpec,
    UnsupportedImage,
    image_units,
    modality_pixels,
    preprocess,
    preprocess_many,
    resize,
    to_unit_range,
    window,
)
from models.data.synth import (
    make_ct_dataset,
    make_ct_series,
    make_dataset,
    make_image,
    pad_outside_fov,
)
from tests.support.dx import make_dx


def _dataset(site: int = 0, size: int = 96, seed: int = 1) -> Dataset:
    pixels, _ = make_image("nodule", site, seed, size=size)
    return make_dataset(
        pixels,
        site=site,
        study_instance_uid="2.25.10",
        series_instance_uid="2.25.11",
        sop_instance_uid="2.25.12",
    )


def _with_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    out = copy.deepcopy(ds)
    out.Rows, out.Columns = pixels.shape
    out.PixelData = pixels.astype("<u2").tobytes()
    return out


SPEC = PreprocessSpec(size=64)
MF_GREY_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")


def test_output_shape_range_and_normalisation() -> None:
    ds = _dataset()
    unit = to_unit_range(ds, SPEC)
    assert unit.shape == (64, 64) and unit.dtype == np.float32
    assert unit.min() == 0.0 and unit.max() == 1.0
    spec = PreprocessSpec(size=64, mean=0.5, std=0.25)
    x = preprocess(ds, spec)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (unit - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    ds2 = _dataset(site=0)
    assert ds2.PhotometricInterpretation == "MONOCHROME2"
    stored = ds2.pixel_array.astype(np.int64)
    max_value = 2**ds2.BitsStored - 1
    ds1 = _with_pixels(ds2, (max_value - stored).astype(np.uint16))
    ds1.PhotometricInterpretation = "MONOCHROME1"
    a, b = to_unit_range(ds2, SPEC), to_unit_range(ds1, SPEC)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Without the photometric change the image would come out as a negative.
    ds1.PhotometricInterpretation = "MONOCHROME2"
    assert np.abs(to_unit_range(ds1, SPEC) - a).mean() > 0.3


def test_rescale_is_applied() -> None:
    ds = _dataset()
    stored = ds.pixel_array.astype(np.float64)
    ds.RescaleSlope = "2.5"
    ds.RescaleIntercept = "-100"
    np.testing.assert_allclose(modality_pixels(ds), 2.5 * stored - 100, rtol=1e-6)
    # A negative slope flips the grey scale.
    ds.RescaleSlope = "-1"
    ds.RescaleIntercept = "0"
    flipped = to_unit_range(ds, SPEC)
    ds.RescaleSlope = "1"
    assert np.abs(flipped - to_unit_range(ds, SPEC)).mean() > 0.3


def test_non_square_is_resized() -> None:
    ds = _dataset(size=128)
    cropped = _with_pixels(ds, ds.pixel_array[:, 16:112].copy())
    assert to_unit_range(cropped, SPEC).shape == (64, 64)


def test_no_pixel_data() -> None:
    ds = _dataset()
    del ds.PixelData
    with pytest.raises(UnsupportedImage, match="no PixelData"):
        preprocess(ds, SPEC)


def test_multi_frame_colour_small_and_flat_are_refused() -> None:
    ds = _dataset()
    multi = copy.deepcopy(ds)
    multi.NumberOfFrames = 2
    with pytest.raises(UnsupportedImage, match="multi-frame"):
        preprocess(multi, SPEC)
    colour = copy.deepcopy(ds)
    colour.PhotometricInterpretation = "RGB"
    colour.SamplesPerPixel = 3
    with pytest.raises(UnsupportedImage, match="greyscale"):
        preprocess(colour, SPEC)
    small = _with_pixels(ds, np.ones((16, 16), dtype=np.uint16))
    with pytest.raises(UnsupportedImage, match="too small"):
        preprocess(small, SPEC)
    flat = _with_pixels(ds, np.full((96, 96), 700, dtype=np.uint16))
    with pytest.raises(UnsupportedImage, match="no contrast"):
        preprocess(flat, SPEC)


@pytest.mark.parametrize(
    ("image_type", "refused"),
    [
        (["ORIGINAL", "PRIMARY", "LOCALIZER"], True),  # a CT scout
        (["ORIGINAL", "PRIMARY", "localizer "], True),
        ("LOCALIZER", True),  # one value
        (["ORIGINAL", "PRIMARY", "AXIAL"], False),
        (["DERIVED", "SECONDARY", "REFORMATTED"], False),
        (None, False),  # no Image Type
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case, as some scanners
def test_a_localizer_is_refused(image_type: list[str] | str | None, refused: bool) -> None:
    """A CT or MR scout plans the acquisition: analysed, it would count as one more image of
    the study (its probabilities in the study's mean, a heatmap of its own)."""
    ds = _dataset()
    if image_type is None:
        if "ImageType" in ds:
            del ds.ImageType
    else:
        ds.ImageType = image_type
    if refused:
        with pytest.raises(UnsupportedImage, match="localizer"):
            preprocess(ds, SPEC)
    else:
        assert preprocess(ds, SPEC).shape == (1, 64, 64)


def test_undecodable_compressed_pixel_data() -> None:
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    with pytest.raises(UnsupportedImage, match="could not be decoded"):
        preprocess(ds, SPEC)


def test_many_at_once_gives_each_ones_values_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """preprocess_many resizes images of one size together; every input is what preprocess
    makes of it alone, bit for bit, and every refusal is preprocess's, in order."""
    from acwi_node.inference import preprocess as module

    monkeypatch.setattr(module, "RESIZE_BATCH", 4)  # batches that split sizes and refusals
    base = _dataset(size=128)
    flat = _with_pixels(base, np.full((96, 96), 700, dtype=np.uint16))
    no_pixels = copy.deepcopy(base)
    del no_pixels.PixelData
    datasets = [
        _dataset(seed=1),
        _dataset(seed=2, size=128),
        flat,
        _dataset(seed=3),
        no_pixels,
        _with_pixels(base, base.pixel_array[:, 16:112].copy()),  # not square
        _dataset(seed=4, size=128),
        _dataset(seed=5),
        _dataset(seed=6, site=1),
    ]
    got = preprocess_many(datasets, SPEC)
    assert len(got) == len(datasets)
    for ds, result in zip(datasets, got, strict=True):
        try:
            expected = preprocess(ds, SPEC)
        except UnsupportedImage as exc:
            assert isinstance(result, UnsupportedImage) and str(result) == str(exc)
        else:
            assert isinstance(result, np.ndarray)
            assert result.dtype == expected.dtype and np.array_equal(result, expected)
    assert [isinstance(r, UnsupportedImage) for r in got] == [
        False,
        False,
        True,
        False,
        True,
        False,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize(
    ("slope", "intercept", "why"),
    [
        (None, None, "Rescale Slope empty"),
        ("", "0", "Rescale Slope empty"),
        ("1", None, "Rescale Intercept empty"),
        (["1", "2"], "0", "Rescale Slope has 2 values"),
        ("1", ["0", "5"], "Rescale Intercept has 2 values"),
        ("nan", "0", "Rescale Slope nan is not a finite number"),
        ("1", "inf", "Rescale Intercept inf is not a finite number"),
        ("0", "0", "Rescale Slope 0"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_an_invalid_rescale_refuses_the_image(slope: object, intercept: object, why: str) -> None:
    """Rescale Slope and Intercept are Type 1: present but empty (or several values, or not
    a finite number, or a slope of 0) they do not say what the stored values mean (not even
    whether the grey scale is inverted), so the image is refused with the reason rather than
    read as 1 and 0; the other images of a batch are read."""
    bad = _dataset(seed=2)
    bad.RescaleSlope = slope
    bad.RescaleIntercept = intercept
    expected = f"{bad.SOPInstanceUID}: invalid Rescale Slope/Intercept ({why})"
    with pytest.raises(UnsupportedImage) as refused:
        modality_pixels(bad)
    assert str(refused.value) == expected
    good = _dataset(seed=3)
    first, second = preprocess_many([good, bad], SPEC)
    assert np.array_equal(first, preprocess(good, SPEC))  # type: ignore[arg-type]
    assert isinstance(second, UnsupportedImage) and str(second) == expected


def test_rescale_slope_or_intercept_alone_counts_with_the_others_identity_value() -> None:
    ds = _dataset()
    stored = ds.pixel_array.astype(np.float64)
    del ds.RescaleIntercept
    ds.RescaleSlope = "-2"
    np.testing.assert_array_equal(modality_pixels(ds), (-2 * stored).astype(np.float32))
    del ds.RescaleSlope
    ds.RescaleIntercept = "-1024"
    np.testing.assert_array_equal(modality_pixels(ds), (stored - 1024).astype(np.float32))
    del ds.RescaleIntercept
    np.testing.assert_array_equal(modality_pixels(ds), stored.astype(np.float32))


def _modality_lut(entries: np.ndarray, *, first: int = 0, bits: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(entries) % 65536, first, bits]
    item.add_new(0x00283006, "OW", entries.astype("<u2").tobytes())
    item.ModalityLUTType = "US"
    return item


def test_a_modality_lut_sequence_is_applied_as_pydicom_applies_it() -> None:
    """A Modality LUT Sequence (its LUT Data OW bytes, as read from a file) instead of the
    rescale: the stored values map to its entries, those past its ends to its first and
    last entry, as pydicom's apply_modality_lut maps them."""
    from pydicom.pixels import apply_modality_lut

    ds = _dataset()
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.ModalityLUTSequence = [_modality_lut(4095 - np.arange(2000), first=100)]
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    np.testing.assert_array_equal(modality_pixels(ds), expected)


@pytest.mark.parametrize("broken", ["short", "bits"])
def test_a_modality_lut_that_cannot_be_applied_refuses_the_image(broken: str) -> None:
    ds = _dataset()
    del ds.RescaleSlope, ds.RescaleIntercept
    item = _modality_lut(np.arange(4096))
    if broken == "short":
        item.LUTData = item.LUTData[:100]
    else:
        item.LUTDescriptor = [4096, 0, 40]
    ds.ModalityLUTSequence = [item]
    with pytest.raises(UnsupportedImage, match="invalid Modality LUT Sequence") as refused:
        modality_pixels(ds)
    assert len(str(refused.value)) < 200


def test_an_image_of_a_single_frame_class_with_several_frames_is_refused_once() -> None:
    """A DX image (its IOD has no Multi-frame Module) that says it has three frames: no
    result may reference a frame of it, and its first frame alone is not the image, so it is
    refused as a whole, with the reason; the same pixels as a multi-frame Secondary Capture
    are read frame by frame."""
    single = _dataset()
    pixels = single.pixel_array
    single.NumberOfFrames = 3
    single.PixelData = np.stack([pixels, pixels[::-1], pixels[:, ::-1]]).tobytes()
    units = image_units([single])
    assert units == [ImageUnit(single)]
    (refused,) = preprocess_many(units, SPEC)
    assert isinstance(refused, UnsupportedImage)
    assert str(refused) == (
        f"{single.SOPInstanceUID}: Number of Frames 3 in an image of a single-frame SOP Class "
        "(Digital X-Ray Image Storage - For Presentation, not multi-frame), not analysed"
    )
    multi = copy.deepcopy(single)
    multi.SOPClassUID = multi.file_meta.MediaStorageSOPClassUID = MF_GREY_WORD_SC
    units = image_units([multi])
    assert [u.frame_number for u in units] == [1, 2, 3]
    assert all(isinstance(x, np.ndarray) for x in preprocess_many(units, SPEC))


def ct_slice(size: int = 256, site: int = 0) -> Dataset:
    """One axial slice of a synthetic chest CT (site 0: int16, Rescale Intercept -1024)."""
    series = make_ct_series("nodule", site, 0, slices=1, size=size)
    return make_ct_dataset(
        series.hu[0],
        site=site,
        z_mm=0.0,
        origin_xy_mm=series.origin_xy_mm,
        pixel_spacing_mm=series.pixel_spacing_mm,
        frame_of_reference_uid="2.25.20",
        study_instance_uid="2.25.21",
        series_instance_uid="2.25.22",
        sop_instance_uid="2.25.23",
    )


def _inside_fov(size: int, margin: float = 2.0) -> np.ndarray:
    """The model input's pixels inside the reconstruction circle, ``margin`` pixels in (the
    resize blends the pixels at its edge with their neighbours outside)."""
    y, x = np.mgrid[0:size, 0:size]
    return np.hypot(y + 0.5 - size / 2.0, x + 0.5 - size / 2.0) < size / 2.0 - margin


def test_the_value_a_scanner_pads_with_does_not_change_the_model_input() -> None:
    """The same slice padded outside its reconstruction circle with stored -2000 (-3024 HU)
    or -1000 (-2024 HU), each declared by Pixel Padding Value, gives the same model input, bit
    for bit: padding takes the lowest value of the image's other pixels and counts in no
    percentile. Filled with undeclared air (-1000 HU) instead, the input inside the circle is
    within a few hundredths (before: 0.4 on average)."""
    spec = PreprocessSpec(size=128, mean=0.43, std=0.33)
    ds = ct_slice()
    minus_2000, minus_1000 = pad_outside_fov(ds, -2000), pad_outside_fov(ds, -1000)
    air = pad_outside_fov(ds, -1000 + 1024, declared=False)
    x = preprocess(minus_2000, spec)
    assert np.array_equal(preprocess(minus_1000, spec), x)
    inside = _inside_fov(128)
    difference = np.abs(preprocess(air, spec) - x)[0][inside]
    assert difference.mean() < 0.03 and difference.max() < 0.1
    # the batch path reads it alike, beside an image without padding
    batch = [np.asarray(y) for y in preprocess_many([minus_2000, ds, minus_1000], spec)]
    assert np.array_equal(batch[0], x) and np.array_equal(batch[2], x)
    assert np.array_equal(batch[1], preprocess(ds, spec))


def test_padding_takes_the_lowest_value_of_the_other_pixels_and_maps_to_zero() -> None:
    ds = pad_outside_fov(ct_slice(size=128), -2000)
    stored = ds.pixel_array
    values = modality_pixels(ds)
    native = stored != -2000
    assert np.array_equal(values[native], stored[native].astype(np.float32) - 1024)
    assert np.all(values[~native] == values[native].min())
    unit = to_unit_range(ds, SPEC)
    corners = resize(~native, SPEC.size) >= 1.0
    assert corners.any() and np.all(unit[corners] == 0.0)


def test_a_monochrome1_background_range_is_padding() -> None:
    """A mammogram-like MONOCHROME1 image whose background is a range of high stored values
    (Pixel Padding Value 4095, Range Limit 4000: PS3.3's order for MONOCHROME1): after the
    inversion the background is the darkest, at 0, whatever its values in the range, and the
    percentiles are the breast's alone."""
    yy, xx = np.mgrid[0:128, 0:96]
    breast = np.hypot(yy - 64.0, xx) < 80.0
    tissue = (1000 + (yy * 7 + xx * 13) % 2000).astype(np.uint16)
    images = []
    for background in (4095, 4000):
        ds = make_dx("2.25.30", rows=128, columns=96, monochrome1=True, pixels=tissue)
        pixels = np.where(breast, tissue, background).astype(np.uint16)
        pixels[0, 95] = 4042  # noise in the background, inside the range
        ds.PixelData = pixels.tobytes()
        ds.add_new(0x00280120, "US", 4095)
        ds.add_new(0x00280121, "US", 4000)
        images.append(to_unit_range(ds, SPEC))
    assert np.array_equal(images[0], images[1])
    inverted = -tissue[breast].astype(np.float32)
    assert np.array_equal(modality_pixels(ds)[~breast], np.full((~breast).sum(), inverted.min()))
    padded = resize(~breast, SPEC.size)
    expected = window(resize(modality_pixels(ds), SPEC.size), 0.5, 99.5, padded)
    assert np.array_equal(images[0], expected)


def test_an_image_without_padding_reads_as_before() -> None:
    """No Pixel Padding Value, or one no pixel holds, or one outside the stored values' range:
    the same values as the steps without padding, bit for bit."""
    ds = ct_slice(size=128)
    before = window(resize(modality_pixels(ds), SPEC.size), 0.5, 99.5)
    assert np.array_equal(to_unit_range(ds, SPEC), before)
    for value, vr in ((-2000, "SS"), (-40000 + 65536, "US")):
        marked = copy.deepcopy(ds)
        marked.add_new(0x00280120, vr, value)
        assert np.array_equal(to_unit_range(marked, SPEC), before)
        (many,) = preprocess_many([marked], SPEC)
        assert isinstance(many, np.ndarray) and np.array_equal(many, preprocess(ds, SPEC))


def test_an_image_that_is_all_padding_is_refused() -> None:
    ds = _dataset()
    ds.add_new(0x00280120, "US", 0)
    ds.add_new(0x00280121, "US", (1 << int(ds.BitsStored)) - 1)
    with pytest.raises(UnsupportedImage, match="every pixel is padding"):
        to_unit_range(ds, SPEC)
