"""The ledger's withdrawals: results taken back from the PACS with a rejection note.

A withdrawal is recorded on the job whose results it takes back (``jobs.withdrawn_*``), in one
transaction with everything it changes:

* the job's deliveries still pending are superseded (never sent);
* each rejection note is a result of the job (kind ``rejection-note``) with one pending
  delivery per destination it goes to, which the exporter sends like any other result;
* the job's open review items are closed (``withdrawn``): a verdict on a withdrawn result would
  send a verified SR of it. A verdict takes the job's row before its item's too
  (:meth:`acwi_node.review.store.ReviewStore.claim_verdict`) and is refused once the job is
  withdrawn; one that claimed its item just before (closed then, so passed by here) has its
  verified SR refused (:meth:`Ledger.attach_result`), and its item is closed the same way
  (:meth:`acwi_node.review.store.ReviewStore.undo_verdict`).

A result counts as possibly stored by a destination when its delivery there was delivered, is
awaiting commitment or is pending: a pending one may be on its way at this moment, and a note
naming an instance the PACS never received is harmless. A job is withdrawn once.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import Row, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from acwi_node.ledger.models import (
    REJECTION_NOTE_KIND,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    ReviewItem,
    ReviewState,
    Study,
    job_model_name,
    job_model_version,
    utcnow,
)
from acwi_node.ledger.repository import (
    Ledger,
    NoSuchStudy,
    ResultFile,
    StudyActionRefused,
    _add_result,
    _queue_deliveries,
    jobs_files_deleted,
)

__all__ = [
    "Replacement",
    "ResultsChanged",
    "WithdrawableJob",
    "WithdrawableResult",
    "Withdrawals",
    "WithdrawnJob",
]

#: Delivery states in which a result may be in the destination's hands.
_POSSIBLY_STORED = (DeliveryState.DELIVERED, DeliveryState.COMMITTING, DeliveryState.PENDING)
#: Jobs whose results are still being made: not withdrawable yet.
_UNFINISHED = (JobState.QUEUED, JobState.ANALYSING)


@dataclass(frozen=True)
class WithdrawableResult:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    #: Relative to the results directory.
    path: str
    #: The destinations that may hold it.
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class WithdrawableJob:
    job_id: int
    study_uid: str
    generation: int
    route: str
    model_name: str
    model_version: str
    #: Its results that some destination may hold (rejection notes never); empty when none
    #: reached one (withdrawing it still keeps them from being sent again).
    results: tuple[WithdrawableResult, ...]
    #: When storage retention deleted the study's files, if it did.
    files_deleted: bool
    #: Its results' reissue (:func:`acwi_node.results.uids.result_uids`).
    reissue: int = 0


@dataclass(frozen=True)
class Candidates:
    jobs: list[WithdrawableJob]
    #: Jobs that match but are still queued or analysing (withdraw again once they finish).
    unfinished: int
    #: Jobs that match and were withdrawn before.
    withdrawn_before: int


@dataclass(frozen=True)
class Replacement:
    """An earlier analysis and the later one, by another model version, that replaced it."""

    job_id: int
    study_uid: str
    model_name: str
    model_version: str
    generation: int


@dataclass(frozen=True)
class WithdrawnJob:
    job_id: int
    #: Deliveries that were pending and will not be sent.
    cancelled: int
    #: Rejection note deliveries queued.
    queued: int


class Withdrawals:
    """Withdrawals in ``ledger``."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def candidates(
        self,
        *,
        study_uid: str | None = None,
        model_name: str | None = None,
        model_version: str | None = None,
        job_ids: Collection[int] | None = None,
    ) -> Candidates:
        """The jobs whose results may be withdrawn: of study ``study_uid`` (every generation),
        and/or analysed by ``model_name`` (``model_version``), and/or among ``job_ids``, oldest
        first. Raises :class:`StudyActionRefused` for a study not in the ledger."""
        name, version = job_model_name(Job), job_model_version(Job)
        reissue = func.coalesce(Job.summary[("model", "reissue")].as_integer(), 0)
        with self.ledger.session() as s:
            # columns, not objects: a model version's recall may list every job of a year; the
            # summaries stay in the database (a CT's lists hundreds of images)
            query = select(
                Job.id,
                Job.state,
                Job.withdrawn_at,
                Job.generation,
                Job.route,
                Study.study_uid,
                name.label("model_name"),
                version.label("model_version"),
                reissue.label("reissue"),
            ).join(Study, Job.study_id == Study.id)
            if study_uid is not None:
                if s.scalar(select(Study.id).where(Study.study_uid == study_uid)) is None:
                    raise NoSuchStudy()
                query = query.where(Study.study_uid == study_uid)
            if model_name is not None:
                query = query.where(name == model_name)
            if model_version is not None:
                query = query.where(version == model_version)
            if job_ids is not None:
                query = query.where(Job.id.in_(list(job_ids)))
            matching = s.execute(query.order_by(Job.id)).all()
            unfinished = sum(1 for row in matching if row.state in _UNFINISHED)
            withdrawn_before = sum(1 for row in matching if row.withdrawn_at is not None)
            open_jobs = [
                row for row in matching if row.state not in _UNFINISHED and row.withdrawn_at is None
            ]
            stored: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
            # (id, job_id, kind, sop_instance_uid, sop_class_uid, path) of each job's results
            results: dict[int, list[Row[int, int, str, str, str, str]]] = defaultdict(list)
            deleted: set[int] = set()  # jobs whose files storage retention deleted
            ids = [row.id for row in open_jobs]
            for chunk in _chunks(ids):
                written = (
                    select(
                        Result.id,
                        Result.job_id,
                        Result.kind,
                        Result.sop_instance_uid,
                        Result.sop_class_uid,
                        Result.path,
                    )
                    .where(Result.job_id.in_(chunk), Result.kind != REJECTION_NOTE_KIND)
                    .order_by(Result.id)
                )
                for res in s.execute(written):
                    results[res.job_id].append(res)
                for job_id, result_id, destination in s.execute(
                    select(Delivery.job_id, Delivery.result_id, Delivery.destination).where(
                        Delivery.job_id.in_(chunk), Delivery.state.in_(_POSSIBLY_STORED)
                    )
                ):
                    stored[job_id][result_id].add(destination)
                deleted |= jobs_files_deleted(s, chunk)
            jobs = []
            for job in open_jobs:
                if not results[job.id]:
                    continue  # it wrote nothing: nothing to withdraw
                held = tuple(
                    WithdrawableResult(
                        r.kind,
                        r.sop_instance_uid,
                        r.sop_class_uid,
                        r.path,
                        tuple(sorted(stored[job.id][r.id])),
                    )
                    for r in results[job.id]
                    if stored[job.id][r.id]
                )
                jobs.append(
                    WithdrawableJob(
                        job.id,
                        job.study_uid,
                        job.generation,
                        job.route,
                        str(job.model_name),
                        str(job.model_version or ""),
                        held,
                        job.id in deleted,
                        int(job.reissue or 0),
                    )
                )
            return Candidates(jobs, unfinished, withdrawn_before)

    def reissue_of(self, study_uid: str, model_name: str, model_version: str) -> int:
        """How many analyses of study ``study_uid`` by ``model_name`` ``model_version`` were
        withdrawn: the next one's results are that reissue
        (:func:`acwi_node.results.uids.result_uids`), whose UIDs no rejection note named."""
        with self.ledger.session() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(Job)
                    .join(Study, Job.study_id == Study.id)
                    .where(
                        Study.study_uid == study_uid,
                        Job.withdrawn_at.is_not(None),
                        job_model_name(Job) == model_name,
                        job_model_version(Job) == model_version,
                    )
                )
                or 0
            )

    def replaced(self, since: dt.datetime) -> list[Replacement]:
        """The jobs whose results a later analysis by another model version replaced: for
        every job of a later generation of the same study and route, delivered since
        ``since`` (and not withdrawn), the earlier jobs of another model name or version that
        wrote results and were not withdrawn; oldest first, each with its latest replacement.
        """
        old, new = aliased(Job), aliased(Job)
        query = (
            select(
                old.id, Study.study_uid, job_model_name(new), job_model_version(new), new.generation
            )
            .join(
                new,
                (new.study_id == old.study_id)
                & (new.route == old.route)
                & (new.generation > old.generation),
            )
            .join(Study, Study.id == old.study_id)
            .where(
                new.state == JobState.DELIVERED,
                new.finished_at >= since,
                new.withdrawn_at.is_(None),
                old.withdrawn_at.is_(None),
                old.state.not_in(_UNFINISHED),
                (job_model_name(old) != job_model_name(new))
                | (job_model_version(old) != job_model_version(new)),
                exists().where(Result.job_id == old.id, Result.kind != REJECTION_NOTE_KIND),
            )
            .order_by(old.id, new.generation.desc())
        )
        with self.ledger.session() as s:
            found: dict[int, Replacement] = {}
            for job_id, uid, name, version, generation in s.execute(query):
                found.setdefault(job_id, Replacement(job_id, uid, name, version, generation))
            return list(found.values())

    def record(
        self,
        job_id: int,
        *,
        reason: str,
        note: str,
        by: str,
        notes: Sequence[tuple[ResultFile, Sequence[str]]],
        held: WithdrawableJob | None = None,
    ) -> WithdrawnJob:
        """Record the withdrawal of job ``job_id``'s results: its pending deliveries
        superseded, each rejection note queued for its destinations, its open review items
        closed. Raises :class:`StudyActionRefused` for a job withdrawn already or not finished.

        ``held``: the job as :meth:`candidates` found it, whose results ``notes`` reject.
        Raises :class:`ResultsChanged` when the job's results that destinations may hold are
        no longer those (a verified SR attached since): the notes would leave it out.
        """
        now = utcnow()
        with self.ledger.session() as s:
            job = s.get_one(Job, job_id, with_for_update=True)
            # A write first: SQLite locks no row, and begins its transaction only now; from
            # here on nothing this reads can change before it commits (PostgreSQL: the row
            # lock above).
            s.execute(update(Job).where(Job.id == job_id).values(generation=Job.generation))
            s.refresh(job)
            if held is not None and not _possibly_stored(s, job_id) <= _pairs(held):
                raise ResultsChanged("its results changed while the rejection notes were written")
            if job.withdrawn_at is not None:
                raise StudyActionRefused(
                    f"its results were withdrawn already ({job.withdrawn_at:%Y-%m-%d %H:%M} UTC)"
                )
            if job.state in _UNFINISHED:
                raise StudyActionRefused(
                    f"its analysis is {job.state.value}: withdraw once it has finished"
                )
            superseded = s.execute(
                update(Delivery)
                .where(Delivery.job_id == job.id, Delivery.state == DeliveryState.PENDING)
                .values(state=DeliveryState.SUPERSEDED)
            )
            cancelled: int = getattr(superseded, "rowcount", 0)
            queued = 0
            for file, destinations in notes:
                res = _add_result(s, job.id, file)
                queued += _queue_deliveries(s, job, res, now, _only(destinations))
            s.execute(
                update(ReviewItem)
                .where(ReviewItem.job_id == job.id, ReviewItem.state == ReviewState.OPEN)
                .values(state=ReviewState.CLOSED, closed_at=now, reason="withdrawn")
            )
            job.withdrawn_at = now
            job.withdrawn_by = by[:64]
            job.withdrawn_reason = reason
            job.withdrawn_note = note[:2000]
            if queued and job.state in (JobState.DELIVERED, JobState.FAILED):
                job.state = JobState.EXPORTING
                job.finished_at = None
                job.error = ""
            s.flush()
            if job.state == JobState.EXPORTING:
                # a pending delivery superseded may have been all it waited for
                self.ledger._sync_job_delivery(s, job.id)
                self.ledger._sync_study(s, job.study_id)
            return WithdrawnJob(job.id, cancelled, queued)


class ResultsChanged(Exception):
    """A job's results that destinations may hold changed while its withdrawal was prepared
    (:meth:`Withdrawals.record`): prepare it again."""


def _possibly_stored(s: Session, job_id: int) -> set[tuple[str, str]]:
    """(SOP Instance UID, destination) of each result of the job some destination may hold
    (rejection notes never), as :meth:`Withdrawals.candidates` counts them."""
    rows = s.execute(
        select(Result.sop_instance_uid, Delivery.destination)
        .join(Delivery, Delivery.result_id == Result.id)
        .where(
            Result.job_id == job_id,
            Result.kind != REJECTION_NOTE_KIND,
            Delivery.state.in_(_POSSIBLY_STORED),
        )
    )
    return {(str(uid), str(destination)) for uid, destination in rows}


def _pairs(job: WithdrawableJob) -> set[tuple[str, str]]:
    return {(r.sop_instance_uid, d) for r in job.results for d in r.destinations}


def _only(destinations: Sequence[str]) -> Callable[[str, str], bool]:
    """A delivery filter taking the results of any kind to ``destinations`` alone."""
    wanted = set(destinations)
    return lambda destination, _kind: destination in wanted


def _chunks(ids: Sequence[int], size: int = 500) -> list[Sequence[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]
