"""C-STORE SCU used by the exporter to deliver result objects to a DICOM destination.

The public entry points never raise for network problems: :func:`send_files`
returns a :class:`SendReport` that says what happened to the association and to
every file, and :func:`echo` returns ``False`` when the peer cannot be verified.

Log messages carry SOP Class names, DIMSE statuses and counts only -- never
patient names, identifiers or file paths (paths of result files can embed UIDs
or accession numbers).
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context

from acwi_node.ingest.reactor import EventDrivenRequestorAE

__all__ = [
    "DELIVERED_WARNING_STATUSES",
    "MAX_PRESENTATION_CONTEXTS",
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "CommitmentRequestResult",
    "EchoResult",
    "FileOutcome",
    "SendReport",
    "TlsArgs",
    "echo",
    "end_association",
    "open_association",
    "request_commitment",
    "send_files",
    "verify",
]

logger = logging.getLogger(__name__)

#: DICOM TLS for an association: the client SSL context and the host name to verify.
TlsArgs = tuple[ssl.SSLContext, str]

#: The association negotiation allows at most 128 presentation contexts (PS3.8 9.3.2.2).
MAX_PRESENTATION_CONTEXTS = 128

#: C-STORE warning statuses after which the peer has stored the object (PS3.4 B.2.3).
DELIVERED_WARNING_STATUSES: dict[int, str] = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP Class",
}

_VERIFICATION = UID("1.2.840.10008.1.1")
#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3).
STORAGE_COMMITMENT_PUSH_MODEL = UID("1.2.840.10008.1.20.1")
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
#: N-ACTION Action Type ID: Request Storage Commitment (PS3.4 J.3.2.1).
REQUEST_STORAGE_COMMITMENT = 1
_UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file.

    ``status`` is the DIMSE status returned by the peer, or ``None`` when no
    C-STORE response was received (file unreadable, not sent, association lost).
    ``delivered`` is true for success (0x0000) and for the warning statuses in
    :data:`DELIVERED_WARNING_STATUSES`; ``detail`` explains the outcome in clear text.
    """

    status: int | None
    delivered: bool
    detail: str
    #: The file could not be read (nothing the destination did).
    unreadable: bool = False
    #: Not delivered because the destination could not be reached: it went away in the
    #: middle of the transfer (the association was lost, and a new one could not reach it),
    #: before this file's C-STORE response or before its turn. An outage, not the file's
    #: fault; :attr:`SendReport.unreachable` says the same of every file at once.
    unreachable: bool = False


class AssociationFailure(str):
    """Why an association was not established (:func:`open_association`'s message), and
    whether it is an **outage**: the peer could not be reached (no connection, no answer to
    the request, a name that does not resolve), it closed the connection during negotiation,
    or it rejected the association as transient. A permanent rejection, no accepted context or
    a TLS handshake the peer refused (:func:`tls_refused`) is an answer: the configuration, not
    the peer's availability, is at fault."""

    outage: bool

    def __new__(cls, message: str, *, outage: bool) -> AssociationFailure:
        failure = super().__new__(cls, message)
        failure.outage = outage
        return failure


@dataclass
class SendReport:
    """Result of one :func:`send_files` call.

    ``association_ok`` is true when the association was established.  ``error``
    describes an association-level problem (connection refused, rejection with
    result/source/reason, abort, timeout); it is ``None`` when the association
    was established and released normally.  ``outcomes`` has one entry per
    distinct input path, in input order.  When no file is readable (or none
    was given) no association is attempted and ``association_ok`` is false.
    """

    association_ok: bool
    error: str | None = None
    outcomes: dict[Path, FileOutcome] = field(default_factory=dict)
    #: Nothing was answered because the destination could not be reached (an outage:
    #: :class:`AssociationFailure`; for DICOMweb, no HTTP answer at all).
    unreachable: bool = False
    #: Associations the files went over (0 when none was established).
    associations: int = 0
    #: The files not sent because the send was stopped before their turn (``stop``): no
    #: attempt was made (their outcomes say "not sent").
    withheld: set[Path] = field(default_factory=set)

    @property
    def all_delivered(self) -> bool:
        """True when every file was delivered (vacuously true for no files)."""
        return all(outcome.delivered for outcome in self.outcomes.values())

    @property
    def delivered_count(self) -> int:
        """Number of files that count as delivered."""
        return sum(1 for outcome in self.outcomes.values() if outcome.delivered)


@dataclass(frozen=True)
class _FileInfo:
    sop_class: UID
    transfer_syntax: UID


def _sop_class_name(uid: UID | str) -> str:
    uid = UID(str(uid))
    return uid.name if uid.is_valid else "invalid SOP Class UID"


def _read_file_info(path: Path) -> _FileInfo:
    """Read the SOP Class and Transfer Syntax of a Part-10 file: from its file meta information
    when that names the SOP Class and Instance and the Transfer Syntax (reading no further:
    a 100-slice CT's SR has some 9,400 content items), else from its data set (no pixel data).
    """
    file_meta: Dataset
    try:
        file_meta = read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not a Part 10 file: the full read below says why
        file_meta = Dataset()
    sop_class = file_meta.get("MediaStorageSOPClassUID")
    syntax = file_meta.get("TransferSyntaxUID")
    if sop_class and syntax and file_meta.get("MediaStorageSOPInstanceUID"):
        return _FileInfo(sop_class=UID(str(sop_class)), transfer_syntax=UID(str(syntax)))
    ds = dcmread(path, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if transfer_syntax is None:
        raise ValueError("no (0002,0010) Transfer Syntax UID in the file meta information")
    sop_class = ds.get("SOPClassUID") or (
        getattr(meta, "MediaStorageSOPClassUID", None) if meta is not None else None
    )
    if not sop_class:
        raise ValueError("no SOP Class UID in the data set or file meta information")
    if "SOPInstanceUID" not in ds:
        raise ValueError("no SOP Instance UID in the data set")
    return _FileInfo(sop_class=UID(str(sop_class)), transfer_syntax=UID(str(transfer_syntax)))


def _plan_contexts(
    infos: dict[Path, _FileInfo],
) -> tuple[list[PresentationContext], set[tuple[UID, UID]]]:
    """Build the presentation contexts to propose and the (class, syntax) pairs they cover.

    Every SOP Class gets one context offering explicit and implicit VR little
    endian (plus big endian when a file uses it).  A file in any other transfer
    syntax (compressed, deflated) gets a separate context offering only that
    syntax, so that the acceptor cannot pick an uncompressed syntax the file is
    not in.  Uncompressed contexts take priority when the 128-context limit is
    reached.
    """
    classes: dict[UID, list[UID]] = {}
    for info in infos.values():
        syntaxes = classes.setdefault(info.sop_class, [])
        if info.transfer_syntax not in syntaxes:
            syntaxes.append(info.transfer_syntax)

    native: list[PresentationContext] = []
    encapsulated: list[PresentationContext] = []
    covered_native: list[tuple[UID, list[str | UID]]] = []
    covered_other: list[tuple[UID, UID]] = []
    for sop_class, syntaxes in classes.items():
        offered: list[str | UID] = list(_UNCOMPRESSED)
        if ExplicitVRBigEndian in syntaxes:
            offered.append(ExplicitVRBigEndian)
        native.append(build_context(sop_class, offered))
        covered_native.append((sop_class, offered))
        for syntax in syntaxes:
            if syntax not in _NATIVE_SYNTAXES:
                encapsulated.append(build_context(sop_class, [syntax]))
                covered_other.append((sop_class, syntax))

    contexts: list[PresentationContext] = []
    covered: set[tuple[UID, UID]] = set()
    for cx, (sop_class, offered) in zip(native, covered_native, strict=True):
        if len(contexts) >= MAX_PRESENTATION_CONTEXTS:
            break
        contexts.append(cx)
        covered.update((sop_class, UID(str(syntax))) for syntax in offered)
    for cx, pair in zip(encapsulated, covered_other, strict=True):
        if len(contexts) >= MAX_PRESENTATION_CONTEXTS:
            break
        contexts.append(cx)
        covered.add(pair)
    return contexts, covered


def _make_ae(calling_ae: str, timeout_s: float, max_pdu: int) -> AE:
    ae = EventDrivenRequestorAE(ae_title=calling_ae)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    return ae


def _probe_connection(host: str, port: int, timeout_s: float) -> str:
    """Explain why a TCP connection to ``host:port`` fails (called only after a failure)."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 5.0)):
            return f"TCP connection to {host}:{port} failed"
    except ConnectionRefusedError:
        return f"connection refused by {host}:{port}"
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r}: {exc.strerror or exc}"
    except TimeoutError:
        return f"connection to {host}:{port} timed out"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def tls_refused(exc: BaseException) -> bool:
    """Whether a TLS error is an answer: the peer's certificate is not trusted or names
    another host, the peer sent an alert (no client certificate, no protocol in common), it
    does not speak TLS. The configuration is at fault, not the peer's availability, so it is
    no outage; a connection closed in the middle of the handshake may be one."""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
    )


def _probe_tls(host: str, port: int, tls: TlsArgs, timeout_s: float) -> tuple[str, bool] | None:
    """Why a TLS session with ``host:port`` fails, and whether the peer refused it
    (:func:`tls_refused`), or None when it works (after a failure).

    With TLS 1.3 the server checks the client's certificate after the client has finished its
    handshake, so a refused client certificate shows only as an alert on the first read.
    """
    context, server_name = tls
    try:
        raw = socket.create_connection((host, port), timeout=min(timeout_s, 5.0))
        with raw, context.wrap_socket(raw, server_hostname=server_name) as sock:
            sock.settimeout(1.0)
            try:
                sock.recv(1)
            except TimeoutError:
                return None
            return None
    except ssl.SSLCertVerificationError as exc:
        message = f"TLS: the certificate of {host}:{port} is not trusted: {exc.verify_message}"
        return message, True
    except ssl.SSLError as exc:
        return f"TLS handshake with {host}:{port} failed: {exc.reason or exc}", tls_refused(exc)
    except OSError:
        return None


def unread_answer(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's answer to the association request that the association's DUL received and
    its thread did not read. pynetdicom's requestor waits for the connection to be made, then
    takes a connection already closed for one never made and aborts; the DUL, meanwhile, may
    have sent the request, received the peer's A-ASSOCIATE-RJ and closed the connection, as
    the rejection requires. Under load one rejection in a few hundred was reported as an
    abort ("peer closed the connection"): the peer's reasons are in this answer."""
    for item in list(assoc.dul.to_user_queue.queue):
        if isinstance(item, A_ASSOCIATE) and item.result is not None:
            return item
    return None


def _association_error(
    assoc: Association,
    *,
    connected: bool,
    elapsed_s: float,
    host: str,
    port: int,
    called_ae: str,
    timeout_s: float,
    tls: TlsArgs | None = None,
) -> AssociationFailure:
    """Describe in clear text why an association was not established, and whether it is an
    outage (:class:`AssociationFailure`)."""
    tls_problem = _probe_tls(host, port, tls, timeout_s) if tls is not None else None
    if tls_problem is not None:
        message, refused = tls_problem
        return AssociationFailure(message, outage=not (refused or connected))
    if not connected:
        if elapsed_s >= 0.95 * timeout_s:
            message = f"connection to {host}:{port} timed out after {timeout_s:g} s"
        else:
            message = _probe_connection(host, port, timeout_s)
        return AssociationFailure(message, outage=True)
    primitive = assoc.acceptor.primitive or unread_answer(assoc)
    if primitive is not None and primitive.result in (0x01, 0x02):
        return AssociationFailure(
            f"association rejected by {called_ae}@{host}:{port}: "
            f"result={primitive.result_str} ({primitive.result}), "
            f"source={primitive.source_str} ({primitive.result_source}), "
            f"reason={primitive.reason_str} ({primitive.diagnostic})",
            outage=primitive.result == 0x02,  # rejected (transient): busy, starting up
        )
    if primitive is not None and primitive.result == 0x00 and not assoc.accepted_contexts:
        return AssociationFailure(
            f"association aborted: {called_ae}@{host}:{port} accepted none of the "
            f"{len(assoc.rejected_contexts)} proposed presentation contexts",
            outage=False,
        )
    if primitive is None and elapsed_s >= 0.95 * timeout_s:
        return AssociationFailure(
            f"association request to {called_ae}@{host}:{port} timed out: "
            f"no response within {timeout_s:g} s",
            outage=True,
        )
    return AssociationFailure(
        f"association aborted by {called_ae}@{host}:{port} during negotiation "
        "(peer closed the connection or is not a DICOM application)",
        outage=True,
    )


def _status_outcome(status_ds: Dataset) -> FileOutcome:
    status = int(status_ds.Status)
    comment = status_ds.get("ErrorComment")
    suffix = f" ({comment})" if comment else ""
    if status == 0x0000:
        return FileOutcome(status=status, delivered=True, detail="stored")
    if status in DELIVERED_WARNING_STATUSES:
        note = DELIVERED_WARNING_STATUSES[status]
        return FileOutcome(
            status=status,
            delivered=True,
            detail=f"stored with warning 0x{status:04X}: {note}{suffix}",
        )
    return FileOutcome(
        status=status, delivered=False, detail=f"refused with status 0x{status:04X}{suffix}"
    )


def open_association(
    calling_ae: str,
    called_ae: str,
    host: str,
    port: int,
    *,
    timeout_s: float,
    max_pdu: int,
    tls: TlsArgs | None,
    contexts: list[PresentationContext] | None = None,
    handlers: list[tuple[evt.EventType, Callable[[evt.Event], Any]]] | None = None,
    ext_neg: list[Any] | None = None,
) -> tuple[Association | None, str]:
    """Request an association proposing ``contexts`` (None: Verification only), with
    ``handlers`` bound and the extended negotiation items ``ext_neg`` (SCP/SCU role
    selection); returns it established, or None and why not in clear text (never raises)."""
    connected = False

    def on_open(event: evt.Event) -> None:
        nonlocal connected
        connected = True

    started = time.monotonic()
    try:
        ae = _make_ae(calling_ae, timeout_s, max_pdu)
        if contexts is None:
            ae.add_requested_context(_VERIFICATION)
        assoc = ae.associate(
            host,
            port,
            contexts=contexts,
            ae_title=called_ae,
            max_pdu=max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *(handlers or [])],
            tls_args=tls,
            ext_neg=ext_neg,
        )
    except socket.gaierror as exc:
        message = f"cannot resolve host {host!r}: {exc.strerror or exc}"
        return None, AssociationFailure(message, outage=True)
    except Exception as exc:  # noqa: BLE001 - e.g. invalid AE title or address
        return None, f"cannot request association: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        return None, _association_error(
            assoc,
            connected=connected,
            elapsed_s=time.monotonic() - started,
            host=host,
            port=port,
            called_ae=called_ae,
            timeout_s=timeout_s,
            tls=tls,
        )
    return assoc, ""


def send_files(
    paths: Sequence[Path],
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 30.0,
    max_pdu: int = 0,
    tls: TlsArgs | None = None,
    associations: int = 1,
    stop: threading.Event | None = None,
) -> SendReport:
    """Send DICOM Part-10 files to a storage SCP over one association, or several at once.

    Presentation contexts are proposed for exactly the SOP Classes present,
    each with explicit and implicit VR little endian, plus a context in the
    file's own transfer syntax when it is neither (at most 128 contexts; files
    that do not fit are reported as not sent).  Each file is sent with one
    C-STORE; its DIMSE status is recorded in the returned report.

    With ``associations`` > 1, once the first association is established up to that many
    more are requested at the same time, and every association takes the next file still to
    be sent, in the order given, until none is left: a storage SCP that stores in several
    threads (Orthanc) takes a CT's 100 heatmaps in a third of the time over four. An extra
    association that is refused, or lost, costs nothing but itself: its files go over the
    others (the report's ``associations`` says how many served), and the call never waits
    for one still being requested once every file has an outcome. When every association is
    lost with files left or a C-STORE unanswered (the destination restarted), a new one
    sends what is left (at most :data:`RECONNECTS` in a row that deliver nothing); when none
    can be established because the destination cannot be reached, those files and the ones
    whose C-STORE was never answered are reported :attr:`FileOutcome.unreachable`.

    Args:
        paths: Part-10 files to send.  Duplicates are sent once.
        called_ae: AE title of the destination.
        host: Destination host name or address.
        port: Destination DICOM port.
        calling_ae: Our AE title.
        timeout_s: Timeout for TCP connect, association negotiation and each
            C-STORE response.
        max_pdu: Maximum PDU size we accept (0 = unlimited).
        tls: DICOM TLS: the client SSL context and the host name its certificate must
            carry; plain TCP when None.
        associations: Associations to send over at most (1: one, as before).
        stop: once set, no further C-STORE is started (the exporter is stopping): the
            C-STOREs under way are answered, and the files not sent yet are left in the
            report's ``withheld``.

    Returns:
        A :class:`SendReport`; this function does not raise for network or
        file problems.
    """
    unique_paths = list(dict.fromkeys(Path(p) for p in paths))
    report = SendReport(association_ok=False)
    infos: dict[Path, _FileInfo] = {}
    read_failures: dict[Path, FileOutcome] = {}
    for path in unique_paths:
        try:
            infos[path] = _read_file_info(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes an outcome
            read_failures[path] = FileOutcome(
                status=None,
                delivered=False,
                detail=f"cannot read file: {type(exc).__name__}: {exc}",
                unreadable=True,
            )
    if read_failures:
        logger.warning("%d of %d file(s) could not be read", len(read_failures), len(unique_paths))

    def finish(pending: dict[Path, FileOutcome]) -> SendReport:
        not_sent = FileOutcome(
            None, False, f"not sent: {report.error}" if report.error else "not sent"
        )
        if stop is not None and stop.is_set():
            report.withheld = {p for p in infos if p not in pending}
        report.outcomes = {
            p: read_failures.get(p) or pending.get(p, not_sent) for p in unique_paths
        }
        return report

    if not infos:
        report.error = "no readable DICOM files to send" if unique_paths else None
        return finish({})

    contexts, covered = _plan_contexts(infos)

    def associate() -> tuple[Association | None, str]:
        return open_association(
            calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=max_pdu, tls=tls,
            contexts=contexts,
        )  # fmt: skip

    assoc, error = associate()
    if assoc is None:
        report.error = error
        report.unreachable = isinstance(error, AssociationFailure) and error.outage
        logger.error("C-STORE to %s@%s:%d: %s", called_ae, host, port, report.error)
        return finish({p: FileOutcome(None, False, f"not sent: {report.error}") for p in infos})

    report.association_ok = True
    logger.info(
        "association with %s@%s:%d established: %d file(s), %d context(s) accepted",
        called_ae,
        host,
        port,
        len(infos),
        len(assoc.accepted_contexts),
    )
    queue = _SendQueue(list(infos), infos, covered, timeout_s, stop)
    extra = max(0, min(associations, len(infos)) - 1)
    queue.serving = 1 + extra

    def serve_extra() -> None:
        extra_assoc, why = associate()
        if extra_assoc is None:
            logger.info("an extra association with %s@%s:%d: %s", called_ae, host, port, why)
            queue.stopped()
            return
        queue.serve(extra_assoc)

    for _ in range(extra):
        threading.Thread(target=serve_extra, name="acwi-scu-extra", daemon=True).start()
    queue.serve(assoc)
    pending = queue.wait()
    fruitless = 0
    while queue.lost_mid_way() and fruitless < RECONNECTS and not queue.stopping():
        # Every association was lost, with files still to send or a C-STORE never answered
        # (the destination restarted, a firewall cut the connection): a new association
        # sends what is left (with nothing left, it is released at once), or tells that the
        # destination went away: an outage, not the files' fault. A file that was in flight
        # is not sent again in this call: it may be what the peer aborts on.
        delivered_before = sum(o.delivered for o in pending.values())
        again, why = associate()
        if again is None:
            logger.warning(
                "C-STORE to %s@%s:%d: association lost, and a new one: %s",
                called_ae, host, port, why,
            )  # fmt: skip
            outage = isinstance(why, AssociationFailure) and why.outage
            pending = queue.give_up(why, unreachable=outage)
            break
        logger.info("association with %s@%s:%d established again", called_ae, host, port)
        queue.resume()
        queue.serve(again)
        pending = queue.wait()
        if sum(o.delivered for o in pending.values()) > delivered_before:
            fruitless = 0
        else:
            fruitless += 1
    report.associations = queue.served
    report.error = queue.error
    delivered = sum(1 for o in pending.values() if o.delivered)
    logger.info(
        "C-STORE finished: %d of %d file(s) delivered over %d association(s)",
        delivered,
        len(unique_paths),
        queue.served,
    )
    return finish(pending)


class _SendQueue:
    """The files of one :func:`send_files` call, taken in order by every association serving
    it, and what happened to each."""

    def __init__(
        self,
        paths: list[Path],
        infos: dict[Path, _FileInfo],
        covered: set[tuple[UID, UID]],
        timeout_s: float,
        stop: threading.Event | None = None,
    ) -> None:
        self._todo = collections.deque(enumerate(paths))
        #: Once set, no file is taken any more (those left are not sent in this call).
        self._stop = stop
        self._total = len(paths)
        self._infos = infos
        self._covered = covered
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self.pending: dict[Path, FileOutcome] = {}
        #: Associations that may still take files (serving, or being requested).
        self.serving = 0
        #: Associations that took at least one file.
        self.served = 0
        #: The first association-level problem (an association lost), or None.
        self.error: str | None = None
        #: Files whose C-STORE was sent but never answered: the association was lost.
        self._unanswered: set[Path] = set()
        #: An association was lost since the last one was established.
        self._lost = False

    def _next(self) -> tuple[int, Path] | None:
        with self._cond:
            return self._todo.popleft() if self._todo and not self.stopping() else None

    def stopping(self) -> bool:
        """The caller stopped the send: no further file is taken."""
        return self._stop is not None and self._stop.is_set()

    def _record(self, path: Path, outcome: FileOutcome, *, lost: bool = False) -> None:
        """``path``'s outcome; ``lost``: its association was lost before the answer (told
        with the outcome, so that :meth:`lost_mid_way` sees it once every file has one)."""
        with self._cond:
            self.pending[path] = outcome
            if lost:
                self.error = self.error or outcome.detail
                self._unanswered.add(path)
                self._lost = True
            self._cond.notify_all()

    def stopped(self) -> None:
        """An association (or the request for one) is done; its files are sent or remain."""
        with self._cond:
            self.serving -= 1
            self._cond.notify_all()

    def lost_mid_way(self) -> bool:
        """After :meth:`wait`: an association was lost since the last was established, and
        files are left to send (no association serves them any more) or a C-STORE was never
        answered."""
        with self._cond:
            return self._lost and bool(self._todo or self._unanswered)

    def resume(self) -> None:
        """A new association was established: it serves the files left (if any)."""
        with self._cond:
            self._lost = False
            self.serving += 1

    def give_up(self, why: str, *, unreachable: bool) -> dict[Path, FileOutcome]:
        """No new association could be established for the files left (``why``): each is
        not sent, and (``unreachable``: the destination went away) neither they nor the files
        whose C-STORE was never answered are at fault. Returns every outcome."""
        with self._cond:
            self.error = f"{self.error}; a new association: {why}"
            while self._todo:
                _, path = self._todo.popleft()
                self.pending[path] = FileOutcome(
                    None, False, f"not sent: {self.error}", unreachable=unreachable
                )
            if unreachable:
                for path in self._unanswered:
                    lost = self.pending[path]
                    self.pending[path] = FileOutcome(
                        lost.status,
                        lost.delivered,
                        f"{lost.detail}; a new association: {why}",
                        unreachable=True,
                    )
            return dict(self.pending)

    def wait(self) -> dict[Path, FileOutcome]:
        """Until every file has an outcome, or no association is left to send the rest."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.pending) == self._total or self.serving == 0)
            return dict(self.pending)

    def serve(self, assoc: Association) -> None:
        """Send files over ``assoc`` until none is left or it is lost; then release it."""
        took_part = False
        accepted_pairs = {
            (UID(str(cx.abstract_syntax)), UID(str(ts)))
            for cx in assoc.accepted_contexts
            for ts in cx.transfer_syntax
        }
        accepted_classes = {sop_class for sop_class, _ in accepted_pairs}
        try:
            while (item := self._next()) is not None:
                index, path = item
                if not assoc.is_established:
                    with self._cond:
                        self._todo.appendleft(item)  # another association may send it
                        self._lost = True
                        self.error = self.error or (
                            "association aborted by the peer or connection lost"
                        )
                    break
                if not took_part:
                    took_part = True
                    with self._cond:
                        self.served += 1
                info = self._infos[path]
                class_name = _sop_class_name(info.sop_class)
                if (info.sop_class, info.transfer_syntax) not in self._covered:
                    self._record(
                        path,
                        FileOutcome(
                            None,
                            False,
                            "not sent: more than "
                            f"{MAX_PRESENTATION_CONTEXTS} presentation contexts would be needed",
                        ),
                    )
                    continue
                if info.sop_class not in accepted_classes:
                    detail = f"not sent: the peer did not accept SOP Class {class_name}"
                    self._record(path, FileOutcome(None, False, detail))
                    logger.warning(
                        "file %d: SOP Class %s not accepted by the peer", index, class_name
                    )
                    continue
                as_stored = (info.sop_class, info.transfer_syntax) in accepted_pairs
                outcome, association_lost = _store_one(
                    assoc, path, index, class_name, self._timeout_s, as_stored=as_stored
                )
                self._record(path, outcome, lost=association_lost)
                if association_lost:
                    # pynetdicom may still report the association as established for
                    # a moment after an A-ABORT; it is unusable either way.
                    if assoc.is_established:
                        assoc.abort()
                    break
            end_association(assoc)
        finally:
            if assoc.is_established:
                assoc.abort()
            self.stopped()


def _store_one(
    assoc: Association,
    path: Path,
    index: int,
    class_name: str,
    timeout_s: float,
    *,
    as_stored: bool,
) -> tuple[FileOutcome, bool]:
    """C-STORE one file over an established association.

    ``as_stored``: the peer accepted the file's own transfer syntax, so its data set is sent
    as the file holds it, read in chunks, never decoded (pynetdicom's chunked sending); else
    it is decoded and pynetdicom encodes it in an accepted transfer syntax. Decoding and
    encoding a 100-slice CT's SR (1.7 MB, some 9,400 content items) took about 3 s.

    Returns the outcome and whether the association was lost on the way.
    """
    payload: Path | Dataset
    if as_stored:
        # A process-wide pynetdicom setting; it only changes how a C-STORE given a file path
        # is sent, and this module is the node's only sender of those.
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        payload = path
    else:
        try:
            payload = dcmread(path)
        except Exception as exc:  # noqa: BLE001 - the file changed or became unreadable
            detail = f"cannot read file: {type(exc).__name__}: {exc}"
            return FileOutcome(None, False, detail), False
    started = time.monotonic()
    try:
        status_ds = assoc.send_c_store(payload, msg_id=(index % 65535) + 1)
    except ValueError as exc:
        # No accepted presentation context for the file's class/syntax, or
        # the data set cannot be encoded in the accepted transfer syntax.
        logger.warning("file %d (%s): not sent: %s", index, class_name, type(exc).__name__)
        return FileOutcome(None, False, f"not sent: {exc}"), not assoc.is_established
    except Exception as exc:  # noqa: BLE001 - malformed data set, association lost
        logger.warning("file %d (%s): not sent: %s", index, class_name, type(exc).__name__)
        detail = f"not sent: {type(exc).__name__}: {exc}"
        return FileOutcome(None, False, detail), not assoc.is_established
    if "Status" not in status_ds:
        elapsed = time.monotonic() - started
        if elapsed >= 0.95 * timeout_s:
            detail = f"no C-STORE response within {timeout_s:g} s; association aborted"
        else:
            detail = "association aborted or connection lost before the C-STORE response"
        logger.error("file %d (%s): %s", index, class_name, detail)
        return FileOutcome(None, False, detail), True
    outcome = _status_outcome(status_ds)
    log = logger.info if outcome.status == 0 else logger.warning
    log("file %d (%s): C-STORE status 0x%04X", index, class_name, outcome.status)
    return outcome, False


#: New associations :func:`send_files` requests at most, one after the other, when every
#: association was lost (files left, or a C-STORE never answered) and none delivered a file.
RECONNECTS = 2

#: The longest an A-RELEASE may take before the association is aborted instead.
RELEASE_TIMEOUT_S = 30.0


def end_association(assoc: Association, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Release an association still established (aborted if the release has not ended within
    ``timeout_s``), abort one still alive.

    pynetdicom's ``release()`` first waits, without a limit, for the association's reactor to
    pause; a reactor that has just served a request of the peer's on the association (a
    storage commitment report) was once seen never to, which would hang the exporter. The
    release runs in a thread of its own here; aborting the association stops the reactor,
    and with it the wait."""
    if assoc.is_established:
        ended = threading.Event()

        def release() -> None:
            try:
                assoc.release()
            except Exception:  # noqa: BLE001 - the peer went away mid-release
                logger.debug("association release failed", exc_info=True)
            finally:
                ended.set()

        threading.Thread(target=release, name="acwi-release", daemon=True).start()
        if not ended.wait(timeout_s):
            logger.warning("association release did not end within %g s: aborted", timeout_s)
            assoc.abort()
    elif assoc.is_alive():
        assoc.abort()


def _commitment_contexts() -> list[PresentationContext]:
    """Verification and the Storage Commitment Push Model: a destination without the latter
    still accepts the association, and is told apart from one that refuses the node."""
    return [
        build_context(_VERIFICATION),
        build_context(STORAGE_COMMITMENT_PUSH_MODEL, list(_UNCOMPRESSED)),
    ]


def _offers_commitment(assoc: Association) -> bool:
    return any(
        cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL for cx in assoc.accepted_contexts
    )


def _no_commitment(called_ae: str, host: str, port: int) -> str:
    return f"{called_ae}@{host}:{port} does not accept storage commitment (Push Model)"


@dataclass(frozen=True)
class EchoResult:
    """What a C-ECHO to a peer found: success, the round trip, or why not."""

    ok: bool
    #: From the connection request to the C-ECHO response (milliseconds); 0 when it failed.
    elapsed_ms: float = 0.0
    #: Why it failed (refused, rejected with the peer's reason, TLS, timed out), or "".
    error: str = ""


def verify(
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 10.0,
    tls: TlsArgs | None = None,
    storage_commitment: bool = False,
) -> EchoResult:
    """C-ECHO the peer (the Verification SOP Class) and say what happened; with
    ``storage_commitment``, also check that it accepts the Storage Commitment Push Model.
    Never raises."""
    started = time.monotonic()
    contexts = _commitment_contexts() if storage_commitment else None
    assoc, error = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=contexts,
    )  # fmt: skip
    if assoc is None:
        return EchoResult(False, error=error)
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            return EchoResult(False, error=f"no C-ECHO response within {timeout_s:g} s")
        if int(status.Status) != 0x0000:
            return EchoResult(False, error=f"C-ECHO status 0x{int(status.Status):04X}")
        if storage_commitment and not _offers_commitment(assoc):
            return EchoResult(
                False, error=f"C-ECHO ok, but {_no_commitment(called_ae, host, port)}"
            )
        return EchoResult(True, elapsed_ms=1000 * (time.monotonic() - started))
    except Exception as exc:  # noqa: BLE001 - association lost mid-way
        return EchoResult(False, error=f"association lost: {type(exc).__name__}: {exc}")
    finally:
        end_association(assoc)


def echo(
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 10.0,
    tls: TlsArgs | None = None,
) -> bool:
    """Return True when the peer answers a C-ECHO with success; never raises."""
    result = verify(called_ae, host, port, calling_ae, timeout_s, tls)
    if result.ok:
        logger.info("C-ECHO to %s@%s:%d: ok", called_ae, host, port)
    else:
        logger.warning("C-ECHO to %s@%s:%d failed: %s", called_ae, host, port, result.error)
    return result.ok


@dataclass(frozen=True)
class CommitmentRequestResult:
    """What a storage commitment request (N-ACTION) got: accepted, or why not."""

    accepted: bool
    #: The N-ACTION status, when one came.
    status: int | None = None
    #: Why it was not accepted (refused, rejected, unreachable), or "".
    error: str = ""
    #: The destination reported on the request's own association.
    reported: bool = False
    #: The destination could not be reached (:class:`AssociationFailure`'s outage).
    unreachable: bool = False


def request_commitment(
    action_information: Dataset,
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 30.0,
    tls: TlsArgs | None = None,
    linger_s: float = 0.0,
    on_report: Callable[[evt.Event], tuple[int, Dataset | None]] | None = None,
) -> CommitmentRequestResult:
    """Ask a destination for storage commitment: one N-ACTION (Request Storage Commitment)
    of the Storage Commitment Push Model with ``action_information`` (its Transaction UID
    and Referenced SOP Sequence). The association is released once the request is answered
    (the destination reports on an association of its own, to the node's storage SCP, PS3.4
    J.3.3), or, with ``linger_s``, once a report came on it and ``on_report`` took it, or
    ``linger_s`` passed (a destination that reports only on the request's association).
    Never raises."""
    reported = threading.Event()
    handlers: list[tuple[evt.EventType, Callable[[evt.Event], Any]]] = []
    if on_report is not None:
        handle = on_report

        def take_report(event: evt.Event) -> tuple[int, Dataset | None]:
            try:
                return handle(event)
            finally:
                reported.set()

        handlers.append((evt.EVT_N_EVENT_REPORT, take_report))
    assoc, error = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=_commitment_contexts(), handlers=handlers,
    )  # fmt: skip
    if assoc is None:
        outage = isinstance(error, AssociationFailure) and error.outage
        return CommitmentRequestResult(False, error=error, unreachable=outage)
    try:
        if not _offers_commitment(assoc):
            return CommitmentRequestResult(False, error=_no_commitment(called_ae, host, port))
        status, _reply = assoc.send_n_action(
            action_information,
            REQUEST_STORAGE_COMMITMENT,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_INSTANCE,
        )
        if "Status" not in status:
            return CommitmentRequestResult(
                False, error=f"no N-ACTION response within {timeout_s:g} s"
            )
        code = int(status.Status)
        if code != 0x0000:
            comment = status.get("ErrorComment")
            return CommitmentRequestResult(
                False,
                status=code,
                error=f"storage commitment request refused with status 0x{code:04X}"
                + (f" ({comment})" if comment else ""),
            )
        if linger_s > 0 and on_report is not None:
            reported.wait(linger_s)
        return CommitmentRequestResult(True, status=code, reported=reported.is_set())
    except Exception as exc:  # noqa: BLE001 - association lost mid-way
        return CommitmentRequestResult(
            False, error=f"association lost: {type(exc).__name__}: {exc}"
        )
    finally:
        end_association(assoc)
