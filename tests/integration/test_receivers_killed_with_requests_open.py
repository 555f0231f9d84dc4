"""A web process killed (kill -9) while it records the end of a STOW-RS request, and a
retrieval process killed in the middle of a C-GET: the studies they were receiving stayed
counted as being sent (``open_associations``), and completed only by ``completion.max_wait_s``
(turnaround: two minutes instead of a second), their files kept for an hour. Each process now
counts its requests under its own name; a process that finds it gone (the web app or the
retrieval service started again, the completion loop's sweep) releases them, and the studies
complete by the quiet period. On SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy import select

from acwi_node.config import Settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.holders import HOLDERS_DIR
from acwi_node.ingest.retrieval import RetrievalService
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import AssociationHold
from acwi_node.ledger.retrievals import Retrievals
from acwi_node.web.api import create_app
from tests.support.dx import make_dx
from tests.support.node import wait_port
from tests.support.polling import until
from tests.support.ports import free_port
from tests.support.review_case import PASSWORD, add_user
from tests.support.study_flow import study_row

pytestmark = pytest.mark.integration

BOUNDARY = "acwi-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

#: The web app in its own process; the request's end is never recorded: the process is killed
#: right then (here: it waits there until it is).
WEB_PROCESS = """
import json, sys, time
import uvicorn
from acwi_node.config import load_settings
from acwi_node.ledger import Ledger
from acwi_node.web.api import create_app
node, port = json.loads(sys.argv[1])
settings = load_settings(None, node=node, ingest={"fsync": False})
Ledger.association_released = lambda *args, **kwargs: time.sleep(600)
uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
"""

#: The retrieval service in its own process.
RETRIEVAL_PROCESS = """
import json, sys, time
from acwi_node.config import load_settings
from acwi_node.ingest.retrieval import RetrievalService
from acwi_node.ledger import Ledger
node, sources = json.loads(sys.argv[1])
settings = load_settings(None, node=node, ingest={"fsync": False}, sources=sources)
RetrievalService(settings, Ledger(settings.database_url)).start()
time.sleep(600)
"""


def open_count(ledger: Ledger, uid: str) -> int | None:
    found = study_row(ledger, uid)
    return None if found is None else found.open_associations


def holders(ledger: Ledger) -> list[str]:
    with ledger.session() as s:
        return sorted(str(h) for h in s.scalars(select(AssociationHold.holder)).all())


def node_of(settings: Settings, ledger_url: str) -> dict[str, object]:
    node: dict[str, object] = {"data_dir": str(settings.data_dir)}
    if ledger_url.startswith("postgresql"):
        node["database_url"] = ledger_url
    return node


def part10(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def stuck(ledger: Ledger, uid: str) -> None:
    """Nobody recorded the end: the study is counted open and not due, however long waited."""
    time.sleep(0.2)
    assert open_count(ledger, uid) == 1
    assert ledger.studies_due(quiet_period_s=0, max_wait_s=3600) == []


def due(ledger: Ledger, uid: str) -> None:
    """Released, as if the request had been aborted: due by the quiet period."""
    found = study_row(ledger, uid)
    assert found is not None and found.open_associations == 0
    assert ledger.studies_due(quiet_period_s=0, max_wait_s=3600) == [(found.id, 1)]
    assert holders(ledger) == []


def test_a_web_process_killed_before_recording_a_stow_requests_end(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = ledger_node
    add_user(ledger, "pacs", role="sender")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WEB_PROCESS,
            json.dumps([node_of(settings, settings.database_url), port]),
        ],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    study_uid = generate_uid()
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part10(make_dx(study_uid))
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    auth = base64.b64encode(f"pacs:{PASSWORD}".encode()).decode()

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # killed before it answers
            httpx.post(
                f"http://127.0.0.1:{port}/dicomweb/studies",
                content=body,
                headers={"Content-Type": MULTIPART, "Authorization": f"Basic {auth}"},
                timeout=60,
            )

    sender = threading.Thread(target=send, daemon=True)
    try:
        wait_port("127.0.0.1", port, timeout_s=60)
        sender.start()
        until(lambda: open_count(ledger, study_uid) == 1)  # recorded; its end never is
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    sender.join(timeout=30)
    stuck(ledger, study_uid)
    (name,) = holders(ledger)
    assert name.startswith("stow-")
    assert (settings.spool_dir / HOLDERS_DIR / name).exists()

    # The web app starts again: it releases what its killed predecessor held.
    with TestClient(create_app(settings, ledger), base_url="https://node.example"):
        due(ledger, study_uid)
        assert not (settings.spool_dir / HOLDERS_DIR / name).exists()


class SlowGetPacs:
    """A Q/R SCP that answers a C-GET of a study by sending its first instance, then waits
    (a long transfer) until :attr:`go_on` is set."""

    def __init__(self, study_uid: str) -> None:
        self.study_uid = study_uid
        self.instances = [make_dx(study_uid) for _ in range(3)]
        self.go_on = threading.Event()
        self.port = free_port()
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(cx.abstract_syntax, scu_role=True, scp_role=True)

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        answer = Dataset()
        answer.QueryRetrieveLevel = "STUDY"
        answer.StudyInstanceUID = self.study_uid
        yield 0xFF00, answer

    def _get(self, event: evt.Event) -> Iterator[Any]:
        yield len(self.instances)
        for index, ds in enumerate(self.instances):
            yield 0xFF00, ds
            if index == 0:
                self.go_on.wait(120)

    def __enter__(self) -> SlowGetPacs:
        self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.go_on.set()
        self.ae.shutdown()


def test_a_retrieval_process_killed_in_the_middle_of_a_c_get(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = ledger_node
    study_uid = generate_uid()
    with SlowGetPacs(study_uid) as pacs:
        sources = [
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "retrieve_with": "get",
            }
        ]
        Retrievals(ledger).request("pacs", {"study_uid": study_uid})
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RETRIEVAL_PROCESS,
                json.dumps([node_of(settings, settings.database_url), sources]),
            ],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            until(lambda: open_count(ledger, study_uid) == 1)  # the first instance came
            proc.kill()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    stuck(ledger, study_uid)
    (name,) = holders(ledger)
    assert name.startswith("retrieval-")

    # The scp process's completion loop finds the process gone and releases what it held.
    loop = CompletionService(settings, ledger, Celery("acwi-test-holders", broker="memory://"))
    loop.tick()
    due(ledger, study_uid)
    assert not (settings.spool_dir / HOLDERS_DIR / name).exists()
    # A retrieval service started again finds nothing more to release.
    service = RetrievalService(settings, ledger)
    service.start()
    service.stop()
    due(ledger, study_uid)
