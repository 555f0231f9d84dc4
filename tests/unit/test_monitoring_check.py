"""``acwi-models monitor-sites``: the node's monitoring read of the bundled model, site by
site, on phantom studies it analyses for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acwi_node.inference.manifest import default_model_dir
from models.cli import main


def test_monitor_sites_reads_the_baseline_site_stable_and_a_new_scanner_shifted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sites.json"
    args = ["monitor-sites", "--model", str(default_model_dir()), "--sites", "0,4"]
    assert main([*args, "--studies", "10", "--mc-samples", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("baseline: site 0")
    assert "| 4 | Kestrel Imaging Kestrel Mobile DR |" in table
    body = json.loads(out.read_text())
    assert body["studies"] == 10 and body["baseline_site"] == 0
    same, unseen = body["sites"]
    assert same["site"] == 0 and same["status"] == "stable"  # other seeds: no false alarm
    assert unseen["signals"]["equipment"]["status"] == "shifted"
    assert unseen["signals"]["equipment"]["recent"] == "Kestrel Imaging Kestrel Mobile DR 100%"
    assert unseen["signals"]["site"]["status"] == "stable"
    assert all(s["statistic"] is not None for s in unseen["signals"].values())


def test_monitor_sites_refuses_unknown_sites(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["monitor-sites", "--model", str(default_model_dir())]
    assert main([*args, "--sites", "0,9"]) == 1
    assert "sites are 0 to 4" in capsys.readouterr().err
    assert main([*args, "--studies", "2"]) == 1
