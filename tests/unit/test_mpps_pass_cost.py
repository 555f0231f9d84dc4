"""What a completion pass costs while MPPS steps await instances that may never come, and that
it still finds every step whose instances arrived: on SQLite and on PostgreSQL.

A modality that sends MPPS for studies whose images go elsewhere leaves such steps for the
retention period (7 days); a pass must not look up every listed instance of every one of them
again. Pinned by the statements a pass runs (counted on the engine), never by time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event, update
from sqlalchemy.orm import Session

import acwi_node.ingest.mpps as mpps
from acwi_node.config import Settings
from acwi_node.ingest.mpps import CompletionSignals
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Instance, Study, utcnow
from tests.unit.test_mpps_signals import record


@contextmanager
def statements(ledger: Ledger) -> Iterator[list[str]]:
    """The SQL statements run on the ledger's engine inside the block."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)


def await_steps(signals: CompletionSignals, n: int, instances: int = 20) -> None:
    """``n`` completed steps, each of its own study, whose instances never come."""
    for _ in range(n):
        signals.expect(generate_uid(), [generate_uid()], [generate_uid() for _ in range(instances)])


def settle(signals: CompletionSignals) -> None:
    """Passes until every step was looked at once (a pass looks at a bounded number)."""
    for _ in range(20):
        with statements(signals.ledger) as seen:
            signals.due_by()
        if len(seen) <= 1:
            return
    raise AssertionError("the passes never stopped looking up instances")


def test_a_pass_with_nothing_new_is_one_query_however_many_steps_await(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _, ledger = ledger_node
    signals = CompletionSignals(ledger)
    await_steps(signals, 3)
    signals.due_by()  # looks at the new steps (and prunes: once per 10 minutes)
    with statements(ledger) as few:
        assert signals.due_by() == []
    await_steps(signals, 60)
    settle(signals)
    with statements(ledger) as many:
        assert signals.due_by() == []
    assert len(few) == len(many) == 1, many
    assert signals.pending == 63


def test_an_instance_arriving_makes_its_step_due_at_the_next_pass(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _, ledger = ledger_node
    signals = CompletionSignals(ledger)
    await_steps(signals, 30)
    study, sops = generate_uid(), [generate_uid() for _ in range(3)]
    study_id = record(ledger, study, sops[0])
    signals.expect(generate_uid(), [study], sops)
    settle(signals)
    record(ledger, study, sops[1])
    assert signals.due_by() == []
    record(ledger, study, sops[2])
    with statements(ledger) as seen:
        assert signals.due_by() == [(study_id, 1, "mpps")]
    # the signals, the one step's instances, the instances' study, the spent signal deleted
    assert len(seen) <= 5, seen
    assert signals.pending == 30


def test_a_step_naming_no_study_is_due_once_its_instances_arrived(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _, ledger = ledger_node
    signals = CompletionSignals(ledger)
    sops = [generate_uid() for _ in range(2)]
    signals.expect(generate_uid(), [], sops)
    assert signals.due_by() == []
    study = generate_uid()
    record(ledger, study, sops[0])
    assert signals.due_by() == []
    study_id = record(ledger, study, sops[1])
    assert signals.due_by() == [(study_id, 1, "mpps")]


def test_instances_in_a_study_the_step_does_not_name_are_found_by_the_periodic_look(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ledger = ledger_node
    signals = CompletionSignals(ledger)
    sops = [generate_uid() for _ in range(2)]
    signals.expect(generate_uid(), [generate_uid()], sops)  # the images carry another UID
    assert signals.due_by() == []
    other = generate_uid()
    record(ledger, other, sops[0])
    study_id = record(ledger, other, sops[1])
    monkeypatch.setattr(mpps, "RECHECK_EVERY_S", 0.0)  # the periodic look is due
    assert signals.due_by() == [(study_id, 1, "mpps")]


def test_a_pass_looks_up_a_bounded_number_of_instances(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many steps at once (a restart with a week of them): a few per pass, the newest first,
    until every one was looked at."""
    _, ledger = ledger_node
    monkeypatch.setattr(mpps, "LOOKUPS_PER_PASS", 100)
    signals = CompletionSignals(ledger)
    study_ids: list[int] = []
    for _ in range(10):
        study, sops = generate_uid(), [generate_uid() for _ in range(40)]
        for sop in sops:
            study_id = record(ledger, study, sop)
        study_ids.append(study_id)
        signals.expect(generate_uid(), [study], sops)
    # 40 + 40 < 100 <= 40 + 40 + 40: three steps a pass
    assert [s for s, _, _ in signals.due_by()] == sorted(study_ids[-3:])
    due = [s for _ in range(3) for s, _, _ in signals.due_by()]
    assert sorted(due) == sorted(study_ids[:-3])
    assert signals.pending == 0


@pytest.mark.integration
def test_an_instance_committed_after_a_later_one_is_not_missed(postgres_url: str) -> None:
    """Several ingest processes commit at once on PostgreSQL: an instance row with a lower id
    can become visible after one with a higher id. The step listing both is still found."""
    ledger = Ledger(postgres_url)
    try:
        signals = CompletionSignals(ledger)
        first, second = generate_uid(), generate_uid()
        first_id = record(ledger, first, generate_uid())
        second_id = record(ledger, second, generate_uid())
        sops = [generate_uid(), generate_uid()]
        signals.expect(generate_uid(), [first, second], sops)
        assert signals.due_by() == []
        # An ingest transaction writes the first study's instance (the lower id) and its
        # study's row, and has not committed yet...
        with Session(ledger.engine) as slow:
            slow.add(
                Instance(
                    study_id=first_id,
                    sop_instance_uid=sops[0],
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path="a.dcm",
                    size=1,
                )
            )
            slow.execute(
                update(Study)
                .where(Study.id == first_id)
                .values(instance_count=Study.instance_count + 1, updated_at=utcnow())
            )
            slow.flush()
            # ...while another writes the second study's (a higher id) and commits.
            record(ledger, second, sops[1])
            assert signals.due_by() == []
            slow.commit()
        assert signals.due_by() == [(first_id, 1, "mpps"), (second_id, 1, "mpps")]
    finally:
        ledger.dispose()
