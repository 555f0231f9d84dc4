"""AMRI-Net: attention-guided multi-receptive-field CNN with a small transformer encoder.

Data flow for a ``(B, 1, H, W)`` input (``H = W = input_size``)::

    stem: blob stem as in DIANet (k x k conv, BN, ReLU, 2 x 2 max pool)
    each stage i (stride 2):
        y   = ConvBNAct(stride 2)(x)
        b_k = BN(pointwise(depthwise_k(y)))                for k in kernel_sizes (3, 5, 7)
        a   = softmax_k(scale_logits_k + MLP(GAP(sum_k b_k))_k)   (per image, over branches)
        x   = ReLU(y + sum_k a_k * b_k)
    tokens = conv1x1(x) + positional embedding            (B, h*w, C), stride 16 by default
    tokens = TransformerEncoder(tokens)                    (pre-norm, ``transformer_layers``)
    features = tokens as (B, C, h, w);  pooled = GAP(features)
    Gaussian latent and MC-dropout classification / heteroscedastic heads exactly as DIANet.

The outputs and methods are those of :class:`~models.networks.dianet.DIANet` (``encode``,
``head``, ``forward``, ``cam_weights``, ``cam`` and the ``to_mu``/``classifier``/``variance``
modules), so the trainer, the MC-dropout sampling and the CAM heatmap work unchanged: the
logits are affine in ``pooled``, the spatial mean of ``features``, so the CAM identity holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.networks.dianet import (
    LOGVAR_ALEATORIC_RANGE,
    LOGVAR_LATENT_RANGE,
    BlobStem,
    ConvBNAct,
    DIANetOutput,
    Encoding,
    HeadOutput,
)


@dataclass(frozen=True)
class AMRINetConfig:
    """Architecture hyper-parameters (``architecture_config`` of an ``amrinet`` manifest)."""

    in_channels: int = 1
    num_classes: int = 3
    #: Stem width followed by one width per stage (each stage halves the resolution).
    widths: tuple[int, ...] = (8, 16, 32, 64, 96)
    stem_kernel: int = 9
    #: Parallel depthwise kernel sizes of every stage.
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    feature_channels: int = 64
    transformer_layers: int = 2
    transformer_heads: int = 4
    #: Model input size: sets the positional embedding's grid (resized for other sizes).
    input_size: int = 128
    latent_dim: int = 32
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if len(self.widths) < 2:
            raise ValueError("widths needs a stem width and at least one stage")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError("kernel_sizes must be odd and positive")
        if self.feature_channels % self.transformer_heads:
            raise ValueError("feature_channels must be divisible by transformer_heads")

    @property
    def stride(self) -> int:
        """Input pixels per feature cell."""
        return 2 ** len(self.widths)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        data = asdict(self)
        data["widths"] = list(self.widths)
        data["kernel_sizes"] = list(self.kernel_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AMRINetConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        values = dict(data)
        for key in ("widths", "kernel_sizes"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)


class MultiKernelStage(nn.Module):
    """Strided conv, parallel depthwise-separable convs per kernel size, attention fusion."""

    def __init__(self, cin: int, cout: int, kernel_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.down = ConvBNAct(cin, cout, stride=2)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cout, cout, k, padding=k // 2, groups=cout, bias=False),
                nn.Conv2d(cout, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            for k in kernel_sizes
        )
        hidden = max(4, cout // 4)
        self.attention = nn.Sequential(
            nn.Linear(cout, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, len(kernel_sizes))
        )
        #: Learned prior of each kernel size (added to the per-image attention logits).
        self.scale_logits = nn.Parameter(torch.zeros(len(kernel_sizes)))

    def branch_weights(self, branches: list[Tensor]) -> Tensor:
        """Per-image softmax weight of each branch, ``(B, n_kernels)``."""
        summary = torch.stack(branches).sum(0).mean(dim=(2, 3))
        return torch.softmax(self.attention(summary) + self.scale_logits, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down(x)
        branches = [branch(y) for branch in self.branches]
        weights = self.branch_weights(branches)
        fused = sum(
            w.view(-1, 1, 1, 1) * b for w, b in zip(weights.unbind(1), branches, strict=True)
        )
        assert isinstance(fused, Tensor)
        return F.relu(y + fused)


class AMRINet(nn.Module):
    """Multi-kernel attention CNN + transformer encoder, Gaussian latent, MC-dropout head."""

    def __init__(self, config: AMRINetConfig | None = None) -> None:
        super().__init__()
        self.config = config or AMRINetConfig()
        cfg = self.config
        self.stem = BlobStem(cfg.in_channels, cfg.widths[0], cfg.stem_kernel)
        self.stages = nn.ModuleList(
            MultiKernelStage(cin, cout, cfg.kernel_sizes)
            for cin, cout in zip(cfg.widths[:-1], cfg.widths[1:], strict=True)
        )
        c = cfg.feature_channels
        self.project = nn.Conv2d(cfg.widths[-1], c, 1)
        grid = max(1, cfg.input_size // cfg.stride)
        self.position = nn.Parameter(torch.zeros(1, c, grid, grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=c,
            nhead=cfg.transformer_heads,
            dim_feedforward=2 * c,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, cfg.transformer_layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(c)
        self.to_mu = nn.Linear(c, cfg.latent_dim)
        self.to_logvar = nn.Linear(c, cfg.latent_dim)
        self.classifier = nn.Linear(cfg.latent_dim, cfg.num_classes)
        self.variance = nn.Linear(cfg.latent_dim, cfg.num_classes)
        nn.init.constant_(self.to_logvar.bias, -6.0)
        nn.init.constant_(self.variance.bias, -3.0)
        nn.init.normal_(self.variance.weight, std=1e-3)

    def scale_weights(self) -> list[Tensor]:
        """Each stage's learned prior weight of every kernel size (softmax of its logits)."""
        stages = [stage for stage in self.stages if isinstance(stage, MultiKernelStage)]
        return [torch.softmax(stage.scale_logits, dim=0) for stage in stages]

    def encode(self, x: Tensor) -> Encoding:
        """One backbone pass: features, pooled vector and latent statistics."""
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
        t = self.project(y)
        b, c, h, w = t.shape
        position: Tensor = self.position
        if position.shape[-2:] != (h, w):
            position = F.interpolate(position, size=(h, w), mode="bilinear", align_corners=False)
        tokens = (t + position).flatten(2).transpose(1, 2)  # (B, h*w, C)
        tokens = self.norm(self.transformer(tokens))
        features = tokens.transpose(1, 2).reshape(b, c, h, w)
        pooled = features.mean(dim=(2, 3))
        mu = self.to_mu(pooled)
        logvar = self.to_logvar(pooled).clamp(*LOGVAR_LATENT_RANGE)
        return Encoding(features, pooled, mu, logvar, ())

    def head(
        self, pooled: Tensor, mc: bool = False, generator: torch.Generator | None = None
    ) -> HeadOutput:
        """Classification and aleatoric heads (the semantics of :meth:`DIANet.head`)."""
        mu = self.to_mu(pooled)
        if self.training:
            logvar = self.to_logvar(pooled).clamp(*LOGVAR_LATENT_RANGE)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
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
        """``(W_eff, b_eff)``: logits = W_eff @ pooled + b_eff in evaluation mode."""
        w = self.classifier.weight @ self.to_mu.weight
        b = self.classifier.weight @ self.to_mu.bias + self.classifier.bias
        return w, b

    def cam(self, features: Tensor) -> Tensor:
        """Class activation maps ``(B, K, h, w)``; their spatial mean + ``b_eff`` = logits."""
        w, _ = self.cam_weights()
        return torch.einsum("kc,bchw->bkhw", w, features)
