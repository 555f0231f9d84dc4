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

import contextlib
import logging
import os
import select
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: The wake-up socket, under the data directory.
WAKE_PATH = Path("run") / "exporter.wake"


def wake_path(data_dir: Path) -> Path:
    """Where the exporter of ``data_dir`` listens for wake-ups."""
    return data_dir / WAKE_PATH


def wake_exporter(data_dir: Path) -> bool:
    """Tell the exporter of ``data_dir`` that results are due (best effort, never blocks);
    whether a listening exporter got the datagram."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(b"\x01", os.fsencode(wake_path(data_dir)))
        except OSError:  # no exporter listening (or its queue is full: it is awake already)
            return False
    return True


class WakeUpListener:
    """The exporter's end: :meth:`wait` returns when woken, or after the timeout."""

    def __init__(self, data_dir: Path) -> None:
        self.path = wake_path(data_dir)
        self._sock: socket.socket | None = None
        self._inode = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # an earlier exporter's; it is gone or polls from now on
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(os.fsencode(self.path))
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            self._inode = self.path.stat().st_ino
            self._sock = sock
        except OSError as exc:
            log.info("exporter wake-ups unavailable (%s); polling only", exc)

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def wait(self, timeout_s: float) -> bool:
        """Wait until woken (True) or ``timeout_s`` has passed (False); wake-ups that came
        meanwhile are all taken."""
        sock = self._sock
        if sock is None:
            time.sleep(timeout_s)
            return False
        try:
            readable, _, _ = select.select([sock], [], [], timeout_s)
        except (OSError, ValueError):  # closed by close() meanwhile
            return False
        woken = False
        while readable:
            try:
                sock.recv(16)
            except (BlockingIOError, OSError):
                break
            woken = True
        return woken

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._inode:  # not a successor's socket
                    self.path.unlink()
