"""What keeps the ledger's readers quick over a year of a hospital's studies, checked as
properties rather than timed: the model-monitoring query reads the summaries of the jobs it
returns and no others, /metrics recounts every instance row at most once a minute, the
retention sweep's search for studies to purge is not compiled to machine code first, and a
model version's recall and the feedback export read the ledger with as many statements for
many studies as for a few."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, Purge, utcnow
from acwi_node.ledger.withdrawals import Withdrawals
from acwi_node.monitoring.report import ModelMonitor
from acwi_node.observability.metrics import INSTANCE_COUNT_REFRESH_S, LedgerCollector
from acwi_node.retention.store import RetentionStore
from acwi_node.review.feedback import export_feedback
from acwi_node.review.store import ReviewStore, SessionInfo
from tests.support import write_secondary_capture
from tests.support.monitoring_jobs import Jobs
from tests.support.review_case import add_user
from tests.support.study_flow import analyse, delivered_study, dx_record, receive, study_id


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


def test_a_recall_reads_as_many_statements_for_many_analyses_as_for_a_few(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """``models recall`` (and its dry run) lists every analysis of a model version: whether
    storage retention deleted each one's files is asked of all of them together (it was one
    query an analysis: 66 s for a year's 100,000)."""
    settings, ledger = ledger_node
    seen = _statements(ledger)
    counts: list[int] = []
    for batch in (range(2), range(2, 7)):
        for n in batch:
            delivered_study(settings, ledger, f"1.2.7.{n}", n=1)
        if not counts:  # the first study's files deleted by storage retention
            with ledger.session() as s:
                s.add(
                    Purge(study_id=study_id(ledger, "1.2.7.0"), generation=1, reason="age",
                          received_before=utcnow())
                )  # fmt: skip
        seen.clear()
        found = Withdrawals(ledger).candidates(
            model_name="acwi-dianet-chest", model_version="1.0.0"
        )
        counts.append(len(seen))
    assert counts[0] == counts[1], counts
    assert [(j.study_uid, j.files_deleted) for j in found.jobs] == [
        (f"1.2.7.{n}", n == 0) for n in range(7)
    ]
    assert all(j.results and j.results[0].destinations == ("pacs",) for j in found.jobs)


def test_the_feedback_export_reads_as_many_statements_for_many_cases_as_for_a_few(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """The reviewed cases come in one query, their images' spool paths in one query per 500
    cases (it was three queries a case and one an image: 36 s for a year's 10,000 cases)."""
    settings, ledger = ledger_node
    store = ReviewStore(ledger)
    add_user(ledger)
    user = store.get_user("jane.doe")
    assert user is not None
    jane = SessionInfo(user.id, user.name, user.role, "", utcnow())
    seen = _statements(ledger)
    counts: list[int] = []
    exported: list[int] = []
    for batch in (range(2), range(2, 7)):
        for n in batch:
            study = f"1.2.8.{n}"
            receive(settings, ledger, study, f"{study}.1")
            image = write_secondary_capture(
                tmp_path / f"{study}.dcm", study_uid=study, sop_instance_uid=f"{study}.1"
            )
            Spool(settings.spool_dir, fsync=False).store(study, f"{study}.1", image.read_bytes())
            job_id = analyse(settings, ledger, study, needs_review=True)
            with ledger.session() as s:  # the image the model read
                job = s.get_one(Job, job_id)
                job.summary = {**job.summary, "images": [{"sop_instance_uid": f"{study}.1"}]}
            (item,) = [i["id"] for i in ledger.worklist() if i["study_uid"] == study]
            label = "normal" if n % 2 else "nodule"
            store.claim_verdict(
                item, user=jane, action="override" if n % 2 else "confirm", label=label,
                model_label="nodule", reason="r",
            )  # fmt: skip
        seen.clear()
        report = export_feedback(settings, ledger, tmp_path / f"out{len(batch)}", deidentify=False)
        counts.append(len(seen))
        exported.append(report.images)
    assert exported == [2, 7] and report.missing == 0
    assert counts[0] == counts[1], counts
    labels = (tmp_path / "out5" / "labels.csv").read_text()
    assert "1.2.8.6.1,,1.2.8.6,nodule" in labels and "1.2.8.5.1,,1.2.8.5,normal" in labels
