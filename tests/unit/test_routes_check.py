"""``acwi-node routes check``: the configured routes applied to studies on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from acwi_node import MANUFACTURER
from acwi_node.cli import main
from acwi_node.inference.manifest import default_model_dir
from models.data.synth import write_ct_series, write_enhanced_ct, write_study

CONFIG = """
[node]
data_dir = "{data}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[[models]]
name = "chest-next"
manifest = "{manifest}"
[[routes]]
name = "chest"
match = {{ modality = ["CR", "DX"], calling_ae = ["XRAY1"] }}
shadow_models = ["chest-next"]
results = {{ sr_regions = false }}
destinations = ["pacs"]
[[routes]]
name = "ct"
match = {{ modality = ["CT"], max_age_days = 30 }}
select = {{ image_type_exclude = ["REFORMATTED"] }}
results = {{ heatmaps = "positive_or_uncertain", parametric_maps = true, sr_region_fraction = 0.3 }}
destinations = ["pacs"]
priority = 5
"""


def _copy_as(source: Path, target: Path, **attributes: object) -> str:
    """``source`` as a new instance of a new series, with ``attributes`` changed."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(target)
    return str(ds.StudyInstanceUID)


@pytest.fixture
def studies(tmp_path: Path) -> tuple[Path, str, str]:
    """A CT (4 slices, a reformat, a PET image, the node's own SR-like result and a text file)
    and a DX study (2 images), all dated 2024-09-16; the config file."""
    ct = write_ct_series(tmp_path / "ct", slices=4, size=64)
    ct_uid = _copy_as(
        ct[0], tmp_path / "ct" / "mpr.dcm", ImageType=["DERIVED", "SECONDARY", "REFORMATTED"]
    )
    _copy_as(ct[1], tmp_path / "ct" / "pet.dcm", Modality="PT")
    _copy_as(ct[2], tmp_path / "ct" / "result.dcm", Manufacturer=MANUFACTURER, Modality="OT")
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    dx = write_study(tmp_path / "dx", n_images=2, size=64)
    dx_uid = str(pydicom.dcmread(dx[0], stop_before_pixels=True).StudyInstanceUID)
    for path in [*ct, *dx]:
        ds = pydicom.dcmread(path)
        ds.StudyDate = "20240916"
        ds.save_as(path)
    config = tmp_path / "acwi.toml"
    manifest = default_model_dir() / "manifest.json"
    config.write_text(CONFIG.format(data=tmp_path / "data", manifest=manifest))
    return config, ct_uid, dx_uid


def _run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str]:
    code = main(["--config", str(config), "routes", "check", *args])
    return code, capsys.readouterr().out


def test_each_study_shows_its_routes_and_what_each_reads(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, ct_uid, dx_uid = studies
    code, out = _run(
        capsys,
        config,
        str(tmp_path / "ct"),
        str(tmp_path / "dx"),
        "--calling-ae",
        "XRAY1",
        "--date",
        "2024-09-20",
    )
    assert code == 0, out
    ct_block, dx_block = out.split("\n\n")[:2]
    assert ct_block.splitlines() == [
        f"study {ct_uid}: 6 instance(s), modalities CT/PT, Study Date 20240916",
        "  1 object(s) written by ACWI Node (its results): dropped on receipt",
        "  route ct (priority 5): matches; model default reads 4 of 6 instance(s);"
        " results (SR with AI regions at 0.3 of the peak, heatmaps: positive_or_uncertain,"
        " parametric maps) to pacs",
        "    left out: 1 x Image Type DERIVED\\SECONDARY\\REFORMATTED",
        "    left out: 1 x Modality PT",
        "  route chest (priority 0): no match: modality: the study has CT, PT,"
        " the route wants CR, DX",
        "  => job(s): ct",
    ]
    assert f"study {dx_uid}: 2 instance(s), modalities DX" in dx_block
    assert (
        "route chest (priority 0): matches; model default reads 2 of 2 instance(s);"
        " results (SR without AI regions, heatmaps: all) to pacs; in its shadow (kept, not"
        " sent): chest-next"
    ) in dx_block
    assert "=> job(s): chest" in dx_block
    assert "file(s) skipped:" in out and "more (--json lists them all)" in out


def test_a_study_no_route_takes_exits_1_with_each_routes_reason(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, dx_uid = studies
    code, out = _run(
        capsys, config, str(tmp_path / "dx"), "--calling-ae", "CT01", "--date", "2024-12-31"
    )
    assert code == 1
    assert out.splitlines()[:4] == [
        f"study {dx_uid}: 2 instance(s), modalities DX, Study Date 20240916",
        "  route ct (priority 5): no match: Study Date 20240916 is 106 days old (max_age_days 30)",
        "  route chest (priority 0): no match: calling_ae: the study has CT01,"
        " the route wants XRAY1",
        "  => no route matches: the study would be recorded as not_routed",
    ]


def test_a_route_that_selects_nothing_is_shown_as_a_failing_job(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, _ = studies
    config.write_text(
        config.read_text().replace('image_type_exclude = ["REFORMATTED"]', 'modality = ["MR"]')
    )
    code, out = _run(capsys, config, str(tmp_path / "ct"), "--date", "2024-09-20", "--json")
    assert code == 1
    report = json.loads(out)
    (study,) = report["studies"]
    ct = next(r for r in study["routes"] if r["route"] == "ct")
    assert (ct["matches"], ct["selected"], study["analysed"]) == (True, 0, False)
    assert ct["left_out"] == {"Modality CT": 5, "Modality PT": 1}
    assert study["own_results"] == 1 and study["jobs"] == ["ct"]
    chest = next(r for r in study["routes"] if r["route"] == "chest")
    assert (ct["shadow_models"], chest["shadow_models"]) == ([], ["chest-next"])
    # the SR's AI regions: the route's, else the worker's (default on, at 0.5)
    assert (ct["sr_regions"], ct["sr_region_fraction"]) == (True, 0.3)
    assert (chest["sr_regions"], chest["sr_region_fraction"]) == (False, None)
    assert any(p.endswith("notes.txt") for p in report["unreadable"])
    code, text = _run(capsys, config, str(tmp_path / "ct"), "--date", "2024-09-20")
    assert "its job would fail: nothing to analyse" in text


def test_nothing_readable_is_said_so_and_exits_1(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, _ = studies
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _run(capsys, config, str(empty))
    assert (code, out) == (1, "no files found\n")
    code, out = _run(capsys, config, str(tmp_path / "missing.dcm"))
    assert code == 1 and "missing.dcm: not a readable DICOM file" in out


def test_images_the_model_cannot_read_are_named_from_their_headers(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A scout and a dose report among the CT's files: the route selects them (CT), the
    model will not read them, and the check says so before anything is sent."""
    config, ct_uid, _ = studies
    slices = sorted((tmp_path / "ct").glob("ACC*.dcm"))
    _copy_as(
        slices[3], tmp_path / "ct" / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
    )
    code, out = _run(capsys, config, str(tmp_path / "ct"), "--date", "2024-09-20")
    assert code == 0
    assert "reads 5 of 7 instance(s)" in out
    assert "    the model cannot read: 1 x a localizer (scout) image, not analysed" in out
    # A study of a scout alone: the route selects it, the model cannot read it, the job
    # would fail; the check exits 1.
    alone = tmp_path / "scout-alone"
    alone.mkdir()
    _copy_as(slices[0], alone / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    code, out = _run(capsys, config, str(alone), "--date", "2024-09-20")
    assert code == 1
    assert "    its job would fail: nothing to analyse" in out


def test_an_image_of_float_pixel_data_is_said_to_be_unreadable(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Its header is a greyscale image's; it has Float Pixel Data, which the analysis skips
    ("no PixelData"): the check said the model reads it."""
    config, _, _ = studies
    slices = sorted((tmp_path / "ct").glob("ACC*.dcm"))
    ds = pydicom.dcmread(slices[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    values = ds.pixel_array.astype("float32")
    del ds.PixelData, ds.PixelRepresentation, ds.BitsStored, ds.HighBit
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    ds.save_as(tmp_path / "ct" / "float.dcm")
    code, out = _run(capsys, config, str(tmp_path / "ct"), "--date", "2024-09-20")
    assert code == 0
    assert "reads 5 of 7 instance(s)" in out
    assert "    the model cannot read: 1 x no PixelData (not an integer-pixel image)" in out


def test_a_multi_frame_image_is_said_to_be_read_frame_by_frame(
    tmp_path: Path, studies: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An Enhanced CT of three frames: the CT route reads it, one image per frame."""
    config, _, _ = studies
    path = write_enhanced_ct(tmp_path / "enhanced", slices=3, size=64)
    ds = pydicom.dcmread(path)
    ds.StudyDate = "20240916"
    ds.save_as(path)
    code, out = _run(capsys, config, str(tmp_path / "enhanced"), "--date", "2024-09-20")
    assert code == 0
    assert "reads 1 of 1 instance(s)" in out
    assert "    1 multi-frame image(s): read frame by frame (3 frames," in out
    assert "cannot read" not in out
    code, out = _run(capsys, config, str(tmp_path / "enhanced"), "--date", "2024-09-20", "--json")
    (study,) = json.loads(out)["studies"]
    ct = next(r for r in study["routes"] if r["route"] == "ct")
    assert (ct["multi_frame"], ct["frames"]) == (1, 3)
