"""Keep a worker's claim on a job alive while it analyses.

The ledger marks a claimed job with a heartbeat time. While the analysis runs, a small thread
renews it every ``interval_s``; when the worker dies (``kill -9``, out of memory, power loss)
the heartbeat stops, and after the lease another worker or the reconciler takes the job again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from acwi_node.ledger import Ledger

log = logging.getLogger("acwi_node.worker")


class LeaseKeeper:
    """Renew the lease on ``job_id`` every ``interval_s`` seconds until stopped; ``renew``
    (default the ledger's live-job lease) says False once the job is no longer claimed."""

    def __init__(
        self,
        ledger: Ledger,
        job_id: int,
        interval_s: float,
        *,
        renew: Callable[[int], bool] | None = None,
    ) -> None:
        self.ledger = ledger
        self.job_id = job_id
        self.interval_s = interval_s
        self.renew = renew or ledger.renew_lease
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.renew(self.job_id):
                    return  # finished, failed or superseded meanwhile
                self.renewals += 1
            except Exception:  # a ledger hiccup must not kill the analysis; try again later
                log.warning("job %d: could not renew its lease; retrying", self.job_id)

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
