"""Worker memory: a CT's analysis in the worker's own code, the peak resident memory it adds.

    python -m bench.worker_memory                        # 50 and 200 slices of 512 x 512
    python -m bench.worker_memory --slices 100,400 --parametric-maps --json memory.json
    python -m bench.worker_memory --enhanced             # the series as one multi-frame image

Each count runs in a fresh process: a synthetic CT series is spooled and recorded in a SQLite
ledger, routed to the bundled model, the model loaded (the baseline), and the analyse task
(:func:`acwi_node.tasks.analyse.run_job`: reading, analysis, SR, heatmaps, their files) run
while a thread samples the process's resident memory every 5 ms. It prints the peak above the
baseline, per slice, and the marginal cost per slice between the first and the last count:
what a worker needs beyond its model for a series of that size (capacity planning).
``--enhanced`` sends each series as one Enhanced (Legacy Converted) CT image of as many frames,
as a scanner that sends enhanced objects would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import markdown_table, ratio, spool_and_record, write_json

MIB = 1 << 20


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(
    slices: int, size: int, parametric_maps: bool, enhanced: bool = False
) -> dict[str, Any]:
    """One analysis of a ``slices``-slice CT (one image of ``slices`` frames: ``enhanced``),
    in this process."""

    from acwi_node.config import load_settings
    from acwi_node.ingest.spool import Spool
    from acwi_node.ledger import Ledger, RoutedJob
    from acwi_node.tasks.analyse import get_analyser, run_job

    work = Path(tempfile.mkdtemp(prefix="acwi-bench-memory-"))
    # Written by another process: what writing them takes (highdicom's conversion holds every
    # slice) is not left in this one's memory, under the baseline.
    writer = "write_enhanced_ct" if enhanced else "write_ct_series"
    script = (
        f"from models.data.synth import {writer}; "
        f"{writer}({str(work / 'ct')!r}, slices={slices}, size={size})"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    files = sorted((work / "ct").glob("*.dcm"))
    settings = load_settings(
        None,
        node={"data_dir": work / "data"},
        ingest={"fsync": False},
        worker={"mc_samples": 10, "parametric_maps": parametric_maps},
    )
    ledger = Ledger(settings.database_url)
    spool = Spool(settings.spool_dir, fsync=False)
    recorded = None
    for n, path in enumerate(files):
        recorded = spool_and_record(ledger, spool, path, first=n == 0)
    assert recorded is not None
    ledger.association_released([recorded.study_id])
    route = RoutedJob("ct", "default", [], 0)
    (job,) = ledger.complete_study(recorded.study_id, recorded.generation, lambda _f: [route])
    get_analyser(settings, "default")  # the model is part of the baseline
    baseline = resident_bytes()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    outcome = run_job(settings, ledger, job)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    ledger.dispose()
    if outcome != "analysed":
        raise RuntimeError(f"the analysis of {slices} slices ended {outcome!r}")
    return {
        "slices": slices,
        "enhanced": enhanced,
        "size": size,
        "baseline_mib": baseline / MIB,
        "peak_above_baseline_mib": (peak[0] - baseline) / MIB,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="50,200", help="slice counts, each in a fresh process")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of a slice")
    parser.add_argument("--parametric-maps", action="store_true", help="worker.parametric_maps")
    parser.add_argument(
        "--enhanced", action="store_true", help="each series as one multi-frame Enhanced CT image"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's single count
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.size, args.parametric_maps, args.enhanced)))
        return 0

    results = []
    for slices in [int(n) for n in args.slices.split(",") if n.strip()]:
        child = [sys.executable, "-m", "bench.worker_memory", "--one", str(slices)]
        child += ["--size", str(args.size)]
        child += ["--parametric-maps"] if args.parametric_maps else []
        child += ["--enhanced"] if args.enhanced else []
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{slices} slices: {r['peak_above_baseline_mib']:.0f} MiB above the loaded worker")
    rows = [
        [
            r["slices"],
            r["baseline_mib"],
            r["peak_above_baseline_mib"],
            ratio(r["peak_above_baseline_mib"], r["slices"]),
            r["seconds"],
        ]
        for r in results
    ]
    print()
    header = ["slices", "worker MiB", "peak above it MiB", "MiB per slice", "analysis s"]
    print(markdown_table(header, rows))
    marginal = None
    if len(results) > 1 and results[-1]["slices"] != results[0]["slices"]:
        first, last = results[0], results[-1]
        marginal = (last["peak_above_baseline_mib"] - first["peak_above_baseline_mib"]) / (
            last["slices"] - first["slices"]
        )
        print(f"\nmarginal: {marginal:.2f} MiB per slice of {args.size} x {args.size}")
    write_json(
        args.json,
        {
            "benchmark": "worker_memory",
            "args": vars(args) | {"json": None},
            "results": results,
            "marginal_mib_per_slice": marginal,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
