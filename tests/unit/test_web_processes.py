"""``acwi-node web``'s process count: ``node.http_workers = 0`` is one per core, capped as the
storage SCP's listeners are (each web process holds a ledger connection pool of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from acwi_node import cli
from acwi_node.config import MAX_AUTO_PROCESSES, load_settings
from acwi_node.ingest.listeners import listener_count


def test_one_web_process_per_core_at_most_eight(tmp_path: Path) -> None:
    auto = load_settings(None, node={"data_dir": tmp_path, "http_workers": 0})
    assert cli.web_processes(auto, cores=1) == 1
    assert cli.web_processes(auto, cores=4) == 4
    assert cli.web_processes(auto, cores=64) == MAX_AUTO_PROCESSES == 8
    set_16 = load_settings(None, node={"data_dir": tmp_path, "http_workers": 16})
    assert cli.web_processes(set_16, cores=64) == 16  # a number set is taken as it is
    assert cli.web_processes(load_settings(None, node={"data_dir": tmp_path}), cores=64) == 1
    # the same rule as the storage SCP's listener processes
    scp_auto = load_settings(None, node={"data_dir": tmp_path}, ingest={"processes": 0})
    for cores in (1, 3, 8, 9, 64):
        assert cli.web_processes(auto, cores=cores) == listener_count(scp_auto, cores=cores)


def test_web_on_a_64_core_host_starts_eight_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``run_web`` hands uvicorn on a host of 64 cores (64 web processes before, each
    with up to 10 PostgreSQL connections)."""
    import uvicorn

    from acwi_node.observability import multiproc

    started: dict[str, Any] = {}
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(cli, "_stop_on_signals", lambda stop: None)
    monkeypatch.setattr(multiproc, "enable_multiprocess", lambda settings, kind: None)
    monkeypatch.setattr(multiproc, "disable_multiprocess", lambda folder: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(options))
    monkeypatch.setenv("ACWI_NODE__DATA_DIR", str(tmp_path))  # restored afterwards
    settings = load_settings(None, node={"data_dir": tmp_path, "http_workers": 0})
    assert cli.run_web(settings) == 0
    assert started["workers"] == 8


@pytest.mark.parametrize("workers", [1, 2])
def test_web_hands_uvicorn_the_trusted_proxies_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Both paths of ``run_web`` name the trusted proxies (uvicorn read FORWARDED_ALLOW_IPS
    else); an IPv4 entry also as the IPv4-mapped address a dual-stack port's peer has."""
    import uvicorn

    from acwi_node.observability import multiproc
    from acwi_node.web import api

    given: dict[str, Any] = {}

    class Server:
        started = True

        def __init__(self, config: Any) -> None:
            pass

        def run(self, sockets: Any) -> None:
            for sock in sockets:
                sock.close()

    monkeypatch.setattr(cli, "_stop_on_signals", lambda stop: None)
    monkeypatch.setattr(multiproc, "enable_multiprocess", lambda settings, kind: None)
    monkeypatch.setattr(multiproc, "disable_multiprocess", lambda folder: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: given.update(options))
    monkeypatch.setattr(uvicorn, "Config", lambda app, **options: given.update(options))
    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(api, "create_app", lambda settings: None)
    monkeypatch.setenv("ACWI_NODE__DATA_DIR", str(tmp_path))  # restored afterwards
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    node = {"data_dir": tmp_path, "http_workers": workers, "http_port": 0}
    proxies = ["10.2.0.0/16", "192.0.2.7", "fd00::7"]
    assert cli.run_web(load_settings(None, node={**node, "http_trusted_proxies": proxies})) == 0
    assert given["proxy_headers"] is True
    assert given["forwarded_allow_ips"] == [
        "10.2.0.0/16",
        "::ffff:a02:0/112",
        "192.0.2.7",
        "::ffff:c000:207",
        "fd00::7",
    ]
    given.clear()
    assert cli.run_web(load_settings(None, node={**node, "http_trusted_proxies": []})) == 0
    assert given["proxy_headers"] is False
    assert given["forwarded_allow_ips"] == []
    assert given["root_path"] == ""
    given.clear()
    # behind a proxy publishing it under a path: uvicorn puts it before every request's path
    assert cli.run_web(load_settings(None, node={**node, "http_root_path": "/acwi"})) == 0
    assert given["root_path"] == "/acwi"
