"""What keeps the ledger's readers quick over a year of a hospital's studies, checked as
properties rather than timed: the model-monitoring query reads the summaries of the jobs it
returns and no others, /metrics recounts every instance row at most once a minute, and the
retention sweep's search for studies to purge is not compiled to machine code first."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.monitoring.report import ModelMonitor
from acwi_node.observability.metrics import INSTANCE_COUNT_REFRESH_S, LedgerCollector
from acwi_node.retention.store import RetentionStore
from tests.support.monitoring_jobs import Jobs
from tests.support.study_flow import dx_record


@pytest.fixture
def pg_node(tmp_path: Path, postgres_url: str) -> Iterator[tuple[Settings, Ledger]]:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": postgres_url},
        ingest={"fsync": False},
        monitoring={"baseline_studies": 10, "min_studies": 10},
    )
    ledger = Ledger(settings.database_url)
    yield settings, ledger
    ledger.dispose()


def _statements(ledger: Ledger) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def _seen(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: Any) -> None:
        seen.append((statement, params))

    return seen


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest.mark.integration
def test_the_monitoring_baseline_parses_only_the_summaries_of_the_jobs_it_returns(
    pg_node: tuple[Settings, Ledger],
) -> None:
    """A version's first studies: the jobs are picked first, by their columns alone, and
    each summary the query reads is parsed once, for those jobs only (it read every matching
    job's, several times, and every other job's to tell whether it was a later analysis)."""
    settings, ledger = pg_node
    jobs = Jobs(ledger)
    start = utcnow() - dt.timedelta(days=3)
    for k in range(40):
        jobs.add(start + dt.timedelta(minutes=k), version="2.0.0")
    seen = _statements(ledger)
    _baseline, samples = ModelMonitor(ledger, settings.monitoring).baseline("dianet-cxr", "2.0.0")
    assert len(samples) == 10
    statement, params = seen[-1]
    with ledger.engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute("EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " + statement, params)
        (explained,) = cursor.fetchall()
        plan = explained[0][0]["Plan"]
    nodes = list(_nodes(plan))
    parses = [n for n in nodes if n.get("Function Name") == "json_to_record"]
    assert parses, "the summaries' fields are not read in one parse each"
    assert sum(n["Actual Loops"] for n in parses) == 10
    for node in nodes:
        # no scan tests whether a job analysed something (its summary's label) on its own:
        # only a later analysis of the same study is asked (in the anti-join's CASE)
        for key in ("Filter", "Join Filter", "Index Cond", "Recheck Cond"):
            condition = node.get(key, "")
            if "predicted_label" in condition:
                later = "CASE WHEN (jobs_1_1.generation > jobs_1.generation) THEN"
                assert condition.find("predicted_label") > condition.find(later) >= 0, (
                    node["Node Type"],
                    condition,
                )


def test_metrics_recount_the_instance_rows_at_most_once_a_minute(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    ledger.record_instance(dx_record("1.2.3", "1.2.3.1", ae="MOD"), first_in_association=True)
    now = [1000.0]
    collector = LedgerCollector(settings, ledger, clock=lambda: now[0])
    seen = _statements(ledger)

    def scrape() -> dict[str, float]:
        seen.clear()
        for family in collector._from_ledger():
            if family.name == "acwi_instances":
                return {s.labels["calling_ae"]: s.value for s in family.samples}
        raise AssertionError("no acwi_instances gauge")

    def counted_instances() -> bool:
        return any("FROM instances" in statement for statement, _ in seen)

    assert scrape() == {"MOD": 1}
    assert counted_instances()
    ledger.record_instance(dx_record("1.2.3", "1.2.3.2", ae="MOD"), first_in_association=False)
    now[0] += INSTANCE_COUNT_REFRESH_S - 1
    assert scrape() == {"MOD": 1}  # the figure of the last count
    assert not counted_instances()
    now[0] += 1
    assert scrape() == {"MOD": 2}
    assert counted_instances()


@pytest.mark.integration
def test_the_retention_candidates_are_not_compiled_first(
    pg_node: tuple[Settings, Ledger],
) -> None:
    """PostgreSQL's JIT compilation of the search for studies to purge took three times as
    long as the search over a year of studies: the sweep's transaction turns it off."""
    _settings, ledger = pg_node
    jit: list[str] = []

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def _jit(_c: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.startswith("SELECT studies.id, studies.study_uid"):
            jit.append(cursor.connection.execute("SHOW jit").fetchone()[0])

    with ledger.engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute("SHOW jit")
        assert cursor.fetchall() == [("on",)], "the server's default: JIT on"
    now = utcnow()
    RetentionStore(ledger).candidates(unreviewed_before=now, reviewed_before=now)
    assert jit == ["off"]
