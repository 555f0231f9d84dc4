"""Studies arriving where people read it: ``acwi-node monitor``, ``GET /api/monitoring``, the
monitoring page and the dashboard, the metrics; and the ``stopped`` notification."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from acwi_node.cli import main
from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.model_overview import models_overview
from acwi_node.observability.metrics import ledger_registry
from acwi_node.web.api import create_app
from tests.support.arrivals import WEEK, Arrivals
from tests.support.review_case import add_user, sign_in


def _stopped(ledger: Ledger, now: dt.datetime) -> None:
    """CT1 sent ten studies in the same hour of each of the last four weeks, none now; CR2
    sends as ever."""
    arrivals = Arrivals(ledger)
    arrivals.add(now - 5 * WEEK, "OLDCR")
    arrivals.weekly(now, "CT1", [0, 10, 9, 11, 10])
    arrivals.weekly(now, "CR2", [6, 5, 6, 5, 6])


def test_monitor_command_tells_a_source_that_stopped(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
    )
    Arrivals(ledger).weekly(utcnow(), "CR2", [6])
    assert main(["--config", str(config), "monitor"]) == 0  # a new node: too few weeks
    assert "studies arriving: TOO FEW WEEKS" in capsys.readouterr().out

    _stopped(ledger, utcnow())
    assert main(["--config", str(config), "monitor"]) == 1
    out = capsys.readouterr().out
    assert "studies arriving: DROPPED  (the last 2 h and 24 h against" in out
    assert re.search(r"from CT1 +0 \(10, 9, 11, 10\) +0 \(10, 9, 11, 10\) +dropped", out)
    assert re.search(r"from CR2 +12 \(5, 6, 5, 6\) .* as usual", out)
    # --json holds it; --model reads one model, not the node's arrivals
    assert main(["--config", str(config), "monitor", "--json"]) == 1
    body = json.loads(capsys.readouterr().out)
    ct1 = next(f for f in body["traffic"]["flows"] if f["name"] == "CT1")
    assert ct1["status"] == "shifted" and ct1["windows"][0]["expected"] == 10.0
    known = models_overview(settings, ledger)[0].versions[0].name  # the node's running model
    assert main(["--config", str(config), "monitor", "--model", known, "--json"]) == 0
    assert "traffic" not in json.loads(capsys.readouterr().out)


def test_api_page_dashboard_and_metrics(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    settings = settings.model_copy(
        update={
            "monitoring": settings.monitoring.model_copy(update={"refresh_s": 3600}),
            "review": settings.review.model_copy(update={"cookie_secure": False}),
        }
    )
    Arrivals(ledger).weekly(utcnow(), "CT1", [1])
    registry = ledger_registry(settings, ledger)
    assert registry.get_sample_value("acwi_traffic_status", {"kind": "node", "name": "all"}) is (
        None  # too few weeks: not compared
    )
    labels = {"kind": "source", "name": "CT1", "hours": "2"}
    assert registry.get_sample_value("acwi_traffic_studies", labels) == 1

    _stopped(ledger, utcnow())
    # a scrape within monitoring.refresh_s shows the figures it has; a new process reads afresh
    assert registry.get_sample_value("acwi_traffic_studies", labels) == 1
    registry = ledger_registry(settings, ledger)
    assert registry.get_sample_value("acwi_traffic_status", {"kind": "source", "name": "CT1"}) == 2
    assert registry.get_sample_value("acwi_traffic_status", {"kind": "source", "name": "CR2"}) == 0
    assert registry.get_sample_value("acwi_traffic_expected_studies", labels) == 10.0
    assert registry.get_sample_value("acwi_traffic_studies", labels) == 1  # one, not ten

    add_user(ledger)
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client)
        traffic = client.get("/api/monitoring").json()["traffic"]
        assert traffic["status"] == "shifted" and traffic["weeks_covered"] == 4
        assert [(f["kind"], f["name"], f["status"]) for f in traffic["flows"]][:2] == [
            ("node", "all", "stable"),  # 7 where 14 to 17 came: p 0.014
            ("source", "CT1", "shifted"),
        ]
        assert "traffic" not in client.get("/api/monitoring", params={"model": "x"}).json()
        page = client.get("/review/monitoring").text
        assert 'id="traffic"' in page and 'status status-shifted">dropped</span>' in page
        assert re.search(
            r'flow-source status-shifted"><td>From CT1</td>\s*<td class="num">1</td>'
            r"<td>10, 9, 11, 10 \(mean 10.0\)</td>",
            page,
        )
        dashboard = client.get("/review/dashboard").text
        assert '<td id="q-traffic">Studies from CT1: dropped</td>' in dashboard
