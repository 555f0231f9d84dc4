"""The periodic reconciler on the embedded broker: a backlog whose messages still wait in the
queue folder is not sent again at each pass; messages that were lost are."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import update

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, utcnow
from acwi_node.ledger.repository import STAT_PRIORITY
from acwi_node.tasks.app import ANALYSIS_QUEUE, HIGH_PRIORITY_QUEUE, configure
from acwi_node.tasks.queue import enqueue, reconcile
from tests.support.study_flow import receive, route_all, study_id


def queued_jobs(settings: Settings, ledger: Ledger, n: int, first: int = 0) -> list[int]:
    ids: list[int] = []
    for k in range(first, first + n):
        uid = f"1.2.5.{k}"
        receive(settings, ledger, uid, uid + ".1")
        ids += ledger.complete_study(study_id(ledger, uid), 1, route_all)
    return ids


def waiting(settings: Settings, queue: str = ANALYSIS_QUEUE) -> list[Path]:
    return [
        p
        for p in (settings.embedded_broker_dir / "queue").iterdir()
        if p.name.partition(".")[2] == f"{queue}.msg"
    ]


def time_passes(ledger: Ledger, seconds: float) -> None:
    """Every job's message was sent ``seconds`` ago (those sent)."""
    with ledger.session() as s:
        s.execute(
            update(Job)
            .where(Job.enqueued_at.is_not(None))
            .values(enqueued_at=utcnow() - dt.timedelta(seconds=seconds))
        )


def periodic(settings: Settings, ledger: Ledger) -> int:
    celery = configure(settings, register_tasks=False)
    return reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30)


def test_a_backlog_waiting_in_the_queue_is_not_sent_again(
    settings: Settings, ledger: Ledger
) -> None:
    celery = configure(settings, register_tasks=False)
    ids = queued_jobs(settings, ledger, 6)
    assert enqueue(celery, ledger, ids) == 6
    for _ in range(3):  # three passes, each after requeue_after_s
        time_passes(ledger, 121)
        assert periodic(settings, ledger) == 0
    assert len(waiting(settings)) == 6


def test_lost_messages_are_sent_again(settings: Settings, ledger: Ledger) -> None:
    celery = configure(settings, register_tasks=False)
    ids = queued_jobs(settings, ledger, 3)
    assert enqueue(celery, ledger, ids) == 3
    waiting(settings)[0].unlink()  # one message lost
    time_passes(ledger, 121)
    assert periodic(settings, ledger) == 3  # which one cannot be told: each is sent again
    assert len(waiting(settings)) == 5
    time_passes(ledger, 121)
    assert periodic(settings, ledger) == 0


def test_a_job_never_sent_and_a_stale_analysis_are_sent_whatever_waits(
    settings: Settings, ledger: Ledger
) -> None:
    celery = configure(settings, register_tasks=False)
    ids = queued_jobs(settings, ledger, 3)
    assert enqueue(celery, ledger, ids[:2]) == 2
    assert enqueue(celery, ledger, ids[:2]) == 2  # duplicates: 4 messages for 3 queued jobs
    claimed = ledger.claim_job(ids[0], lease_s=30)
    assert claimed is not None
    time_passes(ledger, 121)
    with ledger.session() as s:  # the worker analysing ids[0] was killed a minute ago
        s.execute(
            update(Job)
            .where(Job.id == ids[0])
            .values(heartbeat_at=utcnow() - dt.timedelta(seconds=60))
        )
    assert periodic(settings, ledger) == 2  # ids[0] (its message taken) and ids[2] (never sent)
    assert len(waiting(settings)) == 6


def test_stat_jobs_are_counted_against_their_own_queue(settings: Settings, ledger: Ledger) -> None:
    """A routine backlog does not hide a STAT job whose message was lost."""
    celery = configure(settings, register_tasks=False)
    routine = queued_jobs(settings, ledger, 4)
    assert enqueue(celery, ledger, routine) == 4
    assert enqueue(celery, ledger, routine) == 4  # 8 routine messages
    stat = queued_jobs(settings, ledger, 1, first=10)
    with ledger.session() as s:
        s.execute(update(Job).where(Job.id == stat[0]).values(priority=STAT_PRIORITY))
    assert enqueue(celery, ledger, stat) == 1
    (stat_message,) = waiting(settings, HIGH_PRIORITY_QUEUE)
    stat_message.unlink()
    time_passes(ledger, 121)
    assert periodic(settings, ledger) == 1
    assert len(waiting(settings, HIGH_PRIORITY_QUEUE)) == 1
    assert len(waiting(settings)) == 8
