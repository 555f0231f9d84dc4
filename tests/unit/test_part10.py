"""The SCP's own File Meta Information encoder gives pynetdicom's bytes exactly."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from acwi_node.ingest.part10 import file_meta_prefix


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.12345", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.1.1", "9" * 64, "1.2.840.10008.1.2.4.50"),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3/../x", "1.2.840.10008.1.2.1"),  # stored as sent
    ],
)
def test_same_bytes_as_pynetdicom(sop_class: str, sop_instance: str, syntax: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax),
    )
    reference = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    ours = file_meta_prefix(sop_class, sop_instance, syntax)
    assert ours == reference
    meta = dcmread(io.BytesIO(ours + b"\x08\x00\x16\x00UI\x02\x001\x00"), force=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == syntax


def test_non_ascii_is_refused() -> None:
    with pytest.raises(UnicodeEncodeError):
        file_meta_prefix("1.2.3", "1.2.é", "1.2.840.10008.1.2.1")
