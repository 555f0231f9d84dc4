"""A PostgreSQL ledger that refuses connections for a while (a restart, a failover,
max_connections reached), then takes them again: the node logs the outage without a traceback
per pass or per C-STORE, answers what it cannot record with a failure, and goes on by itself."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from acwi_node.config import Settings, load_settings
from acwi_node.ingest import scp as scp_module
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job
from acwi_node.observability.logging import LOOP_FAILURE_RETRY_S
from acwi_node.observability.metrics import LedgerCollector
from acwi_node.tasks import analyse
from models.data.synth import write_study
from tests.conftest import POSTGRES_ADMIN_URL
from tests.integration.test_scp import make_sc, send
from tests.support.ports import free_port
from tests.support.review_case import review_settings, store_and_route


class Outage:
    """Makes the test's database refuse connections (and ends those it has), as a server that
    restarts or fails over does, without stopping the server the other tests use."""

    def __init__(self, database_url: str) -> None:
        self.name = database_url.rsplit("/", 1)[1]
        self.admin = create_engine(
            POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"),
            isolation_level="AUTOCOMMIT",
        )

    def begin(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": self.name},
            )

    def end(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true'))


@pytest.fixture
def outage(postgres_url: str) -> Iterator[Outage]:
    db = Outage(postgres_url)
    try:
        yield db
    finally:
        db.end()
        db.admin.dispose()


@contextmanager
def scp_on(tmp_path: Path, database_url: str) -> Iterator[tuple[StorageSCP, Ledger]]:
    settings = load_settings(
        None,
        node={
            "data_dir": tmp_path / "data",
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "database_url": database_url,
        },
        ingest={"fsync": False, "journal_checkpoint_s": 300},
    )
    ledger = Ledger(settings.database_url)
    scp = StorageSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        yield scp, ledger
    finally:
        scp.stop()
        ledger.dispose()


def test_the_scp_logs_one_traceback_for_an_outage_and_answers_a_failure_after_it(
    tmp_path: Path,
    postgres_url: str,
    outage: Outage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with scp_on(tmp_path, postgres_url) as (scp, ledger):
        settings = scp.settings
        assert send(settings, [make_sc(generate_uid())]) == [0]  # the ledger works
        outage.begin()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="acwi_node.ingest"):
            acknowledged = make_sc(generate_uid())
            # Answered from the journal; its row fails after the answer.
            assert send(settings, [acknowledged]) == [0]
            # The ledger is known to be down: the next ones are refused, the sender retries.
            for _ in range(3):
                assert send(settings, [make_sc(generate_uid())]) == [
                    scp_module.STATUS_LEDGER_UNAVAILABLE
                ]
        failures = [r for r in caplog.records if "could not record" in r.getMessage()]
        assert len(failures) == 4
        assert [r.exc_info is not None for r in failures] == [True, False, False, False]
        assert all("OperationalError" in r.getMessage() for r in failures[1:])
        outage.end()
        assert scp.journal is not None
        assert scp.journal.checkpoint() > 0
        assert ledger.instance_file(acknowledged.SOPInstanceUID) is not None
        assert send(settings, [make_sc(generate_uid())]) == [0]


class CountedPasses:
    """The completion loop's wake-up event: ends the outage before pass ``back_at``, stops
    the loop after pass ``passes``, and keeps each wait asked for."""

    def __init__(self, loop: CompletionService, outage: Outage, back_at: int, passes: int):
        self.loop, self.outage, self.back_at, self.passes = loop, outage, back_at, passes
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0))
        if len(self.waits) == self.back_at:
            self.outage.end()
        if len(self.waits) == self.passes:
            self.loop._stop.set()
        return False

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass


def test_the_completion_loop_logs_an_outage_once_and_its_end(
    tmp_path: Path,
    postgres_url: str,
    outage: Outage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": postgres_url},
        completion={"poll_interval_s": 0.1},
    )
    ledger = Ledger(settings.database_url)
    try:
        loop = CompletionService(settings, ledger, Celery("acwi-test-outage", broker="memory://"))
        loop.tick()  # a pass that works: the pool holds a connection the outage ends
        passes = CountedPasses(loop, outage, back_at=4, passes=6)
        loop._wake = passes  # type: ignore[assignment]
        outage.begin()
        with caplog.at_level(logging.INFO, logger="acwi_node.completion"):
            loop.run()
    finally:
        ledger.dispose()
    lines = [r for r in caplog.records if r.name == "acwi_node.completion"]
    assert [(r.levelno, r.exc_info is not None) for r in lines] == [
        (logging.ERROR, True),
        (logging.WARNING, False),
    ]
    assert "works again after 4 failed tries" in lines[1].getMessage()
    # While the ledger is down a pass is tried once a second, not ten times.
    assert passes.waits == [LOOP_FAILURE_RETRY_S] * 4 + [0.1, 0.1]
    assert loop.last_pass is not None


@pytest.mark.parametrize(
    ("query", "connect_timeout"), [("", "10"), ("?connect_timeout=3", "3")], ids=["default", "url"]
)
def test_a_postgresql_ledger_gives_up_on_a_server_that_stops_answering(
    postgres_url: str, query: str, connect_timeout: str
) -> None:
    """A server that no longer answers (its address gone in a failover, a connection a
    firewall dropped without a reset) fails the call under way in seconds, not after the
    kernel's quarter of an hour of retransmissions; the URL's own settings win."""
    ledger = Ledger(postgres_url + query)
    try:
        with ledger.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            params = dbapi.info.get_parameters()
    finally:
        ledger.dispose()
    assert params["connect_timeout"] == connect_timeout
    assert params["tcp_user_timeout"] == "30000"
    assert (params["keepalives"], params["keepalives_idle"]) == ("1", "30")


class Pauses:
    """The analyse task's waits between tries while the ledger is down: ends the outage at
    wait ``back_at`` and keeps each wait asked for."""

    def __init__(self, outage: Outage, back_at: int) -> None:
        self.outage, self.back_at = outage, back_at
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) == self.back_at:
            self.outage.end()


def _worker_on(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, Ledger, int]:
    """A node on the test's database, a study routed to the review model (its job queued),
    and the analyse task bound to them as a worker's is."""
    settings = review_settings(tmp_path, database_url=postgres_url)
    ledger = Ledger(settings.database_url)
    files = write_study(tmp_path / "study", n_images=1, size=64, seed=5)
    job_id, _ = store_and_route(settings, ledger, files)
    monkeypatch.setattr(analyse, "_state", {"settings": settings, "ledger": ledger})
    return settings, ledger, job_id


def _job(ledger: Ledger, job_id: int) -> tuple[str, int, str]:
    with ledger.session() as s:
        job = s.get_one(Job, job_id)
        return job.state.value, job.attempts, job.error


def test_a_job_taken_while_the_ledger_is_down_is_analysed_as_soon_as_it_answers(
    tmp_path: Path,
    postgres_url: str,
    outage: Outage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker took the job's message while the database refused connections: the job was
    left queued, and analysed only when the reconciler sent it again (two minutes late). The
    task keeps the message and tries again once a second, logging the outage once and its
    end; the job is analysed at the first try after the ledger's return, its one attempt
    counted."""
    _, ledger, job_id = _worker_on(tmp_path, postgres_url, monkeypatch)
    pauses = Pauses(outage, back_at=3)
    monkeypatch.setattr(analyse, "_pause", pauses, raising=False)
    try:
        outage.begin()
        with caplog.at_level(logging.INFO, logger="acwi_node.worker"):
            assert analyse.analyse_job(job_id) == "analysed"
        assert _job(ledger, job_id) == ("exporting", 1, "")
    finally:
        ledger.dispose()
    assert pauses.waits == [LOOP_FAILURE_RETRY_S] * 3
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info is not None) for r in lines] == [
        (logging.ERROR, True),
        (logging.WARNING, False),
    ]
    assert f"job {job_id}: the ledger works again after 3 failed tries" in lines[1].getMessage()


def test_a_ledger_outage_while_a_job_is_analysed_costs_it_no_attempt(
    tmp_path: Path,
    postgres_url: str,
    outage: Outage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database went away while the worker built the job's results: the job stayed
    claimed until its lease ran out, and the worker that took it over counted a second
    attempt (``worker.max_attempts`` outages of the ledger failed it for good, as if the study
    had killed its workers). The task waits for the ledger, gives its claim back, its attempt
    not counted, and analyses the job again: with ``max_attempts = 1`` it is analysed."""
    settings, ledger, job_id = _worker_on(tmp_path, postgres_url, monkeypatch)
    settings.worker.max_attempts = 1
    monkeypatch.setattr(analyse, "_pause", Pauses(outage, back_at=2), raising=False)
    real_build_sr = analyse.build_sr
    builds = 0

    def build_sr(*args: Any, **kwargs: Any) -> Any:
        nonlocal builds
        builds += 1
        if builds == 1:  # the ledger goes away while the results are written
            outage.begin()
        return real_build_sr(*args, **kwargs)

    monkeypatch.setattr(analyse, "build_sr", build_sr)
    try:
        assert analyse.analyse_job(job_id) == "analysed"
        assert _job(ledger, job_id) == ("exporting", 1, "")
        uid = ledger.job_inputs(job_id)[0]
        view = ledger.get_study(uid)
        assert view is not None and view["state"] == "exporting"
    finally:
        ledger.dispose()
    assert builds == 2
    results = sorted(p.name for p in (settings.results_dir / uid).glob("*.dcm"))
    assert len(results) == 2  # the SR and a heatmap, once


def test_the_metrics_log_a_ledger_outage_once_a_minute_without_credentials(
    tmp_path: Path, postgres_url: str, outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    """Every ``/metrics`` scrape while the ledger was down logged "the ledger is unavailable"
    with the whole error. It is logged as a loop's failure is: with its traceback at the first
    scrape, then a line a minute, then once it answers again; and none of it names the
    database's password."""
    password = "not-in-any-log-4711"
    url = postgres_url.replace("://postgres@", f"://postgres:{password}@")
    assert password in url
    settings = load_settings(None, node={"data_dir": tmp_path / "data", "database_url": url})
    ledger = Ledger(settings.database_url)
    now = [0.0]
    collector = LedgerCollector(settings, ledger, clock=lambda: now[0])

    def ledger_up() -> float:
        families = {f.name: f for f in collector.collect()}
        return families["acwi_ledger_up"].samples[0].value

    try:
        assert ledger_up() == 1
        outage.begin()
        with caplog.at_level(logging.INFO, logger="acwi_node.metrics"):
            ups = [ledger_up() for _ in range(3)]
            now[0] += 61
            ups.append(ledger_up())
            outage.end()
            ups.append(ledger_up())
    finally:
        ledger.dispose()
    assert ups == [0, 0, 0, 0, 1]
    lines = [r for r in caplog.records if r.name == "acwi_node.metrics"]
    assert [(r.levelno, r.exc_info is not None) for r in lines] == [
        (logging.ERROR, True),
        (logging.ERROR, False),
        (logging.WARNING, False),
    ]
    assert "metrics: reading the ledger still failing after 4 tries" in lines[1].getMessage()
    assert "OperationalError" in lines[1].getMessage()
    assert "works again after 4 failed tries" in lines[2].getMessage()
    assert password not in caplog.text


def test_a_ledger_outage_while_a_shadow_job_runs_costs_it_no_attempt(
    tmp_path: Path,
    postgres_url: str,
    outage: Outage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database went away while a shadow model analysed: the task's error handler could
    not fail the shadow job either, the task ended on the outage, and the shadow job stayed
    claimed until its lease ran out (the worker that took it over then counted a second
    attempt). The shadow task waits for the ledger as the analyse task does, gives its claim
    back, its attempt not counted, and runs it again: with ``max_attempts = 1`` it is done."""
    from acwi_node.ledger.models import ShadowJob, ShadowState
    from acwi_node.ledger.shadow import ShadowJobs
    from acwi_node.tasks import shadow
    from tests.support.model_variant import model_variant
    from tests.support.review_case import DESTINATION, MODEL, ROUTE

    challenger = model_variant(
        tmp_path / "challenger", version="1.2.0-rc1", uncertainty_threshold=1.0, ood_threshold=1e9
    )
    settings = review_settings(
        tmp_path,
        database_url=postgres_url,
        extra_models=[{"name": "challenger", "manifest": challenger}],
        routes=[
            {
                "name": ROUTE,
                "model": MODEL,
                "destinations": [DESTINATION],
                "shadow_models": ["challenger"],
            }
        ],
    )
    ledger = Ledger(settings.database_url)
    monkeypatch.setattr(analyse, "_enqueue_shadow", lambda *_args: None)
    try:
        files = write_study(tmp_path / "study", n_images=1, size=64, seed=5)
        job_id, _ = store_and_route(settings, ledger, files)
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
        (shadow_id,) = ShadowJobs(ledger).of_job(job_id)
        settings.worker.max_attempts = 1
        monkeypatch.setattr(analyse, "_state", {"settings": settings, "ledger": ledger})
        monkeypatch.setattr(analyse, "_pause", Pauses(outage, back_at=2), raising=False)
        real_summarise = shadow.summarise
        summaries = 0

        def summarise(*args: Any, **kwargs: Any) -> Any:
            nonlocal summaries
            summaries += 1
            if summaries == 1:  # the ledger goes away once the shadow model has analysed
                outage.begin()
            return real_summarise(*args, **kwargs)

        monkeypatch.setattr(shadow, "summarise", summarise)
        assert shadow.shadow_job(shadow_id) == "analysed"
        with ledger.session() as s:
            row = s.get_one(ShadowJob, shadow_id)
            assert (row.state, row.attempts, row.error) == (ShadowState.DONE, 1, "")
    finally:
        ledger.dispose()
    assert summaries == 2
