"""Export DIANet's backbone to ONNX: ``image (B, 1, S, S)`` -> ``features``, ``pooled``, ``mu``.

The batch axis is dynamic; the spatial size is fixed by the manifest's input size. The export
uses the ``torch.export`` based exporter (the ``onnxscript`` package), which keeps the static
spatial shapes the adaptive pooling layers need. :func:`cached_onnx` gives the ONNX file for a
manifest: the one the manifest records (verified against its SHA-256), else one exported on the
fly into the engine cache, so the bundled model works with every engine out of the box.

The opset recorded for a written file is the one the file imports (:func:`onnx_opset`), which
is not always the one asked for: the exporter writes its own opset and converts the graph to the
one asked for, and when that conversion fails it keeps its own, quietly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
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
#: Loggers whose output :func:`write_onnx` holds back (the exporter's progress, and the version
#: converter's traceback when it cannot convert to the opset asked for).
_QUIET_LOGGERS = ("torch.onnx", "onnxscript")


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
) -> int:
    """Export ``module`` (dynamic batch on every input and output) to ``path`` atomically.

    Returns the opset the written file imports (:func:`onnx_opset`): ``opset`` when the
    exporter could convert the graph to it, else the exporter's own.
    """
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
    quiet = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
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
        written = onnx_opset(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is a model artefact
        os.replace(tmp, path)
    finally:
        for logger, old in zip(quiet, levels, strict=True):
            logger.setLevel(old)
        tmp.unlink(missing_ok=True)
    return written


def onnx_opset(path: Path) -> int:
    """The default-domain (``ai.onnx``) opset the ONNX file at ``path`` imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError(f"{path} imports no default-domain (ai.onnx) opset")


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
        written = write_onnx(
            Backbone(model),
            example,
            path,
            input_names=[INPUT_NAME],
            output_names=OUTPUT_NAMES,
            opset=opset,
        )
    finally:
        model.train(was_training)
    return OnnxFile(path=Path(path), sha256=sha256_file(Path(path)), opset=written)


#: What a model name may keep in a cache file name; every other run of characters becomes "_".
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+|\.{2,}")


def cache_file_name(manifest: ModelManifest, opset: int = DEFAULT_OPSET) -> str:
    """``<name>-<weights hash, 16 digits>-opset<N>.onnx``, the name reduced to safe characters.

    The hash and opset are the key; the name is there for people reading the folder: only its
    letters, digits, ``_``, ``-`` and single dots are kept (at most 64 characters, never a
    leading dot or dash), so that it can never name another folder or a hidden file.
    """
    name = _UNSAFE_NAME.sub("_", manifest.name).strip("._-")[:64] or "model"
    return f"{name}-{manifest.weights_sha256[:16]}-opset{opset}.onnx"


def cached_onnx(manifest: ModelManifest, model: DIANet, cache_dir: Path) -> OnnxFile:
    """The ONNX backbone for ``manifest``: its recorded export, else one cached in ``cache_dir``.

    A recorded file whose SHA-256 differs from the manifest raises :class:`ManifestError`.
    The cache file name holds the weights hash, so new weights get a new export
    (:func:`cache_file_name`); it always lies directly inside ``cache_dir/onnx``.
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
    folder = Path(cache_dir) / "onnx"
    path = folder / cache_file_name(manifest)
    if path.resolve().parent != folder.resolve():  # a link planted in the cache, say
        raise ManifestError(f"the ONNX cache file {path} does not lie in {folder}")
    if not path.is_file():
        log.info("exporting the %s backbone to %s", manifest.name, path)
        return export_backbone(model, path, input_size=manifest.input.size)
    return OnnxFile(path=path, sha256=sha256_file(path), opset=DEFAULT_OPSET)
