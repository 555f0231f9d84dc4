"""The ledger's shadow jobs: a route's shadow models analysing its studies after the live model
(``[[routes]] shadow_models``; README "Shadow models").

A shadow job is queued in the transaction that records its live job's results
(:meth:`acwi_node.ledger.Ledger.finish_analysis`), so it is never lost to a worker that died
in between. It is claimed with a lease as a live job is (a worker that dies mid-way leaves it
to the reconciler), its summary kept, and nothing else: no result object, no delivery, no
review item, no HL7 message, no notification, no effect on the study's state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update

from acwi_node.ledger.models import Job as LiveJob
from acwi_node.ledger.models import JobState, ShadowJob, ShadowState, utcnow
from acwi_node.ledger.repository import JobClaim, Ledger


@dataclass(frozen=True)
class ClaimedShadow:
    id: int
    job_id: int
    route: str
    model: str
    #: the worker's claim, which its lease renewals, its end and a give-back name
    claim: JobClaim | None = None


class ShadowJobs:
    """Shadow jobs in ``ledger``."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def of_job(self, job_id: int) -> list[int]:
        """The queued shadow jobs of a live job (to enqueue once its results are recorded)."""
        with self.ledger.session() as s:
            return list(
                s.scalars(
                    select(ShadowJob.id).where(
                        ShadowJob.job_id == job_id, ShadowJob.state == ShadowState.QUEUED
                    )
                )
            )

    def mark_enqueued(self, ids: Sequence[int]) -> None:
        with self.ledger.session() as s:
            s.execute(
                update(ShadowJob).where(ShadowJob.id.in_(list(ids))).values(enqueued_at=utcnow())
            )

    def _lease(self) -> Any:
        return func.coalesce(ShadowJob.heartbeat_at, ShadowJob.started_at)

    def claim(self, shadow_id: int, *, lease_s: float, max_attempts: int) -> ClaimedShadow | None:
        """Take a shadow job: queued, or analysing by a worker whose lease ran out and with
        attempts left (after ``max_attempts`` it fails). None when it is gone, final, being
        analysed elsewhere, or its live job was superseded (then it is too)."""
        now = utcnow()
        stale = (ShadowJob.state == ShadowState.ANALYSING) & (
            self._lease() <= now - dt.timedelta(seconds=lease_s)
        )
        with self.ledger.session() as s:
            won = s.execute(
                update(ShadowJob)
                .where(
                    ShadowJob.id == shadow_id,
                    (ShadowJob.state == ShadowState.QUEUED)
                    | (stale & (ShadowJob.attempts < max_attempts)),
                )
                .values(
                    state=ShadowState.ANALYSING,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=ShadowJob.attempts + 1,
                )
            )
            if not getattr(won, "rowcount", 0):
                s.execute(
                    update(ShadowJob)
                    .where(ShadowJob.id == shadow_id, stale, ShadowJob.attempts >= max_attempts)
                    .values(
                        state=ShadowState.FAILED,
                        finished_at=now,
                        error=f"analysis did not finish in {max_attempts} attempt(s)",
                    )
                )
                return None
            shadow = s.get_one(ShadowJob, shadow_id)
            live = s.get_one(LiveJob, shadow.job_id)
            if live.state == JobState.SUPERSEDED:
                shadow.state = ShadowState.SUPERSEDED
                shadow.finished_at = now
                return None
            assert shadow.started_at is not None  # set by the claim
            return ClaimedShadow(
                shadow.id,
                live.id,
                live.route,
                shadow.model,
                JobClaim(shadow.started_at, shadow.attempts),
            )

    @staticmethod
    def _held(shadow_id: int, claim: JobClaim | None) -> list[Any]:
        """The shadow job analysing (with ``claim``: by that claim, not taken over since)."""
        held = [ShadowJob.id == shadow_id, ShadowJob.state == ShadowState.ANALYSING]
        if claim is not None:
            held += [ShadowJob.started_at == claim.started_at, ShadowJob.attempts == claim.attempts]
        return held

    def renew(self, shadow_id: int, *, claim: JobClaim | None = None) -> bool:
        """Renew the lease; False when the shadow job is no longer analysing (by ``claim``)."""
        with self.ledger.session() as s:
            result = s.execute(
                update(ShadowJob).where(*self._held(shadow_id, claim)).values(heartbeat_at=utcnow())
            )
            return bool(getattr(result, "rowcount", 0))

    def finish(
        self, shadow_id: int, summary: dict[str, Any], *, claim: JobClaim | None = None
    ) -> bool:
        return self._end(shadow_id, ShadowState.DONE, claim, summary=summary, error="")

    def fail(self, shadow_id: int, error: str, *, claim: JobClaim | None = None) -> bool:
        return self._end(shadow_id, ShadowState.FAILED, claim, error=error[:2000])

    def give_back(self, shadow_id: int, claim: JobClaim) -> bool:
        """Queue a shadow job again, its attempt not counted, if it is still ``claim`` (the
        ledger stopped answering while its worker ran it); False when it is not."""
        with self.ledger.session() as s:
            result = s.execute(
                update(ShadowJob)
                .where(*self._held(shadow_id, claim))
                .values(
                    state=ShadowState.QUEUED,
                    attempts=ShadowJob.attempts - 1,
                    enqueued_at=utcnow(),
                    started_at=None,
                    heartbeat_at=None,
                )
            )
            return bool(getattr(result, "rowcount", 0))

    def _end(
        self, shadow_id: int, state: ShadowState, claim: JobClaim | None, **values: Any
    ) -> bool:
        with self.ledger.session() as s:
            result = s.execute(
                update(ShadowJob)
                .where(*self._held(shadow_id, claim))
                .values(state=state, finished_at=utcnow(), **values)
            )
            return bool(getattr(result, "rowcount", 0))

    def to_requeue(self, *, older_than_s: float, lease_s: float, startup: bool) -> list[int]:
        """Shadow jobs whose broker message may be lost: at start-up every unfinished one;
        later those queued ``older_than_s`` without being started, or analysing by a worker
        whose lease ran out."""
        now = utcnow()
        queued = ShadowJob.state == ShadowState.QUEUED
        analysing = ShadowJob.state == ShadowState.ANALYSING
        if not startup:
            queued = queued & (
                ShadowJob.enqueued_at.is_(None)
                | (ShadowJob.enqueued_at <= now - dt.timedelta(seconds=older_than_s))
            )
            analysing = analysing & (self._lease() <= now - dt.timedelta(seconds=lease_s))
        with self.ledger.session() as s:
            return list(s.scalars(select(ShadowJob.id).where(queued | analysing)))
