"""HL7 v2 messages the node reads and writes, with hl7apy.

Read: order messages from the RIS (``ORM^O01``, ``OMI^O23``) into :class:`OrderInfo`, patient
merges and identifier changes (:data:`MERGE_TYPES`: ``ADT^A40`` and the like) into
:class:`MergeInfo`.
Write: acknowledgements (``ACK`` with MSA-1 ``AA``/``AE``/``AR``) and results (``ORU^R01``, built by
:func:`build_oru` from an :class:`OruStudy` and, once a radiologist has reviewed it, a
:class:`Verdict`). Values are escaped with the HL7 escape sequences, so text such as a patient
name containing ``|`` or ``^`` or markup travels unchanged and never breaks the message structure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hl7apy import load_reference
from hl7apy.exceptions import ChildNotFound, HL7apyException, UnsupportedVersion
from hl7apy.parser import parse_message

from acwi_node.hl7.er7 import (
    DEFAULT_LIMITS,
    ERROR_CODES,
    LIMITS,
    STANDARD_ENCODING,
    ApplicationError,
    Encoding,
    HL7Error,
    LimitExceeded,
    Limits,
    Rejected,
    Segment,
    cx_identifiers,
    decode,
    decode_message,
    encoding_of,
    er7_prefix,
    normalise,
    printable,
    read_segments,
    to_er7,
    transcode,
)

HL7_VERSION = "2.5"
#: Local coding system of the node's observation identifiers (HL7 local codes start with 99).
CODING_SYSTEM = "99ACWI"
ORDER_TYPES = {"ORM^O01", "OMI^O23"}
#: Patient identity events (HL7 v2.5 chapter 3) the node applies to its orders and to the
#: ORU^R01 messages waiting in its outbox: the merges of two patients' identifiers (``A18``
#: merge patient information, ``A30`` merge person information, ``A34`` merge patient ID only,
#: ``A36`` merge patient ID and account number, ``A39`` merge person - patient ID, ``A40``
#: merge patient - patient identifier list), and ``A47``, one of a patient's identifiers
#: changed (:data:`IDENTIFIER_CHANGES`).
MERGE_TYPES = frozenset(
    {"ADT^A18", "ADT^A30", "ADT^A34", "ADT^A36", "ADT^A39", "ADT^A40", "ADT^A47"}
)
#: Events whose structure (``ADT_A39``) repeats the PID/MRG group: one merge each; the others
#: (``ADT_A18``, ``ADT_A30``) carry one PID and its MRG.
REPEATED_MERGES = frozenset({"ADT^A39", "ADT^A40"})
#: Person merges: the merged-away identifiers are in MRG-1 and, as HL7 v2.5 still describes
#: these events, in MRG-4 (prior patient ID).
PERSON_MERGES = frozenset({"ADT^A30", "ADT^A39"})
#: A patient identifier changed (``A47``): MRG-1 the identifier that was wrong, PID-3 the
#: right one; the patient's other identifiers stay.
IDENTIFIER_CHANGES = frozenset({"ADT^A47"})
#: Patient identity events acknowledged ``AA`` with nothing changed: what they change is
#: nothing the node keeps. ``A35`` (merge account number only), ``A41`` (merge account) and
#: ``A42`` (merge visit) merge account or visit numbers, which orders do not carry here;
#: ``A24`` (link patient information) and ``A37`` (unlink) relate two patients who keep
#: their own identifiers, and the node keeps no links.
IDENTITY_NOTICES = frozenset({"ADT^A24", "ADT^A35", "ADT^A37", "ADT^A41", "ADT^A42"})
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

__all__ = [
    "DEFAULT_LIMITS",
    "LIMITS",
    "STANDARD_ENCODING",
    "Limits",
    "ApplicationError",
    "HL7Error",
    "LimitExceeded",
    "Rejected",
    "decode",
    "decode_message",
    "normalise",
]


# ------------------------------------------------------------------------------ escaping
def escape(text: str, enc: dict[str, str] | None = None) -> str:
    """HL7 escape sequences for the delimiters in a value (``|`` -> ``\\F\\`` etc.) and for
    control characters (``\\r`` -> ``\\X0D\\``), so that the value can neither break the
    message's structure nor its MLLP framing."""
    enc = enc or STANDARD_ENCODING
    esc = enc["ESCAPE"]
    out = text.replace(esc, f"{esc}E{esc}")
    for key, code in (
        ("FIELD", "F"),
        ("COMPONENT", "S"),
        ("SUBCOMPONENT", "T"),
        ("REPETITION", "R"),
    ):
        out = out.replace(enc[key], f"{esc}{code}{esc}")
    return _CONTROL.sub(lambda m: f"{esc}X{ord(m.group()):02X}{esc}", out)


def unescape(text: str, enc: dict[str, str] | None = None) -> str:
    """The value of an escaped HL7 string (unknown escape sequences are dropped)."""
    enc = enc or STANDARD_ENCODING
    esc = enc["ESCAPE"]
    if esc not in text:
        return text
    table = {
        "F": enc["FIELD"],
        "S": enc["COMPONENT"],
        "T": enc["SUBCOMPONENT"],
        "R": enc["REPETITION"],
        "E": esc,
    }
    out: list[str] = []
    parts = text.split(esc)
    # parts alternate: text, sequence, text, sequence, ... (an odd count when well formed)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(part)
        elif part in table:
            out.append(table[part])
        elif part.startswith("X") and len(part) > 1:
            with contextlib.suppress(ValueError):
                out.append(bytes.fromhex(part[1:]).decode("latin-1"))
    return "".join(out)


# ------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ParsedMessage:
    """A message's segments in standard ER7 (``|^~\\&``), each ``[name, field 1, ...]``
    (for MSH, item ``n`` is MSH-``n``), as :func:`parse` read them."""

    segments: list[list[str]]

    def all(self, name: str) -> list[list[str]]:
        return [seg for seg in self.segments if seg[0] == name]

    def first(self, name: str) -> list[str] | None:
        return next(iter(self.all(name)), None)

    @property
    def msh(self) -> list[str]:
        return self.segments[0]


@dataclass(frozen=True)
class MshInfo:
    """What an acknowledgement needs from the MSH of the message it answers.

    ``control_id`` is MSH-10 as ER7 text in the standard delimiters, as the sender wrote it
    (escape sequences kept), so that MSA-2 repeats it exactly; the other values are unescaped.
    """

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = HL7_VERSION
    accept_ack: str = ""  # MSH-15 (HL7 table 0155: AL, NE, ER, SU)
    application_ack: str = ""  # MSH-16 (HL7 table 0155)

    @property
    def type_code(self) -> str:
        return f"{self.message_type}^{self.trigger}" if self.trigger else self.message_type

    @property
    def sender(self) -> str:
        return f"{self.sending_application}|{self.sending_facility}"


def _msh_info(msh: Sequence[str]) -> MshInfo:
    """:class:`MshInfo` of an MSH in standard ER7 (item ``n`` is MSH-``n``)."""
    mtype = _field(msh, 9)
    return MshInfo(
        sending_application=_comp(_field(msh, 3), 1)[:180],
        sending_facility=_comp(_field(msh, 4), 1)[:180],
        receiving_application=_comp(_field(msh, 5), 1)[:180],
        receiving_facility=_comp(_field(msh, 6), 1)[:180],
        message_type=_comp(mtype, 1)[:3],
        trigger=_comp(mtype, 2)[:3],
        control_id=er7_prefix(_field(msh, 10).strip(), 199),
        processing_id=_comp(_field(msh, 11), 1)[:1] or "P",
        version=_comp(_field(msh, 12), 1)[:8] or HL7_VERSION,
        accept_ack=_comp(_field(msh, 15), 1).upper()[:2],
        application_ack=_comp(_field(msh, 16), 1).upper()[:2],
    )


def peek_msh(text: str) -> MshInfo | None:
    """Read MSH by plain splitting, for answering messages the node cannot parse."""
    if not text.startswith("MSH") or len(text) < 8:
        return None
    line = re.split(r"\r|\n", text, maxsplit=1)[0]
    sep = line[3]
    try:
        enc = encoding_of(line)
    except Rejected:  # read with the standard delimiters, as far as they go
        enc = Encoding(field=sep)
    parts = line.split(sep, 16)[:16]  # MSH, MSH-2, MSH-3 ... MSH-16
    msh = ["MSH", "|", "^~\\&"] + [transcode(part[:400], enc) for part in parts[2:]]
    return _msh_info(msh)


@functools.lru_cache(maxsize=512)
def _segment_known(name: str, version: str) -> bool:
    """Whether hl7apy knows segment ``name`` in HL7 ``version`` (a version it does not know:
    True, for :func:`parse_message` to refuse the version itself)."""
    try:
        load_reference(name, "Segment", version)
    except ChildNotFound:
        return False
    except Exception:
        return True
    return True


def parse(text: str, limits: Limits = DEFAULT_LIMITS) -> ParsedMessage:
    """Read ER7 text: ``limits`` and delimiters (:func:`~acwi_node.hl7.er7.read_segments`),
    then hl7apy's tolerant validation. Raises :class:`Rejected` (:class:`LimitExceeded` past a
    limit, before hl7apy sees the message).

    A segment the message's version does not define (``PRT`` in 2.5, ``TQ1`` or ``SFT`` in
    2.3, a vendor's own) is left out of hl7apy's validation and kept: HL7 v2 asks a receiver
    to ignore segments it does not expect rather than refuse the message."""
    segments = read_segments(text, limits)
    version = _field(segments[0], 12).split("~")[0].split("^")[0].strip()  # VID-1, as sent
    standard = "\r".join(
        "|".join(["MSH", "^~\\&", *seg[3:]]) if i == 0 else "|".join(seg)
        for i, seg in enumerate(segments)
        if i == 0 or seg[0].startswith("Z") or _segment_known(seg[0], version)
    )
    try:
        parse_message(standard, find_groups=False)
    except UnsupportedVersion:
        if not version:
            raise Rejected("no HL7 version (MSH-12)", error="101", location="MSH^1^12") from None
        raise Rejected(
            f"unsupported HL7 version in MSH-12: {printable(version, 20)}",
            error="203",
            location="MSH^1^12",
        ) from None
    except HL7apyException as exc:
        raise Rejected(f"malformed message: {exc}") from None
    except Exception as exc:  # hl7apy raises plain errors on some malformed input
        raise Rejected(f"malformed message: {type(exc).__name__}") from None
    return ParsedMessage(segments)


def _field(segment: Sequence[str] | None, n: int) -> str:
    """ER7 text (standard delimiters, escaped) of field ``n`` of a segment ('' when absent)."""
    if segment is None or len(segment) <= n:
        return ""
    return segment[n]


def _comp(er7: str, i: int) -> str:
    """Component ``i`` (1-based) of the first repetition of a field, unescaped."""
    first = er7.split("~")[0]
    comps = first.split("^")
    if len(comps) < i:
        return ""
    return unescape(comps[i - 1].split("&")[0]).strip()


def msh_info(msg: ParsedMessage) -> MshInfo:
    return _msh_info(msg.msh)


@dataclass(frozen=True)
class OrderInfo:
    """An imaging order as the RIS announced it. Patient fields are ER7-escaped XPN/CX text."""

    control: str  # ORC-1: NW new, XO change, SC status changed, CA cancel, ...
    accession_number: str
    placer_order_number: str
    filler_order_number: str
    patient_id: str  # PID-3 first repetition, ER7 (id^^^authority^type)
    patient_name: str  # PID-5 first repetition, ER7 (family^given^...)
    birth_date: str
    sex: str
    procedure_code: str
    procedure_text: str
    priority: str  # S = STAT, A = ASAP, R = routine; "" when the message gives none
    study_uid: str | None
    expected_images: int | None
    status: str = ""  # ORC-5 (HL7 table 0038): SC scheduled, IP in process, CA cancelled, ...

    @property
    def stat(self) -> bool:
        return self.priority == "S"

    @property
    def cancelled(self) -> bool:
        """The order is cancelled or discontinued: by its control code (a request, or the
        RIS's own cancellation) or by the status a status change gives it (``SC`` with ORC-5
        ``CA``)."""
        return self.control in CANCEL_CONTROLS or self.status in CANCELLED_STATUSES


#: ORC-1 codes (HL7 table 0119) that cancel or discontinue an order: cancel and discontinue
#: requests, the order cancelled or discontinued (by the RIS), and either done as requested.
CANCEL_CONTROLS = frozenset({"CA", "DC", "OC", "OD", "CR", "DR"})
#: ORC-5 order statuses (HL7 table 0038) of a cancelled or discontinued order.
CANCELLED_STATUSES = frozenset({"CA", "DC"})


#: Priorities some RISs spell out, and their HL7 table 0027 codes.
SPELLED_PRIORITIES = {
    "STAT": "S",
    "ASAP": "A",
    "ROUTINE": "R",
    "PREOP": "P",
    "CALLBACK": "C",
    "TIMING CRITICAL": "T",
}


def _priority(msg: ParsedMessage) -> str:
    """Priority from TQ1-9, else ORC-7 (TQ: component 6), else OBR-27 (TQ: component 6); ""
    when none is given (a status change, say, which leaves the order's priority as it was).
    A priority spelled out (``STAT``, ``Routine``) is its code (:data:`SPELLED_PRIORITIES`):
    cut to two characters, ``STAT`` was ``ST``, and the order was not taken for a STAT one."""
    for seg_name, n, comp in (("TQ1", 9, 1), ("ORC", 7, 6), ("OBR", 27, 6)):
        for seg in msg.all(seg_name):
            value = " ".join(_comp(_field(seg, n), comp).upper().split())
            if value:
                return SPELLED_PRIORITIES.get(value, value)[:2]
    return ""


def _study_uid(msg: ParsedMessage, order: int = 1) -> str | None:
    """IPC-3, else ZDS-1, of the ``order``-th order of a message (its segments ``msg``)."""
    for seg_name, n in (("IPC", 3), ("ZDS", 1)):
        for seg in msg.all(seg_name):
            value = _comp(_field(seg, n), 1)
            if value:
                if len(value) > 64 or not _UID_RE.match(value):
                    raise ApplicationError(
                        f"{seg_name}-{n} is not a valid Study Instance UID",
                        error="102",
                        location=f"{seg_name}^{order}^{n}",
                    )
                return value
    return None


def _expected_images(msg: ParsedMessage) -> int | None:
    """The number of images announced in ZDS-2 (a node extension; absent in most orders)."""
    for seg in msg.all("ZDS"):
        value = _comp(_field(seg, 2), 1)
        if value.isdigit() and 0 < int(value) < 1_000_000:
            return int(value)
    return None


def order_groups(msg: ParsedMessage) -> list[ParsedMessage]:
    """The orders of a message, one per ORC/OBR group: each from its ORC to the next (an OBR
    after its group's OBR starts another order of the same ORC). The first also holds the
    segments before it (PID, PV1), so that a message of one order is read whole."""
    groups: list[list[list[str]]] = [[]]
    orc: list[str] | None = None
    has_obr = False
    for seg in msg.segments:
        if seg[0] == "ORC" and orc is not None:
            groups.append([])
            has_obr = False
        elif seg[0] == "OBR" and has_obr and orc is not None:
            groups.append([orc])
            has_obr = False
        if seg[0] == "ORC":
            orc = seg
        has_obr = has_obr or seg[0] == "OBR"
        groups[-1].append(seg)
    return [ParsedMessage(group) for group in groups]


def extract_orders(msg: ParsedMessage) -> list[OrderInfo]:
    """Every order an ``ORM^O01`` or ``OMI^O23`` carries (several ORC/OBR groups: a
    multi-procedure order), in message order. Raises :class:`HL7Error` when any of them cannot
    be taken, naming its OBR (``OBR^2^18``): a message is taken whole or not at all.

    The patient's PID-3 (every repetition that fits in 250 characters) and PID-5 (first
    repetition) are kept as ER7 in the standard delimiters with the sender's escape sequences,
    as a result message carries them back.
    """
    info = msh_info(msg)
    if info.type_code not in ORDER_TYPES:
        raise Rejected(
            f"unsupported message type {info.type_code or '(none)'}",
            error="200",
            location="MSH^1^9",
        )
    if msg.first("ORC") is None:
        raise ApplicationError("no ORC segment", error="100", location="ORC")
    pid = msg.first("PID")
    return [_order(group, pid, n) for n, group in enumerate(order_groups(msg), start=1)]


@dataclass(frozen=True)
class MergeInfo:
    """One patient merge (a PID and its MRG) of a merge event (:data:`MERGE_TYPES`):
    ``prior`` the merged-away patient's identifiers (MRG-1, and MRG-4 for a person merge; each
    (CX-1, CX-4) as ER7 in the standard delimiters, as orders keep PID-3), the surviving
    patient's PID-3 (as an order keeps it), name, birth date and sex. ``identifier_change``
    (``ADT^A47``): ``prior`` names identifiers that were wrong and PID-3 the right ones, which
    replace them among the patient's other identifiers."""

    prior: tuple[tuple[str, str], ...]
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    identifier_change: bool = False


def extract_merges(msg: ParsedMessage) -> list[MergeInfo]:
    """The merges of a merge event (:data:`MERGE_TYPES`): each PID with the MRG that follows
    it (repeated in ``ADT^A39`` and ``ADT^A40``; one pair in the others). Raises
    :class:`HL7Error` when one has no PID-3 or no prior identifier (MRG-1; for a person
    merge, MRG-1 or MRG-4), or an event of one pair has more (nothing of the message is
    applied)."""
    info = msh_info(msg)
    if info.type_code not in MERGE_TYPES:
        raise Rejected(
            f"unsupported message type {info.type_code or '(none)'}",
            error="200",
            location="MSH^1^9",
        )
    merges: list[MergeInfo] = []
    pid: list[str] | None = None
    n = 0
    for seg in msg.segments:
        if seg[0] == "PID":
            pid = seg
            n += 1
        elif seg[0] == "MRG":
            if pid is None:
                raise ApplicationError("MRG without its PID", error="100", location="MRG")
            if merges and info.type_code not in REPEATED_MERGES:
                raise ApplicationError(
                    f"{info.type_code} carries one PID and its MRG",
                    error="100",
                    location=f"MRG^{len(merges) + 1}",
                )
            if not _comp(_field(pid, 3), 1):
                raise ApplicationError(
                    "no surviving patient identifier (PID-3)", location=f"PID^{n}^3"
                )
            prior = cx_identifiers(_field(seg, 1))
            if info.type_code in PERSON_MERGES:
                prior += cx_identifiers(_field(seg, 4))
            if not prior:
                raise ApplicationError(
                    "no prior patient identifier (MRG-1)"
                    if info.type_code not in PERSON_MERGES
                    else "no prior patient identifier (MRG-1 or MRG-4)",
                    location=f"MRG^{n}^1",
                )
            merges.append(
                MergeInfo(
                    prior=tuple(dict.fromkeys(prior)),
                    patient_id=_whole_repetitions(_field(pid, 3), 250),
                    patient_name=er7_prefix(_field(pid, 5).split("~")[0], 250),
                    birth_date=_comp(_field(pid, 7), 1)[:8],
                    sex=_comp(_field(pid, 8), 1)[:1],
                    identifier_change=info.type_code in IDENTIFIER_CHANGES,
                )
            )
            pid = None
    if not merges:
        raise ApplicationError("no MRG segment", error="100", location="MRG")
    return merges


def extract_order(msg: ParsedMessage) -> OrderInfo:
    """The first order of a message (:func:`extract_orders`)."""
    return extract_orders(msg)[0]


def _whole_repetitions(field: str, limit: int) -> str:
    """A field's repetitions (ER7, ``~``-separated), as many whole ones as fit in ``limit``
    characters after the first (which is cut to fit): PID-3 lists the patient's identifiers
    (the RIS's medical record number, an insurance number, another facility's), and the RIS
    finds its patient by the one it issued, which need not come first."""
    repetitions = field.split("~")
    kept = er7_prefix(repetitions[0], limit)
    for repetition in repetitions[1:]:
        if len(kept) + 1 + len(repetition) > limit:
            break
        kept += "~" + repetition
    return kept


def _order(group: ParsedMessage, pid: list[str] | None, n: int) -> OrderInfo:
    """The order of one ORC/OBR group, the ``n``-th of its message."""
    orc = group.first("ORC")
    obr = group.first("OBR")
    ipc = group.first("IPC")
    accession = _comp(_field(ipc, 1), 1) if ipc is not None else ""
    if not accession and obr is not None:
        accession = _comp(_field(obr, 18), 1)  # Placer Field 1 (IHE Scheduled Workflow)
    if not accession:
        raise ApplicationError("no accession number (IPC-1 or OBR-18)", location=f"OBR^{n}^18")
    if len(accession) > 64:
        where = f"IPC^{n}^1" if ipc is not None and _comp(_field(ipc, 1), 1) else f"OBR^{n}^18"
        raise ApplicationError(
            "accession number longer than 64 characters", error="102", location=where
        )
    control = _comp(_field(orc, 1), 1).upper()[:2] or "NW"
    placer = _comp(_field(orc, 2), 1) or _comp(_field(obr, 2), 1)
    filler = _comp(_field(orc, 3), 1) or _comp(_field(obr, 3), 1)
    procedure = _field(obr, 4)
    return OrderInfo(
        control=control,
        accession_number=accession,
        placer_order_number=placer[:64],
        filler_order_number=filler[:64],
        patient_id=_whole_repetitions(_field(pid, 3), 250),
        patient_name=er7_prefix(_field(pid, 5).split("~")[0], 250),
        birth_date=_comp(_field(pid, 7), 1)[:8],
        sex=_comp(_field(pid, 8), 1)[:1],
        procedure_code=_comp(procedure, 1)[:64],
        procedure_text=_comp(procedure, 2)[:200],
        priority=_priority(group),
        study_uid=_study_uid(group, n),
        expected_images=_expected_images(group),
        status=_comp(_field(orc, 5), 1).upper()[:2],
    )


# ------------------------------------------------------------------------------ building
def timestamp(when: dt.datetime | None = None, zone: str = "UTC") -> str:
    """An HL7 TS (``YYYYMMDDHHMMSS+ZZZZ``): ``when`` (None: now) on the hospital's clock
    ``zone`` (an IANA name: ``monitoring.timezone``), whatever the node's own time zone, with
    its offset from UTC, so that the RIS reads the same moment whatever its time zone, and an
    hour repeated when the clocks go back is told apart. A naive ``when`` is UTC, as the
    ledger keeps its times."""
    if when is None:
        when = dt.datetime.now(dt.timezone.utc)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(_zone(zone)).strftime("%Y%m%d%H%M%S%z")


@functools.lru_cache(maxsize=8)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def _msh(
    *,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    type_code: str,
    control_id: str,
    processing_id: str = "P",
    when: dt.datetime | None = None,
    zone: str = "UTC",
) -> Segment:
    msh = Segment("MSH")
    msh[3] = escape(sending[0])
    msh[4] = escape(sending[1])
    msh[5] = escape(receiving[0])
    msh[6] = escape(receiving[1])
    msh[7] = timestamp(when, zone)
    msh[9] = type_code
    msh[10] = escape(control_id)
    msh[11] = processing_id or "P"
    msh[12] = HL7_VERSION
    msh[18] = "UNICODE UTF-8"
    return msh


def _control_id_er7(control_id: str) -> str:
    """An answered MSH-10 (ER7) for MSA-2: as received, with any control character or field
    separator escaped so that it can break neither the ACK nor its MLLP framing."""
    out = _CONTROL.sub(lambda m: f"\\X{ord(m.group()):02X}\\", control_id)
    return out.replace("|", "\\F\\")


def build_ack(
    answered: MshInfo | None,
    code: str,
    text: str,
    *,
    control_id: str,
    application: str,
    facility: str,
    error: str = "207",
    location: str = "",
    timezone: str = "UTC",
) -> str:
    """An ``ACK`` (MSA-1 ``code``, MSA-2 the answered MSH-10, MSA-3 ``text``) as ER7 text.

    ``answered`` may be None when the message was too broken to read its MSH; MSA-2 is then empty.
    The acknowledgement never repeats the answered message's content beyond its MSH identifiers.
    A refusal (``AE``, ``AR``) has an ERR segment too: ERR-2 ``location`` (``SEG^sequence^field``
    where one place is wrong), ERR-3 the HL7 Table 0357 code ``error`` (required in HL7 2.5),
    ERR-4 severity ``E``, ERR-8 ``text``.
    """
    if code not in {"AA", "AE", "AR"}:
        raise ValueError(f"acknowledgement code {code!r}")
    ans = answered or MshInfo()
    trigger = ans.trigger if re.fullmatch(r"[A-Z0-9]{3}", ans.trigger) else ""
    msh = _msh(
        sending=(application, facility),
        receiving=(ans.sending_application, ans.sending_facility),
        type_code=f"ACK^{trigger}^ACK" if trigger else "ACK",
        control_id=control_id,
        processing_id=ans.processing_id if ans.processing_id in {"P", "D", "T"} else "P",
        zone=timezone,
    )
    msa = Segment("MSA")
    msa[1] = code
    msa[2] = _control_id_er7(ans.control_id)
    if text:
        msa[3] = escape(text[:80])
    segments = [msh, msa]
    if code != "AA":
        err = Segment("ERR")
        if re.fullmatch(r"[A-Z][A-Z0-9]{2}(\^[0-9]+(\^[0-9]+)?)?", location):
            err[2] = location
        err[3] = f"{error}^{ERROR_CODES[error]}^HL70357"
        err[4] = "E"  # severity: error
        if text:
            err[8] = escape(text[:250])
        segments.append(err)
    return to_er7(segments)


@dataclass(frozen=True)
class AckInfo:
    code: str
    control_id: str
    text: str


#: Fields of a message the node sends that identify its patient or order: PID-3 (the
#: patient's identifiers), PID-5 (name), PID-7 (birth date), PID-18 (account number), PID-19
#: (SSN), ORC-2/3 and OBR-2/3 (placer and filler order numbers), OBR-18 (accession number).
_IDENTIFYING_FIELDS = {
    "PID": (3, 5, 7, 18, 19),
    "ORC": (2, 3),
    "OBR": (2, 3, 18),
}


def identifying_values(message: str) -> list[str]:
    """The values of ``message`` (ER7 the node built) that identify its patient or order, as a
    peer answering it might quote them: each identifier, the name whole (``DOE^JOHN``, ``DOE
    JOHN``) and its parts, the birth date as sent and as ``YYYY-MM-DD``. Values shorter than
    three characters are left out (they would match ordinary words and numbers)."""
    values: list[str] = []
    for segment in message.split("\r"):
        fields = segment.split("|")
        for n in _IDENTIFYING_FIELDS.get(fields[0], ()):
            if len(fields) <= n:
                continue
            for repetition in fields[n].split("~"):
                parts = [unescape(c.split("&")[0]).strip() for c in repetition.split("^")]
                if fields[0] == "PID" and n == 5:  # a name: whole, and each part
                    named = [p for p in parts if p]
                    values += [unescape(repetition).rstrip("^"), " ".join(named), *named]
                elif fields[0] == "PID" and n == 7:
                    day = parts[0][:8]
                    values += [parts[0], day]
                    if len(day) == 8 and day.isdigit():
                        values.append(f"{day[:4]}-{day[4:6]}-{day[6:]}")
                else:
                    values.append(parts[0])
    return list(dict.fromkeys(v for v in values if len(v) >= 3))


def parse_ack(text: str, limits: Limits = DEFAULT_LIMITS) -> AckInfo:
    """MSA-1, MSA-2 (ER7, as sent), MSA-3 of an acknowledgement. Raises :class:`Rejected`.

    It is read within the node's limits and in the RIS's delimiters, without hl7apy: an
    acknowledgement needs only its MSA, so one whose MSH-12 is empty or names a version hl7apy
    does not know (``2.9``) is read too, rather than taken for no answer and its message sent
    again."""
    msg = ParsedMessage(read_segments(text, limits))
    msa = msg.first("MSA")
    if msa is None:
        raise Rejected("reply has no MSA segment")
    code = _comp(_field(msa, 1), 1).upper()
    if code not in {"AA", "AE", "AR", "CA", "CE", "CR"}:
        raise Rejected(f"reply has an unknown acknowledgement code {code!r}")
    return AckInfo(code, _field(msa, 2), _comp(_field(msa, 3), 1))


# ----------------------------------------------------------------------------------- ORU
@dataclass(frozen=True)
class Lesion:
    """A lesion box the radiologist marked with the verdict, on one image."""

    sop_instance_uid: str
    frame_number: int | None  # a multi-frame image's frame (1-based); None for one frame
    box: tuple[int, int, int, int]  # first and last column and row it covers, inclusive


@dataclass(frozen=True)
class Verdict:
    """A radiologist's review of an AI result."""

    agrees: bool
    label: str  # the finding the radiologist settled on
    reviewer: str = ""  # XCN text (id^family^given), escaped by the builder per component
    comment: str = ""
    reviewed_at: dt.datetime | None = None
    lesions: tuple[Lesion, ...] = ()


@dataclass(frozen=True)
class OruStudy:
    """Everything an ``ORU^R01`` reports about one analysed study."""

    study_uid: str
    accession_number: str
    patient_id: str  # ER7 CX text (from the order) or a plain id (from DICOM, escaped)
    patient_name: str  # ER7 XPN text
    summary: dict[str, Any]
    birth_date: str = ""
    sex: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    observed_at: dt.datetime | None = None


def _obx(
    set_id: int,
    value_type: str,
    code: str,
    text: str,
    value: str,
    *,
    sub_id: str = "",
    status: str,
    units: str = "",
    method: str = "",
) -> Segment:
    obx = Segment("OBX")
    obx[1] = str(set_id)
    obx[2] = value_type
    obx[3] = f"{escape(code)}^{escape(text)}^{CODING_SYSTEM}"
    if sub_id:
        obx[4] = escape(sub_id)
    obx[5] = value
    if units:
        obx[6] = units
    obx[11] = status
    if method:
        obx[17] = method
    return obx


def _cwe(code: str, text: str, system: str = CODING_SYSTEM) -> str:
    return f"{escape(code)}^{escape(text)}^{system}"


def observations(study: OruStudy, verdict: Verdict | None) -> list[tuple[str, str, str, str, str]]:
    """(value type, code, text, sub-id, ER7 value) of every OBX, in order."""
    s = study.summary
    model = s.get("model", {})
    rows: list[tuple[str, str, str, str, str]] = []
    label = str(s.get("predicted_label", ""))
    rows.append(("CWE", "FINDING", "AI predicted finding", "", _cwe(label, label)))
    probs: dict[str, float] = s.get("probabilities", {})
    for name in s.get("labels", list(probs)):
        if name in probs:
            rows.append(("NM", "PROB", "AI probability", name, f"{float(probs[name]):.4f}"))
    unc = s.get("uncertainty", {})
    if "score" in unc:
        rows.append(("NM", "UNCERTAINTY", "AI uncertainty score", "", f"{unc['score']:.4f}"))
    if "ood_score" in s:
        rows.append(("NM", "OOD", "Out-of-distribution score", "", f"{s['ood_score']:.4f}"))
    review = bool(s.get("needs_review"))
    rows.append(
        (
            "CWE",
            "NEEDS_REVIEW",
            "Needs radiologist review",
            "",
            _cwe("Y", "Yes", "HL70136") if review else _cwe("N", "No", "HL70136"),
        )
    )
    rows.append(("ST", "ALGORITHM", "Algorithm name", "", escape(str(model.get("name", "")))))
    rows.append(
        ("ST", "ALGORITHM_VERSION", "Algorithm version", "", escape(str(model.get("version", ""))))
    )
    if verdict is not None:
        rows.append(
            (
                "CWE",
                "VERDICT",
                "Radiologist verdict",
                "",
                _cwe("AGREE", "Agrees with AI")
                if verdict.agrees
                else _cwe("DISAGREE", "Disagrees with AI"),
            )
        )
        rows.append(
            ("CWE", "FINAL_FINDING", "Radiologist finding", "", _cwe(verdict.label, verdict.label))
        )
        if verdict.comment:
            rows.append(("TX", "COMMENT", "Radiologist comment", "", escape(verdict.comment)))
        # each lesion box, its observations grouped by sub-id (1, 2, ...): the image, its
        # frame, and the box as a numeric array x0^y0^x1^y1 (pixels, inclusive)
        for n, lesion in enumerate(verdict.lesions, start=1):
            sub = str(n)
            rows.append(
                (
                    "ST",
                    "LESION_IMAGE",
                    "Radiologist lesion image",
                    sub,
                    escape(lesion.sop_instance_uid),
                )
            )
            if lesion.frame_number is not None:
                rows.append(
                    (
                        "NM",
                        "LESION_FRAME",
                        "Radiologist lesion frame",
                        sub,
                        str(lesion.frame_number),
                    )
                )
            rows.append(
                (
                    "NA",
                    "LESION_BOX",
                    "Radiologist lesion box (x0, y0, x1, y1 pixels)",
                    sub,
                    "^".join(str(int(v)) for v in lesion.box),
                )
            )
    return rows


def build_oru(
    study: OruStudy,
    verdict: Verdict | None = None,
    *,
    control_id: str,
    correction: bool = False,
    sending: tuple[str, str] = ("ACWI", "ACWI"),
    receiving: tuple[str, str] = ("RIS", ""),
    when: dt.datetime | None = None,
    withdrawn: str | None = None,
    timezone: str = "UTC",
) -> str:
    """An ``ORU^R01`` with the AI result of ``study`` (and the radiologist's ``verdict``).

    Result status (OBR-25, OBX-11) is ``P`` (preliminary: an unverified AI result) without a
    verdict, ``F`` with one, and ``C`` for a ``correction``: any result for a study whose final
    result the RIS already has (a second verdict, or a reprocessed study's new analysis), which
    a RIS takes as replacing the final one rather than refusing a preliminary after it. PID
    carries the patient identifiers as received (order, else DICOM header).

    ``withdrawn`` (the reason, in words) makes it the withdrawal of that AI result (the node
    sent the PACS a rejection note): OBR-25 ``C`` (a correction of what the RIS has), every
    OBX-11 ``W`` (the result posted before is wrong), and a ``WITHDRAWN`` observation with the
    reason.

    Every time (MSH-7, OBR-7, OBR-22, OBX-14) is on the hospital's clock ``timezone`` with its
    offset from UTC (:func:`timestamp`).
    """
    status = "C" if correction or withdrawn is not None else "F" if verdict is not None else "P"
    observation_status = "W" if withdrawn is not None else status
    msh = _msh(
        sending=sending,
        receiving=receiving,
        type_code="ORU^R01^ORU_R01",
        control_id=control_id,
        when=when,
        zone=timezone,
    )
    pid = Segment("PID")
    pid[1] = "1"
    pid[3] = study.patient_id
    pid[5] = study.patient_name
    pid[7] = escape(study.birth_date)
    pid[8] = escape(study.sex)
    orc = Segment("ORC")
    orc[1] = "RE"
    orc[2] = escape(study.placer_order_number)
    orc[3] = escape(study.filler_order_number)
    obr = Segment("OBR")
    obr[1] = "1"
    obr[2] = escape(study.placer_order_number)
    obr[3] = escape(study.filler_order_number)
    obr[4] = (
        f"{escape(study.procedure_code)}^{escape(study.procedure_text)}^L"
        if study.procedure_code
        else f"AI^AI analysis^{CODING_SYSTEM}"
    )
    obr[7] = timestamp(study.observed_at, timezone)
    obr[18] = escape(study.accession_number)
    obr[22] = timestamp(when, timezone)
    obr[24] = "RAD"
    obr[25] = status
    segments = [msh, pid, orc, obr]
    model = study.summary.get("model", {})
    method = _cwe(str(model.get("name", "")), f"AI model {model.get('version', '')}".strip())
    rows = observations(study, verdict)
    if withdrawn is not None:
        rows.insert(0, ("TX", "WITHDRAWN", "AI result withdrawn", "", escape(withdrawn)))
    for n, (vtype, code, text, sub_id, value) in enumerate(rows, start=1):
        obx = _obx(
            n,
            vtype,
            code,
            text,
            value,
            sub_id=sub_id,
            status=observation_status,
            method=method if code not in {"VERDICT", "FINAL_FINDING", "COMMENT"} else "",
        )
        if code in {"FINDING", "FINAL_FINDING"}:
            # OBX-8 (HL7 table 0078): A, a finding; N, normal: what a RIS highlights
            label = (
                verdict.label
                if code == "FINAL_FINDING" and verdict
                else str(study.summary.get("predicted_label", ""))
            )
            obx[8] = abnormal_flag(study.summary, label)
        if verdict is not None and code in {"VERDICT", "FINAL_FINDING"} and verdict.reviewer:
            obx[16] = "^".join(escape(p) for p in verdict.reviewer.split("^"))
        if code == "VERDICT" and verdict is not None and verdict.reviewed_at is not None:
            obx[14] = timestamp(verdict.reviewed_at, timezone)
        segments.append(obx)
    obx = Segment("OBX")
    obx[1] = str(len(rows) + 1)
    obx[2] = "ST"
    obx[3] = f"STUDY_UID^Study Instance UID^{CODING_SYSTEM}"
    obx[5] = escape(study.study_uid)
    obx[11] = observation_status
    segments.append(obx)
    return to_er7(segments)


def abnormal_flag(summary: dict[str, Any], label: str) -> str:
    """OBX-8 of a finding observation: ``A`` (abnormal) for one of the model's finding labels,
    ``N`` (normal) for another; for a summary written before it listed its finding labels,
    every label but one named "normal" is a finding."""
    if "finding_labels" in summary:
        findings = {str(x) for x in summary["finding_labels"]}
    else:
        findings = {str(x) for x in summary.get("labels") or [] if str(x).lower() != "normal"}
    return "A" if label in findings else "N"


def oru_observations(text: str) -> dict[str, list[tuple[str, str]]]:
    """OBX code -> [(sub-id, value)] of an ORU (for checks and tests), values unescaped."""
    out: dict[str, list[tuple[str, str]]] = {}
    for seg in parse(text).all("OBX"):
        code = _comp(_field(seg, 3), 1)
        sub = unescape(_field(seg, 4))
        out.setdefault(code, []).append((sub, unescape(_field(seg, 5))))
    return out
