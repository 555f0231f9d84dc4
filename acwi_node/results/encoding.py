"""Part 10 bytes of a result object built in memory."""

from __future__ import annotations

import io
from collections.abc import Iterator

from pydicom import Dataset, dcmwrite
from pydicom.filewriter import correct_ambiguous_vr


def _datasets(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _datasets(item)


def encode_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (its file meta's transfer syntax), as ``dcmwrite`` writes it.

    ``dcmwrite`` corrects ambiguous VRs in every dataset whose original encoding differs from
    the one written, which is every dataset of an object built in memory, and the correction
    recurses into every sequence: a nested item is corrected once for each level above it. An
    SR with a deep content tree (a 100-slice CT's has about 9,400 content items) spent most of
    its 2-3 s of encoding there. Here the whole tree is corrected once, and each dataset is then
    marked as being in the encoding it is written in, so ``dcmwrite`` writes it as it is.
    Marking changes nothing else in ``ds``; the bytes are ``dcmwrite``'s (the tests compare).
    """
    syntax = ds.file_meta.TransferSyntaxUID
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    correct_ambiguous_vr(ds, little)
    for item in _datasets(ds):
        item.set_original_encoding(implicit, little, item._character_set)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
