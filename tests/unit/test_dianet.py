"""DIANet: shapes, CAM identity, MC-dropout head, losses, determinism, backbones, codebook."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.networks import feature_stride
from models.networks.backbones import (
    Bottleneck,
    InvertedResidual,
    MobileNetV3Backbone,
    ResNet50Backbone,
    SqueezeExcitation,
)
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


# --- backbones, codebook and the bundled model -------------------------------------------

REGISTRY_DEFAULT = Path(__file__).resolve().parents[2] / "models" / "registry" / "default"
#: SHA-256 of the bundled model's sorted state-dict keys (newline-joined) and their count.
BUNDLED_KEYS_SHA256 = "c3bea3e3d7483db06ab010785e83fae9335d6eb93b259ff6fbee9345847e91da"
BUNDLED_KEY_COUNT = 117
#: Bundled model outputs (evaluation mode) on :func:`_fixed_input`, recorded when the
#: model was trained (version 1.1.0): loading and the forward pass must not change them.
BUNDLED_LOGITS = [
    [-0.7935826182365417, -2.055227279663086, 3.72871732711792],
    [-0.830019474029541, -2.2584171295166016, 4.010615348815918],
]
BUNDLED_LOG_VAR = [
    [-3.6596100330352783, -2.5465335845947266, -4.283358097076416],
    [-3.6659433841705322, -2.485727071762085, -4.34013557434082],
]
BUNDLED_FEATURE_SUM = 8785.9375

TINY = DIANetConfig(fpn_channels=16, feature_channels=16, latent_dim=8)
TINY_WIDTH = {"resnet50": 0.125, "mobilenetv3": 0.25}


def _fixed_input() -> torch.Tensor:
    x = torch.linspace(-2, 2, 128 * 128).reshape(1, 1, 128, 128)
    return torch.cat([x, x.flip(-1).sin()], 0)


def _key_digest(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def _bundled() -> DIANet:
    manifest = json.loads((REGISTRY_DEFAULT / "manifest.json").read_text())
    model = DIANet(DIANetConfig.from_dict(manifest["architecture_config"]))
    state = torch.load(REGISTRY_DEFAULT / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_bundled_model_loads_strictly_with_unchanged_outputs() -> None:
    model = _bundled()
    assert model.config.backbone == "small" and model.config.codebook_size == 0
    keys = list(model.state_dict())
    assert len(keys) == BUNDLED_KEY_COUNT and _key_digest(keys) == BUNDLED_KEYS_SHA256
    with torch.no_grad():
        out = model(_fixed_input())
        enc = model.encode(_fixed_input())
    torch.testing.assert_close(out.logits, torch.tensor(BUNDLED_LOGITS), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.log_var, torch.tensor(BUNDLED_LOG_VAR), rtol=1e-4, atol=1e-4)
    assert float(out.features.sum()) == pytest.approx(BUNDLED_FEATURE_SUM, rel=1e-4)
    assert enc.assignment is None


def test_config_round_trip_and_defaults() -> None:
    manifest = json.loads((REGISTRY_DEFAULT / "manifest.json").read_text())
    legacy = DIANetConfig.from_dict(manifest["architecture_config"])
    assert legacy.backbone == "small" and legacy.backbone_width == 1.0
    assert legacy.codebook_size == 0
    config = DIANetConfig(
        backbone="mobilenetv3", backbone_width=0.5, codebook_size=6, codebook_temperature=0.5
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["backbone"] == "mobilenetv3" and data["codebook_size"] == 6
    assert DIANetConfig.from_dict(data) == config
    assert DIANetConfig.from_dict(DIANetConfig().to_dict()) == DIANetConfig()
    with pytest.raises(TypeError):
        DIANetConfig.from_dict({"backbone": "small", "no_such_key": 1})


def test_bad_backbone_or_codebook_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        DIANet(DIANetConfig(backbone="vgg16"))
    with pytest.raises(ValueError, match="codebook_size"):
        DIANet(DIANetConfig(codebook_size=-1))
    with pytest.raises(ValueError, match="codebook_temperature"):
        DIANet(DIANetConfig(codebook_size=2, codebook_temperature=0.0))
    with pytest.raises(ValueError, match="pyramid_levels"):
        DIANet(DIANetConfig(backbone="resnet50", backbone_width=0.125, pyramid_levels=5))
    with pytest.raises(ValueError, match="width"):
        DIANet(DIANetConfig(backbone="resnet50", backbone_width=0.0))


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenetv3"])
def test_backbone_forward_backward_and_cam(backbone: str) -> None:
    torch.manual_seed(0)
    config = replace(TINY, backbone=backbone, backbone_width=TINY_WIDTH[backbone])
    model = DIANet(config)
    assert not hasattr(model, "stem") and not hasattr(model, "stages")
    x = torch.randn(2, 1, 64, 64)
    y = torch.tensor([0, 2])
    out = model.train()(x)
    assert out.logits.shape == (2, 3) and out.log_var.shape == (2, 3)
    assert out.mu.shape == (2, 8) and out.features.shape == (2, 16, 4, 4)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    grads = _grad_norms(model)
    first_conv = next(name for name in grads if name.startswith("backbone.stem.0"))
    assert grads[first_conv] > 0 and grads["fusion.scale_logits"] > 0
    assert grads["detail.0.weight"] > 0
    model.eval()
    with torch.no_grad():
        enc = model.encode(x)
        logits = model.head(enc.pooled).logits
        cam = model.cam(enc.features)
        _, bias = model.cam_weights()
    assert [a.shape[-1] for a in enc.attention] == [8, 4, 2]  # strides 8, 16, 32
    assert cam.shape == (2, 3, 4, 4)
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + bias, logits, rtol=1e-4, atol=1e-4)
    assert model.feature_stride == 16
    assert feature_stride("dianet", config.to_dict()) == model.feature_stride
    stem, levels = model.backbone(x)
    assert stem.shape[-1] == 32 and [t.shape[-1] for t in levels] == [16, 8, 4, 2]
    assert [t.shape[1] for t in levels] == list(model.backbone.level_widths)


def test_resnet50_layout() -> None:
    net = ResNet50Backbone(width=1.0)
    blocks = [sum(isinstance(m, Bottleneck) for m in layer.modules()) for layer in net.stages]
    assert blocks == [3, 4, 6, 3]
    assert net.level_widths == (256, 512, 1024, 2048) and net.stem_channels == 64
    # torchvision's ResNet-50 without its classifier has 23,508,032 parameters (3 inputs)
    assert count_parameters(net) == 23_508_032 - 2 * 64 * 7 * 7
    assert ResNet50Backbone(width=0.125).level_widths == (32, 64, 128, 256)


def test_mobilenetv3_blocks() -> None:
    net = MobileNetV3Backbone(width=1.0)
    assert net.level_widths == (24, 40, 112, 160) and net.stem_channels == 16
    modules = list(net.modules())
    depthwise = [
        m for m in modules if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == sum(isinstance(m, InvertedResidual) for m in modules) == 15
    assert sum(isinstance(m, SqueezeExcitation) for m in modules) == 8
    assert any(isinstance(m, torch.nn.Hardswish) for m in modules)
    block = InvertedResidual(16, 48, 16, 3, se=True, hswish=True, stride=1)
    assert block.residual
    x = torch.randn(1, 16, 8, 8)
    assert block(x).shape == x.shape


def test_codebook_off_keeps_the_state_dict() -> None:
    plain = set(DIANet(DIANetConfig()).state_dict())
    assert set(DIANet(DIANetConfig(codebook_size=0)).state_dict()) == plain
    assert _key_digest(plain) == BUNDLED_KEYS_SHA256
    with_codebook = DIANet(DIANetConfig(codebook_size=5))
    assert set(with_codebook.state_dict()) == plain | {"prototypes"}
    assert with_codebook.prototypes.shape == (5, CONFIG.latent_dim)


def test_codebook_assignment_mixture_and_gradients() -> None:
    torch.manual_seed(0)
    model = DIANet(replace(TINY, codebook_size=4, codebook_temperature=2.0))
    x = torch.randn(3, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        enc = model.encode(x)
        assert enc.assignment is not None and enc.assignment.shape == (3, 4)
        torch.testing.assert_close(enc.assignment.sum(dim=1), torch.ones(3))
        # a latent sitting on a prototype is assigned mostly to it
        on_proto = model.codebook_mixture(model.prototypes[1:2] * 10)
        assert on_proto is not None and int(on_proto[0].argmax()) == 1
        mixture = model.codebook_mixture(enc.mu)
        assert mixture is not None
        logits = model.head(enc.pooled).logits
        cam = model.cam(enc.features)
        _, bias = model.cam_weights()
        offset = mixture[1] @ model.classifier.weight.T
        torch.testing.assert_close(
            cam.mean(dim=(2, 3)) + bias + offset, logits, atol=1e-4, rtol=1e-4
        )
        assert not torch.allclose(cam.mean(dim=(2, 3)) + bias, logits, atol=1e-3)
    model.train()
    terms = loss_terms(
        model(x),
        torch.tensor([0, 1, 2]),
        class_weights_for(torch.tensor([0, 1, 2]).numpy(), 3),
        het_weight=0.5,
        kl_weight=1e-3,
    )
    terms.total.backward()
    assert model.prototypes.grad is not None and float(model.prototypes.grad.abs().sum()) > 0


@pytest.mark.parametrize(("backbone", "codebook"), [("resnet50", 0), ("mobilenetv3", 3)])
def test_tiny_training_records_and_reloads_the_backbone(
    tmp_path: Path, backbone: str, codebook: int
) -> None:
    from acwi_node.inference.analyser import Analyser
    from models.train import config_from_dict, train

    config = config_from_dict(
        {
            "data": {"train_images": 16, "val_images": 8, "workers": 1},
            "preprocessing": {"input_size": 64},
            "model": {
                "backbone": backbone,
                "backbone_width": TINY_WIDTH[backbone],
                "codebook_size": codebook,
                "fpn_channels": 16,
                "feature_channels": 16,
                "latent_dim": 8,
            },
            "train": {"epochs": 1, "batch_size": 8, "threads": 1},
            "calibration": {"mc_samples": 2},
        }
    )
    result = train(config, tmp_path / "model", log=lambda _: None)
    arch = json.loads(result.manifest_path.read_text())["architecture_config"]
    assert arch["backbone"] == backbone and arch["codebook_size"] == codebook
    analyser = Analyser.load(result.manifest_path, mc_samples=2)  # strict state-dict load
    assert isinstance(analyser.model, DIANet)
    assert analyser.model.config.backbone == backbone
    assert hasattr(analyser.model, "prototypes") == (codebook > 0)


def test_max_pool_to_is_adaptive_max_pooling() -> None:
    from models.networks.dianet import max_pool_to

    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    for size in ((8, 8), (8, 6), (32, 24), (5, 7)):  # the last does not divide: adaptive
        torch.testing.assert_close(
            max_pool_to(x, size), torch.nn.functional.adaptive_max_pool2d(x, size), rtol=0, atol=0
        )
