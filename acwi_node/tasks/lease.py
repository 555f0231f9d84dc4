"""Keep a worker's claim on a job alive while it analyses.

The ledger marks a claimed job with a heartbeat time. While the analysis runs, a small thread
renews it every ``interval_s``; when the worker dies (``kill -9``, out of memory, power loss)
the heartbeat stops, and after the lease another worker or the reconciler takes the job again.

A worker that only stalled (a ledger outage, a long pause of its process or VM) longer than
the lease may find its job taken over meanwhile: its renewal then says so (the ledger checks
the worker's claim, :class:`acwi_node.ledger.JobClaim`), the keeper stops and sets
:attr:`LeaseKeeper.lost`, and the run ends without recording anything. A renewal that fails
(the ledger not answering) is logged as a loop's failure is (:class:`LoopFailures`): once
with its traceback, then a line a minute, then once it works again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from acwi_node.ledger import Ledger
from acwi_node.observability.logging import LoopFailures

log = logging.getLogger("acwi_node.worker")


class LeaseKeeper:
    """Renew the lease on ``job_id`` every ``interval_s`` seconds until stopped; ``renew``
    (default the ledger's live-job lease) says False once the job is no longer claimed (by
    this worker): the keeper then stops, and :attr:`lost` is set."""

    def __init__(
        self,
        ledger: Ledger,
        job_id: int,
        interval_s: float,
        *,
        renew: Callable[[int], bool] | None = None,
        clock: Callable[[], float] | None = None,
        what: str = "",
    ) -> None:
        self.ledger = ledger
        self.job_id = job_id
        self.interval_s = interval_s
        self.renew = renew or ledger.renew_lease
        self.renewals = 0
        #: Set once a renewal said the job is no longer this worker's to run: finished,
        #: failed, superseded, or taken over by another worker after the lease ran out.
        self.lost = threading.Event()
        self.failures = LoopFailures(
            log, f"{what or f'job {job_id}'}: renewing its lease", clock=clock
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                held = self.renew(self.job_id)
            except Exception:  # a ledger hiccup must not kill the analysis; try again later
                self.failures.failed()
                continue
            self.failures.worked()
            if not held:  # finished, failed, superseded or taken over meanwhile
                self.lost.set()
                return
            self.renewals += 1

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
