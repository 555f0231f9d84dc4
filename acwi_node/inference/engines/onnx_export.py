"""Export DIANet's backbone to ONNX: ``image (B, 1, S, S)`` -> ``features``, ``pooled``, ``mu``.

The batch axis is dynamic; the spatial size is fixed by the manifest's input size. The export
uses the ``torch.export`` based exporter (the ``onnxscript`` package), which keeps the static
spatial shapes the adaptive pooling layers need. :func:`cached_onnx` gives the ONNX file for a
manifest: the one the manifest records (verified against its SHA-256), else one exported on the
fly into the engine cache, so the bundled model works with every engine out of the box.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from acwi_node.inference.engines.base import INPUT_NAME, OUTPUT_NAMES
from acwi_node.inference.manifest import ManifestError, ModelManifest, sha256_file
from models.networks.dianet import DIANet

log = logging.getLogger("acwi_node.engines")

#: ONNX opset of exported backbones (the torch.export exporter's native opset).
DEFAULT_OPSET = 18


class Backbone(nn.Module):
    """``DIANet.encode`` as a module with tensor outputs (what ONNX and TensorRT run)."""

    def __init__(self, model: DIANet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.model.encode(x)
        return enc.features, enc.pooled, enc.mu


@dataclass(frozen=True)
class OnnxFile:
    """An exported backbone and the facts the manifest records about it."""

    path: Path
    sha256: str
    opset: int
    input_names: tuple[str, ...] = (INPUT_NAME,)
    output_names: tuple[str, ...] = OUTPUT_NAMES
    dynamic_batch: bool = True


def write_onnx(
    module: nn.Module,
    example: Tensor,
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
) -> None:
    """Export ``module`` (dynamic batch on every input and output) to ``path`` atomically."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise RuntimeError(
            "ONNX export needs the onnx and onnxscript packages (pip install 'acwi-node[onnx]')"
        ) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "batch"} for name in (*input_names, *output_names)}
    fd, tmp_name = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is a model artefact
        os.replace(tmp, path)
    finally:
        quiet.setLevel(level)
        tmp.unlink(missing_ok=True)


def export_backbone(
    model: DIANet, path: Path, *, input_size: int, opset: int = DEFAULT_OPSET
) -> OnnxFile:
    """Write the backbone of ``model`` (evaluation mode) to ``path`` atomically."""
    was_training = model.training
    model = model.eval()
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    example = torch.zeros(2, model.config.in_channels, input_size, input_size, device=device)
    try:
        write_onnx(
            Backbone(model),
            example,
            path,
            input_names=[INPUT_NAME],
            output_names=OUTPUT_NAMES,
            opset=opset,
        )
    finally:
        model.train(was_training)
    return OnnxFile(path=Path(path), sha256=sha256_file(Path(path)), opset=opset)


def cached_onnx(manifest: ModelManifest, model: DIANet, cache_dir: Path) -> OnnxFile:
    """The ONNX backbone for ``manifest``: its recorded export, else one cached in ``cache_dir``.

    A recorded file whose SHA-256 differs from the manifest raises :class:`ManifestError`.
    The cache file name holds the weights hash, so new weights get a new export.
    """
    record = manifest.onnx
    if record is not None:
        path = manifest.directory / record.file
        if not path.is_file():
            raise ManifestError(f"ONNX file {path} named by the manifest does not exist")
        actual = sha256_file(path)
        if actual != record.sha256:
            raise ManifestError(
                f"ONNX file {path} has SHA-256 {actual}, but the manifest expects {record.sha256}"
            )
        return OnnxFile(
            path=path,
            sha256=actual,
            opset=record.opset,
            input_names=tuple(record.input_names),
            output_names=tuple(record.output_names),
            dynamic_batch=record.dynamic_batch,
        )
    path = (
        Path(cache_dir)
        / "onnx"
        / f"{manifest.name}-{manifest.weights_sha256[:16]}-opset{DEFAULT_OPSET}.onnx"
    )
    if not path.is_file():
        log.info("exporting the %s backbone to %s", manifest.name, path)
        return export_backbone(model, path, input_size=manifest.input.size)
    return OnnxFile(path=path, sha256=sha256_file(path), opset=DEFAULT_OPSET)
