"""The study-level measurement groups of an SR, encoded from a template kept across studies.

A result SR opens its Imaging Measurements with the study's groups (see :mod:`.sr`): one TID
1501 group per label, with the study's probability, and a summary group with its uncertainty,
out-of-distribution score, whether it needs review and the predicted class. Each lists every
analysed image as a source. highdicom took about 7 ms to build them for a radiograph, more
than the model, and as much again to encode them; for a 100-slice CT, with 400 image
references, about 60 ms.

Their bytes depend on the model, its labels, the character set, how many images were analysed,
whether the study needs review and which label was predicted; every other value is a role of a
template (:mod:`.content_templates`): the tracking UIDs (derived from the study), the
measurements, and each analysed image's SOP Class and Instance UIDs. So highdicom builds the
groups once for a stand-in study whose values are sentinels, and every later study with the same
key (the node's radiographs, one after the other) is rendered from that template, kept for the
process. The template is made the second time a key is met, not the first: the first study of
a key is built by highdicom alone, which costs less than making a template that may never be
used again (a CT's image count seldom comes back). Whatever a template cannot describe (a value
that is not finite, a label that is not ASCII, a sentinel not found) makes
:func:`encode_study_groups` return None: the caller builds the groups with highdicom, as before.
The tests compare the document with highdicom's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pydicom import Dataset

from acwi_node.inference.types import StudyAnalysis
from acwi_node.results.content_templates import (
    Role,
    Template,
    kept_template,
    template,
)
from acwi_node.results.image_groups import (
    finite,
    measurement_roles,
    sentinel_values,
    template_key,
)
from acwi_node.results.uids import ResultUIDs

#: Builds the study-level groups (highdicom content items) of an analysis over its images.
StudyGroupBuilder = Callable[[StudyAnalysis, Sequence[Dataset]], Sequence[Any]]

#: The scope of the study-level groups' tracking UIDs (``ResultUIDs.tracking_uid``).
STUDY_SCOPE = "study"
#: The stand-in images' UIDs: this root, then ".1" (class) or ".2" (instance), then the index.
_SENTINEL_ROOT = "1.2.826.0.1.3680043.10.1137.97532"


def _stand_in_images(count: int) -> list[Dataset]:
    images = []
    for index in range(1, count + 1):
        ds = Dataset()
        ds.SOPClassUID = f"{_SENTINEL_ROOT}.1.{index}"
        ds.SOPInstanceUID = f"{_SENTINEL_ROOT}.2.{index}"
        images.append(ds)
    return images


def _roles(analysis: StudyAnalysis, images: Sequence[Dataset], uids: ResultUIDs) -> dict[Role, Any]:
    roles = measurement_roles(
        analysis.probabilities, analysis.uncertainty, analysis.ood_score, STUDY_SCOPE, uids
    )
    for index, ds in enumerate(images, start=1):
        roles[("class", str(index))] = str(ds.SOPClassUID)
        roles[("instance", str(index))] = str(ds.SOPInstanceUID)
    return roles


def _template(
    analysis: StudyAnalysis,
    count: int,
    build: StudyGroupBuilder,
    uids: ResultUIDs,
    encodings: Any,
) -> Template | None:
    probabilities, uncertainty, ood_score = sentinel_values(analysis.labels)
    stand_in = replace(
        analysis, probabilities=probabilities, uncertainty=uncertainty, ood_score=ood_score
    )
    images = _stand_in_images(count)
    groups = build(stand_in, images)
    return template([group[0] for group in groups], _roles(stand_in, images, uids), encodings)


def encode_study_groups(
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    build: StudyGroupBuilder,
    images: Sequence[Dataset],
    encodings: Any,
) -> bytes | None:
    """The study-level groups of ``analysis`` over the analysed ``images``, encoded as items
    of the Imaging Measurements container's Content Sequence; None: build them with
    highdicom (``build``)."""
    labels = tuple(analysis.labels)
    if not images or not all(label.isascii() for label in labels):
        return None
    probabilities = {label: analysis.probabilities[label] for label in labels}
    if not finite(probabilities, analysis.uncertainty, analysis.ood_score):
        return None
    key = (
        *template_key(build, analysis, encodings),
        len(images),
        bool(analysis.needs_review),
        analysis.predicted_label,
    )
    # A key met for the first time is left to highdicom: a template is made when it comes
    # back. A CT's image count seldom does, and a template made for one study costs its build
    # and more (400 images: 1.7 s against highdicom's 1.1 s; 0.7 s rendered from a kept one).
    found = kept_template(
        key,
        lambda: _template(analysis, len(images), build, uids, encodings),
        second_time=True,
    )
    if found is None:
        return None
    study = replace(analysis, probabilities=probabilities)
    return found.render(_roles(study, images, uids), encodings)
