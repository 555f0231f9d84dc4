"""The completion loop and the reconciler when NTP steps the wall clock, which the ledger's
times are read on: a study still being sent is not cut in two, a live worker's job or a live
runner's retrieval is not taken by a second one (a step forward), and no study, lapsed lease,
retry, case shown as being read or sign-in waits out the step (a step back)."""

from __future__ import annotations

import datetime as dt

import pytest
from celery import Celery
from sqlalchemy import select

from acwi_node.config import Settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ledger import Ledger
from acwi_node.ledger import repository as ledger_repository
from acwi_node.ledger import retrievals as ledger_retrievals
from acwi_node.ledger.models import Notification, utcnow
from acwi_node.ledger.retrievals import Retrievals
from acwi_node.review import store as review_store
from acwi_node.review.store import ReviewStore
from tests.support.study_flow import analyse, dx_record, receive, route_all

LEASE_S = 30.0


class Clocks:
    """The wall clock the ledger reads, and the monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.wall = utcnow()
        self.mono = 1000.0

    def wait(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        """NTP sets the wall clock; the monotonic clock goes on."""
        self.wall += dt.timedelta(seconds=seconds)


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    found = Clocks()
    monkeypatch.setattr(ledger_repository, "utcnow", lambda: found.wall)
    monkeypatch.setattr(ledger_retrievals, "utcnow", lambda: found.wall)
    monkeypatch.setattr(review_store, "utcnow", lambda: found.wall)
    return found


def loop(settings: Settings, ledger: Ledger, clocks: Clocks) -> CompletionService:
    settings.completion.quiet_period_s = 1.0
    settings.completion.max_wait_s = 120.0
    service = CompletionService(settings, ledger, Celery("clock-test", broker="memory://"))
    service.decide = route_all  # type: ignore[method-assign]
    service.wall_clock = lambda: clocks.wall
    service.monotonic = lambda: clocks.mono
    return service


def analysing_job(ledger: Ledger) -> int:
    """A job a live worker analyses: claimed, its lease renewed just now."""
    done = ledger.record_instance(dx_record("1.2.9", "1.2.9.1"), first_in_association=False)
    (job_id,) = ledger.complete_study(done.study_id, 1, route_all)
    assert ledger.claim_job(job_id, lease_s=LEASE_S) is not None
    return job_id


def requested(retrievals: Retrievals, clocks: Clocks, study_uid: str) -> int:
    """A retrieval request, due (its time is the real clock's, behind the test's a moment)."""
    found = retrievals.request("pacs", {"study_uid": study_uid})
    clocks.wait(1)
    return found


def state(ledger: Ledger, uid: str) -> str:
    found = ledger.get_study(uid)
    assert found is not None
    return str(found["state"])


def test_a_clock_stepped_forward_completes_no_study_early_and_takes_no_live_job(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    settings, ledger = ledger_node
    service = loop(settings, ledger, clocks)
    job_id = analysing_job(ledger)
    # a modality is sending a study: its association stays open between instances
    ledger.record_instance(dx_record("1.2.3", "1.2.3.1"), first_in_association=True)
    assert service.tick() == []
    clocks.step(3600)
    clocks.wait(0.1)
    assert service.tick() == []
    assert state(ledger, "1.2.3") == "receiving"  # not complete by max_wait_s: 0.1 s passed
    assert ledger.jobs_to_requeue(older_than_s=3600, lease_s=LEASE_S) == []
    assert ledger.claim_job(job_id, lease_s=LEASE_S) is None  # its worker still holds it
    # the waits still end: no instance for max_wait_s, no lease renewal for lease_s
    clocks.wait(121)
    assert len(service.tick()) == 1 and state(ledger, "1.2.3") == "queued"
    assert ledger.jobs_to_requeue(older_than_s=3600, lease_s=LEASE_S) == [job_id]


def test_a_clock_stepped_back_holds_no_study_or_lapsed_lease_for_the_step(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    settings, ledger = ledger_node
    service = loop(settings, ledger, clocks)
    job_id = analysing_job(ledger)
    sent = ledger.record_instance(dx_record("1.2.3", "1.2.3.1"), first_in_association=True)
    ledger.association_released([sent.study_id])
    backoff = dt.timedelta(seconds=300)
    with ledger.session() as s:  # a webhook's next attempt, after its back-off
        s.add(
            Notification(target="t", event="failed", key="k", next_attempt_at=clocks.wall + backoff)
        )
    assert service.tick() == []  # its quiet period is not over
    clocks.step(-3600)
    clocks.wait(0.1)
    assert service.tick() == []
    with ledger.session() as s:
        retry = s.scalar(select(Notification.next_attempt_at))
    assert retry is not None and clocks.wall < retry <= clocks.wall + backoff  # not an hour on
    clocks.wait(1)
    assert len(service.tick()) == 1  # after the quiet period, not an hour and a second
    assert state(ledger, "1.2.3") == "queued"
    assert ledger.jobs_to_requeue(older_than_s=3600, lease_s=LEASE_S) == []
    clocks.wait(LEASE_S)  # its worker died at the step: the job is taken after its lease
    assert ledger.jobs_to_requeue(older_than_s=3600, lease_s=LEASE_S) == [job_id]


def test_times_left_in_the_future_by_a_step_back_before_start_up_count_from_now(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    """The node ran on a clock an hour fast (a hardware clock kept in local time) and NTP set
    it right while the node was down: its first pass finds the times in the future."""
    settings, ledger = ledger_node
    sent = ledger.record_instance(dx_record("1.2.3", "1.2.3.1"), first_in_association=True)
    ledger.association_released([sent.study_id])
    clocks.step(-3600)
    service = loop(settings, ledger, clocks)
    assert service.tick() == []
    clocks.wait(1)
    assert len(service.tick()) == 1 and state(ledger, "1.2.3") == "queued"


def test_a_clock_stepped_forward_lets_no_second_runner_take_a_running_retrieval(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    """Another ``scp`` process would run the C-MOVE again: the PACS sends the study twice."""
    settings, ledger = ledger_node
    service = loop(settings, ledger, clocks)
    retrievals, lease_s = Retrievals(ledger), settings.retrieve.lease_s
    running = requested(retrievals, clocks, "1.2.3")
    assert retrievals.claim(lease_s) is not None
    assert service.tick() == []
    clocks.step(3600)
    clocks.wait(0.1)
    assert service.tick() == []
    assert retrievals.claim(lease_s) is None  # its runner still holds it
    clocks.wait(lease_s + 1)  # its runner died at the step: taken after its lease
    taken = retrievals.claim(lease_s)
    assert taken is not None and taken.id == running


def test_a_clock_stepped_back_holds_no_lapsed_retrieval_or_retry_for_the_step(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    settings, ledger = ledger_node
    service = loop(settings, ledger, clocks)
    retrievals, lease_s = Retrievals(ledger), settings.retrieve.lease_s
    orphaned = requested(retrievals, clocks, "1.2.3")
    retried = requested(retrievals, clocks, "1.2.4")
    assert retrievals.claim(lease_s) is not None  # its runner dies at the step
    assert retrievals.claim(lease_s) is not None
    retrievals.retry(retried, error="association refused", after_s=300)
    assert service.tick() == []
    clocks.step(-3600)
    clocks.wait(0.1)
    assert service.tick() == []
    assert retrievals.claim(lease_s) is None
    clocks.wait(301)  # its back-off, not an hour and its back-off
    taken = retrievals.claim(lease_s)
    assert taken is not None and taken.id == retried
    clocks.wait(lease_s - 300)  # its lease, not an hour and its lease
    taken = retrievals.claim(lease_s)
    assert taken is not None and taken.id == orphaned


def test_a_retrieval_lease_left_in_the_future_before_start_up_ends_after_a_lease(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    """Its runner stopped with the node; NTP set the clock back an hour meanwhile."""
    settings, ledger = ledger_node
    retrievals, lease_s = Retrievals(ledger), settings.retrieve.lease_s
    orphaned = requested(retrievals, clocks, "1.2.3")
    assert retrievals.claim(lease_s) is not None
    clocks.step(-3600)
    service = loop(settings, ledger, clocks)
    assert service.tick() == []
    clocks.wait(lease_s + 1)
    taken = retrievals.claim(lease_s)
    assert taken is not None and taken.id == orphaned


def test_a_clock_stepped_back_shows_no_case_as_being_read_for_the_step(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3", needs_review=True)
    (item,) = [int(i["id"]) for i in ledger.worklist()]
    service = loop(settings, ledger, clocks)
    store = ReviewStore(ledger)
    assert store.open_for_reading(item, "jane", claim_s=600) is None  # hers
    assert service.tick() == []
    clocks.step(-3600)
    clocks.wait(0.1)
    assert service.tick() == []
    assert store.open_for_reading(item, "rick", claim_s=600) is not None  # jane reads it
    clocks.wait(601)  # she left it: after the claim, not an hour and the claim
    assert store.open_for_reading(item, "rick", claim_s=600) is None


def test_a_clock_stepped_back_lengthens_no_sign_in(
    ledger_node: tuple[Settings, Ledger], clocks: Clocks
) -> None:
    settings, ledger = ledger_node
    settings.review.session_lifetime_s = 3000
    service = loop(settings, ledger, clocks)
    store = ReviewStore(ledger)
    user = store.add_user("jane.doe", "not-a-hash", "radiologist")
    store.create_session(user.id, "idle", lifetime_s=3000)
    store.create_session(user.id, "busy", lifetime_s=3000)
    assert service.tick() == []
    clocks.step(-3600)
    clocks.wait(0.1)
    assert service.tick() == []
    for _ in range(2):
        clocks.wait(1000)
        assert store.session_user("busy", idle_timeout_s=1800) is not None
    assert store.session_user("idle", idle_timeout_s=1800) is None  # unused for 2,000 s
    clocks.wait(1001)  # signed in 3,000 s ago: its lifetime, not an hour and its lifetime
    assert store.session_user("busy", idle_timeout_s=1800) is None
