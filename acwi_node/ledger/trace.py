"""A study's trace: everything the ledger knows happened to one study, in time order.

The question a PACS administrator is asked most is "where is the AI result of this study?".
The answer is spread over the ledger's tables: the instances and who sent them, what completed
the study, which routes took it (or why none did), each job's analysis, each result object's
delivery to each destination, the HL7 messages to the RIS, the review case and its verdicts,
shadow analyses, notifications and storage retention. :func:`study_trace` reads them all for
one study and tells them as events, generation by generation, with the time each step of the
latest analysis took. It reads Study Instance UIDs, AE titles, states and reasons: no patient
data (an HL7 order's patient fields are never read).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from acwi_node.ledger.models import (
    COMPLETED_BY,
    LATER_RESULT_KINDS,
    REJECTION_NOTE_KIND,
    UNSETTLED_DELIVERY_STATES,
    WITHDRAWAL_REASONS,
    Delivery,
    DeliveryState,
    Hl7Order,
    Hl7Outbound,
    Instance,
    InstanceArrival,
    Job,
    JobState,
    Notification,
    Purge,
    Result,
    ReviewItem,
    ShadowJob,
    ShadowState,
    Study,
    StudyState,
    Verdict,
)
from acwi_node.ledger.repository import STAT_PRIORITY, Ledger, files_deleted_at


class Level(str, enum.Enum):
    """How an event reads: what happened, what went well, what is still awaited, what
    failed."""

    INFO = "info"
    OK = "ok"
    WAITING = "waiting"
    FAILED = "failed"


@dataclass(frozen=True)
class TraceEvent:
    #: When it happened (UTC); None for what has not happened yet (a delivery awaited).
    at: dt.datetime | None
    generation: int
    #: What kind of step: received, order, completed, routed, queued, analysed, delivery,
    #: job, hl7, review, verdict, shadow, notification, retention.
    kind: str
    text: str
    level: Level = Level.INFO

    def as_json(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "generation": self.generation,
            "kind": self.kind,
            "level": self.level.value,
            "text": self.text,
        }


@dataclass(frozen=True)
class Step:
    """One stretch of the latest analysis's turnaround, in seconds (None: not reached)."""

    name: str
    seconds: float | None


@dataclass
class StudyTrace:
    study: dict[str, Any]
    events: list[TraceEvent] = field(default_factory=list)
    #: The latest generation's analysis, from its last instance to its results stored.
    turnaround: list[Step] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "events": [e.as_json() for e in self.events],
            "turnaround": [{"step": s.name, "seconds": s.seconds} for s in self.turnaround],
        }

    def render(self) -> str:
        """The trace as ``acwi-node studies show`` prints it."""
        st = self.study
        # The current generation's sender, what routing matched; the first sender beside it
        # where another AE sent the study first.
        sender = st["generation_calling_ae"] or "-"
        if st["generation_calling_ae"] != st["calling_ae"]:
            sender += f" (first sent by {st['calling_ae'] or '-'})"
        lines = [
            f"study {st['study_uid']}",
            f"  state {st['status']}, generation {st['generation']}, {st['instances']} "
            f"instance(s), {st['modality'] or '-'} from {sender}",
        ]
        if st["reason"]:
            lines.append(f"  reason: {st['reason']}")
        generation = None
        for e in self.events:
            if e.generation != generation:
                generation = e.generation
                lines.append(f"generation {generation}")
            at = e.at.strftime("%Y-%m-%d %H:%M:%S") if e.at else " " * 19
            mark = {Level.OK: "ok", Level.WAITING: "..", Level.FAILED: "!!"}.get(e.level, "")
            lines.append(f"  {at}  {mark:<2} {e.kind:<12} {e.text}")
        if self.turnaround:
            lines.append("turnaround of the latest analysis")
            for s in self.turnaround:
                value = "-" if s.seconds is None else f"{s.seconds:.1f} s"
                lines.append(f"  {s.name:<40} {value:>10}")
        return "\n".join(lines)


def study_trace(ledger: Ledger, study_uid: str) -> StudyTrace | None:
    """The trace of the study with this Study Instance UID; None if the ledger has none."""
    with ledger.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
        if study is None:
            return None
        jobs = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
        events: list[TraceEvent] = []
        received = _received(s, study, events)
        events += _orders(s, study)
        completions = _completions(s, study, jobs, received, events)
        events += _jobs(jobs)
        events += _deliveries(s, {j.id: j for j in jobs})
        events += _hl7(s, study, {j.id: j.generation for j in jobs})
        events += _reviews(s, study, {j.id: j.generation for j in jobs})
        events += _shadows(s, jobs)
        events += _notifications(s, study)
        events += _purges(s, study)
        deleted = files_deleted_at(s, study.id, study.generation)
        trace = StudyTrace(study=_summary(study, deleted))
        trace.events = sorted(
            events,
            key=lambda e: (
                e.generation,
                e.at is None,
                e.at or dt.datetime.min,
                _STEP_ORDER.get(e.kind, 5),
            ),
        )
        trace.turnaround = _turnaround(s, jobs, received, completions)
        return trace


#: Of events at the same time, which is told first: a study's life in its order.
_STEP_ORDER = {
    "order": 0,
    "received": 0,
    "completed": 1,
    "routed": 2,
    "analysing": 3,
    "analysed": 4,
    "review": 5,
    "verdict": 5,
    "shadow": 6,
    "delivery": 7,
    "withdrawn": 7,
    "hl7": 8,
    "notify": 8,
    "job": 9,
    "retention": 10,
}


# ---------------------------------------------------------------------------- reading
def _summary(study: Study, deleted: dt.datetime | None) -> dict[str, Any]:
    """The study as ``GET /api/studies/{uid}`` shows it (without its jobs, which the events
    tell), and what completed it."""
    view = Ledger.study_view(study, [], deleted)
    del view["jobs"]
    receiving = study.state == StudyState.RECEIVING
    if receiving:
        view["completed_at"] = None  # an earlier generation's
    view["completed_by"] = "" if receiving else study.completed_by
    return view


@dataclass(frozen=True)
class _Arrival:
    first: dt.datetime
    last: dt.datetime
    count: int
    #: Of the instances records retention summarised (``InstanceArrival``): the last that
    #: arrived before the generation completed; None where it summarised none.
    waited_until: dt.datetime | None = None


def arrivals_by_sender(
    where: ColumnElement[bool],
) -> Select[int, str, int, int, dt.datetime, dt.datetime]:
    """The instance rows ``where`` selects, by generation and sending AE: (generation, AE,
    instances, series, first and last arrival): what a trace tells of them, and what records
    retention keeps of them (:class:`~acwi_node.ledger.models.InstanceArrival`)."""
    return (
        select(
            Instance.generation,
            Instance.calling_ae,
            func.count(),
            func.count(func.distinct(Instance.series_uid)),
            func.min(Instance.received_at),
            func.max(Instance.received_at),
        )
        .where(where)
        .group_by(Instance.generation, Instance.calling_ae)
    )


def _received(s: Session, study: Study, events: list[TraceEvent]) -> dict[int, _Arrival]:
    """One event per generation and sending AE; returns each generation's arrival. The
    instance rows say it, or, once records retention compacted them, their summaries."""
    rows = [
        (*row, None) for row in s.execute(arrivals_by_sender(Instance.study_id == study.id)).all()
    ]
    modalities: dict[int, set[str]] = defaultdict(set)
    for generation, modality in s.execute(
        select(Instance.generation, Instance.modality)
        .where(Instance.study_id == study.id)
        .distinct()
    ).all():
        if modality:
            modalities[generation].add(modality)
    summarised: dict[tuple[int, str], list[Any]] = {}
    for a in s.scalars(select(InstanceArrival).where(InstanceArrival.study_id == study.id)).all():
        modalities[a.generation].update(filter(None, a.modalities.split("\\")))
        summarised[(a.generation, a.calling_ae)] = [
            a.generation,
            a.calling_ae,
            a.instances,
            a.series,
            a.first_received_at,
            a.last_received_at,
            a.waited_until,
        ]
    merged = []
    for row in rows:  # rows left beside a summary of the same AE: one event, as before
        summary = summarised.pop((row[0], row[1]), None)
        if summary is not None:
            row = (
                row[0],
                row[1],
                row[2] + summary[2],
                row[3] + summary[3],
                min(row[4], summary[4]),
                max(row[5], summary[5]),
                summary[6],
            )
        merged.append(row)
    merged += [tuple(summary) for summary in summarised.values()]
    arrivals: dict[int, _Arrival] = {}
    for generation, ae, count, series, first, last, waited in sorted(
        merged, key=lambda r: (r[0], r[4])
    ):
        kinds = ", ".join(sorted(modalities[generation])) or "no modality"
        span = f", until {last:%H:%M:%S}" if last > first else ""
        events.append(
            TraceEvent(
                first,
                generation,
                "received",
                f"{count} instance(s) in {series} series ({kinds}) from {ae or 'an unknown AE'}"
                f"{span}",
                Level.OK,
            )
        )
        seen = arrivals.get(generation)
        waits = [w for w in (waited, seen.waited_until if seen else None) if w is not None]
        arrivals[generation] = _Arrival(
            min(first, seen.first) if seen else first,
            max(last, seen.last) if seen else last,
            count + (seen.count if seen else 0),
            max(waits) if waits else None,
        )
    return arrivals


def _orders(s: Session, study: Study) -> Iterable[TraceEvent]:
    # Only the order's workflow fields: never its patient name, ID or birth date.
    for created, priority, expected, status in s.execute(
        select(
            Hl7Order.created_at, Hl7Order.priority, Hl7Order.expected_images, Hl7Order.status
        ).where(Hl7Order.study_uid == study.study_uid)
    ).all():
        what = "STAT" if priority == "S" else "routine"
        images = f", {expected} image(s) announced" if expected else ""
        yield TraceEvent(
            created, 1, "order", f"HL7 order received: {what}{images} ({status})", Level.INFO
        )


def _completions(
    s: Session,
    study: Study,
    jobs: Sequence[Job],
    received: dict[int, _Arrival],
    events: list[TraceEvent],
) -> dict[int, dt.datetime]:
    """When each generation completed: the study's row for the current one, its jobs'
    creation (the same transaction) for earlier ones."""
    at: dict[int, dt.datetime] = {}
    signal: dict[int, str] = {}
    for j in jobs:
        at[j.generation] = min(at.get(j.generation, j.created_at), j.created_at)
        signal[j.generation] = signal.get(j.generation) or j.completed_by
    if study.state != StudyState.RECEIVING and study.completed_at is not None:
        at[study.generation] = study.completed_at
        signal[study.generation] = study.completed_by
    for generation in sorted(at):
        when = at[generation]
        current = generation == study.generation
        by = COMPLETED_BY.get(signal.get(generation, ""), "")
        text = f"complete: {by}" if by else "complete"
        arrival = received.get(generation)
        if arrival is None and generation > 1:
            text = "complete: reprocessing asked for (no new instances)"
        elif arrival is not None:
            last = _last_waited_for(s, study.id, generation, arrival, when)
            if last is not None:
                text += f", {max(0.0, (when - last).total_seconds()):.1f} s after the last"
                text += " instance"
        events.append(TraceEvent(when, generation, "completed", text, Level.OK))
        if current and study.state == StudyState.NOT_ROUTED:
            events.append(TraceEvent(when, generation, "routed", study.reason, Level.FAILED))
    if study.state == StudyState.RECEIVING:
        events.append(
            TraceEvent(
                None,
                study.generation,
                "completed",
                "waiting for the study to complete (more instances, a release, the quiet period)",
                Level.WAITING,
            )
        )
    return at


def _jobs(jobs: Sequence[Job]) -> Iterable[TraceEvent]:
    for j in jobs:
        stat = " (STAT)" if j.priority >= STAT_PRIORITY else ""
        yield TraceEvent(
            j.created_at, j.generation, "routed", f"route {j.route}: model {j.model}{stat}"
        )
        if j.started_at is not None:
            tries = f" (attempt {j.attempts})" if j.attempts > 1 else ""
            yield TraceEvent(
                j.started_at, j.generation, "analysing", f"route {j.route}: analysis started{tries}"
            )
        elif j.state == JobState.QUEUED:
            yield TraceEvent(
                None, j.generation, "analysing", f"route {j.route}: queued", Level.WAITING
            )
        if j.summary.get("predicted_label"):
            yield TraceEvent(j.analysed_at, j.generation, "analysed", _finding(j), Level.OK)
        if j.state == JobState.FAILED:
            yield TraceEvent(
                j.finished_at, j.generation, "job", f"route {j.route}: failed: {j.error}",
                Level.FAILED,
            )  # fmt: skip
        elif j.state == JobState.SUPERSEDED:
            yield TraceEvent(
                j.finished_at, j.generation, "job",
                f"route {j.route}: superseded (the study changed before it finished)",
            )  # fmt: skip
        elif j.state == JobState.DELIVERED:
            yield TraceEvent(
                j.finished_at, j.generation, "job", f"route {j.route}: delivered", Level.OK
            )
        if j.withdrawn_at is not None:
            why = WITHDRAWAL_REASONS.get(j.withdrawn_reason, j.withdrawn_reason)
            yield TraceEvent(
                j.withdrawn_at, j.generation, "withdrawn",
                f"route {j.route}: results withdrawn from the PACS by {j.withdrawn_by} ({why}):"
                f" {j.withdrawn_note}",
            )  # fmt: skip


def _finding(j: Job) -> str:
    summary = j.summary
    model = summary.get("model") or {}
    label = summary.get("predicted_label")
    probability = (summary.get("probabilities") or {}).get(label)
    uncertainty = (summary.get("uncertainty") or {}).get("score")
    text = f"route {j.route}: {model.get('name', j.model)} {model.get('version', '')}".rstrip()
    text += f" says {label}"
    if isinstance(probability, float):
        text += f" (p={probability:.2f}"
        text += f", uncertainty {uncertainty:.2f})" if isinstance(uncertainty, float) else ")"
    images = len(summary.get("images") or [])
    skipped = len(summary.get("skipped") or {})
    text += f" from {images} image(s)"
    if skipped:
        text += f", {skipped} not analysed"
    if summary.get("needs_review"):
        text += "; needs review"
    return text


def _deliveries(s: Session, jobs: dict[int, Job]) -> Iterable[TraceEvent]:
    """Per job and destination: the objects stored, those awaited and those that failed (told
    when the job settled: a delivery keeps no time of its last attempt)."""
    if not jobs:
        return
    rows = s.execute(
        select(
            Delivery.job_id,
            Delivery.destination,
            Delivery.state,
            Delivery.attempts,
            Delivery.last_status,
            Delivery.last_error,
            Delivery.delivered_at,
            Delivery.next_attempt_at,
            Delivery.unreachable_since,
            Delivery.outage_attempts,
            Result.kind,
        )
        .join(Result, Delivery.result_id == Result.id)
        .where(Delivery.job_id.in_(list(jobs)))
        .order_by(Delivery.id)
    ).all()
    # a job's rejection notes apart from the results they withdraw: each has its own time
    groups: dict[tuple[int, str, bool], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row.job_id, row.destination, row.kind == REJECTION_NOTE_KIND)].append(row)
    for (job_id, destination, _), ds in groups.items():
        generation = jobs[job_id].generation
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(d.kind for d in ds).items()))
        by_state = Counter(d.state for d in ds)
        delivered = [d for d in ds if d.state == DeliveryState.DELIVERED]
        if delivered:
            last = max(d.delivered_at for d in delivered if d.delivered_at is not None)
            yield TraceEvent(
                last,
                generation,
                "delivery",
                f"{len(delivered)} of {len(ds)} object(s) ({kinds}) stored by {destination}",
                Level.OK,
            )
        failed = [d for d in ds if d.state == DeliveryState.FAILED]
        if failed:
            d = failed[-1]
            code = f"0x{d.last_status:04X}" if d.last_status is not None else "no status"
            yield TraceEvent(
                jobs[job_id].finished_at,
                generation,
                "delivery",
                f"{len(failed)} object(s) to {destination} failed after"
                f" {d.attempts + d.outage_attempts} attempt(s) ({code}): {d.last_error}",
                Level.FAILED,
            )
        pending = by_state.get(DeliveryState.PENDING, 0)
        if pending:
            d = next(d for d in ds if d.state == DeliveryState.PENDING)
            tried = f", {d.attempts} attempt(s) so far: {d.last_error}" if d.attempts else ""
            if d.unreachable_since is not None:  # an outage: tried until outage_patience_s
                tried = (
                    f", {destination} unreachable since {d.unreachable_since:%Y-%m-%d %H:%M:%S}"
                    f" ({d.outage_attempts} attempt(s)): {d.last_error}"
                )
            yield TraceEvent(
                None,
                generation,
                "delivery",
                f"{pending} object(s) waiting for {destination}, next attempt "
                f"{d.next_attempt_at:%H:%M:%S}{tried}",
                Level.WAITING,
            )
        committing = by_state.get(DeliveryState.COMMITTING, 0)
        if committing:
            yield TraceEvent(
                None,
                generation,
                "delivery",
                f"{committing} object(s) stored by {destination}, awaiting its storage commitment",
                Level.WAITING,
            )
        superseded = by_state.get(DeliveryState.SUPERSEDED, 0)
        if superseded:
            yield TraceEvent(
                None,
                generation,
                "delivery",
                f"{superseded} object(s) to {destination} not sent: superseded",
            )


def _hl7(s: Session, study: Study, generations: dict[int, int]) -> Iterable[TraceEvent]:
    for m in s.scalars(
        select(Hl7Outbound).where(Hl7Outbound.study_id == study.id).order_by(Hl7Outbound.id)
    ).all():
        generation = generations.get(m.job_id or 0, study.generation)
        what = f"HL7 ORU^R01 ({m.kind})"
        if m.state == DeliveryState.DELIVERED:
            yield TraceEvent(
                m.delivered_at, generation, "hl7", f"{what} acknowledged ({m.last_ack_code})",
                Level.OK,
            )  # fmt: skip
        elif m.state == DeliveryState.FAILED:
            yield TraceEvent(
                m.created_at, generation, "hl7",
                f"{what} failed after {m.attempts + m.outage_attempts} attempt(s):"
                f" {m.last_error}", Level.FAILED,
            )  # fmt: skip
        elif m.state == DeliveryState.SUPERSEDED:
            yield TraceEvent(m.created_at, generation, "hl7", f"{what} superseded")
        else:
            tried = f", {m.attempts} attempt(s) so far: {m.last_error}" if m.attempts else ""
            if m.unreachable_since is not None:  # an outage: tried until outage_patience_s
                tried = (
                    f", the RIS unreachable since {m.unreachable_since:%Y-%m-%d %H:%M:%S}"
                    f" ({m.outage_attempts} attempt(s)): {m.last_error}"
                )
            yield TraceEvent(
                None, generation, "hl7", f"{what} waiting for the RIS{tried}", Level.WAITING
            )


def _reviews(s: Session, study: Study, generations: dict[int, int]) -> Iterable[TraceEvent]:
    for item in s.scalars(
        select(ReviewItem).where(ReviewItem.study_id == study.id).order_by(ReviewItem.id)
    ).all():
        generation = generations.get(item.job_id, study.generation)
        why = "quality-control sample" if item.sampled else item.reason or "needs review"
        if item.reason == "superseded":  # closed by a later generation: its reason is gone
            why = "quality-control sample" if item.sampled else "needs review"
        yield TraceEvent(
            item.created_at, generation, "review", f"case {item.id} on the worklist: {why}",
            Level.WAITING if item.closed_at is None else Level.INFO,
        )  # fmt: skip
        if item.closed_at is not None and item.reason == "superseded":
            yield TraceEvent(
                item.closed_at, generation, "review", f"case {item.id} closed: superseded"
            )
    for v in s.scalars(
        select(Verdict).where(Verdict.study_id == study.id).order_by(Verdict.id)
    ).all():
        generation = generations.get(v.job_id, study.generation)
        what = {"confirm": "confirmed", "override": "overrode", "escalate": "escalated"}.get(
            v.action, v.action
        )
        text = f"{v.user_name} {what}"
        if v.action != "escalate":
            text += f" {v.label or v.model_label}"
        if v.amends_id is not None:
            text += " (an amendment)"
        if v.superseded_at is not None:
            text += " (later amended)"
        yield TraceEvent(v.created_at, generation, "verdict", text, Level.OK)


def _shadows(s: Session, jobs: Sequence[Job]) -> Iterable[TraceEvent]:
    generations = {j.id: j.generation for j in jobs}
    if not generations:
        return
    for sj in s.scalars(
        select(ShadowJob).where(ShadowJob.job_id.in_(list(generations))).order_by(ShadowJob.id)
    ).all():
        generation = generations[sj.job_id]
        if sj.state == ShadowState.DONE:
            label = sj.summary.get("predicted_label", "?")
            yield TraceEvent(
                sj.finished_at, generation, "shadow", f"shadow model {sj.model} says {label}"
            )
        elif sj.state == ShadowState.FAILED:
            yield TraceEvent(
                sj.finished_at, generation, "shadow",
                f"shadow model {sj.model} failed: {sj.error}", Level.FAILED,
            )  # fmt: skip
        elif sj.state == ShadowState.SUPERSEDED:
            yield TraceEvent(
                sj.finished_at, generation, "shadow", f"shadow model {sj.model} superseded"
            )
        else:
            yield TraceEvent(
                None, generation, "shadow", f"shadow model {sj.model} {sj.state.value}",
                Level.WAITING,
            )  # fmt: skip


def _notifications(s: Session, study: Study) -> Iterable[TraceEvent]:
    for n in s.scalars(
        select(Notification).where(Notification.study_id == study.id).order_by(Notification.id)
    ).all():
        text = f"notified {n.target} ({n.event})"
        if n.state == DeliveryState.DELIVERED:
            yield TraceEvent(n.delivered_at or n.created_at, study.generation, "notify", text)
        elif n.state == DeliveryState.FAILED:
            yield TraceEvent(
                n.created_at, study.generation, "notify", f"{text}: failed: {n.last_error}",
                Level.FAILED,
            )  # fmt: skip
        else:
            yield TraceEvent(None, study.generation, "notify", f"{text}: waiting", Level.WAITING)


def _purges(s: Session, study: Study) -> Iterable[TraceEvent]:
    for p in s.scalars(select(Purge).where(Purge.study_id == study.id).order_by(Purge.id)).all():
        why = "keep_hours passed" if p.reason == "age" else "free space ran low"
        yield TraceEvent(
            p.started_at,
            p.generation,
            "retention",
            f"storage retention deleted {p.instances} instance(s) and result files ({why})",
        )
        if p.records_compacted_at is not None:
            yield TraceEvent(
                p.records_compacted_at,
                p.generation,
                "retention",
                "records retention summarised the instance records and erased the patient"
                " identifiers kept for the RIS (records_keep_days passed)",
            )


def _turnaround(
    s: Session,
    jobs: Sequence[Job],
    received: dict[int, _Arrival],
    completions: dict[int, dt.datetime],
) -> list[Step]:
    """The latest analysed job's steps: last instance, complete, analysis started, analysed,
    every object stored."""
    analysed = [j for j in jobs if j.started_at is not None and j.state != JobState.SUPERSEDED]
    if not analysed:
        return []
    job = analysed[-1]
    arrival = received.get(job.generation)
    completed = completions.get(job.generation)
    stored = None
    if job.state in (JobState.DELIVERED, JobState.EXPORTING):
        # the analysis's own objects, not a verified SR or a rejection note added later
        own = select(Delivery.state, Delivery.delivered_at).join(
            Result, Delivery.result_id == Result.id
        )
        own = own.where(Delivery.job_id == job.id, Result.kind.not_in(LATER_RESULT_KINDS))
        rows = s.execute(own).all()
        if not any(state in UNSETTLED_DELIVERY_STATES for state, _ in rows):
            stored = max((at for _, at in rows if at is not None), default=job.analysed_at)

    def span(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
        return None if a is None or b is None else max(0.0, (b - a).total_seconds())

    last = arrival.last if arrival is not None else None
    if arrival is not None and completed is not None:
        last = _last_waited_for(s, job.study_id, job.generation, arrival, completed)
    return [
        Step("last instance to complete", span(last, completed)),
        Step("complete to analysis started", span(completed, job.started_at)),
        Step("analysis", span(job.started_at, job.analysed_at)),
        Step("results to stored by every destination", span(job.analysed_at, stored)),
        Step("last instance to results stored", span(last, stored)),
    ]


def _last_waited_for(
    s: Session, study_id: int, generation: int, arrival: _Arrival, completed: dt.datetime
) -> dt.datetime | None:
    """The last instance of a generation that arrived before it completed: the last of all
    unless a report or key object note came after completion (kept in it without re-opening
    it)."""
    if arrival.last <= completed:
        return arrival.last
    found = s.scalar(
        select(func.max(Instance.received_at)).where(
            Instance.study_id == study_id,
            Instance.generation == generation,
            Instance.received_at <= completed,
        )
    )
    waits = [t for t in (found, arrival.waited_until) if t is not None]
    return max(waits) if waits else None


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


__all__ = ["Level", "Step", "StudyTrace", "TraceEvent", "study_trace"]
