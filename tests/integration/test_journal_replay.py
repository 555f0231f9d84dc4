"""Replaying an orphaned ingest journal: its ledger look-ups and rows are batched."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from acwi_node.config import Settings
from acwi_node.ingest.orphans import OrphanedJournals
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger

#: Journals ``records`` (metas, each instance 200 bytes), then dies without a checkpoint.
_CRASHING_WRITER = """
import json, os, sys
from pathlib import Path
from acwi_node.ingest.journal import IngestJournal
journal = IngestJournal(
    Path(sys.argv[1]), Path(sys.argv[2]), lambda: None, checkpoint_s=3600, fsync=False
)
journal.open()
for meta in json.load(sys.stdin):
    ticket = journal.write(meta, bytes(200))
    journal.wait_durable(ticket)
    journal.done(ticket)
os._exit(1)
"""


def crashed_journal(spool_root: Path, metas: list[dict[str, Any]]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(spool_root / ".journal"), str(spool_root)],
        input=json.dumps(metas),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1, out.stderr


def small_instances(n: int, studies: int) -> list[dict[str, Any]]:
    metas = []
    for i in range(n):
        study = f"1.2.826.0.1.77.{i % studies}"
        sop = f"{study}.{i}"
        metas.append(
            {
                "study_uid": study,
                "sop_instance_uid": sop,
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
                "series_uid": f"{study}.1",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "modality": "OT",
                "body_part": "",
                "path": f"{study}/{sop}.dcm",
                "size": 200,
                "calling_ae": "SENDER",
            }
        )
    return metas


@contextmanager
def counted() -> Iterator[dict[str, int]]:
    """Statements run through SQLAlchemy, and connections taken from a pool (one per
    transaction, those on the DB-API connection included), by every engine meanwhile."""
    counts = {"statements": 0, "transactions": 0}

    def statement(*_: object) -> None:
        counts["statements"] += 1

    def checkout(*_: object) -> None:
        counts["transactions"] += 1

    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Pool, "checkout", checkout)
    try:
        yield counts
    finally:
        event.remove(Engine, "before_cursor_execute", statement)
        event.remove(Pool, "checkout", checkout)


def test_a_replay_looks_up_and_writes_the_ledger_in_batches(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A journal of 1,200 small instances (a power loss in a burst) costs a few ledger
    queries and transactions per 500 instances, not three per instance: whether their rows
    are missing (a crash) or there (a clean stop that left the journal unlocked)."""
    settings, ledger = ledger_node
    n = 1200
    metas = small_instances(n, studies=3)
    spool = Spool(settings.spool_dir, fsync=False)
    orphans = OrphanedJournals(spool, ledger, fsync=False)
    for restored in (n, 0):
        crashed_journal(settings.spool_dir, metas)
        with counted() as counts:
            report = orphans.replay_stopped()
        assert (report.journals, report.instances, report.recorded) == (1, n, restored)
        assert not report.failed
        # A look-up of instances and one of purges per 500, a transaction per 500 rows, and
        # the release: O(n / 500), where each record took three transactions before.
        assert counts["statements"] <= 12, counts
        assert counts["transactions"] <= 12, counts
    for meta in metas[:: n // 10]:
        assert ledger.instance_file(meta["sop_instance_uid"]) == (
            meta["path"],
            200,
            meta["transfer_syntax_uid"],
        )
        assert (settings.spool_dir / meta["path"]).read_bytes() == bytes(200)
    assert list((settings.spool_dir / ".journal").iterdir()) == []
