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

from models.data.synth import (
    DX_STORAGE,
    LABELS,
    SITES,
    gaussian_blur,
    image_seed,
    lesion_box,
    make_image,
    make_phantom,
    write_dataset,
    write_study,
)

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
