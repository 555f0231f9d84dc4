"""``worker.heatmap_colours``: the heatmaps' colour map, jet-like by default, or cividis or
viridis, perceptually uniform maps whose order a reader with a colour-vision deficiency sees
as well: in the secondary captures (valid DICOM), the review page's overlay and its scale."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import generate_uid

from acwi_node.config import ConfigError, load_settings
from acwi_node.inference.types import ImageResult, ModelIdentity, StudyAnalysis, Uncertainty
from acwi_node.ledger import Ledger
from acwi_node.results import heatmap
from acwi_node.results.heatmap import MAX_ALPHA, build_heatmap_sc, colour_map
from acwi_node.results.overlay import overlay_rgba
from acwi_node.web.api import create_app
from tests.support.dx import make_dx
from tests.support.review_case import add_user, sign_in

#: The ends of matplotlib's tables (``matplotlib.colormaps[name](0.0)`` and ``(1.0)``).
ENDS = {
    "cividis": ((0.0, 0.1351, 0.3048), (0.9957, 0.9093, 0.2178)),
    "viridis": ((0.2670, 0.0049, 0.3294), (0.9932, 0.9062, 0.1439)),
}
HOT = (slice(20, 44), slice(30, 54))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Relative luminance (Rec. 709 primaries, sRGB decoded) of colours in [0, 1]."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return np.asarray(linear @ np.array([0.2126, 0.7152, 0.0722]))


@pytest.mark.parametrize("name", ["cividis", "viridis"])
def test_a_uniform_map_grows_lighter_with_the_heat(name: heatmap.ColourMapName) -> None:
    """Its ends are matplotlib's, and each step of heat is a lighter colour: the order reads in
    grey too. Jet's does not (yellow is lighter than its red end)."""
    heat = np.linspace(0.0, 1.0, 1024)
    colours = colour_map(heat, name)
    assert colours.shape == (1024, 3) and colours.min() >= 0.0 and colours.max() <= 1.0
    np.testing.assert_allclose(colours[0], ENDS[name][0], atol=1e-4)
    np.testing.assert_allclose(colours[-1], ENDS[name][1], atol=1e-4)
    assert (np.diff(_luminance(colours)) > 0).all()
    assert not (np.diff(_luminance(colour_map(heat))) > 0).all()
    np.testing.assert_array_equal(colour_map(np.array([-1.0, 2.0]), name), colours[[0, -1]])


def test_jet_stays_the_default() -> None:
    heat = np.linspace(0.0, 1.0, 257)
    np.testing.assert_array_equal(colour_map(heat), colour_map(heat, "jet"))
    assert colour_map(np.array([1.0]))[0].tolist() == [1.0, 0.0, 0.0]
    settings = load_settings(None)
    assert settings.worker.heatmap_colours == "jet"
    assert load_settings(None, worker={"heatmap_colours": "cividis"}).worker.heatmap_colours == (
        "cividis"
    )
    with pytest.raises(ConfigError, match="worker.heatmap_colours: Input should be 'jet'"):
        load_settings(None, worker={"heatmap_colours": "rainbow"})


def _analysis(source: pydicom.Dataset) -> tuple[StudyAnalysis, ImageResult]:
    heat = np.zeros((source.Rows, source.Columns), dtype=np.float32)
    heat[HOT] = 1.0
    figures = {"normal": 0.2, "effusion": 0.8}
    uncertainty = Uncertainty(entropy=0.5, epistemic=0.1, aleatoric=0.4, score=0.2)
    image = ImageResult(
        sop_instance_uid=str(source.SOPInstanceUID),
        sop_class_uid=str(source.SOPClassUID),
        series_instance_uid=str(source.SeriesInstanceUID),
        probabilities=figures,
        uncertainty=uncertainty,
        heatmap=heat,
        ood_score=0.1,
    )
    analysis = StudyAnalysis(
        model=ModelIdentity(name="cxr", version="1", weights_sha256="00"),
        labels=list(figures),
        images=[image],
        probabilities=figures,
        predicted_label="effusion",
        uncertainty=uncertainty,
        ood_score=0.1,
        needs_review=False,
        finding_labels=["effusion"],
    )
    return analysis, image


def _secondary_captures() -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """A radiograph's heatmap in jet (the default) and in cividis."""
    source = make_dx(generate_uid())
    analysis, image = _analysis(source)
    jet = build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)
    sc = build_heatmap_sc(
        source, image.heatmap_array(), analysis, image, instance_number=1, colours="cividis"
    )
    return jet, sc


def test_the_secondary_capture_in_cividis() -> None:
    """The hot region is drawn in cividis's yellow and the Derivation Description names the
    map; unchanged, the default names jet."""
    jet, sc = _secondary_captures()
    assert "(jet-like colour map, opacity proportional to heat)" in jet.DerivationDescription
    assert "(cividis colour map, opacity proportional to heat)" in sc.DerivationDescription
    hot, cold = sc.pixel_array[HOT].astype(int), sc.pixel_array[:10, :10].astype(int)
    assert (cold == jet.pixel_array[:10, :10]).all()  # no heat: the windowed source alone
    # where the heat is 1, 60 % of cividis's end (light yellow): red and green over blue
    assert (hot[..., 0] > hot[..., 2]).all() and (hot[..., 1] > hot[..., 2]).all()
    assert not np.array_equal(hot, jet.pixel_array[HOT])


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dicom3tools dciodvfy is not installed (/usr/bin/dciodvfy missing)",
)
def test_the_secondary_capture_in_cividis_validates() -> None:
    from acwi_node.results.validate import run_dciodvfy

    _, sc = _secondary_captures()
    report = run_dciodvfy(sc)
    assert report.iod == "SCImage" and report.errors == [], report.output


def test_the_review_overlay_follows_the_setting() -> None:
    cam = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    rgba = overlay_rgba(cam, 8, 8, "viridis")
    expected = np.rint(colour_map(np.array([0.0, 1.0]), "viridis") * 255.0)
    assert rgba[0, 0, :3].tolist() == expected[0].tolist()
    assert rgba[-1, -1, :3].tolist() == expected[1].tolist()
    assert rgba[-1, -1, 3] == round(MAX_ALPHA * 255)
    assert overlay_rgba(cam, 8, 8)[-1, -1, :3].tolist() == [255, 0, 0]  # jet unless asked


@pytest.mark.parametrize("name", ["jet", "cividis"])
def test_the_case_pages_scale_is_the_maps(tmp_path: Path, name: heatmap.ColourMapName) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        worker={"heatmap_colours": name},
    )
    ledger = Ledger(settings.database_url)
    try:
        add_user(ledger)
        with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
            sign_in(client)
            png = client.get("/review/heatmap-scale.png").content
    finally:
        ledger.dispose()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    ends = np.rint(colour_map(np.array([0.0, 1.0]), name) * 255.0)
    assert pixels[0, 0].tolist() == ends[0].tolist()
    assert pixels[0, -1].tolist() == ends[1].tolist()
