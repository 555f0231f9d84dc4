"""Blanking burned-in text in an image's pixels: PS3.15's Clean Pixel Data Option, for the
de-identified feedback export (:mod:`.deidentify`).

Text in the pixels cannot be found reliably without reading it, but a device puts it in the
same place on every image it makes (the patient's name in a corner of a radiograph, an
ultrasound's header band). ``[[feedback.burned_in]]`` names such devices (manufacturer,
model, modality, size) and the regions to blank (:class:`~acwi_node.config.BurnedInRegions`,
as RSNA CTP's pixel anonymizer signatures do). :func:`blank_regions` fills each region, in every
frame, with the value that shows black (a grey image's lowest stored value, its highest for
MONOCHROME1; 0 in every channel of a colour one), and stores the pixels uncompressed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from acwi_node.config import BurnedInRegions


def matching_signature(
    ds: Dataset, signatures: Sequence[BurnedInRegions]
) -> BurnedInRegions | None:
    """The first of ``signatures`` that ``ds`` is one of, or None."""
    attributes = (
        str(ds.get("Manufacturer", "") or ""),
        str(ds.get("ManufacturerModelName", "") or ""),
        str(ds.get("Modality", "") or ""),
        int(ds.get("Rows", 0) or 0),
        int(ds.get("Columns", 0) or 0),
    )
    return next((sig for sig in signatures if sig.matches(*attributes)), None)


def blank_regions(ds: Dataset, regions: Sequence[Sequence[int]]) -> int:
    """Fill each ``[x0, y0, x1, y1]`` region (inclusive pixels, cut at the image's edge) of
    every frame of ``ds`` with black, and store the pixel data uncompressed (Explicit VR Little
    Endian; a colour image as RGB). Returns how many pixels per frame were blanked. Raises
    what pydicom raises for pixel data it cannot decode."""
    pixels = np.array(ds.pixel_array)  # a writable copy
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3:
        photometric = "RGB"  # pydicom gives colour pixels as RGB, whatever they were stored as
    if samples == 3:
        black = pixels.dtype.type(0)
    else:
        black = pixels.max() if photometric == "MONOCHROME1" else pixels.min()
    # the row and column axes: the last two of a grey image, the two before the samples'
    row_axis = pixels.ndim - (3 if samples == 3 else 2)
    mask = np.zeros((rows, columns), dtype=bool)
    for x0, y0, x1, y1 in regions:
        mask[min(y0, rows) : min(y1, rows - 1) + 1, min(x0, columns) : min(x1, columns - 1) + 1] = (
            True
        )
    shape = [1] * pixels.ndim
    shape[row_axis], shape[row_axis + 1] = rows, columns
    pixels = np.where(mask.reshape(shape), black, pixels).astype(pixels.dtype, copy=False)
    ds.set_pixel_data(pixels, photometric, int(ds.BitsStored))
    return int(mask.sum())
