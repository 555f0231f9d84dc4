"""What the model cannot read, told from a data set's header alone (no pixel data, no torch).

Preprocessing (:mod:`acwi_node.inference.preprocess`) refuses such an image with the reason,
and ``acwi-node routes check`` reports the same reasons for files on disk before any is sent.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: Smallest Rows and Columns the model reads.
MIN_SIZE = 32


def is_localizer(ds: Dataset) -> bool:
    """``LOCALIZER`` is one of the Image Type's values (PS3.3 C.8.2.1.1.1, CT; MR alike)."""
    image_type = ds.get("ImageType")
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def header_refusal(ds: Dataset) -> str | None:
    """Why the model cannot read this image, from its header; None when it may (its pixel
    data may still be missing or undecodable). A multi-frame image is read frame by frame,
    so its number of frames is no reason; a frame's own header
    (:func:`acwi_node.dicom_frames.frame_view`) may still give one (a localizer frame)."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return (
            f"not a greyscale image (SamplesPerPixel {samples}, "
            f"PhotometricInterpretation {photometric or 'missing'})"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < MIN_SIZE or cols < MIN_SIZE:
        return f"image too small ({rows} x {cols})"
    if is_localizer(ds):
        return "a localizer (scout) image, not analysed"
    return None
