"""The audit trail: who sent, received, viewed and decided what (see :mod:`.trail`)."""

from acwi_node.audit.events import AuditEvent, AuditRecord, Outcome, Participant
from acwi_node.audit.trail import (
    audit,
    audit_file,
    close_audit,
    command_operator,
    configure_audit,
    note_configuration,
    remote_ae,
    user,
)

__all__ = [
    "AuditEvent",
    "AuditRecord",
    "Outcome",
    "Participant",
    "audit",
    "audit_file",
    "close_audit",
    "command_operator",
    "configure_audit",
    "note_configuration",
    "remote_ae",
    "user",
]
