"""What a ``[[notify]]`` target is told of, found in the ledger, and the JSON it gets.

Each target's events of the last ``lookback_s`` seconds:

* ``review``: an open review item of a study the model asked about (not a quality-control
  sample) of at least ``min_priority`` (key ``review-<item id>``);
* ``finding``: an analysed job whose predicted label is one of ``labels`` with a probability
  of at least ``min_probability`` (key ``finding-<job id>``);
* ``failed``: a failed study (key ``failed-<study id>-<generation>``).

A notification is queued once per target and key (a unique constraint), so reading the ledger
again, or from two processes, queues nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
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


def _common(settings: Settings, event: str, study: Study) -> dict[str, Any]:
    return {
        "event": event,
        "node": settings.node.ae_title,
        "sender": f"ACWI Node {__version__}",
        "study_uid": study.study_uid,
        "modality": study.modality,
        "calling_ae": study.calling_ae,
    }


def review_payload(settings: Settings, item: ReviewItem, study: Study, job: Job) -> dict[str, Any]:
    """A case the model asked about is on the worklist."""
    summary = job.summary or {}
    label = str(summary.get("predicted_label") or "")
    url = _link(settings, f"/review/cases/{item.id}")
    urgency = "A STAT case" if item.priority > 0 else "A case"
    text = (
        f"ACWI Node: {urgency} needs review: {study.modality or 'study'} from"
        f" {study.calling_ae or 'an unnamed sender'}, the model says {label or '-'} ({item.reason})"
    )
    return {
        **_common(settings, "review", study),
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
    text = (
        f"ACWI Node: {label} ({probability:.2f}) in a {study.modality or 'study'} from"
        f" {study.calling_ae or 'an unnamed sender'}, an AI result: the PACS has it"
    )
    return {
        **_common(settings, "finding", study),
        "text": text,
        "label": label,
        "probability": probability,
        "at": _iso(job.started_at),
        "model": _model(summary),
        "needs_review": bool(summary.get("needs_review")),
    }


def failed_payload(settings: Settings, study: Study) -> dict[str, Any]:
    """A study failed: no result reaches the PACS until someone acts."""
    url = _link(settings, "/review/dashboard")
    text = (
        f"ACWI Node: a {study.modality or 'study'} from {study.calling_ae or 'an unnamed sender'}"
        f" failed: {study.reason or 'no reason recorded'}"
    )
    return {
        **_common(settings, "failed", study),
        "text": text + (f" ({url})" if url else ""),
        "reason": study.reason,
        "generation": study.generation,
        "at": _iso(study.updated_at),
        "dashboard_url": url,
    }


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
    if "failed" in target.events:
        for study in s.scalars(
            select(Study).where(Study.state == StudyState.FAILED, Study.updated_at >= since)
        ).all():
            yield (
                f"failed-{study.id}-{study.generation}",
                study.id,
                failed_payload(settings, study),
            )


def queue_events(settings: Settings, ledger: Ledger, *, now: dt.datetime | None = None) -> int:
    """Queue a notification for each target's events not yet queued; returns how many."""
    now = now or utcnow()
    queued = 0
    for target in settings.notify:
        since = now - dt.timedelta(seconds=target.lookback_s)
        with ledger.session() as s:
            found = list(_events(s, settings, target, since))
            if not found:
                continue
            known = set(
                s.scalars(
                    select(Notification.key).where(
                        Notification.target == target.name,
                        Notification.key.in_([key for key, _, _ in found]),
                    )
                ).all()
            )
        for key, study_id, payload in found:
            if key in known:
                continue
            try:
                with ledger.session() as s:
                    s.add(
                        Notification(
                            target=target.name,
                            event=str(payload["event"]),
                            key=key,
                            study_id=study_id,
                            payload=payload,
                            created_at=now,
                            next_attempt_at=now,
                        )
                    )
            except IntegrityError:
                continue  # another process queued it first
            queued += 1
            log.info("notify %s: %s queued", target.name, key)
    return queued
