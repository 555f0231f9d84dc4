"""Worker throughput: studies per minute for one and two workers; queue overhead per study.

    python -m bench.worker_throughput                    # 30 DX studies, 1 then 2 workers
    python -m bench.worker_throughput --studies 10 --workers 1,2 --json workers.json

For each worker count the node runs as separate processes (``acwi-node scp`` and N
``acwi-node worker``, one task at a time each) with Redis database 9 as the broker and a SQLite
ledger. All studies are sent first (one storescu association each) with the workers stopped;
the workers then start, warm up on one extra study, and drain the queue. Figures come from the
ledger: throughput = analysed studies / (last job finished - first job started, warm-up
excluded); queue overhead = job started_at - study completed_at (job row, Celery message, broker,
worker pick-up, job claim), measured on a warm, idle worker by sending studies one at a time.
Results are not exported (no destination), so only analysis counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    dcmtk_env,
    markdown_table,
    ratio,
    start_node,
    stop_process,
    storescu_cmd,
    summarize,
    wait_port,
    write_json,
)
from bench.turnaround import make_dx
from tests.support.node import write_config
from tests.support.ports import free_port

REDIS_DB9 = "redis://127.0.0.1:6379/9"


def flush_db9() -> None:
    import redis

    redis.Redis.from_url(REDIS_DB9).flushdb()


def config(work: Path, port: int, torch_threads: int) -> Path:
    worker: dict[str, Any] = {"concurrency": 1}
    if torch_threads:
        worker["torch_threads"] = torch_threads
    return write_config(
        work / "acwi-node.toml",
        {
            "node": {
                "ae_title": "ACWI",
                "dicom_host": "127.0.0.1",
                "dicom_port": port,
                "http_port": free_port(),
                "data_dir": str(work / "data"),
                "broker_url": REDIS_DB9,
                "log_level": "WARNING",
            },
            "completion": {"quiet_period_s": 0.2, "poll_interval_s": 0.05},
            "worker": worker,
            "routes": [{"name": "dx", "match": {"modality": ["DX"]}, "model": "default"}],
        },
    )


def _ts(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def jobs(db: Path) -> list[tuple[str, dt.datetime | None, dt.datetime | None, dt.datetime | None]]:
    """(study uid, study completed_at, job started_at, job finished_at) of every job."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute(
            "select s.study_uid, s.completed_at, j.started_at, j.finished_at "
            "from jobs j join studies s on s.id = j.study_id"
        ).fetchall()
    return [(r[0], _ts(r[1]), _ts(r[2]), _ts(r[3])) for r in rows]


def send(port: int, files: list[Path]) -> None:
    done = subprocess.run(
        storescu_cmd(port, files, called="ACWI", calling="MODALITY"),
        env=dcmtk_env(),
        capture_output=True,
        check=False,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stdout.decode()[-2000:]}")


def wait_finished(db: Path, uids: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = {u for u, _, _, f in jobs(db) if f is not None}
        if uids <= finished:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{len(uids - finished)} studies not analysed after {timeout_s} s")


def wait_enqueued(db: Path, uids: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if uids <= {u for u, e, _, _ in jobs(db) if e is not None}:
            return
        time.sleep(0.1)
    raise TimeoutError("studies were not enqueued")


def run(
    n_workers: int, n_studies: int, overhead_n: int, args: argparse.Namespace
) -> dict[str, Any]:
    flush_db9()
    with tempfile.TemporaryDirectory(prefix="acwi-bench-workers-") as tmp:
        work = Path(tmp)
        port = free_port()
        cfg = config(work, port, args.torch_threads)
        db = work / "data" / "ledger.sqlite"
        procs = [start_node(cfg, "scp", work / "scp.log")]
        try:
            wait_port(port, 120)
            warm, warm_uid = make_dx(work / "warm", 10_000)
            send(port, warm)
            studies = [make_dx(work / f"s{i}", i) for i in range(n_studies)]
            for files, _ in studies:
                send(port, files)
            uids = {uid for _, uid in studies}
            wait_enqueued(db, uids | {warm_uid}, 60)
            procs += [start_node(cfg, "worker", work / f"worker{i}.log") for i in range(n_workers)]
            wait_finished(db, uids | {warm_uid}, args.timeout)
            rows = [r for r in jobs(db) if r[0] in uids]
            first = min(r[2] for r in rows if r[2] is not None)
            last = max(r[3] for r in rows if r[3] is not None)
            span = (last - first).total_seconds()
            # Queue overhead on an idle, warm pool: one study at a time.
            overheads: list[float] = []
            for i in range(overhead_n):
                files, uid = make_dx(work / f"o{i}", 20_000 + i)
                send(port, files)
                wait_finished(db, {uid}, 120)
                (row,) = [r for r in jobs(db) if r[0] == uid]
                assert row[1] is not None and row[2] is not None
                overheads.append((row[2] - row[1]).total_seconds())
        finally:
            for proc in procs:
                stop_process(proc)
    flush_db9()
    return {
        "workers": n_workers,
        "studies": n_studies,
        "seconds": span,
        "studies_per_minute": ratio(60.0 * n_studies, span),
        "queue_overhead_s": summarize(overheads) if overheads else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30, help="1-image DX studies per run")
    parser.add_argument("--workers", default="1,2", help="worker process counts")
    parser.add_argument("--overhead-studies", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=0, help="worker.torch_threads")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["TCP_NODELAY"] = "1"

    results = []
    for n in [int(w) for w in args.workers.split(",") if w.strip()]:
        r = run(n, args.studies, args.overhead_studies, args)
        results.append(r)
        print(f"{n} worker(s): {r['studies_per_minute']:.1f} studies/min", flush=True)
    header = ["workers", "studies", "studies/min", "queue overhead p50 ms", "p95 ms"]
    rows = []
    for r in results:
        q = r["queue_overhead_s"] or {"p50": float("nan"), "p95": float("nan")}
        rows.append(
            [r["workers"], r["studies"], r["studies_per_minute"], q["p50"] * 1e3, q["p95"] * 1e3]
        )
    print()
    print(markdown_table(header, rows))
    write_json(
        args.json,
        {"benchmark": "worker_throughput", "args": vars(args) | {"json": None}, "results": results},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
