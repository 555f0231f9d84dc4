"""Counter-based Monte-Carlo dropout masks (acwi_node/inference/dropout.py)."""

from __future__ import annotations

import numpy as np
import pytest

from acwi_node.inference.dropout import keep_masks, splitmix64

M64 = (1 << 64) - 1


def _splitmix64_reference(seed: int, n: int) -> list[int]:
    """SplitMix64 (Steele, Lea and Flood 2014) in Python integers: its first ``n`` outputs."""
    out = []
    state = seed
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_is_the_published_generator() -> None:
    seeds = [0, 1, 1234567, M64 >> 1, M64]
    got = splitmix64(np.array(seeds, dtype=np.uint64), np.arange(1, 9, dtype=np.uint64))
    for row, seed in zip(got, seeds, strict=True):
        assert [int(v) for v in row] == _splitmix64_reference(seed, 8)
    # the published first output for seed 0
    assert int(got[0, 0]) == 0xE220A8397B1DCDAF


def test_masks_keep_the_fraction_asked_and_depend_only_on_their_seed() -> None:
    seeds = [11, 2**63 + 5, 99, 12]
    masks = keep_masks(seeds, 200, 32, 0.7)
    assert masks.shape == (4, 200, 32) and masks.dtype == np.bool_
    assert abs(float(masks.mean()) - 0.7) < 0.02
    for i, seed in enumerate(seeds):  # alone, or in another batch: the same masks
        np.testing.assert_array_equal(keep_masks([seed], 200, 32, 0.7)[0], masks[i])
    np.testing.assert_array_equal(keep_masks(seeds[::-1], 200, 32, 0.7)[::-1], masks)
    # neighbouring seeds give unrelated masks; samples of one image differ
    assert float((masks[0] == masks[3]).mean()) < 0.7
    assert len({row.tobytes() for row in masks[0]}) == 200
    # the first samples do not change when more are drawn
    np.testing.assert_array_equal(keep_masks(seeds, 5, 32, 0.7), masks[:, :5])


def test_mask_edges_and_bad_arguments() -> None:
    assert keep_masks([1, 2], 3, 4, 1.0).all()
    assert not keep_masks([1, 2], 3, 4, 0.0).any()
    with pytest.raises(ValueError, match="keep"):
        keep_masks([1], 3, 4, 1.5)
    with pytest.raises(ValueError, match="seeds"):
        keep_masks([-1], 3, 4, 0.5)
    with pytest.raises(ValueError, match="seeds"):
        keep_masks([1 << 64], 3, 4, 0.5)
