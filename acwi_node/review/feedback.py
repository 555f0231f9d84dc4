"""Reviewed cases as a labelled dataset, for fine-tuning with ``acwi-models train``.

``export_feedback(settings, ledger, out_dir)`` writes::

    out_dir/images/<SOP Instance UID>.dcm   copies of the analysed source instances (spool)
    out_dir/labels.csv                      sop_instance_uid, frame_number,
                                            study_instance_uid, label, site, calling_ae,
                                            verdict, model_label

``labels.csv`` is the format ``models/data/dicom_dataset.py`` reads: one row per image the
model read (a frame of a multi-frame image is one, with its ``frame_number``; empty for a
single-frame image; the file is copied once), the label the radiologist stood by (confirm:
the model's label; override: the corrected one);
``site`` numbers the calling AE titles in sorted order. Escalated cases without a final verdict
are left out. Running it again into the same folder rewrites the CSV and adds new images.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from acwi_node.config import Settings
from acwi_node.ingest.spool import Spool, is_safe_uid
from acwi_node.ledger import Ledger
from acwi_node.review.store import ReviewStore

COLUMNS = (
    "sop_instance_uid",
    "frame_number",
    "study_instance_uid",
    "label",
    "site",
    "calling_ae",
    "verdict",
    "model_label",
)


@dataclass(frozen=True)
class ExportReport:
    cases: int
    images: int
    missing: int


def export_feedback(settings: Settings, ledger: Ledger, out_dir: Path) -> ExportReport:
    """Write the reviewed cases into ``out_dir`` (created if needed)."""
    store = ReviewStore(ledger)
    cases = store.reviewed_cases()
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    spool = Spool(settings.spool_dir, fsync=False)
    sites = {ae: n for n, ae in enumerate(sorted({c["calling_ae"] for c in cases}))}
    rows: list[dict[str, str]] = []
    missing = 0
    for case in cases:
        copied: dict[str, bool] = {}  # by SOP Instance UID: whether its file is there
        for sop, frame in case["images"]:
            if sop not in copied:
                copied[sop] = _copy_instance(spool, store, case["study_uid"], sop, images_dir)
            if not copied[sop]:
                missing += 1
                continue
            rows.append(
                {
                    "sop_instance_uid": sop,
                    "frame_number": "" if frame is None else str(frame),
                    "study_instance_uid": case["study_uid"],
                    "label": case["label"],
                    "site": str(sites[case["calling_ae"]]),
                    "calling_ae": case["calling_ae"],
                    "verdict": case["action"],
                    "model_label": case["model_label"],
                }
            )
    tmp_csv = out_dir / "labels.csv.tmp"
    with tmp_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_csv, out_dir / "labels.csv")
    return ExportReport(cases=len(cases), images=len(rows), missing=missing)


def _copy_instance(
    spool: Spool, store: ReviewStore, study_uid: str, sop: str, images_dir: Path
) -> bool:
    """Copy one analysed instance from the spool into ``images_dir``; False when it is gone
    (or its UID could name a path)."""
    if not is_safe_uid(sop):
        return False
    rel = store.instance_path(study_uid, sop)
    source = spool.resolve(rel) if rel else None
    if source is None or not source.is_file():
        return False
    target = images_dir / f"{sop}.dcm"
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return True
