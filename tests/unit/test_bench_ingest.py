"""bench.ingest's argument for parallel rows and its scaling table (no target is started)."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.ingest import association_counts, scaling


@pytest.mark.parametrize(
    ("text", "counts"),
    [("4", (4,)), ("2,4,8", (2, 4, 8)), ("8, 2,8", (8, 2)), ("0", ()), ("1,4", (4,)), ("", ())],
)
def test_parallel_counts_keep_their_order_and_drop_what_adds_no_row(
    text: str, counts: tuple[int, ...]
) -> None:
    assert association_counts(text) == counts


@pytest.mark.parametrize("text", ["four", "2;4", "-2"])
def test_parallel_counts_that_are_not_counts_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        association_counts(text)


def test_scaling_divides_each_targets_rate_by_its_own_over_one_association() -> None:
    results = {
        "10 small, 1 assoc.": {"storescp": 1000.0, "node": 400.0},
        "10 small, 2 assoc.": {"storescp": 1800.0, "node": 700.0},
        "10 small, 8 assoc.": {"storescp": 5000.0, "node": 0.0},
        "5 small, one assoc. each": {"storescp": 60.0, "node": 55.0},
        "3 CT 512x512x16, 4 assoc.": {"storescp": 100.0, "node": 50.0},  # no 1-assoc. row
    }
    scaled = scaling(results, ["storescp", "node"])
    assert scaled is not None
    header, rows = scaled
    assert header == ["instances, associations", "storescp x one assoc.", "node x one assoc."]
    assert rows == [["10 small, 2 assoc.", 1.8, 1.75], ["10 small, 8 assoc.", 5.0, 0.0]]


def test_no_scaling_table_without_parallel_rows() -> None:
    results = {"10 small, 1 assoc.": {"node": 400.0}}
    assert scaling(results, ["node"]) is None
    zero = scaling({"1 small, 1 assoc.": {"n": 0.0}, "1 small, 2 assoc.": {"n": 5.0}}, ["n"])
    assert zero is not None and math.isnan(zero[1][0][1])
