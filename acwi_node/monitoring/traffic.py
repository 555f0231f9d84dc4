"""Studies arriving: whether studies stopped coming from a source, or stopped reaching a route
(README "Model monitoring", "Studies arriving").

The commonest way a PACS integration fails says nothing: a forwarding rule disabled in a PACS
upgrade, an AE title or a firewall changed, a modality whose Body Part Examined a new protocol
spells differently, so that its studies no longer match their route. Nothing fails on the
node; results just stop reaching the radiologists.

:class:`TrafficMonitor` counts the studies of the last ``monitoring.traffic_hours`` hours
(each horizon apart): all of them, from each source (the calling AE that sent the study's
first instance: a study another AE sends again is no new arrival), for each configured route
(the studies it got a job for) and for each path (a source's studies for a route: one
modality's that no longer match; the source is the one the route matched, the sender of the
generation the job is of: a study the PACS sent again is the PACS's), and compares
each count with the same hours of the same weekday in the ``traffic_weeks`` weeks before
(:func:`acwi_node.monitoring.drift.drop_status`): a working day's morning is compared with
the mornings of that weekday, a night with the nights; the hours on the wall clocks of
``monitoring.timezone``, so that the week after a clock change compares the same mornings;
where a clock change makes the same wall-clock hours longer or shorter (the night the clocks
go forward, or back), the weeks before are counted per hour of the window's real length.
Only the weeks the ledger reaches back to are counted, from its first study on. No patient
data is read: counts of rows, AE titles and route names.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

from acwi_node.config import MonitoringSettings, Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, Study, job_sender, utcnow
from acwi_node.monitoring.drift import Status, drop_status

FlowKind = Literal["node", "source", "route", "path"]

#: The flow of every study the node received.
ALL = "all"
#: Between a source and a route in a path's name ("WARD_CR -> chest").
PATH = " -> "
WEEK = dt.timedelta(days=7)


@dataclass(frozen=True)
class Window:
    """One horizon of one flow: the studies of the last ``hours`` hours against the same
    hours of the weeks before."""

    hours: int
    studies: int
    #: The same hours 1, 2, ... weeks before (newest first), of the weeks the ledger reaches.
    history: tuple[int, ...]
    #: The mean of ``history`` (each week's count per hour of this window's real length, where
    #: a clock change made them differ), and how likely as few studies are by chance
    #: (Poisson); None when not compared.
    expected: float | None
    p_value: float | None
    status: Status

    def as_json(self) -> dict[str, Any]:
        return {
            "hours": self.hours,
            "studies": self.studies,
            "history": list(self.history),
            "expected": None if self.expected is None else round(self.expected, 2),
            "p_value": None if self.p_value is None else float(f"{self.p_value:.3g}"),
            "status": self.status.value,
        }


@dataclass(frozen=True)
class Flow:
    """Studies of one kind: all of them (``node``), a source's or a route's."""

    kind: FlowKind
    name: str
    windows: tuple[Window, ...]

    @property
    def status(self) -> Status:
        return max((w.status for w in self.windows), key=lambda s: s.rank)

    @property
    def telling(self) -> Window:
        """The window that gives the flow its reading (the shortest of the most concerning)."""
        return next(w for w in self.windows if w.status is self.status)

    @property
    def title(self) -> str:
        if self.kind == "node":
            return "All studies"
        if self.kind == "source":
            return f"Studies from {self.name}"
        if self.kind == "route":
            return f"Studies for route '{self.name}'"
        source, route = self.name.split(PATH, 1)
        return f"Studies from {source} for route '{route}'"

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "title": self.title,
            "status": self.status.value,
            "windows": [w.as_json() for w in self.windows],
        }


@dataclass(frozen=True)
class TrafficReport:
    at: dt.datetime
    #: The weeks compared (``monitoring.traffic_weeks``), and how many of them the ledger
    #: reaches back to (its first study).
    weeks: int
    weeks_covered: int
    flows: list[Flow]

    @property
    def status(self) -> Status:
        """The most concerning reading; too_few when nothing was compared."""
        return max((f.status for f in self.flows), key=lambda s: s.rank, default=Status.TOO_FEW)

    def dropped(self) -> list[Flow]:
        return [f for f in self.flows if f.status is Status.SHIFTED]

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(timespec="seconds") + "Z",
            "status": self.status.value,
            "weeks": self.weeks,
            "weeks_covered": self.weeks_covered,
            "flows": [f.as_json() for f in self.flows],
        }


class TrafficMonitor:
    """Counts the studies arriving in the ledger and tells a drop (module docstring)."""

    def __init__(
        self, ledger: Ledger, cfg: MonitoringSettings, routes: Iterable[str] | None = None
    ) -> None:
        self.ledger = ledger
        self.cfg = cfg
        #: The routes configured now: a route taken out of the configuration is no drop.
        self.routes = None if routes is None else set(routes)

    def _counts(self, start: dt.datetime, end: dt.datetime) -> Counter[tuple[FlowKind, str]]:
        """The studies first received from ``start`` to ``end``: in all, per source (the
        study's first sender: its arrival); and those given a job in that time per route and
        per path (a source's for a route: the sender of the generation the job is of, whose
        studies the route matched)."""
        sender = job_sender()
        with self.ledger.session() as s:
            sources = s.execute(
                select(Study.calling_ae, func.count())
                .where(Study.first_received_at >= start, Study.first_received_at < end)
                .group_by(Study.calling_ae)
            ).all()
            routed = s.execute(
                select(sender, Job.route, func.count(func.distinct(Job.study_id)))
                .join(Study, Job.study_id == Study.id)
                .where(Job.created_at >= start, Job.created_at < end)
                .group_by(sender, Job.route)
            ).all()
            # a study two senders' generations each got a job for is one of the route's
            routes = s.execute(
                select(Job.route, func.count(func.distinct(Job.study_id)))
                .where(Job.created_at >= start, Job.created_at < end)
                .group_by(Job.route)
            ).all()
        counts: Counter[tuple[FlowKind, str]] = Counter()
        for ae, n in sources:
            counts["node", ALL] += int(n)
            counts["source", str(ae or "-")] += int(n)
        for route, n in routes:
            if self._configured(str(route)):
                counts["route", str(route)] += int(n)
        for ae, route, n in routed:
            if self._configured(str(route)):
                counts["path", path_name(str(ae or "-"), str(route))] += int(n)
        return counts

    def report(self, now: dt.datetime | None = None) -> TrafficReport:
        cfg = self.cfg
        now = now or utcnow()
        with self.ledger.session() as s:
            first = s.scalar(select(func.min(Study.first_received_at)))
        # per horizon: the counts now and in each week before that the ledger reaches, the
        # same wall-clock hours in the hospital's time zone (the ledger's times are UTC)
        zone = ZoneInfo(cfg.timezone)
        wall_now = now.replace(tzinfo=dt.timezone.utc).astimezone(zone).replace(tzinfo=None)

        def utc(wall: dt.datetime) -> dt.datetime:
            return wall.replace(tzinfo=zone).astimezone(dt.timezone.utc).replace(tzinfo=None)

        slots: dict[int, list[Counter[tuple[FlowKind, str]]]] = {}
        #: each slot's length in real time: the wall-clock hours of a night the clocks went
        #: forward hold an hour less, of one they went back an hour more
        lengths: dict[int, list[float]] = {}
        for hours in sorted(cfg.traffic_hours):  # the shortest first: it tells soonest
            span = dt.timedelta(hours=hours)
            slots[hours] = []
            lengths[hours] = []
            for week in range(cfg.traffic_weeks + 1):
                end = wall_now - WEEK * week
                start, end = utc(end - span), (now if week == 0 else utc(end))
                if week and (first is None or start < first):
                    break  # the ledger does not reach back to this week
                slots[hours].append(self._counts(start, end))
                lengths[hours].append(max((end - start).total_seconds(), 1.0))
        names: set[tuple[FlowKind, str]] = {("node", ALL)}
        names |= {("route", route) for route in self.routes or ()}
        for counts in slots.values():
            for slot in counts:
                names |= set(slot)
        flows = []
        for key in names:
            windows = []
            for hours, counts in slots.items():
                series = [slot[key] for slot in counts]
                # the weeks before as many real hours as this one holds: across a clock
                # change the same wall-clock hours are an hour more or less
                now_length, *before = lengths[hours]
                scaled = [
                    n * now_length / length for n, length in zip(series[1:], before, strict=True)
                ]
                expected, p, status = drop_status(
                    series[0],
                    scaled,
                    min_weeks=cfg.traffic_min_weeks,
                    min_drop=cfg.traffic_min_drop,
                    p_watch=cfg.p_watch,
                    p_shift=cfg.p_shift,
                )
                windows.append(Window(hours, series[0], tuple(series[1:]), expected, p, status))
            flows.append(Flow(key[0], key[1], tuple(windows)))
        order = {"node": 0, "source": 1, "route": 2, "path": 3}
        flows.sort(key=lambda f: (order[f.kind], -f.status.rank, f.name))
        covered = min(len(counts) - 1 for counts in slots.values())
        return TrafficReport(now, cfg.traffic_weeks, covered, flows)

    def _configured(self, route: str) -> bool:
        return self.routes is None or route in self.routes


def path_name(source: str, route: str) -> str:
    return f"{source}{PATH}{route}"


#: How the readings read for studies arriving.
WORDS = {
    Status.STABLE: "as usual",
    Status.WATCH: "watch",
    Status.SHIFTED: "dropped",
    Status.TOO_FEW: "too few weeks",
}


def traffic_monitor(settings: Settings, ledger: Ledger) -> TrafficMonitor:
    """The monitor of the node's configured routes and its monitoring settings."""
    return TrafficMonitor(ledger, settings.monitoring, routes=[r.name for r in settings.routes])


def format_traffic(report: TrafficReport) -> str:
    """The report as ``acwi-node monitor`` prints it."""
    hours = [w.hours for w in report.flows[0].windows]
    head = " and ".join(f"{h} h" for h in hours)
    out = [
        f"studies arriving: {WORDS[report.status].upper()}  (the last {head} against the same"
        f" hours of the {report.weeks} weeks before, {report.weeks_covered} of them on the"
        " ledger)"
    ]
    rows = [("flow", *(f"last {h} h (weeks before)" for h in hours), "status")]
    for flow in report.flows:
        label = {
            "node": "all studies",
            "source": f"from {flow.name}",
            "route": f"route {flow.name}",
        }.get(flow.kind, f"  {flow.name}")
        cells = []
        for w in flow.windows:
            before = ", ".join(str(n) for n in w.history) or "-"
            cells.append(f"{w.studies} ({before})")
        rows.append((label, *cells, WORDS[flow.status]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        out.append(("  " + line).rstrip())
    return "\n".join(out)


def describe(flow: Flow) -> str:
    """A flow's telling window as a person reads it: "0 in the last 2 h, 9.8 expected (9,
    11, 10, 9 the same hours of the weeks before)"."""
    w = flow.telling
    before = ", ".join(str(n) for n in w.history) or "-"
    expected = "-" if w.expected is None else f"{w.expected:.1f}"
    return f"{w.studies} in the last {w.hours} h, {expected} expected ({before} the weeks before)"
