"""Synthetic phantoms: ground truth, reproducibility, site differences and DICOM output."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from models.data.synth import (
    CT_FOV_MM,
    CT_SITES,
    CT_STORAGE,
    DX_STORAGE,
    LABELS,
    SITES,
    gaussian_blur,
    image_seed,
    lesion_box,
    make_ct_series,
    make_image,
    make_phantom,
    read_mask,
    write_ct_series,
    write_dataset,
    write_study,
)
from tests.support.dciodvfy import dciodvfy_errors, dciodvfy_output, require_dciodvfy

DCIODVFY = shutil.which("dciodvfy") or (
    "/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None
)


def test_make_image_types_and_reproducibility() -> None:
    pixels, mask = make_image("nodule", 0, 5, size=128)
    assert pixels.dtype == np.uint16 and pixels.shape == (128, 128)
    assert mask.dtype == bool and mask.shape == (128, 128)
    again, mask_again = make_image("nodule", 0, 5, size=128)
    np.testing.assert_array_equal(pixels, again)
    np.testing.assert_array_equal(mask, mask_again)
    other, _ = make_image("nodule", 0, 6, size=128)
    assert not np.array_equal(pixels, other)


@pytest.mark.parametrize("label", ["nodule", "effusion"])
@pytest.mark.parametrize("site", range(len(SITES)))
def test_lesion_inside_lung_and_box_matches(label: str, site: int) -> None:
    for seed in range(3):
        ph = make_phantom(label, site, seed, size=128)
        assert ph.mask.any()
        assert not (ph.mask & ~ph.lung_mask).any(), "lesion leaks outside the lungs"
        assert ph.box == lesion_box(ph.mask)
        assert ph.box is not None
        x0, y0, x1, y1 = ph.box
        assert ph.mask[y0 : y1 + 1, x0 : x1 + 1].sum() == ph.mask.sum()


def test_normal_has_no_lesion() -> None:
    ph = make_phantom("normal", 2, 11, size=128)
    assert not ph.mask.any() and ph.box is None
    assert ph.lung_mask.mean() > 0.15


def test_effusion_sits_at_a_lung_base() -> None:
    ph = make_phantom("effusion", 0, 4, size=128)
    rows = np.flatnonzero(ph.lung_mask.any(axis=1))
    assert ph.box is not None
    _, y0, _, y1 = ph.box
    assert y1 >= rows[-1] - 3, "effusion does not reach the lung base"
    assert y0 > (rows[0] + rows[-1]) / 2 - 10, "effusion reaches too high"


def test_same_seed_pairs_differ_only_around_the_lesion() -> None:
    size = 128
    normal = make_phantom("normal", 1, 3, size).pixels.astype(np.int64)
    for label in ("nodule", "effusion"):
        ph = make_phantom(label, 1, 3, size)
        assert ph.box is not None
        diff = np.abs(ph.pixels.astype(np.int64) - normal)
        x0, y0, x1, y1 = ph.box
        margin = 10
        outside = np.ones_like(diff, dtype=bool)
        outside[max(0, y0 - margin) : y1 + margin + 1, max(0, x0 - margin) : x1 + margin + 1] = 0
        assert diff[~outside].max() > 20
        # Outside the lesion only FFT round-off may flip a value by one step.
        assert diff[outside].max() <= 1
        assert (diff[outside] > 0).mean() < 0.01


def test_sites_differ_like_scanners() -> None:
    images = [make_image("normal", s, 1, size=128)[0] for s in range(len(SITES))]
    for site, img in zip(SITES, images, strict=True):
        assert int(img.max()) < 2**site.bits_stored
    assert len({s.bits_stored for s in SITES}) == 4
    assert {s.photometric for s in SITES} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({s.manufacturer for s in SITES}) == len(SITES)

    # Noise level: the high-frequency residual in smooth soft tissue below the lungs.
    def noise(site: int) -> float:
        x = images[site].astype(float) / (2 ** SITES[site].bits_stored - 1)
        return float(np.std((x - gaussian_blur(x, 1.5))[112:126, 24:48]))

    assert noise(4) > 1.4 * noise(0)
    assert noise(2) > 1.3 * noise(3)


def test_unknown_label_or_site() -> None:
    with pytest.raises(ValueError):
        make_image("fracture", 0, 0)
    with pytest.raises(ValueError):
        make_image("normal", 99, 0)


def test_write_study_dx(tmp_path: Path) -> None:
    paths = write_study(tmp_path, n_images=2, label="nodule", site=1, seed=3, size=128)
    assert len(paths) == 2
    datasets = [pydicom.dcmread(p) for p in paths]
    ds = datasets[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == DX_STORAGE
    assert ds.Modality == "DX"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.PresentationLUTShape == "INVERSE"
    assert ds.BitsStored == SITES[1].bits_stored and ds.HighBit == ds.BitsStored - 1
    assert ds.Manufacturer == SITES[1].manufacturer
    assert ds.PatientName == "PHANTOM^ONE" and ds.AccessionNumber == "ACC0001"
    assert datasets[0].StudyInstanceUID == datasets[1].StudyInstanceUID
    assert datasets[0].SeriesInstanceUID == datasets[1].SeriesInstanceUID
    assert datasets[0].SOPInstanceUID != datasets[1].SOPInstanceUID
    assert [d.InstanceNumber for d in datasets] == [1, 2]
    for i, (path, d) in enumerate(zip(paths, datasets, strict=True)):
        expected, _ = make_image("nodule", 1, image_seed(3, i), size=128)
        np.testing.assert_array_equal(d.pixel_array, expected)
        truth = json.loads(path.with_suffix(".truth.json").read_text())
        assert truth["label"] == "nodule" and truth["sop_instance_uid"] == d.SOPInstanceUID
        assert b"nodule" not in path.read_bytes()


def test_write_study_is_reproducible_and_honours_uid(tmp_path: Path) -> None:
    a = write_study(tmp_path / "a", n_images=1, seed=8, size=96)
    b = write_study(tmp_path / "b", n_images=1, seed=8, size=96)
    assert a[0].read_bytes() == b[0].read_bytes()
    c = write_study(tmp_path / "c", n_images=1, seed=8, size=96, study_instance_uid="1.2.3.4")
    assert pydicom.dcmread(c[0]).StudyInstanceUID == "1.2.3.4"


def test_write_study_cr(tmp_path: Path) -> None:
    (path,) = write_study(tmp_path, n_images=1, site=2, modality="CR", size=96)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert ds.Modality == "CR"
    assert "PresentationIntentType" not in ds


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed")
@pytest.mark.parametrize(("site", "modality"), [(0, "DX"), (1, "DX"), (2, "CR"), (3, "DX")])
def test_dciodvfy_has_no_errors(tmp_path: Path, site: int, modality: str) -> None:
    (path,) = write_study(tmp_path, n_images=1, site=site, modality=modality, size=96)
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == []


def test_write_dataset_labels_csv(tmp_path: Path) -> None:
    csv_path = write_dataset(tmp_path, 12, seed=4, sites=(0, 3), size=96)
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert set(rows[0]) == {"study_instance_uid", "sop_instance_uid", "label", "site", "box"}
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 12
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert sops == {row["sop_instance_uid"] for row in rows}
    for row in rows:
        assert row["label"] in LABELS
        assert row["site"] in {"0", "3"}
        assert (row["box"] == "") == (row["label"] == "normal")
        if row["box"]:
            assert len(row["box"].split()) == 4


# --- CT -------------------------------------------------------------------------------------


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )


def test_write_ct_series_geometry_and_hounsfield_units(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, slices=10, label="nodule", site=0, seed=2, size=256)
    assert [p.name for p in paths] == [f"ACC0001_{k:04d}.dcm" for k in range(1, 11)]
    datasets = [pydicom.dcmread(p) for p in paths]
    first = datasets[0]
    assert first.SOPClassUID == CT_STORAGE == "1.2.840.10008.5.1.4.1.1.2"
    assert first.file_meta.MediaStorageSOPClassUID == CT_STORAGE
    assert first.Modality == "CT" and list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.pixel_array.dtype == np.int16 and first.PixelRepresentation == 1
    assert first.BitsAllocated == 16 and first.RescaleType == "HU"
    assert first.Manufacturer == SITES[0].manufacturer
    assert first.ConvolutionKernel == CT_SITES[0].kernel
    assert first.Rows == first.Columns == 256
    spacing = [float(v) for v in first.PixelSpacing]
    assert spacing[0] == spacing[1] and spacing[0] * 256 == pytest.approx(CT_FOV_MM, abs=1e-3)
    thickness = float(first.SliceThickness)
    assert thickness == CT_SITES[0].slice_thickness_mm
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    assert len({d.FrameOfReferenceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == 10
    assert [d.InstanceNumber for d in datasets] == list(range(1, 11))
    z = np.array([float(d.ImagePositionPatient[2]) for d in datasets])
    np.testing.assert_allclose(np.diff(z), thickness, atol=1e-3)
    np.testing.assert_allclose(z, [float(d.SliceLocation) for d in datasets])
    for d in datasets:
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        x0, y0 = (float(v) for v in d.ImagePositionPatient[:2])
        assert x0 == pytest.approx(-CT_FOV_MM / 2 + spacing[0] / 2, abs=1e-3)
        assert y0 == pytest.approx(-CT_FOV_MM / 2 + spacing[0] / 2, abs=1e-3)
    assert all(b"nodule" not in p.read_bytes() for p in paths)  # truth only in side-cars

    truths = [json.loads(p.with_suffix(".truth.json").read_text()) for p in paths]
    nodule = truths[0]["nodule"]
    assert nodule is not None and all(t["nodule"] == nodule for t in truths)
    assert 4.0 <= nodule["radius_mm"] <= 7.0
    assert len(nodule["slices"]) >= 3, "the nodule spans a few slices"
    assert [t["label"] == "nodule" for t in truths] == [k in nodule["slices"] for k in range(10)]
    # The recorded centre (mm) is where the image shows a solid nodule inside -800 HU lung.
    col, row, index = nodule["center_voxel"]
    cx, cy, cz = nodule["center_mm"]
    assert x0 + col * spacing[0] == pytest.approx(cx, abs=1e-3)
    assert y0 + row * spacing[0] == pytest.approx(cy, abs=1e-3)
    assert z[0] + index * thickness == pytest.approx(cz, abs=1e-3)
    k = int(round(index))
    hu = _hu(datasets[k])
    r, c = int(round(row)), int(round(col))
    assert hu[r - 1 : r + 2, c - 1 : c + 2].mean() > -100.0
    x_min, y_min, x_max, y_max = truths[k]["box"]
    assert x_min <= c <= x_max and y_min <= r <= y_max
    half = int(nodule["radius_mm"] / spacing[0]) + 6
    sgn = 1 if c < 128 else -1  # step towards the lung's centre, away from the body wall
    lung = hu[r - 4 : r + 5, c + sgn * half - 4 : c + sgn * half + 5]
    assert -870.0 < float(np.median(lung)) < -730.0
    assert float(np.median(hu[:8, :8])) == pytest.approx(-1000.0, abs=60.0)  # air


@pytest.mark.parametrize("site", range(len(CT_SITES)))
def test_ct_nodule_lies_in_the_lung_and_matches_its_masks(site: int) -> None:
    for seed in range(2):
        series = make_ct_series("nodule", site, seed, slices=12, size=128)
        assert series.nodule is not None
        assert series.mask.any()
        assert not (series.mask & ~series.lung_mask).any(), "nodule leaks outside the lungs"
        present = tuple(int(k) for k in np.flatnonzero(series.mask.any(axis=(1, 2))))
        assert series.nodule.slices == present and len(present) >= 3
        col, row, index = series.nodule.center_voxel
        k = int(round(index))
        rows, cols = np.nonzero(series.mask[k])
        assert abs(rows.mean() - row) < 1.0 and abs(cols.mean() - col) < 1.0


def test_ct_normal_and_nodule_pairs_differ_only_around_the_nodule() -> None:
    normal = make_ct_series("normal", 3, 5, slices=8, size=128)
    nodule = make_ct_series("nodule", 3, 5, slices=8, size=128)
    assert normal.nodule is None and not normal.mask.any()
    assert nodule.nodule is not None
    diff = np.abs(nodule.hu - normal.hu)
    col, row, _ = nodule.nodule.center_voxel
    reach = nodule.nodule.radius_mm / nodule.pixel_spacing_mm + 6
    yy, xx = np.mgrid[:128, :128]
    far = np.hypot(yy - row, xx - col) > reach
    assert diff[:, far].max() < 0.5  # FFT round-off only: below one stored HU step
    assert diff.max() > 400.0  # solid tissue replaced -800 HU lung


def test_ct_sites_differ_in_noise_sharpness_and_equipment(tmp_path: Path) -> None:
    def air_noise(site: int) -> float:
        series = make_ct_series("normal", site, 1, slices=1, size=128)
        return float(series.hu[0, :12, :12].std())

    for site, profile in enumerate(CT_SITES):
        assert air_noise(site) == pytest.approx(profile.noise_hu, rel=0.25)
    assert air_noise(4) > 2 * air_noise(0)
    assert len({p.kernel for p in CT_SITES}) == len(CT_SITES)
    assert len({p.model_name for p in CT_SITES}) == len(CT_SITES)
    # A sharper kernel keeps the lung edge steeper (larger gradient at the same anatomy).
    sharp = make_ct_series("normal", 1, 1, slices=1, size=256).hu[0]
    soft = make_ct_series("normal", 2, 1, slices=1, size=256).hu[0]
    assert CT_SITES[1].blur_mm < CT_SITES[2].blur_mm

    def edge(img: np.ndarray) -> float:
        return float(np.percentile(np.abs(np.diff(img, axis=1)), 99.9))

    assert edge(sharp) > edge(soft)
    datasets = [
        pydicom.dcmread(write_ct_series(tmp_path / str(s), slices=1, site=s, size=64)[0])
        for s in (0, 1)
    ]
    assert datasets[0].Manufacturer != datasets[1].Manufacturer
    assert float(datasets[0].RescaleIntercept) == -1024.0
    assert float(datasets[1].RescaleIntercept) == 0.0
    for ds in datasets:  # same HU whatever the stored representation
        assert float(np.median(_hu(ds)[:6, :6])) == pytest.approx(-1000.0, abs=100.0)


@pytest.mark.parametrize("site", [0, 1, 4])
def test_ct_slice_passes_dciodvfy(tmp_path: Path, site: int) -> None:
    require_dciodvfy()
    paths = write_ct_series(tmp_path, slices=3, site=site, seed=1, size=128)
    assert pydicom.dcmread(paths[1]).SOPClassUID == CT_STORAGE
    output = dciodvfy_output(paths[1])
    assert "CTImage" in output  # dciodvfy recognised the IOD it checked
    assert dciodvfy_errors(paths[1]) == []


def test_write_study_ct_and_bad_ct_requests(tmp_path: Path) -> None:
    paths = write_study(tmp_path / "s", n_images=4, site=2, seed=1, modality="CT", size=64)
    assert len(paths) == 4
    assert {pydicom.dcmread(p).Modality for p in paths} == {"CT"}
    with pytest.raises(ValueError, match="CT label"):
        write_ct_series(tmp_path / "e", label="effusion")
    with pytest.raises(ValueError, match="at least one slice"):
        write_ct_series(tmp_path / "z", slices=0)
    with pytest.raises(ValueError, match="unknown site"):
        make_ct_series("normal", 9, 0)
    assert not (tmp_path / "e").exists() and not (tmp_path / "z").exists()


def test_write_dataset_ct_labels_per_slice(tmp_path: Path) -> None:
    csv_path = write_dataset(
        tmp_path,
        4,
        seed=3,
        sites=(2,),  # 2.5 mm slices: 10 of them reach beyond a 4-7 mm nodule
        images_per_study=10,
        size=64,
        modality="CT",
        class_fractions={"nodule": 1.0},
    )
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40
    assert {r["label"] for r in rows} == {"normal", "nodule"}  # slices beyond the nodule
    for row in rows:
        assert (row["box"] == "") == (row["label"] == "normal")
    with pytest.raises(ValueError, match="CT series can only be"):
        write_dataset(tmp_path / "x", 2, seed=0, modality="CT", class_fractions={"effusion": 1})


def test_cli_synth_ct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.cli import main

    out = tmp_path / "ct"
    args = ["synth", "--out", str(out), "--studies", "2", "--modality", "CT"]
    assert main([*args, "--slices", "3", "--size", "64", "--sites", "3"]) == 0
    assert "CT series of 3 slices" in capsys.readouterr().out
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 6
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.Rows == 64 and ds.Manufacturer == SITES[3].manufacturer
    with pytest.raises(SystemExit) as stop:  # a usage error: argparse's exit status 2
        main([*args, "--slices", "0"])
    assert stop.value.code == 2
    assert "--slices" in capsys.readouterr().err


@pytest.mark.parametrize("label", LABELS)
def test_write_study_lesion_masks(tmp_path: Path, label: str) -> None:
    paths = write_study(tmp_path, n_images=2, label=label, site=1, seed=7, size=128)
    again = write_study(tmp_path / "again", n_images=2, label=label, site=1, seed=7, size=128)
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        # Writing masks leaves the images as drawn, and the same seed draws the same image.
        phantom = make_phantom(label, 1, image_seed(7, i), 128)
        np.testing.assert_array_equal(ds.pixel_array, phantom.pixels)
        assert ds.PixelData == pydicom.dcmread(again[i]).PixelData
        truth_path = path.with_suffix(".truth.json")
        truth = json.loads(truth_path.read_text())
        mask_path = path.with_suffix(".mask.png")
        mask = read_mask(truth_path)
        if label == "normal":
            assert truth["mask"] is None and truth["box"] is None
            assert mask is None and not mask_path.exists()
            continue
        assert truth["mask"] == mask_path.name and mask_path.is_file()
        assert mask is not None and mask.shape == (ds.Rows, ds.Columns)
        assert mask.any()
        with Image.open(mask_path) as img:
            assert img.mode == "L"
            assert set(np.unique(np.asarray(img)).tolist()) == {0, 255}
        # exactly the drawn lesion's pixels, all inside the truth box
        np.testing.assert_array_equal(mask, make_phantom(label, 1, image_seed(7, i), 128).mask)
        x0, y0, x1, y1 = truth["box"]
        inside = np.zeros_like(mask)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        assert not (mask & ~inside).any()
        assert lesion_box(mask) == tuple(truth["box"])


def test_write_ct_series_masks_only_on_nodule_slices(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, slices=6, label="nodule", site=0, seed=3, size=64)
    series = make_ct_series("nodule", 0, 3, slices=6, size=64)
    with_mask = 0
    for k, path in enumerate(paths):
        truth_path = path.with_suffix(".truth.json")
        truth = json.loads(truth_path.read_text())
        mask = read_mask(truth_path)
        if truth["box"] is None:
            assert truth["mask"] is None and mask is None
            continue
        with_mask += 1
        assert mask is not None
        np.testing.assert_array_equal(mask, series.mask[k])
        assert lesion_box(mask) == tuple(truth["box"])
    assert with_mask > 0
    normal = write_ct_series(tmp_path / "n", slices=4, label="normal", size=64)
    assert not list((tmp_path / "n").glob("*.mask.png"))
    assert all(json.loads(p.with_suffix(".truth.json").read_text())["mask"] is None for p in normal)


def test_an_enhanced_ct_benchmark_labels_each_frame(tmp_path: Path) -> None:
    """``acwi-models synth --modality CT --enhanced``: one multi-frame image per study, a
    labelled row per frame (the frame's slice label and box), which the loader reads back."""
    from models.cli import main
    from models.data.dicom_dataset import scan_folder

    assert (
        main(
            ["synth", "--out", str(tmp_path), "--studies", "3", "--modality", "CT"]
            + ["--slices", "3", "--size", "64", "--enhanced", "--seed", "2"]
        )
        == 0
    )
    with (tmp_path / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 3 and len(rows) == 9
    assert [r["frame_number"] for r in rows] == ["1", "2", "3"] * 3
    for row in rows:
        assert (row["box"] == "") == (row["label"] == "normal")
    items = scan_folder(tmp_path)
    assert sorted((i.sop_instance_uid, i.frame_number, i.label) for i in items) == sorted(
        (r["sop_instance_uid"], int(r["frame_number"]), r["label"]) for r in rows
    )
    assert dciodvfy_errors(files[0]) == []
    with pytest.raises(ValueError, match="modality CT only"):
        write_dataset(tmp_path / "dx", 1, seed=0, enhanced=True)


def test_write_dataset_refuses_out_of_range_arguments_before_writing(tmp_path: Path) -> None:
    """No study, no image, a size the phantoms cannot draw, an unknown site or an ``out_dir``
    that is a file: a ValueError naming it, and nothing written (no empty folder either)."""
    out = tmp_path / "ds"
    cases: list[tuple[dict[str, object], str]] = [
        ({"n_studies": 0}, "n_studies must be at least 1"),
        ({"images_per_study": 0}, "images_per_study must be at least 1"),
        ({"size": 0}, "size must be 64 to 4096"),
        ({"size": 8192}, "size must be 64 to 4096"),
        ({"sites": (0, 9)}, r"unknown sites \[9\]; sites are 0 to 4"),
    ]
    for changes, message in cases:
        kwargs: dict[str, object] = {"n_studies": 2, "seed": 0, "size": 64, **changes}
        with pytest.raises(ValueError, match=message):
            write_dataset(out, **kwargs)  # type: ignore[arg-type]
        assert not out.exists(), changes
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        write_dataset(a_file, 2, seed=0, size=64)
