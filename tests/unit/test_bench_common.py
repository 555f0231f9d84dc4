"""The benchmark scripts' pure helpers: percentiles, summaries, ratios, tables, test data."""

from __future__ import annotations

import math
import mmap
import os
import resource
import struct
from pathlib import Path

import pytest
from pydicom import dcmread

from acwi_node.ingest import cpu_latency
from bench import common
from bench.common import (
    CT_STORAGE,
    cpu_wakeup_latency,
    flush_latency_us,
    markdown_table,
    percentile,
    prefault_memory,
    rate,
    ratio,
    summarize,
    write_ct_series,
    write_small_instances,
)
from bench.ingest import flushed_reference


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 21)), 95) == pytest.approx(19.05)
    assert percentile([7.0], 95) == 7.0


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize([1.0, 2.0, 3.0, 10.0])
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(4.0)
    assert s["p50"] == pytest.approx(2.5)
    assert s["min"] == 1.0 and s["max"] == 10.0
    assert s["p95"] == pytest.approx(3.0 + 7.0 * 0.85)


def test_ratio_and_rate() -> None:
    assert ratio(50.0, 100.0) == 0.5
    assert math.isnan(ratio(1.0, 0.0))
    assert rate(400, 2.0) == 200.0


def test_markdown_table() -> None:
    table = markdown_table(["a", "b"], [["x", 1.234], ["y", 2]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1.23 |", "| y | 2 |"]


def test_ct_series_is_one_study_of_16_bit_slices(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, 3, size=64)
    datasets = [dcmread(p) for p in paths]
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {str(datasets[0].StudyInstanceUID)}
    assert len({str(ds.SOPInstanceUID) for ds in datasets}) == 3
    ds = datasets[0]
    assert ds.SOPClassUID == CT_STORAGE and ds.Modality == "CT"
    assert ds.BitsAllocated == 16 and ds.pixel_array.shape == (64, 64)
    hu = ds.pixel_array.astype(float) * ds.RescaleSlope + ds.RescaleIntercept
    assert hu.min() < -500 < 0 < hu.max()  # air and soft tissue


def test_small_instances_are_grouped_in_studies(tmp_path: Path) -> None:
    paths = write_small_instances(tmp_path, 5, per_study=2)
    studies = [str(dcmread(p).StudyInstanceUID) for p in paths]
    assert len(set(studies)) == 3
    assert studies[0] == studies[1] != studies[2]


def test_a_cpu_wakeup_latency_request_is_held_for_the_block_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request is the value as a native int, written to a descriptor kept open for the
    block (the kernel drops the request when it is closed); None leaves the machine alone."""
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    monkeypatch.setattr(cpu_latency, "DEVICE", device)
    with cpu_wakeup_latency(0):
        assert device.read_bytes() == struct.pack("=i", 0)
        assert _holds_open(device)
    assert not _holds_open(device)
    device.write_bytes(b"")
    with cpu_wakeup_latency(None):
        pass
    assert device.read_bytes() == b""


def _holds_open(path: Path) -> bool:
    """Whether this process has a descriptor open on ``path``."""
    target = os.path.realpath(path)
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fds / fd) == target for fd in os.listdir(fds))


def test_a_cpu_wakeup_latency_that_cannot_be_requested_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_latency, "DEVICE", tmp_path / "missing")
    with (
        pytest.raises(SystemExit, match="cannot request a CPU wake-up latency"),
        cpu_wakeup_latency(0),
    ):
        pass


def test_the_flush_probe_measures_and_leaves_nothing_behind(tmp_path: Path) -> None:
    small = flush_latency_us(tmp_path, 1024, records=20)
    large = flush_latency_us(tmp_path, 525_000, records=20)
    assert small > 0 and large > 0
    assert list(tmp_path.iterdir()) == []


def test_storescp_plus_one_flush_is_the_rate_of_both_times_added() -> None:
    results = {
        "6 small, 1 assoc.": {"storescp": 4000.0, "node": 1500.0},
        "6 small, 2 assoc.": {"storescp": 3000.0, "node": 1000.0},
    }
    flushed = flushed_reference(results, {"6 small": 250.0}, ["storescp", "node"])
    assert flushed is not None
    header, rows = flushed
    assert header == [
        "instances, associations",
        "flush us",
        "storescp + flush inst/s",
        "node / storescp + flush",
        "0.5x storescp leaves us",
        "node takes us",
    ]
    # 0.25 ms (storescp) + 0.25 ms (flush) = 0.5 ms an instance: 2,000 per second. 0.5x
    # storescp is 0.5 ms: nothing left beyond them; the node (1,500 per second) takes 0.167 ms.
    assert rows == [["6 small, 1 assoc.", 250, 2000.0, 0.75, 0, 167]]
    fast_disk = flushed_reference(results, {"6 small": 100.0}, ["storescp", "node"])
    assert fast_disk is not None
    assert fast_disk[1][0][-2:] == [150, 317]  # 0.25 - 0.1 left; 0.667 - 0.35 taken
    assert flushed_reference(results, {"6 small": 250.0}, ["node"]) is None


def test_prefaulting_touches_every_page_and_leaves_half_of_what_is_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every page of the memory is faulted in (the host backs it again), none kept; never more
    than half of the memory available, and none where that is unknown."""
    size = 8 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert prefault_memory(size + 123) == size
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before >= size // mmap.PAGESIZE
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 4 << 20)
    assert prefault_memory(size) == 2 << 20
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 0)
    assert prefault_memory(size) == 0


def test_available_memory_is_read_from_the_kernel() -> None:
    assert common.available_memory_bytes() > 16 << 20


def test_dcmtk_tools_get_tcp_nodelay_unless_the_run_asks_for_nagle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bench.common as common

    monkeypatch.setenv("TCP_NODELAY", "1")
    assert common.dcmtk_env()["TCP_NODELAY"] == "1"
    monkeypatch.setattr(common, "SENDERS_NODELAY", False)
    assert "TCP_NODELAY" not in common.dcmtk_env()
