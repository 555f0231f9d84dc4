"""The per-image measurement groups of an SR, encoded from a template instead of built one by one.

A result SR holds, for every analysed image, one TID 1501 measurement group per label and an
uncertainty summary group (see :mod:`.sr`): about 80 content items and 600 data elements per
image, all alike but for a dozen values. Building them with highdicom's templates took
10-20 ms per image, so a 100-slice CT's groups took 1.5-2 s, most of building its SR, and
encoding them another half second.

Here highdicom builds one image's groups, for a stand-in image whose every variable value is a
sentinel, and each image's groups are rendered from them (:mod:`.content_templates`). The
variable values are the tracking UIDs, the summary group's tracking identifier ("Image N
summary"), each measurement's numeric value (Numeric Value, DS, and Floating Point Value, FD,
as highdicom writes them), the source image's SOP Class and Instance UIDs and, for a frame of
a multi-frame image, its Referenced Frame Number (such images have templates of their own).

A template holds nothing of the study it was made for: the values that differ between studies
(the tracking UIDs, derived from the study, and the source image's UIDs) are its variable
values. So templates are kept for the process's next studies, keyed by what their bytes depend
on (the model's name, version and manufacturer, its labels, the labels an image has, the
character set): a radiograph's groups are then rendered too (its SR 42 -> 30 ms to build and
encode), where building the template for one image would cost what highdicom's groups cost.

Whatever a template cannot describe is left to highdicom: an image with a value that is not
finite is built by highdicom (and fails there as it always did); a template in which a
sentinel is not found, or a label that is not ASCII, makes :func:`encode_image_groups` return
None and the caller builds every group with highdicom. The tests compare the bytes with
highdicom's for studies of one and many images, values and SOP classes, and for a study whose
groups come from a template made for another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydicom import Dataset
from pydicom.valuerep import DS

from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty
from acwi_node.results.content_templates import (
    Role,
    Template,
    encodings_key,
    kept_template,
    template,
)
from acwi_node.results.encoding import encode_items
from acwi_node.results.uids import ResultUIDs

#: Builds one image's groups (highdicom content items) for (image number, image, source).
GroupBuilder = Callable[[int, ImageResult, Dataset], Sequence[Any]]

#: The stand-in image's values: none of them can occur in a template otherwise.
_SENTINEL_INSTANCE = "1.2.826.0.1.3680043.10.1137.97531.1"
_SENTINEL_CLASS = "1.2.826.0.1.3680043.10.1137.97531.2"
_SENTINEL_NUMBER = 975319753
_SENTINEL_FRAME = 97531
#: Sentinel measurement values: distinct, with six significant digits (DS and FD unique).
_SENTINEL_BASE = 0.713917
_SENTINEL_STEP = 0.010203
#: The uncertainty fields of an image's summary group, in the order of :mod:`.sr`'s
#: ``_UNCERTAINTY_FIELDS`` (the order does not matter here: values are found by sentinel).
UNCERTAINTY_FIELDS = ("entropy", "epistemic", "aleatoric", "score")


def sentinel_values(labels: Sequence[str]) -> tuple[dict[str, float], Uncertainty, float]:
    """Sentinel probabilities (by label), uncertainty and out-of-distribution score: all
    distinct, with six significant digits (each written alike as DS and FD)."""
    values = iter(_SENTINEL_BASE + _SENTINEL_STEP * k for k in range(len(labels) + 8))
    probabilities = {label: round(next(values), 6) for label in labels}
    uncertainty = Uncertainty(**{name: round(next(values), 6) for name in UNCERTAINTY_FIELDS})
    return probabilities, uncertainty, round(next(values), 6)


def _sentinel_image(labels: Sequence[str], example: ImageResult) -> ImageResult:
    """The stand-in image: ``example`` with every variable value a sentinel."""
    probabilities, uncertainty, ood_score = sentinel_values(labels)
    return replace(
        example,
        sop_instance_uid=_SENTINEL_INSTANCE,
        sop_class_uid=_SENTINEL_CLASS,
        probabilities=probabilities,
        uncertainty=uncertainty,
        ood_score=ood_score,
        frame_number=None if example.frame_number is None else _SENTINEL_FRAME,
    )


def measurement_roles(
    probabilities: Mapping[str, float],
    uncertainty: Uncertainty,
    ood_score: float,
    scope: str,
    uids: ResultUIDs,
) -> dict[Role, Any]:
    """The roles of a set of groups for ``scope`` (an image's SOP Instance UID, or "study"):
    each label group's tracking UID and probability, the summary group's tracking UID, its
    uncertainty values and out-of-distribution score."""
    roles: dict[Role, Any] = {
        ("uid", "summary"): uids.summary_tracking_uid(scope),
        ("ds", "ood"): DS(float(ood_score), auto_format=True),
        ("fd", "ood"): float(ood_score),
    }
    for label, probability in probabilities.items():
        roles[("uid", "p:" + label)] = uids.tracking_uid(label, scope)
        roles[("ds", "p:" + label)] = DS(float(probability), auto_format=True)
        roles[("fd", "p:" + label)] = float(probability)
    for name in UNCERTAINTY_FIELDS:
        value = float(getattr(uncertainty, name))
        roles[("ds", "u:" + name)] = DS(value, auto_format=True)
        roles[("fd", "u:" + name)] = value
    return roles


def finite(probabilities: Mapping[str, float], uncertainty: Uncertainty, ood_score: float) -> bool:
    """Whether every value is finite (highdicom refuses the others, and so do templates)."""
    values = [*probabilities.values(), ood_score]
    values += [getattr(uncertainty, name) for name in UNCERTAINTY_FIELDS]
    return all(math.isfinite(float(v)) for v in values)


def _roles(image: ImageResult, source: Dataset, number: int, uids: ResultUIDs) -> dict[Role, Any]:
    """Each role's value for ``image`` (read from ``source``, number ``number``)."""
    roles = measurement_roles(
        image.probabilities, image.uncertainty, image.ood_score, image.name, uids
    )
    roles[("instance", "")] = str(source.SOPInstanceUID)
    roles[("class", "")] = str(source.SOPClassUID)
    if image.frame_number is not None:
        roles[("frame", "")] = image.frame_number
    roles[("text", "summary")] = f"Image {number} summary"
    return roles


def _template(
    labels: Sequence[str],
    example: ImageResult,
    build: GroupBuilder,
    uids: ResultUIDs,
    encodings: Any,
) -> Template | None:
    """The template for images with ``labels``, or None if a sentinel is not found (the source
    image's UIDs are in every group; every other value in one)."""
    image = _sentinel_image(labels, example)
    source = Dataset()
    source.SOPClassUID = _SENTINEL_CLASS
    source.SOPInstanceUID = _SENTINEL_INSTANCE
    groups = build(_SENTINEL_NUMBER, image, source)
    return template(
        [group[0] for group in groups],
        _roles(image, source, _SENTINEL_NUMBER, uids),
        encodings,
    )


def template_key(
    build: Callable[..., Any], analysis: StudyAnalysis, encodings: Any
) -> tuple[Any, ...]:
    """What a measurement group template's bytes depend on besides its variable values (module
    docstring): the builder's code (the node has one; the tests try others), the model's
    identity, its labels and the character set. Callers add what else theirs depend on."""
    model = analysis.model
    return (
        getattr(build, "__code__", build),
        model.name,
        model.version,
        model.manufacturer,
        tuple(analysis.labels),
        encodings_key(encodings),
    )


def encode_image_groups(
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    build: GroupBuilder,
    sources: Mapping[str, Dataset],
    encodings: Any,
) -> bytes | None:
    """Every analysed image's groups, encoded as items of the Imaging Measurements container's
    Content Sequence, in the document's order; None: build them all with highdicom."""
    if not analysis.images or not all(label.isascii() for label in analysis.labels):
        return None
    study_key = template_key(build, analysis, encodings)
    out: list[bytes] = []
    for number, image in enumerate(analysis.images, start=1):
        labels = tuple(label for label in analysis.labels if label in image.probabilities)
        source = sources[image.sop_instance_uid]
        rendered: bytes | None = None
        if finite(image.probabilities, image.uncertainty, image.ood_score):
            framed = image.frame_number is not None
            found = kept_template(
                (study_key, labels, framed),
                lambda: _template(labels, image, build, uids, encodings),  # noqa: B023
            )
            if found is None:
                return None
            rendered = found.render(_roles(image, source, number, uids), encodings)
        if rendered is None:
            groups = build(number, image, source)
            rendered = encode_items([group[0] for group in groups], encodings)
        out.append(rendered)
    return b"".join(out)
