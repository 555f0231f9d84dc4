"""``acwi-node health`` (:mod:`acwi_node.observability.probe`) against a real HTTP endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from acwi_node.config import Settings, load_settings
from acwi_node.observability.probe import probe
from tests.support.ports import free_port
from tests.support.ready_endpoint import ready_endpoint


@pytest.fixture
def worker_endpoint(tmp_path: Path) -> Iterator[Settings]:
    with ready_endpoint() as port:
        yield load_settings(
            None,
            node={"data_dir": tmp_path / "data"},
            observability={"ops_host": "0.0.0.0", "worker_port": port},
        )


def test_the_probe_reaches_the_node_with_a_proxy_set(
    worker_endpoint: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host (or container) with ``HTTP_PROXY``/``http_proxy`` set and no ``no_proxy`` for
    the loopback address: the probe asks the node itself (the proxy, here nothing listening,
    was asked instead and every health check failed)."""
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert probe(worker_endpoint, "worker", timeout_s=5) == 0
    assert '200 {"status":"ready"}' in capsys.readouterr().out
