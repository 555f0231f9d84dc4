"""``acwi-models export``: write a model's ONNX files and record them in the manifest.

Two files are written next to the manifest, or into ``--out DIR`` together with a copy of the
manifest and weights (the source folder is then left untouched):

* ``backbone.onnx``: ``image (B, 1, S, S)`` -> ``features``, ``pooled``, ``mu`` (dynamic batch),
  recorded as ``onnx``; the node's ONNX Runtime and TensorRT engines use this file. ONNX Runtime
  (when installed) runs it on random inputs and its outputs are compared with PyTorch's.
* ``model.onnx``: the whole model's deterministic pass (dropout off, latent = ``mu``), recorded
  as ``full_onnx``: ``image`` -> ``probabilities`` (``softmax(logits / temperature)`` with the
  manifest's temperature, of the one pass without dropout: the analyser's probabilities are
  the mean softmax over its Monte-Carlo dropout samples, a few hundredths away on uncertain
  images), ``logits`` (the head's mean logits),
  ``features`` (the last convolutional activations the CAM is computed from), ``mu`` and
  ``logvar`` (latent statistics). Before it is recorded, ONNX Runtime runs it on real
  preprocessed synthetic radiographs (every site, every label, through the node's
  preprocessing) and the largest absolute difference of each output from PyTorch is reported;
  above :data:`FULL_TOLERANCES` the export fails and nothing is recorded.

The manifest records each file's name, SHA-256, opset, input/output names and the dynamic batch.
The opset recorded is the one each file imports; when the exporter could not write the opset
asked for (it falls back to its own), the export fails instead.

Nothing in the target folder changes until everything passed: both files (and, with ``--out``,
the weights and the manifest) are written under temporary names in the folder, checked, and only
then renamed over the old ones, the manifest last (written in full and synced first). A failed
check, an error or a kill before that point leaves the old files and manifest as they were.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

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
    """The manifest's DIANet with its verified weights, on CPU, in evaluation mode.

    Raises :class:`ExportError` in one line when the weights do not fit the manifest's
    ``architecture_config`` (how many keys are missing, unexpected or of another shape).
    """
    model = build_model(manifest)
    state = torch.load(manifest.weights_path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or reshaped:
        raise ExportError(
            f"weights {manifest.weights_path} do not fit the manifest's architecture_config:"
            f" {len(missing)} missing, {len(unexpected)} unexpected keys, {len(reshaped)} of"
            " another shape"
        )
    model.load_state_dict(state)
    return model.eval()


def _session(path: Path) -> object:
    """An ONNX Runtime CPU session for ``path`` (:class:`ExportError` when it cannot load it)."""
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime cannot load {path.name}: {first}") from exc


def check_onnx(model: DIANet, onnx: OnnxFile, input_size: int, seed: int = 0) -> float | None:
    """Largest absolute difference between ONNX Runtime and PyTorch (``None``: no runtime)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    session: Any = _session(onnx.path)
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
    if importlib.util.find_spec("onnxruntime") is None:
        raise ExportError("the parity check needs onnxruntime (pip install 'acwi-node[onnx]')")
    session: Any = _session(path)
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
        written = write_onnx(
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
        opset=written,
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


def newest_opset() -> int | None:
    """The newest ONNX opset the installed ``onnx`` package knows (``None``: not installed)."""
    try:
        import onnx
    except ImportError:
        return None
    return int(onnx.defs.onnx_opset_version())


def _check_opset(onnx: OnnxFile, asked: int, what: str) -> None:
    """:class:`ExportError` when the file written does not import the opset asked for."""
    if onnx.opset == asked:
        return
    newest = newest_opset()
    works = f"opsets {onnx.opset} to {newest}" if newest else f"opset {onnx.opset} and newer"
    raise ExportError(
        f"--opset {asked} cannot be written here: the exporter (torch {torch.__version__}) could"
        f" not convert the {what} to opset {asked} and wrote its own opset {onnx.opset}"
        f" instead; {works} work here; nothing was recorded"
    )


class _Staging:
    """Temporary files next to their final names, renamed over them together or removed."""

    def __init__(self) -> None:
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._moves: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        """A fresh hidden name in ``final``'s folder that :meth:`commit` renames to ``final``."""
        tmp = final.with_name(f".{final.name}.{self._token}.tmp")
        self._moves.append((tmp, final))
        return tmp

    def commit(self) -> None:
        """Sync every staged file, then rename each over its final name, in staging order.

        The renames run back to back with SIGINT, SIGTERM and SIGHUP held until they are done.
        Should a rename fail, the ones already done are undone from hard-link backups of the
        old files, so that the folder keeps its old files and manifest.
        """
        for tmp, _ in self._moves:
            _fsync(tmp)
        backups: list[tuple[Path, Path | None, bool]] = []  # final, its backup, existed
        for _, final in self._moves:
            backup = None
            if final.is_file():
                backup = final.with_name(f".{final.name}.{self._token}.old")
                try:
                    os.link(final, backup)
                except OSError:  # a file system without hard links: no undo for this one
                    backup = None
            backups.append((final, backup, final.exists()))
        done: list[int] = []
        try:
            with _signals_held():
                for i, (tmp, final) in enumerate(self._moves):
                    os.replace(tmp, final)
                    done.append(i)
        except OSError:
            for i in reversed(done):
                final, backup, existed = backups[i]
                if backup is not None:
                    os.replace(backup, final)
                elif not existed:
                    final.unlink(missing_ok=True)
            raise
        finally:
            for _, backup, _ in backups:
                if backup is not None:
                    backup.unlink(missing_ok=True)
        for folder in {final.parent for _, final in self._moves}:
            _fsync(folder)
        self._moves = []

    def discard(self) -> None:
        """Remove every staged file not committed."""
        for tmp, _ in self._moves:
            tmp.unlink(missing_ok=True)
        self._moves = []


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk, where the platform allows it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then act on the first one.

    Only in the main thread (elsewhere Python cannot install handlers; the block runs as is).
    """
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    held = [getattr(signal, n) for n in names if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    old = {sig: signal.signal(sig, remember) for sig in held}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def _manifest_text(manifest: ModelManifest) -> str:
    """The manifest as :func:`write_manifest` writes it, validated (as it will be loaded)."""
    text = manifest.model_dump_json(indent=2) + "\n"
    ModelManifest.model_validate_json(text)
    return text


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
    nothing: every file is written under a temporary name and renamed into place, together with
    the manifest, only once all checks passed, so a failure (or an interruption) leaves the
    target folder's files and manifest as they were.
    """
    manifest = load_manifest(Path(model_dir))
    model = load_model(manifest)
    source = manifest.directory
    target = Path(out).resolve() if out is not None else source
    newest = newest_opset()
    if newest is not None and opset > newest:
        raise ExportError(
            f"--opset {opset} is newer than the newest opset the installed onnx package knows"
            f" ({newest}); nothing was recorded"
        )
    created = not target.exists()
    if target != source:
        if not created and not target.is_dir():
            raise ExportError(f"--out {target} exists and is not a folder")
        target.mkdir(parents=True, exist_ok=True)
    staging = _Staging()
    done = False
    try:
        weights = target / manifest.weights
        if target != source and not (
            weights.is_file() and sha256_file(weights) == manifest.weights_sha256
        ):
            shutil.copy2(manifest.weights_path, staging.path(weights))
        size = manifest.input.size
        try:
            onnx = export_backbone(
                model, staging.path(target / ONNX_NAME), input_size=size, opset=opset
            )
        except RuntimeError as exc:  # the exporter's packages are missing
            raise ExportError(str(exc)) from exc
        _check_opset(onnx, opset, "backbone")
        worst = check_onnx(model, onnx, size)
        if worst is not None and worst > CHECK_TOLERANCE:
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {CHECK_TOLERANCE:.0e}); "
                "nothing was recorded"
            )
        full = export_full(
            model,
            staging.path(target / FULL_ONNX_NAME),
            input_size=size,
            temperature=manifest.temperature,
            opset=opset,
        )
        _check_opset(full, opset, "full model")
        parity = check_full_onnx(model, full.path, parity_inputs(manifest), manifest.temperature)
        if on_parity is not None:
            on_parity(parity)
        if not parity.ok:
            raise ParityError(parity)
        onnx = replace(onnx, path=target / ONNX_NAME)
        full = replace(full, path=target / FULL_ONNX_NAME)
        update = {"onnx": _record(ONNX_NAME, onnx), "full_onnx": _record(FULL_ONNX_NAME, full)}
        path = target / MANIFEST_NAME
        staged = staging.path(path)
        staged.write_text(_manifest_text(manifest.model_copy(update=update)), encoding="utf-8")
        os.chmod(staged, path.stat().st_mode & 0o777 if path.is_file() else 0o644)
        staging.commit()
        done = True
    finally:
        staging.discard()
        if created and not done:
            with contextlib.suppress(OSError):
                target.rmdir()  # the --out folder this call made, when it is still empty
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
