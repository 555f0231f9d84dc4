"""Monte-Carlo dropout masks as a pure function of (image seed, sample, unit).

Unit ``j`` of sample ``t`` of image ``i`` is kept when the high 32 bits of SplitMix64's output
number ``t * width + j + 1`` for image ``i``'s seed (``mix(seed + k * 0x9E3779B97F4A7C15)``, the
generator of Steele, Lea and Flood, 2014) fall under ``keep * 2**32``: a counter-based draw, so

* an image's masks depend only on its own seed, never on the batch it is analysed in;
* the masks of a whole batch are a handful of vectorised integer operations (no generator per
  image), which keeps T samples of the head nearly free beside a GPU backbone of a millisecond;
* every device gives the same masks bit for bit: they are drawn on the CPU (unsigned 64-bit
  arithmetic, exact) and copied to the analyser's device in one small transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """SplitMix64's output number ``counters`` (1-based) for each of ``seeds``:
    ``(len(seeds), len(counters))`` uint64 (arithmetic modulo 2**64)."""
    z = seeds.astype(np.uint64)[:, None] + counters.astype(np.uint64)[None, :] * _GAMMA
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def keep_masks(seeds: Sequence[int], samples: int, width: int, keep: float) -> np.ndarray:
    """``(len(seeds), samples, width)`` booleans, each True with probability ``keep``.

    ``seeds`` are integers in ``[0, 2**64)`` (e.g. :func:`acwi_node.inference.analyser.uid_seed`).
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], not {keep}")
    if any(s < 0 or s >> 64 for s in seeds):
        raise ValueError("seeds must be in [0, 2**64)")
    counters = np.arange(1, samples * width + 1, dtype=np.uint64)
    high = splitmix64(np.array(seeds, dtype=np.uint64), counters) >> np.uint64(32)
    keep_below = np.uint64(min(round(keep * 2**32), 2**32))
    return (high < keep_below).reshape(len(seeds), samples, width)
