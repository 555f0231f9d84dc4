"""Retrievals in the ledger: requests to fetch studies from a PACS, and how far each got.

A request is queued by ``acwi-node studies retrieve``, ``POST /api/retrievals`` or the
dashboard, and run by the ``scp`` process (:mod:`acwi_node.ingest.retrieval`): claiming one is a
conditional update, so several such processes never run the same request at once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import distinct, func, select, update

from acwi_node.ledger.models import Instance, Retrieval, RetrievalState, Study, utcnow
from acwi_node.ledger.repository import Ledger

#: The keys a retrieval query may hold (each a DICOM matching key of the Study level).
QUERY_KEYS = ("study_uid", "accession_number", "study_date", "modality")


@dataclass(frozen=True)
class RetrievalTask:
    """A claimed retrieval, for the process that runs it."""

    id: int
    source: str
    query: dict[str, str]
    attempt: int
    requested_by: str
    study_uids: list[str]
    retrieved_uids: list[str]


@dataclass(frozen=True)
class StudyNow:
    """A study the node holds: its ledger id, state and generation."""

    id: int
    state: str
    generation: int


@dataclass(frozen=True)
class RetrievalView:
    """A retrieval as the CLI, the API and the dashboard show it."""

    id: int
    source: str
    query: dict[str, str]
    state: str
    requested_by: str
    attempts: int
    studies_found: int
    studies_retrieved: int
    completed: int
    failed: int
    warnings: int
    error: str
    note: str
    created_at: dt.datetime
    finished_at: dt.datetime | None
    next_attempt_at: dt.datetime | None
    study_uids: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "query": self.query,
            "state": self.state,
            "requested_by": self.requested_by,
            "attempts": self.attempts,
            "studies_found": self.studies_found,
            "studies_retrieved": self.studies_retrieved,
            "instances_completed": self.completed,
            "instances_failed": self.failed,
            "instances_warning": self.warnings,
            "error": self.error,
            "note": self.note,
            "created_at": self.created_at.isoformat() + "Z",
            "finished_at": self.finished_at.isoformat() + "Z" if self.finished_at else None,
            "next_attempt_at": (
                self.next_attempt_at.isoformat() + "Z" if self.next_attempt_at else None
            ),
            "study_uids": self.study_uids,
        }


def _view(r: Retrieval) -> RetrievalView:
    waiting = r.state == RetrievalState.QUEUED
    return RetrievalView(
        id=r.id,
        source=r.source,
        query=dict(r.query),
        state=r.state.value,
        requested_by=r.requested_by,
        attempts=r.attempts,
        studies_found=len(r.study_uids),
        studies_retrieved=len(r.retrieved_uids),
        completed=r.completed,
        failed=r.failed,
        warnings=r.warnings,
        error=r.error,
        note=r.note,
        created_at=r.created_at,
        finished_at=r.finished_at,
        next_attempt_at=r.next_attempt_at if waiting else None,
        study_uids=list(r.study_uids),
    )


class Retrievals:
    """The retrieval requests of one ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # ----------------------------------------------------------------- requests
    def request(self, source: str, query: dict[str, str], requested_by: str = "") -> int:
        """Queue a retrieval; returns its id. ``query`` is checked by the caller
        (:func:`acwi_node.ingest.retrieval.check_query`)."""
        unknown = sorted(set(query) - set(QUERY_KEYS))
        if unknown:
            raise ValueError(f"unknown query key(s): {', '.join(unknown)}")
        with self.ledger.session() as s:
            row = Retrieval(source=source, query=dict(query), requested_by=requested_by[:64])
            s.add(row)
            s.flush()
            return row.id

    def get(self, retrieval_id: int) -> RetrievalView | None:
        with self.ledger.session() as s:
            row = s.get(Retrieval, retrieval_id)
            return _view(row) if row is not None else None

    def recent(self, limit: int = 50) -> list[RetrievalView]:
        """The latest requests, newest first."""
        with self.ledger.session() as s:
            rows = s.scalars(select(Retrieval).order_by(Retrieval.id.desc()).limit(limit)).all()
            return [_view(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Requests per state (every state named)."""
        out = {state.value: 0 for state in RetrievalState}
        with self.ledger.session() as s:
            for state in s.scalars(select(Retrieval.state)):
                out[state.value] += 1
        return out

    # ----------------------------------------------------------------- running them
    def claim(self, lease_s: float) -> RetrievalTask | None:
        """The oldest retrieval due now (queued and its time come, or running with its lease
        run out), now running under a lease of ``lease_s``; None when none is due."""
        now = utcnow()
        due = ((Retrieval.state == RetrievalState.QUEUED) & (Retrieval.next_attempt_at <= now)) | (
            (Retrieval.state == RetrievalState.RUNNING) & (Retrieval.lease_until < now)
        )
        with self.ledger.session() as s:
            candidates = s.scalars(
                select(Retrieval.id).where(due).order_by(Retrieval.id).limit(5)
            ).all()
            for rid in candidates:
                result = s.execute(
                    update(Retrieval)
                    .where(Retrieval.id == rid, due)
                    .values(
                        state=RetrievalState.RUNNING,
                        lease_until=now + dt.timedelta(seconds=lease_s),
                        attempts=Retrieval.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                if getattr(result, "rowcount", 0):
                    row = s.get(Retrieval, rid)
                    assert row is not None
                    s.refresh(row)
                    return RetrievalTask(
                        id=row.id,
                        source=row.source,
                        query=dict(row.query),
                        attempt=row.attempts,
                        requested_by=row.requested_by,
                        study_uids=list(row.study_uids),
                        retrieved_uids=list(row.retrieved_uids),
                    )
        return None

    def found(self, retrieval_id: int, study_uids: list[str]) -> None:
        """The C-FIND found these studies (kept for the later attempts)."""
        with self.ledger.session() as s:
            s.execute(
                update(Retrieval)
                .where(Retrieval.id == retrieval_id)
                .values(study_uids=list(study_uids))
            )

    def progress(
        self,
        retrieval_id: int,
        *,
        lease_s: float,
        retrieved_uid: str | None = None,
        completed: int = 0,
        failed: int = 0,
        warnings: int = 0,
    ) -> None:
        """Renew the lease; add a study moved and its sub-operation counts."""
        with self.ledger.session() as s:
            row = s.get(Retrieval, retrieval_id, with_for_update=True)
            if row is None:
                return
            row.lease_until = utcnow() + dt.timedelta(seconds=lease_s)
            if retrieved_uid is not None and retrieved_uid not in row.retrieved_uids:
                row.retrieved_uids = [*row.retrieved_uids, retrieved_uid]
            row.completed += completed
            row.failed += failed
            row.warnings += warnings

    def finish(self, retrieval_id: int, *, error: str = "", note: str = "") -> None:
        """Done (``error`` empty) or failed for good."""
        with self.ledger.session() as s:
            s.execute(
                update(Retrieval)
                .where(Retrieval.id == retrieval_id)
                .values(
                    state=RetrievalState.FAILED if error else RetrievalState.DONE,
                    error=error[:2000],
                    note=note[:2000],
                    lease_until=None,
                    finished_at=utcnow(),
                )
            )

    def retry(self, retrieval_id: int, *, error: str, after_s: float) -> None:
        """Failed this time: queued again, due in ``after_s``."""
        with self.ledger.session() as s:
            s.execute(
                update(Retrieval)
                .where(Retrieval.id == retrieval_id)
                .values(
                    state=RetrievalState.QUEUED,
                    error=error[:2000],
                    lease_until=None,
                    next_attempt_at=utcnow() + dt.timedelta(seconds=after_s),
                )
            )

    def defer(self, retrieval_id: int, *, after_s: float) -> None:
        """Not now, and not an attempt: queued again, due in ``after_s`` (its studies on the
        node wait for their analyses)."""
        with self.ledger.session() as s:
            s.execute(
                update(Retrieval)
                .where(Retrieval.id == retrieval_id, Retrieval.state == RetrievalState.RUNNING)
                .values(
                    state=RetrievalState.QUEUED,
                    attempts=Retrieval.attempts - 1,
                    lease_until=None,
                    next_attempt_at=utcnow() + dt.timedelta(seconds=after_s),
                )
            )

    # ----------------------------------------------------------------- the studies
    def study_states(self, study_uids: list[str]) -> dict[str, StudyNow]:
        """Those of ``study_uids`` the node holds, as they are now."""
        with self.ledger.session() as s:
            rows = s.execute(
                select(Study.study_uid, Study.id, Study.state, Study.generation).where(
                    Study.study_uid.in_(list(study_uids))
                )
            ).all()
        return {uid: StudyNow(sid, state.value, gen) for uid, sid, state, gen in rows}

    def other_arrivals(
        self, calling_ae: str, since: dt.datetime, *, besides: str
    ) -> tuple[int, int]:
        """(instances, studies) of studies other than ``besides`` whose instance rows a sender
        with the calling AE title ``calling_ae`` wrote since ``since``: what a PACS sent in
        answer to a C-MOVE of ``besides`` when that study never came."""
        with self.ledger.session() as s:
            instances, studies = s.execute(
                select(func.count(Instance.id), func.count(distinct(Instance.study_id)))
                .join(Study, Study.id == Instance.study_id)
                .where(
                    Study.last_received_at >= since,
                    Study.study_uid != besides,
                    Instance.received_at >= since,
                    Instance.calling_ae == calling_ae,
                )
            ).one()
        return int(instances), int(studies)
