"""Retrieving studies from a PACS over real associations: a real Orthanc answers the node's
C-FIND and C-MOVEs the studies to the node's storage SCP; and the ways it goes wrong (no match,
a move destination the PACS does not know, a PACS that is down, one answering path-like UIDs or
too many studies).

The quiet period is an hour, so a retrieved study completes only by the end of its C-MOVE; the
completion pass is called directly and the study's state read from the ledger.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from celery import Celery
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

import acwi_node.ingest.qr_scu as qr_scu
import acwi_node.ingest.retrieval as retrieval_module
from acwi_node.cli import main
from acwi_node.config import Settings, load_settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.mpps import CompletionSignals
from acwi_node.ingest.qr_scu import (
    GET_STORAGE_CLASSES,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    study_sop_classes,
)
from acwi_node.ingest.retrieval import RetrievalService
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.retrievals import Retrievals, RetrievalView
from tests.integration.test_scp import SC, make_sc
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port
from tests.support.study_flow import route_all, study_id

NODE_AE = "ACWI"
HOUR = 3600.0


def put_study(
    orthanc: OrthancServer, n: int, *, accession: str, date: str = "20261201", modality: str = "OT"
) -> str:
    """Store a study of ``n`` small images in Orthanc (REST); returns its UID."""
    study = generate_uid()
    for _ in range(n):
        ds = make_sc(study)
        ds.AccessionNumber = accession
        ds.StudyDate = date
        ds.Modality = modality
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        orthanc.client.post("/instances", content=buf.getvalue()).raise_for_status()
    return study


@dataclass
class Node:
    settings: Settings
    ledger: Ledger
    service: RetrievalService
    completion: CompletionService

    def request(self, **query: str) -> int:
        return Retrievals(self.ledger).request("pacs", query, requested_by="test")

    def run(self, rid: int) -> RetrievalView:
        assert self.service.tick()
        view = Retrievals(self.ledger).get(rid)
        assert view is not None
        return view

    def state(self, study_uid: str) -> str | None:
        st = self.ledger.get_study(study_uid)
        return None if st is None else str(st["state"])

    def complete(self, study_uid: str, timeout_s: float = 30.0) -> str:
        """Completion passes until the study is no longer receiving (its sender released)."""
        deadline = time.monotonic() + timeout_s
        while self.state(study_uid) == "receiving":
            assert time.monotonic() < deadline, "the retrieved study never completed"
            self.completion.tick()
            time.sleep(0.05)
        return str(self.state(study_uid))


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[tuple[StorageSCP, Ledger]] = []

    def make(
        host: str, port: int, ae_title: str, *, retrieve: dict[str, Any] | None = None,
        ingest: dict[str, Any] | None = None, dicom_port: int | None = None, **source: Any,
    ) -> Node:  # fmt: skip
        settings = load_settings(
            None,
            node={"data_dir": tmp_path / "data", "ae_title": NODE_AE,
                  "dicom_host": "127.0.0.1", "dicom_port": dicom_port or free_port()},
            ingest={"fsync": False, "network_timeout_s": 5, "acse_timeout_s": 5,
                    **(ingest or {})},
            completion={"quiet_period_s": HOUR, "max_wait_s": HOUR, "poll_interval_s": HOUR},
            retrieve={"timeout_s": 30, "backoff_s": 0.01, **(retrieve or {})},
            sources=[{"name": "pacs", "ae_title": ae_title, "host": host, "port": port,
                      **source}],
        )  # fmt: skip
        ledger = Ledger(settings.database_url)
        signals = CompletionSignals(ledger)
        scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False), signals=signals)
        scp.start(block=False)
        started.append((scp, ledger))
        celery = Celery("acwi-test-retrieval", broker="redis://127.0.0.1:6379/9")
        completion = CompletionService(settings, ledger, celery, signals=signals)
        return Node(settings, ledger, RetrievalService(settings, ledger, signals), completion)

    yield make
    for scp, ledger in started:
        scp.stop()
        ledger.dispose()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    require_orthanc()
    with OrthancServer(node_ae=NODE_AE, node_port=free_port()) as server:
        yield server


def orthanc_sends_to(orthanc: OrthancServer, n: Node) -> None:
    """Orthanc sends a C-MOVE to the modality of the move destination: this node's port."""
    orthanc.client.put(
        "/modalities/acwi",
        json={"AET": NODE_AE, "Host": "127.0.0.1", "Port": n.settings.node.dicom_port},
    ).raise_for_status()


@pytest.fixture
def node(orthanc: OrthancServer, make_node: Callable[..., Node]) -> Node:
    n = make_node("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    orthanc_sends_to(orthanc, n)
    return n


# ------------------------------------------------------------------ a real Orthanc
def test_a_study_found_by_accession_is_retrieved_and_completes_at_the_end_of_the_move(
    node: Node, orthanc: OrthancServer
) -> None:
    study = put_study(orthanc, 3, accession="RQ1001")
    put_study(orthanc, 1, accession="RQ1002")  # another study: left alone
    rid = node.request(accession_number="RQ1001")
    view = node.run(rid)
    assert (view.state, view.error) == ("done", "")
    assert (view.studies_found, view.studies_retrieved, view.completed) == (1, 1, 3)
    assert view.study_uids == [study]
    st = node.ledger.get_study(study)
    assert st is not None and st["instances"] == 3
    # An hour's quiet period, yet complete (here: no route) as soon as Orthanc released.
    assert node.complete(study) == "not_routed"


def test_a_query_by_date_and_modality_retrieves_each_matching_study(
    node: Node, orthanc: OrthancServer
) -> None:
    ct = [put_study(orthanc, 1, accession=f"RQ20{i}", date="20261103", modality="CT")
          for i in range(2)]  # fmt: skip
    mr = put_study(orthanc, 1, accession="RQ209", date="20261103", modality="MR")
    view = node.run(node.request(study_date="20261103", modality="CT"))
    assert view.state == "done", view.error
    assert sorted(view.study_uids) == sorted(ct)
    assert all(node.state(uid) == "receiving" for uid in ct)
    assert node.state(mr) is None


def test_a_large_retrieval_moves_its_studies_as_the_node_analyses_them_and_lets_others_by(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    studies = sorted(
        put_study(orthanc, 1, accession=f"RQ60{i}", date="20261005", modality="CR")
        for i in range(3)
    )
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet,
        retrieve={"studies_ahead": 1, "poll_interval_s": 2.0},
    )  # fmt: skip
    orthanc_sends_to(orthanc, n)
    backfill = n.request(study_date="20261005", modality="CR")
    view = n.run(backfill)  # the first study moved; the next waits for its analysis
    assert (view.state, view.studies_found, view.studies_retrieved) == ("queued", 3, 1)
    assert view.attempts == 0 and view.error == ""
    (first,) = [uid for uid in studies if n.state(uid) is not None]
    # A retrieval asked for meanwhile does not wait for the large one.
    urgent_study = put_study(orthanc, 1, accession="RQ6099")
    urgent = n.request(accession_number="RQ6099")
    assert n.run(urgent).state == "done"
    assert n.state(urgent_study) == "receiving"
    assert n.complete(first) == "not_routed"  # analysed (here: no route): the next may come
    time.sleep(2.0)
    view = n.run(backfill)
    assert (view.state, view.studies_retrieved) == ("queued", 2)
    for uid in studies:
        if n.state(uid) == "receiving":
            n.complete(uid)
    time.sleep(2.0)
    view = n.run(backfill)
    assert (view.state, view.studies_retrieved, view.completed) == ("done", 3, 3)
    assert sorted(view.study_uids) == studies


def test_no_matching_study_fails_at_once_with_the_query(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    view = node.run(node.request(accession_number="NOSUCH"))
    assert view.state == "failed"
    assert view.attempts == 1  # nothing to try again
    assert view.error == "no study on pacs matches accession_number=NOSUCH"
    assert "NOSUCH" not in caplog.text  # an accession number is not for the log
    assert "no study on pacs matches the query" in caplog.text


def test_a_study_the_node_analysed_already_is_not_analysed_again(
    node: Node, orthanc: OrthancServer
) -> None:
    study = put_study(orthanc, 2, accession="RQ3001")
    node.run(node.request(study_uid=study))
    st = node.ledger.get_study(study)
    assert st is not None
    assert node.ledger.complete_study(study_id(node.ledger, study), st["generation"], route_all)
    view = node.run(node.request(study_uid=study))
    assert view.state == "done"
    assert "1 the node had analysed already" in view.note
    again = node.ledger.get_study(study)
    assert again is not None
    assert (again["state"], again["generation"]) == ("queued", st["generation"])


def test_a_study_that_was_not_routed_is_received_again_as_a_new_generation(
    node: Node, orthanc: OrthancServer
) -> None:
    study = put_study(orthanc, 1, accession="RQ3101")
    node.run(node.request(study_uid=study))
    assert node.complete(study) == "not_routed"  # no route then; say one was added since
    view = node.run(node.request(study_uid=study))
    assert view.note == "1 of 1 study(ies) retrieved"
    again = node.ledger.get_study(study)
    assert again is not None and (again["state"], again["generation"]) == ("receiving", 2)


def test_a_move_destination_orthanc_does_not_know_fails_with_the_reason(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    study = put_study(orthanc, 1, accession="RQ4001")
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, move_destination="NOBODY",
        retrieve={"max_attempts": 1},
    )  # fmt: skip
    orthanc_sends_to(orthanc, n)
    view = n.run(n.request(study_uid=study))
    assert view.state == "failed"
    assert "C-MOVE refused by" in view.error and "(after 1 attempt(s))" in view.error
    assert "knows the move destination 'NOBODY'" in view.error
    assert n.state(study) is None


def test_a_source_that_is_down_is_tried_again_then_fails(
    make_node: Callable[..., Node],
) -> None:
    n = make_node("127.0.0.1", free_port(), "DOWN", retrieve={"max_attempts": 2})
    rid = n.request(study_uid="1.2.3.4")
    first = n.run(rid)
    assert first.state == "queued"
    assert "connection refused" in first.error
    time.sleep(0.05)  # the back-off
    second = n.run(rid)
    assert second.state == "failed"
    assert second.attempts == 2 and second.error.endswith("(after 2 attempt(s))")
    assert not n.service.tick()  # nothing left to run


def orthanc_cannot_reach(orthanc: OrthancServer) -> None:
    """Orthanc's entry for the node points at a port nobody listens on: only a C-GET, whose
    instances come back over the node's own association, can retrieve anything."""
    orthanc.client.put(
        "/modalities/acwi", json={"AET": NODE_AE, "Host": "127.0.0.1", "Port": free_port()}
    ).raise_for_status()


def test_a_get_source_retrieves_over_the_nodes_own_association(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    """``retrieve_with = "get"``: a PACS that cannot connect to the node (here: Orthanc knows
    it at a closed port) sends the study back over the node's C-GET association; each instance
    is spooled and recorded before its C-STORE is answered, and the study completes at the end
    of the C-GET like one moved."""
    study = put_study(orthanc, 3, accession="RQ7001")
    n = make_node("127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve_with="get")
    orthanc_cannot_reach(orthanc)
    view = n.run(n.request(accession_number="RQ7001"))
    assert (view.state, view.error) == ("done", "")
    assert (view.studies_retrieved, view.completed, view.failed) == (1, 3, 0)
    st = n.ledger.get_study(study)
    assert st is not None and st["instances"] == 3
    assert n.complete(study) == "not_routed"
    for path in n.settings.spool_dir.rglob("*.dcm"):
        assert pydicom.dcmread(path).StudyInstanceUID == study  # readable Part-10 files


def test_a_move_source_cannot_retrieve_from_a_pacs_that_cannot_reach_the_node(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    """The counterpart: the same PACS, asked for a C-MOVE, fails, and says where to look."""
    study = put_study(orthanc, 1, accession="RQ7002")
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve={"max_attempts": 1}
    )  # fmt: skip
    orthanc_cannot_reach(orthanc)
    view = n.run(n.request(study_uid=study))
    assert view.state == "failed"
    assert "C-MOVE refused by" in view.error or "could not send" in view.error
    assert n.state(study) is None


def put_rare_class_study(orthanc: OrthancServer) -> tuple[str, str]:
    """A study of one instance of a storage class beyond the 127 a C-GET proposes by default,
    stored in Orthanc; its Study Instance UID and the class."""
    study = generate_uid()
    ds = make_sc(study)
    rare = next(
        str(cx.abstract_syntax)
        for cx in AllStoragePresentationContexts
        if str(cx.abstract_syntax) not in GET_STORAGE_CLASSES
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(rare)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    orthanc.client.post("/instances", content=buf.getvalue()).raise_for_status()
    return study, rare


def test_a_get_of_a_class_the_node_does_not_propose_fails_with_the_reason(
    orthanc: OrthancServer, make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACS that does not list SOP Classes in Study (here: the node does not hear it): a
    class beyond the 127 proposed by default cannot come by C-GET, and the error says why."""
    monkeypatch.setattr(retrieval_module, "study_sop_classes", lambda *a, **k: [])
    study, _ = put_rare_class_study(orthanc)
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve_with="get",
        retrieve={"max_attempts": 1},
    )  # fmt: skip
    view = n.run(n.request(study_uid=study))
    assert view.state == "failed"
    assert "C-GET" in view.error and "retrieve_with = 'move'" in view.error
    assert n.state(study) is None


def test_a_get_proposes_the_classes_the_pacs_lists_for_the_study(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    """A PACS that answers SOP Classes in Study (Orthanc does): the C-GET proposes the study's
    own class first, so a class beyond the 127 proposed by default comes too (the test above:
    without the list, it fails)."""
    study, rare = put_rare_class_study(orthanc)
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve_with="get",
        retrieve={"max_attempts": 1},
    )  # fmt: skip
    listed = study_sop_classes(
        study, called_ae=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port, calling_ae=NODE_AE
    )
    assert listed == [rare]
    orthanc_cannot_reach(orthanc)
    view = n.run(n.request(study_uid=study))
    assert (view.state, view.error, view.completed) == ("done", "", 1)
    st = n.ledger.get_study(study)
    assert st is not None and st["instances"] == 1


def test_a_get_asks_the_instances_classes_where_the_pacs_lists_none(
    orthanc: OrthancServer, make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACS that leaves SOP Classes in Study out of its STUDY level answer (here: the node
    does not hear it): the node asks the SERIES level for the study's series and the IMAGE
    level for each instance's SOP Class UID, so the class beyond the 127 proposed by default
    still comes by C-GET (the test before the one above: without any list, it fails)."""
    listed: list[str] = []

    def unheard(assoc: Any, study_uid: str) -> list[str]:
        listed.append(study_uid)
        return []

    monkeypatch.setattr(qr_scu, "_listed_classes", unheard)
    study, rare = put_rare_class_study(orthanc)

    def classes(uid: str) -> list[str]:
        return study_sop_classes(
            uid, called_ae=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port,
            calling_ae=NODE_AE,
        )  # fmt: skip

    assert classes(study) == [rare]
    assert listed == [study]  # asked at the STUDY level first
    assert classes(generate_uid()) == []  # no such study
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve_with="get",
        retrieve={"max_attempts": 1},
    )  # fmt: skip
    orthanc_cannot_reach(orthanc)
    view = n.run(n.request(study_uid=study))
    assert (view.state, view.error, view.completed) == ("done", "", 1)


# ------------------------------------------------------------------ a PACS of pynetdicom's
@contextmanager
def qr_scp(
    study_uids: list[str], instances: list[Dataset] | None = None, node_port: int = 0
) -> Iterator[tuple[int, list[Dataset]]]:
    """A Q/R SCP answering each C-FIND with ``study_uids`` (as they are when it is asked),
    and each C-MOVE by storing ``instances`` on ``node_port`` (none: success at once, nothing
    sent); yields its port and the C-MOVE identifiers it got."""
    ae = AE(ae_title="FAKEQR")
    ae.add_supported_context(STUDY_ROOT_FIND)
    ae.add_supported_context(STUDY_ROOT_MOVE)
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    moves: list[Dataset] = []

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        for uid in study_uids:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            yield 0xFF00, ds

    def on_move(event: evt.Event) -> Iterator[Any]:
        moves.append(event.identifier)
        yield "127.0.0.1", node_port or free_port()
        yield len(instances or [])
        for ds in instances or []:
            yield 0xFF00, ds
        if not instances:
            yield 0x0000, None

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move)],
    )  # fmt: skip
    assert server is not None
    try:
        yield port, moves
    finally:
        server.shutdown()


@pytest.fixture
def fake_qr() -> Iterator[tuple[int, list[str], list[Dataset]]]:
    """:func:`qr_scp` finding the UIDs the test puts in its list; (port, uids, moves)."""
    uids: list[str] = []
    with qr_scp(uids) as (port, moves):
        yield port, uids, moves


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_like_study_uids_from_the_pacs_are_left_out(
    make_node: Callable[..., Node], fake_qr: tuple[int, list[str], list[Dataset]]
) -> None:
    port, uids, moves = fake_qr
    uids += ["../../etc/passwd", "1.2.826.0.1.3680043.10.1511.77"]
    n = make_node("127.0.0.1", port, "FAKEQR")
    view = n.run(n.request(study_date="20261101-20261130"))
    assert view.state == "done", view.error
    assert view.study_uids == ["1.2.826.0.1.3680043.10.1511.77"]
    assert [str(m.StudyInstanceUID) for m in moves] == ["1.2.826.0.1.3680043.10.1511.77"]
    assert view.note == "0 of 1 study(ies) retrieved; 1 with no instances sent"


def test_a_query_matching_more_studies_than_allowed_is_refused(
    make_node: Callable[..., Node], fake_qr: tuple[int, list[str], list[Dataset]]
) -> None:
    port, uids, moves = fake_qr
    uids += [f"1.2.826.0.1.3680043.10.1511.8{i}" for i in range(4)]
    n = make_node("127.0.0.1", port, "FAKEQR", retrieve={"max_studies": 3})
    view = n.run(n.request(study_date="20260101-"))
    assert (view.state, view.attempts) == ("failed", 1)  # asking again changes nothing
    assert view.error == "more than 3 studies match (retrieve.max_studies): narrow the query"
    assert moves == []


def test_a_study_the_pacs_could_not_send_to_the_node_fails_with_the_reason(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    study = put_study(orthanc, 2, accession="RQ5001")
    # The node admits only MODALITY1: Orthanc's association with the study is rejected.
    n = make_node(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve={"max_attempts": 1},
        ingest={"allowed_calling_aes": ["MODALITY1"]},
    )  # fmt: skip
    orthanc_sends_to(orthanc, n)
    view = n.run(n.request(study_uid=study))
    assert view.state == "failed"
    # Orthanc says only "unable to process" (0xC000); the node says what to check.
    assert "knows the move destination 'ACWI'" in view.error
    assert "admits its calling AE title (ingest.allowed_calling_aes)" in view.error
    assert n.state(study) is None


def path_like(study: str) -> Dataset:
    """An instance the node refuses: its SOP Instance UID is a path."""
    ds = make_sc(study)
    ds.SOPInstanceUID = "../../evil"
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_study_whose_every_instance_the_node_refused_fails(
    make_node: Callable[..., Node],
) -> None:
    study = "1.2.826.0.1.3680043.10.1511.91"
    node_port = free_port()
    with qr_scp([study], [path_like(study)], node_port) as (port, _moves):
        n = make_node(
            "127.0.0.1", port, "FAKEQR", retrieve={"max_attempts": 1}, dicom_port=node_port
        )
        view = n.run(n.request(study_uid=study))
    assert view.state == "failed"
    assert (view.completed, view.failed) == (0, 0)  # a failed move's counts are not kept
    assert "with status 0xA702: out of resources: unable to perform sub-operations" in view.error
    assert "pacs could not send any of the study's 1 instance(s) to 'ACWI'" in view.error


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_study_partly_refused_is_retrieved_and_says_so(
    make_node: Callable[..., Node],
) -> None:
    study = "1.2.826.0.1.3680043.10.1511.92"
    node_port = free_port()
    with qr_scp([study], [make_sc(study), path_like(study)], node_port) as (port, _moves):
        n = make_node("127.0.0.1", port, "FAKEQR", dicom_port=node_port)
        view = n.run(n.request(study_uid=study))
    assert view.state == "done", view.error
    assert (view.completed, view.failed) == (1, 1)
    assert view.note == "1 of 1 study(ies) retrieved; 1 instance(s) the PACS could not send"
    assert n.state(study) == "receiving"


# ------------------------------------------------------------------ acwi-node sources check
def test_sources_check_says_which_source_answers_a_retrieval(
    orthanc: OrthancServer,
    fake_qr: tuple[int, list[str], list[Dataset]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    find_only = AE(ae_title="FINDONLY")
    find_only.add_supported_context(STUDY_ROOT_FIND)
    find_only_port = free_port()
    server = find_only.start_server(("127.0.0.1", find_only_port), block=False)
    assert server is not None
    config = tmp_path / "acwi-node.toml"
    entries = [
        ("orthanc", orthanc.aet, orthanc.dicom_port),
        ("fake", "FAKEQR", fake_qr[0]),
        ("findonly", "FINDONLY", find_only_port),
        ("down", "DOWN", free_port()),
    ]
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\nae_title = "{NODE_AE}"\n'
        + "".join(
            f'\n[[sources]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\n'
            f"port = {port}\n"
            for name, ae, port in entries
        )
    )
    try:
        assert main(["--config", str(config), "sources", "check", "orthanc", "fake"]) == 0
        out = capsys.readouterr().out
        assert f"orthanc (ORTHANC@127.0.0.1:{orthanc.dicom_port}): C-ECHO and C-FIND ok" in out
        assert "fake (FAKEQR@" in out
        assert main(["--config", str(config), "sources", "check", "--json"]) == 1
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["orthanc"]["ok"] and rows["fake"]["ok"]
        assert rows["findonly"]["error"].endswith("does not accept Study Root C-MOVE")
        assert "connection refused" in rows["down"]["error"]
        assert main(["--config", str(config), "sources", "check", "nope"]) == 2
    finally:
        server.shutdown()


def test_sources_check_of_a_get_source_asks_for_c_get(
    orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    move_only = AE(ae_title="MOVEONLY")
    move_only.add_supported_context(STUDY_ROOT_FIND)
    move_only.add_supported_context(STUDY_ROOT_MOVE)
    move_only_port = free_port()
    server = move_only.start_server(("127.0.0.1", move_only_port), block=False)
    assert server is not None
    config = tmp_path / "acwi-node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\nae_title = "{NODE_AE}"\n'
        + "".join(
            f'\n[[sources]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\n'
            f'port = {port}\nretrieve_with = "get"\n'
            for name, ae, port in (
                ("orthanc", orthanc.aet, orthanc.dicom_port),
                ("moveonly", "MOVEONLY", move_only_port),
            )
        )
    )
    try:
        assert main(["--config", str(config), "sources", "check", "--json"]) == 1
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["orthanc"]["ok"], rows["orthanc"]["error"]
        assert "does not accept Study Root C-GET" in rows["moveonly"]["error"]
    finally:
        server.shutdown()
