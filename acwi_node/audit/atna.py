"""DICOM audit messages (PS3.15 A.5 XML, as IHE ATNA uses them) and their RFC 5424 syslog frame."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from acwi_node.audit.events import DICOM_CODES, AuditRecord, Code

#: RFC 5424 PRI: facility 10 (security/authorization), severity 5 (notice), as IHE ITI-20.
SYSLOG_PRI = 10 * 8 + 5
#: The MSGID IHE ATNA gives audit messages in DICOM/RFC 3881 form.
SYSLOG_MSGID = "IHE+RFC-3881"
APP_NAME = "acwi-node"

_SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
_DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
_APPLICATION_ROLE = Code("110150", "DCM", "Application")
_STUDY_UID_TYPE = Code("110180", "DCM", "Study Instance UID")
_PATIENT_ID_TYPE = Code("2", "RFC-3881", "Patient Number")


# What XML 1.0 cannot hold at all, not even escaped (control characters, U+FFFE, U+FFFF):
# a peer's AE title, a note or a RIS's answer with one must not make a message no
# collector can parse.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """``text`` with each character XML cannot hold written as ``\\xNN`` / ``\\uNNNN``."""
    return _NOT_XML.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _access_point(address: str) -> dict[str, str]:
    if not address:
        return {}
    is_ip = address.replace(".", "").isdigit() or ":" in address
    return {"NetworkAccessPointID": address, "NetworkAccessPointTypeCode": "2" if is_ip else "1"}


def audit_message_xml(record: AuditRecord, *, source_id: str, enterprise_site: str = "") -> bytes:
    """The DICOM audit message of a record (UTF-8 XML, PS3.15 A.5.1 schema)."""
    event_id, event_type, action = DICOM_CODES[record.event]
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": record.at.isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(int(record.outcome)),
        },
    )
    _coded(ident, "EventID", event_id)
    if event_type is not None:
        _coded(ident, "EventTypeCode", event_type)
    if record.detail:
        ET.SubElement(ident, "EventOutcomeDescription").text = record.detail
    for p in record.participants:
        attrs = {"UserID": p.id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.tls_subject:
            attrs["AlternativeUserID"] = p.tls_subject
        attrs.update(_access_point(p.address))
        active = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.kind == "ae":
            _coded(active, "RoleIDCode", _SOURCE_ROLE if p.requestor else _DESTINATION_ROLE)
        elif p.kind == "process":
            _coded(active, "RoleIDCode", _APPLICATION_ROLE)
    source_attrs = {"AuditSourceID": source_id}
    if enterprise_site:
        source_attrs["AuditEnterpriseSiteID"] = enterprise_site
    source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
    # 4: application server process tier (PS3.15 A.5.1, RFC 3881 audit source types).
    ET.SubElement(
        source,
        "AuditSourceTypeCode",
        {"csd-code": "4", "codeSystemName": "DCM", "originalText": "Application Server"},
    )
    for uid in record.study_uids:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": uid,
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        _coded(study, "ParticipantObjectIDTypeCode", _STUDY_UID_TYPE)
        count = record.instances.get(uid)
        if count is not None:
            ET.SubElement(study, "ParticipantObjectDescription").text = f"{count} instance(s)"
    for patient_id in record.patient_ids:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": patient_id,
                "ParticipantObjectTypeCode": "1",  # person
                "ParticipantObjectTypeCodeRole": "1",  # patient
            },
        )
        _coded(patient, "ParticipantObjectIDTypeCode", _PATIENT_ID_TYPE)
    for element in root.iter():
        if element.text:
            element.text = _xml_text(element.text)
        for key, value in element.attrib.items():
            element.set(key, _xml_text(value))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def syslog_frame(record: AuditRecord, *, hostname: str, procid: int, xml: bytes) -> bytes:
    """An RFC 5424 message carrying ``xml``: ``<85>1 TIME HOST acwi-node PID IHE+RFC-3881 - MSG``.

    The MSG part starts with the UTF-8 byte order mark, as RFC 5424 asks for UTF-8 text.
    """
    timestamp = record.at.isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = f"<{SYSLOG_PRI}>1 {timestamp} {hostname or '-'} {APP_NAME} {procid} {SYSLOG_MSGID} -"
    return header.encode("ascii", "replace") + b" \xef\xbb\xbf" + xml
