"""Ingest throughput: DCMTK storescp, Orthanc and the node's SCP receive the same instances.

    python -m bench.ingest                       # 400 CT slices + 2,000 small instances
    python -m bench.ingest --ct 100 --small 500  # a quick run (< 2 min)
    python -m bench.ingest --parallel 4 --json ingest.json
    python -m bench.ingest --parallel 2,4,8 --targets storescp,node-processes  # scaling

Every target starts fresh (empty storage) for every measurement and receives the same files
from DCMTK ``storescu`` (``TCP_NODELAY=1``, or with ``--nagle`` as installed, without it; explicit
VR little endian), over one association and
then split over ``--parallel`` concurrent associations (one row per count given, and a table of
each target's rate over N associations against its own over one: how it scales with the
cores); then ``--each`` of the small instances
are sent one association each (one storescu after another: what each association costs, start-up
of storescu included). The node runs as ``acwi-node scp`` with its defaults (SQLite ledger, the
ingest journal, fsync on); the run checks afterwards that every instance is in the node's ledger
and spool. Orthanc (1.7.4 and later) fsyncs every file it stores (``SyncStorageArea``, on by
default); storescp fsyncs nothing. The ``node-processes`` target runs one SCP listener process
per core (``ingest.processes = 0``), ``node-postgres`` keeps the ledger on PostgreSQL (a
database made for each run on ``ACWI_BENCH_POSTGRES``, by default the server on 127.0.0.1:5432,
and dropped after it), ``node-server`` both, as the server deployment runs it. Besides rates,
the run reports the CPU time each receiver (its processes, children included) and the senders
spent per instance. Before each measurement
the page cache is flushed and, as root, dropped, and then memory several times what the target
may write is touched once, so that the host backs it again (:func:`settle_memory`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url, text

import bench.common as bench_common
from acwi_node.ledger.repository import make_engine
from bench.common import (
    STORESCP,
    children_cpu_s,
    cpu_wakeup_latency,
    flush_latency_us,
    markdown_table,
    prefault_memory,
    process_tree_cpu_s,
    rate,
    ratio,
    start_node,
    stop_process,
    wait_port,
    write_ct_series,
    write_json,
    write_small_instances,
)
from tests.support.node import write_config
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port


@dataclass(frozen=True)
class Receiver:
    """A started target: where to send, how many instances it holds, and its process (whose
    CPU time, children included, is the receiver's)."""

    port: int
    aet: str
    count: Callable[[], int]
    pid: int


@dataclass(frozen=True)
class Measurement:
    """One target's run: instances per second, and CPU milliseconds per instance spent by the
    receiver (its processes) and by the senders (the storescu processes)."""

    rate: float
    receiver_cpu_ms: float
    sender_cpu_ms: float


Target = Callable[[Path], AbstractContextManager[Receiver]]


@contextmanager
def storescp_target(workdir: Path, *options: str) -> Iterator[Receiver]:
    """DCMTK storescp: one association at a time (the others wait in the listen queue), or with
    ``--fork`` a child process per association."""
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [str(STORESCP), *options, "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port)
        yield Receiver(port, "STORESCP", lambda: sum(1 for _ in out.iterdir()), proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def orthanc_target(workdir: Path) -> Iterator[Receiver]:
    with OrthancServer(node_port=free_port(), workdir=workdir / "orthanc") as orthanc:

        def count() -> int:
            return int(orthanc.get_json("/statistics")["CountInstances"])

        assert orthanc.pid is not None
        yield Receiver(orthanc.dicom_port, orthanc.aet, count, orthanc.pid)


def node_config(
    workdir: Path, port: int, ops_port: int, database_url: str | None = None, **ingest: Any
) -> Path:
    """The node's config: defaults (fsync on, SQLite ledger) unless ``ingest`` (or
    ``database_url``, the ledger's database) says otherwise."""
    node: dict[str, Any] = {
        "ae_title": "ACWI",
        "dicom_host": "127.0.0.1",
        "dicom_port": port,
        "http_port": free_port(),
        "data_dir": str(workdir / "data"),
        "log_level": "WARNING",
    }
    if database_url:
        node["database_url"] = database_url
    return write_config(
        workdir / "acwi-node.toml",
        {"node": node, "ingest": ingest, "observability": {"scp_port": ops_port}},
    )


def wait_node_ready(ops_port: int, timeout_s: float = 60.0) -> None:
    """Until the scp's readiness check passes: every listener process accepts connections
    (the port itself is open as soon as the parent process binds it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=5):
                return
        except OSError:  # refused while starting, 503 while not ready
            if time.monotonic() > deadline:
                raise RuntimeError("the node did not become ready") from None
            time.sleep(0.1)


def ledger_instances(url: str) -> int:
    """Instances in the node's ledger (its ``database_url``: SQLite or PostgreSQL)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("select count(*) from instances")).scalar_one())
    finally:
        engine.dispose()


@contextmanager
def node_target(
    workdir: Path, database_url: str | None = None, **ingest: Any
) -> Iterator[Receiver]:
    port = free_port()
    root = workdir / "node"
    root.mkdir()
    ops_port = free_port()
    config = node_config(root, port, ops_port, database_url, **ingest)
    ledger_url = database_url or f"sqlite:///{root / 'data' / 'ledger.sqlite'}"
    proc = start_node(config, "scp", root / "scp.log")
    try:
        wait_port(port)
        wait_node_ready(ops_port)

        def count() -> int:
            """Instances both in the spool and in the ledger: a row is written just after its
            file (an association's last rows once it ends), so the two may differ briefly."""
            spooled = sum(1 for _ in (root / "data" / "spool").glob("*/*.dcm"))
            return min(spooled, ledger_instances(ledger_url))

        yield Receiver(port, "ACWI", count, proc.pid)
    finally:
        stop_process(proc)
        if proc.returncode not in (0, -15):
            print((root / "scp.log").read_text()[-3000:])


#: The PostgreSQL server on which ``node-postgres`` creates a database for each run.
POSTGRES_ADMIN_URL = os.environ.get(
    "ACWI_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def postgres_node_target(workdir: Path, **ingest: Any) -> Iterator[Receiver]:
    """The node with its ledger on PostgreSQL (the server deployment's), in a database made
    for this run and dropped after it; ``ingest``: settings of its ``[ingest]`` table."""
    admin = make_engine(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    name = f"acwi_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            with node_target(
                workdir,
                database_url=make_url(POSTGRES_ADMIN_URL)
                .set(database=name)
                .render_as_string(hide_password=False),
                **ingest,
            ) as receiver:
                yield receiver
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


TARGETS: dict[str, Target] = {
    "storescp": storescp_target,
    # A storescp child process per association: the reference for parallel associations.
    "storescp-fork": lambda workdir: storescp_target(workdir, "--fork"),
    "orthanc": orthanc_target,
    "node": node_target,
    # Durable without the ingest journal: each spool file, directory and ledger row flushed.
    "node-perfile": lambda workdir: node_target(workdir, journal=False),
    # Not durable: shows what fsync costs; never a production setting.
    "node-nofsync": lambda workdir: node_target(workdir, fsync=False),
    # The journal checkpointed the way it was before it waited for idle time: every 2 s and
    # whenever a 64 MiB segment filled, in the middle of a burst if need be (ingest/journal.py).
    "node-eager-checkpoint": lambda workdir: node_target(
        workdir,
        journal_checkpoint_s=2.0,
        journal_checkpoint_idle_s=300.0,
        journal_checkpoint_bytes=64 << 20,
    ),
    # pynetdicom's own polling loops instead of the event-driven reactor (ingest/reactor.py).
    "node-polling": lambda workdir: node_target(workdir, reactor="polling"),
    # One listener process per core sharing the port (ingest/listeners.py).
    "node-processes": lambda workdir: node_target(workdir, processes=0),
    # The ledger on PostgreSQL (ACWI_BENCH_POSTGRES: the server to use).
    "node-postgres": postgres_node_target,
    # The server deployment's settings (deploy/acwi-node.toml): both of the above.
    "node-server": lambda workdir: postgres_node_target(workdir, processes=0),
    # Holding a CPU wake-up latency request of 0 us while associations are open (as root):
    # every CPU polls when idle, the sender's too, so its ratio to storescp is not like for like.
    "node-cpu-latency": lambda workdir: node_target(workdir, cpu_wakeup_latency_us=0),
}


#: ``associations`` for one association per instance.
EACH = 0


#: Where the page cache is dropped (root only; see :func:`settle_memory`).
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle_memory(files: Sequence[Path], *, touch: int = 0) -> bool:
    """Start a measurement from the same state as every other: what earlier runs left
    unflushed (storescp: everything) is written back now, not while the next target runs; the
    page cache is dropped where that is permitted (as root; True then), the files to send
    are read back in, so that the sender reads them from memory, and ``touch`` bytes of
    memory are touched and given back (:func:`prefault_memory`).

    Dropping the cache matters on a virtual machine whose memory the host backs only when the
    guest first touches it: with a page cache that only grows, every run writes into pages
    never touched before, each costing the host a fault (about 18 us per 4 KB page here, 2 ms
    per CT slice), and CT rates fell run after run, by half over a few runs, whatever the
    target. The pages a dropped cache frees are handed back to the host where the guest
    reports free memory (at once, on this machine), hence the touch. 400 CT slices, five
    targets in a row, twice each way: with nothing touched the node took 399-764 slices per
    second and storescp 558-937; with 2 GB touched 734-960 and 758-1,220. 664 MiB (three
    times what the node writes) was not enough (271-555): the kernel does not hand out just
    the pages given back, so the touch takes several times what a target writes."""
    os.sync()
    try:
        DROP_CACHES.write_text("3")
        dropped = True
    except OSError:  # not root, or not Linux: the cache stays
        dropped = False
    for path in files:
        path.read_bytes()
    if dropped and touch:
        prefault_memory(touch)
    return dropped


def measure(target: Target, files: list[Path], associations: int, workdir: Path) -> Measurement:
    """Instances per second into a fresh ``target`` (over ``associations`` concurrent
    associations, or :data:`EACH` instance in its own), and the CPU time spent per instance;
    checks that every instance arrived."""
    from bench.common import send_each, send_parallel

    # Each run's storage stays until the benchmark ends: on ext4 without a journal, creating a
    # file skips every inode freed in the last 30 s or so, one by one, so deleting a run's
    # thousands of files would slow down the next target's file creation.
    received = workdir / "received"
    received.mkdir(exist_ok=True)
    tmp = tempfile.mkdtemp(dir=received)
    with target(Path(tmp)) as receiver:
        # Settled once the target has started: what its start-up wrote (Orthanc's index, the
        # node's journal segments) is on disk, and its memory as every other target's.
        # A receiver writes each instance once or twice (the node: journal and spool file),
        # and a database or an index beside it: memory several times that is touched, since
        # the kernel does not hand out just the pages given back (see settle_memory).
        settle_memory(files, touch=12 * sum(f.stat().st_size for f in files) + (256 << 20))
        receiver_before = process_tree_cpu_s(receiver.pid)
        sender_before = children_cpu_s()
        if associations == EACH:
            seconds = send_each(receiver.port, files, called=receiver.aet)
        else:
            seconds = send_parallel(
                receiver.port, files, called=receiver.aet, associations=associations
            )
        # Taken when the last answer is in: what the receiver does afterwards (a checkpoint,
        # a completion timer) is not part of receiving.
        receiver_cpu = process_tree_cpu_s(receiver.pid) - receiver_before
        sender_cpu = children_cpu_s() - sender_before
        deadline = time.monotonic() + 30
        while (got := receiver.count()) < len(files) and time.monotonic() < deadline:
            time.sleep(0.2)
        if got != len(files):
            raise RuntimeError(f"{receiver.aet}: {got} of {len(files)} instances stored")
    return Measurement(
        rate(len(files), seconds),
        1000 * receiver_cpu / len(files),
        1000 * sender_cpu / len(files),
    )


def flushed_reference(
    results: dict[str, dict[str, float]], flush_us: dict[str, float], targets: list[str]
) -> tuple[list[str], list[list[Any]]] | None:
    """The "storescp + flush" table for the one-association rows: storescp's time per instance
    plus one flush of an instance's bytes, as a rate, and each node target's ratio to it; what
    the 0.5x storescp goal leaves a receiver per instance beyond storescp's time and the flush
    (storescp's time less the flush: negative where no receiver that flushes could meet it),
    and what each node target takes beyond them; None without storescp among the targets."""
    if "storescp" not in targets:
        return None
    nodes = [t for t in targets if t.startswith("node")]
    header = ["instances, associations", "flush us", "storescp + flush inst/s"]
    header += [f"{n} / storescp + flush" for n in nodes]
    header += ["0.5x storescp leaves us"] + [f"{n} takes us" for n in nodes]
    rows: list[list[Any]] = []
    for row, figures in results.items():
        name, _, assocs = row.rpartition(", ")
        if assocs != "1 assoc." or name not in flush_us or not figures["storescp"]:
            continue
        storescp_us = 1e6 / figures["storescp"]
        reference_us = storescp_us + flush_us[name]
        reference = 1e6 / reference_us
        cells: list[Any] = [row, round(flush_us[name]), round(reference, 1)]
        cells += [round(ratio(figures[n], reference), 2) for n in nodes]
        cells.append(round(storescp_us - flush_us[name]))
        cells += [round(1e6 / figures[n] - reference_us) if figures[n] else None for n in nodes]
        rows.append(cells)
    return (header, rows) if rows else None


def association_counts(text: str) -> tuple[int, ...]:
    """``--parallel``: "4" or "2,4,8", in the order given, without repeats; 0 (or 1, which the
    one-association rows cover already) adds no row."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of counts: {text!r}") from None
    if any(n < 0 for n in counts):
        raise argparse.ArgumentTypeError(f"a negative count of associations: {text!r}")
    return tuple(dict.fromkeys(n for n in counts if n > 1))


def scaling(
    results: dict[str, dict[str, float]], targets: list[str]
) -> tuple[list[str], list[list[Any]]] | None:
    """Each target's rate over N concurrent associations divided by its rate over one, for
    every set of instances with a parallel row; None without any."""
    header = ["instances, associations", *[f"{t} x one assoc." for t in targets]]
    rows: list[list[Any]] = []
    for row, figures in results.items():
        name, _, assocs = row.rpartition(", ")
        single = results.get(f"{name}, 1 assoc.")
        if assocs in ("1 assoc.", "one assoc. each") or single is None:
            continue
        rows.append([row, *[round(ratio(figures[t], single[t]), 2) for t in targets]])
    return (header, rows) if rows else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=400, help="CT slices 512x512 16-bit")
    parser.add_argument("--small", type=int, default=2000, help="small instances (16x16 SC)")
    parser.add_argument(
        "--parallel",
        type=association_counts,
        default=(4,),
        help="concurrent associations of the parallel rows, one count or several (2,4,8); 0: none",
    )
    parser.add_argument(
        "--each",
        type=int,
        default=100,
        help="of the small instances, this many sent one association each (0: skip)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds, in alternating order (medians are kept)"
    )
    parser.add_argument(
        "--targets",
        default="storescp,orthanc,node",
        help="also: storescp-fork (a storescp process per association), node-processes (a"
        " listener process per core), node-perfile (no ingest"
        " journal: three flushes per instance), node-nofsync (not durable),"
        " node-polling (pynetdicom's polling loops), node-eager-checkpoint (the journal"
        " checkpointed every 2 s and at every full segment), node-postgres (the ledger on"
        " PostgreSQL, ACWI_BENCH_POSTGRES or postgres@127.0.0.1:5432), node-server (both: the"
        " server deployment's settings), node-cpu-latency"
        " (ingest.cpu_wakeup_latency_us = 0, as root)",
    )
    parser.add_argument(
        "--cpu-latency-us",
        type=int,
        help="hold a CPU wake-up latency request (/dev/cpu_dma_latency, root) of this many"
        " microseconds for the whole run, every target alike: 0 keeps idle CPUs polling,"
        " as a latency tuning profile does",
    )
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="run storescu, storescp and Orthanc without TCP_NODELAY, as they are installed:"
        " Nagle's algorithm on, as many modalities and PACS send (the default run sets it, so"
        " that the figures measure the receivers, not the sender's delays)",
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    with cpu_wakeup_latency(args.cpu_latency_us):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The benchmark ``main`` parsed the arguments for."""
    # Every DCMTK process (storescu, storescp, Orthanc's network layer) sends small PDUs at once,
    # unless --nagle asks for them as installed.
    bench_common.SENDERS_NODELAY = not args.nagle
    if args.nagle:
        os.environ.pop("TCP_NODELAY", None)
        print("note: --nagle: storescu, storescp and Orthanc run without TCP_NODELAY")
    else:
        os.environ["TCP_NODELAY"] = "1"

    page_cache_dropped = settle_memory([])
    if not page_cache_dropped:
        print("note: the page cache cannot be dropped (not root): rates may drift run by run")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    results: dict[str, dict[str, float]] = {}  # the median run per target and row
    runs: dict[str, dict[str, list[float]]] = {}  # every run
    # CPU milliseconds per instance of every run: {"receiver": [...], "sender": [...]}
    cpu_runs: dict[str, dict[str, dict[str, list[float]]]] = {}
    # Per instance set: median microseconds of one flush of an instance's bytes (flush_latency_us)
    flush_us: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="acwi-bench-ingest-") as tmp:
        work = Path(tmp)
        sets: dict[str, list[Path]] = {}
        if args.ct:
            sets[f"{args.ct} CT 512x512x16"] = write_ct_series(work / "ct", args.ct)
        if args.small:
            sets[f"{args.small} small"] = write_small_instances(work / "small", args.small)
        scenarios = [(name, files, 1) for name, files in sets.items()]
        for associations in args.parallel:
            scenarios += [(name, files, associations) for name, files in sets.items()]
        if args.small and args.each:
            small = sets[f"{args.small} small"][: args.each]
            scenarios.append((f"{len(small)} small", small, EACH))
        for name, files, assocs in scenarios:
            row = f"{name}, " + ("one assoc. each" if assocs == EACH else f"{assocs} assoc.")
            if assocs == 1:
                settle_memory([])
                flush_us[name] = flush_latency_us(work, files[0].stat().st_size)
                print(f"{name}: one flush of an instance's bytes takes {flush_us[name]:.0f} us")
            runs[row] = {t: [] for t in targets}
            cpu_runs[row] = {t: {"receiver": [], "sender": []} for t in targets}
            # Rounds alternate the targets' order (A B C, C B A, ...), so that a machine getting
            # busier or quieter during a row favours none of them.
            for round_no in range(args.repeat):
                for target in targets if round_no % 2 == 0 else targets[::-1]:
                    run = measure(TARGETS[target], files, assocs, work)
                    runs[row][target].append(run.rate)
                    cpu_runs[row][target]["receiver"].append(run.receiver_cpu_ms)
                    cpu_runs[row][target]["sender"].append(run.sender_cpu_ms)
                    print(
                        f"{row:<32} {target:<14} {run.rate:8.1f} inst/s   CPU ms per instance:"
                        f" receiver {run.receiver_cpu_ms:.3f}, sender {run.sender_cpu_ms:.3f}",
                        flush=True,
                    )
            results[row] = {t: statistics.median(figures) for t, figures in runs[row].items()}

    # Each node variant's ratio to each reference (storescp, Orthanc): the median over the
    # rounds of the ratio within a round (the two ran minutes apart at most).
    pairs = [
        (n, r) for n in targets if n.startswith("node") for r in targets if not r.startswith("node")
    ]
    header = ["instances, associations", *[f"{t} inst/s" for t in targets]]
    header += [f"{n} / {r}" for n, r in pairs]
    rows = []
    for row, figures in results.items():
        cells: list[Any] = [row, *[round(figures[t], 1) for t in targets]]
        cells += [
            round(
                statistics.median(
                    ratio(a, b) for a, b in zip(runs[row][n], runs[row][r], strict=True)
                ),
                2,
            )
            for n, r in pairs
        ]
        rows.append(cells)
    # CPU time per instance: steadier than rates on a machine whose speed drifts, and it says
    # what each receiver spends beside the sender's share.
    cpu = {
        row: {
            t: {side: statistics.median(values) for side, values in sides.items()}
            for t, sides in per_target.items()
        }
        for row, per_target in cpu_runs.items()
    }
    cpu_header = ["instances, associations"]
    cpu_header += [f"{t} CPU ms/inst" for t in targets]
    cpu_header += ["sender CPU ms/inst"]
    cpu_rows = [
        [
            row,
            *[round(cpu[row][t]["receiver"], 3) for t in targets],
            round(statistics.median(cpu[row][t]["sender"] for t in targets), 3),
        ]
        for row in cpu
    ]
    print()
    print(markdown_table(header, rows))
    print()
    print(markdown_table(cpu_header, cpu_rows))
    flushed = flushed_reference(results, flush_us, targets)
    if flushed:
        print()
        print(
            "storescp + flush: storescp's time per instance plus one flush of the instance's"
            " bytes (what a receiver as quick as storescp would take if it flushed each"
            " instance before answering); 'leaves': the time per instance that 0.5x storescp"
            " leaves beyond storescp's and the flush; 'takes': what each node target takes"
            " beyond them"
        )
        print()
        print(markdown_table(*flushed))
    scaled = scaling(results, targets)
    if scaled:
        print()
        print(
            f"Scaling ({os.cpu_count()} CPUs): each target's rate over N associations against"
            " its own over one"
        )
        print()
        print(markdown_table(*scaled))
    write_json(
        args.json,
        {
            "benchmark": "ingest",
            "args": vars(args) | {"json": None},
            "results": results,
            "runs": runs,
            "cpu_ms_per_instance": cpu,
            "cpu_runs": cpu_runs,
            "page_cache_dropped": page_cache_dropped,
            "flush_us": flush_us,
            "cpus": os.cpu_count(),
            "scaling": {r[0]: dict(zip(targets, r[1:], strict=True)) for r in scaled[1]}
            if scaled
            else {},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
