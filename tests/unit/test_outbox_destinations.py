"""The exporter with several destinations (``acwi_node/export/outbox.py``): one that answers
slowly, or whose send fails in a way nobody foresaw, holds up no other; a destination with a
backlog hides no other's results; the sends under way end before the exporter stops. Real
associations to scripted storage SCPs on loopback, on SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy import select, update

from acwi_node.config import Settings, load_settings
from acwi_node.export import outbox
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import DeliveryAttempt, Ledger, ResultFile, RoutedJob, StudyFacts
from acwi_node.ledger.models import Delivery, utcnow
from acwi_node.ledger.repository import new_claim
from tests.support import SECONDARY_CAPTURE_IMAGE_STORAGE, write_secondary_capture
from tests.support.node import NodeProcesses, write_config
from tests.support.scripted_scp import ScriptedScp
from tests.support.study_flow import dx_record


def _settings(
    tmp_path: Path,
    db: Ledger,
    ports: dict[str, int],
    *,
    timeout_s: float = 10,
    max_attempts: int = 5,
) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": db.url},
        destinations=[
            {"name": name, "ae_title": "SCRIPTED", "host": "127.0.0.1", "port": port,
             "associations": 1}
            for name, port in ports.items()
        ],
        exporter={"timeout_s": timeout_s, "poll_interval_s": 0.05, "backoff_initial_s": 30,
                  "withdraw_replaced": False, "max_attempts": max_attempts},
    )  # fmt: skip


def _analysed(settings: Settings, db: Ledger, study: str, n: int) -> list[str]:
    """A study analysed, its ``n`` result objects (real Secondary Captures) due for every
    destination; returns their SOP Instance UIDs."""
    names = [d.name for d in settings.destinations]

    def route(facts: StudyFacts) -> list[RoutedJob]:
        return [RoutedJob(route="chest", model="default", destinations=names, priority=0)]

    recorded = db.record_instance(dx_record(study, f"{study}.1"), first_in_association=False)
    (job_id,) = db.complete_study(recorded.study_id, 1, route)
    assert db.claim_job(job_id, lease_s=3600) is not None
    results, uids = [], []
    for i in range(n):
        uid = str(generate_uid())
        relative = f"{study}/{uid}.dcm"
        (settings.results_dir / study).mkdir(parents=True, exist_ok=True)
        write_secondary_capture(
            settings.results_dir / relative, study_uid=study, sop_instance_uid=uid,
            instance_number=i + 1,
        )  # fmt: skip
        results.append(ResultFile("heatmap", uid, SECONDARY_CAPTURE_IMAGE_STORAGE, relative))
        uids.append(uid)
    assert db.finish_analysis(
        job_id,
        results=results,
        summary={"needs_review": False},
        needs_review=False,
        review_reason="",
    )
    return uids


def _states(db: Ledger, study: str) -> dict[str, list[str]]:
    """Each destination's delivery states, in result order."""
    view = db.get_study(study)
    assert view is not None
    states: dict[str, list[str]] = {}
    for job in view["jobs"]:
        for result in job["results"]:
            for d in result["deliveries"]:
                states.setdefault(d["destination"], []).append(d["state"])
    return states


def _answer_after(delay_s: float) -> Callable[[int, Dataset, evt.Event], int]:
    def answer(index: int, ds: Dataset, event: evt.Event) -> int:
        time.sleep(delay_s)
        return 0x0000

    return answer


@pytest.fixture
def running() -> Iterator[Callable[[Exporter], None]]:
    """Start an exporter's :meth:`Exporter.run` in a thread; stopped after the test."""
    started: list[tuple[Exporter, threading.Thread]] = []

    def start(exporter: Exporter) -> None:
        thread = threading.Thread(target=exporter.run, daemon=True)
        thread.start()
        started.append((exporter, thread))

    yield start
    for exporter, thread in started:
        exporter.stop()
        thread.join(60)


def _wait_for(condition: Callable[[], bool], deadline_s: float = 30.0) -> None:
    """Until ``condition`` holds; the test fails if it does not within ``deadline_s``."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < deadline_s, "never happened"
        time.sleep(0.02)


def _held(release: threading.Event) -> Callable[[int, Dataset, evt.Event], int]:
    """A C-STORE answer held back until ``release`` is set (an archive that stalls)."""

    def answer(index: int, ds: Dataset, event: evt.Event) -> int:
        release.wait(60)
        return 0x0000

    return answer


def test_a_destination_that_answers_slowly_delays_no_other(
    tmp_path: Path, db: Ledger, running: Callable[[Exporter], None]
) -> None:
    """An archive that holds its first C-STORE's answer: while it does, the PACS beside it
    gets all of the study's objects, and a second study's too; then the archive gets its
    own, each object once."""
    release = threading.Event()
    with ScriptedScp(_held(release)) as archive, ScriptedScp(_answer_after(0.0)) as pacs:
        settings = _settings(tmp_path, db, {"archive": archive.port, "pacs": pacs.port})
        _analysed(settings, db, "1.2.3", 4)
        exporter = Exporter(settings, db)
        running(exporter)
        try:
            _wait_for(lambda: _states(db, "1.2.3")["pacs"] == ["delivered"] * 4)
            _analysed(settings, db, "1.2.4", 2)
            _wait_for(lambda: _states(db, "1.2.4")["pacs"] == ["delivered"] * 2)
            assert archive.calls == 1 and not release.is_set()  # still held
            assert _states(db, "1.2.3")["archive"] == ["pending"] * 4
        finally:
            release.set()
        _wait_for(lambda: _states(db, "1.2.3")["archive"] == ["delivered"] * 4)
        _wait_for(lambda: _states(db, "1.2.4")["archive"] == ["delivered"] * 2)
        assert db.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]
        assert db.get_study("1.2.4")["state"] == "delivered"  # type: ignore[index]
    assert (archive.calls, pacs.calls) == (6, 6)  # each object once


def test_a_send_that_fails_unforeseen_stops_no_other_and_waits_its_back_off(
    tmp_path: Path, db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the node's own in one destination's send (here a TypeError): the other
    destination gets its results in the same pass, and the failing one's count as an attempt
    with the back-off, not sent again at every pass."""
    with ScriptedScp(_answer_after(0.0)) as pacs, ScriptedScp(_answer_after(0.0)) as viewer:
        settings = _settings(tmp_path, db, {"viewer": viewer.port, "pacs": pacs.port})
        _analysed(settings, db, "1.2.3", 2)
        real = outbox.send_files

        def send_files(paths: list[Path], **kwargs: object) -> object:
            if kwargs["port"] == viewer.port:
                raise TypeError("int() argument must be a string, not 'dict'")
            return real(paths, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(outbox, "send_files", send_files)
        exporter = Exporter(settings, db)
        exporter.tick()
        assert _states(db, "1.2.3") == {
            "viewer": ["pending", "pending"],
            "pacs": ["delivered", "delivered"],
        }
        view = db.get_study("1.2.3")
        assert view is not None
        for d in view["jobs"][0]["results"][0]["deliveries"]:
            if d["destination"] == "viewer":
                assert d["attempts"] == 1
                assert "the exporter failed: TypeError" in d["last_error"]
        assert exporter.tick() == 0  # backing off (30 s), not sent again at once
    assert (pacs.calls, viewer.calls) == (2, 0)


def test_a_destinations_backlog_hides_no_other_destinations_results(
    db: Ledger, tmp_path: Path
) -> None:
    """The pass's query leaves out the destinations a send is under way to: with more due
    for one than a pass takes, the other's still come."""
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": db.url},
        destinations=[
            {"name": "archive", "ae_title": "A", "host": "127.0.0.1", "port": 104},
            {"name": "pacs", "ae_title": "P", "host": "127.0.0.1", "port": 104},
        ],
    )
    _analysed(settings, db, "1.2.3", 3)
    with db.session() as s:  # the archive's have waited longest (it was down)
        s.execute(
            update(Delivery)
            .where(Delivery.destination == "archive")
            .values(next_attempt_at=utcnow() - dt.timedelta(hours=1))
        )
    assert [d.destination for d in db.due_deliveries(limit=3)] == ["archive"] * 3
    assert [d.destination for d in db.due_deliveries(exclude=["archive"], limit=3)] == ["pacs"] * 3


def test_stopping_lets_the_sends_under_way_end(
    tmp_path: Path, db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while a send is under way, the exporter returns once the C-STORE under way is
    answered and recorded (not sent again by the next exporter); it starts no other, and
    what it did not send is due at once for the next exporter, no attempt counted. A send
    that does not end within the wait is left to the next exporter, as after a crash."""
    release = threading.Event()
    with ScriptedScp(_held(release)) as pacs:
        settings = _settings(tmp_path, db, {"pacs": pacs.port})
        _analysed(settings, db, "1.2.3", 3)
        exporter = Exporter(settings, db)
        thread = threading.Thread(target=exporter.run, daemon=True)
        thread.start()
        try:
            _wait_for(lambda: pacs.calls >= 1)
            exporter.stop()
        finally:
            release.set()
        thread.join(30)
        assert not thread.is_alive()
        assert _states(db, "1.2.3") == {"pacs": ["delivered", "pending", "pending"]}
        left = db.due_deliveries()  # not held for the claim's 3 * timeout_s + 60 s
        assert len(left) == 2 and all(d.attempts == 0 for d in left)
        assert pacs.calls == 1
        assert Exporter(settings, db).tick() == 2  # the next exporter, at once
        assert _states(db, "1.2.3") == {"pacs": ["delivered"] * 3}
    assert pacs.calls == 3  # each object once
    monkeypatch.setattr(Exporter, "stop_wait_s", lambda self: 0.2)
    release = threading.Event()
    with ScriptedScp(_held(release)) as stuck:
        settings = _settings(tmp_path, db, {"pacs": stuck.port})
        _analysed(settings, db, "1.2.4", 1)
        exporter = Exporter(settings, db)
        thread = threading.Thread(target=exporter.run, daemon=True)
        thread.start()
        try:
            _wait_for(lambda: stuck.calls >= 1)
            exporter.stop()
            thread.join(30)
            assert not thread.is_alive() and not release.is_set()  # returned, still held
            assert _states(db, "1.2.4") == {"pacs": ["pending"]}
        finally:
            release.set()


def test_stopped_while_a_destination_holds_its_answer_it_records_it_and_gives_back_the_rest(
    tmp_path: Path, db: Ledger
) -> None:
    """A C-STORE whose answer does not come is aborted after ``exporter.timeout_s``: the
    stopped exporter waits for that (the process could not exit sooner), records the
    attempt, with its back-off, and gives back what it did not send, due at once."""
    release = threading.Event()
    with ScriptedScp(_held(release)) as stuck:
        settings = _settings(tmp_path, db, {"pacs": stuck.port}, timeout_s=1)
        _analysed(settings, db, "1.2.3", 3)
        exporter = Exporter(settings, db)
        thread = threading.Thread(target=exporter.run, daemon=True)
        thread.start()
        try:
            _wait_for(lambda: stuck.calls >= 1)
            exporter.stop()
            thread.join(30)
            assert not thread.is_alive() and not release.is_set()  # returned, still held
        finally:
            release.set()
        _one_attempted_two_given_back(db)
    assert stuck.calls == 1


def _one_attempted_two_given_back(db: Ledger) -> None:
    """Of study 1.2.3's three objects: the one whose C-STORE got no answer recorded as an
    attempt, the two never sent due at once with no attempt counted."""
    view = db.get_study("1.2.3")
    assert view is not None
    tried = [d for r in view["jobs"][0]["results"] for d in r["deliveries"] if d["attempts"]]
    assert len(tried) == 1 and "no C-STORE response" in tried[0]["last_error"]
    left = db.due_deliveries()
    assert len(left) == 2 and all(d.attempts == 0 for d in left)


def test_an_exporter_process_stopped_with_sigterm_records_its_attempt_and_gives_back_the_rest(
    tmp_path: Path, db: Ledger
) -> None:
    """``acwi-node exporter`` stopped with SIGTERM (what ``docker compose stop`` sends) while
    a destination holds a C-STORE's answer: it exits by itself once that C-STORE is aborted
    (``exporter.timeout_s``), the attempt recorded and the objects it did not send due at
    once for the next exporter."""
    release = threading.Event()
    with ScriptedScp(_held(release)) as stuck:
        settings = _settings(tmp_path, db, {"pacs": stuck.port}, timeout_s=1)
        _analysed(settings, db, "1.2.3", 3)
        config = write_config(
            tmp_path / "acwi.toml",
            {
                "node": {"data_dir": str(settings.data_dir), "database_url": db.url},
                "destinations": [
                    {"name": "pacs", "ae_title": "SCRIPTED", "host": "127.0.0.1",
                     "port": stuck.port, "associations": 1}
                ],
                "exporter": {"timeout_s": 1, "poll_interval_s": 0.05,
                             "withdraw_replaced": False},
            },
        )  # fmt: skip
        with NodeProcesses(config, ["exporter"], tmp_path) as nodes:
            try:
                _wait_for(lambda: stuck.calls >= 1)
                nodes.stop("exporter")  # SIGTERM; SIGKILL only after 30 s
            finally:
                release.set()
            assert nodes.procs["exporter"].returncode == 0, nodes.log_text()
        _one_attempted_two_given_back(db)
    assert stuck.calls == 1


def test_retry_with_a_name_it_does_not_know_puts_nothing_back(
    tmp_path: Path, db: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """``acwi-node destinations retry pacs nowhere``: refused (exit 2) before any delivery
    is put back; named right, they are."""
    from acwi_node.cli import main

    settings = _settings(tmp_path, db, {"pacs": 104, "viewer": 105})
    _analysed(settings, db, "1.2.3", 1)
    with db.session() as s:
        s.execute(update(Delivery).values(state="failed"))
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{db.url}"\n'
        + "".join(
            f'[[destinations]]\nname = "{d.name}"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
            f"port = {d.port}\n"
            for d in settings.destinations
        ),
        encoding="utf-8",
    )
    assert main(["--config", str(config), "destinations", "retry", "pacs", "nowhere"]) == 2
    assert "no destination named nowhere (configured: pacs, viewer)" in capsys.readouterr().err
    assert _states(db, "1.2.3") == {"pacs": ["failed"], "viewer": ["failed"]}
    assert main(["--config", str(config), "destinations", "retry", "viewer", "pacs"]) == 0
    out = capsys.readouterr().out
    assert "viewer: 1 failed delivery(ies) of 1 study(ies) back in the outbox" in out
    assert _states(db, "1.2.3") == {"pacs": ["pending"], "viewer": ["pending"]}


def test_two_exporter_processes_send_each_result_once(tmp_path: Path, db: Ledger) -> None:
    """Two exporter processes on one ledger (two hosts): while one sends a study's results,
    the other's pass comes; the destination gets each object once, from the first."""
    others: list[Exporter] = []
    other_passes: list[int] = []

    def answer(index: int, ds: Dataset, event: evt.Event) -> int:
        if index == 1:  # the other process's pass, while this send is under way
            other_passes.append(others[0].tick(wait=True))
        return 0x0000

    with ScriptedScp(answer) as pacs:
        settings = _settings(tmp_path, db, {"pacs": pacs.port})
        _analysed(settings, db, "1.2.3", 2)
        other_ledger = Ledger(db.url)
        others.append(Exporter(settings, other_ledger))
        try:
            assert Exporter(settings, db).tick(wait=True) == 2
        finally:
            other_ledger.dispose()
        assert other_passes == [0]
        assert _states(db, "1.2.3") == {"pacs": ["delivered", "delivered"]}
        assert db.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]
    assert pacs.calls == 2  # each object once


def test_deliveries_given_back_are_due_at_once_and_nothing_else_is(
    tmp_path: Path, db: Ledger
) -> None:
    """An exporter that took deliveries and stopped before sending them gives them back: due
    at once, with no attempt counted; one another exporter settled meanwhile stays so."""
    settings = _settings(tmp_path, db, {"pacs": 104})
    _analysed(settings, db, "1.2.3", 3)
    first, second, third = sorted(d.id for d in db.due_deliveries())
    assert db.claim_deliveries([first, second, third], lease_s=600) == {first, second, third}
    assert db.due_deliveries() == []
    assert db.release_delivery_claims([first, second]) == 2
    due = db.due_deliveries()
    assert [(d.id, d.attempts) for d in due] == [(first, 0), (second, 0)]  # third still taken
    assert db.claim_deliveries([first], lease_s=600) == {first}  # another exporter's
    db.record_delivery(
        first, delivered=True, status=0, error="", max_attempts=5, backoff_s=0
    )  # fmt: skip
    assert db.release_delivery_claims([first]) == 0
    assert _states(db, "1.2.3") == {"pacs": ["delivered", "pending", "pending"]}


def test_deliveries_taken_by_an_exporter_that_died_are_taken_again_once_its_claim_ran_out(
    tmp_path: Path, db: Ledger
) -> None:
    """A delivery one exporter took is not due for another while the claim lasts (renewed);
    once the claim of a killed exporter has run out, another takes it."""
    settings = _settings(tmp_path, db, {"pacs": 104})
    _analysed(settings, db, "1.2.3", 2)
    ids = sorted(d.id for d in db.due_deliveries())
    assert db.claim_deliveries(ids, lease_s=600) == set(ids)
    assert db.due_deliveries() == []
    assert db.claim_deliveries(ids, lease_s=600) == set()  # the other exporter's try
    db.renew_delivery_claims(ids, lease_s=600)
    assert db.due_deliveries() == []
    with db.session() as s:  # the taker was killed; its last renewal is long past
        s.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
    assert db.claim_deliveries(ids, lease_s=600) == set(ids)


def test_an_exporter_that_stalled_past_its_claim_changes_nothing_of_the_next_takers(
    tmp_path: Path, db: Ledger
) -> None:
    """Exporter A took two deliveries and stalled past its claim (a hung C-STORE, a paused
    VM); exporter B took them over. A's renewal, give-back and outcome then change nothing:
    B's claim is not extended, the deliveries are not due again while B sends them (a third
    send), and B's outcome is the one recorded."""
    settings = _settings(tmp_path, db, {"pacs": 104})
    _analysed(settings, db, "1.2.3", 2)
    first, second = sorted(d.id for d in db.due_deliveries())
    a, b = new_claim(), new_claim()
    assert db.claim_deliveries([first, second], lease_s=600, claim=a) == {first, second}
    with db.session() as s:  # A stalls: its claim runs out
        s.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
    assert db.claim_deliveries([first, second], lease_s=60, claim=b) == {first, second}

    def held_until() -> list[dt.datetime]:
        with db.session() as s:
            return list(s.scalars(select(Delivery.next_attempt_at).order_by(Delivery.id)))

    b_until = held_until()
    assert db.renew_delivery_claims([first, second], lease_s=6000, claim=a) == set()
    assert held_until() == b_until  # B's claim is not extended
    assert db.release_delivery_claims([first], claim=a) == 0
    assert db.due_deliveries() == []  # nor given back under B's feet
    assert not db.record_delivery(
        second, delivered=False, status=0xA700, error="refused", max_attempts=1, backoff_s=0,
        claim=a,
    )  # fmt: skip
    assert _states(db, "1.2.3") == {"pacs": ["pending", "pending"]}
    assert db.renew_delivery_claims([first, second], lease_s=60, claim=b) == {first, second}
    for delivery_id in (first, second):
        assert db.record_delivery(
            delivery_id, delivered=True, status=0, error="", max_attempts=1, backoff_s=0, claim=b
        )
    assert _states(db, "1.2.3") == {"pacs": ["delivered", "delivered"]}
    assert db.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]


def test_an_exporter_whose_claim_was_taken_over_records_nothing_over_the_other(
    tmp_path: Path, db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporter A's C-STORE hangs past its claim and exporter B takes the result over. While
    B sends it, A's renewal does not extend B's claim, and A's refusal (its last attempt) is
    not recorded over B's outcome: the result is delivered (sent by each: the same SOP
    Instance UID, of which the PACS keeps one), not failed."""
    b_sending, a_recorded = threading.Event(), threading.Event()
    exporters: dict[str, Exporter] = {}
    b_runs: list[threading.Thread] = []
    held_until: list[dt.datetime] = []

    def b_answer(index: int, ds: Dataset, event: evt.Event) -> int:
        exporter_a = exporters["a"]
        exporter_a._renewed_at = -outbox.CLAIM_RENEW_S  # A's next renewal is due
        exporter_a._renew_claims()
        with db.session() as s:
            held_until.extend(s.scalars(select(Delivery.next_attempt_at)))
        b_sending.set()
        a_recorded.wait(30)
        return 0x0000

    def a_answer(index: int, ds: Dataset, event: evt.Event) -> int:
        with db.session() as s:  # A hangs here past its claim; B takes the result over
            s.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
        run = threading.Thread(target=exporters["b"].tick, kwargs={"wait": True})
        run.start()
        b_runs.append(run)
        b_sending.wait(30)
        return 0xA700  # out of resources

    a_ledger, b_ledger = Ledger(db.url), Ledger(db.url)
    record = a_ledger.record_deliveries

    def recorded_by_a(attempts: list[DeliveryAttempt]) -> set[int]:
        try:
            return record(attempts)
        finally:
            a_recorded.set()

    monkeypatch.setattr(a_ledger, "record_deliveries", recorded_by_a)
    try:
        with ScriptedScp(a_answer) as pacs_a, ScriptedScp(b_answer) as pacs_b:
            a_settings = _settings(
                tmp_path, db, {"pacs": pacs_a.port}, timeout_s=100, max_attempts=1
            )
            b_settings = _settings(tmp_path, db, {"pacs": pacs_b.port}, max_attempts=1)
            _analysed(a_settings, db, "1.2.3", 1)
            exporters["a"] = Exporter(a_settings, a_ledger)
            exporters["b"] = Exporter(b_settings, b_ledger)
            assert exporters["a"].tick(wait=True) == 1
            for run in b_runs:
                run.join()
            assert (pacs_a.calls, pacs_b.calls) == (1, 1)
    finally:
        a_ledger.dispose()
        b_ledger.dispose()
    assert _states(db, "1.2.3") == {"pacs": ["delivered"]}
    assert db.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]
    # B's claim (3 x 10 s + 60 s) was not extended to A's (3 x 100 s + 60 s)
    assert held_until and all(t < utcnow() + dt.timedelta(seconds=200) for t in held_until)
    with db.session() as s:
        assert list(s.scalars(select(Delivery.attempts))) == [1]  # B's alone
