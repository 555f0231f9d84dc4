"""``os.close`` as it behaves when close() reports an error, for tests of descriptor reuse."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

REAL_CLOSE = os.close


class CloseReportingAnError:
    """A stand-in for ``os.close`` (``monkeypatch.setattr(os, "close", ...)``): it closes the
    descriptor, and then, for the first one ``which`` picks (``once``; else each), opens
    ``stand_in``, which takes the number just freed as a file another thread opens would,
    and raises ``OSError(code)``: what Linux does when close() reports a failed write-back
    (NFS: EIO, ENOSPC, EDQUOT), the descriptor released all the same. ``others`` holds the
    stand-in's descriptors; :meth:`close_others` closes them with the real ``os.close``."""

    def __init__(
        self,
        stand_in: Path,
        code: int,
        *,
        which: Callable[[int], bool] = lambda fd: True,
        once: bool = True,
        then: Callable[[int], object] = lambda fd: None,
    ) -> None:
        self.stand_in = stand_in
        self.code = code
        self.which = which
        self.once = once
        self.then = then
        self.others: list[int] = []

    def __call__(self, fd: int) -> None:
        picked = self.which(fd)  # before the number is freed
        REAL_CLOSE(fd)
        if picked and not (self.once and self.others):
            self.others.append(os.open(self.stand_in, os.O_RDWR | os.O_CREAT, 0o600))
            self.then(self.others[-1])
            raise OSError(self.code, os.strerror(self.code))

    def close_others(self) -> None:
        for fd in self.others:
            REAL_CLOSE(fd)
