"""The review app's reads and writes on the ledger: users, sessions, worklist, verdicts, audit.

Everything goes through :meth:`Ledger.session`, so the same code runs on SQLite and PostgreSQL.
Verdicts close review items with a conditional update: two radiologists deciding the same case
at once cannot both win. An amendment replaces a closed case's verdict the same way (it marks the
verdict it replaces superseded only if nothing else did first).

A verdict and a withdrawal of the case's results (:mod:`acwi_node.ledger.withdrawals`) agree
under the job's row: each takes it first (``FOR UPDATE`` on PostgreSQL; SQLite serialises the
writers, and each decides in a conditional write), so a verdict on a withdrawn analysis is
refused when claimed, and one claimed before the withdrawal whose verified SR is then refused
(:meth:`Ledger.attach_result`) leaves its case closed as the withdrawal closes it, never open.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

from sqlalchemy import ColumnElement, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from acwi_node import audit as trail
from acwi_node.ledger import Ledger, ResultFile
from acwi_node.ledger.models import (
    UNSETTLED_DELIVERY_STATES,
    AuditEvent,
    Delivery,
    DeliveryState,
    Hl7Outbound,
    Instance,
    Job,
    JobState,
    Notification,
    Purge,
    Result,
    ReviewItem,
    ReviewState,
    Study,
    StudyState,
    SummaryFields,
    User,
    Verdict,
    WebSession,
    job_model_name,
    job_model_version,
    job_sender,
    utcnow,
)
from acwi_node.ledger.repository import (
    RIS_OUTAGE,
    DeliveryFilter,
    files_deleted_at,
    outages,
    owed_delivery,
    promise_hl7_outbound,
    webhook_outages,
)
from acwi_node.review.quality import FLAGGED, SAMPLE

#: ``sender``: a PACS or archive that stores studies by STOW-RS (``/dicomweb/``) and nothing else.
ROLES = ("radiologist", "admin", "sender")
#: Verdict actions: the first two verify the result and close the item; escalate keeps it open.
ACTIONS = ("confirm", "override", "escalate")
#: The actions that verify the result (and that an amendment may take).
FINAL_ACTIONS = ("confirm", "override")


#: Review actions -> audit trail event (and outcome when not success).
_TRAIL_EVENTS: dict[str, tuple[trail.AuditEvent, trail.Outcome | None]] = {
    "login": (trail.AuditEvent.USER_SIGNED_IN, None),
    "login_failed": (trail.AuditEvent.USER_SIGNED_IN, trail.Outcome.MINOR_FAILURE),
    "logout": (trail.AuditEvent.USER_SIGNED_OUT, None),
    "view_case": (trail.AuditEvent.CASE_VIEWED, None),
    "user_added": (trail.AuditEvent.USERS_CHANGED, None),
    "user_disabled": (trail.AuditEvent.USERS_CHANGED, None),
    "user_enabled": (trail.AuditEvent.USERS_CHANGED, None),
    "user_password_set": (trail.AuditEvent.USERS_CHANGED, None),
}


class ReviewError(ValueError):
    """A request the review app refuses; the message says why (safe to show to the user)."""


class UserExists(ReviewError):
    pass


class VerdictAmended(ReviewError):
    """The verdict an amendment was written against is no longer the case's current one."""


class ItemClosed(ReviewError):
    pass


#: What a verdict or an amendment on an analysis whose results were withdrawn is told (the words
#: of :meth:`Ledger.attach_result`'s refusal).
RESULTS_WITHDRAWN = (
    "the results of this analysis were withdrawn from the PACS: nothing more of it is sent"
)


class ResultsWithdrawn(ReviewError):
    """The case's analysis had its results withdrawn from the PACS: it takes no verdict (its
    verified SR would go to the PACS)."""


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: str
    disabled: bool
    password_hash: str = field(repr=False)
    #: Failed sign-ins in a row and when the last was (UTC), for the sign-in throttle.
    failed_sign_ins: int = 0
    last_failed_sign_in_at: dt.datetime | None = None


@dataclass(frozen=True)
class SessionInfo:
    user_id: int
    user_name: str
    role: str
    token_hash: str
    expires_at: dt.datetime
    #: when the session ends unless the reader does something (``idle_timeout_s`` after the
    #: last request of theirs); None for HTTP Basic
    idle_ends_at: dt.datetime | None = None


@dataclass(frozen=True)
class WorklistFilters:
    modality: str = ""
    calling_ae: str = ""
    model: str = ""
    state: str = ""
    #: ``flagged`` (the model asked for review) or ``sample`` (quality control)
    kind: str = ""

    def query(self) -> str:
        """The filters given, as a URL query (``modality=CT&kind=flagged``); "" for none."""
        return urlencode({k: v for k, v in dataclasses.asdict(self).items() if v})

    @classmethod
    def from_query(cls, query: str) -> WorklistFilters:
        """The filters of such a query; anything else in it is ignored."""
        given = parse_qs(query[:1000])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v[0][:64] for k, v in given.items() if k in names and v})

    def matches(self, item: dict[str, Any]) -> bool:
        if self.modality and self.modality not in str(item["modality"]).split("\\"):
            return False
        if self.calling_ae and item["calling_ae"] != self.calling_ae:
            return False
        if self.model and item["model"] != self.model:
            return False
        if self.kind and item["kind"] != self.kind:
            return False
        return not (self.state and item["state"] != self.state)


#: The worklist's cases per page (the page and ``GET /api/worklist``) when none is asked for,
#: and the most one may ask for (``per_page``).
WORKLIST_PER_PAGE = 50
WORKLIST_MAX_PER_PAGE = 200


def worklist_page(
    found: dict[str, Any], page: int = 1, per_page: int = WORKLIST_PER_PAGE
) -> dict[str, Any]:
    """Page ``page`` (from 1) of :meth:`ReviewStore.worklist`'s cases, ``per_page`` a page, in
    the worklist's order: ``items`` that page's cases; ``count`` the cases under the filters
    (every page); ``page``, ``per_page`` and ``pages`` (at least 1). A page past the last has
    no items. ``total`` and ``counts`` as :meth:`ReviewStore.worklist` gives them."""
    per_page = max(1, min(per_page, WORKLIST_MAX_PER_PAGE))
    page = max(1, page)
    items = found["items"]
    start = (page - 1) * per_page
    return {
        **found,
        "items": items[start : start + per_page],
        "count": len(items),
        "page": page,
        "per_page": per_page,
        "pages": max(1, -(-len(items) // per_page)),
    }


#: What the dashboard reads of an analysis's summary.
_DASHBOARD_FIELDS = {
    "probabilities": "json",
    "uncertainty": "json",
    "needs_review": "bool",
    "uncertainty_threshold": "float",
    "ood_threshold": "float",
    "ood_score": "float",
}


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def _outbox_latest(
    s: Session,
    outbox: type[Delivery] | type[Hl7Outbound] | type[Notification],
    *where: ColumnElement[bool],
) -> tuple[dt.datetime | None, str]:
    """An outbox's (results to a destination, ``where``, ORU^R01 messages to the RIS, or
    notifications to a webhook) last
    delivery time, and the error of its latest entry waiting or failed; a resent entry keeps
    its earlier error until it is tried again, and shows none till then."""
    delivered_at = s.scalar(
        select(outbox.delivered_at)
        .where(*where, outbox.state == DeliveryState.DELIVERED)
        .order_by(outbox.id.desc())
        .limit(1)
    )
    error = s.scalar(
        select(outbox.last_error)
        .where(
            *where,
            outbox.state.in_((*UNSETTLED_DELIVERY_STATES, DeliveryState.FAILED)),
            outbox.last_error != "",
            outbox.attempts > 0,
        )
        .order_by(outbox.id.desc())
        .limit(1)
    )
    return delivered_at, error or ""


def _user(u: User) -> UserInfo:
    return UserInfo(
        u.id,
        u.name,
        u.role,
        u.disabled,
        u.password_hash,
        u.failed_sign_ins or 0,
        u.last_failed_sign_in_at,
    )


class ReviewStore:
    """Review-app data access over a :class:`~acwi_node.ledger.Ledger`."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # ------------------------------------------------------------------ users
    def add_user(self, name: str, password_hash: str, role: str) -> UserInfo:
        if role not in ROLES:
            raise ReviewError(f"role must be one of {', '.join(ROLES)}")
        try:
            with self.ledger.session() as s:
                if s.scalars(select(User).where(User.name == name)).first() is not None:
                    raise UserExists(f"user {name!r} already exists")
                user = User(name=name, password_hash=password_hash, role=role, disabled=False)
                s.add(user)
                s.flush()
                return _user(user)
        except IntegrityError as exc:
            raise UserExists(f"user {name!r} already exists") from exc

    def get_user(self, name: str) -> UserInfo | None:
        with self.ledger.session() as s:
            user = s.scalars(select(User).where(User.name == name)).first()
            return None if user is None else _user(user)

    def list_users(self) -> list[UserInfo]:
        with self.ledger.session() as s:
            return [_user(u) for u in s.scalars(select(User).order_by(User.name)).all()]

    def set_disabled(self, name: str, disabled: bool = True) -> bool:
        """Disable (or enable) a user; disabling ends the user's sessions. False if unknown."""
        with self.ledger.session() as s:
            user = s.scalars(select(User).where(User.name == name)).first()
            if user is None:
                return False
            user.disabled = disabled
            if disabled:
                s.execute(delete(WebSession).where(WebSession.user_id == user.id))
            return True

    def set_password(self, name: str, password_hash: str) -> bool:
        """Replace a user's password; ends the user's sessions (a password changed because it
        leaked should sign out whoever used it). False if unknown."""
        with self.ledger.session() as s:
            user = s.scalars(select(User).where(User.name == name)).first()
            if user is None:
                return False
            user.password_hash = password_hash
            user.failed_sign_ins = 0  # a new password starts without failures
            user.last_failed_sign_in_at = None
            s.execute(delete(WebSession).where(WebSession.user_id == user.id))
            return True

    def sign_in_failed(self, user_id: int, at: dt.datetime) -> int:
        """Count a failed sign-in of an account (at ``at``, UTC); the failures in a row so far.
        One statement, so that web processes failing at once each count theirs."""
        with self.ledger.session() as s:
            s.execute(
                update(User)
                .where(User.id == user_id)
                .values(
                    failed_sign_ins=func.coalesce(User.failed_sign_ins, 0) + 1,
                    last_failed_sign_in_at=at,
                )
            )
            return int(s.scalar(select(User.failed_sign_ins).where(User.id == user_id)) or 0)

    def sign_in_succeeded(self, user_id: int) -> None:
        """Clear an account's failed sign-ins."""
        with self.ledger.session() as s:
            s.execute(
                update(User)
                .where(User.id == user_id)
                .values(failed_sign_ins=0, last_failed_sign_in_at=None)
            )

    # --------------------------------------------------------------- sessions
    def create_session(self, user_id: int, token_hash: str, lifetime_s: float) -> None:
        now = utcnow()
        with self.ledger.session() as s:
            s.execute(delete(WebSession).where(WebSession.expires_at <= now))
            s.add(
                WebSession(
                    token_hash=token_hash,
                    user_id=user_id,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + dt.timedelta(seconds=lifetime_s),
                )
            )

    def session_user(
        self,
        token_hash: str,
        *,
        idle_timeout_s: float,
        now: dt.datetime | None = None,
        touch: bool = True,
    ) -> SessionInfo | None:
        """The signed-in user of a live session, or None (unknown, expired, idle, disabled).
        ``touch``: the request is the reader's doing, and the session's idle time starts
        over; not for a page that reloads itself (the worklist), which would otherwise keep
        an unattended workstation signed in."""
        now = now or utcnow()
        with self.ledger.session() as s:
            row = s.scalars(select(WebSession).where(WebSession.token_hash == token_hash)).first()
            if row is None:
                return None
            idle_cut = now - dt.timedelta(seconds=idle_timeout_s)
            if row.expires_at <= now or row.last_seen_at <= idle_cut or row.user.disabled:
                s.delete(row)
                return None
            if touch:
                row.last_seen_at = now
            return SessionInfo(
                row.user_id,
                row.user.name,
                row.user.role,
                token_hash,
                row.expires_at,
                row.last_seen_at + dt.timedelta(seconds=idle_timeout_s),
            )

    def end_session(self, token_hash: str) -> None:
        with self.ledger.session() as s:
            s.execute(delete(WebSession).where(WebSession.token_hash == token_hash))

    # ------------------------------------------------------------------ audit
    def audit(
        self,
        user_name: str,
        action: str,
        study_uid: str = "",
        detail: str = "",
        address: str = "",
    ) -> None:
        """Record an action in the ledger (the dashboard shows it) and in the audit trail."""
        with self.ledger.session() as s:
            s.add(
                AuditEvent(
                    user_name=user_name[:64],
                    action=action[:32],
                    study_uid=study_uid[:64],
                    detail=detail[:2000],
                )
            )
        event, outcome = _TRAIL_EVENTS.get(action, (trail.AuditEvent.USERS_CHANGED, None))
        actor = [trail.user(user_name[:64], address)] if user_name else []
        trail.audit(
            event,
            outcome=outcome or trail.Outcome.SUCCESS,
            participants=actor,
            study_uids=[study_uid] if study_uid else [],
            detail=f"{action}: {detail}" if detail else action,
        )

    def audit_events(self, limit: int = 200) -> list[dict[str, Any]]:
        with self.ledger.session() as s:
            rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)).all()
            return [
                {
                    "at": _iso(e.at),
                    "user": e.user_name,
                    "action": e.action,
                    "study_uid": e.study_uid,
                    "detail": e.detail,
                }
                for e in rows
            ]

    # --------------------------------------------------------------- worklist
    def next_case(
        self,
        reader: str,
        *,
        after: int,
        filters: WorklistFilters | None = None,
        claim_s: int = 0,
        now: dt.datetime | None = None,
    ) -> int | None:
        """The case ``reader`` opens after deciding ``after``: the first on the worklist, in its
        order and under the reader's filters, that nobody else is reading and that the reader
        did not escalate (it waits for a second reader); None when there is none."""
        found = self.worklist(filters, claim_s=claim_s, now=now)
        with self.ledger.session() as s:
            escalated = set(
                s.scalars(
                    select(Verdict.review_item_id).where(
                        Verdict.action == "escalate", Verdict.user_name == reader
                    )
                ).all()
            )
        for item in found["items"]:
            reading = item["reading"]
            if item["id"] == after or item["id"] in escalated:
                continue
            if reading is None or reading["user"] == reader:
                return int(item["id"])
        return None

    def worklist(
        self,
        filters: WorklistFilters | None = None,
        *,
        claim_s: int = 0,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Open review items: escalated first, then by priority (highest first), then the
        studies the model asked about before quality-control samples, then oldest.

        Returns ``items`` (after the filters), ``total`` (before) and ``counts`` per modality,
        calling AE, model, study state and kind (flagged, sample) over every open item (for
        the filter menus). An item someone opened less than ``claim_s`` seconds ago names
        them in ``reading`` (see :meth:`open_for_reading`), else None.
        """
        filters = filters or WorklistFilters()
        now = now or utcnow()
        with self.ledger.session() as s:
            rows = s.execute(
                select(ReviewItem, Study, Job)
                .join(Study, ReviewItem.study_id == Study.id)
                .join(Job, ReviewItem.job_id == Job.id)
                .where(ReviewItem.state == ReviewState.OPEN)
            ).all()
            escalated = {
                item_id
                for (item_id,) in s.execute(
                    select(Verdict.review_item_id).where(
                        Verdict.action == "escalate",
                        Verdict.review_item_id.in_([it.id for it, _, _ in rows] or [-1]),
                    )
                ).all()
            }
            items = []
            for it, st, job in rows:
                summary = job.summary or {}
                items.append(
                    {
                        "id": it.id,
                        "study_uid": st.study_uid,
                        "job_id": job.id,
                        "route": job.route,
                        "model": job.model,
                        "model_version": (summary.get("model") or {}).get("version", ""),
                        "reason": it.reason,
                        "sampled": bool(it.sampled),
                        "kind": SAMPLE if it.sampled else FLAGGED,
                        "priority": it.priority,
                        "escalated": it.id in escalated,
                        "state": st.state.value,
                        "modality": st.modality,
                        # the site: who sent the generation the model read
                        "calling_ae": st.sender_of(job.generation),
                        "received_at": _iso(st.first_received_at),
                        "created_at": _iso(it.created_at),
                        "_received": st.first_received_at,
                        "predicted_label": summary.get("predicted_label"),
                        "probabilities": summary.get("probabilities") or {},
                        "uncertainty": summary.get("uncertainty") or {},
                        "ood_score": summary.get("ood_score"),
                        "reading": reading_of(it, claim_s, now),
                    }
                )
        items.sort(
            key=lambda i: (
                not i["escalated"],
                -i["priority"],
                i["sampled"],
                i["_received"],
                i["id"],
            )
        )
        for i in items:
            del i["_received"]
        counts: dict[str, Counter[str]] = {
            "modality": Counter(),
            "calling_ae": Counter(),
            "model": Counter(),
            "state": Counter(),
            "kind": Counter(),
        }
        for i in items:
            for m in str(i["modality"]).split("\\"):
                counts["modality"][m] += 1
            for key in ("calling_ae", "model", "state", "kind"):
                counts[key][str(i[key])] += 1
        shown = [i for i in items if filters.matches(i)]
        return {
            "items": shown,
            "total": len(items),
            "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        }

    # ---------------------------------------------------------------- decided
    def decided(
        self,
        *,
        days: int = 14,
        reader: str = "",
        limit: int = 200,
        now: dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The cases closed in the last ``days`` days, latest first (at most ``limit``), each
        with the verdict that stands (who gave it, when, the label) and how many amendments it
        took; with ``reader``, only those whose standing verdict is that user's. Where a
        radiologist finds a case again to look at its verdict or amend it."""
        since = (now or utcnow()) - dt.timedelta(days=days)
        with self.ledger.session() as s:
            query = (
                select(ReviewItem, Study, Job, Verdict)
                .join(Study, ReviewItem.study_id == Study.id)
                .join(Job, ReviewItem.job_id == Job.id)
                .join(Verdict, Verdict.review_item_id == ReviewItem.id)
                .where(
                    ReviewItem.state == ReviewState.CLOSED,
                    ReviewItem.closed_at >= since,
                    Verdict.action.in_(FINAL_ACTIONS),
                    Verdict.superseded_at.is_(None),
                )
                .order_by(ReviewItem.closed_at.desc(), ReviewItem.id.desc())
                .limit(limit)
            )
            if reader:
                query = query.where(Verdict.user_name == reader)
            rows = s.execute(query).all()
            amended = dict(
                s.execute(
                    select(Verdict.review_item_id, func.count())
                    .where(
                        Verdict.amends_id.is_not(None),
                        Verdict.review_item_id.in_([it.id for it, *_ in rows] or [-1]),
                    )
                    .group_by(Verdict.review_item_id)
                ).all()
            )
            out = []
            for it, st, job, v in rows:
                summary = job.summary or {}
                out.append(
                    {
                        "id": it.id,
                        "study_uid": st.study_uid,
                        "job_id": job.id,
                        "kind": SAMPLE if it.sampled else FLAGGED,
                        "modality": st.modality,
                        "calling_ae": st.sender_of(job.generation),
                        "model": job.model,
                        "model_version": (summary.get("model") or {}).get("version", ""),
                        "predicted_label": summary.get("predicted_label"),
                        "closed_at": _iso(it.closed_at),
                        "verdict": {
                            "id": v.id,
                            "user": v.user_name,
                            "action": v.action,
                            "label": v.label,
                            "at": _iso(v.created_at),
                        },
                        "amendments": int(amended.get(it.id, 0)),
                    }
                )
            return out

    # ------------------------------------------------------------------- case
    def case(
        self, item_id: int, *, claim_s: int = 0, now: dt.datetime | None = None
    ) -> dict[str, Any] | None:
        """Everything the case page shows about one review item (open or closed); with
        ``claim_s``, who is reading it (see :meth:`open_for_reading`)."""
        with self.ledger.session() as s:
            it = s.get(ReviewItem, item_id)
            if it is None:
                return None
            st, job = it.study, it.job
            results = [
                {
                    "kind": r.kind,
                    "sop_instance_uid": r.sop_instance_uid,
                    "path": r.path,
                    "deliveries": [
                        {
                            "destination": d.destination,
                            "state": d.state.value,
                            "attempts": d.attempts,
                            "last_status": d.last_status,
                        }
                        for d in r.deliveries
                    ],
                }
                for r in job.results
            ]
            verdicts = s.scalars(
                select(Verdict).where(Verdict.review_item_id == item_id).order_by(Verdict.id)
            ).all()
            # A closed case's files may be gone (storage retention).
            deleted = files_deleted_at(s, st.id, job.generation)
            current = [
                v.id for v in verdicts if v.action in FINAL_ACTIONS and v.superseded_at is None
            ]
            return {
                "id": it.id,
                "images_deleted_at": _iso(deleted),
                "state": it.state.value,
                # a quality-control sample, or a case the model asked about
                "kind": SAMPLE if it.sampled else FLAGGED,
                # who is reading it (opened it less than claim_s seconds ago), or None
                "reading": reading_of(it, claim_s, now or utcnow()),
                "reason": it.reason,
                "priority": it.priority,
                "created_at": _iso(it.created_at),
                "closed_at": _iso(it.closed_at),
                "study_id": st.id,
                "study_uid": st.study_uid,
                "study_state": st.state.value,
                "modality": st.modality,
                # who sent the generation the model read, and the study's first sender
                "calling_ae": st.sender_of(job.generation),
                "first_calling_ae": st.calling_ae,
                "body_part": st.body_part,
                "instances": st.instance_count,
                "received_at": _iso(st.first_received_at),
                "job_id": job.id,
                "job_state": job.state.value,
                # its AI results withdrawn from the PACS: nothing more of it is sent
                "withdrawn": job.withdrawn_at is not None,
                "generation": job.generation,
                "route": job.route,
                "model": job.model,
                "destinations": list(job.destinations),
                "summary": dict(job.summary or {}),
                "results": results,
                "verdicts": [
                    {
                        "id": v.id,
                        "user": v.user_name,
                        "action": v.action,
                        "label": v.label,
                        "model_label": v.model_label,
                        "reason": v.reason,
                        "at": _iso(v.created_at),
                        "sr_sop_instance_uid": v.sr_sop_instance_uid,
                        "boxes": kept_boxes(v.boxes),
                        # the verdict it amends, and whether a later one amended it
                        "amends": v.amends_id,
                        "superseded_at": _iso(v.superseded_at),
                    }
                    for v in verdicts
                ],
                # the confirm or override that stands (None while none was given)
                "current_verdict": current[-1] if current else None,
            }

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> str | None:
        """Spool path (relative) of an instance of the study, or None."""
        with self.ledger.session() as s:
            return s.scalars(
                select(Instance.path)
                .join(Study, Instance.study_id == Study.id)
                .where(Study.study_uid == study_uid, Instance.sop_instance_uid == sop_instance_uid)
            ).first()

    def instance_paths(self, study_uids: Collection[str]) -> dict[tuple[str, str], str]:
        """:meth:`instance_path` of every instance of the studies, by (Study Instance UID,
        SOP Instance UID): one query per 500 studies."""
        found: dict[tuple[str, str], str] = {}
        uids = sorted(set(study_uids))
        with self.ledger.session() as s:
            for start in range(0, len(uids), 500):
                rows = s.execute(
                    select(Study.study_uid, Instance.sop_instance_uid, Instance.path)
                    .join(Study, Instance.study_id == Study.id)
                    .where(Study.study_uid.in_(uids[start : start + 500]))
                )
                for study_uid, sop_instance_uid, path in rows:
                    found[(study_uid, sop_instance_uid)] = path
        return found

    def job_instance_paths(self, job_id: int) -> list[str]:
        _, paths = self.ledger.job_inputs(job_id)
        return paths

    def jobs_instance_paths(self, job_ids: Collection[int]) -> dict[int, list[str]]:
        """:meth:`job_instance_paths` of many jobs: one query per 500."""
        return self.ledger.jobs_input_paths(job_ids)

    # ---------------------------------------------------------------- reading
    def open_for_reading(
        self, item_id: int, user_name: str, *, claim_s: int, now: dt.datetime | None = None
    ) -> dict[str, str] | None:
        """``user_name`` opened the open case ``item_id``: they are now reading it, unless
        someone else opened it less than ``claim_s`` seconds ago. Returns that other reader
        (``{"user", "since"}``), or None (the case is this user's to read, is closed, or
        ``claim_s`` is 0). A hint for the others, not a lock: anyone may still decide."""
        if claim_s <= 0:
            return None
        now = now or utcnow()
        stale = now - dt.timedelta(seconds=claim_s)
        with self.ledger.session() as s:
            result = s.execute(
                update(ReviewItem)
                .where(
                    ReviewItem.id == item_id,
                    ReviewItem.state == ReviewState.OPEN,
                    or_(
                        ReviewItem.reading_by.is_(None),
                        ReviewItem.reading_by == user_name,
                        ReviewItem.reading_since.is_(None),
                        ReviewItem.reading_since < stale,
                    ),
                )
                .values(reading_by=user_name[:64], reading_since=now)
            )
            if getattr(result, "rowcount", 0):
                return None
            it = s.get(ReviewItem, item_id)
            return reading_of(it, claim_s, now) if it is not None else None

    def stop_reading(self, item_id: int, user_name: str) -> bool:
        """``user_name`` leaves the case for the others; False when they were not reading it."""
        with self.ledger.session() as s:
            result = s.execute(
                update(ReviewItem)
                .where(ReviewItem.id == item_id, ReviewItem.reading_by == user_name)
                .values(reading_by=None, reading_since=None)
            )
            return bool(getattr(result, "rowcount", 0))

    # --------------------------------------------------------------- verdicts
    def claim_verdict(
        self,
        item_id: int,
        *,
        user: SessionInfo,
        action: str,
        label: str,
        model_label: str,
        reason: str,
        sr_sop_instance_uid: str = "",
        hl7_control_id: str | None = None,
        boxes: dict[str, list[list[int]]] | None = None,
    ) -> int:
        """Record a verdict on an open item; confirm/override close it. Returns the verdict id.

        ``boxes`` are the lesion boxes the reader marked (see :mod:`.lesion_boxes`).

        With ``hl7_control_id`` (a RIS is configured) a confirm or override also promises its
        ORU^R01 in the same transaction (see :func:`promise_hl7_outbound`).

        Raises :class:`ItemClosed` when the item is not open (someone else decided first),
        :class:`ResultsWithdrawn` when its analysis's results were withdrawn from the PACS (an
        item such a withdrawal missed, open still, is closed as it closes them).
        """
        if action not in ACTIONS:
            raise ReviewError(f"verdict must be one of {', '.join(ACTIONS)}")
        now = utcnow()
        count = sum(len(kept) for kept in (boxes or {}).values())
        marked = f", {count} lesion box(es)" if count else ""
        refusal: ReviewError | None = None
        with self.ledger.session() as s:
            job_id = s.scalar(select(ReviewItem.job_id).where(ReviewItem.id == item_id))
            if job_id is None:
                raise ItemClosed("this case is no longer open for review")
            _lock_job(s, job_id)
            # nobody is reading it now; confirm and override close it, an escalation leaves
            # it open for a second reader
            values: dict[str, Any] = {"reading_by": None, "reading_since": None}
            if action != "escalate":
                values.update(state=ReviewState.CLOSED, closed_at=now)
            won = s.execute(
                update(ReviewItem)
                .where(
                    ReviewItem.id == item_id,
                    ReviewItem.state == ReviewState.OPEN,
                    ~_withdrawn(ReviewItem.job_id),
                )
                .values(**values)
            )
            it = s.get(ReviewItem, item_id) if getattr(won, "rowcount", 0) else None
            if it is None:
                refusal = (
                    ResultsWithdrawn(RESULTS_WITHDRAWN)
                    if _close_if_withdrawn(s, item_id)
                    else ItemClosed("this case is no longer open for review")
                )
            else:
                verdict = _verdict_row(
                    it, user, action, label, model_label, reason, now, sr_sop_instance_uid, boxes
                )
                s.add(verdict)
                if hl7_control_id is not None and action != "escalate":
                    promise_hl7_outbound(
                        s, study_id=it.study_id, job_id=it.job_id, kind=f"verdict-{item_id}",
                        control_id=hl7_control_id,
                    )  # fmt: skip
                s.add(
                    AuditEvent(
                        at=now,
                        user_name=user.user_name,
                        action=f"verdict:{action}",
                        study_uid=it.study.study_uid,
                        detail=f"item {item_id}, label {label or '-'}{marked}",
                    )
                )
                s.flush()
                verdict_id = verdict.id
                study_uid = it.study.study_uid
        if refusal is not None:  # after the commit: an item closed as withdrawn stays so
            raise refusal
        trail.audit(
            trail.AuditEvent.VERDICT_RECORDED,
            participants=[trail.user(user.user_name)],
            study_uids=[study_uid],
            detail=f"{action}, item {item_id}, label {label or '-'}{marked}",
        )
        return verdict_id

    def claim_amendment(
        self,
        item_id: int,
        amends: int,
        *,
        user: SessionInfo,
        action: str,
        label: str,
        model_label: str,
        reason: str,
        sr_sop_instance_uid: str,
        ris: bool = False,
        boxes: dict[str, list[list[int]]] | None = None,
    ) -> int:
        """Record an amendment of a closed item's current verdict ``amends`` (a confirm or
        override that replaces it); returns the new verdict's id.

        With ``ris`` (a RIS is configured) it also promises the amendment's ORU^R01 in the same
        transaction (kind ``verdict-<item>-<verdict id>``, see
        :func:`acwi_node.hl7.client.verdict_kind`).

        Raises :class:`VerdictAmended` when ``amends`` is not the item's current verdict any
        more (someone amended it first), :class:`ResultsWithdrawn` when the analysis's results
        were withdrawn from the PACS.
        """
        if action not in FINAL_ACTIONS:
            raise ReviewError(f"an amendment must be one of {', '.join(FINAL_ACTIONS)}")
        now = utcnow()
        count = sum(len(kept) for kept in (boxes or {}).values())
        marked = f", {count} lesion box(es)" if count else ""
        with self.ledger.session() as s:
            job_id = s.scalar(select(ReviewItem.job_id).where(ReviewItem.id == item_id))
            if job_id is not None:
                _lock_job(s, job_id)
            result = s.execute(
                update(Verdict)
                .where(
                    Verdict.id == amends,
                    Verdict.review_item_id == item_id,
                    Verdict.action.in_(FINAL_ACTIONS),
                    Verdict.superseded_at.is_(None),
                    ~_withdrawn(Verdict.job_id),
                )
                .values(superseded_at=now)
            )
            it = s.get(ReviewItem, item_id)
            if not getattr(result, "rowcount", 0) or it is None:
                withdrawn_at = select(Job.withdrawn_at).where(Job.id == job_id)
                if job_id is not None and s.scalar(withdrawn_at) is not None:
                    raise ResultsWithdrawn(RESULTS_WITHDRAWN)
                raise VerdictAmended(
                    "this case's verdict changed since the page was loaded: reload it"
                )
            verdict = _verdict_row(
                it, user, action, label, model_label, reason, now, sr_sop_instance_uid, boxes
            )
            verdict.amends_id = amends
            s.add(verdict)
            s.flush()
            verdict_id = verdict.id
            if ris:
                from acwi_node.hl7.client import control_id_for, verdict_kind

                promise_hl7_outbound(
                    s, study_id=it.study_id, job_id=it.job_id,
                    kind=verdict_kind(item_id, verdict_id),
                    control_id=control_id_for(it.job_id, "amendment", verdict_id),
                )  # fmt: skip
            study_uid = it.study.study_uid
            detail = f"item {item_id}, verdict {amends} amended, label {label or '-'}{marked}"
            s.add(
                AuditEvent(
                    at=now,
                    user_name=user.user_name,
                    action=f"verdict:amend:{action}",
                    study_uid=study_uid,
                    detail=detail,
                )
            )
        trail.audit(
            trail.AuditEvent.VERDICT_RECORDED,
            participants=[trail.user(user.user_name)],
            study_uids=[study_uid],
            detail=f"{action}, {detail}",
        )
        return verdict_id

    def undo_verdict(self, verdict_id: int) -> None:
        """Remove a verdict whose verified SR could not be stored, and re-open its item; for an
        amendment, the verdict it amended stands again.

        An item whose analysis's results were withdrawn since the verdict claimed it (the
        withdrawal found it closed, and the verified SR was refused) is not re-opened: it is
        closed as the withdrawal closes the items it finds open (``withdrawn``)."""
        withdrawn = False
        with self.ledger.session() as s:
            v = s.get(Verdict, verdict_id)
            if v is None:
                return
            _lock_job(s, v.job_id)
            if v.amends_id is None:
                # the item stays closed for a withdrawn analysis, else it is open again
                s.execute(
                    update(ReviewItem)
                    .where(ReviewItem.id == v.review_item_id, ~_withdrawn(ReviewItem.job_id))
                    .values(state=ReviewState.OPEN, closed_at=None)
                )
                withdrawn = _close_if_withdrawn(s, v.review_item_id, claimed=True)
                kind = f"verdict-{v.review_item_id}"
            else:
                s.execute(
                    update(Verdict).where(Verdict.id == v.amends_id).values(superseded_at=None)
                )
                kind = f"verdict-{v.review_item_id}-{v.id}"
            s.delete(v)
            user_name, item_id = v.user_name, v.review_item_id
            s.execute(
                delete(Hl7Outbound).where(
                    Hl7Outbound.job_id == v.job_id,
                    Hl7Outbound.kind == kind,
                    Hl7Outbound.message == "",
                )
            )
        closed = "; the case is closed: its results were withdrawn" if withdrawn else ""
        trail.audit(
            trail.AuditEvent.VERDICT_RECORDED,
            outcome=trail.Outcome.MINOR_FAILURE,
            participants=[trail.user(user_name)],
            detail=f"verdict on item {item_id} withdrawn: its verified SR could not be stored"
            + closed,
        )

    def names_result_file(self, path: str) -> bool:
        """Whether a result in the ledger (of any job) is the file at ``path``, relative to the
        results directory."""
        with self.ledger.session() as s:
            return s.scalar(select(Result.id).where(Result.path == path).limit(1)) is not None

    def attach_verified_sr(
        self, job_id: int, result: ResultFile, takes: DeliveryFilter | None = None
    ) -> int:
        """Record the verified SR as a result of the job (see :meth:`Ledger.attach_result`);
        returns how many deliveries were queued."""
        return self.ledger.attach_result(job_id, result, takes)

    # -------------------------------------------------------------- dashboard
    def dashboard(
        self, *, days: int = 14, now: dt.datetime | None = None, timezone: str = "UTC"
    ) -> dict[str, Any]:
        """Per calling AE (site) and day: received, analysed, delivered, review rate, mean
        uncertainty and out-of-distribution rate; plus the current queue depth. The studies
        received (and of them delivered) count under their first sender, on the day they
        first came; the analyses under the sender of the generation analysed (a study another
        AE sent again is that AE's, as routing took it). A day is the
        hospital's (``timezone``, ``monitoring.timezone``: midnight to midnight on its clock,
        23 or 25 hours on the days its clocks change), from the start of the day ``days``
        days before today's."""
        now = now or utcnow()
        zone = zoneinfo.ZoneInfo(timezone)
        here = now.replace(tzinfo=dt.timezone.utc).astimezone(zone)
        first_day = here.date() - dt.timedelta(days=days)
        since = (
            dt.datetime.combine(first_day, dt.time(), tzinfo=zone)
            .astimezone(dt.timezone.utc)
            .replace(tzinfo=None)
        )

        def day_of(moment: dt.datetime) -> str:
            return moment.replace(tzinfo=dt.timezone.utc).astimezone(zone).date().isoformat()

        rows: dict[tuple[str, str], dict[str, Any]] = defaultdict(
            lambda: {
                "received": 0,
                "analysed": 0,
                "delivered": 0,
                "review": 0,
                "ood": 0,
                "_uncertainty": [],
            }
        )
        with self.ledger.session() as s:
            for received_at, calling_ae, state in s.execute(
                select(Study.first_received_at, Study.calling_ae, Study.state).where(
                    Study.first_received_at >= since
                )
            ).all():
                key = (day_of(received_at), calling_ae or "-")
                rows[key]["received"] += 1
                if state == StudyState.DELIVERED:
                    rows[key]["delivered"] += 1
            # a few fields of the summaries, by the database: a CT's lists hundreds of images,
            # and two weeks of them decoded whole held the page for seconds
            fields = SummaryFields(_DASHBOARD_FIELDS, self.ledger.engine.dialect.name)
            jobs = s.execute(
                select(Job.started_at, job_sender(), *fields.columns)
                .join(Study, Job.study_id == Study.id)
                .where(Job.started_at >= since, Job.state != JobState.SUPERSEDED)
            ).all()
            for started_at, calling_ae, *values in jobs:
                summary = fields.read(values)
                if not summary.get("probabilities"):
                    continue
                key = (day_of(started_at), calling_ae or "-")
                row = rows[key]
                row["analysed"] += 1
                u = summary.get("uncertainty") or {}
                score = float(u.get("score") or 0.0)
                row["_uncertainty"].append(score)
                if summary.get("needs_review"):
                    row["review"] += 1
                    threshold = summary.get("uncertainty_threshold")
                    threshold = float("inf") if threshold is None else float(threshold)
                    ood_threshold = summary.get("ood_threshold")
                    if ood_threshold is not None:
                        is_ood = float(summary.get("ood_score") or 0.0) > float(ood_threshold)
                    else:
                        is_ood = score <= threshold
                    row["ood"] += int(is_ood)
            queue = {
                "queued": _count(s, Job, Job.state == JobState.QUEUED),
                "analysing": _count(s, Job, Job.state == JobState.ANALYSING),
                "pending_deliveries": _count(s, Delivery, Delivery.state == DeliveryState.PENDING),
                "open_reviews": _count(s, ReviewItem, ReviewItem.state == ReviewState.OPEN),
            }
            reviewed = _count(s, Verdict, Verdict.created_at >= since)
            purged = _count(s, Purge, Purge.started_at >= since)
        table = []
        for (day, ae), row in sorted(rows.items(), reverse=True):
            values = row.pop("_uncertainty")
            analysed = row["analysed"]
            table.append(
                {
                    "day": day,
                    "calling_ae": ae,
                    **row,
                    "review_rate": row["review"] / analysed if analysed else None,
                    "ood_rate": row["ood"] / analysed if analysed else None,
                    "mean_uncertainty": sum(values) / len(values) if values else None,
                }
            )
        return {
            "days": days,
            "rows": table,
            "queue": queue,
            "verdicts": reviewed,
            "files_deleted": purged,
        }

    def agreement(self, *, days: int = 90, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """The radiologists' final verdicts (confirm, override; an amended case's amendment)
        of the last ``days`` days as agreement rows per model version and kind of case
        (:func:`acwi_node.review.quality.agreement`)."""
        from acwi_node.review.quality import FinalVerdict, agreement

        since = (now or utcnow()) - dt.timedelta(days=days)
        with self.ledger.session() as s:
            rows = s.execute(
                select(
                    job_model_name(),
                    job_model_version(),
                    ReviewItem.sampled,
                    Verdict.model_label,
                    Verdict.label,
                    job_sender(),
                )
                .join(ReviewItem, Verdict.review_item_id == ReviewItem.id)
                .join(Job, Verdict.job_id == Job.id)
                .join(Study, Verdict.study_id == Study.id)
                .where(
                    Verdict.action.in_(FINAL_ACTIONS),
                    Verdict.superseded_at.is_(None),  # an amended case counts once, as amended
                    Verdict.created_at >= since,
                )
            ).all()
        return agreement(
            FinalVerdict(
                model=str(model),
                version=str(version),
                kind=SAMPLE if sampled else FLAGGED,
                model_label=str(model_label),
                label=str(label),
                site=str(site or ""),
            )
            for model, version, sampled, model_label, label, site in rows
        )

    def delivery_status(
        self, destinations: Sequence[str], *, ris: bool = False, notify: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Each result destination's outbox, for the administrators' part of the dashboard: the
        configured ``destinations`` in order, then any other the outbox still names, and (with
        ``ris``) the RIS's ORU^R01 outbox as ``"RIS (HL7)"``, and each ``notify`` webhook's
        notifications as ``"Notify: <name>"``. Per row: results waiting (retried
        with back-off), results stored and awaiting the destination's storage commitment,
        results failed for good and not resent, when the last one was delivered, and the
        error of the latest one waiting or failed."""
        unsettled = (*UNSETTLED_DELIVERY_STATES, DeliveryState.FAILED)
        out: list[dict[str, Any]] = []
        with self.ledger.session() as s:
            counts: dict[str, Counter[str]] = defaultdict(Counter)
            for name, state, n in s.execute(
                select(Delivery.destination, Delivery.state, func.count())
                .join(Job, Delivery.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .join(Result, Delivery.result_id == Result.id)
                # failed for good: only what is still owed (what a retry would send again),
                # not a withdrawn result or one a later generation replaced
                .where(
                    Delivery.state.in_(unsettled),
                    or_(Delivery.state != DeliveryState.FAILED, owed_delivery()),
                )
                .group_by(Delivery.destination, Delivery.state)
            ):
                counts[name][state.value] += n
            # an outage: since when the oldest waiting delivery could not reach it
            unreachable = {o.destination: o.since for o in outages(s)}
            webhooks_down = webhook_outages(s)
            for name in list(dict.fromkeys([*destinations, *sorted(counts)])):
                delivered_at, error = _outbox_latest(s, Delivery, Delivery.destination == name)
                out.append(
                    {
                        "name": name,
                        "configured": name in destinations,
                        # A configured DICOM destination: the dashboard offers a C-ECHO.
                        "checkable": name in destinations,
                        "pending": counts[name]["pending"],
                        "committing": counts[name]["committing"],
                        "failed": counts[name]["failed"],
                        "last_delivered_at": _iso(delivered_at),
                        "last_error": error,
                        "unreachable_since": _iso(unreachable.get(name)),
                    }
                )
            if ris:
                hl7: Counter[str] = Counter()
                for state, n in s.execute(
                    select(Hl7Outbound.state, func.count())
                    .where(Hl7Outbound.state.in_(unsettled))
                    .group_by(Hl7Outbound.state)
                ):
                    hl7[state.value] += n
                delivered_at, error = _outbox_latest(s, Hl7Outbound)
                out.append(
                    {
                        "name": "RIS (HL7)",
                        "configured": True,
                        "checkable": False,
                        "pending": hl7["pending"],
                        "committing": 0,
                        "failed": hl7["failed"],
                        "last_delivered_at": _iso(delivered_at),
                        "last_error": error,
                        "unreachable_since": _iso(unreachable.get(RIS_OUTAGE)),
                    }
                )
            for target in notify:
                counted: Counter[str] = Counter()
                for state, n in s.execute(
                    select(Notification.state, func.count())
                    .where(Notification.target == target, Notification.state.in_(unsettled))
                    .group_by(Notification.state)
                ):
                    counted[state.value] += n
                delivered_at, error = _outbox_latest(s, Notification, Notification.target == target)
                out.append(
                    {
                        "name": f"Notify: {target}",
                        "configured": True,
                        "checkable": False,
                        "pending": counted["pending"],
                        "committing": 0,
                        "failed": counted["failed"],
                        "last_delivered_at": _iso(delivered_at),
                        "last_error": error,
                        "unreachable_since": _iso(webhooks_down.get(target)),
                    }
                )
        return out

    def failed_studies(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently failed studies, for the administrators' part of the dashboard:
        each with its reason and whether storage retention deleted its files."""
        failed_delivery = (
            exists()
            .where(
                Delivery.job_id == Job.id,
                Job.study_id == Study.id,
                Job.generation == Study.generation,
                Delivery.state == DeliveryState.FAILED,
            )
            .correlate(Study)
        )
        with self.ledger.session() as s:
            rows = s.execute(
                select(Study, Purge.id, failed_delivery)
                .outerjoin(
                    Purge,
                    (Purge.study_id == Study.id) & (Purge.generation == Study.generation),
                )
                .where(Study.state == StudyState.FAILED)
                .order_by(Study.updated_at.desc(), Study.id.desc())
                .limit(limit)
            ).all()
            return [
                {
                    "study_uid": st.study_uid,
                    "calling_ae": st.generation_sender(),
                    "modality": st.modality,
                    "reason": st.reason,
                    "updated_at": _iso(st.updated_at),
                    "images_deleted": purge_id is not None,
                    # Its results exist and only their delivery failed: resend, not reprocess.
                    "resendable": bool(resendable),
                }
                for st, purge_id, resendable in rows
            ]

    # --------------------------------------------------------------- feedback
    def reviewed_cases(self) -> list[dict[str, Any]]:
        """Closed items with their current confirm/override verdict (an amended case's
        amendment); in one query, however many."""
        with self.ledger.session() as s:
            rows = s.execute(
                select(
                    Verdict.review_item_id,
                    Verdict.label,
                    Verdict.model_label,
                    Verdict.action,
                    Verdict.boxes,
                    Study.study_uid,
                    job_sender().label("calling_ae"),
                    Job.id.label("job_id"),
                    Job.summary,
                    ReviewItem.sampled,
                )
                .join(Study, Study.id == Verdict.study_id)
                .join(Job, Job.id == Verdict.job_id)
                .join(ReviewItem, ReviewItem.id == Verdict.review_item_id)
                .where(Verdict.action.in_(FINAL_ACTIONS), Verdict.superseded_at.is_(None))
                .order_by(Verdict.id)
            ).all()
        latest: dict[int, Any] = {}
        for row in rows:
            latest[row.review_item_id] = row
        out = []
        for v in latest.values():
            # (SOP Instance UID, frame number or None): a multi-frame image's frames
            images = [
                (im.get("sop_instance_uid"), frame_number_of(im))
                for im in (v.summary or {}).get("images", [])
            ]
            out.append(
                {
                    "study_uid": v.study_uid,
                    "calling_ae": v.calling_ae,
                    "job_id": v.job_id,
                    "label": v.label,
                    "model_label": v.model_label,
                    "action": v.action,
                    # a quality-control sample, or a case the model asked about
                    "kind": SAMPLE if v.sampled else FLAGGED,
                    "images": [(uid, frame) for uid, frame in images if uid],
                    "boxes": kept_boxes(v.boxes),
                }
            )
        return out


def _withdrawn(job_id: Any) -> ColumnElement[bool]:
    """Whether the results of the job ``job_id`` (a column) were withdrawn from the PACS."""
    return exists().where(Job.id == job_id, Job.withdrawn_at.is_not(None))


def _lock_job(s: Session, job_id: int) -> None:
    """Lock the job's row first, as a withdrawal (:meth:`Withdrawals.record`) and the
    attaching of a result (:meth:`Ledger.attach_result`) do. On PostgreSQL (``FOR UPDATE``)
    a verdict then waits for a withdrawal of the job's results in progress and sees it done;
    taken after the review item's row, the two would deadlock (the withdrawal holds the job
    and waits for the item; the verdict's rows, which refer to the job, wait for the job).
    SQLite has no row locks but serialises writers: the verdict's first write, a conditional
    one, decides."""
    s.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def _close_if_withdrawn(s: Session, item_id: int, *, claimed: bool = False) -> bool:
    """If the results of review item ``item_id``'s job were withdrawn, close the item as the
    withdrawal closes those it finds open (``withdrawn``, at the withdrawal's time): one open
    still (it has no verdict, and takes none) or, ``claimed``, the one that a verdict whose
    verified SR was refused had closed (the withdrawal found it closed already). Returns
    whether they were withdrawn."""
    withdrawn_at = s.scalar(
        select(Job.withdrawn_at)
        .join(ReviewItem, ReviewItem.job_id == Job.id)
        .where(ReviewItem.id == item_id)
    )
    if withdrawn_at is None:
        return False
    states = [ReviewState.OPEN, ReviewState.CLOSED] if claimed else [ReviewState.OPEN]
    s.execute(
        update(ReviewItem)
        .where(ReviewItem.id == item_id, ReviewItem.state.in_(states))
        .values(state=ReviewState.CLOSED, closed_at=withdrawn_at, reason="withdrawn")
    )
    return True


def _verdict_row(
    item: ReviewItem,
    user: SessionInfo,
    action: str,
    label: str,
    model_label: str,
    reason: str,
    now: dt.datetime,
    sr_sop_instance_uid: str,
    boxes: dict[str, list[list[int]]] | None,
) -> Verdict:
    """A verdict's ledger row on ``item``, its text cut to the columns' lengths."""
    return Verdict(
        review_item_id=item.id,
        study_id=item.study_id,
        job_id=item.job_id,
        user_id=user.user_id,
        user_name=user.user_name,
        action=action,
        label=label[:64],
        model_label=model_label[:64],
        reason=reason[:2000],
        created_at=now,
        sr_sop_instance_uid=sr_sop_instance_uid,
        boxes=boxes or None,
    )


def reading_of(item: ReviewItem, claim_s: int, now: dt.datetime) -> dict[str, str] | None:
    """Who is reading the open ``item`` (``{"user", "since"}``): whoever opened it less than
    ``claim_s`` seconds before ``now``; None when nobody did, it is closed or ``claim_s`` is 0."""
    since = item.reading_since
    if (
        claim_s <= 0
        or item.state != ReviewState.OPEN
        or not item.reading_by
        or since is None
        or since < now - dt.timedelta(seconds=claim_s)
    ):
        return None
    return {"user": item.reading_by, "since": _iso(since) or ""}


def kept_boxes(value: Any) -> dict[str, list[list[int]]]:
    """A verdict's kept lesion boxes, by image name, each image's as a list of ``[x0, y0, x1,
    y1]``; a verdict recorded when an image took one box (``name -> [x0, y0, x1, y1]``) reads
    as a list of that one."""
    out: dict[str, list[list[int]]] = {}
    for name, boxes in dict(value or {}).items():
        if boxes and all(isinstance(v, int) for v in boxes):
            boxes = [boxes]
        out[str(name)] = [[int(v) for v in box] for box in boxes or []]
    return out


def frame_number_of(image: dict[str, Any]) -> int | None:
    """The frame number of a job summary's image (a frame of a multi-frame image), or None."""
    value = image.get("frame_number")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _count(s: Any, model: Any, *where: Any) -> int:
    from sqlalchemy import func

    return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)
