"""A dataset's stored pixel values, decoded so that a study's images do not all keep theirs.

A worker holds every image of a study from the moment it reads them until their results are
written: a CT of 1,000 slices of 512 x 512 is 500 MiB of Pixel Data, and pydicom's decoded
copy (``Dataset.pixel_array`` keeps it on the dataset) as much again. So:

* the worker reads a study's files with their large values deferred (:func:`read_deferred`):
  the Pixel Data stays in the spool file until it is asked for;
* :func:`stored_pixels` decodes an image in a native (uncompressed) transfer syntax from the
  file and then lets the bytes go again: the image holds neither its Pixel Data nor a decoded
  copy between the analysis and the drawing of its heatmap, each of which reads it once (from
  the page cache, as a copy costs). A multi-frame image's frames are decoded one at a time,
  but its Pixel Data, once read, stays: reading the whole element again for each frame would
  cost far more than the memory (a 100-frame CT analysed 10 times slower);
* an image in a compressed transfer syntax keeps what it decoded (decoding JPEG 2000 or
  JPEG-LS again would cost more time than the memory is worth).
"""

from __future__ import annotations

from os import PathLike

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

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


def stored_pixels(ds: Dataset, frame_number: int | None = None) -> np.ndarray:
    """``ds.pixel_array`` (frame ``frame_number``, 1-based, of a multi-frame image alone),
    without keeping it, or the Pixel Data it was decoded from, on ``ds`` when decoding again
    is a copy (module docstring)."""
    index = None if frame_number is None else frame_number - 1
    if not is_native(ds):
        return ds.pixel_array if index is None else pixel_array(ds, index=index)
    # A multi-frame image's Pixel Data, once read, is kept: each frame would otherwise read the
    # whole element again (a 300-frame CT: 150 MiB per frame).
    deferred = _deferred_pixel_data(ds) if index is None else None
    try:
        return pixel_array(ds, index=index)
    finally:
        if deferred is not None:  # back in the file: read again when next used
            ds[PIXEL_DATA] = deferred
