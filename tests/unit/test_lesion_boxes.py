"""Lesion boxes drawn on the case page: parsing, pixels, and what a verdict may carry."""

from __future__ import annotations

import pytest

from acwi_node.review.lesion_boxes import (
    MAX_BOXES,
    BoxError,
    parse_fractions,
    place_boxes,
    to_pixels,
)
from acwi_node.review.store import ReviewError

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


def _place(marks: dict[str, str], label: str = "nodule") -> dict[str, list[int]]:
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
        "1.2.3": [0, 0, 63, 63],
        "1.2.4 frame 2": [16, 32, 31, 63],
    }
    with pytest.raises(BoxError, match="goes with a finding"):
        _place({"1.2.3": "0 0 0.5 0.5"}, label="normal")
    with pytest.raises(BoxError, match="did not analyse"):
        _place({"9.9.9": "0 0 0.5 0.5"})
    with pytest.raises(BoxError, match="no longer on the node"):
        _place({"1.2.5": "0 0 0.5 0.5"})
    with pytest.raises(BoxError, match=f"at most {MAX_BOXES}"):
        _place({f"1.2.{n}": "0 0 1 1" for n in range(MAX_BOXES + 1)})
