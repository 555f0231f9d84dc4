"""Quality-control sampling and agreement rows (acwi_node/review/quality.py)."""

from __future__ import annotations

import pytest

from acwi_node.review.quality import (
    FLAGGED,
    SAMPLE,
    FinalVerdict,
    agreement,
    quality_sampled,
    sample_reason,
    wilson_interval,
)


def test_a_study_is_a_sample_or_not_every_time_and_the_share_is_the_percentage() -> None:
    uids = [f"1.2.826.0.1.3680043.10.{n}" for n in range(20000)]
    assert not any(quality_sampled(uid, 0.0) for uid in uids[:100])
    assert all(quality_sampled(uid, 100.0) for uid in uids[:100])
    chosen = [uid for uid in uids if quality_sampled(uid, 5.0)]
    assert 0.045 < len(chosen) / len(uids) < 0.055
    assert chosen == [uid for uid in uids if quality_sampled(uid, 5.0)]  # the same each time
    # a larger share keeps every sample of a smaller one (the hash is compared with it)
    assert set(chosen) <= {uid for uid in uids if quality_sampled(uid, 10.0)}
    assert (
        sample_reason(2.5) == "quality-control sample (2.5 % of the studies the model was sure of)"
    )


def test_the_wilson_interval() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 5)
    assert low == 0.0 and high == pytest.approx(0.4345, abs=1e-4)
    low, high = wilson_interval(5, 5)
    assert high == 1.0 and low == pytest.approx(0.5655, abs=1e-4)


def _v(
    kind: str, model_label: str, label: str, version: str = "1.1.0", site: str = "SITEA"
) -> FinalVerdict:
    return FinalVerdict("dianet", version, kind, model_label, label, site)


def test_agreement_rows_per_model_version_and_kind_with_the_commonest_corrections() -> None:
    verdicts = [
        _v(FLAGGED, "nodule", "nodule"),
        _v(FLAGGED, "nodule", "normal"),
        _v(FLAGGED, "effusion", "normal"),
        _v(FLAGGED, "nodule", "normal"),
        _v(FLAGGED, "normal", "effusion", site="SITEB"),
        _v(FLAGGED, "normal", "nodule", site="SITEB"),
        _v(SAMPLE, "normal", "normal"),
        _v(SAMPLE, "normal", "normal", version="1.0.0"),
    ]
    rows = agreement(verdicts)
    assert [(r["version"], r["kind"], r["verdicts"], r["agreed"]) for r in rows] == [
        ("1.0.0", SAMPLE, 1, 1),
        ("1.1.0", FLAGGED, 6, 1),
        ("1.1.0", SAMPLE, 1, 1),
    ]
    flagged = rows[1]
    assert flagged["agreement"] == pytest.approx(1 / 6)
    assert (flagged["ci_low"], flagged["ci_high"]) == wilson_interval(1, 6)
    # commonest first, then by name; at most three
    assert flagged["corrections"] == [
        ["nodule", "normal", 2],
        ["effusion", "normal", 1],
        ["normal", "effusion", 1],
    ]
    assert rows[2]["corrections"] == [] and agreement([]) == []
    # by site: (calling AE, verdicts, agreed)
    assert flagged["sites"] == [["SITEA", 4, 1], ["SITEB", 2, 0]]
    assert rows[0]["sites"] == [["SITEA", 1, 1]]
