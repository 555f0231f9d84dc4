"""HL7 v2 messages the node reads and writes, with hl7apy.

Read: order messages from the RIS (``ORM^O01``, ``OMI^O23``) into :class:`OrderInfo`.
Write: acknowledgements (``ACK`` with MSA-1 ``AA``/``AE``/``AR``) and results (``ORU^R01``, built by
:func:`build_oru` from an :class:`OruStudy` and, once a radiologist has reviewed it, a
:class:`Verdict`). Values are escaped with the HL7 escape sequences, so text such as a patient
name containing ``|`` or ``^`` or markup travels unchanged and never breaks the message structure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

HL7_VERSION = "2.5"
#: Local coding system of the node's observation identifiers (HL7 local codes start with 99).
CODING_SYSTEM = "99ACWI"
ORDER_TYPES = {"ORM^O01", "OMI^O23"}
STANDARD_ENCODING = {
    "FIELD": "|",
    "COMPONENT": "^",
    "REPETITION": "~",
    "ESCAPE": "\\",
    "SUBCOMPONENT": "&",
}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class HL7Error(Exception):
    """A message the node cannot take. ``code`` is the MSA-1 acknowledgement code to answer."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Rejected(HL7Error):
    """Malformed or unsupported: answered ``AR``."""

    def __init__(self, text: str) -> None:
        super().__init__("AR", text)


class ApplicationError(HL7Error):
    """Well-formed but unusable (e.g. no accession number): answered ``AE``."""

    def __init__(self, text: str) -> None:
        super().__init__("AE", text)


# ------------------------------------------------------------------------------ escaping
def escape(text: str, enc: dict[str, str] | None = None) -> str:
    """HL7 escape sequences for the delimiters in a value (``|`` -> ``\\F\\`` etc.)."""
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
    return out.replace("\r", f"{esc}X0D{esc}").replace("\n", f"{esc}X0A{esc}")


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
def decode(raw: bytes) -> str:
    """Message bytes as text: UTF-8 when valid, else Latin-1 (every byte maps to a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def normalise(text: str) -> str:
    """Segments separated by ``\\r`` (peers also send ``\\n`` or ``\\r\\n``); no empty lines."""
    lines = re.split(r"\r\n|\r|\n", text)
    return "\r".join(line for line in lines if line.strip())


@dataclass(frozen=True)
class MshInfo:
    """What an acknowledgement needs from the MSH of the message it answers."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = HL7_VERSION

    @property
    def type_code(self) -> str:
        return f"{self.message_type}^{self.trigger}" if self.trigger else self.message_type

    @property
    def sender(self) -> str:
        return f"{self.sending_application}|{self.sending_facility}"


def peek_msh(text: str) -> MshInfo | None:
    """Read MSH by plain splitting, for answering messages hl7apy cannot parse."""
    if not text.startswith("MSH") or len(text) < 8:
        return None
    sep = text[3]
    first = re.split(r"\r|\n", text, maxsplit=1)[0]
    fields = first.split(sep)
    enc = dict(STANDARD_ENCODING, FIELD=sep)
    if len(fields) > 1 and len(fields[1]) >= 1:
        enc["COMPONENT"] = fields[1][0]

    def get(n: int) -> str:  # MSH-n is fields[n - 1]: MSH-1 is the separator itself
        return fields[n - 1] if len(fields) > n - 1 else ""

    def first_comp(value: str) -> str:
        return unescape(value.split(enc["COMPONENT"])[0], enc)[:180]

    msg_type = get(9).split(enc["COMPONENT"])
    return MshInfo(
        sending_application=first_comp(get(3)),
        sending_facility=first_comp(get(4)),
        receiving_application=first_comp(get(5)),
        receiving_facility=first_comp(get(6)),
        message_type=unescape(msg_type[0], enc)[:3] if msg_type else "",
        trigger=unescape(msg_type[1], enc)[:3] if len(msg_type) > 1 else "",
        control_id=unescape(get(10), enc)[:199],
        processing_id=first_comp(get(11))[:1] or "P",
        version=first_comp(get(12))[:8] or HL7_VERSION,
    )


def parse(text: str) -> Message:
    """Parse ER7 text with hl7apy (tolerant validation). Raises :class:`Rejected`."""
    text = normalise(text)
    if not text.startswith("MSH"):
        raise Rejected("message does not start with an MSH segment")
    try:
        msg = parse_message(text, find_groups=False)
    except HL7apyException as exc:
        raise Rejected(f"malformed message: {exc}") from None
    except Exception as exc:  # hl7apy raises plain errors on some malformed input
        raise Rejected(f"malformed message: {type(exc).__name__}") from None
    return msg


def _segments(msg: Message, name: str) -> list[Any]:
    return [c for c in msg.children if c.name == name]


def _field(segment: Any, n: int) -> str:
    """Raw ER7 text of field ``n`` of a segment ('' when absent)."""
    if segment is None:
        return ""
    try:
        children = segment.children.get(f"{segment.name}_{n}")
    except Exception:
        return ""
    if not children:
        return ""
    try:
        return str(children[0].to_er7())
    except Exception:
        return ""


def _comp(er7: str, i: int, enc: dict[str, str]) -> str:
    """Component ``i`` (1-based) of the first repetition of a field, unescaped."""
    first = er7.split(enc["REPETITION"])[0]
    comps = first.split(enc["COMPONENT"])
    if len(comps) < i:
        return ""
    return unescape(comps[i - 1].split(enc["SUBCOMPONENT"])[0], enc).strip()


def msh_info(msg: Message) -> MshInfo:
    enc = msg.encoding_chars
    msh = msg.msh
    mtype = _field(msh, 9)
    return MshInfo(
        sending_application=_comp(_field(msh, 3), 1, enc)[:180],
        sending_facility=_comp(_field(msh, 4), 1, enc)[:180],
        receiving_application=_comp(_field(msh, 5), 1, enc)[:180],
        receiving_facility=_comp(_field(msh, 6), 1, enc)[:180],
        message_type=_comp(mtype, 1, enc)[:3],
        trigger=_comp(mtype, 2, enc)[:3],
        control_id=unescape(_field(msh, 10), enc).strip()[:199],
        processing_id=_comp(_field(msh, 11), 1, enc)[:1] or "P",
        version=_comp(_field(msh, 12), 1, enc)[:8] or HL7_VERSION,
    )


@dataclass(frozen=True)
class OrderInfo:
    """An imaging order as the RIS announced it. Patient fields are ER7-escaped XPN/CX text."""

    control: str  # ORC-1: NW new, XO change, CA cancel, ...
    accession_number: str
    placer_order_number: str
    filler_order_number: str
    patient_id: str  # PID-3 first repetition, ER7 (id^^^authority^type)
    patient_name: str  # PID-5 first repetition, ER7 (family^given^...)
    birth_date: str
    sex: str
    procedure_code: str
    procedure_text: str
    priority: str  # S = STAT, A = ASAP, R = routine
    study_uid: str | None
    expected_images: int | None

    @property
    def stat(self) -> bool:
        return self.priority == "S"


def _priority(msg: Message, enc: dict[str, str]) -> str:
    """Priority from TQ1-9, else ORC-7 (TQ: component 6), else OBR-27 (TQ: component 6)."""
    for seg_name, n, comp in (("TQ1", 9, 1), ("ORC", 7, 6), ("OBR", 27, 6)):
        for seg in _segments(msg, seg_name):
            value = _comp(_field(seg, n), comp, enc).upper()
            if value:
                return value[:2]
    return "R"


def _study_uid(msg: Message, enc: dict[str, str]) -> str | None:
    for seg_name, n in (("IPC", 3), ("ZDS", 1)):
        for seg in _segments(msg, seg_name):
            value = _comp(_field(seg, n), 1, enc)
            if value:
                if len(value) > 64 or not _UID_RE.match(value):
                    raise ApplicationError(f"{seg_name}-{n} is not a valid Study Instance UID")
                return value
    return None


def _expected_images(msg: Message, enc: dict[str, str]) -> int | None:
    """The number of images announced in ZDS-2 (a node extension; absent in most orders)."""
    for seg in _segments(msg, "ZDS"):
        value = _comp(_field(seg, 2), 1, enc)
        if value.isdigit() and 0 < int(value) < 1_000_000:
            return int(value)
    return None


def extract_order(msg: Message) -> OrderInfo:
    """The order an ``ORM^O01`` or ``OMI^O23`` carries. Raises :class:`HL7Error`."""
    enc = msg.encoding_chars
    info = msh_info(msg)
    if info.type_code not in ORDER_TYPES:
        raise Rejected(f"unsupported message type {info.type_code or '(none)'}")
    pid = next(iter(_segments(msg, "PID")), None)
    orc = next(iter(_segments(msg, "ORC")), None)
    obr = next(iter(_segments(msg, "OBR")), None)
    ipc = next(iter(_segments(msg, "IPC")), None)
    if orc is None:
        raise ApplicationError("no ORC segment")
    accession = _comp(_field(ipc, 1), 1, enc) if ipc is not None else ""
    if not accession and obr is not None:
        accession = _comp(_field(obr, 18), 1, enc)  # Placer Field 1 (IHE Scheduled Workflow)
    if not accession:
        raise ApplicationError("no accession number (IPC-1 or OBR-18)")
    if len(accession) > 64:
        raise ApplicationError("accession number longer than 64 characters")
    control = _comp(_field(orc, 1), 1, enc).upper()[:2] or "NW"
    placer = _comp(_field(orc, 2), 1, enc) or _comp(_field(obr, 2), 1, enc)
    filler = _comp(_field(orc, 3), 1, enc) or _comp(_field(obr, 3), 1, enc)
    procedure = _field(obr, 4)
    return OrderInfo(
        control=control,
        accession_number=accession,
        placer_order_number=placer[:64],
        filler_order_number=filler[:64],
        patient_id=_field(pid, 3).split(enc["REPETITION"])[0][:250],
        patient_name=_field(pid, 5).split(enc["REPETITION"])[0][:250],
        birth_date=_comp(_field(pid, 7), 1, enc)[:8],
        sex=_comp(_field(pid, 8), 1, enc)[:1],
        procedure_code=_comp(procedure, 1, enc)[:64],
        procedure_text=_comp(procedure, 2, enc)[:200],
        priority=_priority(msg, enc),
        study_uid=_study_uid(msg, enc),
        expected_images=_expected_images(msg, enc),
    )


# ------------------------------------------------------------------------------ building
def timestamp(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now()).strftime("%Y%m%d%H%M%S")


def _msh(
    msg: Message,
    *,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    type_code: str,
    control_id: str,
    processing_id: str = "P",
    when: dt.datetime | None = None,
) -> None:
    msh = msg.msh
    msh.msh_3 = escape(sending[0])
    msh.msh_4 = escape(sending[1])
    msh.msh_5 = escape(receiving[0])
    msh.msh_6 = escape(receiving[1])
    msh.msh_7 = timestamp(when)
    msh.msh_9 = type_code
    msh.msh_10 = escape(control_id)
    msh.msh_11 = processing_id or "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"


def build_ack(
    answered: MshInfo | None,
    code: str,
    text: str,
    *,
    control_id: str,
    application: str,
    facility: str,
) -> str:
    """An ``ACK`` (MSA-1 ``code``, MSA-2 the answered MSH-10, MSA-3 ``text``) as ER7 text.

    ``answered`` may be None when the message was too broken to read its MSH; MSA-2 is then empty.
    The acknowledgement never repeats the answered message's content beyond its MSH identifiers.
    """
    if code not in {"AA", "AE", "AR"}:
        raise ValueError(f"acknowledgement code {code!r}")
    ans = answered or MshInfo()
    msg = Message("ACK", version=HL7_VERSION)
    trigger = ans.trigger if re.fullmatch(r"[A-Z0-9]{3}", ans.trigger) else ""
    _msh(
        msg,
        sending=(application, facility),
        receiving=(ans.sending_application, ans.sending_facility),
        type_code=f"ACK^{trigger}^ACK" if trigger else "ACK",
        control_id=control_id,
        processing_id=ans.processing_id if ans.processing_id in {"P", "D", "T"} else "P",
    )
    msg.msa.msa_1 = code
    msg.msa.msa_2 = escape(ans.control_id)
    if text:
        msg.msa.msa_3 = escape(text[:80])
    if code != "AA":
        msg.add_segment("ERR")
        msg.err.err_4 = "E"  # severity: error
        if text:
            msg.err.err_8 = escape(text[:250])
    return str(msg.to_er7())


@dataclass(frozen=True)
class AckInfo:
    code: str
    control_id: str
    text: str


def parse_ack(text: str) -> AckInfo:
    """MSA-1, MSA-2, MSA-3 of an acknowledgement. Raises :class:`Rejected` when it is none."""
    msg = parse(text)
    enc = msg.encoding_chars
    msa = next(iter(_segments(msg, "MSA")), None)
    if msa is None:
        raise Rejected("reply has no MSA segment")
    code = _comp(_field(msa, 1), 1, enc).upper()
    if code not in {"AA", "AE", "AR", "CA", "CE", "CR"}:
        raise Rejected(f"reply has an unknown acknowledgement code {code!r}")
    return AckInfo(code, unescape(_field(msa, 2), enc), _comp(_field(msa, 3), 1, enc))


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
    msg_obx: Any,
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
) -> None:
    msg_obx.obx_1 = str(set_id)
    msg_obx.obx_2 = value_type
    msg_obx.obx_3 = f"{escape(code)}^{escape(text)}^{CODING_SYSTEM}"
    if sub_id:
        msg_obx.obx_4 = escape(sub_id)
    msg_obx.obx_5 = value
    if units:
        msg_obx.obx_6 = units
    msg_obx.obx_11 = status
    if method:
        msg_obx.obx_17 = method


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
    """
    status = "C" if correction or withdrawn is not None else "F" if verdict is not None else "P"
    observation_status = "W" if withdrawn is not None else status
    msg = Message("ORU_R01", version=HL7_VERSION)
    _msh(
        msg,
        sending=sending,
        receiving=receiving,
        type_code="ORU^R01^ORU_R01",
        control_id=control_id,
        when=when,
    )
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    if study.patient_id:
        pid.pid_3 = study.patient_id
    if study.patient_name:
        pid.pid_5 = study.patient_name
    if study.birth_date:
        pid.pid_7 = escape(study.birth_date)
    if study.sex:
        pid.pid_8 = escape(study.sex)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.orc.orc_1 = "RE"
    if study.placer_order_number:
        order.orc.orc_2 = escape(study.placer_order_number)
    if study.filler_order_number:
        order.orc.orc_3 = escape(study.filler_order_number)
    obr = order.obr
    obr.obr_1 = "1"
    if study.placer_order_number:
        obr.obr_2 = escape(study.placer_order_number)
    if study.filler_order_number:
        obr.obr_3 = escape(study.filler_order_number)
    obr.obr_4 = (
        f"{escape(study.procedure_code)}^{escape(study.procedure_text)}^L"
        if study.procedure_code
        else f"AI^AI analysis^{CODING_SYSTEM}"
    )
    obr.obr_7 = timestamp(study.observed_at)
    if study.accession_number:
        obr.obr_18 = escape(study.accession_number)
    obr.obr_22 = timestamp(when)
    obr.obr_24 = "RAD"
    obr.obr_25 = status
    model = study.summary.get("model", {})
    method = _cwe(str(model.get("name", "")), f"AI model {model.get('version', '')}".strip())
    rows = observations(study, verdict)
    if withdrawn is not None:
        rows.insert(0, ("TX", "WITHDRAWN", "AI result withdrawn", "", escape(withdrawn)))
    for n, (vtype, code, text, sub_id, value) in enumerate(rows, start=1):
        obs = order.add_group("ORU_R01_OBSERVATION")
        _obx(
            obs.obx,
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
            obs.obx.obx_8 = abnormal_flag(study.summary, label)
        if verdict is not None and code in {"VERDICT", "FINAL_FINDING"} and verdict.reviewer:
            obs.obx.obx_16 = "^".join(escape(p) for p in verdict.reviewer.split("^"))
        if code == "VERDICT" and verdict is not None and verdict.reviewed_at is not None:
            obs.obx.obx_14 = timestamp(verdict.reviewed_at)
    obs = order.add_group("ORU_R01_OBSERVATION")
    obs.obx.obx_1 = str(len(rows) + 1)
    obs.obx.obx_2 = "ST"
    obs.obx.obx_3 = f"STUDY_UID^Study Instance UID^{CODING_SYSTEM}"
    obs.obx.obx_5 = escape(study.study_uid)
    obs.obx.obx_11 = observation_status
    return str(msg.to_er7())


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
    msg = parse(text)
    enc = msg.encoding_chars
    out: dict[str, list[tuple[str, str]]] = {}
    for seg in _iter_segments(msg):
        if seg.name != "OBX":
            continue
        code = _comp(_field(seg, 3), 1, enc)
        sub = unescape(_field(seg, 4), enc)
        out.setdefault(code, []).append((sub, unescape(_field(seg, 5), enc)))
    return out


def _iter_segments(element: Any) -> Sequence[Any]:
    found: list[Any] = []
    for child in element.children:
        if getattr(child, "classname", "") == "Segment":
            found.append(child)
        elif getattr(child, "classname", "") == "Group":
            found.extend(_iter_segments(child))
    return found
