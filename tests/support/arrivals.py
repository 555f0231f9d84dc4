"""Studies written straight into the ledger at given times, from given sources and given a
job on given routes: what the studies-arriving monitor counts."""

from __future__ import annotations

import datetime as dt
import uuid

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, JobState, Study, StudyState

WEEK = dt.timedelta(days=7)


class Arrivals:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def add(self, at: dt.datetime, source: str, n: int = 1, *, route: str | None = None) -> None:
        """``n`` studies first received at ``at`` from ``source``; each given a job on
        ``route`` a minute later (none: not routed)."""
        with self.ledger.session() as s:
            for _ in range(n):
                study = Study(
                    study_uid=f"2.25.{uuid.uuid4().int}",
                    calling_ae=source,
                    state=StudyState.DELIVERED if route else StudyState.NOT_ROUTED,
                    first_received_at=at,
                    last_received_at=at,
                )
                s.add(study)
                if route is None:
                    continue
                s.flush()
                s.add(
                    Job(
                        study_id=study.id,
                        generation=1,
                        route=route,
                        model=route,
                        state=JobState.DELIVERED,
                        created_at=at + dt.timedelta(minutes=1),
                    )
                )

    def weekly(
        self,
        now: dt.datetime,
        source: str,
        per_week: list[int],
        *,
        route: str | None = None,
        before: dt.timedelta = dt.timedelta(minutes=30),
    ) -> None:
        """``per_week[k]`` studies ``before`` the same time ``k`` weeks before ``now`` (k = 0:
        now's own window)."""
        for week, n in enumerate(per_week):
            if n:
                self.add(now - WEEK * week - before, source, n, route=route)
