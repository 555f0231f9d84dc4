"""What a ``[[notify]]`` target is told of, found in the ledger, and the JSON it gets.

Each target's events of the last ``lookback_s`` seconds:

* ``review``: an open review item of a study the model asked about (not a quality-control
  sample) of at least ``min_priority`` (key ``review-<item id>``);
* ``finding``: an analysed job whose predicted label is one of ``labels`` with a probability
  of at least ``min_probability`` (key ``finding-<job id>``);
* ``failed``: a failed study (key ``failed-<study id>-<generation>``);
* ``shift``: a model version's monitoring signal that has shifted against its baseline
  (README "Model monitoring"; key ``shift-`` and a hash of the model, version, signal and
  ISO week: a signal that stays shifted is told of again each week, not on every pass);
* ``stopped``: far fewer studies than usual came from a source, or reached a route, or came
  at all (README "Model monitoring", "Studies arriving"; key ``stopped-`` and a hash of the
  flow and the UTC day: told of again each day while so);
* ``slow``: a route's results reach the PACS slower than ``monitoring.turnaround_goal_s`` at
  the 95th percentile (README "Turnaround"; key ``slow-`` and a hash of the route and the UTC
  day);
* ``unreachable``: a destination or the RIS, with results waiting, has not been reachable for
  ``min_outage_s`` (key ``unreachable-`` and a hash of it and when the outage began: once per
  outage);
* ``withdrawn``: an administrator withdrew AI results (:func:`queue_notice`, at the request).

A notification is queued once per target and key (a unique constraint), so reading the ledger
again, or from two processes, queues nothing twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from acwi_node import __version__
from acwi_node.config import NotifyTarget, Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Job,
    JobState,
    Notification,
    ReviewItem,
    ReviewState,
    Study,
    StudyState,
    utcnow,
)
from acwi_node.ledger.repository import outages
from acwi_node.monitoring.drift import Status
from acwi_node.monitoring.report import ModelReport, SignalResult
from acwi_node.monitoring.traffic import Flow, TrafficReport, describe
from acwi_node.monitoring.turnaround import (
    ALL,
    STAT,
    RouteTurnaround,
    TurnaroundReport,
    duration,
)

log = logging.getLogger("acwi_node.notify")

#: One event: (key, study id, payload).
Event = tuple[str, int | None, dict[str, Any]]


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def _link(settings: Settings, path: str) -> str | None:
    base = settings.review.public_url
    return f"{base.rstrip('/')}{path}" if base else None


def _model(summary: dict[str, Any]) -> dict[str, str]:
    model = summary.get("model") or {}
    return {"name": str(model.get("name", "")), "version": str(model.get("version", ""))}


def _common(settings: Settings, event: str, study: Study, generation: int) -> dict[str, Any]:
    """What every study's event says; ``calling_ae`` is who sent the generation it is about
    (a study another AE sent again is that AE's), ``first_calling_ae`` the study's first
    sender."""
    return {
        "event": event,
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "study_uid": study.study_uid,
        "modality": study.modality,
        "calling_ae": study.sender_of(generation),
        "first_calling_ae": study.calling_ae,
    }


def review_payload(settings: Settings, item: ReviewItem, study: Study, job: Job) -> dict[str, Any]:
    """A case the model asked about is on the worklist."""
    summary = job.summary or {}
    label = str(summary.get("predicted_label") or "")
    url = _link(settings, f"/review/cases/{item.id}")
    urgency = "A STAT case" if item.priority > 0 else "A case"
    sender = study.sender_of(job.generation)
    text = (
        f"ACWI Node: {urgency} needs review: {study.modality or 'study'} from"
        f" {sender or 'an unnamed sender'}, the model says {label or '-'} ({item.reason})"
    )
    return {
        **_common(settings, "review", study, job.generation),
        "text": text + (f": {url}" if url else ""),
        "case_id": item.id,
        "case_url": url,
        "priority": item.priority,
        "reason": item.reason,
        "at": _iso(item.created_at),
        "model": _model(summary),
        "predicted_label": label,
        "probabilities": summary.get("probabilities") or {},
        "uncertainty": (summary.get("uncertainty") or {}).get("score"),
    }


def finding_payload(
    settings: Settings, job: Job, study: Study, label: str, probability: float
) -> dict[str, Any]:
    """A study analysed with a finding the target watches for."""
    summary = job.summary or {}
    sender = study.sender_of(job.generation)
    text = (
        f"ACWI Node: {label} ({probability:.2f}) in a {study.modality or 'study'} from"
        f" {sender or 'an unnamed sender'}, an AI result: the PACS has it"
    )
    return {
        **_common(settings, "finding", study, job.generation),
        "text": text,
        "label": label,
        "probability": probability,
        "at": _iso(job.started_at),
        "model": _model(summary),
        "needs_review": bool(summary.get("needs_review")),
    }


#: A delivery's failure as the ledger words it (``delivery to pacs failed (0xA700): ...``),
#: and an outage waited out (``unreachable since ... UTC (exporter.outage_patience_s)``).
_DELIVERY_FAILED = re.compile(r"delivery to \S+ failed \((?:0x[0-9A-F]{4}|no status)\)")
_UNREACHABLE_SINCE = re.compile(r"unreachable since [^()]* UTC \([^()]*\)")


def public_reason(study: Study) -> str:
    """Why ``study`` failed, for a webhook: each failed job's reason, but of a delivery's
    failure only the destination and the status (and since when it was unreachable). What
    follows is the destination's own words (a C-STORE's Error Comment, an HTTP reason and
    body): an archive's "patient mismatch" may quote the patient's name and ID there. The
    dashboard and the study's trace keep the whole reason."""
    jobs = [
        j
        for j in study.jobs
        if j.generation == study.generation and j.state != JobState.SUPERSEDED and j.error
    ]
    if not jobs:
        return study.reason
    reasons = []
    for job in jobs:
        reason = job.error
        delivery = _DELIVERY_FAILED.match(reason)
        if delivery is not None:
            outage = _UNREACHABLE_SINCE.search(reason, delivery.end())
            reason = delivery.group() + (f": {outage.group()}" if outage else "")
        reasons.append(f"{job.route}: {reason}")
    return "; ".join(reasons)[:2000]


def failed_payload(settings: Settings, study: Study) -> dict[str, Any]:
    """A study failed: no result reaches the PACS until someone acts."""
    url = _link(settings, "/review/dashboard")
    reason = public_reason(study)
    sender = study.generation_sender()
    text = (
        f"ACWI Node: a {study.modality or 'study'} from {sender or 'an unnamed sender'}"
        f" failed: {reason or 'no reason recorded'}"
    )
    return {
        **_common(settings, "failed", study, study.generation),
        "text": text + (f" ({url})" if url else ""),
        "reason": reason,
        "generation": study.generation,
        "at": _iso(study.updated_at),
        "dashboard_url": url,
    }


def shift_payload(
    settings: Settings, report: ModelReport, signal: SignalResult, now: dt.datetime
) -> dict[str, Any]:
    """A model version's monitoring signal has shifted against its baseline."""
    url = _link(settings, "/review/monitoring")
    what = f"{report.model} {report.version}"
    text = (
        f"ACWI Node: {what}: {signal.title} has shifted against its baseline"
        f" ({signal.baseline_text} then {signal.recent_text}, last"
        f" {settings.monitoring.window_days} days): a new scanner, protocol or population?"
    )
    return {
        "event": "shift",
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "text": text + (f" {url}" if url else ""),
        "model": {"name": report.model, "version": report.version},
        "signal": signal.signal,
        "title": signal.title,
        "baseline": signal.baseline_text,
        "recent": signal.recent_text,
        "statistic": signal.statistic,
        "p_value": signal.p_value,
        "studies": report.studies,
        "at": _iso(now),
        "monitoring_url": url,
    }


def shift_key(report: ModelReport, signal: SignalResult, now: dt.datetime) -> str:
    """One key per model version, signal and ISO week (the column holds 64 characters; a
    model's name and version may hold as many)."""
    year, week, _ = now.isocalendar()
    what = f"{report.model}\0{report.version}\0{signal.signal}\0{year}-W{week:02d}"
    return "shift-" + hashlib.sha256(what.encode()).hexdigest()[:32]


def _shift_events(
    settings: Settings, reports: Sequence[ModelReport], now: dt.datetime
) -> Iterator[Event]:
    for report in reports:
        for signal in report.signals:
            if signal.status is Status.SHIFTED:
                payload = shift_payload(settings, report, signal, now)
                yield shift_key(report, signal, now), None, payload


def stopped_payload(settings: Settings, flow: Flow, now: dt.datetime) -> dict[str, Any]:
    """Studies stopped, or dropped, from a source, for a route or on the whole node."""
    url = _link(settings, "/review/monitoring#traffic")
    w = flow.telling
    why = {
        "node": "is the PACS forwarding to the node, and the network up?",
        "source": "a forwarding rule, an AE title or a network that changed?",
        "route": "they arrive, but no longer match it: a changed tag its match reads?",
        "path": "they arrive, but no longer match the route: a changed tag its match reads?",
    }[flow.kind]
    text = f"ACWI Node: {flow.title} dropped: {describe(flow)}: {why}"
    return {
        "event": "stopped",
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "text": text + (f" {url}" if url else ""),
        "kind": flow.kind,
        "name": flow.name,
        "title": flow.title,
        "hours": w.hours,
        "studies": w.studies,
        "expected": w.expected,
        "weeks_before": list(w.history),
        "p_value": w.p_value,
        "at": _iso(now),
        "monitoring_url": url,
    }


def stopped_key(flow: Flow, now: dt.datetime) -> str:
    """One key per flow and UTC day."""
    what = f"{flow.kind}\0{flow.name}\0{now:%Y-%m-%d}"
    return "stopped-" + hashlib.sha256(what.encode()).hexdigest()[:32]


def _stopped_events(settings: Settings, report: TrafficReport, now: dt.datetime) -> Iterator[Event]:
    for flow in report.dropped():
        yield stopped_key(flow, now), None, stopped_payload(settings, flow, now)


def slow_payload(
    settings: Settings, report: TurnaroundReport, route: RouteTurnaround, now: dt.datetime
) -> dict[str, Any]:
    """A route's results slower than the goal, with the step that took longest."""
    url = _link(settings, "/review/monitoring#turnaround")
    total = route.step("total")
    steps = [f for f in route.steps if f.step != "total" and f.p95 is not None]
    worst = max(steps, key=lambda f: f.p95 or 0.0) if steps else None
    where = {ALL: "all routes", STAT: "STAT studies"}.get(route.route, f"route {route.route}")
    text = (
        f"ACWI Node: results of {where} are slow: 95th percentile {duration(total.p95)} from"
        f" the last instance to stored in the PACS over {route.studies} studies in the last"
        f" {report.hours} h (goal {duration(route.goal_s)})"
    )
    if worst is not None:
        text += f"; the longest step: {worst.step} ({duration(worst.p95)})"
    return {
        "event": "slow",
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "text": text + (f" {url}" if url else ""),
        "route": route.route,
        "studies": route.studies,
        "hours": report.hours,
        "goal_s": route.goal_s,
        "steps": {f.step: {"p50": f.p50, "p95": f.p95, "max": f.max} for f in route.steps},
        "overdue": route.overdue,
        "at": _iso(now),
        "monitoring_url": url,
    }


def slow_key(route: RouteTurnaround, now: dt.datetime) -> str:
    """One key per route and UTC day."""
    return "slow-" + hashlib.sha256(f"{route.route}\0{now:%Y-%m-%d}".encode()).hexdigest()[:32]


def _slow_events(settings: Settings, report: TurnaroundReport, now: dt.datetime) -> Iterator[Event]:
    """Each slow route; all routes together only where no single route reads slow (each has
    too few studies of its own)."""
    slow = [r for r in report.routes if r.status is Status.SHIFTED]
    routes = [r for r in slow if r.route != ALL] or slow  # the STAT row is told of too
    for route in routes:
        yield slow_key(route, now), None, slow_payload(settings, report, route, now)


def _events(
    s: Any, settings: Settings, target: NotifyTarget, since: dt.datetime
) -> Iterator[Event]:
    if "review" in target.events:
        for item, study, job in s.execute(
            select(ReviewItem, Study, Job)
            .join(Study, ReviewItem.study_id == Study.id)
            .join(Job, ReviewItem.job_id == Job.id)
            .where(
                ReviewItem.state == ReviewState.OPEN,
                ReviewItem.sampled.is_(False),
                ReviewItem.priority >= target.min_priority,
                ReviewItem.created_at >= since,
            )
        ).all():
            yield f"review-{item.id}", study.id, review_payload(settings, item, study, job)
    if "finding" in target.events:
        for job, study in s.execute(
            select(Job, Study)
            .join(Study, Job.study_id == Study.id)
            .where(
                Job.state.in_((JobState.EXPORTING, JobState.DELIVERED)),
                Job.started_at >= since,
            )
        ).all():
            summary = job.summary or {}
            label = str(summary.get("predicted_label") or "")
            probability = float((summary.get("probabilities") or {}).get(label, 0.0))
            if label in target.labels and probability >= target.min_probability:
                payload = finding_payload(settings, job, study, label, probability)
                yield f"finding-{job.id}", study.id, payload
    if "unreachable" in target.events:
        yield from _unreachable_events(s, settings, target)
    if "failed" in target.events:
        for study in s.scalars(
            select(Study).where(Study.state == StudyState.FAILED, Study.updated_at >= since)
        ).all():
            yield (
                f"failed-{study.id}-{study.generation}",
                study.id,
                failed_payload(settings, study),
            )


def unreachable_payload(
    settings: Settings, destination: str, since: dt.datetime, waiting: int
) -> dict[str, Any]:
    """A destination (or the RIS) with results waiting has not been reachable for a while:
    the node keeps them (``exporter.outage_patience_s``) and sends them once it is back."""
    url = _link(settings, "/review/dashboard")
    text = (
        f"ACWI Node: {destination} cannot be reached since {since:%Y-%m-%d %H:%M} UTC;"
        f" {waiting} result(s) wait and go as soon as it answers"
    )
    return {
        "event": "unreachable",
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "text": text + (f" ({url})" if url else ""),
        "destination": destination,
        "since": _iso(since),
        "waiting": waiting,
        "at": _iso(utcnow()),
        "dashboard_url": url,
    }


def _unreachable_events(s: Any, settings: Settings, target: NotifyTarget) -> Iterator[Event]:
    """Each destination, and the RIS, unreachable for ``target.min_outage_s``: once per
    outage (its key names when it began), however long it lasts."""
    cutoff = utcnow() - dt.timedelta(seconds=target.min_outage_s)
    for outage in outages(s):
        if outage.since > cutoff:
            continue
        began = f"{outage.destination}|{outage.since.isoformat()}"
        digest = hashlib.sha256(began.encode()).hexdigest()[:24]
        yield (
            f"unreachable-{digest}",
            None,
            unreachable_payload(settings, outage.destination, outage.since, outage.waiting),
        )


def withdrawn_payload(
    settings: Settings,
    *,
    reason: str,
    by: str,
    study_uid: str | None,
    model_name: str | None,
    model_version: str | None,
    studies: Sequence[str],
    analyses: int,
    objects: int,
    notes: int,
    refused: int,
    at: dt.datetime,
) -> dict[str, Any]:
    """An administrator withdrew AI results from the PACS: a study's, or a model version's
    (a recall). One notification per request, however many studies; the administrator's
    note is not in it (free text may name a patient): the study's page and the audit trail
    have it."""
    if study_uid is not None:
        what = f"of study {study_uid}"
        url = _link(settings, f"/review/studies/{study_uid}")
    else:
        what = f"of {model_name}" + (f" {model_version}" if model_version else "")
        url = _link(settings, "/review/dashboard")
    text = (
        f"ACWI Node: {by} withdrew the AI results {what} from the PACS ({reason}):"
        f" {analyses} analysis(es) of {len(studies)} study(ies), {objects} object(s),"
        f" {notes} rejection note(s) queued"
    )
    if refused:
        text += f"; {refused} analysis(es) could not be withdrawn (the node's log says why)"
    return {
        "event": "withdrawn",
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "text": text + (f": {url}" if url else ""),
        "reason": reason,
        "by": by,
        "study_uid": study_uid,
        "model": {"name": model_name or "", "version": model_version or ""},
        "studies": len(studies),
        "analyses": analyses,
        "objects": objects,
        "notes_queued": notes,
        "refused": refused,
        "at": _iso(at),
        "study_url": url if study_uid is not None else None,
        "dashboard_url": url if study_uid is None else None,
    }


def queue_notice(
    settings: Settings,
    ledger: Ledger,
    payload: dict[str, Any],
    *,
    study_id: int | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Queue ``payload`` (an event that happens once, at a request, not found in the ledger
    later) for every target that listens to its event; returns how many were queued."""
    now = now or utcnow()
    event = str(payload["event"])
    digest = hashlib.sha256(repr(sorted(payload.items())).encode()).hexdigest()[:24]
    key = f"{event}-{digest}"
    return sum(
        _queue_one(ledger, target.name, key, study_id, payload, now)
        for target in settings.notify
        if event in target.events
    )


def _queue_one(
    ledger: Ledger,
    target: str,
    key: str,
    study_id: int | None,
    payload: dict[str, Any],
    now: dt.datetime,
) -> bool:
    """Queue one notification for ``target``; False when it is queued already (by this
    process before, or by another one first)."""
    try:
        with ledger.session() as s:
            s.add(
                Notification(
                    target=target,
                    event=str(payload["event"]),
                    key=key,
                    study_id=study_id,
                    payload=payload,
                    created_at=now,
                    next_attempt_at=now,
                )
            )
    except IntegrityError:
        return False
    log.info("notify %s: %s queued", target, key)
    return True


def queue_events(
    settings: Settings,
    ledger: Ledger,
    *,
    now: dt.datetime | None = None,
    monitoring: Callable[[], Sequence[ModelReport]] | None = None,
    traffic: Callable[[], TrafficReport] | None = None,
    turnaround: Callable[[], TurnaroundReport] | None = None,
) -> int:
    """Queue a notification for each target's events not yet queued; returns how many.
    ``monitoring`` gives the model monitoring's reports (read only when a target listens
    for ``shift``), ``traffic`` the studies arriving (for ``stopped``), ``turnaround`` the
    results' turnaround (for ``slow``)."""
    now = now or utcnow()
    queued = 0
    for target in settings.notify:
        since = now - dt.timedelta(seconds=target.lookback_s)
        with ledger.session() as s:
            found = list(_events(s, settings, target, since))
        if "shift" in target.events and monitoring is not None:
            found += list(_shift_events(settings, monitoring(), now))
        if "stopped" in target.events and traffic is not None:
            found += list(_stopped_events(settings, traffic(), now))
        if "slow" in target.events and turnaround is not None:
            found += list(_slow_events(settings, turnaround(), now))
        if not found:
            continue
        with ledger.session() as s:
            known = set(
                s.scalars(
                    select(Notification.key).where(
                        Notification.target == target.name,
                        Notification.key.in_([key for key, _, _ in found]),
                    )
                ).all()
            )
        for key, study_id, payload in found:
            if key not in known:
                queued += _queue_one(ledger, target.name, key, study_id, payload, now)
    return queued
