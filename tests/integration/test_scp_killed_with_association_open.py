"""An SCP process killed (kill -9) while an association sends a study: its association is
never recorded as ended, and the study stayed counted as being sent for good (every later
sending of it completed only by ``completion.max_wait_s``). The next SCP process to start
finds the killed one's journal and releases its associations; the study completes by the
quiet period. On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.journal import JOURNAL_DIR
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
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
