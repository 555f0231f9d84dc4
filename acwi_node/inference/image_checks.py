"""What the model cannot read, told from a data set's header alone (no pixel data, no torch).

Preprocessing (:mod:`acwi_node.inference.preprocess`) refuses such an image with the reason,
and ``acwi-node routes check`` reports the same reasons for files on disk before any is sent.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from acwi_node.dicom_classes import is_single_frame_class
from acwi_node.dicom_frames import frame_count
from acwi_node.dicom_pixels import InvalidPixelTransform, rescale

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
    (:func:`acwi_node.dicom_frames.frame_view`) may still give one (a localizer frame, a
    frame's invalid rescale).

    A Rescale Slope or Intercept that is not a single finite number is a reason
    (:func:`acwi_node.dicom_pixels.rescale`). So is an image of a single-frame SOP Class (a
    DX, CR, CT, MR image, a Secondary Capture:
    :func:`acwi_node.dicom_classes.is_single_frame_class`) that says it has several frames: it
    is refused as a whole, since no result may reference a frame of it (Referenced Frame
    Number is for multi-frame classes alone) and its first frame alone is not the image it
    claims to be."""
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
    if not ds.get("ModalityLUTSequence"):  # a LUT's own checks need its data: when read
        try:
            rescale(ds)  # an empty or multi-valued Rescale Slope or Intercept
        except InvalidPixelTransform as exc:
            return str(exc)
    frames = frame_count(ds)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if frames > 1 and is_single_frame_class(sop_class):
        return (
            f"Number of Frames {frames} in an image of a single-frame SOP Class "
            f"({_class_name(sop_class)}, not multi-frame), not analysed"
        )
    return None


def _class_name(sop_class_uid: str) -> str:
    name = UID(sop_class_uid.strip("\x00 ")).name
    return name[:64] if name else sop_class_uid[:64]
