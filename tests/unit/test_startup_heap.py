"""The storage SCP processes freeze their start-up heap (``acwi_node.cli.freeze_startup_heap``)."""

from __future__ import annotations

import gc

from acwi_node.cli import freeze_startup_heap


def test_the_start_up_heap_leaves_the_collected_generations() -> None:
    """Everything alive at start-up moves to the permanent generation: a full collection then
    walks only what was made since, not the whole process."""
    assert gc.get_freeze_count() == 0
    tracked = len(gc.get_objects())
    try:
        frozen = freeze_startup_heap()
        # a frozen object is still freed by reference counting: another thread (a server or a
        # pool an earlier test left) may free one between the two reads, never add one
        assert frozen >= gc.get_freeze_count() >= tracked // 2
        made_since = [[i] for i in range(100)]
        assert len(gc.get_objects()) < 1_000  # the lists above and little else
        assert made_since[99] == [99]
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_worker_heap_leaves_the_collected_generations() -> None:
    """The worker's heap, once its model is loaded (``analyse.freeze_worker_heap``), as the
    storage SCP's at start-up, highdicom's tables of the standard read and frozen with it."""
    from highdicom import _standard_utils

    from acwi_node.tasks.analyse import freeze_worker_heap

    assert gc.get_freeze_count() == 0
    try:
        assert freeze_worker_heap() >= gc.get_freeze_count() > 0
        assert len(gc.get_objects()) < 1_000
        # highdicom's tables of the standard were read first: frozen with the rest
        assert _standard_utils.get_module_attribute_map.cache_info().currsize == 1
        assert _standard_utils.get_iod_module_map.cache_info().currsize == 1
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
