"""Enqueueing and the reconciler against a real Redis broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from acwi_node.config import load_settings
from acwi_node.ledger import InstanceRecord, Ledger, RoutedJob, StudyFacts
from acwi_node.tasks.app import ANALYSIS_QUEUE, configure
from acwi_node.tasks.queue import enqueue, reconcile
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


def test_messages_carry_only_the_job_id_and_survive_a_flush(tmp_path: Path) -> None:
    broker = f"{REDIS_URL}/{DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    settings = load_settings(None, node={"data_dir": tmp_path, "broker_url": broker})
    celery = configure(settings)
    ledger = Ledger(settings.database_url)
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
    client.flushdb()
    ledger.dispose()


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
