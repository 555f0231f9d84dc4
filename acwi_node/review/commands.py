"""``acwi-node users add|passwd|list|disable|enable``, ``acwi-node feedback export DIR`` and
``acwi-node feedback agreement``."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acwi_node.config import Settings

if TYPE_CHECKING:
    from acwi_node.review.store import ReviewStore

COMMANDS = ("users", "feedback")


def add_parsers(sub: Any) -> None:
    """Add the review app's sub-commands to the ``acwi-node`` parser."""
    users = sub.add_parser("users", help="web app accounts: add, passwd, list, disable, enable")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="create an account (password from a prompt)")
    add.add_argument("name", help="user name (letters, digits, . _ - ^)")
    add.add_argument("--role", choices=("radiologist", "admin", "sender"), default="radiologist")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    passwd = users_sub.add_parser(
        "passwd", help="set an account's password (from a prompt) and end its sessions"
    )
    passwd.add_argument("name")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    users_sub.add_parser("list", help="list accounts")
    disable = users_sub.add_parser("disable", help="disable an account and end its sessions")
    disable.add_argument("name")
    enable = users_sub.add_parser("enable", help="enable a disabled account")
    enable.add_argument("name")

    feedback = sub.add_parser("feedback", help="reviewed cases as a labelled dataset")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    export = feedback_sub.add_parser(
        "export", help="write DIR/images/*.dcm and DIR/labels.csv (acwi-models train reads it)"
    )
    export.add_argument("dir", type=Path)
    export.add_argument(
        "--identified",
        action="store_true",
        help="exact copies of the images, identifiers and all (default: feedback.deidentify)",
    )
    agreement = feedback_sub.add_parser(
        "agreement",
        help="how often the radiologists' verdicts agreed with the model, per model version and"
        " kind of case (flagged, quality-control sample)",
    )
    agreement.add_argument("--days", type=int, default=90, help="verdicts of the last N days")
    agreement.add_argument("--json", action="store_true", help="print the rows as JSON")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise ValueError("the passwords differ")
    return first


def _print_agreement(store: ReviewStore, days: int, *, as_json: bool) -> int:
    """``acwi-node feedback agreement``: a table (or JSON) of
    :meth:`~acwi_node.review.store.ReviewStore.agreement`."""
    if not 1 <= days <= 3650:
        print("acwi-node feedback agreement: --days must be 1 to 3650", file=sys.stderr)
        return 2
    rows = store.agreement(days=days)
    if as_json:
        print(json.dumps({"days": days, "rows": rows}, indent=2))
        return 0
    if not rows:
        print(f"no final verdicts in the last {days} days")
        return 0
    print(f"final verdicts of the last {days} days (agreement with its 95 % Wilson interval)")
    header = (
        "model", "version", "cases", "verdicts", "agreed", "agreement", "by site", "corrections"
    )  # fmt: skip
    lines = [header]
    for r in rows:
        corrections = ", ".join(f"{was} to {now} ({n})" for was, now, n in r["corrections"])
        lines.append(
            (
                r["model"],
                r["version"],
                r["kind"],
                str(r["verdicts"]),
                str(r["agreed"]),
                f"{100 * r['agreement']:.0f} % ({100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f})",
                ", ".join(f"{site or '-'} {k}/{n}" for site, n, k in r["sites"]),
                corrections or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
            + "  "
            + line[-1]
        )
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    from acwi_node.audit import AuditEvent, audit, command_operator, user
    from acwi_node.ledger import Ledger
    from acwi_node.review import auth
    from acwi_node.review.store import ReviewError, ReviewStore

    ledger = Ledger(settings.ledger_url)
    try:
        if args.command == "feedback" and args.feedback_command == "agreement":
            return _print_agreement(ReviewStore(ledger), args.days, as_json=args.json)
        if args.command == "feedback":
            from acwi_node.review.feedback import ExportError, export_feedback

            try:
                report = export_feedback(
                    settings, ledger, args.dir, deidentify=False if args.identified else None
                )
            except (ExportError, OSError) as exc:
                print(f"acwi-node feedback export: {exc}", file=sys.stderr)
                return 1
            how = "de-identified" if report.deidentified else "with identifiers"
            audit(
                AuditEvent.FEEDBACK_EXPORTED,
                participants=[user(command_operator())],
                detail=f"{report.images} image(s) of {report.cases} reviewed case(s) exported,"
                f" {how}" + (f"; {report.withheld} withheld" if report.withheld else ""),
            )
            notes = []
            if report.missing:
                notes.append(f"{report.missing} no longer in the spool or unreadable")
            if report.cleaned:
                notes.append(f"{report.cleaned} with burned-in regions blanked")
            if report.withheld:
                notes.append(
                    f"{report.withheld} withheld (burned-in annotation: not de-identified)"
                )
            print(
                f"exported {report.images} image(s) of {report.cases} reviewed case(s) "
                f"to {args.dir}, {how}" + "".join(f"; {n}" for n in notes)
            )
            return 0
        store = ReviewStore(ledger)
        if args.users_command == "add":
            try:
                name = auth.check_user_name(args.name)
                password = auth.check_password(_read_password(args.password_stdin))
                store.add_user(name, auth.hash_password(password), args.role)
            except (ValueError, EOFError) as exc:
                print(f"acwi-node users add: {exc}", file=sys.stderr)
                return 1
            store.audit(command_operator(), "user_added", detail=f"{name} ({args.role})")
            print(f"added {name} ({args.role})")
            return 0
        if args.users_command == "passwd":
            if store.get_user(args.name) is None:  # said before a password is asked for
                print(f"acwi-node users passwd: no user {args.name!r}", file=sys.stderr)
                return 1
            try:
                password = auth.check_password(_read_password(args.password_stdin))
            except (ValueError, EOFError) as exc:
                print(f"acwi-node users passwd: {exc or 'no password given'}", file=sys.stderr)
                return 1
            if not store.set_password(args.name, auth.hash_password(password)):
                print(f"acwi-node users passwd: no user {args.name!r}", file=sys.stderr)
                return 1
            store.audit(command_operator(), "user_password_set", detail=args.name)
            print(f"set the password of {args.name}; its sessions ended")
            return 0
        if args.users_command == "list":
            users = store.list_users()
            if not users:
                print("no users")
            for u in users:
                print(f"{u.name:<32} {u.role:<12} {'disabled' if u.disabled else 'active'}")
            return 0
        disabled = args.users_command == "disable"
        if not store.set_disabled(args.name, disabled):
            print(f"acwi-node users {args.users_command}: no user {args.name!r}", file=sys.stderr)
            return 1
        action = "user_disabled" if disabled else "user_enabled"
        store.audit(command_operator(), action, detail=args.name)
        print(f"{'disabled' if disabled else 'enabled'} {args.name}")
        return 0
    except ReviewError as exc:
        print(f"acwi-node: {exc}", file=sys.stderr)
        return 1
    finally:
        ledger.dispose()
