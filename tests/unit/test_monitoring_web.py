"""Model monitoring where people read it: ``acwi-node monitor``, ``GET /api/monitoring``,
the monitoring page, pinning a baseline (command, API, page; audited), and the metrics."""

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
from acwi_node.observability.metrics import ledger_registry
from acwi_node.web.api import create_app
from tests.support.monitoring_jobs import NEW_SCANNER, TYPICAL, Jobs
from tests.support.review_case import add_user, sign_in

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def _populate(ledger: Ledger, *, shifted: bool) -> None:
    """100 typical studies 40 days ago (the baseline), 60 in the last week; with ``shifted``
    30 more from a scanner the model never saw, out of distribution."""
    jobs = Jobs(ledger)
    now = utcnow()
    jobs.many(100, now - 40 * DAY, HOUR, seed=1, **TYPICAL)
    jobs.many(60, now - 6 * DAY, HOUR, seed=2, **TYPICAL)
    if shifted:
        jobs.many(30, now - 3 * DAY, HOUR, seed=3, **NEW_SCANNER)


def _config(tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
        "[monitoring]\nbaseline_studies = 100\nmin_studies = 30\n"
    )
    return path


def test_monitor_command_reads_shifted_and_exits_1(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    _populate(ledger, shifted=True)
    config = _config(tmp_path, settings)
    assert main(["--config", str(config), "monitor"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("dianet-cxr 1.0.0: SHIFTED")
    assert "baseline: its first 100 studies" in out
    assert re.search(r"equipment\s+Northwind Imaging NW-DR 500 100%\s+.*VD-CR 12 33%.*shifted", out)
    assert re.search(
        r"SITEA, Vantage Diagnostics VD-CR 12: 30 studies, .*OOD 100\.0%: shifted \(.*ood_rate", out
    )
    assert re.search(r"SITEA, Northwind Imaging NW-DR 500: 60 studies, .*: stable$", out, re.M)
    assert main(["--config", str(config), "monitor", "--json", "--weeks", "1"]) == 1
    body = json.loads(capsys.readouterr().out)
    (model,) = body["models"]
    assert model["status"] == "shifted" and model["window"]["studies"] == 90
    assert len(model["trend"]) == 1
    statuses = {s["signal"]: s["status"] for s in model["signals"]}
    assert statuses["ood_rate"] == "shifted" and statuses["site"] == "stable"
    # a model the node never ran: one line, exit 2 (it was "no model analysed" and exit 0)
    assert main(["--config", str(config), "monitor", "--model", "other"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == "acwi-node monitor: no model other on this node"
    # a window of no days is refused, not read as the default window
    assert main(["--config", str(config), "monitor", "--days", "0"]) == 2
    assert "--days must be 1 to 365" in capsys.readouterr().err


def test_monitor_baseline_command_pins_and_clears(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    _populate(ledger, shifted=False)
    config = _config(tmp_path, settings)
    now = utcnow()
    since = (now - 41 * DAY).strftime("%Y-%m-%d")
    until = (now - 30 * DAY).strftime("%Y-%m-%d")
    args = ["--config", str(config), "monitor", "baseline", "dianet-cxr", "1.0.0"]
    assert main([*args, "--since", since, "--until", until]) == 0
    assert "baseline pinned, 100 studies" in capsys.readouterr().out
    assert main([*args, "--since", until, "--until", until]) == 1  # none that day
    assert "a baseline needs at least 30" in capsys.readouterr().err
    assert main([*args, "--since", "yesterday", "--until", until]) == 1
    assert "not a date" in capsys.readouterr().err
    assert main([*args, "--since", since, "--until", "9999-12-31"]) == 1
    assert "not a date: 9999-12-31 is past the last day" in capsys.readouterr().err
    assert main([*args]) == 2
    # a version the node never ran: one line, exit 2, whether pinned or cleared
    other = ["--config", str(config), "monitor", "baseline", "dianet-cxr", "9.9.9"]
    for extra in (["--since", since, "--until", until], ["--clear"]):
        assert main([*other, *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[-1] == (
            "acwi-node monitor baseline: no model dianet-cxr version 9.9.9 on this node"
        )
    assert main(["--config", str(config), "monitor", "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["baseline"]["kind"] == "pinned"
    assert model["baseline"]["pinned_by"].startswith("os:")
    assert main([*args, "--clear"]) == 0
    assert "compared with its first 100 studies" in capsys.readouterr().out
    assert main([*args, "--clear"]) == 0
    assert "(no baseline was pinned)" in capsys.readouterr().out
    audit = (settings.data_dir / "audit" / "audit.jsonl").read_text()
    assert "monitoring baseline of dianet-cxr 1.0.0 pinned: 100 studies" in audit
    assert audit.count("monitoring baseline of dianet-cxr 1.0.0 cleared") == 1


def test_monitoring_api_and_page(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    settings = settings.model_copy(
        update={
            "monitoring": settings.monitoring.model_copy(
                update={"baseline_studies": 100, "min_studies": 30}
            ),
            "review": settings.review.model_copy(update={"cookie_secure": False}),
        }
    )
    _populate(ledger, shifted=True)
    add_user(ledger)
    add_user(ledger, "admin", role="admin")
    with TestClient(create_app(settings, ledger)) as client:
        assert client.get("/api/monitoring").status_code == 401
        sign_in(client)
        body = client.get("/api/monitoring", params={"weeks": 2}).json()
        (model,) = body["models"]
        assert body["days"] == 7 and model["status"] == "shifted"
        assert [w["studies"] for w in model["trend"]] == [0, 0]
        page = client.get("/review/monitoring")
        assert page.status_code == 200
        text = page.text
        assert 'href="/review/monitoring"' in text  # in the navigation
        assert 'class="status status-shifted">shifted</span>' in text
        assert re.search(r'signal-equipment status-shifted">.*VD-CR 12 33%', text)
        assert re.search(r"<td>SITEA</td><td>Vantage Diagnostics VD-CR 12</td><td>30</td>", text)
        assert re.search(r'status-shifted">shifted \(review_rate, ood_rate, ', text)
        assert [g["studies"] for g in model["by_source"]] == [60, 30]
        assert "Pin the baseline" not in text  # a radiologist reads; administrators pin
        dashboard = client.get("/review/dashboard").text
        assert '<td id="q-monitoring">dianet-cxr 1.0.0: shifted</td>' in dashboard
        now = utcnow()
        period = {
            "since": (now - 41 * DAY).strftime("%Y-%m-%d"),
            "until": (now - 30 * DAY).strftime("%Y-%m-%d"),
        }
        url = "/api/monitoring/baselines/dianet-cxr/1.0.0"
        assert client.put(url, json=period).status_code == 403
        client.post("/logout", data={"csrf_token": ""})

    with TestClient(create_app(settings, ledger)) as client:
        csrf = sign_in(client, "admin")
        assert client.put(url, content=json.dumps(period)).status_code == 415
        refused = client.put(url, json={"since": period["until"], "until": period["until"]})
        assert refused.status_code == 422 and "at least 30" in refused.json()["detail"]
        refused = client.put(url, json={"since": period["since"], "until": "9999-12-31"})
        assert refused.status_code == 422 and "not a date" in refused.json()["detail"]
        pinned = client.put(url, json=period)
        assert pinned.status_code == 200 and pinned.json()["studies"] == 100
        model = client.get("/api/monitoring").json()["models"][0]
        assert model["baseline"]["kind"] == "pinned" and model["baseline"]["pinned_by"] == "admin"
        assert client.delete(url).json()["notice"] == (
            "dianet-cxr 1.0.0: compared with its first 100 studies"
        )
        assert client.delete(url).json()["notice"].endswith("(no baseline was pinned)")
        # a version the node never ran: 404, as the command's exit 2 (422 and 200 before)
        for answer in (
            client.put("/api/monitoring/baselines/dianet-cxr/9.9.9", json=period),
            client.delete("/api/monitoring/baselines/dianet-cxr/9.9.9"),
        ):
            assert answer.status_code == 404
            assert answer.json() == {"detail": "no model dianet-cxr version 9.9.9 on this node"}
        # the page's form
        page = client.get("/review/monitoring")
        assert "Pin the baseline" in page.text
        answer = client.post(
            "/review/monitoring/baseline",
            data={"csrf_token": csrf, "model": "dianet-cxr", "version": "1.0.0", **period},
        )
        assert answer.status_code == 200 and "baseline pinned, 100 studies" in answer.text
        assert "Back to its first studies" in answer.text
        answer = client.post(
            "/review/monitoring/baseline",
            data={"csrf_token": csrf, "model": "dianet-cxr", "version": "1.0.0", "clear": "1"},
        )
        assert "compared with its first 100 studies" in answer.text
        answer = client.post(
            "/review/monitoring/baseline",
            data={"csrf_token": "forged", "model": "dianet-cxr", "version": "1.0.0", **period},
        )
        assert answer.status_code == 403


def test_monitoring_metrics_and_their_cache(ledger_node: tuple[Settings, Ledger]) -> None:
    settings, ledger = ledger_node
    settings = settings.model_copy(
        update={
            "monitoring": settings.monitoring.model_copy(
                update={"baseline_studies": 100, "min_studies": 30, "refresh_s": 3600}
            )
        }
    )
    _populate(ledger, shifted=False)
    registry = ledger_registry(settings, ledger)

    def status_of(signal: str) -> float | None:
        return registry.get_sample_value(
            "acwi_model_monitoring_status",
            {"model": "dianet-cxr", "version": "1.0.0", "signal": signal},
        )

    assert status_of("ood_rate") == 0.0  # stable
    assert status_of("equipment") == 0.0
    assert (
        registry.get_sample_value(
            "acwi_model_monitoring_recent_studies", {"model": "dianet-cxr", "version": "1.0.0"}
        )
        == 60
    )
    # the shift arrives, but a scrape within monitoring.refresh_s shows the figures it has
    Jobs(ledger).many(
        30, utcnow() - 2 * DAY, HOUR, seed=4, ood=lambda rng: rng.gauss(3.0, 0.2), review=True
    )
    assert status_of("ood_rate") == 0.0
    registry = ledger_registry(settings, ledger)  # a new process: computed afresh
    assert status_of("ood_rate") == 2.0  # shifted
    assert status_of("equipment") == 0.0
    statistic = registry.get_sample_value(
        "acwi_model_monitoring_statistic",
        {"model": "dianet-cxr", "version": "1.0.0", "signal": "ood_rate"},
    )
    assert statistic is not None and statistic > 3.29
