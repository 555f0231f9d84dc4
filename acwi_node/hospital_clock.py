"""Times on the hospital's clock (``monitoring.timezone``): how the node shows the moments its
ledger keeps in UTC, and reads the dates and times a person types."""

from __future__ import annotations

import datetime as dt
import zoneinfo


def wall_clock(
    value: str | dt.datetime | None,
    zone: str = "UTC",
    *,
    shown: str = "%Y-%m-%d %H:%M",
    offset: bool = True,
) -> str:
    """A ledger time (ISO 8601, UTC: ``2026-03-02T07:05:09Z``, or without its ``Z``; or a
    datetime, naive ones in UTC) as the hospital's wall clock in ``zone``
    (``monitoring.timezone``), in the ``shown`` format, followed by its offset from UTC
    (``2026-03-02 08:05 +0100``; not with ``offset`` false, for a day); a value that is no
    time is shown as it is."""
    if not value:
        return ""
    if isinstance(value, dt.datetime):
        moment = value
    else:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    here = moment.astimezone(zoneinfo.ZoneInfo(zone))
    return here.strftime(shown + (" %z" if offset else ""))


def utc_moment(text: str, zone: str = "UTC", *, end: bool = False) -> dt.datetime:
    """The UTC moment (naive, as the ledger keeps them) a person means by ``YYYY-MM-DD`` (the
    start of that day on the hospital's clock in ``zone``; with ``end``, the start of the next
    day: a period runs through it) or by ``YYYY-MM-DDTHH:MM[:SS]`` (on the hospital's clock,
    unless it carries its own offset or ``Z``). Raises ValueError."""
    text = text.strip()
    if len(text) == 10:
        moment = dt.datetime.strptime(text, "%Y-%m-%d")
        if end:
            try:
                moment += dt.timedelta(days=1)
            except OverflowError:  # through 9999-12-31: past the last day a date can hold
                raise ValueError(f"{text} is past the last day the node can count to") from None
    else:
        moment = dt.datetime.fromisoformat(
            text.removesuffix("Z") + ("+00:00" if text.endswith("Z") else "")
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    try:
        return moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
    except OverflowError:
        raise ValueError(f"{text} is past the last moment the node can count to") from None
