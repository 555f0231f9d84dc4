"""Lesion boxes a radiologist marks on a case's images with a verdict.

The case page lets a reader drag boxes over the lesions on any analysed image before
confirming or correcting a finding (several on one image: two nodules are two boxes). The
browser sends an image's boxes as fractions of the picture they were drawn on, ``"x0 y0 x1
y1"`` in [0, 1] (the picture may be scaled for display), several separated by ``;``;
:func:`place_boxes` checks them and turns each into the image's own pixels, ``[x0, y0, x1,
y1]`` inclusive, the form of ``labels.csv``'s ``box`` column. They are kept with the verdict
and written by the feedback export, where training turns them into lesion masks for the
heatmap (``models/networks/localisation.py``): the reader's correction of where the model
looked. Every lesion on an image wants its box: the training loss counts heat outside the
boxes against the model.

The page draws the kept boxes over their images again (:func:`to_fractions`), and a verdict
the node refuses comes back with the boxes that were drawn (:func:`drafted_boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from acwi_node.review.store import ReviewError

#: Most boxes one verdict may carry (the form's field limit leaves room for the others).
MAX_BOXES = 20


class BoxError(ReviewError):
    """A lesion box that cannot be kept; the message says why, for the reader."""


def parse_fractions(text: str) -> tuple[float, float, float, float]:
    """``"x0 y0 x1 y1"`` as fractions of the picture's width and height, each in [0, 1],
    with ``x0 < x1`` and ``y0 < y1``."""
    parts = text.split()
    if len(parts) != 4:
        raise BoxError("a lesion box needs four numbers: x0 y0 x1 y1")
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise BoxError("a lesion box's corners must be numbers") from exc
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise BoxError("a lesion box must lie within its image")
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise BoxError("a lesion box needs a width and a height")
    return x0, y0, x1, y1


def parse_marks(text: str) -> list[tuple[float, float, float, float]]:
    """An image's boxes from the form: :func:`parse_fractions` of each ``;``-separated part
    (empty parts, as from a trailing ``;``, are skipped)."""
    boxes = [parse_fractions(part) for part in text.split(";") if part.strip()]
    if not boxes:
        raise BoxError("a lesion box needs four numbers: x0 y0 x1 y1")
    return boxes


#: A corner this close to a pixel's edge (a fraction of the picture) is on it: a kept box the
#: page draws again (:func:`to_fractions`, four decimals) comes back as the same pixels.
EDGE_TOLERANCE = 1e-4


def _on_edge(fraction: float, size: int) -> float:
    """``fraction`` of ``size`` pixels, snapped to the nearest pixel edge when within
    :data:`EDGE_TOLERANCE`."""
    at = fraction * size
    edge = round(at)
    return float(edge) if abs(at - edge) <= EDGE_TOLERANCE * size else at


def to_pixels(fractions: tuple[float, float, float, float], rows: int, columns: int) -> list[int]:
    """The box in the image's pixels, ``[x0, y0, x1, y1]`` inclusive: every pixel the drawn
    box touches, at least one (a corner within :data:`EDGE_TOLERANCE` of a pixel's edge is on
    it, so that :func:`to_fractions` and back gives the same box)."""
    fx0, fy0, fx1, fy1 = fractions
    x0 = min(int(math.floor(_on_edge(fx0, columns))), columns - 1)
    y0 = min(int(math.floor(_on_edge(fy0, rows))), rows - 1)
    x1 = max(x0, min(int(math.ceil(_on_edge(fx1, columns))) - 1, columns - 1))
    y1 = max(y0, min(int(math.ceil(_on_edge(fy1, rows))) - 1, rows - 1))
    return [x0, y0, x1, y1]


def to_fractions(box: list[int], rows: int, columns: int) -> str:
    """A kept box (pixels, inclusive) as the page draws it: ``"x0 y0 x1 y1"``, fractions of
    the picture from the first pixel's left edge to the last pixel's right edge."""
    x0, y0, x1, y1 = box
    values = (x0 / columns, y0 / rows, (x1 + 1) / columns, (y1 + 1) / rows)
    return " ".join(f"{min(max(v, 0.0), 1.0):.4f}" for v in values)


def marked_boxes(
    verdicts: list[dict[str, Any]],
    images: set[str],
    image_size: Callable[[str], tuple[int, int] | None],
) -> dict[str, list[dict[str, Any]]]:
    """The boxes the case's ``verdicts`` kept (each image's a list, as the store reads them),
    by image name (those of ``images``): for each box, who marked it, the verdict's label,
    the box in pixels and, where ``image_size`` still knows the image's ``(Rows, Columns)``,
    the fractions the page draws it at (else "")."""
    sizes: dict[str, tuple[int, int] | None] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    for verdict in verdicts:
        for name, boxes in (verdict.get("boxes") or {}).items():
            if name not in images:
                continue
            if name not in sizes:
                sizes[name] = image_size(name)
            size = sizes[name]
            for box in boxes:
                out.setdefault(name, []).append(
                    {
                        "user": verdict.get("user", ""),
                        "label": verdict.get("label") or "",
                        "box": list(box),
                        "fractions": to_fractions(list(box), *size) if size else "",
                    }
                )
    return out


def drafted_boxes(marks: Mapping[str, str], images: set[str]) -> dict[str, str]:
    """The boxes of a refused verdict's form that the page can draw again (so the reader need
    not drag them anew): those on one of ``images`` whose corners parse, at most
    :data:`MAX_BOXES` in all, each image's normalised to ``"x0 y0 x1 y1;..."``."""
    kept: dict[str, str] = {}
    room = MAX_BOXES
    for name, text in marks.items():
        if name not in images:
            continue
        boxes: list[str] = []
        for part in text.split(";"):
            if room == 0:
                break
            try:
                boxes.append(" ".join(f"{v:.4f}" for v in parse_fractions(part)))
            except BoxError:
                continue
            room -= 1
        if boxes:
            kept[name] = ";".join(boxes)
    return kept


def marks_from_pixels(
    boxes: Mapping[str, Any],
    *,
    images: set[str],
    image_size: Callable[[str], tuple[int, int] | None],
) -> dict[str, str]:
    """Boxes given in the images' own pixels (the JSON API's form: image name -> a list of
    ``[x0, y0, x1, y1]``, inclusive, as the ledger and ``labels.csv`` keep them) as the page's
    marks (:func:`parse_marks`), for :func:`place_boxes` to check and place like any other:
    the same box comes back (:func:`to_fractions`, :func:`to_pixels`). Raises
    :class:`BoxError` for a box that is not four whole numbers within its image, first
    corner first, or an image the case did not analyse."""
    marks: dict[str, str] = {}
    for name, kept in boxes.items():
        if name not in images:
            raise BoxError("a lesion box names an image this case did not analyse")
        if not isinstance(kept, list | tuple) or not kept:
            raise BoxError("an image's lesion boxes are a list of [x0, y0, x1, y1]")
        size = image_size(name)
        if size is None:
            raise BoxError("an image with a lesion box is no longer on the node")
        rows, columns = size
        parts: list[str] = []
        for box in kept:
            if not (
                isinstance(box, list | tuple)
                and len(box) == 4
                and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
            ):
                raise BoxError(
                    "a lesion box is four whole numbers: [x0, y0, x1, y1] in its image's pixels"
                )
            x0, y0, x1, y1 = box
            if not (0 <= x0 <= x1 < columns and 0 <= y0 <= y1 < rows):
                raise BoxError(
                    f"a lesion box must lie within its image ({columns} columns, {rows} rows),"
                    " its first column and row first"
                )
            parts.append(to_fractions([x0, y0, x1, y1], rows, columns))
        marks[str(name)] = ";".join(parts)
    return marks


def place_boxes(
    marks: Mapping[str, str],
    *,
    images: set[str],
    label: str,
    finding_labels: list[str],
    image_size: Callable[[str], tuple[int, int] | None],
) -> dict[str, list[list[int]]]:
    """The boxes of ``marks`` (image name -> its boxes' fractions, see :func:`parse_marks`)
    in pixels, by image name: a list of ``[x0, y0, x1, y1]`` per image.

    ``images`` are the names of the case's analysed images (a SOP Instance UID, or
    ``"<uid> frame <n>"``); ``label`` is the label the verdict stands by, which must be one of
    ``finding_labels`` (a box marks a lesion); ``image_size`` gives an image's ``(Rows,
    Columns)``, None when its file is gone. At most :data:`MAX_BOXES` boxes in all. Raises
    :class:`BoxError`.
    """
    if not marks:
        return {}
    if label not in finding_labels:
        raise BoxError(
            f"a lesion box goes with a finding ({', '.join(finding_labels)}), not with {label!r}"
        )
    parsed: dict[str, list[tuple[float, float, float, float]]] = {}
    for name, text in marks.items():
        if name not in images:
            raise BoxError("a lesion box names an image this case did not analyse")
        parsed[name] = parse_marks(text)
    if sum(len(boxes) for boxes in parsed.values()) > MAX_BOXES:
        raise BoxError(f"at most {MAX_BOXES} lesion boxes per verdict")
    placed: dict[str, list[list[int]]] = {}
    for name, boxes in parsed.items():
        size = image_size(name)
        if size is None:
            raise BoxError("an image with a lesion box is no longer on the node")
        placed[name] = [to_pixels(box, *size) for box in boxes]
    return placed
