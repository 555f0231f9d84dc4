"""The SCP's header scanner reads what pydicom reads, or hands the data set to pydicom."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from acwi_node.ingest.header import (
    DEFLATED_HEADER_LIMIT,
    HeaderError,
    dataset_header,
    deflated_header,
    pydicom_header,
    scan_header,
)
from models.data.synth import write_study
from tests.support import write_secondary_capture


def split(part10: bytes) -> tuple[bytes, str]:
    """(data set bytes, transfer syntax) of a Part 10 byte string."""
    group_length = struct.unpack_from("<I", part10, 132 + 8)[0]
    meta = dcmread(io.BytesIO(part10), stop_before_pixels=True).file_meta
    return part10[132 + 12 + group_length :], str(meta.TransferSyntaxUID)


def encode(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    dcmwrite(
        buffer,
        ds,
        enforce_file_format=True,
        little_endian=syntax != ExplicitVRBigEndian,
        implicit_vr=syntax == ImplicitVRLittleEndian,
    )
    return buffer.getvalue()


def base(tmp_path: Path, **attrs: object) -> Dataset:
    ds = dcmread(write_secondary_capture(tmp_path / "sc.dcm", study_uid=generate_uid()))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def check(part10: bytes, *, fast: bool) -> None:
    dataset, syntax = split(part10)
    scanned = scan_header(dataset, syntax)
    if fast:
        assert scanned is not None, "the scanner handed a common data set to pydicom"
        assert scanned == pydicom_header(part10)
    else:
        assert scanned is None


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_common_data_sets(tmp_path: Path, syntax: str) -> None:
    check(encode(base(tmp_path), syntax), fast=True)
    ds = base(tmp_path, BodyPartExamined="CHEST", SpecificCharacterSet="ISO_IR 192")
    ds.PatientName = "Müller^Jürgen"
    check(encode(ds, syntax), fast=True)
    # Sequences before the wanted attributes, of undefined length (pydicom's default), nested.
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    item.ReferencedSOPInstanceUID = generate_uid()
    inner = Dataset()
    inner.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds = base(tmp_path)
    ds.ReferencedImageSequence = Sequence([item, item])
    ds.ProcedureCodeSequence = Sequence([])
    check(encode(ds, syntax), fast=True)


def test_synthetic_studies(tmp_path: Path) -> None:
    for path in write_study(tmp_path / "dx", n_images=1, seed=3) + write_study(
        tmp_path / "ct", n_images=2, modality="CT", size=64, seed=4
    ):
        check(path.read_bytes(), fast=True)


@pytest.mark.parametrize(
    "case",
    ["two modalities", "ISO 2022 code extensions", "big endian", "deflated", "truncated"],
)
def test_pydicom_reads_the_rest(tmp_path: Path, case: str) -> None:
    syntax = ExplicitVRLittleEndian
    ds = base(tmp_path)
    if case == "two modalities":
        ds.Modality = ["OT", "CT"]
    elif case == "ISO 2022 code extensions":
        ds.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    elif case == "big endian":
        syntax = ExplicitVRBigEndian
    elif case == "deflated":
        syntax = DeflatedExplicitVRLittleEndian
    part10 = encode(ds, syntax)
    if case == "truncated":
        part10 = part10[: len(part10) - len(split(part10)[0]) + 40]
    check(part10, fast=False)


def test_deep_nesting_is_walked_without_recursion() -> None:
    open_level = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_level = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    modality = b"\x08\x00\x60\x00CS\x02\x00CT"
    # Far deeper than Python's recursion limit (and pydicom's reader): read all the same.
    deep = scan_header(open_level * 5000 + close_level * 5000 + modality, ExplicitVRLittleEndian)
    assert deep is not None and deep["Modality"] == "CT"
    shallow = open_level * 3 + close_level * 3 + modality
    assert scan_header(shallow, ExplicitVRLittleEndian)["Modality"] == "CT"  # type: ignore[index]
    # A sequence that does not end where its data set does: pydicom's turn, no error here.
    assert scan_header(open_level * 10, ExplicitVRLittleEndian) is None


def test_pydicom_errors_become_header_errors() -> None:
    """Big endian goes to pydicom, whose reader recurses per level: its RecursionError is a
    data set that cannot be read, like any other of its errors."""
    level = b"\x00\x08\x11\x40SQ\x00\x00\xff\xff\xff\xff" + b"\xff\xfe\xe0\x00\xff\xff\xff\xff"
    close = b"\xff\xfe\xe0\x0d\x00\x00\x00\x00" + b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
    from acwi_node.ingest.part10 import file_meta_prefix

    dataset = level * 5000 + close * 5000
    part10 = file_meta_prefix("1.2", "1.2", ExplicitVRBigEndian) + dataset
    with pytest.raises(HeaderError, match="nested too deeply"):
        dataset_header(dataset, ExplicitVRBigEndian, lambda: part10)


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("charset", ["", "ISO 2022 code extensions"])
def test_deflated_header_reads_what_pydicom_reads(tmp_path: Path, charset: str) -> None:
    ds = base(tmp_path, BodyPartExamined="CHEST")
    if charset:
        ds.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    part10 = encode(ds, DeflatedExplicitVRLittleEndian)
    dataset, syntax = split(part10)
    assert dataset_header(dataset, syntax, lambda: part10) == pydicom_header(part10)


def test_a_deflate_bomb_is_inflated_only_as_far_as_the_header(tmp_path: Path) -> None:
    ds = base(tmp_path)
    explicit, _ = split(encode(ds, ExplicitVRLittleEndian))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    inflated_size = 256 << 20
    bomb = compressor.compress(explicit)  # then a private element of 256 MiB of zeros
    bomb += compressor.compress(struct.pack("<HH2s2xI", 0x0099, 0x1000, b"OB", inflated_size))
    zeros = bytes(1 << 20)
    bomb += b"".join(compressor.compress(zeros) for _ in range(inflated_size >> 20))
    bomb += compressor.flush()
    assert len(bomb) < inflated_size // 500
    tracemalloc.start()
    try:
        header = deflated_header(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header["SOPInstanceUID"] == ds.SOPInstanceUID
    assert header["StudyInstanceUID"] == ds.StudyInstanceUID
    assert peak < 4 << 20, peak


def test_deflated_data_sets_that_cannot_be_read(tmp_path: Path) -> None:
    ds = base(tmp_path)
    explicit, _ = split(encode(ds, ExplicitVRLittleEndian))
    with pytest.raises(HeaderError, match="not a valid deflate stream"):
        deflated_header(b"\x78\x9c" + bytes(range(256)) * 2)
    with pytest.raises(HeaderError, match="not a valid deflate stream"):
        deflated_header(explicit)  # sent on a deflated context without deflating it
    inside_study_uid = explicit.index(b"\x20\x00\x0d\x00UI") + 12
    with pytest.raises(HeaderError, match="ends inside its header"):
        deflated_header(deflate(explicit[:inside_study_uid]))
    cut_stream = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # no final block
    cut = cut_stream.compress(explicit[:inside_study_uid]) + cut_stream.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(HeaderError, match="ends inside its header"):
        deflated_header(cut)
    # The attributes after a large element (a private group before Patient's Name): beyond
    # the limit, refused rather than inflated further.
    big = struct.pack("<HH2s2xI", 0x0009, 0x1010, b"OB", DEFLATED_HEADER_LIMIT + 2)
    at = explicit.index(b"\x10\x00\x10\x00PN")
    padded = explicit[:at] + big + bytes(DEFLATED_HEADER_LIMIT + 2) + explicit[at:]
    with pytest.raises(HeaderError, match="not within its first 4 MiB"):
        deflated_header(deflate(padded))
    # Within the limit it is read.
    assert deflated_header(deflate(padded), limit=2 * DEFLATED_HEADER_LIMIT)["Modality"] == "OT"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_data_set_cut_short_before_its_uids_says_so(tmp_path: Path, syntax: str) -> None:
    """Cut inside an element before the Study Instance UID: the reason is the cut, not a
    missing UID. Cut after the UIDs (in the pixel data), pydicom's reading stands."""
    part10 = encode(base(tmp_path), syntax)
    dataset, _ = split(part10)
    name_tag = b"\x10\x00\x10\x00"
    cut = dataset[: dataset.index(name_tag) + 10]
    meta = part10[: len(part10) - len(dataset)]
    with pytest.raises(HeaderError, match="ends inside an element before its UIDs"):
        dataset_header(cut, syntax, lambda: meta + cut)
    late = dataset[:-10]
    assert dataset_header(late, syntax, lambda: meta + late) == pydicom_header(part10)
