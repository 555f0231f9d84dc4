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

Both are hints held in memory by the process that runs the SCP and the completion loop. They only
ever make a study complete *earlier*; if the process restarts, the quiet period and ``max_wait_s``
still complete every study, so nothing is lost. Completion itself stays the ledger's conditional
update, so a signal never routes a study twice.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from sqlalchemy import select

from acwi_node.ingest.spool import is_safe_uid
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Instance, Study, StudyState

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
MPPS_RESOURCE_LIMITATION = 0x0213  # too many steps in progress

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"

#: Steps held in memory at most (the oldest finished ones are forgotten first).
MAX_STEPS = 10_000
_CHUNK = 500


@dataclass
class _Expectation:
    """A completed step: its studies are complete once all of ``sop_uids`` are in the ledger."""

    study_uids: set[str]
    sop_uids: set[str]


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


class CompletionSignals:
    """Studies that a signal (MPPS COMPLETED, a trusted release) says are complete.

    The SCP feeds it; :class:`acwi_node.ingest.completion.CompletionService` asks :meth:`due` on
    every pass. ``wake`` (the completion loop's ``poke``) is called whenever a study may be due.
    """

    def __init__(self, ledger: Ledger, *, wake: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.wake = wake
        self._lock = threading.Lock()
        self._expected: dict[str, _Expectation] = {}  # by MPPS SOP Instance UID
        self._expected_studies: set[str] = set()
        self._released: set[int] = set()

    # ----------------------------------------------------------------- inputs
    def expect(self, step_uid: str, study_uids: Iterable[str], sop_uids: Iterable[str]) -> None:
        """A procedure step completed and listed these instances of these studies."""
        studies, sops = set(study_uids), set(sop_uids)
        if not sops:
            return
        with self._lock:
            while len(self._expected) >= MAX_STEPS:  # steps whose instances never came
                self._expected.pop(next(iter(self._expected)))
            self._expected[step_uid] = _Expectation(studies, sops)
            self._expected_studies |= studies
        self._poke()

    def released(self, study_ids: Iterable[int]) -> None:
        """A release-complete sender ended its association after sending these studies."""
        with self._lock:
            self._released.update(study_ids)
        self._poke()

    def instance_arrived(self, study_uid: str) -> None:
        """Called by the SCP per stored instance; wakes completion for an awaited study."""
        if study_uid in self._expected_studies:
            self._poke()

    def _poke(self) -> None:
        if self.wake is not None:
            self.wake()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._expected) + len(self._released)

    # ----------------------------------------------------------------- output
    def due(self) -> list[tuple[int, int]]:
        """(study id, generation) of receiving studies a signal completes now."""
        with self._lock:
            expected = list(self._expected.items())
            released = sorted(self._released)
        if not expected and not released:
            return []
        due: dict[int, int] = {}
        finished_steps: list[str] = []
        finished_released: list[int] = []
        with self.ledger.session() as s:
            if released:
                rows = s.execute(
                    select(Study.id, Study.generation, Study.state, Study.open_associations).where(
                        Study.id.in_(released)
                    )
                ).all()
                for study_id, generation, state, open_assocs in rows:
                    if state != StudyState.RECEIVING:
                        finished_released.append(study_id)
                    elif open_assocs <= 0:
                        due[study_id] = generation
                        finished_released.append(study_id)
                finished_released += [i for i in released if i not in {r[0] for r in rows}]
            for step_uid, exp in expected:
                found: dict[str, int] = {}
                wanted = sorted(exp.sop_uids)
                for i in range(0, len(wanted), _CHUNK):
                    hits = s.execute(
                        select(Instance.sop_instance_uid, Instance.study_id).where(
                            Instance.sop_instance_uid.in_(wanted[i : i + _CHUNK])
                        )
                    ).all()
                    found.update({uid: study_id for uid, study_id in hits})
                if len(found) < len(exp.sop_uids):
                    continue  # still waiting for instances
                studies = s.execute(
                    select(Study.id, Study.generation).where(
                        Study.id.in_(sorted(set(found.values()))),
                        Study.state == StudyState.RECEIVING,
                    )
                ).all()
                due.update({study_id: generation for study_id, generation in studies})
                finished_steps.append(step_uid)
        with self._lock:
            for step_uid in finished_steps:
                self._expected.pop(step_uid, None)
            self._expected_studies = {u for e in self._expected.values() for u in e.study_uids}
            self._released.difference_update(finished_released)
        return sorted(due.items())


@dataclass
class _Step:
    status: str
    attributes: Dataset


class MppsSCP:
    """N-CREATE / N-SET handlers of the Modality Performed Procedure Step SOP Class."""

    def __init__(self, signals: CompletionSignals | None) -> None:
        self.signals = signals
        self._steps: OrderedDict[str, _Step] = OrderedDict()
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[evt.EventType, Callable[[evt.Event], object]]]:
        return [(evt.EVT_N_CREATE, self.handle_n_create), (evt.EVT_N_SET, self.handle_n_set)]

    def status_of(self, step_uid: str) -> str | None:
        with self._lock:
            step = self._steps.get(step_uid)
            return step.status if step else None

    def handle_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = cast(N_CREATE, event.request)
        if str(request.AffectedSOPClassUID or "") != MPPS_SOP_CLASS:
            return MPPS_INVALID_VALUE, None
        try:
            attrs = event.attribute_list
        except Exception as exc:
            log.warning("MPPS N-CREATE: cannot decode the attribute list: %s", exc)
            return MPPS_INVALID_VALUE, None
        status = str(attrs.get("PerformedProcedureStepStatus", "") or "").strip()
        if not status:
            return MPPS_MISSING_ATTRIBUTE, None
        if status != IN_PROGRESS:
            log.warning("MPPS N-CREATE with status %r refused (must be IN PROGRESS)", status)
            return MPPS_INVALID_VALUE, None
        given = str(request.AffectedSOPInstanceUID or "")
        step_uid = given or generate_uid()
        if not is_safe_uid(step_uid):
            return MPPS_INVALID_VALUE, None
        with self._lock:
            if step_uid in self._steps:
                return MPPS_DUPLICATE, None
            if len(self._steps) >= MAX_STEPS and not self._forget_finished():
                log.error("MPPS N-CREATE refused: %d steps in progress", len(self._steps))
                return MPPS_RESOURCE_LIMITATION, None
            self._steps[step_uid] = _Step(IN_PROGRESS, attrs)
        log.info("MPPS step in progress (%d studies)", len(step_studies(attrs)))
        reply = Dataset()
        if not given:
            reply.AffectedSOPInstanceUID = step_uid
        reply.PerformedProcedureStepStatus = IN_PROGRESS
        return MPPS_SUCCESS, reply

    def _forget_finished(self) -> bool:
        for uid, step in self._steps.items():
            if step.status != IN_PROGRESS:
                del self._steps[uid]
                return True
        return False

    def handle_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = cast(N_SET, event.request)
        step_uid = str(request.RequestedSOPInstanceUID or "")
        try:
            mods = event.modification_list
        except Exception as exc:
            log.warning("MPPS N-SET: cannot decode the modification list: %s", exc)
            return MPPS_INVALID_VALUE, None
        new_status = str(mods.get("PerformedProcedureStepStatus", "") or "").strip()
        if new_status and new_status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
            return MPPS_INVALID_VALUE, None
        with self._lock:
            step = self._steps.get(step_uid)
            if step is None:
                return MPPS_NO_SUCH_INSTANCE, None
            if step.status != IN_PROGRESS:
                return MPPS_NO_LONGER_UPDATABLE, None
            for elem in mods:
                step.attributes[elem.tag] = elem
            if new_status:
                step.status = new_status
            self._steps.move_to_end(step_uid)
            attrs = step.attributes
        if new_status == COMPLETED:
            studies = step_studies(attrs)
            sops = referenced_instances(attrs)
            log.info("MPPS step completed: %d studies, %d instances", len(studies), len(sops))
            if self.signals is not None:
                self.signals.expect(step_uid, studies, sops)
        elif new_status == DISCONTINUED:
            log.info("MPPS step discontinued; its studies complete after the quiet period")
        reply = Dataset()
        reply.PerformedProcedureStepStatus = new_status or IN_PROGRESS
        return MPPS_SUCCESS, reply
