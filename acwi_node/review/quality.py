"""How the model fares against the radiologists: quality-control samples and agreement.

The worklist holds the studies the model was unsure of (uncertainty or out-of-distribution
score above its thresholds); the radiologists' verdicts on them say how often it was right
when it was unsure, not how often it is right when it is sure. With
``review.quality_sample_percent`` set, that share of the studies it was sure of also go to the
worklist, as quality-control samples: their verdicts estimate its accuracy on the results the
PACS receives unreviewed, and a drop there is what a site's scanner change or a new patient
population looks like first.

The choice is a hash of the Study Instance UID, not a random draw: the same study is a
sample or not however often it is analysed again, and the share over many studies is the
percentage set.

:func:`agreement` turns the final verdicts (confirm, override) into rows per model version
and kind of case (``flagged``: the model asked for review; ``sample``: quality control):
verdicts, agreements, the agreement rate with its 95 % Wilson interval, and the commonest
corrections (model label to the radiologist's).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Kinds of review case: the model asked for review, or a quality-control sample.
FLAGGED = "flagged"
SAMPLE = "sample"

#: Corrections listed per row, commonest first.
TOP_CORRECTIONS = 3


def quality_sampled(study_uid: str, percent: float) -> bool:
    """Whether a study the model was sure of is a quality-control sample at ``percent`` % of
    such studies: the same answer for the same study every time."""
    if percent <= 0.0:
        return False
    if percent >= 100.0:
        return True
    digest = hashlib.sha256(b"acwi-quality-sample\x00" + study_uid.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0 < percent


def sample_reason(percent: float) -> str:
    """The worklist's reason for a quality-control sample."""
    return f"quality-control sample ({percent:g} % of the studies the model was sure of)"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) for ``n`` = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class FinalVerdict:
    """A confirm or override, with what it was on."""

    model: str
    version: str
    kind: str  # FLAGGED or SAMPLE
    model_label: str
    label: str  # the radiologist's
    site: str = ""  # who sent the generation judged (its calling AE title)

    @property
    def agrees(self) -> bool:
        return self.label == self.model_label


def agreement(verdicts: Iterable[FinalVerdict]) -> list[dict[str, Any]]:
    """Rows per (model, version, kind), sorted: ``verdicts``, ``agreed``, ``agreement``,
    ``ci_low``, ``ci_high`` (95 % Wilson), ``corrections``, ``[(model label, radiologist's
    label, count)]``, the commonest :data:`TOP_CORRECTIONS`, and ``sites``, ``[(calling AE,
    verdicts, agreed)]`` by site: where one site's agreement falls while the others' hold,
    something changed there (a scanner, a protocol)."""
    groups: dict[tuple[str, str, str], list[FinalVerdict]] = {}
    for verdict in verdicts:
        groups.setdefault((verdict.model, verdict.version, verdict.kind), []).append(verdict)
    rows: list[dict[str, Any]] = []
    for (model, version, kind), group in sorted(groups.items()):
        agreed = sum(v.agrees for v in group)
        low, high = wilson_interval(agreed, len(group))
        corrections = Counter((v.model_label, v.label) for v in group if not v.agrees)
        by_site: dict[str, list[int]] = {}
        for v in group:
            counts = by_site.setdefault(v.site, [0, 0])
            counts[0] += 1
            counts[1] += int(v.agrees)
        rows.append(
            {
                "model": model,
                "version": version,
                "kind": kind,
                "verdicts": len(group),
                "agreed": agreed,
                "agreement": agreed / len(group),
                "ci_low": low,
                "ci_high": high,
                "corrections": [
                    [was, now, n]
                    for (was, now), n in sorted(
                        corrections.items(), key=lambda kv: (-kv[1], kv[0])
                    )[:TOP_CORRECTIONS]
                ],
                "sites": [[site, n, k] for site, (n, k) in sorted(by_site.items())],
            }
        )
    return rows
