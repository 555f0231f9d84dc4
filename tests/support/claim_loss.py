"""A worker's run that loses its claim while its images go through the network: for the
analyse and shadow tasks' tests."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def lose_claim_at_first_batch(
    monkeypatch: pytest.MonkeyPatch, task: ModuleType, before: Callable[[], None] = lambda: None
) -> list[int]:
    """Have ``task``'s run (:mod:`acwi_node.tasks.analyse` or :mod:`acwi_node.tasks.shadow`)
    analyse one image per batch and, as its first batch starts, call ``before`` (another
    worker's claim, say) and mark its lease keeper's claim lost, as the keeper's next renewal
    would. Returns the list the size of each batch run is appended to."""
    keepers: list[Any] = []
    batches: list[int] = []
    real_keeper, real_analyser = task.LeaseKeeper, task.get_analyser

    def keeper(*args: Any, **kwargs: Any) -> Any:
        keepers.append(real_keeper(*args, **kwargs))
        return keepers[-1]

    def analyser(*args: Any) -> Any:
        loaded = real_analyser(*args)
        run_batch = loaded._analyse_batch

        def one_batch(batch: Any, study_uid: str) -> Any:
            if not batches:
                before()
                keepers[0].lost.set()
            batches.append(len(batch))
            return run_batch(batch, study_uid)

        monkeypatch.setattr(loaded, "batch_size", 1)
        monkeypatch.setattr(loaded, "_analyse_batch", one_batch)
        return loaded

    monkeypatch.setattr(task, "LeaseKeeper", keeper)
    monkeypatch.setattr(task, "get_analyser", analyser)
    return batches
