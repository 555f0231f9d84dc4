"""ER7, HL7 v2's text encoding: character sets, delimiters, escapes and the node's limits.

Inbound messages are read here before hl7apy sees them:

* :func:`decode_message` decodes the bytes in the character set MSH-18 declares (none declared:
  UTF-8 when valid, else Latin-1); bytes invalid in the declared set, or a set the node does not
  know, are refused.
* :func:`read_segments` checks the message against the node's limits (:class:`Limits`:
  ``[hl7]`` ``max_segments`` and the like, by default :data:`LIMITS`) by counting
  delimiters, without splitting anything larger than a limit allows, so that a hostile message
  is refused quickly and in little memory; then it re-encodes every field in the standard
  delimiters ``|^~\\&`` (a sender may declare others in MSH-1 and MSH-2), keeping the sender's
  escape sequences and escaping control characters as ``\\Xhh\\``.

Outbound messages are built with :class:`Segment`, which writes field values as given (callers
escape them), so escape sequences such as ``\\X0D\\`` travel unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from acwi_node.config import Hl7Settings

STANDARD_ENCODING = {
    "FIELD": "|",
    "COMPONENT": "^",
    "REPETITION": "~",
    "ESCAPE": "\\",
    "SUBCOMPONENT": "&",
}
STANDARD_MSH2 = "^~\\&"

#: At most this many segments in one message.
MAX_SEGMENTS = 500
#: At most this many bytes in one message (a batch: its whole frame).
MAX_MESSAGE_BYTES = 1_048_576
#: At most this many fields in one segment.
MAX_FIELDS = 100
#: At most this many repetitions of one field.
MAX_REPETITIONS = 100
#: At most this many components in one repetition of a field.
MAX_COMPONENTS = 64
#: At most this many subcomponents in one component.
MAX_SUBCOMPONENTS = 32
#: At most this many field, repetition, component and subcomponent separators in one message.
MAX_SEPARATORS = 5000
LIMITS = {
    "segments": MAX_SEGMENTS,
    "fields per segment": MAX_FIELDS,
    "repetitions per field": MAX_REPETITIONS,
    "components per repetition": MAX_COMPONENTS,
    "subcomponents per component": MAX_SUBCOMPONENTS,
    "separators per message": MAX_SEPARATORS,
}


@dataclass(frozen=True)
class Limits:
    """The limits a message is read within (``[hl7]`` ``max_message_bytes``, ``max_segments``,
    ``max_fields``, ``max_repetitions``, ``max_components``, ``max_subcomponents``,
    ``max_separators``); the defaults are :data:`LIMITS`."""

    message_bytes: int = MAX_MESSAGE_BYTES
    segments: int = MAX_SEGMENTS
    fields: int = MAX_FIELDS
    repetitions: int = MAX_REPETITIONS
    components: int = MAX_COMPONENTS
    subcomponents: int = MAX_SUBCOMPONENTS
    separators: int = MAX_SEPARATORS

    @classmethod
    def of(cls, hl7: Hl7Settings) -> Limits:
        """The limits ``[hl7]`` sets."""
        return cls(
            message_bytes=hl7.max_message_bytes,
            segments=hl7.max_segments,
            fields=hl7.max_fields,
            repetitions=hl7.max_repetitions,
            components=hl7.max_components,
            subcomponents=hl7.max_subcomponents,
            separators=hl7.max_separators,
        )


DEFAULT_LIMITS = Limits()

#: MSH-18 values (HL7 table 0211) the node decodes, and their Python codecs; with the
#: terms some senders use from DICOM's (ISO IR 6, 100, 192) and the IANA names many
#: interface engines write (``UTF-8``, ``ISO-8859-1``) for the same character sets.
CHARSETS = {
    "ASCII": "ascii",
    **{f"8859/{n}": f"iso8859_{n}" for n in range(1, 10)},
    "8859/15": "iso8859_15",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
    "ISO IR6": "ascii",
    "ISO IR100": "iso8859_1",
    "ISO IR192": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    **{f"ISO-8859-{n}": f"iso8859_{n}" for n in (*range(1, 10), 15)},
}


#: HL7 Table 0357 (Message Error Condition Codes): the codes the node answers in ERR-3.
ERROR_CODES = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "203": "Unsupported version id",
    "207": "Application internal error",
}


class HL7Error(Exception):
    """A message the node cannot take. ``code`` is the MSA-1 acknowledgement code to answer;
    ``error`` the HL7 Table 0357 code of ERR-3 (:data:`ERROR_CODES`); ``location`` ERR-2 as
    ER7 components (``SEG^sequence^field``), "" when no one place is wrong."""

    def __init__(self, code: str, text: str, *, error: str = "207", location: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.error = error
        self.location = location


class Rejected(HL7Error):
    """Malformed or unsupported: answered ``AR``."""

    def __init__(self, text: str, *, error: str = "102", location: str = "") -> None:
        super().__init__("AR", text, error=error, location=location)


class ApplicationError(HL7Error):
    """Well-formed but unusable (e.g. no accession number): answered ``AE``."""

    def __init__(self, text: str, *, error: str = "101", location: str = "") -> None:
        super().__init__("AE", text, error=error, location=location)


class LimitExceeded(Rejected):
    """Larger than one of the node's limits (:data:`LIMITS`): answered ``AR``, unparsed."""

    def __init__(self, text: str) -> None:
        super().__init__(text, error="207")


# ------------------------------------------------------------------------- character sets
#: The byte order mark some Windows interface engines put before a UTF-8 message's MSH.
UTF8_BOM = b"\xef\xbb\xbf"


def decode(raw: bytes) -> str:
    """Message bytes as text: UTF-8 when valid, else Latin-1 (every byte maps to a character);
    without a leading byte order mark."""
    raw = raw.removeprefix(UTF8_BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def declared_charset(raw: bytes) -> str:
    """MSH-18 (its first repetition) read from the bytes; '' when absent or unreadable."""
    end = min((i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0), default=len(raw))
    line = raw[:end]
    if not line.startswith(b"MSH") or len(line) < 5:
        return ""
    sep = line[3:4]
    if sep.isalnum() or sep.isspace():
        return ""
    fields = line.split(sep, 18)
    if len(fields) < 18:
        return ""
    rep = fields[1][1:2] or b"~"
    value = fields[17].split(rep)[0]
    return value.decode("latin-1").strip()


def decode_message(raw: bytes) -> str:
    """The message's text in the character set its MSH-18 declares (:data:`CHARSETS`).

    Without MSH-18: UTF-8 when valid, else Latin-1. Raises :class:`Rejected` for a character set
    the node does not know, or bytes that are not valid in the declared one.
    """
    raw = raw.removeprefix(UTF8_BOM)  # not part of MSH: the message was refused as no HL7
    declared = declared_charset(raw)
    if not declared:
        return decode(raw)
    codec = CHARSETS.get(" ".join(declared.upper().split()))
    if codec is None:
        raise Rejected(
            f"unsupported character set in MSH-18: {printable(declared, 20)}",
            error="103",
            location="MSH^1^18",
        )
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise Rejected(
            f"byte {exc.start + 1} is not valid in the character set {declared} (MSH-18)"
        ) from None


def printable(value: str, limit: int) -> str:
    """A value for an error text or the log: printable ASCII only, at most ``limit`` long."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in value[:limit])


# ---------------------------------------------------------------------------- delimiters
@dataclass(frozen=True)
class Encoding:
    """A message's delimiters (MSH-1 and MSH-2); escape and subcomponent may be absent."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def separators(self) -> str:
        return self.field + self.component + self.repetition + self.subcomponent


def _delimiter_ok(c: str) -> bool:
    return not (c.isalnum() or c.isspace() or ord(c) < 32 or ord(c) == 127)


def encoding_of(msh: str) -> Encoding:
    """The delimiters an MSH segment declares. Raises :class:`Rejected` when they are unusable."""
    if not msh.startswith("MSH") or len(msh) < 4:
        raise Rejected("message does not start with an MSH segment", error="100")
    field = msh[3]
    if not _delimiter_ok(field):
        raise Rejected("invalid field separator (MSH-1)", location="MSH^1^1")
    chars = msh[4:].split(field, 1)[0]
    # four characters (a fifth, the truncation character of HL7 2.7, is read as data)
    if len(chars) not in (4, 5) or len(set(chars + field)) != len(chars) + 1:
        raise Rejected("invalid encoding characters (MSH-2)", location="MSH^1^2")
    if not all(_delimiter_ok(c) for c in chars):
        raise Rejected("invalid encoding characters (MSH-2)", location="MSH^1^2")
    return Encoding(field, chars[0], chars[1], chars[2], chars[3])


#: The escape sequences HL7 defines (delimiters, highlighting, hex data, local, character set
#: switches and formatting), without their escape characters.
_SEQUENCE = (
    r"[FSTREHN]|X(?:[0-9A-Fa-f]{2})+|Z[0-9A-Za-z]*|C[0-9A-Fa-f]{4}"
    r"|M[0-9A-Fa-f]{4}(?:[0-9A-Fa-f]{2})?|\.[a-z]{2}[+-]?[0-9]*"
)
_LITERAL = {"|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\", "\\": "\\E\\"}


@functools.lru_cache(maxsize=16)
def _transcoder(enc: Encoding) -> tuple[re.Pattern[str], dict[int, str]]:
    """The sender's escape sequences, and the translation of every other character."""
    table = {chr(c): f"\\X{c:02X}\\" for c in (*range(32), 127)}
    table.update(_LITERAL)
    table[enc.escape] = "\\E\\"  # an escape character that starts no sequence is data
    table.update({enc.subcomponent: "&", enc.repetition: "~", enc.component: "^", enc.field: "|"})
    esc = re.escape(enc.escape)
    return re.compile(f"{esc}({_SEQUENCE}){esc}"), str.maketrans(table)


def transcode(text: str, enc: Encoding) -> str:
    """ER7 text in the sender's delimiters re-encoded in the standard ones.

    Delimiters become ``|^~&``; escape sequences are kept (with the standard escape character);
    characters that are standard delimiters but data in the sender's encoding are escaped
    (``^`` -> ``\\S\\``), and control characters become hex escapes (``\\X0D\\``).
    """
    pattern, table = _transcoder(enc)
    out: list[str] = []
    pos = 0
    for m in pattern.finditer(text):
        out.append(text[pos : m.start()].translate(table))
        out.append(f"\\{m.group(1)}\\")
        pos = m.end()
    out.append(text[pos:].translate(table))
    return "".join(out)


def er7_prefix(text: str, limit: int) -> str:
    """At most ``limit`` characters of escaped text, never ending inside an escape sequence."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if cut.count("\\") % 2:
        cut = cut[: cut.rfind("\\")]
    return cut


# ------------------------------------------------------------------------------ segments
_LINE = re.compile(r"[^\r\n]+")


def normalise(text: str) -> str:
    """Segments separated by ``\\r`` (peers also send ``\\n`` or ``\\r\\n``); no empty lines."""
    lines = (m.group() for m in _LINE.finditer(text))
    return "\r".join(line for line in lines if line.strip())


_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


def _check_limits(name: str, body: str, enc: Encoding, first: int, limits: Limits) -> int:
    """Raise :class:`LimitExceeded` if a segment is past a limit; its separator count.

    Only counts are taken before a split, so no split makes more parts than a limit allows.
    """
    if body.count(enc.field) >= limits.fields:
        raise LimitExceeded(f"{name} has more than {limits.fields} fields")
    for n, value in enumerate(body.split(enc.field), start=first):
        if value.count(enc.repetition) >= limits.repetitions:
            raise LimitExceeded(f"{name}-{n} has more than {limits.repetitions} repetitions")
        for rep in value.split(enc.repetition):
            if rep.count(enc.component) >= limits.components:
                raise LimitExceeded(f"{name}-{n} has more than {limits.components} components")
            for comp in rep.split(enc.component):
                if comp.count(enc.subcomponent) >= limits.subcomponents:
                    raise LimitExceeded(
                        f"{name}-{n} has more than {limits.subcomponents} subcomponents"
                    )
    return sum(body.count(c) for c in enc.separators)


def read_segments(text: str, limits: Limits = DEFAULT_LIMITS) -> list[list[str]]:
    """The segments of a message, each ``[name, field 1, field 2, ...]`` in standard ER7.

    For MSH, item ``n`` is MSH-``n`` too: ``["MSH", "|", "^~\\&", MSH-3, ...]``. Raises
    :class:`LimitExceeded` past one of ``limits`` (checked before any other work),
    :class:`Rejected` when the message is not HL7 ER7.
    """
    segments_seen = 0
    for found in _LINE.finditer(text):  # counted one at a time, before anything is split
        if found.group().strip():
            segments_seen += 1
            if segments_seen > limits.segments:
                raise LimitExceeded(f"more than {limits.segments} segments")
    text = normalise(text)
    if not text.startswith("MSH"):
        raise Rejected("message does not start with an MSH segment", error="100")
    enc = encoding_of(text)
    bodies: list[tuple[str, str | None]] = []
    separators = 0
    for index, line in enumerate(text.split("\r")):
        name = line[:3]
        if not _SEGMENT_ID.fullmatch(name) or (len(line) > 3 and line[3] != enc.field):
            raise Rejected(f"segment {index + 1} has no valid segment id", error="100")
        if name == "MSH" and index:
            raise Rejected(f"segment {index + 1} is a second MSH", error="100")
        body: str | None = None
        if index == 0:  # MSH: its fields from MSH-3 on (MSH-1 and MSH-2 are the delimiters)
            rest = line[4:].split(enc.field, 1)
            body = rest[1] if len(rest) > 1 else None
        elif len(line) > 3:
            body = line[4:]
        if body is not None:
            separators += _check_limits(name, body, enc, 3 if index == 0 else 1, limits)
        if separators > limits.separators:
            raise LimitExceeded(f"more than {limits.separators} separators")
        bodies.append((name, body))
    segments: list[list[str]] = []
    for index, (name, body) in enumerate(bodies):
        head = [name, "|", STANDARD_MSH2] if index == 0 else [name]
        segments.append(head + (transcode(body, enc).split("|") if body is not None else []))
    return segments


# ------------------------------------------------------------------------------ building
class Segment:
    """One outbound segment; ``seg[n] = value`` sets field ``n`` (ER7, already escaped)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._fields: dict[int, str] = {}

    def __setitem__(self, n: int, value: str) -> None:
        if self.name == "MSH" and n < 3:
            raise ValueError("MSH-1 and MSH-2 are the standard delimiters")
        self._fields[n] = value

    def __getitem__(self, n: int) -> str:
        return self._fields.get(n, "")

    def to_er7(self) -> str:
        last = max((n for n, v in self._fields.items() if v), default=0)
        first = 3 if self.name == "MSH" else 1
        values = [self._fields.get(n, "") for n in range(first, last + 1)]
        head = "MSH|" + STANDARD_MSH2 if self.name == "MSH" else self.name
        return "|".join([head, *values])


def to_er7(segments: Sequence[Segment]) -> str:
    return "\r".join(seg.to_er7() for seg in segments)


def cx_identifiers(field: str) -> list[tuple[str, str]]:
    """(CX-1 id, CX-4 assigning authority) of each repetition of a CX field kept as ER7
    (PID-3, MRG-1) that has an id, in order."""
    out = []
    for repetition in field.split("~"):
        comps = repetition.split("^")
        ident = comps[0].split("&")[0].strip()
        authority = comps[3].split("&")[0].strip() if len(comps) > 3 else ""
        if ident:
            out.append((ident, authority))
    return out
