"""An SCP process that stops without recording the end of its associations (killed, out of
memory, a power loss): the next process to start releases them, as if they had been aborted,
and their studies complete by the quiet period. On SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.holders import HOLDERS_DIR, HolderName, release_gone, release_gone_holders
from acwi_node.ingest.journal import JOURNAL_DIR
from acwi_node.ingest.retrieval import RetrievalService
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import AssociationHold, Study
from acwi_node.web.api import create_app
from tests.support.dx import make_dx
from tests.support.ports import free_port
from tests.support.review_case import PASSWORD, add_user
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


# ------------------------------------------------ STOW-RS requests and retrievals (holders)
BOUNDARY = "acwi-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def stow_body(study_uid: str) -> bytes:
    out = DicomBytesIO()
    dcmwrite(out, make_dx(study_uid), enforce_file_format=True)
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + out.getvalue()
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def ledger_down_once(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next request's end cannot be recorded: the ledger is down just then."""
    real = ledger.association_released

    def fails(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(ledger, "association_released", real)
        raise OperationalError("UPDATE studies", None, Exception("connection refused"))

    monkeypatch.setattr(ledger, "association_released", fails)


def test_a_web_process_stopping_releases_a_request_end_it_could_not_record(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger down when a STOW-RS request ended: the study stayed counted open until
    ``completion.max_wait_s``, and for good as far as retention goes (an hour). The process
    names its share; stopping cleanly, it releases it."""
    settings, ledger = ledger_node
    add_user(ledger, "pacs", role="sender")
    auth = base64.b64encode(f"pacs:{PASSWORD}".encode()).decode()
    with TestClient(create_app(settings, ledger), base_url="https://node.example") as client:
        ledger_down_once(ledger, monkeypatch)
        answer = client.post(
            "/dicomweb/studies",
            content=stow_body("1.2.9"),
            headers={"Content-Type": MULTIPART, "Authorization": f"Basic {auth}"},
        )
        assert answer.status_code == 200  # stored; only its end is not recorded
        assert open_counts(ledger) == {"1.2.9": 1}
        ((_, name, count),) = holds(ledger)
        assert (
            count == 1
            and name.startswith("stow-")
            and (settings.spool_dir / HOLDERS_DIR / name).exists()
        )
    assert open_counts(ledger) == {"1.2.9": 0} and holds(ledger) == set()
    assert list((settings.spool_dir / HOLDERS_DIR).iterdir()) == []
    assert ledger.studies_due(quiet_period_s=0, max_wait_s=3600) == [(study_id(ledger, "1.2.9"), 1)]


def test_a_retrieval_service_stopping_releases_a_c_get_end_it_could_not_record(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, ledger = ledger_node
    service = RetrievalService(settings, ledger)
    ledger_down_once(ledger, monkeypatch)
    data = stow_body("1.2.8")
    start = data.index(b"\r\n\r\n") + 4
    part = memoryview(data)[start : data.rindex(b"\r\n--")]
    result = service.receiver.receive([part], sender="PACS", address="127.0.0.1")
    assert result.stored and open_counts(ledger) == {"1.2.8": 1}
    service.stop()  # never started: nothing under way
    assert open_counts(ledger) == {"1.2.8": 0} and holds(ledger) == set()


def test_a_clean_stop_with_the_ledger_still_down_leaves_the_name_for_the_next_sweep(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    root = settings.spool_dir / HOLDERS_DIR
    name = HolderName(root, "stow")
    held = name.name
    ledger.record_instances([(dx_record("1.2.7", "1.2.7.1"), True)], holder=held)

    def down(_: str) -> list[int]:
        raise OperationalError("DELETE FROM association_holds", None, Exception("refused"))

    name.close(down)
    assert (root / held).exists() and open_counts(ledger) == {"1.2.7": 1}
    assert release_gone_holders(settings.spool_dir, down) == 0  # still down: kept
    assert (root / held).exists()
    assert release_gone_holders(settings.spool_dir, ledger.release_holder) == 1
    assert not (root / held).exists() and open_counts(ledger) == {"1.2.7": 0}


def test_a_sweep_takes_only_the_names_of_processes_that_are_gone(tmp_path: Path) -> None:
    root = tmp_path / HOLDERS_DIR
    live = HolderName(root, "stow")
    alive = live.name
    assert live.name == alive  # one name for the process's life
    root.joinpath("retrieval-4242-deadbeef").touch()  # its process is gone: nobody locks it
    root.joinpath(".stow-4243-cafecafe").touch()  # being created
    released: list[str] = []
    assert release_gone(root, released.append) == ["retrieval-4242-deadbeef"]
    assert released == ["retrieval-4242-deadbeef"]
    assert sorted(p.name for p in root.iterdir()) == [".stow-4243-cafecafe", alive]
    # A process that forks a child: the child takes a name of its own.
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(write, live.name.encode())
        os._exit(0)
    os.waitpid(child, 0)
    named = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert named != alive and named.startswith("stow-")
    assert release_gone(root, released.append) == [named]  # the child is gone
    assert alive in {p.name for p in root.iterdir()}


def scp_settings(base: Settings, *, journal: bool) -> Settings:
    return load_settings(
        None,
        node={
            "data_dir": base.data_dir,
            "database_url": base.database_url,
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
        },
        ingest={"fsync": False, "journal": journal},
    )


def send_one(settings: Settings, scp: StorageSCP, study_uid: str) -> None:
    """One instance on an association, released."""
    ds = make_dx(study_uid)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    deadline = time.monotonic() + 20
    while scp.open_associations:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_an_scp_stopping_releases_an_association_end_it_could_not_record(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    """The ledger down when an association ended: its study stayed counted open (a clean stop
    removed the journal, the only name it was held under; without a journal it had none)."""
    base, ledger = ledger_node
    settings = scp_settings(base, journal=journal)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        ledger_down_once(ledger, monkeypatch)
        send_one(settings, scp, "1.2.6")
        assert open_counts(ledger) == {"1.2.6": 1} and len(holds(ledger)) == 1
    finally:
        scp.stop()
    assert open_counts(ledger) == {"1.2.6": 0} and holds(ledger) == set()
    assert not any((settings.spool_dir / JOURNAL_DIR).glob("*"))
    assert not any((settings.spool_dir / HOLDERS_DIR).glob("*"))


def test_an_scp_stopping_with_the_ledger_still_down_leaves_its_journal_to_release_them(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ledger = ledger_node
    settings = scp_settings(base, journal=True)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        ledger_down_once(ledger, monkeypatch)
        send_one(settings, scp, "1.2.5")
        real = ledger.release_holder

        def down(holder: str) -> list[int]:
            monkeypatch.setattr(ledger, "release_holder", real)
            raise OperationalError("DELETE FROM association_holds", None, Exception("refused"))

        monkeypatch.setattr(ledger, "release_holder", down)
    finally:
        scp.stop()
    (kept,) = (settings.spool_dir / JOURNAL_DIR).iterdir()
    assert open_counts(ledger) == {"1.2.5": 1}
    again = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    again.open_journal()  # finds the stopped process's journal and releases what it held
    try:
        assert not kept.exists()
        assert open_counts(ledger) == {"1.2.5": 0} and holds(ledger) == set()
    finally:
        again.stop()
