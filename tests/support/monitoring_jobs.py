"""Analysed jobs for the model-monitoring tests, written straight into the ledger with the
summaries the analyse task writes: a typical population and the means to draw another."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Sequence
from typing import Any

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, JobState, Study


def summary(
    *,
    label: str = "normal",
    review: bool = False,
    uncertainty: Sequence[float] = (0.1,),
    ood: float = 0.8,
    ood_threshold: float | None = 2.0,
    equipment: Sequence[str] = ("Northwind Imaging NW-DR 500",),
    version: str = "1.0.0",
) -> dict[str, Any]:
    """A job summary as the analyse task writes it (acwi_node.tasks.analyse.summarise)."""
    out: dict[str, Any] = {
        "model": {"name": "dianet-cxr", "version": version},
        "labels": ["normal", "nodule", "opacity"],
        "finding_labels": ["nodule", "opacity"],
        "probabilities": {"normal": 0.7, "nodule": 0.2, "opacity": 0.1},
        "predicted_label": label,
        "uncertainty": {
            "entropy": 0.5,
            "epistemic": 0.1,
            "aleatoric": 0.4,
            "score": max(uncertainty),
        },  # the most uncertain image's
        "uncertainty_threshold": 0.6,
        "ood_score": ood,
        "equipment": list(equipment),
        "needs_review": review,
        "images": [
            {
                "sop_instance_uid": f"2.25.{i}",
                "probabilities": {},
                "uncertainty_score": u,
                "ood_score": ood,
            }
            for i, u in enumerate(uncertainty)
        ],  # fmt: skip
        "skipped": {},
    }
    if ood_threshold is not None:
        out["ood_threshold"] = ood_threshold
    return out


class Jobs:
    """Analysed jobs written straight into the ledger, one study each."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.n = 0

    def add(self, at: dt.datetime, site: str = "SITEA", **kwargs: Any) -> int:
        self.n += 1
        with self.ledger.session() as s:
            study = Study(study_uid=f"2.25.{uuid.uuid4().int}", calling_ae=site, state="delivered")
            s.add(study)
            s.flush()
            job = Job(
                study_id=study.id,
                generation=1,
                route="cxr",
                model="cxr-route-model",
                state=JobState.DELIVERED,
                started_at=at,
                summary=summary(**kwargs),
            )
            s.add(job)
            s.flush()
            return int(job.id)

    def many(
        self, n: int, start: dt.datetime, step: dt.timedelta, seed: int, **kwargs: Any
    ) -> list[int]:
        """``n`` studies from ``start`` on, ``step`` apart; ``kwargs`` values that are
        callables are drawn per study from ``random.Random(seed)``."""
        rng = random.Random(seed)
        ids = []
        for i in range(n):
            drawn = {k: v(rng) if callable(v) else v for k, v in kwargs.items()}
            ids.append(self.add(start + step * i, **drawn))
        return ids


def typical_uncertainty(rng: random.Random) -> tuple[float, float]:
    return (rng.betavariate(2, 8), rng.betavariate(2, 8))


def typical_label(rng: random.Random) -> str:
    return "nodule" if rng.random() < 0.2 else "normal"


def typical_review(rng: random.Random) -> bool:
    return rng.random() < 0.1


def typical_ood(rng: random.Random) -> float:
    return rng.gauss(1.0, 0.2)


TYPICAL = {
    "uncertainty": typical_uncertainty,
    "label": typical_label,
    "review": typical_review,
    "ood": typical_ood,
}


def far_ood(rng: random.Random) -> float:
    return rng.gauss(3.0, 0.2)


#: Studies from a scanner the model never met: typical labels and uncertainty, but out of
#: its distribution (OOD threshold 2.0) and so every one sent to review.
NEW_SCANNER: dict[str, Any] = {
    **TYPICAL,
    "equipment": ("Vantage Diagnostics VD-CR 12",),
    "ood": far_ood,
    "review": True,
}
