"""The shared preprocessing: modality LUT, MONOCHROME1, windowing, resize, refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit

from acwi_node.inference.preprocess import (
    PreprocessSpec,
    UnsupportedImage,
    modality_pixels,
    preprocess,
    preprocess_many,
    to_unit_range,
)
from models.data.synth import make_dataset, make_image


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
