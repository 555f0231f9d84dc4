"""Result objects' own dates and times around clock changes and in hospital zones that are not
UTC: one clock (the source study's offset, else the hospital's) and its Timezone Offset From
UTC, whatever the node's own time zone."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, dcmread

from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.parametric_map import build_parametric_maps
from acwi_node.results.rejection import build_rejection_note
from acwi_node.results.sr import Verification, build_sr, build_verified_sr
from models.data.synth import write_ct_series
from tests.unit.test_parametric_map import analysis_of
from tests.unit.test_sr import make_study, needs_dciodvfy

UTC = dt.timezone.utc
#: Europe/Berlin goes back 03:00 CEST -> 02:00 CET at 2026-10-25 01:00 UTC: 02:30 twice.
BERLIN_FALL_BACK = [
    (dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "20261025", "023000", "+0200"),
    (dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "20261025", "023000", "+0100"),
]
ZONES = [
    # Berlin springs forward at 2026-03-29 01:00 UTC (02:00 CET -> 03:00 CEST)
    ("Europe/Berlin", dt.datetime(2026, 3, 29, 0, 59, tzinfo=UTC), "015900", "+0100"),
    ("Europe/Berlin", dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC), "030000", "+0200"),
    # New York goes back at 2026-11-01 06:00 UTC (02:00 EDT -> 01:00 EST)
    ("America/New_York", dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC), "013000", "-0400"),
    ("America/New_York", dt.datetime(2026, 11, 1, 6, 30, tzinfo=UTC), "013000", "-0500"),
    # Lord Howe: half an hour back at 2026-04-05 01:00 local (+11:00 -> +10:30)
    ("Australia/Lord_Howe", dt.datetime(2026, 4, 4, 14, 45, tzinfo=UTC), "014500", "+1100"),
    ("Australia/Lord_Howe", dt.datetime(2026, 4, 4, 15, 15, tzinfo=UTC), "014500", "+1030"),
    ("Asia/Kolkata", dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "070000", "+0530"),
]
OWN = ("InstanceCreation", "Content")


def _sr(now: dt.datetime, zone: str, source_offset: str | None = None) -> Dataset:
    sources, analysis = make_study()
    if source_offset is not None:
        for source in sources:
            source.TimezoneOffsetFromUTC = source_offset
    return build_sr(sources, analysis, now=now, timezone=zone)


def _times(ds: Dataset) -> set[tuple[str, str]]:
    return {(str(ds.get(f"{k}Date")), str(ds.get(f"{k}Time"))) for k in OWN if f"{k}Date" in ds}


@pytest.mark.parametrize(("zone", "now", "time", "offset"), ZONES)
def test_sr_times_in_the_hospital_zone_with_its_offset(
    zone: str, now: dt.datetime, time: str, offset: str
) -> None:
    sr = _sr(now, zone)
    assert sr.TimezoneOffsetFromUTC == offset
    assert {t for _, t in _times(sr)} == {time + ".000000"}


def test_the_repeated_hour_is_told_apart_by_its_offset() -> None:
    seen = []
    for now, date, time, offset in BERLIN_FALL_BACK:
        sr = _sr(now, "Europe/Berlin")
        assert _times(sr) == {(date, time + ".000000")}
        assert sr.TimezoneOffsetFromUTC == offset
        seen.append(sr.TimezoneOffsetFromUTC)
    assert seen[0] != seen[1]


def test_the_source_studys_offset_wins_over_the_hospitals() -> None:
    """The study's dates and times, which the SR copies, are in the source's offset: the SR's
    own are written in it too, as one offset holds for every date and time of an instance."""
    sr = _sr(dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "Europe/Berlin", "-0500")
    assert sr.TimezoneOffsetFromUTC == "-0500"
    assert _times(sr) == {("20261024", "203000.000000")}


def test_a_naive_moment_is_utc_and_the_nodes_own_zone_does_not_matter() -> None:
    sr = _sr(dt.datetime(2026, 3, 29, 1, 0), "Asia/Kolkata")
    assert sr.TimezoneOffsetFromUTC == "+0530"
    assert _times(sr) == {("20260329", "063000.000000")}


def _heatmap(now: dt.datetime, zone: str) -> Dataset:
    """The heatmap secondary capture of a study's first image, written at ``now`` in ``zone``."""
    sources, analysis = make_study()
    image = analysis.images[0]
    source = next(s for s in sources if s.SOPInstanceUID == image.sop_instance_uid)
    return build_heatmap_sc(
        source, image.heatmap_array(), analysis, image, instance_number=1, now=now, timezone=zone
    )


def test_heatmap_times_in_one_clock_with_offset() -> None:
    for now, date, time, offset in BERLIN_FALL_BACK:
        sc = _heatmap(now, "Europe/Berlin")
        assert sc.TimezoneOffsetFromUTC == offset
        assert _times(sc) == {(date, time + ".000000")}
        assert (sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture) == (date, time + ".000000")


def _unverified(now: dt.datetime, zone: str) -> tuple[list[Dataset], Dataset]:
    sources, analysis = make_study()
    buf = io.BytesIO()
    build_sr(sources, analysis, now=now, timezone=zone).save_as(buf, enforce_file_format=True)
    return sources, pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_verified_sr_times_and_verification_in_one_offset() -> None:
    written, date, time, offset = BERLIN_FALL_BACK[0]
    sources, sr = _unverified(written, "Europe/Berlin")
    verified_at = dt.datetime(2026, 10, 25, 1, 30)  # naive UTC, as the ledger keeps it
    verdict = Verification("Doe^Jane", "Example Hospital", "confirm", "effusion", "", verified_at)
    doc = build_verified_sr(sr, sources, verdict, timezone="Europe/Berlin")
    # the unverified SR's offset (+0200) is the document's: 01:30 UTC is 03:30 in it
    assert doc.TimezoneOffsetFromUTC == offset
    assert _times(doc) == {("20261025", "033000.000000")}
    observer = doc.VerifyingObserverSequence[0]
    assert observer.VerificationDateTime == "20261025033000.000000+0200"


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    now = BERLIN_FALL_BACK[1][0]
    sources, sr = _unverified(now, "Europe/Berlin")
    verdict = Verification("Doe^Jane", "Example Hospital", "confirm", "effusion", "", now)
    sc = _heatmap(now, "Europe/Berlin")
    verified = build_verified_sr(sr, sources, verdict, timezone="Europe/Berlin")
    for name, ds in (("sr.dcm", sr), ("verified.dcm", verified), ("sc.dcm", sc)):
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
        assert not errors, name + "\n" + "\n".join(errors)


def test_parametric_map_times_in_one_clock_with_offset(tmp_path: Path) -> None:
    ct: list[Dataset] = [dcmread(p) for p in write_ct_series(tmp_path, slices=3, size=64)]
    for now, date, time, offset in BERLIN_FALL_BACK:
        (pmap,) = build_parametric_maps(ct, analysis_of(ct), now=now, timezone="Europe/Berlin")
        assert pmap.TimezoneOffsetFromUTC == offset
        assert _times(pmap) == {(date, time + ".000000")}
        if "SeriesDate" in pmap:
            assert (pmap.SeriesDate, pmap.SeriesTime) == (date, time + ".000000")


def test_rejection_note_times_in_the_offset_of_what_it_rejects() -> None:
    """The note copies the study from the SR it withdraws: its own times are in that SR's
    offset (Berlin's summer time), not the hospital's of the moment it is written."""
    written, *_ = BERLIN_FALL_BACK[0]
    sr = _sr(written, "Europe/Berlin")
    later = dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET
    note = build_rejection_note([sr], reason="quality", now=later, timezone="Europe/Berlin")
    assert note.TimezoneOffsetFromUTC == "+0200"
    assert _times(note) == {("20261025", "033000.000000")}


@needs_dciodvfy
def test_dciodvfy_parametric_map_and_note(tmp_path: Path) -> None:
    from acwi_node.results.validate import run_dciodvfy

    ct: list[Dataset] = [dcmread(p) for p in write_ct_series(tmp_path, slices=3, size=64)]
    now = BERLIN_FALL_BACK[1][0]
    (pmap,) = build_parametric_maps(ct, analysis_of(ct), now=now, timezone="Europe/Berlin")
    report = run_dciodvfy(pmap)
    assert report.errors == [], report.output
    note = build_rejection_note(
        [_sr(now, "Europe/Berlin")],
        reason="quality",
        now=now,
        timezone="Europe/Berlin",
    )
    report = run_dciodvfy(note)
    assert report.errors == [], report.output
