"""Reading a DICOM folder's labels.csv: byte order marks, repeated rows, rows missing, bad cells."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest

from models.data.dicom_dataset import read_boxes, read_labels_csv, scan_folder
from models.data.synth import write_dataset


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write(
    root: Path, rows: list[dict[str, str]], fields: list[str], encoding: str = "utf-8"
) -> None:
    with (root / "labels.csv").open("w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six single-image studies at 64 x 64, their labels.csv as written (tests copy it)."""
    root = tmp_path_factory.mktemp("csv") / "data"
    write_dataset(root, 6, seed=3, size=64, class_fractions={"normal": 0.5, "nodule": 0.5})
    return root


@pytest.fixture
def data(folder: Path, tmp_path: Path) -> Path:
    """A fresh copy of the folder (its labels.csv may be rewritten)."""
    return Path(shutil.copytree(folder, tmp_path / "data"))


@pytest.mark.parametrize(
    "fields",
    [
        ["sop_instance_uid", "label", "site", "box"],  # the BOM on the image's UID column
        ["box", "site", "sop_instance_uid", "label"],  # ... on the boxes
        ["site", "study_instance_uid", "sop_instance_uid", "label", "box"],  # ... on the site
    ],
)
def test_a_labels_csv_with_a_utf8_byte_order_mark_reads_as_without(
    data: Path, fields: list[str]
) -> None:
    """Excel's "CSV UTF-8" starts the file with a byte order mark: every column still counts."""
    for side_car in data.rglob("*.truth.json"):  # the boxes from labels.csv alone
        side_car.unlink()
    rows = _rows(data)
    _write(data, rows, fields)
    plain_items, plain_boxes = scan_folder(data), read_boxes(data, scan_folder(data))
    _write(data, rows, fields, encoding="utf-8-sig")
    assert (data / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    items = scan_folder(data)
    assert len(items) == 6 and items == plain_items
    assert all(item.site is not None for item in items)
    boxes = read_boxes(data, items)
    assert boxes == plain_boxes and len(boxes) == sum(r["label"] != "normal" for r in rows)


def test_repeated_rows_must_agree(data: Path) -> None:
    rows = _rows(data)
    fields = list(rows[0])
    _write(data, [*rows, rows[1]], fields)  # an identical repeat is harmless
    assert len(scan_folder(data)) == 6
    other = "normal" if rows[1]["label"] != "normal" else "nodule"
    _write(data, [*rows, {**rows[1], "label": other}], fields)  # line 8 contradicts line 3
    with pytest.raises(ValueError, match="lines 3 and 8 disagree") as refused:
        scan_folder(data)
    message = str(refused.value)
    assert rows[1]["sop_instance_uid"] in message
    assert repr(rows[1]["label"]) in message and repr(other) in message
    _write(data, [*rows, {**rows[2], "site": "3" if rows[2]["site"] != "3" else "2"}], fields)
    with pytest.raises(ValueError, match="lines 4 and 8 disagree"):
        read_labels_csv(data / "labels.csv")
    # per-study rows likewise
    studies = [{"study_instance_uid": r["study_instance_uid"], "label": r["label"]} for r in rows]
    changed = {**studies[0], "label": "effusion" if rows[0]["label"] != "effusion" else "normal"}
    _write(data, [*studies, changed], ["study_instance_uid", "label"])
    with pytest.raises(ValueError, match="lines 2 and 8 disagree on study"):
        scan_folder(data)


def test_repeated_rows_of_an_image_add_up_their_boxes(data: Path) -> None:
    rows = _rows(data)
    lesion = next(r for r in rows if r["box"])
    extra = {**lesion, "box": "1 2 3 4"}
    _write(data, [*rows, extra, lesion], list(rows[0]))
    boxes = read_boxes(data, scan_folder(data))
    first = tuple(int(v) for v in lesion["box"].split())
    assert boxes[lesion["sop_instance_uid"]] == (first, (1, 2, 3, 4))


def test_images_without_a_row_are_counted(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(data)
    _write(data, rows[:4], list(rows[0]))
    heard: list[str] = []
    assert len(scan_folder(data, log=heard.append)) == 4
    assert (
        len(heard) == 1 and "2 of 6 DICOM images" in heard[0] and "no row in labels.csv" in heard[0]
    )
    with caplog.at_level(logging.WARNING, logger="models.data.dicom_dataset"):
        scan_folder(data)
    assert "2 of 6 DICOM images" in caplog.text
    caplog.clear()
    _write(data, rows, list(rows[0]))
    with caplog.at_level(logging.WARNING, logger="models.data.dicom_dataset"):
        scan_folder(data)
    assert "no row" not in caplog.text


@pytest.mark.parametrize("column", ["site", "frame_number"])
def test_a_cell_that_is_not_an_integer_names_the_file_and_line(data: Path, column: str) -> None:
    rows = _rows(data)
    rows[2][column] = "site-A"
    _write(data, rows, [*list(rows[0]), *([column] if column not in rows[0] else [])])
    with pytest.raises(
        ValueError, match=f"labels.csv, line 4: {column} 'site-A' is not an integer"
    ):
        scan_folder(data)
    if column == "frame_number":  # the boxes' reader too
        with pytest.raises(ValueError, match="line 4: frame_number 'site-A'"):
            read_boxes(data, [])


LABELS = ["normal", "nodule", "effusion"]


@pytest.mark.parametrize("file_present", [True, False])
def test_a_label_outside_the_models_names_the_csv_line(data: Path, file_present: bool) -> None:
    """A mistyped label is the row's fault: the error names labels.csv's line, also for a row
    whose file is not in the folder (it would otherwise pass unnoticed)."""
    rows = _rows(data)
    typo = {**rows[3], "label": "nodlue"}
    if not file_present:
        typo["sop_instance_uid"] += ".9"
        typo["study_instance_uid"] += ".9"
    _write(data, [*rows[:3], typo, *rows[4:]] if file_present else [*rows, typo], list(rows[0]))
    line = 5 if file_present else 8
    with pytest.raises(ValueError, match=f"labels.csv, line {line}: label 'nodlue' is not one of"):
        scan_folder(data, labels=LABELS)
    assert len(scan_folder(data)) == 6  # without labels to check against, nothing is refused


def test_rows_naming_no_dicom_file_are_reported_by_line(data: Path) -> None:
    rows = _rows(data)
    missing = {**rows[0], "sop_instance_uid": "1.2.3.4", "study_instance_uid": "1.2.3"}
    study_only = {**rows[1], "sop_instance_uid": "", "study_instance_uid": "1.2.3.5"}
    _write(data, [*rows, rows[2], missing, study_only], list(rows[0]))
    heard: list[str] = []
    assert len(scan_folder(data, labels=LABELS, log=heard.append)) == 6
    assert len(heard) == 1
    assert "2 of 8 images and studies in labels.csv have no DICOM file" in heard[0]
    assert "lines 9, 10" in heard[0] and "1.2.3" not in heard[0]  # lines, not UIDs
    heard.clear()
    _write(data, rows, list(rows[0]))
    scan_folder(data, labels=LABELS, log=heard.append)
    assert heard == []
