"""Wake-ups between the node's processes: one process tells another to look now.

A process that would otherwise poll (the exporter for due results, a worker for queued jobs on
the embedded broker) also listens on a Unix datagram socket; the process that made work for it
sends one datagram, and the listener looks at once instead of at its next poll. A wake-up is a
hint, never the only way work is found: a sender that cannot reach a socket (no listener, a
file system without sockets, a path longer than a socket's address allows) changes nothing, and
the listener's polling stays the fallback.

Datagrams that arrive while the listener is busy stay queued in its socket, so a wake-up sent
between the listener's last look and its wait is not lost: the wait returns at once.
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


def send_wake(path: Path, *, remove_dead: bool = False) -> bool:
    """One datagram to the listener at ``path`` (best effort, never blocks); whether it was
    taken. A listener whose queue is full is awake already. With ``remove_dead``, a socket
    file that no process listens on any more (its listener was killed) is removed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(b"\x01", os.fsencode(path))
        except ConnectionRefusedError:
            if remove_dead:
                with contextlib.suppress(OSError):
                    path.unlink()
            return False
        except OSError:
            return False
    return True


class DatagramListener:
    """The listening end at ``path``: :meth:`wait` returns when woken, or after the timeout.

    A socket file already at ``path`` is replaced (it belonged to an earlier listener, gone or
    polling from now on). Where no socket can be made, :attr:`listening` is false and
    :meth:`wait` only sleeps.
    """

    def __init__(self, path: Path, *, what: str = "wake-ups") -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._inode = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
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
            log.info("%s unavailable (%s); polling only", what, exc)

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
            readable, _, _ = select.select([sock], [], [], max(timeout_s, 0.0))
        except (OSError, ValueError):  # closed by close() meanwhile
            return False
        woken = False
        while readable:
            try:
                sock.recv(16)
            except OSError:
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
