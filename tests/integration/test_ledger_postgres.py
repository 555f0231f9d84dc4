"""The ledger on PostgreSQL when the node's processes start together."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import create_engine, inspect

from acwi_node.ledger.models import Base


def test_processes_starting_at_once_create_the_schema_once(postgres_url: str) -> None:
    code = f"from acwi_node.ledger import Ledger; Ledger({postgres_url!r}).dispose()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    failures = [p.stderr.read() for p in procs if p.wait(timeout=120) != 0]  # type: ignore[union-attr]
    assert failures == []
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()
