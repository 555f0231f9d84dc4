"""Records retention: once a study's files are gone, its instance rows become summaries and the
patient identifiers kept for the RIS are erased, and what the node tells of the study stays."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, update

from acwi_node.audit import audit_file, close_audit
from acwi_node.cli import main
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Hl7Inbound,
    Hl7Order,
    Hl7Outbound,
    Instance,
    InstanceArrival,
    Job,
    Purge,
    Study,
    job_model_name,
    job_model_version,
    utcnow,
)
from acwi_node.ledger.trace import study_trace
from acwi_node.observability.metrics import LedgerCollector
from acwi_node.retention import DiskSpace, Retention
from tests.support.study_flow import analyse, deliver, dx_record, receive, study_id

DAY = dt.timedelta(days=1)
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"  # a report: no model reads it
HOUR = dt.timedelta(hours=1)
PATIENT = {
    "patient_id": "PID-7^^^HOSP^MR",
    "patient_name": "DOE^JANE",
    "birth_date": "19700101",
    "sex": "F",
}


def later(delta: dt.timedelta) -> Callable[[], dt.datetime]:
    return lambda: utcnow() + delta


def plenty() -> DiskSpace:
    return DiskSpace(free_bytes=900, total_bytes=1000)


def order(ledger: Ledger, accession: str, control_id: str, **fields: Any) -> None:
    """An HL7 order from the RIS, as the order listener records it."""
    ledger.hl7_record_message(
        sender="RIS|HOSP",
        control_id=control_id,
        message_type="ORM^O01",
        ack_code="AA",
        ack=f"MSH|^~\\&|ACWI|NODE|RIS|HOSP|||ACK|A{control_id}|P|2.5\rMSA|AA|{control_id}",
        orders=[{"accession_number": accession, **PATIENT, "placer_order_number": "PL1", **fields}],
    )


def oru_delivered(ledger: Ledger, job_id: int, kind: str = "result") -> int:
    outbound = ledger.add_hl7_outbound(
        job_id=job_id,
        kind=kind,
        control_id=f"R{job_id}{kind}",
        message="MSH|^~\\&|ACWI|NODE|RIS|HOSP\rPID|1||PID-7^^^HOSP^MR||DOE^JANE",
    )
    assert outbound is not None
    ledger.record_hl7_attempt(
        outbound, delivered=True, ack_code="AA", error="", max_attempts=3, backoff_s=1
    )
    return outbound


def told(ledger: Ledger, study: str) -> tuple[list[tuple[int, str, str]], list[Any]]:
    """The trace's events (generation, kind, text) and its turnaround steps."""
    trace = study_trace(ledger, study)
    assert trace is not None
    return (
        [(e.generation, e.kind, e.text) for e in trace.events],
        [(step.name, step.seconds) for step in trace.turnaround],
    )


def instances_by_sender(settings: Settings, ledger: Ledger) -> dict[str, float]:
    """The ``acwi_instances`` gauge of ``/metrics``."""
    for family in LedgerCollector(settings, ledger)._from_ledger():
        if family.name == "acwi_instances":
            return {s.labels["calling_ae"]: s.value for s in family.samples}
    raise AssertionError("no acwi_instances gauge")


def a_study_of_two_senders(settings: Settings, ledger: Ledger, study: str) -> int:
    """Two instances from MOD, then one from a second AE after the study completed (a report
    the PACS forwarded later, kept in the generation); analysed and delivered. Returns the job
    id."""
    receive(settings, ledger, study, f"{study}.1")
    receive(settings, ledger, study, f"{study}.2")
    ledger.record_instance(
        dx_record(study, f"{study}.3", ae="WS2", size=300), first_in_association=False
    )
    job_id = analyse(settings, ledger, study)
    deliver(ledger)
    with ledger.session() as s:
        created = s.scalar(select(Study.completed_at).where(Study.study_uid == study))
        assert created is not None
        for k, ago in ((1, 30), (2, 20), (3, -10)):
            s.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == f"{study}.{k}")
                .values(received_at=created - dt.timedelta(seconds=ago))
            )
        s.execute(
            update(Study)
            .where(Study.study_uid == study)
            .values(last_received_at=created + dt.timedelta(seconds=10))
        )
    return job_id


def test_records_retention_summarises_the_instances_and_erases_the_patient_identifiers(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    study = "1.2.3"
    order(ledger, "ACC1", "O1", study_uid=study)
    order(ledger, "ACC2", "O2")  # an order no study came for
    job_id = a_study_of_two_senders(settings, ledger, study)
    oru_delivered(ledger, job_id)
    events, steps = told(ledger, study)
    assert ledger.counts()["instances"] == 3
    assert instances_by_sender(settings, ledger) == {"MOD": 2, "WS2": 1}
    received = [text for _, kind, text in events if kind == "received"]
    assert len(received) == 2
    assert received[0].startswith("2 instance(s) in 1 series (DX) from MOD, until ")
    assert received[1] == "1 instance(s) in 1 series (DX) from WS2"
    completed = [text for _, kind, text in events if kind == "completed"]
    assert completed[0].endswith(", 20.0 s after the last instance")

    # Files go after keep_hours; records not before records_keep_days after that.
    assert Retention(settings, ledger, space=plenty, clock=later(169 * HOUR)).sweep().studies == 1
    events, steps = told(ledger, study)
    soon = Retention(settings, ledger, space=plenty, clock=later(29 * DAY)).sweep()
    assert (soon.compacted, soon.orders_erased, soon.inbound_deleted) == (0, 0, 0)
    with ledger.session() as s:
        assert s.scalar(select(Hl7Order.patient_name).where(Hl7Order.accession_number == "ACC1"))

    report = Retention(settings, ledger, space=plenty, clock=later(31 * DAY)).sweep()
    assert (report.compacted, report.instance_rows) == (1, 3)
    assert (report.orders_erased, report.messages_erased, report.inbound_deleted) == (2, 1, 2)
    sid = study_id(ledger, study)
    with ledger.session() as s:
        assert s.scalars(select(Instance).where(Instance.study_id == sid)).all() == []
        arrivals = {
            a.calling_ae: (a.generation, a.instances, a.series, a.modalities)
            for a in s.scalars(select(InstanceArrival)).all()
        }
        assert arrivals == {"MOD": (1, 2, 1, "DX"), "WS2": (1, 1, 1, "DX")}
        for accession in ("ACC1", "ACC2"):
            row = s.scalars(select(Hl7Order).where(Hl7Order.accession_number == accession)).one()
            assert (row.patient_id, row.patient_name, row.birth_date, row.sex) == ("",) * 4
            assert (row.placer_order_number, row.priority) == ("PL1", "R")  # the workflow stays
        assert s.scalars(select(Hl7Outbound.message)).all() == [""]
        assert s.scalars(select(Hl7Outbound.state)).one().value == "delivered"
        assert s.scalars(select(Hl7Inbound)).all() == []
        assert s.scalars(select(Purge.records_compacted_at)).one() is not None
        assert s.scalar(select(Study.instance_count).where(Study.id == sid)) == 3

    # The study's story is the same, with one more line.
    events_after, steps_after = told(ledger, study)
    assert steps_after == steps
    compaction = (
        1,
        "retention",
        "records retention summarised the instance records and erased the patient"
        " identifiers kept for the RIS (records_keep_days passed)",
    )
    assert compaction in events_after
    assert [e for e in events_after if e != compaction] == events
    assert ledger.counts()["instances"] == 3
    assert instances_by_sender(settings, ledger) == {"MOD": 2, "WS2": 1}
    # Done once.
    again = Retention(settings, ledger, space=plenty, clock=later(31 * DAY)).sweep()
    assert (again.compacted, again.orders_erased, again.inbound_deleted) == (0, 0, 0)


def test_what_still_needs_its_records_is_not_compacted(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    order(ledger, "ACC1", "O1", study_uid="1.2.3")
    for study in ("1.2.3", "1.2.4"):
        receive(settings, ledger, study, f"{study}.1")
        analyse(settings, ledger, study)
    deliver(ledger)
    # 1.2.3's ORU is still owed to the RIS.
    pending = ledger.add_hl7_outbound(
        job_id=ledger.get_study("1.2.3")["jobs"][0]["id"],  # type: ignore[index]
        kind="result",
        control_id="R1",
        message="MSH|...",
    )
    assert pending is not None
    assert Retention(settings, ledger, space=plenty, clock=later(169 * HOUR)).sweep().studies == 2
    # 1.2.4 comes back after its purge: a new generation, receiving.
    receive(settings, ledger, "1.2.4", "1.2.4.2")
    assert ledger.get_study("1.2.4")["generation"] == 2  # type: ignore[index]

    report = Retention(settings, ledger, space=plenty, clock=later(31 * DAY)).sweep()
    assert (report.compacted, report.orders_erased) == (0, 0)
    with ledger.session() as s:
        assert s.scalar(select(Hl7Order.patient_id)) == PATIENT["patient_id"]
        assert len(s.scalars(select(Instance)).all()) == 3

    # Once the ORU is delivered, 1.2.3 goes; 1.2.4 once its second generation was purged too,
    # with both generations summarised and told.
    ledger.record_hl7_attempt(
        pending, delivered=True, ack_code="AA", error="", max_attempts=3, backoff_s=1
    )
    analyse(settings, ledger, "1.2.4")
    deliver(ledger)
    before, _ = told(ledger, "1.2.4")
    with ledger.session() as s:  # the second generation's purge: long ago too
        s.execute(update(Study).values(updated_at=utcnow() - 200 * HOUR))
    assert Retention(settings, ledger, space=plenty, clock=later(169 * HOUR)).sweep().studies == 1
    report = Retention(settings, ledger, space=plenty, clock=later(31 * DAY)).sweep()
    assert (report.compacted, report.instance_rows, report.orders_erased) == (2, 3, 1)
    with ledger.session() as s:
        assert s.scalars(select(Instance)).all() == []
        assert sorted(
            (a.generation, a.instances)
            for a in s.scalars(
                select(InstanceArrival).where(InstanceArrival.study_id == study_id(ledger, "1.2.4"))
            ).all()
        ) == [(1, 1), (2, 1)]
    after, _ = told(ledger, "1.2.4")
    assert [e for e in after if e[1] == "received"] == [e for e in before if e[1] == "received"]


def test_records_retention_off_keeps_everything_and_the_setting_is_checked(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    kept = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"records_keep_days": 0})}
    )
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    deliver(ledger)
    assert Retention(kept, ledger, space=plenty, clock=later(169 * HOUR)).sweep().studies == 1
    report = Retention(kept, ledger, space=plenty, clock=later(3650 * DAY)).sweep()
    assert report.compacted == 0
    with ledger.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 1
    assert load_settings(None).retention.records_keep_days == 30
    for bad in (-1, 40_000):
        with pytest.raises(ConfigError):
            load_settings(None, retention={"records_keep_days": bad})


def test_the_retention_command_lists_compacts_and_audits_the_erasure(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    order(ledger, "ACC1", "O1", study_uid="1.2.3")
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    oru_delivered(ledger, analyse(settings, ledger, "1.2.3"))
    deliver(ledger)
    config = settings.data_dir.parent / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
        "[retention]\nkeep_hours = 0.0001\nmin_free_percent = 0\nrecords_keep_days = 0.0001\n"
    )
    with ledger.session() as s:
        s.execute(update(Study).values(updated_at=utcnow() - HOUR))
    assert main(["--config", str(config), "retention"]) == 0
    assert "deleted the files of 1 studies" in capsys.readouterr().out
    with ledger.session() as s:  # the purge finished a while ago
        s.execute(update(Purge).values(finished_at=utcnow() - HOUR))
        s.execute(update(Hl7Order).values(updated_at=utcnow() - HOUR))

    assert main(["--config", str(config), "retention", "--dry-run", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert (records["studies"], records["planned"]) == (1, ["1.2.3"])
    with ledger.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 1

    assert main(["--config", str(config), "retention"]) == 0
    out = capsys.readouterr().out
    assert (
        "compacted the records of 1 studies (1 instance rows); erased the patient identifiers"
        " of 1 HL7 orders and 1 ORU^R01 messages" in out
    )
    close_audit()
    audited = [json.loads(line) for line in audit_file(settings).read_text().splitlines()]
    erased = [r for r in audited if r["event"] == "patient_data_erased"]
    assert len(erased) == 1 and erased[0]["study_uids"] == ["1.2.3"]
    assert erased[0]["event_id"]["code"] == "110110"
    assert "PID-7" not in audit_file(settings).read_text()
    assert "DOE" not in audit_file(settings).read_text()


def test_a_report_forwarded_after_the_purge_goes_in_its_turn_its_file_then_its_record(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A PACS that forwards what it receives sends the radiologist's report weeks later: the
    delivered study keeps its results (no model reads a report), and the report's file and
    row go like the study's own did."""
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    receive(settings, ledger, "1.2.3", "1.2.3.2")
    analyse(settings, ledger, "1.2.3")
    deliver(ledger)
    assert Retention(settings, ledger, space=plenty, clock=later(169 * HOUR)).sweep().studies == 1
    first = Retention(settings, ledger, space=plenty, clock=later(31 * DAY)).sweep()
    assert (first.compacted, first.instance_rows) == (1, 2)

    Spool(settings.spool_dir, fsync=False).store("1.2.3", "1.2.3.90", b"\3" * 700)
    report_record = dataclasses.replace(
        dx_record("1.2.3", "1.2.3.90", size=700),
        sop_class_uid=BASIC_TEXT_SR,
        series_uid="1.2.3.80",
        modality="SR",
    )
    assert not ledger.record_instance(report_record, first_in_association=False).reopened
    study = ledger.get_study("1.2.3")
    assert study is not None and (study["state"], study["generation"]) == ("delivered", 1)
    young = Retention(settings, ledger, space=plenty, clock=later(167 * HOUR)).sweep()
    assert young.studies == 0 and (settings.spool_dir / "1.2.3" / "1.2.3.90.dcm").exists()

    swept = Retention(settings, ledger, space=plenty, clock=later(169 * HOUR)).sweep()
    assert (swept.studies, swept.files, swept.bytes, swept.compacted) == (1, 1, 700, 0)
    assert not (settings.spool_dir / "1.2.3").exists()
    with ledger.session() as s:
        purge = s.scalars(select(Purge)).one()
        assert (purge.generation, purge.instances, purge.records_compacted_at) == (1, 3, None)
    assert ledger.instance_file("1.2.3.90") == ("", 700, "1.2.840.10008.1.2.1")

    again = Retention(settings, ledger, space=plenty, clock=later(31 * DAY)).sweep()
    assert (again.studies, again.compacted, again.instance_rows) == (0, 1, 1)
    with ledger.session() as s:
        assert s.scalars(select(Instance)).all() == []
        (arrival,) = s.scalars(select(InstanceArrival)).all()
        assert (arrival.instances, arrival.series, arrival.modalities) == (3, 2, "DX\\SR")
    received = [text for _, kind, text in told(ledger, "1.2.3")[0] if kind == "received"]
    assert len(received) == 1
    assert received[0].startswith("3 instance(s) in 2 series (DX, SR) from MOD")
    assert Retention(settings, ledger, space=plenty, clock=later(62 * DAY)).sweep().studies == 0


def test_the_model_that_analysed_a_job_is_kept_beside_its_summary(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """What groups jobs by model version reads two columns, not the summaries (a CT's lists
    hundreds of images); jobs an earlier version of the node analysed get them copied by the
    sweep, and meanwhile their summaries say it."""
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")

    def identity() -> tuple[Any, ...]:
        with ledger.session() as s:
            row = s.execute(
                select(
                    Job.manifest_name, Job.manifest_version, job_model_name(), job_model_version()
                )
            ).one()
            return tuple(row)

    assert identity() == ("acwi-dianet-chest", "1.0.0", "acwi-dianet-chest", "1.0.0")
    with ledger.session() as s:  # as an earlier version left it
        s.execute(update(Job).values(manifest_name=None, manifest_version=None))
    assert identity() == (None, None, "acwi-dianet-chest", "1.0.0")
    Retention(settings, ledger, space=plenty).sweep()
    assert identity() == ("acwi-dianet-chest", "1.0.0", "acwi-dianet-chest", "1.0.0")
    with ledger.session() as s:  # the columns are what is read
        s.execute(update(Job).values(manifest_version="1.0.1"))
    assert identity()[3] == "1.0.1"
