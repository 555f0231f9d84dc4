"""Storage commitment over real associations: the exporter asks a real Orthanc (a Storage
Commitment SCP) to commit the results it stored, Orthanc reports to the node's storage SCP on an
association of its own, and the outbox follows; and the ways a request or a report goes wrong."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt

from acwi_node.config import Settings, load_settings
from acwi_node.export.commitment import STATUS_MISSING_ATTRIBUTE, STATUS_NO_SUCH_EVENT_TYPE
from acwi_node.export.outbox import Exporter, verify_destination, what_it_checks
from acwi_node.export.scu import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    request_commitment,
)
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import DeliveryAttempt, Ledger, ResultFile
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE, write_secondary_capture
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port
from tests.support.study_flow import receive, route_all, study_id

NODE_AE = "ACWI"
STUDY = "1.2.826.0.1.3680043.10.1511.4"


@dataclass
class Node:
    settings: Settings
    ledger: Ledger
    exporter: Exporter

    def deliveries(self) -> dict[str, tuple[str, str]]:
        """Each result's (state, last error) of its delivery to ``pacs``."""
        st = self.ledger.get_study(STUDY)
        assert st is not None
        return {
            res["sop_instance_uid"]: (d["state"], d["last_error"])
            for res in st["jobs"][-1]["results"]
            for d in res["deliveries"]
        }

    def study_state(self) -> str:
        st = self.ledger.get_study(STUDY)
        assert st is not None
        return str(st["state"])

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Run exporter passes until ``check`` holds (reports arrive asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, self.deliveries()
            self.exporter.tick()
            time.sleep(0.05)


@contextmanager
def node_with_pacs(
    tmp_path: Path, host: str, port: int, ae_title: str, *, wait_s: float = 300.0
) -> Iterator[Node]:
    """The node's storage SCP on a free port and an exporter whose destination ``pacs`` is
    asked for storage commitment; a study analysed, with two secondary captures to send."""
    settings = load_settings(
        None,
        node={
            "data_dir": tmp_path / "data",
            "ae_title": NODE_AE,
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
        },
        ingest={"fsync": False, "network_timeout_s": 5, "acse_timeout_s": 5},
        exporter={"backoff_initial_s": 0.01, "backoff_max_s": 0.01, "timeout_s": 10},
        destinations=[
            {"name": "pacs", "ae_title": ae_title, "host": host, "port": port,
             "storage_commitment": True, "commitment_wait_s": wait_s},
        ],
    )  # fmt: skip
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        receive(settings, ledger, STUDY, STUDY + ".1")
        (job_id,) = ledger.complete_study(study_id(ledger, STUDY), 1, route_all)
        assert ledger.claim_job(job_id, lease_s=3600) is not None
        results = []
        for n in (1, 2):
            uid = f"{STUDY}.9{n}"
            path = settings.results_dir / STUDY / f"{uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_secondary_capture(path, study_uid=STUDY, sop_instance_uid=uid, pixel_value=n)
            results.append(
                ResultFile("heatmap", uid, SECONDARY_CAPTURE_IMAGE_STORAGE, f"{STUDY}/{uid}.dcm")
            )
        assert ledger.finish_analysis(
            job_id, results=results, summary={}, needs_review=False, review_reason=""
        )
        yield Node(settings, ledger, Exporter(settings, ledger))
    finally:
        scp.stop()
        ledger.dispose()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    require_orthanc()
    # Orthanc sends its reports to the modality named by the calling AE title: the node,
    # on the port each test's node listens on (set per test below).
    with OrthancServer(node_ae=NODE_AE, node_port=free_port()) as server:
        yield server


@contextmanager
def node_with_orthanc(tmp_path: Path, orthanc: OrthancServer) -> Iterator[Node]:
    with node_with_pacs(tmp_path, "127.0.0.1", orthanc.dicom_port, orthanc.aet) as node:
        # Tell Orthanc where this node listens (its DicomModalities entry, by REST).
        response = orthanc.client.put(
            "/modalities/acwi",
            json={
                "AET": NODE_AE,
                "Host": "127.0.0.1",
                "Port": node.settings.node.dicom_port,
                "AllowStorageCommitment": True,
            },
        )
        response.raise_for_status()
        yield node


def test_results_are_delivered_once_orthanc_commits_them(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    with node_with_orthanc(tmp_path, orthanc) as node:
        node.exporter.tick()  # C-STORE, then the request
        node.wait_for(lambda: node.study_state() == "delivered")
        assert node.deliveries() == {
            f"{STUDY}.91": ("delivered", ""),
            f"{STUDY}.92": ("delivered", ""),
        }


def test_an_instance_orthanc_lacks_is_sent_again_then_committed(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    with node_with_orthanc(tmp_path, orthanc) as node:
        # As if the PACS had lost what it stored: the node asks about objects it does not hold.
        due = node.ledger.due_deliveries()
        node.ledger.record_deliveries(
            [DeliveryAttempt(d.id, True, 0, "", 5, 0, awaits_commitment=True) for d in due]
        )
        for d in due:
            uid = Path(d.path).stem
            found = orthanc.client.post("/tools/lookup", content=uid).json()
            for item in found:
                orthanc.client.delete(f"/instances/{item['ID']}")
        seen: set[str] = set()

        def refused_then_delivered() -> bool:
            for _state, error in node.deliveries().values():
                if "storage commitment refused by pacs" in error:
                    seen.add(error)
            return node.study_state() == "delivered"

        node.wait_for(refused_then_delivered)
        assert any("no such object instance (0x0112)" in e for e in seen), seen
        stored = orthanc.client.post("/tools/lookup", content=f"{STUDY}.91").json()
        assert [item["Type"] for item in stored] == ["Instance"]  # sent again


# ------------------------------------------------------------- a PACS of pynetdicom's
@contextmanager
def fake_pacs(
    on_action: Callable[[evt.Event], tuple[int, Dataset | None]] | None,
) -> Iterator[tuple[int, list[Dataset]]]:
    """A storage SCP that accepts everything and (``on_action`` given) Storage Commitment
    N-ACTIONs; yields its port and the requests it got."""
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(SECONDARY_CAPTURE_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.add_supported_context("1.2.840.10008.1.1")
    requests: list[Dataset] = []
    handlers: list[Any] = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    if on_action is not None:
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)

        def handle(event: evt.Event) -> tuple[int, Dataset | None]:
            requests.append(event.action_information)
            return on_action(event)

        handlers.append((evt.EVT_N_ACTION, handle))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield port, requests
    finally:
        server.shutdown()


def test_a_pacs_refusing_the_request_is_asked_again_then_the_delivery_fails(
    tmp_path: Path,
) -> None:
    with (
        fake_pacs(lambda event: (0x0110, None)) as (port, requests),
        node_with_pacs(tmp_path, "127.0.0.1", port, "FAKEPACS", wait_s=0.01) as node,
    ):
        node.wait_for(lambda: node.study_state() == "failed")
        assert len(requests) == node.settings.exporter.max_attempts
        first = requests[0]
        assert sorted(r.ReferencedSOPInstanceUID for r in first.ReferencedSOPSequence) == [
            f"{STUDY}.91",
            f"{STUDY}.92",
        ]
        assert len({str(r.TransactionUID) for r in requests}) == len(requests)  # new each time
        st = node.ledger.get_study(STUDY)
        assert st is not None
        assert "pacs did not report after 5 request(s)" in st["reason"]
        assert "refused with status 0x0110" in st["reason"]


def test_a_pacs_without_storage_commitment_is_named(tmp_path: Path) -> None:
    with fake_pacs(None) as (port, _requests):
        ds = Dataset()
        ds.TransactionUID = generate_uid()
        ds.ReferencedSOPSequence = []
        result = request_commitment(
            ds, called_ae="FAKEPACS", host="127.0.0.1", port=port, calling_ae=NODE_AE
        )
    assert not result.accepted
    assert "does not accept storage commitment" in result.error
    down = request_commitment(
        ds, called_ae="FAKEPACS", host="127.0.0.1", port=free_port(), calling_ae=NODE_AE
    )
    assert not down.accepted and "connection refused" in down.error


# ------------------------------------------------------- reports to the node's SCP
def _report_to(settings: Settings, event_type: int, info: Dataset) -> int | None:
    """Send ``info`` as a storage commitment report to the node, as a PACS does (it takes
    the SCP role); returns the status, or None when the node refused the context."""
    ae = AE(ae_title="FAKEPACS")
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    ae.add_requested_context("1.2.840.10008.1.1")
    role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        settings.node.dicom_port,
        ae_title=settings.node.ae_title,
        ext_neg=[role],
    )
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        if STORAGE_COMMITMENT_PUSH_MODEL not in accepted:
            return None
        status, _reply = assoc.send_n_event_report(
            info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
        )
        return int(status.Status)
    finally:
        assoc.release()


def test_the_scp_answers_each_report_and_keeps_serving(tmp_path: Path) -> None:
    with node_with_pacs(tmp_path, "127.0.0.1", free_port(), "PACS") as node:
        node.exporter.tick()  # the PACS is down: nothing stored, nothing to commit
        info = Dataset()
        info.TransactionUID = generate_uid()
        ref = Dataset()
        ref.ReferencedSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
        ref.ReferencedSOPInstanceUID = f"{STUDY}.91"
        info.ReferencedSOPSequence = [ref]
        assert _report_to(node.settings, 3, info) == STATUS_NO_SUCH_EVENT_TYPE
        assert _report_to(node.settings, 2, info) == STATUS_MISSING_ATTRIBUTE  # no failures
        untitled = Dataset()
        untitled.ReferencedSOPSequence = [ref]
        assert _report_to(node.settings, 1, untitled) == STATUS_MISSING_ATTRIBUTE
        # A transaction the node is not waiting for: taken, and nothing changes.
        assert _report_to(node.settings, 1, info) == 0x0000
        assert {state for state, _error in node.deliveries().values()} == {"pending"}


def test_a_node_that_asks_no_destination_for_commitment_takes_no_reports(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "dicom_host": "127.0.0.1", "dicom_port": free_port()},
        ingest={"fsync": False},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        info = Dataset()
        info.TransactionUID = generate_uid()
        assert _report_to(settings, 1, info) is None
    finally:
        scp.stop()
        ledger.dispose()


def test_the_destination_check_says_whether_storage_commitment_is_offered(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    def settings_for(port: int, ae_title: str) -> Settings:
        return load_settings(
            None,
            node={"data_dir": tmp_path / "data", "ae_title": NODE_AE},
            destinations=[
                {"name": "pacs", "ae_title": ae_title, "host": "127.0.0.1", "port": port,
                 "storage_commitment": True},
            ],
        )  # fmt: skip

    settings = settings_for(orthanc.dicom_port, orthanc.aet)
    (dest,) = settings.destinations
    assert what_it_checks(dest) == "C-ECHO + storage commitment"
    assert verify_destination(settings, dest).ok
    with fake_pacs(None) as (port, _requests):
        settings = settings_for(port, "FAKEPACS")
        result = verify_destination(settings, settings.destinations[0])
    assert not result.ok
    assert "C-ECHO ok, but FAKEPACS" in result.error
    assert "does not accept storage commitment" in result.error


def test_a_destination_is_called_with_its_own_calling_ae_title(tmp_path: Path) -> None:
    """``calling_ae_title``: a PACS that knows the node under another name gets the C-STOREs,
    the storage commitment request and the check's C-ECHO from that title."""
    callers: list[tuple[str, str]] = []

    def seen(kind: str, answer: Any) -> Callable[[evt.Event], Any]:
        def handle(event: evt.Event) -> Any:
            callers.append((kind, str(event.assoc.requestor.ae_title).strip()))
            return answer

        return handle

    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(SECONDARY_CAPTURE_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, seen("store", 0x0000)),
            (evt.EVT_C_ECHO, seen("echo", 0x0000)),
            (evt.EVT_N_ACTION, seen("commit", (0x0000, None))),
        ],
    )
    assert server is not None
    try:
        with node_with_pacs(tmp_path, "127.0.0.1", port, "FAKEPACS") as node:
            (dest,) = node.settings.destinations
            named = dest.model_copy(update={"calling_ae_title": "AI_NODE_7"})
            node.settings.destinations[0] = named
            node.exporter = Exporter(node.settings, node.ledger)
            node.wait_for(lambda: {k for k, _ in callers} >= {"store", "commit"})
            assert verify_destination(node.settings, named).ok
    finally:
        server.shutdown()
    assert {kind for kind, _ in callers} == {"store", "commit", "echo"}
    assert {title for _, title in callers} == {"AI_NODE_7"}


def _reporting_on_the_request(
    delay_s: float,
) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """An N-ACTION handler that answers success, then (``delay_s`` later) reports every
    listed instance committed on the same association, as some PACS do."""

    def on_action(event: evt.Event) -> tuple[int, Dataset | None]:
        info = event.action_information
        assoc = event.assoc

        def report() -> None:
            time.sleep(delay_s)
            if not assoc.is_established:
                return  # released already: nothing to report on
            ds = Dataset()
            ds.TransactionUID = info.TransactionUID
            ds.ReferencedSOPSequence = info.ReferencedSOPSequence
            assoc.send_n_event_report(
                ds, 1, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
            )

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    return on_action


def test_a_report_on_the_requests_association_is_taken_when_the_node_lingers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with fake_pacs(_reporting_on_the_request(0.3)) as (port, requests):
        with node_with_pacs(tmp_path / "lingering", "127.0.0.1", port, "FAKEPACS") as node:
            node.settings.destinations[0] = node.settings.destinations[0].model_copy(
                update={"commitment_linger_s": 10.0}
            )
            node.exporter = Exporter(node.settings, node.ledger)
            with caplog.at_level(logging.INFO, logger="acwi_node.commitment"):
                node.exporter.tick()  # C-STORE, the request, its report on its association
            assert node.study_state() == "delivered", node.deliveries()
            assert "storage commitment report from FAKEPACS: 2 result(s) committed" in (caplog.text)
            assert len(requests) == 1
        # Released at once (the default): the report finds no association, and the results
        # wait for one on an association of the PACS's own.
        with node_with_pacs(tmp_path / "prompt", "127.0.0.1", port, "FAKEPACS") as node:
            node.exporter.tick()
            assert {state for state, _ in node.deliveries().values()} == {"committing"}
