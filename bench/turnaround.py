"""Turnaround: from the last instance acknowledged to the SR and heatmaps stored in the PACS.

    python -m bench.turnaround                       # 20 DX studies and 20 CT series of 100 slices
    python -m bench.turnaround --dx 10 --ct 0        # a quick run
    python -m bench.turnaround --mode separate       # scp/worker/exporter processes, Redis db 9
    python -m bench.turnaround --quiet-period 0.5 --json turnaround.json
    python -m bench.turnaround --nagle               # storescu and Orthanc without TCP_NODELAY
    python -m bench.turnaround --signal mpps         # the modality reports MPPS COMPLETED
    python -m bench.turnaround --signal release      # the sender is a release-complete AE
    python -m bench.turnaround --dicomweb            # results to Orthanc by STOW-RS, not C-STORE
    python -m bench.turnaround --sender stow         # studies sent to the node by STOW-RS

Orthanc (the PACS) and the node run on loopback; the node is ``acwi-node serve`` on its embedded
defaults (SQLite ledger, embedded broker) or, with ``--mode separate``, ``acwi-node scp``,
``worker`` and ``exporter`` with Redis (database 9) as the broker. Each study is sent by DCMTK
``storescu`` over one association, or with ``--sender stow`` by STOW-RS to the node's web
process (``POST /dicomweb/studies``, requests of :data:`STOW_PER_REQUEST` objects on one
connection, as a PACS that sends by DICOMweb does; HTTP Basic as a ``sender`` account); the
clock starts when storescu exits (or the last request is answered: every instance
acknowledged) and stops when the node's ledger shows the study ``delivered`` (every result
confirmed by Orthanc with 0x0000); the run then checks that Orthanc holds the SR. Studies are
sent one at a time after one warm-up study, so each figure is one study's latency.

``--signal`` chooses what tells the node a study is complete (README, "Completion signals"):
``quiet`` (the default) leaves it to the association's release and the quiet period;
``mpps`` makes the bench a modality that reports its procedure step, N-CREATE (IN PROGRESS)
before sending and N-SET (COMPLETED, listing every instance) after storescu exits, on
associations of their own; ``release`` names storescu's calling AE title in
``completion.release_complete_aes`` (not with ``--sender stow``: the node does not take a
STOW-RS request for a whole study). With a signal the quiet period is set to an hour unless
``--quiet-period`` says otherwise, so that every study in the run is completed by the signal and
nothing else; the N-SET's time is inside the measured turnaround.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

import bench.common as bench_common
from bench.common import (
    cpu_wakeup_latency,
    dcmtk_env,
    markdown_table,
    start_node,
    stop_process,
    storescu_cmd,
    summarize,
    wait_port,
    write_ct_series,
    write_json,
)
from bench.stow import USER as STOW_USER
from bench.stow import Service, post_all
from models.data.synth import write_study
from tests.support.node import add_api_user, write_config
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
FINAL = ("delivered", "failed", "not_routed")
REDIS_DB9 = "redis://127.0.0.1:6379/9"
#: storescu's calling AE title, and the modality's for MPPS.
MODALITY_AE = "MODALITY"
SIGNALS = ("quiet", "mpps", "release")
#: The quiet period of a run with a completion signal, so that only the signal completes.
SIGNAL_QUIET_PERIOD_S = 3600.0
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
SENDERS = ("storescu", "stow")
#: Objects per STOW-RS request of ``--sender stow``.
STOW_PER_REQUEST = 50


def node_config(
    work: Path, orthanc: OrthancServer, args: argparse.Namespace, http_port: int
) -> Path:
    node: dict[str, Any] = {
        "ae_title": "ACWI",
        "dicom_host": "127.0.0.1",
        "dicom_port": orthanc.node_port,
        "http_port": http_port,
        "data_dir": str(work / "data"),
        "log_level": "WARNING",
    }
    if args.mode == "separate":
        node["broker_url"] = REDIS_DB9
    completion: dict[str, Any] = {}
    if args.quiet_period is not None:
        completion["quiet_period_s"] = args.quiet_period
    elif args.signal != "quiet":
        completion["quiet_period_s"] = SIGNAL_QUIET_PERIOD_S
        completion["max_wait_s"] = SIGNAL_QUIET_PERIOD_S
    if args.signal == "release":
        completion["release_complete_aes"] = [MODALITY_AE]
    if args.poll_interval is not None:
        completion["poll_interval_s"] = args.poll_interval
    config: dict[str, Any] = {"node": node}
    if completion:
        config["completion"] = completion
    config["worker"] = {"torch_threads": args.torch_threads} if args.torch_threads else {}
    pacs: dict[str, Any] = {"name": "pacs"}
    if args.dicomweb:
        pacs["url"] = f"{orthanc.url}/dicom-web"
    else:
        pacs |= {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    if args.associations:
        pacs["associations"] = args.associations
    config["destinations"] = [pacs]
    config["routes"] = [
        {
            "name": "radiographs",
            "match": {"modality": ["CR", "DX"]},
            "model": "default",
            "destinations": ["pacs"],
        },
        {"name": "ct", "match": {"modality": ["CT"]}, "model": "default", "destinations": ["pacs"]},
    ]
    if not config["worker"]:
        del config["worker"]
    return write_config(work / "acwi-node.toml", config)


def study_state(db: Path, study_uid: str) -> str | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "select state from studies where study_uid = ?", (study_uid,)
            ).fetchone()
    except sqlite3.OperationalError:
        return None
    return str(row[0]) if row else None


#: Where a study's turnaround goes, from the ledger's timestamps (seconds).
STAGES = {
    "complete": "last instance stored -> study complete",
    "queue": "complete -> analysis started",
    "analysis": "analysis (read, model, SR, heatmaps, results written and queued)",
    "delivery": "results queued -> the last one accepted by the PACS",
}


def stage_seconds(db: Path, study_uid: str) -> dict[str, float]:
    """:data:`STAGES` of a delivered study (its latest job). The results were queued when its
    analysis was recorded (``jobs.analysed_at``, when its deliveries were made; their next
    attempt times move on once an exporter takes them)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute(
            "select s.last_received_at, s.completed_at, j.started_at, j.analysed_at,"
            " (select max(d.delivered_at) from deliveries d where d.job_id = j.id)"
            " from studies s join jobs j on j.study_id = s.id"
            " where s.study_uid = ? order by j.id desc limit 1",
            (study_uid,),
        ).fetchone()
    times = [dt.datetime.fromisoformat(str(t)) for t in row]
    return {
        stage: (later - earlier).total_seconds()
        for stage, earlier, later in zip(STAGES, times[:-1], times[1:], strict=True)
    }


class Modality:
    """The modality's side of MPPS (pynetdicom): a procedure step per study, each message on an
    association of its own, as a modality sends them (the step begins before the first image
    and is completed after the last)."""

    def __init__(self, port: int, called: str = "ACWI") -> None:
        from pynetdicom import AE

        self.port = port
        self.called = called
        self.ae = AE(ae_title=MODALITY_AE)
        self.ae.add_requested_context(MPPS_SOP_CLASS)

    def _send(self, kind: str, attrs: Any, step_uid: str) -> None:
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.called)
        if not assoc.is_established:
            raise RuntimeError("MPPS: the node did not accept the association")
        try:
            if kind == "create":
                status, _ = assoc.send_n_create(attrs, MPPS_SOP_CLASS, step_uid)
            else:
                status, _ = assoc.send_n_set(attrs, MPPS_SOP_CLASS, step_uid)
        finally:
            assoc.release()
        if not status or int(status.Status) != 0:
            raise RuntimeError(f"MPPS N-{kind.upper()} answered {status!r}")

    def begin(self, study_uid: str, modality: str) -> str:
        """N-CREATE an IN PROGRESS step for ``study_uid``; its SOP Instance UID."""
        from pydicom.dataset import Dataset

        step_uid = str(generate_uid())
        item = Dataset()
        item.StudyInstanceUID = study_uid
        ds = Dataset()
        ds.ScheduledStepAttributesSequence = [item]
        ds.Modality = modality
        ds.PerformedProcedureStepID = step_uid[-16:]
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.PerformedSeriesSequence = []
        self._send("create", ds, step_uid)
        return step_uid

    def complete(self, step_uid: str, files: list[Path]) -> None:
        """N-SET the step COMPLETED, listing every instance in ``files`` by series."""
        from pydicom import dcmread
        from pydicom.dataset import Dataset

        series: dict[str, list[Dataset]] = {}
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ref)
        performed = []
        for series_uid, refs in series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedImageSequence = refs
            performed.append(item)
        mods = Dataset()
        mods.PerformedSeriesSequence = performed
        mods.PerformedProcedureStepStatus = "COMPLETED"
        self._send("set", mods, step_uid)


def storescu_sender(port: int) -> Callable[[list[Path]], None]:
    """Sends a study with DCMTK storescu over one association, to the node's DICOM port."""

    def send(files: list[Path]) -> None:
        done = subprocess.run(
            storescu_cmd(port, files, called="ACWI", calling=MODALITY_AE),
            env=dcmtk_env(),
            capture_output=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed: {done.stdout.decode()[-2000:]}")

    return send


def stow_sender(http_port: int) -> Callable[[list[Path]], None]:
    """Sends a study by STOW-RS to the node's web process, :data:`STOW_PER_REQUEST` objects a
    request on one connection (raises unless every request is answered 200)."""
    service = Service(http_port, "/dicomweb", lambda: 0)

    def send(files: list[Path]) -> None:
        post_all(service, files, STOW_PER_REQUEST)

    return send


def send_and_wait(
    send: Callable[[list[Path]], None],
    files: list[Path],
    study_uid: str,
    db: Path,
    orthanc: OrthancServer,
    timeout_s: float,
    modality: Modality | None = None,
) -> float:
    """Seconds from the study sent (``send`` returned: every instance acknowledged) to the
    study delivered; with ``modality``, the study's procedure step is created before the
    sending starts and completed after it ends (inside the measured time)."""
    step_uid = None
    if modality is not None:
        from pydicom import dcmread

        first = dcmread(files[0], stop_before_pixels=True)
        step_uid = modality.begin(study_uid, str(first.Modality))
    send(files)
    t0 = time.perf_counter()
    if modality is not None and step_uid is not None:
        modality.complete(step_uid, files)
    deadline = t0 + timeout_s
    state = None
    while time.perf_counter() < deadline:
        state = study_state(db, study_uid)
        if state in FINAL:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    if state != "delivered":
        raise RuntimeError(f"study ended {state!r} after {elapsed:.1f} s (not delivered)")
    orthanc_id = orthanc.find_study(study_uid)
    classes = [
        orthanc.instance_tags(i["ID"]).get("SOPClassUID")
        for i in (orthanc.study_instances(study_uid) if orthanc_id else [])
    ]
    if classes.count(SR_CLASS) != 1:
        raise RuntimeError(f"Orthanc holds {classes.count(SR_CLASS)} SR objects for the study")
    return elapsed


def make_dx(out: Path, i: int) -> tuple[list[Path], str]:
    uid = generate_uid()
    labels = ("normal", "nodule", "effusion")
    files = write_study(
        out,
        n_images=1,
        label=labels[i % 3],
        seed=i,
        study_instance_uid=uid,
        accession_number=f"DX{i:05d}",
        modality="DX",
    )
    return files, uid


def make_ct(out: Path, n_slices: int, i: int) -> tuple[list[Path], str]:
    from pydicom import dcmread

    files = write_ct_series(out, n_slices, size=512, seed=i)
    return files, str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dx", type=int, default=20, help="1-image DX studies")
    parser.add_argument("--ct", type=int, default=20, help="CT series")
    parser.add_argument("--ct-slices", type=int, default=100)
    parser.add_argument("--mode", choices=("serve", "separate"), default="serve")
    parser.add_argument("--quiet-period", type=float, help="completion.quiet_period_s")
    parser.add_argument("--poll-interval", type=float, help="completion.poll_interval_s")
    parser.add_argument("--torch-threads", type=int, default=0, help="worker.torch_threads")
    parser.add_argument(
        "--associations",
        type=int,
        help="the PACS destination's associations (results sent over this many at once;"
        " default: the node's)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per study, seconds")
    parser.add_argument(
        "--signal",
        choices=SIGNALS,
        default="quiet",
        help="what completes a study: the quiet period after the release (default), the"
        " modality's MPPS COMPLETED, or a release-complete sender (with a signal, the quiet"
        " period is an hour unless --quiet-period is given)",
    )
    parser.add_argument(
        "--cpu-latency-us",
        type=int,
        help="hold a CPU wake-up latency request (/dev/cpu_dma_latency, root) of this many"
        " microseconds for the run: 0 keeps idle CPUs polling, as a latency tuning profile does",
    )
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="run storescu and Orthanc without TCP_NODELAY, as they are installed (Nagle's"
        " algorithm on: each small PDU waits for the peer's acknowledgement)",
    )
    parser.add_argument(
        "--dicomweb",
        action="store_true",
        help="send the results to Orthanc's DICOMweb plugin by STOW-RS instead of C-STORE",
    )
    parser.add_argument(
        "--sender",
        choices=SENDERS,
        default="storescu",
        help="how studies reach the node: DCMTK storescu (C-STORE, one association a study) or"
        f" STOW-RS to its web process ({STOW_PER_REQUEST} objects a request)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.sender == "stow" and args.signal == "release":
        parser.error("--signal release needs --sender storescu (an association a study)")
    bench_common.SENDERS_NODELAY = not args.nagle
    if args.nagle:
        os.environ.pop("TCP_NODELAY", None)
    else:
        os.environ["TCP_NODELAY"] = "1"
    with cpu_wakeup_latency(args.cpu_latency_us):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The benchmark ``main`` parsed the arguments for."""

    results: dict[str, dict[str, float]] = {}
    breakdown: dict[str, dict[str, float]] = {}  # median seconds per stage
    with tempfile.TemporaryDirectory(prefix="acwi-bench-turnaround-") as tmp:
        work = Path(tmp)
        node_port = free_port()
        with OrthancServer(node_port=node_port, workdir=work / "orthanc") as orthanc:
            http_port = free_port()
            config = node_config(work, orthanc, args, http_port)
            kinds = ["serve"] if args.mode == "serve" else ["scp", "worker", "exporter"]
            if args.sender == "stow":
                add_api_user(config, STOW_USER, role="sender")
                if args.mode == "separate":
                    kinds.append("web")
            procs = [start_node(config, kind, work / f"{kind}.log") for kind in kinds]
            db = work / "data" / "ledger.sqlite"
            try:
                wait_port(node_port, 120)
                if args.sender == "stow":
                    wait_port(http_port, 120)
                    send = stow_sender(http_port)
                else:
                    send = storescu_sender(node_port)
                modality = Modality(node_port) if args.signal == "mpps" else None
                warm, warm_uid = make_dx(work / "warm", 999)
                send_and_wait(send, warm, warm_uid, db, orthanc, args.timeout, modality)
                kinds_run = [("DX 1 image", args.dx), (f"CT {args.ct_slices} slices", args.ct)]
                for name, count in kinds_run:
                    times: list[float] = []
                    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
                    for i in range(count):
                        out = work / "studies" / f"{name[:2]}{i}"
                        if name.startswith("DX"):
                            files, uid = make_dx(out, i)
                        else:
                            files, uid = make_ct(out, args.ct_slices, i)
                        times.append(
                            send_and_wait(send, files, uid, db, orthanc, args.timeout, modality)
                        )
                        for stage, seconds in stage_seconds(db, uid).items():
                            stages[stage].append(seconds)
                        print(f"{name:<16} {i + 1:3d}/{count}  {times[-1]:6.2f} s", flush=True)
                    if times:
                        results[name] = summarize(times)
                        breakdown[name] = {
                            stage: statistics.median(values) for stage, values in stages.items()
                        }
            finally:
                for proc in procs:
                    stop_process(proc)

    header = ["study", "n", "p50 s", "p95 s", "mean s", "max s"]
    rows = [
        [name, int(s["n"]), s["p50"], s["p95"], s["mean"], s["max"]] for name, s in results.items()
    ]
    print()
    print(
        f"mode={args.mode} sender={args.sender} signal={args.signal}"
        f" quiet_period_s={args.quiet_period}"
        f" poll={args.poll_interval} nagle={args.nagle} dicomweb={args.dicomweb}"
    )
    print(markdown_table(header, rows))
    print()
    print("Median seconds per stage, from the ledger's timestamps:")
    for stage, meaning in STAGES.items():
        print(f"  {stage}: {meaning}")
    print(
        markdown_table(
            ["study", *STAGES],
            [[name, *(round(s[stage], 2) for stage in STAGES)] for name, s in breakdown.items()],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "turnaround",
            "args": vars(args) | {"json": None},
            "results": results,
            "stages": breakdown,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
