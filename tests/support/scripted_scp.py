"""A pynetdicom storage SCP whose C-STORE answers are chosen by the test, and which can go
away in the middle of an association as a PACS that restarts does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE
from tests.support.ports import free_port

#: ``answer(index, data set, event)``: the C-STORE status for the index-th C-STORE (from 1).
Answer = Callable[[int, Dataset, evt.Event], int]


def abort_before_answering(event: evt.Event) -> None:
    """From a C-STORE handler: abort its association; the handler's answer is never sent."""
    threading.Timer(0.05, event.assoc.abort).start()  # not from the handler's own thread
    time.sleep(1.0)


class ScriptedScp:
    """A storage SCP on loopback (AE title ``SCRIPTED``) answering each C-STORE with what
    ``answer`` returns; ``calls`` counts the C-STOREs, ``associations`` the associations."""

    def __init__(
        self,
        answer: Answer,
        *,
        require_called_aet: bool = False,
        syntaxes: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        sop_classes: Sequence[str] = (SECONDARY_CAPTURE_IMAGE_STORAGE,),
        port: int | None = None,
    ) -> None:
        self.ae = AE(ae_title="SCRIPTED")
        for sop_class in sop_classes:
            self.ae.add_supported_context(sop_class, list(syntaxes))
        self.ae.require_called_aet = require_called_aet
        self.port = port or free_port()
        self.calls = 0
        self.associations = 0
        self._lock = threading.Lock()
        self._answer = answer
        self.server: ThreadedAssociationServer | None = None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.calls += 1
            index = self.calls
        return self._answer(index, event.dataset, event)

    def _on_established(self, _event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def go_away(self, event: evt.Event) -> None:
        """From a C-STORE handler: stop listening (a new association is refused), then
        abort the association of ``event`` before its C-STORE is answered."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        abort_before_answering(event)

    def __enter__(self) -> ScriptedScp:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_ESTABLISHED, self._on_established),
            ],
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
