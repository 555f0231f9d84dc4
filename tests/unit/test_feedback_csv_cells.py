"""The feedback export's labels.csv in a spreadsheet: no cell opens as a formula ("CSV
injection"), and the training reader still reads every value exactly."""

from __future__ import annotations

import csv
import io
import itertools
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

#: The full-width forms a spreadsheet in an East Asian locale reads as ``= + - @``.
FULL_WIDTH = ("\uff1d", "\uff0b", "\uff0d", "\uff20", "\u30fc")
#: What a cell must not begin with: OWASP's CSV Injection list (= + - @, tab, carriage
#: return, line feed), ASVS 5.0's NUL and the full-width forms.
OPENS_AS_FORMULA = frozenset("=+-@\t\r\n\x00" + "".join(FULL_WIDTH))


@pytest.mark.parametrize(
    "value",
    [
        '=HYPERLINK("http://x","y")',
        "+1",
        "-2+3",
        "@SUM(A1)",
        "\tcmd",
        "\rcmd",
        "\ncmd",
        "\n=cmd",
        "\r\n+1",
        "\t@SUM(A1)",
        "\x00=1",
        '\uff1dHYPERLINK("http://x","y")',
        "\uff0b1",
        "\uff0d2+3",
        "\uff20SUM(A1)",
        "\u30fc1",
        "'\uff1dalready quoted",
        "\n",
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
    assert cell[:1] not in OPENS_AS_FORMULA
    assert restore(cell) == value
    if value[:1] not in OPENS_AS_FORMULA and not value.startswith("'"):
        assert cell == value  # numbers, UIDs, boxes, plain labels: as they are


def test_the_formula_starts_are_owasps_and_their_full_width_forms() -> None:
    """OWASP's CSV Injection list (= + - @, tab, carriage return, line feed), ASVS 5.0's NUL,
    and the full-width forms an East Asian locale's spreadsheet reads as = + - @."""
    assert OPENS_AS_FORMULA <= FORMULA_STARTS


def test_every_short_string_comes_back_through_a_csv_file() -> None:
    """Every string of up to four characters over quotes, formula starts, whitespace and
    plain characters: written by the csv module after :func:`neutralise`, it opens as no
    formula, and read back and :func:`restore`d it is the value exactly."""
    alphabet = ["'", "=", "-", "\n", "\r", "\t", "\x00", " ", "a", "1", ",", '"', *FULL_WIDTH]
    values = ["".join(chars) for n in range(5) for chars in itertools.product(alphabet, repeat=n)]
    out = io.StringIO(newline="")
    csv.writer(out).writerows([neutralise(v)] for v in values)
    cells = [row[0] if row else "" for row in csv.reader(io.StringIO(out.getvalue(), newline=""))]
    assert len(cells) == len(values)
    for value, cell in zip(values, cells, strict=True):
        assert cell[:1] not in OPENS_AS_FORMULA, repr(value)
        assert restore(cell) == value, repr(value)


@pytest.mark.parametrize(
    ("model_label", "corrected"),
    [(MODEL_LABEL, CORRECTED), ("\uff0d2+3", "\uff1dSUM(1+1)"), ("\uff20A1", "\uff0b1")],
)
def test_the_export_neutralises_formulas_and_training_reads_them_back(
    tmp_path: Path, model_label: str, corrected: str
) -> None:
    """A calling AE title and a model's labels that begin with ``=``, ``-`` or ``@`` (or
    their full-width forms) opened as formulas where ``labels.csv`` was opened in a
    spreadsheet; they are written after a single quote now, and the training reader takes it
    off: the label it trains on is the radiologist's exactly. The numeric columns (site,
    frame number, box) are unchanged."""
    settings = load_settings(None, node={"data_dir": tmp_path / "data"}, ingest={"fsync": False})
    ledger = Ledger(settings.database_url)
    try:
        ds = make_dx("1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.2", 1)
        sop = str(ds.SOPInstanceUID)
        summary = {
            "model": {"name": "m", "version": "1"},
            "labels": [model_label, corrected],
            "probabilities": {model_label: 0.6, corrected: 0.4},
            "predicted_label": model_label,
            "needs_review": True,
            "images": [{"sop_instance_uid": sop}],
        }
        item = flagged_case(settings, ledger, ds, summary, calling_ae=CALLING_AE)
        store = ReviewStore(ledger)
        user = store.add_user("jane", "x", "radiologist")
        jane = SessionInfo(user.id, user.name, user.role, "", utcnow())
        store.claim_verdict(
            item, user=jane, action="override", label=corrected, model_label=model_label,
            reason="r", boxes={sop: [[2, 3, 40, 50]]},
        )  # fmt: skip

        out = tmp_path / "feedback"
        assert export_feedback(settings, ledger, out, deidentify=False).images == 1
        with (out / "labels.csv").open(newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        assert row["calling_ae"] == "'" + CALLING_AE
        assert (row["label"], row["model_label"]) == ("'" + corrected, "'" + model_label)
        assert all(cell[:1] not in OPENS_AS_FORMULA for cell in row.values()), row
        assert (row["site"], row["frame_number"], row["box"]) == ("0", "", "2 3 40 50")
        assert (row["sop_instance_uid"], row["verdict"]) == (sop, "override")

        by_sop, _by_study = read_labels_csv(out / "labels.csv", [model_label, corrected])
        assert by_sop[sop].label == corrected and by_sop[sop].site == 0
        (image,) = scan_folder(out)
        assert (image.sop_instance_uid, image.label) == (sop, corrected)
        assert read_boxes(out, [image]) == {sop: ((2, 3, 40, 50),)}
        assert restore(row["calling_ae"]) == CALLING_AE
    finally:
        ledger.dispose()
