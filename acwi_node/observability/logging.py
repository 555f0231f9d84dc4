"""Log set-up: text or JSON lines, study/job context, and no patient identifiers.

Every record carries the process kind (``scp``, ``worker``, ...) and, where the code runs inside
:func:`log_context`, the Study Instance UID and job id it works on (UIDs are not patient
identifiers in this project's policy). With ``observability.log_format = "json"`` each record is
one JSON object per line::

    {"time": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "acwi_node.worker",
     "message": "job 7: analysed 2 image(s)", "kind": "worker", "pid": 4242,
     "study_uid": "1.2.3", "job_id": 7}

Unless ``node.log_phi`` is on, :class:`PhiFilter` sits on the root handler, so it sees the
records of every library too. The node never logs datasets; the filter is the second line of
defence, applied to the message and to exception tracebacks:

* pydicom datasets, data elements and person names given as log arguments are replaced;
* patient-module attributes (group 0010) in dataset dumps and ``PatientName=...`` style text are
  redacted;
* the Patient Name (and its components of three or more characters) and Patient ID of every
  dataset the process received or read (:func:`note_identifiers`, called by the SCP, the MPPS
  SCP and the worker) are redacted wherever they appear as whole words, in any case, whatever
  code logged them. These values are held in memory only, for the most recent
  :data:`REMEMBERED_IDENTIFIERS` identifiers. In a traceback, the lines naming a frame of the
  installed code (the node's package, its libraries, the standard library) and showing its
  source are left alone: they hold code, never data, and a name part that is a common word
  ("Name", "Value") made them unreadable. Frames of any other file (a script, a test) are
  redacted like the rest.

Whatever ``node.log_phi`` says, :class:`EscapeFilter` then escapes every character that is not
printable (line breaks, ESC, other control and format characters) in the message and in the
exception messages of a traceback, as ``\n``, ``\x1b``, ``\u202e``: a value a peer sent (an
AE title, a UID) cannot start a line of its own that looks like another record, nor drive a
terminal. Exceptions a thread does not handle are logged through the same handler
(:func:`setup_logging`), not printed to standard error past these filters.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import re
import site
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Any, TypeAlias

from acwi_node.config import Settings

REDACTED = "[redacted]"

_study_uid: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "acwi_study_uid", default=None
)
_job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("acwi_job_id", default=None)
_in_context: contextvars.ContextVar[bool] = contextvars.ContextVar("acwi_in_context", default=False)
_process_kind = {"kind": "cli"}

# Patient-module attributes in pydicom's dataset dump: "(0010,0010) Patient's Name  PN: 'X^Y'".
_GROUP_0010_LINE = re.compile(r"\(0010,\s?[0-9A-Fa-f]{4}\)[^\r\n]*")
# Keyword or name followed by a value: "PatientName=X", "Patient's Name: X", "PatientID 'X'".
_PATIENT_KEYWORD = re.compile(
    r"(?P<key>\b(?:Patient(?:'s)?\s?(?:Name|ID|Birth\s?Date|Address|Telephone\s?Numbers|"
    r"Mother'?s?\s?Birth\s?Name)|OtherPatient(?:IDs|Names)|Patient\s?Birth\s?Name)\b)"
    r"(?P<sep>\s*(?:[:=]|PN:|LO:|DA:)?\s*)(?P<value>'[^'\r\n]*'|\"[^\"\r\n]*\"|[^\s,;)}\]]+)",
    re.IGNORECASE,
)


#: How many patient identifier values the filter remembers (most recent first out).
REMEMBERED_IDENTIFIERS = 4096


class _Identifiers:
    """Recently seen patient identifier values, and one regex matching any of them."""

    def __init__(self) -> None:
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        #: The patient (name and ID as received) whose values were added last: the instances
        #: of a study come one after another, and each would add the same values again.
        self._last_patient: tuple[str, ...] | None = None

    def added_last(self, patient: tuple[str, ...]) -> bool:
        """Whether ``patient``'s values were the last added (nothing to add again)."""
        return patient == self._last_patient

    def add(self, values: Iterable[str], *, patient: tuple[str, ...] | None = None) -> None:
        """Remember ``values``; ``patient``: the name and ID they were made of."""
        with self._lock:
            self._last_patient = patient
            changed = False
            for raw in values:
                value = raw.strip()
                if len(value) < 3:
                    continue
                key = value.casefold()
                if key in self._values:
                    self._values.move_to_end(key)
                    continue
                self._values[key] = None
                changed = True
                while len(self._values) > REMEMBERED_IDENTIFIERS:
                    self._values.popitem(last=False)
            if changed:
                self._pattern = None

    def redact(self, text: str) -> str:
        with self._lock:
            if not self._values:
                return text
            if self._pattern is None:
                longest_first = sorted(self._values, key=len, reverse=True)
                # Whole words only: a name part "One" must not turn "ConnectionError" into
                # "Connecti[redacted]rror". A letter or digit on either side means another word.
                self._pattern = re.compile(
                    r"(?<![^\W_])(?:"
                    + "|".join(re.escape(v) for v in longest_first)
                    + r")(?![^\W_])",
                    re.IGNORECASE,
                )
            pattern = self._pattern
        return pattern.sub(REDACTED, text)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None
            self._last_patient = None


_IDENTIFIERS = _Identifiers()


def note_identifiers(ds: Any) -> None:
    """Remember a dataset's Patient Name and Patient ID so that no log line can show them."""
    patient: list[str] = []
    for keyword in ("PatientName", "PatientID"):
        try:
            value = ds.get(keyword)
        except Exception:  # an undecodable value: nothing to remember
            value = None
        patient.append("" if value is None else str(value))
    name, patient_id = patient
    if _IDENTIFIERS.added_last((name, patient_id)):  # the instance before's patient
        return
    values: list[str] = []
    if name:
        values.append(name)
        parts = [p for p in re.split(r"[\^=]", name) if p.strip()]
        values.extend(parts)
        values.append(" ".join(p.strip() for p in parts))
        # pydicom formats a person name as "Given Family" in some places
        values.append(" ".join(p.strip() for p in reversed(parts[:2])))
    if patient_id:
        values.append(patient_id)
    _IDENTIFIERS.add(values, patient=(name, patient_id))


def forget_identifiers() -> None:
    """Forget every identifier :func:`note_identifiers` remembered (a process that starts
    over: a test)."""
    _IDENTIFIERS.clear()


@contextmanager
def log_context(*, study_uid: str | None = None, job_id: int | None = None) -> Iterator[None]:
    """Records logged inside this block carry ``study_uid`` and ``job_id`` (when given)."""
    # Both are always set, so leaving the block also undoes a bind_study() made inside it.
    study_token = _study_uid.set(study_uid if study_uid is not None else _study_uid.get())
    job_token = _job_id.set(int(job_id) if job_id is not None else _job_id.get())
    inside_token = _in_context.set(True)
    try:
        yield
    finally:
        _in_context.reset(inside_token)
        _job_id.reset(job_token)
        _study_uid.reset(study_token)


def bind_study(study_uid: str) -> None:
    """Attach a Study Instance UID to the enclosing :func:`log_context` (undone when it ends).

    Outside any log context this does nothing, so it never leaks into unrelated records.
    """
    if _in_context.get():
        _study_uid.set(study_uid)


def redact_text(text: str) -> str:
    """``text`` with patient-module dump lines, ``PatientName=...`` values and every noted
    identifier (:func:`note_identifiers`) redacted."""
    # Keywords first: a remembered name part can be a word like "Patient", and redacting it
    # first would hide the "Patient's Name:" that marks the value to redact.
    text = _GROUP_0010_LINE.sub(lambda m: m.group(0)[:11] + " " + REDACTED, text)
    text = _PATIENT_KEYWORD.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}", text)
    return _IDENTIFIERS.redact(text)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped_char(char: str) -> str:
    if char.isprintable():
        return char
    special = _ESCAPES.get(char)
    if special is not None:
        return special
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every character that is not printable escaped (``\\n``, ``\\x1b``,
    ``\\u2028`` ...); backslashes and printable non-ASCII letters stay as they are.
    ``keep_newlines``: line feeds stay (a traceback's lines)."""
    if text.isprintable():
        return text
    if keep_newlines:
        return "\n".join(escape_text(line) for line in text.split("\n"))
    return "".join(_escaped_char(char) for char in text)


def _escape_inside(chunk: str) -> str:
    """``chunk`` escaped, but for the line breaks that begin and end it."""
    body = chunk.strip("\n")
    if not body:
        return chunk
    start = chunk.index(body)
    return chunk[:start] + escape_text(body) + chunk[start + len(body) :]


ExcInfo: TypeAlias = (
    "tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]"
)


_code_roots: tuple[str, ...] | None = None


def _installed_code_roots() -> tuple[str, ...]:
    """The folders of the code the node runs: its package, the installed libraries and
    Python's standard library (not the working directory, scripts or tests)."""
    global _code_roots
    if _code_roots is None:
        import sysconfig

        import acwi_node

        folders = {os.path.dirname(os.path.abspath(acwi_node.__file__))}
        paths = sysconfig.get_paths()
        folders.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
        with contextlib.suppress(AttributeError):  # not in every virtual environment's site
            folders.update(site.getsitepackages())
        _code_roots = tuple(os.path.join(os.path.abspath(f), "") for f in folders if f)
    return _code_roots


def _code_frames(stack: traceback.StackSummary) -> set[str]:
    """The formatted frames of ``stack`` whose file is installed code (see
    :func:`_installed_code_roots`): their lines (file, line, function, source) hold no data."""
    format_frame = getattr(stack, "format_frame_summary", None)  # Python 3.11
    if format_frame is None:
        return set()
    roots = _installed_code_roots()
    return {
        format_frame(frame) for frame in stack if os.path.abspath(frame.filename).startswith(roots)
    }


def format_exception(exc_info: ExcInfo, transform: Callable[[str], str] | None = None) -> str:
    """An exception's traceback as :class:`logging.Formatter` writes it, but every exception
    message (and note) on one line, its characters that are not printable escaped, and
    ``transform`` (redaction) applied to all but the frames of installed code (file, line,
    function and source code of the node's package, its libraries, the standard library:
    code, not data)."""
    try:
        formatted = traceback.TracebackException(*exc_info, compact=True)
        frames: set[str] = set()  # every frame's lines (their line breaks are the format's)
        code: set[str] = set()  # those of installed code
        pending, seen = [formatted], set()
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            frames.update(current.stack.format())
            code.update(_code_frames(current.stack))
            pending += [e for e in (current.__cause__, current.__context__) if e is not None]
            pending += getattr(current, "exceptions", None) or []
        out = []
        for chunk in formatted.format():
            is_frame = chunk in frames
            if transform is not None and chunk not in code:
                chunk = transform(chunk)
            if is_frame:
                out.append(escape_text(chunk, keep_newlines=True))
            else:  # an exception's message (or the words between chained exceptions)
                out.append(_escape_inside(chunk))
        text = "".join(out)
    except Exception:  # anything odd: the standard formatting, every line escaped
        text = logging.Formatter().formatException(exc_info)
        text = transform(text) if transform else text
        text = escape_text(text, keep_newlines=True)
    return text[:-1] if text.endswith("\n") else text


def _is_dicom_object(value: object) -> bool:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.valuerep import PersonName

    return isinstance(value, (Dataset, DataElement, PersonName))


class ContextFilter(logging.Filter):
    """Adds ``kind``, ``study_uid`` and ``job_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.kind = _process_kind["kind"]
        if not hasattr(record, "study_uid"):
            record.study_uid = _study_uid.get()
        if not hasattr(record, "job_id"):
            record.job_id = _job_id.get()
        return True


class _RewritingFilter(logging.Filter):
    """Rewrites a record's message (its arguments merged in), its traceback and its stack with
    :meth:`rewrite` (a traceback formatted here by :meth:`traceback`); a subclass says how."""

    def rewrite(self, text: str, *, lines: bool = False) -> str:
        """``text`` rewritten; ``lines``: a traceback or a stack, its line breaks kept."""
        return text

    def traceback(self, exc_info: ExcInfo) -> str:
        """A traceback formatted here (each exception's message on one line, escaped)."""
        return format_exception(exc_info)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: let the handler report it as logging does
            return True
        record.msg = self.rewrite(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.traceback(record.exc_info)
        elif record.exc_text:  # formatted before it came here: all of it
            record.exc_text = self.rewrite(record.exc_text, lines=True)
        if record.stack_info:
            record.stack_info = self.rewrite(record.stack_info, lines=True)
        return True


class PhiFilter(_RewritingFilter):
    """Keeps patient identifiers out of log records (see the module's documentation)."""

    def rewrite(self, text: str, *, lines: bool = False) -> str:
        return redact_text(text)

    def traceback(self, exc_info: ExcInfo) -> str:
        return format_exception(exc_info, redact_text)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(
                f"<{type(a).__name__}: {REDACTED}>" if _is_dicom_object(a) else a for a in args
            )
        elif isinstance(args, dict):
            record.args = {
                k: (f"<{type(v).__name__}: {REDACTED}>" if _is_dicom_object(v) else v)
                for k, v in args.items()
            }
        if _is_dicom_object(record.msg):
            record.msg = f"<{type(record.msg).__name__}: {REDACTED}>"
        return super().filter(record)


class EscapeFilter(_RewritingFilter):
    """Escapes the characters that are not printable in a record's message and in its
    traceback's exception messages (see the module's documentation); one record, one line
    (and its traceback's)."""

    def rewrite(self, text: str, *, lines: bool = False) -> str:
        return escape_text(text, keep_newlines=lines)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, kind, pid, study_uid, job_id."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc)
        out: dict[str, Any] = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "kind": getattr(record, "kind", _process_kind["kind"]),
            "pid": record.process,
        }
        study_uid = getattr(record, "study_uid", None)
        if study_uid:
            out["study_uid"] = study_uid
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            out["job_id"] = job_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with ``study=`` and ``job=`` appended when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(kind)s %(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = []
        study_uid = getattr(record, "study_uid", None)
        job_id = getattr(record, "job_id", None)
        if study_uid:
            extra.append(f"study={study_uid}")
        if job_id is not None:
            extra.append(f"job={job_id}")
        if not extra:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} ({' '.join(extra)}){sep}{tail}"


#: What pynetdicom logs at ERROR when an association the node requests (export/scu.py: results
#: to a destination, ``destinations check``) cannot be made or is cut off. The node's own line
#: names the destination and the reason; these would repeat it, three or four lines an attempt
#: while a PACS is down. Kept at ``node.log_level = "DEBUG"``.
_REQUESTOR_ERRORS: dict[str, tuple[str, ...]] = {
    "pynetdicom.transport": ("Association request failed", "TCP Initialisation Error"),
    "pynetdicom.acse": (
        "Association Rejected",
        "Result: ",
        "Reason: ",
        "ACSE timeout reached",
        "Association Aborted",
    ),
}


class RepeatedRequestorErrors(logging.Filter):
    """Drops pynetdicom's :data:`_REQUESTOR_ERRORS` lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefixes = _REQUESTOR_ERRORS.get(record.name)
        if prefixes is None or record.levelno < logging.ERROR:
            return True
        return not str(record.msg).startswith(prefixes)


def make_handler(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with the configured format, the context filter, (by default) the
    patient-identifier filter, and (but at DEBUG) the filter of pynetdicom's lines that repeat
    the node's own about a destination."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.node.log_level != "DEBUG":
        handler.addFilter(RepeatedRequestorErrors())
    if not settings.node.log_phi:
        handler.addFilter(PhiFilter())
    handler.addFilter(EscapeFilter())  # after the redaction, which reads the text as logged
    if settings.observability.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    return handler


def setup_logging(settings: Settings, kind: str = "cli", stream: IO[str] | None = None) -> None:
    """Configure the root logger for one process kind (replaces earlier handlers)."""
    _process_kind["kind"] = kind
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(make_handler(settings, stream))
    root.setLevel(settings.node.log_level)
    threading.excepthook = log_thread_exception
    # pynetdicom logs dataset contents at DEBUG and association chatter at INFO.
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if settings.node.log_phi else logging.WARNING
    )


def log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: an exception a thread did not handle, logged through the
    root handler and its filters rather than printed to standard error past them."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    exc_info: ExcInfo = (
        (args.exc_type, args.exc_value, args.exc_traceback)
        if args.exc_value is not None
        else (None, None, None)
    )
    logging.getLogger("acwi_node").error("unhandled exception in %s", name, exc_info=exc_info)


#: How often a background loop that keeps failing logs a line (its first failure logs the
#: traceback).
LOOP_FAILURE_LOG_S = 60.0
#: The shortest wait before a failed pass of a background loop is tried again: a loop that
#: polls every 0.1 s would otherwise open ten connections a second to a database that is down.
LOOP_FAILURE_RETRY_S = 1.0


def failure_summary(exc: BaseException | None) -> str:
    """The exception's type and first line (a SQL error's statement and parameters follow on
    lines of their own, and are left out)."""
    if exc is None:
        return "unknown error"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


class LoopFailures:
    """The log of a background loop's failed passes (a ledger that is down, a full disk).

    The first failure after a pass that worked is logged with its traceback; while the passes
    keep failing, one line at most every ``log_every_s`` with the count of failed passes and
    the last error; and one line once a pass works again. An outage of the database logs three
    lines, not a traceback for every pass (ten a second for the completion loop)::

        failures = LoopFailures(log, "completion pass")
        while not stop.is_set():
            try:
                tick()
            except Exception:
                failures.failed()
            else:
                failures.worked()
            stop.wait(failures.wait_s(poll_interval_s))
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        log_every_s: float = LOOP_FAILURE_LOG_S,
        retry_s: float = LOOP_FAILURE_RETRY_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.log = logger
        self.what = what
        self.log_every_s = log_every_s
        self.retry_s = retry_s
        self.clock = clock or time.monotonic
        #: Failed passes since the last one that worked.
        self.failures = 0
        self._last = ""
        self._logged_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self) -> None:
        """Call in the ``except`` block of a failed pass."""
        self._last = failure_summary(sys.exc_info()[1])
        self.failures += 1
        now = self.clock()
        if self.failures == 1:
            self.log.exception("%s failed; retrying", self.what)
            self._logged_at = now
        elif now - self._logged_at >= self.log_every_s:
            self.log.error(
                "%s still failing after %d tries (%s); retrying",
                self.what,
                self.failures,
                self._last,
            )
            self._logged_at = now

    def worked(self) -> None:
        """Call after a pass that worked."""
        if self.failures:
            self.log.warning(
                "%s works again after %d failed tries (%s)", self.what, self.failures, self._last
            )
            self.failures = 0

    def wait_s(self, poll_interval_s: float) -> float:
        """How long the loop waits before its next pass: its interval, or while it fails at
        least :attr:`retry_s`."""
        return max(poll_interval_s, self.retry_s) if self.failures else poll_interval_s
