"""Deterministic result UIDs and UID syntax checks."""

from __future__ import annotations

import pytest

from acwi_node.results.sr import verified_sr_uid
from acwi_node.results.uids import (
    UID_NAMESPACE,
    ResultUIDs,
    derive_uid,
    device_uid,
    is_valid_uid,
    result_uids,
)

STUDY = "1.2.826.0.1.3680043.8.498.1234567890"
SOURCES = [
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
]


def _all_uids(uids: ResultUIDs) -> list[str]:
    return [
        uids.sr_series_uid,
        uids.sr_instance_uid,
        uids.heatmap_series_uid,
        *(uids.heatmap_instance_uid(source) for source in SOURCES),
        uids.parametric_map_series_uid,
        *(uids.parametric_map_instance_uid(source, 512, 512) for source in SOURCES),
        uids.parametric_map_instance_uid(SOURCES[0], 256, 256),
    ]


def test_derive_uid_is_deterministic_and_valid() -> None:
    first = derive_uid("study", "model", "1.0")
    assert first == derive_uid("study", "model", "1.0")
    assert first.startswith("2.25.")
    assert is_valid_uid(first)
    assert len(first) <= 64


def test_derive_uid_separates_parts_unambiguously() -> None:
    assert derive_uid("a", "bc") != derive_uid("ab", "c")
    assert derive_uid("a", "") != derive_uid("a")
    assert derive_uid("a.b") != derive_uid("a", "b")
    assert derive_uid("x", "y") != derive_uid("y", "x")


@pytest.mark.parametrize(
    "parts",
    [
        ("",),
        ("0",),
        ("a" * 10_000,),
        ("ünïcødé", "✓"),
        tuple(str(i) for i in range(50)),
    ],
)
def test_derive_uid_always_valid(parts: tuple[str, ...]) -> None:
    uid = derive_uid(*parts)
    assert is_valid_uid(uid)
    assert len(uid) <= 64


def test_derive_uid_many_inputs_valid_and_distinct() -> None:
    uids = {derive_uid("seed", str(i)) for i in range(2000)}
    assert len(uids) == 2000
    assert all(is_valid_uid(uid) and len(uid) <= 64 for uid in uids)


def test_derive_uid_needs_parts() -> None:
    with pytest.raises(ValueError):
        derive_uid()


def test_result_uids_same_inputs_same_uids() -> None:
    assert result_uids(STUDY, "cxr", "1.0") == result_uids(STUDY, "cxr", "1.0")
    assert _all_uids(result_uids(STUDY, "cxr", "1.0")) == _all_uids(
        result_uids(STUDY, "cxr", "1.0")
    )


def test_result_uids_distinct_per_kind_and_source() -> None:
    uids = _all_uids(result_uids(STUDY, "cxr", "1.0"))
    assert len(set(uids)) == len(uids)
    assert STUDY not in uids
    for uid in uids:
        assert is_valid_uid(uid)
        assert len(uid) <= 64


def test_result_uids_depend_on_study_model_and_version() -> None:
    base = set(_all_uids(result_uids(STUDY, "cxr", "1.0")))
    for other in (
        result_uids(STUDY, "cxr", "1.1"),
        result_uids(STUDY, "cxr-b", "1.0"),
        result_uids(STUDY + "1", "cxr", "1.0"),
    ):
        assert base.isdisjoint(_all_uids(other))


def test_a_reissue_has_uids_of_its_own_and_reissue_zero_keeps_the_old_ones() -> None:
    """After a withdrawal the same model version's results get new UIDs (reissue 1, 2, ...);
    reissue 0 is every result never withdrawn, whose UIDs must never change: pinned here as
    the derivation made them before reissues existed."""
    original = result_uids(STUDY, "cxr", "1.0")
    assert result_uids(STUDY, "cxr", "1.0", 0) == original
    assert original.sr_instance_uid == derive_uid(UID_NAMESPACE, "sr-instance", STUDY, "cxr", "1.0")
    assert original.heatmap_instance_uid(SOURCES[0]) == derive_uid(
        UID_NAMESPACE, "heatmap-instance", STUDY, "cxr", "1.0", SOURCES[0]
    )
    seen = set(_all_uids(original))
    for reissue in (1, 2):
        uids = _all_uids(result_uids(STUDY, "cxr", "1.0", reissue))
        assert seen.isdisjoint(uids) and len(set(uids)) == len(uids)
        seen |= set(uids)
    assert result_uids(STUDY, "cxr", "1.0", 1).tracking_uid("nodule", "study") != (
        original.tracking_uid("nodule", "study")
    )
    assert verified_sr_uid(STUDY, "cxr", "1.0", 1) != verified_sr_uid(STUDY, "cxr", "1.0")
    assert verified_sr_uid(STUDY, "cxr", "1.0") == derive_uid(
        UID_NAMESPACE, "sr-verified-instance", STUDY, "cxr", "1.0"
    )
    with pytest.raises(ValueError, match="reissue"):
        result_uids(STUDY, "cxr", "1.0", -1)


def test_tracking_uids_distinct() -> None:
    uids = result_uids(STUDY, "cxr", "1.0")
    tracking = {
        uids.tracking_uid("effusion", "study"),
        uids.tracking_uid("nodule", "study"),
        uids.tracking_uid("effusion", SOURCES[0]),
        uids.summary_tracking_uid("study"),
        uids.summary_tracking_uid(SOURCES[0]),
    }
    assert len(tracking) == 5
    assert all(is_valid_uid(uid) for uid in tracking)


def test_device_uid_depends_on_weights() -> None:
    assert device_uid("cxr", "1.0", "abc") == device_uid("cxr", "1.0", "abc")
    assert device_uid("cxr", "1.0", "abc") != device_uid("cxr", "1.0", "abd")
    assert is_valid_uid(device_uid("cxr", "1.0"))


def test_result_uids_rejects_invalid_study_uid() -> None:
    with pytest.raises(ValueError):
        result_uids("../../etc", "cxr", "1.0")


@pytest.mark.parametrize(
    "value",
    ["0", "1", "2.25.0", "1.2.840.10008.5.1.4.1.1.88.34", "1." + "2" * 62],
)
def test_is_valid_uid_accepts(value: str) -> None:
    assert is_valid_uid(value)


@pytest.mark.parametrize(
    "value",
    [
        "../../x",
        "/etc/x",
        "1.2.3a",
        "1." + "2" * 63,
        "1" * 65,
        "1..2",
        "01.2",
        "1.02",
        "",
        ".1",
        "1.",
        "1.2 ",
        " 1.2",
        "1.2\n",
        "1.2\x00",
        "-1.2",
        "1,2",
        "1.2/3",
        "١.٢",
    ],
)
def test_is_valid_uid_rejects(value: str) -> None:
    assert not is_valid_uid(value)


def test_is_valid_uid_rejects_non_strings() -> None:
    assert not is_valid_uid(None)
    assert not is_valid_uid(123)
    assert not is_valid_uid(b"1.2.3")
