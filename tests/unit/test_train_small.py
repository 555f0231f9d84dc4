"""A tiny end-to-end training run, configuration handling and calibration helpers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from acwi_node.inference.analyser import Analyser
from acwi_node.inference.manifest import load_manifest
from acwi_node.inference.preprocess import PreprocessSpec
from models.cli import main as cli_main
from models.data.dicom_dataset import DicomFolderDataset, LabelledImage, scan_folder
from models.data.synth import write_dataset, write_study
from models.train import (
    config_from_dict,
    fit_ood,
    fit_temperature,
    load_config,
    train,
    validation_mask,
)

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
}


def test_tiny_training_writes_a_loadable_model(tmp_path: Path) -> None:
    config = config_from_dict(TINY)
    lines: list[str] = []
    result = train(config, tmp_path / "model", log=lines.append)
    assert any(line.startswith("epoch 1/1") for line in lines)
    manifest = load_manifest(result.manifest_path)
    assert manifest.input.size == 64
    assert manifest.training.train_images == 24 and manifest.training.val_images == 12
    assert len(manifest.ood.mean) == 8
    assert not (tmp_path / "model" / "checkpoint.pt").exists()
    raw = json.loads(result.manifest_path.read_text())
    assert raw["weights"] == "weights.pt" and len(raw["weights_sha256"]) == 64

    analyser = Analyser.load(result.manifest_path, mc_samples=3)
    datasets = [pydicom.dcmread(p) for p in write_study(tmp_path / "s", n_images=1, size=96)]
    study = analyser.analyse(datasets)
    assert study.images[0].heatmap_array().shape == (96, 96)
    assert sum(study.probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def test_training_is_deterministic(tmp_path: Path) -> None:
    config = config_from_dict(TINY)
    a = train(config, tmp_path / "a", log=lambda _: None)
    b = train(config, tmp_path / "b", log=lambda _: None)
    assert a.manifest.weights_sha256 == b.manifest.weights_sha256
    assert a.manifest.temperature == b.manifest.temperature


def test_training_from_a_dicom_folder(tmp_path: Path) -> None:
    # every label among the training studies (training refuses a label without images)
    balanced = {"normal": 0.4, "nodule": 0.3, "effusion": 0.3}
    write_dataset(tmp_path / "data", 10, seed=2, size=96, class_fractions=balanced)
    config = config_from_dict(TINY)
    result = train(config, tmp_path / "model", data_dir=tmp_path / "data", log=lambda _: None)
    manifest = load_manifest(result.manifest_path)
    assert manifest.training.train_images + manifest.training.val_images == 10
    assert manifest.training.dataset.startswith("DICOM folder")


def test_dicom_folder_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path, 4, seed=3, size=96)
    items = scan_folder(tmp_path, labels=["normal", "nodule", "effusion"])
    assert len(items) == 4 and all(item.site is not None for item in items)
    data = DicomFolderDataset(
        items, PreprocessSpec(size=64, mean=0.5, std=0.25), ["normal", "nodule", "effusion"]
    )
    x, y = data[0]
    assert tuple(x.shape) == (1, 64, 64) and x.dtype == torch.float32
    assert y == ["normal", "nodule", "effusion"].index(items[0].label)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"sop_instance_uid,label\n{items[0].sop_instance_uid},fracture\n")
    with pytest.raises(ValueError, match="not one of"):
        scan_folder(tmp_path, labels_csv=bad, labels=["normal", "nodule", "effusion"])


def test_cli_synth(tmp_path: Path) -> None:
    assert (
        cli_main(["synth", "--out", str(tmp_path), "--studies", "3", "--seed", "1", "--size", "96"])
        == 0
    )
    assert (tmp_path / "labels.csv").is_file()
    assert len(list(tmp_path.rglob("*.dcm"))) == 3


def test_default_preset_and_overrides(tmp_path: Path) -> None:
    config = load_config("default")
    assert config.preprocessing.input_size == 128
    assert config.calibration.target_review_rate == 0.2
    override = tmp_path / "o.toml"
    override.write_text("[train]\nepochs = 2\n")
    assert load_config("default", override).train.epochs == 2
    override.write_text("[train]\nepoch = 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config("default", override)
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("no-such-preset")


def test_fit_temperature_recovers_known_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 3, generator=g) * 3.0
    targets = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=g).squeeze(1)
    fitted = fit_temperature(logits.unsqueeze(0), targets.numpy())
    assert fitted == pytest.approx(2.0, rel=0.1)


def test_fit_ood_whitens_training_data() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5000, 4)) * np.array([1.0, 2.0, 0.5, 3.0]) + 1.0
    mean, precision = fit_ood(data, shrinkage=0.0)
    np.testing.assert_allclose(mean, 1.0, atol=0.1)
    white = (data - mean) @ np.linalg.cholesky(precision)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(4), atol=0.1)


def test_validation_holds_out_whole_patients(tmp_path: Path) -> None:
    """With the feedback export's ``patient`` column, a patient's studies all land on one side
    of the split; without it, the split is by study."""
    write_dataset(tmp_path, 12, seed=4, size=96)
    labels = tmp_path / "labels.csv"
    lines = labels.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    with_patients = [header + ",patient"] + [f"{row},ANON-{n % 3}" for n, row in enumerate(rows)]
    labels.write_text("\n".join(with_patients) + "\n")
    items = scan_folder(tmp_path)
    assert {item.patient for item in items} == {"ANON-0", "ANON-1", "ANON-2"}
    for seed in range(6):
        is_val = validation_mask(items, 0.34, seed)
        held = {item.patient for item, val in zip(items, is_val, strict=True) if val}
        kept = {item.patient for item, val in zip(items, is_val, strict=True) if not val}
        assert len(held) == 1 and not held & kept
    anonymous = [dataclasses.replace(item, patient="") for item in items]
    is_val = validation_mask(anonymous, 0.25, 0)
    assert int(is_val.sum()) == 3  # 3 of the 12 studies


def test_a_study_whose_patient_some_rows_name_stays_with_that_patient() -> None:
    """A ``labels.csv`` whose ``patient`` column is filled in part: the study's unnamed images
    go where its named ones go, with the rest of that patient's studies."""
    items = [
        LabelledImage(Path(f"{study}-{n}.dcm"), study, f"{study}.{n}", "normal", None, None, named)
        for study, patient in (("1.1", "P1"), ("1.2", "P2"), ("1.3", "P3"), ("1.4", "P4"))
        for n, named in enumerate((patient, "", ""))
    ]
    for seed in range(8):
        is_val = validation_mask(items, 0.5, seed)
        for study in ("1.1", "1.2", "1.3", "1.4"):
            sides = {
                bool(v)
                for item, v in zip(items, is_val, strict=True)
                if item.study_instance_uid == study
            }
            assert len(sides) == 1, (seed, study)
