"""The embedded broker: kombu's filesystem transport, with every message appearing whole.

kombu's filesystem transport creates a message's file in the queue folder and only then writes
it. A consumer that lists the folder in between takes the empty file, cannot decode it and
drops the message: with a consumer polling without pause, 371 of 3,000 messages were lost. For
the node a lost message is a job left queued until the reconciler sends it again
(``completion.requeue_after_s``, 120 s by default): a study answered two minutes late.

Here a message is written under a name no queue reads (a dot-file ending in ``.part``, which
the consumer's name match and the queue-depth metric both skip) and renamed into place, so a
consumer sees either no file or the whole message. :func:`install` makes this the transport of
every ``filesystem://`` broker URL in the process.

An exchange's table (which queues it routes to) had the same flaw where it is created: kombu
creates the file, then locks and writes it, and a publish reading it in between fails to decode
it (the job then waits for the reconciler). Here a new table is written aside and linked into
place whole; once it exists, kombu's own locked update in place applies. A table left empty by
a process that died while creating it (kombu's transport) reads as no bindings and is replaced
by the next binding, under kombu's lock on it: processes repairing it at once take turns, and
those after the first add their bindings to the new table. Message files that a killed process
left half-written (its ``.part``) are removed when a channel opens, once they are
:data:`STALE_PART_S` old.

kombu's consumer finds a message by listing the queue folder every ``polling_interval`` (0.2
s): a job waited 0.1 s on average before a worker took it, as long as a radiograph's analysis.
Here a consuming process also listens on a Unix datagram socket in the broker's ``wake``
folder (the transport option :data:`WAKE_OPTION`), and every message put wakes the consumers
listening there (:mod:`acwi_node.wakeup`): the worker takes a job as soon as it is queued.
Polling stays the fallback (no sockets on the file system, a path too long for one); the
socket of a consumer that was killed is removed by the next put.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

import kombu.transport
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from acwi_node.wakeup import DatagramListener, send_wake

#: A message's ``.part`` file this old belongs to no put still running (a put takes
#: milliseconds): its writer was killed, and the file is removed.
STALE_PART_S = 600.0
#: Transport option: the folder where consuming processes listen for "a message was put".
WAKE_OPTION = "wake_folder"


class Channel(filesystem.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        remove_stale_parts(Path(self.data_folder_out))

    def get_table(self, exchange: Any) -> Any:
        """The exchange's bindings; none while its table file is empty (see the module)."""
        file = self._exchange_file(exchange)
        with contextlib.suppress(OSError):
            if file.stat().st_size == 0:
                return []
        return super().get_table(exchange)

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        """Bind ``queue``: a missing (or empty) exchange table is created whole, an existing
        one updated by kombu under its lock."""
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        try:
            empty = file.stat().st_size == 0
        except FileNotFoundError:
            empty = None  # no table yet
        if empty is not False:
            table = [filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")]
            partial = file.with_name(f".{file.name}.{uuid.uuid4().hex}.part")
            try:
                partial.write_bytes(str_to_bytes(dumps(table)))
                if empty and _replace_leftover(file, partial):
                    return
                try:
                    os.link(partial, file)  # fails if another process created it meanwhile
                    return
                except FileExistsError:
                    pass
            except OSError as exc:
                raise ChannelError(f"Cannot create {file}") from exc
            finally:
                with contextlib.suppress(OSError):
                    partial.unlink()
        super()._queue_bind(exchange, routing_key, pattern, queue)

    # kombu names the parameter `payload` here and `message` in the base class.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` onto ``queue``: written aside, then renamed into the queue folder.

        Named as kombu names it (time, then a UUID), its consumer taking the first name in
        order, but the time is the wall clock's, in microseconds, padded to one width: kombu's
        milliseconds of the monotonic clock start again at every boot and grow a digit at
        times (1,000 s, 2.8 h, 28 h), so that names sorted as text put the messages of a
        backlog left from before a restart, or from before such a digit, behind every newer
        one."""
        name = f"{time.time_ns() // 1000:017d}_{uuid.uuid4()}.{queue}.msg"
        folder = self.data_folder_out
        final = os.path.join(folder, name)
        partial = os.path.join(folder, f".{name}.part")
        try:
            with open(partial, "wb", buffering=0) as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc
        wake_folder = self.transport_options.get(WAKE_OPTION)
        if wake_folder:
            wake_consumers(Path(wake_folder))


def wake_consumers(folder: Path) -> int:
    """Wake every consumer listening in ``folder`` (a message was put); how many were woken.
    The sockets of consumers that are gone are removed."""
    woken = 0
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith(".") and send_wake(Path(entry.path), remove_dead=True):
                woken += 1
    return woken


def _replace_leftover(file: Path, partial: Path) -> bool:
    """Replace the empty leftover table ``file`` by ``partial``, holding kombu's lock on the
    leftover so that processes repairing it at once take turns. False when another process
    replaced or filled it first: the caller then adds its binding to that table (kombu's
    locked update), so no binding is lost."""
    try:
        with open(file, "rb") as leftover:
            filesystem.lock(leftover, filesystem.LOCK_EX)
            try:
                held = os.fstat(leftover.fileno())
                now = os.stat(file)
                if held.st_size or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                    return False
                os.replace(partial, file)
                return True
            finally:
                filesystem.unlock(leftover)
    except FileNotFoundError:
        return False


def remove_stale_parts(folder: Path, older_than_s: float = STALE_PART_S) -> int:
    """Remove the ``.part`` files in ``folder`` older than ``older_than_s``; how many."""
    removed = 0
    cut = time.time() - older_than_s
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".part")):
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cut:
                    os.unlink(entry.path)
                    removed += 1
    return removed


class Transport(filesystem.Transport):
    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._wake: DatagramListener | None = None
        self._wake_pid = 0

    def _wake_listener(self) -> DatagramListener | None:
        """This process's socket in the wake folder, made when it first waits for messages
        (a process forked from a consumer makes its own); None where there is none."""
        client = self.client
        folder = client.transport_options.get(WAKE_OPTION) if client is not None else None
        if not folder:
            return None
        if self._wake_pid != os.getpid():
            self._wake_pid = os.getpid()
            name = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._wake = DatagramListener(Path(folder) / name, what="broker wake-ups")
        return self._wake if self._wake is not None and self._wake.listening else None

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """kombu's loop (take a message, or wait ``polling_interval`` and look again), waiting
        on this process's wake-up socket instead of sleeping: a message put meanwhile ends the
        wait at once."""
        listener = self._wake_listener()
        if listener is None:
            super().drain_events(connection, timeout)
            return
        cycle = self.cycle
        assert cycle is not None  # made with the transport
        start = time.monotonic()
        while True:
            try:
                cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                wait = self.polling_interval or 0.0
                if timeout is not None:
                    left = timeout - (time.monotonic() - start)
                    if left <= 0:
                        raise TimeoutError() from None  # socket.timeout, as kombu raises
                    wait = min(wait, left)
                listener.wait(wait)

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        if self._wake is not None and self._wake_pid == os.getpid():
            self._wake.close()
        self._wake = None
        self._wake_pid = 0


def install() -> None:
    """Serve ``filesystem://`` broker URLs with this transport, from the next connection on
    (kombu keeps the class it resolved for an alias: that is dropped too)."""
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
    resolved = getattr(kombu.transport, "_transport_cache", None)
    if isinstance(resolved, dict):
        resolved.pop("filesystem", None)
