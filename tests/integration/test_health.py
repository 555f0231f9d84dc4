"""Health, readiness and metrics of real node processes (Redis db 14, PostgreSQL), JSON logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.conftest import REDIS_URL
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

REDIS_DB = 14
CANARY = "Healthcheck^Canary"


@pytest.fixture
def redis_db() -> Iterator[str]:
    import redis

    url = f"{REDIS_URL}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def node_config(tmp_path: Path, database_url: str, broker_url: str) -> tuple[Path, dict[str, int]]:
    dicom, http, scp, worker, exporter = free_ports(5)
    ports = {"dicom": dicom, "http": http, "scp": scp, "worker": worker, "exporter": exporter}
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {
                "data_dir": str(tmp_path / "data"),
                "database_url": database_url,
                "broker_url": broker_url,
                "dicom_host": "127.0.0.1",
                "dicom_port": dicom,
                "http_port": http,
            },
            "ingest": {"fsync": False},
            "completion": {"quiet_period_s": 0.5, "poll_interval_s": 0.1},
            "worker": {"mc_samples": 4},
            "observability": {
                "log_format": "json",
                "scp_port": scp,
                "worker_port": worker,
                "exporter_port": exporter,
            },
            "routes": [{"name": "all", "model": "default", "destinations": []}],
        },
    )
    return config, ports


def wait_ready(port: int, nodes: NodeProcesses, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        nodes.assert_alive()
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            last = response.json()
            if response.status_code == 200:
                return dict(last)
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise AssertionError(f"never ready on port {port}: {last}\n{nodes.log_text()}")


def health_cli(config: Path, kind: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "acwi_node.cli",
            "--config",
            str(config),
            "health",
            "--kind",
            kind,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_every_process_kind_reports_health_metrics_and_json_logs(
    tmp_path: Path, postgres_url: str, redis_db: str
) -> None:
    config, ports = node_config(tmp_path, postgres_url, redis_db)
    Ledger(postgres_url).dispose()  # tables exist before the processes race to create them
    with NodeProcesses(config, ["scp", "worker", "exporter", "web"], tmp_path) as nodes:
        scp = wait_ready(ports["scp"], nodes)
        assert set(scp["checks"]) == {"ledger", "broker", "listening", "completion_loop"}
        worker = wait_ready(ports["worker"], nodes)
        assert "default" in worker["checks"]["models"]["detail"]
        assert "loaded" in worker["checks"]["models"]["detail"]
        exporter = wait_ready(ports["exporter"], nodes)
        assert exporter["checks"]["outbox_loop"]["ok"] is True
        wait_port("127.0.0.1", ports["http"])
        for kind in ("scp", "worker", "exporter", "web"):
            done = health_cli(config, kind)
            assert done.returncode == 0, (kind, done.stdout, done.stderr)
            assert "200" in done.stdout
        live = httpx.get(f"http://127.0.0.1:{ports['worker']}/healthz", timeout=5).json()
        assert live == {"status": "ok", "kind": "worker"}

        # a real study through scp and worker
        files = write_study(tmp_path / "study", n_images=2, patient_name=CANARY, seed=3)
        datasets = [pydicom.dcmread(p) for p in files]
        study_uid = str(datasets[0].StudyInstanceUID)
        ae = AE(ae_title="HEALTHSENDER")
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", ports["dicom"], ae_title="ACWI")
        assert assoc.is_established
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        ledger = Ledger(postgres_url)
        view = wait_study_state(ledger, study_uid, {"delivered", "failed"}, nodes)
        assert view["state"] == "delivered", view
        job_id = view["jobs"][0]["id"]

        scp_m = samples(ports["scp"])
        assert scp_m[("acwi_scp_instances_received_total", (("calling_ae", "HEALTHSENDER"),))] == 2
        worker_m = samples(ports["worker"])
        assert worker_m[("acwi_worker_jobs_total", (("outcome", "analysed"),))] == 1
        model = view["jobs"][0]["summary"]["model"]
        latency = (("model", model["name"]), ("version", model["version"]))
        assert worker_m[("acwi_inference_seconds_count", latency)] == 1
        assert worker_m[("acwi_inference_seconds_sum", latency)] > 0
        web_m = samples(ports["http"])
        assert web_m[("acwi_instances", (("calling_ae", "HEALTHSENDER"),))] == 2
        assert web_m[("acwi_studies", (("state", "delivered"),))] == 1
        assert web_m[("acwi_broker_queue_length", (("queue", "analysis"),))] == 0
        ledger.dispose()

    worker_log = [
        json.loads(line)
        for line in nodes.logs["worker"].read_text().splitlines()
        if line.startswith("{")
    ]
    job_lines = [r for r in worker_log if r.get("job_id") == job_id]
    assert job_lines and all(
        r["study_uid"] == study_uid for r in job_lines if r["logger"] == "acwi_node.worker"
    )
    assert all(r["kind"] == "worker" for r in worker_log)
    every_log = "".join(p.read_text() for p in nodes.logs.values())
    assert "Healthcheck" not in every_log and "PH0001" not in every_log


def test_readiness_fails_and_says_why_when_the_broker_is_down(
    tmp_path: Path, postgres_url: str
) -> None:
    config, ports = node_config(tmp_path, postgres_url, f"redis://127.0.0.1:{free_ports(1)[0]}/14")
    with NodeProcesses(config, ["worker"], tmp_path) as nodes:
        deadline = time.monotonic() + 120
        body: Any = None
        while time.monotonic() < deadline:
            nodes.assert_alive()
            try:
                response = httpx.get(f"http://127.0.0.1:{ports['worker']}/readyz", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            body = response.json()
            assert response.status_code == 503
            if body["checks"]["models"]["ok"]:
                break
            time.sleep(0.2)
        assert body is not None and body["status"] == "unavailable", nodes.log_text()
        assert body["checks"]["broker"]["ok"] is False
        assert body["checks"]["ledger"]["ok"] is True
        done = health_cli(config, "worker")
        assert done.returncode == 1 and "503" in done.stdout
        assert health_cli(config, "worker", "--live").returncode == 0


def test_health_command_explains_a_disabled_endpoint(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.toml", {"node": {"data_dir": str(tmp_path / "d")}})
    done = health_cli(config, "exporter")
    assert done.returncode == 2
    assert "set observability.exporter_port" in done.stdout
