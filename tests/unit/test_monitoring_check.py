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


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--sites", "0,9", "unknown site 9: sites are 0 to 4"),
        ("--baseline-site", "7", "unknown site 7: sites are 0 to 4"),
        ("--baseline-site", "1,2", "give one site"),
        ("--studies", "2", "must be at least 5, not 2"),
        ("--mc-samples", "1", "must be at least 2, not 1"),
        ("--size", "8", "must be at least"),
    ],
)
def test_monitor_sites_refuses_bad_arguments_as_usage_errors(
    capsys: pytest.CaptureFixture[str], option: str, value: str, said: str
) -> None:
    """A bad argument is a usage error (exit status 2, as for ``synth``), said in one line
    before the model is loaded."""
    args = ["monitor-sites", "--model", str(default_model_dir())]
    with pytest.raises(SystemExit) as exc:
        main([*args, option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
