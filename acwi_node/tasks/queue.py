"""Ringing the doorbell: put job ids on the broker, and re-ring for jobs whose message was lost."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery

from acwi_node.ledger import Ledger
from acwi_node.tasks.app import ANALYSE_TASK, ANALYSIS_QUEUE

log = logging.getLogger("acwi_node.queue")


def enqueue(celery: Celery, ledger: Ledger, job_ids: Sequence[int]) -> int:
    """Send one message per job; returns how many were sent.

    A broker that is down is logged, not raised: the job stays queued in the ledger and the
    reconciler sends it again later.
    """
    sent: list[int] = []
    for job_id in job_ids:
        try:
            celery.send_task(ANALYSE_TASK, args=[job_id], queue=ANALYSIS_QUEUE)
            sent.append(job_id)
        except Exception as exc:
            log.error("job %d: broker unavailable, will retry from the ledger: %s", job_id, exc)
    if sent:
        ledger.mark_enqueued(sent)
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
    return enqueue(celery, ledger, ids)
