"""Reviewed cases as a labelled dataset, for fine-tuning with ``acwi-models train``.

``export_feedback(settings, ledger, out_dir)`` writes::

    out_dir/images/<SOP Instance UID>.dcm   the analysed source instances, de-identified
                                            (:mod:`.deidentify`) or exact copies (spool)
    out_dir/labels.csv                      sop_instance_uid, frame_number,
                                            study_instance_uid, label, site, calling_ae,
                                            verdict, model_label, patient, box, kind
    out_dir/deidentification.json           how the images were de-identified (when they were)

``labels.csv`` is the format ``models/data/dicom_dataset.py`` reads: one row per image the
model read (a frame of a multi-frame image is one, with its ``frame_number``; empty for a
single-frame image; the file is copied once), the label the radiologist stood by (confirm:
the model's label; override: the corrected one; an amended verdict's, the amendment's);
``site`` numbers the calling AE titles in sorted order (``calling_ae``: who sent the
generation the model read, a study another AE sent again that AE's); ``patient`` is the
patient's pseudonym, the same in every export made with the node's key, so that a training split can
keep each patient's images on one side; ``box`` holds the lesion boxes the radiologist
marked on that image with the verdict, each ``x0 y0 x1 y1`` in its pixels, several separated
by ``; `` (empty when none), which training turns into a lesion mask for the heatmap;
``kind`` is ``sample`` for a quality-control sample of the studies the model was sure of
(their images, taken by a hash of the study's UID, are an unbiased test set of what the PACS
receives unreviewed) and ``flagged`` for a study the model asked about.
De-identified, the UIDs are the replaced ones (the file names too) and ``calling_ae`` is
empty (it names a device of the hospital). A cell that a spreadsheet would open as a formula
(beginning with ``=``, ``+``, ``-``, ``@``, a tab, a carriage return, a line feed, a NUL or a
full-width ``＝ ＋ － ＠ ー``: an AE title a remote device chose, a model's label) is written
after a single quote, which the training reader
takes off again (:mod:`acwi_node.csv_cells`). Escalated cases without a final verdict are left
out. Running it again into the same folder rewrites the CSV and adds new images; a folder
holds either de-identified images or exact copies, never both.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from acwi_node.config import Settings
from acwi_node.csv_cells import neutralise
from acwi_node.inference.types import unit_name
from acwi_node.ingest.spool import Spool, is_safe_uid
from acwi_node.ledger import Ledger
from acwi_node.review.auth import load_secret_key
from acwi_node.review.deidentify import (
    CLEAN_PIXEL_DATA_OPTION,
    MODIFIED_DATES_OPTION,
    PROFILE_EDITION,
    DeidentificationRefused,
    Deidentifier,
    method_description,
)
from acwi_node.review.store import ReviewStore

log = logging.getLogger("acwi_node.review")

#: The reviewed cases whose images' spool paths are looked up together (one query).
_PATHS_BATCH = 500

#: Beside the images of a de-identified export: how they were de-identified.
METHOD_FILE = "deidentification.json"

COLUMNS = (
    "sop_instance_uid",
    "frame_number",
    "study_instance_uid",
    "label",
    "site",
    "calling_ae",
    "verdict",
    "model_label",
    "patient",
    "box",
    "kind",
)


class ExportError(ValueError):
    """The export cannot be written into that folder (the reason says why)."""


@dataclass(frozen=True)
class ExportReport:
    cases: int
    images: int
    #: Images whose file was gone (storage retention) or unreadable.
    missing: int
    deidentified: bool = False
    #: Images not exported because de-identification could not make them safe.
    withheld: int = 0
    #: Exported images whose burned-in regions were blanked (``[[feedback.burned_in]]``).
    cleaned: int = 0


@dataclass
class _Copied:
    """One instance in the export: its UIDs there (replaced when de-identified), its
    patient's pseudonym; ``ok`` False when it is not there."""

    ok: bool
    sop: str = ""
    study: str = ""
    patient: str = ""
    withheld: bool = False
    #: Its burned-in regions were blanked (the Clean Pixel Data Option).
    cleaned: bool = False


def export_feedback(
    settings: Settings, ledger: Ledger, out_dir: Path, *, deidentify: bool | None = None
) -> ExportReport:
    """Write the reviewed cases into ``out_dir`` (created if needed), de-identified unless
    ``deidentify`` is False (None: ``feedback.deidentify``)."""
    if deidentify is None:
        deidentify = settings.feedback.deidentify
    out_dir = Path(out_dir)
    _check_folder(out_dir, deidentify)
    key = load_secret_key(settings.feedback_key_file, "the de-identification key")
    deidentifier = Deidentifier(
        key,
        retain_patient_characteristics=settings.feedback.retain_patient_characteristics,
        shift_dates=settings.feedback.shift_dates,
        burned_in=settings.feedback.burned_in,
    )
    store = ReviewStore(ledger)
    cases = store.reviewed_cases()
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    if deidentify:
        _write_method(out_dir, settings)
    spool = Spool(settings.spool_dir, fsync=False)
    sites = {ae: n for n, ae in enumerate(sorted({c["calling_ae"] for c in cases}))}
    rows: list[dict[str, str]] = []
    missing = withheld = 0
    cleaned: set[str] = set()  # exported images (their new UIDs) with regions blanked
    paths: dict[tuple[str, str], str] = {}
    for n, case in enumerate(cases):
        if n % _PATHS_BATCH == 0:  # the spool paths of the next cases' images
            batch = cases[n : n + _PATHS_BATCH]
            paths = store.instance_paths({c["study_uid"] for c in batch})
        copied: dict[str, _Copied] = {}  # by SOP Instance UID
        for sop, frame in case["images"]:
            if sop not in copied:
                copied[sop] = _export_instance(
                    spool,
                    paths.get((case["study_uid"], sop)),
                    case["study_uid"],
                    sop,
                    images_dir,
                    deidentifier,
                    deidentify=deidentify,
                )
            done = copied[sop]
            if done.cleaned:
                cleaned.add(done.sop)
            if not done.ok:
                if done.withheld:
                    withheld += 1
                else:
                    missing += 1
                continue
            rows.append(
                {
                    "sop_instance_uid": done.sop,
                    "frame_number": "" if frame is None else str(frame),
                    "study_instance_uid": done.study,
                    "label": case["label"],
                    "site": str(sites[case["calling_ae"]]),
                    "calling_ae": "" if deidentify else case["calling_ae"],
                    "verdict": case["action"],
                    "model_label": case["model_label"],
                    "patient": done.patient,
                    # each box "x0 y0 x1 y1", several separated by "; "
                    "box": "; ".join(
                        " ".join(str(v) for v in box)
                        for box in case["boxes"].get(unit_name(sop, frame), [])
                    ),
                    "kind": case["kind"],
                }
            )
    tmp_csv = out_dir / "labels.csv.tmp"
    with tmp_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        # a spreadsheet opens no cell as a formula (a calling AE title, a model's label);
        # the training reader takes the quote off again (acwi_node.csv_cells)
        writer.writerows({k: neutralise(v) for k, v in row.items()} for row in rows)
    os.replace(tmp_csv, out_dir / "labels.csv")
    return ExportReport(
        cases=len(cases),
        images=len(rows),
        missing=missing,
        deidentified=deidentify,
        withheld=withheld,
        cleaned=len(cleaned),
    )


def _check_folder(out_dir: Path, deidentify: bool) -> None:
    """One folder, one kind of export: de-identified images never beside exact copies."""
    if not (out_dir / "labels.csv").exists():
        return
    was_deidentified = (out_dir / METHOD_FILE).exists()
    if was_deidentified and not deidentify:
        raise ExportError(
            f"{out_dir} holds a de-identified export: export the identified images into"
            " another folder"
        )
    if deidentify and not was_deidentified:
        raise ExportError(
            f"{out_dir} holds an export with identifiers (no {METHOD_FILE}): export the"
            " de-identified images into another folder"
        )


def _write_method(out_dir: Path, settings: Settings) -> None:
    option = settings.feedback.retain_patient_characteristics
    shift = settings.feedback.shift_dates
    options = ["Retain Patient Characteristics Option"] if option else []
    if shift:
        options.append(MODIFIED_DATES_OPTION)
    burned_in = settings.feedback.burned_in
    if burned_in:
        options.append(CLEAN_PIXEL_DATA_OPTION)
    method = {
        "method": method_description(option, shift, bool(burned_in)),
        "profile": "DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile",
        "table_edition": PROFILE_EDITION,
        "options": options,
        "dates": "shifted back 365-3649 days per patient (HMAC-SHA256 with the node's key)"
        if shift
        else "removed or replaced by dummies (birth date emptied)",
        "uids": "replaced: 2.25. and an HMAC-SHA256 of the original with the node's key",
        "patients": "pseudonyms: ANON- and an HMAC-SHA256 of issuer and patient ID",
        "pixel_data": (
            "the configured regions blanked in the images of the configured kinds (Burned In"
            " Annotation NO after); other images with Burned In Annotation YES are not exported"
            if burned_in
            else "not cleaned; images with Burned In Annotation YES are not exported"
        ),
        "burned_in": [sig.model_dump(exclude_defaults=True) for sig in burned_in],
    }
    tmp = out_dir / (METHOD_FILE + ".tmp")
    tmp.write_text(json.dumps(method, indent=2) + "\n")
    os.replace(tmp, out_dir / METHOD_FILE)


def _export_instance(
    spool: Spool,
    rel: str | None,
    study_uid: str,
    sop: str,
    images_dir: Path,
    deidentifier: Deidentifier,
    *,
    deidentify: bool,
) -> _Copied:
    """Write one analysed instance from the spool into ``images_dir``, de-identified or an
    exact copy; not ``ok`` when it is gone, unreadable, or refused by de-identification (or
    its UID could name a path). ``rel``: its spool path, as the ledger has it (None: not
    there). ``deidentifier`` gives the patient's pseudonym either way."""
    if not is_safe_uid(sop):
        return _Copied(False)
    source = spool.resolve(rel) if rel else None
    if source is None or not source.is_file():
        return _Copied(False)
    try:
        ds = pydicom.dcmread(source, force=True, stop_before_pixels=not deidentify)
        patient = deidentifier.pseudonym(
            str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")
        )
    except (InvalidDicomError, OSError, ValueError) as exc:
        log.warning("feedback export: an instance of a reviewed case is unreadable: %s", exc)
        return _Copied(False)
    except Exception as exc:  # noqa: BLE001 - a damaged file: counted, the export goes on
        log.warning(
            "feedback export: an instance of a reviewed case is unreadable: %s",
            type(exc).__name__,
        )
        return _Copied(False)
    if not deidentify:
        copy = images_dir / f"{sop}.dcm.tmp"
        shutil.copyfile(source, copy)
        os.replace(copy, images_dir / f"{sop}.dcm")
        return _Copied(True, sop, study_uid, patient)
    tmp: Path | None = None
    try:
        deidentifier.apply(ds)
        new_sop = str(ds.SOPInstanceUID)
        tmp = images_dir / f"{new_sop}.dcm.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, images_dir / f"{new_sop}.dcm")
    except DeidentificationRefused as exc:
        log.warning("feedback export: an image of a reviewed case is withheld: %s", exc)
        return _Copied(False, withheld=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file: counted, the export goes on
        log.warning(
            "feedback export: an instance of a reviewed case could not be de-identified: %s",
            type(exc).__name__,
        )
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return _Copied(False)
    cleaned = str(ds.get("BurnedInAnnotation", "")) == "NO" and any(
        item.get("CodeValue") == "113101"
        for item in ds.get("DeidentificationMethodCodeSequence", [])
    )
    return _Copied(True, new_sop, str(ds.StudyInstanceUID), patient, cleaned=cleaned)
