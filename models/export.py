"""``acwi-models export``: write a model's ONNX files and record them in the manifest.

Two files are written next to the manifest, or into ``--out DIR`` together with a copy of the
manifest and weights (the source folder is then left untouched):

* ``backbone.onnx``: ``image (B, 1, S, S)`` -> ``features``, ``pooled``, ``mu`` (dynamic batch),
  recorded as ``onnx``; the node's ONNX Runtime and TensorRT engines use this file. ONNX Runtime
  (when installed) runs it on random inputs and its outputs are compared with PyTorch's.
* ``model.onnx``: the whole model's deterministic pass (dropout off, latent = ``mu``), recorded
  as ``full_onnx``: ``image`` -> ``probabilities`` (``softmax(logits / temperature)`` with the
  manifest's temperature, as the analyser computes them), ``logits`` (the head's mean logits),
  ``features`` (the last convolutional activations the CAM is computed from), ``mu`` and
  ``logvar`` (latent statistics). Before it is recorded, ONNX Runtime runs it on real
  preprocessed synthetic radiographs (every site, every label, through the node's
  preprocessing) and the largest absolute difference of each output from PyTorch is reported;
  above :data:`FULL_TOLERANCES` the export fails and nothing is recorded.

The manifest records each file's name, SHA-256, opset, input/output names and the dynamic batch.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from acwi_node.inference.analyser import build_model
from acwi_node.inference.engines.onnx_export import (
    DEFAULT_OPSET,
    OnnxFile,
    export_backbone,
    write_onnx,
)
from acwi_node.inference.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    OnnxRecord,
    load_manifest,
    sha256_file,
    write_manifest,
)
from acwi_node.inference.preprocess import preprocess
from models.networks.dianet import DIANet

ONNX_NAME = "backbone.onnx"
#: Largest absolute difference allowed between ONNX Runtime and PyTorch on the check batch.
CHECK_TOLERANCE = 1e-3
#: The full model's ONNX file, next to the backbone's.
FULL_ONNX_NAME = "model.onnx"
FULL_INPUT_NAME = "image"
FULL_OUTPUT_NAMES: tuple[str, ...] = ("probabilities", "logits", "features", "mu", "logvar")
#: Largest absolute difference per output allowed between ONNX Runtime and PyTorch on the
#: parity images (float32 on CPU typically differs by 1e-7 to 1e-5).
FULL_TOLERANCES: dict[str, float] = {
    "probabilities": 1e-4,
    "logits": 1e-3,
    "features": 1e-3,
    "mu": 1e-3,
    "logvar": 1e-3,
}
#: (site, label) of the synthetic radiographs the parity check runs on.
PARITY_CASES: tuple[tuple[int, str], ...] = (
    (0, "normal"),
    (1, "nodule"),
    (2, "effusion"),
    (3, "nodule"),
    (4, "normal"),
)


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


class FullModel(nn.Module):
    """DIANet's deterministic pass with tensor outputs named by :data:`FULL_OUTPUT_NAMES`.

    In evaluation mode :meth:`DIANet.head` uses the latent mean without dropout, which is the
    expectation of the Monte-Carlo dropout logits (the head is linear in the latent).
    """

    def __init__(self, model: DIANet, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        enc = self.model.encode(x)
        logits = self.model.head(enc.pooled).logits
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        return probabilities, logits, enc.features, enc.mu, enc.logvar_latent


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on the parity images."""

    #: Largest absolute difference of each output, in :data:`FULL_OUTPUT_NAMES` order.
    max_abs_diff: dict[str, float]
    #: Output shapes for the parity batch.
    shapes: dict[str, tuple[int, ...]]
    images: int
    tolerances: dict[str, float] = field(default_factory=lambda: dict(FULL_TOLERANCES))

    @property
    def failures(self) -> list[str]:
        """Outputs whose difference exceeds their tolerance."""
        return [k for k, v in self.max_abs_diff.items() if not v <= self.tolerances[k]]

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        """One line per output: ``parity probabilities max |onnx - torch| 1.2e-07 (<= 1e-04)``."""
        out = []
        for name, diff in self.max_abs_diff.items():
            tol = self.tolerances[name]
            verdict = "ok" if diff <= tol else "FAIL"
            out.append(
                f"parity {name:<13} max |onnx - torch| {diff:.3e} (tolerance {tol:.0e}) {verdict}"
            )
        return out


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerances."""

    def __init__(self, parity: Parity) -> None:
        self.parity = parity
        worst = ", ".join(
            f"{k} {parity.max_abs_diff[k]:.2e} > {parity.tolerances[k]:.0e}"
            for k in parity.failures
        )
        super().__init__(f"the full-model ONNX file differs from PyTorch ({worst}); not recorded")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured."""

    manifest_path: Path
    backbone: OnnxFile
    #: Largest backbone difference on random inputs (``None``: ONNX Runtime not installed).
    backbone_max_abs_diff: float | None
    full: OnnxFile
    parity: Parity


def parity_inputs(manifest: ModelManifest, size: int = 256) -> np.ndarray:
    """Real preprocessed synthetic radiographs: ``(len(PARITY_CASES), 1, S, S)`` float32.

    Each is a phantom written as a DICOM dataset (its site's modality, bits and photometric)
    and read back through the node's preprocessing with the manifest's parameters.
    """
    from models.data.synth import SITES, make_dataset, make_phantom

    spec = manifest.preprocess_spec()
    batch = []
    for i, (site, label) in enumerate(PARITY_CASES):
        phantom = make_phantom(label, site, seed=1000 + i, size=size)
        ds = make_dataset(
            phantom.pixels,
            site=site,
            modality=SITES[site].modality,
            study_instance_uid=f"2.25.{1000 + i}",
            series_instance_uid=f"2.25.{2000 + i}",
            sop_instance_uid=f"2.25.{3000 + i}",
        )
        batch.append(preprocess(ds, spec))
    return np.stack(batch).astype(np.float32)


def reference_outputs(model: DIANet, x: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """PyTorch's outputs of :class:`FullModel` for ``x`` (the parity reference)."""
    with torch.inference_mode():
        outputs = FullModel(model.eval(), temperature)(torch.from_numpy(x))
    return {name: t.numpy() for name, t in zip(FULL_OUTPUT_NAMES, outputs, strict=True)}


def check_full_onnx(
    model: DIANet,
    path: Path,
    x: np.ndarray,
    temperature: float,
    tolerances: dict[str, float] | None = None,
) -> Parity:
    """Run ``path`` with ONNX Runtime on ``x``, all at once and image by image, against PyTorch."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            "the parity check needs onnxruntime (pip install 'acwi-node[onnx]')"
        ) from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = reference_outputs(model, x, temperature)
    names = list(FULL_OUTPUT_NAMES)
    got = dict(zip(names, session.run(names, {FULL_INPUT_NAME: x}), strict=True))
    singles = [session.run(names, {FULL_INPUT_NAME: x[i : i + 1]}) for i in range(len(x))]
    worst: dict[str, float] = {}
    for j, name in enumerate(FULL_OUTPUT_NAMES):
        if got[name].shape != want[name].shape:
            raise ExportError(
                f"ONNX output {name} has shape {got[name].shape}, PyTorch {want[name].shape}"
            )
        one = np.concatenate([s[j] for s in singles])
        worst[name] = float(
            max(np.abs(got[name] - want[name]).max(), np.abs(one - want[name]).max())
        )
    return Parity(
        max_abs_diff=worst,
        shapes={k: tuple(v.shape) for k, v in want.items()},
        images=len(x),
        tolerances=dict(tolerances or FULL_TOLERANCES),
    )


def export_full(
    model: DIANet, path: Path, *, input_size: int, temperature: float, opset: int = DEFAULT_OPSET
) -> OnnxFile:
    """Write :class:`FullModel` of ``model`` (CPU, evaluation mode) to ``path`` atomically."""
    path = Path(path)
    was_training = model.training
    model = model.eval()
    example = torch.zeros(2, model.config.in_channels, input_size, input_size)
    try:
        write_onnx(
            FullModel(model, temperature),
            example,
            path,
            input_names=[FULL_INPUT_NAME],
            output_names=FULL_OUTPUT_NAMES,
            opset=opset,
        )
    except RuntimeError as exc:  # the exporter's packages are missing
        raise ExportError(str(exc)) from exc
    finally:
        model.train(was_training)
    return OnnxFile(
        path=path,
        sha256=sha256_file(path),
        opset=opset,
        input_names=(FULL_INPUT_NAME,),
        output_names=FULL_OUTPUT_NAMES,
    )


def _record(name: str, onnx: OnnxFile) -> OnnxRecord:
    return OnnxRecord(
        file=name,
        sha256=onnx.sha256,
        opset=onnx.opset,
        input_names=list(onnx.input_names),
        output_names=list(onnx.output_names),
        dynamic_batch=onnx.dynamic_batch,
    )


def export(
    model_dir: Path,
    out: Path | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    on_parity: Callable[[Parity], None] | None = None,
) -> ExportResult:
    """Export the backbone and the full model at ``model_dir`` and record both in its manifest.

    ``on_parity`` sees the parity numbers before they are judged (also when they fail).
    Raises :class:`ExportError` (:class:`ParityError` for the parity check) and then records
    nothing: a file that failed its check is removed, the manifest is left as it was.
    """
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
    full = export_full(
        model,
        target / FULL_ONNX_NAME,
        input_size=manifest.input.size,
        temperature=manifest.temperature,
        opset=opset,
    )
    try:
        parity = check_full_onnx(model, full.path, parity_inputs(manifest), manifest.temperature)
        if on_parity is not None:
            on_parity(parity)
        if not parity.ok:
            raise ParityError(parity)
    except ExportError:
        full.path.unlink(missing_ok=True)
        if target != source or manifest.onnx is None:  # keep what the manifest records
            onnx.path.unlink(missing_ok=True)
        raise
    update = {"onnx": _record(ONNX_NAME, onnx), "full_onnx": _record(FULL_ONNX_NAME, full)}
    path = write_manifest(manifest.model_copy(update=update), target)
    load_manifest(path)  # what was written must load (weights and hashes verified)
    return ExportResult(
        manifest_path=path,
        backbone=onnx,
        backbone_max_abs_diff=worst,
        full=full,
        parity=parity,
    )


def export_model(model_dir: Path, out: Path | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """:func:`export`, returning the updated manifest's path."""
    return export(model_dir, out, opset).manifest_path


__all__ = [
    "CHECK_TOLERANCE",
    "FULL_ONNX_NAME",
    "FULL_OUTPUT_NAMES",
    "FULL_TOLERANCES",
    "MANIFEST_NAME",
    "ONNX_NAME",
    "ExportError",
    "ExportResult",
    "FullModel",
    "Parity",
    "ParityError",
    "export",
    "export_model",
]
