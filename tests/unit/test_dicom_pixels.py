"""A study's images read with their Pixel Data left in the spool file, decoded when used and
let go again (acwi_node/dicom_pixels.py), so a worker holding a large CT holds its headers."""

from __future__ import annotations

from pathlib import Path

import jpeg_ls
import numpy as np
import openjpeg
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from acwi_node.dicom_frames import frame_pixels
from acwi_node.dicom_pixels import PIXEL_DATA, padding_mask, read_deferred, stored_pixels
from acwi_node.inference.preprocess import modality_pixels
from acwi_node.results.headers import source_header
from models.data.synth import write_ct_series, write_enhanced_ct
from tests.support.dx import make_dx

#: Multi-frame Grayscale Word Secondary Capture Image Storage.
MF_GREY_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")


def _in_file(ds: pydicom.Dataset) -> bool:
    """The Pixel Data is still in the file (not read into the data set)."""
    return ds.get_item(PIXEL_DATA, keep_deferred=True).value is None


@pytest.fixture
def slice_path(tmp_path: Path) -> Path:
    return write_ct_series(tmp_path, slices=1, size=512)[0]


def test_pixels_are_read_when_used_and_let_go_again(slice_path: Path) -> None:
    ds = read_deferred(slice_path)
    assert _in_file(ds)
    expected = pydicom.dcmread(slice_path).pixel_array
    for _ in range(2):  # the analysis, then the heatmap
        assert np.array_equal(stored_pixels(ds), expected)
        assert _in_file(ds) and getattr(ds, "_pixel_array", None) is None
    header = source_header(ds)
    assert "PixelData" not in header and header.SOPInstanceUID == ds.SOPInstanceUID
    assert _in_file(ds)  # copying the header read nothing of the pixels


def test_a_multi_frame_images_frames_are_read_from_the_file_one_at_a_time(
    tmp_path: Path,
) -> None:
    """Each frame read alone from the file, its bytes only: the image never holds its Pixel
    Data (reading the whole element again for each frame made a 100-frame CT's analysis ten
    times slower; keeping it, a worker held the whole series)."""
    path = write_enhanced_ct(tmp_path, slices=3, size=128)  # over DEFER_SIZE
    ds = read_deferred(path)
    whole = pydicom.dcmread(path).pixel_array
    for n in (3, 1, 2):
        assert np.array_equal(frame_pixels(ds, n), whole[n - 1])
        assert _in_file(ds) and getattr(ds, "_pixel_array", None) is None


def test_a_compressed_multi_frame_images_frames_are_read_from_their_fragments(
    tmp_path: Path,
) -> None:
    path = write_enhanced_ct(tmp_path, slices=3, size=256)  # compressed: over DEFER_SIZE
    whole = pydicom.dcmread(path).pixel_array
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle)
    compressed = read_deferred(rle)
    assert _in_file(compressed)
    for n in (2, 3, 1):
        assert np.array_equal(frame_pixels(compressed, n), whole[n - 1])
        assert _in_file(compressed) and getattr(compressed, "_pixel_array", None) is None


@pytest.mark.filterwarnings("ignore:Deferred read warning")
def test_a_multi_frame_file_replaced_since_it_was_read_is_not_read_blindly(
    tmp_path: Path,
) -> None:
    """The study re-opened while its job ran (a new version of the image): the element is
    not where it was; the frame is not taken from wherever the offset now points."""
    path = write_enhanced_ct(tmp_path, slices=3, size=128)
    ds = read_deferred(path)
    newer = pydicom.dcmread(path)
    newer.SeriesDescription = "a longer description that moves the pixel data along"
    newer.save_as(path)
    with pytest.raises(ValueError):
        frame_pixels(ds, 1)


def test_a_compressed_image_keeps_what_it_decoded(slice_path: Path, tmp_path: Path) -> None:
    """Decoding RLE or JPEG 2000 again costs more than its copy: it is kept."""
    ds = pydicom.dcmread(slice_path)
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path)
    compressed = read_deferred(path)
    assert np.array_equal(stored_pixels(compressed), pydicom.dcmread(slice_path).pixel_array)
    assert getattr(compressed, "_pixel_array", None) is not None


def test_a_dataset_read_whole_is_decoded_without_a_cached_copy(slice_path: Path) -> None:
    ds = pydicom.dcmread(slice_path)
    stored_pixels(ds)
    assert "PixelData" in ds and getattr(ds, "_pixel_array", None) is None


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless], ids=["jpeg-ls", "j2k"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_bits_above_bits_stored_in_a_code_stream_are_not_part_of_the_values(
    syntax: UID, signed: bool, tmp_path: Path
) -> None:
    """A JPEG-LS or JPEG 2000 code stream of 16-bit precision for 12 Bits Stored (an encoder
    that compressed the 16-bit words as they were: overlay bits or whatever a scanner left above
    High Bit with them). The values are those of the 12 bits (PS3.5 8.1.1), as in the native
    image and as DCMTK decodes it, in a single-frame image and in a frame of a multi-frame one."""
    rows, columns = 64, 48
    yy, xx = np.mgrid[0:rows, 0:columns]
    values = ((yy * 37 + xx * 11) % 4096 - (2048 if signed else 0)).astype(np.int32)
    words = ((values & 0x0FFF) | 0xA000).astype(np.uint16)  # bits 13 and 15 set: not values
    if syntax == JPEGLSLossless:
        codestream = bytes(jpeg_ls.encode(words))
    else:
        codestream = openjpeg.encode(words, bits_stored=16, photometric_interpretation=2)
    for frames in (1, 2):
        ds = make_dx(generate_uid(), rows=rows, columns=columns, window=False)
        ds.PixelRepresentation = 1 if signed else 0
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([codestream] * frames)
        ds["PixelData"].VR = "OB"
        if frames > 1:  # a multi-frame class: each frame read from the file alone
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MF_GREY_WORD_SC
            ds.NumberOfFrames = frames
        path = tmp_path / f"{frames}.dcm"
        ds.save_as(path, enforce_file_format=True)
        read = read_deferred(path)
        if frames == 1:
            assert np.array_equal(stored_pixels(read), values)
            assert np.array_equal(modality_pixels(read), values)  # Rescale 1 and 0
        else:
            assert np.array_equal(frame_pixels(read, 2), values)
            assert np.array_equal(modality_pixels(read, 2), values)


def _padded(
    value: object, limit: object = None, *, signed: bool = False, vr: str | None = None
) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.BitsStored, ds.PixelRepresentation = 12, int(signed)
    kind = vr or ("SS" if signed else "US")
    ds.add_new(0x00280120, kind, value)  # Pixel Padding Value
    if limit is not None:
        ds.add_new(0x00280121, kind, limit)  # Pixel Padding Range Limit
    return ds


def _marks(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    mask = padding_mask(stored, ds)
    assert mask is not None
    return mask


def test_pixel_padding_value_and_range_limit_mark_stored_values() -> None:
    """PS3.3 C.7.5.1.1.2: Pixel Padding Value alone marks the stored values equal to it; with
    Pixel Padding Range Limit, those from one to the other inclusive (the standard's order
    for MONOCHROME2, value below limit, or MONOCHROME1's, above); no pixel with such a value,
    or no attribute, is no mask."""
    stored = np.array([[0, 5, 10, 11], [4095, 4000, 3999, 7]], dtype=np.uint16)
    assert np.array_equal(_marks(stored, _padded(0)), stored == 0)
    in_range = (stored >= 0) & (stored <= 10)
    assert np.array_equal(_marks(stored, _padded(0, 10)), in_range)
    high = (stored >= 4000) & (stored <= 4095)
    assert np.array_equal(_marks(stored, _padded(4095, 4000)), high)  # MONOCHROME1's
    assert np.array_equal(_marks(stored, _padded(4000, 4095)), high)
    assert padding_mask(stored, _padded(1)) is None  # no pixel holds it
    assert padding_mask(stored, pydicom.Dataset()) is None


def test_pixel_padding_value_follows_pixel_representation() -> None:
    """Its VR is that of Pixel Representation: a signed image's -2000 written as US (63536 as
    read) is -2000; a value the stored values cannot take (outside 12 Bits Stored) marks
    nothing, and a Range Limit that cannot be one leaves Pixel Padding Value alone."""
    signed = np.array([[-2000, -1999, 0], [24, -2000, 2047]], dtype=np.int16)
    expected = signed == -2000
    assert np.array_equal(_marks(signed, _padded(-2000, signed=True)), expected)
    as_us = _padded(63536, signed=True, vr="US")
    assert np.array_equal(_marks(signed, as_us), expected)
    assert np.array_equal(_marks(signed, _padded(-2000, 5000, signed=True)), expected)
    assert padding_mask(signed, _padded(-3000, signed=True)) is None  # under -2048
    unsigned = np.array([[4095, 0], [1, 2]], dtype=np.uint16)
    assert padding_mask(unsigned, _padded(-1, vr="SS")) is None  # 65535: not 12 bits
    assert np.array_equal(_marks(unsigned, _padded(4095)), unsigned == 4095)
