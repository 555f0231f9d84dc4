"""bench.ingest runs end to end on a few instances: every target stores them all, the rounds
alternate, and the JSON holds every run, the median of each and the CPU time per instance of
receivers and senders (no speed is asserted)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from sqlalchemy import text

from acwi_node.ledger.repository import make_engine
from bench.ingest import POSTGRES_ADMIN_URL, main


def test_the_ingest_bench_runs_and_writes_every_round(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    code = main(
        ["--ct", "2", "--small", "6", "--parallel", "2,3", "--repeat", "2",
         "--each", "3", "--targets", "storescp,node", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    rows = ["2 CT 512x512x16, 1 assoc.", "6 small, 1 assoc.", "2 CT 512x512x16, 2 assoc.",
            "6 small, 2 assoc.", "2 CT 512x512x16, 3 assoc.", "6 small, 3 assoc.",
            "3 small, one assoc. each"]  # fmt: skip
    assert list(report["runs"]) == rows
    # Each parallel row's rate against the same target's over one association.
    assert list(report["scaling"]) == rows[2:6]
    for row in rows[2:6]:
        single = row.rpartition(", ")[0] + ", 1 assoc."
        for target in ("storescp", "node"):
            expected = report["results"][row][target] / report["results"][single][target]
            assert report["scaling"][row][target] == round(expected, 2)
    # One flush of an instance's bytes, probed once per set of instances on the targets' disk.
    assert set(report["flush_us"]) == {"2 CT 512x512x16", "6 small"}
    assert all(us > 0 for us in report["flush_us"].values())
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


@pytest.mark.parametrize("target", ["node-postgres", "node-server"])
def test_the_node_with_its_ledger_on_postgresql_is_a_target(tmp_path: Path, target: str) -> None:
    """``node-postgres`` (and ``node-server``, with a listener process per core): every
    instance is counted in a PostgreSQL ledger made for the run, and the database is gone
    afterwards."""
    out = tmp_path / "ingest.json"
    before = _bench_databases()
    code = main(
        ["--ct", "0", "--small", "6", "--parallel", "2", "--each", "0",
         "--targets", target, "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["results"]["6 small, 1 assoc."][target] > 0
    assert report["results"]["6 small, 2 assoc."][target] > 0
    assert _bench_databases() == before


def _bench_databases() -> set[str]:
    engine = make_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE 'acwi_bench_%'")
            )
            return {str(row[0]) for row in rows}
    finally:
        engine.dispose()
