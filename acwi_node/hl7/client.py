"""ORU^R01 results to the RIS: queue a message in the ledger, then deliver it over MLLP.

:func:`queue_oru` builds the message for an analysed job (with a radiologist's verdict once there
is one) and stores it as an outbound row. :class:`OruSender` sends due rows: ``AA``/``CA`` is
delivered; ``AR``/``CR`` (rejected) fails at once; ``AE``/``CE``, no answer or no connection is
retried with exponential back-off and fails after ``max_attempts``. The ledger keeps the state and
the last acknowledgement code. A retry re-sends the same message with the same MSH-10, so a RIS
that did receive it but whose ACK was lost can recognise the repeat.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from acwi_node.audit import AuditEvent, Outcome, Participant, audit
from acwi_node.config import Settings
from acwi_node.hl7.messages import (
    DEFAULT_LIMITS,
    AckInfo,
    HL7Error,
    Lesion,
    Limits,
    OruStudy,
    Verdict,
    build_oru,
    decode,
    decode_message,
    escape,
    identifying_values,
    parse_ack,
)
from acwi_node.hl7.mllp import FramingError, frame, read_frame_sync
from acwi_node.ledger import Ledger
from acwi_node.ledger.repository import SUPERSEDED
from acwi_node.observability.logging import REDACTED, LoopFailures

log = logging.getLogger("acwi_node.hl7")

_PATIENT_TAGS = [
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
]


class SendError(Exception):
    """No acknowledgement came back (connection, timeout, framing, unreadable reply);
    ``unreachable`` when no connection could be made at all (an outage of the RIS)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def without_identifiers(text: str, message: str) -> str:
    """``text`` (a peer's answer to ``message``) with every value of ``message`` that
    identifies its patient or order (:func:`~acwi_node.hl7.messages.identifying_values`)
    replaced by ``[redacted]``, wherever it stands as a whole word, in any case."""
    values = identifying_values(message)
    if not text or not values:
        return text
    pattern = re.compile(
        r"(?<![^\W_])(?:"
        + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
        + r")(?![^\W_])",
        re.IGNORECASE,
    )
    return pattern.sub(REDACTED, text)


def send_message(
    host: str, port: int, message: str, *, timeout_s: float, limits: Limits = DEFAULT_LIMITS
) -> AckInfo:
    """Send one message over MLLP and return the acknowledgement, read within ``limits``.
    Raises :class:`SendError`."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise SendError(f"{type(exc).__name__}: {exc}", unreachable=True) from None
    try:
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(frame(message.encode("utf-8")))
            reply = read_frame_sync(sock, max_bytes=limits.message_bytes, timeout_s=timeout_s)
    except (OSError, FramingError) as exc:
        raise SendError(f"{type(exc).__name__}: {exc}") from None
    try:
        return parse_ack(ack_text(reply), limits)
    except HL7Error as exc:
        raise SendError(f"unreadable acknowledgement: {exc.text}") from None


def ack_text(reply: bytes) -> str:
    """An acknowledgement's text in the character set its MSH-18 declares (MSA-3 in a RIS's
    own language); one it declares wrongly or not at all is read as the listener reads an
    order without MSH-18 (UTF-8, else Latin-1): its code and control id are ASCII either way."""
    try:
        return decode_message(reply)
    except HL7Error:
        return decode(reply)


# ----------------------------------------------------------------------- building the ORU
def _dicom_patient(path: Path | None) -> dict[str, str]:
    """Patient identifiers from a spooled instance's header (escaped ER7), empty if unreadable."""
    if path is None:
        return {}
    try:
        ds: Dataset = dcmread(path, stop_before_pixels=True, specific_tags=_PATIENT_TAGS)
    except Exception:
        return {}
    pid = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    name = str(ds.get("PatientName", "") or "")
    comps = [c.strip() for c in name.split("=")[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = comps[:5]
    # DICOM PN: family^given^middle^prefix^suffix; HL7 XPN: family^given^middle^suffix^prefix
    xpn = "^".join(escape(c) for c in (family, given, middle, suffix, prefix)).rstrip("^")
    cx = escape(pid) + (f"^^^{escape(issuer)}" if issuer and pid else "")
    return {
        "patient_id": cx,
        "patient_name": xpn,
        "birth_date": str(ds.get("PatientBirthDate", "") or "")[:8],
        "sex": str(ds.get("PatientSex", "") or "")[:1],
        "accession_number": str(ds.get("AccessionNumber", "") or "").strip()[:64],
    }


def oru_study(settings: Settings, ledger: Ledger, job_id: int) -> OruStudy:
    """The :class:`OruStudy` of an analysed job: summary from the ledger, patient from the
    order (by Study Instance UID or accession number), else from the study's DICOM header
    (also where records retention erased the order's: ``retention.records_keep_days``)."""
    inputs = ledger.job_report_inputs(job_id)
    if not inputs["summary"]:
        raise ValueError(f"job {job_id} has no analysis result")
    rel = inputs["instance_path"]
    dicom = _dicom_patient(settings.spool_dir / rel if rel else None)
    order = ledger.hl7_order_for_study(inputs["study_uid"], dicom.get("accession_number", ""))
    erased = order is not None and not (order.get("patient_id") or order.get("patient_name"))
    source: dict[str, Any] = order if order is not None and not erased else dicom
    return OruStudy(
        study_uid=inputs["study_uid"],
        accession_number=(order or {}).get("accession_number") or dicom.get("accession_number", ""),
        # PID-3 is required: an order that named no identifier (an old RIS's PID-2 alone)
        # takes the images'
        patient_id=source.get("patient_id") or dicom.get("patient_id") or "",
        patient_name=source.get("patient_name") or "",
        birth_date=source.get("birth_date") or "",
        sex=source.get("sex") or "",
        placer_order_number=(order or {}).get("placer_order_number") or "",
        filler_order_number=(order or {}).get("filler_order_number") or "",
        procedure_code=(order or {}).get("procedure_code") or "",
        procedure_text=(order or {}).get("procedure_text") or "",
        summary=inputs["summary"],
        observed_at=inputs["completed_at"],
    )


def queue_oru(
    settings: Settings,
    ledger: Ledger,
    job_id: int,
    verdict: Verdict | None = None,
    *,
    review_id: int | None = None,
    amendment: int | None = None,
) -> int | None:
    """Queue the ORU^R01 of an analysed job for the RIS; returns the outbound row id.

    None when no RIS is configured or the job already has this message (idempotent: a re-run of
    the analysis does not send twice). A verdict is sent as its own message (kind
    ``verdict-<review_id>``, or ``verdict`` when no id is given); an amended verdict (its id
    ``amendment``) as another (:func:`verdict_kind`), a correction (``C``) of the first.
    """
    cfg = settings.hl7
    if cfg.ris is None:
        return None
    if verdict is None:
        kind = "result"
    elif review_id:
        kind = verdict_kind(review_id, amendment)
    else:
        kind = "verdict"
    promised = ledger.unbuilt_hl7_outbound(job_id, kind)
    if promised:
        control_id = promised[1]
    elif amendment is not None:
        control_id = control_id_for(job_id, "amendment", amendment)
    else:
        control_id = control_id_for(job_id, kind, review_id)
    message = build_oru(
        oru_study(settings, ledger, job_id),
        verdict,
        control_id=control_id,
        correction=ledger.study_has_final_oru(job_id, before_id=promised[0] if promised else None),
        sending=(cfg.sending_application, cfg.sending_facility),
        receiving=(cfg.ris.receiving_application, cfg.ris.receiving_facility),
        timezone=settings.monitoring.timezone,
    )
    if promised is not None:
        row: int | None = promised[0] if ledger.fill_hl7_outbound(promised[0], message) else None
    else:
        row = ledger.add_hl7_outbound(
            job_id=job_id, kind=kind, control_id=control_id, message=message
        )
    if row is not None:
        log.info("job %d: ORU^R01 (%s) queued for the RIS", job_id, kind)
    return row


def queue_withdrawal_oru(settings: Settings, ledger: Ledger, job_id: int, note: str) -> int | None:
    """Queue the ORU^R01 that withdraws a job's AI result from the RIS (its results were
    withdrawn from the PACS): only where a RIS is configured and was sent (or will be sent)
    an ORU of this job. Returns the outbound row id, or None."""
    cfg = settings.hl7
    if cfg.ris is None or not ledger.hl7_outbound_kinds(job_id):
        return None
    control_id = control_id_for(job_id, "withdrawal")
    message = build_oru(
        oru_study(settings, ledger, job_id),
        control_id=control_id,
        sending=(cfg.sending_application, cfg.sending_facility),
        receiving=(cfg.ris.receiving_application, cfg.ris.receiving_facility),
        timezone=settings.monitoring.timezone,
        withdrawn=note,
    )
    row = ledger.add_hl7_outbound(
        job_id=job_id, kind="withdrawal", control_id=control_id, message=message
    )
    if row is not None:
        log.info("job %d: ORU^R01 (withdrawal) queued for the RIS", job_id)
    return row


def control_id_for(job_id: int, kind: str = "result", review_id: int | None = None) -> str:
    """The MSH-10 of a job's ORU: unique per job, kind and second (an amendment's: per
    job and amending verdict, ``kind="amendment"`` and that verdict's id as ``review_id``)."""
    return f"ACWI{job_id}{kind[0].upper()}{review_id or ''}T{dt.datetime.now():%y%m%d%H%M%S}"[:64]


def verdict_kind(review_id: int, amendment: int | None = None) -> str:
    """The outbound kind of a verdict's ORU: ``verdict-<review item id>`` for the verdict that
    closed the case, ``verdict-<review item id>-<verdict id>`` for an amendment. Every kind
    starting ``verdict`` is a final result (see :meth:`Ledger.study_has_final_oru`)."""
    return f"verdict-{review_id}" if amendment is None else f"verdict-{review_id}-{amendment}"


def parse_verdict_kind(kind: str) -> tuple[int, int | None]:
    """The review item id and amending verdict id (None) of a :func:`verdict_kind`."""
    parts = kind.removeprefix("verdict-").split("-")
    if not kind.startswith("verdict-") or len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a verdict's ORU kind: {kind!r}")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else None


def lesions_of(boxes: dict[str, Any]) -> tuple[Lesion, ...]:
    """A kept verdict's lesion boxes (by image name: a SOP Instance UID, or ``"<uid> frame
    <n>"``; each image's a list of ``[x0, y0, x1, y1]``) as the ORU's lesions."""
    out: list[Lesion] = []
    for name, kept in boxes.items():
        sop, _, frame = str(name).partition(" frame ")
        if kept and all(isinstance(v, int) for v in kept):
            kept = [kept]  # kept when an image took one box
        for box in kept or []:
            x0, y0, x1, y1 = (int(v) for v in box)
            out.append(Lesion(sop, int(frame) if frame else None, (x0, y0, x1, y1)))
    return tuple(out)


def queue_result_safely(settings: Settings, ledger: Ledger, job_id: int) -> None:
    """The analysis hook: queue the result ORU, logging (never raising) a failure."""
    if settings.hl7.ris is None:
        return
    try:
        queue_oru(settings, ledger, job_id)
    except Exception as exc:
        log.error("job %d: ORU^R01 not queued: %s", job_id, type(exc).__name__)


# ---------------------------------------------------------------------------- delivering
class OruSender:
    """Drains the ORU outbox to the configured RIS."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        if settings.hl7.ris is None:
            raise ValueError("no RIS configured ([hl7.ris])")
        self.settings = settings
        self.ris = settings.hl7.ris
        self.ledger = ledger
        self._stop = threading.Event()
        #: A ledger that is down logs a traceback, then a line a minute, not one a pass.
        self.failures = LoopFailures(log, "ORU sender pass")

    def backoff_s(self, attempts_so_far: int) -> float:
        return float(min(self.ris.backoff_max_s, self.ris.backoff_initial_s * (2**attempts_so_far)))

    def build_promised(self) -> int:
        """Build the ORUs that were promised and not built: the worker (a result) or the web
        process (a verdict) died between recording and building; returns how many."""
        built = 0
        for job_id, kind in self.ledger.hl7_outbound_to_build():
            promised = self.ledger.unbuilt_hl7_outbound(job_id, kind)
            if promised is None:
                continue
            try:
                if kind == "result":
                    row = queue_oru(self.settings, self.ledger, job_id)
                else:  # "verdict-<review item id>[-<amending verdict id>]"
                    item_id, amendment = parse_verdict_kind(kind)
                    verdict = self.ledger.review_verdict(item_id, amendment)
                    if verdict is None:
                        raise ValueError(f"review item {item_id} has no such verdict")
                    row = queue_oru(
                        self.settings,
                        self.ledger,
                        job_id,
                        Verdict(
                            agrees=verdict["action"] == "confirm",
                            label=verdict["label"],
                            reviewer=verdict["user_name"],
                            comment=verdict["reason"],
                            reviewed_at=verdict["created_at"],
                            lesions=lesions_of(verdict["boxes"]),
                        ),
                        review_id=item_id,
                        amendment=amendment,
                    )
                if row is not None:
                    built += 1
            except Exception as exc:
                log.error(
                    "job %d: the promised ORU^R01 (%s) cannot be built: %s", job_id, kind, exc
                )
                self.ledger.record_hl7_attempt(
                    promised[0],
                    delivered=False,
                    ack_code="",
                    error=f"cannot build the message: {type(exc).__name__}: {exc}",
                    max_attempts=self.ris.max_attempts,
                    backoff_s=0.0,
                    final=True,
                )
        return built

    def tick(self) -> int:
        """One pass over the due messages; returns how many were attempted."""
        self.build_promised()
        due = self.ledger.due_hl7_outbound()
        for item in due:
            if self._stop.is_set():
                break
            # Connect, send and the ACK may each take ``timeout_s``: another hl7 process
            # sharing the ledger leaves the message alone until this attempt has surely ended.
            claim = self.ledger.claim_hl7_outbound(item.id, lease_s=3 * self.ris.timeout_s + 60)
            if claim is None:
                continue  # another hl7 process took it
            delivered, final, code, error = False, False, "", ""
            unreachable = False
            try:
                ack = send_message(
                    self.ris.host,
                    self.ris.port,
                    item.message,
                    timeout_s=self.ris.timeout_s,
                    limits=Limits.of(self.settings.hl7),
                )
                code = ack.code
                if ack.control_id and ack.control_id != item.control_id:
                    error = "acknowledgement answers another message"
                elif code in {"AA", "CA"}:
                    delivered = True
                else:
                    final = code in {"AR", "CR"}
                    error = ack.text or f"RIS answered {code}"
            except SendError as exc:
                error = str(exc)
                unreachable = exc.unreachable
            # The RIS's words ("patient DOE^JOHN not found") go to the ledger, the log and
            # the audit trail: without the message's patient and order identifiers.
            error = without_identifiers(error, item.message)
            state = self.ledger.record_hl7_attempt(
                item.id,
                delivered=delivered,
                ack_code=code,
                error=error,
                max_attempts=self.ris.max_attempts,
                backoff_s=self.backoff_s(item.attempts),
                final=final,
                unreachable=unreachable,
                outage_patience_s=self.ris.outage_patience_s,
                claim=claim,
            )
            if state == SUPERSEDED:
                log.warning(
                    "ORU %s: another hl7 process took it over (this one's claim ran out):"
                    " this attempt's outcome is not recorded",
                    item.control_id,
                )
            audit(
                AuditEvent.RESULTS_SENT,
                outcome=Outcome.SUCCESS if delivered else Outcome.MINOR_FAILURE,
                participants=[
                    Participant(
                        "application",
                        self.ris.receiving_application,
                        self.ris.host,
                        requestor=False,
                    )
                ],
                detail=f"ORU^R01 {item.control_id} to the RIS: "
                + ("acknowledged" if delivered else f"{code or 'no ACK'}, {error}; now {state}"),
            )
            if delivered:
                log.info("ORU %s delivered to the RIS", item.control_id)
            else:
                log.warning(
                    "ORU %s not delivered (%s): %s; now %s",
                    item.control_id,
                    code or "no ACK",
                    error,
                    state,
                )
        return len(due)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.tick()
            except Exception:
                self.failures.failed()
                busy = 0
            else:
                self.failures.worked()
            if not busy:
                self._stop.wait(self.failures.wait_s(self.ris.poll_interval_s))

    def stop(self) -> None:
        self._stop.set()
