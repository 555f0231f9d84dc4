"""Order intake: one inbound HL7 message in, its acknowledgement out, the order in the ledger
(an ``ADT^A40`` patient merge, or another of :data:`MERGE_TYPES`: the merged-away patient's
orders moved to the surviving one; an event of :data:`IDENTITY_NOTICES`: acknowledged, nothing
changed; a batch: each of its messages, answered with a batch of acknowledgements). Each
order taken, and each merge applied, is an audit record.

``AA`` accepted (every order it carries is stored, keyed by accession number), ``AE``
application error (e.g. no accession number), ``AR`` rejected (malformed, past one of the node's
limits, bytes invalid in the character set MSH-18 declares, or a message type the node does not
take). Every acknowledgement of a message with a control id (MSH-10) is stored with it, so the
same message sent again gets the same acknowledgement and creates nothing twice.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import asdict

from acwi_node.audit import AuditEvent, Participant, audit
from acwi_node.config import Settings
from acwi_node.hl7.messages import (
    IDENTITY_NOTICES,
    MERGE_TYPES,
    ApplicationError,
    HL7Error,
    LimitExceeded,
    Limits,
    MergeInfo,
    MshInfo,
    OrderInfo,
    Rejected,
    _control_id_er7,
    _field,
    build_ack,
    decode,
    decode_message,
    escape,
    extract_merges,
    extract_orders,
    msh_info,
    normalise,
    parse,
    peek_msh,
    timestamp,
    unescape,
)
from acwi_node.hl7.mllp import frame
from acwi_node.ledger import Ledger, MergeMoved, OrderCancelled, PatientMerge

log = logging.getLogger("acwi_node.hl7")


class OrderIntake:
    """Turns inbound messages into stored orders and acknowledgements (thread-safe)."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger

    def _ack(
        self, answered: MshInfo | None, code: str, text: str, error: HL7Error | None = None
    ) -> str:
        """An acknowledgement; a refusal's ERR-2 and ERR-3 from ``error`` (else ERR-3
        ``207``, an application internal error)."""
        cfg = self.settings.hl7
        return build_ack(
            answered,
            code,
            text,
            control_id=f"ACK{uuid.uuid4().hex[:16].upper()}",
            application=cfg.sending_application,
            facility=cfg.sending_facility,
            error=error.error if error is not None else "207",
            location=error.location if error is not None else "",
            timezone=self.settings.monitoring.timezone,
        )

    def refusal(self, raw: bytes, code: str, text: str) -> bytes:
        """An acknowledgement ``code`` that can always be framed: answering the message's MSH
        where it can be read, else answering none (MSA-2 empty)."""
        try:
            ack = self._ack(peek_msh(decode(raw)), code, text).encode("utf-8")
            frame(ack)  # raises if it could not be framed
            return ack
        except Exception:
            return self._ack(None, code, text).encode("utf-8")

    def handle(self, raw: bytes) -> bytes:
        """The acknowledgement (ER7, UTF-8) for one message's bytes. Never raises."""
        try:
            return self._handle(raw)
        except Exception as exc:  # the ledger unavailable, say: nothing was kept of it
            log.error("a message could not be processed: %s", type(exc).__name__)
            # AR, not AE: rejected for a reason unrelated to its content (HL7 2.x 2.9.2), so
            # the RIS sends it again, and then it is taken
            return self.refusal(raw, "AR", "the message could not be processed now: send it again")

    def _handle(self, raw: bytes) -> bytes:
        try:
            text = normalise(decode_message(raw))
        except HL7Error as exc:  # bytes invalid in the declared character set, or an unknown one
            peeked = peek_msh(normalise(decode(raw)))
            log.warning("rejected a message (%s): %s", _describe(peeked), exc.text)
            return self._ack(peeked, exc.code, exc.text, exc).encode("utf-8")
        try:
            msg = parse(text, Limits.of(self.settings.hl7))
            info = msh_info(msg)
        except HL7Error as exc:
            peeked = peek_msh(text)
            log.warning("rejected a malformed message (%s): %s", _describe(peeked), _reason(exc))
            return self._ack(peeked, exc.code, exc.text, exc).encode("utf-8")
        if not info.control_id:
            log.warning("rejected a message without MSH-10 (%s)", info.type_code or "no type")
            missing = Rejected("no message control id (MSH-10)", error="101", location="MSH^1^10")
            return self._ack(info, "AR", missing.text, missing).encode("utf-8")
        stored = self.ledger.hl7_stored_ack(info.sender, info.control_id)
        if stored is not None:
            log.info("message %s repeated: answered with its stored ACK", _safe(info.control_id))
            return stored.encode("utf-8")
        merges: list[MergeInfo] = []
        orders: list[OrderInfo] = []
        try:
            if info.type_code in MERGE_TYPES:
                merges = extract_merges(msg)
            elif info.type_code not in IDENTITY_NOTICES:
                orders = extract_orders(msg)
        except HL7Error as exc:
            ack = self._ack(info, exc.code, exc.text, exc)
            ack = self.ledger.hl7_record_message(
                sender=info.sender,
                control_id=info.control_id,
                message_type=info.type_code,
                ack_code=exc.code,
                ack=ack,
            )
            log.warning(
                "message %s (%s) answered %s: %s",
                _safe(info.control_id),
                info.type_code,
                exc.code,
                exc.text,
            )
            return ack.encode("utf-8")
        except Exception:
            log.exception("message %s: unexpected error", _safe(info.control_id))
            return self._ack(info, "AE", "internal error").encode("utf-8")
        ack = self._ack(info, "AA", "")
        moved: list[MergeMoved] = []
        taken: list[str] = []
        try:
            ack = self.ledger.hl7_record_message(
                sender=info.sender,
                control_id=info.control_id,
                message_type=info.type_code,
                ack_code="AA",
                ack=ack,
                orders=[{**asdict(order), "cancelled": order.cancelled} for order in orders],
                merges=[PatientMerge(**asdict(merge)) for merge in merges],
                merged=moved,
                taken=taken,
            )
        except OrderCancelled as exc:
            # HL7 v2.5 chapter 4 (ORC-1): a cancelled order is final; a change (XO) or a
            # status change cannot reopen it (a filler answers "unable to change"): AE,
            # nothing kept
            control = orders[exc.index - 1].control
            refused = ApplicationError(
                f"order {exc.index} is cancelled: {control} cannot change or reopen it",
                error="207",
                location=f"ORC^{exc.index}^1",
            )
            ack = self.ledger.hl7_record_message(
                sender=info.sender,
                control_id=info.control_id,
                message_type=info.type_code,
                ack_code="AE",
                ack=self._ack(info, "AE", refused.text, refused),
            )
            log.warning(
                "message %s (%s) answered AE: its order %d (%s) is cancelled",
                _safe(info.control_id),
                info.type_code,
                exc.index,
                control,
            )
            return ack.encode("utf-8")
        # none when another connection recorded the same message first (it applied them)
        for merge, count in zip(merges, moved, strict=False):
            log.info(
                "%s (%s) from message %s: %d order(s) and %d ORU^R01 waiting in the outbox"
                " moved to the %s",
                "patient identifier change" if merge.identifier_change else "patient merge",
                info.type_code,
                _safe(info.control_id),
                count.orders,
                count.messages,
                "new identifier" if merge.identifier_change else "surviving patient",
            )
            _audit_merge(info, merge, count)
        if info.type_code in IDENTITY_NOTICES:
            log.info(
                "%s from message %s acknowledged: nothing the node keeps changes",
                info.type_code,
                _safe(info.control_id),
            )
        for order, outcome in zip(orders, taken, strict=False):
            if outcome:
                _audit_order(info, order, outcome)
        for order in orders:
            log.info(
                "order %s%s (%s, priority %s%s) accepted from message %s",
                order.control,
                f"/{order.status}" if order.status else "",
                info.type_code,
                order.priority or "not given",
                ", study UID given" if order.study_uid else "",
                _safe(info.control_id),
            )
        return ack.encode("utf-8")

    def handle_batch(self, raw: bytes) -> bytes:
        """The batch acknowledgement (HL7 v2.5 chapter 2, batch protocol) of a batch
        (``[FHS] {[BHS] {MSH ...} [BTS]} [FTS]`` in one frame): each message is taken as if it
        came alone (:meth:`handle`) and its acknowledgement, as its MSH-15 and MSH-16 ask
        (:func:`acknowledgement`), goes in a batch of ACKs: ``FHS`` answering the file's
        FHS-11 in FHS-12, ``BHS`` answering each batch's BHS-11 in BHS-12, ``BTS-1`` the number
        of ACKs in it, ``FTS-1`` the number of batches. Never raises."""
        try:
            return self._handle_batch(raw)
        except Exception as exc:
            log.error("a batch could not be processed: %s", type(exc).__name__)
            return self.refusal(raw, "AR", "the batch could not be processed now: send it again")

    def _handle_batch(self, raw: bytes) -> bytes:
        cfg = self.settings.hl7
        file_header: list[str] | None = None
        # each batch: its BHS (None: none came before its first message), its messages
        batches: list[tuple[list[str] | None, list[list[bytes]]]] = []
        in_message = False
        for line in _BATCH_LINES.split(raw.removeprefix(b"\xef\xbb\xbf")):
            name = line[:3]
            if not line.strip():  # empty lines are no segments (as in a message alone)
                continue
            if name in _BATCH_SEGMENTS:
                in_message = False
                if name == b"FHS" and file_header is None and not batches:
                    file_header = _header_fields(line)
                elif name == b"BHS":
                    batches.append((_header_fields(line), []))
                continue
            if name == b"MSH" or not in_message:  # a segment astray: a message answered AR
                if not batches:
                    batches.append((None, []))
                batches[-1][1].append([])
                in_message = True
            batches[-1][1][-1].append(line)
        out: list[str] = []
        when = timestamp(zone=self.settings.monitoring.timezone)
        me = (escape(cfg.sending_application), escape(cfg.sending_facility))

        def answer_header(name: str, answered: list[str] | None) -> str:
            """FHS or BHS: from the node to the header's sender (its -3 and -4), -12 the
            header's control id (-11), as sent."""
            got = [_control_id_er7(value) for value in answered or []]
            fields = [name, "^~\\&", *me, _field(got, 2), _field(got, 3), when, "", "", ""]
            fields += [f"{name[0]}{uuid.uuid4().hex[:16].upper()}", _field(got, 10)]
            return "|".join(fields)

        if file_header is not None:
            out.append(answer_header("FHS", file_header))
        taken = 0
        for batch_header, messages in batches:
            out.append(answer_header("BHS", batch_header))
            acks = 0
            for lines in messages:
                one = b"\r".join(lines)
                ack = acknowledgement(one, self.handle(one))
                taken += 1
                if ack is not None:
                    out.extend(ack.decode("utf-8").split("\r"))
                    acks += 1
            out.append(f"BTS|{acks}")
        if file_header is not None:
            out.append(f"FTS|{len(batches)}")
        log.info("batch of %d message(s) in %d batch(es) processed", taken, len(batches))
        return "\r".join(out).encode("utf-8")


#: MSH-15 / MSH-16 (HL7 table 0155) of an enhanced-mode message: whether an acknowledgement
#: of each code goes back. Empty (the other of the two given) is "always".
_ASKED = {
    "AL": {"AA", "AE", "AR"},
    "": {"AA", "AE", "AR"},
    "NE": set(),
    "ER": {"AE", "AR"},
    "SU": {"AA"},
}
#: The accept acknowledgement code (MSA-1) for the node's outcome: CA committed, CE not (an
#: error in the message, or the node's own); CR (:data:`_UNSUPPORTED`) a message the node
#: does not take at all, whatever its content.
_ACCEPT = {"AA": "CA", "AE": "CE", "AR": "CE"}
#: ERR-3 (HL7 table 0357) of a rejection for the message's type, event, processing id or
#: version: its accept acknowledgement is CR.
_UNSUPPORTED = {b"200", b"201", b"202", b"203"}
_BATCH_LINES = re.compile(rb"\r\n|\r|\n")
_BATCH_SEGMENTS = {b"FHS", b"BHS", b"BTS", b"FTS"}


def _header_fields(line: bytes) -> list[str]:
    """An FHS's or BHS's fields (item ``n`` is field ``n + 1``), split at its own field
    separator."""
    text = line.decode("latin-1")
    return text.split(text[3]) if len(text) > 3 else [text]


def acknowledgement(raw: bytes, ack: bytes) -> bytes | None:
    """What goes back for message ``raw`` whose outcome is ``ack`` (``AA``, ``AE``, ``AR``),
    as its MSH-15 and MSH-16 ask (HL7 v2.5 2.9): both empty, ``ack`` (original mode); else
    (enhanced mode) the accept acknowledgement (``CA``; ``CR`` for a message type, event,
    processing id or version the node does not take; else ``CE``) where MSH-15 asks for one
    for this outcome, else ``ack`` where MSH-16 asks for an application acknowledgement,
    else None (nothing is sent). The node takes a message at once, so the accept and the
    application outcome are known together; it sends at most one reply, on the connection
    the message came on."""
    try:
        info = peek_msh(normalise(decode(raw)))
    except Exception:
        return ack
    if info is None or not (info.accept_ack or info.application_ack):
        return ack
    lines = ack.split(b"\r")
    msa = lines[1] if len(lines) > 1 and lines[1].startswith(b"MSA|") else b""
    code = msa[4:6].decode("ascii", "replace")
    if code not in _ACCEPT:
        return ack
    if code in _ASKED.get(info.accept_ack, _ASKED["AL"]):
        err = next((line.split(b"|") for line in lines if line.startswith(b"ERR|")), [])
        unsupported = len(err) > 3 and err[3].split(b"^")[0] in _UNSUPPORTED
        accept = "CR" if code == "AR" and unsupported else _ACCEPT[code]
        lines[1] = b"MSA|" + accept.encode() + msa[6:]
        return b"\r".join(lines)
    if code in _ASKED.get(info.application_ack, _ASKED["AL"]):
        return ack
    return None


def is_batch(raw: bytes) -> bool:
    """Whether a frame holds a batch (it begins with FHS or BHS)."""
    return raw.removeprefix(b"\xef\xbb\xbf")[:3] in {b"FHS", b"BHS"}


def _cx1(patient_id: str) -> str:
    """CX-1 of the first repetition of a PID-3 kept as ER7, unescaped."""
    return unescape(patient_id.split("~")[0].split("^")[0].split("&")[0]).strip()


def _audit_merge(info: MshInfo, merge: MergeInfo, moved: MergeMoved) -> None:
    """The audit record of one patient merge applied (IHE ATNA: a Patient Record event,
    action U, as for a Patient Identity Feed's merge; ``patient_identifier_changed`` for an
    ``ADT^A47``): the RIS that sent it, what moved, and the surviving and merged-away patient
    IDs (CX-1; the trail keeps them only with ``audit.patient_id``); no name."""
    change = merge.identifier_change
    audit(
        AuditEvent.PATIENT_IDENTIFIER_CHANGED if change else AuditEvent.PATIENTS_MERGED,
        participants=[
            Participant("application", info.sending_application or info.sender, requestor=True)
        ],
        patient_ids=[
            _cx1(merge.patient_id),
            *dict.fromkeys(unescape(ident) for ident, _ in merge.prior),
        ],
        detail=f"{'patient identifier change' if change else 'patient merge'}"
        f" ({info.type_code}, message {_safe(info.control_id)}):"
        f" {moved.orders} order(s) and {moved.messages} ORU^R01 waiting in the outbox moved"
        f" to the {'new identifier' if change else 'surviving patient'}",
    )


_ORDER_EVENTS = {
    "created": AuditEvent.ORDER_CREATED,
    "updated": AuditEvent.ORDER_UPDATED,
    "cancelled": AuditEvent.ORDER_CANCELLED,
}


def _audit_order(info: MshInfo, order: OrderInfo, outcome: str) -> None:
    """The audit record of one order taken from the RIS (DICOM PS3.15 A.5.3.13: an Order
    Record event, action C for an order the node did not have, U for a change or a
    cancellation, which the node keeps as the order's status): the RIS that sent it, the
    message (type, MSH-10), the order control (ORC-1, ORC-5), the study's UID where the order
    gives one, and the patient ID (CX-1; the trail keeps it only with
    ``audit.patient_id``); no name, no accession or order number (the ledger finds the order
    by the MSH-10)."""
    audit(
        _ORDER_EVENTS[outcome],
        participants=[
            Participant("application", info.sending_application or info.sender, requestor=True)
        ],
        study_uids=[order.study_uid] if order.study_uid else [],
        patient_ids=[_cx1(order.patient_id)],
        detail=f"order {outcome} ({info.type_code}, message {_safe(info.control_id)}):"
        f" ORC-1 {_safe(order.control)}{f', ORC-5 {_safe(order.status)}' if order.status else ''}"
        f", priority {_safe(order.priority) or 'not given'}",
    )


def _safe(value: str) -> str:
    """A control id for the log: printable ASCII only, bounded (it is not patient data)."""
    return "".join(c if 32 < ord(c) < 127 else "?" for c in value[:40])


def _reason(exc: HL7Error) -> str:
    """Why a message was refused, for the log: a limit names only the segment and field;
    hl7apy's own text may quote the message's content, so only its kind is logged."""
    if isinstance(exc, LimitExceeded) or not exc.text.startswith("malformed message:"):
        return exc.text
    return "malformed message"


def _describe(info: MshInfo | None) -> str:
    if info is None:
        return "no MSH"
    return f"type {_safe(info.type_code) or 'none'}, control id {_safe(info.control_id)}"


__all__ = ["OrderIntake", "Rejected", "acknowledgement", "is_batch"]
