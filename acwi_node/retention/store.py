"""Storage retention's reads and writes on the ledger: which studies may lose their files, and
the record of each purge.

A study may be purged when nothing will read its files again: it is finished (delivered,
not routed or failed), no association sends it (one counted open that has sent it nothing
for :data:`ASSOCIATION_GONE_AFTER` is one nothing released), no job of it waits
or runs, no delivery of it is pending and no item of it is open on the review worklist.
:meth:`RetentionStore.claim` checks that again inside the transaction that empties its
instances' paths and writes the :class:`~acwi_node.ledger.models.Purge` row; the files go
after it commits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, exists, not_, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    UNSETTLED_DELIVERY_STATES,
    Delivery,
    Instance,
    Job,
    JobState,
    Purge,
    ReviewItem,
    ReviewState,
    Study,
    StudyState,
    utcnow,
)

FINISHED_STATES = (StudyState.DELIVERED, StudyState.NOT_ROUTED, StudyState.FAILED)
_BUSY_JOB_STATES = (JobState.QUEUED, JobState.ANALYSING, JobState.EXPORTING)
#: An association still counted open on a study (``Study.open_associations``) that has sent
#: it nothing for this long holds it no longer. A process killed with associations or
#: requests open has them released by a process that finds it gone (``Ledger.release_holder``:
#: an SCP's orphaned journal, a web or retrieval process's free lock file,
#: :mod:`acwi_node.ingest.holders`); this is the backstop for a count nothing releases: no
#: such process started since, a count an earlier version left. Without it, such a count
#: would keep the study's files for good.
ASSOCIATION_GONE_AFTER = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Candidate:
    """A finished study whose current generation still has its files."""

    study_id: int
    study_uid: str
    generation: int


@dataclass(frozen=True)
class PurgeClaim:
    """A purge whose ledger part is done; its files are left to delete."""

    id: int
    study_uid: str
    generation: int
    reason: str
    #: Spool files modified after this belong to a later generation: kept.
    received_before: dt.datetime
    #: Result files modified after this belong to a later job: kept.
    started_at: dt.datetime
    instances: int

    @classmethod
    def of(cls, purge: Purge, study_uid: str) -> PurgeClaim:
        return cls(
            id=purge.id,
            study_uid=study_uid,
            generation=purge.generation,
            reason=purge.reason,
            received_before=purge.received_before,
            started_at=purge.started_at,
            instances=purge.instances,
        )


def may_purge() -> ColumnElement[bool]:
    """The study (``Study``) is finished and nothing will read its files again."""
    busy_job = exists().where(Job.study_id == Study.id, Job.state.in_(_BUSY_JOB_STATES))
    # A result awaiting storage commitment is sent again if the destination refuses it.
    pending_delivery = exists().where(
        Delivery.job_id == Job.id,
        Job.study_id == Study.id,
        Delivery.state.in_(UNSETTLED_DELIVERY_STATES),
    )
    open_review = exists().where(
        ReviewItem.study_id == Study.id, ReviewItem.state == ReviewState.OPEN
    )
    no_association = or_(
        Study.open_associations <= 0,
        Study.last_received_at < utcnow() - ASSOCIATION_GONE_AFTER,
    )
    return and_(
        Study.state.in_(FINISHED_STATES),
        no_association,
        not_(busy_job),
        not_(pending_delivery),
        not_(open_review),
    )


class RetentionStore:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def candidates(
        self,
        *,
        unreviewed_before: dt.datetime | None,
        reviewed_before: dt.datetime | None,
        any_age: bool = False,
        limit: int = 1000,
    ) -> list[Candidate]:
        """Finished studies not purged in their current generation: those last active before
        ``unreviewed_before`` (never on the review worklist) or ``reviewed_before`` (on it; the
        later of the study's last update and its last closed review item counts), or with
        ``any_age`` all of them. Studies never reviewed come first, then the least recently
        active; None for a time leaves those studies out (unless ``any_age``)."""
        # purged in its current generation, and nothing came since (a report or key object
        # note the PACS forwarded later is kept in the delivered study, and goes in its turn)
        purged = exists().where(
            Purge.study_id == Study.id,
            Purge.generation == Study.generation,
            Purge.received_before >= Study.last_received_at,
        )
        reviewed = exists().where(ReviewItem.study_id == Study.id)
        query = (
            select(Study.id, Study.study_uid, Study.generation)
            .where(may_purge(), not_(purged))
            .order_by(reviewed, Study.updated_at, Study.id)
            .limit(limit)
        )
        if not any_age:
            old_enough: list[ColumnElement[bool]] = []
            if unreviewed_before is not None:
                old_enough.append(and_(not_(reviewed), Study.updated_at < unreviewed_before))
            if reviewed_before is not None:
                closed_since = exists().where(
                    ReviewItem.study_id == Study.id, ReviewItem.closed_at >= reviewed_before
                )
                old_enough.append(
                    and_(reviewed, Study.updated_at < reviewed_before, not_(closed_since))
                )
            if not old_enough:
                return []
            query = query.where(or_(*old_enough))
        with self.ledger.session() as s:
            if self.ledger.engine.dialect.name == "postgresql":
                # The planner prices this query (every finished study against its purges)
                # high enough to compile it to machine code first, which took three times
                # as long as running it over a year of studies: not for this query.
                s.execute(text("SET LOCAL jit = off"))
            rows = s.execute(query).all()
        return [Candidate(study_id=r[0], study_uid=r[1], generation=r[2]) for r in rows]

    def claim(self, candidate: Candidate, reason: str) -> PurgeClaim | None:
        """Take ``candidate``'s current generation for deletion: its instances' paths are
        emptied (a job of a later generation analyses only what arrives from then on) and the
        purge recorded. None if the study changed meanwhile (re-opened, a new job, a review
        item) or another process claimed it.

        A generation purged before takes its purge up again for what arrived since (kept in
        it without re-opening it): the row's limit moves to the study's last arrival and its
        record compaction is due again."""
        now = utcnow()
        try:
            with self.ledger.session() as s:
                study = s.get(Study, candidate.study_id, with_for_update=True)
                if study is None or study.generation != candidate.generation:
                    return None
                still = s.scalar(select(exists().where(Study.id == study.id, may_purge())))
                if not still:
                    return None
                earlier = s.scalars(
                    select(Purge)
                    .where(Purge.study_id == study.id, Purge.generation == study.generation)
                    .with_for_update()
                ).one_or_none()
                if earlier is not None and (
                    earlier.finished_at is None  # being deleted, or left for the next sweep
                    or earlier.received_before >= study.last_received_at
                ):
                    return None
                received_before = study.last_received_at
                emptied = s.execute(
                    update(Instance)
                    .where(
                        Instance.study_id == study.id,
                        Instance.generation <= study.generation,
                        Instance.path != "",
                        # A version received after the claim's read keeps its path.
                        Instance.received_at <= received_before,
                    )
                    .values(path="")
                    .execution_options(synchronize_session=False)
                )
                count = int(getattr(emptied, "rowcount", 0) or 0)
                if earlier is not None:
                    earlier.received_before = received_before
                    earlier.finished_at = None
                    earlier.records_compacted_at = None
                    earlier.instances += count
                    s.flush()
                    return dataclasses.replace(
                        PurgeClaim.of(earlier, study.study_uid), reason=reason, instances=count
                    )
                purge = Purge(
                    study_id=study.id,
                    generation=study.generation,
                    reason=reason,
                    received_before=received_before,
                    started_at=now,
                    instances=count,
                )
                s.add(purge)
                s.flush()
                return PurgeClaim.of(purge, study.study_uid)
        except IntegrityError:  # another process claimed this generation first
            return None

    def unfinished(self, *, started_before: dt.datetime) -> list[PurgeClaim]:
        """Purges whose files a stopped process left undeleted."""
        with self.ledger.session() as s:
            rows = s.execute(
                select(Purge, Study.study_uid)
                .join(Study, Study.id == Purge.study_id)
                .where(Purge.finished_at.is_(None), Purge.started_at < started_before)
                .order_by(Purge.id)
            ).all()
        return [PurgeClaim.of(p, uid) for p, uid in rows]

    def purged(self, study_uids: Sequence[str]) -> list[PurgeClaim]:
        """Of ``study_uids``, the finished studies whose current generation a finished purge
        took, nothing having arrived since: their folders should be empty (files found there
        came back with a restore)."""
        found: list[PurgeClaim] = []
        uids = list(study_uids)
        with self.ledger.session() as s:
            for start in range(0, len(uids), 500):
                rows = s.execute(
                    select(Purge, Study.study_uid)
                    .join(Study, Study.id == Purge.study_id)
                    .where(
                        Study.study_uid.in_(uids[start : start + 500]),
                        Purge.generation == Study.generation,
                        Purge.finished_at.is_not(None),
                        Purge.received_before >= Study.last_received_at,
                        may_purge(),
                    )
                    .order_by(Purge.id)
                ).all()
                found += [PurgeClaim.of(p, uid) for p, uid in rows]
        return found

    def known(self, study_uids: Sequence[str]) -> set[str]:
        """Of ``study_uids``, those the ledger has a study row of (in any state)."""
        found: set[str] = set()
        uids = list(study_uids)
        with self.ledger.session() as s:
            for start in range(0, len(uids), 500):
                found.update(
                    s.scalars(
                        select(Study.study_uid).where(
                            Study.study_uid.in_(uids[start : start + 500])
                        )
                    )
                )
        return found

    def finish(self, claim: PurgeClaim, *, files: int, size: int) -> None:
        with self.ledger.session() as s:
            s.execute(
                update(Purge)
                .where(Purge.id == claim.id)
                .values(finished_at=utcnow(), files=Purge.files + files, bytes=Purge.bytes + size)
            )
