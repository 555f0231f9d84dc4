"""Ringing the doorbell: put job ids on the broker, and re-ring for jobs whose message was lost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy import func, select

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, JobState, ShadowJob, ShadowState
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
    """Send ``task`` once per id to its queue; returns the ids sent.

    A broker that is down (or does not answer) is logged once and the rest are not tried: each
    would wait for it in turn (the completion loop, and at start-up the storage SCP, with
    them). The ledger keeps them; the reconciler sends them again."""
    sent: list[int] = []
    for n, i in enumerate(ids):
        try:
            celery.send_task(task, args=[i], queue=queue_of(i))
            sent.append(i)
        except Exception as exc:
            left = len(ids) - n
            log.error(
                "%s %d%s: broker unavailable, will retry from the ledger: %s",
                what,
                i,
                f" and {left - 1} more" if left > 1 else "",
                exc,
            )
            break
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
    started, or analysing by a worker whose lease (``lease_s``) ran out; and of the queued ones
    only those of a broker queue that holds fewer messages than the ledger has jobs queued and
    sent to it (:func:`_still_waiting`): a backlog that no worker took yet is not sent again
    and again. Shadow jobs likewise, on their own queue.
    """
    if startup:
        ids = ledger.unfinished_jobs()
    else:
        ids = _lost_jobs(
            celery, ledger, ledger.jobs_to_requeue(older_than_s=requeue_after_s, lease_s=lease_s)
        )
    if ids:
        log.info("reconciler: re-enqueueing %d job(s)", len(ids))
    sent = enqueue(celery, ledger, ids)
    shadow_ids = ShadowJobs(ledger).to_requeue(
        older_than_s=requeue_after_s, lease_s=lease_s, startup=startup
    )
    if not startup:
        shadow_ids = _lost_shadow_jobs(celery, ledger, shadow_ids)
    if shadow_ids:
        log.info("reconciler: re-enqueueing %d shadow job(s)", len(shadow_ids))
        sent += enqueue_shadow(celery, ledger, shadow_ids)
    metrics.RECONCILER_REQUEUED.labels("startup" if startup else "periodic").inc(sent)
    return sent


def _lost_jobs(celery: Celery, ledger: Ledger, ids: Sequence[int]) -> list[int]:
    """Of the periodic reconciler's candidates ``ids``, those whose message may be lost: every
    one a worker was analysing (its message was taken), every queued one never sent, and the
    queued ones of a broker queue that holds fewer messages than the ledger has jobs queued
    for it and sent (a job never sent is no message short: sending it is enough)."""
    if not ids:
        return []
    with ledger.session() as s:
        rows = s.execute(
            select(Job.id, Job.state, Job.priority, Job.enqueued_at).where(Job.id.in_(list(ids)))
        ).all()
        queued = s.execute(  # jobs whose message was sent: a never-sent job has none
            select(Job.priority, func.count())
            .where(Job.state == JobState.QUEUED, Job.enqueued_at.is_not(None))
            .group_by(Job.priority)
        ).all()
    in_ledger: dict[str, int] = {}
    for priority, count in queued:
        in_ledger[queue_for(priority)] = in_ledger.get(queue_for(priority), 0) + int(count)
    waiting = {q: _still_waiting(celery, q, n) for q, n in in_ledger.items()}
    return [
        job_id
        for job_id, state, priority, enqueued_at in rows
        if state != JobState.QUEUED or enqueued_at is None or not waiting[queue_for(priority)]
    ]


def _lost_shadow_jobs(celery: Celery, ledger: Ledger, ids: Sequence[int]) -> list[int]:
    """:func:`_lost_jobs` for shadow jobs (one broker queue)."""
    if not ids:
        return []
    with ledger.session() as s:
        rows = s.execute(
            select(ShadowJob.id, ShadowJob.state, ShadowJob.enqueued_at).where(
                ShadowJob.id.in_(list(ids))
            )
        ).all()
        queued = int(
            s.scalar(
                select(func.count()).where(
                    ShadowJob.state == ShadowState.QUEUED, ShadowJob.enqueued_at.is_not(None)
                )
            )
            or 0
        )
    waiting = _still_waiting(celery, SHADOW_QUEUE, queued)
    return [
        shadow_id
        for shadow_id, state, enqueued_at in rows
        if state != ShadowState.QUEUED or enqueued_at is None or not waiting
    ]


def _still_waiting(celery: Celery, queue: str, queued_in_ledger: int) -> bool:
    """Whether ``queue`` holds at least ``queued_in_ledger`` messages: then no message of a
    job queued for it is lost, as far as the broker can tell (the jobs wait their turn).
    False when the broker cannot say (the reconciler then sends them again, as a net)."""
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            try:
                try:
                    declared = channel.queue_declare(queue=queue, passive=True)
                except ChannelError:  # no such queue (Redis: no message on it)
                    return False
                return int(declared.message_count) >= queued_in_ledger
            finally:
                channel.close()
    except Exception as exc:
        log.debug("reconciler: cannot read the length of broker queue %s: %s", queue, exc)
        return False
