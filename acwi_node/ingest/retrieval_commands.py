"""``acwi-node studies retrieve`` and ``acwi-node studies retrievals``: queue a retrieval from
a ``[[sources]]`` PACS, and list them (the ``scp`` process, or ``serve``, runs them);
``acwi-node sources check``: whether each source answers as a retrieval needs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

# The CLI parses its arguments before it loads the node: these load when a command runs.
if TYPE_CHECKING:
    from acwi_node.config import Settings
    from acwi_node.ledger.retrievals import RetrievalView

#: Retrieval states that are final.
FINAL = ("done", "failed")


def add_parsers(studies_sub: Any) -> None:
    """Add ``retrieve`` and ``retrievals`` to the ``studies`` subcommands."""
    retrieve = studies_sub.add_parser(
        "retrieve",
        help="retrieve studies from a [[sources]] PACS (C-FIND, then C-MOVE to the node) and"
        " analyse them like any study received; the scp process runs it",
    )
    retrieve.add_argument("source", metavar="SOURCE", help="the [[sources]] name")
    retrieve.add_argument("--study-uid", help="Study Instance UID")
    retrieve.add_argument("--accession", help="Accession Number")
    retrieve.add_argument("--study-date", help="Study Date, YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    retrieve.add_argument("--modality", help="with the others: only studies of this modality")
    retrieve.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=600.0,
        default=None,
        metavar="SECONDS",
        help="wait until the retrieval ends (default up to 600 s); exit 1 if it failed",
    )
    listing = studies_sub.add_parser("retrievals", help="the latest retrievals and their state")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true", help="print JSON")


def add_sources_parser(sub: Any) -> None:
    """Add ``sources check`` to the top-level commands."""
    sources = sub.add_parser("sources", help="the PACSs studies may be retrieved from")
    sources_sub = sources.add_subparsers(dest="sources_command", required=True)
    check = sources_sub.add_parser(
        "check",
        help="C-ECHO each source and send it a C-FIND (Study Root) that matches nothing, as a"
        " retrieval would connect; exit 1 if any fails",
    )
    check.add_argument("names", nargs="*", metavar="NAME", help="default: every source")
    check.add_argument("--json", action="store_true", help="print JSON")


def run_sources_check(settings: Settings, names: list[str], *, as_json: bool) -> int:
    """``acwi-node sources check [NAME...]``: exit 1 if any fails, 2 for an unknown name."""
    import logging

    from acwi_node.export import dicomweb
    from acwi_node.ingest.qr_scu import check_source
    from acwi_node.ingest.retrieval import source_tls
    from acwi_node.tls import TlsConfigError

    known = {src.name: src for src in settings.sources}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(
            f"acwi-node: no source named {', '.join(unknown)}"
            f" (configured: {', '.join(known) or 'none'})",
            file=sys.stderr,
        )
        return 2
    # Each failure is printed with its reason below: pynetdicom's own lines would repeat it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    rows: list[dict[str, Any]] = []
    asked: list[str] = []  # what each check sent, for its line
    for src in [known[n] for n in names] if names else settings.sources:
        timeout_s = min(settings.retrieve.timeout_s, 30.0)
        try:
            if src.kind == "dicomweb":  # a QIDO-RS query, as for a DICOMweb destination
                found = dicomweb.check(src, timeout_s=timeout_s)
                ok, elapsed, error = found.ok, found.elapsed_ms, found.error
            else:
                assert src.ae_title is not None and src.host is not None and src.port
                result = check_source(
                    called_ae=src.ae_title,
                    host=src.host,
                    port=src.port,
                    calling_ae=src.calling_ae(settings.node.ae_title),
                    timeout_s=timeout_s,
                    tls=source_tls(src),
                    get=src.uses_get,
                )
                ok, elapsed, error = result.ok, result.elapsed_ms, result.error
        except TlsConfigError as exc:
            ok, elapsed, error = False, 0.0, f"TLS: {exc}"
        rows.append(
            {"name": src.name, "where": src.where, "ok": ok, "elapsed_ms": round(elapsed, 1),
             "error": error}
        )  # fmt: skip
        asked.append("QIDO-RS" if src.kind == "dicomweb" else "C-ECHO and C-FIND")
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no sources configured ([[sources]])")
    for row, what in [] if as_json else zip(rows, asked, strict=True):
        if row["ok"]:
            print(f"{row['name']} ({row['where']}): {what} ok, {row['elapsed_ms']:.0f} ms")
        else:
            print(f"{row['name']} ({row['where']}): FAILED: {row['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


def _line(view: RetrievalView) -> str:
    from acwi_node.ingest.retrieval import describe_query

    what = describe_query(view.query)
    text = (
        f"#{view.id} {view.state:<7} {view.source}: {what}: "
        f"{view.studies_retrieved}/{view.studies_found} study(ies), "
        f"{view.completed} instance(s)"
    )
    if view.failed:
        text += f", {view.failed} not sent"
    if view.error:
        text += f" - {view.error}"
    elif view.note:
        text += f" - {view.note}"
    return text


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.studies_command == "retrievals":
        if args.limit < 1:
            print(f"acwi-node: --limit {args.limit}: give a number above 0", file=sys.stderr)
            return 2
        return _list(settings, args.limit, as_json=args.json)
    # checked before anything is queued: a retrieval asked for with a wrong --wait still ran
    if args.wait is not None and not args.wait >= 0:  # NaN too
        print(
            f"acwi-node: --wait {args.wait:g}: give a number of seconds, 0 or more", file=sys.stderr
        )
        return 2
    return _retrieve(settings, args)


def _retrieve(settings: Settings, args: argparse.Namespace) -> int:
    from acwi_node.ingest.retrieval import QueryError, check_query, describe_query
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.retrievals import Retrievals

    names = [s.name for s in settings.sources]
    if args.source not in names:
        print(
            f"acwi-node: no source named {args.source!r}"
            f" (configured: {', '.join(names) or 'none'}; see [[sources]])",
            file=sys.stderr,
        )
        return 2
    try:
        query = check_query(
            {
                "study_uid": args.study_uid,
                "accession_number": args.accession,
                "study_date": args.study_date,
                "modality": args.modality,
            }
        )
    except QueryError as exc:
        print(f"acwi-node: {exc}", file=sys.stderr)
        return 2
    ledger = Ledger(settings.ledger_url)
    try:
        retrievals = Retrievals(ledger)
        rid = retrievals.request(args.source, query, requested_by="cli")
        print(f"retrieval #{rid} queued: {args.source}: {describe_query(query)}")
        if args.wait is None:
            return 0
        deadline = time.monotonic() + args.wait
        while True:
            view = retrievals.get(rid)
            assert view is not None
            if view.state in FINAL or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        print(_line(view))
        if view.state not in FINAL:
            print(
                f"acwi-node: retrieval #{rid} still {view.state} after {args.wait:g} s"
                " (is the scp process running?)",
                file=sys.stderr,
            )
            return 1
        return 0 if view.state == "done" else 1
    finally:
        ledger.dispose()


def _list(settings: Settings, limit: int, *, as_json: bool) -> int:
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.retrievals import Retrievals

    ledger = Ledger(settings.ledger_url)
    try:
        views = Retrievals(ledger).recent(limit)
    finally:
        ledger.dispose()
    if as_json:
        print(json.dumps([v.as_json() for v in views], indent=2))
        return 0
    if not views:
        print("no retrievals")
    for view in views:
        print(_line(view))
    return 0
