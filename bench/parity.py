"""How far each engine's analysis is from PyTorch fp32 on the CPU, on the same phantom studies.

    python -m bench.parity [--device cpu|cuda] [--engines pytorch:fp16,...] [--studies 4]
                           [--json FILE]

Analyses ``--studies`` synthetic phantom studies (4 images each, every label, several sites)
with the reference (PyTorch fp32 on the CPU) and with each engine (``name[:precision[:eager]]``
as in ``bench.inference``; default: every engine that can run on the device), and prints the
largest absolute differences over all images: probabilities, uncertainty score, epistemic and
aleatoric parts, OOD score and heatmap values, how many heatmap peaks fall on the same pixel and
how many study predictions and review decisions agree. The tests hold these under fixed
tolerances (``tests/unit/test_engines.py``); this prints the figures themselves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from acwi_node.inference.analyser import Analyser
from acwi_node.inference.engines import EngineOptions, EngineUnavailable, engine_support
from acwi_node.inference.manifest import default_model_dir
from acwi_node.inference.types import StudyAnalysis
from bench.inference import default_engines, parse_engine_spec
from models.data.synth import write_study

LABELS = ("normal", "nodule", "effusion")


def studies(folder: Path, count: int) -> list[list[pydicom.Dataset]]:
    out: list[list[pydicom.Dataset]] = []
    for i in range(count):
        paths = write_study(
            folder / str(i), n_images=4, label=LABELS[i % 3], site=i % 4, seed=100 + i
        )
        out.append([pydicom.dcmread(p) for p in paths])
    return out


def gaps(reference: list[StudyAnalysis], other: list[StudyAnalysis]) -> dict[str, Any]:
    largest: dict[str, float] = dict.fromkeys(
        ("probability", "score", "epistemic", "aleatoric", "ood", "heatmap"), 0.0
    )
    peaks = images = decisions = 0
    for a, b in zip(reference, other, strict=True):
        decisions += a.predicted_label == b.predicted_label and a.needs_review == b.needs_review
        for x, y in zip(a.images, b.images, strict=True):
            images += 1
            for label, p in x.probabilities.items():
                largest["probability"] = max(
                    largest["probability"], abs(p - y.probabilities[label])
                )
            for name in ("score", "epistemic", "aleatoric"):
                gap = abs(getattr(x.uncertainty, name) - getattr(y.uncertainty, name))
                largest[name] = max(largest[name], gap)
            largest["ood"] = max(largest["ood"], abs(x.ood_score - y.ood_score))
            heat_x, heat_y = x.heatmap_array(), y.heatmap_array()
            largest["heatmap"] = max(largest["heatmap"], float(np.abs(heat_x - heat_y).max()))
            peaks += np.argmax(heat_x) == np.argmax(heat_y)
    return {
        "largest": largest,
        "same_heatmap_peak": f"{peaks}/{images}",
        "same_decision": f"{decisions}/{len(reference)}",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cache_dir = Path(tempfile.mkdtemp(prefix="acwi-parity-"))

    def load(device: str, name: str, precision: str, graphs: bool) -> Analyser:
        options = EngineOptions(
            engine=name, precision=precision, cache_dir=cache_dir, cuda_graphs=graphs
        )
        return Analyser.load(default_model_dir(), device=device, engine=options)

    report: dict[str, Any] = {"reference": "pytorch fp32 on cpu", "engines": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="acwi-parity-") as tmp:
        data = studies(Path(tmp), args.studies)
        reference = [load("cpu", "pytorch", "fp32", False).analyse(s) for s in data]
        for spec in args.engines:
            name, precision, graphs = parse_engine_spec(spec)
            reason = engine_support(name, device, precision)
            if reason is None:
                try:
                    analyser = load(str(device), name, precision, graphs)
                except EngineUnavailable as exc:
                    reason = str(exc)
            if reason is not None:
                report["skipped"][spec] = reason
                continue
            entry = gaps(reference, [analyser.analyse(s) for s in data])
            entry["describe"] = analyser.engine.describe()
            report["engines"][spec] = entry
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--engines", type=lambda text: [e.strip() for e in text.split(",") if e.strip()]
    )
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.engines is None:
        args.engines = default_engines(torch.device(args.device))
        if args.device == "cpu":
            args.engines.append("pytorch:bf16")
    report = run(args)
    print(f"largest differences from {report['reference']} over {args.studies} studies of 4 images")
    for spec, e in report["engines"].items():
        numbers = "  ".join(f"{k} {v:.1e}" for k, v in e["largest"].items())
        print(f"{spec} ({e['describe']}): {numbers}")
        print(f"  same heatmap peak {e['same_heatmap_peak']}, same decision {e['same_decision']}")
    for spec, reason in report["skipped"].items():
        print(f"{spec}: skipped: {reason}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
