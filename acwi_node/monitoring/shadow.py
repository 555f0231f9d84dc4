"""Shadow models against the live ones (README "Shadow models").

A route's shadow models analyse each of its studies after the live model
(:mod:`acwi_node.tasks.shadow`). :class:`ShadowComparison` pairs each shadow analysis with its
live job's, per route, live model version and shadow model version, over the last days:

* how often the two agree (the predicted label; finding or not), with Cohen's kappa and the
  confusion of the labels;
* how many studies each would send to review, and whether the difference is beyond chance
  (McNemar's exact test of the paired decisions);
* where a radiologist gave a final verdict on the live job's case (the cases the live model
  asked about, and its quality-control samples), how often each model was right, and whether
  the difference is beyond chance (McNemar again). Those cases are not a random sample of the
  studies: the live model's uncertain ones are over-represented.

No patient data is read: job summaries and verdict labels.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, select

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, JobState, ShadowJob, ShadowState, Study, Verdict, utcnow
from acwi_node.monitoring.drift import mcnemar_p
from acwi_node.monitoring.report import latest_analysis
from acwi_node.review.store import FINAL_ACTIONS  # the verdicts that say what a study shows

#: The latest disagreements a report lists.
DISAGREEMENTS = 20


@dataclass(frozen=True)
class Pair:
    """One study as the live and the shadow model saw it."""

    route: str
    live: tuple[str, str]  # (manifest name, version)
    shadow: tuple[str, str]
    live_label: str
    shadow_label: str
    live_finding: bool
    shadow_finding: bool
    live_review: bool
    shadow_review: bool
    #: The radiologist's final label of the live job's case; "" when none.
    truth: str
    study_uid: str = ""


def _picked(job_model: Any, summary: Any) -> tuple[Any, ...]:
    """The few fields of a summary a pair needs, picked out by the database (a CT's summary
    lists hundreds of images, never read here)."""
    return (
        func.coalesce(summary[("model", "name")].as_string(), job_model),
        func.coalesce(summary[("model", "version")].as_string(), ""),
        summary["predicted_label"].as_string(),
        summary["finding_labels"],
        summary["needs_review"].as_boolean(),
    )


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' labels: their agreement beyond what their label shares
    give by chance (1 full, 0 chance); None for no pairs, 1.0 where both always say one
    and the same label."""
    n = len(pairs)
    if not n:
        return None
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[k] * second[k] for k in first) / (n * n)
    if chance >= 1.0:
        return 1.0
    return (observed - chance) / (1.0 - chance)


@dataclass(frozen=True)
class ShadowReport:
    """A shadow model version beside the live one on a route."""

    route: str
    live: tuple[str, str]
    shadow: tuple[str, str]
    studies: int
    label_agreement: float
    kappa: float | None
    finding_agreement: float
    live_review_rate: float
    shadow_review_rate: float
    #: McNemar's p of the paired review decisions.
    review_p: float
    #: live label -> shadow label -> studies
    confusion: dict[str, dict[str, int]]
    #: The studies with a radiologist's final label, and each model's right answers there.
    verdicts: int
    live_correct: int
    shadow_correct: int
    #: McNemar's p of the paired right and wrong answers.
    correct_p: float
    #: The latest studies the two labelled differently (at most :data:`DISAGREEMENTS`):
    #: what an ML engineer looks at next.
    disagreements: list[dict[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        def rate(k: int) -> float | None:
            return None if not self.verdicts else round(k / self.verdicts, 4)

        return {
            "route": self.route,
            "live": {"name": self.live[0], "version": self.live[1]},
            "shadow": {"name": self.shadow[0], "version": self.shadow[1]},
            "studies": self.studies,
            "label_agreement": round(self.label_agreement, 4),
            "kappa": None if self.kappa is None else round(self.kappa, 4),
            "finding_agreement": round(self.finding_agreement, 4),
            "review_rate": {
                "live": round(self.live_review_rate, 4),
                "shadow": round(self.shadow_review_rate, 4),
                "p_value": float(f"{self.review_p:.3g}"),
            },
            "confusion": self.confusion,
            "verdicts": {
                "studies": self.verdicts,
                "live_accuracy": rate(self.live_correct),
                "shadow_accuracy": rate(self.shadow_correct),
                "p_value": float(f"{self.correct_p:.3g}"),
            },
            "disagreements": self.disagreements,
        }


def compare_pairs(pairs: Sequence[Pair]) -> ShadowReport:
    """The report of one group's pairs (at least one)."""
    first = pairs[0]
    n = len(pairs)
    confusion: dict[str, dict[str, int]] = {}
    for p in pairs:
        row = confusion.setdefault(p.live_label, {})
        row[p.shadow_label] = row.get(p.shadow_label, 0) + 1
    judged = [p for p in pairs if p.truth]
    live_only = sum(p.live_label == p.truth != p.shadow_label for p in judged)
    shadow_only = sum(p.shadow_label == p.truth != p.live_label for p in judged)
    return ShadowReport(
        route=first.route,
        live=first.live,
        shadow=first.shadow,
        studies=n,
        label_agreement=sum(p.live_label == p.shadow_label for p in pairs) / n,
        kappa=cohen_kappa([(p.live_label, p.shadow_label) for p in pairs]),
        finding_agreement=sum(p.live_finding == p.shadow_finding for p in pairs) / n,
        live_review_rate=sum(p.live_review for p in pairs) / n,
        shadow_review_rate=sum(p.shadow_review for p in pairs) / n,
        review_p=mcnemar_p(
            sum(p.live_review and not p.shadow_review for p in pairs),
            sum(p.shadow_review and not p.live_review for p in pairs),
        ),
        confusion=confusion,
        verdicts=len(judged),
        live_correct=sum(p.live_label == p.truth for p in judged),
        shadow_correct=sum(p.shadow_label == p.truth for p in judged),
        correct_p=mcnemar_p(live_only, shadow_only),
        disagreements=[
            {
                "study_uid": p.study_uid,
                "live": p.live_label,
                "shadow": p.shadow_label,
                "verdict": p.truth,
            }
            for p in pairs[::-1]
            if p.live_label != p.shadow_label
        ][:DISAGREEMENTS],  # fmt: skip
    )


class ShadowComparison:
    """Reads the ledger's shadow jobs beside their live jobs."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def report(self, *, days: int = 30, now: dt.datetime | None = None) -> list[ShadowReport]:
        """A report per route, live version and shadow version, of the shadow analyses
        finished in the last ``days`` days whose live job still stands (not superseded) and
        is its study's latest analysis by that live version (a study analysed again gives
        one pair, :func:`~acwi_node.monitoring.report.latest_analysis`)."""
        since = (now or utcnow()) - dt.timedelta(days=days)
        with self.ledger.session() as s:
            rows = s.execute(
                select(
                    Job.route,
                    Study.study_uid,
                    *_picked(Job.model, Job.summary),
                    *_picked(ShadowJob.model, ShadowJob.summary),
                    Verdict.label,
                )
                .join(ShadowJob, ShadowJob.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .outerjoin(
                    Verdict,
                    and_(
                        Verdict.job_id == Job.id,
                        Verdict.action.in_(FINAL_ACTIONS),
                        Verdict.superseded_at.is_(None),
                    ),
                )
                .where(
                    ShadowJob.state == ShadowState.DONE,
                    ShadowJob.finished_at >= since,
                    Job.state != JobState.SUPERSEDED,
                    latest_analysis(),  # a study analysed again: its latest pair
                )
                .order_by(ShadowJob.id)
            ).all()
        groups: dict[tuple[str, tuple[str, str], tuple[str, str]], list[Pair]] = {}
        for row in rows:
            (route, uid, l_name, l_version, l_label, l_findings, l_review,
             s_name, s_version, s_label, s_findings, s_review, truth) = row  # fmt: skip
            if not l_label or not s_label:
                continue  # either analysed nothing
            pair = Pair(
                route=str(route),
                live=(str(l_name), str(l_version)),
                shadow=(str(s_name), str(s_version)),
                live_label=str(l_label),
                shadow_label=str(s_label),
                live_finding=l_label in set(l_findings or []),
                shadow_finding=s_label in set(s_findings or []),
                live_review=bool(l_review),
                shadow_review=bool(s_review),
                truth=str(truth or ""),
                study_uid=str(uid),
            )
            groups.setdefault((pair.route, pair.live, pair.shadow), []).append(pair)
        return [compare_pairs(pairs) for _key, pairs in sorted(groups.items())]

    def unfinished(self, *, days: int = 30, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Per route and shadow model (its configured name): the shadow analyses of the last
        ``days`` days that failed, and those waiting for a worker, with the latest error (a
        shadow model that fails every study is never in :meth:`report`)."""
        since = (now or utcnow()) - dt.timedelta(days=days)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        with self.ledger.session() as s:
            rows = s.execute(
                select(Job.route, ShadowJob.model, ShadowJob.state, ShadowJob.error)
                .join(Job, ShadowJob.job_id == Job.id)
                .where(
                    ShadowJob.state.in_(
                        (ShadowState.FAILED, ShadowState.QUEUED, ShadowState.ANALYSING)
                    ),
                    ShadowJob.created_at >= since,
                )
                .order_by(ShadowJob.id)
            ).all()
        for route, model, state, error in rows:
            row = out.setdefault(
                (route, model),
                {"route": route, "model": model, "failed": 0, "pending": 0, "last_error": ""},
            )
            if state == ShadowState.FAILED:
                row["failed"] += 1
                row["last_error"] = str(error or "")[:500]
            else:
                row["pending"] += 1
        return [out[k] for k in sorted(out)]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_shadow(
    reports: Sequence[ShadowReport], unfinished: Sequence[dict[str, Any]], *, days: int
) -> str:
    """The shadow models as ``acwi-node monitor`` prints them."""
    out = [f"shadow models (last {days} day(s)):"]
    for r in reports:
        j = r.as_json()
        v = j["verdicts"]
        kappa = "-" if r.kappa is None else f"{r.kappa:.2f}"
        out.append(
            f"  route {r.route}: {' '.join(r.shadow)} beside {' '.join(r.live)}, {r.studies}"
            " studies"
        )
        out.append(
            f"    same label {_pct(r.label_agreement)} (kappa {kappa}), same finding or not"
            f" {_pct(r.finding_agreement)}"
        )
        out.append(
            f"    to review: live {_pct(r.live_review_rate)}, shadow {_pct(r.shadow_review_rate)}"
            f" (McNemar p {r.review_p:.2g})"
        )
        if r.verdicts:
            out.append(
                f"    radiologists' verdicts on {r.verdicts} studies: live right"
                f" {_pct(v['live_accuracy'])}, shadow right {_pct(v['shadow_accuracy'])}"
                f" (McNemar p {r.correct_p:.2g})"
            )
        else:
            out.append("    no radiologist's verdict on these studies yet")
        for live_label, row in sorted(r.confusion.items()):
            cells = ", ".join(f"{label} {n}" for label, n in sorted(row.items()))
            out.append(f"    live {live_label}: shadow {cells}")
    for u in unfinished:
        error = f"; latest error: {u['last_error']}" if u["last_error"] else ""
        out.append(
            f"  route {u['route']}, shadow {u['model']}: {u['failed']} failed,"
            f" {u['pending']} waiting{error}"
        )
    return "\n".join(out)
