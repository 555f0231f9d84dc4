"""Storage commitment (PS3.4 Annex J, Push Model): a destination takes responsibility for
the results it stored.

A C-STORE success says the destination received an object; storage commitment says it keeps
it (IHE RAD-10). For a destination with ``storage_commitment``, the exporter asks, after the
objects were stored, with one N-ACTION (Action Type 1, Request Storage Commitment) listing
them under a new Transaction UID (:func:`commitment_request`). The exporter releases the
request's association once it is answered, so the destination reports later, with an
N-EVENT-REPORT (Event Type 1: all committed; 2: some failed) on an association it opens to the
node's DICOM port, where the storage SCP hands it to :class:`CommitmentReports`; for a
destination that reports only on the request's association (``commitment_linger_s``), the
exporter keeps it open that long and hands the report over itself. The report
lists what it committed (Referenced SOP Sequence) and what it did not (Failed SOP Sequence, each
with a Failure Reason): the ledger delivers the former, and sends the latter again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT

from acwi_node.config import Settings
from acwi_node.export.scu import STORAGE_COMMITMENT_PUSH_MODEL
from acwi_node.ingest.spool import is_safe_uid
from acwi_node.ledger import AwaitedCommitment, CommitmentOutcome, Ledger
from acwi_node.observability import metrics

log = logging.getLogger("acwi_node.commitment")

#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3.1).
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2

#: Failure Reason (0008,1197) values (PS3.3 C.14.1.1).
FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP Class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

# N-EVENT-REPORT response statuses (PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_MISSING_ATTRIBUTE = 0x0120

#: The most instances one request lists; more take several requests.
MAX_REFERENCES = 1000


def describe_failure(reason: int) -> str:
    """A Failure Reason in words, with its code."""
    return f"{FAILURE_REASONS.get(reason, 'failure')} (0x{reason:04X})"


def commitment_request(transaction_uid: str, items: Sequence[AwaitedCommitment]) -> Dataset:
    """The Action Information of a Request Storage Commitment N-ACTION (PS3.4 J.3.2.1.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    refs = []
    for item in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.sop_class_uid
        ref.ReferencedSOPInstanceUID = item.sop_instance_uid
        refs.append(ref)
    ds.ReferencedSOPSequence = refs
    return ds


def new_transaction_uid() -> str:
    """A Transaction UID of the node's own (random, so that no report can be guessed)."""
    return str(generate_uid())


class ReportError(ValueError):
    """A storage commitment report the node cannot use; ``status`` is the DIMSE answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT says of a storage commitment request."""

    transaction_uid: str
    #: SOP Instance UIDs the destination committed.
    committed: tuple[str, ...] = ()
    #: SOP Instance UIDs it did not commit, with their Failure Reason.
    refused: dict[str, int] = field(default_factory=dict)


def _one_uid(item: Dataset) -> str:
    """An item's Referenced SOP Instance UID; "" for none, or for several (no object)."""
    value = item.get("ReferencedSOPInstanceUID", "")
    return "" if isinstance(value, MultiValue) else str(value or "")


def _failure_reason(value: Any) -> int:
    """A Failure Reason (its first value where it has several); processing failure where it
    has none, or none that is a number."""
    if isinstance(value, MultiValue):
        value = value[0] if value else None
    return value if isinstance(value, int) else STATUS_PROCESSING_FAILURE


def parse_report(event_type_id: int, ds: Dataset | None) -> CommitmentReport:
    """Read a storage commitment N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1.1);
    raises :class:`ReportError`."""
    if event_type_id not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise ReportError(
            f"event type {event_type_id} is not a storage commitment result",
            STATUS_NO_SUCH_EVENT_TYPE,
        )
    if ds is None or "TransactionUID" not in ds:
        raise ReportError("the report has no Transaction UID", STATUS_MISSING_ATTRIBUTE)
    transaction_uid = str(ds.TransactionUID)
    if not is_safe_uid(transaction_uid):
        raise ReportError("the report's Transaction UID is not a UID", STATUS_INVALID_ARGUMENT)
    committed = []
    for item in ds.get("ReferencedSOPSequence", None) or []:
        uid = _one_uid(item)
        if uid:
            committed.append(uid)
    refused: dict[str, int] = {}
    for item in ds.get("FailedSOPSequence", None) or []:
        uid = _one_uid(item)
        if uid:
            refused[uid] = _failure_reason(item.get("FailureReason"))
    if event_type_id == EVENT_SOME_FAILED and not refused:
        raise ReportError(
            "event type 2 (failures) with no Failed SOP Sequence", STATUS_MISSING_ATTRIBUTE
        )
    return CommitmentReport(transaction_uid, tuple(committed), refused)


class CommitmentReports:
    """Receives storage commitment reports (N-EVENT-REPORT) and applies them to the outbox."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        #: Held while a report is recorded (the exporter's: its own ledger writes take turns).
        self.lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    def handlers(self) -> list[tuple[evt.EventType, Callable[[evt.Event], Any]]]:
        return [(evt.EVT_N_EVENT_REPORT, self.handle_n_event_report)]

    def apply(self, report: CommitmentReport, *, sender: str) -> CommitmentOutcome:
        """Deliver what ``report`` committed, send again what it refused (raises what the
        ledger raises)."""
        with self.lock:
            outcome = self.ledger.record_commitment(
                report.transaction_uid,
                report.committed,
                report.refused,
                max_attempts=self.settings.exporter.max_attempts,
                backoff_s=self.settings.exporter.backoff_s,
                describe=describe_failure,
            )
        if not outcome.known:
            log.warning(
                "storage commitment report from %s for a transaction the node is not waiting"
                " for (%d committed, %d failed): ignored",
                sender,
                len(report.committed),
                len(report.refused),
            )
            metrics.COMMITMENT_REPORTS.labels("unknown").inc()
            return outcome
        metrics.COMMITMENT_REPORTS.labels("applied").inc()
        metrics.COMMITTED_RESULTS.labels("committed").inc(outcome.committed)
        metrics.COMMITTED_RESULTS.labels("refused").inc(outcome.refused)
        if outcome.refused:
            reasons = sorted({describe_failure(r) for r in report.refused.values()})
            log.warning(
                "storage commitment report from %s: %d result(s) committed, %d refused (%s):"
                " sent again",
                sender,
                outcome.committed,
                outcome.refused,
                ", ".join(reasons),
            )
        else:
            log.info(
                "storage commitment report from %s: %d result(s) committed",
                sender,
                outcome.committed,
            )
        return outcome

    def handle_n_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """EVT_N_EVENT_REPORT: answer success once the report is in the ledger; a report the
        node cannot read, or cannot record now, gets a failure status (the destination may
        send it again)."""
        request = cast(N_EVENT_REPORT, event.request)
        # The peer: the association's requestor on the SCP, its acceptor on the exporter's
        # own request (a report that came on it).
        assoc = event.assoc
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        sender = str(getattr(peer, "ae_title", "") or "?").strip()
        if str(getattr(request, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT_PUSH_MODEL:
            return STATUS_PROCESSING_FAILURE, None
        try:
            ds = event.event_information
        except Exception:  # noqa: BLE001 - undecodable event information
            log.warning("storage commitment report from %s could not be decoded", sender)
            metrics.COMMITMENT_REPORTS.labels("invalid").inc()
            return STATUS_INVALID_ARGUMENT, None
        try:
            report = parse_report(int(request.EventTypeID or 0), ds)
        except ReportError as exc:
            log.warning("storage commitment report from %s refused: %s", sender, exc)
            metrics.COMMITMENT_REPORTS.labels("invalid").inc()
            return exc.status, None
        try:
            self.apply(report, sender=sender)
        except Exception:  # noqa: BLE001 - the ledger is unreachable: the sender may retry
            log.exception("storage commitment report from %s could not be recorded", sender)
            return STATUS_PROCESSING_FAILURE, None
        return STATUS_SUCCESS, None
