"""What a ``failed`` notification says of a delivery's failure (``acwi_node/notify/events.py``):
the destination and the status, never the destination's own words (a C-STORE's Error Comment,
an HTTP reason or body), where an archive's "patient mismatch" may name the patient. A real
association to a scripted PACS that refuses with such a comment, on SQLite and (integration)
PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy import select, update

from acwi_node.config import load_settings
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, Study, utcnow
from acwi_node.notify import Notifier
from acwi_node.notify.events import public_reason
from tests.support.scripted_scp import ScriptedScp
from tests.support.webhook import WebhookServer
from tests.unit.test_outbox_destinations import _analysed

CANARY = "DOE^JOHN 4711"


def _refuse(index: int, ds: Dataset, event: evt.Event) -> Dataset:
    status = Dataset()
    status.Status = 0xA700
    status.ErrorComment = f"Patient mismatch: {CANARY}"
    return status


def test_a_failed_delivery_is_told_without_the_destinations_words(
    tmp_path: Path, db: Ledger
) -> None:
    with ScriptedScp(_refuse) as pacs, WebhookServer() as hook:  # type: ignore[arg-type]
        settings = load_settings(
            None,
            node={"data_dir": tmp_path / "data", "database_url": db.url},
            destinations=[
                {"name": "pacs", "ae_title": "SCRIPTED", "host": "127.0.0.1", "port": pacs.port}
            ],
            exporter={"max_attempts": 1, "withdraw_replaced": False},
            notify=[
                {"name": "pager", "url": hook.url, "events": ["failed"]},
                {"name": "chat", "url": hook.url, "events": ["failed"], "format": "text"},
            ],
        )
        _analysed(settings, db, "1.2.3", 1)
        Exporter(settings, db).tick()
        view = db.get_study("1.2.3")
        assert view is not None and view["state"] == "failed"
        assert CANARY in view["reason"]  # the dashboard and the trace keep it whole
        Notifier(settings, db).tick()
        bodies = [r["json"] for r in hook.received]
        assert len(bodies) == 2
        assert not any(CANARY in str(body) for body in bodies), bodies
        pager = next(b for b in bodies if "event" in b)
        assert pager["reason"] == "chest: delivery to pacs failed (0xA700)"
        assert pager["text"].startswith(
            "ACWI Node: a DX from MOD failed: chest: delivery to pacs failed (0xA700)"
        )


def test_an_outage_waited_out_says_since_when(tmp_path: Path, db: Ledger) -> None:
    """A delivery that failed once the destination had been unreachable too long: since
    when, not what the connection said."""
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data", "database_url": db.url},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    _analysed(settings, db, "1.2.3", 1)
    error = (
        "delivery to pacs failed (no status): unreachable since 2026-12-01 10:00:00 UTC"
        f" (exporter.outage_patience_s): association aborted: {CANARY}"
    )
    with db.session() as s:
        s.execute(update(Job).values(state="failed", error=error, finished_at=utcnow()))
        study = s.scalars(select(Study)).one()
        assert public_reason(study) == (
            "chest: delivery to pacs failed (no status): unreachable since 2026-12-01"
            " 10:00:00 UTC (exporter.outage_patience_s)"
        )
