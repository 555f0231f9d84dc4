"""The model manifest: everything needed to run and trust a trained model, next to its weights."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from acwi_node.inference.preprocess import PreprocessSpec
from acwi_node.inference.types import ModelIdentity
from acwi_node.model_registry import (
    FIXED_VERSION_RULE,
    SAFE_NAME_RULE,
    is_fixed_version,
    is_safe_name,
)
from models.networks.dianet import DIANetConfig

MANIFEST_NAME = "manifest.json"

#: Validation context of a manifest that already exists (installed in the model registry,
#: configured as a ``[[models]]`` path, loaded by a worker): ``ModelManifest.model_validate(raw,
#: context=EXISTING)``. A version that is not fixed (:func:`~acwi_node.model_registry.
#: is_fixed_version`) is refused only for what is made from now on (``acwi-models train`` and
#: ``export``, ``acwi-node models install``); one that exists keeps loading, with a warning
#: (:func:`moving_version_warning`), so that an upgrade does not take a working model offline.
EXISTING: dict[str, bool] = {"existing": True}

log = logging.getLogger("acwi_node.models")


class ManifestError(ValueError):
    """The manifest is missing, malformed or does not match its weights file."""


class _Strict(BaseModel):
    # NaN and infinity: no number of a model is either (and JSON cannot write them back)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InputSpec(_Strict):
    """Model input geometry."""

    size: int = Field(ge=32, le=4096)
    channels: Literal[1] = 1


class PreprocessingSpec(_Strict):
    """Windowing percentiles and the z-normalisation statistics of the training set."""

    lower_percentile: float = Field(ge=0.0, le=50.0)
    upper_percentile: float = Field(ge=50.0, le=100.0)
    mean: float
    std: float = Field(gt=0.0)


class OODSpec(_Strict):
    """Mahalanobis distance of the latent mean, fitted on the training set.

    ``score = sqrt((mu - mean)^T precision (mu - mean) / dim)``: the RMS per-dimension
    distance (about 1 in distribution). ``precision`` is the inverse of the shrunk training
    covariance; ``threshold`` is the ``quantile`` of the validation scores.
    """

    method: Literal["mahalanobis"] = "mahalanobis"
    mean: list[float]
    precision: list[list[float]]
    threshold: float = Field(gt=0.0)
    quantile: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _square(self) -> OODSpec:
        dim = len(self.mean)
        if dim == 0 or len(self.precision) != dim or any(len(r) != dim for r in self.precision):
            raise ValueError("ood.precision must be a square matrix matching ood.mean")
        return self


class TrainingSummary(_Strict):
    """Where the weights came from and how well they did on validation."""

    dataset: str
    epochs: int = Field(ge=0)
    train_images: int = Field(ge=0)
    val_images: int = Field(ge=0)
    val_accuracy: float = Field(ge=0.0, le=1.0)
    val_balanced_accuracy: float = Field(ge=0.0, le=1.0)
    val_nll: float = Field(ge=0.0)
    seconds: float = Field(ge=0.0)
    seed: int
    preset: str
    #: Share of the validation lesions whose heatmap peaks in a feature cell of the lesion
    #: (training with lesion masks only).
    val_cam_pointing: float | None = Field(default=None, ge=0.0, le=1.0)


class OnnxRecord(_Strict):
    """The exported backbone (``acwi-models export``): ONNX file next to the manifest."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=7)
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool = True

    @model_validator(mode="after")
    def _relative(self) -> OnnxRecord:
        name = PurePosixPath(self.file)
        if name.is_absolute() or ".." in name.parts or "\\" in self.file:
            raise ValueError("onnx.file must be a file name relative to the manifest")
        return self


class ModelManifest(_Strict):
    """Validated contents of ``manifest.json``."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    architecture: Literal["dianet"] = "dianet"
    architecture_config: dict[str, Any]
    labels: list[str] = Field(min_length=2)
    finding_labels: list[str]
    input: InputSpec
    preprocessing: PreprocessingSpec
    temperature: float = Field(gt=0.0)
    uncertainty_threshold: float = Field(ge=0.0, le=1.0)
    target_review_rate: float = Field(ge=0.0, le=1.0)
    mc_samples: int = Field(default=20, ge=1)
    ood: OODSpec
    weights: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime
    training: TrainingSummary
    #: The exported ONNX backbone, when ``acwi-models export`` recorded one.
    onnx: OnnxRecord | None = None
    #: The exported full model (deterministic pass: probabilities, logits, last activations,
    #: latent mean and log-variance), when ``acwi-models export`` recorded one. For consumers
    #: outside the node; the node's engines use ``onnx``.
    full_onnx: OnnxRecord | None = None

    _directory: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ModelManifest:
        # name and version name the model's registry folders and engine cache files
        for key, value in (("name", self.name), ("version", self.version)):
            if not is_safe_name(value):
                raise ValueError(
                    f"{key} {value!r} cannot name a folder or a file: {SAFE_NAME_RULE}"
                )
        existing = isinstance(info.context, dict) and info.context.get("existing") is True
        if not existing and not is_fixed_version(self.version):
            raise ValueError(f"version {self.version!r} is refused: {FIXED_VERSION_RULE}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        unknown = set(self.finding_labels) - set(self.labels)
        if unknown:
            raise ValueError(f"finding_labels not in labels: {sorted(unknown)}")
        name = PurePosixPath(self.weights)
        if name.is_absolute() or ".." in name.parts or "\\" in self.weights:
            raise ValueError("weights must be a file name relative to the manifest")
        self._matches_architecture()
        return self

    def _matches_architecture(self) -> None:
        """The network built from ``architecture_config`` must take the manifest's input,
        labels and OOD statistics. Only the keys every architecture shares are read, with
        their common defaults: ``models.model_io`` validates AMRI-Net manifests with this
        schema too; whether the rest builds a network, ``acwi-node models install`` tries."""
        arch, defaults = self.architecture_config, DIANetConfig()
        num_classes = arch.get("num_classes", defaults.num_classes)
        if num_classes != len(self.labels):
            raise ValueError(
                f"architecture_config num_classes is {num_classes} but the manifest lists"
                f" {len(self.labels)} labels"
            )
        in_channels = arch.get("in_channels", defaults.in_channels)
        if in_channels != self.input.channels:
            raise ValueError(
                f"architecture_config in_channels is {in_channels} but input.channels is"
                f" {self.input.channels}"
            )
        latent_dim = arch.get("latent_dim", defaults.latent_dim)
        if len(self.ood.mean) != latent_dim:
            raise ValueError(
                f"ood.mean and ood.precision have {len(self.ood.mean)} dimensions but the latent"
                f" has {latent_dim} (architecture_config latent_dim)"
            )

    @property
    def directory(self) -> Path:
        """The folder the manifest was loaded from (weights are relative to it)."""
        if self._directory is None:
            raise ManifestError("manifest was not loaded from a file; no weights directory")
        return self._directory

    @property
    def weights_path(self) -> Path:
        """Absolute path of the weights file."""
        return self.directory / self.weights

    def identity(self) -> ModelIdentity:
        """The identity written into results (short hash: first 16 hex digits)."""
        return ModelIdentity(
            name=self.name, version=self.version, weights_sha256=self.weights_sha256[:16]
        )

    def preprocess_spec(self) -> PreprocessSpec:
        """Parameters for :func:`acwi_node.inference.preprocess.preprocess`."""
        p = self.preprocessing
        return PreprocessSpec(
            size=self.input.size,
            lower_percentile=p.lower_percentile,
            upper_percentile=p.upper_percentile,
            mean=p.mean,
            std=p.std,
        )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _problems(exc: ValidationError) -> str:
    """A validation error on one line: ``where: what`` per problem, ``;`` between them."""
    out = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        what = str(error["msg"]).removeprefix("Value error, ")
        out.append(f"{where}: {what}" if where else what)
    return "; ".join(out)


def load_manifest(path: Path, *, existing: bool = False) -> ModelManifest:
    """Read and validate a manifest (a file, or a folder holding ``manifest.json``).

    ``existing``: the manifest of a model the node already has (the worker's, the health
    check's, an installed version being activated), validated with :data:`EXISTING`: a version
    that is not fixed loads, and is logged once per manifest file and process
    (:func:`warn_moving_version`). Without it (a model being made or installed) such a version
    is refused.

    Raises :class:`ManifestError` when the file is missing or invalid, the weights file does
    not exist, or its SHA-256 differs from ``weights_sha256``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"model manifest not found: {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"model manifest {path} is unreadable: {exc}") from exc
    try:
        manifest = ModelManifest.model_validate(raw, context=EXISTING if existing else None)
    except ValidationError as exc:
        message = f"model manifest {path} is invalid: {_problems(exc)}"
        raise ManifestError(message + refused_version_advice(path, raw)) from exc
    manifest._directory = path.resolve().parent
    weights = manifest.weights_path
    if not weights.is_file():
        raise ManifestError(f"weights file {weights} named by {path} does not exist")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise ManifestError(
            f"weights file {weights} has SHA-256 {actual}, but {path} expects "
            f"{manifest.weights_sha256}: the weights were changed or replaced"
        )
    if existing:
        warn_moving_version(path, manifest)
    return manifest


def moving_version_warning(path: Path, version: str) -> str:
    """For the manifest file ``path`` of a model that exists, whose ``version`` is not fixed
    (:func:`~acwi_node.model_registry.is_fixed_version`): that it loads, why the version
    matters and how to renumber the model; "" for a fixed version."""
    if is_fixed_version(version):
        return ""
    path = Path(path)
    advice = refused_version_advice(path, {"version": version})
    if not advice:  # a [[models]] manifest: its own file is the one to renumber
        advice = f'. Give {path} a fixed "version" (1.0.0)'
    return (
        f"loads, but its version {version!r} is a moving name, which this version of the node"
        f" no longer accepts for a model made or installed: {FIXED_VERSION_RULE}{advice}"
    )


_warned: set[Path] = set()
_warned_lock = threading.Lock()


def warn_moving_version(path: Path, manifest: ModelManifest) -> None:
    """Log :func:`moving_version_warning` for ``manifest`` (loaded from ``path``) as a
    WARNING, once per manifest file and process."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    warning = moving_version_warning(path, manifest.version)
    if not warning:
        return
    key = path.resolve()
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("model %s %s (%s) %s", manifest.name, manifest.version, path, warning)


def refused_version_advice(path: Path, raw: object) -> str:
    """For a manifest that an earlier version of the node installed in the model registry
    (``<data_dir>/models/<name>/<version>/manifest.json``) and whose version this one refuses
    (:func:`~acwi_node.model_registry.is_fixed_version`): how to bring the model back under a
    fixed version, to follow the refusal's reason (or :func:`moving_version_warning`); "" for
    any other manifest."""
    version = raw.get("version") if isinstance(raw, dict) else None
    if not isinstance(version, str) or is_fixed_version(version):
        return ""
    folder = path.parent
    if folder.name != version or folder.parent.parent.name != "models":
        return ""
    name = folder.parent.name
    return (
        f". It was installed in the model registry as {name} {version} before versions had to"
        f' be fixed: copy {folder}, give the copy\'s manifest.json a fixed "version" (1.0.0)'
        f" and run `acwi-node models install COPY --name {name} --activate`"
        " (deploy/README.md, Upgrade the node)"
    )


def write_manifest(manifest: ModelManifest, directory: Path) -> Path:
    """Write ``manifest.json`` into ``directory`` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def default_model_dir() -> Path:
    """The folder of the bundled default model (``models/registry/default``)."""
    return Path(__file__).resolve().parents[2] / "models" / "registry" / "default"
