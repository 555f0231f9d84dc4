"""The TensorRT engine: a serialized engine built from the exported ONNX backbone, cached on disk.

* precisions fp32, fp16, bf16 and int8 (an ``IInt8EntropyCalibrator2`` fed with real
  preprocessed images, see :class:`CalibrationSet`); one optimisation profile with a dynamic
  batch from 1 to :data:`MAX_BATCH` (optimum :data:`OPT_BATCH`);
* an optional DLA core (Jetson Orin) with GPU fallback, and a workspace limit;
* engines cached in ``<cache_dir>/tensorrt`` under an :class:`EngineKey` (GPU name, compute
  capability, TensorRT version, ONNX hash, precision, DLA core, calibration set): a change of
  any of them builds a new engine on this device; a present engine is loaded, not rebuilt;
* buffers are torch CUDA tensors bound with ``set_tensor_address`` and run with
  ``execute_async_v3`` on torch's current stream (the TensorRT 10 API).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from acwi_node.inference.engines.base import (
    INPUT_NAME,
    MAX_BATCH,
    OUTPUT_NAMES,
    BackboneOutput,
    Engine,
    EngineUnavailable,
)
from acwi_node.inference.engines.cache import EngineKey
from acwi_node.inference.engines.onnx_export import OnnxFile

log = logging.getLogger("acwi_node.engines")

#: Batch the optimisation profile is tuned for (and the INT8 calibration batch).
OPT_BATCH = 16
TENSORRT_NEEDED = "engine 'tensorrt' needs the tensorrt package and a CUDA GPU"


def tensorrt_supports(precision: str, device: torch.device) -> str | None:
    """``None`` when TensorRT can run here with this precision, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"{TENSORRT_NEEDED} (tensorrt is not installed)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{TENSORRT_NEEDED} (no CUDA device; set worker.device = 'cuda')"
    if precision not in ("fp32", "fp16", "bf16", "int8"):
        return f"engine 'tensorrt' does not support precision {precision!r}"
    return None


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed images for INT8 calibration, loaded only when an engine must be built.

    ``identity`` names the set cheaply (it goes into the engine key); ``load`` returns a float32
    ``(N, C, S, S)`` array of model inputs (the output of :func:`preprocess`).
    """

    identity: str
    load: Callable[[], np.ndarray]

    def sha256(self) -> str:
        return hashlib.sha256(self.identity.encode()).hexdigest()


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineUnavailable(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


def _calibrator(trt: Any, images: np.ndarray, cache_path: Path, device: torch.device) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``images`` in batches of :data:`OPT_BATCH`."""
    batches = len(images) // OPT_BATCH
    if batches < 1:
        raise EngineUnavailable(
            f"INT8 calibration needs at least {OPT_BATCH} images, got {len(images)}"
        )

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.buffer = torch.empty(
                (OPT_BATCH, *images.shape[1:]), dtype=torch.float32, device=device
            )

        def get_batch_size(self) -> int:
            return OPT_BATCH

        def get_batch(self, names: list[str], *args: Any) -> list[int] | None:
            if self.index >= batches:
                return None
            start = self.index * OPT_BATCH
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + OPT_BATCH]))
            self.buffer.copy_(chunk)
            torch.cuda.synchronize(device)
            self.index += 1
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            _atomic_write(cache_path, bytes(cache))

    return Calibrator()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def build_serialized_engine(
    onnx_path: Path,
    *,
    input_shape: tuple[int, int, int],
    precision: str,
    device: torch.device,
    workspace_mb: int = 1024,
    dla_core: int | None = None,
    calibration: np.ndarray | None = None,
    calibration_cache: Path | None = None,
) -> bytes:
    """Build a serialized TensorRT engine from an ONNX backbone (dynamic batch 1..MAX_BATCH)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailable(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        INPUT_NAME, (1, *input_shape), (OPT_BATCH, *input_shape), (MAX_BATCH, *input_shape)
    )
    config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        if calibration is None or calibration_cache is None:
            raise EngineUnavailable("precision int8 needs calibration images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without an INT8 kernel fall back to FP16
        config.int8_calibrator = _calibrator(trt, calibration, calibration_cache, device)
        config.set_calibration_profile(profile)
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise EngineUnavailable(
                f"dla_core {dla_core} requested but this device has {builder.num_DLA_cores} DLA "
                "core(s)"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineUnavailable(f"TensorRT failed to build an engine from {onnx_path}")
    return bytes(serialized)


class TensorRTEngine(Engine):
    """Runs a cached (or freshly built) TensorRT engine of the exported backbone."""

    name = "tensorrt"
    max_batch = MAX_BATCH

    def __init__(
        self,
        onnx: OnnxFile,
        *,
        model_name: str,
        input_shape: tuple[int, int, int],
        device: torch.device | str = "cuda",
        precision: str = "fp16",
        cache_dir: Path,
        workspace_mb: int = 1024,
        dla_core: int | None = None,
        calibration: CalibrationSet | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        reason = tensorrt_supports(precision, self.device)
        if reason is not None:
            raise EngineUnavailable(reason)
        if precision == "int8" and calibration is None:
            raise EngineUnavailable("engine 'tensorrt' with precision int8 needs calibration data")
        import tensorrt as trt

        self.precision = precision
        props = torch.cuda.get_device_properties(self.device)
        self.key = EngineKey(
            gpu_name=str(props.name),
            compute_capability=(int(props.major), int(props.minor)),
            tensorrt_version=str(trt.__version__),
            onnx_sha256=onnx.sha256,
            precision=precision,
            max_batch=MAX_BATCH,
            dla_core=dla_core,
            calibration_sha256=calibration.sha256() if precision == "int8" and calibration else "",
        )
        self.path = self.key.path(cache_dir, model_name)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self._runtime.DLA_core = dla_core
        #: True when this load built the engine, False when it came from the cache.
        self.built = False
        engine = None
        with torch.cuda.device(self.device):
            if self.path.is_file():
                engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
                if engine is None:
                    log.warning("cached TensorRT engine %s is unusable; rebuilding", self.path)
            if engine is None:
                log.info("building TensorRT %s engine %s (minutes)", precision, self.path.name)
                data = build_serialized_engine(
                    onnx.path,
                    input_shape=input_shape,
                    precision=precision,
                    device=self.device,
                    workspace_mb=workspace_mb,
                    dla_core=dla_core,
                    calibration=calibration.load() if precision == "int8" and calibration else None,
                    calibration_cache=self.path.with_suffix(".calib"),
                )
                _atomic_write(self.path, data)
                self.path.with_suffix(".json").write_text(self.key.to_json() + "\n")
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise EngineUnavailable(
                        f"TensorRT cannot load the engine it built ({self.path})"
                    )
                self.built = True
            self._engine = engine
            self._context = engine.create_execution_context()
        self._dtypes = {
            name: _torch_dtype(trt, engine.get_tensor_dtype(name))
            for name in (INPUT_NAME, *OUTPUT_NAMES)
        }
        self._lock = threading.Lock()

    def describe(self) -> str:
        dla = f", DLA core {self.key.dla_core}" if self.key.dla_core is not None else ""
        return f"tensorrt-cuda {self.precision} (TensorRT {self.key.tensorrt_version}{dla})"

    def run(self, x: Tensor) -> BackboneOutput:
        if x.shape[0] > MAX_BATCH:
            raise ValueError(f"batch {x.shape[0]} exceeds the engine's maximum {MAX_BATCH}")
        x = x.to(self.device, dtype=self._dtypes[INPUT_NAME]).contiguous()
        with self._lock, torch.cuda.device(self.device):
            ctx = self._context
            ctx.set_input_shape(INPUT_NAME, tuple(x.shape))
            ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
            outputs: list[Tensor] = []
            for name in OUTPUT_NAMES:
                shape = tuple(ctx.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                ctx.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        return BackboneOutput(*(o.float() for o in outputs))
