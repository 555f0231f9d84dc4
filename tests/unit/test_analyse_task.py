"""The analyse task's handling of result objects (:func:`acwi_node.tasks.analyse.run_job`)."""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import logging
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from acwi_node.config import Settings
from acwi_node.dicom_pixels import PIXEL_DATA
from acwi_node.ingest.spool import Spool, SpoolError
from acwi_node.ledger import InstanceRecord, Ledger, ResultFile, RoutedJob
from acwi_node.ledger.models import Job, Study, utcnow
from acwi_node.results.sr import summarise_sr
from acwi_node.results.uids import result_uids
from acwi_node.tasks import analyse
from models.data.synth import write_ct_series, write_enhanced_ct, write_study
from tests.support.claim_loss import lose_claim_at_first_batch
from tests.support.dciodvfy import dciodvfy_errors, dciodvfy_path
from tests.support.dx import make_dx
from tests.support.review_case import (
    DESTINATION,
    MODEL,
    ROUTE,
    make_review_case,
    review_settings,
    store_and_route,
)
from tests.support.study_flow import complete, receive


def test_a_studys_pixel_data_stays_in_the_spool_while_its_results_are_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker holds a CT's headers, not its slices: each slice's Pixel Data is read from
    its spool file when the model reads it and when its heatmap is drawn, and let go again
    (a 1,000-slice CT held 500 MiB more)."""
    in_file: list[bool] = []
    real = analyse.build_heatmap_sc

    def build(source: Any, *args: Any, **kwargs: Any) -> Any:
        in_file.append(source.get_item(PIXEL_DATA, keep_deferred=True).value is None)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(analyse, "build_heatmap_sc", build)
    route = _route()
    route["match"] = {"modality": ["CT"]}
    settings = review_settings(tmp_path, routes=[route])
    study_uid, _, _ = _analysed(settings, write_ct_series(tmp_path / "ct", slices=3, size=512))
    assert in_file == [True, True, True]  # after the analysis and the SR
    assert _result_classes(settings, study_uid) == [SC_CLASS] * 3 + [SR_CLASS]


def test_each_result_object_is_written_before_the_next_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CT's hundreds of heatmaps (0.75 MiB each at 512 x 512) are never all in memory: by
    the time the worker builds a heatmap, every one built before it is on disk and gone."""
    built: list[weakref.ref[Any]] = []
    alive_at_build: list[int] = []
    real = analyse.build_heatmap_sc

    def build(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        ds = real(*args, **kwargs)
        built.append(weakref.ref(ds))
        return ds

    monkeypatch.setattr(analyse, "build_heatmap_sc", build)
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    try:
        _, study_uid = make_review_case(settings, ledger, tmp_path)
    finally:
        ledger.dispose()
    assert alive_at_build == [0, 0]  # two images: two heatmaps, the first gone before the second
    files = sorted(p.name for p in (settings.results_dir / study_uid).glob("*.dcm"))
    assert len(files) == 3  # the SR and both heatmaps
    # each heatmap's map beside it, for the review page's overlay
    assert len(list((settings.results_dir / study_uid).glob("*.heat.npy"))) == 2


def test_a_job_that_stopped_its_workers_too_often_fails_when_taken_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``worker.max_attempts``: the analyse task, handed a job whose workers all stopped mid-way
    (their leases ran out), fails it with the reason instead of analysing it once more."""
    settings = review_settings(tmp_path)
    settings.worker.max_attempts = 2
    ledger = Ledger(settings.database_url)
    try:
        receive(settings, ledger, "1.2.3", "1.2.3.1")
        job, _ = complete(ledger, "1.2.3")
        for _ in range(2):  # two workers took it, and stopped without a word
            assert ledger.claim_job(job, lease_s=0) is not None
        stale = utcnow() - dt.timedelta(seconds=2 * settings.worker.lease_s)
        with ledger.session() as s:
            s.execute(update(Job).where(Job.id == job).values(heartbeat_at=stale))
        with caplog.at_level(logging.ERROR, logger="acwi_node.ledger"):
            assert analyse.run_job(settings, ledger, job) == "skipped"
        st = ledger.get_study("1.2.3")
        assert st is not None and st["state"] == "failed"
        assert "did not finish in 2 attempt(s)" in st["reason"]
        assert "did not finish in 2 attempt(s)" in caplog.text
    finally:
        ledger.dispose()


def _dx_study_with_a_screen_capture(tmp_path: Path) -> list[Path]:
    """Two radiographs and a greyscale screen capture (Modality OT) of them, one study: the
    capture is an image the model could read, and must not."""
    files = write_study(tmp_path / "src", n_images=3, size=128, seed=3)
    capture = pydicom.dcmread(files[2])
    capture.Modality = "OT"
    capture.save_as(files[2])
    return files


def _route(select: dict[str, Any] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": ROUTE,
        "match": {"modality": ["DX"]},
        "model": MODEL,
        "destinations": [DESTINATION],
    }
    if select is not None:
        route["select"] = select
    return route


def _not_analysed(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "acwi_worker_images_not_analysed_total", {"model": MODEL, "reason": reason}
    )
    return value or 0.0


def test_the_route_selects_the_instances_its_model_reads(tmp_path: Path) -> None:
    """``[routes.select]`` (here its default, the route's own modality): the capture is left out
    with the reason; the figures, the SR's references and the heatmaps are the radiographs'."""
    settings = review_settings(tmp_path, routes=[_route()])
    files = _dx_study_with_a_screen_capture(tmp_path)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(settings, ledger, files)
        before = _not_analysed("not_selected")
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
        assert _not_analysed("not_selected") == before + 1
        (job,) = ledger.get_study(study_uid)["jobs"]  # type: ignore[index]
        summary = job["summary"]
        assert [im["sop_instance_uid"] for im in summary["images"]] == uids[:2]
        assert summary["skipped"] == {uids[2]: f"not selected by route {ROUTE!r}: Modality OT"}
        results = sorted((settings.results_dir / study_uid).glob("*.dcm"))
        objects = [pydicom.dcmread(p) for p in results]
        (sr,) = [ds for ds in objects if ds.Modality == "SR"]
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert referenced == set(uids[:2])
        heatmap_sources = {
            str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            for ds in objects
            if ds.Modality != "SR"
        }
        assert heatmap_sources == set(uids[:2])
    finally:
        ledger.dispose()


def _failing_job(settings: Settings, files: list[Path], kind: str) -> tuple[dict[str, Any], float]:
    """Route the study and run its job, which must fail: the study, and how many of its
    images the metric counted as not analysed for ``kind``."""
    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(settings, ledger, files)
        before = _not_analysed(kind)
        assert analyse.run_job(settings, ledger, job_id) == "failed"
        st = ledger.get_study(study_uid)
        assert st is not None and st["state"] == "failed"
        return st, _not_analysed(kind) - before
    finally:
        ledger.dispose()


def test_a_study_the_route_selects_nothing_of_fails_with_the_reason(tmp_path: Path) -> None:
    settings = review_settings(tmp_path, routes=[_route({"modality": ["CT"]})])
    st, counted = _failing_job(settings, _dx_study_with_a_screen_capture(tmp_path), "not_selected")
    assert counted == 3
    assert "no image could be analysed" in st["reason"]
    assert f"not selected by route {ROUTE!r}: Modality DX" in st["reason"]
    assert not (settings.results_dir / st["study_uid"]).exists()


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("not selected by route 'ct': Modality PT", "not_selected"),
        ("unreadable: File is missing DICOM File Meta Information header", "unreadable"),
        ("1.2.3: a localizer (scout) image, not analysed", "localizer"),
        ("1.2.3: pixel data could not be decoded: no plugin", "undecodable"),
        (
            "1.2.3: pixel data could not be decoded: 40 frames declared, the pixel data holds 2",
            "undecodable",
        ),
        ("1.2.3: not a greyscale image (SamplesPerPixel 3, ...)", "unsupported"),
    ],
)
def test_each_reason_an_image_is_not_analysed_has_its_metric_label(reason: str, kind: str) -> None:
    assert analyse.not_analysed_kind(reason) == kind


def test_images_of_a_study_with_nothing_to_analyse_are_counted(tmp_path: Path) -> None:
    """A study whose every image the model refuses (here two localizers): the job fails, and
    the metric counts each image with its reason."""
    settings = review_settings(tmp_path, routes=[_route()])
    files = write_study(tmp_path / "src", n_images=2, size=64, seed=5)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    st, counted = _failing_job(settings, files, "localizer")
    assert counted == 2
    assert "localizer" in st["reason"]


def test_images_the_route_leaves_out_are_not_held_while_the_study_is_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series the route leaves out (a PET/CT's PET, a CT's reformats: hundreds of images)
    is dropped as it is read: no image left out is alive when the next file is read, nor
    when the model runs."""
    read: list[weakref.ref[Any]] = []
    left_out_alive: list[int] = []
    real_read = analyse.read_deferred
    real_analyse = analyse.Analyser.analyse

    def count_left_out_alive() -> None:
        gc.collect()
        alive = [ref() for ref in read]
        left_out_alive.append(sum(ds is not None and ds.Modality == "OT" for ds in alive))

    def read_deferred(*args: Any, **kwargs: Any) -> Any:
        count_left_out_alive()
        ds = real_read(*args, **kwargs)
        read.append(weakref.ref(ds))
        return ds

    def analyse_study(self: Any, datasets: Any, **kwargs: Any) -> Any:
        count_left_out_alive()
        return real_analyse(self, datasets, **kwargs)

    monkeypatch.setattr(analyse, "read_deferred", read_deferred)
    monkeypatch.setattr(analyse.Analyser, "analyse", analyse_study)
    settings = review_settings(tmp_path, routes=[_route()])
    files = write_study(tmp_path / "src", n_images=4, size=64, seed=6)
    for path in files[:2]:  # two screen captures, read first
        capture = pydicom.dcmread(path)
        capture.Modality = "OT"
        capture.save_as(path)
    ledger = Ledger(settings.database_url)
    try:
        job_id, _ = store_and_route(settings, ledger, files)
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
    finally:
        ledger.dispose()
    assert len(read) == 4
    assert left_out_alive == [0, 0, 0, 0, 0]  # before each of the four reads, and the model


def _result_classes(settings: Settings, study_uid: str) -> list[str]:
    folder = settings.results_dir / study_uid
    return sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in folder.glob("*.dcm")
    )


def _analysed(
    settings: Settings, files: list[Path]
) -> tuple[str, list[tuple[str, str]], dict[str, Any]]:
    """Route the study and run its job, which must analyse it: the study UID, the deliveries
    queued (destination, path) and the study as the ledger shows it."""
    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(settings, ledger, files)
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
        queued = [(d.destination, d.path) for d in ledger.due_deliveries()]
        st = ledger.get_study(study_uid)
        assert st is not None
        return study_uid, queued, st
    finally:
        ledger.dispose()


SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"


@pytest.mark.parametrize(
    ("worker_policy", "route_policy", "heatmaps"),
    [
        ("all", "none", 0),  # a route whose PACS wants the SR alone
        ("none", "positive_or_uncertain", 2),  # every image of the review model is uncertain
        ("none", None, 0),  # the route says nothing: the worker's policy
        ("all", None, 2),
    ],
)
def test_a_routes_heatmap_policy_overrides_the_workers(
    tmp_path: Path, worker_policy: str, route_policy: str | None, heatmaps: int
) -> None:
    route = _route()
    if route_policy is not None:
        route["results"] = {"heatmaps": route_policy}
    settings = review_settings(tmp_path, routes=[route])
    settings.worker.heatmaps = worker_policy  # type: ignore[assignment]
    study_uid, _, _ = _analysed(
        settings, write_study(tmp_path / "src", n_images=2, size=64, seed=7)
    )
    assert _result_classes(settings, study_uid) == [SC_CLASS] * heatmaps + [SR_CLASS]


def test_the_heatmaps_of_both_sides_are_a_series_that_names_neither(tmp_path: Path) -> None:
    """Radiographs of the left and the right hand: their heatmaps are one series, whose
    Laterality (General Series) says no side in either heatmap (a PACS keeps one value for the
    series)."""
    files = write_study(tmp_path / "src", n_images=2, size=64, seed=7)
    for path, side in zip(files, ("L", "R"), strict=True):
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "HAND"
        ds.ImageLaterality = side
        ds.save_as(path)
    settings = review_settings(tmp_path, routes=[_route()])
    settings.worker.heatmaps = "all"
    study_uid, _, _ = _analysed(settings, files)
    heatmaps = [
        pydicom.dcmread(p, stop_before_pixels=True)
        for p in (settings.results_dir / study_uid).glob("*.dcm")
    ]
    heatmaps = [ds for ds in heatmaps if ds.SOPClassUID == SC_CLASS]
    assert len(heatmaps) == 2 and len({ds.SeriesInstanceUID for ds in heatmaps}) == 1
    assert [(ds.Laterality, ds.BodyPartExamined) for ds in heatmaps] == [("", "HAND")] * 2


def test_a_studys_heatmaps_read_each_sources_anatomy_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heatmap series' anatomy is what all its sources share: read once for the study,
    not once per heatmap for every source (a CT of 400 slices, a heatmap each, spent 4 s
    reading it 160,000 times)."""
    from acwi_node.results import headers

    reads: list[str] = []
    real = headers._anatomy

    def counted(source: pydicom.Dataset) -> tuple[str, str]:
        reads.append(str(source.SOPInstanceUID))
        return real(source)

    monkeypatch.setattr(headers, "_anatomy", counted)
    files = write_ct_series(tmp_path / "ct", slices=6, size=64)
    settings = review_settings(tmp_path, routes=[{**_route(), "match": {"modality": ["CT"]}}])
    settings.worker.heatmaps = "all"
    study_uid, _, _ = _analysed(settings, files)
    heatmaps = [
        ds
        for ds in (
            pydicom.dcmread(p, stop_before_pixels=True)
            for p in (settings.results_dir / study_uid).glob("*.dcm")
        )
        if ds.SOPClassUID == SC_CLASS
    ]
    assert len(heatmaps) == 6
    assert len(reads) == len(set(reads)) == 6
    assert {ds.get("BodyPartExamined") for ds in heatmaps} == {
        pydicom.dcmread(files[0], stop_before_pixels=True).get("BodyPartExamined")
    }


def test_a_route_asks_for_parametric_maps_the_worker_does_not_write(tmp_path: Path) -> None:
    route = _route()
    route["match"] = {"modality": ["CT"]}
    route["results"] = {"heatmaps": "none", "parametric_maps": True}
    settings = review_settings(tmp_path, routes=[route])
    assert settings.worker.parametric_maps is False
    study_uid, _, _ = _analysed(settings, write_ct_series(tmp_path / "ct", slices=3, size=64))
    assert _result_classes(settings, study_uid) == [PM_CLASS, SR_CLASS]


def _region_thresholds(sr: pydicom.Dataset) -> list[float]:
    """The "Heatmap region threshold" of each AI region of an SR, wherever it is nested."""
    found: list[float] = []

    def walk(items: Any) -> None:
        for item in items or []:
            names = item.get("ConceptNameCodeSequence") or []
            if names and names[0].CodeMeaning == "Heatmap region threshold":
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence"))

    walk(sr.ContentSequence)
    return found


def _box_holds(outer: list[int], inner: list[int]) -> bool:
    return outer[:2] <= inner[:2] and outer[2] >= inner[2] and outer[3] >= inner[3]


def test_each_route_has_the_sr_regions_its_model_localises_with(tmp_path: Path) -> None:
    """``[routes.results] sr_regions`` and ``sr_region_fraction`` in place of the worker's:
    the same images routed three ways give an SR without AI regions (a model whose heatmaps do
    not localise), with them at the worker's fraction (the route says nothing), and with them
    at the route's fraction, whose lower threshold finds a larger box around the same peak."""
    routes = [
        {**_route(), "name": "no-regions", "results": {"sr_regions": False}},
        _route(),
        {**_route(), "name": "wide-regions", "results": {"sr_region_fraction": 0.2}},
    ]
    settings = review_settings(tmp_path, routes=routes)
    assert settings.worker.sr_regions is True and settings.worker.sr_region_fraction == 0.5
    read: dict[str, pydicom.Dataset] = {}
    ledger = Ledger(settings.database_url)
    try:
        for n, route in enumerate(("no-regions", ROUTE, "wide-regions")):
            files = write_study(  # the same pixels each time, another study
                tmp_path / route,
                n_images=2,
                size=128,
                seed=7,
                study_instance_uid=f"1.2.826.0.1.3680043.8.498.77.{n + 1}",
                accession_number=f"ACC{n}",
            )
            job_id, study_uid = store_and_route(settings, ledger, files, route=route)
            assert analyse.run_job(settings, ledger, job_id) == "analysed"
            (job,) = ledger.get_study(study_uid)["jobs"]  # type: ignore[index]
            uid = job["summary"]["sr_sop_instance_uid"]
            read[route] = pydicom.dcmread(settings.results_dir / study_uid / f"{uid}.dcm")
    finally:
        ledger.dispose()
    regions = {route: summarise_sr(sr)["ai_regions"] for route, sr in read.items()}
    assert regions["no-regions"] == [] and _region_thresholds(read["no-regions"]) == []
    assert len(regions[ROUTE]) == 2 and len(regions["wide-regions"]) == 2
    assert _region_thresholds(read[ROUTE]) == [pytest.approx(0.5)] * 2
    assert _region_thresholds(read["wide-regions"]) == [pytest.approx(0.2)] * 2
    boxes = {route: [r["box"] for r in regions[route]] for route in (ROUTE, "wide-regions")}
    assert boxes["wide-regions"] != boxes[ROUTE]
    for wide, default in zip(boxes["wide-regions"], boxes[ROUTE], strict=True):
        assert _box_holds(wide, default), (wide, default)


def test_the_worker_queues_each_destination_only_the_kinds_it_takes(tmp_path: Path) -> None:
    """``[[destinations]] results = ["sr"]``: the SR is queued for that destination, the
    heatmaps are written (the review page shows them) but not sent there."""
    settings = review_settings(tmp_path, routes=[_route()])
    settings.destinations[0].results = ["sr"]
    files = write_study(tmp_path / "src", n_images=2, size=64, seed=8)
    study_uid, queued, st = _analysed(settings, files)
    (job,) = st["jobs"]
    assert queued == [(DESTINATION, f"{study_uid}/{job['summary']['sr_sop_instance_uid']}.dcm")]
    assert _result_classes(settings, study_uid) == [SC_CLASS, SC_CLASS, SR_CLASS]


def test_an_enhanced_ct_is_analysed_frame_by_frame(tmp_path: Path) -> None:
    """One multi-frame image of four frames: a result per frame in the job summary, an SR
    whose evidence is the image once, a heatmap per frame (its own UID), and the route's
    parametric map with a frame per frame."""
    route = _route()
    route["match"] = {"modality": ["CT"]}
    route["results"] = {"parametric_maps": True}
    settings = review_settings(tmp_path, routes=[route])
    path = write_enhanced_ct(tmp_path / "ct", slices=4, size=64)
    study_uid, queued, st = _analysed(settings, [path])
    (job,) = st["jobs"]
    summary = job["summary"]
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert [(im["sop_instance_uid"], im["frame_number"]) for im in summary["images"]] == [
        (sop, n) for n in range(1, 5)
    ]
    assert summary["skipped"] == {}
    assert _result_classes(settings, study_uid) == [PM_CLASS] + [SC_CLASS] * 4 + [SR_CLASS]
    sr = pydicom.dcmread(settings.results_dir / study_uid / f"{summary['sr_sop_instance_uid']}.dcm")
    evidence = [
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert evidence == [sop]
    uids = result_uids(study_uid, summary["model"]["name"], summary["model"]["version"])
    pmap = uids.parametric_map_instance_uid(sop, 64, 64)
    heatmaps = {Path(p).stem for _, p in queued} - {summary["sr_sop_instance_uid"], pmap}
    assert heatmaps == {uids.heatmap_instance_uid(sop, n) for n in range(1, 5)}
    assert (
        int(pydicom.dcmread(settings.results_dir / study_uid / f"{pmap}.dcm").NumberOfFrames) == 4
    )


def test_a_job_whose_study_re_opened_while_it_ran_is_superseded_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More of the study arrives while its job runs, and the job then stops on an error (a
    file replaced under it, its Pixel Data read when used): the job of the outdated version
    is superseded, with the error kept, not failed; no error is logged, and the study is
    the newer version's (receiving)."""
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    files = write_study(tmp_path / "src", n_images=1, size=64, seed=3)
    try:
        job_id, study_uid = store_and_route(settings, ledger, files)

        def more_arrives_then_fails(*args: Any, **kwargs: Any) -> Any:
            ledger.record_instance(
                InstanceRecord(
                    study_uid=study_uid,
                    sop_instance_uid="2.25.42",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    series_uid="2.25.43",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    modality="DX",
                    body_part="CHEST",
                    path=f"{study_uid}/2.25.42.dcm",
                    size=1,
                    calling_ae="SITEA",
                ),
                first_in_association=True,
            )
            raise ValueError("Deferred read -- original element not found")

        monkeypatch.setattr(analyse, "build_sr", more_arrives_then_fails)
        with caplog.at_level(logging.INFO, logger="acwi_node"):
            assert analyse.run_job(settings, ledger, job_id) == "superseded"
        with ledger.session() as s:
            job = s.get_one(Job, job_id)
            assert job.state.value == "superseded" and "ValueError" in job.error
        st = ledger.get_study(study_uid)
        assert st is not None and st["state"] == "receiving"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "superseded while it ran" in caplog.text
    finally:
        ledger.dispose()


def _dciodvfy_errors(folder: Path) -> dict[str, list[str]]:
    """Each result object's dciodvfy errors (none checked where dciodvfy is not installed)."""
    if dciodvfy_path() is None:
        return {}
    return {p.name: errors for p in sorted(folder.glob("*.dcm")) if (errors := dciodvfy_errors(p))}


def _frame_numbers(ds: pydicom.Dataset) -> list[object]:
    """Every Referenced Frame Number anywhere in ``ds``."""
    found: list[object] = []

    def visit(dataset: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.keyword == "ReferencedFrameNumber":
            found.append(element.value)

    ds.walk(visit)
    return found


@pytest.mark.parametrize(
    ("slope", "intercept", "why"),
    [
        (None, None, "Rescale Slope empty"),
        (1, None, "Rescale Intercept empty"),
        (["1", "2"], 0, "Rescale Slope has 2 values"),
    ],
    ids=["empty", "empty-intercept", "two-slopes"],
)
def test_an_image_with_an_invalid_rescale_is_skipped_and_the_rest_analysed(
    tmp_path: Path, slope: object, intercept: object, why: str
) -> None:
    """One image of the study with an empty or multi-valued Rescale Slope or Intercept is
    listed as skipped with the reason and counted (``unsupported``); the other is analysed,
    its SR and heatmap written and valid, the SR naming it alone."""
    settings = review_settings(tmp_path, routes=[_route()])
    files = write_study(tmp_path / "src", n_images=2, size=64, seed=9)
    bad = pydicom.dcmread(files[1])
    bad.RescaleSlope = slope
    bad.RescaleIntercept = intercept
    bad.save_as(files[1])
    good_uid, bad_uid = (
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
    )
    before = _not_analysed("unsupported")
    study_uid, _, st = _analysed(settings, files)
    assert _not_analysed("unsupported") == before + 1
    summary = st["jobs"][0]["summary"]
    assert [im["sop_instance_uid"] for im in summary["images"]] == [good_uid]
    assert summary["skipped"] == {bad_uid: f"{bad_uid}: invalid Rescale Slope/Intercept ({why})"}
    assert _result_classes(settings, study_uid) == [SC_CLASS, SR_CLASS]
    folder = settings.results_dir / study_uid
    sr = pydicom.dcmread(folder / f"{summary['sr_sop_instance_uid']}.dcm")
    evidence = [
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert evidence == [good_uid]
    assert _dciodvfy_errors(folder) == {}


def test_a_radiograph_with_an_ow_voi_lut_and_no_window_is_analysed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A radiograph whose VOI is a VOI LUT Sequence (its LUT Data read as OW bytes) and no
    window: its heatmap shows it through that LUT, and the study is analysed, its objects
    valid; nothing is logged about the LUT."""
    source = make_dx(generate_uid(), window=False)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    source.VOILUTSequence = [item]
    path = tmp_path / "dx.dcm"
    source.save_as(path, enforce_file_format=True)
    settings = review_settings(tmp_path, routes=[_route()])
    with caplog.at_level(logging.INFO, logger="acwi_node"):
        study_uid, _, _ = _analysed(settings, [path])
    assert _result_classes(settings, study_uid) == [SC_CLASS, SR_CLASS]
    assert "VOI" not in caplog.text
    assert max(len(line) for line in caplog.text.splitlines()) < 1000
    assert _dciodvfy_errors(settings.results_dir / study_uid) == {}


def test_a_dx_image_that_says_it_has_several_frames_is_skipped(tmp_path: Path) -> None:
    """A DX image (a single-frame IOD) sent with Number of Frames 3 is listed as skipped with
    the reason, counted (``unsupported``), and referenced nowhere: no result names a frame of
    it, and every object written is valid. The study's other radiograph is analysed."""
    study = generate_uid()
    frames = make_dx(study)
    pixels = np.frombuffer(frames.PixelData, np.uint16).reshape(frames.Rows, frames.Columns)
    frames.NumberOfFrames = 3
    frames.PixelData = np.stack([pixels, pixels[::-1], pixels[:, ::-1]]).tobytes()
    good = make_dx(study, number=2)
    files = []
    for n, ds in enumerate([frames, good]):
        files.append(tmp_path / f"{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    settings = review_settings(tmp_path, routes=[_route()])
    before = _not_analysed("unsupported")
    study_uid, _, st = _analysed(settings, files)
    assert _not_analysed("unsupported") == before + 1
    summary = st["jobs"][0]["summary"]
    uid = str(frames.SOPInstanceUID)
    assert [im["sop_instance_uid"] for im in summary["images"]] == [str(good.SOPInstanceUID)]
    assert "frame_number" not in summary["images"][0]
    assert summary["skipped"] == {
        uid: f"{uid}: Number of Frames 3 in an image of a single-frame SOP Class (Digital "
        "X-Ray Image Storage - For Presentation, not multi-frame), not analysed"
    }
    folder = settings.results_dir / study_uid
    objects = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    assert len(objects) == 2 and all(_frame_numbers(ds) == [] for ds in objects)
    assert _dciodvfy_errors(folder) == {}


def _fail_on_second_heatmap(
    monkeypatch: pytest.MonkeyPatch, before_failing: Callable[[], None] | None = None
) -> None:
    """Make the worker's second heatmap fail (after ``before_failing``) with a long message,
    as a numpy error quoting a LUT's bytes did: the SR and the first heatmap are written."""
    real = analyse.build_heatmap_sc
    calls = itertools.count(1)

    def build(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 2:
            if before_failing is not None:
                before_failing()
            raise ValueError("could not convert string to float: " + repr(bytes(range(256)) * 8))
        return real(*args, **kwargs)

    monkeypatch.setattr(analyse, "build_heatmap_sc", build)


def test_a_job_that_fails_after_writing_results_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SR and a heatmap (and its map for the review page) were written when the second
    heatmap failed: no ledger row names them and nothing would send them, so they are
    removed; the reason quotes the error's first few hundred characters only."""
    _fail_on_second_heatmap(monkeypatch)
    settings = review_settings(tmp_path, routes=[_route()])
    st, _ = _failing_job(settings, write_study(tmp_path / "src", n_images=2, size=64), "x")
    folder = settings.results_dir / st["study_uid"]
    assert sorted(p.name for p in folder.glob("*")) == []
    assert st["reason"].startswith(f"{ROUTE}: analysis failed: ValueError: could not convert")
    assert len(st["reason"]) < 400 and st["reason"].endswith("...")


def test_a_job_whose_results_a_full_disk_refuses_waits_in_the_queue_and_is_analysed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data disk filled while the worker wrote a study's results: the job failed for good,
    and storage retention, short of space, deleted the failed study's images at once. The job
    goes back to the queue instead, its attempt not counted and its files removed, and is
    analysed once there is room."""
    settings = review_settings(tmp_path, routes=[_route()])
    files = write_study(tmp_path / "src", n_images=2, size=64)
    real = Spool.write
    calls = itertools.count(1)

    def full_disk(self: Spool, *args: Any, **kwargs: Any) -> Any:
        if next(calls) == 2:  # the SR was written; the first heatmap finds the disk full
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                raise SpoolError("cannot write to spool: full", out_of_space=True) from exc
        return real(self, *args, **kwargs)

    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(settings, ledger, files)
        monkeypatch.setattr(Spool, "write", full_disk)
        assert analyse.run_job(settings, ledger, job_id) == "postponed"
        st = ledger.get_study(study_uid)
        assert st is not None and st["state"] == "queued", st
        assert list((settings.results_dir / study_uid).glob("*")) == []
        with ledger.session() as s:
            job = s.get_one(Job, job_id)
            assert (job.state.value, job.attempts, job.error) == ("queued", 0, "")
            assert job.enqueued_at is not None  # the reconciler sends it again in time
        monkeypatch.setattr(Spool, "write", real)  # room again
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
        assert _result_classes(settings, study_uid) == [SC_CLASS] * 2 + [SR_CLASS]
    finally:
        ledger.dispose()


def test_a_failed_job_leaves_a_file_another_job_wrote_over_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the job ran, another (of the study's next version) wrote the SR of the same UID:
    that file is not the failed job's and stays; the job's own heatmap goes."""
    settings = review_settings(tmp_path, routes=[_route()])
    files = write_study(tmp_path / "src", n_images=2, size=64)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    folder = settings.results_dir / study_uid

    def another_job_writes_the_sr() -> None:
        (sr,) = [p for p in folder.glob("*.dcm") if pydicom.dcmread(p).Modality == "SR"]
        Spool(settings.results_dir, fsync=False).store(study_uid, sr.stem, b"another job's")

    _fail_on_second_heatmap(monkeypatch, another_job_writes_the_sr)
    _failing_job(settings, files, "x")
    assert [p.read_bytes() for p in folder.glob("*")] == [b"another job's"]


def test_a_failed_job_keeps_the_files_an_earlier_analysis_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study's first analysis wrote its SR alone (``heatmaps = "none"``); analysed again
    (reprocessed, the same model version: the same UIDs), the job rewrites that SR, writes a
    heatmap and fails: the SR stays, the earlier analysis's result row names it; the heatmap,
    which no row names, goes."""
    route = _route()
    route["results"] = {"heatmaps": "none"}
    settings = review_settings(tmp_path, routes=[route])
    ledger = Ledger(settings.database_url)
    try:
        files = write_study(tmp_path / "src", n_images=2, size=64)
        job_id, study_uid = store_and_route(settings, ledger, files, destinations=())
        assert analyse.run_job(settings, ledger, job_id) == "analysed"
        folder = settings.results_dir / study_uid
        (recorded,) = folder.glob("*.dcm")
        generation = ledger.reprocess_study(study_uid)
        with ledger.session() as s:
            sid = s.scalars(select(Study.id).where(Study.study_uid == study_uid)).one()
        (again,) = ledger.complete_study(
            sid, generation, lambda _facts: [RoutedJob(ROUTE, MODEL, [], 0)]
        )
        settings.routes[0].results.heatmaps = "all"
        _fail_on_second_heatmap(monkeypatch)
        assert analyse.run_job(settings, ledger, again) == "failed"
        assert list(folder.glob("*")) == [recorded]
        assert pydicom.dcmread(recorded).Modality == "SR"
    finally:
        ledger.dispose()


def test_a_job_superseded_once_its_results_are_written_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study re-opened while the job wrote its results: the ledger takes none of them
    (the job is superseded), so none stays; the newer version's job writes its own."""
    settings = review_settings(tmp_path, routes=[_route()])
    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(
            settings, ledger, write_study(tmp_path / "src", n_images=2, size=64)
        )
        monkeypatch.setattr(ledger, "finish_analysis", lambda *args, **kwargs: False)
        assert analyse.run_job(settings, ledger, job_id) == "superseded"
        assert list((settings.results_dir / study_uid).glob("*")) == []
    finally:
        ledger.dispose()


def test_a_model_whose_warm_up_fails_is_not_loaded_and_the_worker_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm-up that fails (a manifest the network does not fit in some way install could not
    see) fails every study the same way: the model is not cached as loaded, the next task tries
    again, and the worker's /readyz says why instead of "loaded"."""
    from acwi_node.inference.analyser import Analyser
    from acwi_node.observability.health import ModelPreload

    settings = review_settings(tmp_path)
    monkeypatch.setattr(analyse, "_analysers", {})

    def broken(self: Analyser) -> float:
        raise ValueError("operands could not be broadcast together with shapes (1,32) (16,)")

    monkeypatch.setattr(Analyser, "warm_up", broken)
    with pytest.raises(RuntimeError, match="warm-up analysis failed: ValueError: operands"):
        analyse.get_analyser(settings, MODEL)
    assert analyse._analysers == {}
    preload = ModelPreload(settings, load=True)
    preload.names = [MODEL]  # what a route naming it gives
    preload.run()
    ready, why = preload.check()
    assert not ready and "warm-up analysis failed" in why, why


def test_a_superseded_job_never_writes_over_the_newer_jobs_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study's next image arrives while its job writes the first heatmap; the newer
    version's job (the same model version: the same result UIDs and paths) runs to the end
    meanwhile. The two write phases take turns: every file the study keeps is the newer
    job's, each of its result rows names a file that is there, and none holds the older
    job's content (before, the older job's late heatmap replaced the newer job's recorded
    one)."""
    import threading

    settings = review_settings(tmp_path, routes=[_route()])
    ledger = Ledger(settings.database_url)
    files = write_study(tmp_path / "src", n_images=2, size=64)
    real = analyse.build_heatmap_sc
    older_writes = threading.Event()
    go_on = threading.Event()
    outcomes: dict[str, str] = {}

    def build(*args: Any, **kwargs: Any) -> Any:
        ds = real(*args, **kwargs)
        if threading.current_thread().name == "older":
            ds.SeriesDescription = "OLDER JOB"
            older_writes.set()
            assert go_on.wait(30)
        return ds

    monkeypatch.setattr(analyse, "build_heatmap_sc", build)
    try:
        older, study_uid = store_and_route(settings, ledger, files[:1], destinations=())

        def run(name: str, job_id: int) -> None:
            outcomes[name] = analyse.run_job(settings, ledger, job_id)

        first = threading.Thread(target=run, args=("older", older), name="older")
        first.start()
        assert older_writes.wait(60)  # its SR is written, its first heatmap built
        newer, _ = store_and_route(settings, ledger, files[1:], destinations=())
        second = threading.Thread(target=run, args=("newer", newer), name="newer")
        second.start()
        second.join(3)  # (it waits for the older job's write phase)
        go_on.set()
        first.join(60)
        second.join(60)
        assert outcomes == {"older": "superseded", "newer": "analysed"}
        with ledger.session() as s:
            named = set(
                s.scalars(select(analyse.Result.path).where(analyse.Result.job_id == newer))
            )
        folder = settings.results_dir / study_uid
        kept = {f"{study_uid}/{p.name}" for p in folder.glob("*.dcm")}
        assert kept == named and len(named) == 3  # the SR and two heatmaps
        for path in folder.glob("*.dcm"):
            assert pydicom.dcmread(path).get("SeriesDescription") != "OLDER JOB"
    finally:
        go_on.set()
        ledger.dispose()


def test_a_job_superseded_while_it_analysed_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is no longer analysing when its write phase begins (the study's next version
    superseded it, and that version's job may have written the same files): it writes
    nothing and says it was superseded."""
    settings = review_settings(tmp_path, routes=[_route()])
    ledger = Ledger(settings.database_url)
    try:
        job_id, study_uid = store_and_route(
            settings, ledger, write_study(tmp_path / "src", n_images=2, size=64)
        )
        monkeypatch.setattr(ledger, "renew_lease", lambda *_args, **_kwargs: False)
        assert analyse.run_job(settings, ledger, job_id) == "superseded"
        assert not (settings.results_dir / study_uid).exists()
    finally:
        ledger.dispose()


def test_a_worker_gives_back_its_own_claim_only(tmp_path: Path) -> None:
    """A worker whose ledger went away mid-analysis gives its attempt back once the ledger
    answers, but not a claim another worker made since (its lease ran out: a study that stops
    its workers still fails after ``worker.max_attempts``)."""
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    try:
        receive(settings, ledger, "1.2.3", "1.2.3.1")
        job_id, _ = complete(ledger, "1.2.3")
        first = ledger.claim_job(job_id, lease_s=0)
        assert first is not None and first.started_at is not None
        stale = utcnow() - dt.timedelta(seconds=60)
        with ledger.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=stale))
        second = ledger.claim_job(job_id, lease_s=30)  # the first worker's lease ran out
        assert second is not None and second.started_at is not None
        assert not ledger.give_back_job(
            job_id, started_at=first.started_at, attempts=first.attempts
        )
        with ledger.session() as s:
            job = s.get_one(Job, job_id)
            assert (job.state.value, job.attempts) == ("analysing", 2)
        assert ledger.give_back_job(job_id, started_at=second.started_at, attempts=2)
        with ledger.session() as s:
            job = s.get_one(Job, job_id)
            assert (job.state.value, job.attempts, job.started_at) == ("queued", 1, None)
            assert job.enqueued_at is not None
        st = ledger.get_study("1.2.3")
        assert st is not None and st["state"] == "queued"
    finally:
        ledger.dispose()


def test_the_analyse_task_waits_for_the_ledger_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, settings: Settings
) -> None:
    """A ledger that does not come back: the task tries once a second for
    :data:`analyse.LEDGER_WAIT_S`, logs the outage's traceback once, and ends (the reconciler
    sends the job again once the ledger answers); an error that is not the ledger's ends it
    at once."""
    now = [0.0]
    waits: list[float] = []

    def pause(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    def down() -> Ledger:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(analyse, "_pause", pause)
    with caplog.at_level(logging.INFO, logger="acwi_node.worker"):
        outcome = analyse.run_job_through_outages(settings, down, 7, clock=lambda: now[0])
    assert outcome == "ledger_unavailable"
    assert waits == [1.0] * int(analyse.LEDGER_WAIT_S)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.exc_info is not None for r in lines] == [True, False]
    assert "job 7: the ledger did not answer for 240 s" in lines[-1].getMessage()

    def broken() -> Ledger:
        raise ValueError("not the ledger")

    waits.clear()
    with pytest.raises(ValueError, match="not the ledger"):
        analyse.run_job_through_outages(settings, broken, 7, clock=lambda: now[0])
    assert waits == []


class Takeover:
    """Another worker takes the job over while the first one runs it (the first stalled
    past its lease: a ledger outage, a long pause of its process or VM): at the first call of
    a result builder, the second worker claims the job (its lease, ``lease_s = 0``, counted
    out) and holds it; ``then`` is what the first worker meets next."""

    def __init__(self, ledger: Ledger, job_id: int, then: str) -> None:
        self.ledger, self.job_id, self.then = ledger, job_id, then
        self.second: Job | None = None
        self.keepers: list[analyse.LeaseKeeper] = []

    def at(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            if self.second is None:
                self.second = self.ledger.claim_job(self.job_id, lease_s=0)
                assert self.second is not None
                if self.then == "its lease keeper":
                    # the first worker's next renewal finds the job another's, and stops
                    (keeper,) = self.keepers
                    keeper._thread.join(30)
                    assert not keeper._thread.is_alive()
                elif self.then == "a failure":
                    raise RuntimeError("the first worker's analysis failed")
            return real(*args, **kwargs)

        return build


@pytest.mark.parametrize("then", ["its finish", "a failure", "its lease keeper"])
def test_a_worker_whose_job_was_taken_over_records_nothing_and_leaves_the_job_alone(
    ledger_node: tuple[Settings, Ledger],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    then: str,
) -> None:
    """The first worker stalled longer than its lease while it wrote the job's results, and
    the reconciler's message had another worker take the job over. The first one went on: its
    lease renewals kept the second's claim alive, its results were recorded over the second
    worker's claim (their deliveries queued; the second's then refused), or its failure failed
    the job the second was analysing. Every write names the worker's claim now: the first
    worker's run ends as "superseded", having recorded and changed nothing and removed the
    files it wrote (no row names them); the second worker's run records its results once."""
    settings = review_settings(tmp_path, database_url=ledger_node[0].database_url)
    # a renewal a second, or none while the job runs
    settings.worker.lease_s = 3.0 if then == "its lease keeper" else 600.0
    ledger = ledger_node[1]
    job_id, study_uid = store_and_route(
        settings, ledger, write_study(tmp_path / "src", n_images=2, size=64)
    )
    takeover = Takeover(ledger, job_id, then)
    real_keeper = analyse.LeaseKeeper

    def keeper(*args: Any, **kwargs: Any) -> analyse.LeaseKeeper:
        made = real_keeper(*args, **kwargs)
        takeover.keepers.append(made)
        return made

    monkeypatch.setattr(analyse, "LeaseKeeper", keeper)
    if then == "its lease keeper":  # the SR is written when the first heatmap is built
        monkeypatch.setattr(analyse, "build_heatmap_sc", takeover.at(analyse.build_heatmap_sc))
    else:
        monkeypatch.setattr(analyse, "build_sr", takeover.at(analyse.build_sr))

    assert analyse.run_job(settings, ledger, job_id) == "superseded"

    second = takeover.second
    assert second is not None and second.started_at is not None
    with ledger.session() as s:
        job = s.get_one(Job, job_id)
        assert (job.state.value, job.attempts, job.error) == ("analysing", 2, "")
        assert job.started_at == second.started_at
        assert s.scalars(select(analyse.Result).where(analyse.Result.job_id == job_id)).all() == []
    assert ledger.due_deliveries() == []
    folder = settings.results_dir / study_uid
    assert sorted(folder.glob("*")) == []  # the first worker's files, which no row names
    # The second worker's run goes on and records its results, each delivery queued once.
    claim = analyse.Claim(second.started_at, second.attempts)
    assert analyse._run_claimed(settings, ledger, second, claim) == "analysed"
    with ledger.session() as s:
        named = set(s.scalars(select(analyse.Result.path).where(analyse.Result.job_id == job_id)))
        assert s.get_one(Job, job_id).state.value == "exporting"
    assert {f"{study_uid}/{p.name}" for p in folder.glob("*.dcm")} == named
    assert sorted(d.path for d in ledger.due_deliveries()) == sorted(named)


def test_a_run_whose_claim_was_lost_stops_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease keeper found the job another worker's while the images went through the
    network, a batch at a time: the run stops before the next batch (it computed the whole
    series, then found at its first result file that nothing would be kept), writes nothing
    and ends as superseded."""
    settings = review_settings(tmp_path, routes=[_route()])
    ledger = Ledger(settings.database_url)
    batches = lose_claim_at_first_batch(monkeypatch, analyse)
    try:
        job_id, study_uid = store_and_route(
            settings, ledger, write_study(tmp_path / "src", n_images=3, size=64)
        )
        assert analyse.run_job(settings, ledger, job_id) == "superseded"
        assert batches == [1]  # of three
        assert not list((settings.results_dir / study_uid).glob("*.dcm"))
    finally:
        ledger.dispose()


def test_the_ledger_refuses_a_claims_writes_once_another_worker_took_the_job_over(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The first claim's lease ran out and a second worker took the job: the first worker's
    renewal, results, failure and postponement change nothing (each says so); the second's
    renewal and results are taken."""
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    job_id, _ = complete(ledger, "1.2.3")
    first = ledger.claim_job(job_id, lease_s=30)
    assert first is not None and first.started_at is not None
    second = ledger.claim_job(job_id, lease_s=0)  # the first one's lease ran out
    assert second is not None and second.started_at is not None
    old = analyse.Claim(first.started_at, first.attempts)
    new = analyse.Claim(second.started_at, second.attempts)
    result = ResultFile("sr", "1.2.3.9", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3/1.2.3.9.dcm")
    summary = {"model": {"name": "m", "version": "1"}}
    assert not ledger.renew_lease(job_id, claim=old)
    assert not ledger.finish_analysis(
        job_id, results=[result], summary=summary, needs_review=True, review_reason="x",
        claim=old,
    )  # fmt: skip
    assert not ledger.fail_job(job_id, "the first worker's failure", claim=old)
    assert not ledger.postpone_job(job_id, claim=old)
    with ledger.session() as s:
        job = s.get_one(Job, job_id)
        assert (job.state.value, job.attempts, job.error, job.summary) == (
            "analysing", 2, "", {},
        )  # fmt: skip
        assert s.scalars(select(analyse.Result)).all() == []
    assert ledger.renew_lease(job_id, claim=new)
    assert ledger.finish_analysis(
        job_id, results=[result], summary=summary, needs_review=False, review_reason="",
        claim=new,
    )  # fmt: skip
    with ledger.session() as s:
        assert s.get_one(Job, job_id).summary == summary
        assert len(s.scalars(select(analyse.Result)).all()) == 1


@pytest.mark.parametrize("in_the_worker", [True, False])
def test_the_worker_freezes_its_heap_once_a_model_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_the_worker: bool
) -> None:
    """The worker process (``acwi-node worker``) freezes its heap once a model is loaded and
    warmed up: a study's full collections then skip the model's and the libraries' objects.
    Nowhere else (a test, another process that loads a model), nor again for a loaded one."""
    from acwi_node.inference.analyser import Analyser
    from acwi_node.inference.manifest import load_manifest

    settings = review_settings(tmp_path)
    manifest = load_manifest(settings.model_manifest(MODEL))

    class Loaded:
        def __init__(self) -> None:
            self.manifest = manifest

        def warm_up(self) -> float:
            return 0.0

    monkeypatch.setattr(analyse, "_analysers", {})
    monkeypatch.setattr(Analyser, "load", staticmethod(lambda *args, **kwargs: Loaded()))
    frozen: list[int] = []

    def freeze() -> int:
        frozen.append(1)
        return 1

    monkeypatch.setattr(analyse, "freeze_worker_heap", freeze)
    monkeypatch.setattr(analyse, "FREEZE_HEAP_AFTER_LOAD", in_the_worker)
    first = analyse.get_analyser(settings, MODEL)
    assert analyse.get_analyser(settings, MODEL) is first
    assert frozen == ([1] if in_the_worker else [])
