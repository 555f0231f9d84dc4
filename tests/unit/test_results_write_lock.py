"""The study result-write lock (:mod:`acwi_node.results.write_lock`)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

from acwi_node.results.write_lock import STRIPES, lock_path, study_results_lock


def _hold(results_dir: str, study_uid: str, held: object, release: object) -> None:
    with study_results_lock(Path(results_dir), study_uid):
        held.set()  # type: ignore[attr-defined]
        release.wait(30)  # type: ignore[attr-defined]


def test_a_second_process_waits_for_the_studys_lock(tmp_path: Path) -> None:
    """Another process holds the study's lock: this one gets it only once that one lets go."""
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path), "1.2.3", held, release))
    other.start()
    try:
        assert held.wait(30)
        got = threading.Event()

        def take() -> None:
            with study_results_lock(tmp_path, "1.2.3"):
                got.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not got.wait(0.5)
        release.set()
        assert got.wait(30)
        taker.join(30)
    finally:
        release.set()
        other.join(30)


def test_studies_on_other_stripes_do_not_wait(tmp_path: Path) -> None:
    """Two studies whose UIDs fall on different lock files are written at the same time."""
    a = "1.2.3"
    b = next(
        u for n in range(1000) if lock_path(tmp_path, u := f"1.2.{n}") != lock_path(tmp_path, a)
    )
    with study_results_lock(tmp_path, a):
        started = time.monotonic()
        with study_results_lock(tmp_path, b):
            assert time.monotonic() - started < 5
    assert len({lock_path(tmp_path, f"1.2.{n}") for n in range(10_000)}) == STRIPES
    assert lock_path(tmp_path, a).parent == tmp_path / ".locks"
