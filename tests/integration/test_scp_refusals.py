"""Data sets the storage SCP cannot or must not store, on both of its C-STORE paths (the
node's own P-DATA handling and pynetdicom's): a corrupt deflate stream, sequences nested deeper
than pydicom reads, a data set that is not the instance or class its command names. Each is
refused with its status, counted and audited like any refusal, and leaves no file or row."""

from __future__ import annotations

import io
import logging
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from acwi_node.ledger import Ledger
from tests.integration.test_audit_trail import _wait_for, node_settings, running
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE as SC
from tests.support import write_secondary_capture

__all__ = ["running"]  # the fixture

CT = "1.2.840.10008.5.1.4.1.1.2"
CANARY = "Refusalcanary^Ida"


def instance(tmp_path: Path) -> Dataset:
    path = tmp_path / f"{generate_uid()}.dcm"
    write_secondary_capture(path, study_uid=generate_uid(), patient_name=CANARY)
    return dcmread(path)


def encoded(ds: Dataset, syntax: str) -> bytes:
    big = syntax == ExplicitVRBigEndian
    data = encode(ds, False, not big, syntax == DeflatedExplicitVRLittleEndian)
    assert data is not None
    return data


def nested_big_endian(ds: Dataset, levels: int) -> bytes:
    raw = encoded(ds, ExplicitVRBigEndian)
    level = b"\x00\x08\x11\x40SQ\x00\x00\xff\xff\xff\xff" + b"\xff\xfe\xe0\x00\xff\xff\xff\xff"
    close = b"\xff\xfe\xe0\x0d\x00\x00\x00\x00" + b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
    at = raw.index(b"\x00\x10\x00\x10PN")
    return raw[:at] + level * levels + close * levels + raw[at:]


def store_raw(
    assoc: Association, data: bytes, sop_class: str, sop_uid: str, abstract: str, syntax: str
) -> int:
    """C-STORE ``data`` as it is, the command naming ``sop_class`` and ``sop_uid``, on the
    accepted context of ``abstract`` in ``syntax``."""
    (context,) = [
        c
        for c in assoc.accepted_contexts
        if c.abstract_syntax == abstract and c.transfer_syntax[0] == syntax
    ]
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(data)
    assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_store: the reactor parked
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assert context.context_id is not None
        assoc.dimse.send_msg(request, context.context_id)
        _context, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None and response.Status is not None
    return int(response.Status)


def associate(port: int) -> Association:
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        ae.add_requested_context(SC, syntax)
        ae.add_requested_context(CT, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="ACWI")
    assert assoc.is_established
    return assoc


def rejected(reason: str) -> float:
    value = REGISTRY.get_sample_value("acwi_scp_instances_rejected_total", {"reason": reason})
    return value or 0.0


def nothing_stored(settings: Any, ledger: Ledger, *sop_uids: str) -> None:
    files = [p.name for p in settings.spool_dir.rglob("*.dcm")]
    for uid in sop_uids:
        assert ledger.instance_file(uid) is None
        assert f"{uid}.dcm" not in files


@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_unreadable_data_sets_are_refused_counted_and_audited(
    tmp_path: Path, running: Any, reactor: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = running(node_settings(tmp_path, ingest={"reactor": reactor}))
    ledger = Ledger(settings.database_url)
    caplog.set_level(logging.INFO, logger="acwi_node")
    before = rejected("unparseable_header")
    corrupt, plain, cut, nested, short, good = (instance(tmp_path) for _ in range(6))
    deflated = encoded(cut, DeflatedExplicitVRLittleEndian)
    explicit = encoded(short, ExplicitVRLittleEndian)
    inside_name = explicit.index(b"\x10\x00\x10\x00PN") + 10  # cut short in the name
    sends = [
        (corrupt, b"\x78\x9c" + bytes(range(256)) * 2, DeflatedExplicitVRLittleEndian),
        (plain, encoded(plain, ExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian),
        (cut, deflated[: len(deflated) // 8], DeflatedExplicitVRLittleEndian),
        (nested, nested_big_endian(nested, 3000), ExplicitVRBigEndian),
        (short, explicit[:inside_name], ExplicitVRLittleEndian),
        (good, encoded(good, DeflatedExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian),
    ]
    assoc = associate(settings.node.dicom_port)
    try:
        statuses = [
            store_raw(assoc, data, SC, str(ds.SOPInstanceUID), SC, syntax)
            for ds, data, syntax in sends
        ]
    finally:
        assoc.release()
    assert statuses == [0xC000, 0xC000, 0xC000, 0xC000, 0xC000, 0x0000]
    assert rejected("unparseable_header") - before == 5
    (record,) = _wait_for(settings, "instances_received")
    assert record["outcome"] == "minor_failure"
    assert record["detail"].startswith("1 instance(s) stored, 5 refused")
    nothing_stored(settings, ledger, *(str(ds.SOPInstanceUID) for ds, _, _ in sends[:5]))
    assert ledger.instance_file(str(good.SOPInstanceUID)) is not None
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 5, refusals
    assert "the data set ends inside an element before its UIDs" in refusals[4]
    assert all("\n" not in line and "Refusalcanary" not in line for line in refusals)
    assert "the C-STORE handler failed" not in caplog.text
    ledger.dispose()


@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_a_data_set_that_is_not_what_its_command_names_is_refused(
    tmp_path: Path, running: Any, reactor: str
) -> None:
    settings = running(node_settings(tmp_path, ingest={"reactor": reactor}))
    ledger = Ledger(settings.database_url)
    other_uid, ct_data_set, ct_command, good = (instance(tmp_path) for _ in range(4))
    command_uid = generate_uid()
    ct_data_set.SOPClassUID = CT
    before = (rejected("instance_mismatch"), rejected("class_mismatch"))
    assoc = associate(settings.node.dicom_port)
    explicit = ExplicitVRLittleEndian
    try:
        statuses = [
            # The data set's SOP Instance UID is not the command's.
            store_raw(assoc, encoded(other_uid, explicit), SC, command_uid, SC, explicit),
            # A CT data set, the command and the context of Secondary Capture.
            store_raw(
                assoc,
                encoded(ct_data_set, explicit),
                SC,
                str(ct_data_set.SOPInstanceUID),
                SC,
                explicit,
            ),
            # A command of the CT class on the Secondary Capture context.
            store_raw(
                assoc,
                encoded(ct_command, explicit),
                CT,
                str(ct_command.SOPInstanceUID),
                SC,
                explicit,
            ),
            store_raw(assoc, encoded(good, explicit), SC, str(good.SOPInstanceUID), SC, explicit),
        ]
    finally:
        assoc.release()
    assert statuses == [0xC003, 0xA900, 0xA900, 0x0000]
    assert rejected("instance_mismatch") - before[0] == 1
    assert rejected("class_mismatch") - before[1] == 2
    nothing_stored(
        settings,
        ledger,
        str(other_uid.SOPInstanceUID),
        command_uid,
        str(ct_data_set.SOPInstanceUID),
        str(ct_command.SOPInstanceUID),
    )
    (record,) = _wait_for(settings, "instances_received")
    assert record["detail"].startswith("1 instance(s) stored, 3 refused")
    stored = settings.spool_dir / str(good.StudyInstanceUID) / f"{good.SOPInstanceUID}.dcm"
    meta = dcmread(stored).file_meta
    assert meta.MediaStorageSOPInstanceUID == good.SOPInstanceUID
    ledger.dispose()


def test_a_deflate_bomb_is_stored_without_inflating_it(tmp_path: Path, running: Any) -> None:
    """A deflated data set of a megabyte inflating to 256 MiB: answered 0x0000 from its first
    kilobytes inflated, stored as received."""
    settings = running(node_settings(tmp_path))
    ledger = Ledger(settings.database_url)
    ds = instance(tmp_path)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(encoded(ds, ExplicitVRLittleEndian))
    bomb += compressor.compress(struct.pack("<HH2s2xI", 0x0099, 0x1000, b"OB", 256 << 20))
    bomb += b"".join(compressor.compress(bytes(1 << 20)) for _ in range(256))
    bomb += compressor.flush()
    assoc = associate(settings.node.dicom_port)
    tracemalloc.start()  # the SCP runs in this process: its allocations are traced too
    try:
        uid = str(ds.SOPInstanceUID)
        status = store_raw(assoc, bomb, SC, uid, SC, DeflatedExplicitVRLittleEndian)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        assoc.release()
    assert status == 0x0000
    assert peak < 32 << 20, peak
    stored = settings.spool_dir / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    assert stored.read_bytes().endswith(bomb)
    ledger.dispose()
