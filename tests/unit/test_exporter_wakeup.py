"""Workers wake the exporter when results are due (export/wakeup.py); without a listener, or
where a socket cannot be made, everything falls back to the exporter's polling."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from acwi_node.config import Settings, load_settings
from acwi_node.export.outbox import Exporter
from acwi_node.export.wakeup import WakeUpListener, wake_exporter, wake_path
from acwi_node.ledger import Ledger


def test_a_wake_up_ends_the_wait(tmp_path: Path) -> None:
    listener = WakeUpListener(tmp_path)
    try:
        assert listener.listening
        assert listener.wait(0.01) is False  # nothing came
        assert wake_exporter(tmp_path)
        assert wake_exporter(tmp_path)  # two before the exporter looks: one pass
        assert listener.wait(30) is True
        assert listener.wait(0.01) is False  # both were taken
    finally:
        listener.close()
    assert not wake_path(tmp_path).exists()
    assert wake_exporter(tmp_path) is False  # nobody listens: nothing, no error


def test_a_path_too_long_for_a_socket_leaves_polling(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    listener = WakeUpListener(deep)
    assert not listener.listening
    assert listener.wait(0.01) is False
    assert wake_exporter(deep) is False
    listener.close()


def test_closing_leaves_a_successors_socket(tmp_path: Path) -> None:
    first = WakeUpListener(tmp_path)
    second = WakeUpListener(tmp_path)  # a new exporter took the path over
    first.close()
    assert wake_path(tmp_path).exists()
    assert wake_exporter(tmp_path)
    assert second.wait(30) is True
    second.close()
    assert not wake_path(tmp_path).exists()


@pytest.fixture
def slow_polling(tmp_path: Path) -> Settings:
    """An exporter that, left to its polling, would look again only after a minute."""
    return load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        exporter={"poll_interval_s": 60.0},
    )


def test_the_exporter_looks_at_once_when_woken_and_stops_at_once(
    slow_polling: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(slow_polling.database_url)
    exporter = Exporter(slow_polling, ledger)
    passes: list[threading.Event] = [threading.Event() for _ in range(3)]
    count = [0]

    def tick() -> int:
        if count[0] < len(passes):
            passes[count[0]].set()
        count[0] += 1
        return 0

    monkeypatch.setattr(exporter, "tick", tick)
    thread = threading.Thread(target=exporter.run)
    thread.start()
    try:
        assert passes[0].wait(30)
        assert wake_exporter(slow_polling.data_dir)
        assert passes[1].wait(30), "not woken: the exporter waited for its 60 s poll"
    finally:
        exporter.stop()
        thread.join(timeout=30)
        ledger.dispose()
    assert not thread.is_alive(), "stop() did not end the wait"
    assert not wake_path(slow_polling.data_dir).exists()
