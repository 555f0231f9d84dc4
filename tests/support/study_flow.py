"""A study's life in the ledger for tests: instances received (spool file, then row), completed,
analysed (an SR in the results folder) and delivered, without the processes that do it; and
(:func:`timed_study`) one whose every step took a given time."""

from __future__ import annotations

import datetime as dt

import pydicom
from sqlalchemy import select, update

from acwi_node.config import Settings
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import InstanceRecord, Ledger, ResultFile, RoutedJob, StudyFacts
from acwi_node.ledger.models import Delivery, Instance, Job, Study
from acwi_node.ledger.repository import Recorded

DX = "1.2.840.10008.5.1.4.1.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


def route_all(facts: StudyFacts) -> list[RoutedJob]:
    return [RoutedJob(route="chest", model="default", destinations=["pacs"], priority=0)]


def dx_record(study: str, sop: str, *, ae: str = "MOD", size: int = 100) -> InstanceRecord:
    """What the SCP records of a chest radiograph ``sop`` of ``study`` (spool path included)."""
    return InstanceRecord(
        study_uid=study,
        sop_instance_uid=sop,
        sop_class_uid=DX,
        series_uid=study + ".9",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX",
        body_part="CHEST",
        path=f"{study}/{sop}.dcm",
        size=size,
        calling_ae=ae,
    )


def spool_and_record(
    spool: Spool,
    ledger: Ledger,
    data: bytes,
    ds: pydicom.Dataset,
    *,
    calling_ae: str,
    first_in_association: bool,
) -> Recorded:
    """The Part 10 file ``data`` (whose header is ``ds``) as the SCP leaves it: its spool file,
    then its ledger row, from ``calling_ae``."""
    study_uid = str(ds.StudyInstanceUID)
    stored = spool.store(study_uid, str(ds.SOPInstanceUID), data)
    return ledger.record_instance(
        InstanceRecord(
            study_uid=study_uid,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=str(ds.get("Modality", "")),
            body_part=str(ds.get("BodyPartExamined", "")),
            path=spool.relative(stored),
            size=len(data),
            calling_ae=calling_ae,
        ),
        first_in_association=first_in_association,
    )


def receive(
    settings: Settings, ledger: Ledger, study: str, sop: str, size: int = 1000, *, ae: str = "MOD"
) -> None:
    """An instance as the SCP leaves it, from ``ae``: its spool file, then its ledger row (an
    instance recorded before re-opens its completed study: its bytes are not known)."""
    Spool(settings.spool_dir, fsync=False).store(study, sop, b"\0" * size)
    ledger.record_instance(dx_record(study, sop, ae=ae, size=size), first_in_association=False)


def study_row(ledger: Ledger, uid: str) -> Study | None:
    """The ledger's row of the study ``uid``, None before it is recorded."""
    with ledger.session() as s:
        return s.scalars(select(Study).where(Study.study_uid == uid)).one_or_none()


def study_id(ledger: Ledger, study: str) -> int:
    with ledger.session() as s:
        return s.scalars(select(Study.id).where(Study.study_uid == study)).one()


def complete(ledger: Ledger, study: str) -> tuple[int, int]:
    """Complete the study (every instance received): its one job (:func:`route_all`) and the
    study's generation."""
    with ledger.session() as s:
        st = s.scalars(select(Study).where(Study.study_uid == study)).one()
        sid, generation = st.id, st.generation
    (job_id,) = ledger.complete_study(sid, generation, route_all)
    return job_id, generation


def analyse(settings: Settings, ledger: Ledger, study: str, *, needs_review: bool = False) -> int:
    """Complete the study and analyse it: an SR in the results folder, delivery pending."""
    job_id, generation = complete(ledger, study)
    assert ledger.claim_job(job_id, lease_s=3600) is not None
    sr_uid = f"{study}.{generation}.77"
    out = Spool(settings.results_dir, fsync=False)
    path = out.store(study, sr_uid, b"\1" * 500)
    assert ledger.finish_analysis(
        job_id,
        results=[ResultFile("sr", sr_uid, SR, out.relative(path))],
        summary={
            "model": {"name": "acwi-dianet-chest", "version": "1.0.0"},
            "labels": ["normal", "nodule"],
            "probabilities": {"normal": 0.3, "nodule": 0.7},
            "predicted_label": "nodule",
            "uncertainty": {"score": 0.4, "entropy": 0.6, "epistemic": 0.02, "aleatoric": 0.6},
            "images": [],
            "needs_review": needs_review,
        },
        needs_review=needs_review,
        review_reason="uncertain" if needs_review else "",
    )
    return job_id


def deliver(ledger: Ledger) -> None:
    for d in ledger.due_deliveries():
        ledger.record_delivery(
            d.id, delivered=True, status=0, error="", max_attempts=3, backoff_s=1
        )


def delivered_study(settings: Settings, ledger: Ledger, study: str, n: int = 2) -> None:
    for k in range(1, n + 1):
        receive(settings, ledger, study, f"{study}.{k}")
    analyse(settings, ledger, study)
    deliver(ledger)
    assert ledger.get_study(study)["state"] == "delivered"  # type: ignore[index]


def timed_study(
    ledger: Ledger,
    uid: str,
    *,
    at: dt.datetime,
    route: str = "chest",
    steps: tuple[float, float, float, float] = (2.0, 0.5, 1.5, 1.0),
    priority: int = 0,
    stored: bool = True,
) -> int:
    """A study of one instance received at ``at`` and taken by ``route``; its completion,
    queue, analysis and delivery taking ``steps`` seconds (the delivery left pending unless
    ``stored``). Returns its job id."""
    received = ledger.record_instance(dx_record(uid, uid + ".1"), first_in_association=False)
    routed = RoutedJob(route=route, model="default", destinations=["pacs"], priority=priority)
    (job_id,) = ledger.complete_study(received.study_id, 1, lambda facts: [routed])
    assert ledger.claim_job(job_id, lease_s=3600) is not None
    ledger.finish_analysis(
        job_id,
        results=[ResultFile("sr", uid + ".77", SR, f"{uid}/{uid}.77.dcm")],
        summary={"predicted_label": "normal"},
        needs_review=False,
        review_reason="",
    )
    if stored:
        for d in ledger.due_deliveries():
            if d.job_id == job_id:
                ledger.record_delivery(
                    d.id, delivered=True, status=0, error="", max_attempts=3, backoff_s=1
                )
    completion, queue, analysis, delivery = steps
    times = [at + dt.timedelta(seconds=s) for s in (0, completion)]
    times.append(times[-1] + dt.timedelta(seconds=queue))
    times.append(times[-1] + dt.timedelta(seconds=analysis))
    times.append(times[-1] + dt.timedelta(seconds=delivery))
    last, completed, started, analysed, at_pacs = times
    with ledger.session() as s:
        s.execute(update(Instance).where(Instance.study_id == received.study_id).values(
            received_at=last))  # fmt: skip
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                created_at=completed, started_at=started, analysed_at=analysed,
                finished_at=at_pacs if stored else None,
            )
        )  # fmt: skip
        if stored:
            s.execute(update(Delivery).where(Delivery.job_id == job_id).values(
                delivered_at=at_pacs))  # fmt: skip
    return job_id
