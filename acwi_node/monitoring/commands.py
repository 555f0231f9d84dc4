"""``acwi-node monitor`` (the studies arriving from each source and for each route against
the weeks before, each model version's recent studies against its baseline, the turnaround
of results) and
``acwi-node monitor baseline MODEL VERSION`` (pin or clear the baseline)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Any

from acwi_node.config import Settings
from acwi_node.hospital_clock import wall_clock
from acwi_node.monitoring.drift import Status

if TYPE_CHECKING:
    from acwi_node.monitoring.report import ModelReport

COMMAND = "monitor"


def add_parser(sub: Any) -> None:
    """Add ``monitor`` to the ``acwi-node`` parser."""
    monitor = sub.add_parser(
        COMMAND,
        help="the studies arriving from each source and for each route against the weeks"
        " before, each model version's recent studies against its baseline (what the model"
        " sees and says) and the turnaround of results (exit 1 when studies dropped, a signal"
        " has shifted or results are slow)",
    )
    monitor.add_argument("--model", help="only this model (its manifest name)")
    monitor.add_argument(
        "--days", type=int, default=None, help="the recent window (default monitoring.window_days)"
    )
    monitor.add_argument(
        "--weeks", type=int, default=0, help="also the figures of this many windows before"
    )
    monitor.add_argument("--json", action="store_true", help="print JSON")
    monitor_sub = monitor.add_subparsers(dest="monitor_command")
    baseline = monitor_sub.add_parser(
        "baseline",
        help="compare a model version with the studies it analysed in a period of your choice"
        " (default: its first monitoring.baseline_studies)",
    )
    baseline.add_argument("name", help="the model's manifest name")
    baseline.add_argument("version")
    baseline.add_argument(
        "--since", help="YYYY-MM-DD or YYYY-MM-DDTHH:MM (the hospital's clock, monitoring.timezone)"
    )
    baseline.add_argument(
        "--until", help="YYYY-MM-DD (through that day) or YYYY-MM-DDTHH:MM (the hospital's clock)"
    )
    baseline.add_argument(
        "--clear", action="store_true", help="back to the version's first studies"
    )


def _when(t: dt.datetime | None, zone: str) -> str:
    return "-" if t is None else wall_clock(t, zone)


def _baseline_line(report: ModelReport, target: int, zone: str) -> str:
    b = report.baseline
    period = f"{_when(b.since, zone)} to {_when(b.until, zone)}"
    if b.kind == "pinned":
        return f"baseline: pinned by {b.pinned_by or '-'}, {b.studies} studies from {period}"
    forming = f" (forming: {b.studies} of {target})" if b.forming else ""
    return f"baseline: its first {b.studies} studies, {period}{forming}"


RATES = (("finding", "finding_rate"), ("review", "review_rate"), ("OOD", "ood_rate"))


def _rates(row: dict[str, Any]) -> str:
    """A group's finding, review and OOD rates, as the command prints them."""
    return ", ".join(
        f"{name} {'-' if row[key] is None else f'{100 * row[key]:.1f}%'}" for name, key in RATES
    )


def format_reports(reports: list[ModelReport], *, days: int, target: int, zone: str = "UTC") -> str:
    """The reports as the command prints them, times on the hospital's clock in ``zone``."""
    if not reports:
        return f"no model analysed a study in the last {days} day(s)"

    def day(t: dt.datetime) -> str:
        return wall_clock(t, zone, shown="%Y-%m-%d", offset=False)

    out = []
    for r in reports:
        out.append(
            f"{r.model} {r.version}: {r.status.value.upper()}  (last {days} day(s):"
            f" {r.studies} studies, {r.images} images; {_baseline_line(r, target, zone)})"
        )
        rows = [("signal", "baseline", "recent", "statistic", "p", "status")]
        for s in r.signals:
            stat = "-"
            if s.statistic is not None:
                stat = f"{'z' if s.kind == 'rate' else 'PSI'} {s.statistic:.3f}"
            p = "-" if s.p_value is None else f"{s.p_value:.2g}"
            rows.append((s.signal, s.baseline_text, s.recent_text, stat, p, s.status.value))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
            out.append(("  " + "  ".join(cells)).rstrip())
        if r.by_source:
            out.append("  where the recent studies came from (site, equipment):")
            for g in r.by_source:
                where = f"{g['site']}, {g['equipment']}"
                reading = g.get("status", "")
                if g.get("moved"):
                    reading += f" ({', '.join(g['moved'])})"
                out.append(f"    {where}: {g['studies']} studies, {_rates(g)}: {reading}")
        if r.trend:
            out.append("  windows before (newest first):")
            for w in r.trend:
                out.append(
                    f"    {day(w['since'])} to {day(w['until'])}: {w['studies']} studies,"
                    f" {_rates(w)}: {w['status']}"
                )
    return "\n".join(out)


def run(settings: Settings, args: argparse.Namespace) -> int:
    from acwi_node.audit import command_operator
    from acwi_node.ledger import Ledger
    from acwi_node.model_overview import model_version_known
    from acwi_node.monitoring import pinning
    from acwi_node.monitoring.report import BaselineRefused, ModelMonitor
    from acwi_node.monitoring.shadow import ShadowComparison, format_shadow
    from acwi_node.monitoring.traffic import format_traffic, traffic_monitor
    from acwi_node.monitoring.turnaround import TurnaroundMonitor, format_turnaround

    cfg = settings.monitoring
    ledger = Ledger(settings.ledger_url)
    try:
        monitor = ModelMonitor(ledger, cfg)
        baseline = args.monitor_command == "baseline"
        named = args.name if baseline else args.model
        version = args.version if baseline else None
        if named is not None and not model_version_known(settings, ledger, named, version):
            what = named if version is None else f"{named} version {version}"
            command = "monitor baseline" if baseline else "monitor"
            print(f"acwi-node {command}: no model {what} on this node", file=sys.stderr)
            return 2
        if baseline:
            if args.clear:
                print(pinning.clear(monitor, args.name, args.version, command_operator()))
                return 0
            if not args.since or not args.until:
                print(
                    "acwi-node monitor baseline: give --since and --until, or --clear",
                    file=sys.stderr,
                )
                return 2
            try:
                notice = pinning.pin(
                    monitor, args.name, args.version, args.since, args.until, command_operator()
                )
            except BaselineRefused as exc:
                print(f"acwi-node monitor baseline: {exc}", file=sys.stderr)
                return 1
            print(notice)
            return 0
        days = cfg.window_days if args.days is None else args.days
        if not 1 <= days <= 365 or not 0 <= args.weeks <= 52:
            print("acwi-node monitor: --days must be 1 to 365, --weeks 0 to 52", file=sys.stderr)
            return 2
        reports = monitor.report(model=args.model, days=days, weeks=args.weeks)
        # studies arriving and shadow models: of the whole node, so not with --model
        traffic = None if args.model else traffic_monitor(settings, ledger).report()
        comparison = ShadowComparison(ledger)
        shadows = [] if args.model else comparison.report(days=days)
        unfinished = [] if args.model else comparison.unfinished(days=days)
        turnaround = None if args.model else TurnaroundMonitor(ledger, cfg).report()
        if args.json:
            out: dict[str, Any] = {"days": days, "models": [r.as_json() for r in reports]}
            if traffic is not None:
                out["traffic"] = traffic.as_json()
                out["shadow"] = [r.as_json() for r in shadows]
                out["shadow_unfinished"] = unfinished
            if turnaround is not None:
                out["turnaround"] = turnaround.as_json()
            print(json.dumps(out, indent=2))
        else:
            print(
                format_reports(reports, days=days, target=cfg.baseline_studies, zone=cfg.timezone)
            )
            if traffic is not None:
                print(format_traffic(traffic))
            if turnaround is not None:
                print(format_turnaround(turnaround))
            if shadows or unfinished:
                print(format_shadow(shadows, unfinished, days=days))
        shifted = any(r.status is Status.SHIFTED for r in reports)
        shifted |= traffic is not None and traffic.status is Status.SHIFTED
        shifted |= turnaround is not None and turnaround.status is Status.SHIFTED
        return 1 if shifted else 0
    finally:
        ledger.dispose()
