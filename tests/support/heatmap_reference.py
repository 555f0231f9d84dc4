"""The heatmap as PyTorch's own operators make it: the reference the node's NumPy resize
(:func:`acwi_node.inference.resample.upsample_cam`) is compared with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def reference_heatmap(cam: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """ReLU, ``F.interpolate`` (bilinear, ``align_corners`` off) to ``size``, divided by the
    maximum (all zeros if the maximum is not positive); float32."""
    t = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    up = F.interpolate(
        t.clamp_min(0.0)[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0]
    peak = float(up.max())
    if peak <= 0.0:
        return np.zeros(size, dtype=np.float32)
    return (up / peak).clamp(0.0, 1.0).numpy().astype(np.float32)
