"""The benchmark scripts' pure helpers: percentiles, summaries, ratios, tables, test data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydicom import dcmread

from bench.common import (
    CT_STORAGE,
    markdown_table,
    percentile,
    rate,
    ratio,
    summarize,
    write_ct_series,
    write_small_instances,
)


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
