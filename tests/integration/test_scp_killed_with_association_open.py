"""An SCP process killed (kill -9) while an association sends a study: its association is
never recorded as ended, and the study stayed counted as being sent for good (every later
sending of it completed only by ``completion.max_wait_s``). The next SCP process to start
finds the killed one's journal and releases its associations; the study completes by the
quiet period.

Killed after it acknowledged instances whose ledger rows it had not written yet, and not
started again (a listener that keeps failing, a host that stays down): its journal was
replayed only at the next SCP start, so the study completed without them (by
``completion.max_wait_s``, or by the quiet period once another process's association sending
the rest of it was released) and was analysed so. The running ``scp`` process's completion
loop replays it, then releases its associations. On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.journal import JOURNAL_DIR, read_journal
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Instance, Study
from tests.support.dx import make_dx
from tests.support.node import wait_port
from tests.support.polling import until
from tests.support.ports import free_port
from tests.support.study_flow import study_row

pytestmark = pytest.mark.integration

#: A storage SCP alone (no completion loop, no broker) in its own process.
SCP_PROCESS = """
import json, sys
from acwi_node.config import load_settings
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
node, ingest = json.loads(sys.argv[1])
settings = load_settings(None, node=node, ingest=ingest)
scp = StorageSCP(settings, Ledger(settings.database_url), Spool(settings.spool_dir, fsync=False))
scp.start(block=True)
"""

#: The same, killed (here: waiting until it is) after it acknowledged the instances named in
#: its second argument and before it wrote their ledger rows.
SCP_KILLED_BEFORE_ROWS = """
import json, sys, time
from acwi_node.config import load_settings
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
node, unrecorded = json.loads(sys.argv[1])
record_instances = Ledger.record_instances
def record_or_wait(self, batch, *args, **kwargs):
    if any(record.sop_instance_uid in unrecorded for record, _ in batch):
        time.sleep(600)
    return record_instances(self, batch, *args, **kwargs)
Ledger.record_instances = record_or_wait
settings = load_settings(None, node=node, ingest={"fsync": False})
scp = StorageSCP(settings, Ledger(settings.database_url), Spool(settings.spool_dir, fsync=False))
scp.start(block=True)
"""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def node(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[dict[str, object], dict[str, object]]:
    node: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "dicom_host": "127.0.0.1",
        "dicom_port": free_port(),
    }
    if request.param == "postgresql":
        node["database_url"] = request.getfixturevalue("postgres_url")
    return node, {"fsync": False}


@pytest.fixture
def ledger(node: tuple[dict[str, object], dict[str, object]]) -> Iterator[tuple[Settings, Ledger]]:
    settings = load_settings(None, node=node[0], ingest=node[1])
    ledger = Ledger(settings.database_url)
    yield settings, ledger
    ledger.dispose()


def test_the_next_scp_releases_the_association_a_killed_one_left_open(
    node: tuple[dict[str, object], dict[str, object]],
    ledger: tuple[Settings, Ledger],
) -> None:
    settings, db = ledger
    proc = subprocess.Popen(
        [sys.executable, "-c", SCP_PROCESS, json.dumps(node)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assoc = None
    try:
        wait_port("127.0.0.1", settings.node.dicom_port, timeout_s=60)
        study_uid = generate_uid()
        ds = make_dx(study_uid)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        # The row is written once the association is idle; the association stays open.
        until(lambda: (s := study_row(db, study_uid)) is not None and s.open_associations == 1)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if assoc is not None:
            assoc.abort()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    (killed,) = (settings.spool_dir / JOURNAL_DIR).iterdir()
    time.sleep(0.2)
    stuck = study_row(db, study_uid)
    assert stuck is not None and stuck.open_associations == 1  # nobody recorded its end
    assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == []

    scp = StorageSCP(settings, db, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)  # replays the killed process's journal first
    try:
        assert not killed.exists()
        released = study_row(db, study_uid)
        assert released is not None and released.open_associations == 0
        assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == [(released.id, 1)]
        db.complete_study(released.id, 1, lambda _: [], by="quiet_period")
        completed = study_row(db, study_uid)
        assert completed is not None and completed.completed_by == "quiet_period"
    finally:
        scp.stop()


def instance_rows(ledger: Ledger, study_uid: str) -> int:
    with ledger.session() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(Instance)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_uid == study_uid)
            )
            or 0
        )


def receiving(ledger: Ledger, study_uid: str) -> bool:
    found = study_row(ledger, study_uid)
    return found is None or found.state == "receiving"


def associate(port: int, ds: Dataset) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ACWI")
    assert assoc.is_established
    return assoc


def killed_before_rows(
    node: tuple[dict[str, object], dict[str, object]],
    settings: Settings,
    first: list[Dataset],
    unrecorded: list[Dataset],
    recorded: Callable[[], bool],
) -> Path:
    """An SCP process that acknowledges ``first``, then ``unrecorded`` (their rows never
    written), on one association; killed once ``recorded()``. Its journal."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SCP_KILLED_BEFORE_ROWS,
            json.dumps([node[0], [str(ds.SOPInstanceUID) for ds in unrecorded]]),
        ],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assoc = None
    try:
        wait_port("127.0.0.1", settings.node.dicom_port, timeout_s=60)
        assoc = associate(settings.node.dicom_port, (first + unrecorded)[0])
        for ds in first:
            assert int(assoc.send_c_store(ds).Status) == 0
        until(recorded)  # the association idle: the rows of ``first`` are written
        for ds in unrecorded:  # sent one after another: the rows wait for the association
            assert int(assoc.send_c_store(ds).Status) == 0  # acknowledged: journaled
        killed = next(
            p
            for p in (settings.spool_dir / JOURNAL_DIR).iterdir()
            if p.name.startswith(f"{proc.pid}-")
        )
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if assoc is not None:
            assoc.abort()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert len(read_journal(killed)) == len(first) + len(unrecorded)
    return killed


def completion_loop(settings: Settings, db: Ledger, **completion: float) -> CompletionService:
    looping = load_settings(
        None,
        node={"data_dir": str(settings.data_dir), "database_url": settings.database_url},
        ingest={"fsync": False},
        completion=completion,
    )
    return CompletionService(looping, db, Celery("acwi-test-journals", broker="memory://"))


def test_the_completion_loop_replays_a_killed_scp_s_journal_before_releasing_it(
    node: tuple[dict[str, object], dict[str, object]],
    ledger: tuple[Settings, Ledger],
) -> None:
    """Killed with its association open and one acknowledged instance not in the ledger; no
    SCP process starts again. The study used to wait for ``completion.max_wait_s`` and then
    complete with one instance of two."""
    settings, db = ledger
    study_uid = generate_uid()
    first, second = make_dx(study_uid, number=1), make_dx(study_uid, number=2)
    killed = killed_before_rows(
        node, settings, [first], [second], lambda: instance_rows(db, study_uid) == 1
    )
    assert instance_rows(db, study_uid) == 1
    assert db.studies_due(quiet_period_s=0, max_wait_s=3600) == []  # counted open

    loop = completion_loop(settings, db, quiet_period_s=0.0, max_wait_s=3600.0)
    loop.tick()  # its sweep: the journal is replayed, then the association released
    assert not killed.exists()
    assert instance_rows(db, study_uid) == 2
    until(lambda: loop.tick() is not None and not receiving(db, study_uid))
    completed = study_row(db, study_uid)
    assert completed is not None and completed.completed_by == "quiet_period"
    assert completed.open_associations == 0
    assert instance_rows(db, study_uid) == 2
    assert (settings.spool_dir / study_uid / f"{second.SOPInstanceUID}.dcm").is_file()


def test_a_study_is_not_completed_without_what_a_killed_scp_acknowledged_for_it(
    node: tuple[dict[str, object], dict[str, object]],
    ledger: tuple[Settings, Ledger],
) -> None:
    """The killed process wrote no row of the study (no association of it counted open); a
    live process received the rest of the study, and its association was released. The study
    used to complete by the quiet period, between two sweeps, with that one instance of
    three; the completion loop replays the orphaned journal before it completes a study."""
    settings, db = ledger
    live_node = {**node[0], "dicom_port": free_port()}
    live_settings = load_settings(None, node=live_node, ingest=node[1])
    live = StorageSCP(live_settings, db, Spool(settings.spool_dir, fsync=False))
    live.start(block=False)  # running throughout: it replays nothing after its start
    try:
        loop = completion_loop(settings, db, quiet_period_s=0.2, max_wait_s=3600.0)
        loop.tick()  # its sweep: nothing to replay, nothing released
        study_uid = generate_uid()
        dss = [make_dx(study_uid, number=i) for i in (1, 2, 3)]
        killed = killed_before_rows(node, settings, [], dss[:2], lambda: True)
        assert study_row(db, study_uid) is None

        wait_port("127.0.0.1", live_settings.node.dicom_port, timeout_s=30)
        assoc = associate(live_settings.node.dicom_port, dss[2])
        assert int(assoc.send_c_store(dss[2]).Status) == 0
        assoc.release()
        until(lambda: (s := study_row(db, study_uid)) is not None and s.open_associations == 0)
        loop._last_holders_sweep = time.monotonic()  # no sweep before the study is due
        until(lambda: loop.tick() is not None and not receiving(db, study_uid))
        assert instance_rows(db, study_uid) == 3  # was 1: completed without the other two
        completed = study_row(db, study_uid)
        assert completed is not None and completed.completed_by == "quiet_period"
        assert not killed.exists()
    finally:
        live.stop()
