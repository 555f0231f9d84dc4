"""A value recomputed at most every so often: the metrics endpoint is scraped every few
seconds, the notifier looks every two, and a monitoring report reads weeks of the ledger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Refreshed(Generic[T]):
    """``compute()``'s value, recomputed when ``refresh_s`` seconds of ``clock`` have passed
    since the last time."""

    def __init__(
        self, compute: Callable[[], T], refresh_s: float, clock: Callable[[], float]
    ) -> None:
        self.compute = compute
        self.refresh_s = refresh_s
        self.clock = clock
        self._cache: tuple[float, T] | None = None

    def get(self) -> T:
        now = self.clock()
        if self._cache is None or now - self._cache[0] >= self.refresh_s:
            self._cache = (now, self.compute())
        return self._cache[1]
