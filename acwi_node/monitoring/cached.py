"""The three monitoring reports a long-running process reads again and again (the metrics
endpoint on every scrape, the notifier every two seconds), each recomputed at most every
``monitoring.refresh_s``: the model versions' signals, the studies arriving, the turnaround."""

from __future__ import annotations

import time
from collections.abc import Callable

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.monitoring.cache import Refreshed
from acwi_node.monitoring.report import CachedReports, ModelMonitor
from acwi_node.monitoring.traffic import TrafficReport, traffic_monitor
from acwi_node.monitoring.turnaround import TurnaroundMonitor, TurnaroundReport


class MonitoringCaches:
    """``monitoring``, ``traffic`` and ``turnaround``: each report's cache (``.get()``)."""

    def __init__(
        self, settings: Settings, ledger: Ledger, clock: Callable[[], float] = time.monotonic
    ) -> None:
        refresh_s = settings.monitoring.refresh_s
        self.monitoring = CachedReports(ModelMonitor(ledger, settings.monitoring), clock=clock)
        self.traffic: Refreshed[TrafficReport] = Refreshed(
            traffic_monitor(settings, ledger).report, refresh_s, clock=clock
        )
        self.turnaround: Refreshed[TurnaroundReport] = Refreshed(
            TurnaroundMonitor(ledger, settings.monitoring).report, refresh_s, clock=clock
        )
