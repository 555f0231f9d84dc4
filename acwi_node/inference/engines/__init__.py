"""Inference engines for the DIANet backbone, chosen by configuration and by what is installed.

``engine = "auto"`` takes the first engine that can run on the configured device with the
configured precision, in this order:

* device ``cuda``: ``tensorrt`` > ``onnxruntime`` (CUDA/TensorRT providers) > ``pytorch``;
* device ``cpu``: ``onnxruntime`` > ``pytorch``.

An engine named explicitly that cannot run raises :class:`EngineUnavailable` with the reason
(e.g. "engine 'tensorrt' needs the tensorrt package and a CUDA GPU (...)").
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from acwi_node.inference.engines.base import (
    ENGINE_NAMES,
    INPUT_NAME,
    MAX_BATCH,
    OUTPUT_NAMES,
    PRECISIONS,
    BackboneOutput,
    Engine,
    EngineUnavailable,
)
from acwi_node.inference.engines.cache import EngineKey
from acwi_node.inference.engines.onnx_export import DEFAULT_OPSET, OnnxFile, cached_onnx
from acwi_node.inference.engines.ort import OnnxRuntimeEngine, ort_supports
from acwi_node.inference.engines.pytorch import PyTorchEngine, pytorch_supports
from acwi_node.inference.engines.trt import CalibrationSet, TensorRTEngine, tensorrt_supports
from acwi_node.inference.manifest import ModelManifest
from models.networks.dianet import DIANet

__all__ = [
    "DEFAULT_OPSET",
    "ENGINE_NAMES",
    "INPUT_NAME",
    "MAX_BATCH",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "BackboneOutput",
    "CalibrationSet",
    "Engine",
    "EngineKey",
    "EngineOptions",
    "EngineUnavailable",
    "OnnxFile",
    "OnnxRuntimeEngine",
    "PyTorchEngine",
    "TensorRTEngine",
    "auto_order",
    "cached_onnx",
    "calibration_set",
    "choose_engine",
    "create_engine",
    "default_cache_dir",
    "engine_support",
]

log = logging.getLogger("acwi_node.engines")

#: Images of the synthetic calibration set used when no calibration folder is configured.
SYNTHETIC_CALIBRATION_IMAGES = 64


@dataclass(frozen=True)
class EngineOptions:
    """How to run the backbone (the worker's ``engine``/``precision``/... settings)."""

    engine: str = "pytorch"
    precision: str = "fp32"
    #: Exported ONNX files and TensorRT engines; default :func:`default_cache_dir`.
    cache_dir: Path | None = None
    trt_workspace_mb: int = 1024
    dla_core: int | None = None
    #: DICOM folder of real images for INT8 calibration; default synthetic phantoms.
    calibration_dir: Path | None = None
    num_threads: int | None = None
    #: PyTorch on CUDA: replay captured CUDA graphs of the backbone (see engines.pytorch).
    cuda_graphs: bool = True


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/acwi-node/engines`` (``~/.cache/...``) for use outside the worker."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "acwi-node" / "engines"


def auto_order(device: torch.device) -> tuple[str, ...]:
    """Engines ``auto`` tries on ``device``, best first."""
    if device.type == "cuda":
        return ("tensorrt", "onnxruntime", "pytorch")
    return ("onnxruntime", "pytorch")


def engine_support(name: str, device: torch.device, precision: str) -> str | None:
    """``None`` when engine ``name`` can run here, else the reason it cannot."""
    if name == "pytorch":
        if device.type == "cuda" and not torch.cuda.is_available():
            return "engine 'pytorch' on cuda needs a CUDA GPU (no CUDA device)"
        return pytorch_supports(precision, device)
    if name == "onnxruntime":
        if device.type == "cuda" and not torch.cuda.is_available():
            return "engine 'onnxruntime' on cuda needs a CUDA GPU (no CUDA device)"
        return ort_supports(precision, device)
    if name == "tensorrt":
        return tensorrt_supports(precision, device)
    raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINE_NAMES)}")


def choose_engine(requested: str, device: torch.device, precision: str) -> str:
    """The engine to use: ``requested`` if it can run, or the best available for ``auto``."""
    if requested != "auto":
        reason = engine_support(requested, device, precision)
        if reason is not None:
            raise EngineUnavailable(reason)
        return requested
    reasons = []
    for name in auto_order(device):
        reason = engine_support(name, device, precision)
        if reason is None:
            return name
        reasons.append(reason)
    raise EngineUnavailable(
        f"no engine can run precision {precision} on {device}: " + "; ".join(reasons)
    )


def calibration_set(
    manifest: ModelManifest, folder: Path | None, limit: int = 512
) -> CalibrationSet:
    """INT8 calibration images, preprocessed exactly as the analyser does.

    From ``folder`` (DICOM files, searched recursively; unreadable or unsupported files are
    skipped; each frame of a multi-frame image is an image, as the analyser reads it; at most
    ``limit`` files and images), else from :data:`SYNTHETIC_CALIBRATION_IMAGES` synthetic
    phantom images of every label and site, written as DICOM and read back through the same
    preprocessing.
    """
    from acwi_node.inference.preprocess import image_units, preprocess, preprocess_many

    spec = manifest.preprocess_spec()
    if folder is not None:
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())[:limit]
        listing = "\n".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in files)
        identity = f"folder {Path(folder).resolve()}\n{listing}"

        def load_folder() -> np.ndarray:
            import pydicom
            from pydicom.errors import InvalidDicomError

            arrays: list[np.ndarray] = []
            for path in files:
                try:
                    ds = pydicom.dcmread(path)
                except (InvalidDicomError, OSError):
                    continue
                inputs = preprocess_many(image_units([ds]), spec)
                arrays.extend(x for x in inputs if isinstance(x, np.ndarray))
                if len(arrays) >= limit:
                    del arrays[limit:]
                    break
            if not arrays:
                raise EngineUnavailable(f"no usable calibration image in {folder}")
            return np.stack(arrays).astype(np.float32)

        return CalibrationSet(hashlib.sha256(identity.encode()).hexdigest(), load_folder)

    def load_synthetic() -> np.ndarray:
        import tempfile

        import pydicom

        from models.data.synth import LABELS, write_study

        arrays: list[np.ndarray] = []
        labels = list(LABELS)  # the phantom generator's labels (any model's input domain)
        with tempfile.TemporaryDirectory(prefix="acwi-calibration-") as tmp:
            for i in range(SYNTHETIC_CALIBRATION_IMAGES // 4):
                label = labels[i % len(labels)]
                paths = write_study(Path(tmp) / str(i), n_images=4, label=label, site=i % 4, seed=i)
                arrays.extend(preprocess(pydicom.dcmread(p), spec) for p in paths)
        return np.stack(arrays).astype(np.float32)

    return CalibrationSet(f"synthetic phantoms {SYNTHETIC_CALIBRATION_IMAGES} v1", load_synthetic)


def create_engine(
    model: DIANet,
    manifest: ModelManifest,
    device: torch.device | str,
    options: EngineOptions,
) -> Engine:
    """Build the engine ``options`` asks for (``auto``: see the module docstring).

    With ``auto``, an engine that is installed but fails to start (an export or build error)
    is logged and the next one in :func:`auto_order` is tried; PyTorch is the last resort.
    """
    device = torch.device(device)
    if options.engine != "auto":
        name = choose_engine(options.engine, device, options.precision)
        return _start(name, model, manifest, device, options)
    candidates = [
        n for n in auto_order(device) if engine_support(n, device, options.precision) is None
    ]
    if not candidates:
        choose_engine("auto", device, options.precision)  # raises with every reason
    for name in candidates[:-1]:
        try:
            return _start(name, model, manifest, device, options)
        except Exception as exc:  # fall back to the next engine rather than fail every job
            log.warning("engine %s could not start (%s); trying the next one", name, exc)
    return _start(candidates[-1], model, manifest, device, options)


def _start(
    name: str,
    model: DIANet,
    manifest: ModelManifest,
    device: torch.device,
    options: EngineOptions,
) -> Engine:
    cache_dir = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    if name == "pytorch":
        engine: Engine = PyTorchEngine(
            model, device, options.precision, cuda_graphs=options.cuda_graphs
        )
    else:
        onnx = cached_onnx(manifest, model, cache_dir)
        if name == "onnxruntime":
            engine = OnnxRuntimeEngine(
                onnx.path,
                device,
                options.precision,
                num_threads=options.num_threads,
                cache_dir=cache_dir / "onnxruntime-trt",
            )
        else:
            size = manifest.input.size
            engine = TensorRTEngine(
                onnx,
                model_name=manifest.name,
                input_shape=(manifest.input.channels, size, size),
                device=device,
                precision=options.precision,
                cache_dir=cache_dir,
                workspace_mb=options.trt_workspace_mb,
                dla_core=options.dla_core,
                calibration=(
                    calibration_set(manifest, options.calibration_dir)
                    if options.precision == "int8"
                    else None
                ),
            )
    log.info("inference engine: %s", engine.describe())
    return engine
