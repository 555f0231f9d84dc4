"""``acwi-node``: one entry point per process kind, and ``serve`` to run them all on one box.

acwi-node serve       scp + worker + exporter + web as supervised child processes
acwi-node scp         storage SCP, study completion, routing and the reconciler
acwi-node worker      a Celery worker running the analyse task
acwi-node exporter    sends results from the outbox by C-STORE
acwi-node web         the HTTP API
acwi-node status      the ledger's view of every study
acwi-node config      validate the configuration and print it as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from acwi_node import __version__
from acwi_node.config import ConfigError, Settings, load_settings

log = logging.getLogger("acwi_node")

PROCESS_KINDS = ("scp", "worker", "exporter", "web")


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.node.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # pynetdicom logs dataset contents at DEBUG and association chatter at INFO.
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if settings.node.log_phi else logging.WARNING
    )


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ---------------------------------------------------------------------- process kinds
def run_scp(settings: Settings) -> int:
    from acwi_node.ingest.completion import CompletionService
    from acwi_node.ingest.scp import StorageSCP
    from acwi_node.ingest.spool import Spool
    from acwi_node.ledger import Ledger
    from acwi_node.tasks.app import configure
    from acwi_node.tasks.queue import reconcile

    ledger = Ledger(settings.database_url)
    spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
    removed = spool.clean_tmp()
    if removed:
        log.info("removed %d partial file(s) left by an earlier crash", removed)
    celery = configure(settings)
    completion = CompletionService(settings, ledger, celery)
    scp = StorageSCP(settings, ledger, spool)
    reconcile(
        celery,
        ledger,
        startup=True,
        requeue_after_s=settings.completion.requeue_after_s,
        lease_s=settings.worker.lease_s,
    )
    stop = threading.Event()
    _stop_on_signals(stop)
    completion.start()
    scp.start(block=False)
    log.info("ready")
    stop.wait()
    scp.stop()
    completion.stop()
    return 0


def run_worker(settings: Settings) -> int:
    from acwi_node.tasks.app import ANALYSIS_QUEUE, configure

    celery = configure(settings)
    concurrency = settings.worker.concurrency
    argv = [
        "worker",
        f"--loglevel={settings.node.log_level}",
        f"--concurrency={concurrency}",
        f"--pool={'solo' if concurrency == 1 else 'prefork'}",
        f"--queues={ANALYSIS_QUEUE}",
        f"--hostname=acwi-worker-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    celery.worker_main(argv)
    return 0


def run_exporter(settings: Settings) -> int:
    from acwi_node.export.outbox import Exporter
    from acwi_node.ledger import Ledger

    exporter = Exporter(settings, Ledger(settings.database_url))
    stop = threading.Event()
    _stop_on_signals(stop)
    thread = threading.Thread(target=exporter.run, name="exporter", daemon=True)
    thread.start()
    log.info("exporter ready")
    stop.wait()
    exporter.stop()
    thread.join(timeout=30)
    return 0


def run_web(settings: Settings) -> int:
    import uvicorn

    from acwi_node.web.api import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.node.http_host,
        port=settings.node.http_port,
        log_level=settings.node.log_level.lower(),
        access_log=False,
    )
    return 0


def run_serve(settings: Settings, config: Path | None) -> int:
    """Run every process kind as a child process; restart one that dies; stop all on a signal."""
    env = dict(os.environ)
    if config is not None:
        env["ACWI_CONFIG"] = str(config.resolve())
    # Children must find the same data directory whatever their working directory.
    env["ACWI_NODE__DATA_DIR"] = str(settings.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    _stop_on_signals(stop)

    def spawn(kind: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "acwi_node.cli", kind], env=env)

    children = {kind: spawn(kind) for kind in PROCESS_KINDS}
    restarts = dict.fromkeys(PROCESS_KINDS, 0)
    log.info(
        "ACWI Node %s serving: DICOM %s@%s:%d, HTTP http://%s:%d, data %s",
        __version__,
        settings.node.ae_title,
        settings.node.dicom_host,
        settings.node.dicom_port,
        settings.node.http_host,
        settings.node.http_port,
        settings.data_dir,
    )
    while not stop.wait(0.5):
        for kind, proc in list(children.items()):
            code = proc.poll()
            if code is None:
                continue
            restarts[kind] += 1
            delay = min(30.0, 0.5 * 2 ** min(restarts[kind], 6))
            log.error("%s exited with %s; restarting in %.1f s", kind, code, delay)
            if stop.wait(delay):
                break
            children[kind] = spawn(kind)
    for proc in children.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 20
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


def run_status(settings: Settings, as_json: bool) -> int:
    from acwi_node.ledger import Ledger

    studies = Ledger(settings.database_url).list_studies(limit=1000)
    if as_json:
        print(json.dumps(studies, indent=2))
        return 0
    if not studies:
        print("no studies yet")
        return 0
    print(
        f"{'STUDY INSTANCE UID':<64}  {'STATE':<10} {'REVIEW':<6} {'INST':>4}  "
        f"{'MODALITY':<8} DETAIL"
    )
    for st in studies:
        detail = st["reason"]
        if not detail and st["jobs"]:
            summary = st["jobs"][-1]["summary"]
            if summary:
                detail = (
                    f"{summary.get('predicted_label')} "
                    f"p={max(summary.get('probabilities', {0: 0}).values()):.2f} "
                    f"u={summary.get('uncertainty', {}).get('score', 0):.2f}"
                )
        print(
            f"{st['study_uid']:<64}  {st['state']:<10} {'yes' if st['needs_review'] else '-':<6} "
            f"{st['instances']:>4}  "
            f"{st['modality']:<8} {detail}"
        )
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acwi-node", description="ACWI Node")
    parser.add_argument("--version", action="version", version=f"acwi-node {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML configuration file (or ACWI_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run scp, worker, exporter and web together")
    sub.add_parser("scp", help="storage SCP with study completion and routing")
    sub.add_parser("worker", help="Celery worker running the analyse task")
    sub.add_parser("exporter", help="send results from the outbox by C-STORE")
    sub.add_parser("web", help="HTTP API")
    status = sub.add_parser("status", help="show every study's state")
    status.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("config", help="validate the configuration and print it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config: Path | None = args.config
    if config is None and os.environ.get("ACWI_CONFIG"):
        config = Path(os.environ["ACWI_CONFIG"])
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"acwi-node: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    if args.command == "config":
        print(settings.model_dump_json(indent=2))
        return 0
    if args.command == "status":
        return run_status(settings, args.json)
    if args.command == "serve":
        return run_serve(settings, config)
    runner = {
        "scp": run_scp,
        "worker": run_worker,
        "exporter": run_exporter,
        "web": run_web,
    }[args.command]
    return runner(settings)


if __name__ == "__main__":
    sys.exit(main())
