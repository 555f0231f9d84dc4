"""The association's connection is closed by no thread while another writes it through its
descriptor: the number, once free, goes to the next file the process opens."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.pdu import A_RELEASE_RP
from pynetdicom.pdu_primitives import A_RELEASE

from acwi_node.ingest.reactor import BulkReadSocket, EventDrivenAssociation, EventDrivenDUL

SQLITE_HEADER = b"SQLite format 3\0"


class WatchedLock:
    """``fsm_lock``, telling when a second thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> WatchedLock:
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()


@pytest.fixture
def releasing(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EventDrivenDUL, socket.socket]]:
    """An acceptor's DUL whose peer asked for a release (Sta8), on a connected socket; the
    association thread is about to answer it (:meth:`EventDrivenDUL._answer_at_once`)."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    ours, theirs = socket.socketpair()
    assoc = EventDrivenAssociation(AE(), "acceptor")
    assoc.set_socket(BulkReadSocket(assoc, client_socket=ours))
    dul = assoc.dul
    assert isinstance(dul, EventDrivenDUL)
    dul.fsm_lock = WatchedLock()  # type: ignore[assignment]
    dul.state_machine.current_state = "Sta8"
    yield dul, theirs
    ours.close()
    theirs.close()
    for fd in (dul._wake_r, dul._wake_w):
        os.close(fd)


def release_response() -> A_RELEASE:
    primitive = A_RELEASE()
    primitive.result = "affirmative"
    return primitive


#: The reactor turns started by :func:`meanwhile_on_the_reactor`, joined by the tests.
REACTOR_TURNS: list[threading.Thread] = []


def meanwhile_on_the_reactor(dul: EventDrivenDUL, then: Callable[[], None]) -> None:
    """Let the reactor thread take its turn now (it looks at the connection in Sta13 and,
    nothing having come, closes it) until it is done or waits for ``fsm_lock``; then
    ``then``."""
    lock = dul.fsm_lock
    assert isinstance(lock, WatchedLock)

    def turn() -> None:
        dul._is_transport_event()
        lock.contended.set()  # done

    REACTOR_TURNS.append(threading.Thread(target=turn))
    REACTOR_TURNS[-1].start()
    lock.contended.wait()
    then()


def join_reactor_turns() -> None:
    while REACTOR_TURNS:
        REACTOR_TURNS.pop().join()


def test_the_release_response_is_sent_before_the_reactor_closes_the_connection(
    releasing: Any,
) -> None:
    """The association thread moved to Sta13 before its A-RELEASE-RP left; the reactor,
    seeing Sta13 and nothing to read, closed the connection in between: the peer never got
    the response (and its release failed)."""
    dul, peer = releasing
    transition = dul.state_machine.transition

    def transition_then_reactor(state: str) -> None:
        transition(state)
        if state == "Sta13":
            meanwhile_on_the_reactor(dul, lambda: None)

    dul.state_machine.transition = transition_then_reactor  # type: ignore[method-assign,unused-ignore]
    assert dul._answer_at_once(release_response())
    join_reactor_turns()
    assert peer.recv(64) == A_RELEASE_RP(release_response()).encode()


def test_the_release_response_goes_to_the_connection_not_to_a_file(
    releasing: Any, tmp_path: Path
) -> None:
    """The reactor closing the connection just after the association thread took its
    descriptor number for the A-RELEASE-RP: the next file opened got the number, and the
    response's ten bytes were written at offset 0 of that file (an SQLite database's header)."""
    dul, peer = releasing
    sock = dul.socket
    assert isinstance(sock, BulkReadSocket)
    raw_fd = sock._raw_fd
    path = tmp_path / "ledger.sqlite"
    opened: list[int] = []

    def open_file() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(fd, SQLITE_HEADER, 0)
        opened.append(fd)

    def taken_then_reactor() -> int:
        fd = raw_fd()
        if dul.state_machine.current_state == "Sta13":
            meanwhile_on_the_reactor(dul, open_file)
        return fd

    sock._raw_fd = taken_then_reactor  # type: ignore[method-assign]
    try:
        assert dul._answer_at_once(release_response())
        join_reactor_turns()
        assert path.read_bytes() == SQLITE_HEADER
        assert peer.recv(64) == A_RELEASE_RP(release_response()).encode()
    finally:
        for fd in opened:
            os.close(fd)


def test_killed_from_another_thread_the_association_returns_after_its_reactor_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AE.shutdown() (the SCP stopping) aborts an association from the main thread: kill()
    sets ``_kill``, then waits for the reactor thread, which sends the A-ABORT. The association
    thread left its loop at once, and pynetdicom closed the connection after it, while the
    reactor thread could still be writing to the socket's descriptor number: the A-ABORT went
    to the next file the process opened (the ledger's database, at offset 0)."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    assoc = EventDrivenAssociation(AE(), "acceptor")
    dul = assoc.dul
    assert isinstance(dul, EventDrivenDUL)
    sending, sent = threading.Event(), threading.Event()

    def reactor_sending_the_abort() -> None:
        sending.set()
        sent.wait()

    monkeypatch.setattr(dul, "run", reactor_sending_the_abort)
    dul.start()
    sending.wait()
    assoc._kill = True  # kill() from another thread, still waiting for the reactor thread
    waiting = threading.Event()
    join = dul.join

    def watched_join(timeout: float | None = None) -> None:
        waiting.set()
        join(timeout)

    monkeypatch.setattr(dul, "join", watched_join)
    reactor_alive_when_it_returned: list[bool] = []

    def association_thread() -> None:
        assoc._run_reactor()
        reactor_alive_when_it_returned.append(dul.is_alive())
        waiting.set()

    thread = threading.Thread(target=association_thread)
    thread.start()
    waiting.wait()  # returned, or waiting for the reactor thread
    sent.set()
    thread.join()
    dul.join()
    for fd in (dul._wake_r, dul._wake_w):
        os.close(fd)
    assert reactor_alive_when_it_returned == [False]
