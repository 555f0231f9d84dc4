"""A rejected association request is reported as a rejection, with the peer's reasons, even
when pynetdicom's association thread looks only after its DUL has received the rejection and
closed the connection (it then takes the connection for one never made, and aborts)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.transport import AssociationSocket

from acwi_node.export.scu import verify
from tests.integration.test_scp import SC, running_scp
from tests.support.association import rejected


class ReadyOnceClosed(threading.Event):
    """The requestor socket's "connection attempt over" event, whose waiter (the association
    thread) goes on only once the connection has closed again: the order that a loaded
    machine gave about once in 300 rejections."""

    def __init__(self, sock: AssociationSocket) -> None:
        super().__init__()
        self.sock = sock

    def wait(self, timeout: float | None = None) -> bool:
        ready = super().wait(timeout)
        deadline = time.monotonic() + 5
        while self.sock.socket is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        return ready


@pytest.fixture
def late_association_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every requestor's association thread (the node's and pynetdicom's own AE's) looks
    only once its connection has closed."""
    init = AssociationSocket.__init__

    def init_late(self: AssociationSocket, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self.assoc.is_requestor:
            self._ready = ReadyOnceClosed(self)

    monkeypatch.setattr(AssociationSocket, "__init__", init_late)


@pytest.mark.usefixtures("late_association_thread")
def test_a_rejection_read_after_the_connection_closed_is_a_rejection(tmp_path: Path) -> None:
    with running_scp(tmp_path, allowed_calling_aes=["SOMEONE"]) as (settings, *_):
        result = verify("ACWI", "127.0.0.1", settings.node.dicom_port, "STRANGER", timeout_s=10)
    assert not result.ok
    assert result.error.startswith("association rejected by ACWI@127.0.0.1"), result.error
    assert "Calling AE title not recognised" in result.error


def test_a_peer_that_closes_without_answering_is_still_an_abort(tmp_path: Path) -> None:
    """No answer in the queue: the error stays what it was."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def close_at_once() -> None:
            conn, _ = server.accept()
            conn.recv(1)
            conn.close()

        thread = threading.Thread(target=close_at_once, daemon=True)
        thread.start()
        result = verify("PACS", "127.0.0.1", port, "ACWI", timeout_s=10)
        thread.join(5)
    assert not result.ok
    assert "during negotiation" in result.error, result.error


@pytest.mark.usefixtures("late_association_thread")
def test_the_tests_see_such_a_rejection_of_pynetdicom_s_own_requestor(tmp_path: Path) -> None:
    """The tests' requestors are pynetdicom's own AE: it reports the rejection as an abort
    (``is_rejected`` False), which :func:`tests.support.association.rejected` sees through."""
    with running_scp(tmp_path, allowed_calling_aes=["SOMEONE"]) as (settings, *_):
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(SC)
        assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
    assert not assoc.is_established and not assoc.is_rejected
    assert rejected(assoc)
