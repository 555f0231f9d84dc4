"""The SR's AI region groups (TID 1410), encoded from a template instead of built one by one.

An image the model reports a finding on gets an AI region group (:mod:`.sr`): about 40
content items, alike between images but for a few values. highdicom took about 7 ms to build
and encode each, so a 100-slice CT with a finding on every slice spent 0.7 s on them, more
than on the rest of its SR. As for the per-image groups (:mod:`.image_groups`), highdicom
builds one group for a stand-in whose variable values are sentinels, and every image's group
is rendered from it (:mod:`.content_templates`): the tracking UID, the tracking identifier
("AI region N: <label>"), the probability and the uncertainty score (DS and FD), the box's
Graphic Data, the source image's SOP Instance UID and, for a frame of a multi-frame image,
its Referenced Frame Number.

A template is kept for the process, keyed by what its other bytes depend on: the model, its
labels, the character set, the finding's label, the source image's SOP Class (highdicom
checks a frame reference against its IOD), whether the image is a frame and the threshold
fraction. Where no template can be made (a sentinel not found, a value that is not
finite, a label that is not ASCII) the group is built by highdicom; the tests compare the
bytes with highdicom's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.valuerep import DS

from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty
from acwi_node.results.content_templates import Role, kept_template, template
from acwi_node.results.encoding import encode_items
from acwi_node.results.image_groups import template_key
from acwi_node.results.uids import ResultUIDs

__all__ = ["RegionGroupBuilder", "RegionSpec", "encode_region_groups", "region_corners"]


@dataclass(frozen=True)
class RegionSpec:
    """One AI region to write: the image (its number in the document), its source, the
    finding's label and the box (first and last column and row, inclusive)."""

    number: int
    image: ImageResult
    source: Dataset
    label: str
    box: tuple[int, int, int, int]


#: Builds one region's group (highdicom content items) for a :class:`RegionSpec`.
RegionGroupBuilder = Callable[[RegionSpec], Sequence[Any]]

#: The stand-in's values: none of them can occur in a template otherwise.
_SENTINEL_INSTANCE = "1.2.826.0.1.3680043.10.1137.97533.1"
_SENTINEL_NUMBER = 975339753
_SENTINEL_FRAME = 97533
_SENTINEL_BOX = (9753, 9754, 9755, 9756)
_SENTINEL_PROBABILITY = 0.713931
_SENTINEL_SCORE = 0.724137


def region_corners(box: tuple[int, int, int, int]) -> list[float]:
    """The box as a closed polyline's Graphic Data (x, y of five points): 0,0 is the top
    left corner of the top left pixel, so a box covering columns x0..x1 spans x0 to x1 + 1."""
    x0, y0, x1, y1 = box
    corners = [(x0, y0), (x1 + 1, y0), (x1 + 1, y1 + 1), (x0, y1 + 1), (x0, y0)]
    return [float(v) for point in corners for v in point]


def _roles(spec: RegionSpec, uids: ResultUIDs) -> dict[Role, Any]:
    probability = float(spec.image.probabilities[spec.label])
    score = float(spec.image.uncertainty.score)
    roles: dict[Role, Any] = {
        ("uid", "region"): uids.region_tracking_uid(spec.label, spec.image.name),
        ("text", "region"): f"AI region {spec.number}: {spec.label}",
        ("ds", "p"): DS(probability, auto_format=True),
        ("fd", "p"): probability,
        ("ds", "u"): DS(score, auto_format=True),
        ("fd", "u"): score,
        ("graphic", ""): region_corners(spec.box),
        ("instance", ""): str(spec.source.SOPInstanceUID),
    }
    if spec.image.frame_number is not None:
        roles[("frame", "")] = spec.image.frame_number
    return roles


def _stand_in(spec: RegionSpec) -> RegionSpec:
    source = Dataset()
    # the source's own class: highdicom checks whether its IOD is multi-frame
    source.SOPClassUID = str(spec.source.SOPClassUID)
    source.SOPInstanceUID = _SENTINEL_INSTANCE
    probabilities = dict(spec.image.probabilities)
    probabilities[spec.label] = _SENTINEL_PROBABILITY
    image = ImageResult(
        sop_instance_uid=_SENTINEL_INSTANCE,
        sop_class_uid=str(spec.source.SOPClassUID),
        series_instance_uid=spec.image.series_instance_uid,
        probabilities=probabilities,
        uncertainty=Uncertainty(entropy=0.0, epistemic=0.0, aleatoric=0.0, score=_SENTINEL_SCORE),
        heatmap=spec.image.heatmap,
        frame_number=None if spec.image.frame_number is None else _SENTINEL_FRAME,
    )
    return RegionSpec(_SENTINEL_NUMBER, image, source, spec.label, _SENTINEL_BOX)


def encode_region_groups(
    specs: Sequence[RegionSpec],
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    build: RegionGroupBuilder,
    fraction: float,
    encodings: Any,
) -> bytes:
    """Every region's group, encoded as items of the Imaging Measurements container's Content
    Sequence, in order; ``fraction``: the threshold the groups say (part of a template's key;
    one written as a sentinel is would be taken for it, so such groups are left to
    highdicom)."""
    sentinels = (_SENTINEL_PROBABILITY, _SENTINEL_SCORE)
    if fraction in sentinels or not all(label.isascii() for label in analysis.labels):
        return encode_items([build(spec)[0] for spec in specs], encodings)
    study_key = template_key(build, analysis, encodings)
    out: list[bytes] = []
    for spec in specs:
        rendered: bytes | None = None
        values = (spec.image.probabilities[spec.label], spec.image.uncertainty.score)
        if all(math.isfinite(float(v)) for v in values):
            framed = spec.image.frame_number is not None
            stand_in = _stand_in(spec)
            found = kept_template(
                ("region", study_key, fraction, spec.label, str(spec.source.SOPClassUID), framed),
                lambda: template([build(stand_in)[0]], _roles(stand_in, uids), encodings),  # noqa: B023
            )
            if found is not None:
                rendered = found.render(_roles(spec, uids), encodings)
        if rendered is None:
            rendered = encode_items([build(spec)[0]], encodings)
        out.append(rendered)
    return b"".join(out)
