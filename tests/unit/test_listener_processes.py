"""Listener processes: how many, and ready only once each says it accepts connections."""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from acwi_node.ingest.listeners import ListenerProcesses, bind_listener
from acwi_node.ingest.scp import RECENT_ACCEPT_S, SHARED_ACCEPT_DELAY_S, _AssociationServer

SAYS_READY = (
    "import os, time; time.sleep(0.3); from acwi_node.ingest.listeners import announce_ready;"
    " announce_ready(); time.sleep(30)"
)
NEVER_READY = "import sys; sys.exit(3)"


@pytest.fixture
def listeners(request: pytest.FixtureRequest) -> Iterator[ListenerProcesses]:
    procs = ListenerProcesses(bind_listener("127.0.0.1", 0), 2, {})
    procs.command = (sys.executable, "-c", request.param)
    procs.start()
    yield procs
    procs.stop(timeout_s=5)


@pytest.mark.parametrize("listeners", [SAYS_READY], indirect=True)
def test_ready_once_every_listener_said_so(listeners: ListenerProcesses) -> None:
    assert not listeners.listening  # running, still starting
    started = time.monotonic()
    assert listeners.wait_ready(timeout_s=20)
    assert time.monotonic() - started >= 0.1
    assert listeners.listening


@pytest.mark.parametrize("listeners", [NEVER_READY], indirect=True)
def test_a_listener_that_exits_is_not_waited_for(listeners: ListenerProcesses) -> None:
    started = time.monotonic()
    assert not listeners.wait_ready(timeout_s=20)
    assert time.monotonic() - started < 10
    assert not listeners.listening


def test_processes_zero_means_one_per_core_up_to_a_cap() -> None:
    from acwi_node.config import load_settings
    from acwi_node.ingest.listeners import MAX_AUTO_LISTENERS, listener_count

    auto = load_settings(None, ingest={"processes": 0})
    assert listener_count(auto, cores=2) == 2
    assert listener_count(auto, cores=1) == 1
    assert listener_count(auto, cores=64) == MAX_AUTO_LISTENERS == 8
    assert listener_count(load_settings(None, ingest={"processes": 3}), cores=64) == 3
    assert listener_count(load_settings(None), cores=64) == 1  # the embedded default


def accept_delay(active: int, accepted_ago: list[float]) -> float:
    """A listener's wait before it accepts, with ``active`` associations and connections
    accepted ``accepted_ago`` seconds ago."""
    now = 1000.0
    server = SimpleNamespace(
        active_associations=[object()] * active,
        _recent_accepts=collections.deque(now - ago for ago in sorted(accepted_ago, reverse=True)),
    )
    return _AssociationServer.accept_delay(cast(Any, server), now)


def test_the_least_busy_listener_accepts_first() -> None:
    """A listener serving associations, or that accepted a connection a moment ago (its
    association not yet under way), waits before it accepts, so that an idler one takes the
    connection; an idle one accepts at once."""
    assert accept_delay(0, []) == 0
    assert accept_delay(2, []) == 2 * SHARED_ACCEPT_DELAY_S
    assert accept_delay(0, [0.001]) == SHARED_ACCEPT_DELAY_S
    assert accept_delay(1, [0.001, 0.002]) == 3 * SHARED_ACCEPT_DELAY_S
    assert accept_delay(50, []) == 10 * SHARED_ACCEPT_DELAY_S  # bounded


def test_a_connection_accepted_earlier_no_longer_counts() -> None:
    """A modality sending one image per association: the connection this listener accepted
    for the previous image (its association over) does not make it wait for the next; it
    did, at every listener, for 50 ms after each accept (one association per image ran at
    0.80x Orthanc against 0.93x with one listener)."""
    assert accept_delay(0, [RECENT_ACCEPT_S * 1.5]) == 0
    assert accept_delay(0, [0.025]) == 0
