"""Wake the exporter when results are due, instead of leaving them to its next poll.

The exporter looks for due deliveries every ``exporter.poll_interval_s`` (0.25 s) when it has
nothing to do, so a study's results waited 125 ms on average after the worker queued them: as
long as a radiograph's analysis. The exporter now also listens on a Unix datagram socket in the
data directory (``run/exporter.wake``); a worker that has queued results sends it one datagram
(:func:`wake_exporter`), and the exporter looks at once. Processes that share the data
directory share the socket (the compose file's services mount one volume); a worker elsewhere,
a data directory on a file system without sockets, or a path too long for one leave the
exporter polling as before, which also stays the fallback for every delivery retried later.
"""

from __future__ import annotations

from pathlib import Path

from acwi_node.wakeup import DatagramListener, send_wake

#: The wake-up socket, under the data directory.
WAKE_PATH = Path("run") / "exporter.wake"


def wake_path(data_dir: Path) -> Path:
    """Where the exporter of ``data_dir`` listens for wake-ups."""
    return data_dir / WAKE_PATH


def wake_exporter(data_dir: Path) -> bool:
    """Tell the exporter of ``data_dir`` that results are due (best effort, never blocks);
    whether a listening exporter got the datagram."""
    return send_wake(wake_path(data_dir))


class WakeUpListener(DatagramListener):
    """The exporter's end (:class:`acwi_node.wakeup.DatagramListener` at :func:`wake_path`)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(wake_path(data_dir), what="exporter wake-ups")
