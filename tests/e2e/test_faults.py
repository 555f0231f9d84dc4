"""Faults: a worker killed mid-analysis, Redis flushed or restarted, a destination that is down.
Nothing is lost.

Each test ends by counting what Orthanc holds: every study sent has exactly one SR and one
heatmap per image, however often the node's processes died or the destination was away.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.conftest import REDIS_URL
from tests.e2e.test_study_roundtrip import (
    SC_CLASS,
    SR_CLASS,
    _sop_class,
    node_config,
    send_study,
)
from tests.support.node import (
    NodeProcesses,
    add_api_user,
    wait_port,
    wait_study_state,
    write_config,
)
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

FAULTS_REDIS_DB = 7


@pytest.fixture
def orthanc() -> Any:
    with OrthancServer(node_ae="ACWI", node_port=free_port(), with_lua=False) as server:
        yield server


def result_counts(orthanc: OrthancServer, study_uid: str) -> tuple[int, int]:
    """(SR objects, heatmap objects) Orthanc holds for a study."""
    if not orthanc.find_study(study_uid):
        return (0, 0)
    classes = [_sop_class(orthanc, i) for i in orthanc.study_instances(study_uid)]
    return classes.count(SR_CLASS), classes.count(SC_CLASS)


def analysing_attempt(
    ledger: Ledger, study_uids: list[str], killed: dict[int, int]
) -> tuple[int, int] | None:
    """(job id, attempt) of a job a live worker analyses: one in ``analysing`` whose attempt
    was not killed already (a killed worker's job stays ``analysing`` until it is taken
    again), else None."""
    for uid in study_uids:
        view = ledger.get_study(uid)
        for job in view["jobs"] if view else []:
            if job["state"] == "analysing" and job["attempts"] > killed.get(job["id"], 0):
                return int(job["id"]), int(job["attempts"])
    return None


def killable_worker_config(
    tmp_path: Path, orthanc: OrthancServer, postgres_url: str, *, max_attempts: int
) -> Path:
    """Separate processes on PostgreSQL and this test module's Redis database (emptied), with
    a short lease: a killed worker's job is taken again within seconds."""
    broker = f"{REDIS_URL}/{FAULTS_REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    cfg = node_config(tmp_path, orthanc, database_url=postgres_url, broker_url=broker)
    cfg["worker"]["lease_s"] = 3
    cfg["worker"]["max_attempts"] = max_attempts
    cfg["completion"]["requeue_after_s"] = 4
    return write_config(tmp_path / "acwi.toml", cfg)


@pytest.mark.integration
def test_worker_killed_mid_analysis_again_and_again(
    tmp_path: Path, orthanc: OrthancServer, postgres_url: str
) -> None:
    """kill -9 of the worker while it analyses, three times: every study still gets one result."""
    # Three kills may all land on one job: more attempts than that (the limit has its own test).
    config = killable_worker_config(tmp_path, orthanc, postgres_url, max_attempts=10)
    studies: dict[str, list[Path]] = {}
    for n in range(3):
        uid: str = generate_uid()
        studies[uid] = write_study(
            tmp_path / f"study{n}",
            n_images=12,
            size=384,
            label="nodule",
            seed=100 + n,
            study_instance_uid=uid,
        )
    ledger = Ledger(postgres_url)
    kills = 0
    with NodeProcesses(config, ["scp", "worker", "exporter"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        for files in studies.values():
            send_study(orthanc.node_port, files)
        uids = list(studies)
        deadline = time.monotonic() + 120
        killed: dict[int, int] = {}  # job id -> the attempt killed (a job stays "analysing" after)
        while kills < 3 and time.monotonic() < deadline:
            taken = analysing_attempt(ledger, uids, killed)
            if taken is not None:
                nodes.stop("worker", signal.SIGKILL)
                killed[taken[0]] = taken[1]
                kills += 1
                nodes.start("worker")
            time.sleep(0.01)
        for uid in uids:
            wait_study_state(ledger, uid, {"delivered", "failed"}, nodes, timeout_s=240)
        assert kills >= 1, "the worker was never caught analysing"
        attempts = [j["attempts"] for uid in uids for j in ledger.get_study(uid)["jobs"]]  # type: ignore[index]
        assert max(attempts) >= 2, f"no job was taken again after a kill: {attempts}"
        for uid, files in studies.items():
            assert ledger.get_study(uid)["state"] == "delivered"  # type: ignore[index]
            assert result_counts(orthanc, uid) == (1, len(files)), uid
    ledger.dispose()


@pytest.mark.integration
def test_a_study_that_stops_every_worker_fails_with_the_reason(
    tmp_path: Path, orthanc: OrthancServer, postgres_url: str
) -> None:
    """A study whose analysis kills the worker each time (here kill -9, as the kernel's
    out-of-memory killer would): after ``worker.max_attempts`` the study fails, with the reason
    in the API, and the worker is free for the next study."""
    config = killable_worker_config(tmp_path, orthanc, postgres_url, max_attempts=2)
    poison = generate_uid()
    files = write_study(
        tmp_path / "poison", n_images=12, size=384, seed=7, study_instance_uid=poison
    )
    ledger = Ledger(postgres_url)
    killed = 0  # the attempts killed: each a new claim of the job, by a live worker
    with NodeProcesses(config, ["scp", "worker", "exporter"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        send_study(orthanc.node_port, files)
        deadline = time.monotonic() + 180
        while killed < 2 and time.monotonic() < deadline:
            view = ledger.get_study(poison)
            jobs = view["jobs"] if view else []
            if jobs and jobs[0]["state"] == "analysing" and jobs[0]["attempts"] > killed:
                nodes.stop("worker", signal.SIGKILL)
                killed = jobs[0]["attempts"]
                nodes.start("worker")
            time.sleep(0.01)
        assert killed == 2, "the worker was not caught analysing the study twice"
        st = wait_study_state(ledger, poison, {"delivered", "failed"}, nodes, timeout_s=120)
        assert st["state"] == "failed", st
        assert "did not finish in 2 attempt(s)" in st["reason"]
        assert [j["attempts"] for j in st["jobs"]] == [2]
        # The next study is analysed as usual.
        other = generate_uid()
        later = write_study(tmp_path / "next", n_images=1, seed=8, study_instance_uid=other)
        send_study(orthanc.node_port, later)
        assert (
            wait_study_state(ledger, other, {"delivered", "failed"}, nodes, timeout_s=120)["state"]
            == "delivered"
        )
    ledger.dispose()


def test_destination_down_then_back_gets_each_result_once(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """The PACS is down when results are due; when it is back they arrive, once. The default
    max_attempts (5): an outage's attempts are not counted (exporter.outage_patience_s)."""
    cfg = node_config(tmp_path, orthanc)
    cfg["exporter"] = {"backoff_initial_s": 0.5, "backoff_max_s": 2}
    config = write_config(tmp_path / "acwi.toml", cfg)
    uid = generate_uid()
    files = write_study(tmp_path / "study", n_images=2, seed=5, study_instance_uid=uid)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        orthanc.halt()
        send_study(orthanc.node_port, files)
        wait_study_state(ledger, uid, {"exporting"}, nodes, timeout_s=120)
        _wait_deliveries(
            ledger, uid, lambda d: d["outage_attempts"] >= 6 and d["state"] == "pending"
        )
        orthanc.resume()
        wait_study_state(ledger, uid, {"delivered"}, nodes, timeout_s=120)
        assert result_counts(orthanc, uid) == (1, len(files))
    ledger.dispose()


def test_destination_down_for_good_fails_visibly(tmp_path: Path, orthanc: OrthancServer) -> None:
    """Unreachable for longer than exporter.outage_patience_s, the failure is visible in the
    API, with the reason; once the PACS is back, an administrator sends the results again, and
    can have the study analysed again."""
    cfg = node_config(tmp_path, orthanc)
    cfg["exporter"] = {"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "outage_patience_s": 2}
    config = write_config(tmp_path / "acwi.toml", cfg)
    uid = generate_uid()
    files = write_study(tmp_path / "study", n_images=1, seed=6, study_instance_uid=uid)
    with NodeProcesses(config, ["serve"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        orthanc.halt()
        send_study(orthanc.node_port, files)
        wait_study_state(ledger, uid, {"failed"}, nodes, timeout_s=120)
        port = cfg["node"]["http_port"]
        wait_port("127.0.0.1", port)
        api_user = add_api_user(config)
        view = httpx.get(
            f"http://127.0.0.1:{port}/api/studies/{uid}", timeout=10, auth=api_user
        ).json()
        assert view["state"] == "failed"
        assert "pacs" in view["reason"]
        deliveries = [d for j in view["jobs"] for r in j["results"] for d in r["deliveries"]]
        assert deliveries and all(
            d["state"] == "failed"
            and d["outage_attempts"] >= 2
            and "(exporter.outage_patience_s)" in d["last_error"]
            for d in deliveries
        )
        # The PACS is back: an administrator sends the results again, once.
        orthanc.resume()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/studies/{uid}/resend",
            json={},
            timeout=10,
            auth=api_user,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["deliveries"] == len(deliveries)
        wait_study_state(ledger, uid, {"delivered"}, nodes, timeout_s=120)
        assert result_counts(orthanc, uid) == (1, len(files))
        # Analysed again from the command line: a new generation, whose results replace the
        # earlier ones in the PACS (same UIDs).
        done = subprocess.run(
            [sys.executable, "-m", "acwi_node.cli", "--config", str(config)]
            + ["studies", "reprocess", uid],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        st = wait_study_state(
            ledger, uid, {"delivered", "failed"}, nodes, timeout_s=180, generation=2
        )
        assert st["state"] == "delivered", st
        assert result_counts(orthanc, uid) == (1, len(files))
    ledger.dispose()


def _wait_deliveries(ledger: Ledger, uid: str, predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = ledger.get_study(uid) or {"jobs": []}
        deliveries = [
            d for j in view["jobs"] for r in j.get("results", []) for d in r["deliveries"]
        ]
        if deliveries and all(predicate(d) for d in deliveries):
            return
        time.sleep(0.2)
    raise AssertionError(f"deliveries never matched; last: {ledger.get_study(uid)}")


@pytest.mark.integration
def test_broker_flushed_while_studies_are_queued(
    tmp_path: Path, orthanc: OrthancServer, postgres_url: str
) -> None:
    """Redis loses every queued message; the reconciler re-queues from the ledger."""
    broker = f"{REDIS_URL}/{FAULTS_REDIS_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    cfg = node_config(tmp_path, orthanc, database_url=postgres_url, broker_url=broker)
    cfg["completion"]["requeue_after_s"] = 2
    config = write_config(tmp_path / "acwi.toml", cfg)
    uids = [generate_uid() for _ in range(2)]
    sent = {
        uid: write_study(tmp_path / f"s{n}", n_images=2, seed=20 + n, study_instance_uid=uid)
        for n, uid in enumerate(uids)
    }
    ledger = Ledger(postgres_url)
    with NodeProcesses(config, ["scp", "exporter"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        for files in sent.values():
            send_study(orthanc.node_port, files)
        for uid in uids:
            wait_study_state(ledger, uid, {"queued"}, nodes, timeout_s=60)
        assert client.dbsize() > 0
        client.flushdb()  # every message is gone; only the ledger knows the work
        nodes.start("worker")
        for uid in uids:
            wait_study_state(ledger, uid, {"delivered"}, nodes, timeout_s=180)
            assert result_counts(orthanc, uid) == (1, len(sent[uid]))
    ledger.dispose()


class _PrivateRedis:
    """A Redis server of this test's own (nothing kept on disk), so it can be killed and
    started again without touching the shared one."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("the test's Redis did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def __enter__(self) -> _PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


@pytest.mark.integration
def test_redis_restarted_while_studies_are_queued_and_analysed(
    tmp_path: Path, orthanc: OrthancServer, postgres_url: str
) -> None:
    """Redis dies (kill -9) with messages queued and a task running, and comes back empty.

    The processes reconnect, the reconciler re-queues from the ledger, and every study, those
    sent before the restart and one sent after, gets exactly one result.
    """
    ledger = Ledger(postgres_url)
    with _PrivateRedis(tmp_path) as broker:
        cfg = node_config(tmp_path, orthanc, database_url=postgres_url, broker_url=broker.url)
        cfg["completion"]["requeue_after_s"] = 3
        cfg["worker"]["lease_s"] = 3
        config = write_config(tmp_path / "acwi.toml", cfg)
        studies: dict[str, list[Path]] = {}
        for n in range(3):
            uid: str = generate_uid()
            studies[uid] = write_study(
                tmp_path / f"study{n}", n_images=8, size=384, seed=40 + n, study_instance_uid=uid
            )
        with NodeProcesses(config, ["scp", "worker", "exporter"], tmp_path) as nodes:
            wait_port("127.0.0.1", orthanc.node_port)
            for files in studies.values():
                send_study(orthanc.node_port, files)
            deadline = time.monotonic() + 120
            while (
                analysing_attempt(ledger, list(studies), {}) is None and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            assert analysing_attempt(ledger, list(studies), {}), "no study was being analysed"
            queued = redis.Redis.from_url(broker.url).dbsize()
            broker.kill()
            time.sleep(2)
            broker.start()  # empty: every message is gone
            late_uid: str = generate_uid()
            studies[late_uid] = write_study(
                tmp_path / "late", n_images=2, seed=49, study_instance_uid=late_uid
            )
            send_study(orthanc.node_port, studies[late_uid])
            for uid in studies:
                wait_study_state(ledger, uid, {"delivered", "failed"}, nodes, timeout_s=300)
            nodes.assert_alive()
            for uid, files in studies.items():
                assert ledger.get_study(uid)["state"] == "delivered", uid  # type: ignore[index]
                assert result_counts(orthanc, uid) == (1, len(files)), uid
        assert queued > 0, "nothing was queued in Redis when it died"
    ledger.dispose()


def test_scp_killed_mid_association(tmp_path: Path, orthanc: OrthancServer) -> None:
    """The SCP dies with an association open: on restart what was acknowledged is analysed."""
    from pydicom import dcmread
    from pynetdicom import AE, build_context

    cfg = node_config(tmp_path, orthanc)
    cfg["completion"] = {"quiet_period_s": 0.5, "max_wait_s": 3}
    config = write_config(tmp_path / "acwi.toml", cfg)
    uid = generate_uid()
    files = write_study(tmp_path / "study", n_images=4, seed=9, study_instance_uid=uid)
    datasets = [dcmread(f) for f in files]
    with NodeProcesses(config, ["scp", "worker", "exporter"], tmp_path) as nodes:
        wait_port("127.0.0.1", orthanc.node_port)
        ae = AE(ae_title="MODALITY1")
        ae.requested_contexts = [build_context(datasets[0].SOPClassUID)]
        assoc = ae.associate("127.0.0.1", orthanc.node_port, ae_title="ACWI")
        assert assoc.is_established
        for ds in datasets[:2]:
            assert assoc.send_c_store(ds).Status == 0x0000
        nodes.stop("scp", signal.SIGKILL)  # two acknowledged, two never sent
        assoc.abort()
        nodes.start("scp")
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        view = wait_study_state(ledger, uid, {"delivered"}, nodes, timeout_s=120)
        assert view["instances"] == 2
        assert result_counts(orthanc, uid) == (1, 2)
        assert not list((tmp_path / "data" / "spool" / ".tmp").glob("*"))
        ledger.dispose()
