"""The node knows its own results when they come back (:mod:`acwi_node.ingest.own_results`):
every kind of object it writes, read as the SCP and the STOW-RS receiver read headers."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from acwi_node import MANUFACTURER
from acwi_node.ingest.header import pydicom_header
from acwi_node.ingest.own_results import is_own_result
from acwi_node.ingest.stow import read_header
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.parametric_map import build_parametric_maps
from acwi_node.results.sr import Verification, build_sr, build_verified_sr
from models.data.synth import write_ct_series
from tests.unit.test_parametric_map import analysis_of
from tests.unit.test_sr import make_study


def _headers(ds: Dataset) -> list[dict[str, str]]:
    """The header as the fast reader and as pydicom read it from the encoded object."""
    encoded = encode_part10(ds)
    _, scanned = read_header(encoded)
    return [scanned, pydicom_header(encoded)]


@pytest.fixture(scope="module")
def results_and_sources(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[Dataset], list[Dataset]]:
    sources, analysis = make_study()
    sr = build_sr(sources, analysis)
    image = analysis.images[0]
    heatmap = build_heatmap_sc(
        sources[0], image.heatmap_array(), analysis, image, instance_number=1
    )
    verdict = Verification(
        "Doe^Jane", "Example Hospital", "confirm", analysis.predicted_label, "", dt.datetime.now()
    )
    verified = build_verified_sr(pydicom.dcmread(io.BytesIO(encode_part10(sr))), sources, verdict)
    folder = tmp_path_factory.mktemp("ct")
    ct: list[Dataset] = [
        pydicom.dcmread(p) for p in write_ct_series(Path(folder), slices=3, size=64)
    ]
    pmaps = build_parametric_maps(ct, analysis_of(ct))
    assert len(pmaps) == 1
    return [sr, heatmap, verified, *pmaps], [*sources, *ct]


def test_every_kind_of_object_the_node_writes_is_known(
    results_and_sources: tuple[list[Dataset], list[Dataset]],
) -> None:
    results, _ = results_and_sources
    kinds = {str(ds.SOPClassUID) for ds in results}
    assert len(kinds) == 3  # Comprehensive 3D SR (unverified, verified), SC, parametric map
    for ds in results:
        for header in _headers(ds):
            assert header["Manufacturer"] == MANUFACTURER
            assert is_own_result(header), ds.SOPClassUID


def test_the_images_it_analyses_are_not(
    results_and_sources: tuple[list[Dataset], list[Dataset]],
) -> None:
    _, sources = results_and_sources
    for ds in sources:
        for header in _headers(ds):
            assert header["Manufacturer"] and not is_own_result(header)


@pytest.mark.parametrize(
    ("manufacturer", "own"),
    [
        ("ACWI Node", True),
        (" acwi node ", True),  # case and blanks aside, as scanners differ
        ("ACWI Bench", False),
        ("ACWI Node Ltd", False),
        ("", False),
        (None, False),  # no Manufacturer at all
    ],
)
def test_the_manufacturer_decides(manufacturer: str | None, own: bool) -> None:
    header = {"SOPInstanceUID": "1.2.3"}
    if manufacturer is not None:
        header["Manufacturer"] = manufacturer
    assert is_own_result(header) is own
