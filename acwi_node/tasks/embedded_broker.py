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
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

import kombu.transport
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    # kombu names the parameter `payload` here and `message` in the base class.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` onto ``queue``: written aside, then renamed into the queue folder
        (kombu's own name, so messages are still taken oldest first)."""
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
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


class Transport(filesystem.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``filesystem://`` broker URLs with this transport, from the next connection on
    (kombu keeps the class it resolved for an alias: that is dropped too)."""
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
    resolved = getattr(kombu.transport, "_transport_cache", None)
    if isinstance(resolved, dict):
        resolved.pop("filesystem", None)
