"""The SCP's header scanner reads what pydicom reads, or hands the data set to pydicom."""

from __future__ import annotations

import io
import struct
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

from acwi_node.ingest.header import pydicom_header, scan_header
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


def test_deep_nesting_falls_back_instead_of_failing(tmp_path: Path) -> None:
    open_level = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_level = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert scan_header(open_level * 5000 + close_level * 5000, ExplicitVRLittleEndian) is None
    shallow = open_level * 3 + close_level * 3 + b"\x08\x00\x60\x00CS\x02\x00CT"
    assert scan_header(shallow, ExplicitVRLittleEndian)["Modality"] == "CT"  # type: ignore[index]
