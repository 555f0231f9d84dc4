"""Bilinear resizing of a class activation map, in NumPy: the analyser's heatmaps and the review
page's overlays are the same function of the same weights.

A map at the network's resolution is brought to its source image's size with two matrix
products (:func:`bilinear_matrix` on each side, PyTorch's 1-D bilinear weights with
``align_corners`` off: ``F.interpolate``'s values within float rounding). The worker does this
for each heatmap when it writes it and the review page when it draws one, so it is kept to
NumPy's few calls: the same resize through PyTorch's operators cost about twice as long per
map, most of it the operators' own overhead on a 256 x 256 result.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["SINGLE_THREAD_MULADDS", "bilinear_matrix", "upsample_cam"]

# OpenBLAS runs a small matrix product (M x N x K multiply-adds) on the calling thread and a
# larger one on its thread pool; with NumPy's OpenBLAS (0.3.31) a product of 2**18 and of
# 2**19 stayed on the calling thread and one of 2**20 (a 256 x 256 map's) did not.
SINGLE_THREAD_MULADDS = 262_144


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


@functools.lru_cache(maxsize=64)
def _transposed(size_in: int, size_out: int) -> np.ndarray:
    """:func:`bilinear_matrix` transposed, contiguous: the right-hand factor of the resize."""
    matrix = np.ascontiguousarray(bilinear_matrix(size_in, size_out).T)
    matrix.setflags(write=False)
    return matrix


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map at the network's resolution as a heatmap of ``size`` (rows, columns): negative
    values as 0, bilinear resize, divided by its maximum (an all-zero map stays zero); a new
    float32 array in [0, 1]. Divided rather than multiplied by the reciprocal: ``x <= peak``
    gives ``x / peak <= 1`` exactly, so no clamp is needed.

    The second product (the large one: rows x columns x the map's width) is done in blocks of
    rows of at most :data:`SINGLE_THREAD_MULADDS` multiply-adds, which OpenBLAS keeps on the
    calling thread. Whole, OpenBLAS hands it to its own threads, and in a worker whose PyTorch
    threads still spin after the model the two thread pools fight over the cores: on two
    cores a 256 x 256 map took 1.0 ms instead of 0.04.
    """
    if cam.ndim != 2:
        raise ValueError(f"a class activation map is 2-D, not of shape {cam.shape}")
    rows = bilinear_matrix(int(cam.shape[0]), int(size[0]))
    cols = _transposed(int(cam.shape[1]), int(size[1]))
    half = rows @ np.maximum(cam.astype(np.float32, copy=False), np.float32(0.0))
    up = np.empty((rows.shape[0], cols.shape[1]), dtype=np.float32)
    step = max(1, SINGLE_THREAD_MULADDS // (cols.shape[0] * cols.shape[1]))
    for start in range(0, up.shape[0], step):
        np.matmul(half[start : start + step], cols, out=up[start : start + step])
    peak = float(up.max())
    if peak > 0.0:
        np.divide(up, peak, out=up)
    return up
