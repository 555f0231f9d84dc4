"""What views of many jobs read of their summaries: a few top-level fields, made by the
database (a CT's summary lists hundreds of images). On SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, SummaryFields
from tests.support.study_flow import analyse, receive


def test_a_summary_s_fields_without_its_images(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    images = [{"sop_instance_uid": f"1.2.3.{k}", "probabilities": {"a": 0.5}} for k in range(300)]
    with ledger.session() as s:
        job = s.scalars(select(Job)).one()
        job.summary = {**job.summary, "images": images, "ood_threshold": None}
    fields = SummaryFields(
        {
            "probabilities": "json",
            "needs_review": "bool",
            "uncertainty": "json",
            "ood_threshold": "float",
            "ood_score": "float",
        },
        ledger.engine.dialect.name,
    )
    with ledger.session() as s:
        head = fields.read(s.execute(select(*fields.columns)).one())
    assert head == {
        "probabilities": {"normal": 0.3, "nodule": 0.7},
        "needs_review": False,
        "uncertainty": {"score": 0.4, "entropy": 0.6, "epistemic": 0.02, "aleatoric": 0.6},
    }  # the null threshold and the absent score alike: not there
    with ledger.session() as s:  # a summary from before the analysis: empty
        s.execute(update(Job).values(summary={}))
        assert fields.read(s.execute(select(*fields.columns)).one()) == {}
    with pytest.raises(ValueError, match="images"):
        SummaryFields({"images": "json"}, "sqlite")
