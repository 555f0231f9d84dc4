"""Listener processes: how many, and ready only once each says it accepts connections."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from acwi_node.ingest.listeners import ListenerProcesses, bind_listener

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
