"""Several storage SCP processes share the DICOM port (``ingest.processes = 2``).

DCMTK storescu sends over parallel associations; every instance is stored and recorded, every
study completes, ``/metrics`` adds up both listeners, and a listener that dies is started again
while the other one keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e]

STUDIES = 4
IMAGES = 10


def children(pid: int) -> list[int]:
    """Running child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def wait_children(
    pid: int, n: int, *, other_than: frozenset[int] = frozenset(), timeout_s: float = 60
) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = children(pid)
        if len(found) == n and not other_than & set(found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"scp {pid} has children {children(pid)}, expected {n}")


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def listening_ok(ops_port: int) -> bool:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=10).read()
    except urllib.error.HTTPError as exc:  # 503 while not ready
        body = exc.read()
    return bool(json.loads(body)["checks"]["listening"]["ok"])


def test_listener_processes_share_the_port(tmp_path: Path) -> None:
    dicom_port, ops_port = free_port(), free_port()
    config = write_config(
        tmp_path / "acwi.toml",
        {
            "node": {
                "ae_title": "ACWI",
                "dicom_host": "127.0.0.1",
                "dicom_port": dicom_port,
                "http_port": free_port(),
                "data_dir": str(tmp_path / "data"),
            },
            "ingest": {"processes": 2},
            "completion": {"quiet_period_s": 0.5},
            "observability": {"scp_port": ops_port},
        },
    )
    batches = []
    uids = []
    for i in range(STUDIES):
        uid: str = generate_uid()
        uids.append(uid)
        batches.append(
            write_study(
                tmp_path / f"s{i}", n_images=IMAGES, size=64, seed=i, study_instance_uid=uid
            )
        )
    with NodeProcesses(config, ["scp"], tmp_path) as nodes:
        scp = nodes.procs["scp"]
        wait_port("127.0.0.1", dicom_port)
        listeners = wait_children(scp.pid, 2)
        with ThreadPoolExecutor(STUDIES) as pool:
            done = list(
                pool.map(lambda files: storescu("127.0.0.1", dicom_port, "ACWI", files), batches)
            )
        assert all(d.returncode == 0 for d in done), [d.stderr[-300:] for d in done]
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
        try:
            for uid in uids:
                study = wait_study_state(ledger, uid, {"not_routed"}, nodes, timeout_s=30)
                assert study["instances"] == IMAGES
            assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == STUDIES * IMAGES
            wait_port("127.0.0.1", ops_port)
            assert metric(ops_port, "acwi_scp_instances_received_total") == STUDIES * IMAGES
            ready = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=10).read()
            )
            assert ready["checks"]["listening"]["ok"], ready

            # One listener dies: the other serves the next study, the scp starts a new one.
            os.kill(listeners[0], signal.SIGKILL)
            uid = generate_uid()
            files = write_study(
                tmp_path / "after", n_images=3, size=64, seed=9, study_instance_uid=uid
            )
            sent = storescu("127.0.0.1", dicom_port, "ACWI", files)
            assert sent.returncode == 0, sent.stderr[-300:]
            assert (
                wait_study_state(ledger, uid, {"not_routed"}, nodes, timeout_s=30)["instances"] == 3
            )
            replaced = wait_children(scp.pid, 2, other_than=frozenset({listeners[0]}))
            assert listeners[1] in replaced
            # Ready again only once the new listener said it accepts connections.
            deadline = time.monotonic() + 30
            while not listening_ok(ops_port):
                assert time.monotonic() < deadline, "the new listener never became ready"
                time.sleep(0.2)
            nodes.assert_alive()
        finally:
            ledger.dispose()
        nodes.stop("scp")
        assert children(scp.pid) == []
        assert "Traceback" not in nodes.log_text()
        # The scp process and each listener (the replacement too) froze its start-up heap.
        assert nodes.log_text().count("start-up heap frozen") >= 4
