"""Bilinear resizing of a class activation map, in NumPy: the analyser's heatmaps and the review
page's overlays come from the same weights.

The analyser upsamples each map at the network's resolution to its source image's size with two
matrix products (:func:`bilinear_matrix` on each side, PyTorch's 1-D bilinear weights with
``align_corners`` off); the review page draws the same map again, at the size it shows the
image, without loading PyTorch.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["bilinear_matrix", "upsample_cam"]


@functools.lru_cache(maxsize=64)
def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` float32 weights of PyTorch's 1-D bilinear resize
    (``align_corners`` off, no antialiasing): row ``i`` takes source position
    ``(i + 0.5) * size_in / size_out - 0.5``, clamped at 0, between its two neighbours.
    Read-only: the cached array is shared."""
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    scale = size_in / size_out
    for i in range(size_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(src), size_in - 1)
        hi = min(lo + 1, size_in - 1)
        frac = src - lo
        matrix[i, lo] += 1.0 - frac
        matrix[i, hi] += frac
    matrix.setflags(write=False)
    return matrix


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map at the network's resolution as a heatmap of ``size`` (rows, columns): negative
    values as 0, bilinear resize, divided by its maximum (an all-zero map stays zero); float32
    in [0, 1], the analyser's heatmap within float rounding."""
    if cam.ndim != 2:
        raise ValueError(f"a class activation map is 2-D, not of shape {cam.shape}")
    rows = bilinear_matrix(int(cam.shape[0]), int(size[0]))
    cols = bilinear_matrix(int(cam.shape[1]), int(size[1]))
    up = rows @ np.maximum(cam.astype(np.float32, copy=False), 0.0) @ cols.T
    peak = max(float(up.max()), 1e-30)
    return np.asarray(up / np.float32(peak), dtype=np.float32)
