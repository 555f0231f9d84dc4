"""A PACS that answers the node's C-MOVE of a study by sending another study's instances (a
misconfigured PACS, or a C-MOVE by accession number that matched another study there), and
one that reports sending a study that never reaches the node: over real associations, a PACS of
pynetdicom's answering each C-MOVE with the instances the test gives for that study.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

import acwi_node.ingest.retrieval as retrieval_module
from acwi_node.ingest.qr_scu import STUDY_ROOT_FIND, STUDY_ROOT_MOVE
from tests.integration.test_retrieval import Node, make_node  # noqa: F401 - the fixture
from tests.integration.test_scp import SC, make_sc
from tests.support.ports import free_port


@contextmanager
def pacs(
    found: list[str], sends: dict[str, list[Dataset]], to_port: int
) -> Iterator[tuple[int, list[str]]]:
    """A Q/R SCP (AE title FAKEQR) finding ``found``, answering the C-MOVE of a study by
    storing ``sends[study]`` on ``to_port``; yields its port and the studies moved."""
    ae = AE(ae_title="FAKEQR")
    ae.add_supported_context(STUDY_ROOT_FIND)
    ae.add_supported_context(STUDY_ROOT_MOVE)
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    moved: list[str] = []

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        for uid in found:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            yield 0xFF00, ds

    def on_move(event: evt.Event) -> Iterator[Any]:
        uid = str(event.identifier.StudyInstanceUID)
        moved.append(uid)
        instances = sends.get(uid, [])
        yield "127.0.0.1", to_port
        yield len(instances)
        for ds in instances:
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
        yield port, moved
    finally:
        server.shutdown()


def test_a_move_answered_with_another_study_says_so_and_the_other_studies_are_moved(
    make_node: Callable[..., Node],  # noqa: F811
) -> None:
    asked, other, next_one = str(generate_uid()), str(generate_uid()), str(generate_uid())
    node_port = free_port()
    sends = {
        asked: [make_sc(other, patient="WRONG^PATIENT") for _ in range(2)],
        next_one: [make_sc(next_one)],
    }
    with pacs([asked, next_one], sends, node_port) as (port, moved):
        n = make_node("127.0.0.1", port, "FAKEQR", dicom_port=node_port)
        view = n.run(n.request(accession_number="A1"))
    assert moved == [asked, next_one]  # the study after it was moved still
    assert (view.state, view.attempts) == ("failed", 1), view.note  # asking again: the same
    assert view.error.startswith(
        "1 of 2 study(ies) retrieved; 1 answered with another study's instances; pacs answered"
        " the C-MOVE of a study with another study: it reported sending 2 instance(s), and 2"
        " instance(s) of 1 other study(ies) came from 'FAKEQR', none of the study asked for"
    ), view.error
    assert "none reached" not in view.error and "host and port" not in view.error
    assert "WRONG" not in view.error and asked not in view.error and other not in view.error
    assert view.studies_retrieved == 1 and view.completed == 1  # the wrong move's not kept
    assert n.state(asked) is None
    # its C-MOVE's end still completes it (no route on this node: not routed)
    assert n.complete(next_one) == "not_routed"
    assert n.state(other) == "receiving"  # kept, and processed like any study received


def test_a_study_reported_sent_that_never_comes_still_fails_at_once(
    make_node: Callable[..., Node],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PACS sends the study to another node (its host or port for the move destination)."""
    monkeypatch.setattr(retrieval_module, "_ROWS_WAIT_S", 1.0)
    elsewhere = AE(ae_title="ELSEWHERE")
    elsewhere.supported_contexts = AllStoragePresentationContexts
    other_port = free_port()
    server = elsewhere.start_server(
        ("127.0.0.1", other_port), block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )  # fmt: skip
    assert server is not None
    asked, later = str(generate_uid()), str(generate_uid())
    try:
        sends = {asked: [make_sc(asked)], later: [make_sc(later)]}
        with pacs([asked, later], sends, other_port) as (port, moved):
            n = make_node("127.0.0.1", port, "FAKEQR")
            view = n.run(n.request(accession_number="A2"))
    finally:
        server.shutdown()
    assert view.state == "failed"
    assert moved == [asked]  # where one study went astray, so do the others: not moved
    assert view.error == (
        "pacs reported sending 1 instance(s) of a study to 'ACWI' but none reached this node:"
        " check the host and port pacs has for 'ACWI'"
    )
