"""Prometheus metrics: process-local events, and ledger-derived state computed at scrape time.

Two sources, because the node runs as separate processes (possibly on several hosts):

* **Ledger-derived** (:class:`LedgerCollector`, served by the ``web`` process at ``/metrics``):
  studies by state, instances by calling AE, jobs by state and model (the queue depth in the
  ledger), deliveries by destination and state, the review rate, and the broker's queue length;
  and the model versions that load with a warning, from their manifests (``acwi_model_warnings``).
  They are read from the ledger (and the broker) on every scrape, so they are right across
  processes and hosts and survive restarts.
* **Process-local** (module-level counters and histograms below, served by each process's own
  health/metrics server, ``observability.<kind>_port``): events only the process sees, such as
  instances rejected and why, reconciler re-queues, inference latency, delivery attempts. They
  restart at zero with the process; Prometheus' ``rate()``/``increase()`` handle that.

No label carries patient data: calling AE titles, model names and versions, destination names,
states and reasons only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceArrival,
    Job,
    JobState,
    Notification,
    Result,
    ReviewItem,
    ReviewState,
    ShadowJob,
    ShadowState,
    Study,
    StudyState,
    Verdict,
    job_model_version,
    utcnow,
)
from acwi_node.ledger.repository import RIS_OUTAGE, outages, webhook_outages
from acwi_node.observability.logging import LoopFailures
from acwi_node.review.quality import FLAGGED, SAMPLE

log = logging.getLogger("acwi_node.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ------------------------------------------------------------------ process-local (scp)
INSTANCES_RECEIVED = Counter(
    "acwi_scp_instances_received",
    "Instances stored and recorded by this process (C-STORE or STOW-RS), by calling AE title",
    ["calling_ae"],
)
INSTANCES_REJECTED = Counter(
    "acwi_scp_instances_rejected",
    "C-STORE requests answered with a failure status, or STOW-RS objects refused, by reason",
    ["reason"],
)
OWN_RESULTS_DROPPED = Counter(
    "acwi_scp_own_results_dropped",
    "Objects an ACWI Node wrote (its results) that came back by C-STORE or STOW-RS: answered"
    " as stored, not stored (acwi_node.ingest.own_results), by calling AE title",
    ["calling_ae"],
)
ASSOCIATIONS_REJECTED = Counter(
    "acwi_scp_associations_rejected",
    "Associations this scp process rejected (calling AE not allowed, too many associations)",
)
JOURNAL_CHECKPOINT_FAILURES = Counter(
    "acwi_scp_journal_checkpoint_failures",
    "Ingest journal checkpoints that failed (the journal is kept and grows until one succeeds)",
)
COMMITMENT_REPORTS = Counter(
    "acwi_scp_commitment_reports",
    "Storage commitment reports (N-EVENT-REPORT) this process received, by outcome (applied;"
    " unknown: a transaction the node does not wait for; invalid: refused with a failure status)",
    ["outcome"],
)
COMMITTED_RESULTS = Counter(
    "acwi_scp_commitment_results",
    "Result objects storage commitment reports named, by outcome (committed; refused: sent again)",
    ["outcome"],
)
RETRIEVALS = Counter(
    "acwi_scp_retrievals",
    "Retrievals from a source PACS this process ran, by outcome (done; failed: for good;"
    " retry: failed this attempt, queued again)",
    ["outcome"],
)
RETRIEVED_INSTANCES = Counter(
    "acwi_scp_retrieved_instances",
    "Instances source PACSs reported sending to the node by C-MOVE, by outcome (completed,"
    " failed, warning)",
    ["outcome"],
)
RECONCILER_REQUEUED = Counter(
    "acwi_reconciler_requeued",
    "Jobs the reconciler sent to the broker again, by trigger (startup or periodic)",
    ["trigger"],
)
# --------------------------------------------------------------- process-local (worker)
INFERENCE_SECONDS = Histogram(
    "acwi_inference_seconds",
    "Seconds to analyse one study (load excluded), by model and version",
    ["model", "version"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
JOBS_PROCESSED = Counter(
    "acwi_worker_jobs",
    "Jobs this worker process handled, by outcome (analysed, failed, skipped, superseded,"
    " postponed, ledger_unavailable)",
    ["outcome"],
)
IMAGES_NOT_ANALYSED = Counter(
    "acwi_worker_images_not_analysed",
    "Images of analysed studies the model did not read, by model and reason (not_selected,"
    " localizer, undecodable, unreadable, unsupported)",
    ["model", "reason"],
)
# ------------------------------------------------------------- process-local (exporter)
DELIVERY_ATTEMPTS = Counter(
    "acwi_exporter_delivery_attempts",
    "Result objects this exporter process sent, by destination and outcome (delivered,"
    " refused, unreachable: the destination could not be reached)",
    ["destination", "outcome"],
)
COMMITMENT_REQUESTS = Counter(
    "acwi_exporter_commitment_requests",
    "Storage commitment requests (N-ACTION) this exporter process made, by destination and"
    " outcome (accepted, failed)",
    ["destination", "outcome"],
)
RETENTION_STUDIES_DELETED = Counter(
    "acwi_retention_studies_deleted",
    "Studies whose images and result files storage retention deleted, by reason (age, space,"
    " orphan: folders of a study the ledger has no row of)",
    ["reason"],
)
RETENTION_BYTES_DELETED = Counter(
    "acwi_retention_bytes_deleted",
    "Bytes of images and result files storage retention deleted",
)
RETENTION_SWEEP_FAILURES = Counter(
    "acwi_retention_sweep_failures",
    "Storage and records retention sweeps that failed (the exporter's log says why)",
)
RETENTION_RECORDS_COMPACTED = Counter(
    "acwi_retention_records_compacted",
    "Studies whose instance rows records retention summarised and whose patient identifiers"
    " it erased",
)

# ------------------------------------------------------------------ process-local (web)
SIGN_IN_FAILURES = Counter(
    "acwi_web_sign_in_failures",
    "Failed sign-ins (unknown name, wrong password, disabled account), by method: the sign-in"
    " form (form) or HTTP Basic credentials of the API and STOW-RS (basic)",
    ["method"],
)
SIGN_INS_THROTTLED = Counter(
    "acwi_web_sign_ins_throttled",
    "Sign-in attempts refused unchecked (429) because their user name must wait after failed"
    " ones, by method (form, basic)",
    ["method"],
)
STOW_REQUESTS = Counter(
    "acwi_web_stow_requests",
    "STOW-RS requests answered by the web process, by HTTP status",
    ["status"],
)
STOW_REQUEST_SECONDS = Histogram(
    "acwi_web_stow_request_seconds",
    "Seconds from a STOW-RS request's start to its answer (body received, objects stored)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

#: Reasons of :data:`INSTANCES_REJECTED` (label values).
REJECT_REASONS = (
    "unencodable",
    "unparseable_header",
    "missing_uid",
    "invalid_uid",
    "spool_error",
    "ledger_unavailable",
    "other_study",
    "class_mismatch",
    "instance_mismatch",
    "handler_error",
)


def process_metrics(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text exposition of this process's own metrics (and its pool's, in multiprocess mode:
    see :mod:`acwi_node.observability.multiproc`)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and registry is REGISTRY:
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)
    return generate_latest(registry)


# ------------------------------------------------------------------------ ledger-derived
def broker_queue_length(settings: Settings, queue: str = "analysis") -> int | None:
    """Messages waiting on the broker's analysis queue; None when it cannot be read.

    Redis: ``LLEN`` of the queue's list (plus Celery's priority lists). The embedded broker:
    the message files waiting in ``<data_dir>/broker/queue``.
    """
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(
            url, password=settings.broker_password, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            total = 0
            keys = [queue] + [f"{queue}\x06\x16{p}" for p in range(1, 10)]
            for key in keys:
                total += int(client.llen(key))
            return total
        except Exception as exc:
            log.debug("cannot read the broker queue length: %s", exc)
            return None
        finally:
            client.close()
    if url.startswith("filesystem://"):
        folder: Path = settings.embedded_broker_dir / "queue"
        if not folder.is_dir():
            return 0
        return sum(1 for p in folder.iterdir() if p.name.endswith(f".{queue}.msg"))
    return None


#: Seconds between recounts of ``acwi_instances``: a count of every instance row (a million
#: after a year) took 150-300 ms of each scrape; the others are read on every scrape.
INSTANCE_COUNT_REFRESH_S = 60.0


class LedgerCollector(Collector):
    """Gauges read from the ledger (and the broker) on every scrape; ``acwi_instances`` at
    most every :data:`INSTANCE_COUNT_REFRESH_S` seconds of ``clock``.

    A ledger that does not answer (its database down) is logged as a loop's failing pass is
    (:class:`LoopFailures`): with its traceback at the first scrape, then a line a minute at
    most with the scrapes that failed and the error's first line, and once it answers again;
    not a line for every scrape (every 15 s per Prometheus server, and per web process)."""

    def __init__(
        self, settings: Settings, ledger: Ledger, clock: Callable[[], float] = time.monotonic
    ) -> None:
        from acwi_node.monitoring.cache import Refreshed
        from acwi_node.monitoring.cached import MonitoringCaches

        self.settings = settings
        self.ledger = ledger
        self._failures_lock = threading.Lock()  # scrapes may come at once, in threads
        self.failures = {
            part: LoopFailures(log, f"metrics: reading {what}", clock=clock)
            for part, what in (
                ("ledger", "the ledger"),
                ("monitoring", "model monitoring"),
                ("traffic", "the studies arriving"),
                ("turnaround", "the turnaround"),
                ("models", "the models' manifests"),
            )
        }
        self.instances: Refreshed[dict[str, int]] = Refreshed(
            self._count_instances, INSTANCE_COUNT_REFRESH_S, clock=clock
        )
        caches = MonitoringCaches(settings, ledger, clock=clock)
        self.monitoring, self.traffic, self.turnaround = (
            caches.monitoring,
            caches.traffic,
            caches.turnaround,
        )

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("acwi_ledger_up", "1 when the ledger answered this scrape, else 0")
        families = self._read("ledger", self._from_ledger)
        up.add_metric([], 0 if families is None else 1)
        yield up
        if families is not None:
            yield from families
            for part, read in (
                ("monitoring", self._monitoring),
                ("traffic", self._traffic),
                ("turnaround", self._turnaround),
            ):
                yield from self._read(part, read) or []
        yield from self._read("models", self._model_warnings) or []  # the ledger not needed
        from acwi_node.tasks.app import WORKER_QUEUES

        broker = GaugeMetricFamily(
            "acwi_broker_queue_length",
            "Messages waiting on the broker's analysis queues",
            labels=["queue"],
        )
        for queue in WORKER_QUEUES:
            depth = broker_queue_length(self.settings, queue)
            if depth is not None:
                broker.add_metric([queue], depth)
        yield broker
        try:
            disk = os.statvfs(self.settings.data_dir)
        except OSError:
            return
        for name, doc, blocks in (
            (
                "acwi_data_free_bytes",
                "Free bytes of the data directory's file system",
                disk.f_bavail,
            ),
            ("acwi_data_size_bytes", "Size of the data directory's file system", disk.f_blocks),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], blocks * disk.f_frsize)
            yield family

    def _read(self, part: str, read: Callable[[], list[Metric]]) -> list[Metric] | None:
        """``read()``'s families; None when it failed (logged as :class:`LoopFailures`)."""
        try:
            families = read()
        except Exception:
            with self._failures_lock:
                self.failures[part].failed()
            return None
        with self._failures_lock:
            self.failures[part].worked()
        return families

    def _count_instances(self) -> dict[str, int]:
        """Instances by calling AE title, with those whose rows records retention summarised."""
        instances: dict[str, int] = {}
        with self.ledger.session() as s:
            for calling_ae, n in [
                *s.execute(
                    select(Instance.calling_ae, func.count()).group_by(Instance.calling_ae)
                ).all(),
                *s.execute(
                    select(
                        InstanceArrival.calling_ae, func.sum(InstanceArrival.instances)
                    ).group_by(InstanceArrival.calling_ae)
                ).all(),
            ]:
                instances[calling_ae or ""] = instances.get(calling_ae or "", 0) + int(n or 0)
        return instances

    def _from_ledger(self) -> list[Metric]:
        instances = self.instances.get()
        with self.ledger.session() as s:
            studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            completed = s.scalar(
                select(func.count()).select_from(Study).where(Study.completed_at.is_not(None))
            )
            jobs = s.execute(
                select(Job.state, Job.model, func.count()).group_by(Job.state, Job.model)
            ).all()
            shadow_jobs = s.execute(
                select(ShadowJob.state, ShadowJob.model, func.count()).group_by(
                    ShadowJob.state, ShadowJob.model
                )
            ).all()
            deliveries = s.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            ).all()
            unreachable = {o.destination: o.since for o in outages(s)}
            ris_outage = unreachable.pop(RIS_OUTAGE, None)
            webhooks_down = webhook_outages(s)
            analysed = s.scalar(select(func.count(distinct(Result.job_id)))) or 0
            reviewed = (
                s.scalar(
                    select(func.count(distinct(ReviewItem.job_id))).where(
                        ReviewItem.job_id.in_(select(Result.job_id)),
                        ReviewItem.sampled.is_(False),  # quality-control samples: sure
                    )
                )
                or 0
            )
            open_review = s.scalar(
                select(func.count())
                .select_from(ReviewItem)
                .where(ReviewItem.state == ReviewState.OPEN)
            )
            # the model version that gave the result the radiologist judged (a route's model
            # is rolled out version by version: agreement is a version's)
            version = job_model_version()
            verdicts = s.execute(
                select(Job.model, version, ReviewItem.sampled, Verdict.action, func.count())
                .join(ReviewItem, Verdict.review_item_id == ReviewItem.id)
                .join(Job, Verdict.job_id == Job.id)
                .where(Verdict.superseded_at.is_(None))  # an amended case: as amended, once
                .group_by(Job.model, version, ReviewItem.sampled, Verdict.action)
            ).all()
            notifications = s.execute(
                select(Notification.target, Notification.state, func.count()).group_by(
                    Notification.target, Notification.state
                )
            ).all()
            amendments = s.execute(
                select(Job.model, version, func.count())
                .select_from(Verdict)
                .join(Job, Verdict.job_id == Job.id)
                .where(Verdict.amends_id.is_not(None))
                .group_by(Job.model, version)
            ).all()

        out: list[Metric] = []
        g = GaugeMetricFamily("acwi_studies", "Studies in the ledger by state", labels=["state"])
        by_state = {StudyState(k).value: int(n) for k, n in studies.items()}
        for study_state in StudyState:
            g.add_metric([study_state.value], by_state.get(study_state.value, 0))
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_ledger_studies_completed",
            "Studies in the ledger that reached completion (routed or not)",
        )
        g.add_metric([], completed or 0)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_instances", "Instances in the ledger by calling AE title", labels=["calling_ae"]
        )
        for calling_ae, n in sorted(instances.items()):
            g.add_metric([calling_ae], n)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_jobs",
            "Jobs in the ledger by state and model (state=queued is the queue depth)",
            labels=["state", "model"],
        )
        for job_state, model, n in jobs:
            g.add_metric([JobState(job_state).value, model], n)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_shadow_jobs",
            "Shadow models' analyses ([[routes]] shadow_models) by state and model",
            labels=["state", "model"],
        )
        for shadow_state, model, n in shadow_jobs:
            g.add_metric([ShadowState(shadow_state).value, model], n)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_jobs_queued", "Jobs queued in the ledger and not yet started (all models)"
        )
        g.add_metric([], sum(n for state, _m, n in jobs if JobState(state) == JobState.QUEUED))
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_deliveries",
            "Result deliveries in the ledger by destination and state",
            labels=["destination", "state"],
        )
        for destination, delivery_state, n in deliveries:
            g.add_metric([destination, DeliveryState(delivery_state).value], n)
        out.append(g)
        now = utcnow()
        g = GaugeMetricFamily(
            "acwi_destination_unreachable_seconds",
            "How long a destination with results waiting has not been reachable (an outage:"
            " exporter.outage_patience_s); absent while it is",
            labels=["destination"],
        )
        for destination, since in unreachable.items():
            g.add_metric([destination], max(0.0, (now - since).total_seconds()))
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_ris_unreachable_seconds",
            "How long the RIS, with ORU^R01 waiting, has not been reachable (0 while it is)",
        )
        g.add_metric([], max(0.0, (now - ris_outage).total_seconds()) if ris_outage else 0.0)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_webhook_unreachable_seconds",
            "How long a [[notify]] webhook with notifications waiting has not been reachable"
            " (an outage: its outage_patience_s); absent while it is",
            labels=["target"],
        )
        for target, since in webhooks_down.items():
            g.add_metric([target], max(0.0, (now - since).total_seconds()))
        out.append(g)
        g = GaugeMetricFamily("acwi_analysed_jobs", "Jobs that produced results")
        g.add_metric([], analysed)
        out.append(g)
        g = GaugeMetricFamily("acwi_review_jobs", "Jobs that produced results and needed review")
        g.add_metric([], reviewed)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_review_rate", "Share of analysed jobs that needed review (0 when none)"
        )
        g.add_metric([], reviewed / analysed if analysed else 0.0)
        out.append(g)
        g = GaugeMetricFamily("acwi_review_items_open", "Open items on the review worklist")
        g.add_metric([], open_review or 0)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_review_verdicts",
            "Radiologists' verdicts by model, model version, kind of case (flagged: the model"
            " asked for review; sample: a quality-control sample of the confident ones) and"
            " action; an amended case's verdict counts once, as amended",
            labels=["model", "version", "kind", "action"],
        )
        for model, model_version, sampled, action, n in verdicts:
            g.add_metric([model, model_version, SAMPLE if sampled else FLAGGED, action], n)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_notifications",
            "[[notify]] webhook notifications by target and state (pending, delivered, failed)",
            labels=["target", "state"],
        )
        for target, note_state, n in notifications:
            g.add_metric([target, DeliveryState(note_state).value], n)
        out.append(g)
        g = GaugeMetricFamily(
            "acwi_review_amendments",
            "Verdicts radiologists amended on closed cases, by model and model version",
            labels=["model", "version"],
        )
        for model, model_version, n in amendments:
            g.add_metric([model, model_version], n)
        out.append(g)
        return out

    def _monitoring(self) -> list[Metric]:
        """Each model version's monitoring signals (README "Model monitoring"), recomputed
        at most every ``monitoring.refresh_s``."""
        from acwi_node.monitoring.drift import Status

        status = GaugeMetricFamily(
            "acwi_model_monitoring_status",
            "Each model version's monitoring signal against its baseline: 0 stable, 1 watch,"
            " 2 shifted (absent: too few studies to compare)",
            labels=["model", "version", "signal"],
        )
        statistic = GaugeMetricFamily(
            "acwi_model_monitoring_statistic",
            "The signal's statistic: z of a rate, population stability index of a distribution",
            labels=["model", "version", "signal"],
        )
        studies = GaugeMetricFamily(
            "acwi_model_monitoring_recent_studies",
            "Studies each model version analysed in the recent window (monitoring.window_days)",
            labels=["model", "version"],
        )
        level = {Status.STABLE: 0, Status.WATCH: 1, Status.SHIFTED: 2}
        for report in self.monitoring.get():
            studies.add_metric([report.model, report.version], report.studies)
            for sig in report.signals:
                if sig.status is Status.TOO_FEW or sig.statistic is None:
                    continue
                labels = [report.model, report.version, sig.signal]
                status.add_metric(labels, level[sig.status])
                statistic.add_metric(labels, sig.statistic)
        return [status, statistic, studies]

    def _model_warnings(self) -> list[Metric]:
        """The versions running or installed that load with a warning (a moving version such
        as ``latest``: README "Model versions"), read from their manifests on every scrape."""
        from acwi_node.model_overview import model_version_warnings

        family = GaugeMetricFamily(
            "acwi_model_warnings",
            "Model versions that load with a warning (a moving version such as latest, to"
            " renumber: the Models page says how), by model name, version and state (running,"
            " installed): 1 each (absent: none)",
            labels=["model", "version", "state"],
        )
        for found in model_version_warnings(self.settings):
            state = "running" if found.running else "installed"
            family.add_metric([found.model, found.version, state], 1)
        return [family]

    def _traffic(self) -> list[Metric]:
        """The studies arriving, of all, from each source and for each route, against the
        same hours of the weeks before (README "Model monitoring")."""
        from acwi_node.monitoring.drift import Status

        status = GaugeMetricFamily(
            "acwi_traffic_status",
            "Studies arriving against the same hours of the weeks before, the most concerning"
            " horizon: 0 as usual, 1 watch, 2 dropped (absent: too few weeks to compare)",
            labels=["kind", "name"],
        )
        studies = GaugeMetricFamily(
            "acwi_traffic_studies",
            "Studies of the last monitoring.traffic_hours hours: all (kind node), from a"
            " source (calling AE) or given a job on a route",
            labels=["kind", "name", "hours"],
        )
        expected = GaugeMetricFamily(
            "acwi_traffic_expected_studies",
            "The mean of the same hours of the same weekday in the weeks before",
            labels=["kind", "name", "hours"],
        )
        level = {Status.STABLE: 0, Status.WATCH: 1, Status.SHIFTED: 2}
        for flow in self.traffic.get().flows:
            if flow.status is not Status.TOO_FEW:
                status.add_metric([flow.kind, flow.name], level[flow.status])
            for w in flow.windows:
                labels = [flow.kind, flow.name, str(w.hours)]
                studies.add_metric(labels, w.studies)
                if w.expected is not None:
                    expected.add_metric(labels, w.expected)
        return [status, studies, expected]

    def _turnaround(self) -> list[Metric]:
        """Last instance to results stored, per route and step (README "Turnaround")."""
        from acwi_node.monitoring.drift import Status

        seconds = GaugeMetricFamily(
            "acwi_turnaround_seconds",
            "Results stored in the last monitoring.turnaround_hours hours: seconds of each step"
            " (completion, queue, analysis, delivery, total: last instance to stored), the"
            " 50th and 95th percentiles and the maximum (quantile 1)",
            labels=["route", "step", "quantile"],
        )
        studies = GaugeMetricFamily(
            "acwi_turnaround_studies",
            "Jobs whose results were stored in the last monitoring.turnaround_hours hours",
            labels=["route"],
        )
        overdue = GaugeMetricFamily(
            "acwi_turnaround_overdue",
            "Studies still on their way longer than monitoring.turnaround_goal_s after their"
            " last instance",
            labels=["route"],
        )
        status = GaugeMetricFamily(
            "acwi_turnaround_status",
            "0 within goal, 1 studies overdue, 2 slow: the 95th percentile above"
            " monitoring.turnaround_goal_s (absent: too few studies)",
            labels=["route"],
        )
        level = {Status.STABLE: 0, Status.WATCH: 1, Status.SHIFTED: 2}
        for route in self.turnaround.get().routes:
            studies.add_metric([route.route], route.studies)
            overdue.add_metric([route.route], route.overdue)
            if route.status is not Status.TOO_FEW:
                status.add_metric([route.route], level[route.status])
            for f in route.steps:
                for quantile, value in (("0.5", f.p50), ("0.95", f.p95), ("1", f.max)):
                    if value is not None:
                        seconds.add_metric([route.route, f.step, quantile], value)
        return [seconds, studies, overdue, status]


def ledger_registry(settings: Settings, ledger: Ledger) -> CollectorRegistry:
    """A registry holding only the ledger-derived metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(settings, ledger))
    return registry
