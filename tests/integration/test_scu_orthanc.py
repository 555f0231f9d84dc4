"""The exporter's C-STORE SCU and the DCMTK helpers against a real Orthanc."""

from __future__ import annotations

import io
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import AssociationSocket

from acwi_node.cli import main as cli_main
from acwi_node.export import FileOutcome, SendReport, echo, scu, send_files
from acwi_node.export.scu import MAX_PRESENTATION_CONTEXTS, _FileInfo, _plan_contexts
from acwi_node.ingest.reactor import EventDrivenDUL
from tests.integration.test_scp import running_scp
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE, write_secondary_capture
from tests.support.dcmtk import echoscu, find_dcmtk_tool, require_dcmtk_tool, storescu
from tests.support.node import write_config
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port
from tests.support.scripted_scp import ScriptedScp, abort_before_answering

NODE_AE = "ACWI"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    require_orthanc()
    with OrthancServer(node_ae=NODE_AE, node_port=free_port()) as server:
        yield server


def _send(orthanc: OrthancServer, paths: list[Path], **kwargs: object) -> SendReport:
    return send_files(
        paths,
        called_ae=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        calling_ae=NODE_AE,
        timeout_s=20.0,
        **kwargs,  # type: ignore[arg-type]
    )


def _pixels_of(blob: bytes) -> bytes:
    return bytes(dcmread(io.BytesIO(blob)).PixelData)


def _retype(path: Path, sop_class: UID) -> Path:
    """Rewrite a Secondary Capture file under another storage SOP Class."""
    ds = dcmread(path)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    if sop_class == DX_FOR_PRESENTATION:
        ds.Modality = "DX"
    elif sop_class == CR_IMAGE_STORAGE:
        ds.Modality = "CR"
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_text_sr(path: Path, study_uid: str) -> Path:
    ds = dcmread(write_secondary_capture(path, study_uid=study_uid))
    for keyword in (
        "PixelData",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "ConversionType",
        "PatientOrientation",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "11528-7"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Radiology Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------- send_files


def test_send_files_delivers_every_file(orthanc: OrthancServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    paths = [
        write_secondary_capture(
            tmp_path / f"sc{i}.dcm",
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
            pixel_value=10 * i,
        )
        for i in range(3)
    ]
    report = _send(orthanc, paths)

    assert report.association_ok, report.error
    assert report.error is None
    assert list(report.outcomes) == paths
    for outcome in report.outcomes.values():
        assert outcome == FileOutcome(status=0x0000, delivered=True, detail="stored")
    assert report.all_delivered and report.delivered_count == 3

    expected = {str(dcmread(p).SOPInstanceUID): bytes(dcmread(p).PixelData) for p in paths}
    instances = orthanc.study_instances(study_uid)
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == set(expected)
    for instance in instances:
        stored = _pixels_of(orthanc.instance_file(instance["ID"]))
        assert stored == expected[instance["MainDicomTags"]["SOPInstanceUID"]]
        assert orthanc.instance_metadata(instance["ID"])["RemoteAET"] == NODE_AE


def test_send_files_over_several_associations(orthanc: OrthancServer, tmp_path: Path) -> None:
    """Files taken in turn by three associations at once: every one stored, once, and the
    outcomes in the order given. (Enough of them that the first association is still
    sending when the others are established.)"""
    study_uid = generate_uid()
    paths = [
        write_secondary_capture(
            tmp_path / f"sc{i}.dcm",
            study_uid=study_uid,
            instance_number=i + 1,
            pixel_value=i,
            rows=256,
            columns=256,
        )
        for i in range(40)
    ]
    report = _send(orthanc, paths, associations=3)

    assert report.error is None
    assert report.associations == 3
    assert list(report.outcomes) == paths
    assert report.all_delivered and report.delivered_count == 40
    expected = {str(dcmread(p).SOPInstanceUID) for p in paths}
    instances = orthanc.study_instances(study_uid)
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances) == sorted(expected)


def test_extra_associations_refused_send_over_the_first(tmp_path: Path) -> None:
    """A destination that takes one association at a time (here the node's own SCP with
    ``ingest.max_associations = 1``) refuses the extra ones: every file goes over the first,
    and the refusals are not an error of the delivery."""
    study_uid = generate_uid()
    paths = [
        write_secondary_capture(tmp_path / f"sc{i}.dcm", study_uid=study_uid, instance_number=i + 1)
        for i in range(4)
    ]
    with running_scp(tmp_path / "node", max_associations=1) as (settings, ledger, _):
        report = send_files(
            paths,
            called_ae="ACWI",
            host="127.0.0.1",
            port=settings.node.dicom_port,
            calling_ae=NODE_AE,
            timeout_s=20.0,
            associations=4,
        )
        assert report.error is None
        assert report.associations == 1
        assert report.all_delivered and report.delivered_count == 4
        study = ledger.get_study(study_uid)
        assert study is not None and study["instances"] == 4


def test_send_files_to_closed_port_reports_refusal(tmp_path: Path) -> None:
    path = write_secondary_capture(tmp_path / "sc.dcm", study_uid=generate_uid())
    started = time.monotonic()
    report = send_files(
        [path], called_ae="NOBODY", host="127.0.0.1", port=free_port(), calling_ae=NODE_AE
    )
    assert time.monotonic() - started < 10
    assert report.association_ok is False
    assert report.error is not None and "refused" in report.error
    assert report.outcomes[path].status is None
    assert report.outcomes[path].delivered is False
    assert "refused" in report.outcomes[path].detail


def test_echo(orthanc: OrthancServer) -> None:
    assert echo(orthanc.aet, "127.0.0.1", orthanc.dicom_port, NODE_AE, 10.0) is True
    assert echo("NOBODY", "127.0.0.1", free_port(), NODE_AE, 5.0) is False


def test_unreadable_file_is_an_outcome(orthanc: OrthancServer, tmp_path: Path) -> None:
    good = write_secondary_capture(tmp_path / "good.dcm", study_uid=generate_uid())
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"this is not DICOM at all")
    missing = tmp_path / "missing.dcm"
    report = _send(orthanc, [bad, good, missing])

    assert report.association_ok
    assert report.outcomes[good].delivered and report.outcomes[good].status == 0
    for path in (bad, missing):
        outcome = report.outcomes[path]
        assert outcome.status is None and outcome.delivered is False
        assert outcome.detail.startswith("cannot read file")
    assert list(report.outcomes) == [bad, good, missing]


def test_resend_same_sop_instance_uid_replaces(orthanc: OrthancServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    sop_uid = generate_uid()
    first, second = (
        write_secondary_capture(
            tmp_path / f"v{value}.dcm",
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            pixel_value=value,
        )
        for value in (1, 99)
    )
    assert _send(orthanc, [first]).all_delivered
    assert _send(orthanc, [second]).all_delivered

    instances = orthanc.study_instances(study_uid)
    assert len(instances) == 1, instances
    stored = _pixels_of(orthanc.instance_file(instances[0]["ID"]))
    assert stored == bytes(dcmread(second).PixelData)
    assert stored != bytes(dcmread(first).PixelData)


def test_overwrite_needs_the_same_series(orthanc: OrthancServer, tmp_path: Path) -> None:
    """Orthanc keys an instance on Patient ID + Study/Series/SOP Instance UIDs.

    A re-run result replaces the previous one only when it keeps the series
    (and patient and study) of the first version; with a new Series Instance
    UID both versions are kept.
    """
    study_uid = generate_uid()
    sop_uid = generate_uid()
    paths = [
        write_secondary_capture(
            tmp_path / f"s{value}.dcm",
            study_uid=study_uid,
            series_uid=generate_uid(),
            sop_instance_uid=sop_uid,
            pixel_value=value,
        )
        for value in (1, 2)
    ]
    assert _send(orthanc, paths).all_delivered
    assert len(orthanc.study_instances(study_uid)) == 2


def test_contexts_follow_the_files(orthanc: OrthancServer, tmp_path: Path) -> None:
    """Implicit VR files and several SOP Classes go through one association."""
    study_uid = generate_uid()
    sc = write_secondary_capture(tmp_path / "sc.dcm", study_uid=study_uid)
    implicit = write_secondary_capture(tmp_path / "implicit.dcm", study_uid=study_uid)
    ds = dcmread(implicit)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(implicit, enforce_file_format=True)
    dx = _retype(
        write_secondary_capture(tmp_path / "dx.dcm", study_uid=study_uid), DX_FOR_PRESENTATION
    )
    sr = _write_text_sr(tmp_path / "sr.dcm", study_uid)

    report = _send(orthanc, [sc, implicit, dx, sr])
    assert report.all_delivered, report
    stored_classes = {
        orthanc.instance_tags(i["ID"])["SOPClassUID"] for i in orthanc.study_instances(study_uid)
    }
    assert stored_classes == {SECONDARY_CAPTURE_IMAGE_STORAGE, DX_FOR_PRESENTATION, BASIC_TEXT_SR}


def test_compressed_file_keeps_its_transfer_syntax(orthanc: OrthancServer, tmp_path: Path) -> None:
    """A JPEG file is proposed in its own context and stored without transcoding."""
    image = pytest.importorskip("PIL.Image")
    study_uid = generate_uid()
    path = write_secondary_capture(tmp_path / "jpeg.dcm", study_uid=study_uid)
    ds = dcmread(path)
    buffer = io.BytesIO()
    image.frombytes("L", (ds.Columns, ds.Rows), bytes(ds.PixelData)).save(buffer, format="JPEG")
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    plain = write_secondary_capture(tmp_path / "plain.dcm", study_uid=study_uid)

    report = _send(orthanc, [path, plain])
    assert report.all_delivered, report
    syntaxes = {
        orthanc.instance_metadata(i["ID"])["TransferSyntax"]
        for i in orthanc.study_instances(study_uid)
    }
    assert syntaxes == {JPEGBaseline8Bit, ExplicitVRLittleEndian}


def test_context_plan_is_capped() -> None:
    infos = {
        Path(f"/x/{i}.dcm"): _FileInfo(
            UID(f"1.2.826.0.1.3680043.10.999.{i}"), ExplicitVRLittleEndian
        )
        for i in range(MAX_PRESENTATION_CONTEXTS + 5)
    }
    contexts, covered = _plan_contexts(infos)
    assert len(contexts) == MAX_PRESENTATION_CONTEXTS
    assert len({cx.abstract_syntax for cx in contexts}) == MAX_PRESENTATION_CONTEXTS
    assert len({sop for sop, _ in covered}) == MAX_PRESENTATION_CONTEXTS


# ---------------------------------------------------------- scripted peers


def _three_files(tmp_path: Path) -> list[Path]:
    study_uid = generate_uid()
    return [
        write_secondary_capture(tmp_path / f"f{i}.dcm", study_uid=study_uid, instance_number=i + 1)
        for i in range(3)
    ]


def _recorder(received: list[tuple[UID, bytes]]) -> Callable[[int, Dataset, evt.Event], int]:
    """An answer that keeps the transfer syntax and the bytes of each data set received."""

    def answer(_index: int, _ds: Dataset, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        assert request.DataSet is not None
        received.append((UID(str(event.context.transfer_syntax)), request.DataSet.getvalue()))
        return 0

    return answer


def test_a_file_in_an_accepted_syntax_is_sent_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = _three_files(tmp_path)[:1]

    def no_decoding(*_args: object, **_kwargs: object) -> Dataset:
        raise AssertionError("the file should be sent without decoding it")

    monkeypatch.setattr(scu, "dcmread", no_decoding)
    received: list[tuple[UID, bytes]] = []
    with ScriptedScp(_recorder(received)) as scp:
        report = send_files(
            [path], called_ae="SCRIPTED", host="127.0.0.1", port=scp.port, calling_ae=NODE_AE
        )
    assert report.outcomes[path].delivered
    ((syntax, data),) = received
    assert syntax == ExplicitVRLittleEndian
    assert path.read_bytes().endswith(data)  # the file's data set, byte for byte


def test_a_file_in_a_syntax_the_peer_refuses_is_converted(tmp_path: Path) -> None:
    (path,) = _three_files(tmp_path)[:1]
    assert dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    received: list[tuple[UID, bytes]] = []
    with ScriptedScp(_recorder(received), syntaxes=(ImplicitVRLittleEndian,)) as scp:
        report = send_files(
            [path], called_ae="SCRIPTED", host="127.0.0.1", port=scp.port, calling_ae=NODE_AE
        )
    assert report.outcomes[path].delivered
    ((syntax, data),) = received
    assert syntax == ImplicitVRLittleEndian
    original = dcmread(path)
    converted = read_dataset(io.BytesIO(data), is_implicit_VR=True, is_little_endian=True)
    assert converted.SOPInstanceUID == original.SOPInstanceUID
    assert converted.PixelData == original.PixelData


def test_requested_associations_are_event_driven_and_send_at_once() -> None:
    """The node's requestor DUL waits in select, not in 1 ms sleeps, and its socket sends each
    PDU at once (no Nagle delay)."""
    with ScriptedScp(lambda *_: 0) as scp:
        ae = scu._make_ae(NODE_AE, 5.0, 0)
        ae.add_requested_context(SECONDARY_CAPTURE_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SCRIPTED")
        try:
            assert assoc.is_established
            assert isinstance(assoc.dul, EventDrivenDUL)
            raw = cast(AssociationSocket, assoc.dul.socket).socket
            assert raw is not None
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            assoc.release()
    assert assoc.is_released


def test_warning_statuses_count_as_delivered(tmp_path: Path) -> None:
    statuses = {1: 0xB000, 2: 0xB007, 3: 0xA700}
    paths = _three_files(tmp_path)
    with ScriptedScp(lambda index, _ds, _event: statuses[index]) as scp:
        report = send_files(
            paths, called_ae="SCRIPTED", host="127.0.0.1", port=scp.port, calling_ae=NODE_AE
        )
    assert report.association_ok and report.error is None
    first, second, third = (report.outcomes[p] for p in paths)
    assert (first.status, first.delivered) == (0xB000, True)
    assert "warning 0xB000" in first.detail
    assert (second.status, second.delivered) == (0xB007, True)
    assert (third.status, third.delivered) == (0xA700, False)
    assert "0xA700" in third.detail


def _abort_second_store(index: int, _ds: Dataset, event: evt.Event) -> int:
    """An answer that aborts the association of the second C-STORE before answering it."""
    if index == 2:
        abort_before_answering(event)
    return 0x0000


def _send_to_scripted(scp: ScriptedScp, paths: list[Path], associations: int = 1) -> SendReport:
    return send_files(
        paths,
        called_ae="SCRIPTED",
        host="127.0.0.1",
        port=scp.port,
        calling_ae=NODE_AE,
        timeout_s=10,
        associations=associations,
    )


def test_the_files_left_by_a_lost_association_go_over_a_new_one(tmp_path: Path) -> None:
    """The peer aborts the association on the second C-STORE (a PACS restarting, a firewall
    cutting the connection) and is there again at once: the third file goes over a new
    association; the second, never answered, is not sent again (it may be what the peer
    aborts on) and is no outage."""
    paths = _three_files(tmp_path)
    with ScriptedScp(_abort_second_store) as scp:
        report = _send_to_scripted(scp, paths)
    assert report.association_ok and not report.unreachable
    assert report.error is not None and "abort" in report.error
    first, second, third = (report.outcomes[p] for p in paths)
    assert (first.status, first.delivered) == (0x0000, True)
    assert (second.status, second.delivered, second.unreachable) == (None, False, False)
    assert (third.status, third.delivered) == (0x0000, True)
    assert scp.calls == 3 and scp.associations == 2 and report.associations == 2


def test_a_destination_that_goes_away_mid_way_leaves_an_outage(tmp_path: Path) -> None:
    """The peer stops listening and aborts on the second C-STORE: the new association cannot
    reach it, so the file left and the one never answered are unreachable (an outage: the
    exporter waits it out without counting attempts); the first was stored."""
    paths = _three_files(tmp_path)
    scps: list[ScriptedScp] = []

    def answer(index: int, _ds: Dataset, event: evt.Event) -> int:
        if index == 2:
            scps[0].go_away(event)
        return 0x0000

    with ScriptedScp(answer) as scp:
        scps.append(scp)
        report = _send_to_scripted(scp, paths)
    assert not report.unreachable  # some of it was answered
    first, second, third = (report.outcomes[p] for p in paths)
    assert (first.delivered, first.unreachable) == (True, False)
    assert (second.status, second.delivered, second.unreachable) == (None, False, True)
    assert (third.status, third.delivered, third.unreachable) == (None, False, True)
    assert "a new association" in third.detail and "a new association" in second.detail
    assert scp.calls == 2


def test_a_peer_that_aborts_every_association_is_not_asked_for_ever(tmp_path: Path) -> None:
    """Every association is aborted at its first C-STORE: after the first, at most
    ``RECONNECTS`` new ones that deliver nothing; the files never offered are not sent, and
    none of it is an outage (the peer answers associations)."""
    study_uid = generate_uid()
    paths = [
        write_secondary_capture(tmp_path / f"f{i}.dcm", study_uid=study_uid, instance_number=i + 1)
        for i in range(6)
    ]

    def answer(_index: int, _ds: Dataset, event: evt.Event) -> int:
        abort_before_answering(event)
        return 0x0000

    with ScriptedScp(answer) as scp:
        report = _send_to_scripted(scp, paths)
    assert scp.associations == 1 + scu.RECONNECTS == scp.calls
    outcomes = [report.outcomes[p] for p in paths]
    assert not any(o.delivered or o.unreachable for o in outcomes)
    assert all(o.detail.startswith("not sent") for o in outcomes[scp.calls :])


def test_a_lost_association_leaves_its_remaining_files_to_the_other(tmp_path: Path) -> None:
    """Two associations; the peer aborts the one that receives the second C-STORE: that file
    is not delivered (no answer), every other one goes over the association left."""
    study_uid = generate_uid()
    paths = [
        write_secondary_capture(tmp_path / f"f{i}.dcm", study_uid=study_uid, instance_number=i + 1)
        for i in range(6)
    ]
    with ScriptedScp(_abort_second_store) as scp:
        report = _send_to_scripted(scp, paths, associations=2)
    assert report.associations == 2
    assert report.error is not None and "abort" in report.error
    lost = [p for p in paths if not report.outcomes[p].delivered]
    assert len(lost) == 1 and report.outcomes[lost[0]].status is None
    assert report.delivered_count == 5


def test_rejected_association_is_explained(tmp_path: Path) -> None:
    path = write_secondary_capture(tmp_path / "sc.dcm", study_uid=generate_uid())
    with ScriptedScp(lambda *_: 0, require_called_aet=True) as scp:
        report = send_files(
            [path], called_ae="WRONG", host="127.0.0.1", port=scp.port, calling_ae=NODE_AE
        )
    assert report.association_ok is False
    assert report.error is not None
    assert "rejected" in report.error
    assert "Called AE title not recognised" in report.error
    assert report.outcomes[path].delivered is False


# ---------------------------------------------------------------------- DCMTK


def test_dcmtk_tools_are_not_the_virtualenv_shadows() -> None:
    storescu_path = require_dcmtk_tool("storescu")
    echoscu_path = require_dcmtk_tool("echoscu")
    for tool in (storescu_path, echoscu_path):
        assert ".venv" not in tool.parts
        assert tool.resolve().parent != Path(sys.executable).parent.resolve()
    assert find_dcmtk_tool("storescu") == storescu_path


def test_dcmtk_echoscu(orthanc: OrthancServer) -> None:
    require_dcmtk_tool("echoscu")
    completed = echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert completed.returncode == 0, completed.stderr
    failed = echoscu("127.0.0.1", free_port(), "NOBODY", timeout_s=5)
    assert failed.returncode != 0


def test_dcmtk_storescu_directory_with_several_classes(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    require_dcmtk_tool("storescu")
    study_uid = generate_uid()
    root = tmp_path / "in"
    files = [
        write_secondary_capture(root / "sc.dcm", study_uid=study_uid),
        _retype(
            write_secondary_capture(root / "a" / "dx.dcm", study_uid=study_uid), DX_FOR_PRESENTATION
        ),
        _retype(
            write_secondary_capture(root / "a" / "b" / "cr.dcm", study_uid=study_uid),
            CR_IMAGE_STORAGE,
        ),
        _write_text_sr(root / "a" / "b" / "sr.dcm", study_uid),
    ]
    completed = storescu("127.0.0.1", orthanc.dicom_port, orthanc.aet, root, calling_ae="MODALITY")
    assert completed.returncode == 0, completed.stdout + completed.stderr

    expected = {str(dcmread(p).SOPInstanceUID) for p in files}
    assert orthanc.study_sop_instance_uids(study_uid) == expected
    instance = orthanc.study_instances(study_uid)[0]
    assert orthanc.instance_metadata(instance["ID"])["RemoteAET"] == "MODALITY"


def test_dcmtk_storescu_single_file(orthanc: OrthancServer, tmp_path: Path) -> None:
    require_dcmtk_tool("storescu")
    study_uid = generate_uid()
    path = write_secondary_capture(tmp_path / "one.dcm", study_uid=study_uid)
    completed = storescu("127.0.0.1", orthanc.dicom_port, orthanc.aet, [path])
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert orthanc.find_study(study_uid) is not None


def test_destinations_check_says_which_answer_and_why_the_others_do_not(
    orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``acwi-node destinations check``: Orthanc answers; a port with nobody listening, and a
    peer that does not know the called AE title, each fail with the reason."""
    strict = AE(ae_title="STRICT")
    strict.require_called_aet = True
    strict.add_supported_context(VERIFICATION_SOP_CLASS)
    strict_port = free_port()
    server = strict.start_server(("127.0.0.1", strict_port), block=False)
    assert server is not None
    config = write_config(
        tmp_path / "acwi.toml",
        {
            "node": {"ae_title": NODE_AE, "data_dir": str(tmp_path / "data")},
            "exporter": {"timeout_s": 5},
            "destinations": [
                {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                 "port": orthanc.dicom_port},
                {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
                {"name": "wrong-ae", "ae_title": "OTHER", "host": "127.0.0.1",
                 "port": strict_port},
            ],
        },
    )  # fmt: skip
    try:
        assert cli_main(["--config", str(config), "destinations", "check", "--json"]) == 1
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["pacs"]["ok"] is True and rows["pacs"]["elapsed_ms"] > 0
        assert rows["down"]["ok"] is False
        assert "connection refused" in rows["down"]["error"]
        assert rows["wrong-ae"]["ok"] is False
        assert "association rejected" in rows["wrong-ae"]["error"]
        assert "Called AE title not recognised" in rows["wrong-ae"]["error"]
        assert cli_main(["--config", str(config), "destinations", "check", "pacs"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"pacs  {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}  C-ECHO ok, ")
        assert cli_main(["--config", str(config), "destinations", "check", "nope"]) == 2
        assert "no destination named nope" in capsys.readouterr().err
        assert cli_main(["--config", str(config), "destinations", "check", "down", "down"]) == 1
        out, err = capsys.readouterr()
        assert out.startswith("down  DOWN@127.0.0.1:") and out.count("down  DOWN@") == 1
        assert "C-ECHO FAILED: connection refused" in out
        assert "pynetdicom" not in err  # the reason is printed once, not in its logs too
    finally:
        server.shutdown()
