"""Several storage SCP processes sharing the DICOM port (``ingest.processes``).

One Python process serves all its associations on one core at a time (the interpreter lock). To
use more cores, the ``scp`` process binds the DICOM port once and starts listener processes that
inherit the listening socket: each new connection goes to whichever listener accepts it first,
and every association then stays in the process that accepted it.

The parent process runs the completion loop, the reconciler and the health endpoint, and starts
a listener again when one dies (with a growing delay, like ``acwi-node serve``). A listener
stops once its parent is gone (killed included): it is told the parent's process id
(:data:`PARENT_PID_ENV`) rather than reading it once started, since a parent killed while the
listener still starts would leave it init's, and the listener holding the DICOM port for good.
Listeners keep nothing in memory that another process needs: instances, MPPS steps and
completion signals are in the ledger (:mod:`acwi_node.ingest.mpps`), which is why a modality's
N-CREATE and N-SET may reach different listeners.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from acwi_node.config import MAX_AUTO_PROCESSES, Settings, processes_per_core
from acwi_node.tcp import listening_socket

log = logging.getLogger("acwi_node.ingest")

#: Tells an ``acwi-node scp`` process that it is a listener, and which inherited file descriptor
#: is the listening socket.
LISTEN_FD_ENV = "ACWI_SCP_LISTEN_FD"

#: In a listener process, the inherited pipe on which it tells its parent that it accepts.
READY_FD_ENV = "ACWI_SCP_READY_FD"

#: In a listener process, the process id of the parent that started it: a listener whose parent
#: died while it was still starting (its parent process id already that of init or a
#: subreaper) knows it from this, and stops instead of serving the port for good.
PARENT_PID_ENV = "ACWI_SCP_PARENT_PID"

#: Connections the kernel queues before a listener accepts them.
BACKLOG = 128


#: Most listener processes ``ingest.processes = 0`` starts (as many as ``node.http_workers = 0``
#: starts web processes).
MAX_AUTO_LISTENERS = MAX_AUTO_PROCESSES


def listener_count(settings: Settings, cores: int | None = None) -> int:
    """Listener processes to run: ``ingest.processes``, or when it is 0 one per core (``cores``:
    the machine's), at most :data:`MAX_AUTO_LISTENERS`."""
    return processes_per_core(settings.ingest.processes, cores)


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket the listener processes share (inheritable); ``::`` takes IPv4
    connections too, as the listener of one process does
    (:func:`~acwi_node.tcp.listening_socket`)."""
    sock = listening_socket(host, port, backlog=BACKLOG)
    sock.set_inheritable(True)
    return sock


def announce_ready() -> None:
    """In a listener process: tell the parent that this listener accepts connections."""
    fd = os.environ.get(READY_FD_ENV)
    if not fd:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except OSError:  # the parent is gone: the listener notices and stops on its own
        pass


def parent_gone() -> bool:
    """In a listener process: whether the ``scp`` process that started it has exited (its
    parent process id is no longer the one it was started with)."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return False
    return os.getppid() != int(expected)


def inherited_listener() -> socket.socket | None:
    """In a listener process, the socket its parent passed; None elsewhere."""
    fd = os.environ.get(LISTEN_FD_ENV)
    if not fd:
        return None
    return socket.socket(fileno=int(fd))


class ListenerProcesses:
    """Starts ``count`` listener processes on ``sock`` and keeps them running."""

    #: What a listener process runs (its environment tells it that it is one).
    command: tuple[str, ...] = (sys.executable, "-m", "acwi_node.cli", "scp")

    def __init__(self, sock: socket.socket, count: int, env: Mapping[str, str]) -> None:
        self.sock = sock
        self.count = count
        self.env = {**env, LISTEN_FD_ENV: str(sock.fileno()), PARENT_PID_ENV: str(os.getpid())}
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        #: Per listener: the read end of its ready pipe until it said it accepts, else None.
        self._ready_pipes: list[int | None] = [None] * count
        self._ready = [False] * count
        self._restarts = [0] * count
        self._due = [0.0] * count  # monotonic time a dead listener may start again
        self._lock = threading.Lock()

    def _spawn(self, i: int) -> None:
        """Start listener ``i`` (under ``self._lock``)."""
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            self._procs[i] = subprocess.Popen(
                list(self.command),
                env={**self.env, READY_FD_ENV: str(write_end)},
                pass_fds=(self.sock.fileno(), write_end),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._close_ready_pipe(i)
        self._ready_pipes[i] = read_end
        self._ready[i] = False

    def _close_ready_pipe(self, i: int) -> None:
        fd = self._ready_pipes[i]
        if fd is not None:
            os.close(fd)
            self._ready_pipes[i] = None

    def _poll_ready(self) -> None:
        """Note the listeners that said they accept (under ``self._lock``)."""
        for i, fd in enumerate(self._ready_pipes):
            if fd is None:
                continue
            try:
                said = os.read(fd, 1)
            except BlockingIOError:
                continue
            self._ready[i] = said == b"1"
            self._close_ready_pipe(i)  # said it, or exited without saying it (EOF)

    def start(self) -> None:
        with self._lock:
            for i in range(self.count):
                self._spawn(i)
        log.info("%d listener processes share DICOM port %d", self.count, self.port)

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until every listener accepts connections (connections made before wait in the
        kernel's queue, not refused); False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.listening:
            with self._lock:
                exited = any(p is None or p.poll() is not None for p in self._procs)
            if exited or time.monotonic() > deadline:
                return False  # supervise() starts the exited ones again
            time.sleep(0.05)
        return True

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    @property
    def listening(self) -> bool:
        """True while every listener runs and accepts connections (readiness)."""
        with self._lock:
            self._poll_ready()
            return all(
                p is not None and p.poll() is None and ready
                for p, ready in zip(self._procs, self._ready, strict=True)
            )

    def supervise(self) -> None:
        """Start again, after a growing delay, every listener that exited."""
        now = time.monotonic()
        with self._lock:
            for i, proc in enumerate(self._procs):
                if proc is None:
                    if now >= self._due[i]:
                        self._spawn(i)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                self._restarts[i] += 1
                delay = min(30.0, 0.5 * 2 ** min(self._restarts[i], 6))
                log.error("scp listener exited with %s; starting it again in %.1f s", code, delay)
                self._procs[i] = None
                self._due[i] = now + delay

    def stop(self, timeout_s: float = 20.0) -> None:
        with self._lock:
            procs = [p for p in self._procs if p is not None]
            self._procs = [None] * self.count
            for i in range(self.count):
                self._close_ready_pipe(i)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close()
