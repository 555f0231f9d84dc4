"""DIANet: shapes, CAM identity, MC-dropout head, losses and determinism."""

from __future__ import annotations

import pytest
import torch

from models.networks.dianet import DIANet, DIANetConfig, count_parameters
from models.train import class_weights_for, heteroscedastic_nll, kl_standard_normal, loss_terms

CONFIG = DIANetConfig()


def _model(seed: int = 0) -> DIANet:
    torch.manual_seed(seed)
    return DIANet(CONFIG)


def test_output_shapes() -> None:
    model = _model().eval()
    x = torch.randn(2, 1, 128, 128)
    out = model(x)
    k, d = CONFIG.num_classes, CONFIG.latent_dim
    assert out.logits.shape == (2, k)
    assert out.log_var.shape == (2, k)
    assert out.mu.shape == (2, d) and out.logvar_latent.shape == (2, d)
    assert out.features.shape == (2, CONFIG.feature_channels, 8, 8)
    enc = model.encode(x)
    assert enc.pooled.shape == (2, CONFIG.feature_channels)
    assert len(enc.attention) == CONFIG.pyramid_levels
    assert [a.shape[-1] for a in enc.attention] == [16, 8, 4]
    assert ((enc.attention[0] >= 0) & (enc.attention[0] <= 1)).all()


def test_small_enough() -> None:
    model = _model()
    assert count_parameters(model) * 4 < 3_000_000
    weights = model.fusion.scale_weights()
    assert torch.isclose(weights.sum(), torch.tensor(1.0))


def test_cam_reproduces_logits_in_eval() -> None:
    model = _model().eval()
    x = torch.randn(3, 1, 128, 128)
    with torch.no_grad():
        out = model(x)
        cam = model.cam(out.features)
        _, bias = model.cam_weights()
    assert cam.shape == (3, CONFIG.num_classes, 8, 8)
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + bias, out.logits, rtol=1e-4, atol=1e-4)


def test_mc_dropout_head_samples_only_the_head() -> None:
    model = _model().eval()
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        enc = model.encode(x)
        plain_a = model.head(enc.pooled).logits
        plain_b = model.head(enc.pooled).logits
        g1 = torch.Generator().manual_seed(1)
        g2 = torch.Generator().manual_seed(1)
        g3 = torch.Generator().manual_seed(2)
        s1 = model.head(enc.pooled, mc=True, generator=g1).logits
        s2 = model.head(enc.pooled, mc=True, generator=g2).logits
        s3 = model.head(enc.pooled, mc=True, generator=g3).logits
        full = model(x).logits
    torch.testing.assert_close(plain_a, plain_b)
    torch.testing.assert_close(plain_a, full)
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, s3)
    assert not torch.allclose(s1, plain_a)


def test_same_seed_same_output() -> None:
    x = torch.randn(2, 1, 96, 96, generator=torch.Generator().manual_seed(3))
    a, b, c = _model(0).eval(), _model(0).eval(), _model(1).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)
        assert not torch.allclose(a(x).logits, c(x).logits)
    a.train()
    b.train()
    torch.manual_seed(5)
    ya = a(x).logits
    torch.manual_seed(5)
    yb = b(x).logits
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def _grad_norms(model: DIANet) -> dict[str, float]:
    return {
        name: float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("term", ["ce", "het", "kl"])
def test_gradients_flow_through_every_loss_term(term: str) -> None:
    model = _model().train()
    x = torch.randn(4, 1, 96, 96)
    y = torch.tensor([0, 1, 2, 1])
    weights = class_weights_for(y.numpy(), 3)
    torch.manual_seed(0)
    terms = loss_terms(model(x), y, weights, het_weight=0.5, kl_weight=1e-3)
    assert torch.isfinite(terms.total)
    getattr(terms, term).backward()
    grads = _grad_norms(model)
    assert grads["stem.conv.weight"] > 0, f"{term} does not reach the encoder"
    if term == "ce":
        assert grads["classifier.weight"] > 0
        assert grads["fusion.scale_logits"] > 0
        assert grads["fusion.attention.0.weight"] > 0
        assert grads["variance.weight"] == 0
    elif term == "het":
        assert grads["variance.weight"] > 0 and grads["classifier.weight"] > 0
    else:
        assert grads["to_logvar.weight"] > 0 and grads["to_mu.weight"] > 0
        assert grads["classifier.weight"] == 0


def test_loss_helpers() -> None:
    mu = torch.zeros(2, 4)
    assert float(kl_standard_normal(mu, torch.zeros(2, 4))) == 0.0
    assert float(kl_standard_normal(mu + 1, torch.zeros(2, 4))) == pytest.approx(0.5)
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    y = torch.tensor([0])
    small = heteroscedastic_nll(logits, torch.full((1, 3), -10.0), y, samples=64)
    large = heteroscedastic_nll(logits, torch.full((1, 3), 3.0), y, samples=64)
    assert float(small) < float(large)
    weights = class_weights_for(torch.tensor([0, 0, 0, 1]).numpy(), 3)
    assert weights[1] > weights[0] and weights[2] == 0
