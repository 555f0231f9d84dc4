"""``/api/monitoring``: the studies arriving and each model version's recent studies against
its baseline (any signed-in account), and its pinned baseline (administrators)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.model_overview import model_version_known
from acwi_node.monitoring import pinning
from acwi_node.monitoring.report import BaselineRefused, ModelMonitor
from acwi_node.monitoring.shadow import ShadowComparison
from acwi_node.monitoring.traffic import traffic_monitor
from acwi_node.monitoring.turnaround import TurnaroundMonitor
from acwi_node.web.guards import admin_json_request, admin_user


class BaselineRequest(BaseModel):
    """The period whose studies a model version is compared with: ``YYYY-MM-DD`` (``until``:
    through that day) or ``YYYY-MM-DDTHH:MM``, UTC."""

    model_config = ConfigDict(extra="forbid")

    since: str = Field(min_length=10, max_length=32)
    until: str = Field(min_length=10, max_length=32)


def monitoring_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()
    monitor = ModelMonitor(db, settings.monitoring)
    arrivals = traffic_monitor(settings, db)
    shadows = ShadowComparison(db)
    turnaround = TurnaroundMonitor(db, settings.monitoring)

    @router.get("/api/monitoring")
    def monitoring(
        days: int | None = Query(None, ge=1, le=365),
        weeks: int = Query(0, ge=0, le=52),
        model: str | None = Query(None, max_length=64),
    ) -> dict[str, Any]:
        """Each model version analysed in the last ``days`` days (default
        ``monitoring.window_days``): its baseline, its recent studies and every signal (rates
        of findings, reviews and out-of-distribution studies; the uncertainty and OOD scores,
        predicted labels, equipment and sites), each with its statistic, p-value and status
        (``stable``, ``watch``, ``shifted``, ``too_few``); with ``weeks``, the windows before.
        Without ``model``, ``traffic`` too: the studies of the last ``monitoring.traffic_hours``
        hours, of all, from each source and for each route, against the same hours of the
        weeks before (``shifted``: they dropped); ``shadow``, each route's shadow model
        versions beside its live one over the ``days`` (agreement, review rates, right
        answers on the radiologists' verdicts), ``shadow_unfinished``, the shadow
        analyses that failed or wait, and ``turnaround``: per route, the results stored in
        the last ``monitoring.turnaround_hours`` hours, last instance to stored, step by step
        (50th and 95th percentiles, maximum), the studies overdue, and ``slow`` when the 95th
        percentile exceeds ``monitoring.turnaround_goal_s``."""
        days = days or settings.monitoring.window_days
        reports = monitor.report(model=model, days=days, weeks=weeks)
        out: dict[str, Any] = {"days": days, "models": [r.as_json() for r in reports]}
        if model is None:  # of the whole node
            out["traffic"] = arrivals.report().as_json()
            out["shadow"] = [r.as_json() for r in shadows.report(days=days)]
            out["shadow_unfinished"] = shadows.unfinished(days=days)
            out["turnaround"] = turnaround.report().as_json()
        return out

    def _known(name: str, version: str) -> None:
        """404 for a model version the node never ran nor installed."""
        if not model_version_known(settings, db, name, version):
            raise HTTPException(
                status_code=404, detail=f"no model {name} version {version} on this node"
            )

    unknown: dict[int | str, dict[str, Any]] = {
        404: {"description": "No such model version on the node"}
    }

    @router.put(
        "/api/monitoring/baselines/{name}/{version}",
        responses={
            **unknown,
            403: {"description": "Not an administrator"},
            415: {"description": "Not sent as application/json"},
            422: {"description": "A period the node cannot use (detail)"},
        },
    )
    def put_baseline(
        name: str, version: str, body: BaselineRequest, by: str = Depends(admin_json_request)
    ) -> dict[str, Any]:
        """Compare the model version with the studies it analysed from ``since`` to
        ``until`` (at least ``monitoring.min_studies`` of them)."""
        _known(name, version)
        try:
            notice = pinning.pin(monitor, name, version, body.since, body.until, by)
        except BaselineRefused as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        baseline, _ = monitor.baseline(name, version)
        return {"notice": notice, "studies": baseline.studies}

    @router.delete(
        "/api/monitoring/baselines/{name}/{version}",
        responses={**unknown, 403: {"description": "Not an administrator"}},
    )
    def delete_baseline(name: str, version: str, by: str = Depends(admin_user)) -> dict[str, Any]:
        """Compare the model version with its first ``monitoring.baseline_studies`` again."""
        _known(name, version)
        return {"notice": pinning.clear(monitor, name, version, by)}

    return router
