"""``acwi-node serve`` stopping: it gives its processes the time they need before it kills them."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from acwi_node import cli
from acwi_node.config import load_settings


class FakeChild:
    """A child process that exits ``needs_s`` seconds after SIGTERM (no time passes: ``wait``
    with a shorter timeout raises, as Popen's does)."""

    def __init__(self, kind: str, needs_s: float) -> None:
        self.kind = kind
        self.needs_s = needs_s
        self.waited: list[float] = []
        self.terminated = False
        self.killed = False
        self.exited = False

    def poll(self) -> int | None:
        return 0 if self.exited else None

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.killed = True
        self.exited = True

    def wait(self, timeout: float | None = None) -> int:
        self.waited.append(timeout if timeout is not None else float("inf"))
        if not self.exited and timeout is not None and timeout < self.needs_s:
            raise subprocess.TimeoutExpired(self.kind, timeout)
        self.exited = True
        return 0


@pytest.mark.parametrize("timeout_s", [30.0, 60.0])
def test_serve_lets_the_exporter_finish_its_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timeout_s: float
) -> None:
    """A stopped exporter waits up to ``exporter.timeout_s`` for the answers of the C-STOREs
    under way, and records them: ``serve`` must not kill it sooner (it waited 20 s at most,
    so the sends were sent again by another exporter once its claim ran out)."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data"}, exporter={"timeout_s": timeout_s}
    )
    children: dict[str, FakeChild] = {}

    def popen(argv: list[str], **_kwargs: Any) -> FakeChild:
        kind = argv[-1]
        # The exporter exits once the last send is answered, just within exporter.timeout_s.
        children[kind] = FakeChild(kind, timeout_s + 1.0 if kind == "exporter" else 0.0)
        return children[kind]

    def stopped_at_once(stop: threading.Event) -> None:
        stop.set()  # as a SIGTERM right after start-up

    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    monkeypatch.setattr(cli, "_stop_on_signals", stopped_at_once)
    assert cli.run_serve(settings, None) == 0
    assert set(children) == set(cli.PROCESS_KINDS)
    assert all(child.terminated for child in children.values())
    assert not children["exporter"].killed, children["exporter"].waited
    assert cli.serve_stop_wait_s(settings) >= timeout_s + 5.0


def test_serve_waits_at_least_twenty_seconds(tmp_path: Path) -> None:
    settings = load_settings(None, node={"data_dir": tmp_path / "data"}, exporter={"timeout_s": 5})
    assert cli.serve_stop_wait_s(settings) == cli.SERVE_STOP_WAIT_S == 20.0
