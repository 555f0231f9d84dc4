"""Worker profile: where the analyse task's time goes for a synthetic CT, stage by stage.

    python -m bench.worker_profile                       # 100 and 400 slices of 512 x 512
    python -m bench.worker_profile --slices 100,400 --repeat 3 --json profile.json
    python -m bench.worker_profile --studies 2           # a warm worker: the last study counts

Each count runs in a fresh process, as :mod:`bench.worker_memory` does: a synthetic CT series
(written by another process) is spooled and recorded in a SQLite ledger, routed to the bundled
model, the model loaded, and the analyse task (:func:`acwi_node.tasks.analyse.run_job`) run in
this process. ``--studies N`` analyses N such studies one after the other (each its own UIDs)
and reports the last: a long-lived worker's steady state. The stages are timed by wrapping the
functions the task calls, so nothing in the product is changed for it:

- read: the inputs read from the spool (``read_inputs``);
- model: the analyser (``Analyser.analyse``);
- sr: the SR built (``build_sr``);
- heat: each heatmap computed at full size (``ImageResult.heatmap_array``);
- heatmaps: the secondary captures built (``build_heatmap_sc``);
- writing: objects encoded and written (``encode_part10``, the spool's write, the overlays);
- other: the rest (the ledger, the lease, ...);
- gc: the garbage collector's pauses, wherever they fell (part of the stages above), and
  ``collections``: how many full (generation 2) collections there were.

With ``--repeat R`` each count runs R times (each in a fresh process) and the medians are shown.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import markdown_table, spool_and_record, write_json

STAGES = ("read", "model", "sr", "heat", "heatmaps", "writing", "other", "total", "gc")


def _timed(times: dict[str, float], stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[stage] += time.perf_counter() - started

    return wrapper


def _study(work: Path, slices: int, size: int, index: int) -> list[Path]:
    """A synthetic CT series of its own UIDs, written by another process."""
    out = work / f"ct{index}"
    study_uid = f"1.2.826.0.1.3680043.10.1137.4711.{slices}.{index}"
    script = (
        "from pathlib import Path; from models.data.synth import write_ct_series; "
        f"write_ct_series(Path({str(out)!r}), slices={slices}, size={size}, "
        f"study_instance_uid={study_uid!r}, accession_number='ACC{index:04d}')"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    return sorted(out.glob("*.dcm"))


def measure(slices: int, size: int, studies: int) -> dict[str, Any]:
    """The stages of the last of ``studies`` analyses of a ``slices``-slice CT, in this
    process."""

    import acwi_node.tasks.analyse as analyse
    from acwi_node.config import load_settings
    from acwi_node.inference.analyser import Analyser
    from acwi_node.inference.types import ImageResult
    from acwi_node.ingest.spool import Spool
    from acwi_node.ledger import Ledger, RoutedJob

    work = Path(tempfile.mkdtemp(prefix="acwi-bench-profile-"))
    settings = load_settings(
        None,
        node={"data_dir": work / "data"},
        ingest={"fsync": False},
        worker={"mc_samples": 10},
    )
    ledger = Ledger(settings.database_url)
    spool = Spool(settings.spool_dir, fsync=False)
    route = RoutedJob("ct", "default", [], 0)
    jobs = []
    for index in range(studies):
        recorded = None
        for n, path in enumerate(_study(work, slices, size, index)):
            recorded = spool_and_record(ledger, spool, path, first=n == 0)
        assert recorded is not None
        ledger.association_released([recorded.study_id])
        (job,) = ledger.complete_study(recorded.study_id, recorded.generation, lambda _f: [route])
        jobs.append(job)
    # as the worker process does (``acwi-node worker``); an older tree has no such setting
    analyse.FREEZE_HEAP_AFTER_LOAD = True  # type: ignore[attr-defined,unused-ignore]
    analyse.get_analyser(settings, "default")  # loading the model is not the study's

    times: dict[str, float] = defaultdict(float)
    analyse.read_inputs = _timed(times, "read", analyse.read_inputs)
    analyse.build_sr = _timed(times, "sr", analyse.build_sr)
    analyse.build_heatmap_sc = _timed(times, "heatmaps", analyse.build_heatmap_sc)
    analyse.encode_part10 = _timed(times, "writing", analyse.encode_part10)
    analyse.write_cam = _timed(times, "writing", analyse.write_cam)
    Spool.write = _timed(times, "writing", Spool.write)  # type: ignore[method-assign]
    Analyser.analyse = _timed(times, "model", Analyser.analyse)  # type: ignore[method-assign]
    ImageResult.heatmap_array = _timed(times, "heat", ImageResult.heatmap_array)  # type: ignore[method-assign]

    pauses = {"gc": 0.0, "collections": 0}
    began = [0.0]

    def collector(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        pauses["gc"] += time.perf_counter() - began[0]
        pauses["collections"] += info["generation"] == 2

    result: dict[str, Any] = {}
    for job in jobs:
        times.clear()
        pauses.update(gc=0.0, collections=0)
        gc.callbacks.append(collector)
        started = time.perf_counter()
        outcome = analyse.run_job(settings, ledger, job)
        total = time.perf_counter() - started
        gc.callbacks.remove(collector)
        if outcome != "analysed":
            raise RuntimeError(f"the analysis of {slices} slices ended {outcome!r}")
        staged = {stage: times[stage] for stage in STAGES[:6]}
        result = staged | {
            "other": total - sum(staged.values()),
            "total": total,
            "gc": pauses["gc"],
            "collections": pauses["collections"],
        }
    ledger.dispose()
    return {"slices": slices, "size": size, "studies": studies} | result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="100,400", help="slice counts, each in a fresh process")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of a slice")
    parser.add_argument("--studies", type=int, default=1, help="studies per process (last shown)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per count (medians shown)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's single count
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.size, args.studies)))
        return 0

    runs: dict[int, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for slices in [int(n) for n in args.slices.split(",") if n.strip()]:
            child = [sys.executable, "-m", "bench.worker_profile", "--one", str(slices)]
            child += ["--size", str(args.size), "--studies", str(args.studies)]
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stdout + done.stderr, file=sys.stderr)
                return 1
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault(slices, []).append(run)
            print(f"{slices} slices: {run['total']:.2f} s", file=sys.stderr)
    medians = {
        slices: {key: statistics.median(r[key]) for key in (*STAGES, "collections")}
        for slices, found in runs.items()
        for r in [{key: [run[key] for run in found] for key in (*STAGES, "collections")}]
    }
    header = ["slices", *[f"{stage} s" for stage in STAGES], "full collections"]
    rows = [
        [slices, *[m[stage] for stage in STAGES], m["collections"]] for slices, m in medians.items()
    ]
    print(markdown_table(header, rows))
    write_json(
        args.json,
        {
            "benchmark": "worker_profile",
            "args": vars(args) | {"json": None},
            "runs": {str(k): v for k, v in runs.items()},
            "medians": {str(k): v for k, v in medians.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
