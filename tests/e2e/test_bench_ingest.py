"""bench.ingest runs end to end on a few instances: every target stores them all, the rounds
alternate, and the JSON holds every run, the median of each and the CPU time per instance of
receivers and senders (no speed is asserted)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.ingest import main


def test_the_ingest_bench_runs_and_writes_every_round(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    code = main(
        ["--ct", "2", "--small", "6", "--parallel", "2", "--repeat", "2",
         "--each", "3", "--targets", "storescp,node", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    rows = ["2 CT 512x512x16, 1 assoc.", "6 small, 1 assoc.", "2 CT 512x512x16, 2 assoc.",
            "6 small, 2 assoc.", "3 small, one assoc. each"]  # fmt: skip
    assert list(report["runs"]) == rows
    for row in rows:
        for target in ("storescp", "node"):
            figures = report["runs"][row][target]
            assert len(figures) == 2 and all(f > 0 for f in figures)
            assert report["results"][row][target] == statistics.median(figures)
            cpu = report["cpu_runs"][row][target]
            assert len(cpu["receiver"]) == len(cpu["sender"]) == 2
            # Each storescu spends CPU time reading and sending; the receivers' accounting
            # must find their processes (0.0 for every run would mean it found none).
            assert all(ms > 0 for ms in cpu["sender"])
            assert report["cpu_ms_per_instance"][row][target]["receiver"] == statistics.median(
                cpu["receiver"]
            )
        assert any(
            ms > 0
            for target in ("storescp", "node")
            for ms in report["cpu_runs"][row][target]["receiver"]
        )
