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
  2000 or JPEG-LS again would cost more time than the memory is worth);
* each value is that of its Bits Stored bits alone, whatever the transfer syntax: a JPEG-LS
  or JPEG 2000 code stream may hold the bits above them too (:func:`stored_pixels`).

The stored values become modality values (:func:`modality_values`: the Modality LUT Sequence,
else Rescale Slope and Intercept) and are looked up in a LUT (:func:`lookup_table`, the
Modality or VOI LUT Sequence's item) here too, checked: a header whose rescale or LUT cannot
be applied as PS3.3 C.11 defines it raises :class:`InvalidPixelTransform` with the reason,
never a numpy or struct error with the LUT's bytes in its message.

:func:`padding_mask` finds the pixels that Pixel Padding Value (0028,0120) and Pixel Padding
Range Limit (0028,0121) mark as padding: outside a CT's reconstruction circle, a mammogram's
background. They are compared with the stored values, before the Modality LUT (PS3.3
C.7.5.1.1.2), and are top-level attributes of every image (General Equipment and Image Pixel
Modules; no functional group macro holds them), a multi-frame image's for each of its frames.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from os import PathLike

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import as_pixel_options

__all__ = [
    "DEFER_SIZE",
    "PIXEL_DATA",
    "InvalidPixelTransform",
    "LookupTable",
    "is_little_endian",
    "is_native",
    "lookup_table",
    "modality_values",
    "padding_mask",
    "read_deferred",
    "rescale",
    "stored_pixels",
]

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


def _bits_stored_only(ds: Dataset, array: np.ndarray) -> np.ndarray:
    """``array``'s values as their Bits Stored bits alone give them (PS3.5 8.1.1: the bits
    above High Bit are not part of a value; a signed value's sign is High Bit's), ``array``
    itself where they are so already. pydicom drops those bits from native, RLE and JPEG
    pixel data, but of a JPEG-LS or JPEG 2000 code stream only the bits above the code
    stream's own precision: an encoder that compressed 16-bit words as they were (DCMTK's
    JPEG-LS does), overlay bits or whatever a scanner left above a 12-bit value with them,
    gave values of 16 bits."""
    if array.dtype.kind not in "iu":
        return array
    try:
        bits = int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError):
        return array
    width = 8 * array.dtype.itemsize
    if not 0 < bits < width or array.size == 0:
        return array
    if array.dtype.kind == "u":
        inside = int(array.max()) < 1 << bits
    else:
        inside = -(1 << (bits - 1)) <= int(array.min()) and int(array.max()) < 1 << (bits - 1)
    if inside:
        return array
    shifted = np.left_shift(array, width - bits)  # a new array: a kept decoding stays as it is
    return np.right_shift(shifted, width - bits, out=shifted)  # arithmetic when signed


def stored_pixels(ds: Dataset, frame_number: int | None = None) -> np.ndarray:
    """``ds.pixel_array`` (frame ``frame_number``, 1-based, of a multi-frame image alone),
    without keeping it, or the Pixel Data it was decoded from, on ``ds`` when decoding again
    is a copy (module docstring); its values of Bits Stored bits alone
    (:func:`_bits_stored_only`)."""
    return _bits_stored_only(ds, _decoded(ds, frame_number))


def _decoded(ds: Dataset, frame_number: int | None) -> np.ndarray:
    """:func:`stored_pixels` as pydicom's decoder gives them."""
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


class InvalidPixelTransform(ValueError):
    """The header's rescale or LUT cannot be applied; the message says why in a few words
    (never the LUT's data)."""


def is_little_endian(ds: Dataset) -> bool:
    """Whether ``ds``'s values in its file (an OW LUT Data's bytes) are little endian: its
    transfer syntax's byte order, else the encoding it was read with, else little endian."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None:
        try:
            return bool(syntax.is_little_endian)
        except ValueError:  # not a transfer syntax pydicom knows
            pass
    little = getattr(ds, "original_encoding", (None, None))[1]
    return True if little is None else bool(little)


def _number(value: object) -> float | None:
    """A single finite number, or None."""
    if isinstance(value, MultiValue | list | tuple):
        if len(value) != 1:
            return None
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _shown(value: object) -> str:
    """What is wrong with a header value that is not a single finite number, in a few words."""
    if isinstance(value, MultiValue | list | tuple):
        return f"has {len(value)} values"
    text = repr(value) if isinstance(value, str) else str(value)
    text = text if len(text) <= 24 else text[:21] + "..."
    return f"{text} is not a finite number"


_RESCALE = (("RescaleSlope", "Rescale Slope"), ("RescaleIntercept", "Rescale Intercept"))


def rescale(header: Dataset) -> tuple[float, float] | None:
    """Rescale Slope and Intercept of ``header`` (an image, or a frame's view), or None when
    it has neither (no rescale, as an MR image). One of them alone counts with the other's
    identity value (slope 1, intercept 0). Either present but not a single finite number
    (empty, several values, not a number, infinite) or a slope of 0 raises
    :class:`InvalidPixelTransform`: they are Type 1 wherever the Modality LUT Module has
    them (PS3.3 C.11.1), and an empty one says nothing of what the stored values mean, not
    even whether the grey scale is inverted (a negative slope); the image is not read rather
    than read with a guess (1 and 0)."""
    found: dict[str, float] = {}
    for keyword, name in _RESCALE:
        if keyword not in header:
            continue
        try:
            value = header[keyword].value
        except Exception as exc:  # a value pydicom cannot convert
            raise InvalidPixelTransform(
                f"invalid Rescale Slope/Intercept ({name} unreadable: {type(exc).__name__})"
            ) from None
        if value is None or (isinstance(value, str | MultiValue) and len(value) == 0):
            raise InvalidPixelTransform(f"invalid Rescale Slope/Intercept ({name} empty)")
        number = _number(value)
        if number is None:
            raise InvalidPixelTransform(f"invalid Rescale Slope/Intercept ({name} {_shown(value)})")
        found[keyword] = number
    if not found:
        return None
    slope = found.get("RescaleSlope", 1.0)
    if slope == 0.0:
        raise InvalidPixelTransform("invalid Rescale Slope/Intercept (Rescale Slope 0)")
    return slope, found.get("RescaleIntercept", 0.0)


@dataclass(frozen=True)
class LookupTable:
    """A LUT of PS3.3 C.11.1.1.1 / C.11.2.1.1: input values from ``first`` map to
    ``entries`` in order; those below ``first`` to the first entry, those past the last to
    the last. Its output is in 0 to 2**``bits`` - 1."""

    first: int
    entries: np.ndarray
    bits: int

    def apply(self, values: np.ndarray) -> np.ndarray:
        """The entries ``values`` (rounded to integers) map to, as float64."""
        index = np.rint(np.asarray(values, dtype=np.float64)) - self.first
        np.clip(index, 0, len(self.entries) - 1, out=index)
        return self.entries[index.astype(np.intp)].astype(np.float64)


def _ints(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, MultiValue | list | tuple):
        return [int(v) for v in value]
    raise InvalidPixelTransform(f"LUT Data of type {type(value).__name__}")


def lookup_table(item: Dataset, *, little_endian: bool, signed: bool = False) -> LookupTable:
    """The LUT of a Modality or VOI LUT Sequence item: its LUT Descriptor (entries, 0 for
    65536; first input value mapped; bits per entry) and LUT Data, read as pydicom reads it
    (a list of US values) or as raw OW bytes (16 bits per entry in the byte order of the
    data set, ``little_endian``; one byte per entry for 8 bits packed). ``signed``: the
    image's Pixel Representation is signed, so a first value of 32768 or more is negative
    (its VR is SS, which a US read gives as the unsigned value). Raises
    :class:`InvalidPixelTransform` for one that cannot be applied."""
    descriptor = item.get("LUTDescriptor")
    if not isinstance(descriptor, MultiValue | list | tuple) or len(descriptor) != 3:
        raise InvalidPixelTransform("LUT Descriptor is not three values")
    try:
        count, first, bits = (int(v) for v in descriptor)
    except (TypeError, ValueError):
        raise InvalidPixelTransform("LUT Descriptor is not three numbers") from None
    count = count or 65536
    if signed and first >= 32768:
        first -= 65536
    if not 1 <= bits <= 16:
        raise InvalidPixelTransform(f"LUT Descriptor gives {bits} bits per entry")
    data = item.get("LUTData")
    if data is None:
        raise InvalidPixelTransform("no LUT Data")
    if isinstance(data, bytes | bytearray):
        if bits <= 8 and len(data) in (count, count + 1):  # 8-bit entries packed two a word
            entries = np.frombuffer(bytes(data[:count]), dtype=np.uint8)
        elif len(data) >= 2 * count:
            entries = np.frombuffer(
                bytes(data[: 2 * count]), dtype="<u2" if little_endian else ">u2"
            )
        else:
            raise InvalidPixelTransform(
                f"LUT Data holds {len(data)} bytes, the descriptor {count} entries"
            )
        table = entries.astype(np.int64)
    else:
        values = _ints(data)
        if len(values) < count:
            raise InvalidPixelTransform(
                f"LUT Data holds {len(values)} entries, the descriptor {count}"
            )
        table = np.asarray(values[:count], dtype=np.int64)
    if table.size and int(table.max()) >= 1 << bits:
        # entries past the descriptor's depth (a known vendor quirk: 8 said, 12 stored):
        # the depth the entries need
        bits = min(16, int(table.max()).bit_length())
    return LookupTable(first=first, entries=table, bits=bits)


def modality_values(stored: np.ndarray, header: Dataset, *, little_endian: bool) -> np.ndarray:
    """Stored values to modality values (float64), as pydicom's ``apply_modality_lut`` does
    (the same operations on the same values) but checked: the Modality LUT Sequence's first
    item if there is one, else :func:`rescale` (none: the stored values). Raises
    :class:`InvalidPixelTransform`."""
    sequence = header.get("ModalityLUTSequence")
    if sequence:
        signed = int(header.get("PixelRepresentation", 0) or 0) == 1
        try:
            lut = lookup_table(sequence[0], little_endian=little_endian, signed=signed)
        except InvalidPixelTransform as exc:
            raise InvalidPixelTransform(f"invalid Modality LUT Sequence ({exc})") from None
        return lut.apply(stored)
    factors = rescale(header)
    if factors is None:
        return np.asarray(stored)
    slope, intercept = factors
    values = np.asarray(stored).astype(np.float64) * slope
    values += intercept
    return values


#: Pixel Padding Value (0028,0120) and Pixel Padding Range Limit (0028,0121).
PIXEL_PADDING_VALUE = 0x00280120
PIXEL_PADDING_RANGE_LIMIT = 0x00280121


def _padding_limit(ds: Dataset, tag: int, *, signed: bool, bits: int) -> int | None:
    """The stored value ``ds``'s padding attribute ``tag`` gives, or None when it is absent or
    not a value the stored pixels can take. Its VR is that of Pixel Representation (US
    unsigned, SS signed, PS3.3 C.7.5.1): one written with the other (an explicit VR file
    that says US for signed pixels) is read as the 16 bits it holds, in the pixels'
    signedness, as :func:`lookup_table` reads a signed image's first value mapped."""
    if tag not in ds:
        return None
    try:
        value = ds[tag].value
    except Exception:  # a value pydicom cannot convert
        return None
    if isinstance(value, MultiValue | list | tuple):
        if len(value) != 1:
            return None
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if bits <= 16:
        if signed and 1 << 15 <= value < 1 << 16:
            value -= 1 << 16
        elif not signed and -(1 << 15) <= value < 0:
            value += 1 << 16
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return value if low <= value <= high else None


def padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Where ``stored`` (an image's or a frame's stored values, :func:`stored_pixels`) is
    padding, as ``ds``'s Pixel Padding Value (0028,0120) and Pixel Padding Range Limit
    (0028,0121) say (PS3.3 C.7.5.1.1.2): the stored values equal to Pixel Padding Value, or
    with a Range Limit those between the two, inclusive, in either order (the standard puts
    Pixel Padding Value at the darker end: the lower for MONOCHROME2, the higher for
    MONOCHROME1). None when no pixel is padding: no such attribute, one that is not a value
    of the image's Bits Stored and Pixel Representation (it marks nothing), or no pixel with
    such a value. A Range Limit that is not such a value leaves Pixel Padding Value alone, as
    a reader that knows nothing of the range reads it."""
    if PIXEL_PADDING_VALUE not in ds or stored.dtype.kind not in "iu" or stored.size == 0:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    try:
        bits = int(ds.get("BitsStored") or 8 * stored.dtype.itemsize)
    except (TypeError, ValueError):
        bits = 8 * stored.dtype.itemsize
    if not 1 <= bits <= 8 * stored.dtype.itemsize:
        bits = 8 * stored.dtype.itemsize
    value = _padding_limit(ds, PIXEL_PADDING_VALUE, signed=signed, bits=bits)
    if value is None:
        return None
    limit = _padding_limit(ds, PIXEL_PADDING_RANGE_LIMIT, signed=signed, bits=bits)
    if limit is None or limit == value:
        mask = stored == value
    else:
        mask = stored >= min(value, limit)
        mask &= stored <= max(value, limit)
    return mask if mask.any() else None
