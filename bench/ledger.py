"""Ledger at scale: the administrators' views, the metrics scrape and the upkeep over a ledger
that has seen many studies, on SQLite and PostgreSQL.

    python -m bench.ledger                            # 20,000 and 100,000 radiographs, SQLite
    python -m bench.ledger --studies 5000 --images 300    # CT series: summaries of 300 images
    python -m bench.ledger --postgres postgresql://postgres@127.0.0.1:5432/postgres --json l.json

The ledger is filled as the node leaves it after ``--studies`` studies at 1,000 a day: each
study received (``--images`` instance rows), analysed (a job whose summary lists every image,
as the worker writes it), its SR and two heatmaps delivered to one destination; one in ten
went through the review worklist and has a radiologist's verdict. The rows are written in
bulk (the node's own code would take hours for a year of studies), in a temporary SQLite file
and, with ``--postgres``, in a database made on that server for the run and dropped after.

Each view is then timed (the best of three): what the dashboard, ``/metrics``, the Models page,
``acwi-node status`` and a study's trace read, and one sweep of storage and records retention.
It prints milliseconds for each size (``--studies``, a fresh ledger each): what grows with the
ledger's age and what does not. The dashboard reads its 14 days; records retention keeps the
instance rows to the last weeks (``retention.records_keep_days``: this ledger's are all
still there, as if it were off).

A second table times the administrators' commands that read the ledger, each run whole as
``acwi-node`` runs it (in this process, its output discarded; the interpreter's start is not
counted): ``status``, ``studies show``, the outboxes, a retention dry run (with a policy of 7
days, 90 for reviewed cases, records 30 days), the accounts, the agreement figures, the
feedback export (into a temporary folder: the bulk rows have no files, so it counts what it
would copy), ``monitor``, a model version's recall (dry run: every analysis of the year) and
the installed models. ``--no-cli`` leaves them out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text

from bench.common import machine, markdown_table, write_json

_BATCH = 2000
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: A study of every ledger the bench fills: the one whose trace is read.
SHOWN_STUDY = "1.2.826.0.1.3680043.8.498.7"


def fill(url: str, studies: int, images: int) -> float:
    """Write the ledger; returns the seconds it took."""
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.models import (
        Delivery,
        DeliveryState,
        Instance,
        Job,
        JobState,
        Result,
        ReviewItem,
        ReviewState,
        Study,
        StudyState,
        User,
        Verdict,
    )

    ledger = Ledger(url)
    started = time.perf_counter()
    with ledger.engine.begin() as c:
        c.execute(insert(User), [dict(id=1, name="jane", password_hash="x", role="radiologist")])
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    tables: dict[Any, list[dict[str, Any]]] = {
        t: []
        for t in (
            Study,
            Instance,
            Job,
            Result,
            Delivery,
            ReviewItem,
            Verdict,
        )
    }
    instance_id = result_id = 0
    # the model's identity beside the summary, as the worker records it (an earlier version
    # of the node, measured side by side with --before, has no such columns)
    identity = (
        {"manifest_name": "acwi-dianet-chest", "manifest_version": "1.1.0"}
        if hasattr(Job, "manifest_version")
        else {}
    )
    for n in range(1, studies + 1):
        at = now - dt.timedelta(days=(studies - n) / 1000)
        uid = f"1.2.826.0.1.3680043.8.498.{n}"
        tables[Study].append(
            dict(id=n, study_uid=uid, state=StudyState.DELIVERED, calling_ae=f"SITE{n % 4}",
                 modality="DX", body_part="CHEST", study_date=at.strftime("%Y%m%d"),
                 instance_count=images, first_received_at=at, last_received_at=at,
                 updated_at=at, completed_at=at, completed_by="release", last_released_at=at)
        )  # fmt: skip
        for k in range(images):
            instance_id += 1
            tables[Instance].append(
                dict(id=instance_id, study_id=n, sop_instance_uid=f"{uid}.1.{k}",
                     sop_class_uid=DX, series_uid=f"{uid}.1", modality="DX",
                     transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"{uid}/{uid}.1.{k}.dcm",
                     size=500_000, crc32=k, calling_ae=f"SITE{n % 4}", received_at=at)
            )  # fmt: skip
        review = n % 10 == 0
        probabilities = {"normal": 0.91, "nodule": 0.07, "effusion": 0.02}
        summary = {
            "model": {"name": "acwi-dianet-chest", "version": "1.1.0"},
            "labels": list(probabilities),
            "probabilities": probabilities,
            "predicted_label": "normal",
            "uncertainty": {"entropy": 0.3, "epistemic": 0.01, "aleatoric": 0.3, "score": 0.02},
            "uncertainty_threshold": 0.05,
            "ood_score": 0.3,
            "needs_review": review,
            "images": [
                {
                    "sop_instance_uid": f"{uid}.1.{k}",
                    "probabilities": probabilities,
                    "uncertainty_score": 0.02,
                    "ood_score": 0.3,
                }
                for k in range(images)
            ],  # fmt: skip
            "skipped": {},
        }
        tables[Job].append(
            dict(id=n, study_id=n, generation=1, route="chest", model="default",
                 destinations=["pacs"], state=JobState.DELIVERED, attempts=1, created_at=at,
                 enqueued_at=at, started_at=at, analysed_at=at, finished_at=at,
                 completed_by="release", summary=summary, **identity)
        )  # fmt: skip
        for kind in ("sr", "heatmap", "heatmap"):
            result_id += 1
            tables[Result].append(
                dict(id=result_id, job_id=n, kind=kind, sop_instance_uid=f"2.25.{result_id}",
                     sop_class_uid=SR, path=f"{uid}/{result_id}.dcm")
            )  # fmt: skip
            tables[Delivery].append(
                dict(id=result_id, result_id=result_id, job_id=n, destination="pacs",
                     state=DeliveryState.DELIVERED, attempts=1, next_attempt_at=at,
                     delivered_at=at)
            )  # fmt: skip
        if review:
            tables[ReviewItem].append(
                dict(id=n, study_id=n, job_id=n, state=ReviewState.CLOSED, reason="uncertain",
                     created_at=at, closed_at=at)
            )  # fmt: skip
            tables[Verdict].append(
                dict(id=n, review_item_id=n, study_id=n, job_id=n, user_id=1, user_name="jane",
                     action="confirm", label="normal", model_label="normal", created_at=at)
            )  # fmt: skip
        if n % _BATCH == 0 or n == studies:
            with ledger.engine.begin() as c:
                for table, rows in tables.items():
                    if rows:
                        c.execute(insert(table), rows)
                        rows.clear()
    if ledger.engine.dialect.name == "postgresql":  # as autovacuum leaves a table in use
        with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE"))
    ledger.dispose()
    return time.perf_counter() - started


def views(url: str, data_dir: Path) -> dict[str, Callable[[], Any]]:
    """What the node reads of the ledger, by name."""
    from acwi_node.config import load_settings
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.trace import study_trace
    from acwi_node.model_overview import models_overview
    from acwi_node.observability.metrics import LedgerCollector
    from acwi_node.retention import DiskSpace, Retention
    from acwi_node.review.store import ReviewStore

    settings = load_settings(None, node={"data_dir": data_dir, "database_url": url})
    ledger = Ledger(url)
    store = ReviewStore(ledger)
    collector = LedgerCollector(settings, ledger)
    retention = Retention(settings, ledger, space=lambda: DiskSpace(900, 1000))
    return {
        "dashboard (14 days by site)": store.dashboard,
        "dashboard outboxes": lambda: store.delivery_status(["pacs"]),
        "/metrics (ledger gauges)": lambda: list(collector._from_ledger()),
        "Models page": lambda: models_overview(settings, ledger),
        "agreement (90 days)": store.agreement,
        "acwi-node status": ledger.list_studies,
        "a study's trace": lambda: study_trace(ledger, SHOWN_STUDY),
        "retention sweep (dry run)": lambda: retention.sweep(dry_run=True),
    }


#: The administrators' commands that read the ledger, by name: ``acwi-node``'s arguments.
COMMANDS: dict[str, str] = {
    "status": "status",
    "status --json": "status --json",
    "studies show": f"studies show {SHOWN_STUDY}",
    "studies show --json": f"studies show {SHOWN_STUDY} --json",
    "studies retrievals": "studies retrievals",
    "destinations status": "destinations status",
    "retention --dry-run": "retention --dry-run",
    "retention --dry-run --json": "retention --dry-run --json",
    "users list": "users list",
    "feedback agreement": "feedback agreement",
    "feedback export": "feedback export {work}/feedback",
    "monitor": "monitor",
    "monitor --weeks 8": "monitor --weeks 8",
    "models recall --dry-run": "models recall acwi-dianet-chest 1.1.0 --dry-run --note bench",
    "models list": "models list",
}


def commands(url: str, work: Path) -> dict[str, Callable[[], Any]]:
    """:data:`COMMANDS`, each a call of ``acwi-node``'s entry point with a configuration in
    ``work`` whose ledger is ``url``."""
    from acwi_node.audit import close_audit
    from acwi_node.cli import main

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = work / "acwi-node.toml"
    config.write_text(
        f"""[node]
data_dir = "{data}"
database_url = "{url}"

[retention]
keep_hours = 168
reviewed_keep_hours = 2160
records_keep_days = 30

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
"""
    )

    def command(line: str) -> Callable[[], Any]:
        args = ["--config", str(config), *line.replace("{work}", str(work)).split()]

        def run() -> int:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = main(args)
                finally:
                    close_audit()  # the trail a command opened, as its process's exit would
            if code not in (0, 1):  # 1: a monitoring verdict (a shifted signal, a failure)
                raise RuntimeError(f"acwi-node {line}: exit {code}: {out.getvalue()}")
            return code

        return run

    return {name: command(line) for name, line in COMMANDS.items()}


def best_ms(fn: Callable[[], Any], rounds: int = 3) -> float:
    fn()  # warm: caches, the first connection
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def run(url: str, studies: int, images: int, work: Path, *, cli: bool = True) -> dict[str, Any]:
    filled = fill(url, studies, images)
    timed = {name: best_ms(fn) for name, fn in views(url, work / "data").items()}
    cli_ms = {name: best_ms(fn) for name, fn in commands(url, work).items()} if cli else {}
    return {"fill_s": filled, "ms": timed, "cli_ms": cli_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--studies", default="20000,100000", help="ledger sizes, comma-separated: one run each"
    )
    parser.add_argument(
        "--images", type=int, default=2, help="instances (and summary images) per study"
    )
    parser.add_argument("--postgres", help="a PostgreSQL server's URL: a database is made there")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--no-cli", action="store_true", help="leave out the acwi-node commands' timings"
    )
    args = parser.parse_args(argv)
    cli = not args.no_cli
    sizes = [int(n) for n in str(args.studies).split(",") if n]
    runs: dict[str, dict[str, Any]] = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="acwi-bench-ledger-") as tmp:
            work = Path(tmp)
            url = f"sqlite:///{work / 'ledger.sqlite'}"
            runs[f"SQLite, {size:,}"] = run(url, size, args.images, work, cli=cli)
            if args.postgres:
                name = f"acwi_bench_{uuid.uuid4().hex[:8]}"
                admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
                with admin.connect() as c:
                    c.execute(text(f'CREATE DATABASE "{name}"'))
                try:
                    url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
                    runs[f"PostgreSQL, {size:,}"] = run(url, size, args.images, work, cli=cli)
                finally:
                    with admin.connect() as c:
                        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    admin.dispose()
    names = list(next(iter(runs.values()))["ms"])
    header = ["view"] + [f"{key} studies, ms" for key in runs]
    rows = [[name] + [f"{r['ms'][name]:.1f}" for r in runs.values()] for name in names]
    print(f"studies of {args.images} image(s), 1,000 a day; filled in " + ", ".join(
        f"{key}: {r['fill_s']:.0f} s" for key, r in runs.items()
    ))  # fmt: skip
    print(markdown_table(header, rows))
    if cli:
        header = ["acwi-node command"] + [f"{key} studies, ms" for key in runs]
        rows = [[name] + [f"{r['cli_ms'][name]:.1f}" for r in runs.values()] for name in COMMANDS]
        print()
        print(markdown_table(header, rows))
    write_json(
        args.json,
        {"machine": machine(), "sizes": sizes, "images": args.images, "runs": runs},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
