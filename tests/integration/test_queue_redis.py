"""Enqueueing and the reconciler against a real Redis broker."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import update

from acwi_node.config import load_settings
from acwi_node.ledger import InstanceRecord, Ledger, RoutedJob, StudyFacts
from acwi_node.ledger.models import Job, JobState, ShadowJob, utcnow
from acwi_node.tasks.app import ANALYSIS_QUEUE, SHADOW_QUEUE, configure
from acwi_node.tasks.queue import enqueue, enqueue_shadow, reconcile
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration
DB = 12


def one_job(ledger: Ledger) -> int:
    r = ledger.record_instance(
        InstanceRecord(
            "1.2.3",
            "1.2.3.1",
            "1.2.840.10008.5.1.4.1.1.1.1",
            "1.2.3.9",
            "1.2.840.10008.1.2.1",
            "DX",
            "CHEST",
            "1.2.3/1.2.3.1.dcm",
            10,
            "MOD",
        ),
        first_in_association=False,
    )

    def route(_: StudyFacts) -> list[RoutedJob]:
        return [RoutedJob("chest", "default", [], 0)]

    (job_id,) = ledger.complete_study(r.study_id, 1, route)
    return job_id


OnRedis = tuple[redis.Redis, Celery, Ledger]


@pytest.fixture
def on_redis(tmp_path: Path) -> Iterator[OnRedis]:
    """A node on the real Redis (its own database, emptied before and after) and a ledger."""
    broker = f"{REDIS_URL}/{DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    settings = load_settings(None, node={"data_dir": tmp_path, "broker_url": broker})
    ledger = Ledger(settings.database_url)
    yield client, configure(settings), ledger
    client.flushdb()
    ledger.dispose()


def test_messages_carry_only_the_job_id_and_survive_a_flush(on_redis: OnRedis) -> None:
    client, celery, ledger = on_redis
    job_id = one_job(ledger)

    assert enqueue(celery, ledger, [job_id]) == 1
    assert client.llen(ANALYSIS_QUEUE) == 1
    raw = client.lindex(ANALYSIS_QUEUE, 0)
    assert raw is not None and b"acwi_node.analyse" in raw
    assert ledger.jobs_to_requeue(older_than_s=3600, lease_s=3600) == []

    # Redis restarted empty: the ledger still knows the job; the reconciler rings again.
    client.flushdb()
    assert reconcile(celery, ledger, startup=True, requeue_after_s=120, lease_s=3600) == 1
    assert client.llen(ANALYSIS_QUEUE) == 1


def test_broker_down_keeps_the_job_queued_in_the_ledger(tmp_path: Path) -> None:
    settings = load_settings(
        None, node={"data_dir": tmp_path, "broker_url": "redis://127.0.0.1:1/0"}
    )
    celery = configure(settings)
    celery.conf.broker_connection_retry = False
    celery.conf.broker_connection_max_retries = 0
    celery.conf.broker_transport_options = {"max_retries": 0}
    ledger = Ledger(settings.database_url)
    job_id = one_job(ledger)
    assert enqueue(celery, ledger, [job_id]) == 0
    assert ledger.jobs_to_requeue(older_than_s=3600, lease_s=3600) == [job_id]
    ledger.dispose()


def test_a_worker_takes_a_live_job_before_a_shadow_job_sent_earlier(tmp_path: Path) -> None:
    """The worker's queues, in the order it polls them (Redis BRPOP takes from the first
    non-empty list): STAT, routine, shadow models last."""
    from acwi_node.tasks.app import SHADOW_QUEUE, WORKER_QUEUES
    from acwi_node.tasks.queue import enqueue_shadow

    broker = f"{REDIS_URL}/{DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    settings = load_settings(None, node={"data_dir": tmp_path, "broker_url": broker})
    celery = configure(settings)
    assert celery.conf.broker_transport_options["queue_order_strategy"] == "priority"
    ledger = Ledger(settings.database_url)
    job_id = one_job(ledger)
    assert enqueue_shadow(celery, ledger, [41]) == 1  # first
    assert enqueue(celery, ledger, [job_id]) == 1
    assert client.llen(SHADOW_QUEUE) == 1
    taken = client.brpop(list(WORKER_QUEUES), timeout=5)
    assert taken is not None and taken[0] == ANALYSIS_QUEUE.encode()
    taken = client.brpop(list(WORKER_QUEUES), timeout=5)
    assert taken is not None and taken[0] == SHADOW_QUEUE.encode()
    assert b"acwi_node.shadow" in taken[1]
    client.flushdb()
    ledger.dispose()


def many_jobs(ledger: Ledger, n: int) -> list[int]:
    """``n`` queued jobs of ``n`` one-radiograph studies."""
    ids: list[int] = []
    for k in range(n):
        r = ledger.record_instance(
            InstanceRecord(
                f"1.2.4.{k}",
                f"1.2.4.{k}.1",
                "1.2.840.10008.5.1.4.1.1.1.1",
                f"1.2.4.{k}.9",
                "1.2.840.10008.1.2.1",
                "DX",
                "CHEST",
                f"1.2.4.{k}/1.2.4.{k}.1.dcm",
                10,
                "MOD",
            ),
            first_in_association=False,
        )
        ids += ledger.complete_study(
            r.study_id, 1, lambda _: [RoutedJob("chest", "default", [], 0)]
        )
    return ids


def sent_long_ago(ledger: Ledger, seconds: float) -> None:
    """Every job's message was sent ``seconds`` ago."""
    with ledger.session() as s:
        s.execute(update(Job).values(enqueued_at=utcnow() - dt.timedelta(seconds=seconds)))


def test_a_backlog_on_redis_is_not_sent_again_and_again(on_redis: OnRedis) -> None:
    """No worker took the queued jobs for longer than ``requeue_after_s`` (a worker stopped for
    maintenance, a long CT ahead): their messages still wait on Redis, and the periodic
    reconciler does not add a copy of each at every pass. Once Redis lost them, it does."""
    client, celery, ledger = on_redis
    ids = many_jobs(ledger, 4)
    assert enqueue(celery, ledger, ids) == 4
    for _ in range(3):
        sent_long_ago(ledger, 121)
        assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 0
    assert client.llen(ANALYSIS_QUEUE) == 4

    client.flushdb()  # Redis restarted empty
    assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 4
    assert client.llen(ANALYSIS_QUEUE) == 4


def test_a_job_never_sent_is_sent_alone_while_the_others_wait_on_redis(on_redis: OnRedis) -> None:
    """The broker went away after three of four messages: the periodic reconciler sends the
    fourth, and not a copy of the three that wait on Redis."""
    client, celery, ledger = on_redis
    ids = many_jobs(ledger, 4)
    assert enqueue(celery, ledger, ids[:3]) == 3
    with ledger.session() as s:
        s.execute(
            update(Job)
            .where(Job.enqueued_at.is_not(None))
            .values(enqueued_at=utcnow() - dt.timedelta(seconds=121))
        )
    assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 1
    assert client.llen(ANALYSIS_QUEUE) == 4
    sent_long_ago(ledger, 121)
    assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 0


def test_a_shadow_backlog_on_redis_is_not_sent_again_and_again(on_redis: OnRedis) -> None:
    """The same for shadow models' jobs, on their own broker queue: a waiting backlog is left
    alone, one that Redis lost is sent again, and a job whose message was never sent is sent
    even while the others wait."""
    client, celery, ledger = on_redis
    live = many_jobs(ledger, 4)
    with ledger.session() as s:  # the live jobs are done; their shadow jobs wait
        s.execute(update(Job).values(state=JobState.DELIVERED))
        shadows = [ShadowJob(job_id=j, model="challenger") for j in live]
        s.add_all(shadows)
        s.flush()
        shadow_ids = [row.id for row in shadows]
    assert enqueue_shadow(celery, ledger, shadow_ids[:3]) == 3

    def sent_long_ago() -> None:
        with ledger.session() as s:
            s.execute(
                update(ShadowJob)
                .where(ShadowJob.enqueued_at.is_not(None))
                .values(enqueued_at=utcnow() - dt.timedelta(seconds=121))
            )

    # The fourth was never sent (the broker went away after the third): sent once, and then
    # the four wait their turn.
    sent_long_ago()
    assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 1
    for _ in range(3):
        sent_long_ago()
        assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 0
    assert client.llen(SHADOW_QUEUE) == 4

    client.flushdb()  # Redis restarted empty
    assert reconcile(celery, ledger, startup=False, requeue_after_s=120, lease_s=30) == 4
    assert client.llen(SHADOW_QUEUE) == 4


class SilentServer:
    """A TCP server that accepts connections and never answers (a hung Redis, or one behind a
    firewall that drops the connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_broker_that_does_not_answer_fails_the_send_instead_of_blocking(
    tmp_path: Path,
) -> None:
    """A Redis that accepts the connection and never answers: the send gives up (the job stays
    queued in the ledger for the reconciler) instead of blocking the completion loop, and
    the storage SCP's start-up, for ever."""
    server = SilentServer()
    settings = load_settings(
        None,
        node={"data_dir": tmp_path, "broker_url": f"redis://:pw@127.0.0.1:{server.port}/0"},
    )
    celery = configure(settings)
    ledger = Ledger(settings.database_url)
    ids = many_jobs(ledger, 3)
    outcome: list[int] = []
    sender = threading.Thread(target=lambda: outcome.append(enqueue(celery, ledger, ids)))
    sender.start()
    sender.join(timeout=120)  # a bound for a hang only: the send gives up after seconds
    try:
        assert not sender.is_alive(), "the send is still waiting for the broker"
        assert outcome == [0]
        assert sorted(ledger.jobs_to_requeue(older_than_s=3600, lease_s=3600)) == sorted(ids)
    finally:
        server.close()
        sender.join()
        ledger.dispose()


def test_a_broker_that_is_down_is_tried_once_per_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens at the broker's address: the first job's send fails, and the others are
    not tried one by one (each would wait for the broker again): one error, the jobs left
    queued in the ledger for the reconciler."""
    settings = load_settings(
        None, node={"data_dir": tmp_path, "broker_url": "redis://127.0.0.1:1/0"}
    )
    celery = configure(settings)
    ledger = Ledger(settings.database_url)
    ids = many_jobs(ledger, 5)
    with caplog.at_level(logging.ERROR, logger="acwi_node.queue"):
        assert enqueue(celery, ledger, ids) == 0
    errors = [r.getMessage() for r in caplog.records if r.name == "acwi_node.queue"]
    assert len(errors) == 1, errors
    assert f"job {ids[0]} and 4 more: broker unavailable" in errors[0]
    assert sorted(ledger.jobs_to_requeue(older_than_s=3600, lease_s=3600)) == sorted(ids)
    ledger.dispose()
