"""The bundled Orthanc configuration, its routing script and the test helpers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from acwi_node.export import send_files
from tests.support import write_secondary_capture
from tests.support.dciodvfy import dciodvfy_errors, require_dciodvfy
from tests.support.orthanc import (
    NODE_MODALITY,
    REPO_CONFIG,
    REPO_LUA,
    OrthancServer,
    derive_test_config,
    load_repo_config,
    require_orthanc,
)
from tests.support.ports import free_port, free_ports

NODE_AE = "ACWI"
ROUTED_LOG = "ACWI routing: study"
STORE_JOB = "DicomModalityStore"


# ------------------------------------------------------------ configuration


def test_repo_config_is_strict_json_with_production_values() -> None:
    text = REPO_CONFIG.read_text(encoding="utf-8")
    assert "//" not in text and "/*" not in text
    config = json.loads(text)
    assert config["DicomAet"] == "ORTHANC"
    assert config["DicomPort"] == 4242
    assert config["HttpPort"] == 8042
    assert config["DicomModalities"][NODE_MODALITY] == ["ACWI", "127.0.0.1", 11112]
    assert config["OverwriteInstances"] is True
    assert config["LuaScripts"] == ["route_to_node.lua"]
    assert (REPO_CONFIG.parent / "route_to_node.lua").is_file()
    assert config["DicomWeb"]["Enable"] is True
    assert any(p.endswith("libOrthancDicomWeb.so") for p in config["Plugins"])
    assert config["UserMetadata"]["AcwiForwarded"] >= 1024
    assert 1 <= config["StableAge"] <= 60
    assert config["RemoteAccessAllowed"] is False
    assert config["ExecuteLuaEnabled"] is False


def test_derived_config_only_overrides_test_settings(tmp_path: Path) -> None:
    base = load_repo_config()
    derived = derive_test_config(
        base,
        http_port=1111,
        dicom_port=2222,
        storage_dir=tmp_path / "s",
        temporary_dir=tmp_path / "t",
        node_ae="NODEX",
        node_host="127.0.0.1",
        node_port=3333,
        with_lua=True,
        stable_age=1,
    )
    overridable = {
        "HttpPort",
        "DicomPort",
        "StorageDirectory",
        "IndexDirectory",
        "TemporaryDirectory",
        "StableAge",
        "DicomModalities",
        "RemoteAccessAllowed",
        "OrthancPeers",
        "HttpProxy",
        "DicomWeb",
        "Plugins",
    }
    changed = {key for key in set(base) | set(derived) if base.get(key) != derived.get(key)}
    assert changed <= overridable
    assert derived["LuaScripts"] == base["LuaScripts"]
    assert derived["DicomModalities"][NODE_MODALITY] == ["NODEX", "127.0.0.1", 3333]
    assert derived["OverwriteInstances"] is True
    assert {k: v for k, v in derived["DicomWeb"].items() if k != "Servers"} == {
        k: v for k, v in base["DicomWeb"].items() if k != "Servers"
    }
    without_lua = derive_test_config(
        base,
        http_port=1,
        dicom_port=2,
        storage_dir=tmp_path,
        temporary_dir=tmp_path,
        node_ae="N",
        node_host="127.0.0.1",
        node_port=3,
        with_lua=False,
        stable_age=1,
    )
    assert without_lua["LuaScripts"] == []


def test_free_ports_are_distinct() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(1024 <= p <= 65535 for p in ports)
    assert 1024 <= free_port() <= 65535


# ------------------------------------------------------------------ dciodvfy


def test_dciodvfy_helper(tmp_path: Path) -> None:
    require_dciodvfy()
    good = write_secondary_capture(tmp_path / "good.dcm", study_uid=generate_uid())
    assert dciodvfy_errors(good) == []
    bad = tmp_path / "bad.dcm"
    ds = dcmread(good)
    del ds.ConversionType
    ds.save_as(bad, enforce_file_format=True)
    errors = dciodvfy_errors(bad)
    assert errors and all(line.startswith("Error") for line in errors)
    assert any("ConversionType" in line for line in errors)


# ------------------------------------------------------------ OrthancServer


def test_server_uses_repo_config_and_stops(tmp_path: Path) -> None:
    require_orthanc()
    node_port = free_port()
    server = OrthancServer(node_ae="NODEX", node_port=node_port, with_lua=True)
    with server:
        system = server.system()
        assert system["HttpPort"] == server.http_port
        assert system["DicomPort"] == server.dicom_port
        assert system["DicomAet"] == "ORTHANC" == server.aet
        assert system["Name"] == load_repo_config()["Name"]
        assert "dicom-web" in server.get_json("/plugins")
        assert server.client.get("/dicom-web/studies").status_code == 200
        modality = server.get_json(f"/modalities/{NODE_MODALITY}/configuration")
        assert (modality["AET"], modality["Host"], modality["Port"]) == (
            "NODEX",
            "127.0.0.1",
            node_port,
        )
        # The script is loaded through the relative path of the repo config.
        copied = server.config_dir / "route_to_node.lua"
        assert copied.read_bytes() == REPO_LUA.read_bytes()
        assert server.log_lines_matching("ACWI routing script loaded")

        path = write_secondary_capture(tmp_path / "sc.dcm", study_uid=generate_uid())
        uploaded = server.upload(path)
        assert uploaded["Status"] == "Success"
        assert server.instances() == [uploaded["ID"]]
        assert server.instance_tags(uploaded["ID"])["SOPInstanceUID"] == str(
            dcmread(path).SOPInstanceUID
        )
        assert server.instance_file(uploaded["ID"]) == path.read_bytes()
        process_log = server.log_path
        assert process_log.is_file()
    assert not server.running
    assert not server.workdir.exists()


def test_server_start_failure_shows_the_log() -> None:
    require_orthanc()
    server = OrthancServer(overrides={"StorageDirectory": "/proc/acwi-not-writable"})
    with pytest.raises(RuntimeError, match="exited with code") as failure:
        server.start()
    assert "acwi-not-writable" in str(failure.value)
    server.stop()
    assert not server.running


# ------------------------------------------------------------- Lua routing


@pytest.fixture
def routed_pair() -> Iterator[tuple[OrthancServer, OrthancServer]]:
    """``a`` runs the routing script; its "acwi" modality is Orthanc ``b``."""
    require_orthanc()
    with (
        OrthancServer(aet="NODEB") as b,
        OrthancServer(node_ae=b.aet, node_port=b.dicom_port, with_lua=True, stable_age=1) as a,
    ):
        yield a, b


def _store_jobs(orthanc: OrthancServer) -> list[dict[str, object]]:
    return orthanc.jobs(STORE_JOB)


def _routing_lines(orthanc: OrthancServer, study_id: str) -> list[str]:
    return [line for line in orthanc.log_lines_matching(ROUTED_LOG) if study_id in line]


def test_lua_forwards_stable_studies_but_not_node_results(
    routed_pair: tuple[OrthancServer, OrthancServer], tmp_path: Path
) -> None:
    a, b = routed_pair
    study_uid = generate_uid()
    series_uid = generate_uid()
    sources = [
        write_secondary_capture(
            tmp_path / f"src{i}.dcm",
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
        )
        for i in range(2)
    ]
    # A result marked by its Manufacturer, arriving without a DICOM calling AE.
    marked = write_secondary_capture(
        tmp_path / "marked.dcm", study_uid=study_uid, manufacturer="ACWI Node", series_number=9901
    )
    # A result identified only by the calling AE title of the node.
    sent_by_node = write_secondary_capture(
        tmp_path / "by_node.dcm", study_uid=study_uid, series_number=9902
    )
    source_uids = {str(dcmread(p).SOPInstanceUID) for p in sources}

    assert send_files(
        sources, called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MODALITY"
    ).all_delivered
    a.upload(marked)
    assert send_files(
        [sent_by_node], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae=b.aet
    ).all_delivered
    study_id = a.find_study(study_uid)
    assert study_id is not None

    b.wait_for(
        lambda: b.study_sop_instance_uids(study_uid) == source_uids,
        timeout_s=20,
        message="the source instances in the node",
    )
    a.wait_for(lambda: _routing_lines(a, study_id), timeout_s=10, message="routing log line")
    assert "forwarded 2 instance(s), skipped 2 node result(s)" in _routing_lines(a, study_id)[0]
    assert len(_store_jobs(a)) == 1
    for instance in a.study_instances(study_uid):
        metadata = a.instance_metadata(instance["ID"])
        is_source = instance["MainDicomTags"]["SOPInstanceUID"] in source_uids
        assert ("AcwiForwarded" in metadata) == is_source

    # The node answers with a result in the same study: the study becomes
    # stable again, nothing is sent back and the sources are not re-sent.
    answer = write_secondary_capture(
        tmp_path / "answer.dcm", study_uid=study_uid, series_number=9901, manufacturer="ACWI Node"
    )
    assert send_files(
        [answer], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae=b.aet
    ).all_delivered
    a.wait_for(
        lambda: len(_routing_lines(a, study_id)) >= 2, timeout_s=15, message="second stable event"
    )
    assert (
        "nothing to forward (3 node result(s), 2 already forwarded)"
        in (_routing_lines(a, study_id)[1])
    )
    assert len(_store_jobs(a)) == 1
    assert b.study_sop_instance_uids(study_uid) == source_uids

    # A late source instance is forwarded on its own.
    late = write_secondary_capture(
        tmp_path / "late.dcm", study_uid=study_uid, series_uid=series_uid, instance_number=3
    )
    assert send_files(
        [late], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MODALITY"
    ).all_delivered
    expected = source_uids | {str(dcmread(late).SOPInstanceUID)}
    b.wait_for(
        lambda: b.study_sop_instance_uids(study_uid) == expected,
        timeout_s=20,
        message="the late instance in the node",
    )
    a.wait_for(lambda: len(_routing_lines(a, study_id)) >= 3, timeout_s=10, message="log line")
    assert "forwarded 1 instance(s)" in _routing_lines(a, study_id)[2]
    time.sleep(2.5)  # more than StableAge: no further routing may happen
    assert len(_routing_lines(a, study_id)) == 3
    assert len(_store_jobs(a)) == 2
    assert not a.log_lines_matching("Lua: Error")


def test_lua_leaves_instances_unmarked_when_the_node_is_down(tmp_path: Path) -> None:
    require_orthanc()
    with OrthancServer(node_ae=NODE_AE, node_port=free_port(), with_lua=True, stable_age=1) as a:
        study_uid = generate_uid()
        path = write_secondary_capture(tmp_path / "sc.dcm", study_uid=study_uid)
        assert send_files(
            [path], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MODALITY"
        ).all_delivered
        a.wait_for(
            lambda: a.log_lines_matching("FAILED"), timeout_s=30, message="the failed forward"
        )
        (instance,) = a.study_instances(study_uid)
        assert "AcwiForwarded" not in a.instance_metadata(instance["ID"])
        assert [job["State"] for job in _store_jobs(a)] == ["Failure"]


def test_lua_forwards_a_study_that_failed_once_the_node_is_back(tmp_path: Path) -> None:
    """A study that became stable while the node was down (restarted, upgraded) is not stable
    again by itself: it goes with the next study forwarded, once, and only its own instances."""
    require_orthanc()
    with (
        OrthancServer(aet="NODEB") as b,
        OrthancServer(node_ae=b.aet, node_port=b.dicom_port, with_lua=True, stable_age=1) as a,
    ):
        b.halt()
        missed_uid = generate_uid()
        missed = [
            write_secondary_capture(tmp_path / f"missed{i}.dcm", study_uid=missed_uid)
            for i in range(2)
        ]
        assert send_files(
            missed, called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MODALITY"
        ).all_delivered
        a.wait_for(
            lambda: a.log_lines_matching("FAILED"), timeout_s=30, message="the failed forward"
        )
        missed_id = a.find_study(missed_uid)
        assert missed_id is not None
        b.resume()

        next_uid = generate_uid()
        following = write_secondary_capture(tmp_path / "next.dcm", study_uid=next_uid)
        assert send_files(
            [following], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MODALITY"
        ).all_delivered
        missed_sops = {_sop_uid(p) for p in missed}
        b.wait_for(
            lambda: b.study_sop_instance_uids(missed_uid) == missed_sops,
            timeout_s=30,
            message="the missed study in the node",
        )
        assert b.study_sop_instance_uids(next_uid) == {_sop_uid(following)}
        for instance in a.study_instances(missed_uid):
            assert "AcwiForwarded" in a.instance_metadata(instance["ID"])
        a.wait_for(
            lambda: any("forwarded 2 instance(s)" in line for line in _routing_lines(a, missed_id)),
            timeout_s=10,
            message="the retry's log line",
        )
        # A third study: the missed one is not sent again.
        third = write_secondary_capture(tmp_path / "third.dcm", study_uid=generate_uid())
        assert send_files(
            [third], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MODALITY"
        ).all_delivered
        b.wait_for(
            lambda: b.find_study(str(dcmread(third).StudyInstanceUID)),
            timeout_s=30,
            message="the third study in the node",
        )
        forwards = [line for line in _routing_lines(a, missed_id) if "forwarded" in line]
        assert len(forwards) == 1, forwards
        states = sorted(str(job["State"]) for job in _store_jobs(a))
        assert states == ["Failure", "Success", "Success", "Success"]
        # Orthanc logs the failed store job; the script itself raised nothing.
        errors = a.log_lines_matching("Lua: Error")
        assert len(errors) == 2 and "RestApiPost() for URI: /modalities/acwi/store" in errors[1]


def test_lua_keeps_trying_no_study_while_the_node_stays_down(tmp_path: Path) -> None:
    """With the node still down, a new study's failed forward does not retry the others one
    after the other (each would wait for its own failure): one attempt per stable study."""
    require_orthanc()
    with OrthancServer(node_ae=NODE_AE, node_port=free_port(), with_lua=True, stable_age=1) as a:
        for i in range(2):
            path = write_secondary_capture(tmp_path / f"sc{i}.dcm", study_uid=generate_uid())
            assert send_files(
                [path], called_ae=a.aet, host="127.0.0.1", port=a.dicom_port, calling_ae="MOD"
            ).all_delivered

            def failed(n: int = i + 1) -> bool:
                return len(a.log_lines_matching("FAILED")) >= n

            a.wait_for(failed, timeout_s=30, message="the failed forward")
        assert [job["State"] for job in _store_jobs(a)] == ["Failure", "Failure"]
        for study in a.studies():
            for instance in a.get_json(f"/studies/{study}/instances"):
                assert "AcwiForwarded" not in a.instance_metadata(instance["ID"])


# ------------------------------------------------------- IOCM rejection notes

REJECTION_LOG = "ACWI rejection:"
NODE_MANUFACTURER = "ACWI Node"
OTHER_MANUFACTURER = "Test Modality"


def _comprehensive_sr(path: Path, evidence: Dataset, *, manufacturer: str) -> Path:
    """A small Comprehensive SR in ``evidence``'s study (a result that is not an image)."""
    root = hd.sr.ContainerContentItem(name=codes.DCM.Finding, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=codes.DCM.Finding, value="test", relationship_type="CONTAINS")]
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=9903,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
    )
    sr.save_as(path, enforce_file_format=True)
    return path


def _key_object_note(
    path: Path,
    referenced: list[Path],
    *,
    title: Code = codes.DCM.RejectedForQualityReasons,
    manufacturer: str = NODE_MANUFACTURER,
) -> Path:
    """A Key Object Selection document listing ``referenced`` (one study) under ``title``:
    an IOCM rejection note for the CID 7011 titles, a key-image note for "Of Interest"."""
    datasets = [dcmread(p) for p in referenced]
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=datasets,
        content=hd.ko.KeyObjectSelection(document_title=title, referenced_objects=datasets),
        series_instance_uid=generate_uid(),
        series_number=9904,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
    )
    note.save_as(path, enforce_file_format=True)
    return path


def _add_evidence_reference(note_path: Path, referenced: Path) -> None:
    """List ``referenced`` in the note's evidence only (as a note of a careless sender might)."""
    note = dcmread(note_path)
    ref = dcmread(referenced)
    sop = Dataset()
    sop.ReferencedSOPClassUID = ref.SOPClassUID
    sop.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    note.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence.append(series)
    note.save_as(note_path, enforce_file_format=True)


def _send(orthanc: OrthancServer, paths: list[Path], calling_ae: str) -> None:
    report = send_files(
        paths,
        called_ae=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        calling_ae=calling_ae,
    )
    assert report.all_delivered, report


def _sop_uid(path: Path) -> str:
    return str(dcmread(path).SOPInstanceUID)


def _orthanc_id(orthanc: OrthancServer, study_uid: str, sop_uid: str) -> str:
    (item,) = [
        i
        for i in orthanc.study_instances(study_uid)
        if i["MainDicomTags"]["SOPInstanceUID"] == sop_uid
    ]
    return str(item["ID"])


def _rejection_lines(orthanc: OrthancServer, note_id: str) -> list[str]:
    return [line for line in orthanc.log_lines_matching(REJECTION_LOG) if note_id in line]


def _wait_for_note(orthanc: OrthancServer, note_id: str, count: int = 1) -> list[str]:
    """Wait until the script has handled the note ``count`` times; return its log lines."""

    def handled() -> list[str]:
        lines = _rejection_lines(orthanc, note_id)
        return lines if len(lines) >= count else []

    return orthanc.wait_for(
        handled, timeout_s=20, message=f"{count} line(s) of the script on key object {note_id}"
    )


def _lua_errors(orthanc: OrthancServer) -> list[str]:
    return [
        line
        for line in orthanc.log_text().splitlines()
        if "Lua: Error" in line or ("LuaScripting" in line and line.startswith("E"))
    ]


@pytest.fixture
def iocm_study(
    routed_pair: tuple[OrthancServer, OrthancServer], tmp_path: Path
) -> tuple[OrthancServer, OrthancServer, str, Path, Path, Path]:
    """In Orthanc ``a``: a source image of a modality, and two results of the node in its
    study (a secondary capture sent by the node, a Comprehensive SR uploaded by REST)."""
    a, b = routed_pair
    study_uid = generate_uid()
    source = write_secondary_capture(tmp_path / "source.dcm", study_uid=study_uid)
    heatmap = write_secondary_capture(
        tmp_path / "heatmap.dcm",
        study_uid=study_uid,
        manufacturer=NODE_MANUFACTURER,
        series_number=9901,
    )
    report = _comprehensive_sr(tmp_path / "sr.dcm", dcmread(source), manufacturer=NODE_MANUFACTURER)
    _send(a, [source], "MODALITY")
    _send(a, [heatmap], b.aet)
    a.upload(report)
    assert a.study_sop_instance_uids(study_uid) == {_sop_uid(p) for p in (source, heatmap, report)}
    return a, b, study_uid, source, heatmap, report


def test_lua_rejection_note_deletes_only_the_node_results(
    iocm_study: tuple[OrthancServer, OrthancServer, str, Path, Path, Path], tmp_path: Path
) -> None:
    a, b, study_uid, source, heatmap, report = iocm_study
    # A result of the node with the same Study Instance UID but another patient.
    other_patient = write_secondary_capture(
        tmp_path / "other.dcm",
        study_uid=study_uid,
        manufacturer=NODE_MANUFACTURER,
        series_number=9901,
        patient_id="TEST-0002",
    )
    a.upload(other_patient)
    # Mixed series, where the series' Manufacturer (its first instance's) and the instance's
    # own differ: another manufacturer's image in a series of the node, and an object that
    # says "ACWI Node" in the modality's series (sent by the node, so never routed).
    foreign_in_result_series = write_secondary_capture(
        tmp_path / "foreign_in_result_series.dcm",
        study_uid=study_uid,
        series_uid=str(dcmread(heatmap).SeriesInstanceUID),
        instance_number=2,
    )
    a.upload(foreign_in_result_series)
    marked_in_source_series = write_secondary_capture(
        tmp_path / "marked_in_source_series.dcm",
        study_uid=study_uid,
        series_uid=str(dcmread(source).SeriesInstanceUID),
        manufacturer=NODE_MANUFACTURER,
        instance_number=2,
    )
    _send(a, [marked_in_source_series], b.aet)
    note = _key_object_note(tmp_path / "note.dcm", [heatmap, report, source])
    for extra in (other_patient, foreign_in_result_series, marked_in_source_series):
        _add_evidence_reference(note, extra)
    # Relayed, not sent by the node's AE title: only its Manufacturer keeps it from being routed.
    _send(a, [note], "RELAY")
    note_id = _orthanc_id(a, study_uid, _sop_uid(note))

    (line,) = _wait_for_note(a, note_id)
    assert "(113001): deleted 2 node result(s)" in line
    assert "kept 3 of another manufacturer, 1 of another patient" in line
    assert "0 already gone, 0 malformed reference(s), 0 failed" in line
    # The Study Instance UID query also finds the other patient's result, which stays.
    kept = {
        _sop_uid(p)
        for p in (source, note, other_patient, foreign_in_result_series, marked_in_source_series)
    }
    a.wait_for(
        lambda: a.study_sop_instance_uids(study_uid) == kept,
        timeout_s=10,
        message="only the node's two results gone from the study",
    )

    # Routing: the note, a result of the node, is never forwarded; the source is.
    study_id = str(a.get_json(f"/instances/{note_id}/study")["ID"])

    def routed_after_the_note() -> bool:
        lines = a.log_text().splitlines()
        note_at = next(i for i, text in enumerate(lines) if REJECTION_LOG in text)
        return any(ROUTED_LOG in text and study_id in text for text in lines[note_at:])

    a.wait_for(routed_after_the_note, timeout_s=20, message="a stable event after the note")
    routed = b.study_sop_instance_uids(study_uid)
    assert _sop_uid(note) not in routed
    assert routed == {_sop_uid(source)}
    assert _lua_errors(a) == []


def test_lua_key_image_note_deletes_nothing(
    iocm_study: tuple[OrthancServer, OrthancServer, str, Path, Path, Path], tmp_path: Path
) -> None:
    a, b, study_uid, source, heatmap, report = iocm_study
    note = _key_object_note(
        tmp_path / "key_images.dcm", [heatmap, report, source], title=codes.DCM.OfInterest
    )
    _send(a, [note], b.aet)
    note_id = _orthanc_id(a, study_uid, _sop_uid(note))

    (line,) = _wait_for_note(a, note_id)
    assert "is not a rejection note (title); nothing deleted" in line
    assert a.study_sop_instance_uids(study_uid) == {
        _sop_uid(p) for p in (source, heatmap, report, note)
    }
    assert _lua_errors(a) == []


def test_lua_rejection_note_of_another_manufacturer_deletes_nothing(
    iocm_study: tuple[OrthancServer, OrthancServer, str, Path, Path, Path], tmp_path: Path
) -> None:
    a, _b, study_uid, source, heatmap, report = iocm_study
    note = _key_object_note(
        tmp_path / "foreign.dcm", [heatmap, report, source], manufacturer=OTHER_MANUFACTURER
    )
    _send(a, [note], "MODALITY")
    note_id = _orthanc_id(a, study_uid, _sop_uid(note))

    (line,) = _wait_for_note(a, note_id)
    assert "is not from the node (Manufacturer); nothing deleted" in line
    assert a.study_sop_instance_uids(study_uid) == {
        _sop_uid(p) for p in (source, heatmap, report, note)
    }
    assert _lua_errors(a) == []


def test_lua_rejection_note_sent_twice_is_harmless(
    iocm_study: tuple[OrthancServer, OrthancServer, str, Path, Path, Path], tmp_path: Path
) -> None:
    a, b, study_uid, source, heatmap, report = iocm_study
    note = _key_object_note(
        tmp_path / "twice.dcm", [heatmap, report], title=codes.DCM.RejectedForPatientSafetyReasons
    )
    _send(a, [note], b.aet)
    note_id = _orthanc_id(a, study_uid, _sop_uid(note))
    (first,) = _wait_for_note(a, note_id)
    assert "(113037): deleted 2 node result(s)" in first

    _send(a, [note], b.aet)  # stored again (OverwriteInstances): handled again
    a.upload(note)
    lines = _wait_for_note(a, note_id, count=3)
    for again in lines[1:]:
        assert "(113037): deleted 0 node result(s)" in again
        assert "2 already gone, 0 malformed reference(s), 0 failed" in again
    assert a.running
    assert a.system()["DicomAet"] == a.aet
    assert a.study_sop_instance_uids(study_uid) == {_sop_uid(source), _sop_uid(note)}
    assert _lua_errors(a) == []
