"""The shadow task: a route's shadow model analyses a study its live model analysed
(``[[routes]] shadow_models``; README "Shadow models").

It reads the instances the route selects, as the live job did, runs the shadow model and keeps
its summary in the ledger (:class:`acwi_node.ledger.shadow.ShadowJobs`). It writes no DICOM
object and sends nothing: the comparison (:mod:`acwi_node.monitoring.shadow`) is the point.
Its messages go to the lowest queue (:data:`SHADOW_QUEUE`), which a worker takes only when no
live or STAT job waits.

It waits out an outage of the ledger as the analyse task does
(:func:`acwi_node.tasks.analyse.run_through_outages`): a shadow job the outage interrupted is
not failed, and is given back, its attempt not counted, then run again once the ledger
answers. Its writes name the worker's claim: a shadow job another worker took over (this one
stalled past ``worker.lease_s``) is that worker's to finish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from acwi_node.config import Settings
from acwi_node.inference.analyser import NothingToAnalyse
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.shadow import ShadowJobs
from acwi_node.observability.logging import bind_study, log_context
from acwi_node.routing.selection import InstanceSelection
from acwi_node.tasks.analyse import (
    LEDGER_WAIT_S,
    ClaimLost,
    LedgerUnavailable,
    _ledger,
    _settings,
    equipment_of,
    get_analyser,
    ledger_unavailable,
    read_inputs,
    run_through_outages,
    summarise,
)
from acwi_node.tasks.app import SHADOW_TASK, app
from acwi_node.tasks.lease import LeaseKeeper

log = logging.getLogger("acwi_node.worker")


def run_shadow_through_outages(
    settings: Settings,
    ledger_of: Callable[[], Ledger],
    shadow_id: int,
    *,
    max_wait_s: float = LEDGER_WAIT_S,
) -> str:
    """:func:`run_shadow`, waiting out an outage of the ledger (as
    :func:`acwi_node.tasks.analyse.run_job_through_outages` does for a live job)."""
    return run_through_outages(
        f"shadow job {shadow_id}",
        ledger_of,
        lambda ledger: run_shadow(settings, ledger, shadow_id),
        lambda ledger, claim: ShadowJobs(ledger).give_back(shadow_id, claim),
        max_wait_s=max_wait_s,
    )


def run_shadow(settings: Settings, ledger: Ledger, shadow_id: int) -> str:
    """Run one shadow job. Returns what happened: analysed, skipped, superseded (no longer
    this worker's: taken over by another) or failed. Raises
    :class:`~acwi_node.tasks.analyse.LedgerUnavailable` when the ledger stops answering once
    it is claimed (the shadow job is not failed: :func:`run_shadow_through_outages` gives it
    back)."""
    worker = settings.worker
    shadows = ShadowJobs(ledger)
    claimed = shadows.claim(shadow_id, lease_s=worker.lease_s, max_attempts=worker.max_attempts)
    if claimed is None:
        log.info("shadow job %d: nothing to do (final, superseded, or elsewhere)", shadow_id)
        return "skipped"
    claim = claimed.claim
    # the shadow job's own lease, renewed as a live job's is
    lease = LeaseKeeper(
        ledger,
        shadow_id,
        worker.lease_s / 3,
        renew=lambda renewed: shadows.renew(renewed, claim=claim),
        what=f"shadow job {shadow_id}",
    ).start()
    try:
        study_uid, rel_paths = ledger.job_inputs(claimed.job_id)
        bind_study(study_uid)
        if not rel_paths:  # shadow models never hold the disk: retention went first
            raise NothingToAnalyse("storage retention deleted the study's files before", {})
        route = next((r for r in settings.routes if r.name == claimed.route), None)
        selection = InstanceSelection.for_route(route) if route is not None else None
        spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
        datasets, left_out, unreadable = read_inputs(spool, rel_paths, selection)
        if not datasets:
            raise NothingToAnalyse("no image could be analysed", {**left_out, **unreadable})
        analyser = get_analyser(settings, claimed.model)
        analysis = analyser.analyse(datasets, between_batches=lambda: _still_ours(lease))
        analysis.skipped.update(left_out)
        analysis.skipped.update(unreadable)
        used = {str(ds.SOPInstanceUID): ds for ds in datasets}
        summary = summarise(
            analysis,
            analyser.manifest.uncertainty_threshold,
            ood_threshold=analyser.manifest.ood.threshold,
            equipment=equipment_of([used[im.sop_instance_uid] for im in analysis.images]),
        )
        finished = shadows.finish(shadow_id, summary, claim=claim)
    except Exception as exc:  # a shadow model's trouble is never the study's
        if ledger_unavailable(exc) and claim is not None:  # nor is the ledger's outage
            raise LedgerUnavailable(shadow_id, claim, what=f"shadow job {shadow_id}") from exc
        if not shadows.fail(shadow_id, f"{type(exc).__name__}: {exc}", claim=claim):
            return _taken_over(shadow_id)
        log.warning("shadow job %d (%s): failed: %s", shadow_id, claimed.model, exc)
        return "failed"
    finally:
        lease.stop()
    if not finished:
        return _taken_over(shadow_id)
    log.info(
        "shadow job %d (%s): analysed %d image(s), predicted=%s",
        shadow_id,
        claimed.model,
        len(analysis.images),
        analysis.predicted_label,
    )
    return "analysed"


def _still_ours(lease: LeaseKeeper) -> None:
    """Between batches: a shadow run whose claim was lost (taken over) stops computing."""
    if lease.lost.is_set():
        raise ClaimLost(lease.job_id)


def _taken_over(shadow_id: int) -> str:
    log.info(
        "shadow job %d: no longer this worker's (taken over by another worker once its lease"
        " ran out); its summary not recorded",
        shadow_id,
    )
    return "superseded"


@app.task(name=SHADOW_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def shadow_job(shadow_id: int) -> str:
    """Celery entry point: the message carries only the shadow job's id."""
    with log_context():  # the study, once known
        return run_shadow_through_outages(_settings(), _ledger, int(shadow_id))
