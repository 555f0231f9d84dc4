"""A dataset's stored pixel values, decoded so that a study's images do not all keep theirs.

A worker holds every image of a study from the moment it reads them until their results are
written: a CT of 1,000 slices of 512 x 512 is 500 MiB of Pixel Data, and pydicom's decoded
copy (``Dataset.pixel_array`` keeps it on the dataset) as much again. So:

* the worker reads a study's files with their large values deferred (:func:`read_deferred`):
  the Pixel Data stays in the spool file until it is asked for;
* :func:`stored_pixels` decodes an image in a native (uncompressed) transfer syntax from the
  file and then lets the bytes go again: the image holds neither its Pixel Data nor a decoded
  copy between the analysis and the drawing of its heatmap, each of which reads it once (from
  the page cache, as a copy costs);
* a multi-frame image's frame, native or compressed, is read from the file alone, its bytes
  or its fragments only (reading the whole element for each frame of a 100-frame CT made its
  analysis ten times slower), and decoded by pydicom's decoder for the transfer syntax;
* a single-frame image in a compressed transfer syntax keeps what it decoded (decoding JPEG
  2000 or JPEG-LS again would cost more time than the memory is worth).
"""

from __future__ import annotations

import struct
from os import PathLike

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import as_pixel_options

__all__ = ["DEFER_SIZE", "PIXEL_DATA", "is_native", "read_deferred", "stored_pixels"]

#: Pixel Data (7FE0,0010).
PIXEL_DATA = 0x7FE00010
#: Values larger than this stay in the file until they are used (:func:`read_deferred`): the
#: Pixel Data of any image but a thumbnail.
DEFER_SIZE = 64 * 1024


def is_native(ds: Dataset) -> bool:
    """The dataset's Pixel Data is in a native (uncompressed) transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return syntax is not None and not syntax.is_compressed


def read_deferred(path: str | PathLike[str]) -> Dataset:
    """The file's data set, its values over :data:`DEFER_SIZE` (the Pixel Data) left in the
    file and read when used. The file must stay as it is while the data set is in use."""
    return dcmread(path, defer_size=DEFER_SIZE)


def _deferred_pixel_data(ds: Dataset) -> RawDataElement | None:
    """The Pixel Data element as read, while it is still in the file; else None."""
    if PIXEL_DATA not in ds:
        return None
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)  # does not read it
    return raw if isinstance(raw, RawDataElement) and raw.value is None else None


def _element_header(raw: RawDataElement) -> tuple[int, bytes]:
    """Where the element's header starts in its file, and the bytes it must hold there."""
    order = "<" if raw.is_little_endian else ">"
    tag = struct.pack(f"{order}HH", raw.tag >> 16, raw.tag & 0xFFFF)
    if raw.is_implicit_VR:
        return raw.value_tell - 8, tag + struct.pack(f"{order}L", raw.length)
    vr = (raw.VR or "OW").encode("ascii")
    return raw.value_tell - 12, tag + vr + b"\0\0" + struct.pack(f"{order}L", raw.length)


def _frame_from_file(ds: Dataset, raw: RawDataElement, index: int) -> np.ndarray | None:
    """Frame ``index`` (0-based) of a multi-frame image whose Pixel Data is still in its file,
    read from there alone (its bytes, or its fragments: a 300-frame CT's element is 150 MiB);
    None where that cannot be done (no file name, the file no longer holds the element where
    it was), and the caller reads the element whole as pydicom would."""
    filename = getattr(ds, "filename", None)
    if not isinstance(filename, str) or raw.length is None:
        return None
    start, expected = _element_header(raw)
    options = as_pixel_options(ds, pixel_keyword="PixelData")
    options["number_of_frames"] = int(options.get("number_of_frames") or 1)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    with open(filename, "rb") as file:
        file.seek(start)
        if file.read(len(expected)) != expected:  # replaced since it was read
            return None
        array, _ = decoder.as_array(file, index=index, **options)
    return array


def stored_pixels(ds: Dataset, frame_number: int | None = None) -> np.ndarray:
    """``ds.pixel_array`` (frame ``frame_number``, 1-based, of a multi-frame image alone),
    without keeping it, or the Pixel Data it was decoded from, on ``ds`` when decoding again
    is a copy (module docstring)."""
    index = None if frame_number is None else frame_number - 1
    deferred = _deferred_pixel_data(ds)
    if deferred is not None and index is not None:
        frame = _frame_from_file(ds, deferred, index)
        if frame is not None:
            return frame
    if not is_native(ds):
        return ds.pixel_array if index is None else pixel_array(ds, index=index)
    try:
        return pixel_array(ds, index=index)
    finally:
        if deferred is not None:  # back in the file: read again when next used
            ds[PIXEL_DATA] = deferred
