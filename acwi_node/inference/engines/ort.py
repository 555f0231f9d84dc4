"""The ONNX Runtime engine: the exported backbone on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from acwi_node.inference.engines.base import (
    INPUT_NAME,
    OUTPUT_NAMES,
    BackboneOutput,
    Engine,
    EngineUnavailable,
)


def ort_providers() -> list[str]:
    """Execution providers of the installed ONNX Runtime (empty when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def ort_supports(precision: str, device: torch.device) -> str | None:
    """``None`` when ONNX Runtime can run the precision on the device, else the reason."""
    providers = ort_providers()
    if not providers:
        return "engine 'onnxruntime' needs the onnxruntime package (pip install 'acwi-node[onnx]')"
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in providers]
    if device.type == "cuda" and not gpu:
        return "engine 'onnxruntime' on cuda needs onnxruntime-gpu (CUDA execution provider)"
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cuda" and "TensorrtExecutionProvider" in gpu:
        return None
    return (
        f"engine 'onnxruntime' runs precision {precision!r} only through its TensorRT provider "
        "(fp16 on cuda); use fp32, or engine 'tensorrt'"
    )


class OnnxRuntimeEngine(Engine):
    """Runs an exported backbone (see :mod:`acwi_node.inference.engines.onnx_export`).

    On CPU: ``CPUExecutionProvider`` with ``num_threads`` intra-op threads. On cuda: the
    TensorRT provider when installed (its engines cached under ``cache_dir``; fp16 when asked),
    then the CUDA provider, with the CPU provider as the fallback for unsupported nodes.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        *,
        num_threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        reason = ort_supports(precision, self.device)
        if reason is not None:
            raise EngineUnavailable(reason)
        import onnxruntime

        self.precision = precision
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX Runtime threads would spin and take the CPU from the torch head and CAM
        # operations that follow every backbone pass.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        providers: list[Any] = []
        available = ort_providers()
        if self.device.type == "cuda":
            index = self.device.index or 0
            if "TensorrtExecutionProvider" in available:
                trt_options: dict[str, Any] = {
                    "device_id": index,
                    "trt_fp16_enable": precision == "fp16",
                }
                if cache_dir is not None:
                    Path(cache_dir).mkdir(parents=True, exist_ok=True)
                    trt_options["trt_engine_cache_enable"] = True
                    trt_options["trt_engine_cache_path"] = str(cache_dir)
                providers.append(("TensorrtExecutionProvider", trt_options))
            if "CUDAExecutionProvider" in available:
                providers.append(("CUDAExecutionProvider", {"device_id": index}))
        providers.append("CPUExecutionProvider")
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), sess_options=options, providers=providers
        )
        self.providers = list(self.session.get_providers())
        if self.device.type == "cuda" and self.providers == ["CPUExecutionProvider"]:
            raise EngineUnavailable(
                "engine 'onnxruntime' could not start a GPU provider (CUDA/TensorRT libraries "
                "missing?); it would run on the CPU"
            )
        if precision == "fp16" and "TensorrtExecutionProvider" not in self.providers:
            raise EngineUnavailable("onnxruntime fp16 needs its TensorRT provider, which failed")
        names = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(OUTPUT_NAMES):
            raise EngineUnavailable(
                f"ONNX file {onnx_path} has outputs {names}, not {OUTPUT_NAMES}"
            )

    def describe(self) -> str:
        return f"{super().describe()} ({self.providers[0]})"

    def run(self, x: Tensor) -> BackboneOutput:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        tensors = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outputs]
        return BackboneOutput(*(t.to(self.device) for t in tensors))
