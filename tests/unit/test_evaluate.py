"""Evaluation metrics and the ``acwi-models evaluate --out`` report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from models.cli import main as cli_main
from models.data.synth import write_dataset
from models.evaluate import (
    auc,
    centre_value,
    evaluate_model,
    pointing_hit,
    reliability,
    roc_auc,
    roc_curve,
    training_sites,
    triage_curve,
)
from models.train import config_from_dict, train

TINY = {
    "data": {"train_images": 24, "val_images": 12, "workers": 1},
    "preprocessing": {"input_size": 64},
    "model": {
        "widths": [8, 8, 16, 16, 32],
        "fpn_channels": 16,
        "feature_channels": 16,
        "latent_dim": 8,
    },
    "train": {"epochs": 1, "batch_size": 8, "threads": 1},
    "calibration": {"mc_samples": 4},
    "continual": {"fisher_images": 0},
}


def test_roc_auc_matches_the_rank_statistic() -> None:
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # with ties
    positive = rng.random(300) < 0.3 + 0.4 * (scores > 0)
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    fpr, tpr = roc_curve(scores, positive)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert auc(fpr, tpr) == pytest.approx(greater, abs=1e-12)


def test_reliability_and_ece() -> None:
    truth = np.array([0, 1, 2, 0])
    perfect = np.eye(3)[truth]
    assert reliability(perfect, truth).ece == pytest.approx(0.0)
    overconfident = np.array([[0.9, 0.05, 0.05]] * 4)  # 90 % confident, 50 % right
    rel = reliability(overconfident, truth)
    assert rel.ece == pytest.approx(0.4)
    assert sum(rel.bin_count) == 4


def test_triage_curve_rises_when_uncertain_cases_are_wrong() -> None:
    score = np.array([0.1, 0.2, 0.3, 0.9])
    correct = np.array([True, True, True, False])
    rates, accuracy = triage_curve(score, correct, points=5)
    assert rates.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert accuracy[0] == pytest.approx(0.75) and accuracy[1] == pytest.approx(1.0)


def test_pointing_game() -> None:
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[10, 20] = 1.0  # row 10, column 20
    assert pointing_hit(heatmap, (18, 8, 22, 12))
    assert not pointing_hit(heatmap, (8, 18, 12, 22))  # x and y swapped
    assert not pointing_hit(heatmap, (23, 8, 25, 12))
    assert pointing_hit(heatmap, (23, 8, 25, 12), tolerance=3)
    assert not pointing_hit(np.zeros((8, 8)), (0, 0, 7, 7))
    assert centre_value(heatmap, (18, 8, 22, 12)) == 1.0


def test_training_sites_from_the_manifest_summary() -> None:
    assert training_sites("synthetic phantoms, sites [0, 1, 2, 3], seed 1") == [0, 1, 2, 3]
    assert training_sites("DICOM folder x") is None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    return train(config_from_dict(TINY), out, log=lambda _: None).manifest_path


def test_evaluate_writes_metrics_report_and_plots(tiny_model: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 14, seed=4, sites=[0, 1, 4], size=96)
    metrics = evaluate_model(
        tiny_model, tmp_path / "data", tmp_path / "report", mc_samples=3, log=lambda _: None
    )
    assert metrics["images"] == 14 and metrics["studies"] == 14
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_class"]) == {"normal", "nodule", "effusion"}
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == 14
    assert metrics["ood"]["train_sites"] == [0, 1, 2, 3]
    assert metrics["ood"]["unseen_sites"] == [4]
    assert metrics["ood"]["auroc_unseen_site"] is not None
    assert metrics["per_site"]["4"]["unseen"] and not metrics["per_site"]["0"]["unseen"]
    curve = metrics["triage"]["curve"]
    assert curve["review_rate"][0] == 0.0 and curve["review_rate"][-1] == 1.0
    with (tmp_path / "data/labels.csv").open(newline="") as fh:
        labels = [row["label"] for row in csv.DictReader(fh)]
    findings = sum(label != "normal" for label in labels)
    assert findings > 0  # every finding has a box, so each one is a pointing-game case
    assert sum(v["cases"] for v in metrics["pointing_game"].values()) == findings
    report = tmp_path / "report"
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]
    text = (report / "report.md").read_text()
    for name in ("roc.png", "reliability.png", "triage.png", "per_site.png", "ood.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
    assert "## Per site" in text and "4 (unseen)" in text


def test_evaluate_cli_reports_bad_input(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = cli_main(["evaluate", "--model", str(tiny_model), "--data", str(tmp_path / "empty")])
    assert code == 1
    assert "no labels.csv" in capsys.readouterr().err
