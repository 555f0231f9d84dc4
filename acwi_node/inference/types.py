"""Plain result types passed from the analyser to the result writers and the ledger.

They carry numbers and arrays only (no torch tensors), so writers and tests need no model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Brings a map at the network's resolution to ``(rows, columns)`` (float32 in [0, 1]).
Upsample = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


class DeferredHeatmap:
    """An image's heatmap kept at the network's feature resolution (a few hundred bytes) and
    brought to the source image's Rows x Columns each time it is read (``np.asarray``).

    The worker holds a study's results until it has written them; a CT's hundreds of slices
    would otherwise hold a full-size float32 map each (1 MiB at 512 x 512). Reading one costs
    one bilinear resize (about 0.15 ms at 512 x 512 on a CPU core), done where the map is
    drawn or written; each read gives the same values.
    """

    __slots__ = ("_cam", "_shape", "_upsample")

    dtype = np.dtype(np.float32)

    def __init__(self, cam: np.ndarray, shape: tuple[int, int], upsample: Upsample) -> None:
        self._cam = cam
        self._shape = (int(shape[0]), int(shape[1]))
        self._upsample = upsample

    @property
    def cam(self) -> np.ndarray:
        """The map at the network's resolution, as kept."""
        return self._cam

    @property
    def shape(self) -> tuple[int, int]:
        """The full-size map's shape: the source image's (Rows, Columns)."""
        return self._shape

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = self._upsample(self._cam, self._shape)
        return full if dtype is None else full.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"DeferredHeatmap({self._cam.shape} -> {self._shape})"


def unit_name(sop_instance_uid: str, frame_number: int | None) -> str:
    """How an image the model reads is named in reasons and lists: its SOP Instance UID, and
    for a frame of a multi-frame image ``"<uid> frame <n>"``."""
    if frame_number is None:
        return sop_instance_uid
    return f"{sop_instance_uid} frame {frame_number}"


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
    #: Expected entropy under the weight posterior (aleatoric): ``entropy = epistemic + aleatoric``.
    aleatoric: float
    #: The scalar the review decision compares with the manifest threshold (normalised to [0, 1]).
    score: float


@dataclass
class ImageResult:
    """The model's output for one source image, or for one frame of a multi-frame image."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    #: Calibrated class probabilities, keyed by the manifest's labels, summing to 1.
    probabilities: dict[str, float]
    uncertainty: Uncertainty
    #: Float32 heatmap in [0, 1] at the source image's Rows x Columns; the analyser gives a
    #: :class:`DeferredHeatmap`, read it with :meth:`heatmap_array`.
    heatmap: np.ndarray | DeferredHeatmap = field(repr=False)
    #: Out-of-distribution score (higher = further from the training data), >= 0.
    ood_score: float = 0.0
    #: False when the worker's ``heatmaps`` policy skips this image's heatmap object (the array
    #: is still computed); writers must not write a heatmap for such an image.
    heatmap_selected: bool = True
    #: The frame (1-based) of a multi-frame source image this result is for; None for a
    #: single-frame image.
    frame_number: int | None = None

    @property
    def name(self) -> str:
        """The image as reasons and lists name it: its SOP Instance UID, and for a frame
        ``"<uid> frame <n>"``."""
        return unit_name(self.sop_instance_uid, self.frame_number)

    def heatmap_array(self) -> np.ndarray:
        """The heatmap as a float32 array at the source image's Rows x Columns (computed anew
        from a :class:`DeferredHeatmap` at each call: keep it only while it is needed)."""
        return np.asarray(self.heatmap, dtype=np.float32)


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
    #: How many of this model version's analyses of the study were withdrawn from the PACS
    #: before this one: part of its result UIDs (:func:`acwi_node.results.uids.result_uids`).
    reissue: int = 0
