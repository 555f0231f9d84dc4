"""Lesion boxes drawn on the case page: parsing, pixels, and what a verdict may carry."""

from __future__ import annotations

from typing import Any

import pytest

from acwi_node.review.lesion_boxes import (
    MAX_BOXES,
    BoxError,
    drafted_boxes,
    marked_boxes,
    parse_fractions,
    place_boxes,
    to_fractions,
    to_pixels,
)
from acwi_node.review.store import ReviewError, kept_boxes

FINDINGS = ["nodule", "effusion"]


def test_fractions_are_four_ordered_numbers_within_the_image() -> None:
    assert parse_fractions(" 0.1 0.2  0.3 0.4 ") == (0.1, 0.2, 0.3, 0.4)
    for text, message in [
        ("0.1 0.2 0.3", "four numbers"),
        ("0.1 0.2 0.3 0.4 0.5", "four numbers"),
        ("a b c d", "numbers"),
        ("0.1 0.2 1.5 0.4", "within its image"),
        ("-0.1 0.2 0.3 0.4", "within its image"),
        ("nan 0.2 0.3 0.4", "within its image"),
        ("0.3 0.2 0.1 0.4", "width and a height"),
        ("0.1 0.4 0.3 0.4", "width and a height"),
    ]:
        with pytest.raises(BoxError, match=message):
            parse_fractions(text)
    assert issubclass(BoxError, ReviewError)  # the review app shows its message


def test_pixels_cover_every_pixel_the_box_touches() -> None:
    assert to_pixels((0.0, 0.0, 1.0, 1.0), 100, 200) == [0, 0, 199, 99]
    assert to_pixels((0.25, 0.5, 0.5, 0.75), 128, 128) == [32, 64, 63, 95]
    # a box narrower than a pixel still marks the pixel it lies in
    assert to_pixels((0.5001, 0.5001, 0.5002, 0.5002), 10, 10) == [5, 5, 5, 5]
    # fractions of a non-square image: x by Columns, y by Rows
    assert to_pixels((0.5, 0.0, 1.0, 0.5), 100, 300) == [150, 0, 299, 49]


def test_a_kept_box_drawn_again_comes_back_as_the_same_pixels() -> None:
    """The page draws a kept box at four decimals (an amendment starts from the standing
    verdict's boxes, and the browser sends them back so): placed again it is the same box,
    whatever the image's size, where rounding alone would move an edge by a pixel."""
    import random

    rng = random.Random(5)
    for rows, columns in [(128, 128), (512, 512), (2500, 3000), (4096, 4096), (10, 7)]:
        for _ in range(500):
            x0, x1 = sorted(rng.sample(range(columns), 2)) if columns > 1 else (0, 0)
            y0, y1 = sorted(rng.sample(range(rows), 2))
            box = [x0, y0, x1, y1]
            again = to_pixels(parse_fractions(to_fractions(box, rows, columns)), rows, columns)
            assert again == box, (rows, columns, box)
    # e.g. column 33 of 128 is at 0.2578125, drawn as 0.2578: still column 33
    assert to_pixels((0.2578, 0.0, 0.5, 0.5), 128, 128)[0] == 33


def _place(marks: dict[str, str], label: str = "nodule") -> dict[str, list[list[int]]]:
    sizes = {"1.2.3": (128, 128), "1.2.4 frame 2": (64, 32), "1.2.5": None}
    return place_boxes(
        marks,
        images=set(sizes),
        label=label,
        finding_labels=FINDINGS,
        image_size=sizes.__getitem__,
    )


def test_a_verdict_carries_boxes_of_its_own_images_with_a_finding() -> None:
    assert _place({}) == {} and _place({}, label="normal") == {}
    assert _place({"1.2.3": "0 0 0.5 0.5", "1.2.4 frame 2": "0.5 0.5 1 1"}) == {
        "1.2.3": [[0, 0, 63, 63]],
        "1.2.4 frame 2": [[16, 32, 31, 63]],
    }
    # two lesions on one image: two boxes, in the order drawn (a trailing ";" is no box)
    assert _place({"1.2.3": "0.5 0.5 1 1; 0 0 0.25 0.25;"}) == {
        "1.2.3": [[64, 64, 127, 127], [0, 0, 31, 31]]
    }
    with pytest.raises(BoxError, match="four numbers"):
        _place({"1.2.3": "0 0 0.5 0.5;0 0 0.5"})  # one bad box refuses the verdict
    with pytest.raises(BoxError, match="four numbers"):
        _place({"1.2.3": " ; "})
    with pytest.raises(BoxError, match="goes with a finding"):
        _place({"1.2.3": "0 0 0.5 0.5"}, label="normal")
    with pytest.raises(BoxError, match="did not analyse"):
        _place({"9.9.9": "0 0 0.5 0.5"})
    with pytest.raises(BoxError, match="no longer on the node"):
        _place({"1.2.5": "0 0 0.5 0.5"})
    # at most MAX_BOXES in all, however they are spread over the images
    many = ";".join(["0 0 1 1"] * MAX_BOXES)
    assert len(_place({"1.2.3": many})["1.2.3"]) == MAX_BOXES
    with pytest.raises(BoxError, match=f"at most {MAX_BOXES}"):
        _place({"1.2.3": many, "1.2.4 frame 2": "0 0 1 1"})


def test_a_kept_box_is_drawn_from_its_first_pixels_edge_to_its_last_pixels_edge() -> None:
    assert to_fractions([32, 64, 63, 95], 128, 128) == "0.2500 0.5000 0.5000 0.7500"
    assert to_fractions([0, 0, 199, 99], 100, 200) == "0.0000 0.0000 1.0000 1.0000"
    assert to_fractions([5, 5, 5, 5], 10, 10) == "0.5000 0.5000 0.6000 0.6000"  # one pixel
    # drawn again and placed, it is the same box
    assert place_boxes(
        {"a": to_fractions([32, 64, 63, 95], 128, 128)},
        images={"a"},
        label="nodule",
        finding_labels=FINDINGS,
        image_size=lambda name: (128, 128),
    ) == {"a": [[32, 64, 63, 95]]}


def test_the_boxes_of_a_cases_verdicts_are_listed_by_image() -> None:
    asked: list[str] = []

    def size(name: str) -> tuple[int, int] | None:
        asked.append(name)
        return None if name == "gone" else (100, 200)

    verdicts: list[dict[str, Any]] = [
        {"user": "a.reader", "action": "escalate", "label": None, "boxes": {}},
        {
            "user": "b.reader",
            "action": "confirm",
            "label": "nodule",
            "boxes": {"img": [[0, 0, 99, 49]], "gone": [[1, 2, 3, 4]], "elsewhere": [[0, 0, 1, 1]]},
        },
        {"user": "c.reader", "action": "override", "label": "effusion",
         "boxes": {"img": [[100, 50, 199, 99], [0, 50, 9, 59]]}},
    ]  # fmt: skip
    marked = marked_boxes(verdicts, {"img", "gone"}, size)
    assert marked == {
        "img": [
            {"user": "b.reader", "label": "nodule", "box": [0, 0, 99, 49],
             "fractions": "0.0000 0.0000 0.5000 0.5000"},
            {"user": "c.reader", "label": "effusion", "box": [100, 50, 199, 99],
             "fractions": "0.5000 0.5000 1.0000 1.0000"},
            {"user": "c.reader", "label": "effusion", "box": [0, 50, 9, 59],
             "fractions": "0.0000 0.5000 0.0500 0.6000"},
        ],
        "gone": [{"user": "b.reader", "label": "nodule", "box": [1, 2, 3, 4], "fractions": ""}],
    }  # fmt: skip
    assert sorted(asked) == ["gone", "img"]  # each image's header read once
    assert marked_boxes([], {"img"}, size) == {}


def test_a_refused_forms_boxes_come_back_where_they_can_be_drawn() -> None:
    marks = {
        "a": " 0.1 0.2  0.3 0.4",
        "b": "0.5 0.5 1.5 0.9",  # outside the picture
        "elsewhere": "0.1 0.1 0.2 0.2",  # not an image of the page
        "c": "x y z w",
    }
    assert drafted_boxes(marks, {"a", "b", "c"}) == {"a": "0.1000 0.2000 0.3000 0.4000"}
    # an image's several boxes, the bad one among them left out
    two = {"a": "0.1 0.2 0.3 0.4; 0.5 0.5 1.5 0.9; 0.6 0.6 0.7 0.7"}
    assert drafted_boxes(two, {"a"}) == {
        "a": "0.1000 0.2000 0.3000 0.4000;0.6000 0.6000 0.7000 0.7000"
    }
    many = {f"i{n}": "0.1 0.1 0.2 0.2;0.3 0.3 0.4 0.4" for n in range(MAX_BOXES)}
    drafted = drafted_boxes(many, set(many))
    assert sum(len(text.split(";")) for text in drafted.values()) == MAX_BOXES


def test_a_verdict_kept_when_an_image_took_one_box_reads_as_a_list_of_it() -> None:
    assert kept_boxes({"a": [1, 2, 3, 4]}) == {"a": [[1, 2, 3, 4]]}
    assert kept_boxes({"a": [[1, 2, 3, 4], [5, 6, 7, 8]]}) == {"a": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    assert kept_boxes(None) == {} and kept_boxes({}) == {}


def test_boxes_given_in_pixels_become_marks_that_place_as_the_same_pixels() -> None:
    """The JSON API's boxes (pixels, inclusive) go through the page's checks and come back
    exactly; anything but four whole numbers inside the image, first corner first, is
    refused with the reason."""
    from acwi_node.review.lesion_boxes import marks_from_pixels

    sizes = {"1.2.3": (128, 128), "1.2.4 frame 2": (64, 32), "1.2.5": None}
    given = {"1.2.3": [[33, 64, 63, 95], [0, 0, 0, 0]], "1.2.4 frame 2": [[31, 63, 31, 63]]}
    marks = marks_from_pixels(given, images=set(sizes), image_size=sizes.__getitem__)
    assert _place(marks) == given
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"1.2.3": [[0, 0, 128, 1]]}, "within its image"),
        ({"1.2.3": [[5, 0, 4, 1]]}, "within its image"),
        ({"1.2.3": [[-1, 0, 4, 1]]}, "within its image"),
        ({"1.2.3": [[0, 0, 1]]}, "four whole numbers"),
        ({"1.2.3": [[0, 0, 1.5, 1]]}, "four whole numbers"),
        ({"1.2.3": [[True, 0, 1, 1]]}, "four whole numbers"),
        ({"1.2.3": []}, "a list of"),
        ({"1.2.9": [[0, 0, 1, 1]]}, "did not analyse"),
        ({"1.2.5": [[0, 0, 1, 1]]}, "no longer on the node"),
    ]
    for boxes, said in refusals:
        with pytest.raises(BoxError, match=said):
            marks_from_pixels(boxes, images=set(sizes), image_size=sizes.__getitem__)
