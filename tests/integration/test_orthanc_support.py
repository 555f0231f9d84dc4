"""The bundled Orthanc configuration, its routing script and the test helpers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
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
