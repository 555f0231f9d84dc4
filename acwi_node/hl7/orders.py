"""Order intake: one inbound HL7 message in, its acknowledgement out, the order in the ledger.

``AA`` accepted (every order it carries is stored, keyed by accession number), ``AE``
application error (e.g. no accession number), ``AR`` rejected (malformed, past one of the node's
limits, bytes invalid in the character set MSH-18 declares, or a message type the node does not
take). Every acknowledgement of a message with a control id (MSH-10) is stored with it, so the
same message sent again gets the same acknowledgement and creates nothing twice.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict

from acwi_node.config import Settings
from acwi_node.hl7.messages import (
    HL7Error,
    LimitExceeded,
    MshInfo,
    Rejected,
    build_ack,
    decode,
    decode_message,
    extract_orders,
    msh_info,
    normalise,
    parse,
    peek_msh,
)
from acwi_node.hl7.mllp import frame
from acwi_node.ledger import Ledger

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
            msg = parse(text)
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
        try:
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
        ack = self.ledger.hl7_record_message(
            sender=info.sender,
            control_id=info.control_id,
            message_type=info.type_code,
            ack_code="AA",
            ack=ack,
            orders=[{**asdict(order), "cancelled": order.cancelled} for order in orders],
        )
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


__all__ = ["OrderIntake", "Rejected"]
