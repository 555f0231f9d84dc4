"""Optional dense heads on a backbone's feature map: lesion segmentation and reconstruction.

Both are transposed-convolution decoders from the ``(B, C, h, w)`` features of
:meth:`DIANet.encode` (or AMRI-Net's) back to the ``(B, 1, H, W)`` input resolution:

* :class:`SegmentationHead` -- lesion-mask logits, trained with BCE + soft Dice on the
  synthetic phantoms' masks;
* :class:`ReconstructionHead` -- the normalised input image, trained on normal images only, so
  that :func:`anomaly_score` (the mean squared reconstruction error) is high where the image
  differs from normal anatomy.

They are separate modules, saved by the trainer in ``heads.pt`` next to the manifest: the
network's own state dict, and so the node's weights file, are unchanged by them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Decoder(nn.Module):
    """``log2(stride)`` transposed-conv x2 upsamplings, then a 1 x 1 conv to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, width: int) -> None:
        super().__init__()
        steps = int(round(math.log2(stride)))
        if stride < 1 or 2**steps != stride:
            raise ValueError(f"stride must be a power of two, not {stride}")
        self.stride = stride
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(steps):
            layers += [
                nn.ConvTranspose2d(cin, width, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            cin = width
        layers.append(nn.Conv2d(cin, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class SegmentationHead(_Decoder):
    """Lesion-mask logits ``(B, 1, h * stride, w * stride)``."""

    def __init__(self, in_channels: int, stride: int = 16, width: int = 16) -> None:
        super().__init__(in_channels, 1, stride, width)


class ReconstructionHead(_Decoder):
    """Reconstructed normalised input ``(B, 1, h * stride, w * stride)``."""

    def __init__(self, in_channels: int, stride: int = 16, width: int = 16) -> None:
        super().__init__(in_channels, 1, stride, width)


def segmentation_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy plus soft Dice (of the images that have a lesion)."""
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    p = torch.sigmoid(logits).flatten(1)
    m = mask.flatten(1)
    has = m.sum(1) > 0
    if not bool(has.any()):
        return bce
    inter = (p[has] * m[has]).sum(1)
    dice = (2 * inter + 1.0) / (p[has].sum(1) + m[has].sum(1) + 1.0)
    return bce + (1.0 - dice).mean()


def dice_score(pred: Tensor, mask: Tensor) -> Tensor:
    """Per-image Dice of binary masks ``(B, 1, H, W)`` (1 when both are empty)."""
    p, m = pred.flatten(1).float(), mask.flatten(1).float()
    inter = (p * m).sum(1)
    total = p.sum(1) + m.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total))


def anomaly_score(x: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-image mean squared reconstruction error ``(B,)``."""
    return (x - reconstruction).pow(2).flatten(1).mean(1)
