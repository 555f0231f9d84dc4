"""What every inference engine provides: one backbone pass over a batch of model inputs.

The engines run only :meth:`DIANet.encode` (the expensive part). The Monte-Carlo dropout head,
the uncertainty decomposition, the OOD score and the CAM heatmap are small torch operations the
analyser applies to the engine's outputs, so every engine gets the same numbers from the same
code (see :mod:`acwi_node.inference.analyser`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

EngineName = Literal["auto", "pytorch", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: Names of the exported backbone's input and outputs (ONNX and TensorRT).
INPUT_NAME = "image"
OUTPUT_NAMES = ("features", "pooled", "mu")
#: Largest batch of the TensorRT optimisation profile (the analyser splits larger series).
MAX_BATCH = 32


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here (package missing, no GPU, unsupported precision)."""


class BackboneOutput(NamedTuple):
    """One backbone pass, float32 tensors on the engine's device."""

    features: Tensor  # (B, C, h, w): the last activation map, input of the CAM
    pooled: Tensor  # (B, C): global average of ``features``, input of the head
    mu: Tensor  # (B, D): latent mean, input of the OOD score


class Engine(ABC):
    """A loaded backbone ready to run batches."""

    #: ``pytorch``, ``onnxruntime`` or ``tensorrt``.
    name: str
    #: Where :meth:`run` returns its outputs (the analyser's device).
    device: torch.device
    precision: str
    #: Largest batch :meth:`run` accepts (``None``: no limit).
    max_batch: int | None = None

    @abstractmethod
    def run(self, x: Tensor) -> BackboneOutput:
        """Backbone outputs for a float32 ``(B, 1, S, S)`` batch (any device)."""

    def describe(self) -> str:
        """One line for logs and the benchmark, e.g. ``onnxruntime-cpu fp32``."""
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        return f"{self.name}-{kind} {self.precision}"


def as_float32(out: BackboneOutput, device: torch.device) -> BackboneOutput:
    """The same outputs as contiguous float32 tensors on ``device``."""
    return BackboneOutput(*(t.to(device=device, dtype=torch.float32).contiguous() for t in out))
