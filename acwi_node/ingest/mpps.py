"""Completion signals stronger than a quiet period: MPPS and a trusted sender's release.

**Modality Performed Procedure Step (MPPS) SCP.** A modality announces a procedure step with
N-CREATE (status ``IN PROGRESS``) and ends it with N-SET (status ``COMPLETED`` or
``DISCONTINUED``). On ``COMPLETED`` the step lists what it produced (Performed Series Sequence ->
Referenced Image Sequence / Referenced Non-Image Composite SOP Instance Sequence). The studies
holding those instances are complete as soon as every listed instance is in the ledger: the
completion loop need not wait for the quiet period.

**Release-complete senders.** An association from a calling AE title in
``completion.release_complete_aes`` (for example a PACS that forwards only *stable* studies, such as
Orthanc with ``orthanc/route_to_node.lua``) that ends with an A-RELEASE completes the studies it
sent at once, as long as no other association is still sending them.

Steps and signals are kept in the ledger (tables ``mpps_steps`` and ``completion_signals``, UIDs
only), so that several SCP processes sharing the DICOM port (``ingest.processes``) and the process
running the completion loop see the same ones: a modality may send the N-CREATE and the N-SET on
different associations, which different processes accept. Signals only ever make a study complete
*earlier*; the quiet period and ``max_wait_s`` still complete every study. Completion itself stays
the ledger's conditional update, so a signal never routes a study twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from sqlalchemy import CursorResult, Select, delete, func, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from acwi_node.ingest.spool import is_safe_uid
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    CompletionSignal,
    Instance,
    MppsStep,
    Study,
    StudyState,
    utcnow,
)
from acwi_node.observability.logging import note_identifiers

log = logging.getLogger("acwi_node.mpps")

#: Modality Performed Procedure Step SOP Class (PS3.4 Annex F.7).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"

# DIMSE statuses of the MPPS SCP (PS3.4 F.7.2.1.2 and F.7.2.2.2, PS3.7 Annex C).
MPPS_SUCCESS = 0x0000
MPPS_NO_LONGER_UPDATABLE = 0x0110  # N-SET of a step already COMPLETED or DISCONTINUED
MPPS_INVALID_VALUE = 0x0106  # a status value other than the allowed ones, an unsafe UID
MPPS_DUPLICATE = 0x0111  # N-CREATE of an existing SOP instance
MPPS_NO_SUCH_INSTANCE = 0x0112  # N-SET of an unknown SOP instance
MPPS_MISSING_ATTRIBUTE = 0x0120  # no Performed Procedure Step Status
MPPS_PROCESSING_FAILURE = 0x0110  # (the general meaning of 0110) the ledger is unreachable

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"

#: Steps, and signals whose instances never came, are forgotten after this long.
RETENTION = dt.timedelta(days=7)
#: Longest time between two clean-ups of old steps and signals (seconds).
_PRUNE_EVERY_S = 600.0
_CHUNK = 500


def referenced_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs a procedure step lists in its Performed Series Sequence."""
    found: set[str] = set()
    for series in ds.get("PerformedSeriesSequence", None) or []:
        for keyword in (
            "ReferencedImageSequence",
            "ReferencedNonImageCompositeSOPInstanceSequence",
        ):
            for item in series.get(keyword, None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                if uid:
                    found.add(uid)
    return found


def step_studies(ds: Dataset) -> set[str]:
    """Study Instance UIDs of a procedure step (Scheduled Step Attributes Sequence)."""
    found: set[str] = set()
    for item in ds.get("ScheduledStepAttributesSequence", None) or []:
        uid = str(item.get("StudyInstanceUID", "") or "").strip()
        if uid:
            found.add(uid)
    return found


def _signals_query(dialect: str) -> Select[Any]:
    """Every unspent signal, oldest first, once per study it names, with that study's instance
    count and last update (NULL: no such study in the ledger, or a signal naming none): what
    tells a completion pass which steps may have new instances. Without the instances a step
    lists: those are read only for the steps looked at again."""
    each = (
        func.json_each(CompletionSignal.study_uids).table_valued("value").alias("named")
        if dialect == "sqlite"
        else func.json_array_elements_text(CompletionSignal.study_uids)
        .table_valued("value")
        .lateral("named")
    )
    return (
        select(
            CompletionSignal.id,
            CompletionSignal.kind,
            CompletionSignal.study_id,
            each.c.value,
            Study.instance_count,
            Study.updated_at,
        )
        .select_from(CompletionSignal)
        .outerjoin(each, true())
        .outerjoin(Study, Study.study_uid == each.c.value)
        .order_by(CompletionSignal.id)
    )


@dataclass
class _Signal:
    """An unspent signal as a completion pass reads it."""

    id: int
    kind: str
    study_id: int | None
    #: The studies an MPPS step names.
    study_uids: list[str]
    #: (study UID, instance count, last update) of each of those in the ledger.
    marker: tuple[Any, ...]


#: A step still awaiting instances is looked at again once a study it names changed, and at
#: least this often (seconds) whatever changed: the instances a step lists may be in a study
#: it does not name.
RECHECK_EVERY_S = 60.0
#: The most listed instances one completion pass looks up (always every instance of at least
#: one step): steps whose studies changed first, then steps not looked at yet (the newest
#: first), then those looked at longest ago.
LOOKUPS_PER_PASS = 10_000
#: Steps whose instances are read in one query.
_STEPS_PER_READ = 100


@dataclass(frozen=True)
class _Looked:
    """What a step's studies were when its instances were last looked up, and when."""

    marker: tuple[Any, ...]
    at: float


class CompletionSignals:
    """Studies that a signal (MPPS COMPLETED, a trusted release) says are complete.

    The SCP (in any process) records signals in the ledger;
    :class:`acwi_node.ingest.completion.CompletionService` asks :meth:`due` on every pass.
    ``wake`` (the completion loop's ``poke``, when it runs in the same process) is called
    whenever a study may be due; a completion loop in another process finds the signal on its
    next pass (``completion.poll_interval_s``).
    """

    def __init__(self, ledger: Ledger, *, wake: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.wake = wake
        self._lock = threading.Lock()
        #: Studies awaited by a completed step, as of the last :meth:`due` (this process only).
        self._awaited_studies: frozenset[str] = frozenset()
        #: Steps awaiting instances, as of their last lookup (this process only), by signal id.
        self._looked: dict[int, _Looked] = {}
        self._signals = _signals_query(ledger.engine.dialect.name)
        self._last_prune = 0.0

    # ----------------------------------------------------------------- inputs
    def expect(self, step_uid: str, study_uids: Iterable[str], sop_uids: Iterable[str]) -> None:
        """A procedure step completed and listed these instances of these studies."""
        studies, sops = sorted(set(study_uids)), sorted(set(sop_uids))
        if not sops:
            return
        with self.ledger.session() as s:
            s.add(
                CompletionSignal(kind="mpps", step_uid=step_uid, study_uids=studies, sop_uids=sops)
            )
        self._poke()

    def released(self, study_ids: Iterable[int]) -> None:
        """A release-complete sender ended its association after sending these studies."""
        ids = sorted(set(study_ids))
        if not ids:
            return
        with self.ledger.session() as s:
            s.add_all(CompletionSignal(kind="release", study_id=i) for i in ids)
        self._poke()

    def instance_arrived(self, study_uid: str) -> None:
        """Called by the SCP per stored instance; wakes completion for an awaited study."""
        if study_uid in self._awaited_studies:
            self._poke()

    def _poke(self) -> None:
        if self.wake is not None:
            self.wake()

    @property
    def pending(self) -> int:
        """Signals not yet spent."""
        with self.ledger.session() as s:
            return s.scalar(select(func.count(CompletionSignal.id))) or 0

    # ----------------------------------------------------------------- output
    def due(self) -> list[tuple[int, int]]:
        """(study id, generation) of receiving studies a signal completes now (see
        :meth:`due_by`)."""
        return [(study_id, generation) for study_id, generation, _ in self.due_by()]

    def due_by(self) -> list[tuple[int, int, str]]:
        """(study id, generation, signal kind: "release" or "mpps") of receiving studies a
        signal completes now.

        Spent signals (their studies completed, or no longer receiving) are deleted, so that
        whichever process runs this deletes each signal once.

        A step's listed instances are looked up again only when a study it names changed since
        they were last looked up (the ledger writes an instance's row and its study's row in
        one transaction: a new instance always changes the study's row), or
        :data:`RECHECK_EVERY_S` passed; at most :data:`LOOKUPS_PER_PASS` instances per pass.
        A pass with nothing new is one query (the signals with the rows of the studies they
        name), however many steps await instances and however many instances they list.
        """
        self._prune()
        due: dict[int, tuple[int, str]] = {}
        spent: list[int] = []
        awaited: set[str] = set()
        with self.ledger.session() as s:
            signals = self._read_signals(s)
            if not signals:
                self._awaited_studies = frozenset()
                self._looked.clear()
                return []
            released = sorted(
                {r.study_id for r in signals if r.kind == "release" and r.study_id is not None}
            )
            studies_by_id = (
                {
                    r.id: r
                    for r in s.execute(
                        select(
                            Study.id, Study.generation, Study.state, Study.open_associations
                        ).where(Study.id.in_(released))
                    ).all()
                }
                if released
                else {}
            )
            for sig in signals:
                if sig.kind != "release":
                    continue
                study = studies_by_id.get(sig.study_id)
                if study is None or study.state != StudyState.RECEIVING:
                    spent.append(sig.id)  # gone, or completed some other way
                elif study.open_associations <= 0:
                    due[study.id] = (study.generation, "release")
                    spent.append(sig.id)
            steps = [sig for sig in signals if sig.kind == "mpps"]
            if steps:
                complete = self._complete_steps(s, steps, awaited)
                spent.extend(complete)
                if complete:
                    due.update(
                        {
                            study_id: (generation, "mpps")
                            for study_id, generation in s.execute(
                                select(Study.id, Study.generation).where(
                                    Study.id.in_(sorted(set().union(*complete.values()))),
                                    Study.state == StudyState.RECEIVING,
                                )
                            ).all()
                        }
                    )
            if spent:
                s.execute(delete(CompletionSignal).where(CompletionSignal.id.in_(spent)))
        live = {sig.id for sig in signals} - set(spent)
        self._looked = {i: seen for i, seen in self._looked.items() if i in live}
        self._awaited_studies = frozenset(awaited)
        return [(study_id, gen, kind) for study_id, (gen, kind) in sorted(due.items())]

    def _read_signals(self, s: Session) -> list[_Signal]:
        """The unspent signals, oldest first, each with what its studies are now. A step
        naming no study has for them the newest instance row's id (any new instance may be
        one it lists)."""
        signals: dict[int, _Signal] = {}
        for signal_id, kind, study_id, uid, count, updated in s.execute(self._signals):
            sig = signals.get(signal_id)
            if sig is None:
                sig = signals[signal_id] = _Signal(signal_id, kind, study_id, [], ())
            if uid is not None:
                sig.study_uids.append(uid)
                if count is not None:
                    sig.marker += ((uid, count, updated),)
        for sig in signals.values():  # the order the database lists them in aside
            sig.marker = tuple(sorted(sig.marker))
        if any(sig.kind == "mpps" and not sig.study_uids for sig in signals.values()):
            newest = s.scalar(select(func.max(Instance.id)))
            for sig in signals.values():
                if not sig.study_uids:
                    sig.marker = (newest,)
        return list(signals.values())

    def _complete_steps(
        self, s: Session, steps: Sequence[_Signal], awaited: set[str]
    ) -> dict[int, set[int]]:
        """The steps (signal id: the ledger ids of the studies holding their instances) whose
        every listed instance is in the ledger, of those looked up in this pass; adds to
        ``awaited`` the studies of the steps still waiting. The studies' rows were read
        (:meth:`_read_signals`) before the instances are: an instance committed after its
        lookup here changed its study's row after that read, and the next pass sees it."""
        now = time.monotonic()
        changed: list[_Signal] = []
        new: list[_Signal] = []
        stale: list[tuple[float, int, _Signal]] = []
        for step in steps:
            seen = self._looked.get(step.id)
            if seen is None:
                new.append(step)
            elif seen.marker != step.marker:
                changed.append(step)
            elif now - seen.at >= RECHECK_EVERY_S:
                stale.append((seen.at, step.id, step))
            else:
                awaited.update(step.study_uids)
        new.sort(key=lambda step: -step.id)
        candidates = [*changed, *new, *(step for _, _, step in sorted(stale))]
        # Their listed instances, a few steps per query, up to the pass's share of lookups.
        wanted: dict[int, list[str]] = {}
        total = 0
        for i in range(0, len(candidates), _STEPS_PER_READ):
            if total >= LOOKUPS_PER_PASS:
                break
            ids = [step.id for step in candidates[i : i + _STEPS_PER_READ]]
            listed: dict[int, list[str]] = {
                step_id: sops
                for step_id, sops in s.execute(
                    select(CompletionSignal.id, CompletionSignal.sop_uids).where(
                        CompletionSignal.id.in_(ids)
                    )
                )
            }
            for step_id in ids:
                if total >= LOOKUPS_PER_PASS:
                    break
                sops = sorted(set(listed.get(step_id) or []))
                wanted[step_id] = sops
                total += len(sops)
        uids = sorted(set().union(*wanted.values())) if wanted else []
        study_of: dict[str, int] = {}
        for i in range(0, len(uids), _CHUNK):
            study_of.update(
                (uid, study_id)
                for uid, study_id in s.execute(
                    select(Instance.sop_instance_uid, Instance.study_id).where(
                        Instance.sop_instance_uid.in_(uids[i : i + _CHUNK])
                    )
                )
            )
        complete: dict[int, set[int]] = {}
        for step in candidates:
            looked = wanted.get(step.id)
            if looked is not None and all(uid in study_of for uid in looked):
                complete[step.id] = {study_of[uid] for uid in looked}
                continue
            if looked is not None:
                self._looked[step.id] = _Looked(step.marker, now)
            awaited.update(step.study_uids)
        return complete

    def _prune(self) -> None:
        """Forget steps and signals older than :data:`RETENTION` (at most every 10 minutes)."""
        now = time.monotonic()
        with self._lock:
            if self._last_prune and now - self._last_prune < _PRUNE_EVERY_S:
                return
            self._last_prune = now
        cut = utcnow() - RETENTION
        with self.ledger.session() as s:
            s.execute(delete(CompletionSignal).where(CompletionSignal.created_at < cut))
            s.execute(delete(MppsStep).where(MppsStep.updated_at < cut))


class MppsSCP:
    """N-CREATE / N-SET handlers of the Modality Performed Procedure Step SOP Class."""

    def __init__(self, ledger: Ledger, signals: CompletionSignals | None) -> None:
        self.ledger = ledger
        self.signals = signals

    def handlers(self) -> list[tuple[evt.EventType, Callable[[evt.Event], object]]]:
        return [(evt.EVT_N_CREATE, self.handle_n_create), (evt.EVT_N_SET, self.handle_n_set)]

    def status_of(self, step_uid: str) -> str | None:
        with self.ledger.session() as s:
            return s.scalar(select(MppsStep.status).where(MppsStep.step_uid == step_uid))

    def handle_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = cast(N_CREATE, event.request)
        if str(request.AffectedSOPClassUID or "") != MPPS_SOP_CLASS:
            return MPPS_INVALID_VALUE, None
        try:
            attrs = event.attribute_list
        except Exception as exc:
            # The exception's text may quote a value of the data set: its kind only.
            log.warning("MPPS N-CREATE: cannot decode the attribute list (%s)", type(exc).__name__)
            return MPPS_INVALID_VALUE, None
        note_identifiers(attrs)  # from here on, no log line can show this patient's name/ID
        status = str(attrs.get("PerformedProcedureStepStatus", "") or "").strip()
        if not status:
            return MPPS_MISSING_ATTRIBUTE, None
        if status != IN_PROGRESS:
            # Not the value: a modality's text there may be anything, the patient's name too.
            log.warning(
                "MPPS N-CREATE refused with 0x%04X: its Performed Procedure Step Status is not "
                "IN PROGRESS",
                MPPS_INVALID_VALUE,
            )
            return MPPS_INVALID_VALUE, None
        given = str(request.AffectedSOPInstanceUID or "")
        step_uid = given or generate_uid()
        if not is_safe_uid(step_uid):
            return MPPS_INVALID_VALUE, None
        studies = sorted(u for u in step_studies(attrs) if is_safe_uid(u))
        try:
            with self.ledger.session() as s:
                s.add(
                    MppsStep(
                        step_uid=step_uid,
                        status=IN_PROGRESS,
                        study_uids=studies,
                        sop_uids=sorted(referenced_instances(attrs)),
                    )
                )
        except IntegrityError:
            return MPPS_DUPLICATE, None
        except Exception:
            log.exception("MPPS N-CREATE: the ledger could not record the step")
            return MPPS_PROCESSING_FAILURE, None
        log.info("MPPS step in progress (%d studies)", len(studies))
        reply = Dataset()
        if not given:
            reply.AffectedSOPInstanceUID = step_uid
        reply.PerformedProcedureStepStatus = IN_PROGRESS
        return MPPS_SUCCESS, reply

    def handle_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = cast(N_SET, event.request)
        step_uid = str(request.RequestedSOPInstanceUID or "")
        try:
            mods = event.modification_list
        except Exception as exc:
            log.warning("MPPS N-SET: cannot decode the modification list (%s)", type(exc).__name__)
            return MPPS_INVALID_VALUE, None
        note_identifiers(mods)  # an N-SET may carry the patient's name and ID too
        new_status = str(mods.get("PerformedProcedureStepStatus", "") or "").strip()
        if new_status and new_status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
            return MPPS_INVALID_VALUE, None
        try:
            outcome = self._apply_n_set(step_uid, mods, new_status)
        except Exception:
            log.exception("MPPS N-SET: the ledger could not update the step")
            return MPPS_PROCESSING_FAILURE, None
        if isinstance(outcome, int):
            return outcome, None
        studies, sops = outcome
        if new_status == COMPLETED:
            log.info("MPPS step completed: %d studies, %d instances", len(studies), len(sops))
            if self.signals is not None:
                self.signals.expect(step_uid, studies, sops)
        elif new_status == DISCONTINUED:
            log.info("MPPS step discontinued; its studies complete after the quiet period")
        reply = Dataset()
        reply.PerformedProcedureStepStatus = new_status or IN_PROGRESS
        return MPPS_SUCCESS, reply

    def _apply_n_set(
        self, step_uid: str, mods: Dataset, new_status: str
    ) -> int | tuple[list[str], list[str]]:
        """Update the step (a conditional update: a concurrent N-SET makes this one retry).

        Returns an MPPS status on refusal, else the step's studies and listed instances. An
        N-SET replaces the attributes it carries whole (PS3.4 F.7.2.2), so a Performed Series
        Sequence in it replaces the instances listed before.
        """
        for _ in range(5):
            with self.ledger.session() as s:
                step = s.execute(
                    select(
                        MppsStep.status, MppsStep.study_uids, MppsStep.sop_uids, MppsStep.version
                    ).where(MppsStep.step_uid == step_uid)
                ).first()
                if step is None:
                    return MPPS_NO_SUCH_INSTANCE
                if step.status != IN_PROGRESS:
                    return MPPS_NO_LONGER_UPDATABLE
                studies = list(step.study_uids)
                sops = list(step.sop_uids)
                if "ScheduledStepAttributesSequence" in mods:
                    studies = sorted(u for u in step_studies(mods) if is_safe_uid(u))
                if "PerformedSeriesSequence" in mods:
                    sops = sorted(referenced_instances(mods))
                result = s.execute(
                    update(MppsStep)
                    .where(MppsStep.step_uid == step_uid, MppsStep.version == step.version)
                    .values(
                        status=new_status or IN_PROGRESS,
                        study_uids=studies,
                        sop_uids=sops,
                        version=step.version + 1,
                        updated_at=utcnow(),
                    )
                )
                if cast("CursorResult[Any]", result).rowcount == 1:
                    return studies, sops
        raise RuntimeError("the step kept changing under concurrent N-SETs")
