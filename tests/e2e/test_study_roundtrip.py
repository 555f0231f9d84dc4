"""End to end: a study sent by DCMTK storescu comes back to Orthanc as a TID 1500 SR and heatmaps.

Orthanc runs on loopback with the repository's configuration; the node runs as real processes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom import dcmread
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from acwi_node.results.sr import summarise_sr
from models.data.synth import write_ct_series, write_enhanced_ct, write_study
from tests.conftest import REDIS_URL
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.dcmtk import storescu
from tests.support.model_variant import model_variant
from tests.support.node import (
    NodeProcesses,
    add_api_user,
    http_json,
    wait_port,
    wait_study_state,
    write_config,
)
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
E2E_REDIS_DB = 11


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    node_port = free_port()
    with OrthancServer(node_ae="ACWI", node_port=node_port, with_lua=False) as server:
        yield server


def node_config(tmp_path: Path, orthanc: OrthancServer, **node: Any) -> dict[str, Any]:
    return {
        "node": {
            "ae_title": "ACWI",
            "dicom_host": "127.0.0.1",
            "dicom_port": orthanc.node_port,
            "http_port": free_port(),
            "data_dir": str(tmp_path / "data"),
            **node,
        },
        "ingest": {"fsync": True},
        "completion": {"quiet_period_s": 0.5, "max_wait_s": 60},
        "worker": {"mc_samples": 10, "torch_threads": 1},
        "exporter": {"backoff_initial_s": 0.5, "max_attempts": 5},
        "destinations": [
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        "routes": [
            {
                "name": "chest",
                "match": {"modality": ["CR", "DX"]},
                "model": "default",
                "destinations": ["pacs"],
            }
        ],
    }


def results_in_orthanc(
    orthanc: OrthancServer, study_uid: str, n_heatmaps: int, seen: list[str] | None = None
) -> list[dict[str, Any]]:
    """The study's SR and heatmaps once exactly one SR and ``n_heatmaps`` are in Orthanc.

    ``seen`` (when given) is overwritten with the SOP classes found, for the timeout message.
    """
    instances = orthanc.study_instances(study_uid) if orthanc.find_study(study_uid) else []
    classes = [_sop_class(orthanc, i) for i in instances]
    if seen is not None:
        seen[:] = classes
    results = [i for i, c in zip(instances, classes, strict=True) if c in (SR_CLASS, SC_CLASS)]
    if classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == n_heatmaps:
        return results
    return []


def _sop_class(orthanc: OrthancServer, instance: dict[str, Any]) -> str:
    return str(orthanc.instance_tags(instance["ID"]).get("SOPClassUID", ""))


def check_results(
    orthanc: OrthancServer,
    ledger: Ledger,
    study_uid: str,
    sources: list[Path],
    tmp_path: Path,
    *,
    heatmaps: int | None = None,
) -> dict[str, Any]:
    """The SR references every source image; its numbers equal the ledger's; dciodvfy is clean.
    ``heatmaps``: how many are expected (default one per source)."""
    source_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    expected = len(sources) if heatmaps is None else heatmaps
    seen: list[str] = []
    try:
        instances = orthanc.wait_for(
            lambda: results_in_orthanc(orthanc, study_uid, expected, seen),
            timeout_s=180,
            message="SR and heatmaps in Orthanc",
        )
    except AssertionError as exc:
        raise AssertionError(f"SOP classes in Orthanc: {seen}\n{exc}") from None
    study = ledger.get_study(study_uid)
    assert study is not None and study["state"] == "delivered", study
    job = [j for j in study["jobs"] if j["state"] == "delivered"][-1]
    summary = job["summary"]
    heatmap_sources: set[str] = set()
    for inst in instances:
        raw = orthanc.instance_file(inst["ID"])
        path = tmp_path / f"{inst['ID']}.dcm"
        path.write_bytes(raw)
        assert dciodvfy_errors(path) == [], f"dciodvfy errors in {path}"
        ds = dcmread(io.BytesIO(raw))
        assert ds.StudyInstanceUID == study_uid
        if ds.SOPClassUID == SR_CLASS:
            assert ds.VerificationFlag == "UNVERIFIED"
            sr = summarise_sr(ds)
            assert source_uids <= set(sr["referenced_sop_instance_uids"])
            assert sr["model_name"] == summary["model"]["name"]
            assert sr["model_version"] == summary["model"]["version"]
            for label, p in summary["probabilities"].items():
                if label in sr["probabilities"]:
                    assert sr["probabilities"][label] == pytest.approx(p, abs=1e-4)
            assert set(sr["probabilities"]) >= set(summary["labels"]) - {"normal"}
            assert ds.SOPInstanceUID == summary["sr_sop_instance_uid"]
        else:
            assert ds.Manufacturer == "ACWI Node"
            assert ds.PhotometricInterpretation == "RGB"
            heatmap_sources |= {str(r.ReferencedSOPInstanceUID) for r in ds.SourceImageSequence}
    assert heatmap_sources == source_uids
    return summary


def send_study(node_port: int, files: list[Path]) -> None:
    done = storescu("127.0.0.1", node_port, "ACWI", files, calling_ae="MODALITY1")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_separate_processes_redis_postgres(
    tmp_path: Path, orthanc: OrthancServer, postgres_url: str
) -> None:
    """Production layout: scp, worker (Celery on Redis), exporter; PostgreSQL ledger."""
    broker = f"{REDIS_URL}/{E2E_REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    cfg = node_config(tmp_path, orthanc, database_url=postgres_url, broker_url=broker)
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study", n_images=3, label="nodule", site=1, seed=7, study_instance_uid=study_uid
    )
    with NodeProcesses(config, ["scp", "worker", "exporter", "web"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(postgres_url)
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        summary = check_results(orthanc, ledger, study_uid, files, tmp_path)
        assert len(summary["images"]) == 3
        # The HTTP API and the status command show the same state.
        wait_port("127.0.0.1", cfg["node"]["http_port"])
        api_user = add_api_user(config)
        api = http_json(
            f"http://127.0.0.1:{cfg['node']['http_port']}/api/studies/{study_uid}", auth=api_user
        )
        assert api["state"] == "delivered"
        # The study's trace: from MODALITY1's instances to the objects Orthanc stored.
        trace = http_json(
            f"http://127.0.0.1:{cfg['node']['http_port']}/api/studies/{study_uid}/trace",
            auth=api_user,
        )
        told = {(e["kind"], e["level"]) for e in trace["events"]}
        assert {("received", "ok"), ("completed", "ok"), ("analysed", "ok")} <= told
        assert ("delivery", "ok") in told and not any(
            e["level"] == "failed" for e in trace["events"]
        )
        (received,) = [e["text"] for e in trace["events"] if e["kind"] == "received"]
        assert received.startswith("3 instance(s) in 1 series (DX) from MODALITY1")
        assert trace["study"]["completed_by"] in ("quiet_period", "release", "max_wait")
        assert trace["turnaround"][-1]["step"] == "last instance to results stored"
        assert trace["turnaround"][-1]["seconds"] is not None
        status = subprocess.run(
            [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "status"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert study_uid in status.stdout and "delivered" in status.stdout
        ledger.dispose()
    check_audit_trail(tmp_path / "data" / "audit" / "audit.jsonl", study_uid, files)


def check_audit_trail(path: Path, study_uid: str, files: list[Path]) -> None:
    """Every process kind wrote its start and stop; the study's way in and out is recorded."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    events = [(r["event"], r["source"]["kind"]) for r in records]
    for kind in ("scp", "worker", "exporter", "web"):
        assert ("node_started", kind) in events and ("node_stopped", kind) in events, kind
    assert ("configuration_changed", "scp") in events or any(
        e == "configuration_changed" for e, _ in events
    )
    accepted = [r for r in records if r["event"] == "association_accepted"]
    assert any(r["participants"][0]["id"] == "MODALITY1" for r in accepted)
    received = [r for r in records if r["event"] == "instances_received"]
    assert sum(r["instances"].get(study_uid, 0) for r in received) == len(files)
    sent = [r for r in records if r["event"] == "results_sent" and r["study_uids"] == [study_uid]]
    assert sum(r["instances"][study_uid] for r in sent) == len(files) + 1  # heatmaps and the SR
    assert all(r["outcome"] == "success" for r in sent)
    patient = str(dcmread(files[0], stop_before_pixels=True).PatientName)
    assert patient and patient not in path.read_text()


def test_serve_on_embedded_defaults_and_reopen(tmp_path: Path, orthanc: OrthancServer) -> None:
    """``acwi-node serve``: SQLite ledger, embedded broker. A late instance re-opens the study."""
    cfg = node_config(tmp_path, orthanc)
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study",
        n_images=2,
        label="effusion",
        site=2,
        seed=3,
        study_instance_uid=study_uid,
    )
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files[:1])
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        first = check_results(orthanc, ledger, study_uid, files[:1], tmp_path)
        # A late instance: the study re-opens, the new SR (same UID) supersedes the old one.
        send_study(orthanc.node_port, files[1:])
        wait_study_state(
            ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240, generation=2
        )
        second = check_results(orthanc, ledger, study_uid, files, tmp_path)
        assert second["sr_sop_instance_uid"] == first["sr_sop_instance_uid"]
        st = ledger.get_study(study_uid)
        assert st is not None and [j["state"] for j in st["jobs"]] == ["delivered", "delivered"]
        shown = subprocess.run(
            [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "studies", "show",
             study_uid],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "generation 1\n" in shown.stdout and "generation 2\n" in shown.stdout
        assert shown.stdout.count("stored by pacs") == 2, shown.stdout
        wait_port("127.0.0.1", cfg["node"]["http_port"])
        listed = http_json(
            f"http://127.0.0.1:{cfg['node']['http_port']}/api/studies", auth=add_api_user(config)
        )
        assert [s["study_uid"] for s in listed["studies"]] == [study_uid]
        ledger.dispose()


def test_results_are_delivered_once_the_pacs_commits_them(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """A destination with ``storage_commitment``: after the C-STOREs the node asks Orthanc to
    commit the SR and the heatmap, and Orthanc's report (to the node's DICOM port, on an
    association of its own) makes the study delivered."""
    cfg = node_config(tmp_path, orthanc)
    cfg["destinations"][0]["storage_commitment"] = True
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(tmp_path / "study", n_images=1, study_instance_uid=study_uid)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        check_results(orthanc, ledger, study_uid, files, tmp_path)
        st = ledger.get_study(study_uid)
        assert st is not None
        states = [d["state"] for r in st["jobs"][-1]["results"] for d in r["deliveries"]]
        assert states == ["delivered", "delivered"]
        log = nodes.log_text()
        assert "sent 2 object(s) to pacs, awaiting its storage commitment" in log
        assert f"storage commitment report from {orthanc.aet}: 2 result(s) committed" in log
        ledger.dispose()


def test_not_routed_study_is_recorded(tmp_path: Path, orthanc: OrthancServer) -> None:
    cfg = node_config(tmp_path, orthanc)
    cfg["routes"][0]["match"] = {"modality": ["CT"]}
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(tmp_path / "study", n_images=1, study_instance_uid=study_uid)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        st = wait_study_state(ledger, study_uid, {"not_routed"}, nodes, timeout_s=60)
        assert st["reason"] == (
            "no routing rule matches this study:"
            " chest: modality: the study has DX, the route wants CT"
        )
        ledger.dispose()


def test_a_prior_sent_with_the_new_study_is_not_analysed(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """A PACS pushes a patient's prior along with today's study, in one association; the route
    takes studies up to 30 days old (``match.max_age_days``): today's is analysed and comes
    back, the prior is recorded as not routed."""
    cfg = node_config(tmp_path, orthanc)
    cfg["routes"][0]["match"]["max_age_days"] = 30
    config = write_config(tmp_path / "acwi.toml", cfg)
    prior_uid, current_uid = generate_uid(), generate_uid()
    prior = write_study(tmp_path / "prior", n_images=1, seed=21, study_instance_uid=prior_uid)
    current = write_study(tmp_path / "today", n_images=1, seed=22, study_instance_uid=current_uid)
    for path in prior + current:
        ds = dcmread(path)
        ds.StudyDate = "20190301" if path in prior else time.strftime("%Y%m%d")
        ds.save_as(path)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, prior + current)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, current_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        check_results(orthanc, ledger, current_uid, current, tmp_path)
        st = wait_study_state(ledger, prior_uid, {"not_routed"}, nodes, timeout_s=60)
        assert "chest: Study Date 20190301 is" in st["reason"]
        assert "days old (max_age_days 30)" in st["reason"]
        assert not results_in_orthanc(orthanc, prior_uid, 1)
        ledger.dispose()


def test_a_ct_studys_reformats_are_left_out_by_its_route(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """A scanner sends a CT's axial slices with a coronal reformat series; the route leaves
    reformats out (``select.image_type_exclude``): the SR references, and the heatmaps cover,
    the axial slices only, and the job lists the reformats with the reason."""
    cfg = node_config(tmp_path, orthanc)
    cfg["routes"][0]["match"] = {"modality": ["CT"]}
    cfg["routes"][0]["select"] = {"image_type_exclude": ["REFORMATTED"]}
    config = write_config(tmp_path / "acwi.toml", cfg)
    axial = write_ct_series(tmp_path / "ct", slices=4, size=128)
    reformat_series = generate_uid()
    reformats: list[Path] = []
    for n, source in enumerate(axial[:2]):
        ds = dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = reformat_series
        ds.SeriesNumber = 2
        ds.SeriesDescription = "COR MPR"
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        path = tmp_path / f"reformat-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        reformats.append(path)
    study_uid = str(dcmread(axial[0], stop_before_pixels=True).StudyInstanceUID)
    reformat_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in reformats}
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, axial + reformats)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        summary = check_results(orthanc, ledger, study_uid, axial, tmp_path)
        assert len(summary["images"]) == len(axial)
        assert set(summary["skipped"]) == reformat_uids
        assert all(
            "Image Type DERIVED\\SECONDARY\\REFORMATTED" in r for r in summary["skipped"].values()
        )
        (sr,) = [
            dcmread(io.BytesIO(orthanc.instance_file(i["ID"])))
            for i in orthanc.study_instances(study_uid)
            if _sop_class(orthanc, i) == SR_CLASS
        ]
        assert not reformat_uids & set(summarise_sr(sr)["referenced_sop_instance_uids"])
        ledger.dispose()


def test_an_enhanced_ct_is_analysed_frame_by_frame(tmp_path: Path, orthanc: OrthancServer) -> None:
    """A scanner that sends enhanced objects: the CT is one multi-frame image. Each frame is
    analysed; the SR's groups and the heatmaps in the PACS name their frame."""
    cfg = node_config(tmp_path, orthanc)
    cfg["routes"][0]["match"] = {"modality": ["CT"]}
    config = write_config(tmp_path / "acwi.toml", cfg)
    image = write_enhanced_ct(tmp_path / "ct", slices=3, size=128)
    header = dcmread(image, stop_before_pixels=True)
    study_uid, sop = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        # as the scanner would: proposing the image's own SOP class (storescu's default list
        # of 128 lacks the enhanced ones)
        done = storescu(
            "127.0.0.1",
            orthanc.node_port,
            "ACWI",
            [image],
            calling_ae="MODALITY1",
            extra_args=["-R"],
        )
        assert done.returncode == 0, done.stdout + done.stderr
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        summary = check_results(orthanc, ledger, study_uid, [image], tmp_path, heatmaps=3)
        assert [(im["sop_instance_uid"], im["frame_number"]) for im in summary["images"]] == [
            (sop, n) for n in (1, 2, 3)
        ]
        results = [
            dcmread(io.BytesIO(orthanc.instance_file(i["ID"])))
            for i in orthanc.study_instances(study_uid)
        ]
        frames = sorted(
            int(ref.ReferencedFrameNumber)
            for ds in results
            if ds.SOPClassUID == SC_CLASS
            for ref in ds.SourceImageSequence
        )
        assert frames == [1, 2, 3]
        (sr,) = [ds for ds in results if ds.SOPClassUID == SR_CLASS]
        assert sorted(summarise_sr(sr)["image_probabilities"]) == [
            f"{sop} frame {n}" for n in (1, 2, 3)
        ]
        ledger.dispose()


def test_a_delivered_study_leaves_the_node_disk_after_keep_hours(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """Storage retention in ``acwi-node serve``: once the results are in the PACS and
    ``retention.keep_hours`` has passed, the study's images and result files leave the data
    directory; the PACS keeps everything, the ledger says when, the audit trail records it."""
    cfg = node_config(tmp_path, orthanc)
    cfg["retention"] = {"keep_hours": 3 / 3600, "interval_s": 0.5}
    # A model whose thresholds keep every study off the review worklist (an open item keeps
    # its study's files).
    model = model_variant(
        tmp_path / "confident-model", uncertainty_threshold=1.0, ood_threshold=1e9
    )
    cfg["models"] = [{"name": "confident", "manifest": str(model)}]
    cfg["routes"][0]["model"] = "confident"
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study", n_images=1, label="nodule", site=1, seed=5, study_instance_uid=study_uid
    )
    data = tmp_path / "data"
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        check_results(orthanc, ledger, study_uid, files, tmp_path)
        folders = [data / "spool" / study_uid, data / "results" / study_uid]
        deadline = time.monotonic() + 60
        while any(f.exists() for f in folders) and time.monotonic() < deadline:
            nodes.assert_alive()
            time.sleep(0.25)
        assert not any(f.exists() for f in folders), [list(f.iterdir()) for f in folders]
        st = ledger.get_study(study_uid)
        assert st is not None and st["state"] == "delivered" and st["images_deleted_at"]
        assert results_in_orthanc(orthanc, study_uid, 1)  # the PACS keeps the results
        audit_lines = (data / "audit" / "audit.jsonl").read_text().splitlines()
        deleted = [json.loads(x) for x in audit_lines if '"study_deleted"' in x]
        assert [r["study_uids"] for r in deleted] == [[study_uid]]
        ledger.dispose()


def test_orthanc_pushes_a_stored_study(tmp_path: Path, orthanc: OrthancServer) -> None:
    """Orthanc sends a study it holds to the node (POST /modalities/acwi/store), gets results;
    the same study sent again, results and all, is not analysed again."""
    cfg = node_config(tmp_path, orthanc)
    config = write_config(tmp_path / "acwi.toml", cfg)
    study_uid = generate_uid()
    files = write_study(
        tmp_path / "study",
        n_images=2,
        label="normal",
        site=0,
        seed=11,
        study_instance_uid=study_uid,
    )
    for f in files:
        orthanc.upload(f)
    orthanc_study = orthanc.find_study(study_uid)
    assert orthanc_study is not None
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        orthanc.store_to_modality("acwi", [orthanc_study])
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        st = ledger.get_study(study_uid)
        assert st is not None and st["calling_ae"] == orthanc.aet
        orthanc.wait_for(
            lambda: len(orthanc.study_instances(study_uid)) == 2 + 1 + 2,
            timeout_s=120,
            message="sources + SR + 2 heatmaps",
        )
        check_results(orthanc, ledger, study_uid, files, tmp_path)
        # Orthanc forwards the whole study again, the node's results now in it: every
        # instance accepted; the results dropped, the images stored again unchanged; the
        # study, delivered, is not analysed again.
        pushed = orthanc.store_to_modality("acwi", [orthanc_study])
        assert pushed.get("FailedInstancesCount", 0) == 0, pushed
        assert pushed.get("InstancesCount") == 2 + 1 + 2, pushed
        time.sleep(1.5)  # past the quiet period: a re-opened study would complete again
        st = ledger.get_study(study_uid)
        assert st is not None
        assert (st["state"], st["generation"], st["instances"]) == ("delivered", 1, 2), st
        assert len(st["jobs"]) == 1
        ledger.dispose()


def test_a_ct_series_comes_back_with_a_parametric_map(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """``worker.parametric_maps``: besides the SR and a heatmap per slice, the series' heat
    as one Parametric Map, a frame per slice in the slices' frame of reference."""
    cfg = node_config(tmp_path, orthanc)
    cfg["routes"][0]["match"] = {"modality": ["CT"]}
    cfg["worker"]["parametric_maps"] = True
    config = write_config(tmp_path / "acwi.toml", cfg)
    files = write_ct_series(tmp_path / "ct", slices=4, size=128)
    sources = [dcmread(p, stop_before_pixels=True) for p in files]
    study_uid = str(sources[0].StudyInstanceUID)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes, timeout_s=240)
        check_results(orthanc, ledger, study_uid, files, tmp_path)
        maps = [
            i
            for i in orthanc.study_instances(study_uid)
            if _sop_class(orthanc, i) == PARAMETRIC_MAP_CLASS
        ]
        assert len(maps) == 1
        path = tmp_path / "parametric-map.dcm"
        path.write_bytes(orthanc.instance_file(maps[0]["ID"]))
        assert dciodvfy_errors(path) == []
        pmap = dcmread(path)
        assert int(pmap.NumberOfFrames) == len(files)
        assert pmap.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        referenced = {
            str(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for g in pmap.PerFrameFunctionalGroupsSequence
        }
        assert referenced == {str(s.SOPInstanceUID) for s in sources}
        assert pmap.pixel_array.max() > 0  # the model's heat, not an empty map
        ledger.dispose()
