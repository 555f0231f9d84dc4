"""The analyse task's handling of result objects (:func:`acwi_node.tasks.analyse.run_job`)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest

from acwi_node.ledger import Ledger
from acwi_node.tasks import analyse
from tests.support.review_case import make_review_case, review_settings


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
