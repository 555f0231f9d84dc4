"""What the audit trail records: the events, and their DICOM audit codes (PS3.15 A.5, PS3.16).

Each :class:`AuditEvent` names one kind of record. Its DICOM Event ID, Event Type Code and
Event Action Code are those an IHE ATNA audit record repository expects for it.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Code:
    """A coded value: code, coding scheme designator, meaning."""

    code: str
    scheme: str
    meaning: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "scheme": self.scheme, "meaning": self.meaning}


# Event IDs (CID 400) and event type codes (CID 401, 402) of PS3.16.
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
ORDER_RECORD = Code("110109", "DCM", "Order Record")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
EXPORT = Code("110106", "DCM", "Export")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
SECURITY_ROLES_CHANGED = Code("110136", "DCM", "Security Roles Changed")


class AuditEvent(str, enum.Enum):
    """The events of the audit trail (the ``event`` field of a record)."""

    NODE_STARTED = "node_started"
    NODE_STOPPED = "node_stopped"
    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    INSTANCES_RECEIVED = "instances_received"
    RESULTS_SENT = "results_sent"
    USER_SIGNED_IN = "user_signed_in"
    USER_SIGNED_OUT = "user_signed_out"
    CASE_VIEWED = "case_viewed"
    VERDICT_RECORDED = "verdict_recorded"
    FEEDBACK_EXPORTED = "feedback_exported"
    STUDY_DELETED = "study_deleted"
    PATIENT_DATA_ERASED = "patient_data_erased"
    PATIENTS_MERGED = "patients_merged"
    PATIENT_IDENTIFIER_CHANGED = "patient_identifier_changed"
    ORDER_CREATED = "order_created"
    ORDER_UPDATED = "order_updated"
    ORDER_CANCELLED = "order_cancelled"
    CONFIGURATION_CHANGED = "configuration_changed"
    USERS_CHANGED = "users_changed"
    STUDIES_QUERIED = "studies_queried"
    RESULTS_WITHDRAWN = "results_withdrawn"


#: Event -> (Event ID, Event Type Code or None, Event Action Code).
DICOM_CODES: dict[AuditEvent, tuple[Code, Code | None, str]] = {
    AuditEvent.NODE_STARTED: (APPLICATION_ACTIVITY, APPLICATION_START, "E"),
    AuditEvent.NODE_STOPPED: (APPLICATION_ACTIVITY, APPLICATION_STOP, "E"),
    AuditEvent.ASSOCIATION_ACCEPTED: (SECURITY_ALERT, NODE_AUTHENTICATION, "E"),
    AuditEvent.ASSOCIATION_REJECTED: (SECURITY_ALERT, NODE_AUTHENTICATION, "E"),
    AuditEvent.INSTANCES_RECEIVED: (INSTANCES_TRANSFERRED, None, "C"),
    AuditEvent.RESULTS_SENT: (INSTANCES_TRANSFERRED, None, "R"),
    AuditEvent.USER_SIGNED_IN: (USER_AUTHENTICATION, LOGIN, "E"),
    AuditEvent.USER_SIGNED_OUT: (USER_AUTHENTICATION, LOGOUT, "E"),
    AuditEvent.CASE_VIEWED: (INSTANCES_ACCESSED, None, "R"),
    AuditEvent.VERDICT_RECORDED: (INSTANCES_ACCESSED, None, "U"),
    AuditEvent.FEEDBACK_EXPORTED: (EXPORT, None, "R"),
    AuditEvent.STUDY_DELETED: (STUDY_DELETED, None, "D"),
    AuditEvent.PATIENT_DATA_ERASED: (PATIENT_RECORD, None, "D"),
    AuditEvent.PATIENTS_MERGED: (PATIENT_RECORD, None, "U"),
    AuditEvent.PATIENT_IDENTIFIER_CHANGED: (PATIENT_RECORD, None, "U"),
    # an order from the RIS (PS3.15 A.5.3.13): a cancelled order is kept with its status, an
    # update of the record, not its deletion
    AuditEvent.ORDER_CREATED: (ORDER_RECORD, None, "C"),
    AuditEvent.ORDER_UPDATED: (ORDER_RECORD, None, "U"),
    AuditEvent.ORDER_CANCELLED: (ORDER_RECORD, None, "U"),
    AuditEvent.CONFIGURATION_CHANGED: (SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E"),
    AuditEvent.USERS_CHANGED: (SECURITY_ALERT, SECURITY_ROLES_CHANGED, "E"),
    AuditEvent.STUDIES_QUERIED: (QUERY, None, "E"),
    AuditEvent.RESULTS_WITHDRAWN: (INSTANCES_ACCESSED, None, "D"),
}


class Outcome(int, enum.Enum):
    """Event Outcome Indicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class Participant:
    """Who took part: a user, a remote AE, or a process of the node.

    ``kind`` is ``user``, ``ae`` or ``process``; ``address`` an IP address or host name;
    ``requestor`` says whether this participant started the event.
    """

    kind: str
    id: str
    address: str = ""
    requestor: bool = True
    tls_subject: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "id": self.id, "requestor": self.requestor}
        if self.address:
            out["address"] = self.address
        if self.tls_subject:
            out["tls_subject"] = self.tls_subject
        return out


@dataclass(frozen=True)
class AuditRecord:
    """One audit record, before it is written as JSON or as a DICOM audit message."""

    event: AuditEvent
    outcome: Outcome = Outcome.SUCCESS
    participants: tuple[Participant, ...] = ()
    study_uids: tuple[str, ...] = ()
    #: Instances (received, sent) per Study Instance UID.
    instances: dict[str, int] = field(default_factory=dict)
    #: Patient IDs, only when ``audit.patient_id`` is on.
    patient_ids: tuple[str, ...] = ()
    detail: str = ""
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
