"""Domain alignment: MMD, gradient reversal, site discriminator, MixStyle, training with them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from acwi_node.inference.analyser import Analyser
from models.networks.dianet import DIANet, DIANetConfig
from models.networks.domain import (
    MixStyle,
    SiteDiscriminator,
    attach_mixstyle,
    grad_reverse,
    grl_schedule,
    mmd2,
    site_mmd,
)
from models.train import config_from_dict, load_config, train

TINY: dict[str, Any] = {
    "data": {"train_images": 32, "val_images": 12, "workers": 1},
    "preprocessing": {"input_size": 64},
    "model": {
        "widths": [8, 8, 16, 16, 32],
        "fpn_channels": 16,
        "feature_channels": 16,
        "latent_dim": 8,
    },
    "train": {"epochs": 2, "batch_size": 16, "threads": 1},
    "calibration": {"mc_samples": 4},
    "continual": {"fisher_images": 0},
}


def test_mmd_is_zero_for_identical_and_positive_for_shifted_samples() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    assert float(mmd2(x, x)) == pytest.approx(0.0, abs=1e-6)
    same = float(mmd2(x, torch.randn(64, 5, generator=g)))
    shifted = float(mmd2(x, torch.randn(64, 5, generator=g) + 1.0))
    far = float(mmd2(x, torch.randn(64, 5, generator=g) + 3.0))
    assert shifted > 0.05 and shifted > 5 * same
    assert far > shifted
    with pytest.raises(ValueError):
        mmd2(x, torch.randn(4, 3))


def test_site_mmd_pairs_sites_and_ignores_unknown_ones() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g) + 2.0
    features = torch.cat([a, b])
    sites = torch.tensor([0] * 16 + [3] * 16)
    assert float(site_mmd(features, sites)) == pytest.approx(float(mmd2(a, b)))
    assert float(site_mmd(features, torch.zeros(32, dtype=torch.long))) == 0.0
    assert float(site_mmd(features, torch.tensor([0] * 16 + [-1] * 16))) == 0.0


def test_mmd_gradient_aligns_two_sites() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(32, 4, generator=g)
    b = torch.randn(32, 4, generator=g) + torch.tensor([2.0, 0.0, -1.0, 0.5])
    shift = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([shift], lr=0.05)
    losses = []
    for _ in range(60):
        loss = mmd2(a, b + shift)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, -0.5 * torch.arange(4.0).expand(3, 4))
    assert grl_schedule(0.0) == 0.0 and grl_schedule(1.0) > 0.99
    assert grl_schedule(0.2) < grl_schedule(0.5)


def test_site_discriminator_trains_the_encoder_against_itself() -> None:
    disc = SiteDiscriminator(4, 2, hidden=8)
    features = torch.randn(6, 4, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(disc(features, 1.0), torch.tensor([0, 1] * 3))
    loss.backward()
    plain = features.grad.clone()  # type: ignore[union-attr]
    features.grad = None
    loss = torch.nn.functional.cross_entropy(disc(features, 0.0), torch.tensor([0, 1] * 3))
    loss.backward()
    assert plain.abs().sum() > 0
    assert features.grad is not None
    assert torch.count_nonzero(features.grad) == 0  # coefficient 0: no gradient to features


def test_mixstyle_is_identity_in_evaluation_mode() -> None:
    mix = MixStyle(p=1.0, alpha=0.1)
    x = torch.randn(8, 4, 6, 6) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)
    mix.eval()
    assert torch.equal(mix(x), x)
    mix.train()
    torch.manual_seed(0)
    y = mix(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    with pytest.raises(ValueError):
        MixStyle(p=1.5)


def test_mixstyle_hooks_leave_the_network_unchanged_in_evaluation() -> None:
    torch.manual_seed(0)
    model = DIANet(DIANetConfig(widths=(8, 8, 16, 16, 32), fpn_channels=16, latent_dim=8))
    plain = copy.deepcopy(model).eval()
    keys = set(model.state_dict())
    handles = attach_mixstyle(model, MixStyle(p=1.0), stages=2)
    assert set(model.state_dict()) == keys
    x = torch.randn(4, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, plain(x).logits)
    model.train()
    plain.train()
    torch.manual_seed(1)
    mixed = model.encode(x).pooled
    torch.manual_seed(1)
    assert not torch.allclose(mixed, plain.encode(x).pooled)
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="early stages"):
        attach_mixstyle(model, MixStyle(), stages=9)


def test_domain_preset_turns_the_options_on_and_default_leaves_them_off() -> None:
    default, domain = load_config("default"), load_config("domain")
    assert not default.domain.enabled()
    assert domain.domain.mmd_weight > 0 and domain.domain.adversarial_weight > 0
    assert domain.domain.mixstyle_p > 0
    assert domain.model == default.model and domain.data == default.data


@pytest.mark.parametrize(
    ("option", "term"),
    [
        ({"mmd_weight": 1.0}, "mmd"),
        ({"adversarial_weight": 0.5}, "adv"),
        ({"mixstyle_p": 1.0}, None),
    ],
)
def test_tiny_run_with_each_option(
    tmp_path: Path, option: dict[str, float], term: str | None
) -> None:
    config = config_from_dict({**TINY, "domain": option})
    lines: list[str] = []
    result = train(config, tmp_path / "m", log=lines.append)
    if term is not None:
        assert all(record[term] > 0 for record in result.history)
        assert f" {term} " in next(line for line in lines if line.startswith("epoch 1/"))
    weights = torch.load(result.weights_path, weights_only=True)
    assert set(weights) == set(DIANet(config.architecture()).state_dict())
    analyser = Analyser.load(result.manifest_path, mc_samples=2)
    assert analyser.manifest.training.preset == "default"


def test_mmd_option_lowers_its_own_loss_term(tmp_path: Path) -> None:
    base = {**TINY, "train": {**TINY["train"], "epochs": 3}, "domain": {"mmd_weight": 5.0}}
    result = train(config_from_dict(base), tmp_path / "on", log=lambda _: None)
    assert result.history[-1]["mmd"] < result.history[0]["mmd"]
