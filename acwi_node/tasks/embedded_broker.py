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
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import kombu.transport
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: A message's ``.part`` file this old belongs to no put still running (a put takes
#: milliseconds): its writer was killed, and the file is removed.
STALE_PART_S = 600.0


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
        """Put ``payload`` onto ``queue``: written aside, then renamed into the queue folder
        (kombu's own name, so messages are still taken oldest first)."""
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
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


def install() -> None:
    """Serve ``filesystem://`` broker URLs with this transport, from the next connection on
    (kombu keeps the class it resolved for an alias: that is dropped too)."""
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
    resolved = getattr(kombu.transport, "_transport_cache", None)
    if isinstance(resolved, dict):
        resolved.pop("filesystem", None)
