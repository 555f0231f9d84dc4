"""What views of many jobs read of their summaries: a few top-level fields, made by the
database (a CT's summary lists hundreds of images). On SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, summary_head
from tests.support.study_flow import analyse, receive


def test_a_summary_s_fields_without_its_images(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    images = [{"sop_instance_uid": f"1.2.3.{k}", "probabilities": {"a": 0.5}} for k in range(300)]
    with ledger.session() as s:
        job = s.scalars(select(Job)).one()
        job.summary = {**job.summary, "images": images, "ood_threshold": None}
    fields = ("probabilities", "needs_review", "uncertainty", "ood_threshold", "ood_score")
    with ledger.session() as s:
        head = s.scalar(select(summary_head(fields)))
    assert isinstance(head, dict)
    assert head["probabilities"] == {"normal": 0.3, "nodule": 0.7}
    assert head["needs_review"] is False
    assert head["uncertainty"]["score"] == 0.4
    assert "images" not in head and "skipped" not in head
    # null or absent: None to .get()
    assert head.get("ood_threshold") is None and head.get("ood_score") is None
    with ledger.session() as s:  # a summary from before the analysis: empty
        s.execute(update(Job).values(summary={}))
        assert not s.scalar(select(summary_head(fields)))
    with pytest.raises(ValueError, match="images"):
        summary_head(("images",))
