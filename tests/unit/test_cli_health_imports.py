"""``acwi-node health`` loads only what it needs: the containers' healthcheck runs it every
30 s, and with the ledger's models, pynetdicom, pydicom and NumPy loaded at start-up it took
about a second of CPU each time (acwi_node/observability/probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import acwi_node
from tests.support.ports import free_port
from tests.support.ready_endpoint import ready_endpoint

#: Modules no ``health`` run may load (nor any of their submodules).
HEAVY = (
    "torch",
    "pydicom",
    "pynetdicom",
    "sqlalchemy",
    "fastapi",
    "starlette",
    "uvicorn",
    "numpy",
    "celery",
    "acwi_node.ledger",
)

_RUN = """
import json, sys
from acwi_node.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


@pytest.fixture
def ready_port() -> Iterator[int]:
    with ready_endpoint() as port:
        yield port


def _health(tmp_path: Path, toml: str, *args: str) -> tuple[int, list[str]]:
    """Run ``acwi-node health ARGS`` in a fresh interpreter; its exit code and the modules it
    had loaded by the end."""
    config = tmp_path / "acwi-node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{toml}')
    result = tmp_path / "modules.json"
    root = str(Path(acwi_node.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACWI_")}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, "-c", _RUN, str(result), "--config", str(config), "health", *args],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    answer = json.loads(result.read_text())
    return answer["code"], answer["modules"]


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_a_ready_process_probed_without_heavy_imports(tmp_path: Path, ready_port: int) -> None:
    code, modules = _health(
        tmp_path,
        f'[observability]\nops_host = "127.0.0.1"\nworker_port = {ready_port}\n',
        "--kind",
        "worker",
    )
    assert code == 0
    assert "acwi_node.observability.probe" in modules
    assert _heavy(modules) == []


def test_a_process_that_does_not_answer_probed_without_heavy_imports(tmp_path: Path) -> None:
    code, modules = _health(tmp_path, f"http_port = {free_port()}\n", "--kind", "web")
    assert code == 1
    assert "acwi_node.observability.probe" in modules
    assert _heavy(modules) == []
