"""encode_part10 writes what dcmwrite writes, byte for byte, for every kind of element: the
sequences it encodes itself and the elements it leaves to pydicom alike."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from acwi_node.results import encoding
from acwi_node.results.encoding import encode_part10


def _dcmwrite(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warning for a value written as UN
        dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _item(depth: int = 0) -> Dataset:
    item = Dataset()
    item.CodeValue = "12345"  # SH, odd length: padded with a space
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = "A finding with an odd length"  # LO
    item.ValueType = "NUM"  # CS
    item.ImageType = ["DERIVED", "SECONDARY"]  # CS, two values: left to pydicom
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"  # UI, odd: padded with NUL
    item.ContentDate = "20261202"  # DA as text
    item.ContentTime = "101530.5"  # TM as text
    item.NumericValue = DSfloat("0.5")  # DS with its original string
    item.RescaleSlope = 1.25  # DS from a float
    item.InstanceNumber = 7  # IS
    item.Rows = 512  # US
    item.SimpleFrameList = 4  # UL
    item.TagAngleSecondAxis = -3  # SS
    item.PixelSpacing = [0.5, 0.5]  # DS, two values
    item.EventElapsedTimes = 1.5  # DS
    item.FloatingPointValue = 3.141592653589793  # FD
    item.GraphicData = [20.0, 10.0, 40.0, 10.5, 20.0, 1e-7]  # FL, several values
    item.ReferencedFrameNumbers = [1, 3]  # US, two values
    item.TextValue = "line one\r\nline two"  # UT
    item.PatientName = "Doe^Jane"  # PN: left to pydicom
    item.LongCodeValue = ""  # UC, empty
    item.add_new(0x00091010, "LO", "private value")  # a private element
    item.add_new(0x00291000, "OB", b"\x01\x02\x03")  # OB, odd: left to pydicom
    item.add_new(0x00080016, "UI", None)  # empty UI
    if depth < 2:
        item.ContentSequence = [_item(depth + 1), _item(depth + 1)]
        item.ConceptNameCodeSequence = []  # an empty sequence
    return item


def _document(syntax: UID = ExplicitVRLittleEndian, charset: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.34")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if charset:
        ds.SpecificCharacterSet = charset
    ds.ContentSequence = [_item(), _item()]
    undefined = _item(2)
    undefined.is_undefined_length_sequence_item = True
    ds.ContentTemplateSequence = Sequence([undefined])
    ds["ContentTemplateSequence"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("charset", [None, "ISO_IR 192"])
def test_every_kind_of_element_is_written_as_dcmwrite_writes_it(
    syntax: UID, charset: str | None
) -> None:
    ds = _document(syntax, charset)
    if charset:  # text outside ASCII, in the character set of the dataset
        ds.ContentSequence[0].CodeMeaning = "Épanchement pleural"
        ds.ContentSequence[1].TextValue = "肺結節"
    reference = _dcmwrite(copy.deepcopy(ds))
    assert encode_part10(ds) == reference
    assert encode_part10(ds) == reference  # ds is left as it was


def test_values_pydicom_must_handle_are_left_to_it() -> None:
    ds = _document()
    ds.ContentSequence[0].CodeMeaning = "x" * 70_000  # too long for LO: pydicom writes UN
    ds.ContentSequence[1].Rows = 70_000  # too large for US: pydicom refuses
    with pytest.raises(OSError):  # noqa: PT011 - pydicom's error for the US value
        _dcmwrite(copy.deepcopy(ds))
    with pytest.raises(OSError):  # noqa: PT011
        encode_part10(ds)
    del ds.ContentSequence[1].Rows
    assert encode_part10(ds) == _dcmwrite(copy.deepcopy(ds))


def test_the_sequences_are_encoded_here_not_by_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed comes from here: only what the fast encoder cannot write goes to pydicom's
    element writer (a test that passes with every element written by pydicom proves nothing
    about speed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = generate_uid()
    item = Dataset()
    item.CodeValue = "123"
    item.CodeMeaning = "plain"
    item.NumericValue = DSfloat("0.25")
    item.Rows = 3
    ds.ContentSequence = [item] * 50
    calls: list[int] = []
    original = encoding.write_data_element

    def counting(fp: object, element: object, encodings: object = None) -> None:
        calls.append(1)
        original(fp, element, encodings)  # type: ignore[arg-type]

    monkeypatch.setattr(encoding, "write_data_element", counting)
    assert encode_part10(ds) == _dcmwrite(copy.deepcopy(ds))
    assert calls == []


def test_the_top_level_elements_are_encoded_here_not_by_pydicom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In explicit VR little endian the top-level elements too are encoded here (a heatmap's
    50 or so): pydicom writes only the file meta information and what the fast encoder leaves
    to it (Pixel Data, a person's name). ``ds`` and its file meta are left as they were."""
    from pydicom import filewriter

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # no Media Storage UIDs: added
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.InstanceNumber = 3
    ds.SliceThickness = DSfloat("0.5")
    ds.Rows, ds.Columns = 2, 3
    ds.ImageComments = "plain"
    ds.PatientName = "Doe^Jane"
    ds.PixelData = bytes(range(18))
    ds["PixelData"].VR = "OB"
    ds.preamble = b"\x01" * 128
    meta = list(ds.file_meta.keys())
    reference = _dcmwrite(copy.deepcopy(ds))
    written: list[int] = []
    original = filewriter.write_data_element

    def counting(fp: object, element: object, encodings: object = None) -> None:
        written.append(element.tag)  # type: ignore[attr-defined]
        original(fp, element, encodings)  # type: ignore[arg-type]

    monkeypatch.setattr(filewriter, "write_data_element", counting)
    monkeypatch.setattr(encoding, "write_data_element", counting)
    assert encode_part10(ds) == reference
    assert [tag for tag in written if tag >> 16 != 2] == [0x00100010, 0x7FE00010]
    assert list(ds.file_meta.keys()) == meta
    assert "FileMetaInformationGroupLength" not in ds.file_meta
