"""``acwi-node exporter`` stopping: its loops (outbox, retention, notifications) are all told to
stop, then all waited for within one deadline, ``exporter.timeout_s`` + 5 s, which ``serve``,
the compose file's ``stop_grace_period`` and the unit's ``TimeoutStopSec`` allow (they were
waited for one after another: 30 s, 35 s and 30 s, 95 s at worst)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from acwi_node import cli
from acwi_node.config import Settings, load_settings


class _Clock:
    """A monotonic clock that only a join moves on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _HungThread:
    """A thread that never ends: a join waits its whole timeout (on the fake clock)."""

    def __init__(self, events: list[str], clock: _Clock, target: Callable[[], None], name: str):
        self.events, self.clock, self.name = events, clock, name
        self.timeouts: list[float] = []

    def start(self) -> None:
        self.events.append(f"start {self.name}")

    def join(self, timeout: float | None = None) -> None:
        assert timeout is not None, f"{self.name}: joined without a timeout"
        self.events.append(f"join {self.name}")
        self.timeouts.append(timeout)
        self.clock.now += timeout

    def is_alive(self) -> bool:
        return True


class _Loop:
    """Stands for the Exporter, Retention and Notifier: a run method and a stop."""

    def __init__(self, name: str, events: list[str], settings: Settings) -> None:
        self.name, self.events, self.settings = name, events, settings

    def run(self) -> None:
        raise AssertionError("runs in a (fake) thread only")

    def stop(self) -> None:
        self.events.append(f"stop {self.name}")

    def stop_wait_s(self) -> float:
        return self.settings.exporter.timeout_s + 5.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path},
        notify=[{"name": "ops", "url": "https://hooks.example/x"}],
    )


def test_the_exporter_stops_its_loops_within_one_deadline(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from acwi_node import ledger, notify, retention
    from acwi_node.export import outbox
    from acwi_node.observability import health

    events: list[str] = []
    clock = _Clock()
    threads: list[_HungThread] = []

    def thread(target: Callable[[], None], name: str, daemon: bool) -> _HungThread:
        threads.append(_HungThread(events, clock, target, name))
        return threads[-1]

    monkeypatch.setattr(cli, "threading", SimpleNamespace(Event=threading.Event, Thread=thread))
    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(cli, "_stop_on_signals", lambda stop: stop.set())  # stopped at once
    monkeypatch.setattr(ledger, "Ledger", lambda url: object())

    def loop(name: str) -> Callable[..., _Loop]:
        return lambda settings, *args: _Loop(name, events, settings)

    monkeypatch.setattr(outbox, "Exporter", loop("exporter"))
    monkeypatch.setattr(retention, "Retention", loop("retention"))
    monkeypatch.setattr(notify, "Notifier", loop("notify"))
    monkeypatch.setattr(health, "exporter_readiness", lambda *args: None)
    monkeypatch.setattr(health, "start_ops_server_safely", lambda *args: None)

    assert cli.run_exporter(settings) == 0

    assert sorted(t.name for t in threads) == ["exporter", "notify", "retention"]
    first_join = min(i for i, event in enumerate(events) if event.startswith("join"))
    stops = [i for i, event in enumerate(events) if event.startswith("stop")]
    assert len(stops) == 3 and max(stops) < first_join  # every loop told before any wait
    assert all(len(t.timeouts) == 1 for t in threads)
    waited = sum(t for one in threads for t in one.timeouts)
    assert waited == settings.exporter.timeout_s + 5.0 == 35.0  # 95 s one after another


def test_stop_and_join_gives_every_thread_the_same_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    clock = _Clock()
    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=clock.monotonic))
    hung = [_HungThread(events, clock, lambda: None, name) for name in ("a", "b", "c")]

    def stopper(name: str) -> Callable[[], None]:
        return lambda: events.append(f"stop {name}")

    stops = [stopper(name) for name in ("a", "b", "c")]
    threads: Any = hung
    running = cli.stop_and_join(stops, threads, 12.0)
    assert events == ["stop a", "stop b", "stop c", "join a", "join b", "join c"]
    assert [t.timeouts for t in hung] == [[12.0], [0.0], [0.0]]
    assert running == hung
