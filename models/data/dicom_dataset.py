"""A folder of DICOM files with a labels CSV, read through the node's own preprocessing.

The CSV needs a ``label`` column and at least one of ``sop_instance_uid`` (per image) or
``study_instance_uid`` (every image of the study); an optional ``site`` column is kept.
A per-image row wins over a per-study row; rows repeating an image or study must agree.
Files that are not DICOM are ignored, DICOM images without a row are left out (and counted),
rows naming no DICOM file are reported by line;
images the preprocessing refuses are reported, not loaded. The CSV may carry a UTF-8 byte
order mark. A cell the node's feedback export wrote after a single quote, so that a
spreadsheet does not open it as a formula (one beginning with ``=``, ``+``, ``-``, ``@``, a tab,
a carriage return, a line feed, a NUL or a full-width ``＝ ＋ － ＠ ー``, see
:data:`acwi_node.csv_cells.FORMULA_STARTS`), reads without that quote
(:func:`acwi_node.csv_cells.restore`).

A multi-frame image (Enhanced CT or MR, tomosynthesis) is one labelled image per frame, as
the node analyses it. An optional ``frame_number`` column labels one frame; a row without
one labels every frame of its instance (a frame's own row wins).

An optional ``box`` column, or the synthetic set's ``<file>.truth.json`` side-cars, give
lesion boxes: one or several per image, each ``"x0 y0 x1 y1"`` in the image's pixels
(inclusive), several separated by ``;`` (``"32 64 63 95; 140 30 170 60"``, see
:func:`parse_boxes`). The evaluation scores the heatmaps against them and training fills them
all into the image's lesion mask for the heatmap (see :func:`lesion_masks`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError
from torch.utils.data import Dataset as TorchDataset

from acwi_node.csv_cells import restore
from acwi_node.dicom_frames import frame_count
from acwi_node.inference.preprocess import (
    PreprocessSpec,
    UnsupportedImage,
    normalise,
    resize,
    to_unit_range,
)
from acwi_node.inference.types import unit_name

LABELS_CSV = "labels.csv"
_logger = logging.getLogger(__name__)
#: A lesion box ``(x0, y0, x1, y1)`` in pixels (columns, rows), inclusive.
Box = tuple[int, int, int, int]
#: An image's lesion boxes (empty: none).
Boxes = tuple[Box, ...]


@dataclass(frozen=True)
class LabelledImage:
    """One labelled DICOM file."""

    path: Path
    study_instance_uid: str
    sop_instance_uid: str
    label: str
    site: int | None
    #: The frame (1-based) of a multi-frame image; None for a single-frame image.
    frame_number: int | None = None
    #: The patient (a pseudonym: ``labels.csv``'s optional ``patient`` column), "" if unknown.
    patient: str = ""

    @property
    def name(self) -> str:
        """The image as the analyser's results name it (``"<uid> frame <n>"`` for a frame)."""
        return unit_name(self.sop_instance_uid, self.frame_number)


@dataclass(frozen=True)
class _Row:
    label: str
    site: int | None
    patient: str = ""


def _cells(line: Mapping[str, str | None]) -> dict[str, str | None]:
    """A CSV row's cells as they were before the feedback export's spreadsheet quoting
    (:func:`acwi_node.csv_cells.restore`); a short row's missing cells stay None."""
    return {k: restore(v) if isinstance(v, str) else v for k, v in line.items()}


def _int_cell(line: Mapping[str, str | None], column: str, where: str) -> int | None:
    """An integer cell (None when empty); ``where`` names the file and line in the error."""
    text = (line.get(column) or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{where}: {column} {text!r} is not an integer") from None


def _describe(row: _Row) -> str:
    site = "" if row.site is None else f", site {row.site}"
    patient = f", patient {row.patient!r}" if row.patient else ""
    return f"label {row.label!r}{site}{patient}"


def read_labels_csv(
    path: Path,
    labels: Sequence[str] | None = None,
    *,
    lines: dict[tuple[str, str], int] | None = None,
) -> tuple[dict[str, _Row], dict[str, _Row]]:
    """Rows keyed by image (SOP Instance UID, ``"<uid> frame <n>"`` for a row with a frame
    number) and by Study Instance UID.

    The file may start with a UTF-8 byte order mark (Excel's "CSV UTF-8"). Several rows for
    one image (or study) must agree on label, site and patient: identical repeats are kept
    once, differing ones raise ValueError naming both lines. A ``site`` or ``frame_number``
    that is not an integer, or (with ``labels`` given) a label outside ``labels``, raises
    ValueError naming the file and line, whether or not the row's file is in the folder.
    ``lines``, when given, is filled with each key's first line: ``("image", key)`` and
    ``("study", uid)``.
    """
    by_sop: dict[str, _Row] = {}
    by_study: dict[str, _Row] = {}
    first_line: dict[tuple[str, str], int] = {} if lines is None else lines
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        if "label" not in fields or not fields & {"sop_instance_uid", "study_instance_uid"}:
            raise ValueError(
                f"{path}: needs a 'label' column and 'sop_instance_uid' or 'study_instance_uid'"
                f" (found {sorted(fields)})"
            )
        for cells in reader:
            line = _cells(cells)
            where = f"{path}, line {reader.line_num}"
            row = _Row(
                (line.get("label") or "").strip(),
                _int_cell(line, "site", where),
                (line.get("patient") or "").strip(),
            )
            sop = (line.get("sop_instance_uid") or "").strip()
            study = (line.get("study_instance_uid") or "").strip()
            if sop:
                kind, table = "image", by_sop
                key = unit_name(sop, _int_cell(line, "frame_number", where))
            elif study:
                kind, table, key = "study", by_study, study
            else:
                continue
            if labels is not None and row.label not in labels:
                raise ValueError(f"{where}: label {row.label!r} is not one of {list(labels)}")
            earlier = table.get(key)
            if earlier is None:
                table[key] = row
                first_line[kind, key] = reader.line_num
            elif earlier != row:
                raise ValueError(
                    f"{path}: lines {first_line[kind, key]} and {reader.line_num} disagree on"
                    f" {kind} {key!r}: {_describe(earlier)} against {_describe(row)}"
                )
    return by_sop, by_study


def scan_folder(
    root: Path,
    labels_csv: Path | None = None,
    labels: Sequence[str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[LabelledImage]:
    """Labelled DICOM files under ``root`` (sorted by path).

    ``labels_csv`` defaults to ``root/labels.csv``. With ``labels`` given, a label outside it
    is an error naming the CSV line. DICOM images (files, or frames of a multi-frame file)
    without a row are left out, and how many is reported through ``log`` (default: a logging
    warning), as are the CSV lines whose image or study no DICOM file under ``root`` holds.
    """
    root = Path(root)
    csv_path = labels_csv or root / LABELS_CSV
    lines: dict[tuple[str, str], int] = {}
    by_sop, by_study = read_labels_csv(csv_path, labels, lines=lines)
    items: list[LabelledImage] = []
    unlabelled: list[str] = []
    found: set[tuple[str, str]] = set()  # the rows' keys some DICOM file answers
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() in (".csv", ".json"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        study = str(ds.get("StudyInstanceUID", ""))
        frames = frame_count(ds)
        found.update({("image", sop), ("study", study)})
        for frame in [None] if frames == 1 else range(1, frames + 1):
            found.add(("image", unit_name(sop, frame)))
            row = by_sop.get(unit_name(sop, frame)) or by_sop.get(sop) or by_study.get(study)
            if row is None:
                unlabelled.append(unit_name(str(path.relative_to(root)), frame))
                continue
            items.append(LabelledImage(path, study, sop, row.label, row.site, frame, row.patient))
    if unlabelled:
        (log or _logger.warning)(
            f"{len(unlabelled)} of {len(unlabelled) + len(items)} DICOM images under {root} have"
            f" no row in {Path(csv_path).name} and are left out (first: {unlabelled[0]})"
        )
    orphans = sorted(line for key, line in lines.items() if key not in found)
    if orphans:
        (log or _logger.warning)(
            f"{len(orphans)} of {len(lines)} images and studies in {Path(csv_path).name} have no"
            f" DICOM file under {root} (a missing file or a mistyped UID), lines"
            f" {', '.join(map(str, orphans[:10]))}{' ...' if len(orphans) > 10 else ''}"
        )
    return items


def load_unit_images(
    items: Sequence[LabelledImage], spec: PreprocessSpec
) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Unit-range images ``(N, size, size)``, the indices of ``items`` they came from, and
    the refused files with their reasons."""
    images: list[np.ndarray] = []
    kept: list[int] = []
    refused: dict[str, str] = {}
    for i, item in enumerate(items):
        try:
            images.append(to_unit_range(pydicom.dcmread(item.path), spec, item.frame_number))
            kept.append(i)
        except UnsupportedImage as exc:
            refused[unit_name(str(item.path), item.frame_number)] = str(exc)
    stack = np.stack(images) if images else np.zeros((0, spec.size, spec.size), np.float32)
    return stack.astype(np.float32), kept, refused


class DicomFolderDataset(TorchDataset[tuple[torch.Tensor, int]]):
    """Lazily preprocessed ``(input, label index)`` pairs for a labelled folder."""

    def __init__(
        self, items: Sequence[LabelledImage], spec: PreprocessSpec, labels: Sequence[str]
    ) -> None:
        self.items = list(items)
        self.spec = spec
        self.index = {name: i for i, name in enumerate(labels)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        unit = to_unit_range(pydicom.dcmread(item.path), self.spec, item.frame_number)
        return torch.from_numpy(normalise(unit, self.spec)), self.index[item.label]


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean ``rows x cols`` mask of an inclusive ``(x0, y0, x1, y1)`` box (clipped)."""
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = True
    return mask


def boxes_mask(shape: tuple[int, int], boxes: Boxes) -> np.ndarray:
    """Boolean ``rows x cols`` mask of the union of ``boxes`` (all False without one)."""
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask |= box_mask(shape, box)
    return mask


def _box(values: Sequence[object], source: str) -> Box:
    """A box from four numbers (floats truncated to int), checked; ``source`` names the input
    in the error."""
    if len(values) != 4:
        raise ValueError(f"{source}: a box is 4 numbers x0 y0 x1 y1, got {len(values)}")
    numbers: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{source}: {value!r} is not a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{source}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{source}: {value!r} is not a finite number")
        numbers.append(int(number))
    x0, y0, x1, y1 = numbers
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{source}: a box needs x0 <= x1 and y0 <= y1")
    return (x0, y0, x1, y1)


def parse_boxes(text: str | None) -> Boxes:
    """Lesion boxes from a ``box`` cell: ``"x0 y0 x1 y1"``, several separated by ``;``
    (``"32 64 63 95; 10 10 20 20"``, a trailing ``;`` tolerated); ``()`` for an empty cell.

    Numbers may be written as floats (truncated to int). Raises ValueError, quoting ``text``,
    for a part that is not four numbers or a box with ``x1 < x0`` or ``y1 < y0``.
    """
    if text is None or not text.strip():
        return ()
    parts = text.split(";")
    if not parts[-1].strip():
        parts.pop()
    source = f"box {text!r}"
    boxes: list[Box] = []
    for part in parts:
        if not part.strip():
            raise ValueError(f"{source}: an empty box between ';'")
        boxes.append(_box(part.split(), source))
    return tuple(boxes)


def _side_car_boxes(truth: dict[str, object], source: str) -> Boxes:
    """A side-car's (or a side-car frame's) ``"box"`` and ``"boxes"``, checked."""
    boxes: list[Box] = []
    one = truth.get("box")
    if one:
        if not isinstance(one, list):
            raise ValueError(f"{source}: 'box' must be a list [x0, y0, x1, y1], not {one!r}")
        boxes.append(_box(one, f"{source}: box {one!r}"))
    several = truth.get("boxes")
    if several:
        if not isinstance(several, list):
            raise ValueError(f"{source}: 'boxes' must be a list of [x0, y0, x1, y1]")
        for values in several:
            if not isinstance(values, list):
                raise ValueError(f"{source}: 'boxes' entry {values!r} is not [x0, y0, x1, y1]")
            box = _box(values, f"{source}: box {values!r}")
            if box not in boxes:
                boxes.append(box)
    return tuple(boxes)


def read_boxes(root: Path, items: Sequence[LabelledImage]) -> dict[str, Boxes]:
    """Lesion boxes by image (:attr:`LabelledImage.name`: the SOP Instance UID, with the frame
    number for a frame), each image's non-empty, from ``labels.csv``'s ``box`` column (see
    :func:`parse_boxes`), else side-cars (``"box": [x0, y0, x1, y1]`` and/or ``"boxes": [[...],
    ...]``; a multi-frame image's lists its frames', each with its own).

    Several rows for one image add their boxes up. A malformed box raises ValueError naming
    the CSV line and SOP Instance UID, or the side-car.
    """
    boxes: dict[str, Boxes] = {}
    csv_path = Path(root) / LABELS_CSV
    if csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            for cells in reader:
                row = _cells(cells)
                sop = (row.get("sop_instance_uid") or "").strip()
                where = f"{csv_path}, line {reader.line_num}"
                try:
                    found = parse_boxes(row.get("box"))
                except ValueError as exc:
                    raise ValueError(f"{where} (sop_instance_uid {sop!r}): {exc}") from None
                if found and sop:
                    key = unit_name(sop, _int_cell(row, "frame_number", where))
                    earlier = boxes.get(key, ())
                    boxes[key] = earlier + tuple(box for box in found if box not in earlier)
    for item in items:
        if item.name in boxes:
            continue
        side_car = item.path.with_suffix(".truth.json")
        if side_car.is_file():
            truth = json.loads(side_car.read_text())
            source = str(side_car)
            if item.frame_number is not None:  # a multi-frame image: its frames' truths
                frames = {f.get("frame_number"): f for f in truth.get("frames") or []}
                truth = frames.get(item.frame_number) or {}
                source = f"{side_car}, frame {item.frame_number}"
            found = _side_car_boxes(truth, source)
            if found:
                boxes[item.name] = found
    return boxes


def lesion_masks(
    items: Sequence[LabelledImage], boxes: dict[str, Boxes], spec: PreprocessSpec
) -> np.ndarray:
    """Lesion masks ``(N, size, size)`` in {0, 1} at the model's input, one per item: the union
    of its boxes filled in the image's own Rows x Columns and resized as the preprocessing
    resizes the image (so mask and input stay aligned whatever the aspect ratio), all zeros
    without one."""
    masks = np.zeros((len(items), spec.size, spec.size), dtype=np.float32)
    for i, item in enumerate(items):
        found = boxes.get(item.name)
        if not found:
            continue
        ds = pydicom.dcmread(item.path, stop_before_pixels=True)
        filled = boxes_mask((int(ds.Rows), int(ds.Columns)), found).astype(np.float32)
        masks[i] = resize(filled, spec.size) > 0.5
    return masks
