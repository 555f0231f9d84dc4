"""Shared fixtures: settings in a temporary data directory, a ledger on SQLite or PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.reactor_pause import install as install_reactor_pause

# The tests' own pynetdicom clients and servers pause their reactors safely too, as the node's
# do (acwi_node.reactor_pause): else a C-STORE response is, now and then, lost to the race.
install_reactor_pause()

POSTGRES_ADMIN_URL = os.environ.get(
    "ACWI_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ACWI_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's ACWI_* environment."""
    for key in list(os.environ):
        if key.startswith("ACWI_") and not key.startswith("ACWI_TEST_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
    )


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    db = Ledger(settings.database_url)
    yield db
    db.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(
        POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"),
        isolation_level="AUTOCOMMIT",
    )
    name = f"acwi_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, reported clearly
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is required for this test: {exc}")
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def ledger_node(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Settings, Ledger]]:
    """Settings in a temporary data directory and their ledger: once on SQLite, once (an
    integration test) on a fresh PostgreSQL database."""
    extra = (
        {}
        if request.param == "sqlite"
        else {"database_url": request.getfixturevalue("postgres_url")}
    )
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data", **extra}, ingest={"fsync": False}
    )
    ledger = Ledger(settings.database_url)
    yield settings, ledger
    ledger.dispose()
