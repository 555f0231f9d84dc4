"""The review page's heatmap layer (results/overlay.py) and the NumPy resize it shares with the
analyser (inference/resample.py)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from acwi_node.inference.resample import bilinear_matrix, upsample_cam
from acwi_node.results.heatmap import MAX_ALPHA, blend_heatmap, render_grey
from acwi_node.results.overlay import heat_path, overlay_rgba, read_cam, write_cam
from models.data.synth import write_ct_series
from tests.support.heatmap_reference import reference_heatmap


@pytest.mark.parametrize(
    ("cam_shape", "size"),
    [((7, 7), (512, 512)), ((16, 12), (300, 97)), ((16, 16), (2048, 1536)), ((16, 16), (5, 3))],
)
def test_the_numpy_resize_is_pytorchs_bilinear_heatmap(
    cam_shape: tuple[int, int], size: tuple[int, int]
) -> None:
    """The analyser's heatmaps and the page's overlays (one function) are what ReLU,
    ``F.interpolate`` and division by the maximum give, at sizes that split the large product
    into many blocks of rows and at a size smaller than the map."""
    cam = np.random.default_rng(3).normal(size=cam_shape).astype(np.float32)
    ours = upsample_cam(cam, size)
    assert ours.shape == size and ours.dtype == np.float32
    # within float32 rounding of the weights (1.3e-6 at 128x)
    np.testing.assert_allclose(ours, reference_heatmap(cam, size), rtol=0, atol=2e-6)
    assert ours.min() >= 0.0 and ours.max() == 1.0  # divided by its own maximum
    assert not upsample_cam(-np.abs(cam), size).any()  # all negative: stays zero
    assert not bilinear_matrix(4, 8).flags.writeable  # the cached weights are shared


def test_a_kept_map_is_read_back_and_anything_else_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sc = tmp_path / "1.2.3.dcm"
    assert heat_path(sc) == tmp_path / "1.2.3.heat.npy"
    assert read_cam(sc) is None  # none kept
    cam = np.arange(12, dtype=np.float64).reshape(3, 4)
    write_cam(sc, cam)
    back = read_cam(sc)
    assert back is not None and back.dtype == np.float32 and np.array_equal(back, cam)
    assert not list(tmp_path.glob(".heat-*"))  # no temporary left
    for bad in (
        np.zeros((2, 2, 2), np.float32),
        np.zeros((2, 600), np.float32),
        np.array([[np.nan, 1.0]], np.float32),
        np.zeros((2, 2), np.int32),
    ):
        np.save(heat_path(sc), bad)
        assert read_cam(sc) is None, bad.shape
    np.save(heat_path(sc), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert read_cam(sc) is None  # never unpickled
    heat_path(sc).write_bytes(b"not an array")
    assert read_cam(sc) is None
    with caplog.at_level(logging.WARNING):
        write_cam(tmp_path / "gone" / "1.2.4.dcm", cam)  # no folder: logged, not raised
    assert "could not be kept" in caplog.text


def test_the_layer_over_the_image_is_the_heatmap_objects_blend() -> None:
    rng = np.random.default_rng(5)
    grey = rng.random((40, 50))
    cam = rng.normal(size=(7, 7)).astype(np.float32)
    rgba = overlay_rgba(cam, 40, 50).astype(np.float64)
    heat = upsample_cam(cam, (40, 50)).astype(np.float64)
    assert np.abs(rgba[..., 3] / 255.0 - MAX_ALPHA * heat).max() <= 0.5 / 255 + 1e-9
    alpha = rgba[..., 3:] / 255.0
    drawn = (grey[..., None] * 255.0) * (1.0 - alpha) + rgba[..., :3] * alpha
    burned = blend_heatmap(grey, heat).astype(np.float64)
    assert np.abs(drawn - burned).max() <= 1.5  # two roundings to 8 bits


def test_a_ct_slice_is_drawn_in_the_window_asked_for(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path, slices=1, size=64)
    ds = dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lung = render_grey(ds, window=(-600.0, 1500.0))
    expected = np.clip((hu - (-600.0 - 0.5)) / (1500.0 - 1.0) + 0.5, 0.0, 1.0)
    assert np.allclose(lung, expected)
    assert np.array_equal(render_grey(ds), lung)  # the file's first window is the lung window
    bone = render_grey(ds, window=(400.0, 1800.0))
    assert not np.array_equal(bone, lung)
    auto = render_grey(ds, window="auto")
    low, high = np.percentile(hu, (0.5, 99.5))
    assert np.allclose(auto, np.clip((hu - low) / (high - low), 0.0, 1.0))


def test_a_kept_map_has_the_result_objects_mode(tmp_path: Path) -> None:
    """The map was written 0600 (mkstemp's mode) beside result objects written 0640: a web
    process of another user in the node's group could show the object but not its map."""
    before = os.umask(0o027)  # the node's own umask (acwi_node.cli.private_umask)
    try:
        write_cam(tmp_path / "1.2.3.dcm", np.ones((2, 2), np.float32))
    finally:
        os.umask(before)
    assert stat.S_IMODE(heat_path(tmp_path / "1.2.3.dcm").stat().st_mode) == 0o640
