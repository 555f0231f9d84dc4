"""The analyse task's handling of result objects (:func:`acwi_node.tasks.analyse.run_job`)."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import weakref
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, Study, utcnow
from acwi_node.tasks import analyse
from tests.support.review_case import make_review_case, review_settings
from tests.support.study_flow import receive, route_all


def test_each_result_object_is_written_before_the_next_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CT's hundreds of heatmaps (0.75 MiB each at 512 x 512) are never all in memory: by
    the time the worker builds a heatmap, every one built before it is on disk and gone."""
    built: list[weakref.ref[Any]] = []
    alive_at_build: list[int] = []
    real = analyse.build_heatmap_sc

    def build(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        ds = real(*args, **kwargs)
        built.append(weakref.ref(ds))
        return ds

    monkeypatch.setattr(analyse, "build_heatmap_sc", build)
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    try:
        _, study_uid = make_review_case(settings, ledger, tmp_path)
    finally:
        ledger.dispose()
    assert alive_at_build == [0, 0]  # two images: two heatmaps, the first gone before the second
    files = sorted(p.name for p in (settings.results_dir / study_uid).iterdir())
    assert len(files) == 3  # the SR and both heatmaps


def test_a_job_that_stopped_its_workers_too_often_fails_when_taken_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``worker.max_attempts``: the analyse task, handed a job whose workers all stopped mid-way
    (their leases ran out), fails it with the reason instead of analysing it once more."""
    settings = review_settings(tmp_path)
    settings.worker.max_attempts = 2
    ledger = Ledger(settings.database_url)
    try:
        receive(settings, ledger, "1.2.3", "1.2.3.1")
        with ledger.session() as s:
            study = s.scalars(select(Study)).one()
            study_id, generation = study.id, study.generation
        (job,) = ledger.complete_study(study_id, generation, route_all)
        for _ in range(2):  # two workers took it, and stopped without a word
            assert ledger.claim_job(job, lease_s=0) is not None
        stale = utcnow() - dt.timedelta(seconds=2 * settings.worker.lease_s)
        with ledger.session() as s:
            s.execute(update(Job).where(Job.id == job).values(heartbeat_at=stale))
        with caplog.at_level(logging.ERROR, logger="acwi_node.ledger"):
            assert analyse.run_job(settings, ledger, job) == "skipped"
        st = ledger.get_study("1.2.3")
        assert st is not None and st["state"] == "failed"
        assert "did not finish in 2 attempt(s)" in st["reason"]
        assert "did not finish in 2 attempt(s)" in caplog.text
    finally:
        ledger.dispose()
