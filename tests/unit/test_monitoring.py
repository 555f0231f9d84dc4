"""Model monitoring: the drift statistics, and each model version's recent studies compared
with its baseline as the ledger holds them (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import math
import random
from typing import Any

import pytest

from acwi_node.config import MonitoringSettings, Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, JobState, Study
from acwi_node.monitoring.drift import (
    Status,
    bin_counts,
    chi2_sf,
    psi,
    psi_p_value,
    psi_status,
    quantile_edges,
    rate_status,
    two_proportion_z,
    z_p_value,
)
from acwi_node.monitoring.report import BaselineRefused, ModelMonitor, compare, sample_of
from tests.support.monitoring_jobs import TYPICAL, Jobs, summary, typical_label

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)
LEVELS = {"p_watch": 0.01, "p_shift": 0.001}


# ---------------------------------------------------------------------------- statistics
def test_psi_is_zero_for_equal_shares_and_grows_with_the_move() -> None:
    assert psi([10, 20, 30], [20, 40, 60]) == pytest.approx(0.0, abs=1e-4)  # smoothing only
    # shares 0.5/0.5 against 0.8/0.2 (no smoothing to speak of at these counts)
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi([50_000, 50_000], [80_000, 20_000]) == pytest.approx(expected, rel=1e-4)
    # a category the baseline never had is a large but finite index
    assert 1.0 < psi([100, 0], [70, 30]) < 10.0
    with pytest.raises(ValueError):
        psi([1, 2], [1])


def test_deciles_cut_the_baseline_into_equal_bins() -> None:
    values = [float(v) for v in range(100)]
    edges = quantile_edges(values)
    assert edges == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
    assert bin_counts(values, edges) == [10] * 10
    # many equal scores: the repeated edges merge, and none sits at the minimum
    assert quantile_edges([0.0] * 80 + [1.0] * 20) == [1.0]
    assert quantile_edges([]) == []


def test_chi_square_tail_matches_the_tables() -> None:
    # the 5 % and 0.1 % critical values of the usual tables
    for x, dof, p in ((3.841, 1, 0.05), (5.991, 2, 0.05), (16.919, 9, 0.05), (27.877, 9, 0.001)):
        assert chi2_sf(x, dof) == pytest.approx(p, rel=2e-3)
    assert chi2_sf(0.0, 3) == 1.0
    assert chi2_sf(500.0, 9) < 1e-90


def test_two_proportion_z() -> None:
    # 10 % against 30 % of 100 each: pooled 0.2, standard error sqrt(0.2 * 0.8 * 0.02)
    assert two_proportion_z(10, 100, 30, 100) == pytest.approx(0.2 / math.sqrt(0.0032))
    assert two_proportion_z(0, 100, 0, 100) == 0.0
    assert z_p_value(1.959964) == pytest.approx(0.05, rel=1e-4)


def test_a_small_windows_noise_is_no_shift() -> None:
    """Two samples of 40 studies from one distribution give an index near 0.2 over ten bins
    (what the usual 0.1/0.25 reading would call a change); the chance test keeps it stable."""
    rng = random.Random(7)
    readings = []
    for _ in range(200):
        a = [rng.random() for _ in range(40)]
        b = [rng.random() for _ in range(40)]
        edges = quantile_edges(a)
        value = psi(bin_counts(a, edges), bin_counts(b, edges))
        p = psi_p_value(value, 40, 40, len(edges) + 1)
        readings.append((value, psi_status(value, p, watch=0.1, shift=0.25, **LEVELS)))
    assert sum(v for v, _ in readings) / len(readings) > 0.15  # the noise is real ...
    assert sum(s is Status.SHIFTED for _, s in readings) <= 1  # ... and not read as a shift


def test_rate_status_needs_both_a_move_and_significance() -> None:
    assert rate_status(0.01, 1e-9, min_change=0.02, **LEVELS) is Status.STABLE
    assert rate_status(0.05, 0.005, min_change=0.02, **LEVELS) is Status.WATCH
    assert rate_status(-0.05, 0.0001, min_change=0.02, **LEVELS) is Status.SHIFTED
    assert rate_status(0.30, 0.2, min_change=0.02, **LEVELS) is Status.STABLE


# ---------------------------------------------------------------------------- the ledger
def cfg(**overrides: Any) -> MonitoringSettings:
    return MonitoringSettings(**{"baseline_studies": 100, "min_studies": 30, **overrides})


def by_signal(report: Any) -> dict[str, Any]:
    return {r.signal: r for r in report.signals}


def test_the_same_population_reads_stable(ledger_node: tuple[Settings, Ledger]) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    hour = dt.timedelta(hours=1)
    jobs.many(100, NOW - dt.timedelta(days=30), hour, seed=1, **TYPICAL)  # the first 100
    jobs.many(120, NOW - dt.timedelta(days=6), hour, seed=2, **TYPICAL)
    (report,) = ModelMonitor(ledger, cfg()).report(now=NOW)
    assert (report.model, report.version) == (
        "dianet-cxr",
        "1.0.0",
    )  # the manifest's, not the route's
    assert report.baseline.kind == "first" and report.baseline.studies == 100
    assert not report.baseline.forming
    assert report.studies == 120 and report.images == 240
    signals = by_signal(report)
    assert [s.signal for s in report.signals] == [
        "finding_rate", "review_rate", "ood_rate", "uncertainty", "ood_score",
        "predicted_label", "equipment", "site",
    ]  # fmt: skip
    assert all(s.status is Status.STABLE for s in report.signals), [
        (s.signal, s.statistic, s.p_value) for s in report.signals
    ]
    assert report.status is Status.STABLE
    assert signals["uncertainty"].baseline_n == 100
    assert signals["finding_rate"].baseline_text.endswith("%")


def test_a_new_scanner_and_its_uncertain_images_read_shifted(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    hour = dt.timedelta(hours=1)
    jobs.many(100, NOW - dt.timedelta(days=30), hour, seed=1, **TYPICAL)
    jobs.many(60, NOW - dt.timedelta(days=6), hour, seed=2, **TYPICAL)
    # a third of the recent studies from a scanner the model never saw: more uncertain,
    # farther from the training set, more often to review
    jobs.many(
        30,
        NOW - dt.timedelta(days=3),
        hour,
        seed=3,
        equipment=("Vantage Diagnostics VD-CR 12",),
        uncertainty=lambda rng: (rng.betavariate(5, 5), rng.betavariate(5, 5)),
        ood=lambda rng: rng.gauss(3.0, 0.2),
        review=lambda rng: rng.random() < 0.9,
        label=typical_label,
    )
    (report,) = ModelMonitor(ledger, cfg()).report(now=NOW)
    signals = by_signal(report)
    assert report.status is Status.SHIFTED
    for name in ("equipment", "uncertainty", "ood_score", "ood_rate", "review_rate"):
        assert signals[name].status is Status.SHIFTED, (name, signals[name])
    assert signals["site"].status is Status.STABLE  # the same calling AE sends it
    assert signals["predicted_label"].status is Status.STABLE
    assert "Vantage Diagnostics VD-CR 12 33%" in signals["equipment"].recent_text
    assert signals["ood_rate"].baseline_value == 0.0
    assert signals["ood_rate"].recent_value == pytest.approx(30 / 90)
    assert signals["review_rate"].statistic > 0  # z: up
    # where it comes from: the new scanner's studies, all out of distribution
    usual, new = report.by_source
    assert (usual["site"], usual["equipment"], usual["studies"]) == (
        "SITEA", "Northwind Imaging NW-DR 500", 60,
    )  # fmt: skip
    assert (new["equipment"], new["studies"], new["ood_rate"]) == (
        "Vantage Diagnostics VD-CR 12", 30, 1.0,
    )  # fmt: skip
    assert usual["ood_rate"] == 0.0 and new["median_ood_score"] > 2.0 > usual["median_ood_score"]
    # each group read against the baseline: the usual scanner's studies as before, the new
    # one's shifted on what the model says of them (its site and equipment are not read)
    assert (usual["status"], usual["moved"]) == ("stable", [])
    assert new["status"] == "shifted"
    assert set(new["moved"]) >= {"review_rate", "ood_rate", "ood_score"}
    assert not {"site", "equipment"} & set(new["moved"])
    assert report.baseline_figures["studies"] == 100
    assert report.baseline_figures["ood_rate"] == 0.0


def test_too_few_studies_are_not_compared(ledger_node: tuple[Settings, Ledger]) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    hour = dt.timedelta(hours=1)
    jobs.many(50, NOW - dt.timedelta(days=5), hour, seed=1, **TYPICAL)
    (report,) = ModelMonitor(ledger, cfg()).report(now=NOW)
    # every study is in the baseline, which is still forming: nothing recent to compare
    assert report.baseline.forming and report.baseline.studies == 50
    assert report.studies == 0
    assert report.status is Status.TOO_FEW
    assert all(s.statistic is None for s in report.signals)


def test_summaries_before_this_version_say_nothing_of_equipment_or_ood_rate(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    hour = dt.timedelta(hours=1)
    old = {"equipment": (), "ood_threshold": None}
    jobs.many(100, NOW - dt.timedelta(days=30), hour, seed=1, **TYPICAL, **old)
    jobs.many(60, NOW - dt.timedelta(days=6), hour, seed=2, **TYPICAL)
    (report,) = ModelMonitor(ledger, cfg()).report(now=NOW)
    signals = by_signal(report)
    assert signals["equipment"].status is Status.TOO_FEW  # not a shift from nothing
    assert signals["ood_rate"].status is Status.TOO_FEW
    assert signals["equipment"].baseline_text == "-"
    assert report.status is Status.STABLE


def test_each_version_has_its_own_baseline_and_a_model_filter(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    hour = dt.timedelta(hours=1)
    jobs.many(100, NOW - dt.timedelta(days=60), hour, seed=1, **TYPICAL)
    jobs.many(40, NOW - dt.timedelta(days=5), hour, seed=2, **TYPICAL)
    jobs.many(40, NOW - dt.timedelta(days=4), hour, seed=3, version="1.1.0", **TYPICAL)
    monitor = ModelMonitor(ledger, cfg())
    reports = monitor.report(now=NOW)
    assert [(r.version, r.baseline.studies, r.studies) for r in reports] == [
        ("1.0.0", 100, 40),
        ("1.1.0", 40, 0),  # its first 40 are its baseline, forming
    ]
    assert monitor.report(model="other", now=NOW) == []
    # a version with no study in the window is not reported
    assert [r.version for r in monitor.report(now=NOW - dt.timedelta(days=20))] == []


def test_a_pinned_baseline_and_the_trend(ledger_node: tuple[Settings, Ledger]) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    day = dt.timedelta(days=1)
    hour = dt.timedelta(hours=1)
    # the first studies were odd (the installation's test studies); the weeks after typical
    jobs.many(100, NOW - 60 * day, hour, seed=1, ood=lambda rng: rng.gauss(3.0, 0.2),
              label="nodule")  # fmt: skip
    jobs.many(100, NOW - 40 * day, hour, seed=2, **TYPICAL)
    jobs.many(60, NOW - 13 * day, hour, seed=5, **TYPICAL)
    jobs.many(60, NOW - 6 * day, hour, seed=4, **TYPICAL)
    monitor = ModelMonitor(ledger, cfg())
    assert monitor.report(now=NOW)[0].status is Status.SHIFTED  # against the odd first ones
    with pytest.raises(BaselineRefused, match="at least 30"):
        monitor.pin_baseline("dianet-cxr", "1.0.0", NOW - 20 * day, NOW - 19 * day, by="ml")
    with pytest.raises(BaselineRefused, match="after its start"):
        monitor.pin_baseline("dianet-cxr", "1.0.0", NOW, NOW - day, by="ml")
    pinned = monitor.pin_baseline("dianet-cxr", "1.0.0", NOW - 41 * day, NOW - 30 * day, by="ml")
    assert pinned == 100
    # pinned again: replaced
    assert (
        monitor.pin_baseline("dianet-cxr", "1.0.0", NOW - 41 * day, NOW - 35 * day, by="ml2") == 100
    )
    (report,) = monitor.report(now=NOW, weeks=2)
    assert report.baseline.kind == "pinned" and report.baseline.pinned_by == "ml2"
    assert report.baseline.studies == 100
    assert report.status is Status.STABLE
    assert [w["studies"] for w in report.trend] == [60, 0]
    assert report.trend[0]["status"] == "stable" and report.trend[1]["status"] == "too_few"
    as_json = report.as_json()
    assert as_json["baseline"]["kind"] == "pinned"
    assert as_json["signals"][0]["signal"] == "finding_rate"
    assert as_json["window"]["until"] == "2026-12-01T12:00:00Z"
    assert monitor.clear_baseline("dianet-cxr", "1.0.0")
    assert not monitor.clear_baseline("dianet-cxr", "1.0.0")
    assert monitor.report(now=NOW)[0].baseline.kind == "first"


def analyse_again(
    ledger: Ledger,
    job_id: int,
    at: dt.datetime,
    *,
    state: JobState = JobState.DELIVERED,
    **kwargs: Any,
) -> int:
    """The study of ``job_id`` analysed again as a new generation (``acwi-node studies
    reprocess``, or late instances re-opening it): the earlier job stays delivered. A job
    in ``state`` FAILED failed before writing its summary (an empty one)."""
    with ledger.session() as s:
        earlier = s.get_one(Job, job_id)
        study = s.get_one(Study, earlier.study_id)
        study.generation = max(study.generation, earlier.generation) + 1
        job = Job(
            study_id=study.id,
            generation=study.generation,
            route=earlier.route,
            model=earlier.model,
            state=state,
            started_at=at,
            summary={} if state == JobState.FAILED else summary(**kwargs),
        )
        s.add(job)
        s.flush()
        return int(job.id)


def test_a_study_analysed_again_counts_once_its_latest_analysis(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    day = dt.timedelta(days=1)
    hour = dt.timedelta(hours=1)
    jobs.many(100, NOW - 30 * day, hour, seed=1, **TYPICAL)
    first = jobs.many(40, NOW - 6 * day, hour, seed=2, **{**TYPICAL, "label": "normal"})
    for job_id in first:  # reprocessed by the same version, which now finds a nodule
        analyse_again(ledger, job_id, NOW - 2 * day, label="nodule")
    monitor = ModelMonitor(ledger, cfg())
    (report,) = monitor.report(now=NOW)
    assert report.baseline.studies == 100
    # each study once, as its latest analysis read it (one image, a nodule)
    assert report.studies == 40 and report.images == 40
    assert by_signal(report)["finding_rate"].recent_value == 1.0
    assert sum(row["studies"] for row in report.by_source) == 40
    # pinning counts the studies as their latest analyses: none left in the first period
    with pytest.raises(BaselineRefused, match="analysed 0 studies"):
        monitor.pin_baseline("dianet-cxr", "1.0.0", NOW - 7 * day, NOW - 3 * day, by="ml")
    assert monitor.pin_baseline("dianet-cxr", "1.0.0", NOW - 3 * day, NOW, by="ml") == 40


def test_a_study_analysed_again_by_another_version_counts_once_for_each(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    day = dt.timedelta(days=1)
    hour = dt.timedelta(hours=1)
    first = jobs.many(40, NOW - 9 * day, hour, seed=1, **TYPICAL)
    for job_id in first:
        # reprocessed twice: by the same version, then by the next (another generation)
        again = analyse_again(ledger, job_id, NOW - 6 * day, label="normal")
        analyse_again(ledger, again, NOW - 3 * day, label="nodule", version="1.1.0")
    reports = ModelMonitor(ledger, cfg(baseline_studies=40)).report(now=NOW)
    # 1.0.0 saw each study once (its second analysis), 1.1.0 once: each its baseline
    assert [(r.version, r.baseline.studies, r.studies) for r in reports] == [
        ("1.0.0", 40, 0),
        ("1.1.0", 40, 0),
    ]
    old, new = reports
    assert old.baseline_figures["finding_rate"] == 0.0  # the second analysis, not the first
    assert new.baseline_figures["finding_rate"] == 1.0


def test_a_later_analysis_that_failed_leaves_the_earlier_counted(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    day = dt.timedelta(days=1)
    hour = dt.timedelta(hours=1)
    first = jobs.many(40, NOW - 9 * day, hour, seed=1, **{**TYPICAL, "label": "normal"})
    for n, job_id in enumerate(first):
        again = analyse_again(ledger, job_id, NOW - 6 * day, label="nodule")
        # reprocessed once more: half failed before their summary, half were analysed and
        # then superseded (late instances re-opened the study while its results were sent)
        if n % 2:
            analyse_again(ledger, again, NOW - 3 * day, state=JobState.FAILED)
        else:
            analyse_again(ledger, again, NOW - 3 * day, state=JobState.SUPERSEDED, label="normal")
    # summaries of a node before model identity was kept: the route's model, no version
    # (as a failed job's empty summary reads), analysed once and failed when reprocessed
    for job_id in jobs.many(30, NOW - 8 * day, hour, seed=2, **TYPICAL):
        with ledger.session() as s:
            job = s.get_one(Job, job_id)
            job.summary = {k: v for k, v in job.summary.items() if k != "model"}
        analyse_again(ledger, job_id, NOW - 3 * day, state=JobState.FAILED)
    legacy, report = ModelMonitor(ledger, cfg(baseline_studies=40)).report(now=NOW)
    assert report.baseline.studies == 40 and not report.baseline.forming
    assert report.baseline_figures["finding_rate"] == 1.0  # the second analysis, counted
    assert (legacy.model, legacy.version, legacy.baseline.studies) == ("cxr-route-model", "", 30)


def test_sample_of_a_summary() -> None:
    assert sample_of(1, "m", NOW, {}, "A") is None  # a job that analysed nothing
    s = sample_of(1, "route-model", NOW, summary(label="nodule", ood=2.5), "")
    assert s is not None
    assert s.finding and s.ood is True and s.site == "-"
    assert s.model == "dianet-cxr" and s.equipment == ("Northwind Imaging NW-DR 500",)
    bare = {"probabilities": {"a": 1.0}, "predicted_label": "a", "ood_score": 1.0,
            "uncertainty": {"score": 0.3}}  # fmt: skip
    s = sample_of(2, "route-model", NOW, bare, "B")
    assert s is not None
    assert s.model == "route-model" and s.version == "" and s.ood is None
    assert s.uncertainty == 0.3 and s.ood_score == 1.0 and s.images == 1


def test_compare_without_samples() -> None:
    results = compare([], [], cfg())
    assert {r.status for r in results} == {Status.TOO_FEW}


def test_a_baseline_period_is_read_and_shown_on_the_hospital_s_clock(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The dates an administrator pins (the page's date fields, the command's --since and
    --until) are the hospital's days, as every time the page shows: they were read as UTC days,
    so a Berlin baseline "from 2026-11-01" began at 01:00 on the hospital's clock, and the
    first hour's studies were left out."""
    from acwi_node.monitoring import pinning
    from acwi_node.monitoring.commands import format_reports

    _settings, ledger = ledger_node
    jobs = Jobs(ledger)
    hour = dt.timedelta(hours=1)
    # from 00:30 on 1 November in Berlin (23:30 UTC the day before), one an hour
    jobs.many(60, dt.datetime(2026, 10, 31, 23, 30), hour, seed=1, **TYPICAL)
    jobs.many(40, NOW - dt.timedelta(days=6), hour, seed=2, **TYPICAL)
    monitor = ModelMonitor(ledger, cfg(timezone="Europe/Berlin"))
    notice = pinning.pin(monitor, "dianet-cxr", "1.0.0", "2026-11-01", "2026-11-02", by="ml")
    assert notice == (
        "dianet-cxr 1.0.0: baseline pinned, 48 studies from 2026-11-01 00:00 +0100"
        " to 2026-11-03 00:00 +0100"
    )
    (report,) = monitor.report(now=NOW)
    assert report.baseline.since == dt.datetime(2026, 10, 31, 23, 0)  # UTC, as the ledger's
    assert report.baseline.until == dt.datetime(2026, 11, 2, 23, 0)
    # a time of day is the hospital's too, unless it carries its own offset
    pinning.pin(monitor, "dianet-cxr", "1.0.0", "2026-11-01T06:00", "2026-11-02T20:30Z", by="ml")
    (report,) = monitor.report(now=NOW)
    assert report.baseline.since == dt.datetime(2026, 11, 1, 5, 0)
    assert report.baseline.until == dt.datetime(2026, 11, 2, 20, 30)
    printed = format_reports([report], days=7, target=100, zone="Europe/Berlin")
    assert "39 studies from 2026-11-01 06:00 +0100 to 2026-11-02 21:30 +0100" in printed
    with pytest.raises(BaselineRefused, match="from 2026-11-01 00:00 [+]0100 to 2026-11-01 02:00"):
        pinning.pin(monitor, "dianet-cxr", "1.0.0", "2026-11-01", "2026-11-01T02:00", by="ml")
    with pytest.raises(BaselineRefused, match="not a date"):
        pinning.pin(monitor, "dianet-cxr", "1.0.0", "2026-11-01", "9999-12-31", by="ml")
