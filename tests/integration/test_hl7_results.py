"""ORU^R01 results to a real MLLP peer (a subprocess): delivery, refusals, retries, PID source."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from acwi_node.config import Settings, load_settings
from acwi_node.hl7 import client
from acwi_node.hl7.client import OruSender, queue_oru
from acwi_node.hl7.messages import Verdict, oru_observations
from acwi_node.hl7.orders import OrderIntake
from acwi_node.ledger import InstanceRecord, Ledger, ResultFile, RoutedJob, StudyFacts
from acwi_node.ledger.models import ReviewItem, utcnow
from acwi_node.retention.records import RecordsStore
from acwi_node.review.store import ReviewStore, SessionInfo
from tests.support import write_secondary_capture
from tests.support.mllp_peer import Peer
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

STUDY_UID = "1.2.826.0.1.3680043.8.498.88"
SUMMARY = {
    "model": {"name": "dianet", "version": "1.0.0"},
    "labels": ["normal", "abnormal"],
    "probabilities": {"normal": 0.1, "abnormal": 0.9},
    "predicted_label": "abnormal",
    "uncertainty": {"score": 0.05},
    "ood_score": 0.2,
    "needs_review": False,
}


@pytest.fixture
def make_peer(tmp_path: Path) -> Iterator[Callable[[str], Peer]]:
    peers: list[Peer] = []

    def start(ack: str = "AA") -> Peer:
        peers.append(Peer(tmp_path, ack))
        return peers[-1]

    yield start
    for p in peers:
        p.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """The ledger's URL: the embedded default (None), or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))


def make_settings(
    tmp_path: Path,
    port: int,
    *,
    max_attempts: int = 3,
    database_url: str | None = None,
    outage_patience_s: float = 3600,
) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path / "data"}
        | ({} if database_url is None else {"database_url": database_url}),
        ingest={"fsync": False},
        hl7={
            "sending_application": "ACWI",
            "sending_facility": "NODE",
            "ris": {
                "host": "127.0.0.1",
                "port": port,
                "receiving_application": "RIS",
                "receiving_facility": "HOSP",
                "max_attempts": max_attempts,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.01,
                "timeout_s": 5,
                "outage_patience_s": outage_patience_s,
            },
        },
    )


def analysed_job(
    settings: Settings,
    ledger: Ledger,
    *,
    promise: str | None = None,
    summary: dict[str, Any] | None = None,
) -> int:
    """A study with one spooled instance whose analysis finished (promising its ORU with the
    MSH-10 ``promise``, as the worker does when a RIS is configured)."""
    rel = f"{STUDY_UID}/1.dcm"
    write_secondary_capture(
        settings.spool_dir / rel,
        study_uid=STUDY_UID,
        patient_id="DICOM-PID",
        patient_name="Header^Patient",
    )
    r = ledger.record_instance(
        InstanceRecord(STUDY_UID, f"{STUDY_UID}.1", "1.2.840.10008.5.1.4.1.1.7", f"{STUDY_UID}.2",
                       "1.2.840.10008.1.2.1", "OT", "", rel, 1, "MOD"),
        first_in_association=False,
    )  # fmt: skip
    return analyse(ledger, r.study_id, 1, promise=promise, summary=summary)


def reanalysed_job(ledger: Ledger, job_id: int, *, promise: str | None = None) -> int:
    """The study of the analysed ``job_id`` reprocessed (``acwi-node studies reprocess``) and
    analysed again as its next generation (promising its ORU as :func:`analysed_job` does)."""
    generation = ledger.reprocess_study(STUDY_UID)
    study_id = ledger.job_report_inputs(job_id)["study_id"]
    return analyse(ledger, study_id, generation, promise=promise)


def analyse(
    ledger: Ledger,
    study_id: int,
    generation: int,
    *,
    promise: str | None = None,
    summary: dict[str, Any] | None = None,
) -> int:
    """Complete, route and finish the analysis of one generation of a study."""

    def route(_: StudyFacts) -> list[RoutedJob]:
        return [RoutedJob("all", "default", [], 0)]

    (job_id,) = ledger.complete_study(study_id, generation, route)
    assert ledger.claim_job(job_id, lease_s=30) is not None
    sr = ResultFile("sr", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "x.dcm")
    summary = SUMMARY if summary is None else summary
    review = bool(summary.get("needs_review"))
    assert ledger.finish_analysis(
        job_id,
        results=[sr],
        summary=summary,
        needs_review=review,
        review_reason="uncertain" if review else "",
        hl7_result_control_id=promise,
    )
    return job_id


def drain(sender: OruSender, ledger: Ledger, until: str) -> list[dict]:
    deadline = time.monotonic() + 20
    while True:
        sender.tick()
        rows = ledger.hl7_outbound(STUDY_UID)
        if rows and all(r["state"] == until for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.02)


def test_result_delivered_with_patient_from_dicom(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    job_id = analysed_job(settings, ledger)
    assert queue_oru(settings, ledger, job_id) is not None
    assert queue_oru(settings, ledger, job_id) is None  # idempotent
    rows = drain(OruSender(settings, ledger), ledger, "delivered")
    assert [(r["kind"], r["attempts"], r["last_ack_code"]) for r in rows] == [("result", 1, "AA")]
    (message,) = peer.messages()
    segs = message.split("\r")
    assert segs[0].startswith("MSH|^~\\&|ACWI|NODE|RIS|HOSP|")
    assert segs[1] == "PID|1||DICOM-PID||Header^Patient|||O"
    obs = oru_observations(message)
    assert obs["PROB"] == [("normal", "0.1000"), ("abnormal", "0.9000")]
    assert obs["NEEDS_REVIEW"][0][1].startswith("N^")
    # A verdict later travels as its own message.
    verdict = Verdict(agrees=True, label="abnormal", reviewer="R7^Smith^Ann")
    assert queue_oru(settings, ledger, job_id, verdict, review_id=1) is not None
    drain(OruSender(settings, ledger), ledger, "delivered")
    assert oru_observations(peer.messages()[-1])["VERDICT"][0][1].startswith("AGREE^")
    ledger.dispose()


def obr_status(message: str) -> str:
    return next(seg for seg in message.split("\r") if seg.startswith("OBR")).split("|")[25]


def test_after_a_final_result_the_study_s_next_messages_are_corrections(
    tmp_path: Path, make_peer: Callable[[str], Peer], database_url: str | None
) -> None:
    """A RIS that holds a radiologist's final result refuses a preliminary one after it: a
    reprocessed study's new result, and its new verdict, replace the final one (C)."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port, database_url=database_url)
    ledger = Ledger(settings.database_url)
    first = analysed_job(settings, ledger)
    queue_oru(settings, ledger, first)
    queue_oru(settings, ledger, first, Verdict(agrees=True, label="abnormal"), review_id=1)
    drain(OruSender(settings, ledger), ledger, "delivered")
    # The worker promised the new result's ORU and died: the sender builds it, as a correction.
    second = reanalysed_job(ledger, first, promise="ACWI-PROMISED-C")
    assert second != first
    queue_oru(settings, ledger, second, Verdict(agrees=False, label="normal"), review_id=2)
    drain(OruSender(settings, ledger), ledger, "delivered")
    assert [obr_status(m) for m in peer.messages()] == ["P", "F", "C", "C"]
    ledger.dispose()


def test_a_reprocessed_study_without_a_verdict_stays_preliminary(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    first = analysed_job(settings, ledger)
    queue_oru(settings, ledger, first)
    drain(OruSender(settings, ledger), ledger, "delivered")
    queue_oru(settings, ledger, reanalysed_job(ledger, first))
    drain(OruSender(settings, ledger), ledger, "delivered")
    assert [obr_status(m) for m in peer.messages()] == ["P", "P"]
    ledger.dispose()


def test_a_verdict_waits_for_its_study_s_result_in_back_off(
    tmp_path: Path, make_peer: Callable[[str], Peer], database_url: str | None
) -> None:
    """The result (P) is in back-off when the verdict (F) is queued: the RIS gets them in that
    order once it answers, never F before P."""
    port = free_port()
    settings = make_settings(tmp_path, port, max_attempts=50, database_url=database_url)
    ledger = Ledger(settings.database_url)
    job_id = analysed_job(settings, ledger)
    queue_oru(settings, ledger, job_id)
    sender = OruSender(settings, ledger)
    ris = settings.hl7.ris
    assert ris is not None
    sender.ris = ris.model_copy(update={"backoff_initial_s": 1.0, "backoff_max_s": 1.0})
    assert sender.tick() == 1  # the RIS is down: the result waits a second for its next try
    queue_oru(settings, ledger, job_id, Verdict(agrees=True, label="abnormal"), review_id=1)
    assert ledger.due_hl7_outbound() == []  # the verdict, due now, may not overtake it
    peer = make_peer("AA")
    sender.ris = sender.ris.model_copy(update={"port": peer.port})
    drain(sender, ledger, "delivered")
    assert [obr_status(m) for m in peer.messages()] == ["P", "F"]
    ledger.dispose()


def order(settings: Settings, ledger: Ledger, patient_name: str) -> None:
    """The RIS's order of the study (ORM^O01 with its Study Instance UID, accession ACC-9),
    taken by the order listener."""
    message = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|ACWI|NODE|20240101||ORM^O01|O1|P|2.5",
            f"PID|1||ORD-PID^^^HOSP^MR||{patient_name}||19800101|F",
            "ORC|NW|PL9|FI9",
            "OBR|1|PL9|FI9|CT^CT head^L" + "|" * 14 + "ACC-9",
            f"ZDS|{STUDY_UID}",
        ]
    )
    assert b"MSA|AA|O1" in OrderIntake(settings, ledger).handle(message.encode())


def test_patient_from_order_and_script_in_name(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    order(settings, ledger, "<script>x</script>^Eve")
    job_id = analysed_job(settings, ledger)
    queue_oru(settings, ledger, job_id)
    drain(OruSender(settings, ledger), ledger, "delivered")
    (message,) = peer.messages()
    segs = message.split("\r")
    assert segs[1] == "PID|1||ORD-PID^^^HOSP^MR||<script>x</script>^Eve||19800101|F"
    obr = segs[3].split("|")
    assert (obr[2], obr[3], obr[4], obr[18]) == ("PL9", "FI9", "CT^CT head^L", "ACC-9")
    ledger.dispose()


def test_after_a_patient_merge_the_result_carries_the_surviving_patient(
    tmp_path: Path, make_peer: Callable[[str], Peer], database_url: str | None
) -> None:
    """ADT^A40 merges the order's patient (MRG-1) into another: the ORU^R01 of the study,
    analysed after the merge, names the surviving patient (PID-3, PID-5 of the A40)."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port, database_url=database_url)
    ledger = Ledger(settings.database_url)
    order(settings, ledger, "Doe^Jane")
    other = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|ACWI|NODE|20240101||ORM^O01|O2|P|2.5",
            "PID|1||O_D%\\E\\1^^^HOSP^MR||Roe^Rick||19500101|M",
            "ORC|NW|PL10|FI10",
            "OBR|1|PL10|FI10|CT^CT head^L" + "|" * 14 + "ACC-10",
        ]
    )
    assert b"MSA|AA|O2" in OrderIntake(settings, ledger).handle(other.encode())
    merge = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|ACWI|NODE|20240102||ADT^A40^ADT_A39|A40-1|P|2.5",
            "EVN|A40|20240102",
            "PID|1||SURV-PID^^^HOSP^MR~99_%^^^HOSP^PI||Doe^Jane^Q||19800101|F",
            "MRG|ORD-PID^^^HOSP^MR",
            "PID|2||ROE-2^^^HOSP^MR||Roe^Rick",
            "MRG|O_D%\\E\\1^^^HOSP^MR",  # LIKE's wildcards and escape are the id's own
        ]
    )
    assert b"MSA|AA|A40-1" in OrderIntake(settings, ledger).handle(merge.encode())
    assert (ledger.hl7_order("ACC-10") or {}).get("patient_id") == "ROE-2^^^HOSP^MR"
    job_id = analysed_job(settings, ledger)
    queue_oru(settings, ledger, job_id)
    drain(OruSender(settings, ledger), ledger, "delivered")
    (message,) = peer.messages()
    pid = message.split("\r")[1]
    assert pid == "PID|1||SURV-PID^^^HOSP^MR~99_%^^^HOSP^PI||Doe^Jane^Q||19800101|F"
    # merging the merged-away identifier again finds nothing to move
    again = merge.replace("A40-1", "A40-2").replace("SURV-PID", "OTHER")
    assert b"MSA|AA|A40-2" in OrderIntake(settings, ledger).handle(again.encode())
    assert (ledger.hl7_order("ACC-9") or {}).get("patient_id", "").startswith("SURV-PID^")
    ledger.dispose()


def test_an_order_whose_patient_identifiers_were_erased_gives_the_orders_numbers_only(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    """An order scheduled long before its study (records retention erased its patient
    identifiers, as it does ``retention.records_keep_days`` after an order no study names):
    the ORU takes the patient from the images and the order numbers from the order."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    order(settings, ledger, "Order^Eve")
    records = RecordsStore(ledger)
    assert records.erase_unclaimed_orders(updated_before=utcnow() + dt.timedelta(seconds=1)) == 1
    queue_oru(settings, ledger, analysed_job(settings, ledger))
    drain(OruSender(settings, ledger), ledger, "delivered")
    (message,) = peer.messages()
    segs = message.split("\r")
    assert segs[1] == "PID|1||DICOM-PID||Header^Patient|||O"
    obr = segs[3].split("|")
    assert (obr[2], obr[3], obr[18]) == ("PL9", "FI9", "ACC-9")
    ledger.dispose()


def test_an_order_without_patient_identifiers_takes_them_from_the_images(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    """A RIS that gave the patient's name but no PID-3 (an old one writes the identifier in
    PID-2 alone): the ORU^R01's PID-3, which HL7 requires, was empty; it takes the images'
    Patient ID, the name still the order's."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    message = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|ACWI|NODE|20240101||ORM^O01|O1|P|2.3",
            "PID|1|OLD-PID|||Order^Eve||19800101|F",
            "ORC|NW|PL9|FI9",
            "OBR|1|PL9|FI9|CT^CT head^L" + "|" * 14 + "ACC-9",
            f"ZDS|{STUDY_UID}",
        ]
    )
    assert b"MSA|AA|O1" in OrderIntake(settings, ledger).handle(message.encode())
    queue_oru(settings, ledger, analysed_job(settings, ledger))
    drain(OruSender(settings, ledger), ledger, "delivered")
    (sent,) = peer.messages()
    assert sent.split("\r")[1] == "PID|1||DICOM-PID||Order^Eve||19800101|F"
    ledger.dispose()


def test_application_error_is_retried_then_failed(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    peer = make_peer("AE")
    settings = make_settings(tmp_path, peer.port, max_attempts=3)
    ledger = Ledger(settings.database_url)
    job_id = analysed_job(settings, ledger)
    queue_oru(settings, ledger, job_id)
    (row,) = drain(OruSender(settings, ledger), ledger, "failed")
    assert (row["attempts"], row["last_ack_code"]) == (3, "AE")
    assert len(peer.messages()) == 3
    assert len({m.split("\r")[0].split("|")[9] for m in peer.messages()}) == 1  # same MSH-10
    ledger.dispose()


@pytest.mark.parametrize("version", ["2.9", ""])
def test_an_acknowledgement_of_any_hl7_version_delivers(tmp_path: Path, version: str) -> None:
    """A RIS whose ACK names a version hl7apy does not know in MSH-12, or none: its AA is
    read, the ORU delivered once (not sent again until it fails)."""
    peer = Peer(tmp_path, "AA", version)
    try:
        settings = make_settings(tmp_path, peer.port, max_attempts=3)
        ledger = Ledger(settings.database_url)
        queue_oru(settings, ledger, analysed_job(settings, ledger))
        (row,) = drain(OruSender(settings, ledger), ledger, "delivered")
        assert (row["attempts"], row["last_ack_code"]) == (1, "AA")
        assert len(peer.messages()) == 1
        ledger.dispose()
    finally:
        peer.stop()


def test_rejection_fails_at_once(tmp_path: Path, make_peer: Callable[[str], Peer]) -> None:
    peer = make_peer("AR")
    settings = make_settings(tmp_path, peer.port, max_attempts=5)
    ledger = Ledger(settings.database_url)
    queue_oru(settings, ledger, analysed_job(settings, ledger))
    (row,) = drain(OruSender(settings, ledger), ledger, "failed")
    assert (row["attempts"], row["last_ack_code"]) == (1, "AR")
    ledger.dispose()


def test_unreachable_ris_is_retried_until_it_answers(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    """A RIS that refuses connections is an outage: retried beyond max_attempts (not
    counted) until it answers; with no patience, it fails after max_attempts; unreachable
    longer than the patience, it fails saying since when."""
    port = free_port()
    settings = make_settings(tmp_path, port, max_attempts=2)
    ledger = Ledger(settings.database_url)
    queue_oru(settings, ledger, analysed_job(settings, ledger))
    sender = OruSender(settings, ledger)
    for _ in range(4):
        sender.tick()
        time.sleep(0.02)
    (row,) = ledger.hl7_outbound(STUDY_UID)
    assert row["state"] == "pending" and row["attempts"] == 0 and row["last_error"]
    assert row["outage_attempts"] == 4 and row["unreachable_since"]
    from acwi_node.ledger.trace import study_trace

    trace = study_trace(ledger, STUDY_UID)
    assert trace is not None
    assert any("the RIS unreachable since" in e.text for e in trace.events), trace.events
    from acwi_node.observability.metrics import ledger_registry

    waited = ledger_registry(settings, ledger).get_sample_value("acwi_ris_unreachable_seconds")
    assert waited is not None and waited > 0
    from acwi_node.review.views import destination_outboxes

    (ris_row,) = [
        r for r in destination_outboxes(ReviewStore(ledger), settings) if r["name"] == "RIS (HL7)"
    ]
    assert ris_row["unreachable_since"][:19] == row["unreachable_since"][:19]
    assert ris_row["pending"] == 1
    from acwi_node.config import NotifyTarget
    from acwi_node.notify import queue_events

    told = settings.model_copy(
        update={
            "notify": [
                NotifyTarget(
                    name="ris-team", url="http://127.0.0.1:9/", events=["unreachable"],
                    min_outage_s=0,
                )
            ]
        }
    )  # fmt: skip
    assert queue_events(told, ledger) == 1 and queue_events(told, ledger) == 0
    peer = make_peer("AA")
    assert peer.port != port
    sender.ris = settings.hl7.ris.model_copy(update={"port": peer.port})  # type: ignore[union-attr]
    (row,) = drain(sender, ledger, "delivered")
    assert row["last_ack_code"] == "AA" and row["attempts"] == 1 and row["outage_attempts"] == 0
    ledger.dispose()


def test_an_outage_of_the_ris_fails_once_past_the_patience(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, free_port(), max_attempts=2, outage_patience_s=0.2)
    ledger = Ledger(settings.database_url)
    queue_oru(settings, ledger, analysed_job(settings, ledger))
    (row,) = drain(OruSender(settings, ledger), ledger, "failed")
    assert row["attempts"] == 0 and row["outage_attempts"] >= 2
    assert "(hl7.ris.outage_patience_s)" in row["last_error"]
    ledger.dispose()
    off = make_settings(tmp_path / "off", free_port(), max_attempts=2, outage_patience_s=0)
    ledger = Ledger(off.database_url)
    queue_oru(off, ledger, analysed_job(off, ledger))
    (row,) = drain(OruSender(off, ledger), ledger, "failed")
    assert (row["attempts"], row["outage_attempts"]) == (2, 0)
    ledger.dispose()


def test_a_promised_oru_is_built_by_the_sender_when_the_worker_died_first(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    """The worker recorded its results (and the ORU's promise) and died before building it."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    analysed_job(settings, ledger, promise="ACWI-PROMISED-1")
    (row,) = ledger.hl7_outbound(STUDY_UID)
    assert (row["state"], row["control_id"]) == ("pending", "ACWI-PROMISED-1")
    rows = drain(OruSender(settings, ledger), ledger, "delivered")
    assert [(r["kind"], r["attempts"]) for r in rows] == [("result", 1)]
    (message,) = peer.messages()
    assert message.split("\r")[0].split("|")[9] == "ACWI-PROMISED-1"  # MSH-10
    assert oru_observations(message)["PROB"] == [("normal", "0.1000"), ("abnormal", "0.9000")]
    ledger.dispose()


def test_the_worker_builds_its_promised_oru_once(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    job_id = analysed_job(settings, ledger, promise="ACWI-PROMISED-2")
    assert queue_oru(settings, ledger, job_id) is not None  # fills the promised row
    assert queue_oru(settings, ledger, job_id) is None
    sender = OruSender(settings, ledger)
    assert sender.build_promised() == 0
    drain(sender, ledger, "delivered")
    assert len(peer.messages()) == 1
    ledger.dispose()


def test_a_promised_oru_that_cannot_be_built_fails_with_the_reason(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    analysed_job(settings, ledger, promise="ACWI-PROMISED-3", summary={})
    (row,) = drain(OruSender(settings, ledger), ledger, "failed")
    assert "cannot build the message" in row["last_error"]
    assert peer.messages() == []
    ledger.dispose()


def review_case(settings: Settings, ledger: Ledger) -> tuple[ReviewStore, int, SessionInfo]:
    """An analysed job that needs review, and a signed-in radiologist."""
    analysed_job(settings, ledger, summary=SUMMARY | {"needs_review": True})
    store = ReviewStore(ledger)
    user = store.add_user("jane", "x", "radiologist")
    with ledger.session() as s:
        item_id = s.scalars(select(ReviewItem.id)).one()
    return store, item_id, SessionInfo(user.id, user.name, user.role, "t", utcnow())


def test_a_verdicts_promised_oru_survives_the_web_process(
    tmp_path: Path, make_peer: Callable[[str], Peer]
) -> None:
    """The verdict was recorded (with its ORU's promise) and the web process died before it
    built the message: the ORU sender builds it from the stored verdict."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port)
    ledger = Ledger(settings.database_url)
    store, item_id, session = review_case(settings, ledger)
    store.claim_verdict(
        item_id, user=session, action="confirm", label="abnormal", model_label="abnormal",
        reason="", hl7_control_id="ACWI-V-1",
    )  # fmt: skip
    (row,) = drain(OruSender(settings, ledger), ledger, "delivered")
    assert (row["kind"], row["control_id"]) == (f"verdict-{item_id}", "ACWI-V-1")
    (message,) = peer.messages()
    assert oru_observations(message)["VERDICT"][0][1].startswith("AGREE^")
    ledger.dispose()


def test_an_undone_verdict_withdraws_its_promised_oru(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, free_port())
    ledger = Ledger(settings.database_url)
    store, item_id, session = review_case(settings, ledger)
    verdict_id = store.claim_verdict(
        item_id, user=session, action="confirm", label="abnormal", model_label="abnormal",
        reason="", hl7_control_id="ACWI-V-2",
    )  # fmt: skip
    assert [r["kind"] for r in ledger.hl7_outbound(STUDY_UID)] == [f"verdict-{item_id}"]
    store.undo_verdict(verdict_id)  # its verified SR could not be stored
    assert ledger.hl7_outbound(STUDY_UID) == []
    ledger.dispose()


def test_a_ris_answer_quoting_the_patient_is_kept_without_their_identifiers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The RIS refuses the ORU in words that quote the patient's name and ID (as many do):
    the reason the ledger keeps, the warning logged and the audit record's detail say what
    the RIS said without them."""
    import logging

    from acwi_node.hl7 import client
    from acwi_node.hl7.messages import AckInfo

    sent: list[str] = []
    audited: list[str] = []

    def refuse(host: str, port: int, message: str, *, timeout_s: float, **_: Any) -> AckInfo:
        sent.append(message)
        control_id = message.split("\r")[0].split("|")[9]
        return AckInfo(
            "AR", control_id, "Unknown person HEADER^PATIENT (header patient, DICOM-PID)"
        )

    monkeypatch.setattr(client, "send_message", refuse)
    monkeypatch.setattr(client, "audit", lambda *a, **kw: audited.append(kw["detail"]))
    settings = make_settings(tmp_path, free_port())
    ledger = Ledger(settings.database_url)
    try:
        queue_oru(settings, ledger, analysed_job(settings, ledger))
        with caplog.at_level(logging.WARNING, logger="acwi_node"):
            (row,) = drain(OruSender(settings, ledger), ledger, "failed")
        assert "PID|1||DICOM-PID||Header^Patient" in sent[0]
        said = "Unknown person [redacted] ([redacted], [redacted])"
        assert row["last_error"] == said, row
        assert said in caplog.text and said in audited[0]
        for leaked in ("HEADER", "Header", "DICOM-PID"):
            assert leaked not in caplog.text and leaked not in audited[0]
    finally:
        ledger.dispose()


def test_identifying_values_of_an_oru() -> None:
    """What a RIS's answer must not be quoted with: identifiers, the name whole and in parts,
    the birth date as sent and written out, order numbers and the accession number."""
    from acwi_node.hl7.client import without_identifiers
    from acwi_node.hl7.messages import identifying_values

    message = "\r".join(
        [
            "MSH|^~\\&|ACWI|NODE|RIS|HOSP|20260101120000||ORU^R01^ORU_R01|C1|P|2.5",
            "PID|1||PID-77^^^HOSP~NHS9988||O'Brien^Mary Ann^^^Dr||19700131|F",
            "ORC|RE|PL9|FI9",
            "OBR|1|PL9|FI9|AI^AI analysis^99ACWI||||||||||||||ACC-9",
        ]
    )
    values = identifying_values(message)
    for expected in ("PID-77", "NHS9988", "O'Brien", "Mary Ann", "O'Brien^Mary Ann^^^Dr",
                     "19700131", "1970-01-31", "PL9", "FI9", "ACC-9"):  # fmt: skip
        assert expected in values, (expected, values)
    assert "Dr" not in values  # too short to redact anywhere safely
    text = "mary ann o'brien (pid-77) born 1970-01-31, ACC-9: no order PL9; PL90 is another"
    assert without_identifiers(text, message) == (
        "[redacted] [redacted] ([redacted]) born [redacted], [redacted]: no order [redacted];"
        " PL90 is another"
    )


def test_two_hl7_processes_send_each_oru_once(
    tmp_path: Path,
    make_peer: Callable[[str], Peer],
    database_url: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ``hl7`` processes on one ledger (two hosts): while one sends a due ORU, the other's
    pass comes; the RIS gets the message once."""
    peer = make_peer("AA")
    settings = make_settings(tmp_path, peer.port, database_url=database_url)
    ledger, other_ledger = Ledger(settings.database_url), Ledger(settings.database_url)
    job_id = analysed_job(settings, ledger)
    assert queue_oru(settings, ledger, job_id) is not None
    first, second = OruSender(settings, ledger), OruSender(settings, other_ledger)
    real_send = client.send_message
    other_passes: list[int] = []

    def send_while_the_other_passes(*args: Any, **kwargs: Any) -> Any:
        if not other_passes:  # the other process's pass, in the middle of this send
            other_passes.append(-1)  # (its own send, if any, comes back here)
            other_passes[0] = second.tick()
        return real_send(*args, **kwargs)

    monkeypatch.setattr(client, "send_message", send_while_the_other_passes)
    assert first.tick() == 1
    assert other_passes == [0]  # it found nothing due
    assert [r["state"] for r in ledger.hl7_outbound(STUDY_UID)] == ["delivered"]
    assert len(peer.messages()) == 1
    ledger.dispose()
    other_ledger.dispose()
