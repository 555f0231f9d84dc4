"""A CPU wake-up latency request, held while the SCP has associations open (opt-in).

On one association the sender waits for each answer, and the node answers once the instance is
flushed: while the disk works, the node's CPU and the sender's are idle. An idle CPU drops
into a sleep state (on a virtual machine it exits to the host), and waking it costs time and
leaves it with cold caches; on the project's build machine the node's own steps ran half as
long again after each flush as without one (docs/speed.md).

Linux's PM QoS interface lets a process ask that no CPU sleep deeper than it can wake from in
a given time: it writes the microseconds, as a native 32-bit integer, to
``/dev/cpu_dma_latency`` and keeps the file open; closing the file withdraws the request, and
the kernel honours the lowest request held by any process (the kernel's
``Documentation/power/pm_qos_interface.rst``). ``ingest.cpu_wakeup_latency_us`` makes each SCP
process hold such a request from the first association it accepts to the end of its last one,
so that idle CPUs spin only while studies arrive. The file is writable by root only unless
the host grants it (a udev rule); without it the node logs why once and runs as usual.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: The kernel's CPU wake-up latency request device.
DEVICE = Path("/dev/cpu_dma_latency")


class CpuLatencyRequest:
    """Reference-counted: :meth:`acquire` for each association accepted, :meth:`release`
    for each that ends; the request is held while the count is above zero. ``microseconds``
    None: never requests anything."""

    def __init__(self, microseconds: int | None, device: Path | None = None) -> None:
        self.microseconds = microseconds
        self.device = device or DEVICE
        self._lock = threading.Lock()
        self._count = 0
        self._fd = -1
        #: False once a request could not be made (logged once): the node runs without.
        self.usable = microseconds is not None

    @property
    def held(self) -> bool:
        """Whether the request is in force now."""
        with self._lock:
            return self._fd >= 0

    def check(self) -> None:
        """At start-up: make and withdraw the request once, so that a host that does not
        permit it is reported then (once), not at the first association."""
        with self._lock:
            if self.usable and self._fd < 0:
                fd = self._open()
                if fd >= 0:
                    os.close(fd)

    def acquire(self) -> None:
        with self._lock:
            self._count += 1
            if self._count == 1 and self.usable and self._fd < 0:
                self._fd = self._open()

    def release(self) -> None:
        with self._lock:
            self._count = max(0, self._count - 1)
            if self._count == 0 and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def close(self) -> None:
        """Withdraw the request whatever the count (the SCP stops)."""
        with self._lock:
            self._count = 0
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _open(self) -> int:
        """The request made: its descriptor, or -1 (logged; no further attempts)."""
        assert self.microseconds is not None
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._unusable(exc)
            return -1
        try:
            os.write(fd, struct.pack("=i", self.microseconds))
        except OSError as exc:
            os.close(fd)
            self._unusable(exc)
            return -1
        return fd

    def _unusable(self, exc: OSError) -> None:
        self.usable = False
        log.warning(
            "ingest.cpu_wakeup_latency_us: cannot request a CPU wake-up latency (%s: %s); the"
            " SCP runs without it (the file needs write access, e.g. a udev rule, or a latency"
            " tuning profile on the host)",
            self.device,
            exc.strerror or exc,
        )
