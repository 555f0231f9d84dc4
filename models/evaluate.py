"""Evaluate a trained model through the node's own analyser and write a report.

``evaluate_model`` reads a labelled DICOM folder (``labels.csv`` as in
:mod:`models.data.dicom_dataset`; an optional ``box`` column ``"x0 y0 x1 y1"``, several boxes
separated by ``;``, or the synthetic ``<file>.truth.json`` side-cars give lesion boxes),
analyses every study with :class:`acwi_node.inference.analyser.Analyser` exactly as the node
does, and computes per image (``K`` labels):

* accuracy, balanced accuracy, confusion matrix;
* per-class one-vs-rest ROC curve and AUC (probability of the class as the score);
* at the operating point (the most probable label): per-class sensitivity/specificity, and
  the screening view "any finding" vs the normal label;
* expected calibration error (15 equal-width bins of the top-label confidence) with and
  without the manifest's temperature, and their reliability diagrams;
* the triage curve: accuracy of the automatically accepted images as the uncertainty
  threshold sweeps the review rate from 0 to 1, and the review rate at the manifest's
  threshold (uncertainty alone, and uncertainty or OOD as the node decides);
* a per-site breakdown;
* heatmap faithfulness by the pointing game: the heatmap's peak lies inside one of the
  image's lesion boxes (strictly, and with a tolerance of half a feature cell, the heatmap's
  resolution), and the IoU of its hot region with the union of the boxes;
* the SR's AI region box: the box the node writes into the SR (TID 1410) for an image, found
  by the node's own :func:`~acwi_node.results.heatmap_region.heatmap_region` at the
  deployment's ``worker.sr_region_fraction``, against the image's lesion boxes (IoU with the
  best-matching one, the share of that lesion it covers, the peak in a lesion);
* OOD AUROC: the OOD score separating images of sites the model was not trained on from
  images of its training sites, when both are present.

``write_report`` writes ``metrics.json``, ``report.md`` and PNG plots (matplotlib, Agg).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from acwi_node.config import WorkerSettings
from acwi_node.inference.analyser import Analyser, NothingToAnalyse
from acwi_node.inference.types import StudyAnalysis
from acwi_node.results.heatmap_region import heatmap_region
from acwi_node.results.sr import finding_label
from models.data.dicom_dataset import (
    LABELS_CSV,
    Box,
    Boxes,
    LabelledImage,
    boxes_mask,
    read_boxes,
    scan_folder,
)
from models.model_io import load_analyser
from models.networks import feature_stride

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0
AUTO_ACCEPT_REVIEW = 0.2  # auto-accept accuracy on the 80 % most certain cases
HEATMAP_IOU_THRESHOLD = 0.5  # heatmap >= 0.5 of its maximum is the "hot" region
#: The node's default ``worker.sr_region_fraction``: the SR's AI region box is the connected
#: region of the heatmap at or above this fraction of its peak that holds the peak.
SR_REGION_FRACTION: float = float(WorkerSettings.model_fields["sr_region_fraction"].default)
STABILITY_SHIFT = 2  # pixels, each of +x, -x, +y, -y
STABILITY_NOISE = 0.02  # Gaussian noise sigma as a fraction of the image's value range
DELETION_STEPS = 10
COSTLY_IMAGES = 60  # lesion images for the stability and deletion metrics


# --------------------------------------------------------------------------- metrics


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold (ties handled as one step)."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both positive and negative cases")
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(p)[last]
    fp = np.cumsum(~p)[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (trapezoidal rule)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AUROC, or None when one of the two groups is empty. Scores that are not finite are an
    error: ranked among the others they gave a plausible figure (a NaN everywhere, 0.5)."""
    scores = np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"{bad} of {scores.size} scores are not finite (NaN or infinite)")
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return auc(*roc_curve(scores, positive))


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``truth``."""
    recalls = [
        float((pred[truth == k] == k).mean()) for k in range(num_classes) if (truth == k).any()
    ]
    return float(np.mean(recalls)) if recalls else math.nan


@dataclass(frozen=True)
class Reliability:
    """Reliability diagram bins and the expected calibration error."""

    ece: float
    bin_confidence: list[float | None]
    bin_accuracy: list[float | None]
    bin_count: list[int]


def reliability(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Top-label calibration: ``ECE = sum_b n_b / N * |acc_b - conf_b|``."""
    conf = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    index = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    confs: list[float | None] = []
    accs: list[float | None] = []
    counts: list[int] = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        counts.append(n)
        if n == 0:
            confs.append(None)
            accs.append(None)
            continue
        c, a = float(conf[sel].mean()), float(correct[sel].mean())
        confs.append(c)
        accs.append(a)
        ece += n / len(truth) * abs(a - c)
    return Reliability(float(ece), confs, accs, counts)


def triage_curve(
    score: np.ndarray, correct: np.ndarray, points: int = 101
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of auto-accepted images (the least uncertain) against the review rate.

    For review rate ``r`` the ``round(r N)`` most uncertain images go to review; the rest
    are accepted. Accuracy at ``r = 1`` (nothing accepted) is reported as 1.
    """
    order = np.argsort(score, kind="mergesort")  # most certain first
    ok = np.asarray(correct, dtype=float)[order]
    rates = np.linspace(0.0, 1.0, points)
    n = len(ok)
    accuracy = []
    for r in rates:
        accepted = n - int(round(r * n))
        accuracy.append(float(ok[:accepted].mean()) if accepted > 0 else 1.0)
    return rates, np.asarray(accuracy)


def sens_spec(pred_positive: np.ndarray, positive: np.ndarray) -> dict[str, float | None]:
    """Sensitivity and specificity of a binary decision."""
    pos, neg = positive.astype(bool), ~positive.astype(bool)
    return {
        "sensitivity": float(pred_positive[pos].mean()) if pos.any() else None,
        "specificity": float((~pred_positive[neg]).mean()) if neg.any() else None,
        "positives": int(pos.sum()),
        "negatives": int(neg.sum()),
    }


Tolerance = float | tuple[float, float]


def pointing_hit(heatmap: np.ndarray, box: Box, tolerance: Tolerance = 0.0) -> bool:
    """Whether the heatmap's peak lies inside ``box`` (inclusive) grown by ``tolerance`` px
    (one number for both axes, or ``(rows, columns)``: :func:`half_cell`)."""
    if float(heatmap.max()) <= 0.0:
        return False
    ty, tx = tolerance if isinstance(tolerance, tuple) else (tolerance, tolerance)
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x0, y0, x1, y1 = box
    return bool(x0 - tx <= x <= x1 + tx and y0 - ty <= y <= y1 + ty)


def half_cell(shape: tuple[int, int], grid: int) -> tuple[float, float]:
    """Half a feature cell of a ``rows x columns`` heatmap from a ``grid x grid`` map, in
    pixels along the rows and along the columns: the input is resized to a square without
    keeping the aspect ratio, so a non-square image's cells are not square."""
    rows, cols = shape
    return 0.5 * rows / grid, 0.5 * cols / grid


def centre_value(heatmap: np.ndarray, box: Box) -> float:
    """The (peak-normalised) heatmap value at the centre of ``box``."""
    x0, y0, x1, y1 = box
    rows, cols = heatmap.shape
    y = min(max((y0 + y1) // 2, 0), rows - 1)
    x = min(max((x0 + x1) // 2, 0), cols - 1)
    return float(heatmap[y, x])


def localisation_scores(
    heatmap: np.ndarray, boxes: Boxes, tolerance: Tolerance = 0.0
) -> dict[str, bool | float]:
    """Pointing-game scores of a heatmap against an image's lesion boxes (at least one).

    ``hit``: the peak lies in any box; ``hit_tolerant``: in any box grown by ``tolerance`` px;
    ``centre_value``: the highest of the values at the boxes' centres; ``iou``: the hot region
    against the union of the boxes (:func:`heatmap_iou`).
    """
    if not boxes:
        raise ValueError("localisation scores need at least one lesion box")
    return {
        "hit": any(pointing_hit(heatmap, box) for box in boxes),
        "hit_tolerant": any(pointing_hit(heatmap, box, tolerance) for box in boxes),
        "centre_value": max(centre_value(heatmap, box) for box in boxes),
        "iou": heatmap_iou(heatmap, boxes_mask(heatmap.shape, boxes)),
    }


def _clip_box(box: Box, shape: tuple[int, int]) -> Box | None:
    """``box`` clipped to a ``rows x cols`` image (as :func:`boxes_mask` clips it); None when
    nothing of it is on the image."""
    rows, cols = shape
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], cols - 1), min(box[3], rows - 1)
    return (x0, y0, x1, y1) if x0 <= x1 and y0 <= y1 else None


def _box_area(box: Box) -> int:
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)


def sr_box_scores(
    heatmap: np.ndarray, boxes: Boxes, fraction: float = SR_REGION_FRACTION
) -> dict[str, Any]:
    """The SR's AI region box of an image against its lesion boxes (at least one).

    The box is the node's own (:func:`~acwi_node.results.heatmap_region.heatmap_region` at
    ``fraction``) on the heatmap at the source image's Rows x Columns, as the node finds it,
    so it is in the image's pixels, as the lesion boxes are (both inclusive; a lesion box is
    clipped to the image). ``sr_box``: ``[x0, y0, x1, y1]``, None where the map has no region
    (empty, not finite or nowhere above 0: the node writes no box; it counts as IoU 0, nothing
    covered and a miss). ``sr_box_iou``: IoU with the best-matching lesion box (the highest
    IoU; of equals, the one it covers most); ``sr_box_covered``: the share of that lesion box's
    pixels inside the box; ``sr_box_peak_in_lesion``: the region's peak (the heatmap's, the
    first of equal maxima) lies in any of the lesion boxes; ``sr_box_share``: the box's share
    of the image's pixels.
    """
    if not boxes:
        raise ValueError("SR box scores need at least one lesion box")
    region = heatmap_region(heatmap, fraction)
    if region is None:
        return {
            "sr_box": None,
            "sr_box_iou": 0.0,
            "sr_box_covered": 0.0,
            "sr_box_peak_in_lesion": False,
            "sr_box_share": 0.0,
        }
    shape = (int(heatmap.shape[0]), int(heatmap.shape[1]))
    ours = region.box
    best = (0.0, 0.0)
    for lesion in boxes:
        clipped = _clip_box(lesion, shape)
        if clipped is None:
            continue
        w = min(ours[2], clipped[2]) - max(ours[0], clipped[0]) + 1
        h = min(ours[3], clipped[3]) - max(ours[1], clipped[1]) + 1
        inter = max(w, 0) * max(h, 0)
        union = _box_area(ours) + _box_area(clipped) - inter
        best = max(best, (inter / union, inter / _box_area(clipped)))
    px, py = region.peak
    return {
        "sr_box": list(ours),
        "sr_box_iou": float(best[0]),
        "sr_box_covered": float(best[1]),
        "sr_box_peak_in_lesion": any(x0 <= px <= x1 and y0 <= py <= y1 for x0, y0, x1, y1 in boxes),
        "sr_box_share": _box_area(ours) / float(shape[0] * shape[1]),
    }


def macro_auc(probabilities: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean one-vs-rest AUROC over the classes with both positives and negatives in ``truth``."""
    values = [
        v
        for j in range(probabilities.shape[1])
        if (v := roc_auc(probabilities[:, j], truth == j)) is not None
    ]
    return float(np.mean(values)) if values else None


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    n: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    groups: Sequence[object] | None = None,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` cases (seeded).

    ``groups`` (one key per case, e.g. its study) makes it a cluster bootstrap: whole groups
    are drawn, so the images of one study, which are not independent of each other, widen the
    interval as they should rather than narrow it. One case per group draws exactly the
    indices the plain bootstrap draws. Resamples where the statistic is undefined (e.g. one
    class missing) are dropped; None when fewer than half of them are defined.
    """
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group keys for {n} cases")
        by_group: dict[object, list[int]] = {}
        for i, key in enumerate(groups):
            by_group.setdefault(key, []).append(i)
        members = [np.asarray(idx) for idx in by_group.values()]
    if len(members) < 2:
        return None
    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        picked = rng.integers(0, len(members), size=len(members))
        return np.concatenate([members[j] for j in picked])

    values = [
        v for _ in range(resamples) if (v := statistic(draw())) is not None and not math.isnan(v)
    ]
    if len(values) < max(1, resamples // 2):
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def f1_macro(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean per-class F1 over the classes present in ``truth`` or ``pred``."""
    scores = []
    for k in range(num_classes):
        tp = int(((pred == k) & (truth == k)).sum())
        fp = int(((pred == k) & (truth != k)).sum())
        fn = int(((pred != k) & (truth == k)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2.0 * tp / (2.0 * tp + fp + fn))
    return float(np.mean(scores)) if scores else math.nan


def uncertainty_error_auroc(score: np.ndarray, correct: np.ndarray) -> float | None:
    """AUROC of the uncertainty score ranking the wrong predictions first (None: no errors)."""
    return roc_auc(score, ~np.asarray(correct, dtype=bool))


def auto_accept_accuracy(
    score: np.ndarray, correct: np.ndarray, review_fraction: float = AUTO_ACCEPT_REVIEW
) -> float | None:
    """Accuracy of the ``1 - review_fraction`` least uncertain cases (None when none are)."""
    n = len(score)
    accepted = n - int(round(review_fraction * n))
    if accepted <= 0:
        return None
    order = np.argsort(score, kind="mergesort")
    return float(np.asarray(correct, dtype=float)[order[:accepted]].mean())


def heatmap_iou(
    heatmap: np.ndarray, region: np.ndarray, threshold: float = HEATMAP_IOU_THRESHOLD
) -> float:
    """IoU of ``heatmap >= threshold * max`` with the boolean ``region`` (0 for an empty map)."""
    peak = float(heatmap.max())
    if peak <= 0.0:
        return 0.0
    hot = heatmap >= threshold * peak
    union = int((hot | region).sum())
    return float((hot & region).sum() / union) if union else 0.0


def _box_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over every ``size x size`` window that fits in ``a`` (integral image, 'valid')."""
    c = np.pad(a.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    s = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    return s / float(size * size)


def ssim(a: np.ndarray, b: np.ndarray, *, window: int = 7, data_range: float = 1.0) -> float:
    """Mean structural similarity of two 2-D arrays (Wang et al. 2004, uniform window).

    ``K1 = 0.01``, ``K2 = 0.03``, sample covariances over each ``window x window`` patch, the
    mean over all patches that fit. Identical inputs give exactly 1.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM needs two 2-D arrays of one shape, not {a.shape} and {b.shape}")
    if min(a.shape) < window:
        raise ValueError(f"SSIM window {window} exceeds the array shape {a.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)
    mx, my = _box_filter(x, window), _box_filter(y, window)
    correction = window * window / (window * window - 1.0)
    vx = (_box_filter(x * x, window) - mx * mx) * correction
    vy = (_box_filter(y * y, window) - my * my) * correction
    cxy = (_box_filter(x * y, window) - mx * my) * correction
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def shift_array(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` moved by ``dy`` rows and ``dx`` columns; the uncovered border repeats the edge."""
    rows, cols = a.shape
    padded = np.pad(a, ((abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[top : top + rows, left : left + cols]


def salience_order(heatmap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices, most salient first; ties (e.g. the zero region) in random order."""
    flat = heatmap.ravel()
    return np.lexsort((rng.random(flat.size), -flat))


def deletion_images(
    pixels: np.ndarray, order: np.ndarray, steps: int = DELETION_STEPS
) -> list[np.ndarray]:
    """``steps + 1`` images with the first ``i / steps`` of ``order`` set to the image mean."""
    fill = pixels.mean()
    out = []
    for i in range(steps + 1):
        k = int(round(i / steps * pixels.size))
        flat = pixels.astype(np.float64).ravel()
        flat[order[:k]] = fill
        out.append(flat.reshape(pixels.shape))
    return out


def curve_area(values: Sequence[float]) -> float:
    """Trapezoidal area under ``values`` at equally spaced fractions from 0 to 1."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise ValueError("a curve needs at least two points")
    return float(np.sum((v[1:] + v[:-1]) / 2.0) / (len(v) - 1))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EvalImage:
    """One labelled image with its lesion boxes (pixel coordinates, inclusive; empty: none)."""

    item: LabelledImage
    boxes: Boxes


def heatmap_grid(architecture_config: dict[str, Any], input_size: int) -> int:
    """Feature-map (and so heatmap) cells per side for a model's architecture config."""
    architecture = "dianet" if "pyramid_levels" in architecture_config else "amrinet"
    return max(1, input_size // feature_stride(architecture, architecture_config))


def training_sites(dataset: str) -> list[int] | None:
    """Sites named in a manifest's ``training.dataset`` (``"... sites [0, 1] ..."``)."""
    match = re.search(r"sites \[([0-9,\s]*)\]", dataset)
    if not match:
        return None
    return [int(v) for v in match.group(1).split(",") if v.strip()]


# --------------------------------------------------------------------------- evaluation


@dataclass
class Collected:
    """Per-image analyser outputs (``N`` images, ``K`` labels)."""

    labels: list[str]
    truth: np.ndarray  # (N,)
    sites: np.ndarray  # (N,), -1 unknown
    probabilities: np.ndarray  # (N, K), calibrated as the node reports them
    raw_probabilities: np.ndarray  # (N, K), the same MC samples at temperature 1
    score: np.ndarray
    ood: np.ndarray
    needs_review_image: np.ndarray  # score or OOD over the manifest thresholds
    study_of: list[str]
    study_needs_review: dict[str, bool]
    #: (N,) the bootstrap's unit of each image: its patient where ``labels.csv`` names one
    #: (``"patient <pseudonym>"``), else its study (``"study <uid>"``)
    cluster_of: list[str] = field(default_factory=list)
    pointing: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: (N,) each image's SOP Instance UID ("<uid> frame <n>" for a frame)
    sop_uids: list[str] = field(default_factory=list)


def collect(
    analyser: Analyser,
    images: Sequence[EvalImage],
    *,
    region_fraction: float = SR_REGION_FRACTION,
    log: Callable[[str], None] = print,
) -> Collected:
    """Analyse every study of ``images`` with the node's analyser (and at temperature 1);
    ``region_fraction``: the SR's AI region threshold (:func:`sr_box_scores`)."""
    manifest = analyser.manifest
    raw = Analyser(
        analyser.model,
        manifest.model_copy(update={"temperature": 1.0}),
        device=str(analyser.device),
        mc_samples=analyser.mc_samples,
        batch_size=analyser.batch_size,
        engine=analyser.engine,
    )
    by_study: dict[str, list[EvalImage]] = {}
    for image in images:
        by_study.setdefault(image.item.study_instance_uid, []).append(image)
    index = {name: i for i, name in enumerate(analyser.labels)}
    grid = heatmap_grid(manifest.architecture_config, manifest.input.size)
    truth: list[int] = []
    sites: list[int] = []
    probs: list[list[float]] = []
    raw_probs: list[list[float]] = []
    scores: list[float] = []
    oods: list[float] = []
    study_of: list[str] = []
    cluster_of: list[str] = []
    study_review: dict[str, bool] = {}
    pointing: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    sop_uids: list[str] = []
    for n, (study, members) in enumerate(by_study.items()):
        # each file once: a multi-frame image's frames are members of their own
        datasets = [pydicom.dcmread(path) for path in dict.fromkeys(m.item.path for m in members)]
        try:
            result: StudyAnalysis = analyser.analyse(datasets)
            uncal = raw.analyse(datasets)
        except NothingToAnalyse as exc:
            skipped[study] = str(exc)
            continue
        skipped.update(result.skipped)
        study_review[study] = result.needs_review
        by_name = {m.item.name: m for m in members}
        raw_by_name = {img.name: img for img in uncal.images}
        for img in result.images:
            member = by_name.get(img.name)
            if member is None:  # a frame without a label of its own
                continue
            truth.append(index[member.item.label])
            sites.append(-1 if member.item.site is None else member.item.site)
            probs.append([img.probabilities[name] for name in analyser.labels])
            raw_img = raw_by_name[img.name]
            raw_probs.append([raw_img.probabilities[name] for name in analyser.labels])
            scores.append(img.uncertainty.score)
            oods.append(img.ood_score)
            study_of.append(study)
            patient = member.item.patient
            cluster_of.append(f"patient {patient}" if patient else f"study {study}")
            sop_uids.append(img.name)
            if member.boxes:
                heat = img.heatmap_array()
                tolerance = half_cell((int(heat.shape[0]), int(heat.shape[1])), grid)
                # the heatmap the node finds the SR's box on: at the image's Rows x Columns
                sr_box = sr_box_scores(heat, member.boxes, region_fraction)
                pointing.append(
                    {
                        "image": len(truth) - 1,
                        "label": member.item.label,
                        "site": sites[-1],
                        **localisation_scores(heat, member.boxes, tolerance),
                        **sr_box,
                        # the node writes it only where the model reports a finding
                        "sr_box_written": sr_box["sr_box"] is not None
                        and finding_label(img, result) is not None,
                    }
                )
        if (n + 1) % 50 == 0:
            log(f"analysed {n + 1}/{len(by_study)} studies")
    if not truth:
        raise ValueError("no image could be analysed")
    score = np.asarray(scores)
    ood = np.asarray(oods)
    return Collected(
        labels=list(analyser.labels),
        truth=np.asarray(truth),
        sites=np.asarray(sites),
        probabilities=np.asarray(probs),
        raw_probabilities=np.asarray(raw_probs),
        score=score,
        ood=ood,
        needs_review_image=(score > manifest.uncertainty_threshold)
        | (ood > manifest.ood.threshold),
        study_of=study_of,
        cluster_of=cluster_of,
        study_needs_review=study_review,
        pointing=pointing,
        skipped=skipped,
        sop_uids=sop_uids,
    )


def with_pixels(ds: pydicom.Dataset, pixels: np.ndarray) -> pydicom.Dataset:
    """A copy of ``ds`` whose stored pixel values are ``pixels`` (rounded, clipped to range),
    with the same SOP Instance UID."""
    original = ds.pixel_array
    if original.ndim != 2:
        raise ValueError("only single-frame greyscale images can be perturbed")
    info = np.iinfo(original.dtype) if original.dtype.kind in "iu" else None
    bits = int(ds.get("BitsStored", 16))
    values = np.asarray(pixels, dtype=np.float64)
    if info is not None:
        low = info.min if original.dtype.kind == "i" else 0
        high = min(info.max, 2**bits - 1) if original.dtype.kind == "u" else info.max
        values = np.clip(np.rint(values), low, high)
    new = copy.deepcopy(ds)
    new.set_pixel_data(
        values.astype(original.dtype),
        photometric_interpretation=str(ds.PhotometricInterpretation),
        bits_stored=bits,
        # The copy keeps its source's SOP Instance UID, which seeds the analyser's dropout
        # masks: pydicom's default, a new random UID, made every perturbed copy's probabilities
        # (deletion curves) differ from run to run by up to 0.08.
        generate_instance_uid=False,
    )
    return new


@dataclass
class CostlyCase:
    """Stability and deletion results for one lesion image."""

    image: int  # index into the collected arrays
    site: int
    label: str
    ssim_shift: float
    ssim_noise: float
    deletion_curve: list[float]
    deletion_curve_random: list[float]
    #: Display copies for the example-heatmap figure (stored values, heatmap, boxes).
    pixels: np.ndarray = field(repr=False)
    heatmap: np.ndarray = field(repr=False)
    boxes: Boxes = ()
    monochrome1: bool = False

    @property
    def stability(self) -> float:
        return (4.0 * self.ssim_shift + self.ssim_noise) / 5.0

    @property
    def deletion_auc(self) -> float:
        return curve_area(self.deletion_curve)

    @property
    def deletion_auc_random(self) -> float:
        return curve_area(self.deletion_curve_random)


def select_costly(images: Sequence[EvalImage], n: int, seed: int) -> list[int]:
    """Up to ``n`` lesion images (with at least one box), drawn round-robin over sites, seeded.
    Frames of multi-frame images are not drawn: the costly checks perturb a single-frame
    image."""
    rng = np.random.default_rng(seed)
    by_site: dict[int, list[int]] = {}
    for i, image in enumerate(images):
        if image.boxes and image.item.frame_number is None:
            site = -1 if image.item.site is None else image.item.site
            by_site.setdefault(site, []).append(i)
    queues = {site: list(rng.permutation(idx)) for site, idx in sorted(by_site.items())}
    chosen: list[int] = []
    while len(chosen) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop(0)))
    return sorted(chosen)


def costly_cases(
    analyser: Analyser,
    images: Sequence[EvalImage],
    chosen: Sequence[int],
    position: dict[str, int],
    *,
    seed: int = BOOTSTRAP_SEED,
    log: Callable[[str], None] = print,
) -> list[CostlyCase]:
    """Explanation stability and deletion curves for the ``chosen`` images.

    Each image is analysed with its perturbed copies in one call (so they share the study's
    dropout seeds and are batched): four +-``STABILITY_SHIFT`` px shifts (the heatmap is shifted
    back and compared away from the border) and one Gaussian-noise copy for the SSIM; then
    ``DELETION_STEPS + 1`` copies with the most salient pixels (by the original heatmap), and
    the same in random order, replaced by the image mean, for the predicted class's probability
    (the last, constant copy cannot be analysed and counts as chance, ``1 / K``).
    ``position`` maps SOP Instance UIDs to their index in the collected arrays.
    """
    rng = np.random.default_rng(seed)
    shifts = [(0, STABILITY_SHIFT), (0, -STABILITY_SHIFT), (STABILITY_SHIFT, 0)]
    shifts.append((-STABILITY_SHIFT, 0))
    m = STABILITY_SHIFT
    cases: list[CostlyCase] = []
    for done, i in enumerate(chosen):
        image = images[i]
        if image.item.name not in position or not image.boxes:
            continue
        ds = pydicom.dcmread(image.item.path)
        try:
            pixels = ds.pixel_array.astype(np.float64)
            spread = float(pixels.max() - pixels.min()) or 1.0
            noisy = pixels + rng.normal(0.0, STABILITY_NOISE * spread, pixels.shape)
            variants = [ds] + [with_pixels(ds, shift_array(pixels, dy, dx)) for dy, dx in shifts]
            variants.append(with_pixels(ds, noisy))
            result = analyser.analyse(variants)
        except (ValueError, NothingToAnalyse) as exc:
            log(f"stability: skipped an image ({exc})")
            continue
        if len(result.images) != len(variants):
            continue
        base = result.images[0]
        hm = base.heatmap_array()
        inner = (slice(2 * m, -2 * m), slice(2 * m, -2 * m))
        shift_scores = [
            ssim(hm[inner], shift_array(r.heatmap_array(), -dy, -dx)[inner])
            for r, (dy, dx) in zip(result.images[1:5], shifts, strict=True)
        ]
        noise_score = ssim(hm, result.images[5].heatmap_array())
        cls = max(base.probabilities, key=lambda name: base.probabilities[name])
        order = salience_order(hm, rng)
        random_order = rng.permutation(pixels.size)
        steps = deletion_images(pixels, order) + deletion_images(pixels, random_order)
        # A fully replaced image is constant, which the preprocessing refuses: it counts as
        # chance (1 / K), the model having nothing left to see.
        informative = [i for i, p in enumerate(steps) if float(np.ptp(p)) > 0.0]
        deleted = analyser.analyse([with_pixels(ds, steps[i]) for i in informative])
        if len(deleted.images) != len(informative):
            log("deletion: skipped an image whose perturbed copies could not all be analysed")
            continue
        probs = [1.0 / len(analyser.labels)] * len(steps)
        for i, img in zip(informative, deleted.images, strict=True):
            probs[i] = img.probabilities[cls]
        cases.append(
            CostlyCase(
                image=position[image.item.name],
                site=-1 if image.item.site is None else image.item.site,
                label=image.item.label,
                ssim_shift=float(np.mean(shift_scores)),
                ssim_noise=noise_score,
                deletion_curve=probs[: DELETION_STEPS + 1],
                deletion_curve_random=probs[DELETION_STEPS + 1 :],
                pixels=pixels.astype(np.float32),
                heatmap=hm,
                boxes=image.boxes,
                monochrome1=str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1",
            )
        )
        if (done + 1) % 20 == 0:
            log(f"stability and deletion: {done + 1}/{len(chosen)} images")
    return cases


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def required_metrics(
    c: Collected,
    sel: np.ndarray,
    cases: Sequence[CostlyCase],
    *,
    in_domain_auc: float | None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """The issue's headline metrics on the images ``sel`` (a boolean mask over ``c``).

    ``domain_gap_auc`` is ``in_domain_auc`` minus this selection's macro AUC (None without
    either). ``n`` gives the number of cases behind each metric.
    """
    k = len(c.labels)
    probs, truth, score = c.probabilities[sel], c.truth[sel], c.score[sel]
    pred = probs.argmax(axis=1)
    correct = pred == truth
    indices = set(np.flatnonzero(sel).tolist())
    boxes = [p for p in c.pointing if p["image"] in indices]
    chosen = [case for case in cases if case.image in indices]
    auc_value = macro_auc(probs, truth) if len(truth) else None
    # whole patients where the labels name them (a patient's studies are not independent
    # either), else whole studies
    groups = [(c.cluster_of or c.study_of)[i] for i in np.flatnonzero(sel)]
    ci = bootstrap_ci(
        lambda idx: macro_auc(probs[idx], truth[idx]),
        len(truth),
        resamples=resamples,
        seed=seed,
        groups=groups,
    )
    gap = None if in_domain_auc is None or auc_value is None else in_domain_auc - auc_value
    n_images = len(truth)
    return {
        "accuracy": float(correct.mean()) if n_images else None,
        "f1_macro": _none_if_nan(f1_macro(pred, truth, k)) if n_images else None,
        "auc_macro": auc_value,
        "auc_macro_ci95": list(ci) if ci is not None else None,
        "ece": reliability(probs, truth).ece if n_images else None,
        "uncertainty_error_auroc": uncertainty_error_auroc(score, correct) if n_images else None,
        "auto_accept_accuracy_at_20pct_review": auto_accept_accuracy(score, correct),
        "pointing_game": _mean([float(p["hit"]) for p in boxes]),
        "heatmap_iou": _mean([p["iou"] for p in boxes]),
        "sr_box_iou": _mean([p["sr_box_iou"] for p in boxes]),
        "sr_box_covered": _mean([p["sr_box_covered"] for p in boxes]),
        "sr_box_peak_in_lesion": _mean([float(p["sr_box_peak_in_lesion"]) for p in boxes]),
        "explanation_stability_ssim": _mean([case.stability for case in chosen]),
        "explanation_stability_ssim_shift": _mean([case.ssim_shift for case in chosen]),
        "explanation_stability_ssim_noise": _mean([case.ssim_noise for case in chosen]),
        "deletion_auc": _mean([case.deletion_auc for case in chosen]),
        "deletion_auc_random": _mean([case.deletion_auc_random for case in chosen]),
        "domain_gap_auc": gap,
        "n": {
            "images": n_images,
            "errors": int((~correct).sum()),
            "auto_accepted": n_images - int(round(AUTO_ACCEPT_REVIEW * n_images)),
            "lesion_images": len(boxes),
            "sr_box_no_region": sum(p["sr_box"] is None for p in boxes),
            "sr_box_written": sum(bool(p["sr_box_written"]) for p in boxes),
            "stability_deletion_images": len(chosen),
            "bootstrap_resamples": resamples,
            "bootstrap_clusters": len(set(groups)),
        },
    }


def headline_metrics(
    c: Collected,
    cases: Sequence[CostlyCase],
    train_sites: Sequence[int] | None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """``test`` (all images) and ``leave_one_site_out`` (per site) headline metrics.

    Held-out sites are those outside ``train_sites``. The in-domain AUC is that of the
    training-site images; a held-out site's ``domain_gap_auc`` is the in-domain AUC minus its
    own. When no site in the data is held out (or the training sites are unknown) every site is
    reported against the other sites' images instead, and ``mode`` says so.
    """
    sites = sorted({int(s) for s in c.sites.tolist()})
    known = train_sites is not None
    held_out = [s for s in sites if known and s >= 0 and s not in list(train_sites or [])]
    in_domain = (
        np.isin(c.sites, list(train_sites))
        if train_sites is not None
        else np.ones(len(c.sites), bool)
    )
    in_domain_auc = macro_auc(c.probabilities[in_domain], c.truth[in_domain])
    test_gap_auc = None
    if held_out:
        unseen = np.isin(c.sites, held_out)
        unseen_auc = macro_auc(c.probabilities[unseen], c.truth[unseen])
        if in_domain_auc is not None and unseen_auc is not None:
            test_gap_auc = in_domain_auc - unseen_auc
    test = required_metrics(
        c, np.ones(len(c.truth), bool), cases, in_domain_auc=None, resamples=resamples, seed=seed
    )
    test["domain_gap_auc"] = test_gap_auc
    test["in_domain_auc"] = in_domain_auc
    per_site: dict[str, Any] = {}
    for site in sites:
        sel = c.sites == site
        reference = in_domain & ~sel if held_out else ~sel
        ref_auc = macro_auc(c.probabilities[reference], c.truth[reference])
        per_site[str(site)] = {
            "held_out": site in held_out,
            **required_metrics(
                c, sel, cases, in_domain_auc=ref_auc, resamples=resamples, seed=seed
            ),
        }
    if held_out:
        mode = (
            f"held-out sites {held_out} were not in training (sites {list(train_sites or [])}); "
            "training sites are listed for reference, their domain_gap_auc against the other "
            "training sites"
        )
    else:
        mode = (
            "no site in the data is held out of training (or the training sites are unknown): "
            "per-site figures, each site's domain_gap_auc against the other sites' images"
        )
    return {
        "test": test,
        "leave_one_site_out": {"mode": mode, "held_out_sites": held_out, "sites": per_site},
    }


def _none_if_nan(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def sr_box_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The SR box figures (:func:`sr_box_scores`) of some lesion images (at least one): means,
    the median IoU, the share with IoU >= 0.5, how many have no region and how many boxes the
    node writes (the model reports a finding)."""
    iou = [float(p["sr_box_iou"]) for p in rows]
    return {
        "cases": len(rows),
        "iou": float(np.mean(iou)),
        "iou_median": float(np.median(iou)),
        "iou_at_least_half": float(np.mean([v >= 0.5 for v in iou])),
        "covered": float(np.mean([p["sr_box_covered"] for p in rows])),
        "peak_in_lesion": float(np.mean([p["sr_box_peak_in_lesion"] for p in rows])),
        "share_of_image": float(np.mean([p["sr_box_share"] for p in rows])),
        "no_region": sum(p["sr_box"] is None for p in rows),
        "written": sum(bool(p["sr_box_written"]) for p in rows),
    }


def compute_metrics(
    c: Collected,
    *,
    uncertainty_threshold: float,
    normal_labels: Sequence[str],
    train_sites: Sequence[int] | None,
    region_fraction: float = SR_REGION_FRACTION,
) -> dict[str, Any]:
    """Every number of the report as a JSON-ready dictionary."""
    k = len(c.labels)
    pred = c.probabilities.argmax(axis=1)
    correct = pred == c.truth
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (c.truth, pred), 1)
    per_class: dict[str, Any] = {}
    for j, name in enumerate(c.labels):
        positive = c.truth == j
        per_class[name] = {
            "auc": roc_auc(c.probabilities[:, j], positive),
            "count": int(positive.sum()),
            **sens_spec(pred == j, positive),
        }
    normal_idx = [c.labels.index(n) for n in normal_labels if n in c.labels]
    finding_truth = ~np.isin(c.truth, normal_idx)
    finding_pred = ~np.isin(pred, normal_idx)
    finding_score = 1.0 - c.probabilities[:, normal_idx].sum(axis=1)
    calibrated = reliability(c.probabilities, c.truth)
    uncalibrated = reliability(c.raw_probabilities, c.truth)
    rates, accepted_accuracy = triage_curve(c.score, correct)
    review_unc = c.score > uncertainty_threshold
    accepted = ~review_unc
    studies = sorted(c.study_needs_review)

    per_site: dict[str, Any] = {}
    for site in sorted(set(c.sites.tolist())):
        sel = c.sites == site
        hits = [p for p in c.pointing if p["site"] == site and p["label"] == "nodule"]
        per_site[str(site)] = {
            "images": int(sel.sum()),
            "accuracy": float(correct[sel].mean()),
            "balanced_accuracy": _none_if_nan(balanced_accuracy(pred[sel], c.truth[sel], k)),
            "ece": reliability(c.probabilities[sel], c.truth[sel]).ece,
            "review_rate": float(c.needs_review_image[sel].mean()),
            "review_rate_uncertainty": float(review_unc[sel].mean()),
            "mean_ood_score": float(c.ood[sel].mean()),
            "nodule_pointing": float(np.mean([p["hit"] for p in hits])) if hits else None,
            "unseen": bool(train_sites is not None and site not in train_sites),
        }

    pointing: dict[str, Any] = {}
    for label in sorted({p["label"] for p in c.pointing}):
        rows = [p for p in c.pointing if p["label"] == label]
        pointing[label] = {
            "cases": len(rows),
            "hit_rate": float(np.mean([p["hit"] for p in rows])),
            "hit_rate_tolerant": float(np.mean([p["hit_tolerant"] for p in rows])),
            "mean_centre_value": float(np.mean([p["centre_value"] for p in rows])),
        }

    sr_box: dict[str, Any] = {"fraction": region_fraction, "labels": {}, "all": None}
    if c.pointing:
        for label in sorted({p["label"] for p in c.pointing}):
            sr_box["labels"][label] = sr_box_summary([p for p in c.pointing if p["label"] == label])
        sr_box["all"] = sr_box_summary(c.pointing)

    ood: dict[str, Any] = {"train_sites": list(train_sites) if train_sites is not None else None}
    if train_sites is not None:
        unseen = ~np.isin(c.sites, list(train_sites)) & (c.sites >= 0)
        ood["unseen_sites"] = sorted({int(s) for s in c.sites[unseen]})
        ood["auroc_unseen_site"] = roc_auc(c.ood, unseen)
        if unseen.any() and (~unseen).any():
            ood["mean_score_seen"] = float(c.ood[~unseen].mean())
            ood["mean_score_unseen"] = float(c.ood[unseen].mean())

    return {
        "images": len(c.truth),
        "studies": len(studies),
        "skipped": len(c.skipped),
        "labels": list(c.labels),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": balanced_accuracy(pred, c.truth, k),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "macro_auc": _none_if_nan(
            float(np.mean([v["auc"] for v in per_class.values() if v["auc"] is not None]))
            if any(v["auc"] is not None for v in per_class.values())
            else math.nan
        ),
        "finding_vs_normal": {
            "auc": roc_auc(finding_score, finding_truth),
            **sens_spec(finding_pred, finding_truth),
        },
        "calibration": {
            "ece": calibrated.ece,
            "ece_before_temperature": uncalibrated.ece,
            "nll": float(
                -np.log(
                    np.clip(c.probabilities[np.arange(len(c.truth)), c.truth], 1e-12, None)
                ).mean()
            ),
            "reliability": dataclasses.asdict(calibrated),
            "reliability_before_temperature": dataclasses.asdict(uncalibrated),
        },
        "triage": {
            "uncertainty_threshold": uncertainty_threshold,
            "review_rate_uncertainty": float(review_unc.mean()),
            "review_rate": float(c.needs_review_image.mean()),
            "study_review_rate": float(np.mean([c.study_needs_review[s] for s in studies])),
            "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else None,
            "reviewed_accuracy": float(correct[review_unc].mean()) if review_unc.any() else None,
            "curve": {
                "review_rate": rates.tolist(),
                "accepted_accuracy": accepted_accuracy.tolist(),
            },
        },
        "per_site": per_site,
        "pointing_game": pointing,
        "sr_box": sr_box,
        "ood": ood,
    }


# --------------------------------------------------------------------------- report


def _plots(c: Collected, metrics: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for j, name in enumerate(c.labels):
        positive = c.truth == j
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_curve(c.probabilities[:, j], positive)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (one vs rest)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    files["roc"] = "roc.png"

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    cal = metrics["calibration"]
    for key, name in (
        ("reliability_before_temperature", f"T = 1 (ECE {cal['ece_before_temperature']:.3f})"),
        ("reliability", f"T = {metrics['temperature']:.3f} (ECE {cal['ece']:.3f})"),
    ):
        rel = cal[key]
        pts = [
            (conf, acc)
            for conf, acc in zip(rel["bin_confidence"], rel["bin_accuracy"], strict=True)
            if conf is not None
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xlabel="confidence (top label)", ylabel="accuracy", title="Reliability diagram")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files["reliability"] = "reliability.png"

    tri = metrics["triage"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(tri["curve"]["review_rate"], tri["curve"]["accepted_accuracy"])
    ax.axvline(
        tri["review_rate_uncertainty"],
        color="tab:red",
        linestyle="--",
        label=f"manifest threshold ({tri['review_rate_uncertainty']:.1%} reviewed)",
    )
    ax.set(xlabel="review rate", ylabel="accuracy of auto-accepted", title="Triage curve")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "triage.png", dpi=110)
    plt.close(fig)
    files["triage"] = "triage.png"

    sites = metrics["per_site"]
    if sites:
        names = list(sites)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        x = np.arange(len(names))
        ax.bar(x - 0.2, [sites[s]["accuracy"] for s in names], 0.4, label="accuracy")
        ax.bar(x + 0.2, [sites[s]["review_rate"] for s in names], 0.4, label="review rate")
        ax.set_xticks(x, [f"site {s}" + (" *" if sites[s]["unseen"] else "") for s in names])
        ax.set_ylim(0, 1.05)
        ax.set_title("Per site (* = not in training)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "per_site.png", dpi=110)
        plt.close(fig)
        files["per_site"] = "per_site.png"

    if metrics["ood"].get("auroc_unseen_site") is not None:
        train_sites = metrics["ood"]["train_sites"]
        unseen = ~np.isin(c.sites, train_sites) & (c.sites >= 0)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        bins = np.linspace(0, float(np.quantile(c.ood, 0.995)) * 1.05 + 1e-9, 40).tolist()
        ax.hist(c.ood[~unseen], bins=bins, alpha=0.6, density=True, label="training sites")
        ax.hist(c.ood[unseen], bins=bins, alpha=0.6, density=True, label="unseen sites")
        ax.axvline(metrics["ood_threshold"], color="tab:red", linestyle="--", label="threshold")
        ax.set(
            xlabel="OOD score",
            ylabel="density",
            title=f"OOD score (AUROC {metrics['ood']['auroc_unseen_site']:.3f})",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ood.png", dpi=110)
        plt.close(fig)
        files["ood"] = "ood.png"
    return files


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


HEADLINE_KEYS = (
    "accuracy",
    "f1_macro",
    "auc_macro",
    "ece",
    "uncertainty_error_auroc",
    "auto_accept_accuracy_at_20pct_review",
    "pointing_game",
    "heatmap_iou",
    "sr_box_iou",
    "sr_box_covered",
    "sr_box_peak_in_lesion",
    "explanation_stability_ssim",
    "deletion_auc",
    "deletion_auc_random",
    "domain_gap_auc",
)


def _headline_markdown(m: dict[str, Any], files: dict[str, str]) -> list[str]:
    """The headline table: test split, each site, and the comparison model's test split."""
    if "test" not in m:
        return []
    columns: list[tuple[str, dict[str, Any]]] = [("test", m["test"])]
    for site, v in m["leave_one_site_out"]["sites"].items():
        columns.append((f"site {site}" + (" (held out)" if v["held_out"] else ""), v))
    if "comparison" in m:
        other = m["comparison"]
        columns.append((f"{other['model']['name']} test", other["test"]))
        for site in m["leave_one_site_out"]["held_out_sites"]:
            v = other["leave_one_site_out"]["sites"].get(str(site))
            if v is not None:
                columns.append((f"{other['model']['name']} site {site}", v))
    lines = [
        "",
        "## Headline metrics",
        "",
        f"Leave-one-site-out: {m['leave_one_site_out']['mode']}. AUC 95 % CI: percentile "
        f"bootstrap, {m['settings']['bootstrap_resamples']} resamples, seed "
        f"{m['settings']['bootstrap_seed']}. Stability (SSIM of the heatmap under "
        f"+-{m['settings']['stability_shift_px']} px shifts and Gaussian noise) and deletion "
        f"AUC ({m['settings']['deletion_steps']} steps, lower is more faithful) on "
        f"{m['settings']['stability_deletion_images']} lesion images. sr_box_*: the SR's AI "
        f"region box at {_fmt(m['settings'].get('sr_region_fraction'), 2)} of the heatmap's "
        "peak against the lesion boxes (section above).",
        "",
        "| metric | " + " | ".join(name for name, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for key in HEADLINE_KEYS:
        cells = []
        for _, v in columns:
            cell = _fmt(v.get(key))
            if key == "auc_macro" and v.get("auc_macro_ci95"):
                low, high = v["auc_macro_ci95"]
                cell += f" ({low:.3f}-{high:.3f})"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append(
        "| n images / lesion / stability | "
        + " | ".join(
            f"{v['n']['images']} / {v['n']['lesion_images']} / "
            f"{v['n']['stability_deletion_images']}"
            for _, v in columns
        )
        + " |"
    )
    if "examples" in files:
        lines += ["", f"![Example heatmaps]({files['examples']})"]
    return lines


def _sr_box_markdown(m: dict[str, Any]) -> list[str]:
    """The SR's AI region box against the lesion boxes, by label and for all."""
    box = m.get("sr_box")
    if box is None:
        return []
    lines = ["", "## The SR's AI region box", ""]
    if box["all"] is None:
        return [*lines, "No lesion boxes in the data."]
    lines += [
        "The box the node writes into the SR for an image (TID 1410 AI region): the connected "
        f"region of the heatmap at or above {_fmt(box['fraction'], 2)} of its peak "
        "(`worker.sr_region_fraction`, `--region-fraction`) that holds the peak, found by the "
        "node's own code on the heatmap at the image's Rows x Columns, so in the image's "
        "pixels. IoU: with the best-matching lesion box of the image; covered: the share of "
        "that lesion box inside the box; peak in lesion: the region's peak in any of the "
        "image's lesion boxes. A heatmap with no region (nowhere above 0) counts as IoU 0, "
        "nothing covered and a miss. Every lesion image counts, whether or not the model "
        "reports a finding on it; the node writes the box only where it does (written).",
        "",
        "| label | cases | IoU mean (median) | IoU >= 0.5 | lesion covered | peak in lesion "
        "| box, share of the image | no region | written |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [*box["labels"].items(), ("**all**", box["all"])]
    for label, v in rows:
        lines.append(
            f"| {label} | {v['cases']} | {_fmt(v['iou'])} ({_fmt(v['iou_median'])}) | "
            f"{_fmt(v['iou_at_least_half'])} | {_fmt(v['covered'])} | "
            f"{_fmt(v['peak_in_lesion'])} | {_fmt(v['share_of_image'])} | {v['no_region']} | "
            f"{v['written']} |"
        )
    return lines


def _markdown(metrics: dict[str, Any], files: dict[str, str]) -> str:
    m = metrics
    lines = [
        f"# Evaluation of {m['model']['name']} {m['model']['version']}",
        "",
        f"Data: `{m['data']}`: {m['images']} images in {m['studies']} studies "
        f"({m['skipped']} skipped). Analysed with the node's analyser, {m['mc_samples']} "
        f"Monte-Carlo samples, in {m['seconds']:.1f} s.",
        "",
        "## Classification",
        "",
        f"- accuracy {_fmt(m['accuracy'])}, balanced accuracy {_fmt(m['balanced_accuracy'])}, "
        f"macro AUC {_fmt(m['macro_auc'])}",
        f"- finding vs normal: AUC {_fmt(m['finding_vs_normal']['auc'])}, sensitivity "
        f"{_fmt(m['finding_vs_normal']['sensitivity'])}, specificity "
        f"{_fmt(m['finding_vs_normal']['specificity'])} (operating point: most probable label)",
        "",
        "| label | images | AUC | sensitivity | specificity |",
        "|---|---|---|---|---|",
    ]
    for name, v in m["per_class"].items():
        lines.append(
            f"| {name} | {v['count']} | {_fmt(v['auc'])} | {_fmt(v['sensitivity'])} | "
            f"{_fmt(v['specificity'])} |"
        )
    lines += ["", "Confusion matrix (rows: truth, columns: prediction):", ""]
    lines.append("| | " + " | ".join(m["labels"]) + " |")
    lines.append("|---" * (len(m["labels"]) + 1) + "|")
    for name, row in zip(m["labels"], m["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    if "roc" in files:
        lines += ["", f"![ROC]({files['roc']})"]
    cal = m["calibration"]
    tri = m["triage"]
    lines += [
        "",
        "## Calibration",
        "",
        f"ECE {_fmt(cal['ece'])} at the manifest temperature {_fmt(m['temperature'])} "
        f"(ECE {_fmt(cal['ece_before_temperature'])} at T = 1); NLL {_fmt(cal['nll'], 4)}.",
        "",
        f"![Reliability]({files['reliability']})",
        "",
        "## Triage",
        "",
        f"At the manifest uncertainty threshold {_fmt(tri['uncertainty_threshold'], 4)} "
        f"{_fmt(tri['review_rate_uncertainty'])} of images go to review on uncertainty "
        f"(target {_fmt(m['target_review_rate'])}); with the OOD flag as the node decides, "
        f"{_fmt(tri['review_rate'])} of images and {_fmt(tri['study_review_rate'])} of studies. "
        f"Accuracy of the auto-accepted images {_fmt(tri['accepted_accuracy'])}, of the "
        f"reviewed ones {_fmt(tri['reviewed_accuracy'])}.",
        "",
        f"![Triage]({files['triage']})",
        "",
        "## Per site",
        "",
        "| site | images | accuracy | balanced | ECE | review rate | mean OOD | nodule pointing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, v in m["per_site"].items():
        mark = " (unseen)" if v["unseen"] else ""
        lines.append(
            f"| {site}{mark} | {v['images']} | {_fmt(v['accuracy'])} | "
            f"{_fmt(v['balanced_accuracy'])} | {_fmt(v['ece'])} | {_fmt(v['review_rate'])} | "
            f"{_fmt(v['mean_ood_score'])} | {_fmt(v['nodule_pointing'])} |"
        )
    if "per_site" in files:
        lines += ["", f"![Per site]({files['per_site']})"]
    lines += ["", "## Heatmap faithfulness (pointing game)", ""]
    if m["pointing_game"]:
        lines += [
            "Hit: the heatmap's peak lies inside a ground-truth lesion box (any of the image's); "
            "tolerant: within half a feature cell of one (the CAM has the feature map's "
            f"resolution, {m['heatmap_grid']} x {m['heatmap_grid']} cells); centre value: the "
            "heatmap (1 = its peak) at the box centre (the highest over the image's boxes).",
            "",
            "| label | cases | hit rate | tolerant hit rate | mean centre value |",
            "|---|---|---|---|---|",
        ]
        for label, v in m["pointing_game"].items():
            lines.append(
                f"| {label} | {v['cases']} | {_fmt(v['hit_rate'])} | "
                f"{_fmt(v['hit_rate_tolerant'])} | {_fmt(v['mean_centre_value'])} |"
            )
    else:
        lines.append("No lesion boxes in the data.")
    lines += _sr_box_markdown(m)
    lines += _headline_markdown(m, files)
    ood = m["ood"]
    lines += ["", "## Out-of-distribution detection", ""]
    if ood.get("auroc_unseen_site") is not None:
        lines += [
            f"OOD score AUROC, unseen sites {ood['unseen_sites']} vs training sites "
            f"{ood['train_sites']}: {_fmt(ood['auroc_unseen_site'])} (mean score "
            f"{_fmt(ood['mean_score_seen'])} vs {_fmt(ood['mean_score_unseen'])}, threshold "
            f"{_fmt(m['ood_threshold'])}).",
            "",
            f"![OOD]({files['ood']})",
        ]
    else:
        lines.append("No images from sites outside the training set (or training sites unknown).")
    return "\n".join(lines) + "\n"


def evaluate_model(
    model: Path,
    data: Path,
    out_dir: Path | None = None,
    *,
    mc_samples: int = 20,
    threads: int | None = None,
    train_sites: Sequence[int] | None = None,
    analyser: Analyser | None = None,
    compare: Path | None = None,
    costly_images: int = COSTLY_IMAGES,
    seed: int = BOOTSTRAP_SEED,
    region_fraction: float = SR_REGION_FRACTION,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Analyse ``data`` with the model at ``model`` (manifest or folder); return the metrics.

    With ``out_dir``, also write ``metrics.json``, ``report.md`` and the PNG plots there.
    ``train_sites`` defaults to the sites named in the manifest's training summary.
    ``costly_images`` lesion images (round-robin over sites, ``seed``) get the stability and
    deletion metrics. ``compare`` evaluates a second model on the same images, with the same
    held-out sites and the same subsample, under the ``comparison`` key.
    ``region_fraction``: the deployment's ``worker.sr_region_fraction``, for the SR's AI region
    box (:func:`sr_box_scores`).
    """
    started = time.perf_counter()
    if not 0.0 < region_fraction <= 1.0:
        raise ValueError(f"the region fraction must be in (0, 1], not {region_fraction}")
    if not (Path(data) / LABELS_CSV).is_file():
        raise ValueError(f"{data} has no {LABELS_CSV}")
    if costly_images < 0:
        raise ValueError("costly_images must not be negative")
    analyser = analyser or load_analyser(Path(model), mc_samples=mc_samples, threads=threads)
    manifest = analyser.manifest
    items = scan_folder(Path(data), labels=analyser.labels)
    if not items:
        raise ValueError(f"no labelled DICOM images found under {data}")
    boxes = read_boxes(Path(data), items)
    images = [EvalImage(item, boxes.get(item.name, ())) for item in items]
    if train_sites is None:
        train_sites = training_sites(manifest.training.dataset)
    chosen = select_costly(images, costly_images, seed)
    collected, cases, metrics = _evaluate_one(
        analyser, images, chosen, train_sites, seed=seed, region_fraction=region_fraction, log=log
    )
    metrics["data"] = str(data)
    if compare is not None:
        other = load_analyser(Path(compare), mc_samples=mc_samples, threads=threads)
        if list(other.labels) != list(analyser.labels):
            raise ValueError(
                f"cannot compare: {compare} has labels {other.labels}, not {analyser.labels}"
            )
        log(f"evaluating the comparison model {compare}")
        _, _, theirs = _evaluate_one(
            other, images, chosen, train_sites, seed=seed, region_fraction=region_fraction, log=log
        )
        metrics["comparison"] = {
            key: theirs[key]
            for key in (
                "model",
                "test",
                "leave_one_site_out",
                "accuracy",
                "balanced_accuracy",
                "macro_auc",
                "sr_box",
                "mc_samples",
                "temperature",
            )
        }
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    if out_dir is not None:
        write_report(collected, metrics, Path(out_dir), cases=cases)
    return metrics


def _evaluate_one(
    analyser: Analyser,
    images: Sequence[EvalImage],
    chosen: Sequence[int],
    train_sites: Sequence[int] | None,
    *,
    seed: int,
    region_fraction: float = SR_REGION_FRACTION,
    log: Callable[[str], None],
) -> tuple[Collected, list[CostlyCase], dict[str, Any]]:
    manifest = analyser.manifest
    collected = collect(analyser, images, region_fraction=region_fraction, log=log)
    position = {sop: i for i, sop in enumerate(collected.sop_uids)}
    cases = costly_cases(analyser, images, chosen, position, seed=seed, log=log)
    normal = [name for name in manifest.labels if name not in manifest.finding_labels]
    metrics = compute_metrics(
        collected,
        uncertainty_threshold=manifest.uncertainty_threshold,
        normal_labels=normal,
        train_sites=train_sites,
        region_fraction=region_fraction,
    )
    metrics.update(headline_metrics(collected, cases, train_sites, seed=seed))
    metrics.update(
        {
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                "preset": manifest.training.preset,
                "training": manifest.training.dataset,
            },
            "mc_samples": analyser.mc_samples,
            "temperature": manifest.temperature,
            "target_review_rate": manifest.target_review_rate,
            "ood_threshold": manifest.ood.threshold,
            "heatmap_grid": heatmap_grid(manifest.architecture_config, manifest.input.size),
            "settings": {
                "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                "bootstrap_seed": seed,
                "auto_accept_review_fraction": AUTO_ACCEPT_REVIEW,
                "heatmap_iou_threshold": HEATMAP_IOU_THRESHOLD,
                "sr_region_fraction": region_fraction,
                "stability_shift_px": STABILITY_SHIFT,
                "stability_noise_fraction": STABILITY_NOISE,
                "deletion_steps": DELETION_STEPS,
                "stability_deletion_images": len(cases),
            },
        }
    )
    return collected, cases, metrics


def write_report(
    c: Collected,
    metrics: dict[str, Any],
    out_dir: Path,
    *,
    cases: Sequence[CostlyCase] = (),
) -> None:
    """``metrics.json``, ``report.md`` and the PNG plots (``example_heatmaps.png`` from cases)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _plots(c, metrics, out_dir)
    if cases:
        files["examples"] = _example_heatmaps(cases, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "report.md").write_text(_markdown(metrics, files))


def _example_heatmaps(cases: Sequence[CostlyCase], out: Path, count: int = 6) -> str:
    """A grid of source images with the heatmap overlaid and the ground-truth boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    by_key: dict[tuple[str, int], CostlyCase] = {}
    for case in cases:
        by_key.setdefault((case.label, case.site), case)
    examples = list(by_key.values())[:count]
    cols = min(3, len(examples))
    rows = math.ceil(len(examples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, case in zip(axes.ravel(), examples, strict=False):
        low, high = np.percentile(case.pixels, [0.5, 99.5])
        shown = np.clip((case.pixels - low) / max(high - low, 1e-6), 0.0, 1.0)
        if case.monochrome1:
            shown = 1.0 - shown
        ax.imshow(shown, cmap="gray")
        ax.imshow(case.heatmap, cmap="jet", alpha=0.35, vmin=0.0, vmax=1.0)
        for x0, y0, x1, y1 in case.boxes:
            corner = (x0 - 0.5, y0 - 0.5)
            ax.add_patch(Rectangle(corner, x1 - x0 + 1, y1 - y0 + 1, fill=False, color="lime"))
        iou = heatmap_iou(case.heatmap, boxes_mask(case.heatmap.shape, case.boxes))
        ax.set_title(f"{case.label}, site {case.site}: IoU {iou:.2f}", fontsize=9)
    fig.suptitle("Heatmap (overlay) and ground-truth lesion boxes (green)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "example_heatmaps.png", dpi=100)
    plt.close(fig)
    return "example_heatmaps.png"


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A short console summary."""
    tri = metrics["triage"]
    lines = [
        f"images {metrics['images']} ({metrics['studies']} studies): accuracy "
        f"{metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}, macro AUC "
        f"{_fmt(metrics['macro_auc'])}, ECE {metrics['calibration']['ece']:.3f} "
        f"(T=1: {metrics['calibration']['ece_before_temperature']:.3f})",
        f"review rate {tri['review_rate']:.3f} (uncertainty {tri['review_rate_uncertainty']:.3f}),"
        f" accepted accuracy {_fmt(tri['accepted_accuracy'])}",
    ]
    for site, v in metrics["per_site"].items():
        mark = " (unseen)" if v["unseen"] else ""
        lines.append(
            f"  site {site}{mark}: accuracy {v['accuracy']:.3f} ({v['images']} images), "
            f"review rate {v['review_rate']:.3f}"
        )
    for label, v in metrics["pointing_game"].items():
        lines.append(
            f"  pointing game {label}: {v['hit_rate']:.3f}, within half a cell "
            f"{v['hit_rate_tolerant']:.3f}, centre value {v['mean_centre_value']:.3f} "
            f"({v['cases']} cases)"
        )
    box = metrics.get("sr_box") or {"labels": {}}
    for label, v in box["labels"].items():
        lines.append(
            f"  SR box {label} (fraction {box['fraction']:g}): IoU {v['iou']:.3f}, lesion "
            f"covered {v['covered']:.3f}, peak in lesion {v['peak_in_lesion']:.3f}, "
            f"written {v['written']} of {v['cases']} cases"
        )
    if metrics["ood"].get("auroc_unseen_site") is not None:
        lines.append(f"  OOD AUROC unseen site: {metrics['ood']['auroc_unseen_site']:.3f}")
    blocks = [("test", metrics.get("test"))]
    if "comparison" in metrics:
        blocks.append(("comparison test", metrics["comparison"]["test"]))
    for name, block in blocks:
        if block is not None:
            lines.append(
                f"{name}: " + ", ".join(f"{key} {_fmt(block.get(key))}" for key in HEADLINE_KEYS)
            )
    return lines
