"""The feedback export's labels.csv in a spreadsheet: no cell opens as a formula ("CSV
injection"), and the training reader still reads every value exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from acwi_node.config import load_settings
from acwi_node.csv_cells import FORMULA_STARTS, neutralise, restore
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.review.feedback import export_feedback
from acwi_node.review.store import ReviewStore, SessionInfo
from models.data.dicom_dataset import read_boxes, read_labels_csv, scan_folder
from tests.support.dx import make_dx
from tests.support.review_case import flagged_case

#: An AE title a remote device may choose (16 characters at most), and model labels a
#: spreadsheet would take for formulas.
CALLING_AE = '=HYPERLINK("x")'
MODEL_LABEL = "-2+3"
CORRECTED = "@SUM(1+1)"


@pytest.mark.parametrize(
    "value",
    [
        '=HYPERLINK("http://x","y")',
        "+1",
        "-2+3",
        "@SUM(A1)",
        "\tcmd",
        "\rcmd",
        "'=already quoted",
        "''@twice",
        "'plain quote",
        "''",
        "normal",
        "",
        "0",
        "12 3 40 50",
        "1.2.840.10008.1",
        "a=b",
    ],
)
def test_every_value_comes_back_and_no_cell_opens_as_a_formula(value: str) -> None:
    cell = neutralise(value)
    assert cell[:1] not in FORMULA_STARTS
    assert restore(cell) == value
    if value[:1] not in FORMULA_STARTS and not value.startswith("'"):
        assert cell == value  # numbers, UIDs, boxes, plain labels: as they are


def test_the_export_neutralises_formulas_and_training_reads_them_back(tmp_path: Path) -> None:
    """A calling AE title and a model's labels that begin with ``=``, ``-`` or ``@`` opened
    as formulas where ``labels.csv`` was opened in a spreadsheet; they are written after a
    single quote now, and the training reader takes it off: the label it trains on is the
    radiologist's exactly. The numeric columns (site, frame number, box) are unchanged."""
    settings = load_settings(None, node={"data_dir": tmp_path / "data"}, ingest={"fsync": False})
    ledger = Ledger(settings.database_url)
    try:
        ds = make_dx("1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.2", 1)
        sop = str(ds.SOPInstanceUID)
        summary = {
            "model": {"name": "m", "version": "1"},
            "labels": [MODEL_LABEL, CORRECTED],
            "probabilities": {MODEL_LABEL: 0.6, CORRECTED: 0.4},
            "predicted_label": MODEL_LABEL,
            "needs_review": True,
            "images": [{"sop_instance_uid": sop}],
        }
        item = flagged_case(settings, ledger, ds, summary, calling_ae=CALLING_AE)
        store = ReviewStore(ledger)
        user = store.add_user("jane", "x", "radiologist")
        jane = SessionInfo(user.id, user.name, user.role, "", utcnow())
        store.claim_verdict(
            item, user=jane, action="override", label=CORRECTED, model_label=MODEL_LABEL,
            reason="r", boxes={sop: [[2, 3, 40, 50]]},
        )  # fmt: skip

        out = tmp_path / "feedback"
        assert export_feedback(settings, ledger, out, deidentify=False).images == 1
        with (out / "labels.csv").open(newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        assert row["calling_ae"] == "'" + CALLING_AE
        assert (row["label"], row["model_label"]) == ("'" + CORRECTED, "'" + MODEL_LABEL)
        assert all(cell[:1] not in FORMULA_STARTS for cell in row.values()), row
        assert (row["site"], row["frame_number"], row["box"]) == ("0", "", "2 3 40 50")
        assert (row["sop_instance_uid"], row["verdict"]) == (sop, "override")

        by_sop, _by_study = read_labels_csv(out / "labels.csv", [MODEL_LABEL, CORRECTED])
        assert by_sop[sop].label == CORRECTED and by_sop[sop].site == 0
        (image,) = scan_folder(out)
        assert (image.sop_instance_uid, image.label) == (sop, CORRECTED)
        assert read_boxes(out, [image]) == {sop: ((2, 3, 40, 50),)}
        assert restore(row["calling_ae"]) == CALLING_AE
    finally:
        ledger.dispose()
