"""``acwi-node destinations status`` and ``acwi-node destinations retry``: each destination's
outbox, as the dashboard shows it, and every delivery to a destination that failed for good
sent again (after an outage longer than ``exporter.outage_patience_s``, or a destination whose
configuration was mended)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acwi_node.config import Settings


def add_destination_parsers(destinations_sub: argparse._SubParsersAction[Any]) -> None:
    status = destinations_sub.add_parser(
        "status",
        help="each destination's outbox: results waiting, failed, the last delivered, the"
        " latest error, and since when one cannot be reached (exit 1 when one cannot be"
        " reached or has failed deliveries)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    retry = destinations_sub.add_parser(
        "retry",
        help="send every delivery to the destinations named that failed for good again, its"
        " attempts counted from zero (withdrawn results never)",
    )
    retry.add_argument("names", nargs="+", metavar="NAME")


def run_destinations_status(settings: Settings, *, as_json: bool) -> int:
    """Print each destination's outbox (the dashboard's table); exit 1 when one cannot be
    reached or has deliveries that failed for good (a monitoring script's test), else 0."""
    from acwi_node.ledger import Ledger
    from acwi_node.review.store import ReviewStore
    from acwi_node.review.views import destination_outboxes

    ledger = Ledger(settings.ledger_url)
    try:
        rows = destination_outboxes(ReviewStore(ledger), settings)
    finally:
        ledger.dispose()
    trouble = any(row["failed"] or row.get("unreachable_since") for row in rows)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 1 if trouble else 0
    for row in rows:
        committing = row["committing"]
        awaiting = f" (+{committing} awaiting commitment)" if committing else ""
        line = (
            f"{row['name']}  {row['where'] or '-'}: {row['pending']} waiting{awaiting},"
            f" {row['failed']} failed, last delivered {row['last_delivered_at'] or 'never'}"
        )
        if row.get("unreachable_since"):
            line += f"; UNREACHABLE since {row['unreachable_since']}"
        if row["last_error"]:
            line += f"; latest error: {row['last_error']}"
        print(line)
    if not rows:
        print("no destinations configured ([[destinations]])")
    return 1 if trouble else 0


def run_destinations_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Put each named destination's failed deliveries back in the outbox; exit 2, with
    nothing put back, when a name is neither configured nor in the outbox."""
    from sqlalchemy import select

    from acwi_node.ledger import Ledger
    from acwi_node.ledger.models import Delivery

    ledger = Ledger(settings.ledger_url)
    try:
        known = {d.name for d in settings.destinations}
        names = list(dict.fromkeys(args.names))
        with ledger.session() as s:
            unknown = [
                name
                for name in names
                if name not in known
                and s.scalars(
                    select(Delivery.id).where(Delivery.destination == name).limit(1)
                ).first()
                is None
            ]
        if unknown:
            print(
                f"acwi-node: no destination named {', '.join(unknown)}"
                f" (configured: {', '.join(sorted(known)) or 'none'})",
                file=sys.stderr,
            )
            return 2
        for name in names:
            retried = ledger.retry_failed(name)
            print(
                f"{name}: {retried.deliveries} failed delivery(ies) of"
                f" {len(retried.study_uids)} study(ies) back in the outbox"
            )
    finally:
        ledger.dispose()
    return 0
