"""Heatmap overlays as RGB Secondary Capture images in the source study.

The source image is rendered to 8-bit grey the way a viewer would show it (modality LUT or
rescale, then its VOI window or LUT, else a 0.5-99.5 percentile window; MONOCHROME1 inverted;
the pixels Pixel Padding Value marks black) and blended with a colour map of the heatmap
(``worker.heatmap_colours``: jet-like by default, or cividis or viridis) whose opacity is
proportional to the heat. No text is burned into the pixels: the
model, version, predicted label and the "not for primary diagnosis" notice are in Image
Comments and Derivation Description.

The object is written to the Secondary Capture Image IOD (PS3.3 A.8.1) on top of
``highdicom.SOPClass``: ``highdicom.sc.SCImage`` only accepts single-letter Patient Orientation
values, while the source's value (possibly compound, possibly empty) must be carried over
unchanged.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
from highdicom import SOPClass
from numpy.typing import NDArray
from PIL import Image
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from acwi_node.dicom_frames import frame_count, frame_pixels, frame_view, image_header
from acwi_node.dicom_pixels import (
    InvalidPixelTransform,
    is_little_endian,
    lookup_table,
    modality_values,
    padding_mask,
    stored_pixels,
)
from acwi_node.inference.types import ImageResult, StudyAnalysis, unit_name
from acwi_node.results.charset import result_charset
from acwi_node.results.codes import clean_code_sequences
from acwi_node.results.headers import (
    IMAGE_LATERALITIES,
    SeriesAnatomy,
    copy_anatomy,
    copy_patient_and_study,
    frame_anatomic_region,
    frame_laterality,
    set_result_times,
)
from acwi_node.results.sr import MANUFACTURER, algorithm_equipment
from acwi_node.results.uids import result_uids

__all__ = [
    "COLOUR_MAPS",
    "HEATMAP_SERIES_NUMBER",
    "MAX_ALPHA",
    "MAX_DIMENSION",
    "Window",
    "blend_heatmap",
    "build_heatmap_sc",
    "colour_map",
    "patient_orientation",
    "render_grey",
    "unit_heat",
]

HEATMAP_SERIES_NUMBER = 9902
#: Largest Rows or Columns written; larger sources are downscaled to fit.
MAX_DIMENSION = 2048
#: Opacity of the colour map where the heat is 1.
MAX_ALPHA = 0.6

NOTICE = "AI heatmap, not for primary diagnosis"

# Jet-like colour map: dark blue -> blue -> cyan -> yellow -> red, ending in full red.
# _colour_channels writes its segments out; a change here must change them too (a test compares).
_CMAP_POSITIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_CMAP_RGB = np.array(
    [
        [0.0, 0.0, 0.5],
        [0.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
    ]
)

#: The colour maps a heatmap is drawn in (``worker.heatmap_colours``), each with the words
#: the secondary capture's Derivation Description names it by: ``jet`` (the default: dark
#: blue, cyan, yellow, red), and two perceptually uniform ones, dark to light, whose order
#: readers with a red-green (or, for cividis, any) colour-vision deficiency see as well and
#: which keep it in grey: ``cividis`` (dark blue to yellow) and ``viridis`` (purple, teal,
#: green, yellow).
COLOUR_MAPS = {"jet": "jet-like", "cividis": "cividis", "viridis": "viridis"}
ColourMapName = Literal["jet", "cividis", "viridis"]

# The perceptually uniform maps, sampled at 33 evenly spaced heat values (from matplotlib's
# tables: viridis by van der Walt and Smith, cividis by Nunez, Anderton and Renslow, 2018),
# interpolated linearly between (within 5/255 of the full tables).
_UNIFORM_RGB = {
    "cividis": np.array(
        [
            [0.0000, 0.1351, 0.3048],
            [0.0000, 0.1579, 0.3575],
            [0.0000, 0.1788, 0.4148],
            [0.0179, 0.1985, 0.4412],
            [0.1034, 0.2204, 0.4358],
            [0.1543, 0.2425, 0.4301],
            [0.1951, 0.2644, 0.4259],
            [0.2309, 0.2861, 0.4235],
            [0.2637, 0.3078, 0.4228],
            [0.2947, 0.3295, 0.4237],
            [0.3242, 0.3513, 0.4263],
            [0.3529, 0.3732, 0.4302],
            [0.3808, 0.3952, 0.4357],
            [0.4082, 0.4174, 0.4426],
            [0.4352, 0.4398, 0.4511],
            [0.4616, 0.4624, 0.4620],
            [0.4887, 0.4853, 0.4710],
            [0.5179, 0.5085, 0.4727],
            [0.5478, 0.5319, 0.4717],
            [0.5782, 0.5557, 0.4687],
            [0.6091, 0.5798, 0.4636],
            [0.6404, 0.6044, 0.4568],
            [0.6720, 0.6293, 0.4480],
            [0.7040, 0.6547, 0.4371],
            [0.7365, 0.6806, 0.4240],
            [0.7694, 0.7070, 0.4085],
            [0.8027, 0.7340, 0.3902],
            [0.8364, 0.7615, 0.3687],
            [0.8707, 0.7896, 0.3433],
            [0.9056, 0.8183, 0.3129],
            [0.9411, 0.8475, 0.2758],
            [0.9778, 0.8773, 0.2280],
            [0.9957, 0.9093, 0.2178],
        ]
    ),
    "viridis": np.array(
        [
            [0.2670, 0.0049, 0.3294],
            [0.2770, 0.0503, 0.3757],
            [0.2823, 0.0950, 0.4173],
            [0.2829, 0.1359, 0.4534],
            [0.2788, 0.1755, 0.4834],
            [0.2706, 0.2141, 0.5071],
            [0.2590, 0.2515, 0.5247],
            [0.2450, 0.2877, 0.5373],
            [0.2297, 0.3224, 0.5457],
            [0.2143, 0.3556, 0.5512],
            [0.1994, 0.3876, 0.5546],
            [0.1856, 0.4186, 0.5568],
            [0.1727, 0.4488, 0.5579],
            [0.1607, 0.4785, 0.5581],
            [0.1490, 0.5081, 0.5573],
            [0.1378, 0.5375, 0.5549],
            [0.1276, 0.5669, 0.5506],
            [0.1206, 0.5964, 0.5436],
            [0.1206, 0.6258, 0.5335],
            [0.1323, 0.6550, 0.5197],
            [0.1579, 0.6838, 0.5017],
            [0.1966, 0.7118, 0.4792],
            [0.2461, 0.7389, 0.4520],
            [0.3041, 0.7647, 0.4199],
            [0.3692, 0.7889, 0.3829],
            [0.4401, 0.8111, 0.3410],
            [0.5160, 0.8312, 0.2943],
            [0.5958, 0.8487, 0.2433],
            [0.6785, 0.8637, 0.1895],
            [0.7624, 0.8764, 0.1371],
            [0.8456, 0.8873, 0.0997],
            [0.9261, 0.8973, 0.1041],
            [0.9932, 0.9062, 0.1439],
        ]
    ),
}

_PERCENTILES = (0.5, 99.5)

log = logging.getLogger("acwi_node.results.heatmap")


FloatImage = NDArray[np.floating[Any]]


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued numeric attribute, or None when unusable."""
    if isinstance(value, MultiValue | list | tuple):
        if len(value) == 0:
            return None
        value = value[0]
    if not isinstance(value, int | float | str) or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


#: The letters of each axis of the patient coordinate system, its negative and positive
#: direction (PS3.3 C.7.6.1.1.1): x right to left, y anterior to posterior, z feet to head.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))
#: A direction cosine at most this far from 0 names no direction.
_OBLIQUITY = 1e-4


def _direction_letters(cosines: Sequence[float]) -> str:
    """The Patient Orientation value of one direction: the letter of each axis it runs along,
    most significant first (several for an oblique direction)."""
    axes = sorted(range(3), key=lambda axis: -abs(cosines[axis]))
    return "".join(
        _AXIS_LETTERS[axis][1 if cosines[axis] > 0 else 0]
        for axis in axes
        if abs(cosines[axis]) > _OBLIQUITY
    )


def patient_orientation(source: Dataset, geometry: Dataset) -> list[str] | str:
    """The heatmap's Patient Orientation (General Image, 2C; a secondary capture has no plane
    orientation of its own): the source's two values; else, for an image in a patient
    coordinate system (CT, MR, PET, an enhanced image's frame: ``geometry``, the header its
    frame is read with), the directions of its rows and columns from its Image Orientation
    (Patient), e.g. ``L\\P`` for an axial slice, so that a viewer still shows the patient's
    left and right; empty where neither is known."""
    orientation = source.get("PatientOrientation")
    if isinstance(orientation, MultiValue) and len(orientation) == 2:
        return [str(value) for value in orientation]
    cosines = geometry.get("ImageOrientationPatient")
    if not isinstance(cosines, MultiValue) or len(cosines) != 6:
        return ""
    try:
        values = [float(value) for value in cosines]
    except (TypeError, ValueError):
        return ""
    if not all(np.isfinite(values)):
        return ""
    directions = [_direction_letters(values[:3]), _direction_letters(values[3:])]
    return directions if all(directions) else ""


def _percentile_window(values: FloatImage) -> FloatImage:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = np.percentile(finite, _PERCENTILES)
    if high <= low:
        high = low + 1.0
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _window(values: FloatImage, centre: float, width: float, function: str) -> FloatImage:
    """VOI windowing to [0, 1] as defined in PS3.3 C.11.2.1.2."""
    if function == "SIGMOID":
        # far below a narrow window's centre exp overflows to inf: 1 / inf is 0, the limit
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / max(width, 1e-12)))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / max(width, 1e-12) + 0.5, 0.0, 1.0)
    if width <= 1.0:
        return (values > centre - 0.5).astype(np.float64)
    return np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


class _NoVOI(ValueError):
    """The file's VOI LUT gives no usable grey scale (the percentile window is used)."""


def _why(exc: Exception) -> str:
    """``exc`` for a log line: the reasons :mod:`acwi_node.dicom_pixels` and this module give
    (a few words), else only its type (a numpy or struct error's message may hold a LUT's
    bytes)."""
    if isinstance(exc, InvalidPixelTransform | _NoVOI):
        return str(exc)
    return type(exc).__name__


def _voi_lut(values: FloatImage, source: Dataset, *, little_endian: bool) -> FloatImage | None:
    """The VOI LUT Sequence's first LUT applied to ``values`` (after the modality LUT), in
    [0, 1]: its output range is 0 to 2**bits - 1, bits the LUT Descriptor's third value
    (PS3.3 C.11.2.1.1). None without one; raises ValueError for one that cannot be applied
    (:func:`acwi_node.dicom_pixels.lookup_table`: the LUT Data as read, a list of US values
    or OW bytes in the data set's byte order)."""
    sequence = source.get("VOILUTSequence")
    if not sequence:
        return None
    signed = int(source.get("PixelRepresentation", 0) or 0) == 1
    lut = lookup_table(sequence[0], little_endian=little_endian, signed=signed)
    if int(lut.entries.min()) == int(lut.entries.max()):
        raise _NoVOI("its VOI LUT maps every value to one")
    mapped = lut.apply(values)  # the LUT is indexed by integer input values
    return np.clip(mapped / float((1 << lut.bits) - 1), 0.0, 1.0)


def _file_window(values: FloatImage, source: Dataset, *, little_endian: bool) -> FloatImage | None:
    """``values`` in the file's own VOI: its window (Window Center and Width, VOI LUT
    Function), else its VOI LUT; None when it has neither."""
    centre = _first(source.get("WindowCenter"))
    width = _first(source.get("WindowWidth"))
    if centre is not None and width is not None and width > 0:
        function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return _window(values, centre, width, function)
    return _voi_lut(values, source, little_endian=little_endian)


#: A window chosen instead of the file's: ``(centre, width)`` in the values after the modality
#: LUT (a CT's Hounsfield units), or ``"auto"``, the 0.5th to 99.5th percentile of the image.
Window = tuple[float, float] | Literal["auto"]


#: Rows of the source rendered at a time: a large image's float64 values and window are a
#: block's, not the image's (a 4096 x 3328 mammogram's are 104 MiB each).
_RENDER_ROWS = 256


def render_grey(
    source: Dataset,
    frame_number: int | None = None,
    *,
    window: Window | None = None,
    dtype: type[np.floating[Any]] = np.float64,
) -> FloatImage:
    """The source image as display grey levels in [0, 1]; of a multi-frame image, frame
    ``frame_number`` (default the first) with its own rescale and window (an enhanced image
    of one frame: its frame's, :func:`acwi_node.dicom_frames.image_header`); with ``window``,
    in that window instead of the file's (a linear one). Padding (Pixel Padding Value and
    Range Limit, :func:`acwi_node.dicom_pixels.padding_mask`) is black and takes no part in
    the percentile window. A file's window or VOI LUT that cannot be applied (a malformed
    LUT) is logged and the percentile window used; a rescale that cannot be
    (:func:`acwi_node.dicom_pixels.rescale`) raises
    :class:`acwi_node.dicom_pixels.InvalidPixelTransform`.

    The grey levels are computed in float64, :data:`_RENDER_ROWS` rows at a time, and
    returned as ``dtype`` (float32: the float64 values rounded, as a resize reads them). An
    image of integer stored values (16 bits or fewer) no more varied than its pixels are many
    has them computed once for each stored value from its lowest to its highest and looked up
    (:func:`_stored_value_domain`): each is a function of the stored value alone, so these are
    the same operations on the same values (a 512 x 512 CT slice's few thousand values, not
    its 262,144 pixels)."""
    samples = int(source.get("SamplesPerPixel", 1) or 1)
    image = source  # its Pixel Padding Value and Range Limit: top-level, a frame's too
    little_endian = is_little_endian(source)  # of the file: a frame's view has no transfer syntax
    if frame_number not in (None, 1) and frame_count(source) == 1:
        raise ValueError(f"frame {frame_number} of a single-frame image")
    if frame_count(source) > 1:
        frame_number = frame_number or 1
        pixels = np.asarray(frame_pixels(source, frame_number))
        source = frame_view(source, frame_number)  # the frame's rescale and window
    else:
        pixels = np.asarray(stored_pixels(source))
        source = image_header(source)  # an enhanced image of one frame: its functional groups
    if samples == 3:
        rgb = pixels.astype(np.float64)
        luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return _percentile_window(luminance).astype(dtype, copy=False)

    padding = padding_mask(pixels, image)
    header = source

    def modality(rows: slice) -> FloatImage:
        return modality_of(pixels[rows])

    def modality_of(stored: np.ndarray) -> FloatImage:
        values = modality_values(stored, header, little_endian=little_endian)
        return np.asarray(values, dtype=np.float64)

    blocks = [slice(row, row + _RENDER_ROWS) for row in range(0, pixels.shape[0], _RENDER_ROWS)]
    domain = _stored_value_domain(pixels)
    # an invalid rescale raises InvalidPixelTransform (preprocessing skipped such an image)
    first = modality(blocks[0]) if domain is None else modality_of(domain)
    draw: Callable[[FloatImage], FloatImage | None]
    if window == "auto":
        draw = _no_window
    elif window is not None:
        centre, width = window
        draw = partial(_window, centre=centre, width=width, function="LINEAR")
    else:
        draw = partial(_file_window, source=source, little_endian=little_endian)
    try:
        grey = draw(first)
    except Exception as exc:  # a malformed VOI: the image is still shown, never fails
        log.warning(
            "source image %s: its VOI window or LUT cannot be applied (%s); shown in "
            "its %g-%g percentile window instead",
            unit_name(str(source.get("SOPInstanceUID", "")), frame_number),
            _why(exc),
            *_PERCENTILES,
        )
        grey = None
    if grey is None:
        draw = _percentiles(modality(slice(None)), padding)
        grey = draw(first)
    inverted = str(source.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if domain is not None:  # ``grey``: of each stored value from the lowest to the highest
        if inverted:
            grey = 1.0 - grey
        table = grey.astype(dtype, copy=False)
        low = int(domain[0])
        if low == 0:
            drawn = table[pixels]
        else:  # indices of 4 bytes a pixel, offset in place
            index = pixels.astype(np.int32)
            index -= low
            drawn = table[index]
        if padding is not None:
            drawn[padding] = 0.0
        return drawn
    out = np.empty(pixels.shape, dtype=dtype)
    for rows in blocks:
        if grey is None:
            grey = draw(modality(rows))
        assert grey is not None  # a window's function draws every block once it drew one
        if inverted:
            grey = 1.0 - grey
        if padding is not None:
            grey[padding[rows]] = 0.0
        out[rows] = grey
        grey = None
    return out


def _stored_value_domain(pixels: np.ndarray) -> np.ndarray | None:
    """Every stored value from ``pixels``' lowest to its highest, in their dtype, for
    :func:`render_grey` to draw each once; None for pixels not of integers of 16 bits or
    fewer, or with more such values than pixels (drawn as they are)."""
    if pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2 or pixels.size == 0:
        return None
    # from 0 where no value is negative: the pixels then index the table as they are
    low, high = min(int(pixels.min()), 0), int(pixels.max())
    if high - low + 1 > pixels.size:
        return None
    return np.arange(low, high + 1, dtype=pixels.dtype)


def _no_window(values: FloatImage) -> None:
    """No window: the percentile window is used."""
    return None


def _percentiles(
    values: FloatImage, padding: np.ndarray | None
) -> Callable[[FloatImage], FloatImage]:
    """:func:`_percentile_window` with the percentiles of the whole image's ``values`` (which
    it reorders), for each block of it."""
    finite = np.isfinite(values)
    if padding is not None:
        finite &= ~padding
    sample = values if finite.all() else values[finite]
    if sample.size == 0:
        return np.zeros_like
    low, high = np.percentile(sample, _PERCENTILES, overwrite_input=True)
    if high <= low:
        high = low + 1.0
    return partial(_between, low=float(low), high=float(high))


def _between(values: FloatImage, low: float, high: float) -> FloatImage:
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def colour_map(heat: FloatImage, name: ColourMapName = "jet") -> FloatImage:
    """RGB in [0, 1] for heat values in [0, 1] in the colour map ``name`` (jet-like unless
    given, see :data:`COLOUR_MAPS`); shape (..., 3)."""
    clipped = np.clip(heat, 0.0, 1.0)
    return np.stack(_channels_of(clipped, name), axis=-1)


def _channels_of(clipped: FloatImage, name: str) -> list[FloatImage]:
    """The three channels of heat in [0, 1] in the colour map ``name``, each a new array."""
    if name == "jet":
        positions, table = _CMAP_POSITIONS, _CMAP_RGB
    else:
        table = _UNIFORM_RGB[name]
        positions = np.linspace(0.0, 1.0, len(table))
    return [np.interp(clipped, positions, table[:, c]) for c in range(3)]


def _colour_channels(heat: FloatImage) -> tuple[FloatImage, FloatImage, FloatImage]:
    """:func:`colour_map`'s three channels for heat in [0, 1], bit for bit, without
    ``np.interp`` (2 ms per channel of a 512 x 512 slice).

    On each segment of the colour map ``np.interp`` computes ``slope * (x - x0) + y0``; every
    slope is 0 or +-4 and every break point a multiple of 1/8, so with ``q = 4 * x`` (exact) the
    rising segments are ``q - b`` and the falling ones ``1 - (q - b)``, the same operations on
    the same values. Where two segments meet on a plateau both exceed 1 and are clipped to it.
    ``tests/unit/test_heatmap.py`` compares them with :func:`colour_map` at and between every
    break point.
    """
    q = heat * 4.0
    red_rise = q - 1.5  # 0.375 -> 0.625: 0 -> 1
    red = np.clip(red_rise, 0.0, 1.0)
    green_fall = q - 2.5  # 0.625 -> 0.875: 1 -> 0
    np.subtract(1.0, green_fall, out=green_fall)
    green = np.minimum(np.subtract(q, 0.5), green_fall)  # 0.125 -> 0.375: 0 -> 1
    np.clip(green, 0.0, 1.0, out=green)
    blue_fall = np.subtract(1.0, red_rise, out=red_rise)  # 0.375 -> 0.625: 1 -> 0
    np.add(q, 0.5, out=q)  # 0 -> 0.125: 0.5 -> 1
    blue = np.minimum(q, blue_fall, out=q)
    np.clip(blue, 0.0, 1.0, out=blue)
    return red, green, blue


#: Rows blended at a time: a block's temporaries stay in the CPU's cache (a whole 512 x 512
#: slice's are 2 MB each, and the blend was bound by memory, not arithmetic).
_BLEND_ROWS = 32


def blend_heatmap(
    grey: FloatImage,
    heat: FloatImage,
    max_alpha: float = MAX_ALPHA,
    colours: ColourMapName = "jet",
) -> np.ndarray:
    """Blend grey [0, 1] and heat [0, 1] (same shape) in the colour map ``colours`` into an
    8-bit RGB image; NaN heat counts as 0, heat outside [0, 1] is clipped."""
    if grey.shape != heat.shape:
        raise ValueError(f"grey {grey.shape} and heat {heat.shape} differ in shape")
    return _blend_unit(grey, np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0), max_alpha, colours)


def _blend_unit(
    grey: FloatImage,
    heat: FloatImage,
    max_alpha: float = MAX_ALPHA,
    colours: ColourMapName = "jet",
) -> np.ndarray:
    """:func:`blend_heatmap` of heat already in [0, 1] without NaN (:func:`unit_heat`'s)."""
    rgb = np.empty((*grey.shape, 3), dtype=np.uint8)
    if grey.ndim != 2:
        _blend_block(grey, heat, max_alpha, rgb, colours)
        return rgb
    for start in range(0, grey.shape[0], _BLEND_ROWS):
        rows = slice(start, start + _BLEND_ROWS)
        _blend_block(grey[rows], heat[rows], max_alpha, rgb[rows], colours)
    return rgb


def _blend_block(
    grey: FloatImage,
    clipped: FloatImage,
    max_alpha: float,
    rgb: np.ndarray,
    colours: ColourMapName = "jet",
) -> None:
    """:func:`_blend_unit` of a block of rows into ``rgb``: grey * (1 - alpha) + colour *
    alpha, channel by channel in place, the same operations on the same values as the
    whole-image formula (so the same bytes) without its (rows, columns, 3) temporaries."""
    alpha = max_alpha * clipped
    kept = grey * (1.0 - alpha)
    channels = (
        _colour_channels(clipped) if colours == "jet" else tuple(_channels_of(clipped, colours))
    )
    for c, channel in enumerate(channels):
        np.multiply(channel, alpha, out=channel)
        np.add(kept, channel, out=channel)
        np.multiply(channel, 255.0, out=channel)
        np.rint(channel, out=channel)
        np.clip(channel, 0, 255, out=channel)
        rgb[..., c] = channel


def _resize(values: FloatImage, rows: int, columns: int) -> FloatImage:
    if values.shape == (rows, columns):
        return values
    image = Image.fromarray(values.astype(np.float32, copy=False), mode="F")
    resized = image.resize((columns, rows), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64)


def _output_shape(rows: int, columns: int) -> tuple[int, int]:
    largest = max(rows, columns)
    if largest <= MAX_DIMENSION:
        return rows, columns
    scale = MAX_DIMENSION / largest
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def unit_heat(heatmap: np.ndarray, dtype: type[np.floating[Any]] = np.float64) -> FloatImage:
    """A model's heatmap as float64 (or ``dtype``) in [0, 1]: NaN and -inf as 0, +inf as 1."""
    heat = np.array(heatmap, dtype=dtype)  # a copy: changed in place below
    np.nan_to_num(heat, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(heat, 0.0, 1.0, out=heat)


def _lo(text: str) -> str:
    """A Long String value: no backslash (the value separator), at most 64 characters."""
    return text.replace("\\", "/")[:64]


def _predicted(analysis: StudyAnalysis, image: ImageResult) -> tuple[str, float | None]:
    label = analysis.predicted_label
    probability = image.probabilities.get(label)
    if probability is None:
        probability = analysis.probabilities.get(label)
    return label, probability


def build_heatmap_sc(
    source: Dataset,
    heatmap: np.ndarray,
    analysis: StudyAnalysis,
    image: ImageResult,
    *,
    instance_number: int,
    colours: ColourMapName = "jet",
    now: dt.datetime | None = None,
    timezone: str = "UTC",
    series_sources: Sequence[Dataset] | SeriesAnatomy = (),
) -> Dataset:
    """Build the RGB Secondary Capture overlaying ``heatmap`` on ``source``, in the colour
    map ``colours`` (:data:`COLOUR_MAPS`). Its own dates and times (Instance Creation,
    Content, Date/Time of Secondary Capture) are ``now`` (None: the moment it is built) in the
    source's offset from UTC, else ``timezone``'s, with Timezone Offset From UTC.

    The result is in the source's study, in the model version's heatmap series, with a SOP
    Instance UID derived from the source's, so a re-run replaces it. For a frame of a
    multi-frame image (``image.frame_number``) it shows that frame, references it (Referenced
    Frame Number) and has a UID of its own.

    ``series_sources``: the sources of the study's other heatmaps, which are in the same
    series: its Body Part Examined and Laterality are those they all share
    (:func:`~acwi_node.results.headers.copy_anatomy`); or their
    :func:`~acwi_node.results.headers.series_anatomy`, made once for all the study's heatmaps.
    """
    source_uid = str(source.SOPInstanceUID)
    frame_number = image.frame_number
    if image.sop_instance_uid != source_uid:
        raise ValueError(
            f"image result is for {image.sop_instance_uid}, source image is {source_uid}"
        )
    if np.ndim(heatmap) != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {np.shape(heatmap)}")

    model = analysis.model
    study_uid = str(source.StudyInstanceUID)
    uids = result_uids(study_uid, model.name, model.version, analysis.reissue)

    # A source scaled down is drawn in float32, the precision its resize reads (the same
    # values), and its heat made float32 after: one full-size float copy at a time.
    scaled = _output_shape(int(source.Rows), int(source.Columns)) != (
        int(source.Rows),
        int(source.Columns),
    )
    grey = render_grey(source, frame_number, dtype=np.float32 if scaled else np.float64)
    source_rows, source_columns = grey.shape
    rows, columns = _output_shape(source_rows, source_columns)
    grey = np.clip(_resize(grey, rows, columns), 0.0, 1.0)
    heat = unit_heat(heatmap, np.float32 if scaled else np.float64)
    if heat.shape != (rows, columns):  # unit_heat's values are in [0, 1] already
        heat = np.clip(_resize(heat, rows, columns), 0.0, 1.0)
    rgb = np.ascontiguousarray(_blend_unit(grey, heat, colours=colours))

    sc = SOPClass(
        study_instance_uid=study_uid,
        series_instance_uid=uids.heatmap_series_uid,
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=uids.heatmap_instance_uid(source_uid, frame_number),
        sop_class_uid=SecondaryCaptureImageStorage,
        instance_number=instance_number,
        modality="OT",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_lo(f"ACWI {model.name} {model.version} AI heatmap"),
        manufacturer_model_name=_lo(model.name),
        software_versions=_lo(model.version),
        # the source's, unless the predicted label or the model's words need more (UTF-8 then)
        specific_character_set=result_charset(
            source.get("SpecificCharacterSet"),
            [analysis.predicted_label, model.name, model.version, model.manufacturer],
        ),
    )
    # Copies: the new object shares no data elements with the source.
    copy_patient_and_study(source, sc)

    # General Series: the source's anatomy, where the series' other heatmaps share it.
    copy_anatomy(source, sc, series_sources)

    # SC Equipment
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = _lo(model.name)
    sc.SecondaryCaptureDeviceSoftwareVersions = _lo(model.version)
    # SOP Common: the model, as the IHE AI Results profile describes the algorithm of a result
    sc.ContributingEquipmentSequence = [
        *(sc.get("ContributingEquipmentSequence") or []),
        algorithm_equipment(model.name, model.version, model.manufacturer),
    ]

    # General Image
    sc.ImageType = ["DERIVED", "SECONDARY"]
    if frame_number is not None:
        # A frame's own side: its Frame Laterality, as Image Laterality (the series' Laterality
        # is the side all the series' sources have, none for an image whose frames' differ).
        # The General Series' Laterality (2C) is then absent: it is required only where no
        # Image Laterality is present, and dciodvfy reports it present beside one.
        side = frame_laterality(source, frame_number)
        if side in IMAGE_LATERALITIES:
            sc.ImageLaterality = side
            if "Laterality" in sc:
                del sc.Laterality
        # A frame's own anatomy: its Frame Anatomy region, as the Anatomic Region Sequence of
        # the General Image module (the series' Body Part Examined is the one all the series'
        # sources have, none for an image whose frames show different regions).
        region = frame_anatomic_region(source, frame_number)
        if region is not None:
            sc.AnatomicRegionSequence = [copy.deepcopy(region)]
            clean_code_sequences(sc, [Tag("AnatomicRegionSequence")])
    sc.PatientOrientation = patient_orientation(source, image_header(source, frame_number))
    label, probability = _predicted(analysis, image)
    shown = f"{label} (p={probability:.3f})" if probability is not None else label
    review = "; flagged for human review" if analysis.needs_review else ""
    of_frame = f" Frame {frame_number} of the source image." if frame_number is not None else ""
    sc.ImageComments = (
        f"ACWI {model.name} {model.version}: predicted {shown}{review}.{of_frame} {NOTICE}."
    )
    sc.DerivationDescription = (
        f"Source image windowed to 8-bit grey and blended with the {model.name} "
        f"{model.version} heatmap ({COLOUR_MAPS[colours]} colour map, opacity proportional "
        "to heat). "
        f"{NOTICE}."
    )[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = str(source.SOPClassUID)
    reference.ReferencedSOPInstanceUID = source_uid
    if frame_number is not None:
        reference.ReferencedFrameNumber = frame_number
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    burned_in = str(source.get("BurnedInAnnotation", "") or "").upper() == "YES"
    sc.BurnedInAnnotation = "YES" if burned_in else "NO"
    if "RecognizableVisualFeatures" in source:
        sc.RecognizableVisualFeatures = source.RecognizableVisualFeatures
    lossy = str(source.get("LossyImageCompression", "") or "") == "01"
    sc.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)

    # SC Image (highdicom wrote the node's naive local time: one clock and offset instead)
    set_result_times(sc, source, now, timezone)
    if "ContentDate" in sc:
        sc.DateOfSecondaryCapture = sc.ContentDate
    if "ContentTime" in sc:
        sc.TimeOfSecondaryCapture = sc.ContentTime
    geometry = image_header(source, frame_number)
    spacing = geometry.get("PixelSpacing")
    if isinstance(spacing, MultiValue) and len(spacing) == 2:
        row_factor = source_rows / rows
        column_factor = source_columns / columns
        sc.PixelSpacing = [
            _ds(float(spacing[0]) * row_factor),
            _ds(float(spacing[1]) * column_factor),
        ]

    # Image Pixel
    sc.SamplesPerPixel = 3
    sc.PhotometricInterpretation = "RGB"
    sc.PlanarConfiguration = 0
    sc.Rows = rows
    sc.Columns = columns
    sc.BitsAllocated = 8
    sc.BitsStored = 8
    sc.HighBit = 7
    sc.PixelRepresentation = 0
    data = rgb.tobytes()
    if len(data) % 2:
        data += b"\x00"
    sc.PixelData = data
    sc["PixelData"].VR = "OB"
    return sc


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) for ``value``."""
    for digits in range(10, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.1e}"
