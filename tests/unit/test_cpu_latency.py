"""The CPU wake-up latency request: held from the first association to the end of the last,
made as the kernel's PM QoS interface takes it, and a host that does not permit it reported
once (the node runs without it)."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from acwi_node.ingest.cpu_latency import CpuLatencyRequest


def fake_device(tmp_path: Path) -> Path:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    return device


def test_the_request_is_held_while_any_association_is_open(tmp_path: Path) -> None:
    device = fake_device(tmp_path)
    request = CpuLatencyRequest(20, device)
    request.check()  # made and withdrawn at start-up
    assert device.read_bytes() == struct.pack("=i", 20) and not request.held
    device.write_bytes(b"")
    request.acquire()
    request.acquire()
    assert request.held and device.read_bytes() == struct.pack("=i", 20)
    request.release()
    assert request.held  # one association still open
    request.release()
    assert not request.held
    request.release()  # an extra release changes nothing
    request.acquire()
    assert request.held
    request.close()
    assert not request.held


def test_without_a_setting_nothing_is_requested(tmp_path: Path) -> None:
    device = fake_device(tmp_path)
    request = CpuLatencyRequest(None, device)
    request.check()
    request.acquire()
    assert not request.held and device.read_bytes() == b""


def test_a_host_that_does_not_permit_it_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    request = CpuLatencyRequest(0, tmp_path / "missing")
    with caplog.at_level(logging.WARNING, logger="acwi_node.ingest.cpu_latency"):
        request.check()
        request.acquire()
        request.release()
        request.acquire()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "cannot request a CPU wake-up latency" in warnings[0]
    assert "runs without it" in warnings[0]
    assert not request.held and not request.usable
