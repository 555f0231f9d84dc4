"""AMRI-Net: shapes, gradients, the CAM identity, and training it through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acwi_node.inference.manifest import ManifestError, load_manifest
from models.evaluate import evaluate_model
from models.model_io import load_analyser, load_network
from models.networks import build
from models.networks.amrinet import AMRINet, AMRINetConfig
from models.train import config_from_dict, load_config, train

SMALL = AMRINetConfig(
    widths=(8, 8, 16, 16), feature_channels=16, transformer_heads=2, input_size=64, latent_dim=8
)


def test_forward_shapes_and_cam_identity() -> None:
    torch.manual_seed(0)
    model = AMRINet(SMALL).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        enc = model.encode(x)
        w, b = model.cam_weights()
        cam = model.cam(enc.features)
        head = model.head(enc.pooled)
    assert out.logits.shape == (3, 3) and out.log_var.shape == (3, 3)
    assert enc.features.shape == (3, 16, 4, 4)  # stride 16
    assert enc.mu.shape == (3, 8) and enc.logvar_latent.shape == (3, 8)
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + b, head.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.pooled, enc.features.mean(dim=(2, 3)))
    assert w.shape == (3, 16)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = AMRINet(SMALL).train()
    out = model(torch.randn(4, 1, 64, 64))
    (out.logits.logsumexp(1).sum() + out.log_var.sum() + out.logvar_latent.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_scale_fusion_is_a_per_image_softmax() -> None:
    torch.manual_seed(0)
    model = AMRINet(SMALL).eval()
    stage = model.stages[0]
    y = stage.down(model.stem(torch.randn(5, 1, 64, 64)))  # type: ignore[operator]
    weights = stage.branch_weights([branch(y) for branch in stage.branches])  # type: ignore[operator, union-attr]
    assert weights.shape == (5, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    assert all(w.shape == (3,) for w in model.scale_weights())


def test_mc_dropout_head_and_other_input_sizes() -> None:
    torch.manual_seed(0)
    model = AMRINet(SMALL).eval()
    enc = model.encode(torch.randn(2, 1, 96, 96))  # positional embedding resized
    assert enc.features.shape[-2:] == (6, 6)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = model.head(enc.pooled, mc=True, generator=g1).logits
    b = model.head(enc.pooled, mc=True, generator=g2).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model.head(enc.pooled).logits)


def test_config_round_trip_and_validation() -> None:
    assert AMRINetConfig.from_dict(SMALL.to_dict()) == SMALL
    assert isinstance(build("amrinet", SMALL.to_dict()), AMRINet)
    with pytest.raises(ValueError, match="odd"):
        AMRINetConfig(kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="divisible"):
        AMRINetConfig(feature_channels=10, transformer_heads=4)
    with pytest.raises(ValueError, match="unknown architecture"):
        build("resnet", {})
    assert load_config("amrinet").network()[0] == "amrinet"


def test_trainer_trains_amrinet_and_evaluation_runs_it(tmp_path: Path) -> None:
    from models.data.synth import write_dataset

    config = config_from_dict(
        {
            "data": {"train_images": 24, "val_images": 12, "workers": 1, "sizes": [64]},
            "preprocessing": {"input_size": 64},
            "model": {
                "architecture": "amrinet",
                "widths": [8, 8, 16, 16],
                "feature_channels": 16,
                "transformer_heads": 2,
                "latent_dim": 8,
            },
            "train": {"epochs": 1, "batch_size": 8, "threads": 1},
            "calibration": {"mc_samples": 2},
            "continual": {"fisher_images": 4},
            "domain": {"mixstyle_p": 1.0},
        }
    )
    lines: list[str] = []
    result = train(config, tmp_path / "m", log=lines.append)
    assert any("AMRINet" in line for line in lines)
    raw = json.loads(result.manifest_path.read_text())
    assert raw["architecture"] == "amrinet" and raw["architecture_config"]["input_size"] == 64
    model, manifest, architecture = load_network(tmp_path / "m")
    assert isinstance(model, AMRINet) and architecture == "amrinet"
    with pytest.raises(ManifestError, match="dianet"):
        load_manifest(tmp_path / "m")  # the node runs DIANet only, and says so
    write_dataset(tmp_path / "data", 3, seed=1, size=96)
    analyser = load_analyser(tmp_path / "m", mc_samples=2)
    metrics = evaluate_model(tmp_path / "m", tmp_path / "data", analyser=analyser, log=print)
    assert metrics["images"] == 3 and metrics["heatmap_grid"] == 4
