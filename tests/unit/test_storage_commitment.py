"""Storage commitment (export/commitment.py): reading reports, and the outbox's states while a
destination is asked to commit what it stored, on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from acwi_node.config import ConfigError, load_settings
from acwi_node.export.commitment import (
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    STATUS_INVALID_ARGUMENT,
    STATUS_MISSING_ATTRIBUTE,
    STATUS_NO_SUCH_EVENT_TYPE,
    ReportError,
    commitment_request,
    describe_failure,
    parse_report,
)
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import AwaitedCommitment, DeliveryAttempt, DueDelivery, Ledger
from acwi_node.ledger.models import CommitmentRequest, utcnow
from acwi_node.review.store import ReviewStore
from tests.unit.test_ledger import _analyse, rec, route_all

SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _report(
    transaction_uid: str, committed: list[str], failed: dict[str, int] | None = None
) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = [_ref(uid) for uid in committed]
    if failed:
        items = []
        for uid, reason in failed.items():
            item = _ref(uid)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return ds


def _ref(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = SC
    item.ReferencedSOPInstanceUID = uid
    return item


# ---------------------------------------------------------------------- the messages
def test_a_request_lists_each_result_under_one_transaction() -> None:
    items = [
        AwaitedCommitment(1, SR, "2.25.1", "1.2.3"),
        AwaitedCommitment(2, SC, "2.25.2", "1.2.3"),
    ]
    ds = commitment_request("2.25.99", items)
    assert ds.TransactionUID == "2.25.99"
    assert [
        (r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in ds.ReferencedSOPSequence
    ] == [
        (SR, "2.25.1"),
        (SC, "2.25.2"),
    ]


def test_a_report_says_what_was_committed_and_what_was_not() -> None:
    report = parse_report(EVENT_SOME_FAILED, _report("2.25.9", ["2.25.1"], {"2.25.2": 0x0112}))
    assert report.transaction_uid == "2.25.9"
    assert report.committed == ("2.25.1",)
    assert report.refused == {"2.25.2": 0x0112}
    assert describe_failure(0x0112) == "no such object instance (0x0112)"
    assert describe_failure(0xC001) == "failure (0xC001)"
    everything = parse_report(EVENT_ALL_COMMITTED, _report("2.25.9", ["2.25.1", "2.25.2"]))
    assert everything.committed == ("2.25.1", "2.25.2") and everything.refused == {}


def _path_like() -> Dataset:
    ds = Dataset()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.TransactionUID = "../../etc"
    return ds


@pytest.mark.parametrize(
    ("event_type", "make", "status", "words"),
    [
        (3, lambda: _report("2.25.9", ["2.25.1"]), STATUS_NO_SUCH_EVENT_TYPE, "event type 3"),
        (EVENT_ALL_COMMITTED, lambda: None, STATUS_MISSING_ATTRIBUTE, "no Transaction UID"),
        (EVENT_ALL_COMMITTED, Dataset, STATUS_MISSING_ATTRIBUTE, "no Transaction UID"),
        (EVENT_ALL_COMMITTED, _path_like, STATUS_INVALID_ARGUMENT, "not a UID"),
        (
            EVENT_SOME_FAILED,
            lambda: _report("2.25.9", ["2.25.1"]),
            STATUS_MISSING_ATTRIBUTE,
            "Failed",
        ),
    ],
)
def test_a_report_the_node_cannot_use_gets_its_status(
    event_type: int, make: Callable[[], Dataset | None], status: int, words: str
) -> None:
    ds = make()
    with pytest.raises(ReportError, match=words) as caught:
        parse_report(event_type, ds)
    assert caught.value.status == status


def test_storage_commitment_is_for_dimse_destinations(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104,
             "storage_commitment": True, "commitment_wait_s": 60},
        ],
    )  # fmt: skip
    assert settings.destinations[0].storage_commitment
    with pytest.raises(ConfigError, match="storage_commitment applies to DIMSE"):
        load_settings(
            None,
            node={"data_dir": tmp_path},
            destinations=[
                {"name": "web", "url": "http://pacs/dicom-web", "storage_commitment": True}
            ],
        )
    with pytest.raises(ConfigError, match="commitment_wait_s"):
        load_settings(
            None,
            node={"data_dir": tmp_path},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104,
                 "commitment_wait_s": 0},
            ],
        )  # fmt: skip


# ------------------------------------------------------------------------- the outbox
def _stored(db: Ledger, *, commit: bool = True, max_attempts: int = 3) -> list[DueDelivery]:
    """A study analysed (an SR and a heatmap for ``pacs``), both stored by the PACS."""
    r = db.record_instance(rec(), first_in_association=False)
    (job_id,) = db.complete_study(r.study_id, 1, route_all)
    _analyse(db, job_id)
    due = sorted(db.due_deliveries(), key=lambda d: d.path)
    db.record_deliveries(
        [DeliveryAttempt(d.id, True, 0, "", max_attempts, 1, awaits_commitment=commit) for d in due]
    )
    return due


def _state(db: Ledger) -> tuple[str, str, dict[str, str]]:
    st = db.get_study("1.2.3")
    assert st is not None
    deliveries = {
        res["sop_instance_uid"]: d["state"]
        for res in st["jobs"][-1]["results"]
        for d in res["deliveries"]
    }
    return st["state"], st["reason"], deliveries


def _record(
    db: Ledger, uid: str, committed: list[str], refused: dict[str, int]
) -> tuple[int, int, bool]:
    outcome = db.record_commitment(
        uid,
        committed,
        refused,
        max_attempts=3,
        backoff_s=lambda n: 0.0,
        describe=describe_failure,
    )
    return outcome.committed, outcome.refused, outcome.known


def test_a_stored_result_is_delivered_once_committed(db: Ledger) -> None:
    sr, heatmap = _stored(db)
    assert _state(db) == ("exporting", "", {"2.25.1": "committing", "2.25.2": "committing"})
    assert db.due_deliveries() == []  # stored: not sent again
    due = db.commitments_due("pacs", wait_s=300, max_requests=3)
    assert [(c.delivery_id, c.sop_class_uid, c.sop_instance_uid, c.study_uid) for c in due] == [
        (sr.id, SR, "2.25.1", "1.2.3"),
        (heatmap.id, SC, "2.25.2", "1.2.3"),
    ]
    assert db.commitments_due("archive", wait_s=300, max_requests=3) == []
    uid = str(generate_uid())
    db.commitment_requested([c.delivery_id for c in due], uid)
    assert db.commitments_due("pacs", wait_s=300, max_requests=3) == []  # waiting for a report
    assert _record(db, str(generate_uid()), ["2.25.1"], {}) == (0, 0, False)  # not ours
    assert _record(db, uid, ["2.25.1", "2.25.2"], {}) == (2, 0, True)
    assert _state(db) == ("delivered", "", {"2.25.1": "delivered", "2.25.2": "delivered"})
    assert _record(db, uid, ["2.25.1", "2.25.2"], {}) == (0, 0, False)  # again: no longer awaited


def test_a_refused_result_is_sent_again_and_then_committed(db: Ledger) -> None:
    sr, heatmap = _stored(db)
    uid = str(generate_uid())
    db.commitment_requested([sr.id, heatmap.id], uid)
    assert _record(db, uid, ["2.25.1"], {"2.25.2": 0x0112}) == (1, 1, True)
    state, _, deliveries = _state(db)
    assert state == "exporting"
    assert deliveries == {"2.25.1": "delivered", "2.25.2": "pending"}
    (again,) = db.due_deliveries()
    assert again.id == heatmap.id and again.attempts == 1
    st = db.get_study("1.2.3")
    assert st is not None
    (heatmap_row,) = [
        d for res in st["jobs"][0]["results"] for d in res["deliveries"] if d["state"] == "pending"
    ]
    assert (
        "storage commitment refused by pacs: no such object instance (0x0112)"
        in (heatmap_row["last_error"])
    )
    db.record_deliveries([DeliveryAttempt(again.id, True, 0, "", 3, 1, awaits_commitment=True)])
    (asked,) = db.commitments_due("pacs", wait_s=300, max_requests=3)
    second = str(generate_uid())
    db.commitment_requested([asked.delivery_id], second)
    assert _record(db, uid, [], {"2.25.2": 0x0112}) == (0, 0, False)  # the older request
    assert _record(db, second, ["2.25.2"], {}) == (1, 0, True)
    assert _state(db) == ("delivered", "", {"2.25.1": "delivered", "2.25.2": "delivered"})


def test_a_report_on_a_request_asked_again_since_still_applies(db: Ledger) -> None:
    """The PACS reports after ``commitment_wait_s`` (late, or in batches): the node has asked
    again under a new Transaction UID meanwhile. The report on the first request commits the
    results all the same (it was dropped, and a PACS that always reports late had its
    committed results fail after the last request); the answer to the second, once they are
    delivered, applies to nothing."""
    due = _stored(db)
    ids = [d.id for d in due]
    first, second = str(generate_uid()), str(generate_uid())
    db.commitment_requested(ids, first)
    asked = db.commitments_due("pacs", wait_s=0, max_requests=5)  # no report within the wait
    assert [a.delivery_id for a in asked] == ids
    db.commitment_requested(ids, second)
    assert _record(db, first, ["2.25.1"], {"2.25.2": 0x0112}) == (1, 1, True)
    assert _state(db)[2] == {"2.25.1": "delivered", "2.25.2": "pending"}
    assert _record(db, second, ["2.25.1", "2.25.2"], {}) == (0, 0, False)  # settled since
    with db.session() as s:  # the requests of settled deliveries are forgotten
        assert s.scalars(select(CommitmentRequest.delivery_id)).all() == []


def test_a_result_refused_on_its_last_attempt_fails_the_study(db: Ledger) -> None:
    due = _stored(db, max_attempts=1)
    uid = str(generate_uid())
    db.commitment_requested([d.id for d in due], uid)
    outcome = db.record_commitment(
        uid,
        ["2.25.1"],
        {"2.25.2": 0x0213},
        max_attempts=1,
        backoff_s=lambda n: 0.0,
        describe=describe_failure,
    )
    assert (outcome.committed, outcome.refused) == (1, 1)
    state, reason, deliveries = _state(db)
    assert (state, deliveries) == ("failed", {"2.25.1": "delivered", "2.25.2": "failed"})
    assert "delivery to pacs failed (0x0213)" in reason and "resource limitation" in reason


def test_no_report_means_asking_again_then_failing(db: Ledger) -> None:
    due = _stored(db)
    ids = [d.id for d in due]
    for n in range(2):
        asked = db.commitments_due("pacs", wait_s=0, max_requests=2)
        assert [a.delivery_id for a in asked] == ids, n
        db.commitment_requested(ids, str(generate_uid()))
        if n == 1:
            db.commitment_request_failed(ids, "connection refused by 10.0.0.1:104")
    assert db.commitments_due("pacs", wait_s=0, max_requests=2) == []  # the third: failed
    state, reason, deliveries = _state(db)
    assert (state, deliveries) == ("failed", {"2.25.1": "failed", "2.25.2": "failed"})
    assert "storage commitment: pacs did not report after 2 request(s)" in reason
    assert "connection refused" in reason  # why the last request failed


def test_requests_that_cannot_reach_the_destination_are_not_counted_until_the_patience(
    db: Ledger,
) -> None:
    """A destination down for longer than its requests allow: the requests that could not
    reach it are not counted, an accepted one ends the outage, and unreachable for longer
    than the patience the results fail saying since when."""
    from acwi_node.ledger.models import Delivery

    due = _stored(db)
    ids = [d.id for d in due]
    for _ in range(4):  # max_requests 2, yet asked again each time
        asked = db.commitments_due("pacs", wait_s=0, max_requests=2)
        assert [a.delivery_id for a in asked] == ids
        db.commitment_requested(ids, str(generate_uid()))
        db.commitment_request_failed(
            ids, "connection refused by 10.0.0.1:104", unreachable=True, outage_patience_s=3600
        )
    with db.session() as s:
        rows = [s.get_one(Delivery, i) for i in ids]
        assert all(d.commitment_requests == 0 and d.unreachable_since for d in rows)
    # the outbox row says so, as for results that cannot be sent
    (row,) = ReviewStore(db).delivery_status(["pacs"])
    assert (row["committing"], row["unreachable_since"] is not None) == (2, True)
    db.commitment_requested(ids, str(generate_uid()))
    db.commitment_request_answered(ids)  # it is back: accepted
    (row,) = ReviewStore(db).delivery_status(["pacs"])
    assert row["unreachable_since"] is None
    with db.session() as s:
        assert all(s.get_one(Delivery, i).unreachable_since is None for i in ids)
        for i in ids:  # down again, since two hours
            s.get_one(Delivery, i).unreachable_since = utcnow() - dt.timedelta(hours=2)
    db.commitment_request_failed(
        ids, "connection refused by 10.0.0.1:104", unreachable=True, outage_patience_s=3600
    )
    state, reason, deliveries = _state(db)
    assert (state, deliveries) == ("failed", {"2.25.1": "failed", "2.25.2": "failed"})
    assert "storage commitment: unreachable since" in reason


def test_a_new_generation_supersedes_results_awaiting_commitment(db: Ledger) -> None:
    due = _stored(db)
    uid = str(generate_uid())
    db.commitment_requested([d.id for d in due], uid)
    more = db.record_instance(rec(sop="1.2.3.9"), first_in_association=False)  # re-opens
    st = db.get_study("1.2.3")
    assert st is not None and st["generation"] == 2
    (job_id,) = db.complete_study(more.study_id, 2, route_all)
    assert job_id != due[0].job_id
    assert _record(db, uid, ["2.25.1", "2.25.2"], {}) == (0, 0, True)  # superseded meanwhile
    assert db.commitments_due("pacs", wait_s=0, max_requests=3) == []


def test_results_no_longer_awaited_are_delivered(db: Ledger) -> None:
    _stored(db)
    assert db.end_commitments(["pacs"]) == 0
    assert _state(db)[0] == "exporting"
    assert db.end_commitments([]) == 2
    assert _state(db) == ("delivered", "", {"2.25.1": "delivered", "2.25.2": "delivered"})


def test_the_dashboard_counts_results_awaiting_commitment(db: Ledger) -> None:
    due = _stored(db)
    (row,) = ReviewStore(db).delivery_status(["pacs"])
    assert (row["pending"], row["committing"], row["failed"]) == (0, 2, 0)
    db.commitment_requested([d.id for d in due], str(generate_uid()))
    db.commitment_request_failed([due[0].id], "association rejected by PACS")
    (row,) = ReviewStore(db).delivery_status(["pacs"])
    assert row["last_error"] == "association rejected by PACS"


def test_an_exporter_whose_destination_no_longer_asks_delivers_what_waited(
    db: Ledger, tmp_path: Path
) -> None:
    _stored(db)
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": db.url},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    exporter = Exporter(settings, db)
    assert _state(db)[0] == "exporting"  # nothing is done before the first pass
    assert exporter.tick() == 0
    assert _state(db) == ("delivered", "", {"2.25.1": "delivered", "2.25.2": "delivered"})


def test_a_request_to_a_destination_that_is_down_is_an_outage() -> None:
    from acwi_node.export.scu import request_commitment
    from tests.support.ports import free_port

    result = request_commitment(
        commitment_request(str(generate_uid()), []),
        called_ae="PACS",
        host="127.0.0.1",
        port=free_port(),
        calling_ae="ACWI",
        timeout_s=5,
    )
    assert not result.accepted and result.unreachable
    assert "connection refused" in result.error


def test_two_exporter_processes_ask_for_each_commitment_once(
    db: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two exporter processes on one ledger (two hosts): the other's pass comes while one asks
    the PACS to commit the first of its requests (one result each here), the second listed
    and not asked for yet. The PACS is asked about each result once, by the first."""
    from pynetdicom import AE, evt

    from acwi_node.export import outbox
    from acwi_node.export.scu import STORAGE_COMMITMENT_PUSH_MODEL
    from tests.support.ports import free_port

    monkeypatch.setattr(outbox, "MAX_REFERENCES", 1)
    _stored(db)
    others: list[Exporter] = []
    other_passes: list[int] = []
    asked: list[str] = []

    def on_action(event: evt.Event) -> tuple[int, Dataset | None]:
        asked.extend(
            r.ReferencedSOPInstanceUID for r in event.action_information.ReferencedSOPSequence
        )
        if len(asked) == 1:  # the other process's pass, while this request is under way
            other_passes.append(others[0].tick(wait=True))
        return 0x0000, None

    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)]
    )
    assert server is not None
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": db.url},
        destinations=[
            {"name": "pacs", "ae_title": "FAKEPACS", "host": "127.0.0.1", "port": port,
             "storage_commitment": True, "commitment_wait_s": 300},
        ],
        exporter={"timeout_s": 10, "withdraw_replaced": False},
    )  # fmt: skip
    other_ledger = Ledger(db.url)
    others.append(Exporter(settings, other_ledger))
    try:
        assert Exporter(settings, db).tick(wait=True) == 2
    finally:
        other_ledger.dispose()
        server.shutdown()
    assert other_passes == [0]
    assert sorted(asked) == ["2.25.1", "2.25.2"]  # each result once
    assert _state(db)[2] == {"2.25.1": "committing", "2.25.2": "committing"}


def test_results_taken_by_an_exporter_that_died_are_asked_for_once_the_wait_ran_out(
    db: Ledger,
) -> None:
    """The results listed for a request are taken: another exporter does not list them; an
    exporter killed before it asked leaves them to be asked for after the wait, not counted
    as asked."""
    from sqlalchemy import update

    from acwi_node.ledger.models import Delivery

    ids = [d.id for d in _stored(db)]
    assert [c.delivery_id for c in db.commitments_due("pacs", wait_s=300, max_requests=3)] == ids
    assert db.commitments_due("pacs", wait_s=300, max_requests=3) == []  # the other's pass
    with db.session() as s:  # the taker was killed; the wait has passed since
        s.execute(
            update(Delivery).values(commitment_requested_at=utcnow() - dt.timedelta(seconds=301))
        )
    assert [c.delivery_id for c in db.commitments_due("pacs", wait_s=300, max_requests=3)] == ids
    with db.session() as s:
        assert [s.get_one(Delivery, i).commitment_requests for i in ids] == [0, 0]


def test_an_exporter_that_stalled_past_the_wait_changes_nothing_of_the_next_takers_request(
    db: Ledger,
) -> None:
    """Exporter A took stored results to ask for their commitment and stalled longer than the
    wait; exporter B took them again and asked. A's request is then not recorded (not counted
    against the requests allowed, B's transaction stays the latest), and its failure is not
    recorded over B's request."""
    from sqlalchemy import update

    from acwi_node.ledger.models import Delivery
    from acwi_node.ledger.repository import new_claim

    ids = [d.id for d in _stored(db)]
    a, b = new_claim(), new_claim()
    assert [
        c.delivery_id for c in db.commitments_due("pacs", wait_s=300, max_requests=3, claim=a)
    ] == ids
    with db.session() as s:  # A stalls: the wait passes
        s.execute(
            update(Delivery).values(commitment_requested_at=utcnow() - dt.timedelta(seconds=301))
        )
    assert [
        c.delivery_id for c in db.commitments_due("pacs", wait_s=300, max_requests=3, claim=b)
    ] == ids
    b_uid, a_uid = str(generate_uid()), str(generate_uid())
    assert db.commitment_requested(ids, b_uid, claim=b) == ids
    assert db.commitment_requested(ids, a_uid, claim=a) == []
    db.commitment_request_failed(ids, "association rejected by PACS", claim=a)
    with db.session() as s:
        rows = [s.get_one(Delivery, i) for i in ids]
        assert [(d.commitment_requests, d.commitment_uid, d.last_error) for d in rows] == [
            (1, b_uid, ""),
            (1, b_uid, ""),
        ]
    assert _record(db, a_uid, ["2.25.1", "2.25.2"], {}) == (0, 0, False)  # A's: never asked
    assert _record(db, b_uid, ["2.25.1", "2.25.2"], {}) == (2, 0, True)
