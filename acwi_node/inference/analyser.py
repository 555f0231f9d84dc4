"""Run a trained DIANet on a study's images: calibrated probabilities, uncertainty, OOD, CAM.

Per image (``K`` classes, ``T`` Monte-Carlo dropout samples of the head over one backbone
pass, temperature ``tau`` from the manifest, ``p_t = softmax(logits_t / tau)``):

* ``probabilities``  = ``p = mean_t p_t``;
* ``entropy``        = ``H(p) = -sum_k p_k log p_k`` (nats);
* ``epistemic``      = mutual information ``H(p) - mean_t H(p_t)`` (>= 0);
* ``aleatoric``      = ``mean_t H(p_t)``, the expected entropy (nats), so that
  ``entropy = epistemic + aleatoric``. The heteroscedastic head's mean logit variance
  ``mean_{t,k} exp(log_var_t,k) / tau^2`` is on the squared logit scale, not in nats, and is
  kept apart (``MCSummary.logit_variance``), never added to an entropy;
* ``score``          = ``H(p) / log K`` in [0, 1], compared with the manifest threshold;
* ``ood_score``      = Mahalanobis distance of the latent mean (see ``OODSpec``);
* ``heatmap``        = for the most probable finding label ``k`` (the predicted label if the
  manifest lists no findings), the class activation map of the logit margin of ``k`` over
  the reference (non-finding, e.g. ``normal``) label, ``cam_k - cam_ref`` (plain ``cam_k``
  without a reference label); ReLU, resized to Rows x Columns by the inverse of the
  preprocessing resize (bilinear) and divided by its maximum (all zeros if <= 0). Its
  resolution is that of the feature map (16 x 16 for the bundled model's 128-pixel input,
  a cell of 8 input pixels), so the peak locates a lesion to within about one feature cell;
  the bundled model was trained to put it there (``models/networks/localisation.py``).

Per study: probabilities are the mean over analysed images; the study ``uncertainty`` is
that of the image with the highest score (so ``study.uncertainty.score`` is the max image
score); ``ood_score`` is the max image OOD score; ``needs_review`` is true when the study
score exceeds ``uncertainty_threshold`` or the OOD score exceeds ``ood.threshold``.

Dropout masks are a counter-based function of a seed taken from SHA-256 of the Study and SOP
Instance UIDs (and the frame number, for a frame of a multi-frame image)
(:mod:`acwi_node.inference.dropout`), so re-analysing the same images gives identical numbers,
in any batch, on a GPU as on the CPU.

Multi-frame images (Enhanced CT or MR, tomosynthesis) are read frame by frame: each frame is
one image of the study above, with its own result (``ImageResult.frame_number``), uncertainty
and heatmap (:func:`acwi_node.inference.preprocess.image_units`).

Engines. The backbone (:meth:`DIANet.encode`) runs once per batch on the configured engine
(PyTorch, ONNX Runtime or TensorRT, see :mod:`acwi_node.inference.engines`); images are
batched per series, ``batch_size`` at a time. The head sampling, the uncertainty numbers, the
OOD score and the CAM are the same torch code on the engine's outputs for every engine, so
engines differ only by the backbone's numerical precision. The ``T`` head samples of all images
of a batch run as one batched pass; each image's dropout masks are a function of its own seed
(:mod:`acwi_node.inference.dropout`).

Heatmaps. ``heatmaps = "all"`` selects every image's heatmap for writing;
``"positive_or_uncertain"`` selects only images whose most probable label is a finding, whose
uncertainty score exceeds the threshold, or whose OOD score exceeds the OOD threshold. The
map is computed for every image either way (it is cheap); an image not selected has
``ImageResult.heatmap_selected = False`` and the worker writes no heatmap object for it. Each
map is kept at the feature map's resolution and resized to Rows x Columns when it is read
(:class:`~acwi_node.inference.types.DeferredHeatmap`): a study's results hold a few hundred
bytes per image rather than a full-size float32 map until the worker has written them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydicom.dataset import Dataset
from torch import Tensor

from acwi_node.inference.dropout import keep_masks
from acwi_node.inference.engines import Engine, EngineOptions, PyTorchEngine, create_engine
from acwi_node.inference.manifest import ModelManifest, load_manifest
from acwi_node.inference.preprocess import (
    ImageUnit,
    UnsupportedImage,
    image_units,
    normalise,
    preprocess_many,
    resize,
    window,
)
from acwi_node.inference.resample import upsample_cam
from acwi_node.inference.types import (
    DeferredHeatmap,
    ImageResult,
    ModelIdentity,
    StudyAnalysis,
    Uncertainty,
)
from models.networks.dianet import LOGVAR_ALEATORIC_RANGE, DIANet, DIANetConfig

HeatmapPolicy = Literal["all", "positive_or_uncertain", "none"]
HEATMAP_POLICIES: tuple[str, ...] = ("all", "positive_or_uncertain", "none")


class NothingToAnalyse(ValueError):
    """None of the given datasets could be analysed (the message lists why; ``skipped`` holds
    each image's reason by SOP Instance UID)."""

    def __init__(self, message: str, skipped: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.skipped: dict[str, str] = dict(skipped or {})


@dataclass(frozen=True)
class MCSummary:
    """Monte-Carlo summary for ``N`` images (arrays of length ``N`` unless noted)."""

    probabilities: np.ndarray  # (N, K)
    entropy: np.ndarray
    epistemic: np.ndarray
    aleatoric: np.ndarray
    score: np.ndarray
    #: Mean heteroscedastic logit variance on the temperature-scaled logit scale (not nats).
    logit_variance: np.ndarray


def mc_head(
    model: DIANet, pooled: Tensor, samples: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``samples`` dropout passes of the head: logits and log-variances, each ``(T, N, K)``."""
    n = pooled.shape[0]
    out = model.head(pooled.repeat(samples, 1), mc=True, generator=generator)
    return out.logits.view(samples, n, -1), out.log_var.view(samples, n, -1)


def mc_head_batched(
    model: DIANet, pooled: Tensor, samples: int, seeds: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """``samples`` dropout passes of the head for ``N`` images at once, image ``i``'s masks
    drawn from ``seeds[i]`` (:func:`acwi_node.inference.dropout.keep_masks`).

    An image's masks depend on its seed alone, so the numbers do not depend on how images are
    batched, nor on the device (the masks are drawn on the CPU and copied in one transfer).
    ``samples = 0`` is one deterministic pass (no dropout). Returns ``(T, N, K)`` logits and
    log-variances.
    """
    if len(seeds) != pooled.shape[0]:
        raise ValueError("one seed per image is needed")
    if model.training:
        raise ValueError("mc_head_batched needs the model in evaluation mode")
    z = model.to_mu(pooled)  # evaluation mode: z = mu, as in DIANet.head
    mixture = getattr(model, "codebook_mixture", None)  # DIANet only (AMRI-Net has none)
    codebook = mixture(z) if mixture is not None else None
    if codebook is not None:  # as in DIANet.head: the prototype mixture is added to mu
        z = z + codebook[1]
    p = model.config.dropout
    if samples == 0 or p <= 0:
        zs = z.unsqueeze(0).repeat(max(samples, 1), 1, 1)
    else:
        masks = keep_masks(seeds, samples, int(z.shape[1]), 1.0 - p)  # (N, T, D) on the CPU
        keep = torch.from_numpy(masks).to(z.device).transpose(0, 1)
        zs = z.unsqueeze(0) * keep.to(z.dtype) / (1.0 - p)
    log_var = model.variance(zs).clamp(*LOGVAR_ALEATORIC_RANGE)
    return model.classifier(zs), log_var


def summarise_mc(logits: Tensor, log_var: Tensor, temperature: float) -> MCSummary:
    """Uncertainty decomposition of ``(T, N, K)`` head samples (see the module docstring)."""
    k = logits.shape[-1]
    log_p_t = torch.log_softmax(logits.double() / temperature, dim=-1)
    p_t = log_p_t.exp()
    p = p_t.mean(dim=0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
    expected = -(p_t * log_p_t).sum(dim=-1).mean(dim=0)
    epistemic = (entropy - expected).clamp_min(0.0)
    variance = (log_var.double().exp() / temperature**2).mean(dim=(0, 2))
    score = (entropy / math.log(k)).clamp(0.0, 1.0)
    return MCSummary(
        probabilities=p.numpy(),
        entropy=entropy.numpy(),
        epistemic=epistemic.numpy(),
        aleatoric=expected.numpy(),
        score=score.numpy(),
        logit_variance=variance.numpy(),
    )


def mahalanobis(mu: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """RMS per-dimension Mahalanobis distance of each row of ``mu`` (``(N, D)`` -> ``(N,)``)."""
    diff = np.atleast_2d(mu) - mean
    d2 = np.einsum("nd,de,ne->n", diff, precision, diff)
    return np.sqrt(np.clip(d2, 0.0, None) / mean.shape[0])


def uid_seed(*uids: str) -> int:
    """A 63-bit seed from UIDs."""
    digest = hashlib.sha256("|".join(uids).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def build_model(manifest: ModelManifest) -> DIANet:
    """An untrained DIANet with the manifest's architecture (checked against its labels)."""
    config = DIANetConfig.from_dict(manifest.architecture_config)
    if config.num_classes != len(manifest.labels):
        raise ValueError(
            f"architecture has {config.num_classes} classes but the manifest lists "
            f"{len(manifest.labels)} labels"
        )
    return DIANet(config)


@dataclass(frozen=True)
class BatchInference:
    """Numbers for one batch of model inputs (see :meth:`Analyser.infer`)."""

    mc: MCSummary
    ood: np.ndarray  # (N,)
    heatmaps: list[DeferredHeatmap] | None


@dataclass
class _Prepared:
    index: int
    unit: ImageUnit
    x: np.ndarray

    @property
    def ds(self) -> Dataset:
        return self.unit.ds


def image_seed(study_uid: str, sop_instance_uid: str, frame_number: int | None = None) -> int:
    """The dropout seed of one image: of its Study and SOP Instance UIDs, and its frame number
    for a frame of a multi-frame image (each frame draws its own masks)."""
    if frame_number is None:
        return uid_seed(study_uid, sop_instance_uid)
    return uid_seed(study_uid, sop_instance_uid, f"frame {frame_number}")


class Analyser:
    """A loaded model ready to analyse studies."""

    def __init__(
        self,
        model: DIANet,
        manifest: ModelManifest,
        *,
        device: str = "cpu",
        mc_samples: int = 20,
        batch_size: int = 16,
        engine: Engine | None = None,
        heatmaps: HeatmapPolicy = "all",
    ) -> None:
        if mc_samples < 2:  # one sample's mutual information (epistemic part) is always 0
            raise ValueError("mc_samples must be at least 2")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if heatmaps not in HEATMAP_POLICIES:
            raise ValueError(f"heatmaps must be one of {HEATMAP_POLICIES}, not {heatmaps!r}")
        self.manifest = manifest
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        #: Runs the backbone; the head, uncertainty, OOD and CAM run here in torch.
        self.engine: Engine = engine or PyTorchEngine(self.model, self.device)
        if self.engine.device != self.device and self.engine.device.type != self.device.type:
            raise ValueError(f"engine runs on {self.engine.device}, analyser on {self.device}")
        self.mc_samples = mc_samples
        self.batch_size = min(batch_size, self.engine.max_batch or batch_size)
        self.heatmaps = heatmaps
        self.spec = manifest.preprocess_spec()
        self.labels = list(manifest.labels)
        self._ood_mean = np.asarray(manifest.ood.mean, dtype=np.float64)
        self._ood_precision = np.asarray(manifest.ood.precision, dtype=np.float64)
        findings = [self.labels.index(name) for name in manifest.finding_labels]
        self._finding_indices = findings
        others = [i for i in range(len(self.labels)) if i not in findings]
        self._reference_index: int | None = others[0] if others and findings else None

    @classmethod
    def load(
        cls,
        manifest_path: Path,
        *,
        device: str = "cpu",
        mc_samples: int | None = None,
        num_threads: int | None = None,
        batch_size: int = 16,
        engine: EngineOptions | None = None,
        heatmaps: HeatmapPolicy = "all",
    ) -> Analyser:
        """Load a manifest (file or folder) and its verified weights, and start the engine.

        ``mc_samples`` defaults to the manifest's: the number of Monte-Carlo samples its
        uncertainty threshold was calibrated with.

        ``num_threads``, when given, is passed to ``torch.set_num_threads`` (and to ONNX
        Runtime). ``engine`` defaults to eager PyTorch in fp32.
        """
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        # a model the node has (installed, configured): a version that is not fixed loads,
        # with a warning; installing refuses one before it gets here
        manifest = load_manifest(Path(manifest_path), existing=True)
        model = build_model(manifest)
        state = torch.load(manifest.weights_path, map_location=device, weights_only=True)
        model.load_state_dict(state)
        model = model.to(device).eval()
        options = engine or EngineOptions()
        if options.num_threads is None and num_threads is not None:
            options = dataclasses.replace(options, num_threads=num_threads)
        backbone = create_engine(model, manifest, device, options)
        return cls(
            model,
            manifest,
            device=device,
            mc_samples=manifest.mc_samples if mc_samples is None else mc_samples,
            batch_size=batch_size,
            engine=backbone,
            heatmaps=heatmaps,
        )

    @property
    def identity(self) -> ModelIdentity:
        """The model identity written into results."""
        return self.manifest.identity()

    def analyse(
        self, datasets: Sequence[Dataset], *, between_batches: Callable[[], None] | None = None
    ) -> StudyAnalysis:
        """Analyse the images of one study (see the module docstring for every number).

        ``between_batches`` is called before each batch of images goes through the network;
        what it raises ends the analysis (the analyse task stops a run that is no longer its
        worker's: a CT series' remaining batches are not computed for nothing)."""
        skipped: dict[str, str] = {}
        prepared: list[_Prepared] = []
        units = image_units(datasets)
        for i, (unit, x) in enumerate(zip(units, preprocess_many(units, self.spec), strict=True)):
            if isinstance(x, UnsupportedImage):
                key = unit.name if unit.sop_instance_uid else f"#{i}"
                skipped[key] = str(x)
            else:
                prepared.append(_Prepared(i, unit, x))
        if not prepared:  # each reason names its image
            reasons = "; ".join(skipped.values()) or "no datasets given"
            raise NothingToAnalyse(f"no image could be analysed ({reasons})", skipped)

        study_uid = str(prepared[0].ds.get("StudyInstanceUID", ""))
        by_series: dict[str, list[_Prepared]] = {}
        for item in prepared:
            by_series.setdefault(str(item.ds.get("SeriesInstanceUID", "")), []).append(item)

        results: dict[int, ImageResult] = {}
        for items in by_series.values():
            for start in range(0, len(items), self.batch_size):
                if between_batches is not None:
                    between_batches()
                batch = items[start : start + self.batch_size]
                for item, result in zip(batch, self._analyse_batch(batch, study_uid), strict=True):
                    results[item.index] = result
        images = [results[i] for i in sorted(results)]
        return self._summarise(images, skipped)

    def warm_up(self, image_size: tuple[int, int] = (512, 512)) -> float:
        """Run an analysis's steps once on a synthetic image, alone and in a full batch, so
        that the first study after start does not pay what only a first call costs: numpy
        imports ``numpy.ma`` the first time a percentile is taken (0.2 s of the first
        radiograph), the engine plans each batch size on its first run. Nothing is kept: an
        analysis afterwards gives the same numbers. Seconds taken."""
        started = time.perf_counter()
        rows, columns = image_size
        ramp = np.linspace(0.0, 1.0, rows * columns, dtype=np.float32).reshape(rows, columns)
        spec = self.spec
        unit = window(resize(ramp, spec.size), spec.lower_percentile, spec.upper_percentile)
        x = normalise(unit, spec)
        for n in sorted({1, self.batch_size}):
            self.infer(np.stack([x] * n), [0] * n, [image_size] * n)
        return time.perf_counter() - started

    def infer(
        self,
        x: np.ndarray | Tensor,
        seeds: Sequence[int],
        sizes: Sequence[tuple[int, int]] | None = None,
        *,
        samples: int | None = None,
    ) -> BatchInference:
        """One backbone pass on the engine, then head sampling, OOD and (optionally) heatmaps.

        ``x`` is a ``(N, 1, S, S)`` batch of preprocessed inputs, ``seeds[i]`` seeds image
        ``i``'s dropout masks, ``sizes[i]`` is its Rows x Columns (``None``: no heatmaps).
        ``samples`` defaults to ``mc_samples``; 0 is one deterministic head pass.
        """
        batch = torch.as_tensor(x, dtype=torch.float32)
        out = self.engine.run(batch)
        t = self.mc_samples if samples is None else samples
        with torch.inference_mode():
            logits, log_var = mc_head_batched(self.model, out.pooled, t, seeds)
            mc = summarise_mc(logits.cpu(), log_var.cpu(), self.manifest.temperature)
            ood = mahalanobis(out.mu.double().cpu().numpy(), self._ood_mean, self._ood_precision)
            heatmaps: list[DeferredHeatmap] | None = None
            if sizes is not None:
                # only the map each image shows: cam_k - cam_ref = (w_k - w_ref) . features
                weights, _ = self.model.cam_weights()
                classes = torch.from_numpy(self._heatmap_classes(mc.probabilities))
                rows = weights[classes.to(weights.device)]
                if self._reference_index is not None:
                    rows = rows - weights[self._reference_index]
                selected = torch.einsum("nc,nchw->nhw", rows, out.features)
                cams = _to_host(selected.float()).numpy()
                heatmaps = [
                    DeferredHeatmap(cams[i].copy(), size, upsample_cam)
                    for i, size in enumerate(sizes)
                ]
        return BatchInference(mc=mc, ood=ood, heatmaps=heatmaps)

    def _analyse_batch(self, batch: list[_Prepared], study_uid: str) -> list[ImageResult]:
        sops = [item.unit.sop_instance_uid for item in batch]
        result = self.infer(
            np.stack([item.x for item in batch]),
            [
                image_seed(study_uid, sop, item.unit.frame_number)
                for sop, item in zip(sops, batch, strict=True)
            ],
            [item.unit.shape for item in batch],
        )
        assert result.heatmaps is not None
        mc = result.mc
        out: list[ImageResult] = []
        for j, (item, sop) in enumerate(zip(batch, sops, strict=True)):
            probs = mc.probabilities[j]
            score = float(mc.score[j])
            ood = float(result.ood[j])
            out.append(
                ImageResult(
                    sop_instance_uid=sop,
                    sop_class_uid=str(item.ds.get("SOPClassUID", "")),
                    series_instance_uid=str(item.ds.get("SeriesInstanceUID", "")),
                    probabilities=_as_dict(self.labels, probs),
                    uncertainty=Uncertainty(
                        entropy=float(mc.entropy[j]),
                        epistemic=float(mc.epistemic[j]),
                        aleatoric=float(mc.aleatoric[j]),
                        score=score,
                    ),
                    heatmap=result.heatmaps[j],
                    ood_score=ood,
                    heatmap_selected=self.heatmap_selected(probs, score, ood),
                    frame_number=item.unit.frame_number,
                )
            )
        return out

    def heatmap_selected(
        self, probs: np.ndarray, score: float, ood: float, policy: HeatmapPolicy | None = None
    ) -> bool:
        """Whether an image's heatmap is to be written under ``policy`` (default: the
        analyser's ``heatmaps``)."""
        policy = policy or self.heatmaps
        if policy == "all":
            return True
        if policy == "none":
            return False
        positive = int(np.argmax(probs)) in self._finding_indices
        uncertain = score > self.manifest.uncertainty_threshold or ood > self.manifest.ood.threshold
        return bool(positive or uncertain)

    def wants_heatmap(self, image: ImageResult, policy: HeatmapPolicy) -> bool:
        """:meth:`heatmap_selected` of an analysed image under another policy (a route's)."""
        probs = np.asarray([image.probabilities[name] for name in self.labels])
        return self.heatmap_selected(probs, image.uncertainty.score, image.ood_score, policy)

    def _heatmap_classes(self, probs: np.ndarray) -> np.ndarray:
        """Per image (row of ``probs``), the label its heatmap shows: the most probable
        finding (the first of equals), else the most probable label."""
        if self._finding_indices:
            findings = np.asarray(self._finding_indices, dtype=np.int64)
            return findings[np.argmax(probs[:, findings], axis=1)]
        return np.argmax(probs, axis=1).astype(np.int64)

    def _summarise(self, images: list[ImageResult], skipped: dict[str, str]) -> StudyAnalysis:
        probs = np.mean(
            [[img.probabilities[name] for name in self.labels] for img in images], axis=0
        )
        probs = probs / probs.sum()
        worst = max(images, key=lambda img: img.uncertainty.score)
        ood = max(img.ood_score for img in images)
        needs_review = bool(
            worst.uncertainty.score > self.manifest.uncertainty_threshold
            or ood > self.manifest.ood.threshold
        )
        return StudyAnalysis(
            model=self.identity,
            labels=list(self.labels),
            images=images,
            probabilities=_as_dict(self.labels, probs),
            predicted_label=self.labels[int(np.argmax(probs))],
            uncertainty=worst.uncertainty,
            ood_score=ood,
            needs_review=needs_review,
            finding_labels=list(self.manifest.finding_labels),
            skipped=skipped,
        )


def _as_dict(labels: list[str], probs: np.ndarray) -> dict[str, float]:
    return {name: float(p) for name, p in zip(labels, probs, strict=True)}


def _to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU; from a GPU through page-locked memory (PyTorch's caching host
    allocator), which copies several times faster than into ordinary memory."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host
