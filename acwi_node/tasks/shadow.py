"""The shadow task: a route's shadow model analyses a study its live model analysed
(``[[routes]] shadow_models``; README "Shadow models").

It reads the instances the route selects, as the live job did, runs the shadow model and keeps
its summary in the ledger (:class:`acwi_node.ledger.shadow.ShadowJobs`). It writes no DICOM
object and sends nothing: the comparison (:mod:`acwi_node.monitoring.shadow`) is the point.
Its messages go to the lowest queue (:data:`SHADOW_QUEUE`), which a worker takes only when no
live or STAT job waits.
"""

from __future__ import annotations

import logging

from acwi_node.config import Settings
from acwi_node.inference.analyser import NothingToAnalyse
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.shadow import ShadowJobs
from acwi_node.observability.logging import bind_study, log_context
from acwi_node.routing.selection import InstanceSelection
from acwi_node.tasks.analyse import (
    _ledger,
    _settings,
    equipment_of,
    get_analyser,
    read_inputs,
    summarise,
)
from acwi_node.tasks.app import SHADOW_TASK, app
from acwi_node.tasks.lease import LeaseKeeper

log = logging.getLogger("acwi_node.worker")


def run_shadow(settings: Settings, ledger: Ledger, shadow_id: int) -> str:
    """Run one shadow job. Returns what happened: analysed, skipped or failed."""
    worker = settings.worker
    shadows = ShadowJobs(ledger)
    claimed = shadows.claim(shadow_id, lease_s=worker.lease_s, max_attempts=worker.max_attempts)
    if claimed is None:
        log.info("shadow job %d: nothing to do (final, superseded, or elsewhere)", shadow_id)
        return "skipped"
    # the shadow job's own lease, renewed as a live job's is
    lease = LeaseKeeper(ledger, shadow_id, worker.lease_s / 3, renew=shadows.renew).start()
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
        analysis = analyser.analyse(datasets)
        analysis.skipped.update(left_out)
        analysis.skipped.update(unreadable)
        used = {str(ds.SOPInstanceUID): ds for ds in datasets}
        summary = summarise(
            analysis,
            analyser.manifest.uncertainty_threshold,
            ood_threshold=analyser.manifest.ood.threshold,
            equipment=equipment_of([used[im.sop_instance_uid] for im in analysis.images]),
        )
        shadows.finish(shadow_id, summary)
    except Exception as exc:  # a shadow model's trouble is never the study's
        shadows.fail(shadow_id, f"{type(exc).__name__}: {exc}")
        log.warning("shadow job %d (%s): failed: %s", shadow_id, claimed.model, exc)
        return "failed"
    finally:
        lease.stop()
    log.info(
        "shadow job %d (%s): analysed %d image(s), predicted=%s",
        shadow_id,
        claimed.model,
        len(analysis.images),
        analysis.predicted_label,
    )
    return "analysed"


@app.task(name=SHADOW_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def shadow_job(shadow_id: int) -> str:
    """Celery entry point: the message carries only the shadow job's id."""
    with log_context():  # the study, once known
        return run_shadow(_settings(), _ledger(), int(shadow_id))
