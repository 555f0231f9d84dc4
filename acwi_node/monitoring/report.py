"""Each model version's recent studies compared with its baseline (README "Model monitoring").

The ledger keeps every analysed job's summary (probabilities, predicted label, uncertainty
and out-of-distribution scores per image, whether it went to review; since this version the
equipment that made the images and the OOD threshold). :class:`ModelMonitor` reads the
summaries of a model version's **baseline** (its first ``monitoring.baseline_studies``
studies on this node, or the period an ML engineer pinned) and of the **recent window** (the
last ``monitoring.window_days`` days, less any baseline study), and compares them signal by
signal (:mod:`acwi_node.monitoring.drift`). A study analysed again counts once per model
version: its latest analysis (:func:`latest_analysis`). No patient data is read: the summaries
hold none, and the sites are calling AE titles (of the sender of the generation a job
analysed: a study another AE sent again counts as that AE's).
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    ColumnElement,
    and_,
    case,
    column,
    delete,
    exists,
    func,
    literal,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from acwi_node.config import MonitoringSettings
from acwi_node.hospital_clock import wall_clock
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Job,
    JobState,
    MonitoringBaseline,
    Study,
    job_model_name,
    job_model_version,
    job_sender,
    utcnow,
)
from acwi_node.monitoring.cache import Refreshed
from acwi_node.monitoring.drift import (
    Status,
    bin_counts,
    category_counts,
    psi,
    psi_p_value,
    psi_status,
    quantile_edges,
    rate_status,
    two_proportion_z,
    z_p_value,
)

SignalKind = Literal["rate", "score", "category"]


@dataclass(frozen=True)
class Sample:
    """What one analysed study contributes (from its job's summary)."""

    job_id: int
    model: str
    version: str
    at: dt.datetime
    predicted_label: str
    finding: bool
    needs_review: bool
    #: Above the model's OOD threshold; None where the summary does not say (before this
    #: version the threshold was not kept).
    ood: bool | None
    #: The study's uncertainty score (its most uncertain image's) and OOD score (its
    #: farthest image's), as its review decision read them; and how many images it had.
    uncertainty: float
    ood_score: float
    images: int
    site: str
    #: "Manufacturer Model" of the analysed images; empty where not recorded.
    equipment: tuple[str, ...]


def _sample(
    *,
    job_id: int,
    model: str,
    version: str,
    at: dt.datetime,
    label: str,
    finding_labels: Iterable[str],
    needs_review: bool,
    uncertainty: float,
    ood_score: float,
    ood_threshold: float | None,
    equipment: Iterable[str],
    images: int,
    site: str,
) -> Sample:
    return Sample(
        job_id=job_id,
        model=model,
        version=version,
        at=at,
        predicted_label=label,
        finding=label in set(finding_labels),
        needs_review=needs_review,
        ood=None if ood_threshold is None else ood_score > ood_threshold,
        uncertainty=uncertainty,
        ood_score=ood_score,
        images=max(1, images),
        site=site or "-",
        equipment=tuple(str(e) for e in equipment),
    )


def sample_of(
    job_id: int, job_model: str, at: dt.datetime, summary: dict[str, Any], site: str
) -> Sample | None:
    """The sample of an analysed job's summary; None for a job with no analysis."""
    if not summary.get("probabilities"):
        return None
    model = summary.get("model") or {}
    threshold = summary.get("ood_threshold")
    return _sample(
        job_id=job_id,
        model=str(model.get("name") or job_model),
        version=str(model.get("version") or ""),
        at=at,
        label=str(summary.get("predicted_label", "")),
        finding_labels=summary.get("finding_labels") or [],
        needs_review=bool(summary.get("needs_review")),
        uncertainty=float((summary.get("uncertainty") or {}).get("score", 0.0)),
        ood_score=float(summary.get("ood_score", 0.0)),
        ood_threshold=None if threshold is None else float(threshold),
        equipment=summary.get("equipment") or [],
        images=len(summary.get("images") or []),
        site=site,
    )


@dataclass(frozen=True)
class Signal:
    name: str
    kind: SignalKind
    title: str


#: The signals compared, in the order reports list them.
SIGNALS: tuple[Signal, ...] = (
    Signal("finding_rate", "rate", "Studies with a finding"),
    Signal("review_rate", "rate", "Studies sent to review"),
    Signal("ood_rate", "rate", "Studies out of distribution"),
    Signal("uncertainty", "score", "Uncertainty score (the study's most uncertain image)"),
    Signal("ood_score", "score", "Out-of-distribution score (the study's farthest image)"),
    Signal("predicted_label", "category", "Predicted label"),
    Signal("equipment", "category", "Equipment (manufacturer, model)"),
    Signal("site", "category", "Site (calling AE)"),
)


def _rate(samples: Sequence[Sample], name: str) -> tuple[int, int]:
    """(studies with it, studies that say) for a rate signal."""
    if name == "finding_rate":
        return sum(s.finding for s in samples), len(samples)
    if name == "review_rate":
        return sum(s.needs_review for s in samples), len(samples)
    known = [s.ood for s in samples if s.ood is not None]
    return sum(known), len(known)


def _scores(samples: Sequence[Sample], name: str) -> list[float]:
    if name == "uncertainty":
        return [s.uncertainty for s in samples]
    return [s.ood_score for s in samples]


def _categories(samples: Sequence[Sample], name: str) -> tuple[Counter[str], int]:
    """(count per category, studies that say) for a category signal."""
    counts: Counter[str] = Counter()
    said = 0
    for s in samples:
        values: Iterable[str]
        if name == "predicted_label":
            values = (s.predicted_label,)
        elif name == "site":
            values = (s.site,)
        else:
            values = s.equipment
        values = [v for v in values if v]
        if values:
            said += 1
            counts.update(values)
    return counts, said


def _shares(counts: Counter[str], top: int = 3) -> str:
    total = sum(counts.values())
    if not total:
        return "-"
    shown = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in counts.most_common(top))
    more = len(counts) - top
    return shown + (f", {more} more" if more > 0 else "")


@dataclass(frozen=True)
class SignalResult:
    """One signal of one model version: its baseline and recent values and reading."""

    signal: str
    kind: SignalKind
    title: str
    status: Status
    #: PSI (score, category) or z (rate), and how likely one as large is by chance; None
    #: when not compared.
    statistic: float | None
    p_value: float | None
    #: Studies each window counts (those whose summary says, for a rate or category).
    baseline_n: int
    recent_n: int
    #: The rate, or the median score; None for a category signal or an empty window.
    baseline_value: float | None
    recent_value: float | None
    #: The two windows as a person reads them ("12.0%", "median 0.081", "NW-DR 500 100%").
    baseline_text: str
    recent_text: str


def compare(
    baseline: Sequence[Sample],
    recent: Sequence[Sample],
    cfg: MonitoringSettings,
    signals: Sequence[Signal] = SIGNALS,
) -> list[SignalResult]:
    """Every signal of ``signals`` (:data:`SIGNALS`), recent against baseline."""
    out: list[SignalResult] = []
    enough = len(baseline) >= cfg.min_studies and len(recent) >= cfg.min_studies
    levels = {"p_watch": cfg.p_watch, "p_shift": cfg.p_shift}
    psi_levels = {"watch": cfg.psi_watch, "shift": cfg.psi_shift, **levels}
    for sig in signals:
        statistic: float | None = None
        p: float | None = None
        status = Status.TOO_FEW
        b_value: float | None = None
        r_value: float | None = None
        if sig.kind == "rate":
            k1, n1 = _rate(baseline, sig.name)
            k2, n2 = _rate(recent, sig.name)
            b_value = k1 / n1 if n1 else None
            r_value = k2 / n2 if n2 else None
            b_text = "-" if b_value is None else f"{100 * b_value:.1f}%"
            r_text = "-" if r_value is None else f"{100 * r_value:.1f}%"
            if min(n1, n2) >= cfg.min_studies and b_value is not None and r_value is not None:
                statistic = two_proportion_z(k1, n1, k2, n2)
                p = z_p_value(statistic)
                change = r_value - b_value
                status = rate_status(change, p, min_change=cfg.min_rate_change, **levels)
        elif sig.kind == "score":
            b_scores = _scores(baseline, sig.name)
            r_scores = _scores(recent, sig.name)
            n1, n2 = len(b_scores), len(r_scores)
            b_value = statistics.median(b_scores) if b_scores else None
            r_value = statistics.median(r_scores) if r_scores else None
            b_text = "-" if b_value is None else f"median {b_value:.3f}"
            r_text = "-" if r_value is None else f"median {r_value:.3f}"
            edges = quantile_edges(b_scores)
            if not edges and b_scores:  # every baseline score equal: below, equal, above
                edges = [b_scores[0], math.nextafter(b_scores[0], math.inf)]
            if enough and edges:
                statistic = psi(bin_counts(b_scores, edges), bin_counts(r_scores, edges))
                p = psi_p_value(statistic, n1, n2, len(edges) + 1)
                status = psi_status(statistic, p, **psi_levels)
        else:
            b_counts, n1 = _categories(baseline, sig.name)
            r_counts, n2 = _categories(recent, sig.name)
            b_text, r_text = _shares(b_counts), _shares(r_counts)
            if min(n1, n2) >= cfg.min_studies:
                _, e, a = category_counts(b_counts, r_counts)
                statistic = psi(e, a) if len(e) > 1 else 0.0
                p = psi_p_value(statistic, n1, n2, len(e))
                status = psi_status(statistic, p, **psi_levels)
        out.append(
            SignalResult(
                sig.name,
                sig.kind,
                sig.title,
                status,
                statistic,
                p,
                n1,
                n2,
                b_value,
                r_value,
                b_text,
                r_text,
            )  # fmt: skip
        )
    return out


def figures(samples: Sequence[Sample]) -> dict[str, Any]:
    """A group of studies' own figures: how many, their rates and median scores (None where
    none says)."""

    def rate(name: str) -> float | None:
        k, n = _rate(samples, name)
        return k / n if n else None

    def median(name: str) -> float | None:
        scores = _scores(samples, name)
        return statistics.median(scores) if scores else None

    return {
        "studies": len(samples),
        "finding_rate": rate("finding_rate"),
        "review_rate": rate("review_rate"),
        "ood_rate": rate("ood_rate"),
        "median_uncertainty": median("uncertainty"),
        "median_ood_score": median("ood_score"),
    }


#: What a group of one site and one kind of equipment is compared by: what the model sees and
#: says (its site and equipment are the group's own, so always "shifted" against a baseline
#: of several).
GROUP_SIGNALS = tuple(s for s in SIGNALS if s.name not in ("site", "equipment"))


def breakdown(
    samples: Sequence[Sample],
    baseline: Sequence[Sample] = (),
    cfg: MonitoringSettings | None = None,
) -> list[dict[str, Any]]:
    """The recent studies by site and equipment, the largest group first: where a shift
    comes from (a new scanner at one site, one site's studies out of distribution). With
    ``cfg``, each group's own reading against the whole baseline (:data:`GROUP_SIGNALS`;
    ``too_few`` under ``min_studies``) and the signals that moved."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        key = (sample.site, ", ".join(sample.equipment) or "-")
        groups.setdefault(key, []).append(sample)
    rows = []
    for (site, equipment), group in groups.items():
        row: dict[str, Any] = {"site": site, "equipment": equipment, **figures(group)}
        if cfg is not None:
            results = compare(baseline, group, cfg, GROUP_SIGNALS)
            row["status"] = worst(results).value
            row["moved"] = [r.signal for r in results if r.status in (Status.WATCH, Status.SHIFTED)]
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["studies"], r["site"], r["equipment"]))


def worst(results: Iterable[SignalResult]) -> Status:
    """The most concerning reading; too_few only when no signal was compared."""
    return max((r.status for r in results), key=lambda s: s.rank, default=Status.TOO_FEW)


@dataclass(frozen=True)
class Baseline:
    #: "first": the version's first studies; "pinned": the period an ML engineer chose.
    kind: Literal["first", "pinned"]
    studies: int
    #: The first and last analysis in it (pinned: the period).
    since: dt.datetime | None
    until: dt.datetime | None
    #: Who pinned it and when (pinned only).
    pinned_by: str = ""
    pinned_at: dt.datetime | None = None
    #: A "first" baseline still short of ``monitoring.baseline_studies``.
    forming: bool = False


@dataclass(frozen=True)
class ModelReport:
    """One model version: its baseline, the recent window, every signal and the weeks
    before (each window's own figures and reading)."""

    model: str
    version: str
    status: Status
    baseline: Baseline
    window_since: dt.datetime
    window_until: dt.datetime
    studies: int
    images: int
    signals: list[SignalResult]
    trend: list[dict[str, Any]] = field(default_factory=list)
    #: The baseline's own figures (:func:`figures`) and the recent studies' by site and
    #: equipment (:func:`breakdown`).
    baseline_figures: dict[str, Any] = field(default_factory=dict)
    by_source: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON types (API, ``--json``)."""

        def iso(t: dt.datetime | None) -> str | None:
            return None if t is None else t.isoformat(timespec="seconds") + "Z"

        b = self.baseline
        return {
            "model": self.model,
            "version": self.version,
            "status": self.status.value,
            "baseline": {
                "kind": b.kind,
                "studies": b.studies,
                "since": iso(b.since),
                "until": iso(b.until),
                "pinned_by": b.pinned_by or None,
                "pinned_at": iso(b.pinned_at),
                "forming": b.forming,
            },
            "window": {
                "since": iso(self.window_since),
                "until": iso(self.window_until),
                "studies": self.studies,
                "images": self.images,
            },
            "signals": [
                {
                    "signal": r.signal,
                    "kind": r.kind,
                    "title": r.title,
                    "status": r.status.value,
                    "statistic": None if r.statistic is None else round(r.statistic, 4),
                    "p_value": None if r.p_value is None else float(f"{r.p_value:.3g}"),
                    "baseline_n": r.baseline_n,
                    "recent_n": r.recent_n,
                    "baseline_value": r.baseline_value,
                    "recent_value": r.recent_value,
                    "baseline_text": r.baseline_text,
                    "recent_text": r.recent_text,
                }
                for r in self.signals
            ],
            "trend": [
                {**w, "since": iso(w["since"]), "until": iso(w["until"])} for w in self.trend
            ],
            "baseline_figures": self.baseline_figures,
            "by_source": self.by_source,
        }


class BaselineRefused(ValueError):
    """A baseline that cannot be pinned (an empty or reversed period), with the reason."""


def latest_analysis() -> ColumnElement[bool]:
    """A condition on :class:`Job`: it is the latest analysis of its study by its route with
    its model name and version. A study analysed again (reprocessed, or re-opened by late
    instances: a new generation) keeps its earlier generation's jobs delivered; with this,
    monitoring counts the study once per model version. A later generation analysed by
    another version, or one that analysed nothing (failed before its summary, or superseded),
    leaves the earlier job counted."""
    later = aliased(Job)
    label = later.summary["predicted_label"].as_string()
    later_analysis = later.generation > Job.generation
    return ~(
        exists()
        .where(
            later.study_id == Job.study_id,
            later_analysis,
            later.route == Job.route,
            later.state != JobState.SUPERSEDED,
            # its summary read only for a later generation's job: a condition on the later
            # job alone is tested by the database on every job of the table (parsing each
            # summary: seconds over a year of studies), this one on the few pairs found
            case((later_analysis, and_(label.is_not(None), label != "")), else_=False),
            job_model_name(later) == job_model_name(Job),
            job_model_version(later) == job_model_version(Job),
        )
        .correlate(Job)
    )


#: What a sample reads of a job's summary: the field, or the path to it.
_SAMPLE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("predicted_label",),
    ("finding_labels",),
    ("needs_review",),
    ("uncertainty", "score"),
    ("ood_score",),
    ("ood_threshold",),
    ("equipment",),
    ("images",),
)


def _sample_fields(dialect: str) -> list[Any]:
    """The select-list columns of :data:`_SAMPLE_FIELDS` (the images: their number). SQLite
    extracts each on its own (fast on its JSON text); PostgreSQL parses a summary whole for
    each extraction, so there one subquery parses it once and gives them all as an array."""
    summary = Job.summary
    if dialect != "postgresql":
        return [
            summary["predicted_label"].as_string(),
            summary["finding_labels"],
            summary["needs_review"].as_boolean(),
            summary[("uncertainty", "score")].as_float(),
            summary["ood_score"].as_float(),
            summary["ood_threshold"].as_float(),
            summary["equipment"],
            func.json_array_length(summary, "$.images"),
        ]
    head = (
        func.json_to_record(summary)
        .table_valued(*(column(path[0], JSON) for path in _SAMPLE_FIELDS))
        .render_derived(name="sample_head", with_types=True)
    )
    values: list[Any] = []
    for path in _SAMPLE_FIELDS:
        if path == ("uncertainty", "score"):
            values.append(head.c.uncertainty.op("->")(literal("score")))
        elif path == ("images",):  # an analysis without a list of images: none
            images = head.c.images
            values.append(
                case((func.json_typeof(images) == "array", func.json_array_length(images)))
            )
        else:
            values.append(head.c[path[0]])
    return [select(func.json_build_array(*values)).scalar_subquery()]


class ModelMonitor:
    """Reads the ledger's analysed jobs and compares each model version's recent studies
    with its baseline."""

    def __init__(self, ledger: Ledger, cfg: MonitoringSettings) -> None:
        self.ledger = ledger
        self.cfg = cfg

    # ------------------------------------------------------------------ reading
    def _samples(self, *conditions: ColumnElement[bool], limit: int | None = None) -> list[Sample]:
        """The samples of the analysed jobs matching ``conditions``, oldest first. The
        database picks the few fields a sample needs out of each summary: a CT's summary
        lists hundreds of images, which are never read here. With ``limit``, the jobs are
        picked first and only theirs are read (reading the fields of every matching job
        before keeping the first ones took seconds over a year of studies)."""
        wanted = [
            Job.started_at.is_not(None),
            Job.state != JobState.SUPERSEDED,
            latest_analysis(),
            *conditions,
        ]
        if limit is not None:
            first = (
                select(Job.id)
                .where(*wanted)
                .order_by(Job.started_at, Job.id)
                .limit(limit)
                .correlate(None)
                .scalar_subquery()
            )
            wanted = [Job.id.in_(first)]
        query = (
            select(Job.id, job_model_name(), job_model_version(), Job.started_at)
            .add_columns(*_sample_fields(self.ledger.engine.dialect.name))
            # the site: who sent the generation the job analysed (a study another AE sent
            # again is that AE's)
            .add_columns(job_sender())
            .join(Study, Job.study_id == Study.id)
            .where(*wanted)
            .order_by(Job.started_at, Job.id)
        )
        with self.ledger.session() as s:
            rows = s.execute(query).all()
        out = []
        for row in rows:
            job_id, model, version, at, *fields, site = row
            if len(fields) == 1:  # PostgreSQL: one array of them
                fields = list(fields[0] or [None] * len(_SAMPLE_FIELDS))
            (label, findings, review, uncertainty, ood, ood_threshold, equipment,
             n_images) = fields  # fmt: skip
            if not label:
                continue  # a job that analysed nothing (failed before its summary)
            out.append(
                _sample(
                    job_id=job_id,
                    model=str(model),
                    version=str(version),
                    at=at,
                    label=str(label),
                    finding_labels=findings or [],
                    needs_review=bool(review),
                    uncertainty=float(uncertainty or 0.0),
                    ood_score=float(ood or 0.0),
                    ood_threshold=None if ood_threshold is None else float(ood_threshold),
                    equipment=equipment or [],
                    images=int(n_images or 0),
                    site=site or "",
                )  # fmt: skip
            )
        return out

    def _version(self, model: str, version: str) -> ColumnElement[bool]:
        return and_(job_model_name() == model, job_model_version() == version)

    def baseline(self, model: str, version: str) -> tuple[Baseline, list[Sample]]:
        """A version's baseline and its samples: the pinned period, else its first
        ``baseline_studies`` analysed studies."""
        with self.ledger.session() as s:
            pin = s.scalars(
                select(MonitoringBaseline).where(
                    MonitoringBaseline.model == model, MonitoringBaseline.version == version
                )
            ).one_or_none()
            pinned = None if pin is None else (pin.since, pin.until, pin.pinned_by, pin.pinned_at)
        if pinned is not None:
            since, until, by, at = pinned
            samples = self._samples(
                self._version(model, version), Job.started_at >= since, Job.started_at < until
            )
            return Baseline("pinned", len(samples), since, until, by, at), samples
        samples = self._samples(self._version(model, version), limit=self.cfg.baseline_studies)
        first = samples[0].at if samples else None
        last = samples[-1].at if samples else None
        forming = len(samples) < self.cfg.baseline_studies
        return Baseline("first", len(samples), first, last, forming=forming), samples

    def report(
        self,
        *,
        model: str | None = None,
        days: int | None = None,
        weeks: int = 0,
        now: dt.datetime | None = None,
    ) -> list[ModelReport]:
        """A report per model version analysed in the recent window (``days``, default
        ``monitoring.window_days``), optionally of one model name; with ``weeks`` > 0 each
        also holds that many windows before it, newest first (the trend)."""
        days = days or self.cfg.window_days
        until = now or utcnow()
        window = dt.timedelta(days=days)
        since = until - window
        earliest = until - window * (1 + max(0, weeks))
        samples = self._samples(Job.started_at >= earliest, Job.started_at < until)
        by_version: dict[tuple[str, str], list[Sample]] = {}
        for sample in samples:
            if model is not None and sample.model != model:
                continue
            by_version.setdefault((sample.model, sample.version), []).append(sample)
        reports = []
        for (name, version), mine in sorted(by_version.items()):
            if not any(s.at >= since for s in mine):
                continue  # not in the recent window (only in the weeks before)
            baseline, base_samples = self.baseline(name, version)
            in_baseline = {s.job_id for s in base_samples}
            own = [s for s in mine if s.job_id not in in_baseline]

            def window_of(start: dt.datetime, end: dt.datetime) -> list[Sample]:
                return [s for s in own if start <= s.at < end]  # noqa: B023 - used at once

            recent = window_of(since, until)
            signals = compare(base_samples, recent, self.cfg)
            trend = []
            for k in range(1, max(0, weeks) + 1):
                start, end = since - window * k, since - window * (k - 1)
                trend.append(self._trend_row(base_samples, window_of(start, end), start, end))
            reports.append(
                ModelReport(
                    model=name,
                    version=version,
                    status=worst(signals),
                    baseline=baseline,
                    window_since=since,
                    window_until=until,
                    studies=len(recent),
                    images=sum(s.images for s in recent),
                    signals=signals,
                    trend=trend,
                    baseline_figures=figures(base_samples),
                    by_source=breakdown(recent, base_samples, self.cfg),
                )
            )
        return reports

    def _trend_row(
        self,
        base: Sequence[Sample],
        samples: Sequence[Sample],
        start: dt.datetime,
        end: dt.datetime,
    ) -> dict[str, Any]:
        return {
            "since": start,
            "until": end,
            **figures(samples),
            "status": worst(compare(base, samples, self.cfg)).value,
        }

    # ------------------------------------------------------------------ pinning
    def pin_baseline(
        self,
        model: str,
        version: str,
        since: dt.datetime,
        until: dt.datetime,
        *,
        by: str,
    ) -> int:
        """Pin a version's baseline to the studies analysed from ``since`` to ``until``
        (replacing any pinned before); returns how many there are. Refused for a reversed
        period, or one with fewer than ``monitoring.min_studies`` studies of that version."""
        if until <= since:
            raise BaselineRefused("the baseline's end must come after its start")
        found = len(
            self._samples(
                self._version(model, version), Job.started_at >= since, Job.started_at < until
            )
        )
        if found < self.cfg.min_studies:
            zone = self.cfg.timezone
            raise BaselineRefused(
                f"{model} {version} analysed {found} studies from {wall_clock(since, zone)} to"
                f" {wall_clock(until, zone)}: a baseline needs at least {self.cfg.min_studies}"
                " (monitoring.min_studies)"
            )
        for _attempt in range(2):  # two pinning at once: the second replaces the first
            try:
                with self.ledger.session() as s:
                    s.execute(
                        delete(MonitoringBaseline).where(
                            MonitoringBaseline.model == model,
                            MonitoringBaseline.version == version,
                        )
                    )
                    s.add(
                        MonitoringBaseline(
                            model=model, version=version, since=since, until=until, pinned_by=by
                        )
                    )
                return found
            except IntegrityError:
                continue
        raise BaselineRefused("another baseline was being pinned at the same time: try again")

    def clear_baseline(self, model: str, version: str) -> bool:
        """Go back to the version's first studies; False when none was pinned."""
        with self.ledger.session() as s:
            gone = s.execute(
                delete(MonitoringBaseline).where(
                    MonitoringBaseline.model == model, MonitoringBaseline.version == version
                )
            )
            return bool(getattr(gone, "rowcount", 0))


class CachedReports(Refreshed[list[ModelReport]]):
    """The monitor's reports, recomputed at most every ``monitoring.refresh_s``."""

    def __init__(self, monitor: ModelMonitor, clock: Callable[[], float]) -> None:
        super().__init__(monitor.report, monitor.cfg.refresh_s, clock)
        self.monitor = monitor
