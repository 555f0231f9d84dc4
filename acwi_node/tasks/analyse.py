"""The analyse task: one job in, result objects and outbox rows out.

:func:`run_job` does the work and is idempotent: it claims the job in the ledger (so a duplicate
message is a no-op), analyses the study's instances, writes the SR and heatmaps with UIDs derived
from (study, model, version, kind) into the results directory, and records them with one outbox row
per destination. A re-run replaces the same files and rows; it never duplicates.

A job that fails, or is superseded, after it wrote some of its result objects removes them
again (:func:`_remove_unrecorded`): no ledger row names them, nothing would send them, and a
later analysis writes its own. A file a result row of the study names (an earlier analysis's
object of the same UID, which this job's rewrote) stays for that row; a file another job
wrote over ours meanwhile stays too. Two jobs of one study (the older superseded by the
study's next version) never write at once: the write phase, from the first result file to
the ledger's answer and this clean-up, holds the study's result-write lock
(:mod:`acwi_node.results.write_lock`), and a job superseded before it took the lock writes
nothing. A worker that dies mid-job leaves its files to the
next attempt, which writes the same ones, and to storage retention, which deletes a finished
study's result folder (``retention.keep_hours``, or when the disk runs short).

A worker that stalls longer than ``worker.lease_s`` (a ledger outage, a long pause of its
process or VM) may have its job taken over by another worker (the reconciler sends it again).
Every write the job makes to the ledger (its lease renewed, its results recorded, the job
failed or queued again) names the worker's claim (:class:`acwi_node.ledger.JobClaim`), and
changes nothing once the job is another worker's: the stalled run ends as "superseded"
(its lease keeper stops it before its next result file, or the ledger refuses its results),
removing only the files it wrote that no result row names and that no other job wrote since.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from acwi_node.config import RouteResults, Settings, load_settings
from acwi_node.dicom_pixels import read_deferred
from acwi_node.export.wakeup import wake_exporter
from acwi_node.inference.analyser import Analyser, NothingToAnalyse
from acwi_node.inference.engines import EngineOptions
from acwi_node.inference.manifest import ModelManifest
from acwi_node.inference.types import DeferredHeatmap, StudyAnalysis
from acwi_node.ingest.spool import Spool, SpoolError
from acwi_node.ledger import JobClaim, Ledger, ResultFile
from acwi_node.ledger.model_versions import ModelVersions
from acwi_node.ledger.models import Job, Result, Study
from acwi_node.ledger.withdrawals import Withdrawals
from acwi_node.observability import metrics
from acwi_node.observability.logging import (
    LOOP_FAILURE_RETRY_S,
    LoopFailures,
    bind_study,
    log_context,
    note_identifiers,
)
from acwi_node.results.encoding import encode_part10
from acwi_node.results.headers import series_anatomy
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.overlay import heat_path, write_cam
from acwi_node.results.parametric_map import build_parametric_maps
from acwi_node.results.sr import build_sr
from acwi_node.results.write_lock import study_results_lock
from acwi_node.review.quality import quality_sampled, sample_reason
from acwi_node.routing.selection import InstanceSelection
from acwi_node.tasks.app import ANALYSE_TASK, app
from acwi_node.tasks.lease import LeaseKeeper

log = logging.getLogger("acwi_node.worker")

_state: dict[str, Any] = {}
_analysers: dict[tuple[str, str], Analyser] = {}
_analysers_lock = threading.Lock()


def bind_settings(settings: Settings) -> None:
    """Give the task its settings (the worker process calls this once at start-up)."""
    _state["settings"] = settings
    _state.pop("ledger", None)


def _settings() -> Settings:
    if "settings" not in _state:
        _state["settings"] = load_settings()
    settings: Settings = _state["settings"]
    return settings


def _ledger() -> Ledger:
    if "ledger" not in _state:
        _state["ledger"] = Ledger(_settings().ledger_url)
    ledger: Ledger = _state["ledger"]
    return ledger


#: Set by the worker process (``acwi-node worker``): freeze its heap once a model is loaded
#: (:func:`freeze_worker_heap`). Off elsewhere (the tests, the other processes that load a
#: model), whose heaps are not the worker's.
FREEZE_HEAP_AFTER_LOAD = False


#: highdicom's tables of the standard, each read from its JSON once per process (lru_cache).
_HIGHDICOM_TABLES = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")


def load_highdicom_tables() -> int:
    """Read highdicom's tables of the standard (the IODs' modules, the modules' attributes) now;
    returns how many. highdicom reads them the first time a process builds a result (0.8 s of a
    worker's first SR: JSON parsed into some 200,000 objects, which every full collection
    walks until they are frozen). They are highdicom's private functions: a highdicom without
    them leaves its tables to be read when it needs them, as before."""
    try:
        from highdicom import _standard_utils
    except ImportError:  # pragma: no cover - highdicom moved them
        return 0
    loaded = 0
    for name in _HIGHDICOM_TABLES:
        table = getattr(_standard_utils, name, None)
        if callable(table):
            table()
            loaded += 1
    return loaded


def freeze_worker_heap() -> int:
    """Collect the garbage, then move every object the process holds into the permanent
    generation (``gc.freeze``); returns how many. Done once a model is loaded and warmed up,
    in the worker process (:data:`FREEZE_HEAP_AFTER_LOAD`).

    A worker with its model loaded holds some 600,000 objects (torch, the model, pydicom's
    dictionary), 800,000 with highdicom's tables, and a full collection walks all of them:
    about 0.5 s, twice in a 100- or 400-slice CT's analysis, whose SR and heatmaps allocate
    many highdicom and pydicom objects. Frozen, they are skipped, and a collection walks only what
    the process made since. They are still freed by reference counting; only a cycle among
    them, should one become garbage, is never collected: the objects frozen are the loaded
    model's and the process's, and, where a model is loaded by a task (a prefork pool's
    child; a model version activated later), the images of the study in flight (freed by
    reference counting as before: pydicom's datasets hold no reference to their parents).
    What a freeze keeps is bounded by the models loaded.

    highdicom's tables of the standard are read first (:func:`load_highdicom_tables`), so that
    they are frozen too, and not read during the worker's first study."""
    load_highdicom_tables()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("worker heap frozen: %d objects that garbage collections skip", frozen)
    return frozen


def get_analyser(settings: Settings, model: str) -> Analyser:
    """The loaded model for a route's model name, cached per process."""
    manifest = settings.model_manifest(model)
    key = (model, str(manifest))
    with _analysers_lock:
        if key not in _analysers:
            for stale in [k for k in _analysers if k[0] == model]:
                del _analysers[stale]  # another version of this model was activated
            worker = settings.worker
            analyser = Analyser.load(
                manifest,
                device=worker.device,
                mc_samples=worker.mc_samples,
                num_threads=worker.torch_threads or None,
                batch_size=worker.batch_size,
                engine=EngineOptions(
                    engine=worker.engine,
                    precision=worker.precision,
                    cache_dir=worker.engine_cache_dir or settings.data_dir / "engines",
                    trt_workspace_mb=worker.trt_workspace_mb,
                    dla_core=worker.dla_core,
                    calibration_dir=worker.calibration_dir,
                    num_threads=worker.torch_threads or None,
                    cuda_graphs=worker.cuda_graphs,
                ),
                heatmaps=worker.heatmaps,
            )
            # its name and version must stand for these weights alone (refused, not cached:
            # the next task tries again, and /readyz reports the reason)
            claim_model_version(settings, analyser.manifest, manifest)
            try:
                seconds = analyser.warm_up()
            except Exception as exc:
                # What fails the warm-up fails every study: not loaded, not cached (the next
                # task tries again), and /readyz (ModelPreload) reports the reason.
                raise RuntimeError(
                    f"model {model} loaded, but its warm-up analysis failed:"
                    f" {type(exc).__name__}: {exc}"
                ) from exc
            log.info("model %s loaded and warmed up (%.2f s)", model, seconds)
            _analysers[key] = analyser
            if FREEZE_HEAP_AFTER_LOAD:
                freeze_worker_heap()
        return _analysers[key]


def claim_model_version(settings: Settings, manifest: ModelManifest, path: Path) -> None:
    """Record in the ledger that ``manifest``'s name and version stand for its weights (first
    load), or raise :class:`~acwi_node.ledger.model_versions.ModelVersionConflict` when they
    already stand for other weights (:mod:`acwi_node.ledger.model_versions`). ``path``: the
    manifest file it was loaded from, which the record and the refusal name."""
    if _state.get("settings") is settings:
        ModelVersions(_ledger()).claim(
            manifest.name, manifest.version, manifest.weights_sha256, path
        )
        return
    ledger = Ledger(settings.ledger_url)  # settings of the caller's own (the worker's preload)
    try:
        ModelVersions(ledger).claim(manifest.name, manifest.version, manifest.weights_sha256, path)
    finally:
        ledger.dispose()


def equipment_of(datasets: Sequence[Dataset]) -> list[str]:
    """The equipment that made the analysed images, as "Manufacturer Model" (model
    monitoring tells a new kind of scanner by it); no station name, no serial number."""
    found = []
    for ds in datasets:
        name = " ".join(
            str(ds.get(keyword, "") or "").strip()
            for keyword in ("Manufacturer", "ManufacturerModelName")
        ).strip()
        if name:
            found.append(name[:64])
    return sorted(set(found))


def summarise(
    analysis: StudyAnalysis,
    threshold: float,
    *,
    ood_threshold: float | None = None,
    equipment: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON summary the ledger keeps for a job (no patient data)."""
    u = analysis.uncertainty
    return {
        "model": {
            "name": analysis.model.name,
            "version": analysis.model.version,
            # results reissued after a withdrawal (their UIDs are derived with it)
            **({"reissue": analysis.reissue} if analysis.reissue else {}),
        },
        "labels": list(analysis.labels),
        # the labels that name a finding (the others: no finding), as the manifest says
        "finding_labels": list(analysis.finding_labels),
        "probabilities": {k: float(v) for k, v in analysis.probabilities.items()},
        "predicted_label": analysis.predicted_label,
        "uncertainty": {
            "entropy": u.entropy,
            "epistemic": u.epistemic,
            "aleatoric": u.aleatoric,
            "score": u.score,
        },
        "uncertainty_threshold": threshold,
        "ood_score": float(analysis.ood_score),
        **({"ood_threshold": float(ood_threshold)} if ood_threshold is not None else {}),
        "equipment": list(equipment),
        "needs_review": bool(analysis.needs_review),
        "images": [
            {
                "sop_instance_uid": im.sop_instance_uid,
                # a frame of a multi-frame image (Enhanced CT, tomosynthesis): its number
                **({"frame_number": im.frame_number} if im.frame_number is not None else {}),
                "probabilities": {k: float(v) for k, v in im.probabilities.items()},
                "uncertainty_score": im.uncertainty.score,
                "ood_score": float(im.ood_score),
            }
            for im in analysis.images
        ],
        "skipped": dict(analysis.skipped),
    }


def not_analysed_kind(reason: str) -> str:
    """The metric label of why an image was not analysed (the reason's text is free)."""
    if reason.startswith("not selected by route"):
        return "not_selected"
    if reason.startswith("unreadable:"):
        return "unreadable"
    if "a localizer (scout) image" in reason:
        return "localizer"
    if "could not be decoded" in reason:
        return "undecodable"
    return "unsupported"


def count_not_analysed(model: str, skipped: dict[str, str]) -> None:
    for reason in skipped.values():
        metrics.IMAGES_NOT_ANALYSED.labels(model, not_analysed_kind(reason)).inc()


def read_inputs(
    spool: Spool, rel_paths: list[str], selection: InstanceSelection | None
) -> tuple[list[Dataset], dict[str, str], dict[str, str]]:
    """The job's instances the selection takes (all without one); those it leaves out and
    the files that could not be read, each with the reason. An instance left out is dropped
    as soon as it is read: a series the route does not want is never held whole."""
    datasets: list[Dataset] = []
    left_out: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for rel in rel_paths:
        try:
            ds = read_deferred(spool.resolve(rel))  # its Pixel Data read when used
        except Exception as exc:  # a file the model cannot use never blocks the queue
            unreadable[Path(rel).stem] = f"unreadable: {exc}"
            continue
        note_identifiers(ds)  # keep this patient's name and ID out of every log line
        reason = selection.reason_to_leave_out(ds) if selection is not None else None
        if reason is None:
            datasets.append(ds)
        else:
            left_out[str(ds.get("SOPInstanceUID", "") or Path(rel).stem)] = reason
            del ds  # not even while the next file is read
    return datasets, left_out, unreadable


def ledger_unavailable(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is the ledger's database not
    answering (down, restarting, its connection ended or timed out, its pool exhausted): no
    fault of the job's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LedgerUnavailable | OperationalError | InterfaceError | PoolTimeout):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


#: A worker's claim on a job, as :meth:`Ledger.claim_job` made it (what
#: :meth:`Ledger.give_back_job` checks is still the job's, and every write the job makes).
Claim = JobClaim


class LedgerUnavailable(Exception):
    """:func:`run_job` (or a shadow job's run): the ledger stopped answering after the job was
    claimed (``claim``)."""

    def __init__(self, job_id: int, claim: Claim, *, what: str = "") -> None:
        super().__init__(f"{what or f'job {job_id}'}: the ledger stopped answering while it ran")
        self.claim = claim


class ClaimLost(Exception):
    """:func:`run_job`: the job stopped being this worker's while it ran (its lease keeper
    found it superseded, or taken over by another worker once its lease ran out)."""


#: While the ledger does not answer, the analyse task tries its job again this often...
LEDGER_RETRY_S = LOOP_FAILURE_RETRY_S
#: ...for at most this long (below the worker's stop grace period, 5 minutes); then the task
#: ends and the reconciler sends the job again once the ledger answers.
LEDGER_WAIT_S = 240.0


def _pause(seconds: float) -> None:
    """The wait between two tries of a job while the ledger does not answer."""
    time.sleep(seconds)


def run_job_through_outages(
    settings: Settings,
    ledger_of: Callable[[], Ledger],
    job_id: int,
    *,
    max_wait_s: float = LEDGER_WAIT_S,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """:func:`run_job`, which waits out an outage of the ledger instead of ending on it.

    A message taken while the database is down (restarting, failing over, refusing
    connections) would end before its job is claimed, and the job would wait for the
    reconciler (``completion.requeue_after_s``). A job whose database went away while it was
    analysed would stay claimed until its lease ran out, and the worker that takes it over
    would count one more attempt against ``worker.max_attempts``, which is there for studies
    that kill their workers, not for the ledger. Here the task keeps its message and tries
    again every :data:`LEDGER_RETRY_S` (a claim is the test whether the ledger answers), for
    at most ``max_wait_s``: the job is analysed within a second of the ledger's return, and
    one the outage interrupted is first given back, its attempt not counted (if it is still
    this worker's claim: one taken over by another worker, whose lease ran out, is that
    worker's). The log says so once, then a line a minute, then "works again" (as a loop's
    :class:`LoopFailures`). A duplicate message meanwhile is harmless: the claim in the
    ledger lets one worker run the job.

    ``ledger_of`` gives the ledger (the worker's is made by its first task, which may come
    while the database is down). Returns :func:`run_job`'s outcome, or
    ``ledger_unavailable`` when the ledger did not answer for ``max_wait_s``."""
    return run_through_outages(
        f"job {job_id}",
        ledger_of,
        lambda ledger: run_job(settings, ledger, job_id),
        lambda ledger, claim: ledger.give_back_job(
            job_id, started_at=claim.started_at, attempts=claim.attempts
        ),
        max_wait_s=max_wait_s,
        clock=clock,
    )


def run_through_outages(
    what: str,
    ledger_of: Callable[[], Ledger],
    run: Callable[[Ledger], str],
    give_back: Callable[[Ledger, Claim], bool],
    *,
    max_wait_s: float = LEDGER_WAIT_S,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """``run`` (a job's run, ``what`` in the log: "job 12"), waiting out an outage of the
    ledger as :func:`run_job_through_outages` says: ``run`` raises :class:`LedgerUnavailable`
    with its claim when the ledger stopped answering once the job was claimed, and
    ``give_back`` gives that claim back (its attempt not counted; False when it is no longer
    the job's) before ``run`` is tried again. The shadow task waits the same way."""
    failures = LoopFailures(log, f"{what}: the ledger")
    claim: Claim | None = None
    started = clock()
    while True:
        try:
            ledger = ledger_of()
            if claim is not None:
                if give_back(ledger, claim):
                    log.info("%s: queued again, its attempt not counted (a ledger outage)", what)
                claim = None
            outcome = run(ledger)
        except Exception as exc:
            if not ledger_unavailable(exc):
                raise
            if isinstance(exc, LedgerUnavailable):
                claim = exc.claim
            failures.failed()
            if clock() - started >= max_wait_s:
                log.error(
                    "%s: the ledger did not answer for %.0f s; the reconciler sends the job"
                    " again once it does",
                    what,
                    max_wait_s,
                )
                return "ledger_unavailable"
            _pause(failures.wait_s(LEDGER_RETRY_S))
            continue
        failures.worked()
        return outcome


def run_job(settings: Settings, ledger: Ledger, job_id: int) -> str:
    """Analyse one job. Returns what happened: analysed, skipped, superseded, postponed (its
    results could not be written for want of disk space: queued again) or failed. Raises
    :class:`LedgerUnavailable` when the ledger stops answering once the job is claimed (the
    job is not failed: :func:`run_job_through_outages` gives it back)."""
    worker = settings.worker
    job = ledger.claim_job(job_id, lease_s=worker.lease_s, max_attempts=worker.max_attempts)
    if job is None:
        log.info("job %d: nothing to do (final, or running elsewhere)", job_id)
        return "skipped"
    assert job.started_at is not None  # set by the claim
    claim = Claim(job.started_at, job.attempts)
    try:
        return _run_claimed(settings, ledger, job, claim)
    except Exception as exc:
        if ledger_unavailable(exc):
            raise LedgerUnavailable(job_id, claim) from exc
        raise


def _run_claimed(settings: Settings, ledger: Ledger, job: Job, claim: Claim) -> str:
    """:func:`run_job` once ``job`` is claimed (``claim``, which every write to the ledger
    names: a job another worker took over meanwhile is that worker's)."""
    job_id = job.id
    lease = LeaseKeeper(
        ledger,
        job_id,
        settings.worker.lease_s / 3,
        renew=lambda renewed: ledger.renew_lease(renewed, claim=claim),
    ).start()
    # every file this run wrote, with its identity: removed again should the job not finish
    written: list[_Written] = []
    study_uid = ""
    # the study's result-write lock, held from the first file written to the ledger's answer
    # and any clean-up (:mod:`acwi_node.results.write_lock`)
    write_phase = contextlib.ExitStack()
    try:
        study_uid, rel_paths = ledger.job_inputs(job_id)
        bind_study(study_uid)
        # The route's [routes.select]: a route removed since the study was routed reads all.
        route = next((r for r in settings.routes if r.name == job.route), None)
        selection = InstanceSelection.for_route(route) if route is not None else None
        spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
        datasets, left_out, unreadable = read_inputs(spool, rel_paths, selection)
        if not datasets:  # the analyser would not see why
            reasons = {**left_out, **unreadable}
            shown = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
            more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
            raise NothingToAnalyse(f"no image could be analysed ({shown or 'none'}{more})", reasons)
        analyser = get_analyser(settings, job.model)
        started = time.perf_counter()

        def still_ours() -> None:
            """Between batches: a run whose lease keeper found the job superseded or taken
            over stops computing (its results would be refused)."""
            if lease.lost.is_set():
                raise ClaimLost(job_id)

        try:
            analysis = analyser.analyse(datasets, between_batches=still_ours)
        except NothingToAnalyse as exc:
            exc.skipped.update({**left_out, **unreadable})
            raise
        metrics.INFERENCE_SECONDS.labels(analyser.manifest.name, analyser.manifest.version).observe(
            time.perf_counter() - started
        )
        analysis.skipped.update(left_out)
        analysis.skipped.update(unreadable)
        count_not_analysed(job.model, analysis.skipped)
        # the same model version's results of this study withdrawn before: new UIDs, which no
        # rejection note named (an IOCM archive may refuse those for good)
        analysis.reissue = Withdrawals(ledger).reissue_of(
            study_uid, analysis.model.name, analysis.model.version
        )
        by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
        # each analysed instance once (a multi-frame image has a result per frame)
        used = [by_uid[uid] for uid in dict.fromkeys(im.sop_instance_uid for im in analysis.images)]
        out = Spool(settings.results_dir, fsync=settings.ingest.fsync)
        files: list[ResultFile] = []
        write_phase.enter_context(study_results_lock(settings.results_dir, study_uid))
        # A job of the study's next version may have written and recorded the same files
        # while this one analysed: it superseded this one, which then writes nothing. So does
        # a job another worker took over (this worker stalled past its lease).
        if not ledger.renew_lease(job_id, claim=claim):
            log.info(
                "job %d: superseded, or taken over by another worker, while it analysed;"
                " no results written",
                job_id,
            )
            return "superseded"

        def write(kind: str, ds: Dataset) -> Path:
            """Each object to its file as soon as it is built: a CT's hundreds of heatmaps
            are never all in memory at once (0.75 MiB each for a 512 x 512 slice). Raises
            :class:`ClaimLost` once the job is no longer this worker's (its lease keeper
            found it superseded or taken over): it writes nothing more."""
            if lease.lost.is_set():
                raise ClaimLost(job_id)
            stored = out.write(study_uid, str(ds.SOPInstanceUID), encode_part10(ds))
            path = Path(stored.path)
            written.append(_Written(path, out.relative(path), stored.inode))
            files.append(
                ResultFile(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), out.relative(path))
            )
            return path

        zone = settings.monitoring.timezone
        # the AI regions (TID 1410) of the images with a finding, unless turned off: the
        # route's [routes.results], else the worker's settings
        route_results = route.results if route is not None else RouteResults()
        region_fraction = route_results.region_fraction(settings.worker)
        sr = build_sr(used, analysis, timezone=zone, region_fraction=region_fraction)
        write("sr", sr)
        # The route's [routes.results], else the worker's settings.
        heatmap_policy = route.results.heatmaps if route is not None else None
        parametric_maps = settings.worker.parametric_maps
        if route is not None and route.results.parametric_maps is not None:
            parametric_maps = route.results.parametric_maps
        # heatmaps = "positive_or_uncertain" or "none" leaves some or all out
        heatmaps = [
            (n, image)
            for n, image in enumerate(analysis.images, start=1)
            if (
                image.heatmap_selected
                if heatmap_policy is None
                else analyser.wants_heatmap(image, heatmap_policy)
            )
        ]
        # the sources of the heatmap series' instances: the anatomy they share is the series'
        # (read once for the study: each heatmap copies it)
        heatmap_anatomy = series_anatomy(
            by_uid[uid] for uid in dict.fromkeys(i.sop_instance_uid for _, i in heatmaps)
        )
        for n, image in heatmaps:
            source = by_uid[image.sop_instance_uid]
            path = write(
                "heatmap",
                build_heatmap_sc(
                    source,
                    image.heatmap_array(),
                    analysis,
                    image,
                    instance_number=n,
                    colours=settings.worker.heatmap_colours,
                    timezone=zone,
                    series_sources=heatmap_anatomy,
                ),
            )
            if isinstance(image.heatmap, DeferredHeatmap):  # the review page's overlay
                write_cam(path, image.heatmap.cam)
                written.append(_Written.beside(heat_path(path), written[-1]))
        if parametric_maps:  # every analysed image of a mappable series
            for pm in build_parametric_maps(used, analysis, timezone=zone):
                write("parametric_map", pm)
        threshold = analyser.manifest.uncertainty_threshold
        summary = summarise(
            analysis,
            threshold,
            ood_threshold=analyser.manifest.ood.threshold,
            equipment=equipment_of(used),
        )
        summary["sr_sop_instance_uid"] = str(sr.SOPInstanceUID)
        reason = ""
        if analysis.needs_review:
            reason = (
                f"uncertainty {analysis.uncertainty.score:.3f} above threshold {threshold:.3f}"
                if analysis.uncertainty.score > threshold
                else f"out-of-distribution score {analysis.ood_score:.3f}"
            )
        # a share of the confident studies goes to the worklist too (review.quality)
        sample_percent = settings.review.quality_sample_percent
        sampled = not analysis.needs_review and quality_sampled(study_uid, sample_percent)
        if sampled:
            reason = sample_reason(sample_percent)
        result_control_id = None
        if settings.hl7.ris is not None:
            from acwi_node.hl7.client import control_id_for

            result_control_id = control_id_for(job_id)
        kept = ledger.finish_analysis(
            job_id,
            results=files,
            summary=summary,
            needs_review=analysis.needs_review,
            review_reason=reason,
            quality_sample=sampled,
            # The ORU is promised with the results, built just below (or by the ORU sender
            # should this process die first).
            hl7_result_control_id=result_control_id,
            takes=settings.destination_takes,  # [[destinations]] results
            # the route's shadow models analyse the study next, on the lowest queue
            shadow_models=route.shadow_models if route is not None else (),
            claim=claim,  # a job another worker took over records that worker's results
        )
        if not kept:
            _remove_unrecorded(ledger, study_uid, written)
    except NothingToAnalyse as exc:
        count_not_analysed(job.model, exc.skipped)
        if not ledger.fail_job(job_id, f"nothing to analyse: {exc}", claim=claim):
            return _superseded_meanwhile(job_id, exc)
        log.warning("job %d: nothing to analyse: %s", job_id, exc)
        return "failed"
    except ClaimLost as exc:
        _remove_unrecorded(ledger, study_uid, written)
        return _superseded_meanwhile(job_id, exc)
    except Exception as exc:
        if ledger_unavailable(exc):  # nor is the ledger's outage: the job is not failed
            _remove_unrecorded(ledger, study_uid, written)
            raise
        # A full disk is no fault of the study's: the job waits in the queue, its files
        # removed, and is analysed again once there is room (a failed study's images would
        # be the first storage retention deletes to make room).
        if out_of_space(exc) and ledger.postpone_job(job_id, claim=claim):
            _remove_unrecorded(ledger, study_uid, written)
            log.error(
                "job %d: the results could not be written (%s); the job is queued again and"
                " analysed once the data disk has room",
                job_id,
                _brief(exc),
            )
            return "postponed"
        # A study re-opened while its job ran may have had a file replaced under it (its
        # Pixel Data is read when used): the job is superseded, its failure no news.
        if not ledger.fail_job(job_id, f"analysis failed: {_brief(exc)}", claim=claim):
            _remove_unrecorded(ledger, study_uid, written)
            return _superseded_meanwhile(job_id, exc)
        _remove_unrecorded(ledger, study_uid, written)
        log.exception("job %d: analysis failed", job_id)
        return "failed"
    finally:
        write_phase.close()
        lease.stop()
    if not kept:
        log.info(
            "job %d: superseded, or taken over by another worker, while it ran; its results"
            " not recorded",
            job_id,
        )
        return "superseded"
    if files:
        wake_exporter(settings.data_dir)  # the results are due: sent now, not at its next poll
    if route is not None and route.shadow_models:
        _enqueue_shadow(ledger, job_id)
    log.info(
        "job %d: analysed %d image(s), predicted=%s review=%s",
        job_id,
        len(analysis.images),
        analysis.predicted_label,
        analysis.needs_review,
    )
    if settings.hl7.ris is not None:  # ORU^R01 to the RIS (acwi-node hl7 delivers it)
        from acwi_node.hl7.client import queue_result_safely

        queue_result_safely(settings, ledger, job_id)
    return "analysed"


#: The longest exception message a failed job's reason quotes.
_REASON_CHARS = 300


def _brief(exc: Exception) -> str:
    """An exception as a job's failure reason: its type and its message's first
    :data:`_REASON_CHARS` characters (a numpy error's message may quote a whole value)."""
    message = " ".join(str(exc).split())
    if len(message) > _REASON_CHARS:
        message = message[: _REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass(frozen=True)
class _Written:
    """A file a job wrote: where, the path a result row would name (its object's), and the
    inode it was written with (a later write of the same path, by another job, has another)."""

    path: Path
    relative: str
    inode: int | None

    @classmethod
    def beside(cls, path: Path, object_file: _Written) -> _Written:
        """A file kept beside an object (its heatmap's map), if one was written."""
        try:
            inode: int | None = os.stat(path).st_ino
        except OSError:
            inode = None
        return cls(path, object_file.relative, inode)


def _remove_unrecorded(ledger: Ledger, study_uid: str, written: Sequence[_Written]) -> None:
    """Remove the files a job that did not finish wrote (see the module docstring): those
    no result row of the study names, still the ones the job wrote. A failure to look or to
    remove is logged: storage retention deletes them with the study's folder."""
    if not written:
        return
    try:
        with ledger.session() as s:
            named = set(
                s.scalars(
                    select(Result.path)
                    .join(Job, Result.job_id == Job.id)
                    .join(Study, Job.study_id == Study.id)
                    .where(Study.study_uid == study_uid)
                )
            )
    except Exception as exc:
        log.warning(
            "%d result file(s) of a job that did not finish stay (the ledger could not say "
            "which it names: %s); storage retention deletes them",
            len(written),
            type(exc).__name__,
        )
        return
    removed = kept = 0
    for item in written:
        if item.relative in named or item.inode is None:
            kept += item.relative in named
            continue
        try:
            if os.stat(item.path).st_ino != item.inode:
                kept += 1  # written again since, by another job
                continue
            os.unlink(item.path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("a result file of a job that did not finish stays: %s", exc.strerror)
    log.info(
        "removed %d result file(s) the job wrote before it stopped; %d kept (a result row "
        "names them, or another job wrote them since)",
        removed,
        kept,
    )


def _enqueue_shadow(ledger: Ledger, job_id: int) -> None:
    """Ring for the job's shadow jobs (the reconciler does should this fail)."""
    from acwi_node.ledger.shadow import ShadowJobs
    from acwi_node.tasks.queue import enqueue_shadow

    try:
        enqueue_shadow(app, ledger, ShadowJobs(ledger).of_job(job_id))
    except Exception as exc:
        log.warning("job %d: shadow jobs not enqueued (the reconciler will): %s", job_id, exc)


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk or quota."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, SpoolError) and current.out_of_space:
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


def _superseded_meanwhile(job_id: int, exc: Exception) -> str:
    log.info(
        "job %d: superseded while it ran (its study re-opened, or another worker took it over"
        " once its lease ran out); it stopped on %s",
        job_id,
        type(exc).__name__,
    )
    return "superseded"


@app.task(name=ANALYSE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def analyse_job(job_id: int) -> str:
    """Celery entry point: the message carries only the job id."""
    with log_context(job_id=int(job_id)):
        outcome = run_job_through_outages(_settings(), _ledger, int(job_id))
    metrics.JOBS_PROCESSED.labels(outcome).inc()
    return outcome
