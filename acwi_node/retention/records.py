"""Records retention: what the ledger keeps of a study once storage retention deleted its files.

A study's instance rows (one per image: most of the ledger's rows) and the patient
identifiers the ledger holds for the RIS (its HL7 order's patient fields, the text of its
ORU^R01 messages) are needed while the study's files are: to analyse, to send, to review.
``retention.records_keep_days`` after its purge finished, :meth:`RecordsStore.compact`
replaces the instance rows with one :class:`~acwi_node.ledger.models.InstanceArrival` per
generation and sending AE (what the study's trace and the instance counts read) and erases
those identifiers, in one transaction. What stays is UIDs and figures: the study, its jobs,
results, deliveries, verdicts and audit records.

A study is compacted only when nothing will use what goes: it is finished in the generation
that was purged (not re-opened since), no job, delivery or ORU of it is pending and no item of
it is open on the review worklist. HL7 orders that name no study the ledger holds, and the
record of each inbound HL7 message (kept to answer a repeated one), go by their own age.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, exists, func, not_, or_, select, update
from sqlalchemy.orm import Session

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    UNSETTLED_DELIVERY_STATES,
    Hl7Inbound,
    Hl7Order,
    Hl7Outbound,
    Instance,
    InstanceArrival,
    Job,
    Purge,
    Study,
    StudyState,
    job_model_name,
    job_model_version,
    utcnow,
)
from acwi_node.ledger.trace import arrivals_by_sender
from acwi_node.retention.store import may_purge


@dataclass(frozen=True)
class CompactionCandidate:
    """A study whose files were deleted long enough ago, and the purge that deleted them."""

    purge_id: int
    study_id: int
    study_uid: str
    generation: int


@dataclass(frozen=True)
class Compacted:
    """What compacting one study did."""

    study_uid: str
    #: Instance rows summarised and deleted.
    instance_rows: int
    #: HL7 orders whose patient identifiers were erased.
    orders: int
    #: ORU^R01 messages whose text was erased.
    messages: int


_PATIENT_FIELDS = ("patient_id", "patient_name", "birth_date", "sex")


def _holds_patient_data() -> ColumnElement[bool]:
    return or_(*(getattr(Hl7Order, name) != "" for name in _PATIENT_FIELDS))


def _may_compact() -> ColumnElement[bool]:
    """The study (``Study``) may lose its instance rows and patient identifiers."""
    pending_oru = exists().where(
        Hl7Outbound.study_id == Study.id, Hl7Outbound.state.in_(UNSETTLED_DELIVERY_STATES)
    )
    return and_(may_purge(), not_(pending_oru))


class RecordsStore:
    """Records retention's reads and writes on the ledger (module docstring)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def candidates(
        self, *, purged_before: dt.datetime, limit: int = 200
    ) -> list[CompactionCandidate]:
        """Studies whose current generation's purge finished before ``purged_before`` and
        whose records are not compacted yet, oldest purge first."""
        query = (
            select(Purge.id, Study.id, Study.study_uid, Study.generation)
            .join(Study, Study.id == Purge.study_id)
            .where(
                Purge.generation == Study.generation,
                Purge.finished_at.is_not(None),
                Purge.finished_at < purged_before,
                Purge.records_compacted_at.is_(None),
                _may_compact(),
            )
            .order_by(Purge.finished_at, Purge.id)
            .limit(limit)
        )
        with self.ledger.session() as s:
            rows = s.execute(query).all()
        return [CompactionCandidate(r[0], r[1], r[2], r[3]) for r in rows]

    def compact(self, candidate: CompactionCandidate) -> Compacted | None:
        """Summarise and delete the study's instance rows that storage retention emptied, erase
        the patient identifiers kept for it, and mark the purge compacted: one transaction.
        None if the study changed meanwhile (re-opened, a new job or review item, an ORU
        queued) or another process compacted it."""
        now = utcnow()
        with self.ledger.session() as s:
            study = s.get(Study, candidate.study_id, with_for_update=True)
            purge = s.get(Purge, candidate.purge_id, with_for_update=True)
            if (
                study is None
                or purge is None
                or purge.records_compacted_at is not None
                or study.generation != candidate.generation
                or not s.scalar(select(exists().where(Study.id == study.id, _may_compact())))
            ):
                return None
            # The rows a purge emptied; a version received since keeps its path and its row.
            gone = and_(Instance.study_id == study.id, Instance.path == "")
            rows = self._summarise(s, study, gone)
            s.execute(delete(Instance).where(gone).execution_options(synchronize_session=False))
            orders = s.execute(
                update(Hl7Order)
                .where(Hl7Order.study_uid == study.study_uid, _holds_patient_data())
                .values(**dict.fromkeys(_PATIENT_FIELDS, ""))
                .execution_options(synchronize_session=False)
            )
            messages = s.execute(
                update(Hl7Outbound)
                .where(
                    Hl7Outbound.study_id == study.id,
                    # none is pending (checked above), unless one was queued since
                    Hl7Outbound.state.not_in(UNSETTLED_DELIVERY_STATES),
                    Hl7Outbound.message != "",
                )
                .values(message="")
                .execution_options(synchronize_session=False)
            )
            purge.records_compacted_at = now
            return Compacted(
                study_uid=study.study_uid,
                instance_rows=rows,
                orders=int(getattr(orders, "rowcount", 0) or 0),
                messages=int(getattr(messages, "rowcount", 0) or 0),
            )

    @staticmethod
    def _summarise(s: Session, study: Study, gone: ColumnElement[bool]) -> int:
        """Add the rows selected by ``gone`` to the study's arrivals; returns how many."""
        groups = s.execute(arrivals_by_sender(gone)).all()
        if not groups:
            return 0
        modalities: dict[tuple[int, str], set[str]] = defaultdict(set)
        for generation, ae, modality in s.execute(
            select(Instance.generation, Instance.calling_ae, Instance.modality)
            .where(gone, Instance.modality != "")
            .distinct()
        ).all():
            modalities[(generation, ae)].add(modality)
        # When each generation completed (its jobs were made then; the current one's time is
        # the study's): what it waited for is what arrived until then.
        completed: dict[int, dt.datetime] = dict(
            s.execute(
                select(Job.generation, func.min(Job.created_at))
                .where(Job.study_id == study.id)
                .group_by(Job.generation)
            ).all()
        )
        if study.completed_at is not None and study.state != StudyState.RECEIVING:
            completed[study.generation] = study.completed_at
        waited: dict[tuple[int, str], dt.datetime] = {}
        for generation, at in completed.items():
            for ae, last in s.execute(
                select(Instance.calling_ae, func.max(Instance.received_at))
                .where(gone, Instance.generation == generation, Instance.received_at <= at)
                .group_by(Instance.calling_ae)
            ).all():
                waited[(generation, ae)] = last
        existing = {
            (a.generation, a.calling_ae): a
            for a in s.scalars(
                select(InstanceArrival).where(InstanceArrival.study_id == study.id)
            ).all()
        }
        total = 0
        for generation, ae, count, series, first, last in groups:
            key = (generation, ae)
            total += count
            arrival = existing.get(key)
            if arrival is None:
                s.add(
                    InstanceArrival(
                        study_id=study.id,
                        generation=generation,
                        calling_ae=ae,
                        instances=count,
                        series=series,
                        modalities="\\".join(sorted(modalities[key]))[:64],
                        first_received_at=first,
                        last_received_at=last,
                        waited_until=waited.get(key),
                    )
                )
                continue
            # Rows of this generation and AE compacted before (a version that arrived after
            # an earlier purge): the figures add up; series may count twice.
            arrival.instances += count
            arrival.series += series
            arrival.modalities = "\\".join(
                sorted(set(filter(None, arrival.modalities.split("\\"))) | modalities[key])
            )[:64]
            arrival.first_received_at = min(arrival.first_received_at, first)
            arrival.last_received_at = max(arrival.last_received_at, last)
            later = [t for t in (arrival.waited_until, waited.get(key)) if t is not None]
            arrival.waited_until = max(later) if later else None
        s.flush()
        return total

    # ------------------------------------------------------------ by their own age
    @staticmethod
    def _unclaimed_orders(updated_before: dt.datetime) -> ColumnElement[bool]:
        """Orders last updated before then that name no study the ledger holds (a study it
        names is erased with that study's records)."""
        held = exists().where(Study.study_uid == Hl7Order.study_uid)
        return and_(
            Hl7Order.updated_at < updated_before,
            _holds_patient_data(),
            or_(Hl7Order.study_uid.is_(None), not_(held)),
        )

    def erase_unclaimed_orders(self, *, updated_before: dt.datetime, dry_run: bool = False) -> int:
        """Erase the patient identifiers of such orders; returns how many (a dry run: would)."""
        where = self._unclaimed_orders(updated_before)
        with self.ledger.session() as s:
            if dry_run:
                return int(s.scalar(select(func.count()).select_from(Hl7Order).where(where)) or 0)
            done = s.execute(
                update(Hl7Order)
                .where(where)
                .values(**dict.fromkeys(_PATIENT_FIELDS, ""))
                .execution_options(synchronize_session=False)
            )
            return int(getattr(done, "rowcount", 0) or 0)

    def copy_model_identity(self, *, limit: int = 2000) -> int:
        """Copy the model's manifest name and version out of the summaries of up to ``limit``
        jobs an earlier version of the node analysed (:func:`job_model_name` then reads the
        columns, not the summaries); returns how many."""
        todo = (
            select(Job.id)
            .where(Job.manifest_version.is_(None), Job.analysed_at.is_not(None))
            .limit(limit)
            .scalar_subquery()
        )
        with self.ledger.session() as s:
            done = s.execute(
                update(Job)
                .where(Job.id.in_(todo))
                .values(
                    manifest_name=func.substr(job_model_name(), 1, 64),
                    manifest_version=func.substr(job_model_version(), 1, 64),
                )
                .execution_options(synchronize_session=False)
            )
            return int(getattr(done, "rowcount", 0) or 0)

    def delete_inbound(self, *, received_before: dt.datetime, dry_run: bool = False) -> int:
        """Delete the records of inbound HL7 messages received before then (a repeat of one
        is then taken as a new message); returns how many (a dry run: would)."""
        where = Hl7Inbound.received_at < received_before
        with self.ledger.session() as s:
            if dry_run:
                return int(s.scalar(select(func.count()).select_from(Hl7Inbound).where(where)) or 0)
            done = s.execute(
                delete(Hl7Inbound).where(where).execution_options(synchronize_session=False)
            )
            return int(getattr(done, "rowcount", 0) or 0)


__all__ = ["Compacted", "CompactionCandidate", "RecordsStore"]
