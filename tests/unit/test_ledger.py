"""The ledger's state machine, on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from acwi_node.config import Route, RouteMatch
from acwi_node.ledger import (
    DeliveryAttempt,
    InstanceRecord,
    Ledger,
    ResultFile,
    RoutedJob,
    StudyFacts,
)
from acwi_node.ledger.models import Hl7Outbound, Instance, Study, StudyState, utcnow
from acwi_node.ledger.repository import SUPERSEDED
from acwi_node.routing.rules import decide_routes, explain_no_route
from tests.support.study_flow import deliver, dx_record

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def rec(study: str = "1.2.3", sop: str = "1.2.3.1", ae: str = "MOD") -> InstanceRecord:
    return dx_record(study, sop, ae=ae)


def test_unflushed_instance_rows_are_seen_at_once_and_flush_keeps_them(db: Ledger) -> None:
    recorded = db.record_instance(rec(sop="1.2.3.7"), first_in_association=True, flushed=False)
    other = Ledger(db.url, create=False)  # another process's view
    try:
        view = other.get_study("1.2.3")
        assert view is not None and view["instances"] == 1
        assert other.instance_file("1.2.3.7") == ("1.2.3/1.2.3.7.dcm", 100, "1.2.840.10008.1.2.1")
        assert other.instance_file("1.2.3.8") is None
    finally:
        other.dispose()
    db.flush()
    again = db.record_instance(rec(sop="1.2.3.7"), first_in_association=False, flushed=False)
    assert again.study_id == recorded.study_id and again.duplicate


def test_a_flush_leaves_the_sqlite_log_to_the_connections_still_open(tmp_path: Path) -> None:
    """The SCP flushes the ledger at each journal checkpoint while its connections stay open;
    then another process (``acwi-node status``) opens the ledger and closes it. Were the
    flush to open and close the database's files itself, the process's SQLite locks on them
    would go with the descriptor (POSIX locks belong to the process), and the other process,
    believing itself the last, would checkpoint and delete the write-ahead log under the
    SCP: the instances it acknowledged next would be committed to a deleted file, lost."""
    database = tmp_path / "ledger.sqlite"
    scp = Ledger(f"sqlite:///{database}")
    try:
        scp.record_instance(rec(sop="1.2.3.1"), first_in_association=True, flushed=False)
        scp.flush()
        status = subprocess.run(
            [sys.executable, "-c", STATUS_READS_THE_LEDGER, str(database)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert Path(f"{database}-wal").exists()
        scp.record_instance(rec(sop="1.2.3.2"), first_in_association=False, flushed=False)
        scp.flush()
    finally:
        scp.dispose()
    after_restart = Ledger(f"sqlite:///{database}", create=False)
    try:
        assert after_restart.instance_file("1.2.3.2") is not None
        view = after_restart.get_study("1.2.3")
        assert view is not None and view["instances"] == 2
    finally:
        after_restart.dispose()


#: Another process opening the ledger, reading it, and closing it (its last connection).
STATUS_READS_THE_LEDGER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM studies").fetchall()
conn.close()
"""


def _study_of(db: Ledger, sop: str) -> tuple[str, int]:
    """The study UID whose row an instance is in, and that study's instance count."""
    with db.session() as s:
        uid, count = s.execute(
            select(Study.study_uid, Study.instance_count)
            .join(Instance, Instance.study_id == Study.id)
            .where(Instance.sop_instance_uid == sop)
        ).one()
    return uid, count


def test_an_instance_sent_again_in_another_study_moves_there(db: Ledger) -> None:
    """One SOP Instance UID names one instance: sent in another study (a PACS that corrected
    the study), the row moves there whole, the study it left counts one instance fewer, and
    the caller learns the earlier copy's file, which the row no longer names."""
    db.record_instance(rec("1.2.3", "1.2.3.1"), first_in_association=True)
    db.record_instance(rec("1.2.3", "1.2.3.2"), first_in_association=False)
    moved = db.record_instance(
        replace(rec("1.2.4", "1.2.3.1", ae="PACS"), series_uid="1.2.4.9", size=321),
        first_in_association=True,
    )
    assert moved.moved_from == "1.2.3/1.2.3.1.dcm" and not moved.duplicate
    assert _study_of(db, "1.2.3.1") == ("1.2.4", 1)
    left = db.get_study("1.2.3")
    assert left is not None and left["instances"] == 1
    assert db.instance_file("1.2.3.1") == ("1.2.4/1.2.3.1.dcm", 321, "1.2.840.10008.1.2.1")
    with db.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == "1.2.3.1")).one()
        assert (row.series_uid, row.calling_ae) == ("1.2.4.9", "PACS")
    again = db.record_instance(rec("1.2.4", "1.2.3.1"), first_in_association=False)
    assert again.duplicate and again.moved_from == ""  # sent again where it is: no move


def test_an_instance_in_two_studies_of_one_batch_ends_in_the_later(db: Ledger) -> None:
    first, second = db.record_instances(
        [(rec("1.2.3", "1.2.3.1"), True), (rec("1.2.4", "1.2.3.1"), True)]
    )
    assert second.moved_from == "1.2.3/1.2.3.1.dcm" and not second.duplicate
    assert first.moved_from == ""
    assert _study_of(db, "1.2.3.1") == ("1.2.4", 1)
    left = db.get_study("1.2.3")
    assert left is not None and left["instances"] == 0


def test_ingest_rows_read_back_through_the_orm_like_its_own(db: Ledger) -> None:
    """record_instance writes its rows with its own SQL: the models must read them unchanged."""
    db.record_instance(rec(sop="1.2.3.1"), first_in_association=True)
    db.record_instance(
        replace(rec(sop="1.2.3.2"), modality="CR", body_part="HAND"), first_in_association=False
    )
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == "1.2.3")).one()
        instances = s.scalars(select(Instance).order_by(Instance.sop_instance_uid)).all()
        assert study.state is StudyState.RECEIVING
        assert (study.generation, study.instance_count, study.open_associations) == (1, 2, 1)
        assert (study.modality, study.body_part, study.calling_ae) == (
            "DX\\CR",
            "CHEST\\HAND",
            "MOD",
        )
        assert study.needs_review is False and study.reason == ""
        assert study.last_released_at is None and study.completed_at is None
        for when in (study.first_received_at, study.last_received_at, study.updated_at):
            assert isinstance(when, dt.datetime)
            assert abs(when - utcnow()) < dt.timedelta(minutes=1)
        assert study.first_received_at <= study.last_received_at
        assert [i.sop_instance_uid for i in instances] == ["1.2.3.1", "1.2.3.2"]
        assert [(i.modality, i.size, i.generation) for i in instances] == [
            ("DX", 100, 1),
            ("CR", 100, 1),
        ]
        assert all(isinstance(i.received_at, dt.datetime) for i in instances)
    # Compared in SQL with times SQLAlchemy writes: the same text format in SQLite.
    due = db.studies_due(quiet_period_s=0, max_wait_s=0)
    assert [sid for sid, _ in due] == [study.id]


def test_a_batch_of_instances_is_recorded_together_or_not_at_all(db: Ledger) -> None:
    """record_instances: the rows of several instances (of several studies, the same instance
    twice) in one transaction, as record_instance would write them one by one; a batch whose
    last row fails leaves none of its rows."""
    other = replace(rec(study="1.2.4", sop="1.2.4.1"), modality="CR")
    batch = [
        (rec(sop="1.2.3.1"), True),
        (other, True),
        (rec(sop="1.2.3.2"), False),
        (replace(rec(sop="1.2.3.1"), size=200), False),  # sent again: the later version
    ]
    recorded = db.record_instances(batch, flushed=False)
    assert [r.duplicate for r in recorded] == [False, False, False, True]
    assert recorded[0].study_id == recorded[2].study_id != recorded[1].study_id
    with db.session() as s:
        studies = {
            st.study_uid: (st.instance_count, st.open_associations, st.modality)
            for st in s.scalars(select(Study))
        }
    assert studies == {"1.2.3": (2, 1, "DX"), "1.2.4": (1, 1, "CR")}
    assert db.instance_file("1.2.3.1") == ("1.2.3/1.2.3.1.dcm", 200, "1.2.840.10008.1.2.1")

    broken = replace(rec(sop="1.2.3.4"), size=None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        db.record_instances([(rec(sop="1.2.3.3"), False), (broken, False)])
    assert db.instance_file("1.2.3.3") is None
    view = db.get_study("1.2.3")
    assert view is not None and view["instances"] == 2


def _rows(db: Ledger, prefix: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The studies and instances under a UID prefix, without ids and times, prefix removed."""
    studies: list[tuple[Any, ...]]
    instances: list[tuple[Any, ...]]
    with db.session() as s:
        studies = [
            (
                st.study_uid.removeprefix(prefix),
                st.state.value,
                st.generation,
                st.modality,
                st.body_part,
                st.instance_count,
                st.open_associations,
            )
            for st in s.scalars(
                select(Study).where(Study.study_uid.startswith(prefix)).order_by(Study.study_uid)
            )
        ]
        uids = {st.id: st.study_uid.removeprefix(prefix) for st in s.scalars(select(Study))}
        instances = [
            (
                i.sop_instance_uid.removeprefix(prefix),
                uids[i.study_id],
                i.path.replace(prefix, ""),
                i.size,
                i.modality,
                i.generation,
            )
            for i in s.scalars(
                select(Instance)
                .where(Instance.sop_instance_uid.startswith(prefix))
                .order_by(Instance.sop_instance_uid)
            )
        ]
    return studies, instances


def test_a_batch_leaves_the_rows_that_its_instances_one_by_one_leave(db: Ledger) -> None:
    """record_instances writes a batch in a few statements: the studies and instances it leaves
    (a new study, a completed one re-opened, modalities gathered, an instance sent again, one
    twice in the batch) and what it returns are those of writing the rows one at a time."""

    def batch(prefix: str) -> list[tuple[InstanceRecord, bool]]:
        def r(study: str, sop: str, **changes: object) -> InstanceRecord:
            return replace(rec(study=prefix + study, sop=prefix + sop), **changes)  # type: ignore[arg-type]

        return [
            (r("1", "1.1"), True),
            (r("2", "2.5", modality="CT", body_part="HEAD"), True),
            (r("1", "1.2", modality="CR"), False),
            (r("2", "2.1", size=300), False),  # recorded before: a new version
            (r("1", "1.1", size=200), False),  # twice in the batch: the later version
            (r("3", "3.1", modality="", body_part=""), True),
            (r("3", "3.2", modality="MR", body_part="KNEE"), False),
        ]

    outcomes: dict[str, list[tuple[int, bool, bool]]] = {}
    for prefix, at_once in (("9.1.", True), ("9.2.", False)):
        earlier = db.record_instance(
            rec(study=prefix + "2", sop=prefix + "2.1"), first_in_association=True
        )
        db.complete_study(earlier.study_id, earlier.generation, route_none)
        rows = batch(prefix)
        if at_once:
            recorded = db.record_instances(rows, flushed=False)
        else:
            recorded = [db.record_instance(r, first_in_association=f) for r, f in rows]
        outcomes[prefix] = [(r.generation, r.reopened, r.duplicate) for r in recorded]
    assert outcomes["9.1."] == outcomes["9.2."]
    assert [o[1] for o in outcomes["9.1."]] == [False, True, False, False, False, False, False]
    assert _rows(db, "9.1.") == _rows(db, "9.2.")
    studies, _ = _rows(db, "9.1.")
    assert studies == [
        ("1", "receiving", 1, "DX\\CR", "CHEST", 2, 1),
        ("2", "receiving", 2, "DX\\CT", "CHEST\\HEAD", 2, 2),
        ("3", "receiving", 1, "MR", "KNEE", 2, 1),
    ]


def watch_statements(db: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    """Every statement run on the ledger's raw connections from now on (the ingest path's):
    ``execute`` or ``executemany``, the SQL and its parameters."""
    seen: list[tuple[str, str, Any]] = []
    raw_connection = db.engine.raw_connection

    class Cursor:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def execute(self, sql: str, params: Any = None) -> Any:
            seen.append(("execute", sql, params))
            return self._cur.execute(sql) if params is None else self._cur.execute(sql, params)

        def executemany(self, sql: str, params: Any) -> Any:
            seen.append(("executemany", sql, params))
            return self._cur.executemany(sql, params)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

    class Connection:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def cursor(self) -> Cursor:
            return Cursor(self._conn.cursor())

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    monkeypatch.setattr(db.engine, "raw_connection", lambda: Connection(raw_connection()))
    return seen


def test_a_batch_takes_a_few_statements_not_four_per_instance(
    db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 instances of one study: one query for the instances already recorded, one for the
    study, one insert of all the instances, one update of the study (on SQLite, after the
    BEGIN IMMEDIATE that takes the write lock before the reads)."""
    statements = watch_statements(db, monkeypatch)
    db.record_instances([(rec(sop=f"1.2.3.{i}"), i == 0) for i in range(32)])
    if not db._ingest_sql.postgresql:
        assert statements.pop(0)[1] == "BEGIN IMMEDIATE"
    calls = [(kind, len(params) if kind == "executemany" else 1) for kind, _, params in statements]
    assert calls == [
        ("execute", 1),
        ("execute", 1),
        ("execute", 1),
        ("executemany", 32),
        ("execute", 1),
    ]
    view = db.get_study("1.2.3")
    assert view is not None and view["instances"] == 32


def test_a_batch_locks_its_studies_in_uid_order_whatever_order_they_came_in(
    db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the study query locks the row: in one order for every batch, two batches
    sharing studies cannot deadlock."""
    db.record_instance(rec(study="1.2.7", sop="1.2.7.1"), first_in_association=True)
    statements = watch_statements(db, monkeypatch)
    arrivals = ["1.2.9", "1.2.7", "1.2.9", "1.2.8", "1.2.7"]
    recorded = db.record_instances(
        [(rec(study=s, sop=f"{s}.{i + 2}"), i < 3) for i, s in enumerate(arrivals)]
    )
    select_study = db._ingest_sql.select_study
    looked_up = [params["uid"] for _, sql, params in statements if sql == select_study]
    assert looked_up == ["1.2.7", "1.2.8", "1.2.9"]
    ids = {(s, r.study_id) for s, r in zip(arrivals, recorded, strict=True)}
    assert len(ids) == len({s for s, _ in ids}) == 3  # each study one id, each its own
    counts = {
        uid: view["instances"] for uid in ("1.2.7", "1.2.8", "1.2.9") if (view := db.get_study(uid))
    }
    assert counts == {"1.2.7": 3, "1.2.8": 1, "1.2.9": 2}


def test_first_instances_of_a_new_study_arriving_at_once(db: Ledger) -> None:
    """Two associations start the same study together: one creates it, the other retries."""
    errors: list[BaseException] = []

    def send(study: str, sop: str) -> None:
        try:
            db.record_instance(rec(study=study, sop=sop), first_in_association=True)
        except BaseException as exc:  # pragma: no cover - what the test looks for
            errors.append(exc)

    for n in range(10):
        study = f"1.2.9.{n}"
        threads = [threading.Thread(target=send, args=(study, f"{study}.{i}")) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        view = db.get_study(study)
        assert view is not None and view["instances"] == 2
    assert errors == []


def test_only_the_journaled_rows_skip_sqlites_flush(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        ledger.record_instance(rec(), first_in_association=True, flushed=False)
        with ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert ledger._unflushed_engine is not None
        with ledger._unflushed_engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        ledger.dispose()


def route_all(facts: StudyFacts) -> list[RoutedJob]:
    return [RoutedJob(route="chest", model="default", destinations=["pacs"], priority=0)]


def route_none(facts: StudyFacts) -> list[RoutedJob]:
    return []


def test_instances_create_a_receiving_study(db: Ledger) -> None:
    r1 = db.record_instance(rec(sop="1.2.3.1"), first_in_association=True)
    r2 = db.record_instance(rec(sop="1.2.3.2"), first_in_association=False)
    dup = db.record_instance(rec(sop="1.2.3.2"), first_in_association=False)
    assert r1.study_id == r2.study_id == dup.study_id
    assert not r1.duplicate and dup.duplicate
    st = db.get_study("1.2.3")
    assert st is not None
    assert st["state"] == "receiving" and st["instances"] == 2
    assert st["modality"] == "DX" and st["calling_ae"] == "MOD"


def test_open_association_holds_completion_until_released(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=True)
    assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == []
    db.association_released([r.study_id])
    assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == [(r.study_id, 1)]
    assert db.studies_due(quiet_period_s=60, max_wait_s=3600) == []


def test_each_study_of_an_ended_association_counts_one_association_fewer(db: Ledger) -> None:
    a = db.record_instance(rec(study="1.2.3"), first_in_association=True)
    db.record_instance(rec(study="1.2.3", sop="1.2.3.2"), first_in_association=True)
    b = db.record_instance(rec(study="1.2.4", sop="1.2.4.1"), first_in_association=True)
    db.association_released([a.study_id, b.study_id])  # the second association stays open
    assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == [(b.study_id, 1)]
    db.association_released([a.study_id])
    db.association_released([a.study_id, b.study_id])  # one end too many: never below zero
    other = Ledger(db.url, create=False)  # another process sees it, without a flush
    try:
        assert sorted(other.studies_due(quiet_period_s=0, max_wait_s=3600)) == [
            (a.study_id, 1),
            (b.study_id, 1),
        ]
        assert other.studies_due(quiet_period_s=60, max_wait_s=3600) == []
        with other.session() as s:
            counts = s.execute(
                select(Study.open_associations, Study.last_released_at).order_by(Study.id)
            ).all()
        assert [count for count, _ in counts] == [0, 0]
        assert all(isinstance(at, dt.datetime) for _, at in counts)
    finally:
        other.dispose()
    c = db.record_instance(rec(study="1.2.3", sop="1.2.3.3"), first_in_association=True)
    assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == [(b.study_id, 1)]
    assert c.study_id == a.study_id


def test_an_ended_association_locks_its_studies_in_the_order_instance_batches_do(
    postgres_url: str,
) -> None:
    """PostgreSQL: the end of an association locks its studies by UID (byte order), as a batch
    of instance rows does, whatever order their rows are stored in: two associations ending
    together, each updating the same studies in the order its scan met them, deadlocked.
    Here "1.9" is stored first and "1.10" sorts first; while another transaction holds "1.9",
    the end of an association of both must already hold "1.10"."""
    import psycopg

    db = Ledger(postgres_url)
    try:
        later = db.record_instance(rec(study="1.9", sop="1.9.1"), first_in_association=True)
        first = db.record_instance(rec(study="1.10", sop="1.10.1"), first_in_association=True)
        with psycopg.connect(postgres_url) as holder:
            holder.execute("SELECT id FROM studies WHERE study_uid = '1.9' FOR UPDATE")
            ended = threading.Thread(
                target=db.association_released, args=([later.study_id, first.study_id],)
            )
            ended.start()
            try:
                with psycopg.connect(postgres_url) as probe:
                    deadline = time.monotonic() + 10
                    while True:  # until the release holds "1.10" (it then waits for "1.9")
                        try:
                            probe.execute(
                                "SELECT id FROM studies WHERE study_uid = '1.10' FOR UPDATE NOWAIT"
                            )
                            probe.rollback()
                        except psycopg.errors.LockNotAvailable:
                            probe.rollback()
                            break
                        assert time.monotonic() < deadline, "the release never locked 1.10"
                        time.sleep(0.02)
            finally:
                holder.rollback()  # lets the release finish
                ended.join(timeout=10)
        assert not ended.is_alive()
        assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == sorted(
            [(first.study_id, 1), (later.study_id, 1)]
        )
    finally:
        db.dispose()


def test_upper_bound_completes_while_association_stays_open(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=True)
    time.sleep(0.05)
    assert db.studies_due(quiet_period_s=0, max_wait_s=0.01) == [(r.study_id, 1)]


def test_routing_sees_every_modality_and_sop_class_of_the_study(db: Ledger) -> None:
    ct, sr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.33"
    first = db.record_instance(rec(sop="1.2.3.1"), first_in_association=False)
    db.record_instance(rec(sop="1.2.3.2"), first_in_association=False)
    db.record_instance(
        replace(rec(sop="1.2.3.3"), sop_class_uid=ct, modality="CT"), first_in_association=False
    )
    seen: list[StudyFacts] = []

    def remember(facts: StudyFacts) -> list[RoutedJob]:
        seen.append(facts)
        return []

    db.complete_study(first.study_id, 1, remember)
    # A late instance (no modality) re-opens the study: the next decision sees both generations.
    late = db.record_instance(
        replace(rec(sop="1.2.3.4"), sop_class_uid=sr, modality=""), first_in_association=False
    )
    db.complete_study(first.study_id, late.generation, remember)
    assert [(f.modalities, f.sop_classes) for f in seen] == [
        ({"DX", "CT"}, {DX, ct}),
        ({"DX", "CT"}, {DX, ct, sr}),
    ]
    assert seen[0].study_uid == "1.2.3" and seen[0].calling_ae == "MOD"
    assert seen[0].body_parts == {"CHEST"}


def test_routing_sees_every_body_part_of_the_study(db: Ledger) -> None:
    """A study of CHEST and ABDOMEN images is routed on both, whichever came first, as
    ``acwi-node routes check`` reads it (the ledger kept the first alone); one value in another
    case, or with blanks, is the same value; a value that would not fit whole is left out."""
    first = db.record_instance(rec(sop="1.2.3.1"), first_in_association=False)
    for n, part in enumerate(["ABDOMEN", " chest ", "", "PELVIS\\ABDOMEN", "X" * 60], start=2):
        db.record_instance(
            replace(rec(sop=f"1.2.3.{n}"), body_part=part), first_in_association=False
        )
    seen: list[StudyFacts] = []

    def remember(facts: StudyFacts) -> list[RoutedJob]:
        seen.append(facts)
        return []

    db.complete_study(first.study_id, 1, remember)
    assert seen[0].body_parts == {"CHEST", "ABDOMEN", "PELVIS"}
    abdomen = Route(name="abdomen", model="default", match=RouteMatch(body_part=["abdomen"]))
    assert decide_routes([abdomen], seen[0]) != []


def test_study_no_rule_matches_is_not_routed(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    assert db.complete_study(r.study_id, 1, route_none) == []
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "not_routed"
    assert st["reason"] == "no routing rule matches this study"


def test_a_not_routed_studys_reason_says_why_each_route_does_not_match(db: Ledger) -> None:
    """What the completion loop passes as ``explain``: each route's failing condition."""
    routes = [
        Route(name="ct", match=RouteMatch(modality=["CT"])),
        Route(name="site-b", match=RouteMatch(calling_ae=["SITEB"])),
    ]
    r = db.record_instance(rec(), first_in_association=False)
    explain = partial(explain_no_route, routes)
    assert db.complete_study(r.study_id, 1, route_none, explain) == []
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "not_routed"
    assert st["reason"] == (
        "no routing rule matches this study: ct: modality: the study has DX, the route wants"
        " CT; site-b: calling_ae: the study has MOD, the route wants SITEB"
    )


def test_completion_happens_once(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    jobs = db.complete_study(r.study_id, 1, route_all)
    assert len(jobs) == 1
    assert db.complete_study(r.study_id, 1, route_all) == []
    assert db.get_study("1.2.3")["state"] == "queued"  # type: ignore[index]


def _analyse(db: Ledger, job_id: int, needs_review: bool = False) -> None:
    job = db.claim_job(job_id, lease_s=3600)
    assert job is not None
    assert db.claim_job(job_id, lease_s=3600) is None  # a duplicate message is a no-op
    kept = db.finish_analysis(
        job_id,
        results=[
            ResultFile("sr", "2.25.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3/2.25.1.dcm"),
            ResultFile("heatmap", "2.25.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.3/2.25.2.dcm"),
        ],
        summary={
            "needs_review": needs_review,
            "predicted_label": "nodule",
            "probabilities": {"normal": 0.2, "nodule": 0.8},
        },
        needs_review=needs_review,
        review_reason="uncertain" if needs_review else "",
    )
    assert kept


def test_a_jobs_results_are_recorded_in_a_few_batches_in_their_order(db: Ledger) -> None:
    """A CT's hundreds of heatmaps: :meth:`Ledger.finish_analysis` flushes its result rows
    and its outbox rows once each (it flushed every result row on its own, a round trip or
    two per object: 400 heatmaps, 808 statements on PostgreSQL), and the rows are numbered
    in the order of the results, each result's deliveries in its destinations' order."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from acwi_node.ledger.models import Delivery, Result

    def two_destinations(facts: StudyFacts) -> list[RoutedJob]:
        return [RoutedJob(route="chest", model="default", destinations=["a", "b"], priority=0)]

    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, two_destinations)
    assert db.claim_job(job_id, lease_s=3600) is not None
    uids = [f"2.25.{n}" for n in (7, 3, 9, *range(100, 157))]  # not in the order of the UIDs
    results = [ResultFile("heatmap", u, "1.2.840.10008.5.1.4.1.1.7", f"x/{u}.dcm") for u in uids]
    flushes: list[int] = []
    statements: list[str] = []

    def flushed(session: Session, _context: Any) -> None:
        flushes.append(1)

    def executed(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(Session, "after_flush", flushed)
    event.listen(db.engine, "before_cursor_execute", executed)
    try:
        assert db.finish_analysis(
            job_id, results=results, summary={}, needs_review=False, review_reason=""
        )
    finally:
        event.remove(Session, "after_flush", flushed)
        event.remove(db.engine, "before_cursor_execute", executed)
    assert len(flushes) <= 5  # was one per result (60) and more
    if db.engine.dialect.name == "postgresql":  # SQLite's driver inserts a row at a time
        inserts = [q for q in statements if q.lstrip().upper().startswith("INSERT")]
        assert len(inserts) <= 4, inserts  # the results, the deliveries: one batch each
    with db.session() as s:
        rows = s.execute(
            select(Result.id, Result.sop_instance_uid)
            .where(Result.job_id == job_id)
            .order_by(Result.id)
        ).all()
        assert [uid for _, uid in rows] == uids
        number = {rid: n for n, (rid, _) in enumerate(rows)}
        deliveries = s.execute(
            select(Delivery.result_id, Delivery.destination)
            .where(Delivery.job_id == job_id)
            .order_by(Delivery.id)
        ).all()
    assert [(number[rid], dest) for rid, dest in deliveries] == [
        (n, dest) for n in range(len(uids)) for dest in ("a", "b")
    ]


def test_a_result_oru_promised_with_the_results_is_built_once(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    assert db.claim_job(job_id, lease_s=3600) is not None
    results = [ResultFile("sr", "2.25.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3/2.25.1.dcm")]
    assert db.finish_analysis(
        job_id,
        results=results,
        summary={"predicted_label": "nodule"},
        needs_review=False,
        review_reason="",
        hl7_result_control_id="ACWI1RT1",
    )
    promised = db.unbuilt_hl7_outbound(job_id, "result")
    assert promised is not None and promised[1] == "ACWI1RT1"
    assert db.hl7_outbound_to_build() == [(job_id, "result")]
    assert db.due_hl7_outbound() == []  # nothing to send until the message is built
    assert db.fill_hl7_outbound(promised[0], "MSH|...")
    assert not db.fill_hl7_outbound(promised[0], "MSH|other")  # a second builder loses
    assert db.hl7_outbound_to_build() == []
    assert [(d.control_id, d.message) for d in db.due_hl7_outbound()] == [("ACWI1RT1", "MSH|...")]
    assert db.unbuilt_hl7_outbound(job_id, "result") is None


def test_an_hl7_process_that_stalled_past_its_claim_records_nothing_over_the_next_takers(
    db: Ledger,
) -> None:
    """An ``hl7`` process took an ORU^R01 and stalled past its claim; another took it over.
    The first's outcome (a rejection: failed for good) is not recorded; the second's is."""
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    outbound = db.add_hl7_outbound(job_id=job_id, kind="result", control_id="C1", message="MSH|")
    assert outbound is not None
    first = db.claim_hl7_outbound(outbound, lease_s=600)
    assert first is not None
    assert db.claim_hl7_outbound(outbound, lease_s=600) is None  # its claim lasts
    with db.session() as s:  # the first stalls: its claim runs out
        s.execute(update(Hl7Outbound).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
    second = db.claim_hl7_outbound(outbound, lease_s=600)
    assert second is not None and second != first
    rejected = db.record_hl7_attempt(
        outbound, delivered=False, ack_code="AR", error="unknown patient", max_attempts=3,
        backoff_s=1, final=True, claim=first,
    )  # fmt: skip
    assert rejected == SUPERSEDED
    assert [(o["state"], o["attempts"]) for o in db.hl7_outbound("1.2.3")] == [("pending", 0)]
    assert db.record_hl7_attempt(
        outbound, delivered=True, ack_code="AA", error="", max_attempts=3, backoff_s=1,
        claim=second,
    ) == "delivered"  # fmt: skip
    assert [(o["state"], o["attempts"]) for o in db.hl7_outbound("1.2.3")] == [("delivered", 1)]


def test_full_lifecycle_to_delivered(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job_id)
    assert db.get_study("1.2.3")["state"] == "exporting"  # type: ignore[index]
    due = db.due_deliveries()
    assert {d.path for d in due} == {"1.2.3/2.25.1.dcm", "1.2.3/2.25.2.dcm"}
    for d in due:
        db.record_delivery(d.id, delivered=True, status=0, error="", max_attempts=3, backoff_s=1)
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "delivered" and st["status"] == "delivered"
    deliveries = [d for res in st["jobs"][0]["results"] for d in res["deliveries"]]
    assert all(d["state"] == "delivered" and d["last_status"] == 0 for d in deliveries)


def test_each_destination_gets_the_result_kinds_it_takes(db: Ledger) -> None:
    """``[[destinations]] results``: the SR to an archive, everything to the PACS; a
    destination that takes none of a job's objects gets no outbox row, and a job nothing is
    sent for is delivered at once. A verified SR counts as an SR."""
    takes = {"archive": {"sr", "sr-verified"}, "pacs": {"sr", "heatmap"}, "viewer": {"heatmap"}}
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(
        r.study_id,
        1,
        lambda _facts: [RoutedJob("chest", "default", ["archive", "pacs"], 0)],
    )
    assert db.claim_job(job_id, lease_s=3600) is not None
    sr = ResultFile("sr", "2.25.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3/2.25.1.dcm")
    heat = ResultFile("heatmap", "2.25.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.3/2.25.2.dcm")
    assert db.finish_analysis(
        job_id,
        results=[sr, heat],
        summary={},
        needs_review=False,
        review_reason="",
        takes=lambda dest, kind: kind in takes[dest],
    )
    sent = sorted((d.destination, d.path) for d in db.due_deliveries())
    assert sent == [
        ("archive", "1.2.3/2.25.1.dcm"),
        ("pacs", "1.2.3/2.25.1.dcm"),
        ("pacs", "1.2.3/2.25.2.dcm"),
    ]
    for d in db.due_deliveries():
        db.record_delivery(d.id, delivered=True, status=0, error="", max_attempts=3, backoff_s=1)
    assert db.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]
    verified = ResultFile("sr-verified", "2.25.3", sr.sop_class_uid, "1.2.3/2.25.3.dcm")
    assert db.attach_result(job_id, verified, lambda dest, kind: dest == "pacs") == 1
    assert [d.destination for d in db.due_deliveries()] == ["pacs"]
    assert db.attach_result(job_id, verified, lambda dest, kind: False) == 0
    assert db.due_deliveries() == []  # the pending one superseded, none queued
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "delivered"  # nothing left to wait for


def test_a_job_no_destination_takes_anything_of_is_delivered_at_once(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    assert db.claim_job(job_id, lease_s=3600) is not None
    sr = ResultFile("sr", "2.25.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3/2.25.1.dcm")
    assert db.finish_analysis(
        job_id,
        results=[sr],
        summary={},
        needs_review=False,
        review_reason="",
        takes=lambda dest, kind: kind == "heatmap",
    )
    assert db.due_deliveries() == []
    assert db.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]


def test_failed_delivery_backs_off_then_fails_visibly(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job_id)
    due = db.due_deliveries()
    for d in due:
        db.record_delivery(
            d.id,
            delivered=False,
            status=None,
            error="connection refused",
            max_attempts=2,
            backoff_s=60,
        )
    assert db.due_deliveries() == []  # backing off
    assert db.get_study("1.2.3")["state"] == "exporting"  # type: ignore[index]
    for d in due:
        db.record_delivery(
            d.id,
            delivered=False,
            status=0xA700,
            error="out of resources",
            max_attempts=2,
            backoff_s=60,
        )
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "failed"
    assert "0xA700" in st["reason"] and "pacs" in st["reason"]


def test_an_outage_is_waited_out_without_counting_attempts(db: Ledger) -> None:
    """Attempts that could not reach the destination do not count against max_attempts
    while it has been unreachable for less than the patience; an answer from it ends the
    outage; unreachable for longer, the delivery fails saying since when."""
    from acwi_node.ledger.models import Delivery

    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job_id)
    first, second = sorted(db.due_deliveries(), key=lambda d: d.path)

    def down(d_id: int, patience: float = 3600) -> DeliveryAttempt:
        return DeliveryAttempt(
            d_id, False, None, "connection refused", max_attempts=1, backoff_s=0,
            unreachable=True, outage_patience_s=patience,
        )  # fmt: skip

    for _ in range(3):  # max_attempts 1, yet still pending
        db.record_deliveries([down(first.id), down(second.id)])
    again = {d.id: d for d in db.due_deliveries()}
    assert set(again) == {first.id, second.id}
    assert (again[first.id].attempts, again[first.id].outage_attempts) == (0, 3)
    view = db.get_study("1.2.3")
    assert view is not None and view["state"] == "exporting"
    delivery = view["jobs"][0]["results"][0]["deliveries"][0]
    assert delivery["unreachable_since"] and delivery["outage_attempts"] == 3
    # the destination answered (a refusal): the outage is over, that attempt counts
    db.record_deliveries(
        [DeliveryAttempt(second.id, False, 0xA700, "full", max_attempts=2, backoff_s=0)]
    )
    with db.session() as s:
        answered = s.get_one(Delivery, second.id)
        assert (answered.attempts, answered.outage_attempts) == (1, 0)
        assert answered.unreachable_since is None
        # the other has been unreachable for two hours: past the patience, it fails
        s.get_one(Delivery, first.id).unreachable_since = utcnow() - dt.timedelta(hours=2)
    db.record_deliveries([down(first.id)])
    view = db.get_study("1.2.3")
    assert view is not None
    states = {
        d["last_error"][:11]: d["state"]
        for res in view["jobs"][0]["results"]
        for d in res["deliveries"]
    }
    assert states == {"unreachable": "failed", "full": "pending"}
    failed = next(
        d for res in view["jobs"][0]["results"] for d in res["deliveries"]
        if d["state"] == "failed"
    )  # fmt: skip
    assert "(exporter.outage_patience_s): connection refused" in failed["last_error"]
    # patience 0: an unreachable attempt counts like any other
    db.record_deliveries([down(second.id, patience=0)])
    view = db.get_study("1.2.3")
    assert view is not None and view["state"] == "failed"


def test_a_batch_of_attempts_is_recorded_together_and_the_job_follows(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job_id)
    first, second = sorted(db.due_deliveries(), key=lambda d: d.path)
    db.record_deliveries(
        [
            DeliveryAttempt(first.id, True, 0, "", max_attempts=3, backoff_s=1),
            DeliveryAttempt(second.id, False, None, "refused", max_attempts=3, backoff_s=60),
        ]
    )
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "exporting"  # one is still to be delivered
    assert db.due_deliveries() == []  # backing off
    db.record_deliveries(
        [
            DeliveryAttempt(first.id, False, 0xA700, "late", max_attempts=1, backoff_s=0),
            DeliveryAttempt(second.id, False, 0xA700, "full", max_attempts=2, backoff_s=60),
        ]
    )
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "failed" and "0xA700" in st["reason"]
    states = {
        d["last_error"]: d["state"] for res in st["jobs"][0]["results"] for d in res["deliveries"]
    }
    assert states == {"": "delivered", "full": "failed"}  # a final delivery stays as it was


def test_needs_review_creates_a_work_item(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job_id, needs_review=True)
    items = db.worklist()
    assert len(items) == 1 and items[0]["study_uid"] == "1.2.3"
    assert items[0]["reason"] == "uncertain" and items[0]["predicted_label"] == "nodule"
    assert db.get_study("1.2.3")["status"] == "needs_review"  # type: ignore[index]


def test_late_instance_reopens_and_supersedes(db: Ledger) -> None:
    r = db.record_instance(rec(sop="1.2.3.1"), first_in_association=False)
    (old_job,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, old_job, needs_review=True)
    late = db.record_instance(rec(sop="1.2.3.2"), first_in_association=False)
    assert late.reopened and late.generation == 2
    assert db.get_study("1.2.3")["state"] == "receiving"  # type: ignore[index]
    (new_job,) = db.complete_study(r.study_id, 2, route_all)
    st = db.get_study("1.2.3")
    assert st is not None
    states = {j["id"]: j["state"] for j in st["jobs"]}
    assert states == {old_job: "superseded", new_job: "queued"}
    assert db.due_deliveries() == []  # the old job's unsent results are not sent
    assert db.worklist() == []  # the old review item is closed
    study_uid, paths = db.job_inputs(new_job)
    assert study_uid == "1.2.3" and len(paths) == 2


def _senders(db: Ledger, study_id: int) -> tuple[str, str, str]:
    """What routing matches, and the study's first and current generation's senders."""
    st = db.study_facts(study_id)
    view = db.get_study(st.study_uid)
    assert view is not None
    return st.calling_ae, view["calling_ae"], view["generation_calling_ae"]


def test_a_generation_another_ae_sent_is_that_aes(db: Ledger) -> None:
    """A modality sent the study; a PACS sends it again (a changed version of an instance,
    and a new one): the new generation is routed as the PACS's, whose instance re-opened it,
    though the modality sends one more while it is receiving. The study keeps its first
    sender; the instance rows name who sent the version they describe."""
    first = replace(rec(sop="1.2.3.1", ae="MOD1"), crc32=1)
    r = db.record_instance(first, first_in_association=True)
    assert _senders(db, r.study_id) == ("MOD1", "MOD1", "MOD1")
    (job,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job)
    deliver(db)

    again = db.record_instances(
        [
            (replace(first, calling_ae="PACS2", crc32=2), True),
            (rec(sop="1.2.3.2", ae="PACS2"), False),
        ]
    )
    assert again[0].reopened and again[0].generation == 2
    db.record_instance(rec(sop="1.2.3.3", ae="MOD1"), first_in_association=True)
    assert _senders(db, r.study_id) == ("PACS2", "MOD1", "PACS2")
    with db.session() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.calling_ae)).all()
    assert sorted(rows) == [("1.2.3.1", "PACS2"), ("1.2.3.2", "PACS2"), ("1.2.3.3", "MOD1")]
    routed: list[str] = []

    def route_none(facts: StudyFacts) -> list[RoutedJob]:
        routed.append(facts.calling_ae)
        return []

    db.complete_study(r.study_id, 2, route_none)
    assert routed == ["PACS2"]
    # Reprocessed: no new instance, the same sender as the generation before.
    assert db.reprocess_study("1.2.3") == 3
    assert _senders(db, r.study_id) == ("PACS2", "MOD1", "PACS2")
    assert [st["study_uid"] for st in db.list_studies(calling_ae="PACS2")] == ["1.2.3"]
    assert [st["study_uid"] for st in db.list_studies(calling_ae="MOD1")] == ["1.2.3"]
    assert db.list_studies(calling_ae="CT1") == []


def test_an_instance_sent_again_unchanged_leaves_a_study_its_results(db: Ledger) -> None:
    """A PACS that forwards a whole study again (its results came in, a rule fires twice):
    instances with the bytes recorded before re-open nothing while the study has, or is
    getting, its results; a changed one, or one whose bytes are unknown, re-opens it."""
    first = replace(rec(sop="1.2.3.1"), crc32=0xFFFFFFFF)  # unsigned: above a 32-bit int
    second = replace(rec(sop="1.2.3.2"), crc32=7)
    r = db.record_instance(first, first_in_association=True)
    db.record_instance(second, first_in_association=False)
    (job,) = db.complete_study(r.study_id, 1, route_all)
    for step in ("queued", "delivered"):
        if step == "delivered":
            _analyse(db, job, needs_review=True)
            deliver(db)
        again = db.record_instances([(first, True), (second, False)], flushed=False)
        assert [(a.reopened, a.duplicate, a.unchanged) for a in again] == [(False, True, True)] * 2
        st = db.get_study("1.2.3")
        assert st is not None and (st["state"], st["generation"]) == (step, 1)
        assert [j["state"] for j in st["jobs"]] == [step]
    assert [i["study_uid"] for i in db.worklist()] == ["1.2.3"]  # the review item stays

    for changed in (
        replace(first, crc32=1),  # other bytes
        replace(first, size=101),
        replace(first, transfer_syntax_uid="1.2.840.10008.1.2"),
        replace(first, crc32=None),  # journaled by an earlier version: not known
    ):
        assert db.record_instance(changed, first_in_association=False).reopened, changed
        st = db.get_study("1.2.3")
        assert st is not None
        (job,) = db.complete_study(r.study_id, st["generation"], route_all)
        _analyse(db, job)
        deliver(db)
        # From now on this version is the one an instance sent again is compared with.
        resent = db.record_instance(changed, first_in_association=False)
        known = changed.crc32 is not None
        assert (resent.unchanged, resent.reopened) == (known, not known), changed


def _row_bytes(db: Ledger, sop: str) -> tuple[int, int | None]:
    with db.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        return row.size, row.crc32


def test_a_version_whose_file_was_replaced_leaves_the_row_to_the_version_there(
    db: Ledger,
) -> None:
    """Two associations send two versions of one instance at the same moment: their spool
    files land A then B, their rows B then A. The row must describe B, the file there, and
    A (asked, under the study's lock, whether its file is still there) re-opens nothing."""
    a = replace(rec(sop="1.2.3.1"), size=100, crc32=1)
    b = replace(rec(sop="1.2.3.1"), size=200, crc32=2)
    c = replace(rec(sop="1.2.3.2"), crc32=3)

    # A new instance: A's row, coming first, is one B's row updates.
    late = db.record_instances([(a, True), (c, False)], file_is_current=lambda i: i == 1)
    assert late[0].superseded and not late[1].superseded
    assert _row_bytes(db, "1.2.3.1") == (100, None)  # never A's CRC for B's file
    db.record_instances([(b, False)], file_is_current=lambda _: True)
    assert _row_bytes(db, "1.2.3.1") == (200, 2)

    # Known, in a study with its results: B (the bytes recorded) then A.
    db.complete_study(late[0].study_id, 1, route_all)
    (again,) = db.record_instances([(b, True)], file_is_current=lambda _: True)
    assert again.unchanged and not again.reopened
    (stale,) = db.record_instances([(a, True)], file_is_current=lambda _: False)
    assert stale.superseded and stale.duplicate and not stale.reopened and not stale.unchanged
    assert _row_bytes(db, "1.2.3.1") == (200, 2)
    st = db.get_study("1.2.3")
    assert st is not None and (st["state"], st["generation"]) == ("queued", 1)

    # Without the question (a STOW-RS part, a journal replay), the last row wins as before.
    (plain,) = db.record_instances([(a, True)])
    assert not plain.superseded and plain.reopened
    assert _row_bytes(db, "1.2.3.1") == (100, 1)


KOS = "1.2.840.10008.5.1.4.1.1.88.59"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
REPORT_SR = "1.2.840.10008.5.1.4.1.1.88.22"


def test_an_object_no_model_reads_leaves_a_study_its_results(db: Ledger) -> None:
    """A PACS forwards what is stored in the study after the images: a key image note, a
    presentation state, a report. Nothing for a model to read: the study keeps its results
    and its review case, the object is recorded in it; an image re-opens it as before."""
    r = db.record_instance(rec(sop="1.2.3.1"), first_in_association=True)
    (job,) = db.complete_study(r.study_id, 1, route_all)
    objects = [(KOS, "1.2.3.91"), (GSPS, "1.2.3.92"), (REPORT_SR, "1.2.3.93")]
    for step, (sop_class, sop) in zip(("queued", "delivered", "delivered"), objects, strict=True):
        if step == "delivered" and sop_class == GSPS:
            _analyse(db, job, needs_review=True)
            deliver(db)
        kept = db.record_instance(
            replace(rec(sop=sop), sop_class_uid=sop_class), first_in_association=False
        )
        assert (kept.reopened, kept.kept, kept.generation) == (False, True, 1), sop_class
        st = db.get_study("1.2.3")
        assert st is not None and (st["state"], st["generation"]) == (step, 1)
    st = db.get_study("1.2.3")
    assert (
        st is not None
        and st["instances"] == 4
        and [j["state"] for j in st["jobs"]] == ["delivered"]
    )
    assert [i["study_uid"] for i in db.worklist()] == ["1.2.3"]  # the review case stays
    # an image is something to read: it re-opens the study
    late = db.record_instance(rec(sop="1.2.3.2"), first_in_association=False)
    assert (late.reopened, late.kept, late.generation) == (True, False, 2)
    # and a study without results re-opens on anything (the sender may be trying again)
    (job,) = db.complete_study(r.study_id, 2, route_all)
    assert db.claim_job(job, lease_s=3600) is not None
    db.fail_job(job, "analysis failed: no luck")
    again = db.record_instance(
        replace(rec(sop="1.2.3.94"), sop_class_uid=KOS), first_in_association=False
    )
    assert (again.reopened, again.kept) == (True, False)


def test_a_study_without_results_re_opens_on_any_instance(db: Ledger) -> None:
    """Not routed, failed or purged by storage retention: the same instance sent again is
    the sender trying again, and re-opens the study as a late one does."""
    instance = replace(rec(sop="1.2.3.1"), crc32=5)
    r = db.record_instance(instance, first_in_association=True)
    db.complete_study(r.study_id, 1, route_none)
    assert db.get_study("1.2.3")["state"] == "not_routed"  # type: ignore[index]
    assert db.record_instance(instance, first_in_association=False).reopened
    (job,) = db.complete_study(r.study_id, 2, route_all)
    assert db.claim_job(job, lease_s=3600) is not None
    db.fail_job(job, "analysis failed: no luck")
    assert db.record_instance(instance, first_in_association=False).reopened
    (job,) = db.complete_study(r.study_id, 3, route_all)
    _analyse(db, job)
    deliver(db)
    with db.session() as s:  # storage retention deleted its file (a purge empties the path)
        s.execute(update(Instance).values(path=""))
    assert db.record_instance(instance, first_in_association=False).reopened


def test_a_job_whose_worker_dies_every_time_fails_after_its_attempts(db: Ledger) -> None:
    """A study that kills (or hangs) every worker that takes it: each time the lease runs out
    the job is taken again, until ``max_attempts`` claims; then it fails with that reason,
    and the queue is rid of it. A lease still renewed is never taken, nor failed."""
    r = db.record_instance(rec(), first_in_association=False)
    (job,) = db.complete_study(r.study_id, 1, route_all)
    assert db.claim_job(job, lease_s=3600, max_attempts=3) is not None  # attempt 1
    assert db.claim_job(job, lease_s=3600, max_attempts=3) is None  # its worker is alive
    assert db.get_study("1.2.3")["state"] == "analysing"  # type: ignore[index]
    # Its worker dies, and then the next one (lease_s=0: every lease has run out).
    assert db.claim_job(job, lease_s=0, max_attempts=3) is not None  # attempt 2
    assert db.claim_job(job, lease_s=0, max_attempts=3) is not None  # attempt 3
    assert db.claim_job(job, lease_s=0, max_attempts=3) is None
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "failed"
    assert "did not finish in 3 attempt(s)" in st["reason"]
    assert [j["state"] for j in st["jobs"]] == ["failed"]
    assert db.unfinished_jobs() == []
    assert db.claim_job(job, lease_s=0, max_attempts=3) is None  # final: nothing to take
    # An operator's reprocess gives the study a new job, with attempts of its own.
    db.reprocess_study("1.2.3")
    (new_job,) = db.complete_study(r.study_id, 2, route_all)
    assert db.claim_job(new_job, lease_s=0, max_attempts=1) is not None


def test_without_a_limit_a_job_is_taken_again_and_again(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job,) = db.complete_study(r.study_id, 1, route_all)
    for _ in range(5):
        assert db.claim_job(job, lease_s=0) is not None


def test_routing_sees_the_first_study_date_an_instance_had(db: Ledger) -> None:
    """The study's date comes from its first instance that has one (a scanner's secondary
    capture may carry none), as routing's ``max_age_days`` reads it."""
    dates = ["", "20261201", "20200101"]
    for n, date in enumerate(dates):
        r = db.record_instances(
            [(replace(rec(sop=f"1.2.3.{n}"), study_date=date), n == 0)], flushed=True
        )[0]
    seen: list[StudyFacts] = []

    def decide(facts: StudyFacts) -> list[RoutedJob]:
        seen.append(facts)
        return []

    db.complete_study(r.study_id, 1, decide)
    assert [f.study_date for f in seen] == ["20261201"]


def test_failed_job_shows_reason(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    assert db.claim_job(job_id, lease_s=3600) is not None
    db.fail_job(job_id, "nothing to analyse: no image with pixel data")
    st = db.get_study("1.2.3")
    assert st is not None and st["state"] == "failed"
    assert "no image with pixel data" in st["reason"]


def test_reconciler_views(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    assert db.unfinished_jobs() == [job_id]
    assert db.jobs_to_requeue(older_than_s=0, lease_s=3600) == [job_id]
    db.mark_enqueued([job_id])
    assert db.jobs_to_requeue(older_than_s=3600, lease_s=3600) == []
    db.claim_job(job_id, lease_s=3600)
    time.sleep(0.02)
    assert db.jobs_to_requeue(older_than_s=3600, lease_s=0.01) == [job_id]


def test_a_renewed_lease_keeps_the_job_and_a_lapsed_one_frees_it(db: Ledger) -> None:
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    # A lease four times the renewal interval: a flushed commit that stalls on a busy disk
    # must not make a renewed lease look lapsed.
    assert db.claim_job(job_id, lease_s=1.0) is not None
    assert db.claim_job(job_id, lease_s=1.0) is None  # another worker must wait
    for _ in range(3):
        time.sleep(0.25)
        assert db.renew_lease(job_id)
        assert db.claim_job(job_id, lease_s=1.0) is None  # renewed in time: still held
        assert db.jobs_to_requeue(older_than_s=3600, lease_s=1.0) == []
    time.sleep(1.1)  # the holder died: no renewal
    assert db.jobs_to_requeue(older_than_s=3600, lease_s=1.0) == [job_id]
    taken = db.claim_job(job_id, lease_s=1.0)
    assert taken is not None and taken.attempts == 2
    db.fail_job(job_id, "analysis failed: test")
    assert not db.renew_lease(job_id)  # a final job has no lease to renew


def test_lease_keeper_renews_until_stopped(db: Ledger) -> None:
    from acwi_node.tasks.lease import LeaseKeeper

    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    assert db.claim_job(job_id, lease_s=0.3) is not None
    with LeaseKeeper(db, job_id, interval_s=0.05) as keeper:
        time.sleep(0.6)  # twice the lease: only the keeper's renewals hold the job
        assert db.claim_job(job_id, lease_s=0.3) is None
    assert keeper.renewals >= 3
    time.sleep(0.4)
    assert db.claim_job(job_id, lease_s=0.3) is not None


def test_a_shadow_jobs_lease_is_kept_by_its_own_renewal(db: Ledger) -> None:
    """The same keeper holds a shadow job's lease (``renew``), and ends when it is refused."""
    from acwi_node.tasks.lease import LeaseKeeper

    answers = [True, True, False]
    calls: list[int] = []

    def renew(job_id: int) -> bool:
        calls.append(job_id)
        return answers.pop(0) if answers else False

    keeper = LeaseKeeper(db, 41, interval_s=0.02, renew=renew).start()
    deadline = time.monotonic() + 5
    while answers and time.monotonic() < deadline:
        time.sleep(0.02)
    keeper.stop()
    assert calls == [41, 41, 41] and keeper.renewals == 2


def test_a_lease_keeper_logs_a_ledger_outage_once_and_its_end(
    db: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """While the ledger does not answer, the keeper's renewal fails every ``lease_s / 3``: it
    logged "could not renew its lease" each time. It logs as a loop does: the first failure
    with its traceback, then a line a minute, and once a renewal works again."""
    import logging

    from sqlalchemy.exc import OperationalError

    from acwi_node.tasks.lease import LeaseKeeper

    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    assert db.claim_job(job_id, lease_s=30) is not None
    calls = 0
    renewed = threading.Event()

    def renew(renewing: int) -> bool:
        nonlocal calls
        calls += 1
        if calls <= 5:  # the ledger refuses connections
            raise OperationalError("UPDATE jobs", {}, ConnectionRefusedError("connection refused"))
        held = db.renew_lease(renewing)
        renewed.set()
        return held

    with caplog.at_level(logging.INFO, logger="acwi_node.worker"):
        keeper = LeaseKeeper(db, job_id, interval_s=0.01, renew=renew).start()
        try:
            assert renewed.wait(30)
        finally:
            keeper.stop()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info is not None) for r in lines] == [
        (logging.ERROR, True),
        (logging.WARNING, False),
    ]
    assert f"job {job_id}: renewing its lease failed" in lines[0].getMessage()
    assert "works again after 5 failed tries (OperationalError" in lines[1].getMessage()
    assert keeper.renewals >= 1 and not keeper.lost.is_set()


def test_processes_starting_at_once_create_the_sqlite_schema_once(tmp_path: Path) -> None:
    """scp, worker and exporter start together on the embedded ledger: no CREATE TABLE race."""
    import subprocess
    import sys

    from sqlalchemy import create_engine, inspect

    from acwi_node.ledger.models import Base

    for attempt in range(3):  # a race needs luck to show; three fresh databases
        url = f"sqlite:///{tmp_path / f'ledger{attempt}.sqlite'}"
        code = f"from acwi_node.ledger import Ledger; Ledger({url!r}).dispose()"
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        failures = [p.stderr.read() for p in procs if p.wait(timeout=120) != 0]  # type: ignore[union-attr]
        assert failures == []
        engine = create_engine(url)
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
        engine.dispose()


def test_sqlite_commits_survive_a_power_loss(ledger: Ledger) -> None:
    """WAL with synchronous=FULL: every commit is fsynced (NORMAL may lose the last ones)."""
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_a_journal_record_is_older_than_what_the_ledger_settled_since(db: Ledger) -> None:
    """An ingest journal restored from a backup (the scp's replay): a record is left out once
    its instance's row is from the same or a later arrival and describes another file, or once
    its study was purged after it was written; a record never recorded (a crash), or whose
    row is as recorded (its spool file may be lost), or of an earlier version, is replayed."""
    from acwi_node.ledger.models import Purge

    first = dx_record("1.2.3", "1.2.3.1")
    recorded = (first.path, first.size, first.transfer_syntax_uid)
    settled = db.journaled_since_settled
    before = utcnow() - dt.timedelta(seconds=5)
    assert not settled("1.2.3", "1.2.3.1", recorded, before)  # never recorded
    db.record_instance(first, first_in_association=False)
    assert not settled("1.2.3", "1.2.3.1", recorded, before)  # the row as this record left it
    other = (first.path, first.size + 1, first.transfer_syntax_uid)  # another version
    assert settled("1.2.3", "1.2.3.1", other, before)  # an older one: the row came later
    assert not settled("1.2.3", "1.2.3.1", other, utcnow() + dt.timedelta(seconds=5))
    with db.session() as s:  # retention purged the study (its rows keep their times)
        study = s.scalars(select(Study).where(Study.study_uid == "1.2.3")).one()
        s.add(Purge(study_id=study.id, generation=1, reason="age", received_before=utcnow()))
        s.execute(update(Instance).values(path="", received_at=before - dt.timedelta(hours=1)))
    assert settled("1.2.3", "1.2.3.1", recorded, before)  # purged after it was written
    assert settled("1.2.3", "1.2.3.9", recorded, before)  # its row compacted away since
    after = utcnow() + dt.timedelta(seconds=5)  # an arrival after the purge: a new generation
    assert not settled("1.2.3", "1.2.3.9", recorded, after)
