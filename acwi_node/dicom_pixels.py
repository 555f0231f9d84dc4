"""A dataset's stored pixel values, decoded so that a study's images do not all keep theirs.

pydicom keeps what ``Dataset.pixel_array`` decodes on the dataset (``_pixel_array``), beside
the Pixel Data it came from: a worker analysing a CT held every slice twice, 0.5 MiB more per
512 x 512 slice until the study's results were written. An image in a native (uncompressed)
transfer syntax is therefore decoded without that cache, since decoding it again (when its
heatmap is drawn) is a copy. A compressed one keeps it: decoding JPEG 2000 or JPEG-LS again
would cost more time than the memory is worth.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array


def is_native(ds: Dataset) -> bool:
    """The dataset's Pixel Data is in a native (uncompressed) transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return syntax is not None and not syntax.is_compressed


def stored_pixels(ds: Dataset) -> np.ndarray:
    """``ds.pixel_array``, without keeping it on ``ds`` when decoding again is cheap."""
    if is_native(ds):
        return pixel_array(ds)
    return ds.pixel_array
