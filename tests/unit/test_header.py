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

from acwi_node.anatomy import BODY_PART_BY_CODE, image_body_parts
from acwi_node.ingest.header import (
    DEFLATED_HEADER_LIMIT,
    FRAME_BODY_PART,
    HeaderError,
    body_part,
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


ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _code(value: str, scheme: str = "SCT", meaning: str = "Region") -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _group(code: Dataset | None, *, laterality: str = "U") -> Dataset:
    """A functional group item with Frame Anatomy (its region ``code``, None for none), after
    another functional group (Frame Content), as scanners write them."""
    anatomy = Dataset()
    anatomy.FrameLaterality = laterality
    if code is not None:
        anatomy.AnatomicRegionSequence = Sequence([code])
    content = Dataset()
    content.FrameAcquisitionNumber = 1
    group = Dataset()
    group.FrameContentSequence = Sequence([content])
    group.FrameAnatomySequence = Sequence([anatomy])
    pixel_measures = Dataset()
    pixel_measures.PixelSpacing = [0.5, 0.5]
    group.PixelMeasuresSequence = Sequence([pixel_measures])
    return group


def _lengths(ds: Dataset, *, defined: bool) -> Dataset:
    """Every sequence and item of ``ds`` written with its length (``defined``), or of
    undefined length, ended by a delimiter."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = not defined
            for item in elem.value:
                item.is_undefined_length_sequence_item = not defined
    return ds


def enhanced(
    tmp_path: Path,
    *,
    shared: Dataset | None = None,
    per_frame: list[Dataset] | None = None,
    sop_class: str = ENHANCED_CT,
    defined: bool = False,
    **attrs: object,
) -> Dataset:
    """A multi-frame image without Body Part Examined, its anatomy in functional groups."""
    ds = base(tmp_path, SOPClassUID=sop_class, Modality="CT", **attrs)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    if "BodyPartExamined" in ds and "BodyPartExamined" not in attrs:
        del ds.BodyPartExamined
    ds.NumberOfFrames = len(per_frame) if per_frame else 2
    ds.SharedFunctionalGroupsSequence = Sequence([shared if shared is not None else Dataset()])
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return _lengths(ds, defined=defined)


CHEST, ABDOMEN, THORAX_2008 = _code("816094009"), _code("818981001"), _code("51185008")


@pytest.mark.parametrize("defined", [False, True], ids=["undefined-length", "defined-length"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("shared", "CHEST"),
        ("per-frame, all alike", "CHEST"),
        ("per-frame, two regions", "CHEST\\ABDOMEN"),
        ("per-frame, some frames without", "ABDOMEN"),
        ("shared wins over per-frame", "CHEST"),
        ("empty shared frame anatomy: per-frame", "ABDOMEN"),
        ("former SNOMED CT code", "CHEST"),
        ("SNOMED RT code", "CHEST"),
        ("region of several words", "CHESTABDPELVIS"),
        ("region without a term", ""),
        ("region without a code", ""),
        ("frame anatomy without a region", ""),
        ("no functional groups", ""),
        ("body part examined", ""),
        ("a single-frame class is not read on", ""),
    ],
)
def test_frame_anatomy_names_the_body_part(
    tmp_path: Path, case: str, expected: str, syntax: str, defined: bool
) -> None:
    per_frame: list[Dataset] | None = None
    shared: Dataset | None = None
    attrs: dict[str, object] = {}
    sop_class = ENHANCED_CT
    if case == "shared":
        shared = _group(CHEST)
    elif case == "per-frame, all alike":
        per_frame = [_group(CHEST) for _ in range(3)]
    elif case == "per-frame, two regions":
        per_frame = [_group(CHEST), _group(ABDOMEN), _group(CHEST), _group(ABDOMEN)]
    elif case == "per-frame, some frames without":
        per_frame = [Dataset(), _group(ABDOMEN), _group(None)]
    elif case == "shared wins over per-frame":
        shared, per_frame = _group(CHEST), [_group(ABDOMEN)]
    elif case == "empty shared frame anatomy: per-frame":
        shared = _group(None)
        shared.FrameAnatomySequence = Sequence([])
        per_frame = [_group(ABDOMEN)]
    elif case == "former SNOMED CT code":
        shared = _group(THORAX_2008)
    elif case == "SNOMED RT code":
        shared = _group(_code("T-D3000", "SRT"))
    elif case == "region of several words":  # Chest, Abdomen and Pelvis (PS3.16 Annex L)
        shared = _group(_code("416775004"))
    elif case == "region without a term":
        shared, per_frame = _group(_code("53505006")), [_group(CHEST)]  # Anus: none in Annex L
    elif case == "region without a code":
        missing = Dataset()
        missing.CodeMeaning = "Chest"
        shared = _group(missing)
    elif case == "frame anatomy without a region":
        shared = _group(None)
    elif case == "body part examined":
        shared, attrs = _group(ABDOMEN), {"BodyPartExamined": "CHEST"}
    elif case == "a single-frame class is not read on":
        shared, sop_class = _group(CHEST), CT_IMAGE
    ds = enhanced(
        tmp_path, shared=shared, per_frame=per_frame, sop_class=sop_class, defined=defined, **attrs
    )
    if case == "no functional groups":
        del ds.SharedFunctionalGroupsSequence
    part10 = encode(ds, syntax)
    check(part10, fast=True)  # the fast walk reads what pydicom reads
    scanned = scan_header(*split(part10))
    assert scanned is not None and scanned[FRAME_BODY_PART] == expected
    assert body_part(scanned) == (attrs.get("BodyPartExamined") or expected)
    assert image_body_parts(dcmread(io.BytesIO(part10))) == body_part(scanned)  # routes check


def test_frame_anatomy_of_a_deflated_image(tmp_path: Path) -> None:
    part10 = encode(enhanced(tmp_path, shared=_group(CHEST)), DeflatedExplicitVRLittleEndian)
    dataset, _syntax = split(part10)
    header = deflated_header(dataset)
    assert header == pydicom_header(part10)
    assert header[FRAME_BODY_PART] == "CHEST"
    # Functional groups beyond the inflation limit: the attributes all the same, no anatomy.
    big = enhanced(tmp_path, shared=_group(CHEST))
    big.add_new(0x00291010, "OB", bytes(64 << 10))  # a private block before the groups
    header = deflated_header(split(encode(big, DeflatedExplicitVRLittleEndian))[0], limit=1 << 15)
    assert header["SOPInstanceUID"] == str(big.SOPInstanceUID) and header[FRAME_BODY_PART] == ""


def test_an_image_cut_short_in_its_functional_groups_keeps_its_header(tmp_path: Path) -> None:
    part10 = encode(enhanced(tmp_path, per_frame=[_group(CHEST)] * 3), ExplicitVRLittleEndian)
    dataset, syntax = split(part10)
    cut = dataset[: dataset.index(b"\x00\x52\x30\x92") + 40]  # inside the per-frame groups
    header = dataset_header(cut, syntax, lambda: part10)
    assert header["SOPInstanceUID"] and header[FRAME_BODY_PART] == ""


def test_many_regions_are_kept_whole_within_64_characters(tmp_path: Path) -> None:
    by_term = {
        term: value for (scheme, value), term in BODY_PART_BY_CODE.items() if scheme == "SCT"
    }
    names = sorted(by_term, key=lambda term: (len(term), term))[:20]  # short ones: many fit
    frames = [_group(_code(by_term[name])) for name in names]
    part10 = encode(enhanced(tmp_path, per_frame=frames), ExplicitVRLittleEndian)
    check(part10, fast=True)
    scanned = scan_header(*split(part10))
    assert scanned is not None
    value = scanned[FRAME_BODY_PART]
    assert len(value) <= 64 and value.split("\\") == names[: len(value.split("\\"))]
    assert len(value.split("\\")) >= 8
