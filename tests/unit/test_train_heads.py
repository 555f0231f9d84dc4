"""Optional segmentation and reconstruction heads, and training with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from acwi_node.inference.analyser import Analyser
from acwi_node.inference.preprocess import PreprocessSpec
from models.networks import feature_stride
from models.networks.dianet import DIANet
from models.networks.heads import (
    ReconstructionHead,
    SegmentationHead,
    anomaly_score,
    dice_score,
    segmentation_loss,
)
from models.train import HEADS_NAME, config_from_dict, synthetic_split, train

TINY: dict[str, Any] = {
    "data": {"train_images": 24, "val_images": 12, "workers": 1, "sizes": [64]},
    "preprocessing": {"input_size": 64},
    "model": {
        "widths": [8, 8, 16, 16, 32],
        "fpn_channels": 16,
        "feature_channels": 16,
        "latent_dim": 8,
    },
    "train": {"epochs": 2, "batch_size": 8, "threads": 1},
    "calibration": {"mc_samples": 2},
    "continual": {"fisher_images": 0},
}


def test_decoders_restore_the_input_resolution() -> None:
    features = torch.randn(2, 16, 4, 4)
    assert SegmentationHead(16, 16, 8)(features).shape == (2, 1, 64, 64)
    assert ReconstructionHead(16, 32, 8)(features).shape == (2, 1, 128, 128)
    with pytest.raises(ValueError, match="power of two"):
        SegmentationHead(16, 12)
    assert (
        feature_stride("dianet", {"widths": [8] * 5, "pyramid_levels": 3, "fusion_level": 1}) == 16
    )
    assert feature_stride("amrinet", {"widths": [8] * 4}) == 16


def test_dice_loss_and_anomaly_score() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 2:4, 2:4] = 1
    assert dice_score(mask > 0, mask).tolist() == [1.0, 1.0]  # empty vs empty counts as 1
    shifted = torch.roll(mask, 1, dims=3) > 0
    assert dice_score(shifted, mask)[0] == pytest.approx(0.5)
    good = segmentation_loss(mask * 20 - 10, mask)
    bad = segmentation_loss(10 - mask * 20, mask)
    assert float(good) < 0.01 < float(bad)
    x = torch.zeros(3, 1, 4, 4)
    recon = x.clone()
    recon[1] += 2.0
    assert anomaly_score(x, recon).tolist() == [0.0, 4.0, 0.0]


def test_synthetic_masks_follow_the_lesions() -> None:
    config = config_from_dict(TINY)
    data = synthetic_split(config, "train", 9, PreprocessSpec(64, 0.5, 99.5), masks=True)
    assert data.masks is not None and data.masks.shape == data.images.shape
    sums = data.masks.reshape(9, -1).sum(1)
    normal = data.targets == 0
    assert (sums[normal] == 0).all() and (sums[~normal] > 0).all()
    plain = synthetic_split(config, "train", 9, PreprocessSpec(64, 0.5, 99.5))
    assert plain.masks is None and (plain.images == data.images).all()


def test_tiny_run_with_both_heads_keeps_the_network_weights_as_they_are(tmp_path: Path) -> None:
    config = config_from_dict(
        {**TINY, "heads": {"segmentation_weight": 1.0, "reconstruction_weight": 1.0}}
    )
    lines: list[str] = []
    result = train(config, tmp_path / "m", log=lines.append)
    assert all(r["seg"] > 0 and r["rec"] > 0 for r in result.history)
    assert result.history[-1]["seg"] < result.history[0]["seg"]
    heads = torch.load(tmp_path / "m" / HEADS_NAME, weights_only=True)
    assert heads["stride"] == 16 and heads["segmentation"] and heads["reconstruction"]
    assert 0.0 <= heads["metrics"]["val_lesion_dice"] <= 1.0
    assert 0.0 <= heads["metrics"]["val_anomaly_auroc"] <= 1.0
    weights = torch.load(result.weights_path, weights_only=True)
    assert set(weights) == set(DIANet(config.architecture()).state_dict())
    Analyser.load(result.manifest_path, mc_samples=2)


def test_heads_are_off_by_default_and_segmentation_needs_masks(tmp_path: Path) -> None:
    config = config_from_dict({**TINY, "train": {**TINY["train"], "epochs": 1}})
    train(config, tmp_path / "plain", log=lambda _: None)
    assert not (tmp_path / "plain" / HEADS_NAME).exists()
    seg = config_from_dict({**TINY, "heads": {"segmentation_weight": 1.0}})
    with pytest.raises(ValueError, match="synthetic data only"):
        train(seg, tmp_path / "x", data_dir=tmp_path, log=lambda _: None)
