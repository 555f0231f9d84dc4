"""The PyTorch engine: eager DIANet.encode in inference mode, channels-last, optional autocast."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from acwi_node.inference.engines.base import BackboneOutput, Engine, EngineUnavailable, as_float32
from models.networks.dianet import DIANet

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pytorch_supports(precision: str, device: torch.device) -> str | None:
    """``None`` when the precision runs on the device, else the reason it does not."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return None  # autocast to bfloat16 exists on CPU and CUDA
    if precision == "fp16":
        return None if device.type == "cuda" else "precision fp16 needs a CUDA device"
    return f"engine 'pytorch' does not support precision {precision!r} (use tensorrt for int8)"


class PyTorchEngine(Engine):
    """Runs the backbone of ``model`` on its device.

    The model is put in evaluation mode and channels-last memory format (faster convolutions on
    CPU and CUDA); fp16/bf16 use autocast, so weights stay fp32 and outputs are cast to fp32.
    """

    name = "pytorch"

    def __init__(
        self,
        model: DIANet,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        *,
        channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device)
        reason = pytorch_supports(precision, self.device)
        if reason is not None:
            raise EngineUnavailable(reason)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("engine 'pytorch' on cuda needs a CUDA GPU")
        self.precision = precision
        self.channels_last = channels_last
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        dtype = _AUTOCAST.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def run(self, x: Tensor) -> BackboneOutput:
        x = x.to(self.device, dtype=torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            enc = self.model.encode(x)
        return as_float32(BackboneOutput(enc.features, enc.pooled, enc.mu), self.device)
