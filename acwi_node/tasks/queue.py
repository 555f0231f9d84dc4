"""Ringing the doorbell: put job ids on the broker, and re-ring for jobs whose message was lost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from celery import Celery

from acwi_node.ledger import Ledger
from acwi_node.ledger.repository import STAT_PRIORITY
from acwi_node.ledger.shadow import ShadowJobs
from acwi_node.observability import metrics
from acwi_node.tasks.app import (
    ANALYSE_TASK,
    ANALYSIS_QUEUE,
    HIGH_PRIORITY_QUEUE,
    SHADOW_QUEUE,
    SHADOW_TASK,
)

log = logging.getLogger("acwi_node.queue")


def queue_for(priority: int) -> str:
    """The broker queue of a job: STAT jobs go to the high-priority queue."""
    return HIGH_PRIORITY_QUEUE if priority >= STAT_PRIORITY else ANALYSIS_QUEUE


def enqueue(
    celery: Celery, ledger: Ledger, job_ids: Sequence[int], *, queue: str | None = None
) -> int:
    """Send one message per job; returns how many were sent.

    ``queue`` forces a broker queue; by default each job goes to :func:`queue_for` its priority
    in the ledger (so the reconciler re-sends a STAT job to the high-priority queue too).

    A broker that is down is logged, not raised: the job stays queued in the ledger and the
    reconciler sends it again later.
    """
    priorities = ledger.job_priorities(job_ids) if queue is None and job_ids else {}
    sent = _ring(
        celery, ANALYSE_TASK, job_ids, lambda i: queue or queue_for(priorities.get(i, 0)), "job"
    )
    if sent:
        ledger.mark_enqueued(sent)
    return len(sent)


def _ring(
    celery: Celery, task: str, ids: Sequence[int], queue_of: Callable[[int], str], what: str
) -> list[int]:
    """Send ``task`` once per id to its queue; returns the ids sent (a broker that is down is
    logged: the ledger keeps them, the reconciler sends them again)."""
    sent: list[int] = []
    for i in ids:
        try:
            celery.send_task(task, args=[i], queue=queue_of(i))
            sent.append(i)
        except Exception as exc:
            log.error("%s %d: broker unavailable, will retry from the ledger: %s", what, i, exc)
    return sent


def enqueue_shadow(celery: Celery, ledger: Ledger, shadow_ids: Sequence[int]) -> int:
    """Send one message per shadow job to the shadow queue; returns how many were sent (a
    broker that is down is logged: the reconciler sends them later)."""
    sent = _ring(celery, SHADOW_TASK, shadow_ids, lambda _i: SHADOW_QUEUE, "shadow job")
    if sent:
        ShadowJobs(ledger).mark_enqueued(sent)
    return len(sent)


def reconcile(
    celery: Celery,
    ledger: Ledger,
    *,
    startup: bool,
    requeue_after_s: float,
    lease_s: float,
) -> int:
    """Re-enqueue jobs that are not final and whose message may be lost.

    At start-up every queued or analysing job is sent again (a duplicate is harmless: the task
    claims the job in the ledger). Later, only jobs queued for ``requeue_after_s`` without being
    started, or analysing by a worker whose lease (``lease_s``) ran out.
    """
    if startup:
        ids = ledger.unfinished_jobs()
    else:
        ids = ledger.jobs_to_requeue(older_than_s=requeue_after_s, lease_s=lease_s)
    if ids:
        log.info("reconciler: re-enqueueing %d job(s)", len(ids))
    sent = enqueue(celery, ledger, ids)
    shadow_ids = ShadowJobs(ledger).to_requeue(
        older_than_s=requeue_after_s, lease_s=lease_s, startup=startup
    )
    if shadow_ids:
        log.info("reconciler: re-enqueueing %d shadow job(s)", len(shadow_ids))
        sent += enqueue_shadow(celery, ledger, shadow_ids)
    metrics.RECONCILER_REQUEUED.labels("startup" if startup else "periodic").inc(sent)
    return sent
