"""A ``send_*`` method waits until the association's reactor is really parked, so the reactor
never takes the response it waits for (acwi_node.reactor_pause). The race is made likely as a
busy machine makes it: the reactor held a moment each time it passes the checkpoint, the
sender a moment late to wait for its response."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from acwi_node.reactor_pause import ReactorCheckpoint, install


def test_the_checkpoint_knows_when_the_reactor_is_parked() -> None:
    checkpoint = ReactorCheckpoint()
    checkpoint.set()
    assert checkpoint.wait() and not checkpoint.parked  # passes without parking
    checkpoint.clear()
    waiter = threading.Thread(target=checkpoint.wait)
    waiter.start()
    deadline = time.monotonic() + 5
    while not checkpoint.parked:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    checkpoint.set()
    waiter.join(5)
    assert not waiter.is_alive() and not checkpoint.parked
    assert checkpoint.wait(timeout=0.01)  # set: at once
    checkpoint.clear()
    assert not checkpoint.wait(timeout=0.01) and not checkpoint.parked  # timed out


def _held_after_passing(wait: Callable[..., bool]) -> Callable[..., bool]:
    """The reactor's checkpoint wait, then 20 ms more when it did not have to wait: the
    moment in which a sender that cleared the checkpoint used to read a stale ``True``."""

    def held(*args: Any, **kwargs: Any) -> bool:
        passed = wait(*args, **kwargs)
        time.sleep(0.02)
        return passed

    return held


def _late_to_wait(get_msg: Callable[..., Any]) -> Callable[..., Any]:
    """The DIMSE provider's ``get_msg``, 20 ms late for a blocking call (the sender waiting for
    its response): a reactor still polling meanwhile would take the response."""

    def late(block: bool = False, *args: Any, **kwargs: Any) -> Any:
        if block:
            time.sleep(0.02)
        return get_msg(block, *args, **kwargs)

    return late


def test_no_response_is_lost_to_the_reactor() -> None:
    install()
    server_ae = AE(ae_title="ECHOSCP")
    server_ae.add_supported_context(Verification)
    server = server_ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        port = server.server_address[1]
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        ae.dimse_timeout = 2
        assoc = ae.associate("127.0.0.1", port, ae_title="ECHOSCP")
        assert assoc.is_established
        checkpoint = assoc._reactor_checkpoint
        assert isinstance(checkpoint, ReactorCheckpoint)
        checkpoint.wait = _held_after_passing(checkpoint.wait)  # type: ignore[method-assign]
        assoc.dimse.get_msg = _late_to_wait(assoc.dimse.get_msg)  # type: ignore[method-assign]
        statuses = []
        for _ in range(25):
            answer = assoc.send_c_echo()
            statuses.append(int(answer.Status) if "Status" in answer else None)
            time.sleep(0.005)  # let the reactor run on and pass the checkpoint again
        assoc.release()
        assert statuses == [0] * 25, statuses
    finally:
        server.shutdown()
