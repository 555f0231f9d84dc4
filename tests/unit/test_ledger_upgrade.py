"""A ledger made by an earlier version: the columns and indexes it lacks are added at start-up,
or start-up stops with what is missing. On SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from acwi_node.cli import main
from acwi_node.config import load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.repository import LedgerSchemaError, new_claim
from tests.support.study_flow import (
    analyse,
    deliver,
    delivered_study,
    dx_record,
    receive,
    study_id,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    db = Ledger(database_url)
    yield db
    db.dispose()


def columns(ledger: Ledger, table: str) -> set[str]:
    return {c["name"] for c in inspect(ledger.engine).get_columns(table)}


def test_an_earlier_ledger_gets_the_columns_and_indexes_it_lacks(
    ledger: Ledger, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data", "database_url": database_url}
    )
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    # What a version without these columns and this index left.
    with ledger.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_deliveries_due"))
        conn.execute(text("ALTER TABLE deliveries DROP COLUMN last_error"))
        conn.execute(text("ALTER TABLE deliveries DROP COLUMN delivered_at"))
        conn.execute(text("ALTER TABLE verdicts DROP COLUMN boxes"))  # a JSON column
        conn.execute(text("ALTER TABLE review_items DROP COLUMN sampled"))  # a boolean
        conn.execute(text("ALTER TABLE verdicts DROP COLUMN superseded_at"))  # a date-time
        conn.execute(text("DROP TABLE association_holds"))  # a table
        if database_url.startswith("postgresql"):  # SQLite drops no column a key names
            conn.execute(text("ALTER TABLE verdicts DROP COLUMN amends_id"))  # a foreign key
    assert "last_error" not in columns(ledger, "deliveries")
    ledger.dispose()

    with caplog.at_level(logging.WARNING, logger="acwi_node.ledger"):
        upgraded = Ledger(database_url)
    try:
        assert {"last_error", "delivered_at"} <= columns(upgraded, "deliveries")
        assert "boxes" in columns(upgraded, "verdicts") and "verdicts.boxes" in caplog.text
        assert "sampled" in columns(upgraded, "review_items")
        assert "superseded_at" in columns(upgraded, "verdicts")
        assert "verdicts.superseded_at" in caplog.text
        assert "amends_id" in columns(upgraded, "verdicts")
        assert "review_items.sampled" in caplog.text
        assert upgraded.worklist() == []  # the query reads the new column
        assert "association_holds" in inspect(upgraded.engine).get_table_names()
        study = upgraded.record_instances([(dx_record("1.2.4", "1.2.4.1"), True)], holder="1-a")
        upgraded.association_released([study[0].study_id], holder="1-a")
        indexes = {ix["name"] for ix in inspect(upgraded.engine).get_indexes("deliveries")}
        assert "ix_deliveries_due" in indexes
        assert "deliveries.delivered_at" in caplog.text and "ix_deliveries_due" in caplog.text
        # The existing row took the column's default, and the outbox works on it.
        (due,) = upgraded.due_deliveries()
        upgraded.record_delivery(
            due.id, delivered=False, status=None, error="refused", max_attempts=1, backoff_s=1
        )
        view = upgraded.get_study("1.2.3")
        assert view is not None and view["state"] == "failed" and "refused" in view["reason"]
        caplog.clear()
        Ledger(database_url).dispose()  # nothing left to add: nothing logged
        assert "upgraded" not in caplog.text
    finally:
        upgraded.dispose()


def test_an_earlier_ledgers_outbox_gets_claim_tokens_and_is_sent_from(
    ledger: Ledger, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger of the version before claim tokens, with a delivery taken by its exporter
    when it stopped: the columns are added, and the new exporter takes the delivery once
    that claim has run out, renews it and records its outcome under its own claim."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data", "database_url": database_url}
    )
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    (due,) = ledger.due_deliveries()
    assert ledger.claim_deliveries([due.id], lease_s=0) == {due.id}  # the old exporter's
    with ledger.engine.begin() as conn:
        for table in ("deliveries", "hl7_outbound", "notifications"):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN claim_token"))
    ledger.dispose()

    with caplog.at_level(logging.WARNING, logger="acwi_node.ledger"):
        upgraded = Ledger(database_url)
    try:
        for table in ("deliveries", "hl7_outbound", "notifications"):
            assert "claim_token" in columns(upgraded, table)
            assert f"{table}.claim_token" in caplog.text
        claim = new_claim()
        assert upgraded.claim_deliveries([due.id], lease_s=600, claim=claim) == {due.id}
        assert upgraded.renew_delivery_claims([due.id], lease_s=600, claim=claim) == {due.id}
        assert upgraded.record_delivery(
            due.id, delivered=True, status=0, error="", max_attempts=1, backoff_s=1, claim=claim
        )
        view = upgraded.get_study("1.2.3")
        assert view is not None and view["state"] == "delivered"
    finally:
        upgraded.dispose()


def test_a_column_that_cannot_be_added_stops_start_up_with_its_name(
    ledger: Ledger, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text("ALTER TABLE purges DROP COLUMN started_at"))  # computed default
    ledger.dispose()
    with pytest.raises(LedgerSchemaError, match="table purges lacks the column started_at"):
        Ledger(database_url)
    config = tmp_path / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{database_url}"\n'
    )
    assert main(["--config", str(config), "status"]) == 2
    assert "acwi-node: the ledger's table purges lacks the column started_at" in (
        capsys.readouterr().err
    )


def test_an_earlier_ledgers_accounts_get_the_sign_in_throttle(
    ledger: Ledger, database_url: str
) -> None:
    """Accounts made before the throttle's columns existed: the columns are added, the
    existing accounts start with no failures, and failures are counted from there."""
    from acwi_node.ledger.models import utcnow
    from acwi_node.review.auth import hash_password
    from acwi_node.review.store import ReviewStore

    ReviewStore(ledger).add_user("jane", hash_password("correct horse battery"), "radiologist")
    with ledger.engine.begin() as conn:
        conn.execute(text("ALTER TABLE users DROP COLUMN failed_sign_ins"))
        conn.execute(text("ALTER TABLE users DROP COLUMN last_failed_sign_in_at"))
    ledger.dispose()
    upgraded = Ledger(database_url)
    try:
        store = ReviewStore(upgraded)
        jane = store.get_user("jane")
        assert jane is not None and (jane.failed_sign_ins, jane.last_failed_sign_in_at) == (0, None)
        assert store.sign_in_failed(jane.id, utcnow()) == 1
        assert store.sign_in_failed(jane.id, utcnow()) == 2
    finally:
        upgraded.dispose()


def reopened_without(ledger: Ledger, database_url: str, table: str, column: str) -> Ledger:
    """``ledger`` as a version without ``table.column`` left it, opened again by this one
    (which adds the column)."""
    with ledger.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    ledger.dispose()
    upgraded = Ledger(database_url)
    assert column in columns(upgraded, table)
    return upgraded


def test_instances_recorded_before_their_bytes_were_kept(
    ledger: Ledger, database_url: str, tmp_path: Path
) -> None:
    """A ledger from before ``instances.crc32``: the column is added; an instance it recorded,
    sent again, re-opens its study (its bytes are not known), and from then on is known."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data", "database_url": database_url}
    )
    delivered_study(settings, ledger, "1.2.3", n=1)
    upgraded = reopened_without(ledger, database_url, "instances", "crc32")
    try:
        again = replace(dx_record("1.2.3", "1.2.3.1", size=1000), crc32=42)
        assert upgraded.record_instance(again, first_in_association=True).reopened
        analyse(settings, upgraded, "1.2.3")
        deliver(upgraded)
        assert upgraded.record_instance(again, first_in_association=True).unchanged
    finally:
        upgraded.dispose()


def test_studies_recorded_before_their_date_was_kept(
    ledger: Ledger, database_url: str, tmp_path: Path
) -> None:
    """A ledger from before ``studies.study_date``: the column is added, empty for the studies
    it holds (routing's ``max_age_days`` lets them through); later instances fill it."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data", "database_url": database_url}
    )
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    upgraded = reopened_without(ledger, database_url, "studies", "study_date")
    try:
        later = replace(dx_record("1.2.3", "1.2.3.2"), study_date="20261201")
        upgraded.record_instance(later, first_in_association=False)
        with upgraded.engine.connect() as conn:
            dates = conn.execute(text("SELECT study_date FROM studies")).scalars().all()
        assert dates == ["20261201"]
    finally:
        upgraded.dispose()


def test_studies_recorded_before_their_generations_sender_was_kept(
    ledger: Ledger, database_url: str, tmp_path: Path
) -> None:
    """A ledger from before ``studies.generation_calling_ae``: the column is added, empty for
    the studies it holds, which are routed and shown as their first sender's, as before; a
    generation another AE re-opens is that AE's."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data", "database_url": database_url}
    )
    delivered_study(settings, ledger, "1.2.3", n=1)
    upgraded = reopened_without(ledger, database_url, "studies", "generation_calling_ae")
    try:
        view = upgraded.get_study("1.2.3")
        assert view is not None
        assert (view["calling_ae"], view["generation_calling_ae"]) == ("MOD", "MOD")
        assert upgraded.study_facts(study_id(upgraded, "1.2.3")).calling_ae == "MOD"
        again = replace(dx_record("1.2.3", "1.2.3.1", size=1000), calling_ae="PACS2")
        assert upgraded.record_instance(again, first_in_association=True).reopened
        assert upgraded.study_facts(study_id(upgraded, "1.2.3")).calling_ae == "PACS2"
    finally:
        upgraded.dispose()
