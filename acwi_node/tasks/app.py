"""The Celery application, configured from the node's settings.

The broker is a doorbell: a message carries only a job id; the ledger holds the job. Tasks are
``acks_late`` with ``task_reject_on_worker_lost`` and prefetch 1, so a killed worker's job is
redelivered, and the visibility timeout exceeds the longest analysis. Without ``broker_url`` the
node uses kombu's filesystem transport under ``<data_dir>/broker``: no server to install.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import pools as kombu_pools

from acwi_node.config import Settings

ANALYSE_TASK = "acwi_node.analyse"
ANALYSIS_QUEUE = "analysis"
#: STAT work (an HL7 order with priority S); workers consume it before ANALYSIS_QUEUE.
HIGH_PRIORITY_QUEUE = "analysis.high"
#: Shadow models' analyses (``[[routes]] shadow_models``): consumed after the other two.
SHADOW_TASK = "acwi_node.shadow"
SHADOW_QUEUE = "analysis.shadow"
#: The queues a worker consumes, in the order it polls them.
WORKER_QUEUES = (HIGH_PRIORITY_QUEUE, ANALYSIS_QUEUE, SHADOW_QUEUE)
#: ``worker.queues``' names of them.
QUEUE_NAMES = {"stat": HIGH_PRIORITY_QUEUE, "routine": ANALYSIS_QUEUE, "shadow": SHADOW_QUEUE}
#: Redis: how long a connection attempt, and a command (a message sent), may wait for the
#: server. Without it a Redis that stopped answering without closing the connection (hung, a
#: failover, a firewall that drops the connection) blocks a send for ever, and with it the
#: completion loop, and at start-up the storage SCP; with it the send fails, the job stays
#: queued in the ledger and the reconciler sends it again.
REDIS_SOCKET_TIMEOUT_S = 5.0


def worker_queues(settings: Settings) -> list[str]:
    """The broker queues of ``worker.queues``, in the order a worker polls them (STAT first,
    shadow models last, whatever order the setting lists them in)."""
    wanted = {QUEUE_NAMES[name] for name in settings.worker.queues}
    return [q for q in WORKER_QUEUES if q in wanted]


app = Celery("acwi_node")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for this node (pure function, testable)."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": ANALYSIS_QUEUE,
        "task_routes": {
            ANALYSE_TASK: {"queue": ANALYSIS_QUEUE},
            SHADOW_TASK: {"queue": SHADOW_QUEUE},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": False,
        "enable_utc": True,
    }
    transport: dict[str, Any] = {
        "visibility_timeout": settings.worker.visibility_timeout_s,
        # Poll the queues in the order the worker lists them (high priority first).
        "queue_order_strategy": "priority",
    }
    if settings.broker_url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
        transport.update(
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_keepalive=True,
        )
    if settings.broker_url.startswith("filesystem://"):
        from acwi_node.tasks.embedded_broker import install

        install()  # messages written whole (kombu's own transport can lose them)
        folder = settings.embedded_broker_dir
        for sub in ("queue", "processed", "control", "wake"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport = {
            # Broadcast (control) messages too; kombu's default is ./control in the cwd.
            "control_folder": str(folder / "control"),
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.2,
            # Consumers listen here; a message put wakes them (the polling is the fallback).
            "wake_folder": str(folder / "wake"),
        }
    conf["broker_transport_options"] = transport
    if settings.broker_password is not None:
        # Celery hands it to kombu's connection beside the URL: never part of broker_url, so
        # that no banner, log line or error shows it.
        conf["broker_password"] = settings.broker_password
    return conf


def configure(settings: Settings, *, register_tasks: bool = True) -> Celery:
    """Configure the module-level app for these settings and register the tasks.

    Processes that only send tasks (the scp: it sends them by name) pass
    ``register_tasks=False`` and so never import the analysis code and PyTorch.
    """
    # Drop connections made under an earlier configuration (one process, several configs).
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    kombu_pools.reset()  # kombu keeps producer pools per broker URL, across configurations
    app.conf.update(celery_config(settings))
    if not register_tasks:
        return app
    from acwi_node.tasks import analyse, shadow  # noqa: F401  (registers the tasks)

    analyse.bind_settings(settings)
    return app
