"""Shadow models: a route's shadow model analyses each study after the live one, its summary
kept and compared, nothing of it sent, reviewed or counted in the study's state; and the
comparison's statistics."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from acwi_node.config import load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Delivery,
    Job,
    JobState,
    ReviewItem,
    ShadowJob,
    ShadowState,
    Study,
    User,
    Verdict,
)
from acwi_node.ledger.shadow import ShadowJobs
from acwi_node.monitoring.drift import mcnemar_p
from acwi_node.monitoring.shadow import (
    Pair,
    ShadowComparison,
    cohen_kappa,
    compare_pairs,
    format_shadow,
)
from acwi_node.tasks import analyse, shadow
from acwi_node.tasks.queue import enqueue_shadow, reconcile
from models.data.synth import write_study
from tests.support.claim_loss import lose_claim_at_first_batch
from tests.support.model_variant import model_variant
from tests.support.review_case import (
    DESTINATION,
    MODEL,
    ROUTE,
    add_user,
    review_settings,
    store_and_route,
)

CHALLENGER = "challenger"


# ---------------------------------------------------------------------------- statistics
def test_mcnemar_is_the_exact_binomial_of_the_discordant_pairs() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    # thousands of pairs: exact integers, no overflow
    assert 0.0 < mcnemar_p(2000, 2300) < 0.001


def test_kappa_is_agreement_beyond_chance() -> None:
    assert cohen_kappa([]) is None
    assert cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    assert cohen_kappa([("a", "a")] * 3) == 1.0  # one label both always say
    # agreement 50 % where chance alone gives 50 %: kappa 0
    assert cohen_kappa([("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")]) == pytest.approx(0.0)


def _pair(live: str, shadow: str, truth: str = "", *, lr: bool = False, sr: bool = False) -> Pair:
    return Pair(
        "chest", ("m", "1.0"), ("m", "1.1"), live, shadow,
        live != "normal", shadow != "normal", lr, sr, truth,
    )  # fmt: skip


def test_a_comparison_counts_agreement_reviews_and_right_answers() -> None:
    pairs = (
        [_pair("normal", "normal", "normal")] * 6
        + [_pair("nodule", "nodule", "nodule", lr=True)] * 2
        + [_pair("normal", "nodule", "nodule", lr=True, sr=True)] * 2  # shadow right
        + [_pair("nodule", "normal", lr=True)] * 1  # no verdict
        + [_pair("effusion", "effusion", sr=True)] * 1
    )
    r = compare_pairs(pairs)
    assert r.studies == 12
    assert r.label_agreement == pytest.approx(9 / 12)
    assert r.finding_agreement == pytest.approx(9 / 12)
    assert (r.live_review_rate, r.shadow_review_rate) == (pytest.approx(5 / 12), 0.25)
    assert r.review_p == pytest.approx(mcnemar_p(3, 1))
    assert r.confusion == {
        "normal": {"normal": 6, "nodule": 2},
        "nodule": {"nodule": 2, "normal": 1},
        "effusion": {"effusion": 1},
    }
    assert (r.verdicts, r.live_correct, r.shadow_correct) == (10, 8, 10)
    assert r.correct_p == pytest.approx(mcnemar_p(0, 2))
    text = format_shadow([r], [], days=7)
    assert "radiologists' verdicts on 10 studies: live right 80.0%, shadow right 100.0%" in text
    assert "live normal: shadow nodule 2, normal 6" in text


# ---------------------------------------------------------------------------- the node
def _challenger(root: Path, *, version: str = "1.2.0-rc1") -> Path:
    """The bundled model as a new version that sends nothing to review."""
    return model_variant(
        root / "challenger", version=version, uncertainty_threshold=1.0, ood_threshold=1e9
    )


def _settings(tmp_path: Path, **extra: Any) -> Any:
    return review_settings(
        tmp_path,
        extra_models=[{"name": CHALLENGER, "manifest": _challenger(tmp_path)}],
        routes=[
            {
                "name": ROUTE,
                "model": MODEL,
                "destinations": [DESTINATION],
                "shadow_models": [CHALLENGER],
            }
        ],
        **extra,
    )


class Bell:
    """A broker that records what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        self.sent.append((name, args, queue))


def _studies(settings: Any, ledger: Ledger, tmp_path: Path, n: int) -> list[int]:
    jobs = []
    for seed in range(n):
        files = write_study(
            tmp_path / f"src{seed}", n_images=1, label=("normal", "nodule", "effusion")[seed % 3],
            seed=seed, size=128, accession_number=f"A{seed}",
        )  # fmt: skip
        job_id, _ = store_and_route(settings, ledger, files)
        jobs.append(job_id)
    return jobs


@dataclass
class Node:
    """A node whose route has a shadow model, its ledger, and the broker its worker rings."""

    settings: Any
    ledger: Ledger
    bell: Bell


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    settings = _settings(tmp_path)
    ledger = Ledger(settings.database_url)
    bell = Bell()
    monkeypatch.setattr(analyse, "app", bell)
    yield Node(settings, ledger, bell)
    ledger.dispose()


def test_a_shadow_model_analyses_after_the_live_one_and_nothing_of_it_leaves(
    tmp_path: Path, node: Node
) -> None:
    settings, ledger, bell = node.settings, node.ledger, node.bell
    jobs = _studies(settings, ledger, tmp_path, 3)
    for job_id in jobs:
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
    # one shadow job per live job, queued with its results and rung on the shadow queue
    shadows = ShadowJobs(ledger)
    ids = [i for job_id in jobs for i in shadows.of_job(job_id)]
    assert len(ids) == 3
    assert bell.sent == [("acwi_node.shadow", [i], "analysis.shadow") for i in ids]
    with ledger.session() as s:
        live_state = {j.id: j.state for j in s.scalars(select(Job))}
        deliveries = s.scalar(select(func.count()).select_from(Delivery))
        items = s.scalar(select(func.count()).select_from(ReviewItem))
        study_states = sorted(st.state.value for st in s.scalars(select(Study)))
    for shadow_id in ids:
        assert shadow.run_shadow(settings, ledger, shadow_id) == "analysed"
        assert shadow.run_shadow(settings, ledger, shadow_id) == "skipped"  # done
    with ledger.session() as s:
        rows = s.scalars(select(ShadowJob)).all()
        assert {r.state for r in rows} == {ShadowState.DONE}
        assert {r.summary["model"]["version"] for r in rows} == {"1.2.0-rc1"}
        assert {j.id: j.state for j in s.scalars(select(Job))} == live_state
        # no result object, delivery or review item of its own; the studies as they were
        assert s.scalar(select(func.count()).select_from(Delivery)) == deliveries
        assert s.scalar(select(func.count()).select_from(ReviewItem)) == items == 3
        assert sorted(st.state.value for st in s.scalars(select(Study))) == study_states

    # a radiologist's verdict on the first case: it was an effusion
    add_user(ledger)
    with ledger.session() as s:
        user = s.scalars(select(User)).one()
        item = s.scalars(select(ReviewItem).where(ReviewItem.job_id == jobs[0])).one()
        live_label = s.get_one(Job, jobs[0]).summary["predicted_label"]
        s.add(
            Verdict(
                review_item_id=item.id,
                study_id=item.study_id,
                job_id=jobs[0],
                user_id=user.id,
                user_name=user.name,
                action="override",
                label="effusion",
                model_label=live_label,
            )  # fmt: skip
        )
    (report,) = ShadowComparison(ledger).report()
    assert report.route == ROUTE
    assert report.live == ("acwi-dianet-chest", "1.1.0")
    assert report.shadow == ("acwi-dianet-chest", "1.2.0-rc1")
    assert report.studies == 3
    # the same weights: the same labels; the live copy sends all to review, the new none
    assert report.label_agreement == 1.0
    assert (report.live_review_rate, report.shadow_review_rate) == (1.0, 0.0)
    assert report.verdicts == 1
    assert report.live_correct == report.shadow_correct == int(live_label == "effusion")
    assert ShadowComparison(ledger).unfinished() == []


def test_a_failing_shadow_model_and_a_superseded_study(
    tmp_path: Path, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, ledger = node.settings, node.ledger
    first, second = _studies(settings, ledger, tmp_path, 2)
    for job_id in (first, second):
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
    shadows = ShadowJobs(ledger)
    (failing,) = shadows.of_job(first)
    (stale,) = shadows.of_job(second)

    def broken(_settings: Any, name: str) -> Any:
        raise RuntimeError(f"the manifest of {name} is unreadable")

    monkeypatch.setattr(shadow, "get_analyser", broken)
    assert shadow.run_shadow(settings, ledger, failing) == "failed"
    (row,) = ShadowComparison(ledger).unfinished()
    assert (row["route"], row["model"], row["failed"], row["pending"]) == (
        ROUTE, CHALLENGER, 1, 1,
    )  # fmt: skip
    assert row["last_error"] == "RuntimeError: the manifest of challenger is unreadable"
    # the second study re-opened: its shadow job is superseded with its live job
    with ledger.session() as s:
        s.get_one(Job, second).state = JobState.SUPERSEDED
    assert shadow.run_shadow(settings, ledger, stale) == "skipped"
    with ledger.session() as s:
        assert s.get_one(ShadowJob, stale).state == ShadowState.SUPERSEDED
    assert ShadowComparison(ledger).report() == []
    # neither failure touched the live jobs or their studies
    with ledger.session() as s:
        assert s.get_one(Job, first).state != JobState.FAILED


def test_the_reconciler_rings_again_for_shadow_jobs(tmp_path: Path, node: Node) -> None:
    # the worker's own ring is lost: a broker that only records it
    settings, ledger = node.settings, node.ledger
    (job_id,) = _studies(settings, ledger, tmp_path, 1)
    assert analyse.run_job(settings, ledger, job_id) == "analysed"
    (shadow_id,) = ShadowJobs(ledger).of_job(job_id)
    bell = Bell()
    assert reconcile(bell, ledger, startup=True, requeue_after_s=60, lease_s=60) == 1
    assert bell.sent == [("acwi_node.shadow", [shadow_id], "analysis.shadow")]
    # enqueued a moment ago: the periodic pass leaves it
    bell.sent.clear()
    assert reconcile(bell, ledger, startup=False, requeue_after_s=60, lease_s=60) == 0
    assert enqueue_shadow(bell, ledger, [shadow_id]) == 1


def test_shadow_models_are_checked_at_start_up(tmp_path: Path) -> None:
    route = {"name": "chest", "model": "default", "shadow_models": ["nowhere"]}
    with pytest.raises(Exception, match="shadow model 'nowhere' is not defined"):
        load_settings(None, node={"data_dir": tmp_path}, routes=[route])
    route["shadow_models"] = ["default"]
    with pytest.raises(Exception, match="shadow model 'default' is the route's own model"):
        load_settings(None, node={"data_dir": tmp_path}, routes=[route])


def _live_job(db: Ledger, uid: str = "2.25.1") -> int:
    """A study and its live job, being analysed."""
    with db.session() as s:
        study = Study(study_uid=uid, calling_ae="SITEA", state="analysing")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, generation=1, route="chest", model="cxr",
                  state=JobState.ANALYSING)  # fmt: skip
        s.add(job)
        s.flush()
        return job.id


def test_the_ledgers_shadow_jobs_on_sqlite_and_postgresql(db: Ledger, tmp_path: Path) -> None:
    """Queued with the live job's results (once, however often they are recorded), claimed
    once, with a lease that runs out; compared with the live job's summary."""
    from tests.support.monitoring_jobs import summary

    job_id = _live_job(db)
    live = summary(label="nodule", review=True)
    for _ in range(2):  # a re-run records the results again: still one shadow job each
        with db.session() as s:
            s.get_one(Job, job_id).state = JobState.ANALYSING
        assert db.finish_analysis(
            job_id, results=[], summary=live, needs_review=True, review_reason="uncertain",
            shadow_models=["cxr-next", "cxr-other"],
        )  # fmt: skip
    shadows = ShadowJobs(db)
    first, second = shadows.of_job(job_id)
    claimed = shadows.claim(first, lease_s=60, max_attempts=2)
    assert claimed is not None and (claimed.job_id, claimed.route, claimed.model) == (
        job_id, "chest", "cxr-next",
    )  # fmt: skip
    assert shadows.claim(first, lease_s=60, max_attempts=2) is None  # its lease runs
    assert shadows.renew(first)
    assert shadows.finish(first, summary(label="normal", version="2.0.0"))
    assert not shadows.renew(first) and not shadows.finish(first, {})
    # a worker that died: its lease (0 s) ran out, taken again, then out of attempts
    assert shadows.claim(second, lease_s=0, max_attempts=2) is not None
    assert shadows.claim(second, lease_s=0, max_attempts=2) is not None
    assert shadows.claim(second, lease_s=0, max_attempts=2) is None
    with db.session() as s:
        failed = s.get_one(ShadowJob, second)
        assert failed.state == ShadowState.FAILED and "2 attempt(s)" in failed.error
    assert shadows.to_requeue(older_than_s=0, lease_s=0, startup=True) == []
    (report,) = ShadowComparison(db).report()
    assert (report.live, report.shadow) == (("dianet-cxr", "1.0.0"), ("dianet-cxr", "2.0.0"))
    assert report.confusion == {"nodule": {"normal": 1}}
    assert (report.live_review_rate, report.shadow_review_rate) == (1.0, 0.0)
    (row,) = ShadowComparison(db).unfinished()
    assert (row["model"], row["failed"], row["pending"]) == ("cxr-other", 1, 0)
    # the metrics count them by state and model
    from acwi_node.observability.metrics import ledger_registry

    registry = ledger_registry(load_settings(None, node={"data_dir": tmp_path}), db)
    for model, state in (("cxr-next", "done"), ("cxr-other", "failed")):
        labels = {"state": state, "model": model}
        assert registry.get_sample_value("acwi_shadow_jobs", labels) == 1


def test_a_study_analysed_again_is_one_pair(db: Ledger) -> None:
    """A reprocessed study (a new generation; the earlier live job stays delivered) gives
    one live/shadow pair: its latest live analysis beside its shadow analysis."""
    from tests.support.monitoring_jobs import summary

    shadows = ShadowJobs(db)

    def analyse(job_id: int, live: str, new: str) -> None:
        assert db.finish_analysis(
            job_id, results=[], summary=summary(label=live), needs_review=False,
            review_reason="", shadow_models=["cxr-next"],
        )  # fmt: skip
        (shadow_id,) = shadows.of_job(job_id)
        assert shadows.claim(shadow_id, lease_s=60, max_attempts=2) is not None
        assert shadows.finish(shadow_id, summary(label=new, version="2.0.0"))

    first = _live_job(db)
    analyse(first, "normal", "nodule")
    with db.session() as s:  # reprocessed: routed again as generation 2
        earlier = s.get_one(Job, first)
        assert earlier.state == JobState.DELIVERED
        s.get_one(Study, earlier.study_id).generation = 2
        again = Job(study_id=earlier.study_id, generation=2, route="chest", model="cxr",
                    state=JobState.ANALYSING)  # fmt: skip
        s.add(again)
        s.flush()
        second = again.id
    analyse(second, "nodule", "nodule")
    (report,) = ShadowComparison(db).report()
    assert report.studies == 1
    assert report.confusion == {"nodule": {"nodule": 1}}  # the latest live analysis
    assert report.label_agreement == 1.0 and report.disagreements == []


def test_where_people_read_the_comparison(
    ledger_node: tuple[Any, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``acwi-node monitor`` (text and JSON), ``GET /api/monitoring`` and the Monitoring page."""
    from fastapi.testclient import TestClient

    from acwi_node.cli import main
    from acwi_node.web.api import create_app
    from tests.support.monitoring_jobs import summary
    from tests.support.review_case import sign_in

    settings, ledger = ledger_node
    shadows = ShadowJobs(ledger)
    for n, (live, new) in enumerate(
        [("nodule", "nodule"), ("normal", "nodule"), ("normal", "normal")]
    ):
        job_id = _live_job(ledger, f"2.25.{n + 10}")
        assert ledger.finish_analysis(
            job_id, results=[], summary=summary(label=live), needs_review=False,
            review_reason="", shadow_models=["cxr-next"],
        )  # fmt: skip
        (shadow_id,) = shadows.of_job(job_id)
        assert shadows.claim(shadow_id, lease_s=60, max_attempts=2) is not None
        shadows.finish(shadow_id, summary(label=new, version="2.0.0", review=True))
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
    )
    assert main(["--config", str(config), "monitor"]) == 0  # a comparison is no alarm
    out = capsys.readouterr().out
    assert "route chest: dianet-cxr 2.0.0 beside dianet-cxr 1.0.0, 3 studies" in out
    assert "same label 66.7% (kappa 0.40)" in out
    assert "to review: live 0.0%, shadow 100.0% (McNemar p 0.25)" in out
    assert "live normal: shadow nodule 1, normal 1" in out
    assert main(["--config", str(config), "monitor", "--json"]) == 0
    (body,) = json.loads(capsys.readouterr().out)["shadow"]
    assert body["studies"] == 3 and body["verdicts"]["live_accuracy"] is None
    # the studies to look at next
    assert body["disagreements"] == [
        {"study_uid": "2.25.11", "live": "normal", "shadow": "nodule", "verdict": ""}
    ]

    add_user(ledger)
    app_settings = settings.model_copy(
        update={"review": settings.review.model_copy(update={"cookie_secure": False})}
    )
    with TestClient(create_app(app_settings, ledger)) as client:
        sign_in(client)
        api = client.get("/api/monitoring").json()
        assert api["shadow"][0]["kappa"] == pytest.approx(0.4)
        assert api["shadow_unfinished"] == []
        page = client.get("/review/monitoring").text
        assert 'id="shadow"' in page
        assert "<td>dianet-cxr 2.0.0</td>" in page and "0.0% / 100.0% (0.25)" in page
        dashboard = client.get("/review/dashboard").text
        assert (
            '<td id="q-shadow">dianet-cxr 2.0.0 on chest: 67% same label as dianet-cxr 1.0.0,'
            " 3 studies</td>"
        ) in dashboard


def test_a_worker_may_take_the_shadow_models_alone_or_never(tmp_path: Path) -> None:
    """``worker.queues``: the queues a worker polls, always STAT first and shadow last; a
    shadow-only worker (another machine) makes ready with the shadow models."""
    from acwi_node.observability.health import ModelPreload
    from acwi_node.tasks.app import worker_queues

    settings = _settings(tmp_path)
    assert worker_queues(settings) == ["analysis.high", "analysis", "analysis.shadow"]
    assert ModelPreload(settings, load=False).names == [MODEL]

    def taking(*queues: str) -> Any:
        worker = settings.worker.model_copy(update={"queues": list(queues)})
        return settings.model_copy(update={"worker": worker})

    apart = taking("shadow")
    assert worker_queues(apart) == ["analysis.shadow"]
    assert ModelPreload(apart, load=False).names == [CHALLENGER]
    assert worker_queues(taking("routine", "stat")) == ["analysis.high", "analysis"]
    with pytest.raises(Exception, match="queues"):
        load_settings(None, node={"data_dir": tmp_path}, worker={"queues": ["gpu"]})
    assert load_settings(
        None, node={"data_dir": tmp_path}, worker={"queues": ["shadow"]}
    ).worker.queues == ["shadow"]


def test_a_shadow_job_waits_out_a_ledger_outage_and_costs_it_no_attempt(
    tmp_path: Path,
    ledger_node: tuple[Any, Ledger],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ledger stopped answering as the shadow job's summary was recorded, and answered
    again by the time the task's error handler ran: the shadow job was failed for the
    ledger's outage (had it stayed down, the worker that took it over once its lease ran out
    would have counted a second attempt). The task waits for the ledger as the analyse task
    does, gives its claim back, its attempt not counted, and runs the shadow job again: with
    ``max_attempts = 1`` it is done."""
    from sqlalchemy.exc import OperationalError

    settings = _settings(tmp_path, database_url=ledger_node[0].database_url)
    ledger = ledger_node[1]
    monkeypatch.setattr(analyse, "app", Bell())
    (job_id,) = _studies(settings, ledger, tmp_path, 1)
    assert analyse.run_job(settings, ledger, job_id) == "analysed"
    (shadow_id,) = ShadowJobs(ledger).of_job(job_id)
    settings.worker.max_attempts = 1
    monkeypatch.setattr(analyse, "_state", {"settings": settings, "ledger": ledger})
    pauses: list[float] = []
    monkeypatch.setattr(analyse, "_pause", pauses.append)
    real_finish = ShadowJobs.finish

    def finish(self: ShadowJobs, *args: Any, **kwargs: Any) -> bool:
        if not pauses:  # the ledger goes away as the summary is recorded, then comes back
            raise OperationalError("UPDATE shadow_jobs", {}, ConnectionRefusedError("refused"))
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(ShadowJobs, "finish", finish)
    with caplog.at_level(logging.INFO, logger="acwi_node.worker"):
        assert shadow.shadow_job(shadow_id) == "analysed"
    assert pauses == [1.0]
    with ledger.session() as s:
        row = s.get_one(ShadowJob, shadow_id)
        assert (row.state, row.attempts, row.error) == (ShadowState.DONE, 1, "")
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info is not None) for r in lines] == [
        (logging.ERROR, True),
        (logging.WARNING, False),
    ]
    assert f"shadow job {shadow_id}: the ledger works again after 1" in lines[1].getMessage()


def test_a_shadow_job_taken_over_is_the_new_workers_to_finish(db: Ledger) -> None:
    """A worker that stalled past its lease, its shadow job taken over by another, renews,
    finishes and fails nothing; the other worker's claim does."""
    from tests.support.monitoring_jobs import summary

    job_id = _live_job(db)
    assert db.finish_analysis(
        job_id, results=[], summary=summary(label="nodule"), needs_review=False,
        review_reason="", shadow_models=["cxr-next"],
    )  # fmt: skip
    shadows = ShadowJobs(db)
    (shadow_id,) = shadows.of_job(job_id)
    first = shadows.claim(shadow_id, lease_s=60, max_attempts=3)
    second = shadows.claim(shadow_id, lease_s=0, max_attempts=3)  # the first one's lease ran out
    assert first is not None and second is not None
    assert first.claim is not None and second.claim is not None
    assert not shadows.renew(shadow_id, claim=first.claim)
    assert not shadows.finish(shadow_id, summary(label="normal"), claim=first.claim)
    assert not shadows.fail(shadow_id, "the first worker's failure", claim=first.claim)
    assert not shadows.give_back(shadow_id, first.claim)
    with db.session() as s:
        row = s.get_one(ShadowJob, shadow_id)
        assert (row.state, row.attempts, row.error) == (ShadowState.ANALYSING, 2, "")
    assert shadows.renew(shadow_id, claim=second.claim)
    assert shadows.finish(shadow_id, summary(label="effusion"), claim=second.claim)
    with db.session() as s:
        row = s.get_one(ShadowJob, shadow_id)
        assert (row.state, row.summary["predicted_label"]) == (ShadowState.DONE, "effusion")


def test_a_shadow_run_taken_over_stops_between_batches(
    tmp_path: Path, ledger_node: tuple[Any, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker took the shadow job over while its images went through the challenger a
    batch at a time: the run stops before the next batch, records nothing and fails nothing."""
    settings = _settings(tmp_path, database_url=ledger_node[0].database_url)
    ledger = ledger_node[1]
    monkeypatch.setattr(analyse, "app", Bell())
    files = write_study(tmp_path / "src", n_images=3, label="nodule", seed=4, size=128)
    job_id, _ = store_and_route(settings, ledger, files)
    assert analyse.run_job(settings, ledger, job_id) == "analysed"
    (shadow_id,) = ShadowJobs(ledger).of_job(job_id)

    def taken_over() -> None:  # the other worker's claim, after this one's lease ran out
        assert ShadowJobs(ledger).claim(shadow_id, lease_s=0, max_attempts=3)

    batches = lose_claim_at_first_batch(monkeypatch, shadow, taken_over)
    assert shadow.run_shadow(settings, ledger, shadow_id) == "superseded"
    assert batches == [1]  # of three
    with ledger.session() as s:
        row = s.get_one(ShadowJob, shadow_id)
        assert (row.state, row.attempts, row.error) == (ShadowState.ANALYSING, 2, "")
