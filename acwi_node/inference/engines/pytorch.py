"""The PyTorch engine: DIANet.encode in inference mode, channels-last, optional autocast.

On CUDA the backbone is captured once per batch bucket as a CUDA graph and replayed: one launch
per batch instead of one per kernel, which is most of the time for a small network at small
batches (the CPU cannot queue kernels as fast as the GPU runs them). A batch is padded with zero
images to the next bucket (1, 2, 4, ..., :data:`GRAPH_MAX_BATCH`); every layer of the backbone in
evaluation mode treats the images of a batch independently, so the padding changes nothing but
is discarded. A capture that fails (a driver or an operation that does not support capture) is
logged once and the engine runs eagerly from then on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from acwi_node.inference.engines.base import BackboneOutput, Engine, EngineUnavailable, as_float32
from models.networks.dianet import DIANet

log = logging.getLogger("acwi_node.engines")

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Largest batch captured as a CUDA graph; larger batches run eagerly.
GRAPH_MAX_BATCH = 64
#: Eager passes on a side stream before a capture (lets cuDNN pick its algorithms).
GRAPH_WARMUP = 3


def pytorch_supports(precision: str, device: torch.device) -> str | None:
    """``None`` when the precision runs on the device, else the reason it does not."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return None  # autocast to bfloat16 exists on CPU and CUDA
    if precision == "fp16":
        return None if device.type == "cuda" else "precision fp16 needs a CUDA device"
    return f"engine 'pytorch' does not support precision {precision!r} (use tensorrt for int8)"


@contextlib.contextmanager
def ieee_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in full fp32 inside the block (PyTorch lets them use TF32 by default
    on Ampere and later GPUs, about 1e-3 relative error): precision ``fp32`` means fp32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # PyTorch >= 2.9
        before = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = before
    else:
        allowed = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = allowed


def graph_bucket(batch: int) -> int | None:
    """The captured batch size a batch of ``batch`` images runs in (``None``: eagerly)."""
    if batch < 1 or batch > GRAPH_MAX_BATCH:
        return None
    bucket = 1
    while bucket < batch:
        bucket *= 2
    return bucket


class _CapturedBackbone:
    """One CUDA graph of the backbone for a fixed input shape, with its static buffers."""

    def __init__(self, engine: PyTorchEngine, shape: tuple[int, ...]) -> None:
        memory_format = torch.channels_last if engine.channels_last else torch.contiguous_format
        self.input = torch.empty(
            shape, device=engine.device, dtype=torch.float32, memory_format=memory_format
        ).zero_()
        side = torch.cuda.Stream(engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                engine._encode(self.input, cache=False)
        torch.cuda.current_stream(engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = engine._encode(self.input, cache=False)

    def run(self, x: Tensor) -> BackboneOutput:
        n = x.shape[0]
        self.input[:n].copy_(x)
        if n < self.input.shape[0]:
            self.input[n:].zero_()
        self.graph.replay()
        # the graph overwrites its outputs on the next replay: hand out contiguous fp32 copies
        return BackboneOutput(*(_copy_float32(t[:n]) for t in self.output))


def _copy_float32(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t)


class PyTorchEngine(Engine):
    """Runs the backbone of ``model`` on its device.

    The model is put in evaluation mode and channels-last memory format (faster convolutions on
    CPU and CUDA); fp16/bf16 use autocast, so weights stay fp32 and outputs are cast to fp32;
    fp32 on CUDA keeps cuDNN's convolutions off TF32 (:func:`ieee_fp32_convolutions`).
    ``cuda_graphs`` (default: on for CUDA devices) replays captured CUDA graphs (module
    docstring); it is ignored on the CPU.
    """

    name = "pytorch"

    def __init__(
        self,
        model: DIANet,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        *,
        channels_last: bool = True,
        cuda_graphs: bool = True,
    ) -> None:
        self.device = torch.device(device)
        reason = pytorch_supports(precision, self.device)
        if reason is not None:
            raise EngineUnavailable(reason)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("engine 'pytorch' on cuda needs a CUDA GPU")
        self.precision = precision
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, ...], _CapturedBackbone] = {}
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def describe(self) -> str:
        text = super().describe()
        return f"{text} cuda-graphs" if self.cuda_graphs else text

    @property
    def captured_batches(self) -> list[int]:
        """Batch sizes captured as CUDA graphs so far (ascending)."""
        return sorted(shape[0] for shape in self._graphs)

    def _precision(self, cache: bool = True) -> contextlib.AbstractContextManager[object]:
        """Autocast for fp16/bf16; IEEE fp32 convolutions for fp32 on CUDA."""
        dtype = _AUTOCAST.get(self.precision)
        if dtype is None:
            if self.device.type == "cuda":
                return ieee_fp32_convolutions()
            return contextlib.nullcontext()
        # no cast cache while capturing: cached casts would outlive the capture's memory pool
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=cache)

    def _encode(self, x: Tensor, cache: bool = True) -> BackboneOutput:
        with torch.inference_mode(), self._precision(cache):
            enc = self.model.encode(x)
        return BackboneOutput(enc.features, enc.pooled, enc.mu)

    def run(self, x: Tensor) -> BackboneOutput:
        x = x.to(self.device, dtype=torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bucket = graph_bucket(x.shape[0]) if self.cuda_graphs else None
        if bucket is not None:
            shape = (bucket, *x.shape[1:])
            captured = self._graphs.get(shape)
            if captured is None:
                captured = self._capture(shape)
            if captured is not None:
                return captured.run(x)
        return as_float32(self._encode(x), self.device)

    def _capture(self, shape: tuple[int, ...]) -> _CapturedBackbone | None:
        try:
            captured = _CapturedBackbone(self, shape)
        except Exception as exc:  # run eagerly rather than fail every analysis
            log.warning("CUDA graph capture failed (%s); the backbone runs eagerly", exc)
            self.cuda_graphs = False
            self._graphs.clear()
            return None
        self._graphs[shape] = captured
        return captured
