"""One frame of a multi-frame image, seen as a single-frame image.

An enhanced multi-frame image (Enhanced CT or MR, a Legacy Converted Enhanced image, breast
tomosynthesis, a multi-frame X-ray angiogram) keeps what a single-frame image has at the top
level in functional groups (PS3.3 C.7.6.16): the Rescale Slope and Intercept of each frame in
the Pixel Value Transformation Sequence, its window (or VOI LUT) in the Frame VOI LUT
Sequence, its pixel spacing in the Pixel Measures Sequence, its position and orientation in
the Plane Position and Plane Orientation Sequences, its Frame Type in the modality's Frame
Type Sequence; each either shared by every frame (Shared Functional Groups Sequence) or given
per frame (Per-frame Functional Groups Sequence, which wins). A multi-frame image without
them (a Multi-frame Grayscale Secondary Capture) keeps its values at the top level, shared by
every frame.

:func:`frame_view` gathers a frame's values into a data set with the top-level attributes a
single-frame image would have, so that the code reading a single-frame image (the modality
LUT, the window, the pixel spacing, the localizer check) reads a frame the same way. An
enhanced image of one frame keeps them in functional groups too, and is read through its
frame's view as a whole (:func:`image_header`).
:func:`frame_pixels` decodes that frame's stored values alone: a CT of hundreds of frames is
never decoded whole.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from acwi_node.dicom_pixels import PIXEL_DATA, is_native, stored_pixels

__all__ = [
    "frame_count",
    "frame_pixels",
    "frame_view",
    "functional_groups",
    "image_header",
    "short_pixel_data",
]

#: The top-level attributes a frame's view copies from its image: what decoding, the modality
#: LUT, the window and the result writers read.
_IMAGE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelSpacing",
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "FrameOfReferenceUID",
)

#: Image Type (0008,0008).
_IMAGE_TYPE = 0x00080008

#: Functional group macros and the attributes each gives a frame (PS3.3 C.7.6.16.2).
_MACROS: dict[str, tuple[str, ...]] = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": (  # the Frame VOI LUT (With LUT) Macro
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
        "VOILUTFunction",
        "VOILUTSequence",
    ),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
}

#: The Frame Type Sequences of the enhanced IODs (each item's Frame Type reads as Image Type).
_FRAME_TYPE_SEQUENCES = (
    "CTImageFrameTypeSequence",
    "MRImageFrameTypeSequence",
    "XAXRFFrameCharacteristicsSequence",
    "PETFrameTypeSequence",
    "XRay3DFrameTypeSequence",
    "SegmentationFrameTypeSequence",
)


def frame_count(ds: Dataset) -> int:
    """Number of Frames (1 when absent, empty or not a positive number)."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1
    return max(frames, 1)


def functional_groups(ds: Dataset, frame_number: int) -> list[Dataset]:
    """The functional groups that apply to frame ``frame_number`` (1-based): the shared item
    first, then the frame's own (a macro in it wins over the shared one); none for an image
    without functional groups."""
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if isinstance(shared, Sequence) and len(shared) > 0:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if isinstance(per_frame, Sequence) and len(per_frame) >= frame_number:
        groups.append(per_frame[frame_number - 1])
    return groups


def frame_view(ds: Dataset, frame_number: int) -> Dataset:
    """Frame ``frame_number`` (1-based) of ``ds`` as a single-frame image's header: the image's
    own attributes (:data:`_IMAGE_ATTRIBUTES`) with the frame's functional groups in their
    top-level places, its Frame Type as Image Type. No pixel data (:func:`frame_pixels`).
    The view shares the image's elements: read it, do not change it."""
    frames = frame_count(ds)
    if not 1 <= frame_number <= frames:
        raise ValueError(f"frame {frame_number} of an image of {frames} frame(s)")
    view = Dataset()
    for keyword in _IMAGE_ATTRIBUTES:
        if keyword in ds:
            view[keyword] = ds[keyword]
    for group in functional_groups(ds, frame_number):
        for macro, keywords in _MACROS.items():
            items = group.get(macro)
            if not isinstance(items, Sequence) or len(items) == 0:
                continue
            for keyword in keywords:
                if keyword in items[0]:
                    view[keyword] = items[0][keyword]
        for name in _FRAME_TYPE_SEQUENCES:
            items = group.get(name)
            if isinstance(items, Sequence) and len(items) > 0 and "FrameType" in items[0]:
                # a new element: the view shares the image's, which must not change
                view[_IMAGE_TYPE] = DataElement(_IMAGE_TYPE, "CS", items[0].FrameType)
    return view


def image_header(ds: Dataset, frame_number: int | None = None) -> Dataset:
    """The header that frame ``frame_number`` (1-based) of ``ds``, or ``ds`` as a whole
    (None), is read with: a frame's :func:`frame_view`; for an image of one frame with
    functional groups (an Enhanced CT or MR, a Legacy Converted Enhanced image, of a single
    frame: no Rescale, window or Pixel Spacing at the top level), its frame's view too;
    else ``ds`` itself."""
    if frame_number is not None:
        return frame_view(ds, frame_number)
    if frame_count(ds) == 1 and any(
        isinstance(ds.get(name), Sequence) and len(ds.get(name)) > 0
        for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
    ):
        return frame_view(ds, 1)
    return ds


def frame_pixels(ds: Dataset, frame_number: int) -> np.ndarray:
    """The stored values of frame ``frame_number`` (1-based), decoded alone (nothing is kept
    on ``ds``; :func:`acwi_node.dicom_pixels.stored_pixels`): ``(Rows, Columns)``, or
    ``(Rows, Columns, Samples)`` for colour."""
    frames = frame_count(ds)
    if not 1 <= frame_number <= frames:
        raise ValueError(f"frame {frame_number} of an image of {frames} frame(s)")
    return stored_pixels(ds, frame_number)


def short_pixel_data(ds: Dataset) -> str | None:
    """Why a native multi-frame image's frames cannot all be read: its Pixel Data is shorter
    than its Number of Frames says (a truncated or inconsistent object); None otherwise, or
    when that cannot be told from the header (compressed, one bit per pixel). Found from the
    element's length alone: Pixel Data left in the file is not read."""
    frames = frame_count(ds)
    if frames == 1 or not is_native(ds) or PIXEL_DATA not in ds:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits % 8:
        return None
    frame_bytes = rows * columns * samples * bits // 8
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    length = getattr(element, "length", None)
    if length is None:  # a converted element: its value is there
        value = getattr(element, "value", None)
        length = len(value) if isinstance(value, bytes | bytearray) else None
    if length is None or frame_bytes == 0 or length >= frames * frame_bytes:
        return None
    return (
        f"pixel data could not be decoded: {frames} frames declared, "
        f"the pixel data holds {length // frame_bytes}"
    )
