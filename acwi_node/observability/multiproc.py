"""Metrics added up across processes: SCP listener processes (``ingest.processes`` > 1), web
workers (``node.http_workers`` > 1) and a prefork worker pool (``worker.concurrency`` > 1).

With the solo pool the analyse task runs in the worker process itself, and its metrics are plain
in-memory values. A prefork pool runs tasks in child processes, whose values the parent's health
server cannot see; there, before ``prometheus_client`` is first imported, the worker points
``PROMETHEUS_MULTIPROC_DIR`` at a folder of its own (``<kind>-<host>-<pid>``) and every process
of the pool writes its values there, which ``/metrics`` then adds up (prometheus_client's
multiprocess mode).

prometheus_client keeps those values in memory-mapped files that it creates sparse: a write that
needs a page the file system has no room for kills the process (SIGBUS). The folders are
therefore kept off the data disk, which fills up, on the memory file system ``/dev/shm``, in a
folder of this node's own (mode 0700, named by the user and the data directory, so that two
nodes on one host never share one); without a usable ``/dev/shm`` they are under
``<data_dir>/metrics``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import stat
import sys
from pathlib import Path

from acwi_node.config import Settings

log = logging.getLogger("acwi_node.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"

# The memory file system the metric files are kept on, where it is there and writable.
SHARED_MEMORY = Path("/dev/shm")


def metrics_root(settings: Settings) -> Path:
    """The folder under which this node's processes keep their multiprocess metric files:
    ``/dev/shm/acwi-node-<uid>-<hash of the data directory>``, or ``<data_dir>/metrics`` where
    ``/dev/shm`` is missing or not writable, or that folder is not this user's own."""
    fallback = settings.data_dir / "metrics"
    if not (SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK | os.X_OK)):
        return fallback
    uid = os.getuid()
    digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:16]
    root = SHARED_MEMORY / f"acwi-node-{uid}-{digest}"
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("metrics: cannot create %s (%s); using %s", root, exc, fallback)
        return fallback
    # Anyone can create names in /dev/shm: use only a real folder of this user's (not a link).
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        log.warning("metrics: %s is not a folder of this user's; using %s", root, fallback)
        return fallback
    if stat.S_IMODE(info.st_mode) != 0o700:
        root.chmod(0o700)
    return root


def enable_multiprocess(settings: Settings, kind: str = "worker") -> Path | None:
    """Switch this process (and the children it forks) to multiprocess metrics.

    Returns the folder, or None when ``prometheus_client`` was already imported (then the
    metrics stay in-memory, and a pool's children are not counted).
    """
    if "prometheus_client" in sys.modules and ENV not in os.environ:
        log.warning("metrics: multiprocess mode must be enabled before prometheus_client loads")
        return None
    host = socket.gethostname()
    name = f"{kind}-{host}-{os.getpid()}"
    for _ in range(3):  # the node's folder on /dev/shm, removed by a process stopping meanwhile
        try:
            root = metrics_root(settings)
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=root.parent != SHARED_MEMORY)
            break
        except FileNotFoundError:
            continue
    else:
        root = settings.data_dir / "metrics"
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    remove_stopped(root, host)
    os.environ[ENV] = str(folder)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's: there
    return True


def remove_stopped(root: Path, host: str) -> int:
    """Remove the folders under ``root`` that processes of this host (``<kind>-<host>-<pid>``)
    left when they were killed (SIGKILL, the OOM killer: :func:`disable_multiprocess` never
    ran) and that no running process owns; how many. Their values are no longer added up (a
    restarted process has a folder of its own), and each restart would leave one more on the
    memory file system. A folder of another host (a container sharing ``/dev/shm``) stays."""
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in entries:
            _, _, rest = entry.name.partition("-")  # a kind has no "-"; a host may
            of_host, _, pid = rest.rpartition("-")
            if of_host != host or not pid.isdigit():
                continue
            if int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
    return removed


def disable_multiprocess(folder: Path | None) -> None:
    """Remove the folder of a stopped pool (and the node's folder on /dev/shm once empty)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.parent == SHARED_MEMORY:
            with contextlib.suppress(OSError):  # other processes' folders are still there
                folder.parent.rmdir()
