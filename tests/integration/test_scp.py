"""The storage SCP over real associations: pynetdicom and DCMTK as senders."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select

from acwi_node.config import Route, RouteMatch, Settings, load_settings
from acwi_node.ingest import cpu_latency, reactor
from acwi_node.ingest import scp as scp_module
from acwi_node.ingest.journal import (
    KIND_INSTANCE,
    KIND_SPOOLED,
    SPOOLED_CRC,
    JournalRecord,
    read_journal,
)
from acwi_node.ingest.scp import TRANSFER_SYNTAXES, StorageSCP
from acwi_node.ingest.spool import Spool, SpoolError, SpoolFile
from acwi_node.ledger import InstanceRecord, Ledger, RoutedJob
from acwi_node.ledger import repository as ledger_repository
from acwi_node.ledger.models import Instance, Study, utcnow
from acwi_node.routing.rules import decide_routes
from models.data.synth import write_enhanced_ct
from tests.support.answer_threads import record_answer_threads
from tests.support.association import rejected
from tests.support.dcmtk import storescu
from tests.support.ports import free_port

SC = "1.2.840.10008.5.1.4.1.1.7"


def make_sc(
    study_uid: str,
    sop_uid: str | None = None,
    *,
    ts: str = ExplicitVRLittleEndian,
    patient: str = "SCP^TEST",
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SC)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid or generate_uid())
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, "series"])
    ds.PatientName = patient
    ds.PatientID = "P1"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return ds


@contextlib.contextmanager
def running_scp(tmp_path: Path, **ingest: object) -> Iterator[tuple[Settings, Ledger, StorageSCP]]:
    """An in-process SCP on a free port, without fsync, with ``ingest`` settings."""
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "dicom_host": "127.0.0.1", "dicom_port": free_port()},
        ingest={"fsync": False, **ingest},
    )
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        yield settings, ledger, scp
    finally:
        scp.stop()
        ledger.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Ledger, StorageSCP]]:
    with running_scp(
        tmp_path,
        allowed_calling_aes=["SENDER", "STORESCU"],
        network_timeout_s=2,
        acse_timeout_s=2,
    ) as running:
        yield running


def associate(
    settings: Settings, *, calling: str = "SENDER", ts: str = ExplicitVRLittleEndian
) -> Any:
    """An established association for secondary captures (in ``ts``) and C-ECHO."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(SC, ts)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title=settings.node.ae_title)
    assert assoc.is_established
    return assoc


def send(
    settings: Settings,
    datasets: list[Dataset],
    *,
    calling: str = "SENDER",
    ts: str = ExplicitVRLittleEndian,
) -> list[int]:
    assoc = associate(settings, calling=calling, ts=ts)
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def due_study(ledger: Ledger) -> tuple[int, int]:
    """(study id, generation) of the one study due for completion, once the association that
    sent it has been recorded as ended (just after the sender's release returns)."""
    deadline = time.monotonic() + 5
    while not (due := ledger.studies_due(quiet_period_s=0, max_wait_s=3600)):
        assert time.monotonic() < deadline, "no study became due"
        time.sleep(0.05)
    ((study_id, generation),) = due
    return study_id, generation


def test_echo(node: tuple[Settings, Ledger, StorageSCP]) -> None:
    settings, _, scp = node
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    # The accepted socket times out a stalled peer and sends each PDU at once.
    (accepted,) = scp.ae.active_associations
    raw = accepted.dul.socket.socket  # type: ignore[union-attr]
    assert raw is not None and raw.gettimeout() == settings.ingest.network_timeout_s
    assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assoc.release()


def test_store_writes_spool_and_ledger_before_success(
    node: tuple[Settings, Ledger, StorageSCP],
) -> None:
    settings, ledger, _ = node
    study = generate_uid()
    datasets = [make_sc(study) for _ in range(3)]
    assert send(settings, datasets) == [0, 0, 0]
    st = ledger.get_study(study)
    assert st is not None and st["instances"] == 3 and st["calling_ae"] == "SENDER"
    for ds in datasets:
        path = settings.spool_dir / study / f"{ds.SOPInstanceUID}.dcm"
        back = dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PatientName == "SCP^TEST"
    assert list((settings.spool_dir / ".tmp").iterdir()) == []
    # The association's release lets completion proceed after the quiet period.
    deadline = time.monotonic() + 5
    while (
        ledger.studies_due(quiet_period_s=0, max_wait_s=3600) == [] and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert ledger.studies_due(quiet_period_s=0, max_wait_s=3600) != []


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_every_common_transfer_syntax_is_accepted(
    node: tuple[Settings, Ledger, StorageSCP], ts: str
) -> None:
    settings, ledger, _ = node
    study = generate_uid()
    ds = make_sc(study, ts=ts)
    if ts not in (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    ):
        # Encapsulated pixel data: the node stores the bytes as received, never decodes them.
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8not-really-jpeg\xff\xd9"])
        ds["PixelData"].VR = "OB"
    assert send(settings, [ds], ts=ts) == [0]
    st = ledger.get_study(study)
    assert st is not None and st["instances"] == 1
    stored = dcmread(
        settings.spool_dir / study / f"{ds.SOPInstanceUID}.dcm", stop_before_pixels=True
    )
    assert stored.file_meta.TransferSyntaxUID == ts


@pytest.mark.parametrize("bad", ["../../x", "/etc/x", "1.2.3a", "9" * 65])
def test_path_like_or_overlong_study_uid_is_refused(
    node: tuple[Settings, Ledger, StorageSCP], bad: str, tmp_path: Path
) -> None:
    settings, ledger, _ = node
    ds = make_sc("1.2.3")
    ds.StudyInstanceUID = bad
    status = send(settings, [ds])[0]
    assert status == 0xC001
    assert ledger.list_studies() == []
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".dcm", ".part")]
    assert written == []
    # The node keeps serving.
    assert send(settings, [make_sc(generate_uid())]) == [0]


def test_unknown_calling_ae_is_rejected(node: tuple[Settings, Ledger, StorageSCP]) -> None:
    settings, _, _ = node
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(SC)
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    assert rejected(assoc)
    assert send(settings, [make_sc(generate_uid())]) == [0]


def test_truncated_association_keeps_serving(node: tuple[Settings, Ledger, StorageSCP]) -> None:
    settings, ledger, _ = node
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x10\x00")  # half an A-ASSOCIATE-RQ
    with socket.create_connection(("127.0.0.1", settings.node.dicom_port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            sock.recv(100)
    assert send(settings, [make_sc(generate_uid())]) == [0]


def test_the_node_s_own_results_coming_back_are_answered_and_not_stored(
    node: tuple[Settings, Ledger, StorageSCP], caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS that forwards a study's new instances sends the node its own results: each is
    answered with success and dropped, so the completed study is not re-opened (a second
    analysis, a second review item); an image of the study still re-opens it."""
    settings, ledger, _ = node
    study = generate_uid()
    image = make_sc(study)
    assert send(settings, [image]) == [0]
    study_id, generation = due_study(ledger)
    ledger.complete_study(study_id, generation, lambda facts: [])
    completed = ledger.get_study(study)
    assert completed is not None and completed["state"] == "not_routed"

    results = [make_sc(study), make_sc(study)]
    results[0].Manufacturer = "ACWI Node"
    results[1].Manufacturer = "acwi node "
    dropped = REGISTRY.get_sample_value(
        "acwi_scp_own_results_dropped_total", {"calling_ae": "SENDER"}
    )
    caplog.set_level(logging.INFO, logger="acwi_node.ingest")
    assert send(settings, results) == [0, 0]
    after = ledger.get_study(study)
    assert after is not None
    assert (after["state"], after["generation"], after["instances"]) == ("not_routed", 1, 1)
    assert sorted(p.name for p in (settings.spool_dir / study).iterdir()) == [
        f"{image.SOPInstanceUID}.dcm"
    ]
    assert (
        REGISTRY.get_sample_value("acwi_scp_own_results_dropped_total", {"calling_ae": "SENDER"})
        == (dropped or 0) + 2
    )
    # One line for the association, once it has ended (after the sender's release).
    deadline = time.monotonic() + 5
    while "2 object(s) written by ACWI Node (its results) came back" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)

    # The same study's late image is new: it re-opens the study.
    assert send(settings, [make_sc(study)]) == [0]
    reopened = ledger.get_study(study)
    assert reopened is not None
    assert (reopened["state"], reopened["generation"], reopened["instances"]) == (
        "receiving",
        2,
        2,
    )


@pytest.mark.parametrize("journal_max_bytes", [65536, 0], ids=["journaled", "spooled"])
def test_an_instance_sent_in_another_study_moves_there(
    tmp_path: Path, journal_max_bytes: int
) -> None:
    """A PACS that corrected a study sends an image again in another one, its SOP Instance
    UID kept: the one instance moves, its row and its file; the study it left counts one
    fewer, and keeps no file that no row names."""
    with running_scp(
        tmp_path, allowed_calling_aes=["SENDER"], journal_max_bytes=journal_max_bytes
    ) as (settings, ledger, _):
        first, second = generate_uid(), generate_uid()
        images = [make_sc(first) for _ in range(2)]
        assert send(settings, images) == [0, 0]
        moved = copy.deepcopy(images[0])
        moved.StudyInstanceUID = second
        assert send(settings, [moved]) == [0]
        deadline = time.monotonic() + 5
        while (st := ledger.get_study(second)) is None or st["instances"] != 1:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        left = ledger.get_study(first)
        assert left is not None and left["instances"] == 1
        sop = str(moved.SOPInstanceUID)
        recorded = ledger.instance_file(sop)
        assert recorded is not None and recorded[0] == f"{second}/{sop}.dcm"
        assert (settings.spool_dir / second / f"{sop}.dcm").exists()
        assert not (settings.spool_dir / first / f"{sop}.dcm").exists()
        assert (settings.spool_dir / first / f"{images[1].SOPInstanceUID}.dcm").exists()


@pytest.mark.parametrize("journal_max_bytes", [65536, 0], ids=["journaled", "spooled"])
def test_a_study_sent_again_unchanged_keeps_its_results(
    tmp_path: Path, journal_max_bytes: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS that forwards the whole study again: the instances, byte for byte as before,
    are stored (answered 0x0000) without re-opening the study on its way to its results; a
    changed version of one re-opens it."""
    caplog.set_level(logging.INFO, logger="acwi_node.ingest")
    with running_scp(
        tmp_path, allowed_calling_aes=["SENDER"], journal_max_bytes=journal_max_bytes
    ) as (settings, ledger, _):
        study = generate_uid()
        images = [make_sc(study) for _ in range(3)]
        assert send(settings, images) == [0, 0, 0]
        study_id, generation = due_study(ledger)
        route = RoutedJob(route="any", model="default", destinations=["pacs"], priority=0)
        (job,) = ledger.complete_study(study_id, generation, lambda facts: [route])

        assert send(settings, images) == [0, 0, 0]
        st = ledger.get_study(study)
        assert st is not None
        assert (st["state"], st["generation"], st["instances"]) == ("queued", 1, 3)
        assert [j["id"] for j in st["jobs"]] == [job]
        deadline = time.monotonic() + 5
        while "3 instance(s) sent again unchanged" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)

        images[1].PatientName = "SCP^CORRECTED"  # the same instance, other bytes
        assert send(settings, images[1:2]) == [0]
        st = ledger.get_study(study)
        assert st is not None and (st["state"], st["generation"]) == ("receiving", 2)
        path = settings.spool_dir / study / f"{images[1].SOPInstanceUID}.dcm"
        assert dcmread(path).PatientName == "SCP^CORRECTED"


def test_a_key_object_note_forwarded_later_keeps_the_study_its_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS forwards the radiologist's key image note (a KOS) once it is stored in the
    study: answered 0x0000 and stored, it does not re-open the study (nothing to read); a new
    image does."""
    caplog.set_level(logging.INFO, logger="acwi_node.ingest")
    kos_class = "1.2.840.10008.5.1.4.1.1.88.59"
    with running_scp(tmp_path, allowed_calling_aes=["SENDER"]) as (settings, ledger, _):
        study = generate_uid()
        assert send(settings, [make_sc(study)]) == [0]
        study_id, generation = due_study(ledger)
        route = RoutedJob(route="any", model="default", destinations=["pacs"], priority=0)
        ledger.complete_study(study_id, generation, lambda facts: [route])

        note = make_sc(study)
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                        "PixelData", "ConversionType"):  # fmt: skip
            if keyword in note:
                delattr(note, keyword)
        note.SOPClassUID = note.file_meta.MediaStorageSOPClassUID = UID(kos_class)
        note.Modality = "KO"
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(kos_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
        assert assoc.is_established
        assert int(assoc.send_c_store(note).Status) == 0
        assoc.release()
        st = ledger.get_study(study)
        assert st is not None
        assert (st["state"], st["generation"], st["instances"]) == ("queued", 1, 2)
        assert (settings.spool_dir / study / f"{note.SOPInstanceUID}.dcm").exists()
        deadline = time.monotonic() + 5
        while "1 object(s) no model reads" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)

        assert send(settings, [make_sc(study)]) == [0]
        st = ledger.get_study(study)
        assert st is not None and (st["state"], st["generation"]) == ("receiving", 2)


@pytest.fixture(params=[65536, 0], ids=["journaled", "spooled"])
def slow_checkpoints(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Settings, Ledger, StorageSCP]]:
    """An SCP whose journal is checkpointed only when a test says so; instances journaled
    whole, or (``journal_max_bytes = 0``) all flushed in the spool, as those over 1 MiB are."""
    with running_scp(
        tmp_path, journal_checkpoint_s=300, journal_max_bytes=request.param
    ) as running:
        yield running


def sized_sc(study_uid: str, side: int) -> Dataset:
    """A secondary capture of ``side`` x ``side`` 16-bit pixels (512: a CT slice's 512 KB)."""
    ds = make_sc(study_uid)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = np.arange(side * side, dtype=np.uint16).tobytes()
    return ds


def test_slices_are_journaled_whole_and_larger_instances_flushed_in_the_spool(
    tmp_path: Path,
) -> None:
    """With the default ``journal_max_bytes`` (1 MiB), a CT-sized instance (512 KB) is written
    to the journal whole, its spool file after the answer; a 2 MB one is flushed in the spool
    and the journal holds only its CRC-32. Both files are the instances as sent."""
    with running_scp(tmp_path, journal_checkpoint_s=300) as (settings, ledger, scp):
        assert settings.ingest.journal_max_bytes == 1 << 20
        assert scp.journal is not None
        study = generate_uid()
        ct_slice, radiograph = sized_sc(study, 512), sized_sc(study, 1024)
        assert send(settings, [ct_slice, radiograph]) == [0, 0]
        records = {r.meta["sop_instance_uid"]: r for r in read_journal(scp.journal.directory)}
        journaled = records[ct_slice.SOPInstanceUID]
        spooled = records[radiograph.SOPInstanceUID]
        assert journaled.kind == KIND_INSTANCE and len(journaled.payload) > 512 * 512 * 2
        assert spooled.kind == KIND_SPOOLED and spooled.payload == b""
        for ds in (ct_slice, radiograph):
            path = settings.spool_dir / study / f"{ds.SOPInstanceUID}.dcm"
            assert dcmread(path).PixelData == ds.PixelData
            assert ledger.instance_file(ds.SOPInstanceUID) is not None
        slice_file = settings.spool_dir / study / f"{ct_slice.SOPInstanceUID}.dcm"
        assert slice_file.read_bytes() == journaled.payload
        assert (
            zlib.crc32(
                (settings.spool_dir / study / f"{radiograph.SOPInstanceUID}.dcm").read_bytes()
            )
            == (spooled.meta[SPOOLED_CRC])
        )


def test_ledger_failure_after_the_answer_is_recorded_by_the_checkpoint(
    slow_checkpoints: tuple[Settings, Ledger, StorageSCP], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance is answered once it is durable in the journal; its spool file and ledger
    row are written after the answer. If the row fails, the instance is safe all the same:
    the journal's checkpoint records it once the ledger works again, and keeps it until then.
    Once the failure is known the SCP answers only after the row, so a failing ledger refuses
    (0xA701) and leaves no file."""
    settings, ledger, scp = slow_checkpoints
    assert scp.journal is not None
    working = ledger.record_instances

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(ledger, "record_instances", broken)
    study = generate_uid()
    answered, refused = make_sc(study), make_sc(study)
    # The row is written after the answer (at the latest before the release is answered).
    assert send(settings, [answered]) == [0]
    assert send(settings, [refused]) == [0xA701]
    answered_file = settings.spool_dir / study / f"{answered.SOPInstanceUID}.dcm"
    assert answered_file.exists()
    assert not (settings.spool_dir / study / f"{refused.SOPInstanceUID}.dcm").exists()
    assert ledger.get_study(study) is None
    # The refused instance's record is withdrawn; the answered one waits in the journal.
    with pytest.raises(RuntimeError, match="database is locked"):
        scp.journal.checkpoint()
    kinds = [(r.kind, r.meta.get("sop_instance_uid")) for r in read_journal(scp.journal.directory)]
    kind = KIND_INSTANCE if settings.ingest.journal_max_bytes else KIND_SPOOLED
    assert (kind, answered.SOPInstanceUID) in kinds
    assert scp.journal.pending_records > 0

    monkeypatch.setattr(ledger, "record_instances", working)
    assert scp.journal.checkpoint() > 0
    assert ledger.instance_file(answered.SOPInstanceUID) is not None
    assert scp.journal.pending_records == 0
    later = make_sc(study)
    assert send(settings, [later]) == [0]
    st = ledger.get_study(study)
    assert st is not None and st["instances"] == 2


def test_an_idle_association_has_its_rows_written(
    node: tuple[Settings, Ledger, StorageSCP],
) -> None:
    """A small instance's ledger row is written after the answer, with the rows of the
    instances after it; once the sender goes quiet, it is written while the association
    stays open."""
    settings, ledger, _ = node
    ds = make_sc(generate_uid())
    assoc = associate(settings)
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
        deadline = time.monotonic() + 5
        while ledger.instance_file(ds.SOPInstanceUID) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ledger.instance_file(ds.SOPInstanceUID) is not None
        assert assoc.is_established
    finally:
        assoc.release()


def test_rows_are_written_before_anything_else_of_the_association_is_served(
    node: tuple[Settings, Ledger, StorageSCP], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the association never idle long enough (``reactor.IDLE_S`` made long), the rows
    still come first: a C-ECHO after a C-STORE finds the instance's row, and so does the
    association's release."""
    settings, ledger, scp = node
    monkeypatch.setattr(reactor, "IDLE_S", 60.0)
    study = generate_uid()
    first, second = make_sc(study), make_sc(study)
    found: list[bool] = []

    def on_echo(event: evt.Event) -> int:
        found.append(ledger.instance_file(first.SOPInstanceUID) is not None)
        return 0x0000

    scp._server.bind(evt.EVT_C_ECHO, on_echo)
    assoc = associate(settings)
    assert int(assoc.send_c_store(first).Status) == 0
    assert int(assoc.send_c_echo().Status) == 0
    assert int(assoc.send_c_store(second).Status) == 0
    assoc.release()
    assert found == [True]
    assert ledger.instance_file(second.SOPInstanceUID) is not None


@pytest.mark.parametrize("kind", ["journaled", "spooled"])
def test_the_rows_of_a_streaming_association_are_written_together(
    node: tuple[Settings, Ledger, StorageSCP],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """storescu sends 70 instances of two studies back to back: with no idle time and no age
    limit in the way, their rows are written a batch (32 here) at a time and the rest at the
    release, and each study counts the association once (open while it sends, closed at its
    end). So are those of instances too large for the journal (flushed in the spool, each
    answered before its row)."""
    settings, ledger, scp = node
    if kind == "spooled":
        monkeypatch.setattr(scp, "_journal_max_bytes", 0)
    monkeypatch.setattr(reactor, "IDLE_S", 60.0)
    monkeypatch.setattr(scp_module, "ROW_MAX_DELAY_S", 60.0)
    monkeypatch.setattr(scp_module, "ROW_BATCH", 32)
    batches: list[int] = []
    record_instances = ledger.record_instances

    def spy(batch: Any, **kwargs: Any) -> Any:
        batches.append(len(batch))
        return record_instances(batch, **kwargs)

    monkeypatch.setattr(ledger, "record_instances", spy)
    study, other = generate_uid(), generate_uid()
    files = []
    for i in range(70):
        files.append(tmp_path / f"{i}.dcm")
        make_sc(study if i < 60 else other).save_as(files[-1], enforce_file_format=True)
    done = storescu("127.0.0.1", settings.node.dicom_port, "ACWI", files, calling_ae="STORESCU")
    assert done.returncode == 0, done.stderr
    assert batches == [32, 32, 6]
    deadline = time.monotonic() + 10  # the association's end is recorded once it has closed
    while scp.open_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    with ledger.session() as s:
        counts = {
            uid: (count, open_associations)
            for uid, count, open_associations in s.execute(
                select(Study.study_uid, Study.instance_count, Study.open_associations)
            )
        }
    assert counts[study] == (60, 0) and counts[other] == (10, 0)


def test_a_row_waits_no_longer_than_its_limit_while_the_association_sends(
    node: tuple[Settings, Ledger, StorageSCP], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that never pauses long enough for the idle write: a row older than
    ROW_MAX_DELAY_S is written with the next instance's."""
    settings, ledger, _ = node
    monkeypatch.setattr(reactor, "IDLE_S", 60.0)
    monkeypatch.setattr(scp_module, "ROW_MAX_DELAY_S", 0.3)
    study = generate_uid()
    first, second = make_sc(study), make_sc(study)
    assoc = associate(settings)
    try:
        assert int(assoc.send_c_store(first).Status) == 0
        time.sleep(0.5)
        assert ledger.instance_file(first.SOPInstanceUID) is None  # waiting for company
        assert int(assoc.send_c_store(second).Status) == 0
        deadline = time.monotonic() + 5
        while ledger.instance_file(second.SOPInstanceUID) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ledger.instance_file(first.SOPInstanceUID) is not None
        assert ledger.instance_file(second.SOPInstanceUID) is not None
    finally:
        assoc.release()


def spool_full_once(scp: StorageSCP, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The next spool file write fails (the disk full); returns the failures, one then."""
    write = scp.spool.write
    failures: list[str] = []

    def full_once(*args: Any, **kwargs: Any) -> SpoolFile:
        if not failures:
            failures.append("no space")
            raise SpoolError("cannot write to spool: No space left on device", out_of_space=True)
        return write(*args, **kwargs)

    monkeypatch.setattr(scp.spool, "write", full_once)
    return failures


def test_a_spool_file_that_fails_after_the_answer_is_written_by_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool file of a small instance is written after the answer: if that fails, the
    instance is safe in the journal, and the journal's checkpoint writes the file and the row."""
    with running_scp(tmp_path, journal_checkpoint_s=300) as (settings, ledger, scp):
        assert scp.journal is not None
        failures = spool_full_once(scp, monkeypatch)
        ds = make_sc(generate_uid())
        assert send(settings, [ds]) == [0]
        path = settings.spool_dir / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert failures and not path.exists()
        assert ledger.instance_file(ds.SOPInstanceUID) is None
        assert scp.journal.checkpoint() > 0
        assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
        assert ledger.instance_file(ds.SOPInstanceUID) is not None


def checkpoint_keeps_the_file_sent_last(scp: StorageSCP, ledger: Ledger, path: Path) -> None:
    """The journal's checkpoint leaves the spool file at ``path`` (``<study>/<sop>.dcm``) as
    it is, the ledger's row describing it."""
    assert scp.journal is not None
    sent_last = path.read_bytes()
    assert scp.journal.checkpoint() > 0
    assert path.read_bytes() == sent_last
    assert ledger.instance_file(path.stem) == (
        f"{path.parent.name}/{path.name}",
        len(sent_last),
        ExplicitVRLittleEndian,
    )


def set_clock_back(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The wall clock the ledger's rows are stamped with, set back (NTP stepping it)."""
    stepped = dt.timedelta(seconds=seconds)
    monkeypatch.setattr(ledger_repository, "utcnow", lambda: utcnow() - stepped)


@pytest.mark.parametrize("clock_set_back_s", [0, 3600], ids=["", "clock-set-back"])
def test_the_checkpoint_keeps_a_later_version_of_an_unrecorded_instance(
    slow_checkpoints: tuple[Settings, Ledger, StorageSCP],
    monkeypatch: pytest.MonkeyPatch,
    clock_set_back_s: float,
) -> None:
    """An instance answered while the ledger failed, then sent again and recorded: the
    checkpoint must not bring back the first version, were the wall clock set back between
    the two (the second version's row then looks older than the first's record)."""
    settings, ledger, scp = slow_checkpoints
    assert scp.journal is not None
    working = ledger.record_instances

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database is locked")

    study, sop = generate_uid(), generate_uid()
    first, second = make_sc(study, sop), make_sc(study, sop, patient="SCP^SECOND")
    monkeypatch.setattr(ledger, "record_instances", broken)
    assert send(settings, [first]) == [0]
    monkeypatch.setattr(ledger, "record_instances", working)
    set_clock_back(monkeypatch, clock_set_back_s)
    assert send(settings, [second]) == [0]
    path = settings.spool_dir / study / f"{sop}.dcm"
    assert dcmread(path).PatientName == "SCP^SECOND"
    checkpoint_keeps_the_file_sent_last(scp, ledger, path)


@pytest.mark.parametrize("later", [True, False], ids=["moved-after", "moved-before"])
def test_the_checkpoint_tells_an_instance_moved_to_another_study(
    slow_checkpoints: tuple[Settings, Ledger, StorageSCP],
    monkeypatch: pytest.MonkeyPatch,
    later: bool,
) -> None:
    """An instance answered in one study while the ledger failed, and recorded in another
    study before (a correction the PACS sent earlier) or after it (sent again, corrected): the
    checkpoint records the version that came last, in its study."""
    settings, ledger, scp = slow_checkpoints
    assert scp.journal is not None
    working = ledger.record_instances

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database is locked")

    sop, unrecorded_study, recorded_study = generate_uid(), generate_uid(), generate_uid()
    if not later:
        assert send(settings, [make_sc(recorded_study, sop, patient="SCP^RECORDED")]) == [0]
    monkeypatch.setattr(ledger, "record_instances", broken)
    assert send(settings, [make_sc(unrecorded_study, sop)]) == [0]
    monkeypatch.setattr(ledger, "record_instances", working)
    if later:
        assert send(settings, [make_sc(recorded_study, sop, patient="SCP^RECORDED")]) == [0]
    assert scp.journal.checkpoint() > 0
    last = recorded_study if later else unrecorded_study
    recorded = ledger.instance_file(sop)
    assert recorded is not None and recorded[0] == f"{last}/{sop}.dcm"


def test_the_checkpoint_keeps_a_later_version_of_an_instance_whose_file_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance answered, its spool file failing after the answer; then sent again, and
    recorded after the wall clock was set back: the checkpoint keeps the second version."""
    with running_scp(tmp_path, journal_checkpoint_s=300) as (settings, ledger, scp):
        assert scp.journal is not None
        failures = spool_full_once(scp, monkeypatch)
        study, sop = generate_uid(), generate_uid()
        first, second = make_sc(study, sop), make_sc(study, sop, patient="SCP^SECOND")
        assert send(settings, [first]) == [0]
        path = settings.spool_dir / study / f"{sop}.dcm"
        assert failures and not path.exists()
        set_clock_back(monkeypatch, 3600)
        assert send(settings, [second]) == [0]
        checkpoint_keeps_the_file_sent_last(scp, ledger, path)


def test_the_checkpoint_records_the_later_of_two_unrecorded_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two versions of an instance answered while the ledger failed now and then: the
    checkpoint records them in the order they came, the second last."""
    with running_scp(tmp_path, journal_checkpoint_s=300) as (settings, ledger, scp):
        assert scp.journal is not None
        working = ledger.record_instances

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("database is locked")

        study, sop = generate_uid(), generate_uid()
        first, second = make_sc(study, sop), make_sc(study, sop, patient="SCP^SECOND")
        monkeypatch.setattr(ledger, "record_instances", broken)
        assert send(settings, [first]) == [0]
        monkeypatch.setattr(ledger, "record_instances", working)
        assert send(settings, [make_sc(generate_uid())]) == [0]  # the ledger works again
        monkeypatch.setattr(ledger, "record_instances", broken)
        assert send(settings, [second]) == [0]  # answered first, its row failing after
        monkeypatch.setattr(ledger, "record_instances", working)
        path = settings.spool_dir / study / f"{sop}.dcm"
        assert dcmread(path).PatientName == "SCP^SECOND"
        checkpoint_keeps_the_file_sent_last(scp, ledger, path)


def test_the_checkpoint_records_an_unrecorded_instance_over_a_refused_later_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered while the ledger failed; a second version, refused while it still failed,
    left its file in the spool: the checkpoint brings back the version answered."""
    with running_scp(tmp_path, journal_checkpoint_s=300) as (settings, ledger, scp):
        assert scp.journal is not None
        working = ledger.record_instances

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("database is locked")

        study, sop = generate_uid(), generate_uid()
        first, second = make_sc(study, sop), make_sc(study, sop, patient="SCP^SECOND")
        monkeypatch.setattr(ledger, "record_instances", broken)
        assert send(settings, [first]) == [0]
        assert send(settings, [second]) == [scp_module.STATUS_LEDGER_UNAVAILABLE]
        path = settings.spool_dir / study / f"{sop}.dcm"
        assert dcmread(path).PatientName == "SCP^SECOND"
        monkeypatch.setattr(ledger, "record_instances", working)
        assert scp.journal.checkpoint() > 0
        assert dcmread(path).PatientName == "SCP^TEST"
        assert ledger.instance_file(sop) == (
            f"{study}/{sop}.dcm",
            path.stat().st_size,
            ExplicitVRLittleEndian,
        )


def test_instances_wait_in_the_journal_until_its_checkpoint(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "dicom_host": "127.0.0.1", "dicom_port": free_port()},
        ingest={"fsync": True, "journal_checkpoint_s": 300, "journal_max_bytes": 2000},
    )
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir))
    scp.start(block=False)
    try:
        study = generate_uid()
        small = make_sc(study)
        large = make_sc(study)
        large.Rows = large.Columns = 64  # 4 KB of pixels: flushed in the spool, not journaled
        large.PixelData = bytes(64 * 64)
        assert send(settings, [small, large]) == [0, 0]
        assert scp.journal is not None
        journaled = read_journal(scp.journal.directory)
        assert [r.meta["sop_instance_uid"] for r in journaled] == [
            small.SOPInstanceUID,
            large.SOPInstanceUID,
        ]
        kept, spooled = journaled
        small_file = settings.spool_dir / study / f"{small.SOPInstanceUID}.dcm"
        assert not kept.spooled and kept.payload == small_file.read_bytes()
        assert kept.meta["path"] == f"{study}/{small.SOPInstanceUID}.dcm"
        # The large one's bytes are only in its spool file; the journal holds their CRC.
        large_file = settings.spool_dir / study / f"{large.SOPInstanceUID}.dcm"
        assert spooled.spooled and spooled.payload == b""
        assert spooled.matches(large_file.read_bytes())
        assert not spooled.matches(large_file.read_bytes()[:-1])
        assert scp.journal.checkpoint() == 2
        assert read_journal(scp.journal.directory) == []
    finally:
        scp.stop()
        ledger.dispose()
    assert [p for p in (settings.spool_dir / ".journal").iterdir()] == []


def test_replay_writes_the_file_and_brings_the_row_up_to_date(
    node: tuple[Settings, Ledger, StorageSCP],
) -> None:
    """What a restart does with one journal record: the spool file written again, the ledger
    row added or brought up to the recorded version; a spooled record only if its file is
    the one recorded."""
    settings, ledger, scp = node
    study, sop = generate_uid(), generate_uid()
    payload = b"DICM-bytes-of-the-second-version"
    record = InstanceRecord(
        study_uid=study,
        sop_instance_uid=sop,
        sop_class_uid=SC,
        series_uid="",
        transfer_syntax_uid=str(ExplicitVRLittleEndian),
        modality="OT",
        body_part="",
        path=f"{study}/{sop}.dcm",
        size=len(payload),
        calling_ae="SENDER",
    )
    # The first version's row survived; the second's update was lost with the page cache.
    ledger.record_instance(replace(record, size=10), first_in_association=True)
    journaled = JournalRecord(KIND_INSTANCE, 1, time.time_ns(), asdict(record), payload)
    assert scp._replay(journaled) is True
    assert (settings.spool_dir / record.path).read_bytes() == payload
    assert ledger.instance_file(sop) == (record.path, len(payload), record.transfer_syntax_uid)
    assert scp._replay(journaled) is False  # nothing left to restore

    meta = {**asdict(record), SPOOLED_CRC: zlib.crc32(payload)}
    assert scp._replay(JournalRecord(KIND_SPOOLED, 2, time.time_ns(), meta, b"")) is False
    (settings.spool_dir / record.path).write_bytes(payload[:-1])  # cut by a crash
    assert scp._replay(JournalRecord(KIND_SPOOLED, 3, time.time_ns(), meta, b"")) is None


def test_a_journal_restored_from_a_backup_brings_back_nothing_settled_since(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data directory backup taken while the SCP ran holds its journal; restored, the next
    start replays it. Its instances were recorded long ago: one study has been delivered and
    purged by storage retention since, another's instance sent again (another version). The
    replay leaves them out, with one line that counts them: the purged study is not re-opened
    and gets no files back, and the later version stays."""
    import shutil

    from acwi_node.retention import DiskSpace, Retention
    from tests.support.study_flow import analyse, deliver
    from tests.unit.test_retention import later

    purged, other = generate_uid(prefix=None), generate_uid()  # room for an SR UID
    sop = generate_uid()
    backup = tmp_path / "backup-journal"
    with running_scp(
        tmp_path, allowed_calling_aes=["SENDER"], journal_checkpoint_s=300,
        journal_checkpoint_idle_s=300,
    ) as (settings, ledger, _):  # fmt: skip
        assert send(settings, [make_sc(purged), make_sc(purged), make_sc(other, sop)]) == [0] * 3
        shutil.copytree(settings.spool_dir / ".journal", backup)  # the backup
        assert send(settings, [make_sc(other, sop, patient="SCP^LATER")]) == [0]
        analyse(settings, ledger, purged)
        deliver(ledger)
        Retention(settings, ledger, space=lambda: DiskSpace(900, 1000), clock=later(200)).sweep()
        st = ledger.get_study(purged)
        assert st is not None and st["state"] == "delivered" and st["images_deleted_at"]
    assert not (settings.spool_dir / purged).exists()
    shutil.rmtree(settings.spool_dir / ".journal", ignore_errors=True)
    shutil.copytree(backup, settings.spool_dir / ".journal")  # the restore
    with (
        caplog.at_level(logging.INFO, logger="acwi_node.ingest"),
        running_scp(tmp_path, allowed_calling_aes=["SENDER"]) as (settings, ledger, _),
    ):
        st = ledger.get_study(purged)
        assert st is not None
        assert (st["state"], st["generation"]) == ("delivered", 1)
        assert st["images_deleted_at"]
        assert not (settings.spool_dir / purged).exists()
        path = settings.spool_dir / other / f"{sop}.dcm"
        assert dcmread(path).PatientName == "SCP^LATER"
        assert ledger.instance_file(sop) == (
            f"{other}/{sop}.dcm",
            path.stat().st_size,
            ExplicitVRLittleEndian,
        )
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.startswith("ingest journal: 3 instance(s) left out")
    assert purged not in caplog.text and sop not in caplog.text  # a count, no UIDs
    assert list((settings.spool_dir / ".journal").iterdir()) == []


def test_dcmtk_storescu_sends_a_directory(
    node: tuple[Settings, Ledger, StorageSCP], tmp_path: Path
) -> None:
    settings, ledger, _ = node
    study = generate_uid()
    folder = tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        make_sc(study).save_as(folder / f"{i}.dcm", enforce_file_format=True)
    done = storescu("127.0.0.1", settings.node.dicom_port, "ACWI", folder, calling_ae="STORESCU")
    assert done.returncode == 0, done.stderr
    st = ledger.get_study(study)
    assert st is not None and st["instances"] == 4 and st["calling_ae"] == "STORESCU"


@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_both_association_reactors_serve(tmp_path: Path, reactor: str) -> None:
    """The event-driven reactor is the default and in use; pynetdicom's own still works."""
    from acwi_node.ingest.reactor import EventDrivenRequestHandler

    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "dicom_host": "127.0.0.1", "dicom_port": free_port()},
        ingest={"fsync": False, "reactor": reactor},
    )
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        handler = scp._server.RequestHandlerClass
        assert (handler is EventDrivenRequestHandler) is (reactor == "event")
        study = generate_uid()
        assert send(settings, [make_sc(study) for _ in range(20)]) == [0] * 20
        record = ledger.get_study(study)
        assert record is not None and record["instances"] == 20
    finally:
        scp.stop()
        ledger.dispose()


@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_a_plain_connection_s_association_is_made_by_the_accepting_thread(
    tmp_path: Path, reactor: str
) -> None:
    """With the event-driven reactor no thread is started only to make each association and
    start the association's own: the accepting thread does (pynetdicom's polling reactor keeps
    its thread per connection; TLS connections, whose handshake needs a thread, are in
    test_dicom_tls)."""
    with running_scp(tmp_path, reactor=reactor) as (settings, _, scp):
        made_by: list[str] = []

        def connected(event: evt.Event) -> None:
            made_by.append(threading.current_thread().name)

        scp._server.bind(evt.EVT_CONN_OPEN, connected)
        assert send(settings, [make_sc(generate_uid())]) == [0]
        assert send(settings, [make_sc(generate_uid())]) == [0]
        if reactor == "event":
            assert made_by == ["acwi-scp-acceptor"] * 2
        else:
            assert len(made_by) == 2 and "acwi-scp-acceptor" not in made_by


def test_a_request_sent_again_is_accepted_from_memory_and_still_checked(
    node: tuple[Settings, Ledger, StorageSCP], tmp_path: Path
) -> None:
    """A modality's identical A-ASSOCIATE-RQs: the second and later are decoded, negotiated and
    answered from memory (acwi_node.ingest.negotiation); the calling AE title is still checked
    for each one."""
    from acwi_node.ingest import negotiation

    settings, ledger, scp = node
    study = generate_uid()
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.dcm")
        make_sc(study).save_as(files[-1], enforce_file_format=True)
    memos = (negotiation.REQUESTS, negotiation.NEGOTIATIONS, negotiation.ACCEPTS)

    def seen() -> list[tuple[int, int]]:
        return [(memo.hits, memo.misses) for memo in memos]

    before = seen()
    for path in files:  # one association each, as a modality sending images as it makes them
        done = storescu(
            "127.0.0.1", settings.node.dicom_port, "ACWI", [path], calling_ae="STORESCU"
        )
        assert done.returncode == 0, done.stderr
    after = seen()
    for (hits, misses), (hits_before, misses_before) in zip(after, before, strict=True):
        assert hits + misses - hits_before - misses_before == 3  # every step went through one
        assert hits - hits_before >= 2  # the first may have been seen by an earlier test
    st = ledger.get_study(study)
    assert st is not None and st["instances"] == 3

    scp.ae.require_calling_aet = ["SENDER"]  # STORESCU is no longer allowed
    refused = storescu(
        "127.0.0.1", settings.node.dicom_port, "ACWI", [files[0]], calling_ae="STORESCU"
    )
    assert refused.returncode != 0
    assert negotiation.REQUESTS.hits == after[0][0] + 1  # the same request, remembered: refused


@pytest.mark.parametrize("watched", [False, True], ids=["unwatched", "fsm-watched"])
def test_the_association_s_thread_answers_its_association_and_release_requests(
    node: tuple[Settings, Ledger, StorageSCP], monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """The A-ASSOCIATE-AC and the A-RELEASE-RP leave from the association's thread, which
    decided them, not from the DUL thread after a hand-over; where a handler watches the
    state machine, pynetdicom's own actions on the DUL thread send them. Either way the
    association serves."""
    settings, ledger, scp = node
    sent = record_answer_threads(monkeypatch)
    if watched:
        scp._server.bind(evt.EVT_FSM_TRANSITION, lambda event: None)
    study = generate_uid()
    assert send(settings, [make_sc(study), make_sc(study)]) == [0, 0]
    assert _until(lambda: len(sent) == 2)
    thread = "EventDrivenDUL" if watched else "EventDrivenAssociation"
    assert sent == [(0x02, thread), (0x06, thread)]
    record = ledger.get_study(study)
    assert record is not None and record["instances"] == 2


def _until(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def test_a_cpu_wakeup_latency_is_requested_while_associations_are_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ingest.cpu_wakeup_latency_us``: the request is made when the first association is
    accepted and withdrawn when the last one ends, not while the SCP waits for senders."""
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    monkeypatch.setattr(cpu_latency, "DEVICE", device)
    with running_scp(tmp_path, cpu_wakeup_latency_us=0) as (settings, _, scp):
        assert not scp.cpu_latency.held
        first = associate(settings)
        second = associate(settings)
        assert _until(lambda: scp.cpu_latency.held)
        assert device.read_bytes().endswith(struct.pack("=i", 0))
        first.release()
        assert _until(lambda: scp.open_associations == 1)
        assert scp.cpu_latency.held
        assert int(second.send_c_store(make_sc(generate_uid())).Status) == 0
        second.release()
        assert _until(lambda: not scp.cpu_latency.held)


def test_an_scp_that_may_not_request_a_cpu_wakeup_latency_serves_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu_latency, "DEVICE", tmp_path / "not-permitted")
    with running_scp(tmp_path, cpu_wakeup_latency_us=0) as (settings, ledger, scp):
        assert not scp.cpu_latency.usable
        assert "cannot request a CPU wake-up latency" in caplog.text
        study = generate_uid()
        assert send(settings, [make_sc(study)]) == [0]
        assert not scp.cpu_latency.held
        st = ledger.get_study(study)
        assert st is not None and st["instances"] == 1


@pytest.mark.parametrize(
    "ingest",
    [{}, {"journal_max_bytes": 0}, {"journal": False}],
    ids=["journaled", "spooled", "no-journal"],
)
def test_two_versions_sent_at_the_same_moment_leave_the_row_of_the_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ingest: dict[str, object]
) -> None:
    """Two associations send two versions of one instance at the same moment. The spool files
    land A then B, and the rows, written apart from the files (after the answer, in batches),
    B then A: the ledger must describe B, the file kept, not the row written last (its size
    and CRC-32 tell an instance sent again unchanged, and the journal's replay checks them)."""
    with running_scp(tmp_path, **ingest) as (settings, ledger, _):
        study, sop = generate_uid(), generate_uid()
        a, b = sized_sc(study, 8), sized_sc(study, 16)
        for ds in (a, b):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        path = settings.spool_dir / study / f"{sop}.dcm"
        rows: list[InstanceRecord] = []  # A's row, then B's, as the SCP asks to write them
        a_waits, b_recorded = threading.Event(), threading.Event()
        working = ledger.record_instances

        def rows_out_of_order(batch: list[tuple[InstanceRecord, bool]], **kwargs: Any) -> Any:
            mine = [r for r, _ in batch if r.sop_instance_uid == sop]
            rows.extend(mine)
            if mine and len(rows) == 1:  # A's row waits until B's is written
                a_waits.set()
                assert b_recorded.wait(10)
            recorded = working(batch, **kwargs)
            if mine and len(rows) == 2:
                b_recorded.set()
            return recorded

        monkeypatch.setattr(ledger, "record_instances", rows_out_of_order)
        statuses: list[int] = []
        second = associate(settings)  # open before A is sent
        sender = threading.Thread(target=lambda: statuses.extend(send(settings, [a])))
        sender.start()
        try:
            assert a_waits.wait(10)  # A's file is written and its row waits
            assert path.stat().st_size == rows[0].size
            assert int(second.send_c_store(b).Status) == 0
            second.release()
            assert b_recorded.wait(10)
        finally:
            b_recorded.set()
            sender.join(10)
        assert statuses == [0]
        a_row, b_row = rows
        assert a_row.size < b_row.size
        data = path.read_bytes()
        assert (len(data), zlib.crc32(data)) == (b_row.size, b_row.crc32)
        assert ledger.instance_file(sop) == (b_row.path, b_row.size, ExplicitVRLittleEndian)
        with ledger.session() as s:
            crc = s.scalars(select(Instance.crc32).where(Instance.sop_instance_uid == sop)).one()
        assert crc == b_row.crc32


@pytest.mark.parametrize(
    ("code", "term"),
    [
        (("816094009", "Chest"), "CHEST"),
        (("416775004", "Chest, Abdomen and Pelvis"), "CHESTABDPELVIS"),
    ],
    ids=["chest", "chest-abdomen-pelvis"],
)
@pytest.mark.parametrize("per_frame", [False, True], ids=["shared group", "per-frame groups"])
def test_an_enhanced_image_is_routed_by_the_body_part_of_its_frame_anatomy(
    node: tuple[Settings, Ledger, StorageSCP],
    tmp_path: Path,
    per_frame: bool,
    code: tuple[str, str],
    term: str,
) -> None:
    """An enhanced CT without Body Part Examined, its region (Chest, SNOMED CT 816094009; or
    Chest, Abdomen and Pelvis 416775004, a region of several words) in its Frame Anatomy
    functional groups only: a ``body_part = ["CHEST"]`` (``["CHESTABDPELVIS"]``) route takes
    it (PS3.16 Annex L's term of the code)."""
    settings, ledger, _ = node
    image = dcmread(write_enhanced_ct(tmp_path / "enhanced", slices=3, size=64))
    if "BodyPartExamined" in image:
        del image.BodyPartExamined
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = code[0], "SCT", code[1]
    anatomy = Dataset()
    anatomy.FrameLaterality = "U"
    anatomy.AnatomicRegionSequence = [region]
    groups = (
        image.PerFrameFunctionalGroupsSequence
        if per_frame
        else [image.SharedFunctionalGroupsSequence[0]]
    )
    if per_frame:  # the converted image names its anatomy in the shared group: that would win
        del image.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    for group in groups:
        group.FrameAnatomySequence = [anatomy]
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(image.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title=settings.node.ae_title)
    assert assoc.is_established
    assert int(assoc.send_c_store(image).Status) == 0
    assoc.release()
    study_id, _generation = due_study(ledger)
    facts = ledger.study_facts(study_id)
    assert facts.body_parts == {term}
    chest = Route(name="chest", match=RouteMatch(modality=["CT"], body_part=[term.lower()]))
    knee = Route(name="knee", match=RouteMatch(body_part=["KNEE"]))
    assert [job.route for job in decide_routes([knee, chest], facts)] == ["chest"]
