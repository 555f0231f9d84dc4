"""Pinning a model version's monitoring baseline to a period, and clearing it: the one path
the command line, the JSON API and the monitoring page take, each audited as a change of
configuration (who, which version, which period)."""

from __future__ import annotations

import datetime as dt
import logging

from acwi_node.audit import AuditEvent, audit, user
from acwi_node.monitoring.report import BaselineRefused, ModelMonitor

log = logging.getLogger("acwi_node.monitoring")


def parse_moment(text: str, *, end: bool = False) -> dt.datetime:
    """A UTC moment from ``YYYY-MM-DD`` (its start; with ``end``, the next day's start: the
    period runs through it) or ``YYYY-MM-DDTHH:MM[:SS]``. Raises ValueError."""
    text = text.strip()
    if len(text) == 10:
        day = dt.datetime.strptime(text, "%Y-%m-%d")
        try:
            return day + dt.timedelta(days=1) if end else day
        except OverflowError:  # through 9999-12-31: past the last day a date can hold
            raise ValueError(f"{text} is past the last day the node can count to") from None
    moment = dt.datetime.fromisoformat(text.removesuffix("Z"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return moment


def pin(
    monitor: ModelMonitor, name: str, version: str, since_text: str, until_text: str, by: str
) -> str:
    """Pin ``name`` ``version``'s baseline to the period; returns the notice to show, or
    raises :class:`BaselineRefused` (a period that cannot be read or used)."""
    if not name or not version:
        raise BaselineRefused("name the model and its version")
    try:
        since = parse_moment(since_text)
        until = parse_moment(until_text, end=True)
    except ValueError as exc:
        raise BaselineRefused(f"not a date: {exc}") from exc
    found = monitor.pin_baseline(name, version, since, until, by=by)
    period = f"{since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M}"
    audit(
        AuditEvent.CONFIGURATION_CHANGED,
        participants=[user(by)],
        detail=f"monitoring baseline of {name} {version} pinned: {found} studies from {period}",
    )
    log.info("monitoring baseline of %s %s pinned by %s", name, version, by)
    return f"{name} {version}: baseline pinned, {found} studies from {period}"


def clear(monitor: ModelMonitor, name: str, version: str, by: str) -> str:
    """Compare the version with its first studies again; returns the notice to show."""
    cleared = monitor.clear_baseline(name, version)
    if cleared:
        audit(
            AuditEvent.CONFIGURATION_CHANGED,
            participants=[user(by)],
            detail=f"monitoring baseline of {name} {version} cleared",
        )
        log.info("monitoring baseline of %s %s cleared by %s", name, version, by)
    first = monitor.cfg.baseline_studies
    return f"{name} {version}: compared with its first {first} studies" + (
        "" if cleared else " (no baseline was pinned)"
    )
