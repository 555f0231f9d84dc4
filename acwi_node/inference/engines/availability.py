"""What can run the backbone on this machine: every engine and precision, with the reasons.

Behind ``acwi-node models engines``: IT staff run it on a new GPU server or Jetson before the
worker, to see what ``engine = "auto"`` will pick and why the others cannot run (a package not
installed, no CUDA device, a precision an engine lacks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from acwi_node.inference.engines import (
    ENGINE_NAMES,
    PRECISIONS,
    EngineUnavailable,
    choose_engine,
    engine_support,
)


@dataclass(frozen=True)
class Availability:
    """Engines x precisions on one device, and what a worker's settings would run."""

    device: str
    #: e.g. ``NVIDIA H200, compute capability 9.0`` or ``cpu, 16 cores``.
    hardware: str
    software: str
    #: engine -> precision -> ``None`` (runs) or the reason it cannot.
    table: dict[str, dict[str, str | None]]
    requested: str
    precision: str
    #: The engine the settings run (``None``: none can, see ``problem``).
    chosen: str | None
    problem: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "hardware": self.hardware,
            "software": self.software,
            "engines": self.table,
            "requested": {"engine": self.requested, "precision": self.precision},
            "chosen": self.chosen,
            "problem": self.problem,
        }


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device visible"
        index = device.index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"
    return f"cpu, {os.cpu_count()} cores"


def _software() -> str:
    parts = [f"PyTorch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if cudnn:
            parts.append(f"cuDNN {cudnn}")
    try:
        import onnxruntime

        parts.append(f"ONNX Runtime {onnxruntime.__version__}")
    except ImportError:
        pass
    try:
        import tensorrt

        parts.append(f"TensorRT {tensorrt.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def availability(device: str, engine: str = "auto", precision: str = "fp32") -> Availability:
    """Every engine and precision on ``device``, and what ``engine``/``precision`` would run."""
    dev = torch.device(device)
    table = {
        name: {p: engine_support(name, dev, p) for p in PRECISIONS}
        for name in ENGINE_NAMES
        if name != "auto"
    }
    try:
        chosen: str | None = choose_engine(engine, dev, precision)
        problem = None
    except EngineUnavailable as exc:
        chosen, problem = None, str(exc)
    return Availability(
        device=str(dev),
        hardware=_hardware(dev),
        software=_software(),
        table=table,
        requested=engine,
        precision=precision,
        chosen=chosen,
        problem=problem,
    )


def render(report: Availability, cuda_graphs: bool) -> str:
    """The report as the CLI prints it."""
    lines = [f"device {report.device}: {report.hardware}", f"software: {report.software}"]
    lines.append(f"{'ENGINE':<12} " + " ".join(f"{p:<5}" for p in PRECISIONS))
    for name, row in report.table.items():
        lines.append(
            f"{name:<12} " + " ".join(f"{'yes' if r is None else '-':<5}" for r in row.values())
        )
    reasons = [
        f"  {name}: {reason}"
        for name, row in report.table.items()
        for reason in dict.fromkeys(r for r in row.values() if r is not None)
    ]
    if reasons:
        lines.append("why not:")
        lines.extend(reasons)
    settings = f"engine {report.requested}, precision {report.precision}"
    if report.chosen is None:
        lines.append(f"worker settings ({settings}): cannot run: {report.problem}")
    else:
        extra = ""
        if report.chosen == "pytorch" and report.device.startswith("cuda"):
            extra = " with CUDA graphs" if cuda_graphs else " without CUDA graphs"
        lines.append(f"worker settings ({settings}): {report.chosen}{extra}")
    return "\n".join(line.rstrip() for line in lines)
