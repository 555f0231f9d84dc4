"""``acwi-node studies withdraw`` and ``acwi-node models recall``: take results back from the
PACS with rejection notes (:mod:`acwi_node.export.withdrawal`); the exporter sends them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

# The CLI parses its arguments before it loads the node: these load when a command runs.
if TYPE_CHECKING:
    from acwi_node.config import Settings
    from acwi_node.export.withdrawal import WithdrawalReport

#: ``--reason`` choices (:data:`acwi_node.export.withdrawal.REASONS`, not imported here).
REASON_CHOICES = ("quality", "safety")


def _add_common(parser: Any) -> None:
    parser.add_argument(
        "--reason",
        choices=REASON_CHOICES,
        default="quality",
        help="the rejection note's title: quality (Rejected for Quality Reasons, the default)"
        " or safety (Rejected for Patient Safety Reasons)",
    )
    parser.add_argument(
        "--note",
        required=True,
        help="why, in words: kept with the study, in the audit trail and in the note",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_withdraw_parser(studies_sub: Any) -> None:
    """Add ``withdraw`` to the ``studies`` subcommands."""
    withdraw = studies_sub.add_parser(
        "withdraw",
        help="take the studies' AI results back from the PACS: an IHE IOCM rejection note to"
        " every destination that holds them; what waits in the outbox is never sent (exit 1"
        " if any study's could not be)",
    )
    withdraw.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    _add_common(withdraw)


def add_recall_parser(models_sub: Any) -> None:
    """Add ``recall`` to the ``models`` subcommands."""
    recall = models_sub.add_parser(
        "recall",
        help="withdraw every result model NAME VERSION gave from the PACS (rejection notes),"
        " and with --reprocess analyse those studies again with the active version",
    )
    recall.add_argument("name")
    recall.add_argument("version")
    recall.add_argument(
        "--reprocess",
        action="store_true",
        help="then reprocess each study whose results were withdrawn (activate the version"
        " that replaces it first)",
    )
    recall.add_argument(
        "--dry-run", action="store_true", help="list what would be withdrawn, change nothing"
    )
    _add_common(recall)


def run_withdraw(settings: Settings, args: argparse.Namespace) -> int:
    """``acwi-node studies withdraw UID... --note TEXT``: exit 1 if any study was refused
    or one of its jobs could not be withdrawn, 2 for a bad request."""
    from acwi_node.audit.trail import command_operator
    from acwi_node.export.withdrawal import withdraw_results
    from acwi_node.ledger import Ledger, StudyActionRefused

    ledger = Ledger(settings.ledger_url)
    failed = 0
    reports: dict[str, Any] = {}
    try:
        for uid in args.study_uids:
            try:
                report = withdraw_results(
                    settings,
                    ledger,
                    reason=args.reason,
                    note=args.note,
                    by=command_operator(),
                    study_uid=uid,
                )
            except ValueError as exc:
                print(f"acwi-node studies withdraw: {exc}", file=sys.stderr)
                return 2
            except StudyActionRefused as exc:
                failed += 1
                reports[uid] = {"error": str(exc)}
                if not args.json:
                    print(f"{uid}: {exc}", file=sys.stderr)
                continue
            reports[uid] = report.as_json()
            if report.refused or not any(j.withdrawn for j in report.jobs):
                failed += 1
            if not args.json:
                _print(uid, report)
    finally:
        ledger.dispose()
    if args.json:
        print(json.dumps(reports, indent=2))
    return 1 if failed else 0


def _print(uid: str, report: WithdrawalReport) -> None:
    for job in report.jobs:
        print(job.describe(), file=sys.stdout if job.withdrawn else sys.stderr)
    if not report.jobs:
        print(f"{uid}: nothing withdrawn: {report.why_nothing()}", file=sys.stderr)
    elif report.unfinished:
        print(
            f"{uid}: {report.unfinished} analysis(es) not finished: withdraw again once they are",
            file=sys.stderr,
        )


def run_recall(settings: Settings, args: argparse.Namespace) -> int:
    """``acwi-node models recall NAME VERSION --note TEXT [--reprocess] [--dry-run]``: exit 1
    if a job could not be withdrawn or a study not reprocessed, 2 for a bad request (a model
    version the node does not know among them)."""
    from acwi_node.audit.trail import command_operator
    from acwi_node.export.withdrawal import (
        NoSuchModel,
        check_model_known,
        check_request,
        withdraw_results,
    )
    from acwi_node.ledger import Ledger, StudyActionRefused
    from acwi_node.ledger.withdrawals import Withdrawals

    try:
        check_request(args.reason, args.note)
    except ValueError as exc:
        print(f"acwi-node models recall: {exc}", file=sys.stderr)
        return 2
    ledger = Ledger(settings.ledger_url)
    try:
        try:
            check_model_known(settings, ledger, args.name, args.version)
        except NoSuchModel as exc:  # a name or version mistyped: nothing withdrawn
            print(f"acwi-node models recall: {exc}", file=sys.stderr)
            return 2
        if args.dry_run:
            found = Withdrawals(ledger).candidates(model_name=args.name, model_version=args.version)
            listing = [
                {
                    "job_id": j.job_id,
                    "study_uid": j.study_uid,
                    "generation": j.generation,
                    "route": j.route,
                    "objects": len(j.results),
                    "destinations": sorted({d for r in j.results for d in r.destinations}),
                    "files_deleted": j.files_deleted,
                }
                for j in found.jobs
            ]
            if args.json:
                print(json.dumps({"jobs": listing, "unfinished": found.unfinished}, indent=2))
                return 0
            for candidate, item in zip(found.jobs, listing, strict=True):
                held = sorted({d for r in candidate.results for d in r.destinations})
                where = ", ".join(held) or "no destination"
                gone = _files_deleted(settings, held) if candidate.files_deleted else ""
                print(
                    f"{item['study_uid']} #{item['generation']} {item['route']}:"
                    f" {item['objects']} object(s) in {where}{gone}"
                )
            print(
                f"{len(listing)} analysis(es) of {args.name} {args.version} would be withdrawn"
                + (f"; {found.unfinished} not finished yet" if found.unfinished else "")
            )
            return 0
        report = withdraw_results(
            settings,
            ledger,
            reason=args.reason,
            note=args.note,
            by=command_operator(),
            model_name=args.name,
            model_version=args.version,
        )
        reprocessed: dict[str, str] = {}
        if args.reprocess:
            for uid in dict.fromkeys(j.study_uid for j in report.jobs if j.withdrawn):
                try:
                    reprocessed[uid] = f"generation {ledger.reprocess_study(uid)}"
                except StudyActionRefused as exc:
                    reprocessed[uid] = f"not reprocessed: {exc}"
    finally:
        ledger.dispose()
    not_reprocessed = [u for u, what in reprocessed.items() if what.startswith("not")]
    if args.json:
        print(json.dumps({**report.as_json(), "reprocessed": reprocessed}, indent=2))
    else:
        for job in report.jobs:
            print(job.describe(), file=sys.stdout if job.withdrawn else sys.stderr)
        for uid, what in reprocessed.items():
            print(f"{uid}: {what}" if uid in not_reprocessed else f"{uid}: reprocessing as {what}")
        withdrawn = sum(1 for j in report.jobs if j.withdrawn)
        summary = f"{args.name} {args.version}: {withdrawn} analysis(es) withdrawn"
        summary += f", {len(report.refused)} not"
        if report.unfinished:
            summary += f", {report.unfinished} not finished yet (recall again)"
        if report.withdrawn_before:
            summary += f", {report.withdrawn_before} withdrawn before"
        print(summary)
    return 1 if report.refused or not_reprocessed else 0


def _files_deleted(settings: Settings, destinations: list[str]) -> str:
    """What a dry run says of an analysis whose files storage retention deleted: whose
    archive the note's patient is asked of, and where the results are rejected by hand."""
    from acwi_node.export.withdrawal_headers import query_source_of

    asked = {d: query_source_of(settings, [d]) for d in destinations}
    by_hand = [d for d, source in asked.items() if source is None]
    sources = sorted({source.name for source in asked.values() if source is not None})
    said = []
    if sources:
        said.append(f"the patient asked of {', '.join(sources)}")
    if by_hand:
        said.append(f"reject by hand in {', '.join(by_hand)}")
    return f"; its files are deleted: {'; '.join(said)}"
