"""Observability: JSON logs with study and job context, Prometheus metrics, health endpoints.

* :mod:`acwi_node.observability.logging`: log set-up (text or JSON lines), the study/job log
  context, and the filter that keeps patient identifiers out of every log record.
* :mod:`acwi_node.observability.metrics`: the process-local counters and histograms each process
  kind updates, and the ledger-derived metrics the web process computes at scrape time.
* :mod:`acwi_node.observability.health`: readiness checks and the small HTTP server that the
  ``scp``, ``worker`` and ``exporter`` processes run for ``/healthz``, ``/readyz`` and ``/metrics``.
"""
