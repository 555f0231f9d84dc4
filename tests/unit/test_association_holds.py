"""An SCP process that stops without recording the end of its associations (killed, out of
memory, a power loss): the next process to start releases them, as if they had been aborted,
and their studies complete by the quiet period. On SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from acwi_node.config import Settings
from acwi_node.ingest.journal import JOURNAL_DIR
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import AssociationHold, Study
from tests.support.study_flow import dx_record, study_id

#: The journal a killed SCP process left: its lock held by nobody.
DEAD = "4242-deadbeef"


def open_counts(ledger: Ledger) -> dict[str, int]:
    with ledger.session() as s:
        rows = s.execute(select(Study.study_uid, Study.open_associations)).all()
    return {str(uid): int(count) for uid, count in rows}


def holds(ledger: Ledger) -> set[tuple[str, str, int]]:
    with ledger.session() as s:
        rows = s.execute(
            select(Study.study_uid, AssociationHold.holder, AssociationHold.count).join(
                Study, Study.id == AssociationHold.study_id
            )
        ).all()
    return {(str(uid), str(holder), int(count)) for uid, holder, count in rows}


def dead_journal(settings: Settings) -> Path:
    """The journal directory of a process that is gone (no segment left: nothing to replay)."""
    directory = settings.spool_dir / JOURNAL_DIR / DEAD
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    return directory


@pytest.fixture
def scps(ledger_node: tuple[Settings, Ledger]) -> Iterator[list[StorageSCP]]:
    started: list[StorageSCP] = []
    yield started
    for scp in started:
        scp.stop()


def start(settings: Settings, ledger: Ledger, scps: list[StorageSCP]) -> StorageSCP:
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.open_journal()  # what start() does first: replays the journals of stopped processes
    scps.append(scp)
    return scp


def test_a_stopped_process_s_open_associations_are_released_when_another_starts(
    ledger_node: tuple[Settings, Ledger], scps: list[StorageSCP]
) -> None:
    settings, ledger = ledger_node
    live = start(settings, ledger, scps)
    assert live.journal is not None
    alive = live.journal.directory.name
    journal = dead_journal(settings)  # of a process that ran beside it, killed since

    def opened(study: str, sop: str, holder: str) -> None:
        """The first instance of ``study`` on an association of ``holder``."""
        ledger.record_instances([(dx_record(study, sop), True)], holder=holder)

    # 1.2.1: the killed process and a live one each had an association sending it.
    opened("1.2.1", "1.2.1.1", DEAD)
    opened("1.2.1", "1.2.1.2", alive)
    # 1.2.2: two associations of the killed process; 1.2.3: one it ended before it was killed.
    opened("1.2.2", "1.2.2.1", DEAD)
    opened("1.2.2", "1.2.2.2", DEAD)
    opened("1.2.3", "1.2.3.1", DEAD)
    ledger.association_released([study_id(ledger, "1.2.3")], holder=DEAD)
    assert open_counts(ledger) == {"1.2.1": 2, "1.2.2": 2, "1.2.3": 0}
    assert holds(ledger) == {("1.2.1", DEAD, 1), ("1.2.1", alive, 1), ("1.2.2", DEAD, 2)}
    # Counted open, a study completes only by the upper bound on waiting.
    assert ledger.studies_due(quiet_period_s=0, max_wait_s=3600) == [(study_id(ledger, "1.2.3"), 1)]

    start(settings, ledger, scps)  # a process starts: the killed one's journal is orphaned

    assert not journal.exists()
    assert open_counts(ledger) == {"1.2.1": 1, "1.2.2": 0, "1.2.3": 0}
    assert holds(ledger) == {("1.2.1", alive, 1)}  # the live process's association stays
    due = dict(ledger.studies_due(quiet_period_s=0, max_wait_s=3600))
    assert set(due) == {study_id(ledger, "1.2.2"), study_id(ledger, "1.2.3")}
    ledger.complete_study(study_id(ledger, "1.2.2"), 1, lambda _: [], by="quiet_period")
    with ledger.session() as s:
        released = s.scalars(select(Study).where(Study.study_uid == "1.2.2")).one()
        assert released.completed_by == "quiet_period"
        assert released.last_released_at is not None

    # The live process's association ends as usual; releasing the gone one again is a no-op.
    ledger.association_released([study_id(ledger, "1.2.1")], holder=alive)
    assert ledger.release_holder(DEAD) == []
    assert open_counts(ledger)["1.2.1"] == 0 and holds(ledger) == set()
    # Two associations of one process: each end counts one.
    opened("1.2.4", "1.2.4.1", alive)
    opened("1.2.4", "1.2.4.2", alive)
    assert holds(ledger) == {("1.2.4", alive, 2)}
    ledger.association_released([study_id(ledger, "1.2.4")], holder=alive)
    assert open_counts(ledger)["1.2.4"] == 1 and holds(ledger) == {("1.2.4", alive, 1)}
    ledger.association_released([study_id(ledger, "1.2.4")], holder=alive)
    assert open_counts(ledger)["1.2.4"] == 0 and holds(ledger) == set()


def test_two_processes_releasing_one_stopped_process_release_each_association_once(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """Two processes finding the same orphan at once (the journal's lock keeps them apart on
    one host; the ledger on its own, should it not): each hold is released once."""
    _, ledger = ledger_node
    for n in range(20):
        ledger.record_instances([(dx_record(f"1.3.{n}", f"1.3.{n}.1"), True)], holder=DEAD)
        ledger.record_instances(
            [(dx_record(f"1.3.{n}", f"1.3.{n}.2"), True)], holder="4243-cafecafe"
        )
    released: list[list[int]] = []
    threads = [
        threading.Thread(target=lambda: released.append(ledger.release_holder(DEAD)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(r) for r in released) == [0, 20]
    assert set(open_counts(ledger).values()) == {1}
