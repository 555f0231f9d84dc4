"""The SCP killed after acknowledging instances: what a power loss could take comes back.

The node answers a C-STORE once the instance is in the ingest journal; its spool file and
ledger row are flushed later, at the journal's checkpoint. A kill -9 keeps the page cache, so
this test also removes what an operating-system crash or a power loss could have taken before
that checkpoint (spool files, one cut short, and their ledger rows, as a rolled-back
transaction leaves them), then starts the node again.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.ingest.journal import read_journal
from tests.conftest import REDIS_URL
from tests.support.dcmtk import require_dcmtk_tool, storescu
from tests.support.dx import make_dx
from tests.support.node import NodeProcesses, wait_port, write_config
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def ledger_rows(db: Path, study_uid: str) -> tuple[int, int]:
    """(instance rows, the study's instance_count)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select count(*) from instances join studies on studies.id = instances.study_id"
            " where studies.study_uid = ?",
            (study_uid,),
        ).fetchone()[0]
        count = conn.execute(
            "select instance_count from studies where study_uid = ?", (study_uid,)
        ).fetchone()[0]
    return int(rows), int(count)


def node_config(tmp_path: Path, port: int, journal_max_bytes: int) -> Path:
    return write_config(
        tmp_path / "acwi.toml",
        {
            "node": {
                "ae_title": "ACWI",
                "dicom_host": "127.0.0.1",
                "dicom_port": port,
                "http_port": free_port(),
                "data_dir": str(tmp_path / "data"),
                "broker_url": f"{REDIS_URL}/9",
            },
            # No checkpoint during the test: everything sent stays in the journal.
            "ingest": {
                "fsync": True,
                "journal_checkpoint_s": 300,
                "journal_max_bytes": journal_max_bytes,
            },
        },
    )


def send_study(tmp_path: Path, port: int, study_uid: str, n: int) -> None:
    outbox = tmp_path / "send"
    outbox.mkdir()
    for i in range(n):  # 15 KB each
        make_dx(study_uid, number=i + 1).save_as(outbox / f"{i}.dcm", enforce_file_format=True)
    sent = storescu("127.0.0.1", port, "ACWI", outbox)
    assert sent.returncode == 0, sent.stderr


def journals(spool: Path) -> list[Path]:
    """The SCP processes' journal directories (not one being created)."""
    return [p for p in (spool / ".journal").iterdir() if not p.name.startswith(".")]


def send_then_crash(
    node: NodeProcesses, tmp_path: Path, port: int, study_uid: str, n: int
) -> tuple[Path, dict[Path, bytes]]:
    """Send ``n`` instances, kill -9 the SCP; its journal and the spool files, by path."""
    wait_port("127.0.0.1", port)
    send_study(tmp_path, port, study_uid, n)
    node.stop("scp", signal.SIGKILL)
    spool = tmp_path / "data" / "spool"
    (journal,) = journals(spool)
    return journal, {p: p.read_bytes() for p in (spool / study_uid).glob("*.dcm")}


def forget_rows(db: Path, study_uid: str, paths: list[Path]) -> None:
    """Delete ledger rows, as a rolled-back (unflushed) transaction leaves them."""
    with sqlite3.connect(db) as conn:
        for path in paths:
            conn.execute("delete from instances where path like ?", (f"%/{path.name}",))
        conn.execute(
            "update studies set instance_count = instance_count - ? where study_uid = ?",
            (len(paths), study_uid),
        )


def test_acknowledged_instances_survive_a_crash_before_the_checkpoint(tmp_path: Path) -> None:
    require_dcmtk_tool("storescu")
    port = free_port()
    config = node_config(tmp_path, port, journal_max_bytes=65536)  # the bytes are journaled
    study_uid = generate_uid()
    spool = tmp_path / "data" / "spool"
    db = tmp_path / "data" / "ledger.sqlite"

    with NodeProcesses(config, ["scp"], tmp_path) as node:
        journal, stored = send_then_crash(node, tmp_path, port, study_uid, 6)
        assert list(journal.glob("*.wal")), "the instances should still be in the journal"
        assert len(stored) == 6 and ledger_rows(db, study_uid) == (6, 6)

        # What a power loss before the checkpoint could have taken.
        victims = sorted(stored)[:3]
        for path in victims[:2]:
            path.unlink()
        victims[2].write_bytes(stored[victims[2]][:100])
        forget_rows(db, study_uid, victims[:2])
        assert ledger_rows(db, study_uid) == (4, 4)

        node.start("scp")
        wait_port("127.0.0.1", port)  # the replay runs before the port opens
        node.assert_alive()
        assert {p: p.read_bytes() for p in (spool / study_uid).glob("*.dcm")} == stored
        assert ledger_rows(db, study_uid) == (6, 6)
        assert not journal.exists()
        assert "2 ledger row(s) restored" in node.log_text()

        node.stop("scp")  # a clean stop checkpoints and leaves no journal behind
        assert journals(spool) == []


def test_large_instances_flushed_in_the_spool_survive_a_crash_before_the_checkpoint(
    tmp_path: Path,
) -> None:
    """Instances over ``ingest.journal_max_bytes``: their files were flushed before the answer,
    their ledger rows were not; the journal's spooled records bring the rows back, and only for
    files that hold what the record says."""
    require_dcmtk_tool("storescu")
    port = free_port()
    config = node_config(tmp_path, port, journal_max_bytes=1000)  # every DX is "large"
    study_uid = generate_uid()
    db = tmp_path / "data" / "ledger.sqlite"

    with NodeProcesses(config, ["scp"], tmp_path) as node:
        journal, stored = send_then_crash(node, tmp_path, port, study_uid, 4)
        records = read_journal(journal)
        assert len(records) == 4 and all(r.spooled and r.payload == b"" for r in records), (
            "the journal should hold records, not the instances' bytes"
        )
        assert len(stored) == 4 and ledger_rows(db, study_uid) == (4, 4)

        # Two ledger rows lost with the page cache; one of their files cut, as a crash between
        # the journal's flush and the file's would leave it (its instance was never answered).
        lost, cut = sorted(stored)[:2]
        forget_rows(db, study_uid, [lost, cut])
        cut.write_bytes(stored[cut][:-10])

        node.start("scp")
        wait_port("127.0.0.1", port)
        node.assert_alive()
        assert ledger_rows(db, study_uid) == (3, 3)  # the cut file gets no row
        with sqlite3.connect(db) as conn:
            paths = {row[0] for row in conn.execute("select path from instances")}
        assert f"{study_uid}/{lost.name}" in paths and f"{study_uid}/{cut.name}" not in paths
        assert lost.read_bytes() == stored[lost]
        assert not journal.exists()
        log = node.log_text()
        assert "1 ledger row(s) restored" in log and "1 unacknowledged instance(s) skipped" in log
