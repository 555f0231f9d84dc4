"""Plain result types passed from the analyser to the result writers and the ledger.

They carry numbers and arrays only (no torch tensors), so writers and tests need no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a result: written into the SR's device observer and algorithm items."""

    name: str
    version: str
    manufacturer: str = "ACWI Node"
    #: Short content hash of the weights file; part of the SR device UID.
    weights_sha256: str = ""


@dataclass(frozen=True)
class Uncertainty:
    """Per-image (or per-study) uncertainty, all in nats except where said otherwise."""

    #: Entropy of the mean predictive distribution (total predictive uncertainty).
    entropy: float
    #: Mutual information between prediction and weights (Monte-Carlo dropout epistemic part).
    epistemic: float
    #: Expected entropy under the weight posterior plus mean heteroscedastic variance (aleatoric).
    aleatoric: float
    #: The scalar the review decision compares with the manifest threshold (normalised to [0, 1]).
    score: float


@dataclass
class ImageResult:
    """The model's output for one source image."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    #: Calibrated class probabilities, keyed by the manifest's labels, summing to 1.
    probabilities: dict[str, float]
    uncertainty: Uncertainty
    #: Float32 heatmap in [0, 1] at the source image's Rows x Columns.
    heatmap: np.ndarray = field(repr=False)
    #: Out-of-distribution score (higher = further from the training data), >= 0.
    ood_score: float = 0.0
    #: False when the worker's ``heatmaps`` policy skips this image's heatmap object (the array
    #: is still computed); writers must not write a heatmap for such an image.
    heatmap_selected: bool = True


@dataclass
class StudyAnalysis:
    """The model's output for a whole study: per image, and the study-level summary."""

    model: ModelIdentity
    labels: list[str]
    images: list[ImageResult]
    #: Study-level probabilities (mean over images, for multi-image studies).
    probabilities: dict[str, float]
    #: The label with the highest study-level probability.
    predicted_label: str
    uncertainty: Uncertainty
    ood_score: float
    #: True when the uncertainty score exceeds the manifest's threshold (or OOD flagged).
    needs_review: bool
    #: Labels the manifest marks as findings (e.g. everything but "normal").
    finding_labels: list[str] = field(default_factory=list)
    #: Source instances that were received but could not be analysed, with the reason.
    skipped: dict[str, str] = field(default_factory=dict)
