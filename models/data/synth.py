"""Seeded chest-radiograph-like phantoms from several simulated acquisition sites.

Every image is built in three independent random streams so that paired images share
what they should:

* anatomy (body outline, lungs, heart, mediastinum, ribs, lung texture): seeded by
  ``(seed, site)``;
* the lesion (``nodule`` or ``effusion``): seeded by ``(seed, site, label)``;
* acquisition (blur, gamma, bias field, noise, quantisation): seeded by ``(seed, site)``.

The same ``seed`` and ``site`` with different labels therefore gives the same patient and
the same noise, differing only by the lesion. Sites differ the way scanners do: noise level,
contrast curve (gamma), resolution blur, bias field, bits stored, MONOCHROME1/2 and the
equipment attributes written to DICOM.

Images are PA views: the patient's left (and the heart) is on the image's right.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

LABELS: tuple[str, ...] = ("normal", "nodule", "effusion")
#: Smallest and largest image matrix :func:`write_dataset` writes (the phantoms need 64 pixels).
MIN_SIZE = 64
MAX_SIZE = 4096
#: Screening-like prevalence used when a class mix is not given.
DEFAULT_CLASS_FRACTIONS: dict[str, float] = {"normal": 0.70, "nodule": 0.15, "effusion": 0.15}

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
SOP_CLASS_FOR_MODALITY: dict[str, str] = {"DX": DX_STORAGE, "CR": CR_STORAGE}


@dataclass(frozen=True)
class SiteProfile:
    """How one simulated acquisition site renders the same anatomy."""

    index: int
    manufacturer: str
    model_name: str
    station_name: str
    #: The site's own modality (used by :func:`write_dataset`).
    modality: str
    #: DICOM Detector Type: DIRECT, SCINTILLATOR or STORAGE.
    detector_type: str
    photometric: str
    bits_stored: int
    #: Additive noise standard deviation as a fraction of the used range (256-pixel image).
    noise: float
    #: Contrast curve exponent applied to normalised density.
    gamma: float
    #: Resolution blur (Gaussian sigma) in pixels of a 256-pixel image.
    blur_sigma: float
    #: Strength of the multiplicative bias field.
    bias: float
    #: Direction of the bias gradient in radians.
    bias_angle: float
    #: Fractions of the stored range used for the darkest and brightest value.
    range_low: float
    range_high: float
    #: Detector pixel pitch in mm for a 256-pixel image (scaled with the matrix size).
    pixel_spacing_256: float
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0


SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        0,
        "Northwind Imaging",
        "NW-DR 500",
        "NWDR500-01",
        "DX",
        "DIRECT",
        "MONOCHROME2",
        12,
        0.015,
        1.00,
        0.6,
        0.05,
        0.3,
        0.05,
        0.92,
        1.68,
    ),
    SiteProfile(
        1,
        "Helios Radiology Systems",
        "Helios FlatPanel 43",
        "HFP43-RAD2",
        "DX",
        "SCINTILLATOR",
        "MONOCHROME1",
        14,
        0.025,
        0.80,
        1.0,
        0.12,
        2.0,
        0.08,
        0.88,
        1.72,
    ),
    SiteProfile(
        2,
        "Vantage Diagnostics",
        "VD-CR 12",
        "VDCR12-ER",
        "CR",
        "STORAGE",
        "MONOCHROME1",
        10,
        0.035,
        1.30,
        1.6,
        0.18,
        4.0,
        0.03,
        0.97,
        1.60,
    ),
    SiteProfile(
        3,
        "Orion Medical",
        "Orion DX-9",
        "ODX9-WARD4",
        "DX",
        "SCINTILLATOR",
        "MONOCHROME2",
        16,
        0.020,
        1.15,
        1.2,
        0.08,
        5.5,
        0.10,
        0.85,
        1.76,
    ),
    #: A site held out of the default training set, for site-shift benchmarks.
    SiteProfile(
        4,
        "Kestrel Imaging",
        "Kestrel Mobile DR",
        "KMDR-ICU1",
        "DX",
        "SCINTILLATOR",
        "MONOCHROME2",
        12,
        0.050,
        0.70,
        2.2,
        0.25,
        1.2,
        0.15,
        0.80,
        1.50,
    ),
)


@dataclass(frozen=True)
class Phantom:
    """One generated image with its ground truth."""

    #: Stored pixel values as written to PixelData (site bits, site photometric), uint16.
    pixels: np.ndarray
    #: Lesion mask (all False for ``normal``).
    mask: np.ndarray
    #: Union of both lung fields.
    lung_mask: np.ndarray
    label: str
    site: int
    seed: int
    #: Lesion bounding box ``(x_min, y_min, x_max, y_max)``, inclusive, or None.
    box: tuple[int, int, int, int] | None


def _check(label: str, site: int) -> SiteProfile:
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if not 0 <= site < len(SITES):
        raise ValueError(f"unknown site {site}; expected 0..{len(SITES) - 1}")
    return SITES[site]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """A smooth step with the logistic function's slope at 0 (cheaper than ``tanh``)."""
    t = np.clip(0.5 + x / 6.0, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(x: np.ndarray) -> np.ndarray:
    """A compact bell ``(1 - x^2/2)^2`` on ``|x| < sqrt(2)``, 0 outside."""
    t = np.clip(1.0 - 0.5 * x * x, 0.0, None)
    return t * t


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (sigma in pixels) by FFT with reflective padding."""
    if sigma <= 0:
        return img
    pad = 8 * int(np.ceil((3.0 * sigma + 1.0) / 8.0))  # keeps FFT sizes friendly
    padded = np.pad(img.astype(np.float32), pad, mode="reflect")
    h, w = padded.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return np.asarray(out[pad:-pad, pad:-pad], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise low-passed by a (periodic) Gaussian of ``sigma`` pixels."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    spectrum = np.fft.rfft2(rng.standard_normal((size, size)).astype(np.float32)) * kernel
    field = np.fft.irfft2(spectrum, s=(size, size)).astype(np.float32)
    std = float(field.std())
    return field / std if std > 0 else field


def lesion_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive bounding box ``(x_min, y_min, x_max, y_max)`` of a mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


#: Suffix of the lesion mask written next to a lesion image's ``.truth.json`` side-car.
MASK_SUFFIX = ".mask.png"


def write_mask(dicom_path: Path, mask: np.ndarray) -> str | None:
    """Write ``<stem>.mask.png`` next to ``dicom_path``; return its file name (None if empty).

    The PNG is 8-bit greyscale at the image's Rows x Columns: 255 on exactly the lesion's
    pixels, 0 elsewhere. An empty mask (a normal image) writes nothing.
    """
    from PIL import Image

    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        return None
    path = Path(dicom_path).with_suffix(MASK_SUFFIX)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)
    return path.name


def read_mask(truth_path: Path) -> np.ndarray | None:
    """The boolean lesion mask a ``.truth.json`` side-car references (None when it has none)."""
    from PIL import Image

    truth_path = Path(truth_path)
    name = json.loads(truth_path.read_text()).get("mask")
    if not name:
        return None
    with Image.open(truth_path.parent / name) as img:
        return np.asarray(img.convert("L")) > 127


@dataclass(frozen=True)
class _Lung:
    cx: float
    cy: float
    rx: float
    ry: float
    r: np.ndarray  # implicit radius: < 1 inside


def _anatomy(
    rng: np.random.Generator, size: int, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, list[_Lung], np.ndarray, np.ndarray]:
    """Density map (about 0..0.9), both lungs, effective lung weight and heart weight."""
    s = rng.uniform(0.92, 1.06)
    dx, dy = rng.uniform(-0.04, 0.04, size=2)
    edge = 0.03

    body_r = np.sqrt(((u - dx) / (0.86 * s)) ** 2 + ((v - 0.12 - dy) / (1.10 * s)) ** 2)
    body = _sigmoid((1.0 - body_r) / edge)

    lungs: list[_Lung] = []
    lung_soft = np.zeros_like(u)
    for sgn in (-1.0, 1.0):
        cx = sgn * 0.37 * s + dx + rng.uniform(-0.015, 0.015)
        cy = -0.05 * s + dy
        rx = 0.25 * s * rng.uniform(0.93, 1.07)
        ry = 0.56 * s * rng.uniform(0.95, 1.05)
        t = (v - cy) / ry
        taper = 0.6 + 0.4 * np.clip((t + 1.0) / 1.6, 0.0, 1.0)
        du = np.abs((u - cx) / (rx * taper))
        at = np.abs(t)
        # Rounder apex (power 2), squarer base (power 4) for the costophrenic angles.
        du2, at2 = du * du, at * at
        r = np.where(t > 0, np.sqrt(np.sqrt(du2 * du2 + at2 * at2)), np.sqrt(du2 + at2))
        lungs.append(_Lung(cx, cy, rx, ry, r))
        lung_soft = np.maximum(lung_soft, _sigmoid((1.0 - r) / 0.04))

    hx, hy = 0.10 * s + dx, 0.28 * s + dy
    hrx, hry = 0.27 * s * rng.uniform(0.9, 1.15), 0.24 * s * rng.uniform(0.92, 1.08)
    heart = _sigmoid((1.0 - np.sqrt(((u - hx) / hrx) ** 2 + ((v - hy) / hry) ** 2)) / 0.04)
    medi = _sigmoid((0.10 * s - np.abs(u - dx)) / 0.02) * _sigmoid((v + 0.95) / 0.05)
    spine = _sigmoid((0.06 * s - np.abs(u - dx)) / 0.01)

    lung_eff = lung_soft * (1.0 - heart) * (1.0 - 0.8 * medi)
    density = 0.50 * body + 0.12 * spine * body - 0.38 * lung_eff

    # Posterior ribs: curved bands sloping down laterally, over the thorax only.
    thorax = np.zeros_like(u)
    for lung in lungs:
        thorax = np.maximum(thorax, _sigmoid((1.15 - lung.r) / 0.05))
    lateral = np.abs(u - dx) - 0.08
    rib_w = 0.022 * s
    phase = rng.uniform(-0.04, 0.04)
    ribs = np.zeros_like(u)
    curve = v - 0.28 * np.clip(lateral, 0.0, None) ** 2
    for k in range(10):
        v0 = -0.78 * s + 0.14 * s * k + dy + phase
        ribs += _bump((curve - v0) / rib_w)
    ribs *= (lateral > 0) * thorax * _sigmoid((0.80 * s - lateral) / 0.03)
    density += 0.07 * np.clip(ribs, 0.0, 1.5)

    # Clavicles.
    for sgn in (-1.0, 1.0):
        a = np.clip(sgn * (u - dx), 0.0, None)
        centre = -0.74 * s + dy - 0.12 * a
        clav = _bump((v - centre) / (0.03 * s)) * _sigmoid((0.62 * s - a) / 0.03)
        density += 0.10 * clav * (a > 0.06) * body

    # Lung markings.
    density += 0.03 * _smooth_noise(rng, size, 2.5 * size / 256) * lung_eff
    density += 0.02 * _smooth_noise(rng, size, 12.0 * size / 256) * body
    return density, lungs, lung_eff, heart


def _nodule(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    lungs: list[_Lung],
    heart: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    radius = rng.uniform(0.05, 0.10)
    amp = rng.uniform(0.15, 0.38)
    candidates = np.zeros(u.shape, dtype=bool)
    for lung in lungs:
        candidates |= lung.r < 1.0 - 1.6 * radius / lung.rx
    candidates &= heart < 0.05
    idx = np.flatnonzero(candidates)
    pick = int(idx[rng.integers(idx.size)])
    cy, cx = np.unravel_index(pick, u.shape)
    d = np.sqrt((u - u[cy, cx]) ** 2 + (v - v[cy, cx]) ** 2) / radius
    profile = amp * np.sqrt(np.clip(1.0 - d**2, 0.0, None))
    return profile, d < 1.0


def _effusion(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    lungs: list[_Lung],
    heart: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    side = int(rng.integers(2))
    lung = lungs[side]
    sgn = -1.0 if side == 0 else 1.0
    bottom = lung.cy + lung.ry
    height = rng.uniform(0.15, 0.40) * 2.0 * lung.ry
    meniscus = rng.uniform(0.08, 0.16)
    lateral01 = np.clip((sgn * (u - lung.cx) / lung.rx + 1.0) / 2.0, 0.0, 1.0)
    level = bottom - height - meniscus * lateral01**2
    inside = _sigmoid((1.0 - lung.r) / 0.04) * (1.0 - heart)
    fluid = _sigmoid((v - level) / 0.015) * inside
    depth = np.clip((v - level) / 0.2, 0.0, 1.0)
    profile = 0.36 * fluid * (0.85 + 0.15 * depth)
    mask = (fluid > 0.5) & (lung.r < 1.0)
    return profile, mask


def make_phantom(label: str, site: int, seed: int, size: int = 256) -> Phantom:
    """Generate one phantom with its ground truth (see the module docstring for seeding)."""
    profile = _check(label, site)
    if size < 64:
        raise ValueError("size must be at least 64")
    lin = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    v, u = np.meshgrid(lin, lin, indexing="ij")

    rng_anat = np.random.default_rng([seed, site, 0])
    density, lungs, _, heart = _anatomy(rng_anat, size, u, v)
    lung_mask = np.zeros(u.shape, dtype=bool)
    for lung in lungs:
        lung_mask |= lung.r < 1.0

    mask = np.zeros(u.shape, dtype=bool)
    if label != "normal":
        rng_lesion = np.random.default_rng([seed, site, 1 + LABELS.index(label)])
        lesion_fn = _nodule if label == "nodule" else _effusion
        lesion, mask = lesion_fn(rng_lesion, u, v, lungs, heart)
        density = density + lesion

    rng_acq = np.random.default_rng([seed, site, 9])
    scale = size / 256.0
    img = gaussian_blur(density, profile.blur_sigma * scale)
    img = np.clip(img / 0.9, 0.0, 1.0) ** profile.gamma
    angle = profile.bias_angle + rng_acq.uniform(-0.4, 0.4)
    gradient = np.cos(angle) * u + np.sin(angle) * v
    field = gradient + 0.5 * _smooth_noise(rng_acq, size, 40.0 * scale)
    img = img * (1.0 + profile.bias * field)
    noise = rng_acq.standard_normal(img.shape)
    # Per-pixel quantum noise grows with the matrix size (smaller pixels, fewer photons), so an
    # image resized to a common size looks alike whatever size it was generated at.
    sigma = profile.noise * scale
    img = img + sigma * (0.5 + 0.5 * np.sqrt(np.clip(img, 0.0, None))) * noise

    max_value = (1 << profile.bits_stored) - 1
    lo, hi = profile.range_low * max_value, profile.range_high * max_value
    values = np.rint(lo + (hi - lo) * np.clip(img, 0.0, 1.0))
    values = np.clip(values, 0, max_value)
    if profile.photometric == "MONOCHROME1":
        values = max_value - values
    pixels = values.astype(np.uint16)
    return Phantom(pixels, mask, lung_mask, label, site, seed, lesion_box(mask))


def make_image(label: str, site: int, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Stored pixel values (uint16, the site's bits and photometric) and the lesion mask."""
    phantom = make_phantom(label, site, seed, size)
    return phantom.pixels, phantom.mask


def image_seed(seed: int, index: int) -> int:
    """The phantom seed of image ``index`` of a study generated with ``seed``."""
    return int(np.random.SeedSequence([seed, index, 17]).generate_state(1)[0])


_UID_NAMESPACE = uuid.UUID("5b0e4bd4-6f3c-4c35-9a51-7d4b1f6f0a11")


def _uid(*parts: object) -> str:
    """A deterministic ``2.25.<uuid>`` UID from ``parts`` (name-based UUID, version 5)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def make_dataset(
    pixels: np.ndarray,
    *,
    site: int,
    modality: str = "DX",
    patient_name: str = "PHANTOM^ONE",
    patient_id: str = "PH0001",
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    accession_number: str = "ACC0001",
    instance_number: int = 1,
    study_date: dt.date = dt.date(2024, 1, 15),
    patient_sex: str = "O",
    patient_birth_date: str = "19700101",
) -> Dataset:
    """A DICOM Part 10 dataset (DX For Presentation or CR) holding ``pixels`` from ``site``."""
    if modality not in SOP_CLASS_FOR_MODALITY:
        raise ValueError(f"unsupported modality {modality!r}; expected DX or CR")
    profile = SITES[site]
    rows, cols = pixels.shape
    sop_class = SOP_CLASS_FOR_MODALITY[modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    date = study_date.strftime("%Y%m%d")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = "093000"
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.AcquisitionDateTime = date + "092900"
    ds.StudyTime = "092500"
    ds.SeriesTime = "092800"
    ds.ContentTime = "092900"
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"Phantom Site {site}"
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StationName = profile.station_name
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "CHEST PA"
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = f"SN-{site:02d}-0001"
    ds.SoftwareVersions = "1.0"
    ds.ViewPosition = "PA"
    ds.PatientPosition = ""
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = accession_number[-16:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    max_value = (1 << profile.bits_stored) - 1
    lo = profile.range_low * max_value
    hi = profile.range_high * max_value
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{(hi - lo):.1f}"
    ds.WindowCenterWidthExplanation = "SITE DEFAULT"
    ds.RescaleIntercept = f"{profile.rescale_intercept:g}"
    ds.RescaleSlope = f"{profile.rescale_slope:g}"
    ds.RescaleType = "US"
    spacing = profile.pixel_spacing_256 * 256.0 / max(rows, cols)
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.ImagerPixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]

    region = Dataset()
    region.CodeValue = "43799004"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = DicomSequence([region])

    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if profile.photometric == "MONOCHROME1" else 1
        ds.PresentationLUTShape = "INVERSE" if profile.photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = profile.detector_type
        ds.PositionerType = "NONE"
        view = Dataset()
        view.CodeValue = "399348003"
        view.CodingSchemeDesignator = "SCT"
        view.CodeMeaning = "postero-anterior"
        ds.ViewCodeSequence = DicomSequence([view])
        ds.AcquisitionContextSequence = DicomSequence([])
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]

    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    return ds


def write_study(
    out_dir: Path,
    *,
    n_images: int = 2,
    label: str = "nodule",
    site: int = 0,
    seed: int = 0,
    modality: str = "DX",
    size: int = 256,
    patient_name: str = "PHANTOM^ONE",
    patient_id: str = "PH0001",
    study_instance_uid: str | None = None,
    accession_number: str = "ACC0001",
) -> list[Path]:
    """Write one study (one series of ``n_images`` instances) as DICOM Part 10 files.

    Image ``i`` is ``make_phantom(label, site, image_seed(seed, i), size)``. Ground truth is
    written only to a side-car ``<file stem>.truth.json`` next to each DICOM file (label,
    site, phantom seed, box, mask); the DICOM files carry no label. A lesion image also gets
    ``<file stem>.mask.png`` (see :func:`write_mask`), named by the side-car's ``"mask"``
    (null for a normal image). Returns the DICOM paths.

    ``modality="CT"`` writes an axial CT series of ``n_images`` slices instead (see
    :func:`write_ct_series`; ``size`` is then the slice matrix).
    """
    if modality == "CT":
        return write_ct_series(
            out_dir,
            slices=n_images,
            label=label,
            site=site,
            seed=seed,
            size=size,
            patient_name=patient_name,
            patient_id=patient_id,
            study_instance_uid=study_instance_uid,
            accession_number=accession_number,
        )
    _check(label, site)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or _uid("study", patient_id, accession_number, seed, site, label)
    series_uid = _uid("series", study_uid, site, modality)
    rng = np.random.default_rng([seed, site, 23])
    study_date = dt.date(2023, 1, 1) + dt.timedelta(days=int(rng.integers(0, 730)))
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 55)))
    sex = "F" if rng.random() < 0.5 else "M"

    paths: list[Path] = []
    for i in range(n_images):
        phantom_seed = image_seed(seed, i)
        phantom = make_phantom(label, site, phantom_seed, size)
        sop_uid = _uid("sop", series_uid, seed, i)
        ds = make_dataset(
            phantom.pixels,
            site=site,
            modality=modality,
            patient_name=patient_name,
            patient_id=patient_id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            accession_number=accession_number,
            instance_number=i + 1,
            study_date=study_date,
            patient_sex=sex,
            patient_birth_date=birth.strftime("%Y%m%d"),
        )
        path = out_dir / f"{accession_number}_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        truth = {
            "sop_instance_uid": sop_uid,
            "study_instance_uid": study_uid,
            "label": label,
            "site": site,
            "phantom_seed": phantom_seed,
            "size": size,
            "box": list(phantom.box) if phantom.box else None,
            "mask": write_mask(path, phantom.mask),
        }
        path.with_suffix(".truth.json").write_text(json.dumps(truth, indent=2) + "\n")
        paths.append(path)
    return paths


def sample_labels(
    n: int, rng: np.random.Generator, fractions: dict[str, float] | None = None
) -> list[str]:
    """``n`` labels drawn with the given class fractions (screening-like by default)."""
    fractions = fractions or DEFAULT_CLASS_FRACTIONS
    names = list(fractions)
    for name in names:
        _check(name, 0)
    p = np.asarray([fractions[k] for k in names], dtype=float)
    picks = rng.choice(len(names), size=n, p=p / p.sum())
    return [names[int(i)] for i in picks]


def format_box(box: tuple[int, int, int, int] | None) -> str:
    """A box as ``"x_min y_min x_max y_max"`` (empty for no box)."""
    return "" if box is None else " ".join(str(c) for c in box)


def write_dataset(
    out_dir: Path,
    n_studies: int,
    seed: int,
    *,
    sites: Sequence[int] = (0, 1, 2, 3),
    images_per_study: int = 1,
    size: int = 256,
    class_fractions: dict[str, float] | None = None,
    modality: str | None = None,
    enhanced: bool = False,
) -> Path:
    """Write a multi-study, multi-site benchmark and its ``labels.csv``; returns the CSV path.

    Studies go to ``out_dir/<accession>/``; each site writes its own modality (CR for the
    storage-phosphor site). ``labels.csv`` has one row per image with the columns
    ``study_instance_uid, sop_instance_uid, label, site, box`` (box as in :func:`format_box`).

    ``modality="CT"`` makes every study an axial CT series of ``images_per_study`` slices
    (labels ``normal`` and ``nodule`` only; a row's label is the slice's: ``nodule`` only on
    the slices the nodule crosses). Other modalities override the sites' own.

    ``enhanced`` (CT only) writes each series as one multi-frame image
    (:func:`write_enhanced_ct`); ``labels.csv`` then has a ``frame_number`` column and a row
    per frame.

    Raises :class:`ValueError` before writing anything when an argument is out of range (no
    study or image, a size outside :data:`MIN_SIZE` to :data:`MAX_SIZE`, an unknown site) or
    ``out_dir`` exists and is not a folder.
    """
    if not sites:
        raise ValueError("sites must not be empty")
    unknown_sites = sorted({int(s) for s in sites if not 0 <= int(s) < len(SITES)})
    if unknown_sites:
        raise ValueError(f"unknown sites {unknown_sites}; sites are 0 to {len(SITES) - 1}")
    if n_studies < 1:
        raise ValueError(f"n_studies must be at least 1, not {n_studies}")
    if images_per_study < 1:
        raise ValueError(f"images_per_study must be at least 1, not {images_per_study}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be {MIN_SIZE} to {MAX_SIZE} pixels, not {size}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if enhanced and modality != "CT":
        raise ValueError("enhanced (multi-frame) images are written for modality CT only")
    if modality is not None and modality not in (*SOP_CLASS_FOR_MODALITY, "CT"):
        raise ValueError(f"unsupported modality {modality!r}; expected DX, CR or CT")
    if modality == "CT":
        fractions = class_fractions or {"normal": 0.7, "nodule": 0.3}
        unknown = set(fractions) - set(CT_LABELS)
        if unknown:
            raise ValueError(f"CT series can only be {CT_LABELS}, not {sorted(unknown)}")
        class_fractions = fractions
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 31])
    labels = sample_labels(n_studies, rng, class_fractions)
    rows: list[dict[str, str]] = []
    for j, label in enumerate(labels):
        site = int(sites[int(rng.integers(len(sites)))])
        study_seed = int(np.random.SeedSequence([seed, j, 41]).generate_state(1)[0])
        accession = f"BM{seed % 10000:04d}{j:06d}"
        if enhanced:
            image = write_enhanced_ct(
                out_dir / accession,
                slices=images_per_study,
                label=label,
                site=site,
                seed=study_seed,
                size=size,
                patient_name=f"PHANTOM^S{j:06d}",
                patient_id=f"PH{seed % 10000:04d}{j:06d}",
                accession_number=accession,
            )
            for frame in json.loads(image.with_suffix(".truth.json").read_text())["frames"]:
                box = frame["box"]
                rows.append(
                    {
                        "study_instance_uid": frame["study_instance_uid"],
                        "sop_instance_uid": frame["sop_instance_uid"],
                        "frame_number": str(frame["frame_number"]),
                        "label": frame["label"],
                        "site": str(site),
                        "box": format_box(tuple(box) if box else None),
                    }
                )
            continue
        paths = write_study(
            out_dir / accession,
            n_images=images_per_study,
            label=label,
            site=site,
            seed=study_seed,
            modality=modality or SITES[site].modality,
            size=size,
            patient_name=f"PHANTOM^S{j:06d}",
            patient_id=f"PH{seed % 10000:04d}{j:06d}",
            accession_number=accession,
        )
        for path in paths:
            truth = json.loads(path.with_suffix(".truth.json").read_text())
            box = truth["box"]
            rows.append(
                {
                    "study_instance_uid": truth["study_instance_uid"],
                    "sop_instance_uid": truth["sop_instance_uid"],
                    "label": truth["label"],
                    "site": str(site),
                    "box": format_box(tuple(box) if box else None),
                }
            )
    csv_path = out_dir / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        fields = ["study_instance_uid", "sop_instance_uid", "label", "site", "box"]
        if enhanced:
            fields.insert(2, "frame_number")
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


# --------------------------------------------------------------------------------------------
# CT: axial chest slices in Hounsfield units
# --------------------------------------------------------------------------------------------

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
#: Labels a CT series can carry (effusion phantoms exist for projection images only).
CT_LABELS: tuple[str, ...] = ("normal", "nodule")
#: Reconstructed field of view in mm (pixel spacing = fov / size).
CT_FOV_MM = 360.0
HU_AIR = -1000.0
HU_LUNG = -800.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_NODULE = 30.0
HU_BONE = 700.0


@dataclass(frozen=True)
class CTSiteProfile:
    """How one simulated site's CT scanner reconstructs the same chest.

    Manufacturer and station come from :data:`SITES` (same site index).
    """

    model_name: str
    #: Reconstruction kernel name written to ConvolutionKernel, and its in-plane blur in mm
    #: (a sharp kernel blurs less and shows more noise).
    kernel: str
    blur_mm: float
    #: Image noise standard deviation in HU.
    noise_hu: float
    slice_thickness_mm: float
    kvp: int
    #: Stored value = HU - intercept (int16, slope 1).
    rescale_intercept: float


CT_SITES: tuple[CTSiteProfile, ...] = (
    CTSiteProfile("NW-CT 64", "STANDARD", 0.9, 12.0, 1.25, 120, -1024.0),
    CTSiteProfile("Helios Spiral 128", "LUNG-SHARP", 0.4, 28.0, 1.0, 120, 0.0),
    CTSiteProfile("VD-CT 16", "SOFT", 1.6, 9.0, 2.5, 130, -1024.0),
    CTSiteProfile("Orion CT Edge", "B45", 0.7, 18.0, 1.5, 100, 0.0),
    CTSiteProfile("Kestrel Mobile CT", "SMOOTH", 2.2, 40.0, 2.0, 110, -1024.0),
)


@dataclass(frozen=True)
class CTNodule:
    """A spherical solid nodule in patient coordinates (LPS, mm) and in the series' voxels."""

    center_mm: tuple[float, float, float]
    radius_mm: float
    #: ``(column, row, slice index)``, fractional; slice 0 is the most inferior.
    center_voxel: tuple[float, float, float]
    #: Slice indices where the nodule's cross-section is non-empty.
    slices: tuple[int, ...]


@dataclass(frozen=True)
class CTSeries:
    """A generated CT series: HU volume ``(slices, rows, cols)`` and its ground truth."""

    hu: np.ndarray
    #: Nodule mask per slice (all False for ``normal``).
    mask: np.ndarray
    lung_mask: np.ndarray
    label: str
    site: int
    seed: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    #: Patient z (mm) of each slice centre, increasing with the index.
    z_mm: tuple[float, ...]
    #: Patient x, y (mm) of the centre of the first (top-left) pixel.
    origin_xy_mm: tuple[float, float]
    nodule: CTNodule | None


def _check_ct(label: str, site: int, slices: int, size: int) -> CTSiteProfile:
    if label not in CT_LABELS:
        raise ValueError(f"unknown CT label {label!r}; expected one of {CT_LABELS}")
    if not 0 <= site < len(CT_SITES):
        raise ValueError(f"unknown site {site}; expected 0..{len(CT_SITES) - 1}")
    if slices < 1:
        raise ValueError("a CT series needs at least one slice")
    if size < 64:
        raise ValueError("size must be at least 64")
    return CT_SITES[site]


def make_ct_series(
    label: str, site: int, seed: int, *, slices: int = 16, size: int = 512
) -> CTSeries:
    """Generate an axial chest CT series (HU) with its ground truth.

    Seeding follows :func:`make_phantom`: anatomy by ``(seed, site)``, the nodule by
    ``(seed, site, label)``, noise by ``(seed, site)``, so a ``normal`` and a ``nodule``
    series with the same seed differ only around the nodule. The patient lies head first
    supine: x grows to the patient's left (image columns), y to posterior (image rows), z to
    the head (slice index). Lungs are about -800 HU, soft tissue 40, fat -100, bone 700.
    """
    profile = _check_ct(label, site, slices, size)
    spacing = CT_FOV_MM / size
    thickness = profile.slice_thickness_mm
    coords = (np.arange(size, dtype=np.float32) + 0.5) * spacing - CT_FOV_MM / 2.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    z = tuple(float((k - (slices - 1) / 2.0) * thickness) for k in range(slices))

    rng = np.random.default_rng([seed, site, 0])
    scale = rng.uniform(0.92, 1.06)
    shift_x, shift_y = rng.uniform(-8.0, 8.0, size=2)
    body_a, body_b = 160.0 * scale, 112.0 * scale * rng.uniform(0.95, 1.05)
    lung_a = 52.0 * scale * rng.uniform(0.93, 1.07)
    lung_b = 78.0 * scale * rng.uniform(0.95, 1.05)
    lung_cx, lung_cy = 72.0 * scale, -4.0 * scale
    apex = 140.0 * scale  # lungs narrow away from z = 0 (towards apex and base)
    texture_field = rng.standard_normal((size, size)).astype(np.float32)
    texture = gaussian_blur(texture_field, 1.5 / spacing)
    texture /= max(float(texture.std()), 1e-6)
    ribs = [(float(a), float(rng.uniform(0.88, 0.93))) for a in np.linspace(0.2, np.pi - 0.2, 7)]

    u, v = x - shift_x, y - shift_y
    body_r = np.sqrt((u / body_a) ** 2 + (v / body_b) ** 2)
    edge = spacing  # a one-pixel soft edge
    body = _sigmoid((1.0 - body_r) * body_a / edge)
    fat = _sigmoid((body_r - 0.90) * body_a / edge) * body
    spine_r = np.sqrt(u**2 + (v - 0.72 * body_b) ** 2)
    spine = _sigmoid((18.0 * scale - spine_r) / edge)
    heart_r = np.sqrt(
        ((u - 15.0 * scale) / (55.0 * scale)) ** 2 + ((v + 35.0) / (45.0 * scale)) ** 2
    )
    heart = _sigmoid((1.0 - heart_r) * 45.0 / edge)
    bone = spine.copy()
    for angle, radius in ribs:  # angle 0: anterior, pi: posterior
        for sgn in (-1.0, 1.0):
            rx = sgn * radius * body_a * np.sin(angle)
            ry = -radius * body_b * np.cos(angle)
            rib_r = np.sqrt((u - rx) ** 2 + (v - ry) ** 2)
            bone = np.maximum(bone, _sigmoid((5.0 * scale - rib_r) / edge))

    hu = np.empty((slices, size, size), dtype=np.float32)
    lung_mask = np.zeros((slices, size, size), dtype=bool)
    for k, zk in enumerate(z):
        s = float(np.sqrt(np.clip(1.0 - (zk / apex) ** 2, 0.25, 1.0)))
        lungs = np.zeros_like(u)
        inside = np.zeros(u.shape, dtype=bool)
        for sgn in (-1.0, 1.0):
            r = np.sqrt(
                ((u - sgn * lung_cx) / (lung_a * s)) ** 2 + ((v - lung_cy) / (lung_b * s)) ** 2
            )
            lungs = np.maximum(lungs, _sigmoid((1.0 - r) * lung_a * s / edge))
            inside |= r < 1.0
        lungs *= 1.0 - heart
        tissue = HU_SOFT + (HU_FAT - HU_SOFT) * fat
        tissue = tissue + (HU_BONE - tissue) * bone
        lung_hu = HU_LUNG + 25.0 * texture
        img = HU_AIR + (tissue - HU_AIR) * body
        img = img + (lung_hu - img) * lungs * body
        hu[k] = img
        lung_mask[k] = inside & (heart < 0.5)

    mask = np.zeros_like(lung_mask)
    nodule: CTNodule | None = None
    if label == "nodule":
        rng_lesion = np.random.default_rng([seed, site, 1 + LABELS.index(label)])
        radius = float(rng_lesion.uniform(4.0, 7.0))
        centre_index = (slices - 1) / 2.0 + float(rng_lesion.uniform(-0.5, 0.5))
        cz = float((centre_index - (slices - 1) / 2.0) * thickness)
        s = float(np.sqrt(np.clip(1.0 - (cz / apex) ** 2, 0.25, 1.0)))
        sgn = -1.0 if rng_lesion.random() < 0.5 else 1.0
        margin = 1.0 - (radius + 6.0) / (lung_a * s)
        heart_margin = 1.0 + (radius + 6.0) / (45.0 * scale)
        for _ in range(10000):
            a, b = rng_lesion.uniform(-1.0, 1.0, size=2)
            cu, cv = sgn * lung_cx + a * lung_a * s, lung_cy + b * lung_b * s
            from_heart = np.hypot(
                (cu - 15.0 * scale) / (55.0 * scale), (cv + 35.0) / (45.0 * scale)
            )
            if a * a + b * b < margin**2 and from_heart > heart_margin:
                break
        else:  # pragma: no cover - the lungs always have room for a 7 mm nodule
            raise RuntimeError("no room for the nodule in the lung")
        cx, cy = float(cu + shift_x), float(cv + shift_y)
        offsets = (np.arange(5, dtype=np.float32) + 0.5) / 5.0 - 0.5  # partial volume
        d_xy2 = (x - cx) ** 2 + (y - cy) ** 2
        present: list[int] = []
        for k, zk in enumerate(z):
            if abs(zk - cz) > radius + thickness:
                continue
            fraction = np.zeros_like(u)
            for off in offsets:
                dz = zk + float(off) * thickness - cz
                fraction += _sigmoid((radius - np.sqrt(d_xy2 + dz * dz)) * 3.0 / spacing)
            fraction /= len(offsets)
            hu[k] = hu[k] + (HU_NODULE - hu[k]) * fraction
            mask[k] = d_xy2 + (zk - cz) ** 2 < radius**2
            if mask[k].any():
                present.append(k)
        nodule = CTNodule(
            center_mm=(cx, cy, cz),
            radius_mm=radius,
            center_voxel=(
                (cx - float(coords[0])) / spacing,
                (cy - float(coords[0])) / spacing,
                centre_index,
            ),
            slices=tuple(present),
        )

    for k in range(slices):
        rng_acq = np.random.default_rng([seed, site, 9, k])
        img = gaussian_blur(hu[k], profile.blur_mm / spacing)
        hu[k] = img + profile.noise_hu * rng_acq.standard_normal(img.shape).astype(np.float32)
    return CTSeries(
        hu=hu,
        mask=mask,
        lung_mask=lung_mask,
        label=label,
        site=site,
        seed=seed,
        pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness,
        z_mm=z,
        origin_xy_mm=(float(coords[0]), float(coords[0])),
        nodule=nodule,
    )


def make_ct_dataset(
    hu: np.ndarray,
    *,
    site: int,
    z_mm: float,
    origin_xy_mm: tuple[float, float],
    pixel_spacing_mm: float,
    frame_of_reference_uid: str,
    patient_name: str = "PHANTOM^ONE",
    patient_id: str = "PH0001",
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    accession_number: str = "ACC0001",
    instance_number: int = 1,
    study_date: dt.date = dt.date(2024, 1, 15),
    patient_sex: str = "O",
    patient_birth_date: str = "19700101",
) -> Dataset:
    """A CT Image Storage dataset holding one axial slice ``hu`` (Hounsfield units)."""
    profile = SITES[site]
    ct = CT_SITES[site]
    rows, cols = hu.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    date = study_date.strftime("%Y%m%d")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = "093000"
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.AcquisitionDate = date
    ds.ContentDate = date
    ds.StudyTime = "092500"
    ds.SeriesTime = "092800"
    ds.AcquisitionTime = "092850"
    ds.ContentTime = "092900"
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"Phantom Site {site}"
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StationName = profile.station_name.replace("R", "C", 1)[:16]
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = f"CHEST AXIAL {ct.slice_thickness_mm:g}MM {ct.kernel}"
    ds.ManufacturerModelName = ct.model_name
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = f"SN-CT-{site:02d}-0001"
    ds.SoftwareVersions = "1.0"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = accession_number[-16:]
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [f"{origin_xy_mm[0]:.4f}", f"{origin_xy_mm[1]:.4f}", f"{z_mm:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = f"{ct.slice_thickness_mm:g}"
    ds.SpacingBetweenSlices = f"{ct.slice_thickness_mm:g}"
    ds.SliceLocation = f"{z_mm:.4f}"
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6f}", f"{pixel_spacing_mm:.6f}"]
    ds.KVP = str(ct.kvp)
    ds.ConvolutionKernel = ct.kernel
    ds.ReconstructionDiameter = f"{CT_FOV_MM:g}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    stored = np.clip(np.rint(hu - ct.rescale_intercept), -32768, 32767).astype("<i2")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{ct.rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def pad_outside_fov(ds: Dataset, stored_value: int, *, declared: bool = True) -> Dataset:
    """A copy of CT slice ``ds`` (:func:`make_ct_dataset`'s) as a scanner that pads the pixels
    outside its reconstruction circle (the circle inscribed in the image) writes it: they hold
    the stored value ``stored_value``, which Pixel Padding Value (0028,0120) declares
    (``declared``); undeclared, they are part of the image (a scanner that fills them with
    air)."""
    out = copy.deepcopy(ds)
    stored = np.frombuffer(out.PixelData, dtype="<i2").reshape(out.Rows, out.Columns).copy()
    rows, cols = stored.shape
    y, x = np.mgrid[0:rows, 0:cols]
    radius = min(rows, cols) / 2.0
    outside = (y + 0.5 - rows / 2.0) ** 2 + (x + 0.5 - cols / 2.0) ** 2 > radius**2
    stored[outside] = stored_value
    out.PixelData = stored.tobytes()
    if declared:
        out.add_new(0x00280120, "SS", stored_value)  # Pixel Padding Value
    return out


def write_ct_series(
    out_dir: Path,
    *,
    slices: int = 16,
    label: str = "nodule",
    site: int = 0,
    seed: int = 0,
    size: int = 512,
    patient_name: str = "PHANTOM^ONE",
    patient_id: str = "PH0001",
    study_instance_uid: str | None = None,
    accession_number: str = "ACC0001",
) -> list[Path]:
    """Write one CT study (one axial series of ``slices`` instances) as DICOM Part 10 files.

    Slice ``k`` (``<accession>_<k + 1:04d>.dcm``, InstanceNumber ``k + 1``) lies at patient z
    ``ImagePositionPatient[2]``, one slice thickness apart. Each file's ``.truth.json``
    side-car holds the slice label (``nodule`` where the nodule's cross-section is in the
    slice, else ``normal``), the series label, its box in pixels, its mask file (``"mask"``,
    see :func:`write_mask`; null without a nodule cross-section) and the nodule's position
    (centre in mm and in voxels, radius, slices); the DICOM files carry no label.
    """
    _check_ct(label, site, slices, size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or _uid(
        "study", patient_id, accession_number, seed, site, label, "CT"
    )
    series_uid = _uid("series", study_uid, site, "CT")
    frame_uid = _uid("frame", study_uid, site, "CT")
    rng = np.random.default_rng([seed, site, 23])
    study_date = dt.date(2023, 1, 1) + dt.timedelta(days=int(rng.integers(0, 730)))
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 55)))
    sex = "F" if rng.random() < 0.5 else "M"

    series = make_ct_series(label, site, seed, slices=slices, size=size)
    nodule = series.nodule
    paths: list[Path] = []
    for k in range(slices):
        sop_uid = _uid("sop", series_uid, seed, k)
        ds = make_ct_dataset(
            series.hu[k],
            site=site,
            z_mm=series.z_mm[k],
            origin_xy_mm=series.origin_xy_mm,
            pixel_spacing_mm=series.pixel_spacing_mm,
            frame_of_reference_uid=frame_uid,
            patient_name=patient_name,
            patient_id=patient_id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            accession_number=accession_number,
            instance_number=k + 1,
            study_date=study_date,
            patient_sex=sex,
            patient_birth_date=birth.strftime("%Y%m%d"),
        )
        path = out_dir / f"{accession_number}_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        box = lesion_box(series.mask[k])
        truth = {
            "sop_instance_uid": sop_uid,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "modality": "CT",
            "label": "nodule" if box is not None else "normal",
            "series_label": label,
            "site": site,
            "seed": seed,
            "size": size,
            "slice_index": k,
            "z_mm": series.z_mm[k],
            "box": list(box) if box else None,
            "mask": write_mask(path, series.mask[k]),
            "nodule": None
            if nodule is None
            else {
                "center_mm": list(nodule.center_mm),
                "radius_mm": nodule.radius_mm,
                "center_voxel": list(nodule.center_voxel),
                "slices": list(nodule.slices),
            },
        }
        path.with_suffix(".truth.json").write_text(json.dumps(truth, indent=2) + "\n")
        paths.append(path)
    return paths


def write_enhanced_ct(
    out_dir: Path,
    *,
    slices: int = 16,
    label: str = "nodule",
    site: int = 0,
    seed: int = 0,
    size: int = 512,
    patient_name: str = "PHANTOM^ONE",
    patient_id: str = "PH0001",
    study_instance_uid: str | None = None,
    accession_number: str = "ACC0001",
) -> Path:
    """Write the CT series of :func:`write_ct_series` as one multi-frame image, as a scanner
    that sends enhanced objects would: a Legacy Converted Enhanced CT Image (highdicom), one
    frame per slice, each frame's position and rescale in its functional groups.

    The file is ``<accession>_enhanced.dcm``; its ``.truth.json`` side-car lists, in frame
    order, each frame's slice truth (that of :func:`write_ct_series`, with ``frame_number``).
    """
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    out_dir = Path(out_dir)
    with_slices = out_dir / ".slices"
    paths = write_ct_series(
        with_slices,
        slices=slices,
        label=label,
        site=site,
        seed=seed,
        size=size,
        patient_name=patient_name,
        patient_id=patient_id,
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
    )
    sources = [dcmread(p) for p in paths]
    truths = {
        json.loads(p.with_suffix(".truth.json").read_text())["sop_instance_uid"]: p for p in paths
    }
    study_uid = str(sources[0].StudyInstanceUID)
    series_uid = _uid("series", study_uid, site, "CT", "enhanced")
    image = LegacyConvertedEnhancedCTImage(
        sources,
        series_instance_uid=series_uid,
        series_number=3,
        sop_instance_uid=_uid("sop", series_uid, seed, "enhanced"),
        instance_number=1,
    )
    # The converter keeps the slices' series as referenced; the image stands alone here.
    if "ReferencedSeriesSequence" in image:
        del image.ReferencedSeriesSequence
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{accession_number}_enhanced.dcm"
    image.save_as(path, enforce_file_format=True)
    frames = []
    for number, item in enumerate(image.PerFrameFunctionalGroupsSequence, start=1):
        source_sop = str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)
        source_path = truths[source_sop]
        truth = json.loads(source_path.with_suffix(".truth.json").read_text())
        mask = read_mask(source_path.with_suffix(".truth.json"))
        truth.update(
            frame_number=number,
            source_sop_instance_uid=source_sop,
            sop_instance_uid=str(image.SOPInstanceUID),
            series_instance_uid=series_uid,
            mask=None,
        )
        if mask is not None:
            truth["mask"] = write_mask(path.with_name(f"{path.stem}_{number:04d}.dcm"), mask)
        frames.append(truth)
    path.with_suffix(".truth.json").write_text(json.dumps({"frames": frames}, indent=2) + "\n")
    for p in with_slices.iterdir():
        p.unlink()
    with_slices.rmdir()
    return path
