"""Train DIANet on synthetic multi-site phantoms (or a labelled DICOM folder) and calibrate it.

Pipeline: data (generated in memory through the node's own preprocessing, or read with
``--data DIR``) -> training with class-weighted cross-entropy + heteroscedastic loss + a small
KL term on the latent -> temperature scaling on validation -> uncertainty threshold for the
target review rate on validation -> Mahalanobis OOD statistic of the latent mean (fitted on
training, threshold from validation) -> ``weights.pt`` (state_dict) and ``manifest.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from acwi_node.inference.analyser import mahalanobis, mc_head, summarise_mc
from acwi_node.inference.manifest import (
    MANIFEST_NAME,
    InputSpec,
    ModelManifest,
    OODSpec,
    PreprocessingSpec,
    TrainingSummary,
    sha256_file,
)
from acwi_node.inference.preprocess import PreprocessSpec, resize, to_unit_range
from models.continual import (
    FISHER_NAME,
    FisherState,
    ewc_penalty,
    fisher_diagonal,
    load_fisher,
    save_fisher,
)
from models.data import synth
from models.data.dicom_dataset import (
    Boxes,
    LabelledImage,
    lesion_masks,
    load_unit_images,
    read_boxes,
    scan_folder,
)
from models.model_io import read_manifest, write_model_manifest
from models.networks import Network, build, feature_stride
from models.networks.amrinet import AMRINetConfig
from models.networks.dianet import DIANet, DIANetConfig, DIANetOutput, count_parameters
from models.networks.domain import (
    MixStyle,
    SiteDiscriminator,
    attach_mixstyle,
    grl_schedule,
    site_mmd,
)
from models.networks.heads import (
    ReconstructionHead,
    SegmentationHead,
    anomaly_score,
    dice_score,
    segmentation_loss,
)
from models.networks.localisation import cam_localisation_loss, peak_in_lesion

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

PRESET_DIR = Path(__file__).resolve().parent / "presets"
WEIGHTS_NAME = "weights.pt"
CHECKPOINT_NAME = "checkpoint.pt"
HEADS_NAME = "heads.pt"


# --------------------------------------------------------------------------- configuration


@dataclass
class DataConfig:
    """Where images come from and how many."""

    labels: list[str] = field(default_factory=lambda: list(synth.LABELS))
    normal_label: str = "normal"
    train_images: int = 2000
    val_images: int = 600
    sites: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    #: Matrix sizes the phantoms are generated at (cycled); the model input size is separate.
    sizes: list[int] = field(default_factory=lambda: [128])
    #: Class mix of the validation split (screening-like prevalence).
    class_fractions: dict[str, float] = field(
        default_factory=lambda: dict(synth.DEFAULT_CLASS_FRACTIONS)
    )
    #: Class mix of the training split: richer in findings so that small lesions are seen
    #: often enough; the class-weighted loss removes the prior either way.
    train_class_fractions: dict[str, float] = field(
        default_factory=lambda: dict(synth.DEFAULT_CLASS_FRACTIONS)
    )
    seed: int = 20240101
    #: Processes generating phantoms (1 = in this process).
    workers: int = 1
    #: With ``--data``: the fraction of studies held out for validation.
    val_fraction: float = 0.2
    #: Train from scratch even when a label has no training image (normally an error: the
    #: model would ship an output it never learned). Fine-tuning only warns.
    allow_missing_labels: bool = False


@dataclass
class PreprocessingConfig:
    """Model input size and robust window."""

    input_size: int = 128
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5


@dataclass
class ModelConfig:
    """Network architecture: ``dianet`` (:class:`DIANetConfig`) or ``amrinet``."""

    #: ``dianet`` or ``amrinet`` (see :mod:`models.networks`).
    architecture: str = "dianet"
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 96])
    stem_kernel: int = 9
    pyramid_levels: int = 3
    fusion_level: int = 1
    fpn_channels: int = 48
    feature_channels: int = 64
    latent_dim: int = 32
    dropout: float = 0.2
    #: DIANet only: encoder (``small``, ``resnet50``, ``mobilenetv3``), its channel multiplier,
    #: and the optional latent prototype codebook (0 = off); see :class:`DIANetConfig`.
    backbone: str = "small"
    backbone_width: float = 1.0
    codebook_size: int = 0
    codebook_temperature: float = 1.0
    #: AMRI-Net only: parallel kernel sizes per stage and the transformer encoder's size.
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 5, 7])
    transformer_layers: int = 2
    transformer_heads: int = 4


@dataclass
class OptimConfig:
    """Optimisation and loss weights."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    het_weight: float = 0.5
    het_samples: int = 8
    kl_weight: float = 1e-3
    #: Random translation in pixels (replicate padding) and gamma jitter (+-) in training.
    shift: int = 6
    gamma_jitter: float = 0.15
    seed: int = 0
    threads: int = 2
    channels_last: bool = True


@dataclass
class CalibrationConfig:
    """Post-training fits."""

    target_review_rate: float = 0.2
    mc_samples: int = 20
    ood_quantile: float = 0.99
    ood_shrinkage: float = 0.1


@dataclass
class DomainConfig:
    """Domain alignment across acquisition sites (all off by default)."""

    #: Weight of the mean pairwise-site MMD of the latent mean (0 = off).
    mmd_weight: float = 0.0
    #: Weight of the site discriminator's loss behind gradient reversal (0 = off).
    adversarial_weight: float = 0.0
    #: Gradient-reversal coefficient: "ramp" (0 -> 1 over training, DANN) or "constant" (1).
    adversarial_schedule: str = "ramp"
    adversarial_hidden: int = 32
    #: MixStyle probability per forward pass in training (0 = off) and its Beta(alpha, alpha).
    mixstyle_p: float = 0.0
    mixstyle_alpha: float = 0.1
    #: How many early stages (stem first) MixStyle follows.
    mixstyle_stages: int = 2

    def enabled(self) -> bool:
        """Whether any option is on."""
        return self.mmd_weight > 0 or self.adversarial_weight > 0 or self.mixstyle_p > 0


@dataclass
class ContinualConfig:
    """Elastic weight consolidation (see :mod:`models.continual`)."""

    #: Images (one backward pass each) for the Fisher information written after training
    #: (``fisher.pt`` next to the manifest); 0 writes none.
    fisher_images: int = 256
    #: EWC strength when fine-tuning with ``--init-from`` (0 = plain fine-tuning).
    ewc_lambda: float = 0.0
    #: When fine-tuning, keep BatchNorm running statistics as they were (EWC protects
    #: parameters only). Off by default: with the present presets, statistics re-estimated on
    #: the new site kept the old sites' accuracy and fine-tuned the new site better than
    #: frozen ones, which made it worse (models/README.md, "Continual learning").
    freeze_batchnorm: bool = False


@dataclass
class HeadsConfig:
    """Optional dense heads on the feature map (see :mod:`models.networks.heads`)."""

    #: Weight of the lesion-segmentation loss (0 = no head; needs synthetic data's masks).
    segmentation_weight: float = 0.0
    #: Weight of the reconstruction loss on normal images (0 = no head).
    reconstruction_weight: float = 0.0
    decoder_width: int = 16

    def enabled(self) -> bool:
        """Whether any head is on."""
        return self.segmentation_weight > 0 or self.reconstruction_weight > 0


@dataclass
class LocalisationConfig:
    """Supervision of the CAM heatmap by lesion masks (see :mod:`models.networks.localisation`)."""

    #: Weight of the CAM localisation loss (0 = off). Needs lesion masks: the synthetic
    #: phantoms have them; a DICOM folder (``--data``) gives its ``labels.csv`` boxes, and
    #: without any the term is off.
    cam_weight: float = 0.0
    #: Temperature of the map's spatial softmax in the loss.
    temperature: float = 1.0
    #: Weight of the share of the map's positive part outside the lesion (a sharper map).
    outside_weight: float = 0.0


@dataclass
class TrainingConfig:
    """A whole training run (a preset, optionally overridden by ``--config``)."""

    name: str = "acwi-dianet-chest"
    version: str = "1.0.0"
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    localisation: LocalisationConfig = field(default_factory=LocalisationConfig)

    def network(self) -> tuple[str, dict[str, Any]]:
        """Architecture name and ``architecture_config`` of the network this run trains."""
        m = self.model
        if m.architecture == "dianet":
            return "dianet", self.architecture().to_dict()
        if m.architecture == "amrinet":
            return "amrinet", AMRINetConfig(
                num_classes=len(self.data.labels),
                widths=tuple(m.widths),
                stem_kernel=m.stem_kernel,
                kernel_sizes=tuple(m.kernel_sizes),
                feature_channels=m.feature_channels,
                transformer_layers=m.transformer_layers,
                transformer_heads=m.transformer_heads,
                input_size=self.preprocessing.input_size,
                latent_dim=m.latent_dim,
                dropout=m.dropout,
            ).to_dict()
        raise ValueError(f"unknown model.architecture {m.architecture!r}: dianet or amrinet")

    def architecture(self) -> DIANetConfig:
        """The network configuration for this run."""
        m = self.model
        return DIANetConfig(
            num_classes=len(self.data.labels),
            widths=tuple(m.widths),
            stem_kernel=m.stem_kernel,
            pyramid_levels=m.pyramid_levels,
            fusion_level=m.fusion_level,
            fpn_channels=m.fpn_channels,
            feature_channels=m.feature_channels,
            latent_dim=m.latent_dim,
            dropout=m.dropout,
            backbone=m.backbone,
            backbone_width=m.backbone_width,
            codebook_size=m.codebook_size,
            codebook_temperature=m.codebook_temperature,
        )


T = TypeVar("T")


def _build(cls: Callable[..., T], values: dict[str, Any], where: str) -> T:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in [{where}]: {sorted(unknown)}")
    return cls(**values)


def config_from_dict(data: dict[str, Any]) -> TrainingConfig:
    """A :class:`TrainingConfig` from nested dictionaries (unknown keys are errors)."""
    sections: dict[str, Callable[..., Any]] = {
        "data": DataConfig,
        "preprocessing": PreprocessingConfig,
        "model": ModelConfig,
        "train": OptimConfig,
        "calibration": CalibrationConfig,
        "domain": DomainConfig,
        "continual": ContinualConfig,
        "heads": HeadsConfig,
        "localisation": LocalisationConfig,
    }
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            top[key] = _build(sections[key], dict(value), key)
        else:
            top[key] = value
    return _build(TrainingConfig, top, "top level")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(preset: str = "default", config_file: Path | None = None) -> TrainingConfig:
    """Load ``presets/<preset>.toml`` and deep-merge ``config_file`` (TOML) over it."""
    path = PRESET_DIR / f"{preset}.toml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise ValueError(f"unknown preset {preset!r}; available: {available}")
    data = tomllib.loads(path.read_text())
    data.setdefault("preset", preset)
    if config_file is not None:
        data = _merge(data, tomllib.loads(Path(config_file).read_text()))
    return config_from_dict(data)


# --------------------------------------------------------------------------- data


@dataclass
class ImageSet:
    """Unit-range images ``(N, S, S)`` with label indices and sites (-1 when unknown)."""

    images: np.ndarray
    targets: np.ndarray
    sites: np.ndarray
    #: Lesion masks ``(N, S, S)`` in {0, 1} at the model input size (the synthetic phantoms',
    #: or a DICOM folder's lesion boxes); None when there are none.
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def _label_plan(n: int, fractions: dict[str, float], labels: Sequence[str]) -> list[str]:
    """Exactly proportional label counts (largest remainder), in label order."""
    names = [name for name in labels if fractions.get(name, 0.0) > 0]
    weights = np.asarray([fractions[name] for name in names], dtype=float)
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: n - int(counts.sum())]:
        counts[i] += 1
    return [name for name, c in zip(names, counts, strict=True) for _ in range(int(c))]


def _render(job: tuple[str, int, int, int, PreprocessSpec]) -> np.ndarray:
    """One synthetic image through the DICOM path and the node's preprocessing."""
    label, site, seed, size, spec = job
    phantom = synth.make_phantom(label, site, seed, size)
    ds = synth.make_dataset(
        phantom.pixels,
        site=site,
        modality=synth.SITES[site].modality,
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        sop_instance_uid="2.25.3",
    )
    return to_unit_range(ds, spec)


def _render_with_mask(job: tuple[str, int, int, int, PreprocessSpec]) -> np.ndarray:
    """:func:`_render` and the lesion mask resized like the image, stacked ``(2, S, S)``."""
    label, site, seed, size, spec = job
    image = _render(job)
    mask = synth.make_phantom(label, site, seed, size).mask.astype(np.float32)
    return np.stack([image, (resize(mask, spec.size) > 0.5).astype(np.float32)])


def _single_thread() -> None:
    torch.set_num_threads(1)


def synthetic_split(
    config: TrainingConfig, split: str, n: int, spec: PreprocessSpec, *, masks: bool = False
) -> ImageSet:
    """Generate ``n`` images of one split (``train`` or ``val``) deterministically.

    With ``masks``, the lesion masks come along (resized as the images are).
    """
    d = config.data
    split_id = {"train": 1, "val": 2}[split]
    rng = np.random.default_rng([d.seed, split_id])
    fractions = d.train_class_fractions if split == "train" else d.class_fractions
    plan = _label_plan(n, fractions, d.labels)
    order = rng.permutation(len(plan))
    labels = [plan[i] for i in order]
    sites = [int(d.sites[i % len(d.sites)]) for i in range(len(labels))]
    rng.shuffle(sites)
    jobs = [
        (
            label,
            site,
            int(np.random.SeedSequence([d.seed, split_id, i]).generate_state(1)[0]),
            d.sizes[i % len(d.sizes)],
            spec,
        )
        for i, (label, site) in enumerate(zip(labels, sites, strict=True))
    ]
    render: Callable[[tuple[str, int, int, int, PreprocessSpec]], np.ndarray] = (
        _render_with_mask if masks else _render
    )
    if d.workers > 1:
        # Forked workers keep one intra-op thread each, so an inherited thread pool is unused.
        with ProcessPoolExecutor(
            d.workers, mp_context=get_context("fork"), initializer=_single_thread
        ) as pool:
            images = list(pool.map(render, jobs, chunksize=32))
    else:
        images = [render(job) for job in jobs]
    index = {name: i for i, name in enumerate(d.labels)}
    stack = np.stack(images).astype(np.float32)
    return ImageSet(
        stack[:, 0] if masks else stack,
        np.asarray([index[name] for name in labels], dtype=np.int64),
        np.asarray(sites, dtype=np.int64),
        stack[:, 1] if masks else None,
    )


def validation_mask(items: Sequence[LabelledImage], val_fraction: float, seed: int) -> np.ndarray:
    """Which of ``items`` are held out for validation: whole patients (their pseudonym) where
    known, else whole studies, ``val_fraction`` of them (at least one of two or more), drawn
    with ``seed``. A study whose patient only some of its rows name (a ``labels.csv`` filled
    in part) is that patient's whole: its other images do not land on the other side."""
    patient_of_study: dict[str, str] = {}
    for item in items:
        if item.patient:
            patient_of_study.setdefault(item.study_instance_uid, item.patient)
    group_of = [
        item.patient
        or patient_of_study.get(item.study_instance_uid)
        or f"study:{item.study_instance_uid}"
        for item in items
    ]
    groups = sorted(set(group_of))
    rng = np.random.default_rng([seed, 3])
    n_val = max(1, round(len(groups) * val_fraction)) if len(groups) > 1 else 0
    val_groups = set(rng.permutation(groups)[:n_val].tolist())
    return np.asarray([group in val_groups for group in group_of], dtype=bool)


def folder_splits(
    config: TrainingConfig,
    root: Path,
    spec: PreprocessSpec,
    masks: bool = False,
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[ImageSet, ImageSet, dict[str, str]]:
    """Train/validation sets from a labelled DICOM folder, split by patient where
    ``labels.csv`` names them (its ``patient`` column: the feedback export's pseudonyms), else
    by study (seeded): a patient's studies all land on one side, so validation never scores
    the model on a patient it trained on.

    With a single group there is nothing to hold out and validation reuses the training set.
    Also returns the files the preprocessing refused, with their reasons. With ``masks``, the
    lesion boxes (``labels.csv``'s ``box`` column, one or several per image, or side-cars) come
    along as masks at the input size, each image's the union of its boxes
    (:func:`~models.data.dicom_dataset.lesion_masks`), when any image has one. ``log`` hears
    how many DICOM images have no row in ``labels.csv``.
    """
    d = config.data
    items = scan_folder(root, labels=d.labels, log=log)
    if not items:
        raise ValueError(f"no labelled DICOM images found under {root}")
    images, kept, refused = load_unit_images(items, spec)
    is_val = validation_mask([items[i] for i in kept], d.val_fraction, d.seed)
    index = {name: i for i, name in enumerate(d.labels)}
    targets = np.asarray([index[items[i].label] for i in kept], dtype=np.int64)
    sites = np.asarray(
        [-1 if items[i].site is None else items[i].site for i in kept], dtype=np.int64
    )
    mask_set: np.ndarray | None = None
    if masks:
        loaded = [items[i] for i in kept]
        boxes: dict[str, Boxes] = read_boxes(root, loaded)
        if any(boxes.get(item.name) for item in loaded):
            mask_set = lesion_masks(loaded, boxes, spec)
    train = ImageSet(
        images[~is_val],
        targets[~is_val],
        sites[~is_val],
        None if mask_set is None else mask_set[~is_val],
    )
    val = ImageSet(
        images[is_val],
        targets[is_val],
        sites[is_val],
        None if mask_set is None else mask_set[is_val],
    )
    if len(val) == 0:
        val = train
    return train, val, refused


def _masked(images: ImageSet) -> int:
    """How many of a set's images have a non-empty lesion mask."""
    if images.masks is None:
        return 0
    return int((images.masks.reshape(len(images.masks), -1).max(axis=1) > 0).sum())


# --------------------------------------------------------------------------- losses


class LossTerms(NamedTuple):
    """Loss components and their weighted total."""

    ce: Tensor
    het: Tensor
    kl: Tensor
    total: Tensor


def heteroscedastic_nll(
    logits: Tensor,
    log_var: Tensor,
    targets: Tensor,
    class_weights: Tensor | None = None,
    samples: int = 8,
) -> Tensor:
    """Class-weighted NLL of the softmax averaged over Gaussian-corrupted logits.

    ``-log mean_s softmax(logits + exp(log_var / 2) * eps_s)[y]`` (Kendall and Gal, 2017).
    """
    eps = torch.randn((samples, *logits.shape), device=logits.device, dtype=logits.dtype)
    noisy = logits.unsqueeze(0) + torch.exp(0.5 * log_var).unsqueeze(0) * eps
    log_p = torch.log_softmax(noisy, dim=-1)
    index = targets.view(1, -1, 1).expand(samples, -1, 1)
    picked = log_p.gather(-1, index).squeeze(-1)  # (S, B)
    nll = -(torch.logsumexp(picked, dim=0) - math.log(samples))
    if class_weights is None:
        return nll.mean()
    w = class_weights[targets]
    return (w * nll).sum() / w.sum()


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), averaged over batch and latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def loss_terms(
    out: DIANetOutput,
    targets: Tensor,
    class_weights: Tensor | None,
    *,
    het_weight: float,
    kl_weight: float,
    het_samples: int = 8,
) -> LossTerms:
    """``total = CE_w + het_weight * heteroscedastic + kl_weight * KL``."""
    ce = F.cross_entropy(out.logits, targets, weight=class_weights)
    het = heteroscedastic_nll(out.logits, out.log_var, targets, class_weights, het_samples)
    kl = kl_standard_normal(out.mu, out.logvar_latent)
    return LossTerms(ce, het, kl, ce + het_weight * het + kl_weight * kl)


def class_weights_for(targets: np.ndarray, num_classes: int) -> Tensor:
    """Inverse-frequency weights normalised to mean 1 over present classes."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    present = weights > 0
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


# --------------------------------------------------------------------------- training


def _augment(unit: Tensor, generator: torch.Generator, shift: int, gamma_jitter: float) -> Tensor:
    """Random translation (replicate padding) and gamma jitter of unit-range images."""
    b = unit.shape[0]
    if gamma_jitter > 0:
        gamma = 1.0 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * gamma_jitter
        unit = unit.clamp_min(0.0) ** gamma
    if shift > 0:
        size = unit.shape[-1]
        padded = F.pad(unit, (shift, shift, shift, shift), mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator)
        unit = torch.stack(
            [
                padded[i, :, int(dy) : int(dy) + size, int(dx) : int(dx) + size]
                for i, (dy, dx) in enumerate(offsets.tolist())
            ]
        )
    return unit


@dataclass
class Evaluation:
    """Validation metrics from the deterministic (no dropout) head."""

    accuracy: float
    balanced_accuracy: float
    nll: float


def balanced_accuracy(pred: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over classes present in ``targets``."""
    recalls = [
        float((pred[targets == k] == k).mean()) for k in range(num_classes) if (targets == k).any()
    ]
    return float(np.mean(recalls)) if recalls else 0.0


def _batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


@torch.no_grad()
def encode_all(model: Network, x: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluation-mode pooled features, latent means and deterministic logits."""
    model.eval()
    pooled, mus, logits = [], [], []
    for chunk in _batches(x, batch_size):
        enc = model.encode(chunk)
        pooled.append(enc.pooled)
        mus.append(enc.mu)
        logits.append(model.head(enc.pooled).logits)
    return torch.cat(pooled), torch.cat(mus), torch.cat(logits)


def evaluate(model: Network, x: Tensor, targets: np.ndarray) -> Evaluation:
    """Accuracy, balanced accuracy and NLL of the deterministic head."""
    _, _, logits = encode_all(model, x)
    pred = logits.argmax(dim=1).numpy()
    nll = float(F.cross_entropy(logits, torch.from_numpy(targets)))
    return Evaluation(
        float((pred == targets).mean()),
        balanced_accuracy(pred, targets, logits.shape[1]),
        nll,
    )


def fit_temperature(logits: Tensor, targets: np.ndarray) -> float:
    """Temperature minimising the NLL of ``mean_t softmax(logits_t / T)`` (``(T, N, K)``)."""
    y = torch.from_numpy(targets)

    def nll(temperature: float) -> float:
        p = torch.softmax(logits.double() / temperature, dim=-1).mean(dim=0)
        return float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean())

    grid = np.exp(np.linspace(np.log(0.2), np.log(10.0), 61))
    best = float(min(grid, key=nll))
    lo, hi = best / 1.07, best * 1.07
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def fit_ood(train_mu: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of the latent means (covariance shrunk towards its mean variance)."""
    mean = train_mu.mean(axis=0)
    cov = np.cov(train_mu, rowvar=False)
    dim = cov.shape[0]
    target = np.eye(dim) * np.trace(cov) / dim
    shrunk = (1.0 - shrinkage) * cov + shrinkage * target + 1e-6 * np.eye(dim)
    return mean, np.linalg.inv(shrunk)


@dataclass
class TrainResult:
    """What a training run produced."""

    manifest_path: Path
    weights_path: Path
    manifest: ModelManifest
    seconds: float
    val: Evaluation
    history: list[dict[str, float]] = field(default_factory=list)


def _log(message: str) -> None:
    print(message, flush=True)


@dataclass
class InitialModel:
    """Weights and input statistics a fine-tuning run starts from (``--init-from``)."""

    source: Path
    state: dict[str, Tensor]
    architecture: str
    architecture_config: dict[str, Any]
    mean: float
    std: float
    description: str
    fisher: FisherState | None
    #: The model's labels, in the order of its output rows (None: a checkpoint written before
    #: checkpoints recorded them), and its normal label.
    labels: list[str] | None = None
    normal_label: str | None = None


def load_initial(path: Path) -> InitialModel:
    """Load a model to fine-tune: a manifest (file or folder) or a training checkpoint.

    A ``fisher.pt`` next to the manifest (or inside a checkpoint) is picked up for EWC. The
    model's labels come along: fine-tuning must keep them (:func:`check_initial_labels`).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "model" not in state or "input_stats" not in state:
            raise ValueError(f"{path} is not a training checkpoint of this trainer")
        mean, std = state["input_stats"]
        fisher = FisherState.from_dict(state["fisher"]) if state.get("fisher") else None
        return InitialModel(
            path,
            dict(state["model"]),
            str(state.get("architecture", "dianet")),
            dict(state["architecture_config"]),
            float(mean),
            float(std),
            f"checkpoint {path.name} (epoch {state.get('epoch')})",
            fisher,
            list(state["labels"]) if state.get("labels") else None,
            str(state["normal_label"]) if state.get("normal_label") else None,
        )
    manifest, architecture = read_manifest(path)
    weights = torch.load(manifest.weights_path, map_location="cpu", weights_only=True)
    fisher_path = manifest.directory / FISHER_NAME
    normal = [name for name in manifest.labels if name not in manifest.finding_labels]
    return InitialModel(
        manifest.directory,
        dict(weights),
        architecture,
        dict(manifest.architecture_config),
        manifest.preprocessing.mean,
        manifest.preprocessing.std,
        f"{manifest.name} {manifest.version}",
        load_fisher(fisher_path) if fisher_path.is_file() else None,
        list(manifest.labels),
        normal[0] if len(normal) == 1 else None,
    )


def check_initial_labels(initial: InitialModel, labels: Sequence[str], normal_label: str) -> None:
    """Refuse to fine-tune ``initial`` onto other labels than its own, in its order.

    Fine-tuning keeps the model's output rows (and EWC holds each to what it learned), so a
    reordered or renamed ``data.labels`` would silently give an old row a new meaning.
    """
    if initial.labels is not None and list(labels) != initial.labels:
        raise ValueError(
            f"--init-from {initial.description} has the labels {initial.labels} (its output"
            f" rows, in this order), but data.labels is {list(labels)}: fine-tuning keeps the"
            " model's output rows, so set [data] labels = "
            + json.dumps(initial.labels)
            + " in --config (and label the data with them); a model with other labels is a"
            " new model: train it without --init-from"
        )
    if initial.normal_label is not None and normal_label != initial.normal_label:
        raise ValueError(
            f"--init-from {initial.description} has the normal label {initial.normal_label!r},"
            f" but data.normal_label is {normal_label!r}"
        )


class _DomainLosses:
    """MMD and adversarial site losses of one batch (see :class:`DomainConfig`)."""

    def __init__(self, config: DomainConfig, sites: np.ndarray, latent_dim: int) -> None:
        self.config = config
        known = sorted({int(s) for s in sites.tolist() if s >= 0})
        self.site_index = {site: i for i, site in enumerate(known)}
        self.usable = len(known) >= 2
        if config.adversarial_schedule not in ("ramp", "constant"):
            raise ValueError("domain.adversarial_schedule must be 'ramp' or 'constant'")
        self.discriminator: SiteDiscriminator | None = None
        if config.adversarial_weight > 0 and self.usable:
            self.discriminator = SiteDiscriminator(
                latent_dim, len(known), config.adversarial_hidden
            )

    def coefficient(self, progress: float) -> float:
        if self.config.adversarial_schedule == "constant":
            return 1.0
        return grl_schedule(progress)

    def __call__(self, mu: Tensor, sites: Tensor, progress: float) -> tuple[Tensor, Tensor]:
        zero = mu.new_zeros(())
        if not self.usable:
            return zero, zero
        mmd = site_mmd(mu, sites) if self.config.mmd_weight > 0 else zero
        adv = zero
        if self.discriminator is not None:
            index = torch.tensor([self.site_index.get(int(s), -1) for s in sites.tolist()])
            keep = index >= 0
            if int(keep.sum()) > 0:
                logits = self.discriminator(mu[keep], self.coefficient(progress))
                adv = F.cross_entropy(logits, index[keep])
        return mmd, adv


class _DenseHeads:
    """The optional segmentation / reconstruction heads of a run (see :class:`HeadsConfig`)."""

    def __init__(self, config: HeadsConfig, channels: int, stride: int, normal_index: int) -> None:
        self.config = config
        self.normal_index = normal_index
        w = config.decoder_width
        self.segmentation = (
            SegmentationHead(channels, stride, w) if config.segmentation_weight > 0 else None
        )
        self.reconstruction = (
            ReconstructionHead(channels, stride, w) if config.reconstruction_weight > 0 else None
        )

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.segmentation, self.reconstruction) if m is not None]

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    def __call__(
        self, features: Tensor, x: Tensor, y: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        seg = rec = features.new_zeros(())
        if self.segmentation is not None and mask is not None:
            seg = segmentation_loss(self.segmentation(features), mask)
        if self.reconstruction is not None:
            normal = y == self.normal_index
            if bool(normal.any()):
                rec = F.mse_loss(self.reconstruction(features[normal]), x[normal])
        return seg, rec

    @torch.no_grad()
    def validate(
        self, model: Network, x: Tensor, targets: np.ndarray, masks: np.ndarray | None
    ) -> dict[str, float]:
        """Validation Dice on lesion images and the reconstruction anomaly AUROC."""
        from models.evaluate import roc_auc

        self.train(False)
        model.eval()
        dice: list[Tensor] = []
        scores: list[Tensor] = []
        for start in range(0, x.shape[0], 64):
            chunk = x[start : start + 64]
            features = model.encode(chunk).features
            if self.segmentation is not None and masks is not None:
                m = torch.from_numpy(masks[start : start + 64]).unsqueeze(1)
                pred = self.segmentation(features) > 0
                has = m.flatten(1).sum(1) > 0
                if bool(has.any()):
                    dice.append(dice_score(pred[has], m[has]))
            if self.reconstruction is not None:
                scores.append(anomaly_score(chunk, self.reconstruction(features)))
        metrics: dict[str, float] = {}
        if dice:
            metrics["val_lesion_dice"] = float(torch.cat(dice).mean())
        if scores:
            finding = targets != self.normal_index
            auc = roc_auc(torch.cat(scores).numpy(), finding)
            if auc is not None:
                metrics["val_anomaly_auroc"] = auc
        return metrics

    def save(self, path: Path, stride: int, metrics: dict[str, float]) -> None:
        torch.save(
            {
                "config": dataclasses.asdict(self.config),
                "stride": stride,
                "segmentation": self.segmentation.state_dict() if self.segmentation else None,
                "reconstruction": (
                    self.reconstruction.state_dict() if self.reconstruction else None
                ),
                "metrics": metrics,
            },
            path,
        )


def build_network(config: TrainingConfig, initial: InitialModel | None = None) -> Network:
    """The network of ``config`` (or of the model being fine-tuned), untrained."""
    if initial is not None:
        return build(initial.architecture, initial.architecture_config)
    return build(*config.network())


def _compute_fisher(
    model: torch.nn.Module, x: Tensor, y: Tensor, images: int, dataset: str
) -> FisherState:
    """Fisher information on (a seeded subset of) the given normalised images."""
    n = min(images, x.shape[0])
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(11))[:n]
    return fisher_diagonal(model, x[pick], y[pick], dataset=dataset)


#: Where a manifest field comes from in the configuration (for the errors of check_config).
_MANIFEST_KEYS = {
    "labels": "data.labels",
    "finding_labels": "data.labels",
    "input.size": "preprocessing.input_size",
    "preprocessing.lower_percentile": "preprocessing.lower_percentile",
    "preprocessing.upper_percentile": "preprocessing.upper_percentile",
    "target_review_rate": "calibration.target_review_rate",
    "mc_samples": "calibration.mc_samples",
    "ood.quantile": "calibration.ood_quantile",
    "training.epochs": "train.epochs",
    "training.seed": "train.seed",
}


def check_config(config: TrainingConfig, initial: InitialModel | None = None) -> None:
    """Refuse, before any training, a configuration that cannot give a valid model: fewer
    than one epoch or image per batch, a normal label outside ``data.labels``, labels other
    than those of the model to fine-tune (``initial``), or a manifest field (name, version,
    labels, calibration) the node's manifest schema would refuse."""
    opt, d, p, cal = config.train, config.data, config.preprocessing, config.calibration
    if opt.epochs < 1:
        raise ValueError(f"train.epochs (--epochs) must be at least 1, not {opt.epochs}")
    if opt.batch_size < 1:
        raise ValueError(f"train.batch_size must be at least 1, not {opt.batch_size}")
    if d.normal_label not in d.labels:
        raise ValueError(
            f"data.normal_label {d.normal_label!r} must be one of data.labels {list(d.labels)}"
        )
    if initial is not None:
        check_initial_labels(initial, d.labels, d.normal_label)
        arch_config = dict(initial.architecture_config)
    else:
        arch_config = config.network()[1]
    dim = int(arch_config.get("latent_dim", 1))
    placeholder = {
        "name": config.name,
        "version": config.version,
        "architecture": "dianet",
        "architecture_config": arch_config,
        "labels": list(d.labels),
        "finding_labels": [name for name in d.labels if name != d.normal_label],
        "input": {"size": p.input_size, "channels": 1},
        "preprocessing": {
            "lower_percentile": p.lower_percentile,
            "upper_percentile": p.upper_percentile,
            "mean": 0.0,
            "std": 1.0,
        },
        "temperature": 1.0,
        "uncertainty_threshold": 0.5,
        "target_review_rate": cal.target_review_rate,
        "mc_samples": cal.mc_samples,
        "ood": {
            "mean": [0.0] * dim,
            "precision": np.eye(dim).tolist(),
            "threshold": 1.0,
            "quantile": cal.ood_quantile,
        },
        "weights": WEIGHTS_NAME,
        "weights_sha256": "0" * 64,
        "created_at": dt.datetime.now(dt.timezone.utc),
        "training": {
            "dataset": "",
            "epochs": opt.epochs,
            "train_images": 0,
            "val_images": 0,
            "val_accuracy": 0.0,
            "val_balanced_accuracy": 0.0,
            "val_nll": 0.0,
            "seconds": 0.0,
            "seed": opt.seed,
            "preset": config.preset,
        },
    }
    try:
        ModelManifest.model_validate(placeholder)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            if where:
                key = _MANIFEST_KEYS.get(where, where)
                problems.append(f"{key}: {error['msg']} (got {error.get('input')!r})")
            else:  # a check across fields
                problems.append(str(error["msg"]).removeprefix("Value error, "))
        raise ValueError(
            "the configuration cannot give a valid model manifest: " + "; ".join(problems)
        ) from None


def _check_label_counts(
    config: TrainingConfig, train_set: ImageSet, *, fine_tuning: bool, log: Callable[[str], None]
) -> None:
    """Refuse (from scratch) or warn about (fine-tuning) labels without a training image."""
    labels = list(config.data.labels)
    counts = np.bincount(train_set.targets, minlength=len(labels))
    missing = [name for name, n in zip(labels, counts, strict=True) if n == 0]
    if not missing:
        return
    per_label = ", ".join(f"{name} {int(n)}" for name, n in zip(labels, counts, strict=True))
    if fine_tuning:
        log(
            f"warning: no training images of {missing} (training images per label: "
            f"{per_label}); the model's rows for them only keep what it learned before"
            " (--ewc-lambda holds them to it)"
        )
        return
    if config.data.allow_missing_labels:
        log(
            f"warning: no training images of {missing} (training images per label: "
            f"{per_label}); data.allow_missing_labels is set, so the model learns nothing of"
            " them"
        )
        return
    raise ValueError(
        f"no training images of {missing} (training images per label: {per_label}): the model"
        " would have outputs it never learned. Add images of every label in data.labels, or"
        " list only the labels the data has in [data] labels"
    )


#: Settings a resumed run may change: they do not alter what the training loop computes
#: (threads and workers only its speed; the calibration, Fisher, name and version come after).
RESUME_FREE_SETTINGS = frozenset(
    {
        "name",
        "version",
        "preset",
        "calibration",
        "data.workers",
        "train.threads",
        "continual.fisher_images",
    }
)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and not key.endswith("fractions"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_fingerprint(
    config: TrainingConfig, sets: Sequence[ImageSet], initial: InitialModel | None
) -> dict[str, Any]:
    """What a checkpoint must have been trained with for ``--resume`` to continue it: the
    settings that shape the training loop (not :data:`RESUME_FREE_SETTINGS`) and SHA-256
    digests of the training and validation data (images, labels, sites, lesion masks) and of
    the starting weights (``--init-from``)."""
    settings = {
        key: value
        for key, value in _flatten(dataclasses.asdict(config)).items()
        if key not in RESUME_FREE_SETTINGS and key.split(".")[0] not in RESUME_FREE_SETTINGS
    }
    data = hashlib.sha256()
    for image_set in sets:
        for array in (image_set.images, image_set.targets, image_set.sites, image_set.masks):
            if array is None:
                data.update(b"none")
                continue
            array = np.ascontiguousarray(array)
            data.update(f"{array.dtype.str}{array.shape}".encode())
            data.update(array.tobytes())
    start = hashlib.sha256()
    if initial is not None:
        for key, tensor in sorted(initial.state.items()):
            start.update(key.encode())
            start.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {
        "settings": settings,
        "data_sha256": data.hexdigest(),
        "initial_sha256": start.hexdigest() if initial is not None else None,
    }


def check_resume(saved: dict[str, Any] | None, run: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to continue ``checkpoint`` (its :func:`run_fingerprint` ``saved``) with another
    run's settings, data or starting model: the result would be neither run. A checkpoint
    written before checkpoints recorded it (``saved`` None) is continued as it is."""
    if saved is None:
        return
    again = "resume with the same, or train again without --resume (or delete it)"
    old, new = saved.get("settings", {}), run["settings"]
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changed:
        listed = "; ".join(f"{key} {old.get(key)!r}, now {new.get(key)!r}" for key in changed)
        raise ValueError(
            f"--resume: {checkpoint} was trained with other settings ({listed}): {again}"
        )
    if saved.get("data_sha256") != run["data_sha256"]:
        raise ValueError(
            f"--resume: {checkpoint} was trained on other data (the images, labels, sites or"
            f" lesion boxes differ from this run's): {again}"
        )
    if saved.get("initial_sha256") != run["initial_sha256"]:
        raise ValueError(
            f"--resume: {checkpoint} was started from another model (--init-from): {again}"
        )


def _check_finite(model: Network | None, **values: float) -> None:
    """Refuse a trained model with non-finite weights, or non-finite calibration ``values``."""
    bad = []
    if model is not None:
        state = model.state_dict()
        bad = [n for n, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    bad += [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(
            f"training diverged: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} not"
            f" finite; lower train.lr or check the data"
        )


def _model_files(out_dir: Path) -> set[str]:
    """The files of the model in ``out_dir``: its manifest's weights and ONNX files (file
    names in the folder only), a Fisher file and dense heads."""
    files = {FISHER_NAME, HEADS_NAME}
    try:
        raw = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    if not isinstance(raw, dict):
        raw = {}
    named = [raw.get("weights")]
    named += [
        rec.get("file") for rec in (raw.get("onnx"), raw.get("full_onnx")) if isinstance(rec, dict)
    ]
    files.update(n for n in named if isinstance(n, str) and n and Path(n).name == n)
    return {name for name in files if (out_dir / name).is_file()}


def _install(staging: Path, out_dir: Path) -> list[str]:
    """Move a finished model's files from ``staging`` into ``out_dir`` (the manifest last, the
    old manifest first out, so the folder never pairs a manifest with other weights) and
    remove the files of the model there before that this one does not have. Returns those."""
    out_dir.mkdir(parents=True, exist_ok=True)
    produced = {path.name for path in staging.iterdir()}
    stale = _model_files(out_dir) - produced
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for name in sorted(produced - {MANIFEST_NAME}):
        os.replace(staging / name, out_dir / name)
    for name in sorted(stale):
        (out_dir / name).unlink(missing_ok=True)
    os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    staging.rmdir()
    return sorted(stale)


def train(
    config: TrainingConfig,
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    resume: bool = False,
    init_from: Path | None = None,
    ewc_data: Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = _log,
) -> TrainResult:
    """Run the whole pipeline and write ``weights.pt`` and ``manifest.json`` into ``out_dir``.

    ``init_from`` (a manifest or a training checkpoint) fine-tunes that model instead of
    training from scratch, keeping its architecture, labels and input statistics; with
    ``continual.ewc_lambda > 0`` the EWC penalty holds it near the old task (Fisher from the
    model's ``fisher.pt``, else computed on ``ewc_data`` or on the configured synthetic data).

    The configuration is checked before any training (epochs, the manifest's fields), and an
    ``out_dir`` that already holds a model (``manifest.json``) is refused unless
    ``overwrite``. The model's files are written into a temporary folder beside ``out_dir``
    and moved in only once all of them are: a run that fails (a diverging loss stops it
    with an error) leaves ``out_dir``'s model as it was; only ``checkpoint.pt``, for
    ``resume``, is written there during training.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    opt = config.train
    labels = list(config.data.labels)
    initial = load_initial(init_from) if init_from is not None else None
    check_config(config, initial)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    if (out_dir / MANIFEST_NAME).exists() and not overwrite:
        raise ValueError(
            f"--out {out_dir} already holds a model ({MANIFEST_NAME}); pass --overwrite to"
            " replace it (it stays as it is until the new one is complete), or choose another"
            " --out"
        )
    torch.set_num_threads(max(1, opt.threads))
    torch.manual_seed(opt.seed)
    p = config.preprocessing
    unit_spec = PreprocessSpec(p.input_size, p.lower_percentile, p.upper_percentile)
    ewc_lambda = config.continual.ewc_lambda
    if ewc_lambda > 0 and initial is None:
        raise ValueError("continual.ewc_lambda needs a model to start from (--init-from)")

    if config.heads.segmentation_weight > 0 and data_dir is not None:
        raise ValueError("heads.segmentation_weight needs lesion masks: synthetic data only")
    cam_wanted = config.localisation.cam_weight > 0
    if data_dir is None:
        want_masks = config.heads.segmentation_weight > 0 or cam_wanted
        train_set = synthetic_split(
            config, "train", config.data.train_images, unit_spec, masks=want_masks
        )
        val_set = synthetic_split(
            config, "val", config.data.val_images, unit_spec, masks=want_masks
        )
        dataset_name = f"synthetic phantoms, sites {config.data.sites}, seed {config.data.seed}"
    else:
        train_set, val_set, refused = folder_splits(
            config, data_dir, unit_spec, cam_wanted, log=log
        )
        for path, reason in refused.items():
            log(f"skipped {path}: {reason}")
        dataset_name = f"DICOM folder {Path(data_dir).name}"
    _check_label_counts(config, train_set, fine_tuning=initial is not None, log=log)
    cam_weight = config.localisation.cam_weight if train_set.masks is not None else 0.0
    if cam_wanted and data_dir is not None:
        if cam_weight > 0:
            log(f"localisation: lesion boxes for {_masked(train_set)} training images")
        else:
            log(
                "localisation: no lesion boxes (labels.csv's box column) for the training"
                " images; the CAM localisation loss is off"
            )
    log(
        f"data: {len(train_set)} train / {len(val_set)} val images "
        f"({time.perf_counter() - started:.1f}s)"
    )

    if initial is not None:
        # The fine-tuned model keeps the old input statistics: the old task stays valid.
        mean, std = initial.mean, initial.std
    else:
        mean = float(train_set.images.mean())
        std = float(train_set.images.std()) or 1.0
    x_train_unit = torch.from_numpy(train_set.images).unsqueeze(1)
    x_val = (torch.from_numpy(val_set.images).unsqueeze(1) - mean) / std
    y_train = torch.from_numpy(train_set.targets)
    s_train = torch.from_numpy(train_set.sites)
    m_train = (
        torch.from_numpy(train_set.masks).unsqueeze(1) if train_set.masks is not None else None
    )
    weights = class_weights_for(train_set.targets, len(labels))

    model = build_network(config, initial)
    arch_name = initial.architecture if initial is not None else config.network()[0]
    arch_config: dict[str, Any] = model.config.to_dict()
    if int(arch_config["num_classes"]) != len(labels):
        raise ValueError(
            f"the model has {arch_config['num_classes']} classes, data.labels {len(labels)}"
        )
    fisher_state: FisherState | None = None
    if initial is not None:
        model.load_state_dict(initial.state)
        log(f"initialised from {initial.description}")
        if ewc_lambda > 0:
            fisher_state = initial.fisher
            if fisher_state is None:
                fisher_state = _old_task_fisher(config, model, initial, ewc_data, unit_spec, log)
            log(f"EWC: lambda {ewc_lambda:g}, Fisher from {fisher_state.images} images")
    stride = feature_stride(arch_name, arch_config)
    normal_index = labels.index(config.data.normal_label)
    dense = _DenseHeads(config.heads, int(arch_config["feature_channels"]), stride, normal_index)
    domain = config.domain
    losses = _DomainLosses(domain, train_set.sites, int(arch_config["latent_dim"]))
    if (domain.mmd_weight > 0 or domain.adversarial_weight > 0) and not losses.usable:
        log(
            "domain alignment: fewer than two known sites in the training data; MMD/adversarial off"
        )
    hooks = []
    if domain.mixstyle_p > 0:
        mixstyle = MixStyle(domain.mixstyle_p, domain.mixstyle_alpha)
        hooks = attach_mixstyle(model, mixstyle, domain.mixstyle_stages)
    memory = torch.channels_last if opt.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)  # type: ignore[call-overload]
    params = list(model.parameters())
    if losses.discriminator is not None:
        params += list(losses.discriminator.parameters())
    for head in dense.modules():
        params += list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_set) / opt.batch_size))
    total_steps = max(1, opt.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser,
        max_lr=opt.lr,
        total_steps=total_steps,
        pct_start=0.15,
    )
    log(f"model: {type(model).__name__}, {count_parameters(model)} parameters")

    checkpoint = out_dir / CHECKPOINT_NAME
    first_epoch = 0
    history: list[dict[str, float]] = []
    run = run_fingerprint(config, (train_set, val_set), initial)
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state.get("labels") and list(state["labels"]) != labels:
            raise ValueError(
                f"--resume: {checkpoint} was trained with the labels {list(state['labels'])},"
                f" but data.labels is {labels}"
            )
        check_resume(state.get("run"), run, checkpoint)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        if losses.discriminator is not None and state.get("discriminator"):
            losses.discriminator.load_state_dict(state["discriminator"])
        if dense.segmentation is not None and state.get("segmentation"):
            dense.segmentation.load_state_dict(state["segmentation"])
        if dense.reconstruction is not None and state.get("reconstruction"):
            dense.reconstruction.load_state_dict(state["reconstruction"])
        first_epoch = int(state["epoch"])
        history = list(state["history"])
        log(f"resumed from {checkpoint} after epoch {first_epoch}")

    # "lambda_ewc": the EWC penalty times continual.ewc_lambda, as the loss adds it (the other
    # terms are shown before their weights)
    names = ("loss", "ce", "het", "kl", "mmd", "adv", "lambda_ewc", "seg", "rec", "loc")
    step = first_epoch * steps_per_epoch
    for epoch in range(first_epoch, opt.epochs):
        t0 = time.perf_counter()
        model.train()
        if losses.discriminator is not None:
            losses.discriminator.train()
        dense.train()
        if initial is not None and config.continual.freeze_batchnorm:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        generator = torch.Generator().manual_seed(opt.seed * 1000 + epoch)
        torch.manual_seed(opt.seed * 1000 + epoch)
        order = torch.randperm(len(train_set), generator=generator)
        sums = np.zeros(len(names))
        correct = 0
        for idx in _batches(order, opt.batch_size):
            mask = None
            if m_train is not None:  # shifted together with the image
                both = torch.cat([x_train_unit[idx], m_train[idx]], dim=1)
                both = _augment(both, generator, opt.shift, opt.gamma_jitter)
                unit, mask = both[:, :1], (both[:, 1:] > 0.5).float()
            else:
                unit = _augment(x_train_unit[idx], generator, opt.shift, opt.gamma_jitter)
            x = ((unit - mean) / std).contiguous(memory_format=memory)
            y = y_train[idx]
            out = model(x)
            terms = loss_terms(
                out,
                y,
                weights,
                het_weight=opt.het_weight,
                kl_weight=opt.kl_weight,
                het_samples=opt.het_samples,
            )
            mmd, adv = losses(out.mu, s_train[idx], step / total_steps)
            ewc = (
                ewc_penalty(model, fisher_state) if fisher_state is not None else mmd.new_zeros(())
            )
            weighted_ewc = ewc_lambda * ewc  # what the loss adds, and what the log shows
            seg, rec = dense(out.features, x, y, mask)
            loc = (
                cam_localisation_loss(
                    model.cam_weights()[0],
                    out.features,
                    y,
                    mask,
                    normal_index,
                    config.localisation.temperature,
                    config.localisation.outside_weight,
                )
                if cam_weight > 0 and mask is not None
                else seg.new_zeros(())
            )
            total = (
                terms.total
                + domain.mmd_weight * mmd
                + domain.adversarial_weight * adv
                + weighted_ewc
                + config.heads.segmentation_weight * seg
                + config.heads.reconstruction_weight * rec
                + cam_weight * loc
            )
            if not math.isfinite(float(total.detach())):
                raise ValueError(
                    f"training diverged: the loss is {float(total.detach())} in epoch"
                    f" {epoch + 1}, batch {step - epoch * steps_per_epoch + 1}; lower train.lr"
                    f" (now {opt.lr:g}) or check the data"
                )
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
            schedule.step()
            step += 1
            parts = (total, terms.ce, terms.het, terms.kl, mmd, adv, weighted_ewc, seg, rec, loc)
            sums += np.asarray([float(t.detach()) for t in parts]) * len(idx)
            correct += int((out.logits.argmax(1) == y).sum())
        sums /= len(train_set)
        val = evaluate(model, x_val, val_set.targets)
        record = {name: float(v) for name, v in zip(names, sums, strict=True)}
        record.update(
            {
                "epoch": float(epoch + 1),
                "train_accuracy": correct / len(train_set),
                "val_accuracy": val.accuracy,
                "val_balanced_accuracy": val.balanced_accuracy,
                "val_nll": val.nll,
                "seconds": time.perf_counter() - t0,
            }
        )
        history.append(record)
        extras = "".join(
            f" {name} {record[name]:.4f}"
            for name, on in (
                ("mmd", domain.mmd_weight > 0),
                ("adv", losses.discriminator is not None),
                ("lambda_ewc", fisher_state is not None),
                ("seg", dense.segmentation is not None),
                ("rec", dense.reconstruction is not None),
                ("loc", cam_weight > 0),
            )
            if on
        )
        log(
            f"epoch {epoch + 1}/{opt.epochs} loss {sums[0]:.4f} (ce {sums[1]:.4f} "
            f"het {sums[2]:.4f} kl {sums[3]:.4f}{extras}) "
            f"train_acc {record['train_accuracy']:.3f} "
            f"val_acc {val.accuracy:.3f} val_bal_acc {val.balanced_accuracy:.3f} "
            f"val_nll {val.nll:.4f} lr {schedule.get_last_lr()[0]:.2e} "
            f"{record['seconds']:.1f}s"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "discriminator": (
                    losses.discriminator.state_dict() if losses.discriminator is not None else None
                ),
                "epoch": epoch + 1,
                "history": history,
                "run": run,
                "architecture": arch_name,
                "architecture_config": arch_config,
                "input_stats": (mean, std),
                "labels": labels,
                "normal_label": config.data.normal_label,
                "fisher": fisher_state.to_dict() if fisher_state is not None else None,
                "segmentation": dense.segmentation.state_dict() if dense.segmentation else None,
                "reconstruction": (
                    dense.reconstruction.state_dict() if dense.reconstruction else None
                ),
            },
            checkpoint,
        )

    for hook in hooks:
        hook.remove()
    _check_finite(model)
    model = model.to(memory_format=torch.contiguous_format).eval()
    cal = config.calibration
    x_train = (x_train_unit - mean) / std
    _, train_mu, _ = encode_all(model, x_train)
    val_pooled, val_mu, _ = encode_all(model, x_val)
    generator = torch.Generator().manual_seed(opt.seed + 7)
    with torch.no_grad():
        # AMRI-Net shares DIANet's head interface, which is all mc_head uses.
        mc_logits, mc_log_var = mc_head(cast(DIANet, model), val_pooled, cal.mc_samples, generator)
    temperature = fit_temperature(mc_logits, val_set.targets)
    summary = summarise_mc(mc_logits, mc_log_var, temperature)
    threshold = float(np.quantile(summary.score, 1.0 - cal.target_review_rate))
    threshold = min(max(threshold, 0.0), 1.0)
    pred = summary.probabilities.argmax(axis=1)
    val_accuracy = float((pred == val_set.targets).mean())
    val_balanced = balanced_accuracy(pred, val_set.targets, len(labels))
    val_nll = float(
        -np.log(
            np.clip(summary.probabilities[np.arange(len(val_set)), val_set.targets], 1e-12, None)
        ).mean()
    )
    ood_mean, precision = fit_ood(train_mu.double().numpy(), cal.ood_shrinkage)
    val_ood = mahalanobis(val_mu.double().numpy(), ood_mean, precision)
    ood_threshold = float(np.quantile(val_ood, cal.ood_quantile))
    log(
        f"calibration: temperature {temperature:.3f}, uncertainty threshold {threshold:.4f} "
        f"(review rate {float((summary.score > threshold).mean()):.3f}), OOD threshold "
        f"{ood_threshold:.3f}; MC val_acc {val_accuracy:.3f} val_bal_acc {val_balanced:.3f} "
        f"val_nll {val_nll:.4f}"
    )
    for site in sorted(set(val_set.sites.tolist())):
        sel = val_set.sites == site
        log(
            f"  site {site}: val_acc {float((pred[sel] == val_set.targets[sel]).mean()):.3f} "
            f"({int(sel.sum())} images)"
        )

    _check_finite(
        None,
        temperature=temperature,
        uncertainty_threshold=threshold,
        ood_threshold=ood_threshold,
        val_nll=val_nll,
    )
    cam_pointing = _cam_pointing(model, x_val, val_set.targets, val_set.masks, normal_index)
    if cam_pointing is not None:
        log(f"heatmap: peak in a lesion cell for {cam_pointing:.3f} of validation lesions")
    fisher_dataset = dataset_name  # the data the Fisher information is estimated on
    if initial is not None:
        dataset_name += f"; fine-tuned from {initial.description}"
        if ewc_lambda > 0:
            dataset_name += f" with EWC lambda {ewc_lambda:g}"

    # Every file of the model goes into a folder beside out_dir first, and into out_dir only
    # once all of them are written: a failure leaves the model that was there as it was.
    beside = out_dir.resolve()
    beside.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=".partial", dir=beside.parent)
    )
    try:
        staged_weights = staging / WEIGHTS_NAME
        torch.save(copy.deepcopy(model.state_dict()), staged_weights)
        wrote: list[str] = []
        if config.continual.fisher_images > 0:
            save_fisher(
                _compute_fisher(
                    model, x_train, y_train, config.continual.fisher_images, fisher_dataset
                ),
                staging / FISHER_NAME,
            )
            wrote.append(f"wrote {out_dir / FISHER_NAME} (EWC Fisher information)")
        if dense.modules():
            head_metrics = dense.validate(model, x_val, val_set.targets, val_set.masks)
            dense.save(staging / HEADS_NAME, stride, head_metrics)
            wrote.append(
                f"wrote {out_dir / HEADS_NAME} (dense heads)"
                + "".join(f", {k} {v:.3f}" for k, v in head_metrics.items())
            )
        seconds = time.perf_counter() - started
        try:
            manifest = ModelManifest(
                name=config.name,
                version=config.version,
                architecture="dianet",
                architecture_config=arch_config,
                labels=labels,
                finding_labels=[name for name in labels if name != config.data.normal_label],
                input=InputSpec(size=p.input_size, channels=1),
                preprocessing=PreprocessingSpec(
                    lower_percentile=p.lower_percentile,
                    upper_percentile=p.upper_percentile,
                    mean=mean,
                    std=std,
                ),
                temperature=temperature,
                uncertainty_threshold=threshold,
                target_review_rate=cal.target_review_rate,
                mc_samples=cal.mc_samples,
                ood=OODSpec(
                    mean=ood_mean.tolist(),
                    precision=precision.tolist(),
                    threshold=ood_threshold,
                    quantile=cal.ood_quantile,
                ),
                weights=WEIGHTS_NAME,
                weights_sha256=sha256_file(staged_weights),
                created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
                training=TrainingSummary(
                    dataset=dataset_name,
                    epochs=opt.epochs,
                    train_images=len(train_set),
                    val_images=len(val_set),
                    val_accuracy=val_accuracy,
                    val_balanced_accuracy=val_balanced,
                    val_nll=val_nll,
                    seconds=round(seconds, 1),
                    seed=opt.seed,
                    preset=config.preset,
                    val_cam_pointing=cam_pointing,
                ),
            )
        except ValidationError as exc:
            raise ValueError(f"the trained model's manifest is invalid: {exc}") from None
        write_model_manifest(manifest, arch_name, staging)
        replaced = _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for line in wrote:
        log(line)
    for name in replaced:
        log(f"removed {out_dir / name} (the replaced model's, which this one does not have)")
    weights_path = out_dir / WEIGHTS_NAME
    manifest_path = out_dir / MANIFEST_NAME
    if checkpoint.exists():
        os.remove(checkpoint)
    log(
        f"wrote {weights_path} ({weights_path.stat().st_size / 1e6:.2f} MB) and "
        f"{manifest_path} in {seconds:.1f}s"
    )
    return TrainResult(
        manifest_path,
        weights_path,
        manifest,
        seconds,
        Evaluation(val_accuracy, val_balanced, val_nll),
        history,
    )


@torch.no_grad()
def _cam_pointing(
    model: Network, x: Tensor, targets: np.ndarray, masks: np.ndarray | None, normal_index: int
) -> float | None:
    """Share of the lesion images whose shown CAM peaks in a feature cell holding some of the
    lesion (None without masks or lesions)."""
    if masks is None:
        return None
    weights = model.cam_weights()[0]
    hits: list[Tensor] = []
    for start in range(0, x.shape[0], 64):
        features = model.encode(x[start : start + 64]).features
        y = torch.from_numpy(targets[start : start + 64])
        m = torch.from_numpy(masks[start : start + 64]).unsqueeze(1)
        hits.append(peak_in_lesion(weights, features, y, m, normal_index))
    found = torch.cat(hits)
    return float(found.float().mean()) if found.numel() else None


def _old_task_fisher(
    config: TrainingConfig,
    model: torch.nn.Module,
    initial: InitialModel,
    ewc_data: Path | None,
    spec: PreprocessSpec,
    log: Callable[[str], None],
) -> FisherState:
    """Fisher information of the starting model on its old task's data.

    ``ewc_data`` is a labelled DICOM folder of the old task; without it the old task is taken
    to be the synthetic data of ``config.data`` with its default sites and class mix.
    """
    images = max(1, config.continual.fisher_images)
    if ewc_data is not None:
        items = scan_folder(ewc_data, labels=config.data.labels, log=log)
        unit, kept, _ = load_unit_images(items, spec)
        index = {name: i for i, name in enumerate(config.data.labels)}
        targets = np.asarray([index[items[i].label] for i in kept], dtype=np.int64)
        where = f"DICOM folder {Path(ewc_data).name}"
    else:
        old = copy.deepcopy(config)
        old.data = DataConfig(
            labels=list(config.data.labels),
            normal_label=config.data.normal_label,
            sizes=list(config.data.sizes),
            workers=config.data.workers,
        )
        made = synthetic_split(old, "train", images, spec)
        unit, targets = made.images, made.targets
        where = f"synthetic phantoms, sites {old.data.sites}"
    if len(targets) == 0:
        raise ValueError("no images to estimate the old task's Fisher information on")
    log(f"EWC: no Fisher file with {initial.description}; estimating it on {where}")
    x = (torch.from_numpy(unit).unsqueeze(1) - initial.mean) / initial.std
    return _compute_fisher(model, x, torch.from_numpy(targets), images, where)
