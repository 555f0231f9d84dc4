"""Inference speed per engine, cost of uncertainty and heatmaps, worker peak memory.

    python -m bench.inference [--device cpu|cuda] [--engines pytorch,onnxruntime:fp32,...]
                              [--iters 20] [--threads N] [--mc-samples 20] [--json FILE]

For every engine (``name[:precision[:eager]]``, ``eager``: PyTorch on CUDA without CUDA graphs;
default: every engine that can run on the device) it
measures the backbone at batch 1 and 32 on real preprocessed images (synthetic phantom studies
through the node's preprocessing): images/s and p50/p95 latency per batch, each with its ratio to
eager PyTorch FP32 (plain ``DIANet.encode``, NCHW, no autocast) measured in the same run on the
same device. At batch 32 it measures the whole per-batch analysis (backbone + head + OOD +
heatmaps) to give the cost of uncertainty (T Monte-Carlo head samples vs one deterministic head
pass) and of the heatmaps (CAM, and each map read at the source's size as the worker reads
it to write it, vs none). Peak RSS of the process
and, on CUDA, the peak allocated CUDA memory per engine are reported. ``--json FILE`` writes
the same figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from acwi_node.inference.analyser import Analyser, BatchInference, uid_seed
from acwi_node.inference.engines import (
    EngineOptions,
    EngineUnavailable,
    create_engine,
    engine_support,
)
from acwi_node.inference.manifest import ModelManifest, default_model_dir, load_manifest
from acwi_node.inference.preprocess import preprocess
from models.data.synth import write_study
from models.export import load_model
from models.networks.dianet import DIANet

BATCHES = (1, 32)
SOURCE_SIZE = 256  # Rows x Columns of the phantom images (heatmaps are resized to it)


def default_engines(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return [
            "pytorch:fp32:eager",
            "pytorch:fp32",
            "pytorch:fp16:eager",
            "pytorch:fp16",
            "pytorch:bf16",
            "onnxruntime:fp32",
            "tensorrt:fp16",
            "tensorrt:int8",
        ]
    return ["pytorch:fp32", "onnxruntime:fp32"]


def parse_engine_spec(spec: str) -> tuple[str, str, bool]:
    """``name[:precision[:eager]]`` -> (name, precision, CUDA graphs on)."""
    name, _, rest = spec.partition(":")
    precision, _, mode = rest.partition(":")
    if mode not in ("", "eager"):
        raise SystemExit(f"--engines {spec}: the third field can only be 'eager'")
    return name, precision or "fp32", mode != "eager"


def real_inputs(manifest: ModelManifest, count: int) -> np.ndarray:
    """``count`` preprocessed phantom images of every label and site."""
    spec = manifest.preprocess_spec()
    arrays: list[np.ndarray] = []
    labels = ("normal", "nodule", "effusion")
    with tempfile.TemporaryDirectory(prefix="acwi-bench-") as tmp:
        i = 0
        while len(arrays) < count:
            paths = write_study(
                Path(tmp) / str(i), n_images=4, label=labels[i % 3], site=i % 4, seed=i
            )
            arrays.extend(preprocess(pydicom.dcmread(p), spec) for p in paths)
            i += 1
    return np.stack(arrays[:count]).astype(np.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, iters: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each function over ``iters`` rounds after ``warmup`` rounds; the
    functions are called in turn, so load changes on a shared machine affect them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: Sequence[float], batch: int) -> dict[str, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {
        "images_per_s": batch / statistics.fmean(times),
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * p95,
    }


def _with_heatmaps_read(result: BatchInference) -> BatchInference:
    """Each heatmap read at full size, as the worker does when it writes the heatmap object
    (the analyser keeps them at the feature map's resolution until then)."""
    for heatmap in result.heatmaps or []:
        np.asarray(heatmap)
    return result


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def measure(
    analyser: Analyser,
    eager: DIANet,
    batches: dict[int, torch.Tensor],
    seeds: list[int],
    sizes: list[tuple[int, int]],
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Backbone speed per batch size (interleaved with eager PyTorch fp32, the baseline) and
    the per-batch analysis costs for one engine."""
    engine = analyser.engine
    entry: dict[str, Any] = {}
    for b, x in batches.items():

        def backbone(x: torch.Tensor = x) -> object:
            return engine.run(x)

        def eager_pass(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return eager.encode(x)

        times = interleaved({"engine": backbone, "eager": eager_pass}, device, args.iters)
        base = summary(times["eager"], b)
        s = summary(times["engine"], b)
        s["throughput_ratio"] = s["images_per_s"] / base["images_per_s"]
        s["p50_ratio"] = s["p50_ms"] / base["p50_ms"]
        s["p95_ratio"] = s["p95_ms"] / base["p95_ms"]
        entry[f"batch{b}"] = s
        entry[f"eager_batch{b}"] = base
    x = batches[max(BATCHES)]
    runs = interleaved(
        {
            "deterministic": lambda: analyser.infer(x, seeds, None, samples=0),
            "sampled": lambda: analyser.infer(x, seeds, None),
            "heatmaps": lambda: _with_heatmaps_read(analyser.infer(x, seeds, sizes)),
        },
        device,
        args.iters,
    )
    deterministic, sampled, heat = runs["deterministic"], runs["sampled"], runs["heatmaps"]
    entry["analysis_batch32_ms"] = {
        "deterministic": 1000 * statistics.median(deterministic),
        f"mc{args.mc_samples}": 1000 * statistics.median(sampled),
        f"mc{args.mc_samples}+heatmaps": 1000 * statistics.median(heat),
    }
    entry["uncertainty_cost"] = statistics.median(sampled) / statistics.median(deterministic)
    entry["heatmap_cost"] = statistics.median(heat) / statistics.median(sampled)
    if device.type == "cuda":
        entry["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    entry["peak_rss_mb"] = peak_rss_mb()
    return entry


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = load_manifest(default_model_dir())
    model = load_model(manifest).to(device)
    inputs = torch.from_numpy(real_inputs(manifest, max(BATCHES)))
    batches = {b: inputs[:b].to(device) for b in BATCHES}
    seeds = [uid_seed("bench", str(i)) for i in range(max(BATCHES))]
    sizes = [(SOURCE_SIZE, SOURCE_SIZE)] * max(BATCHES)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="eng-"))

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "mc_samples": args.mc_samples,
        "model": f"{manifest.name} {manifest.version} ({manifest.input.size} px input)",
        "baseline": "eager PyTorch fp32 (DIANet.encode, NCHW, no autocast)",
        "engines": [],
        "skipped": {},
    }

    eager = copy.deepcopy(model).eval()

    for spec in args.engines:
        name, precision, graphs = parse_engine_spec(spec)
        reason = engine_support(name, device, precision)
        if reason is not None:
            report["skipped"][spec] = reason
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        options = EngineOptions(
            engine=name,
            precision=precision,
            cache_dir=cache_dir,
            num_threads=args.threads,
            cuda_graphs=graphs,
        )
        started = time.perf_counter()
        try:
            engine = create_engine(copy.deepcopy(model), manifest, device, options)
        except EngineUnavailable as exc:
            report["skipped"][spec] = str(exc)
            continue
        load_s = time.perf_counter() - started
        analyser = Analyser(
            copy.deepcopy(model),
            manifest,
            device=str(device),
            mc_samples=args.mc_samples,
            batch_size=max(BATCHES),
            engine=engine,
        )
        entry: dict[str, Any] = {"engine": spec, "describe": engine.describe(), "load_s": load_s}
        entry.update(measure(analyser, eager, batches, seeds, sizes, device, args))
        report["engines"].append(entry)
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"device {report['device']} ({report['cpu']}), {report['threads']} threads, "
        f"{report['iters']} iterations; {report['model']}"
    )
    print(f"baseline (ratios x): {report['baseline']}, measured interleaved with each engine")
    for e in report["engines"]:
        print(f"{e['engine']}: {e['describe']} (ready in {e['load_s']:.1f} s)")
        for b in BATCHES:
            s, base = e[f"batch{b}"], e[f"eager_batch{b}"]
            print(
                f"  batch {b:>2} eager fp32: {base['images_per_s']:8.1f} img/s  "
                f"p50 {base['p50_ms']:8.2f} ms          p95 {base['p95_ms']:8.2f} ms"
            )
            print(
                f"  batch {b:>2} {e['engine']}: {s['images_per_s']:8.1f} img/s "
                f"(x{s['throughput_ratio']:.2f})  "
                f"p50 {s['p50_ms']:8.2f} ms (x{s['p50_ratio']:.2f})  "
                f"p95 {s['p95_ms']:8.2f} ms (x{s['p95_ratio']:.2f})"
            )
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in e["analysis_batch32_ms"].items())
        print(f"  analysis of a batch of 32: {times}")
        print(
            f"  uncertainty cost x{e['uncertainty_cost']:.3f} (goal <= 1.2), "
            f"heatmap cost x{e['heatmap_cost']:.3f} (goal <= 1.1)"
        )
        memory = f"  peak RSS so far {e['peak_rss_mb']:.0f} MiB"
        if "cuda_max_allocated_mb" in e:
            memory += f", CUDA max allocated {e['cuda_max_allocated_mb']:.0f} MiB"
        print(memory)
    for spec, reason in report["skipped"].items():
        print(f"{spec}: skipped: {reason}")
    print(f"peak RSS {report['peak_rss_mb']:.0f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--engines",
        type=lambda text: [e.strip() for e in text.split(",") if e.strip()],
        help="comma-separated name[:precision[:eager]] (default: all for the device)",
    )
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads")
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, help="engine cache (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be at least 1")
    args.engines = args.engines or default_engines(torch.device(args.device))
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
