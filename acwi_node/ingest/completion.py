"""Study completion: decide when a study is complete, route it, and queue its jobs.

A study is complete when no association is sending it any more and a quiet period has passed
since the last release and the last instance, or, while an association stays open, when no
instance arrived for ``max_wait_s``. Completion is a conditional update in the ledger, so several
processes may run this loop at once without routing a study twice. Instances arriving after
completion re-open the study (a new generation); its new job supersedes the old one.
Stronger signals (:mod:`acwi_node.ingest.mpps`: MPPS COMPLETED, a release-complete sender's
A-RELEASE) complete a study earlier.

Every :data:`~acwi_node.ingest.holders.SWEEP_EVERY_S`, and before it completes any study, the
loop replays the ingest journals of SCP processes that are gone (:mod:`.orphans`), then
releases their associations: a killed SCP process that nothing starts again leaves no study
to complete without the instances it acknowledged.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from celery import Celery

from acwi_node.config import Settings
from acwi_node.ingest.holders import SWEEP_EVERY_S, release_gone_holders
from acwi_node.ingest.journal import JOURNAL_DIR
from acwi_node.ingest.mpps import CompletionSignals
from acwi_node.ingest.orphans import OrphanedJournals
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger, RoutedJob, StudyFacts
from acwi_node.ledger.models import utcnow
from acwi_node.observability.logging import LoopFailures
from acwi_node.routing.rules import decide_routes, explain_no_route, hospital_today
from acwi_node.tasks.queue import enqueue, reconcile

log = logging.getLogger("acwi_node.completion")

#: How far the wall clock may move from the monotonic clock between two passes before it is
#: taken as stepped (NTP slewing moves it by under a millisecond a second).
CLOCK_STEP_S = 2.0


class CompletionService:
    """Background loop: completion, routing, enqueueing and the periodic reconciler."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        celery: Celery,
        *,
        signals: CompletionSignals | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.celery = celery
        #: Stronger completion signals (MPPS, release-complete senders); wakes this loop.
        self.signals = signals
        if signals is not None:
            signals.wake = self.poke
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reconcile = 0.0
        self._last_holders_sweep = 0.0
        #: Replays the journals of stopped SCP processes (made on first use).
        self._orphans: OrphanedJournals | None = None
        #: ``time.monotonic()`` of the last replay of them that failed (-inf: none).
        self._journals_failed_at = float("-inf")
        #: ``time.monotonic()`` of the last finished pass (readiness: the loop is alive).
        self.last_pass: float | None = None
        #: (wall clock, monotonic clock) at the start of the last pass: a step between them.
        self._clocks: tuple[dt.datetime, float] | None = None
        self.wall_clock = utcnow
        self.monotonic = time.monotonic
        #: A ledger that is down logs a traceback, then a line a minute, not one a pass.
        self.failures = LoopFailures(log, "completion pass")

    def _today(self) -> dt.date:
        """The hospital's date (routes' ``max_age_days``: Study Dates are on its clock)."""
        return hospital_today(self.settings.monitoring.timezone, self.wall_clock())

    def decide(self, facts: StudyFacts) -> list[RoutedJob]:
        return decide_routes(self.settings.routes, facts, self._today())

    def explain(self, facts: StudyFacts) -> str:
        return explain_no_route(self.settings.routes, facts, self._today())

    def _follow_clock_step(self) -> None:
        """The ledger's times are the wall clock's (every process shares them); this loop's
        waits are measured on them. Were the wall clock stepped since the last pass, the
        ledger moves the times stamped before the step (:meth:`Ledger.clock_stepped`); at the
        first pass, the times a step back left in the future (the node was down, or not yet
        started). A pass that fails to record it tries again at the next."""
        wall, mono = self.wall_clock(), self.monotonic()
        last = self._clocks
        if last is None:
            moved = self.ledger.clock_stepped(
                -dt.timedelta(seconds=CLOCK_STEP_S),
                stamped_before=wall,
                timers=False,
                retrieval_lease_s=self.settings.retrieve.lease_s,
                session_lifetime_s=self.settings.review.session_lifetime_s,
            )
            if moved:
                log.warning(
                    "%d ledger time(s) were in the future (the wall clock was set back):"
                    " counted from now",
                    moved,
                )
        else:
            passed = dt.timedelta(seconds=mono - last[1])
            step = (wall - last[0]) - passed
            if abs(step.total_seconds()) > CLOCK_STEP_S:
                moved = self.ledger.clock_stepped(
                    step,
                    stamped_before=last[0] + passed,
                    retrieval_lease_s=self.settings.retrieve.lease_s,
                    session_lifetime_s=self.settings.review.session_lifetime_s,
                )
                log.warning(
                    "the wall clock stepped %+.0f s: %d ledger time(s) moved with it",
                    step.total_seconds(),
                    moved,
                )
        self._clocks = (wall, mono)

    def tick(self) -> list[int]:
        """One pass: complete due studies and queue their jobs. Returns the new job ids."""
        cfg = self.settings.completion
        self._follow_clock_step()
        new_jobs: list[int] = []
        now = time.monotonic()
        sweep = now - self._last_holders_sweep >= SWEEP_EVERY_S
        if sweep:
            self._replay_stopped_journals()
        due = self._due()
        # Before a study completes, what a killed SCP process acknowledged for it and had not
        # recorded yet is in the ledger: its journal is replayed first, then looked at again.
        if due and not sweep and self._replay_stopped_journals():
            due = self._due()
        for (study_id, generation), by in due.items():
            job_ids = self.ledger.complete_study(
                study_id, generation, self.decide, self.explain, by=by
            )
            if job_ids:
                self.ledger.apply_order_priority(study_id, job_ids)  # STAT order: high queue
                log.info("study_id=%d complete: %d job(s) queued", study_id, len(job_ids))
                enqueue(self.celery, self.ledger, job_ids)
                new_jobs.extend(job_ids)
        if sweep:
            # Requests a killed web or retrieval process left open: released (their studies'
            # quiet period starts then), before the next pass looks for studies due.
            self._last_holders_sweep = now
            if release_gone_holders(self.settings.spool_dir, self.ledger.release_holder):
                self.poke()
        if now - self._last_reconcile >= min(cfg.requeue_after_s / 2, self.settings.worker.lease_s):
            self._last_reconcile = now
            reconcile(
                self.celery,
                self.ledger,
                startup=False,
                requeue_after_s=cfg.requeue_after_s,
                lease_s=self.settings.worker.lease_s,
            )
        return new_jobs

    def _due(self) -> dict[tuple[int, int], str]:
        """The studies complete now, each with what completes it: the first signal found, the
        strongest first. A quiet period read while an association stays open is recorded as
        max_wait by the ledger."""
        cfg = self.settings.completion
        due: dict[tuple[int, int], str] = {}
        if self.signals is not None:
            for study_id, generation, kind in self.signals.due_by():
                due.setdefault((study_id, generation), kind)
        # An HL7 order announced this study: complete once it arrived, without the quiet period.
        for key in self.ledger.expected_studies_due():
            due.setdefault(key, "hl7_order")
        for key in self.ledger.studies_due(
            quiet_period_s=cfg.quiet_period_s, max_wait_s=cfg.max_wait_s
        ):
            due.setdefault(key, "quiet_period")
        return due

    def _replay_stopped_journals(self) -> bool:
        """Replay the ingest journals of SCP processes that are gone and not started again
        (:mod:`acwi_node.ingest.orphans`): their acknowledged instances are recorded, then
        their associations released. Whether one was; after a replay that failed, tried again
        only at the next sweep (:data:`SWEEP_EVERY_S`)."""
        if not self.settings.ingest.journal:
            return False  # as at start-up: an SCP without a journal replays none
        now = time.monotonic()
        if now - self._journals_failed_at < SWEEP_EVERY_S:
            return False
        root = self.settings.spool_dir / JOURNAL_DIR
        if not root.is_dir():
            return False
        if self._orphans is None:
            self._orphans = OrphanedJournals(
                Spool(self.settings.spool_dir, fsync=self.settings.ingest.fsync),
                self.ledger,
                fsync=self.settings.ingest.fsync,
            )
        report = self._orphans.replay_stopped()
        if report.failed:
            self._journals_failed_at = now
            return False
        if report.journals:
            self.poke()
            return True
        return False

    def poke(self) -> None:
        """Something happened (an association ended): look again soon."""
        self._wake.set()

    def run(self) -> None:
        self._last_reconcile = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                self.failures.failed()
            else:
                self.failures.worked()
                self.last_pass = time.monotonic()
            self._wake.wait(self.failures.wait_s(self.settings.completion.poll_interval_s))
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
