"""Process-local metrics across a prefork worker pool (``worker.concurrency`` > 1).

With the solo pool the analyse task runs in the worker process itself, and its metrics are plain
in-memory values. A prefork pool runs tasks in child processes, whose values the parent's health
server cannot see; there, before ``prometheus_client`` is first imported, the worker points
``PROMETHEUS_MULTIPROC_DIR`` at a folder of its own (``<data_dir>/metrics/worker-<host>-<pid>``)
and every process of the pool writes its values there, which ``/metrics`` then adds up
(prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from acwi_node.config import Settings

log = logging.getLogger("acwi_node.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(settings: Settings, kind: str = "worker") -> Path | None:
    """Switch this process (and the children it forks) to multiprocess metrics.

    Returns the folder, or None when ``prometheus_client`` was already imported (then the
    metrics stay in-memory, and a pool's children are not counted).
    """
    if "prometheus_client" in sys.modules and ENV not in os.environ:
        log.warning("metrics: multiprocess mode must be enabled before prometheus_client loads")
        return None
    folder = settings.data_dir / "metrics" / f"{kind}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[ENV] = str(folder)
    return folder


def disable_multiprocess(folder: Path | None) -> None:
    """Remove the folder of a stopped pool."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
