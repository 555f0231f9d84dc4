"""pynetdicom 3.0's reactor pause, made safe (:func:`install`).

An association's reactor thread takes decoded DIMSE messages off the queue and serves them as
requests. Before a ``send_*`` method (C-STORE, C-ECHO, C-FIND, N-ACTION, ...) sends its request,
it pauses the reactor, so that the reactor cannot take the response: it clears
``_reactor_checkpoint`` and waits for ``_is_paused``. The reactor sets ``_is_paused = True``
*before* it waits at the checkpoint and ``False`` after. When the sender clears the checkpoint
just after the reactor passed it, the sender still reads the stale ``True``, sends, and the
reactor, running on, takes the response off the queue, drops it ("Received unexpected C-STORE
service message") and the sender waits out its DIMSE timeout: an exporter's C-STORE stalls for
``exporter.timeout_s`` and the association is aborted. Rare, and likelier on a busy machine.

:func:`install` makes ``_is_paused`` true, for any thread but the reactor's own, only while the
reactor is parked at the checkpoint (:class:`ReactorCheckpoint` knows), or the association is
killed or its thread has ended: a sender now waits until the reactor is really stopped. The
reactor's own reads (its network-timeout release) see what it set, as before. The node calls it
wherever it makes associations; the test suite's own pynetdicom clients get it too.
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association

_installed = False
_lock = threading.Lock()


class ReactorCheckpoint(threading.Event):
    """An association's reactor checkpoint that knows when the reactor is parked at it."""

    def __init__(self) -> None:
        super().__init__()
        #: The reactor is blocked in :meth:`wait`, the checkpoint cleared.
        self.parked = False

    def wait(self, timeout: float | None = None) -> bool:
        cond: threading.Condition = self._cond  # type: ignore[attr-defined]
        with cond:
            if self.is_set():
                return True
            self.parked = True
            try:
                return cond.wait_for(self.is_set, timeout)
            finally:
                self.parked = False


def _get_paused(assoc: Any) -> bool:
    stored = bool(assoc.__dict__.get("_acwi_is_paused", False))
    if threading.current_thread() is assoc:
        return stored  # the reactor's own view: what it set
    checkpoint = assoc.__dict__.get("_reactor_checkpoint")
    if not isinstance(checkpoint, ReactorCheckpoint):
        return stored
    ended = bool(assoc.__dict__.get("_kill", False)) or not assoc.is_alive()
    return stored and (checkpoint.parked or ended)


def _set_paused(assoc: Any, value: bool) -> None:
    assoc.__dict__["_acwi_is_paused"] = value


def install() -> None:
    """Patch pynetdicom's :class:`~pynetdicom.association.Association` (idempotent): each new
    association gets a :class:`ReactorCheckpoint`, and ``_is_paused`` means parked."""
    global _installed
    with _lock:
        if _installed:
            return
        original_init = Association.__init__

        def __init__(self: Association, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            checkpoint = ReactorCheckpoint()
            checkpoint.set()
            self._reactor_checkpoint = checkpoint

        Association.__init__ = __init__  # type: ignore[method-assign]
        Association._is_paused = property(_get_paused, _set_paused)  # type: ignore[assignment]
        _installed = True
