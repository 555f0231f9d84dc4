"""``acwi-models export``: write a model's ONNX backbone and record it in the manifest.

The ONNX file (``backbone.onnx``: ``image (B, 1, S, S)`` -> ``features``, ``pooled``, ``mu``,
dynamic batch) is written next to the manifest, or into ``--out DIR`` together with a copy of the
manifest and weights (the source folder is then left untouched). The manifest records the file
name, SHA-256, opset, input/output names and the dynamic batch; the node's ONNX Runtime and
TensorRT engines use this file. Before anything is recorded, ONNX Runtime (when installed) runs
the file and its outputs are compared with PyTorch's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from acwi_node.inference.analyser import build_model
from acwi_node.inference.engines.onnx_export import DEFAULT_OPSET, OnnxFile, export_backbone
from acwi_node.inference.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    OnnxRecord,
    load_manifest,
    write_manifest,
)
from models.networks.dianet import DIANet

ONNX_NAME = "backbone.onnx"
#: Largest absolute difference allowed between ONNX Runtime and PyTorch on the check batch.
CHECK_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The export failed or its output does not match PyTorch."""


def load_model(manifest: ModelManifest) -> DIANet:
    """The manifest's DIANet with its verified weights, on CPU, in evaluation mode."""
    model = build_model(manifest)
    state = torch.load(manifest.weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def check_onnx(model: DIANet, onnx: OnnxFile, input_size: int, seed: int = 0) -> float | None:
    """Largest absolute difference between ONNX Runtime and PyTorch (``None``: no runtime)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    session = onnxruntime.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(
            batch, model.config.in_channels, input_size, input_size, generator=generator
        )
        outputs = session.run(list(onnx.output_names), {onnx.input_names[0]: x.numpy()})
        with torch.inference_mode():
            enc = model.encode(x)
        for got, want in zip(outputs, (enc.features, enc.pooled, enc.mu), strict=True):
            if got.shape != tuple(want.shape):
                raise ExportError(f"ONNX output shape {got.shape} != PyTorch {tuple(want.shape)}")
            worst = max(worst, float(np.abs(got - want.numpy()).max()))
    return worst


def export_model(model_dir: Path, out: Path | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Export the backbone of the model at ``model_dir``; returns the updated manifest's path."""
    manifest = load_manifest(Path(model_dir))
    model = load_model(manifest)
    source = manifest.directory
    target = Path(out).resolve() if out is not None else source
    if target != source:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(manifest.weights_path, target / manifest.weights)
    onnx = export_backbone(model, target / ONNX_NAME, input_size=manifest.input.size, opset=opset)
    worst = check_onnx(model, onnx, manifest.input.size)
    if worst is not None and worst > CHECK_TOLERANCE:
        onnx.path.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {CHECK_TOLERANCE:.0e}); "
            "nothing was recorded"
        )
    record = OnnxRecord(
        file=ONNX_NAME,
        sha256=onnx.sha256,
        opset=onnx.opset,
        input_names=list(onnx.input_names),
        output_names=list(onnx.output_names),
        dynamic_batch=onnx.dynamic_batch,
    )
    path = write_manifest(manifest.model_copy(update={"onnx": record}), target)
    load_manifest(path)  # what was written must load (weights and hashes verified)
    return path


__all__ = ["CHECK_TOLERANCE", "MANIFEST_NAME", "ONNX_NAME", "ExportError", "export_model"]
