"""Continual learning with elastic weight consolidation (Kirkpatrick et al., 2017).

After a task, the diagonal empirical Fisher information of the (deterministic) classifier's
log-likelihood is estimated on that task's data, one image at a time::

    F_i = mean_n (d log p(y_n | x_n; theta) / d theta_i)^2

(per-image gradients, vectorised with ``torch.func``), and stored with the parameters
``theta*`` it was computed at in ``fisher.pt`` next to the manifest. Fine-tuning on a new
task then adds ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` to the loss: parameters
that mattered for the old task are held near their old values, the rest stay free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FISHER_NAME = "fisher.pt"


@dataclass
class FisherState:
    """Diagonal Fisher information and the anchor parameters, keyed by parameter name."""

    fisher: dict[str, Tensor]
    anchor: dict[str, Tensor]
    images: int
    dataset: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for :func:`torch.save`."""
        return {
            "fisher": self.fisher,
            "anchor": self.anchor,
            "images": self.images,
            "dataset": self.dataset,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FisherState:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                fisher=dict(data["fisher"]),
                anchor=dict(data["anchor"]),
                images=int(data["images"]),
                dataset=str(data.get("dataset", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an EWC Fisher file: missing {exc}") from exc


def _per_image_squared_grads(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Sum over images of squared per-image gradients (vectorised with ``torch.func``)."""
    from torch.func import functional_call, grad, vmap

    buffers = dict(model.named_buffers())
    detached = {name: p.detach() for name, p in params.items()}

    def nll(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out.logits, yi.unsqueeze(0))

    grads = vmap(grad(nll), in_dims=(None, 0, 0))(detached, x, y)
    return {name: (g**2).sum(dim=0) for name, g in grads.items()}


def _looped_squared_grads(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """The same as :func:`_per_image_squared_grads`, one backward pass per image."""
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]).logits, y[i : i + 1]).backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return sums


def fisher_diagonal(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    *,
    max_images: int | None = None,
    dataset: str = "",
    chunk: int = 16,
) -> FisherState:
    """Per-image empirical Fisher diagonal of ``log softmax(logits)[y]`` in evaluation mode.

    ``model(x)`` must return an object with ``logits`` (DIANet and AMRI-Net do); evaluation
    mode makes the head deterministic (latent mean, no dropout) and BatchNorm use running
    statistics, so every image's gradient is its own. Per-image gradients are computed
    ``chunk`` images at a time with ``torch.func.vmap`` (one backward pass per image where a
    module does not support it).
    """
    if x.shape[0] != targets.shape[0] or x.shape[0] == 0:
        raise ValueError("Fisher estimation needs matching, non-empty images and targets")
    n = x.shape[0] if max_images is None else min(int(max_images), x.shape[0])
    was_training = model.training
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    vectorised = True
    for start in range(0, n, chunk):
        xb, yb = x[start : min(n, start + chunk)], targets[start : min(n, start + chunk)]
        sums: dict[str, Tensor] | None = None
        if vectorised:
            try:
                sums = _per_image_squared_grads(model, params, xb, yb)
            except RuntimeError:
                vectorised = False
        if sums is None:
            sums = _looped_squared_grads(model, params, xb, yb)
        for name in fisher:
            fisher[name] += sums[name]
    model.train(was_training)
    return FisherState(
        fisher={name: f / n for name, f in fisher.items()},
        anchor={name: p.detach().clone() for name, p in params.items()},
        images=n,
        dataset=dataset,
    )


def ewc_penalty(model: nn.Module, state: FisherState) -> Tensor:
    """``1/2 sum_i F_i (theta_i - theta*_i)^2`` over the parameters in ``state`` (0 at theta*)."""
    total: Tensor | None = None
    for name, p in model.named_parameters():
        if name not in state.fisher:
            continue
        f = state.fisher[name].to(p.device, p.dtype)
        anchor = state.anchor[name].to(p.device, p.dtype)
        if f.shape != p.shape:
            raise ValueError(f"Fisher shape of {name} {tuple(f.shape)} != {tuple(p.shape)}")
        term = (f * (p - anchor) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the Fisher state shares no parameters with the model")
    return 0.5 * total


def save_fisher(state: FisherState, path: Path) -> Path:
    """Write ``state`` to ``path`` (a file, or a folder to get ``FISHER_NAME`` in it)."""
    path = Path(path)
    if path.is_dir():
        path = path / FISHER_NAME
    torch.save(state.to_dict(), path)
    return path


def load_fisher(path: Path) -> FisherState:
    """Read a Fisher file written by :func:`save_fisher`."""
    path = Path(path)
    if path.is_dir():
        path = path / FISHER_NAME
    if not path.is_file():
        raise ValueError(f"no EWC Fisher file at {path}")
    return FisherState.from_dict(torch.load(path, map_location="cpu", weights_only=True))
