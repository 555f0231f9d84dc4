"""DIANet: a small multi-scale CNN with pyramid fusion, spatial attention and a Gaussian latent.

Data flow for a ``(B, 1, H, W)`` input::

    blob stem (9x9 conv, DoG-initialised, then 2x2 max pool) -> stages (stride 2 each);
    the last L stage outputs are pyramid levels C1..CL
    top-down:  P_L = L_L,  P_i = L_i + up(P_{i+1})          (L_i = 1x1 lateral of C_i)
    bottom-up: N_1 = P_1,  N_i = P_i + down(N_{i-1})        (down = strided 3x3 conv)
    attention: A_i = sigmoid(conv(N_i)),  N_i <- N_i * A_i   (one spatial map per scale)
    fusion:    F = sum_i softmax(w)_i * resize(N_i)          (at level ``fusion_level``)
    detail:    D = BN(conv1x1(maxpool(stem)))               (stem peaks at F's resolution)
    features = ReLU(BN(conv3x3(F + D)))                      (B, C, h, w), stride 16 by default
    pooled   = GAP(features)                                  (B, C)
    mu, logvar_latent = A_mu pooled + b_mu, A_lv pooled + b_lv
    z = mu + exp(logvar_latent / 2) * eps  (training)  |  mu  (evaluation)
    logits  = W dropout(z) + b            log_var = V dropout(z) + c   (aleatoric, per class)

Class activation maps. At evaluation (or averaging over dropout masks) the logits are affine
in the pooled features: ``logits = W A_mu pooled + (W b_mu + b)``. With
``W_eff = W @ A_mu`` (K x C) the CAM of class ``k`` is
``cam_k(y, x) = sum_c W_eff[k, c] * features[c, y, x]`` and its spatial mean plus
``W b_mu + b`` equals logit ``k`` exactly (see :meth:`DIANet.cam`).

The blob stem and the detail skip give the global-average-pooled head direct access to
small, bright structures; without them learning small lesions under GAP is slow and erratic.

Backbones (``DIANetConfig.backbone``): ``"small"`` is the blob stem and stages above (the
bundled model); ``"resnet50"`` and ``"mobilenetv3"`` (:mod:`models.networks.backbones`,
channel counts scaled by ``backbone_width``) replace the stem and stages, giving the stem
activation (stride 2, for the detail skip) and four stage outputs at strides 4..32 whose last
``pyramid_levels`` form the pyramid; ``widths`` and ``stem_kernel`` then go unused.

Prototype codebook (``codebook_size = K > 0``): learnable prototypes ``P`` (K x D). The
latent mean is softly assigned, ``a = softmax(-||mu - P_k||^2 / codebook_temperature)``, and
the head input becomes ``z + a P`` (the residual form ``mu + mixture`` at evaluation), so the
heads see the latent pulled towards its prototypes. ``Encoding.assignment`` holds ``a``. With
a codebook the logits are ``W_eff pooled + b_eff + W (a P)``: the CAM still explains the
spatial part and the mixture adds an image-level offset (:meth:`DIANet.codebook_mixture`).
``codebook_size = 0`` creates no parameters (the state dict is that of a plain DIANet).

Monte-Carlo dropout: :meth:`DIANet.encode` runs the backbone once; :meth:`DIANet.head` with
``mc=True`` applies dropout even in evaluation mode, so T samples cost T cheap head passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.networks.backbones import BACKBONES, NUM_LEVELS, build_backbone

LOGVAR_LATENT_RANGE = (-8.0, 4.0)
LOGVAR_ALEATORIC_RANGE = (-10.0, 5.0)


@dataclass(frozen=True)
class DIANetConfig:
    """Architecture hyper-parameters (stored as ``architecture_config`` in the manifest)."""

    in_channels: int = 1
    num_classes: int = 3
    #: Stem width followed by one width per stage (each stage halves the resolution).
    widths: tuple[int, ...] = (8, 16, 32, 64, 96)
    #: Kernel of the full-resolution stem convolution (see :class:`BlobStem`).
    stem_kernel: int = 9
    #: How many of the last stages form the pyramid.
    pyramid_levels: int = 3
    #: Pyramid level (0 = finest) whose resolution the fused features take.
    fusion_level: int = 1
    fpn_channels: int = 48
    feature_channels: int = 64
    latent_dim: int = 32
    dropout: float = 0.2
    #: Encoder: ``"small"`` (stem + ``widths`` stages), ``"resnet50"`` or ``"mobilenetv3"``.
    backbone: str = "small"
    #: Channel multiplier of the ``resnet50`` / ``mobilenetv3`` backbones (1.0 = reference).
    backbone_width: float = 1.0
    #: Number of latent prototypes (0 = no codebook, no extra parameters).
    codebook_size: int = 0
    #: Softmax temperature of the soft prototype assignment.
    codebook_temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DIANetConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        values = dict(data)
        if "widths" in values:
            values["widths"] = tuple(int(w) for w in values["widths"])
        if "backbone" in values:
            values["backbone"] = str(values["backbone"])
        for key in ("backbone_width", "codebook_temperature"):
            if key in values:
                values[key] = float(values[key])
        if "codebook_size" in values:
            values["codebook_size"] = int(values["codebook_size"])
        return cls(**values)


class Encoding(NamedTuple):
    """One backbone pass."""

    features: Tensor  # (B, C, h, w), the last convolutional activation map
    pooled: Tensor  # (B, C)
    mu: Tensor  # (B, D)
    logvar_latent: Tensor  # (B, D)
    attention: tuple[Tensor, ...]  # per scale, (B, 1, h_i, w_i), finest first
    assignment: Tensor | None = None  # (B, K) soft prototype assignment, None without codebook


class HeadOutput(NamedTuple):
    """Classification head outputs."""

    logits: Tensor  # (B, K)
    log_var: Tensor  # (B, K), heteroscedastic (aleatoric) log-variance of the logits


class DIANetOutput(NamedTuple):
    """Full forward pass."""

    logits: Tensor
    log_var: Tensor
    mu: Tensor
    logvar_latent: Tensor
    features: Tensor


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class BlobStem(nn.Module):
    """Full-resolution ``k x k`` conv, BatchNorm, ReLU and 2 x 2 max pooling.

    The first channels start as centre-surround (difference-of-Gaussians) filters at the
    given scales; the rest start random. All are trainable. Small lesions then give a strong,
    localised response from the first step, and max pooling keeps the peak when the
    resolution halves (a strided conv averages it away). Without this prior, global average
    pooling makes small-lesion evidence so faint that learning it is left to chance.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 9,
        sigmas: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5),
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            r = torch.arange(kernel, dtype=torch.float32) - kernel // 2
            r2 = r[:, None] ** 2 + r[None, :] ** 2
            for i, sigma in enumerate(sigmas[:cout]):
                centre = torch.exp(-r2 / (2 * sigma**2))
                surround = torch.exp(-r2 / (2 * (1.8 * sigma) ** 2))
                dog = centre / centre.sum() - surround / surround.sum()
                self.conv.weight[i] = 4.0 * dog / cin

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.bn(self.conv(x))))


class Stage(nn.Module):
    """Strided conv followed by a residual conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = ConvBNAct(cin, cout, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.down(x)
        return F.relu(y + self.conv(y))


class PyramidFusion(nn.Module):
    """Top-down + bottom-up pyramid, spatial attention per scale, softmax-weighted fusion."""

    def __init__(self, in_widths: tuple[int, ...], channels: int, fusion_level: int = 0) -> None:
        super().__init__()
        self.fusion_level = fusion_level
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in in_widths)
        self.smooth = nn.ModuleList(ConvBNAct(channels, channels) for _ in in_widths)
        self.down = nn.ModuleList(ConvBNAct(channels, channels, stride=2) for _ in in_widths[1:])
        self.attention = nn.ModuleList(nn.Conv2d(channels, 1, 3, padding=1) for _ in in_widths)
        #: Per-scale fusion weights (softmax-normalised in :meth:`scale_weights`).
        self.scale_logits = nn.Parameter(torch.zeros(len(in_widths)))

    def scale_weights(self) -> Tensor:
        """Softmax-normalised fusion weight of each scale, finest first."""
        return torch.softmax(self.scale_logits, dim=0)

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        lat = [conv(x) for conv, x in zip(self.lateral, levels, strict=True)]
        top_down: list[Tensor] = [lat[-1]]
        for x in reversed(lat[:-1]):
            up = F.interpolate(top_down[0], size=x.shape[-2:], mode="nearest")
            top_down.insert(0, x + up)
        smoothed = [conv(x) for conv, x in zip(self.smooth, top_down, strict=True)]
        bottom_up: list[Tensor] = [smoothed[0]]
        for i, x in enumerate(smoothed[1:]):
            down = self.down[i](bottom_up[-1])
            if down.shape[-2:] != x.shape[-2:]:
                down = F.interpolate(down, size=x.shape[-2:], mode="nearest")
            bottom_up.append(x + down)
        maps = tuple(
            torch.sigmoid(conv(x)) for conv, x in zip(self.attention, bottom_up, strict=True)
        )
        weights = self.scale_weights()
        target = self.fusion_level
        size = (int(bottom_up[target].shape[-2]), int(bottom_up[target].shape[-1]))
        fused = bottom_up[target] * maps[target] * weights[target]
        for i, level in enumerate(bottom_up):
            if i == target:
                continue
            attended = level * maps[i]
            if i < target:  # finer: area averaging
                resized = F.adaptive_avg_pool2d(attended, size)
            else:  # coarser: bilinear upsampling
                resized = F.interpolate(attended, size=size, mode="bilinear", align_corners=False)
            fused = fused + weights[i] * resized
        return fused, maps


def max_pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.adaptive_max_pool2d(x, size)``, as a plain max pooling (kernel = stride = the ratio)
    when the sizes divide: the same values, and an operator every ONNX exporter translates
    (PyTorch 2.11's has no translation of the adaptive one)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % size[0] == 0 and w % size[1] == 0:
        kernel = (h // size[0], w // size[1])
        return F.max_pool2d(x, kernel_size=kernel, stride=kernel)
    return F.adaptive_max_pool2d(x, size)


class DIANet(nn.Module):
    """Multi-scale encoder, pyramid fusion with attention, Gaussian latent, MC-dropout head."""

    def __init__(self, config: DIANetConfig | None = None) -> None:
        super().__init__()
        self.config = config or DIANetConfig()
        cfg = self.config
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; expected one of {BACKBONES}")
        if cfg.codebook_size < 0:
            raise ValueError("codebook_size must be 0 (off) or positive")
        if cfg.codebook_temperature <= 0:
            raise ValueError("codebook_temperature must be positive")
        stages = len(cfg.widths) - 1 if cfg.backbone == "small" else NUM_LEVELS
        if not 2 <= cfg.pyramid_levels <= stages:
            raise ValueError("pyramid_levels must be between 2 and the number of stages")
        if not 0 <= cfg.fusion_level < cfg.pyramid_levels:
            raise ValueError("fusion_level must index a pyramid level")
        if cfg.backbone == "small":
            self.stem = BlobStem(cfg.in_channels, cfg.widths[0], cfg.stem_kernel)
            self.stages = nn.ModuleList(
                Stage(cin, cout) for cin, cout in zip(cfg.widths[:-1], cfg.widths[1:], strict=True)
            )
            stem_channels, level_widths = cfg.widths[0], tuple(cfg.widths[1:])
        else:
            self.backbone = build_backbone(cfg.backbone, cfg.in_channels, cfg.backbone_width)
            stem_channels = self.backbone.stem_channels
            level_widths = self.backbone.level_widths
        self.fusion = PyramidFusion(
            level_widths[-cfg.pyramid_levels :], cfg.fpn_channels, cfg.fusion_level
        )
        #: Fine-detail skip: stem responses, max-pooled to the fused resolution.
        self.detail = nn.Sequential(
            nn.Conv2d(stem_channels, cfg.fpn_channels, 1, bias=False),
            nn.BatchNorm2d(cfg.fpn_channels),
        )
        self.feature_conv = ConvBNAct(cfg.fpn_channels, cfg.feature_channels)
        self.to_mu = nn.Linear(cfg.feature_channels, cfg.latent_dim)
        self.to_logvar = nn.Linear(cfg.feature_channels, cfg.latent_dim)
        self.classifier = nn.Linear(cfg.latent_dim, cfg.num_classes)
        self.variance = nn.Linear(cfg.latent_dim, cfg.num_classes)
        # Start with a nearly deterministic latent (sigma ~ 0.05) and small aleatoric variance;
        # unit latent noise at initialisation drowns the weak early signal of small lesions.
        nn.init.constant_(self.to_logvar.bias, -6.0)
        nn.init.constant_(self.variance.bias, -3.0)
        nn.init.normal_(self.variance.weight, std=1e-3)
        if cfg.codebook_size > 0:
            #: Latent prototypes (K x D), softly assigned to the latent mean.
            self.prototypes = nn.Parameter(torch.randn(cfg.codebook_size, cfg.latent_dim))

    @property
    def feature_stride(self) -> int:
        """Input pixels per feature-map cell (the fused pyramid level's stride)."""
        cfg = self.config
        stages = len(cfg.widths) - 1 if cfg.backbone == "small" else NUM_LEVELS
        # stage i (0-based) has stride 2 ** (i + 2) for every backbone
        return int(2 ** (stages - cfg.pyramid_levels + cfg.fusion_level + 2))

    def _stem_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.config.backbone != "small":
            stem, levels = self.backbone(x)
            return stem, levels
        stem = self.stem(x)
        y = stem
        levels = []
        for stage in self.stages:
            y = stage(y)
            levels.append(y)
        return stem, levels

    def codebook_mixture(self, mu: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(assignment (B, K), mixture (B, D))`` for latent means, None without codebook."""
        if self.config.codebook_size == 0:
            return None
        distances = torch.cdist(mu, self.prototypes).pow(2)
        assignment = torch.softmax(-distances / self.config.codebook_temperature, dim=-1)
        return assignment, assignment @ self.prototypes

    def encode(self, x: Tensor) -> Encoding:
        """One backbone pass: features, pooled vector and latent statistics."""
        stem, levels = self._stem_and_levels(x)
        fused, maps = self.fusion(levels[-self.config.pyramid_levels :])
        detail = self.detail(max_pool_to(stem, (int(fused.shape[-2]), int(fused.shape[-1]))))
        features = self.feature_conv(fused + detail)
        pooled = features.mean(dim=(2, 3))
        mu = self.to_mu(pooled)
        logvar = self.to_logvar(pooled).clamp(*LOGVAR_LATENT_RANGE)
        codebook = self.codebook_mixture(mu)
        assignment = None if codebook is None else codebook[0]
        return Encoding(features, pooled, mu, logvar, maps, assignment)

    def head(
        self, pooled: Tensor, mc: bool = False, generator: torch.Generator | None = None
    ) -> HeadOutput:
        """Classification and aleatoric heads on pooled features.

        In training mode the latent is sampled (reparameterisation) and dropout is active.
        In evaluation mode the latent is ``mu``; dropout is applied only when ``mc`` is True,
        drawing its masks from ``generator`` (or the global RNG) for reproducible sampling.
        """
        mu = self.to_mu(pooled)
        if self.training:
            logvar = self.to_logvar(pooled).clamp(*LOGVAR_LATENT_RANGE)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        codebook = self.codebook_mixture(mu)
        if codebook is not None:
            z = z + codebook[1]
        p = self.config.dropout
        if p > 0 and (self.training or mc):
            keep = torch.empty_like(z).bernoulli_(1.0 - p, generator=generator)
            z = z * keep / (1.0 - p)
        log_var = self.variance(z).clamp(*LOGVAR_ALEATORIC_RANGE)
        return HeadOutput(self.classifier(z), log_var)

    def forward(self, x: Tensor) -> DIANetOutput:
        enc = self.encode(x)
        out = self.head(enc.pooled)
        return DIANetOutput(out.logits, out.log_var, enc.mu, enc.logvar_latent, enc.features)

    def cam_weights(self) -> tuple[Tensor, Tensor]:
        """``(W_eff, b_eff)``: logits = W_eff @ pooled + b_eff in evaluation mode.

        With a codebook add ``classifier.weight @ mixture`` (see :meth:`codebook_mixture`).
        """
        w = self.classifier.weight @ self.to_mu.weight
        b = self.classifier.weight @ self.to_mu.bias + self.classifier.bias
        return w, b

    def cam(self, features: Tensor) -> Tensor:
        """Class activation maps ``(B, K, h, w)``; their spatial mean + ``b_eff`` = logits."""
        w, _ = self.cam_weights()
        return torch.einsum("kc,bchw->bkhw", w, features)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
