"""DICOM audit messages stay well-formed XML whatever text a record carries."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from acwi_node.audit.atna import audit_message_xml
from acwi_node.audit.events import AuditEvent, AuditRecord, Participant


def test_characters_xml_cannot_hold_are_escaped_not_sent_raw() -> None:
    """A peer's AE title with an escape sequence, a note with NUL or BEL: the collector must
    still parse the message, and read what they were."""
    record = AuditRecord(
        AuditEvent.ASSOCIATION_REJECTED,
        participants=(Participant("ae", "EVIL\x1b[2J", "10.0.0.1", requestor=True),),
        study_uids=("1.2.3",),
        detail="unknown AE title\x00\x07 \ufffe caf\u00e9 & <b>",
    )
    root = ET.fromstring(audit_message_xml(record, source_id="ACWI@node1"))
    active = root.find("ActiveParticipant")
    assert active is not None and active.get("UserID") == "EVIL\\x1b[2J"
    detail = root.findtext("EventIdentification/EventOutcomeDescription")
    assert detail == "unknown AE title\\x00\\x07 \\ufffe caf\u00e9 & <b>"
