"""Load: ten parallel associations send 1,000 instances; nothing is lost, every study is answered.

The scp's peak resident memory (VmHWM) is reported and bounded; this is a correctness test under
load, not a speed measurement (bench/ingest.py measures speed).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.ledger import Ledger
from models.data.synth import write_study
from tests.e2e.test_faults import result_counts
from tests.e2e.test_study_roundtrip import node_config
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcesses, wait_port, wait_study_state, write_config
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ASSOCIATIONS = 10
STUDIES_PER_ASSOCIATION = 2
IMAGES_PER_STUDY = 50  # 10 x 2 x 50 = 1,000 instances
SCP_MEMORY_LIMIT_MB = 600


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(1500)
def test_ten_associations_one_thousand_instances(tmp_path: Path) -> None:
    with OrthancServer(node_ae="ACWI", node_port=free_port()) as orthanc:
        cfg = node_config(tmp_path, orthanc)
        cfg["ingest"]["max_associations"] = ASSOCIATIONS + 2
        cfg["worker"]["mc_samples"] = 5
        config = write_config(tmp_path / "acwi.toml", cfg)
        batches: list[list[Path]] = []
        studies: dict[str, int] = {}
        for a in range(ASSOCIATIONS):
            files: list[Path] = []
            for s in range(STUDIES_PER_ASSOCIATION):
                uid: str = generate_uid()
                studies[uid] = IMAGES_PER_STUDY
                files += write_study(
                    tmp_path / f"a{a}s{s}",
                    n_images=IMAGES_PER_STUDY,
                    size=96,
                    seed=a * 10 + s,
                    study_instance_uid=uid,
                )
            batches.append(files)
        total = sum(len(b) for b in batches)
        assert total == 1000
        with NodeProcesses(config, ["scp", "worker", "exporter"], tmp_path) as nodes:
            wait_port("127.0.0.1", orthanc.node_port)

            def send(files: list[Path]) -> subprocess.CompletedProcess[str]:
                return storescu("127.0.0.1", orthanc.node_port, "ACWI", files, timeout_s=300)

            with ThreadPoolExecutor(ASSOCIATIONS) as pool:
                done = list(pool.map(send, batches))
            assert all(d.returncode == 0 for d in done), [d.stderr[-300:] for d in done]
            ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
            spooled = list((tmp_path / "data" / "spool").rglob("*.dcm"))
            assert len(spooled) == total
            assert sum(v["instances"] for v in ledger.list_studies(limit=100)) == total
            scp_peak = peak_rss_mb(nodes.procs["scp"].pid)
            print(f"scp peak RSS after {total} instances: {scp_peak:.0f} MiB")
            assert scp_peak < SCP_MEMORY_LIMIT_MB
            for uid, n in studies.items():
                wait_study_state(ledger, uid, {"delivered"}, nodes, timeout_s=600)
                assert result_counts(orthanc, uid) == (1, n), uid
            ledger.dispose()
