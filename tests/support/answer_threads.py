"""Which thread sends an association's A-ASSOCIATE-AC and A-RELEASE-RP."""

from __future__ import annotations

import threading

import pytest

from acwi_node.ingest import reactor

#: PDU types recorded: A-ASSOCIATE-AC, A-RELEASE-RP.
ANSWERS = (b"\x02", b"\x06")


def record_answer_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """A list that fills, for each A-ASSOCIATE-AC and A-RELEASE-RP the node sends, with (PDU
    type, class name of the sending thread: ``EventDrivenDUL`` or ``EventDrivenAssociation``)."""
    sent: list[tuple[int, str]] = []
    original = reactor.BulkReadSocket.send

    def recording(self: reactor.BulkReadSocket, data: bytes) -> None:
        if data[:1] in ANSWERS:
            sent.append((data[0], type(threading.current_thread()).__name__))
        original(self, data)

    monkeypatch.setattr(reactor.BulkReadSocket, "send", recording)
    return sent
