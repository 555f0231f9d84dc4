"""Two processes record the last deliveries of one job at the same moment (PostgreSQL, where
they commit concurrently): the job is settled all the same."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import pytest

from acwi_node.ledger import DeliveryAttempt, Ledger, ResultFile, RoutedJob
from tests.support.study_flow import dx_record

pytestmark = pytest.mark.integration

SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _job_for_two_destinations(ledger: Ledger, n: int) -> tuple[str, dict[str, int]]:
    """A study analysed for destinations A and B; its delivery ids by destination."""
    study = f"1.2.826.0.1.3680043.8.498.7.{n}"
    r = ledger.record_instance(dx_record(study, f"{study}.1"), first_in_association=False)
    (job,) = ledger.complete_study(
        r.study_id, 1, lambda _f: [RoutedJob("chest", "default", ["A", "B"], 0)]
    )
    assert ledger.claim_job(job, lease_s=60) is not None
    assert ledger.finish_analysis(
        job,
        results=[ResultFile("sr", f"{study}.9", SR, f"{study}/sr.dcm")],
        summary={},
        needs_review=False,
        review_reason="",
    )
    due = {d.destination: d.id for d in ledger.due_deliveries() if d.job_id == job}
    return study, due


def _at_once(*calls: Callable[[], object]) -> None:
    start = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        start.wait()
        try:
            call()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_two_processes_delivering_a_jobs_last_results_at_once_settle_it(
    postgres_url: str,
) -> None:
    """The exporter records destination A's delivery while another process (the storage
    SCP applying B's commitment report, a second exporter) records B's: each saw the other's
    still pending and neither settled the job, which stayed exporting for ever (about one
    time in two). Now the second waits for the first's job lock and sees its delivery."""
    first, second = Ledger(postgres_url), Ledger(postgres_url, create=False)
    try:
        stuck = []
        for n in range(12):
            study, due = _job_for_two_destinations(first, n)
            _at_once(
                partial(first.record_deliveries, [DeliveryAttempt(due["A"], True, 0, "", 5, 1)]),
                partial(second.record_deliveries, [DeliveryAttempt(due["B"], True, 0, "", 5, 1)]),
            )
            state = (first.get_study(study) or {}).get("state")
            if state != "delivered":
                stuck.append((n, state))
        assert stuck == []
    finally:
        first.dispose()
        second.dispose()
