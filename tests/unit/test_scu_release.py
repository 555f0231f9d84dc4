"""Ending an association: a release that never ends (pynetdicom waiting, without a limit, for
a reactor that does not pause) is aborted after the time allowed, so an exporter pass cannot
hang on it. Over real associations, releases are in every SCU test."""

from __future__ import annotations

import threading
import time
from typing import cast

from pynetdicom.association import Association

from acwi_node.export.scu import end_association


class StuckRelease:
    """An association whose ``release()`` returns only once the association is aborted."""

    def __init__(self) -> None:
        self.is_established = True
        self.aborted = threading.Event()

    def release(self) -> None:
        self.aborted.wait(10)

    def abort(self) -> None:
        self.is_established = False
        self.aborted.set()

    def is_alive(self) -> bool:
        return self.is_established


class QuickRelease(StuckRelease):
    def release(self) -> None:
        self.is_established = False


def test_a_release_that_does_not_end_is_aborted() -> None:
    stuck = StuckRelease()
    started = time.monotonic()
    end_association(cast(Association, stuck), timeout_s=0.2)
    assert stuck.aborted.is_set()
    assert time.monotonic() - started < 5


def test_a_release_that_ends_is_not_aborted() -> None:
    quick = QuickRelease()
    end_association(cast(Association, quick), timeout_s=5)
    assert not quick.aborted.is_set() and not quick.is_established
