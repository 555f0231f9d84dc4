"""``acwi-node scp`` with ``ingest.processes = 2``: listener processes killed (SIGKILL) while
studies arrive on several associations at once, and the ``scp`` process itself killed.

A listener killed under load leaves instances it acknowledged without their ledger rows, and
associations counted open under its name. Here its restarts are killed too while they start
(a listener that keeps failing): only the completion loop of the ``scp`` process replays its
journal, and every study must complete once, with every instance acknowledged for it, its
spool file holding the bytes sent. Without that replay the killed listener's journal stays
while it is down and its associations stay open: its studies complete only by
``completion.max_wait_s``, without the instances it had not recorded, and re-open once a
listener starts and replays them.

The ``scp`` process killed while its listeners were still starting: they read their parent
process id once started, already init's, never noticed that their parent was gone, and kept
the DICOM port, so that the ``scp`` process started again could not bind it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Instance, Study
from tests.support.node import NodeProcesses, write_config
from tests.support.polling import until
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
VERIFICATION = UID("1.2.840.10008.1.1")

STUDIES = 24
PER_STUDY = 15
SENDERS = 6


def ct_image(study_uid: str, series_uid: str, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.Modality = "CHAOS1", "Chaos^Test", "CT"
    ds.StudyDate, ds.InstanceNumber = "20260101", number
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng().integers(0, 4095, (16, 16), np.uint16).tobytes()
    return ds


def listener_pids(parent: int) -> list[int]:
    out = subprocess.run(
        ["ps", "--ppid", str(parent), "-o", "pid=,args="],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "acwi_node.cli scp" in line]


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sockets_of(pid: int) -> int:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    count = 0
    for fd in fds:
        with_link = f"/proc/{pid}/fd/{fd}"
        with contextlib.suppress(OSError):
            count += os.readlink(with_link).startswith("socket:")
    return count


def echoes(port: int) -> bool:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="ACWI")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


class Senders:
    """Send studies on ``SENDERS`` associations at once; an instance whose association dies
    before its answer is sent again on a new one. Records what was acknowledged."""

    def __init__(self, port: int, studies: list[list[Dataset]]) -> None:
        self.port = port
        self.todo = list(studies)
        self.acked: dict[str, Dataset] = {}
        self.unsent: list[str] = []
        self.lock = threading.Lock()

    def send_study(self, images: list[Dataset]) -> None:
        pending = list(images)
        for _ in range(100):
            if not pending:
                return
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            assoc = ae.associate("127.0.0.1", self.port, ae_title="ACWI")
            if not assoc.is_established:
                time.sleep(0.1)
                continue
            while pending:
                status = assoc.send_c_store(pending[0])
                if not status or int(status.Status) != 0:
                    break  # the association died: not acknowledged, sent again
                sent = pending.pop(0)
                with self.lock:
                    self.acked[str(sent.SOPInstanceUID)] = sent
            if assoc.is_established:
                assoc.release()
        self.unsent.extend(str(ds.SOPInstanceUID) for ds in pending)

    def run(self) -> None:
        while True:
            with self.lock:
                if not self.todo:
                    return
                images = self.todo.pop(0)
            self.send_study(images)


def test_no_acknowledged_instance_is_lost_when_a_listener_is_killed_under_load(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "data_dir": str(tmp_path / "data"),
                "dicom_host": "127.0.0.1",
                "dicom_port": port,
                "http_port": free_port(),
            },
            "ingest": {"processes": 2, "fsync": False},
            "completion": {"quiet_period_s": 2.0, "max_wait_s": 5.0},
        },
    )
    studies = []
    for _ in range(STUDIES):
        study_uid, series_uid = generate_uid(), generate_uid()
        studies.append([ct_image(study_uid, series_uid, n + 1) for n in range(PER_STUDY)])
    senders = Senders(port, studies)
    with NodeProcesses(config, ["scp"], tmp_path) as node:
        parent = node.procs["scp"].pid
        # Every listener accepts (the scp process says "ready" once both said so).
        until(lambda: f"[scp {parent}] ready" in node.logs["scp"].read_text(), timeout_s=60)
        threads = [threading.Thread(target=senders.run) for _ in range(SENDERS)]
        for t in threads:
            t.start()
        # Kill the busier listener once the load runs, then its restarts while they start
        # (a listener that keeps failing), to the end: only the completion loop replays the
        # killed listener's journal and releases its associations.
        until(lambda: len(senders.acked) >= 40, timeout_s=30)
        first = listener_pids(parent)
        victim = max(first, key=sockets_of)
        survivor = next(pid for pid in first if pid != victim)
        os.kill(victim, signal.SIGKILL)
        done = threading.Event()

        def keep_failing() -> None:
            while not done.wait(0.05):
                for pid in listener_pids(parent):
                    if pid != survivor:
                        os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=keep_failing)
        killer.start()
        try:
            for t in threads:
                t.join()
            assert senders.unsent == []
            assert len(senders.acked) == STUDIES * PER_STUDY
            ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}")
            try:

                def settled() -> bool:
                    with ledger.session() as s:
                        states = s.scalars(select(Study.state)).all()
                    return len(states) == STUDIES and all(st.value != "receiving" for st in states)

                until(settled, timeout_s=30)
                time.sleep(2.0)  # a late replay would re-open a study now
                with ledger.session() as s:
                    rows = {i.sop_instance_uid: i.path for i in s.scalars(select(Instance))}
                    found = [
                        (st.study_uid, st.generation, st.instance_count)
                        for st in s.scalars(select(Study))
                    ]
            finally:
                ledger.dispose()
            spool = tmp_path / "data" / "spool"
            # The killed listener's journal was replayed and removed while it stayed down.
            journals = {p.name.split("-")[0] for p in (spool / ".journal").iterdir()}
            assert journals == {str(survivor)}
            assert echoes(port)
            node.assert_alive()
        finally:
            done.set()
            killer.join()
    missing = [uid for uid in senders.acked if uid not in rows]
    assert missing == [], f"{len(missing)} acknowledged instance(s) not in the ledger"
    for uid, ds in senders.acked.items():
        stored = dcmread(BytesIO((spool / rows[uid]).read_bytes()))
        assert stored.SOPInstanceUID == uid
        assert stored.PixelData == ds.PixelData
    # Each study completed once, with every instance acknowledged for it.
    assert [f for f in found if f[1:] != (1, PER_STUDY)] == []


def test_listeners_stop_when_the_scp_process_is_killed_while_they_start(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "acwi-node.toml",
        {
            "node": {
                "data_dir": str(tmp_path / "data"),
                "dicom_host": "127.0.0.1",
                "dicom_port": port,
                "http_port": free_port(),
            },
            "ingest": {"processes": 2, "fsync": False},
        },
    )
    with NodeProcesses(config, ["scp"], tmp_path) as node:
        first = node.procs["scp"]
        listeners: list[int] = []

        def started() -> bool:
            listeners[:] = listener_pids(first.pid)
            return len(listeners) == 2

        until(started, timeout_s=30)
        first.kill()  # while its listeners import and open the ledger
        first.wait(timeout=10)
        try:
            until(lambda: not any(running(pid) for pid in listeners), timeout_s=30)
            node.start("scp")
            until(lambda: echoes(port), timeout_s=60)
            node.assert_alive()
        finally:
            for pid in listeners:
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
