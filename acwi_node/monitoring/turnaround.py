"""Turnaround: how long results take to reach the PACS, per route, step by step (README
"Turnaround").

A result is worth something only if it is in the PACS before the radiologist opens the study.
:class:`TurnaroundMonitor` reads, for each job delivered in the last
``monitoring.turnaround_hours`` hours, the time from the last instance of its study's
generation to its last result object stored by a destination, and each step in between:

* ``completion``: last instance to complete (the quiet period, or a stronger signal);
* ``queue``: complete to analysis started (the broker, a busy or absent worker);
* ``analysis``: the model reading the study and the results written;
* ``delivery``: results written to stored by every destination (a slow or refusing PACS);
* ``total``: last instance to stored.

Percentiles (50th, 95th, the maximum) per route, for all routes, and for the STAT studies of
all routes (the row ``stat``, held to ``monitoring.turnaround_stat_goal_s``); a row reads
``slow`` when
the 95th percentile of ``total`` exceeds ``monitoring.turnaround_goal_s`` over at least
``monitoring.turnaround_min_studies`` studies. Delivered jobs alone would hide the worst case,
a study that never arrives: studies still on their way whose last instance is older than the
goal count as ``overdue`` (``watch``). A reprocessed study (a generation with no instance of
its own) is not a PACS's study arriving, and is left out. No patient data is read: times,
route names and states.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select

from acwi_node.config import MonitoringSettings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    LATER_RESULT_KINDS,
    UNSETTLED_DELIVERY_STATES,
    Delivery,
    Instance,
    Job,
    JobState,
    Result,
    utcnow,
)
from acwi_node.ledger.repository import STAT_PRIORITY
from acwi_node.monitoring.drift import Status

#: The steps, in order; ``total`` is the sum of the others.
STEPS = ("completion", "queue", "analysis", "delivery", "total")
#: The figures of every route together.
ALL = "all"
#: The figures of every route's STAT studies (priority ``stat``), against their own goal.
STAT = "stat"
#: How a route's turnaround reads.
WORDS = {
    Status.STABLE: "within goal",
    Status.WATCH: "overdue studies",
    Status.SHIFTED: "slow",
    Status.TOO_FEW: "too few studies",
}
#: States of a job still on its way to the PACS.
_ON_THE_WAY = (JobState.QUEUED, JobState.ANALYSING, JobState.EXPORTING)


@dataclass(frozen=True)
class StepFigures:
    step: str
    p50: float | None
    p95: float | None
    max: float | None

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "p50": _round(self.p50), "p95": _round(self.p95),
                "max": _round(self.max)}  # fmt: skip


@dataclass(frozen=True)
class RouteTurnaround:
    route: str
    #: Jobs delivered in the window, and how many of them were STAT.
    studies: int
    stat: int
    #: Studies still on their way whose last instance is older than the goal.
    overdue: int
    steps: tuple[StepFigures, ...]
    status: Status
    #: The 95th percentile of ``total`` it is held to.
    goal_s: float = 0.0

    @property
    def label(self) -> str:
        """How people read the row's name."""
        return {ALL: "all routes", STAT: "STAT studies, all routes"}.get(self.route, self.route)

    def step(self, name: str) -> StepFigures:
        return next(s for s in self.steps if s.step == name)

    def as_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "studies": self.studies,
            "stat": self.stat,
            "overdue": self.overdue,
            "status": self.status.value,
            "goal_s": self.goal_s,
            "steps": [s.as_json() for s in self.steps],
        }


@dataclass(frozen=True)
class TurnaroundReport:
    at: dt.datetime
    hours: int
    goal_s: float
    #: The figures of all routes first, then each route's by name.
    routes: list[RouteTurnaround]

    @property
    def status(self) -> Status:
        return max((r.status for r in self.routes), key=lambda s: s.rank, default=Status.TOO_FEW)

    @property
    def overall(self) -> RouteTurnaround:
        return self.routes[0]

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(timespec="seconds") + "Z",
            "hours": self.hours,
            "goal_s": self.goal_s,
            "status": self.status.value,
            "routes": [r.as_json() for r in self.routes],
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class TurnaroundMonitor:
    """Reads delivered jobs' times from the ledger (module docstring)."""

    def __init__(self, ledger: Ledger, cfg: MonitoringSettings) -> None:
        self.ledger = ledger
        self.cfg = cfg

    def report(self, now: dt.datetime | None = None) -> TurnaroundReport:
        cfg = self.cfg
        now = now or utcnow()
        since = now - dt.timedelta(hours=cfg.turnaround_hours)
        # up to its completion: a report or key object note the PACS forwards later is kept in
        # the generation without re-opening it, and is no instance the study waited for
        last_instance = (
            select(func.max(Instance.received_at))
            .where(
                Instance.study_id == Job.study_id,
                Instance.generation == Job.generation,
                Instance.received_at <= Job.created_at,
            )
            .correlate(Job)
            .scalar_subquery()
        )
        # the analysis's own objects: a verified SR or a rejection note comes days later
        stored = (
            select(func.max(Delivery.delivered_at))
            .join(Result, Delivery.result_id == Result.id)
            .where(Delivery.job_id == Job.id, Result.kind.not_in(LATER_RESULT_KINDS))
            .correlate(Job)
            .scalar_subquery()
        )
        with self.ledger.session() as s:
            delivered = s.execute(
                select(
                    Job.route, Job.priority, last_instance, Job.created_at, Job.started_at,
                    Job.analysed_at, stored,
                ).where(
                    Job.state == JobState.DELIVERED,
                    # however long ago it was created: a study whose PACS was down for days
                    Job.finished_at >= since,
                    Job.analysed_at.is_not(None),
                )
            ).all()  # fmt: skip
            # exporting only a verified SR or a rejection note: its results arrived long ago
            later_only = ~(
                exists()
                .where(
                    Delivery.job_id == Job.id,
                    Delivery.result_id == Result.id,
                    Delivery.state.in_(UNSETTLED_DELIVERY_STATES),
                    Result.kind.not_in(LATER_RESULT_KINDS),
                )
                .correlate(Job)
            )
            waiting = s.execute(
                select(Job.route, Job.priority, last_instance).where(
                    Job.state.in_(_ON_THE_WAY),
                    ~((Job.state == JobState.EXPORTING) & later_only),
                )
            ).all()
        spans: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        stat: dict[str, int] = defaultdict(int)
        for route, priority, last, completed, started, analysed, at in delivered:
            if last is None or started is None or analysed is None:
                continue  # reprocessed: no instance of its own generation
            at = at or analysed  # a job no destination took anything of
            if at < since:
                continue  # stored earlier, finished again since (a verified SR, a withdrawal)
            steps = {
                "completion": _seconds(last, completed),
                "queue": _seconds(completed, started),
                "analysis": _seconds(started, analysed),
                "delivery": _seconds(analysed, at),
                "total": _seconds(last, at),
            }
            is_stat = priority >= STAT_PRIORITY
            for key in (ALL, str(route), *((STAT,) if is_stat else ())):
                for name, value in steps.items():
                    spans[key][name].append(value)
                stat[key] += int(is_stat)
        overdue: dict[str, int] = defaultdict(int)
        cut = now - dt.timedelta(seconds=cfg.turnaround_goal_s)
        stat_cut = now - dt.timedelta(seconds=cfg.turnaround_stat_goal_s)
        for route, priority, last in waiting:
            if last is not None and last < cut:
                overdue[ALL] += 1
                overdue[str(route)] += 1
            if last is not None and last < stat_cut and priority >= STAT_PRIORITY:
                overdue[STAT] += 1
        names = sorted((set(spans) | set(overdue)) - {ALL, STAT})
        keys = [ALL, *([STAT] if STAT in spans or overdue[STAT] else []), *names]
        routes = [
            self._route(
                key,
                spans[key],
                stat[key],
                overdue[key],
                cfg.turnaround_stat_goal_s if key == STAT else cfg.turnaround_goal_s,
            )
            for key in keys
        ]
        return TurnaroundReport(now, cfg.turnaround_hours, cfg.turnaround_goal_s, routes)

    def _route(
        self, route: str, spans: dict[str, list[float]], stat: int, overdue: int, goal_s: float
    ) -> RouteTurnaround:
        cfg = self.cfg
        figures = tuple(
            StepFigures(
                name,
                percentile(spans[name], 50),
                percentile(spans[name], 95),
                max(spans[name]) if spans[name] else None,
            )
            for name in STEPS
        )
        studies = len(spans["total"])
        p95 = figures[-1].p95
        if studies >= cfg.turnaround_min_studies and p95 is not None and p95 > goal_s:
            status = Status.SHIFTED
        elif overdue:
            status = Status.WATCH
        elif studies < cfg.turnaround_min_studies:
            status = Status.TOO_FEW
        else:
            status = Status.STABLE
        return RouteTurnaround(route, studies, stat, overdue, figures, status, goal_s)


def format_turnaround(report: TurnaroundReport) -> str:
    """The report as ``acwi-node monitor`` prints it."""
    out = [
        f"turnaround: {WORDS[report.status].upper()}  (results stored in the last"
        f" {report.hours} h, last instance to stored; goal: 95th percentile under"
        f" {duration(report.goal_s)})"
    ]
    rows = [("route", "studies", *(f"{s} p50/p95" for s in STEPS), "overdue", "status")]
    for r in report.routes:
        cells = [
            f"{duration(f.p50)} / {duration(f.p95)}" if f.p50 is not None else "-" for f in r.steps
        ]
        name = r.label if r.route != STAT else f"{r.label} (goal {duration(r.goal_s)})"
        stat = f" ({r.stat} STAT)" if r.stat and r.route != STAT else ""
        rows.append((name, f"{r.studies}{stat}", *cells, str(r.overdue), WORDS[r.status]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        out.append(("  " + line).rstrip())
    return "\n".join(out)


def duration(seconds: float | None) -> str:
    """Seconds as a person reads them: "4.2 s", "6.5 min", "2.0 h"; "-" for none."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _seconds(a: dt.datetime, b: dt.datetime) -> float:
    return max(0.0, (b - a).total_seconds())


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
