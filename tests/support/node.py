"""Run ACWI Node as real processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from acwi_node.ledger import Ledger


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a dict as the node's TOML file (tables and arrays of tables)."""
    lines: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        else:
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def wait_port(host: str, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


class NodeProcesses:
    """Start ``acwi-node <kind>`` processes with one config; stop them and keep their logs."""

    def __init__(
        self, config: Path, kinds: Sequence[str], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.kinds = list(kinds)
        self.workdir = workdir
        self.env = {
            **os.environ,
            **(env or {}),
            "ACWI_CONFIG": str(config),
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, kind: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{kind}.log"
        self.logs[kind] = log
        handle = log.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "acwi_node.cli", kind],
            env=self.env,
            cwd=self.workdir,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        self.procs[kind] = proc
        return proc

    def __enter__(self) -> NodeProcesses:
        for kind in self.kinds:
            self.start(kind)
        return self

    def stop(self, kind: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(kind)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for kind in list(self.procs):
            self.stop(kind)

    def log_text(self) -> str:
        out = []
        for kind, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"----- {kind} -----\n{text[-6000:]}")
        return "\n".join(out)

    def assert_alive(self) -> None:
        dead = {k: p.returncode for k, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"node processes exited: {dead}\n{self.log_text()}")


def wait_study_state(
    ledger: Ledger,
    study_uid: str,
    states: set[str],
    nodes: NodeProcesses,
    timeout_s: float = 120.0,
    *,
    generation: int | None = None,
) -> dict[str, Any]:
    """The study's view once it is in one of ``states`` (and, if given, ``generation``)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        nodes.assert_alive()
        last = ledger.get_study(study_uid)
        if (
            last is not None
            and last["state"] in states
            and generation in (None, last["generation"])
        ):
            return last
        time.sleep(0.25)
    raise AssertionError(f"study never reached {states}; last view: {last}\n{nodes.log_text()}")


def http_json(url: str, auth: tuple[str, str] | None = None) -> Any:
    response = httpx.get(url, timeout=10, auth=auth)
    response.raise_for_status()
    return response.json()


#: The account end-to-end tests use for the JSON API (HTTP Basic).
API_USER = ("e2e-api", "e2e-api-password")


def add_api_user(
    config: Path, user: tuple[str, str] = API_USER, role: str = "admin"
) -> tuple[str, str]:
    """Create ``user`` (:data:`API_USER`, an administrator, by default) with ``acwi-node users
    add``; returns the Basic credentials."""
    done = subprocess.run(
        [sys.executable, "-m", "acwi_node.cli", "--config", str(config), "users", "add"]
        + [user[0], "--role", role, "--password-stdin"],
        input=user[1] + "\n",
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return user
