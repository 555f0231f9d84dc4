"""``acwi-node``: one entry point per process kind, and ``serve`` to run them all on one box.

acwi-node serve       scp + worker + exporter + web as supervised child processes
acwi-node scp         storage SCP, study completion, routing and the reconciler
acwi-node worker      a Celery worker running the analyse task
acwi-node exporter    sends results from the outbox by C-STORE
acwi-node web         the HTTP API
acwi-node hl7         HL7 v2 with the RIS: MLLP order listener and ORU^R01 results sender
acwi-node status      the ledger's view of every study
acwi-node config      validate the configuration and print it as JSON
acwi-node users       web app accounts: add, passwd, list, disable, enable
acwi-node feedback    export reviewed cases as a labelled dataset
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from acwi_node import __version__
from acwi_node.config import ConfigError, Settings, load_settings, processes_per_core
from acwi_node.export.destination_commands import (
    add_destination_parsers,
    run_destinations_retry,
    run_destinations_status,
)
from acwi_node.export.withdrawal_commands import add_recall_parser, add_withdraw_parser
from acwi_node.ingest.retrieval_commands import add_parsers as add_retrieval_commands
from acwi_node.ingest.retrieval_commands import add_sources_parser
from acwi_node.monitoring.commands import COMMAND as MONITOR_COMMAND
from acwi_node.monitoring.commands import add_parser as add_monitor_command
from acwi_node.review.commands import COMMANDS as REVIEW_COMMANDS
from acwi_node.review.commands import add_parsers as add_review_commands
from acwi_node.review.commands import run as run_review_command
from acwi_node.tcp import host_port, listening_socket

log = logging.getLogger("acwi_node")

PROCESS_KINDS = ("scp", "worker", "exporter", "web")
#: Commands that write no audit records: they change nothing (``serve``'s processes audit
#: on their own).
UNAUDITED_COMMANDS = ("health", "status", "config", "serve", "destinations", "routes", "notify")


def setup_logging(settings: Settings, kind: str = "cli") -> None:
    """Text or JSON log lines with process kind, study and job ids; no patient identifiers."""
    from acwi_node.observability.logging import setup_logging as setup

    setup(settings, kind)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def freeze_startup_heap() -> int:
    """Collect the garbage, then move every object the process holds into the permanent
    generation (``gc.freeze``); returns how many.

    A storage SCP process holds about 120,000 objects once started (pydicom's data dictionary,
    pynetdicom, SQLAlchemy, the settings), and a full collection walks all of them: about 55
    ms with the interpreter lock held, during which no association is served. pynetdicom's
    server makes one every 60 turns of its accept loop (every 30 s when idle, and after every
    60 associations). Frozen, those objects are skipped, and a full collection walks only
    what the process made since (under 1 ms after 2,000 instances). They are still freed by
    reference counting; only a cycle among them, should one become garbage, is never
    collected."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("start-up heap frozen: %d objects that garbage collections skip", frozen)
    return frozen


# ---------------------------------------------------------------------- process kinds
#: What binding a listening socket raises for a host or port the settings name wrongly: the
#: port taken, a port below 1024 without the privilege, an address not of this machine.
_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})

#: Permissions no file or directory the node creates gives to users outside its own user and
#: group (the umask bits :func:`private_umask` adds).
OTHERS = 0o007


def private_umask() -> int:
    """Add "others" (:data:`OTHERS`) to the process's umask, keep what it takes from the group,
    and return the umask in force.

    What the node writes holds patient data and credentials: the ledger (an HL7 order's
    patient name, ID and birth date, the ORU^R01 texts, the accounts' password hashes), the
    spool, results, broker messages, feedback exports. SQLite, the broker and the exports
    create their files with the umask's modes, and the usual 022 made them readable by every
    user of the host. With 022 the node's files are 0640 and its directories 0750 (its group
    may read them: processes of the node running as other users of that group); with 002 or
    007 its group may also write its directories and the broker's messages (files the node
    creates with a mode of its own stay 0640); 077 stays 077. Set before any file is opened,
    and inherited by the processes ``serve`` starts."""
    current = os.umask(OTHERS)
    os.umask(current | OTHERS)
    return current | OTHERS


def run_scp(settings: Settings, config: Path | None = None) -> int:
    """The storage SCP and the completion loop; with ``ingest.processes`` > 1, the loop here
    and the SCP in listener processes sharing the port (:mod:`acwi_node.ingest.listeners`)."""
    from acwi_node.ingest.listeners import inherited_listener, listener_count

    inherited = inherited_listener()
    if inherited is not None:
        return _run_scp_listener(settings, inherited)
    listeners = listener_count(settings)
    shared_metrics = None
    if listeners > 1:
        from acwi_node.observability.multiproc import enable_multiprocess

        # The listeners' metrics, added up by this process's /metrics (before the modules
        # below load prometheus_client).
        shared_metrics = enable_multiprocess(settings, "scp")
    from acwi_node.ingest.completion import CompletionService
    from acwi_node.ingest.mpps import CompletionSignals
    from acwi_node.ingest.retrieval import RetrievalService
    from acwi_node.ingest.scp import StorageSCP, skip_pydicom_value_checks
    from acwi_node.ingest.spool import Spool
    from acwi_node.ledger import Ledger
    from acwi_node.tasks.app import configure
    from acwi_node.tasks.queue import reconcile

    skip_pydicom_value_checks()
    ledger = Ledger(settings.ledger_url)
    spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
    removed = spool.clean_tmp()  # before any listener writes there
    if removed:
        log.info("removed %d partial file(s) left by an earlier crash", removed)
    celery = configure(settings, register_tasks=False)
    signals = CompletionSignals(ledger)
    completion = CompletionService(settings, ledger, celery, signals=signals)
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
    # Retrievals from a source PACS: C-MOVEs to this process's own storage SCP.
    retrieval = RetrievalService(settings, ledger, signals)
    retrieval.start()
    scp: Any
    try:
        if listeners > 1:
            from acwi_node.ingest.listeners import ListenerProcesses, bind_listener

            env = dict(os.environ)
            if config is not None:
                env["ACWI_CONFIG"] = str(config.resolve())
            env["ACWI_NODE__DATA_DIR"] = str(settings.data_dir)
            scp = ListenerProcesses(
                bind_listener(settings.node.dicom_host, settings.node.dicom_port), listeners, env
            )
        else:
            scp = StorageSCP(settings, ledger, spool, signals=signals)
        freeze_startup_heap()  # before the first association: it pauses the process once
        scp.start()
    except OSError as exc:
        if exc.errno not in _BIND_ERRORS:
            raise
        print(
            f"acwi-node: cannot listen on node.dicom_host {settings.node.dicom_host!r} port"
            f" {settings.node.dicom_port} (node.dicom_port): {exc.strerror}",
            file=sys.stderr,
        )
        retrieval.stop()
        completion.stop()
        return 2
    if listeners > 1 and not scp.wait_ready():
        log.warning("not every scp listener accepts connections yet; going on")
    from acwi_node.observability.health import scp_readiness, start_ops_server_safely

    ops = start_ops_server_safely(settings, scp_readiness(settings, ledger, scp, completion))
    log.info("ready")
    while not stop.wait(0.5):
        if listeners > 1:
            scp.supervise()
    if ops is not None:
        ops.stop()
    retrieval.stop()
    scp.stop()
    completion.stop()
    if shared_metrics is not None:
        from acwi_node.observability.multiproc import disable_multiprocess

        disable_multiprocess(shared_metrics)
    return 0


def _run_scp_listener(settings: Settings, sock: socket.socket) -> int:
    """One of several SCP processes accepting on the socket their parent listens on."""
    from acwi_node.ingest.mpps import CompletionSignals
    from acwi_node.ingest.scp import StorageSCP, skip_pydicom_value_checks
    from acwi_node.ingest.spool import Spool
    from acwi_node.ledger import Ledger

    skip_pydicom_value_checks()
    ledger = Ledger(settings.ledger_url)
    spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
    scp = StorageSCP(settings, ledger, spool, signals=CompletionSignals(ledger))
    from acwi_node.ingest.listeners import announce_ready, parent_gone

    stop = threading.Event()
    _stop_on_signals(stop)
    # The parent's process id came in the environment: one that died while this process was
    # starting is noticed too (the parent process id read now would already be init's, and
    # this listener would hold the DICOM port for good, so that no new scp could bind it).
    if parent_gone():
        log.error("scp listener: the parent process exited while it started; stopping")
        ledger.dispose()
        return 0
    freeze_startup_heap()
    scp.start(listen_socket=sock)
    announce_ready()
    while not stop.wait(1.0):
        if parent_gone():  # the scp process is gone: so is its socket's owner
            log.error("scp listener: the parent process exited; stopping")
            break
    scp.stop()
    ledger.dispose()
    return 0


def run_worker(settings: Settings) -> int:
    from acwi_node.observability.health import (
        ModelPreload,
        start_ops_server_safely,
        worker_readiness,
    )
    from acwi_node.observability.multiproc import disable_multiprocess, enable_multiprocess

    concurrency = settings.worker.concurrency
    # A prefork pool analyses in child processes: count their metrics too (before any import
    # of prometheus_client, which the task module brings).
    shared_metrics = (
        enable_multiprocess(settings)
        if concurrency > 1 and settings.observability.worker_port
        else None
    )
    from acwi_node.tasks import analyse
    from acwi_node.tasks.app import configure, worker_queues

    # a loaded model's heap is frozen: a study's full collections skip it (freeze_worker_heap)
    analyse.FREEZE_HEAP_AFTER_LOAD = True
    celery = configure(settings)
    # solo pool: load the models now; prefork: verify them only (no fork after loading torch).
    preload = ModelPreload(settings, load=concurrency == 1)
    start_ops_server_safely(settings, worker_readiness(settings, preload))
    preload.run()
    argv = [
        "worker",
        f"--loglevel={settings.node.log_level}",
        f"--concurrency={concurrency}",
        f"--pool={'solo' if concurrency == 1 else 'prefork'}",
        f"--queues={','.join(worker_queues(settings))}",  # STAT first, shadow models last
        f"--hostname=acwi-worker-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        celery.worker_main(argv)
    finally:
        disable_multiprocess(shared_metrics)
    return 0


def run_exporter(settings: Settings) -> int:
    from acwi_node.export.outbox import Exporter
    from acwi_node.ledger import Ledger
    from acwi_node.notify import Notifier
    from acwi_node.observability.health import exporter_readiness, start_ops_server_safely
    from acwi_node.retention import Retention

    ledger = Ledger(settings.ledger_url)
    exporter = Exporter(settings, ledger)
    stop = threading.Event()
    _stop_on_signals(stop)
    thread = threading.Thread(target=exporter.run, name="exporter", daemon=True)
    thread.start()
    # Storage retention runs beside the outbox: both keep the data directory in order.
    retention = Retention(settings, ledger)
    retention_thread = threading.Thread(target=retention.run, name="retention", daemon=True)
    retention_thread.start()
    # The [[notify]] webhooks: what needs someone soon, found in the ledger.
    notifier = Notifier(settings, ledger) if settings.notify else None
    notify_thread = None
    if notifier is not None:
        notify_thread = threading.Thread(target=notifier.run, name="notify", daemon=True)
        notify_thread.start()
    ops = start_ops_server_safely(
        settings, exporter_readiness(settings, ledger, exporter, retention)
    )
    log.info("exporter ready")
    stop.wait()
    if ops is not None:
        ops.stop()
    # Every loop told to stop first, then all of them given the same time: the sends under
    # way recorded (exporter.timeout_s + 5 s, what serve, the compose file's stop_grace_period
    # and the unit's TimeoutStopSec allow), not that time plus the others' one after another.
    stops = [exporter.stop, retention.stop] + ([notifier.stop] if notifier is not None else [])
    threads = [thread, retention_thread] + ([notify_thread] if notify_thread is not None else [])
    stop_and_join(stops, threads, exporter.stop_wait_s())
    return 0


def stop_and_join(
    stops: Sequence[Callable[[], None]], threads: Sequence[threading.Thread], wait_s: float
) -> list[threading.Thread]:
    """Call every one of ``stops``, then wait for ``threads`` to end, all of them within
    ``wait_s`` of the first join (one deadline, not ``wait_s`` each); the threads still
    running then (daemon threads, which the process's exit ends)."""
    for stop in stops:
        stop()
    deadline = time.monotonic() + wait_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    running = [thread for thread in threads if thread.is_alive()]
    if running:
        log.warning(
            "stopping: %s still running after %.0f s",
            ", ".join(thread.name for thread in running),
            wait_s,
        )
    return running


def run_show_studies(settings: Settings, study_uids: Sequence[str], *, as_json: bool) -> int:
    """``acwi-node studies show UID...``: each study's trace; exit 1 if one is unknown."""
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.trace import study_trace

    ledger = Ledger(settings.ledger_url)
    missing = 0
    traces: list[dict[str, Any]] = []
    try:
        for uid in study_uids:
            trace = study_trace(ledger, uid)
            if trace is None:
                missing += 1
                print(f"{uid}: not in the ledger (never received here)", file=sys.stderr)
            elif as_json:
                traces.append(trace.as_json())
            else:
                print(trace.render())
    finally:
        ledger.dispose()
    if as_json:
        print(json.dumps(traces, indent=2))
    return 1 if missing else 0


def run_studies(settings: Settings, action: str, study_uids: Sequence[str]) -> int:
    """``acwi-node studies resend|reprocess UID...``: exit 1 if any study refused."""
    from acwi_node.ledger import Ledger, StudyActionRefused

    ledger = Ledger(settings.ledger_url)
    refused = 0
    try:
        for uid in study_uids:
            try:
                if action == "resend":
                    n = ledger.resend_results(uid)
                    print(f"{uid}: {n} result deliveries back in the outbox")
                else:
                    generation = ledger.reprocess_study(uid)
                    print(f"{uid}: reprocessing as generation {generation}")
            except StudyActionRefused as exc:
                refused += 1
                print(f"{uid}: {exc}", file=sys.stderr)
    finally:
        ledger.dispose()
    return 1 if refused else 0


def run_notify_test(settings: Settings, names: Sequence[str]) -> int:
    """``acwi-node notify test [NAME...]``: POST a test notification (``"event": "test"``) to
    each ``[[notify]]`` webhook, or those named, as the exporter would; print how each went;
    exit 1 if any failed, 2 for a name that is not configured."""
    from acwi_node.notify import post_notification

    known = {t.name: t for t in settings.notify}
    unknown = [n for n in names if n not in known]
    if unknown or not known:
        print(
            f"acwi-node: no [[notify]] named {', '.join(unknown) or '(any)'}"
            f" (configured: {', '.join(known) or 'none'})",
            file=sys.stderr,
        )
        return 2
    failed = 0
    for name in names or list(known):
        outcome = post_notification(
            known[name],
            {
                "event": "test",
                "node": settings.node.ae_title,
                "sender": f"ACWI Node {__version__}",
                "text": f"ACWI Node {settings.node.ae_title}: a test notification to {name}",
            },
        )
        if outcome.delivered:
            print(f"{name}: delivered (HTTP {outcome.status})")
        else:
            failed += 1
            print(f"{name}: FAILED: {outcome.error}")
    return 1 if failed else 0


def run_destinations_check(settings: Settings, names: Sequence[str], *, as_json: bool) -> int:
    """``acwi-node destinations check [NAME...]``: C-ECHO each destination (every one without
    names) with its TLS settings, as the exporter would connect; exit 1 if any fails, 2 for a
    name that is not configured."""
    from acwi_node.export.outbox import verify_destination, what_it_checks

    known = {d.name: d for d in settings.destinations}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(
            f"acwi-node: no destination named {', '.join(unknown)}"
            f" (configured: {', '.join(known) or 'none'})",
            file=sys.stderr,
        )
        return 2
    # each named once, however often it is given
    chosen = [known[n] for n in dict.fromkeys(names)] if names else list(settings.destinations)
    # Each failure is printed with its reason below: pynetdicom's own lines would repeat it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    # Together: a destination that never answers costs exporter.timeout_s, once, not per row.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(chosen)))) as pool:
        results = list(pool.map(lambda dest: verify_destination(settings, dest), chosen))
    rows: list[dict[str, Any]] = []
    for dest, result in zip(chosen, results, strict=True):
        rows.append(
            {
                "name": dest.name,
                "kind": dest.kind,
                "ae_title": dest.ae_title,
                "host": dest.host,
                "port": dest.port,
                "url": dest.url,
                "tls": dest.tls is not None,
                "ok": result.ok,
                "elapsed_ms": round(result.elapsed_ms, 1),
                "error": result.error,
            }
        )
        if not as_json:
            verdict = f"ok, {result.elapsed_ms:.0f} ms" if result.ok else f"FAILED: {result.error}"
            print(f"{dest.name}  {dest.where}  {what_it_checks(dest)} {verdict}")
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no destinations configured ([[destinations]])")
    return 0 if all(r["ok"] for r in rows) else 1


def run_check(settings: Settings, *, as_json: bool) -> int:
    """``acwi-node check``: where the ledger and the data directory disagree; exit 1 if they
    do anywhere."""
    from acwi_node.ledger import Ledger
    from acwi_node.retention.check import check

    ledger = Ledger(settings.ledger_url)
    try:
        report = check(settings, ledger)
    finally:
        ledger.dispose()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.agrees else 1
    lines = (
        ("spool folders of studies the ledger has no row of", report.spool_without_study),
        ("results folders of studies the ledger has no row of", report.results_without_study),
        ("instance rows whose spool file is gone", report.instances_without_file),
        ("result rows whose file is gone", report.results_without_file),
        ("files left in studies retention purged", report.files_of_purged_studies),
    )
    for title, finding in lines:
        owed = ""
        if finding is report.results_without_file and finding.studies:
            owed = f", {report.owed_results_without_file} still owed to a destination"
        print(
            f"{title}: {finding.studies} studies, {finding.files} files"
            + (f" ({finding.bytes / 1e6:.1f} MB)" if finding.bytes else "")
            + owed
        )
        for uid in finding.study_uids:
            print(f"  {uid}")
    print("the ledger and the data directory agree" if report.agrees else "they disagree")
    return 0 if report.agrees else 1


def run_retention(settings: Settings, *, dry_run: bool, as_json: bool) -> int:
    """One storage retention sweep now (``acwi-node retention``)."""
    from acwi_node.ledger import Ledger
    from acwi_node.retention import Retention

    ledger = Ledger(settings.ledger_url)
    try:
        report = Retention(settings, ledger).sweep(dry_run=dry_run)
    finally:
        ledger.dispose()
    if as_json:
        print(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "studies": report.studies,
                    "by_reason": dict(report.by_reason),
                    "files": report.files,
                    "bytes": report.bytes,
                    "planned": [{"study_uid": u, "reason": r} for u, r in report.planned],
                    "free_percent": report.free_percent,
                    "short_of_space": report.short_of_space,
                    "records": {
                        "studies": report.compacted,
                        "instance_rows": report.instance_rows,
                        "orders_erased": report.orders_erased,
                        "messages_erased": report.messages_erased,
                        "inbound_deleted": report.inbound_deleted,
                        "planned": report.planned_compactions,
                    },
                },
                indent=2,
            )
        )
        return 0
    reasons = ", ".join(f"{n} by {r}" for r, n in sorted(report.by_reason.items()))
    if dry_run:
        print(
            f"would delete the files of {report.studies} studies"
            + (f" ({reasons})" if reasons else "")
            + f": {report.bytes / 1e6:.1f} MB"
        )
        for uid, reason in report.planned:
            print(f"  {uid}  {reason}")
    else:
        print(
            f"deleted the files of {report.studies} studies"
            + (f" ({reasons})" if reasons else "")
            + f": {report.files} files, {report.bytes / 1e6:.1f} MB"
        )
    if dry_run and settings.retention.records_keep_days:
        print(
            f"would compact the records of {report.compacted} studies, erase the patient"
            f" identifiers of {report.orders_erased} HL7 orders no study names and delete"
            f" {report.inbound_deleted} inbound HL7 message records"
        )
        for uid in report.planned_compactions:
            print(f"  {uid}  records")
    elif report.compacted or report.orders_erased or report.inbound_deleted:
        print(
            f"compacted the records of {report.compacted} studies ({report.instance_rows}"
            f" instance rows); erased the patient identifiers of {report.orders_erased} HL7"
            f" orders and {report.messages_erased} ORU^R01 messages; deleted"
            f" {report.inbound_deleted} inbound HL7 message records"
        )
    if report.free_percent is not None:
        print(f"free space: {report.free_percent:.1f}%")
    if report.short_of_space:
        print(
            "free space is below retention.min_free_percent and no finished study is left"
            " to delete",
            file=sys.stderr,
        )
    return 0


#: The TLS 1.2 cipher suites the web port offers (no TLS 1.0 or 1.1 suite is among them).
HTTPS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def web_processes(settings: Settings, cores: int | None = None) -> int:
    """Processes ``acwi-node web`` runs: ``node.http_workers``, or when it is 0 one per core
    (``cores``: the machine's), at most :data:`~acwi_node.config.MAX_AUTO_PROCESSES` (as the
    storage SCP's listeners): each holds a ledger connection pool of its own, and a 64-core
    host made 64 of them."""
    return processes_per_core(settings.node.http_workers, cores)


def forwarded_allow_ips(settings: Settings) -> list[str]:
    """uvicorn's ``forwarded_allow_ips`` for ``node.http_trusted_proxies``: each IPv4 entry
    also as the IPv6 peer address a dual-stack socket (``http_host = "::"``) gives an IPv4
    client (``::ffff:10.0.0.5``), which uvicorn compares as a different address."""
    import ipaddress

    trusted = settings.node.http_trusted_proxies
    if trusted == ["*"]:
        return trusted
    allowed: list[str] = []
    for entry in trusted:
        allowed.append(entry)
        network = ipaddress.ip_network(entry)
        if network.version == 4:
            mapped = ipaddress.IPv6Address(f"::ffff:{network.network_address}")
            if network.prefixlen == 32:
                allowed.append(str(mapped))
            else:
                allowed.append(f"{mapped}/{96 + network.prefixlen}")
    return allowed


def run_web(settings: Settings, config: Path | None = None) -> int:
    """The web app, in this process or, with ``node.http_workers`` > 1 (0: one per core, at
    most 8), in that many processes sharing the port (uvicorn's workers), whose metrics
    ``/metrics`` adds up (prometheus_client's multiprocess mode)."""
    import uvicorn

    workers = web_processes(settings)
    options: dict[str, Any] = {
        "host": settings.node.http_host,
        "port": settings.node.http_port,
        "log_level": settings.node.log_level.lower(),
        "access_log": False,
        # The client's address and the scheme from X-Forwarded-For and X-Forwarded-Proto, from
        # the trusted proxies alone (given here: FORWARDED_ALLOW_IPS would widen uvicorn's own).
        "proxy_headers": bool(settings.node.http_trusted_proxies),
        "forwarded_allow_ips": forwarded_allow_ips(settings),
        # The path a reverse proxy publishes the app under, which it strips from the requests
        # it passes on: the app's links, redirects and cookie paths carry it again.
        "root_path": settings.node.http_root_path,
    }
    tls = settings.node.http_tls
    if tls.enabled:
        assert tls.cert_file is not None and tls.key_file is not None
        options |= {
            "ssl_certfile": str(tls.cert_file.expanduser()),
            "ssl_keyfile": str(tls.key_file.expanduser()),
            # Forward-secret AEAD suites only: TLS 1.2 and 1.3 (1.3's suites are not set here).
            "ssl_ciphers": HTTPS_CIPHERS,
        }
    # uvicorn handles SIGTERM/SIGINT itself and, once shut down, raises the signal again for
    # the handler it found: with this one in place the process returns here (and writes its
    # stop record) instead of being killed by the default handler.
    _stop_on_signals(threading.Event())
    if workers <= 1:
        from acwi_node.web.api import create_app

        # bound as every listener of the node: ``::`` takes IPv4 connections too (uvicorn's own
        # binding of one process made it IPv6 only), a host name its first address
        try:
            sock = listening_socket(settings.node.http_host, settings.node.http_port)
        except OSError as exc:
            print(
                f"acwi-node: cannot listen on node.http_host {settings.node.http_host!r} port"
                f" {settings.node.http_port} (node.http_port): {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        server = uvicorn.Server(uvicorn.Config(create_app(settings), **options))
        server.run(sockets=[sock])
        return 0 if server.started else 3  # as uvicorn.run: the app did not start
    from acwi_node.observability.multiproc import disable_multiprocess, enable_multiprocess

    # Before anything loads prometheus_client; the workers inherit the folder, and the file
    # and data folder this process was started with (the command line's --config).
    shared_metrics = enable_multiprocess(settings, "web")
    if config is not None:
        os.environ["ACWI_CONFIG"] = str(config.resolve())
    os.environ["ACWI_NODE__DATA_DIR"] = str(settings.data_dir.resolve())
    try:
        uvicorn.run("acwi_node.web.api:app_in_worker", factory=True, workers=workers, **options)
    finally:
        disable_multiprocess(shared_metrics)
    return 0


def run_hl7(settings: Settings) -> int:
    """The order listener (``[hl7] listen_port``) and the ORU sender (``[hl7.ris]``)."""
    from acwi_node.hl7.client import OruSender
    from acwi_node.hl7.listener import MllpListener
    from acwi_node.ledger import Ledger

    cfg = settings.hl7
    if not cfg.enabled:
        log.error("hl7: nothing to do: set [hl7] listen_port and/or [hl7.ris]")
        return 2
    ledger = Ledger(settings.ledger_url)
    stop = threading.Event()
    _stop_on_signals(stop)
    listener = MllpListener(settings, ledger).start() if cfg.listen_port else None
    sender = OruSender(settings, ledger) if cfg.ris is not None else None
    thread = None
    if sender is not None:
        thread = threading.Thread(target=sender.run, name="oru-sender", daemon=True)
        thread.start()
    log.info("hl7 ready")
    stop.wait()
    if listener is not None:
        listener.stop()
    if sender is not None and thread is not None:
        sender.stop()
        thread.join(timeout=HL7_STOP_WAIT_S)
    return 0


#: How long the ``hl7`` process waits, once stopped, for the ORU^R01 being sent to be answered.
HL7_STOP_WAIT_S = 30.0
#: The least time ``serve`` gives its processes to stop before it kills them.
SERVE_STOP_WAIT_S = 20.0


def serve_stop_wait_s(settings: Settings) -> float:
    """How long ``serve`` waits, once stopped, for its processes to exit before it kills them:
    20 s, or what the exporter needs to see the answers of the sends under way
    (``exporter.timeout_s`` + 5 s), or the ``hl7`` process the RIS's answer to an ORU^R01
    being sent (30 s), whichever is longer. A container or unit running ``serve`` must allow
    more than this before it kills ``serve`` itself."""
    from acwi_node.export.outbox import STOP_WAIT_S

    wait = max(SERVE_STOP_WAIT_S, settings.exporter.timeout_s + STOP_WAIT_S)
    if settings.hl7.enabled:
        wait = max(wait, HL7_STOP_WAIT_S)
    return wait


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

    # A ledger this version cannot upgrade stops everything now, rather than every child in
    # turn, restarted forever; a database not up yet is left to the children, which retry.
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.repository import LedgerSchemaError

    try:
        Ledger(settings.ledger_url).dispose()
    except LedgerSchemaError:
        raise
    except Exception as exc:
        log.warning("the ledger is not reachable yet (%s); starting anyway", type(exc).__name__)

    kinds = [*PROCESS_KINDS, "hl7"] if settings.hl7.enabled else list(PROCESS_KINDS)
    children = {kind: spawn(kind) for kind in kinds}
    restarts = dict.fromkeys(kinds, 0)
    log.info(
        "ACWI Node %s serving: DICOM %s@%s, HTTP %s://%s, data %s",
        __version__,
        settings.node.ae_title,
        host_port(settings.node.dicom_host, settings.node.dicom_port),
        "https" if settings.node.http_tls.enabled else "http",
        host_port(settings.node.http_host, settings.node.http_port),
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
    deadline = time.monotonic() + serve_stop_wait_s(settings)
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


def run_status(settings: Settings, as_json: bool) -> int:
    from acwi_node.ledger import Ledger

    studies = Ledger(settings.ledger_url).list_studies(limit=1000)
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
        if st.get("images_deleted_at"):
            detail = f"{detail} (files deleted {st['images_deleted_at'][:16]})".strip()
        print(
            f"{st['study_uid']:<64}  {st['state']:<10} {'yes' if st['needs_review'] else '-':<6} "
            f"{st['instances']:>4}  "
            f"{st['modality']:<8} {detail}"
        )
    return 0


def run_engines(settings: Settings, args: argparse.Namespace) -> int:
    """``acwi-node models engines``: which engines and precisions can run here, and what the
    worker's settings pick; exit 1 when they cannot run."""
    from acwi_node.inference.engines.availability import availability, render

    worker = settings.worker
    report = availability(args.device or worker.device, worker.engine, worker.precision)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(render(report, worker.cuda_graphs))
    return 0 if report.chosen is not None else 1


def run_models(settings: Settings, args: argparse.Namespace) -> int:
    """``acwi-node models list|install|activate``: the model registry in ``<data_dir>/models``."""
    from acwi_node.audit import AuditEvent, audit
    from acwi_node.model_registry import ModelRegistry, RegistryError

    if args.models_command == "engines":
        return run_engines(settings, args)
    if args.models_command == "recall":
        from acwi_node.export.withdrawal_commands import run_recall

        return run_recall(settings, args)
    from acwi_node.ledger import Ledger
    from acwi_node.ledger.model_versions import ModelVersions

    ledger = Ledger(settings.ledger_url) if args.models_command in ("install", "activate") else None
    # installing or activating a version the workers know as other weights is refused
    versions = ModelVersions(ledger) if ledger is not None else None
    registry = ModelRegistry(settings.models_dir, versions=versions)
    try:
        if args.models_command == "install":
            model = registry.install(args.source, name=args.name, activate=args.activate)
            state = (
                "active"
                if model.active
                else f"activate with: acwi-node models activate {model.name} {model.version}"
            )
            print(f"installed {model.name} {model.version} sha256 {model.weights_sha256}; {state}")
            audit(
                AuditEvent.CONFIGURATION_CHANGED,
                detail=f"model {model.name} {model.version} installed"
                + (" and activated" if model.active else ""),
            )
            return 0
        if args.models_command == "activate":
            model = registry.activate(args.name, args.version)
            audit(
                AuditEvent.CONFIGURATION_CHANGED,
                detail=f"model {model.name} {model.version} activated",
            )
            print(
                f"{model.name}: version {model.version} is active"
                " (workers use it from their next task)"
            )
            return 0
    except RegistryError as exc:
        print(f"acwi-node models: {exc}", file=sys.stderr)
        return 1
    finally:
        if ledger is not None:
            ledger.dispose()
    installed = registry.installed()
    if args.json:
        rows = [
            {
                "name": m.name,
                "version": m.version,
                "weights_sha256": m.weights_sha256,
                "active": m.active,
                "path": str(m.path),
                "refused": m.refused,
                "warning": m.warning,
            }
            for m in installed
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not installed:
        print(f"no models installed in {registry.root}")
        return 0
    print(f"{'NAME':<24} {'VERSION':<16} {'ACTIVE':<6} WEIGHTS SHA-256")
    for m in installed:
        print(f"{m.name:<24} {m.version:<16} {'yes' if m.active else '-':<6} {m.weights_sha256}")
    for m in installed:
        if m.refused:
            print(f"{m.name} {m.version} does not load in this version: {m.refused}")
        elif m.warning:
            print(f"warning: {m.name} {m.version} {m.warning}")
    return 0


def run_routes_check(settings: Settings, args: argparse.Namespace) -> int:
    """``acwi-node routes check PATH...``: 0 when every study found would be analysed."""
    from acwi_node.routing.check import check, format_report
    from acwi_node.routing.rules import hospital_today

    today = args.date or hospital_today(settings.monitoring.timezone)
    report = check(settings, args.paths, calling_ae=args.calling_ae, today=today)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report), end="")
    studies = [s for s in report.studies if s.instances]
    return 0 if studies and all(s.analysed for s in studies) else 1


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
    sub.add_parser("hl7", help="HL7 v2 with the RIS: order listener and ORU^R01 sender")
    status = sub.add_parser("status", help="show every study's state")
    status.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("config", help="validate the configuration and print it")
    studies = sub.add_parser(
        "studies",
        help="a study's trace, and operator actions on studies: resend, reprocess, withdraw"
        " results, retrieve from a PACS",
    )
    studies_sub = studies.add_subparsers(dest="studies_command", required=True)
    show = studies_sub.add_parser(
        "show",
        help="what happened to each study, step by step: received, completed, routed,"
        " analysed, delivered, reviewed (exit 1 if one is not in the ledger)",
    )
    show.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    show.add_argument("--json", action="store_true", help="print JSON")
    resend = studies_sub.add_parser(
        "resend", help="send the studies' results to their destinations again"
    )
    resend.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    reprocess = studies_sub.add_parser(
        "reprocess", help="route and analyse the studies again (a new generation)"
    )
    reprocess.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    add_withdraw_parser(studies_sub)
    add_retrieval_commands(studies_sub)
    add_sources_parser(sub)
    routes = sub.add_parser("routes", help="what the routes would do with studies on disk")
    routes_sub = routes.add_subparsers(dest="routes_command", required=True)
    routes_check = routes_sub.add_parser(
        "check",
        help="read DICOM files (or folders) and show, per study, which routes match, why the"
        " others do not, and which images each route's model reads; exit 1 if a study would"
        " not be analysed",
    )
    routes_check.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    routes_check.add_argument(
        "--calling-ae", default="", help="the sender's AE title (routes' match.calling_ae)"
    )
    routes_check.add_argument(
        "--date",
        type=dt.date.fromisoformat,
        default=None,
        help="the day the study completes, YYYY-MM-DD (match.max_age_days; default today on the"
        " hospital's clock, monitoring.timezone)",
    )
    routes_check.add_argument("--json", action="store_true", help="print JSON")
    destinations = sub.add_parser("destinations", help="the DICOM destinations of results")
    destinations_sub = destinations.add_subparsers(dest="destinations_command", required=True)
    check = destinations_sub.add_parser(
        "check", help="C-ECHO the destinations (all, or those named); exit 1 if any fails"
    )
    check.add_argument("names", nargs="*", metavar="NAME")
    check.add_argument("--json", action="store_true", help="print JSON")
    add_destination_parsers(destinations_sub)  # status, retry
    notify = sub.add_parser("notify", help="the [[notify]] webhooks")
    notify_sub = notify.add_subparsers(dest="notify_command", required=True)
    notify_test = notify_sub.add_parser(
        "test",
        help="POST a test notification to the webhooks (all, or those named); exit 1 if any fails",
    )
    notify_test.add_argument("names", nargs="*", metavar="NAME")
    retention = sub.add_parser(
        "retention", help="delete finished studies' files now, as the [retention] policy says"
    )
    retention.add_argument(
        "--dry-run", action="store_true", help="list the studies, delete nothing"
    )
    retention.add_argument("--json", action="store_true", help="print JSON")
    disagreements = sub.add_parser(
        "check",
        help="where the ledger and the data directory disagree (after a restore); read-only",
    )
    disagreements.add_argument("--json", action="store_true", help="print JSON")
    health = sub.add_parser(
        "health", help="query a process kind's health endpoint (exit 0 when ready)"
    )
    health.add_argument(
        "--kind", choices=[*PROCESS_KINDS, "serve"], default="web", help="process kind"
    )
    health.add_argument("--live", action="store_true", help="liveness (/healthz) only")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    models = sub.add_parser(
        "models",
        help="installed models: list, install, activate, recall a version's results; engines"
        " that can run them",
    )
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_list = models_sub.add_parser("list", help="installed models and the active versions")
    models_list.add_argument("--json", action="store_true", help="print JSON")
    models_install = models_sub.add_parser(
        "install", help="copy a model (folder or manifest.json) into the registry"
    )
    models_install.add_argument("source", type=Path, help="model folder or its manifest.json")
    models_install.add_argument(
        "--activate", action="store_true", help="also make it the active version"
    )
    models_install.add_argument(
        "--name", default=None, help="model name routes use (default: the manifest's name)"
    )
    models_activate = models_sub.add_parser(
        "activate", help="make VERSION the one routes using model NAME run"
    )
    models_activate.add_argument("name")
    models_activate.add_argument("version")
    models_engines = models_sub.add_parser(
        "engines",
        help="inference engines and precisions that can run here, and what the worker picks",
    )
    models_engines.add_argument(
        "--device", default=None, help="cpu or cuda[:N] (default: worker.device)"
    )
    models_engines.add_argument("--json", action="store_true", help="print JSON")
    add_recall_parser(models_sub)
    add_review_commands(sub)  # users, feedback (acwi_node/review/commands.py)
    add_monitor_command(sub)  # monitor (acwi_node/monitoring/commands.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of what a command prints went away (``acwi-node studies list | head``):
        # nothing more to say, and no traceback. Standard output is pointed at /dev/null, so
        # that the interpreter's own flush at exit does not fail in turn. Any other broken
        # pipe (a socket) is an error as before.
        if not _stdout_is_broken():
            raise
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _stdout_is_broken() -> bool:
    """Whether standard output's reader is gone: polled, a pipe without readers (or a closed
    socket) reports an error or a hang-up."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def _main(argv: Sequence[str] | None) -> int:
    private_umask()
    args = build_parser().parse_args(argv)
    config: Path | None = args.config
    if config is None and os.environ.get("ACWI_CONFIG"):
        config = Path(os.environ["ACWI_CONFIG"])
    try:
        # A route may name the model an ``acwi-node models`` command is about to install.
        settings = load_settings(config, route_models_known=args.command != "models")
    except ConfigError as exc:
        print(f"acwi-node: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings, args.command)
    if args.command == "health":
        # The containers' healthcheck, run every 30 s: it opens no ledger, so it loads neither
        # SQLAlchemy nor the ledger's models (tests/unit/test_cli_health_imports.py).
        return _dispatch(settings, config, args)
    from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

    from acwi_node.ledger.repository import LedgerSchemaError

    try:
        return _dispatch(settings, config, args)
    except LedgerSchemaError as exc:
        print(f"acwi-node: {exc}", file=sys.stderr)
        return 2
    except (OperationalError, InterfaceError, ArgumentError) as exc:
        print(f"acwi-node: {ledger_error(settings.database_url, exc)}", file=sys.stderr)
        return 2


def ledger_error(url: str, exc: Exception) -> str:
    """One line on a ledger that cannot be opened or used: its URL without the password and
    the database driver's first line (the server down, an unknown role or database)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:
        shown = "node.database_url"
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    reason = lines[0] if lines else type(cause).__name__
    return f"cannot use the ledger {shown}: {reason}"


def _dispatch(settings: Settings, config: Path | None, args: argparse.Namespace) -> int:
    """Run the command ``args`` names."""
    if args.command not in UNAUDITED_COMMANDS or (
        args.command == "destinations" and args.destinations_command == "retry"
    ):
        from acwi_node.audit import configure_audit

        configure_audit(settings, args.command)
    if args.command == "health":
        from acwi_node.observability.probe import probe

        return probe(settings, args.kind, live=args.live, timeout_s=args.timeout)
    if args.command == "models":
        return run_models(settings, args)
    if args.command in REVIEW_COMMANDS:
        return run_review_command(settings, args)
    if args.command == MONITOR_COMMAND:
        from acwi_node.monitoring.commands import run as run_monitor_command

        return run_monitor_command(settings, args)
    if args.command == "config":
        print(settings.model_dump_json(indent=2))
        return 0
    if args.command == "status":
        return run_status(settings, args.json)
    if args.command == "studies" and args.studies_command in ("retrieve", "retrievals"):
        from acwi_node.ingest.retrieval_commands import run as run_retrieval_command

        return run_retrieval_command(settings, args)
    if args.command == "studies" and args.studies_command == "withdraw":
        from acwi_node.export.withdrawal_commands import run_withdraw

        return run_withdraw(settings, args)
    if args.command == "studies" and args.studies_command == "show":
        return run_show_studies(settings, args.study_uids, as_json=args.json)
    if args.command == "studies":
        return run_studies(settings, args.studies_command, args.study_uids)
    if args.command == "check":
        return run_check(settings, as_json=args.json)
    if args.command == "retention":
        return run_retention(settings, dry_run=args.dry_run, as_json=args.json)
    if args.command == "destinations" and args.destinations_command == "status":
        return run_destinations_status(settings, as_json=args.json)
    if args.command == "destinations" and args.destinations_command == "retry":
        return run_destinations_retry(settings, args)
    if args.command == "destinations":
        return run_destinations_check(settings, args.names, as_json=args.json)
    if args.command == "notify":
        return run_notify_test(settings, args.names)
    if args.command == "sources":
        from acwi_node.ingest.retrieval_commands import run_sources_check

        return run_sources_check(settings, args.names, as_json=args.json)
    if args.command == "routes":
        return run_routes_check(settings, args)
    if args.command == "serve":
        return run_serve(settings, config)
    runner: Callable[[Settings], int] = {
        "scp": lambda s: run_scp(s, config),
        "worker": run_worker,
        "exporter": run_exporter,
        "web": lambda s: run_web(s, config),
        "hl7": run_hl7,
    }[args.command]
    return _run_audited(settings, args.command, runner)


def _run_audited(settings: Settings, kind: str, runner: Callable[[Settings], int]) -> int:
    """Run a process kind between its start and stop audit records."""
    from acwi_node.audit import AuditEvent, Outcome, audit, close_audit, note_configuration

    note_configuration(settings, kind)
    audit(AuditEvent.NODE_STARTED, detail=f"{kind} {__version__}")
    code = 1
    try:
        code = runner(settings)
        return code
    finally:
        audit(
            AuditEvent.NODE_STOPPED,
            outcome=Outcome.SUCCESS if code == 0 else Outcome.SERIOUS_FAILURE,
            detail=f"{kind} exit {code}",
        )
        close_audit()


if __name__ == "__main__":
    sys.exit(main())
