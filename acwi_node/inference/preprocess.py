"""The one preprocessing path from a DICOM dataset to a model input (training and node alike).

Steps, in order:

1. checks: one sample per pixel, MONOCHROME1/MONOCHROME2, ``PixelData`` present and
   decodable, at least 32 x 32 pixels, not a localizer (``LOCALIZER`` in Image Type: a CT or
   MR scout, which plans the acquisition and would otherwise count as one more image of the
   study); anything else raises :class:`UnsupportedImage`. A multi-frame image (Enhanced CT
   or MR, tomosynthesis, a multi-frame secondary capture) is read frame by frame: each frame
   is one model input (:class:`ImageUnit`), decoded alone, with the frame's own functional
   groups (its rescale, its Frame Type) read as a single-frame image's attributes
   (:mod:`acwi_node.dicom_frames`);
2. modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence; a frame's own). A
   Rescale Slope or Intercept that is not a single finite number (present but empty, several
   values, not a number) or a slope of 0, or a Modality LUT that cannot be applied, refuses
   the image (:func:`acwi_node.dicom_pixels.rescale`): the file does not say what its stored
   values mean, and a guess (1 and 0) is not made;
3. MONOCHROME1 inversion (negation), so that higher always means brighter/denser; pixels
   that Pixel Padding Value (0028,0120), with Pixel Padding Range Limit (0028,0121), marks
   as padding (compared with the stored values, PS3.3 C.7.5.1.1.2: outside a CT's
   reconstruction circle, a mammogram's background;
   :func:`acwi_node.dicom_pixels.padding_mask`) take the lowest value of the others, so
   that an image reads the same whatever value its scanner pads with;
4. plain resize (no padding, aspect ratio not kept) to ``size x size`` with antialiased
   bilinear interpolation; the heatmap goes back to Rows x Columns by the inverse resize;
5. robust windowing: the lower/upper percentiles of the resized image map to 0/1, clipped;
   of an image with padding, the percentiles of the resized pixels that no padded pixel
   contributes to (padding then maps to 0). The VOI LUT (Window Center/Width) of the file
   is deliberately ignored, so that sites with different windows give comparable inputs;
6. z-normalisation with the manifest's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from acwi_node.dicom_frames import frame_count, frame_pixels, image_header, short_pixel_data
from acwi_node.dicom_pixels import (
    InvalidPixelTransform,
    is_little_endian,
    modality_values,
    padding_mask,
    stored_pixels,
)
from acwi_node.inference.image_checks import header_refusal
from acwi_node.inference.types import unit_name


class UnsupportedImage(ValueError):
    """The dataset holds no image the model can read; the message says why."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Parameters of :func:`preprocess` (the manifest's ``input`` and ``preprocessing``)."""

    size: int
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    mean: float = 0.0
    std: float = 1.0


def _sop(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOPInstanceUID>"))


@dataclass(frozen=True)
class ImageUnit:
    """One image the model reads: a single-frame image (``frame_number`` None) or one frame
    (1-based) of a multi-frame image."""

    ds: Dataset
    frame_number: int | None = None
    #: Why the image is refused as a whole before any frame is read (its frames cannot all be
    #: there); None to read it.
    refusal: str | None = None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.ds.get("SOPInstanceUID", ""))

    @property
    def name(self) -> str:
        return unit_name(_sop(self.ds), self.frame_number)

    @property
    def shape(self) -> tuple[int, int]:
        """(Rows, Columns): every frame of an image has its image's."""
        return int(self.ds.Rows), int(self.ds.Columns)


def image_units(datasets: Iterable[Dataset]) -> list[ImageUnit]:
    """The images the model reads in ``datasets``, in order: a single-frame image as itself,
    a multi-frame image as each of its frames in frame order. A multi-frame image its header
    refuses as a whole (colour, too small, a localizer), or whose Pixel Data is shorter than
    its frames, stays one unit, refused once."""
    units: list[ImageUnit] = []
    for ds in datasets:
        frames = frame_count(ds)
        if frames == 1 or "PixelData" not in ds or header_refusal(ds) is not None:
            units.append(ImageUnit(ds))
        elif (short := short_pixel_data(ds)) is not None:  # one reason, not one per frame
            units.append(ImageUnit(ds, refusal=short))
        else:
            units.extend(ImageUnit(ds, n) for n in range(1, frames + 1))
    return units


def modality_pixels(ds: Dataset, frame_number: int | None = None) -> np.ndarray:
    """Checked float32 pixels after the modality LUT and MONOCHROME1 inversion (steps 1-3),
    of the image or, for a multi-frame image, of frame ``frame_number`` (1-based); padding
    has the lowest value of the other pixels."""
    return padded_modality_pixels(ds, frame_number)[0]


def padded_modality_pixels(
    ds: Dataset, frame_number: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`modality_pixels` and where the pixels are padding (None: nowhere)."""
    name = unit_name(_sop(ds), frame_number)
    if "PixelData" not in ds:
        raise UnsupportedImage(f"{name}: no PixelData (not an integer-pixel image)")
    refusal = header_refusal(ds)
    if refusal is not None:
        raise UnsupportedImage(f"{name}: {refusal}")
    frames = frame_count(ds)
    if frame_number is None and frames > 1:
        raise UnsupportedImage(f"{name}: multi-frame image ({frames} frames) read as one image")
    try:  # a frame's functional groups (those of an enhanced image of one frame too)
        header = image_header(ds, frame_number)
    except ValueError as exc:
        raise UnsupportedImage(f"{name}: {exc}") from exc
    if header is not ds:
        refusal = header_refusal(header)  # the frame's own Frame Type: a localizer frame
        if refusal is not None:
            raise UnsupportedImage(f"{name}: {refusal}")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        stored = stored_pixels(ds) if frame_number is None else frame_pixels(ds, frame_number)
    except Exception as exc:  # decoders raise many types; all mean the same to us
        raise UnsupportedImage(f"{name}: pixel data could not be decoded: {exc}") from exc
    if stored.ndim != 2:
        raise UnsupportedImage(f"{name}: unexpected pixel array shape {stored.shape}")
    padding = padding_mask(stored, ds)  # top-level attributes, a frame's too
    if padding is not None and padding.all():
        raise UnsupportedImage(f"{name}: every pixel is padding (Pixel Padding Value)")
    try:
        modality = modality_values(stored, header, little_endian=is_little_endian(ds))
    except InvalidPixelTransform as exc:  # an empty or multi-valued Rescale Slope, ...
        raise UnsupportedImage(f"{name}: {exc}") from None
    values = np.asarray(modality, dtype=np.float32)
    if photometric == "MONOCHROME1":
        values = -values
    if not np.isfinite(values).all():
        raise UnsupportedImage(f"{name}: non-finite pixel values after the modality LUT")
    if padding is not None:
        values = np.where(padding, values[~padding].min(), values)
    return values, padding


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a 2-D float image to ``size x size``."""
    return _resize_stack(np.asarray(image)[None], size)[0]


def window(
    image: np.ndarray,
    lower_percentile: float,
    upper_percentile: float,
    padding: np.ndarray | None = None,
) -> np.ndarray:
    """Map the given percentiles to 0 and 1 and clip; constant images are unsupported. With
    ``padding`` (the resized padding mask: how much padding each pixel holds), the
    percentiles are those of the pixels that hold none."""
    sample = image if padding is None else image[padding <= 0.0]
    if sample.size == 0:
        raise UnsupportedImage("every pixel of the resized image holds padding")
    lo, hi = np.percentile(sample, [lower_percentile, upper_percentile])
    if not hi - lo > 1e-6 * max(1.0, abs(float(hi))):
        raise UnsupportedImage("image has no contrast between its window percentiles")
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_unit_range(ds: Dataset, spec: PreprocessSpec, frame_number: int | None = None) -> np.ndarray:
    """Steps 1-5: a ``(size, size)`` float32 image in [0, 1] (of frame ``frame_number`` of a
    multi-frame image)."""
    pixels, padding = padded_modality_pixels(ds, frame_number)
    try:
        return window(
            resize(pixels, spec.size),
            spec.lower_percentile,
            spec.upper_percentile,
            None if padding is None else resize(padding, spec.size),
        )
    except UnsupportedImage as exc:
        raise UnsupportedImage(f"{unit_name(_sop(ds), frame_number)}: {exc}") from exc


def normalise(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 6: z-normalisation, returning a ``(1, size, size)`` float32 array."""
    return ((unit - spec.mean) / spec.std).astype(np.float32)[None]


def preprocess(ds: Dataset, spec: PreprocessSpec, frame_number: int | None = None) -> np.ndarray:
    """The model input ``(1, size, size)`` float32 for one dataset (all six steps), or for
    frame ``frame_number`` of a multi-frame one."""
    return normalise(to_unit_range(ds, spec, frame_number), spec)


#: Images resized in one call by :func:`preprocess_many` (their pixels are held together).
RESIZE_BATCH = 32


def preprocess_many(
    units: Sequence[ImageUnit | Dataset], spec: PreprocessSpec
) -> list[np.ndarray | UnsupportedImage]:
    """:func:`preprocess` for each unit (a dataset: a single-frame image), in order: its
    model input, or the :class:`UnsupportedImage` that ``preprocess`` raises for it. The
    same values (the tests compare them), faster: images of one size are resized together,
    :data:`RESIZE_BATCH` at a time. torch's antialiased resize of one 512 x 512 image to
    128 x 128 takes about 8 ms, of 32 stacked about 0.7 ms each; a 100-slice CT: 0.8 ->
    0.07 s. A multi-frame image's frames are decoded one at a time, as they are needed."""
    out: list[np.ndarray | UnsupportedImage] = []
    for start in range(0, len(units), RESIZE_BATCH):
        chunk = [
            u if isinstance(u, ImageUnit) else ImageUnit(u)
            for u in units[start : start + RESIZE_BATCH]
        ]
        results: list[np.ndarray | UnsupportedImage | None] = [None] * len(chunk)
        by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray | None]]] = {}
        for i, unit in enumerate(chunk):
            if unit.refusal is not None:
                results[i] = UnsupportedImage(f"{unit.name}: {unit.refusal}")
                continue
            try:
                pixels, padding = padded_modality_pixels(unit.ds, unit.frame_number)
            except UnsupportedImage as exc:
                results[i] = exc
                continue
            by_shape.setdefault(pixels.shape, []).append((i, pixels, padding))
        for group in by_shape.values():
            stacked = np.stack([pixels for _, pixels, _ in group]).astype(np.float32, copy=False)
            resized = _resize_stack(stacked, spec.size)
            paddings = _resized_padding([padding for _, _, padding in group], spec.size)
            for (i, _, _), image, padding in zip(group, resized, paddings, strict=True):
                try:
                    in_range = window(image, spec.lower_percentile, spec.upper_percentile, padding)
                except UnsupportedImage as exc:
                    results[i] = UnsupportedImage(f"{chunk[i].name}: {exc}")
                    continue
                results[i] = normalise(in_range, spec)
        out.extend(r for r in results if r is not None)
    return out


def _resized_padding(masks: list[np.ndarray | None], size: int) -> list[np.ndarray | None]:
    """Each padding mask of one shape resized as its image is (:func:`_resize_stack`), in
    one call; None stays None."""
    given = [mask for mask in masks if mask is not None]
    if not given:
        return [None] * len(masks)
    resized = iter(_resize_stack(np.stack(given), size))
    return [None if mask is None else next(resized) for mask in masks]


def _resize_stack(images: np.ndarray, size: int) -> np.ndarray:
    """The antialiased bilinear resize of each image of an ``(N, rows, columns)`` stack to
    ``size x size``, in one call (each image's values do not depend on the others)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    out = F.interpolate(
        tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out[:, 0].numpy()
