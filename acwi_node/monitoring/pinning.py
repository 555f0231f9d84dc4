"""Pinning a model version's monitoring baseline to a period, and clearing it: the one path
the command line, the JSON API and the monitoring page take, each audited as a change of
configuration (who, which version, which period)."""

from __future__ import annotations

import logging

from acwi_node.audit import AuditEvent, audit, user
from acwi_node.hospital_clock import utc_moment, wall_clock
from acwi_node.monitoring.report import BaselineRefused, ModelMonitor

log = logging.getLogger("acwi_node.monitoring")


def pin(
    monitor: ModelMonitor, name: str, version: str, since_text: str, until_text: str, by: str
) -> str:
    """Pin ``name`` ``version``'s baseline to the period (dates and times on the hospital's
    clock, ``monitoring.timezone``, unless they carry an offset); returns the notice to show,
    or raises :class:`BaselineRefused` (a period that cannot be read or used)."""
    if not name or not version:
        raise BaselineRefused("name the model and its version")
    try:
        zone = monitor.cfg.timezone
        since = utc_moment(since_text, zone)
        until = utc_moment(until_text, zone, end=True)
    except ValueError as exc:
        raise BaselineRefused(f"not a date: {exc}") from exc
    found = monitor.pin_baseline(name, version, since, until, by=by)
    period = f"{wall_clock(since, zone)} to {wall_clock(until, zone)}"
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
