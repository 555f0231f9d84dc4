"""bench.inference and bench.parity run on the CPU and write what they print (no speed asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import inference, parity


def test_engine_specs() -> None:
    assert inference.parse_engine_spec("pytorch") == ("pytorch", "fp32", True)
    assert inference.parse_engine_spec("pytorch:fp16") == ("pytorch", "fp16", True)
    assert inference.parse_engine_spec("pytorch:fp16:eager") == ("pytorch", "fp16", False)
    with pytest.raises(SystemExit, match="third field"):
        inference.parse_engine_spec("pytorch:fp16:fast")


def test_parity_reports_each_engines_largest_differences(tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    engines = "pytorch:fp32,pytorch:bf16,pytorch:fp16,tensorrt:fp16"
    assert parity.main(["--studies", "1", "--engines", engines, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    same = report["engines"]["pytorch:fp32"]
    assert set(same["largest"].values()) == {0.0}  # the reference against itself
    assert same["same_heatmap_peak"] == "4/4" and same["same_decision"] == "1/1"
    bf16 = report["engines"]["pytorch:bf16"]["largest"]
    assert 0.0 < bf16["probability"] < 0.1
    assert "fp16 needs a CUDA device" in report["skipped"]["pytorch:fp16"]
    assert "tensorrt" in report["skipped"]["tensorrt:fp16"]


def test_inference_bench_measures_against_eager_pytorch(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    args = ["--iters", "1", "--engines", "pytorch:fp32", "--json", str(out)]
    assert inference.main(args) == 0
    report = json.loads(out.read_text())
    (entry,) = report["engines"]
    assert entry["describe"] == "pytorch-cpu fp32"
    for batch in inference.BATCHES:
        figures = entry[f"batch{batch}"]
        assert figures["images_per_s"] > 0 and figures["throughput_ratio"] > 0
    assert entry["uncertainty_cost"] > 0 and entry["heatmap_cost"] > 0
    assert set(entry["analysis_batch32_ms"]) == {"deterministic", "mc20", "mc20+heatmaps"}
