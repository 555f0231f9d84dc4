"""Domain-generalisation building blocks: MMD, gradient reversal, a site discriminator, MixStyle.

* :func:`mmd2` -- squared maximum mean discrepancy between two samples with a multi-bandwidth
  Gaussian kernel (biased V-statistic: exactly 0 for identical samples, > 0 for shifted ones);
  :func:`site_mmd` averages it over every pair of sites present in a batch.
* :func:`grad_reverse` -- identity forward, gradient multiplied by ``-coefficient`` backward
  (Ganin and Lempitsky, 2015); :func:`grl_schedule` is their ramp ``2 / (1 + exp(-10 p)) - 1``.
* :class:`SiteDiscriminator` -- a small MLP predicting the acquisition site from the latent mean.
* :class:`MixStyle` -- mixes the per-channel feature statistics (mean, std) of random pairs of
  images in a batch (Zhou et al., 2021); identity in evaluation mode. :func:`attach_mixstyle`
  applies it to a model's early stages through forward hooks, so the network's state dict and
  code are unchanged and inference never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: Kernel bandwidths as multiples of the median pairwise squared distance.
DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.25, 1.0, 4.0)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> Tensor:
    """Squared MMD between samples ``x (n, d)`` and ``y (m, d)`` (biased estimator, >= 0).

    The kernel is ``sum_s exp(-|a - b|^2 / (s * median))`` where ``median`` is the (detached)
    median pairwise squared distance of the pooled sample, so the loss is scale-free.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError("mmd2 needs two (n, d) samples of the same dimension")
    pooled = torch.cat([x, y])
    d = _sq_dists(pooled, pooled)
    off = d[~torch.eye(len(pooled), dtype=torch.bool, device=d.device)]
    scale = off.detach().median().clamp_min(1e-6) if off.numel() else d.new_tensor(1.0)
    k = sum(torch.exp(-d / (s * scale)) for s in bandwidths)
    assert isinstance(k, Tensor)
    n = x.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return (kxx.mean() + kyy.mean() - 2 * kxy.mean()).clamp_min(0.0)


def site_mmd(
    features: Tensor,
    sites: Tensor,
    min_per_site: int = 2,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
) -> Tensor:
    """Mean :func:`mmd2` over all pairs of sites with at least ``min_per_site`` samples.

    Unknown sites (negative) are ignored; with fewer than two usable sites the result is 0.
    """
    groups = [
        features[sites == s]
        for s in torch.unique(sites).tolist()
        if s >= 0 and int((sites == s).sum()) >= min_per_site
    ]
    if len(groups) < 2:
        return features.new_zeros(())
    terms = [
        mmd2(groups[i], groups[j], bandwidths)
        for i in range(len(groups))
        for j in range(i + 1, len(groups))
    ]
    return torch.stack(terms).mean()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, coefficient: float) -> Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coefficient * grad, None


def grad_reverse(x: Tensor, coefficient: float = 1.0) -> Tensor:
    """Identity forward; the backward pass multiplies the gradient by ``-coefficient``."""
    out = _GradReverse.apply(x, coefficient)
    assert isinstance(out, Tensor)
    return out


def grl_schedule(progress: float, gamma: float = 10.0) -> float:
    """DANN ramp of the reversal coefficient from 0 (start) towards 1 (end of training)."""
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class SiteDiscriminator(nn.Module):
    """MLP from the (gradient-reversed) latent mean to site logits."""

    def __init__(self, in_features: int, num_sites: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_sites),
        )

    def forward(self, features: Tensor, coefficient: float = 1.0) -> Tensor:
        return self.net(grad_reverse(features, coefficient))


class MixStyle(nn.Module):
    """Mix per-channel feature statistics of random image pairs (training only).

    With probability ``p`` per forward pass, ``x`` becomes
    ``(x - mu) / sigma * sigma_mix + mu_mix`` with ``mu_mix = lam mu + (1 - lam) mu[perm]``
    (likewise ``sigma``), ``lam ~ Beta(alpha, alpha)`` per image and ``perm`` a random
    permutation of the batch. Statistics are detached, as in the paper.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError("MixStyle p must be in [0, 1]")
        if alpha <= 0:
            raise ValueError("MixStyle alpha must be positive")
        self.p = p
        self.alpha = alpha
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] < 2 or torch.rand(()).item() >= self.p:
            return x
        b = x.shape[0]
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        normed = (x - mu) / sig
        beta = torch.distributions.Beta(self.alpha, self.alpha)
        lam = beta.sample((b, 1, 1, 1)).to(x.dtype)
        perm = torch.randperm(b)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        return normed * sig_mix + mu_mix

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}"


def early_modules(model: nn.Module, count: int) -> list[nn.Module]:
    """The first ``count`` feature stages of a DIANet/AMRI-Net (``stem`` then ``stages``)."""
    modules: list[nn.Module] = []
    inner = getattr(model, "backbone", None)  # the ResNet-50 / MobileNetV3-style encoders
    if isinstance(inner, nn.Module) and hasattr(inner, "stages"):
        model = inner
    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Module):
        modules.append(stem)
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.ModuleList):
        modules.extend(stages)
    if count > len(modules):
        raise ValueError(f"the model has only {len(modules)} early stages, not {count}")
    return modules[:count]


def attach_mixstyle(model: nn.Module, mixstyle: MixStyle, stages: int = 2) -> list[RemovableHandle]:
    """Apply ``mixstyle`` to the outputs of the model's first ``stages`` stages.

    MixStyle follows the *model's* training flag (it is off in evaluation mode). Remove the
    returned hooks (``handle.remove()``) before exporting the model.
    """

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        mixstyle.train(module.training)
        return mixstyle(output)

    return [m.register_forward_hook(hook) for m in early_modules(model, stages)]
