"""The storage SCP: C-ECHO, and C-STORE of every standard storage SOP class.

The C-STORE handler keeps the hot path short: it takes the encoded bytes as received (file meta
plus ``event.encoded_dataset()``, no full decode), reads only the few header attributes it needs
(stopping before pixel data), appends the instance to the ingest journal (:mod:`.journal`) and
answers success once the journal record is on disk. Anything that fails before the answer is
answered with a DIMSE failure status and leaves no partial file.

On the fast path (:mod:`.reactor`) a journaled instance's spool file and ledger row come after
the answer (:func:`.reactor.after_response`): the association's thread writes the file while the
response travels and the sender reads its next file, and queues the row; an association's rows
are written together, in one transaction (:class:`_PendingRows`), at the latest when the
association goes quiet for a few milliseconds and always before anything else of it is served
(its release above all), so completion never sees a study without them. The instance is
durable before all that, in the journal; if its file or row cannot be written then, the
journal's checkpoint writes it later (it replays the record), and until a file, or a row, can
be written again the SCP writes each before it answers, answering a failure as one (0xA700 for
the spool, 0xA701 for the ledger).

An instance too large for the journal (``ingest.journal_max_bytes``) is flushed in the spool
before the answer instead, and the journal gets a small record of it, flushed meanwhile; its row
follows the answer and joins the association's pending rows like any other. Without the
journal, or off the fast path, the spool file and the row are written before the answer (after
the association's pending rows: rows are written in the order the instances came).
"""

from __future__ import annotations

import collections
import datetime as dt
import ipaddress
import logging
import posixpath
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from acwi_node.audit import AuditEvent, Outcome, audit, remote_ae
from acwi_node.config import Settings
from acwi_node.export.commitment import CommitmentReports
from acwi_node.export.scu import STORAGE_COMMITMENT_PUSH_MODEL
from acwi_node.ingest.checksum import crc32_of
from acwi_node.ingest.cpu_latency import CpuLatencyRequest
from acwi_node.ingest.header import HeaderError, body_part, dataset_header, describe, study_date
from acwi_node.ingest.holders import HOLDERS_DIR, HolderName
from acwi_node.ingest.journal import (
    JOURNAL_DIR,
    IngestJournal,
    JournalError,
    JournalRecord,
    Ticket,
)
from acwi_node.ingest.mpps import MPPS_SOP_CLASS, CompletionSignals, MppsSCP
from acwi_node.ingest.negotiation import install as remember_negotiations
from acwi_node.ingest.orphans import OrphanedJournals
from acwi_node.ingest.own_results import is_own_result
from acwi_node.ingest.part10 import file_meta_prefix
from acwi_node.ingest.reactor import (
    CheckedRequestHandler,
    EventDrivenRequestHandler,
    after_response,
    holds_association_slot,
    on_fast_path,
    when_idle,
)
from acwi_node.ingest.reactor import compatible as reactor_compatible
from acwi_node.ingest.spool import Buffers, Spool, SpoolError, SpoolFile, is_safe_uid
from acwi_node.ledger import InstanceRecord, Ledger, Recorded
from acwi_node.observability import metrics
from acwi_node.observability.logging import failure_summary, note_identifiers
from acwi_node.tcp import host_port, no_delay
from acwi_node.tls import peer_subject

log = logging.getLogger("acwi_node.ingest")

#: Transfer syntaxes the SCP accepts for every storage SOP class (stored as received).
TRANSFER_SYNTAXES: list[str] = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL (Lossless Only)
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

#: Ledger rows of an association written together at most (see :class:`_PendingRows`): a
#: sender streaming small instances fills a batch within :data:`ROW_MAX_DELAY_S` (128 rows
#: cost a third less per row than 32 on SQLite, and on PostgreSQL a quarter of the commits).
ROW_BATCH = 128
#: At a clean stop, how long the associations aborted may take to record their ends before
#: the process releases what it still holds (:meth:`StorageSCP.stop`).
STOP_WAIT_S = 5.0
#: A pending ledger row this old (seconds) is written with the next one to join it (an idle
#: association's rows are written after ``reactor.IDLE_S``).
ROW_MAX_DELAY_S = 0.05

# DIMSE status codes the handler answers (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_LEDGER_UNAVAILABLE = 0xA701  # out of resources: the ledger cannot record the instance
STATUS_DOES_NOT_MATCH = 0xA900  # error: the data set (or command) is of another SOP class
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_BAD_UID = 0xC001  # cannot understand: a UID unsafe to store (path-like, too long)
STATUS_MISSING_UID = 0xC002  # cannot understand: no Study/SOP Instance UID
#: Cannot understand: the data set's SOP Instance UID is not the command's Affected SOP
#: Instance UID, so the file, the ledger row and the response could not agree on the instance
#: (DCMTK's storescp answers 0xA900 here; a code of its own tells the two cases apart).
STATUS_INSTANCE_MISMATCH = 0xC003
#: Cannot understand: the handler failed unexpectedly (pynetdicom's code for a handler that
#: raises); counted and audited as a refusal all the same.
STATUS_HANDLER_FAILED = 0xC211


def skip_pydicom_value_checks() -> None:
    """For a process that serves associations: pydicom makes no check of the values it reads.

    pynetdicom turns every UID of an A-ASSOCIATE-RQ into a pydicom UID, and pydicom checks each
    new UID against a regular expression, by default only to warn: storescu proposes 128
    presentation contexts, about 1,750 UIDs and a fifth of the CPU time an association costs
    (25-30 -> 20-21 ms). Nothing is refused for those warnings (pynetdicom validates what it
    must itself, and the SCP checks every UID it stores or names a file with,
    :func:`~acwi_node.ingest.spool.is_safe_uid`); they would also quote values from the data.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def _received(event: evt.Event) -> tuple[bytes, tuple[bytes, bytes]]:
    """(data set as received, the instance as a Part 10 file): the File Meta Information from
    :mod:`.part10`, or from pynetdicom's encoder for values that one cannot take, then the data
    set (two buffers, written one after the other: a CT slice is not copied to join them)."""
    request = cast(C_STORE, event.request)
    dataset = event.encoded_dataset(include_meta=False)
    try:
        prefix = file_meta_prefix(
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax),
        )
    except (UnicodeEncodeError, struct.error):  # odd values: pynetdicom's encoder decides
        return dataset, (event.encoded_dataset(include_meta=True), b"")
    return dataset, (prefix, dataset)


def _text(header: Mapping[str, str], keyword: str) -> str:
    return header.get(keyword, "")


def _class_fits_context(sop_class: str, event: evt.Event) -> bool:
    """Whether a C-STORE's Affected SOP Class UID may come on its presentation context: the
    context's abstract syntax, or a class whose related general SOP classes (SOP Class
    Common Extended Negotiation, PS3.7 D.3.3.6) name it (PS3.4 B.3.1.4)."""
    abstract_syntax = str(getattr(event.context, "abstract_syntax", "") or "")
    if not abstract_syntax or sop_class == abstract_syntax:
        return True
    try:
        extended = event.assoc.acceptor.accepted_common_extended
    except AttributeError:
        return False
    related = extended.get(UID(sop_class)) if extended else None
    return related is not None and abstract_syntax in {str(uid) for uid in related[1] or ()}


class _NodeAE(AE):
    """pynetdicom's AE with a calling-AE allow-list that can depend on the peer's address.

    pynetdicom rejects an association whose calling AE title is not in
    ``require_calling_aet`` (A-ASSOCIATE-RJ, reason "calling AE title not recognised"). It
    reads that list while negotiating, in the association's own thread, so the list returned
    here is the one for that association's peer: AE titles bound to other hosts are left out.
    With host checks configured and no explicit allow-list, the host-bound titles are the
    allow-list.
    """

    calling_ae_hosts: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}

    @property
    def require_calling_aet(self) -> list[str]:
        allowed: list[str] = self._require_calling_aet
        if not self.calling_ae_hosts:
            return allowed
        assoc = threading.current_thread()
        address = getattr(getattr(assoc, "requestor", None), "address", None)
        try:
            peer = ipaddress.ip_address(address) if address else None
        except ValueError:
            peer = None
        titles = allowed or list(self.calling_ae_hosts)
        permitted = [
            t
            for t in titles
            if t not in self.calling_ae_hosts
            or (peer is not None and any(peer in net for net in self.calling_ae_hosts[t]))
        ]
        # An empty list would mean "anyone": keep a title no peer can send instead.
        return permitted or [""]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]

    @property
    def active_associations(self) -> list[Association]:
        """pynetdicom's list of the AE's association threads; read by an acceptor that is
        negotiating (pynetdicom's ``ingest.max_associations`` check, in the association's own
        thread), only those holding a slot (:func:`.reactor.holds_association_slot`). Every
        other reader (shutdown aborts them all) gets every thread."""
        assocs: list[Association] = AE.active_associations.fget(self)  # type: ignore[attr-defined]
        current = threading.current_thread()
        if not (
            isinstance(current, Association)
            and current.ae is self
            and current.is_acceptor
            and not current.is_established
        ):
            return assocs
        return [a for a in assocs if a is current or holds_association_slot(a)]


#: How long a listener sharing the DICOM port waits, per association it serves, before it
#: accepts a new connection (another, idler listener takes it meanwhile).
SHARED_ACCEPT_DELAY_S = 0.005
#: How long a connection a listener accepted counts as an association it serves, until its
#: association is under way (its thread started: well under this on a loaded machine).
RECENT_ACCEPT_S = 2 * SHARED_ACCEPT_DELAY_S


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved off the accept loop.

    pynetdicom wraps an accepted socket and completes the handshake in the thread that accepts
    connections, without a timeout: one peer that connects and sends nothing would stop the
    node accepting anyone. Here the accept loop only wraps the socket; the handshake runs in
    the connection's own thread with a timeout, and a failed one (no client certificate, an
    untrusted one, plain DICOM on the TLS port) closes that connection and is reported.
    """

    handshake_timeout_s: float = 10.0
    on_handshake_failed: Callable[[tuple[str, int], str], None] | None = None
    #: A listening socket made by a parent process and shared by several SCP processes
    #: (``ingest.processes``); None: bind and listen here.
    inherited_socket: socket.socket | None = None
    _recent_accepts: collections.deque[float]

    def server_bind(self) -> None:
        self._recent_accepts = collections.deque()
        if self.inherited_socket is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the one socketserver made; the inherited one is listening
        self.socket = self.inherited_socket
        # Every process waits for connections on this socket and all wake for each one: the
        # first accepts it, the others' accept fails at once (socketserver ignores that).
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited_socket is None:
            super().server_activate()

    def use_event_driven_reactors(self) -> None:
        """Serve connections with :mod:`acwi_node.ingest.reactor`'s associations, which accept
        a request seen before from memory (:mod:`acwi_node.ingest.negotiation`)."""
        self.RequestHandlerClass = EventDrivenRequestHandler
        remember_negotiations()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        if self.inherited_socket is not None:
            delay = self.accept_delay(time.monotonic())
            if delay:
                time.sleep(delay)
        client_socket, address = self.socket.accept()
        if self.inherited_socket is not None:
            self._recent_accepts.append(time.monotonic())
            client_socket.setblocking(True)  # not the shared socket's non-blocking mode
        if self.ssl_context is not None:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def accept_delay(self, now: float) -> float:
        """Seconds a listener sharing the port waits before it accepts a connection: the
        least busy listener first (as nginx's workers do), else one process could take every
        association of a burst while the others idle. A connection accepted in the last
        :data:`RECENT_ACCEPT_S` counts before its association thread runs; one accepted
        earlier, whose association has ended, no longer does (a modality sending one image
        per association would otherwise wait at every listener)."""
        recent = self._recent_accepts
        while recent and now - recent[0] > RECENT_ACCEPT_S:
            recent.popleft()
        busy = len(self.active_associations) + len(recent)
        return min(SHARED_ACCEPT_DELAY_S * busy, 10 * SHARED_ACCEPT_DELAY_S)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a plain TCP connection's association from the accepting thread; a TLS
        connection gets a thread of its own for its handshake first, as every connection does
        in pynetdicom.

        Making the association (its objects and its copy of the server's presentation
        contexts) takes no waiting on the network, so a thread made only to make it and start
        the association's own, then end, cost every association a thread's start-up and the
        hand-over to it before its A-ASSOCIATE-RQ was even read."""
        if isinstance(request, ssl.SSLSocket) or self.RequestHandlerClass is not (
            EventDrivenRequestHandler
        ):
            super().process_request(request, client_address)
            return
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout_s)
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                if self.on_handshake_failed is not None:
                    reason = getattr(exc, "reason", None) or type(exc).__name__
                    self.on_handshake_failed(client_address, str(reason))
                return  # the server closes the socket
        super().finish_request(request, client_address)


@dataclass
class _PendingRow:
    """An instance answered and spooled whose ledger row waits (see :class:`_PendingRows`)."""

    record: InstanceRecord
    ticket: Ticket
    patient_id: str
    #: The spool file written for it (the row describes it only while it is still there).
    written: SpoolFile


@dataclass
class _PendingRows:
    """An association's ledger rows waiting to be written together, in one transaction.

    On the fast path a journaled instance is answered once its journal record is on disk; its
    spool file and row come after the answer. Writing each row in its own transaction cost
    the association more than the sender's time between two instances, so the rows wait
    here: they are written when :data:`ROW_BATCH` wait, when a row joins them
    :data:`ROW_MAX_DELAY_S` or more after the oldest, when the association is idle
    (:func:`.reactor.when_idle`), before anything else of the association reaches pynetdicom
    or the ledger (its release above all), and when it ends.
    """

    rows: list[_PendingRow] = field(default_factory=list)
    #: ``time.monotonic()`` when the oldest row was added.
    since: float = 0.0
    #: Whether a write is registered with the DUL for when the association is idle.
    on_idle: bool = False
    #: Held while the rows are written: whoever writes next (or records the association's
    #: end) finds them in the ledger.
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _AssociationState:
    calling_ae: str
    address: str = ""
    study_uids: set[str] = field(default_factory=set)
    study_ids: set[int] = field(default_factory=set)
    released: bool = False
    #: Instances stored per Study Instance UID, and refused (for the audit trail).
    stored: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    #: The node's own results that came back: answered as stored, not stored (own_results).
    dropped: int = 0
    #: Instances sent again unchanged to a study that keeps its results (not re-opened).
    unchanged: int = 0
    #: Objects no model reads (reports, key object notes, ...) added to a study that keeps
    #: its results (not re-opened).
    kept: int = 0
    patient_ids: set[str] = field(default_factory=set)
    pending: _PendingRows = field(default_factory=_PendingRows)


def _asks_commitment(settings: Settings) -> bool:
    """Whether some destination is asked for storage commitment: its reports come here."""
    return any(d.kind == "dimse" and d.storage_commitment for d in settings.destinations)


class StorageSCP:
    """The node's DICOM listener: wires pynetdicom's AE to the spool and the ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        spool: Spool,
        *,
        on_instance: Callable[[int], None] | None = None,
        signals: CompletionSignals | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.spool = spool
        self.on_instance = on_instance
        self.signals = signals
        self.mpps = MppsSCP(ledger, signals) if settings.ingest.mpps else None
        #: Storage commitment reports of the destinations that are asked for commitment.
        self.commitment = (
            CommitmentReports(settings, ledger) if _asks_commitment(settings) else None
        )
        self._release_complete = {a.strip() for a in settings.completion.release_complete_aes}
        self._audit_patient_id = settings.audit.patient_id
        self._journal_max_bytes = settings.ingest.journal_max_bytes
        self._assocs: dict[int, _AssociationState] = {}
        #: Associations whose end is being recorded (ledger, completion signals).
        self._closing = 0
        self._lock = threading.Lock()
        self.ae = self._make_ae()
        self._server: Any = None
        #: Where instances become durable first (``ingest.journal``); None: each spool file
        #: and ledger row is flushed on its own.
        self.journal: IngestJournal | None = None
        #: The name its associations are held under in the ledger (``AssociationHold``): its
        #: journal's, which a process finding it orphaned releases them by; without a journal,
        #: a name of :mod:`.holders` (``_names``), which works the same way.
        self._holder: str | None = None
        self._names: HolderName | None = None
        #: Whether the last ledger row could be written: only then is an instance answered
        #: before its row is written (see :meth:`_record`).
        self._ledger_works = True
        #: Whether the last spool file could be written: only then is a journaled instance
        #: answered before its spool file is written (see :meth:`_store_journaled`).
        self._spool_works = True
        #: By journal record number, of the instances acknowledged without a spool file or a
        #: ledger row: the spool path, and the file the instance left there (inode and size;
        #: its own, else the one it found, None: none). Another file there at the checkpoint
        #: is a later version's (see :meth:`_record_acknowledged`).
        self._unrecorded_files: dict[int, tuple[str, tuple[int, int] | None]] = {}
        #: Replays journals: those of stopped processes at start, and this one's records that
        #: its checkpoint writes again.
        self._orphans = OrphanedJournals(spool, ledger, fsync=settings.ingest.fsync)
        #: Held from the first association accepted to the end of the last one.
        self.cpu_latency = CpuLatencyRequest(settings.ingest.cpu_wakeup_latency_us)

    def _make_ae(self) -> AE:
        cfg = self.settings.ingest
        ae = _NodeAE(ae_title=self.settings.node.ae_title)
        ae.calling_ae_hosts = {
            title.strip(): [ipaddress.ip_network(n) for n in nets]
            for title, nets in cfg.calling_ae_hosts.items()
        }
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu_size
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.require_calling_aet = [a.strip() for a in cfg.allowed_calling_aes]
        ae.add_supported_context(Verification)
        for ctx in AllStoragePresentationContexts:
            assert ctx.abstract_syntax is not None
            ae.add_supported_context(ctx.abstract_syntax, TRANSFER_SYNTAXES)
        if cfg.mpps:
            ae.add_supported_context(MPPS_SOP_CLASS, TRANSFER_SYNTAXES[:4])
        if _asks_commitment(self.settings):
            # The destination, the Storage Commitment SCP, requests the association to send
            # its report (PS3.4 J.3.3): it may take the SCP role by role selection.
            ae.add_supported_context(
                STORAGE_COMMITMENT_PUSH_MODEL, TRANSFER_SYNTAXES[:4], scu_role=False, scp_role=True
            )
        return ae

    # ------------------------------------------------------------------ server
    def _on_connection(self, event: evt.Event) -> None:
        """Give the accepted socket a read timeout before its association thread starts, and
        send its PDUs at once (:func:`~acwi_node.tcp.no_delay`).

        pynetdicom's accepted sockets block forever: a peer that stops in the middle of a PDU
        (half a PDU, a huge declared length) would hold an association slot for good. With a
        timeout the read fails after ``network_timeout_s`` and the connection is closed.
        """
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.settimeout(self.settings.ingest.network_timeout_s)
            no_delay(sock)

    # ----------------------------------------------------------------- journal
    def _replay(self, record: JournalRecord) -> bool | None:
        """Write a journaled instance's spool file again and its ledger row if missing (see
        :meth:`~acwi_node.ingest.orphans.OrphanedJournals.replay`)."""
        return self._orphans.replay(record)

    def _unrecorded(
        self, journal: IngestJournal, ticket: Ticket, path: str, left: tuple[int, int] | None
    ) -> None:
        """An instance answered, its spool file or ledger row not written: the journal's
        checkpoint writes them. ``left``: the file at its ``path`` (:meth:`Spool.identity`)."""
        self._unrecorded_files[ticket.number] = (path, left)
        journal.unrecorded(ticket)

    def _record_acknowledged(self, record: JournalRecord) -> None:
        """For the journal's checkpoint: the spool file and ledger row of an instance answered
        while the spool or the ledger failed, unless a later version of the instance came
        since. Which came later is told without the wall clock (NTP may have set it back
        meanwhile): by this journal's order, and by the spool file, which every later version
        replaces."""
        note = self._unrecorded_files.get(record.number)
        if note is None or not self._later_version(record, *note):
            self._replay(record)  # raises while the ledger fails: the note stays for the next
        self._unrecorded_files.pop(record.number, None)

    def _later_version(
        self, record: JournalRecord, path: str, left: tuple[int, int] | None
    ) -> bool:
        """Whether a later version of ``record``'s instance came: answered here after it and
        not recorded yet either (its record, replayed after this one, decides), or stored in
        the spool since (another file at ``path``) and recorded (the row describes that file).
        A file stored since and not recorded is a version refused, or a version another
        process answered and records at its checkpoint, after this one."""
        name = posixpath.basename(path)  # <study>/<SOP Instance UID>.dcm
        if any(
            number > record.number and posixpath.basename(other) == name
            for number, (other, _) in list(self._unrecorded_files.items())
        ):
            return True
        version = self.ledger.instance_version(str(record.meta["sop_instance_uid"]))
        if version is not None and version[0] != path:
            # Recorded in another study: moved there before this version came, or after it.
            # Neither the spool nor this journal can tell; the row's time does, unless the
            # wall clock was set back between the two.
            written = dt.datetime.fromtimestamp(record.time_ns / 1e9, dt.timezone.utc)
            return version[3] > written.replace(tzinfo=None)
        now = self.spool.identity(path)
        if now is None or now == left:
            return False  # this version's file, or the one before it (or retention's doing)
        try:
            data = self.spool.resolve(path).read_bytes()
        except FileNotFoundError:
            return False
        return (
            version is not None
            and version[:2] == (path, len(data))
            and (version[2] is None or version[2] == crc32_of([data]))
        )

    def open_journal(self) -> None:
        """Replay the journals of stopped processes, then open this process's journal."""
        cfg = self.settings.ingest
        if not cfg.journal or self.journal is not None:
            return
        root = self.spool.root / JOURNAL_DIR
        self._orphans.replay_stopped()
        self._unrecorded_files.clear()  # numbered by the journal, which starts here
        journal = IngestJournal(
            root,
            self.spool.root,
            self.ledger.flush,
            checkpoint_s=cfg.journal_checkpoint_s,
            checkpoint_idle_s=cfg.journal_checkpoint_idle_s,
            checkpoint_bytes=cfg.journal_checkpoint_bytes,
            fsync=cfg.fsync,
            replay=self._record_acknowledged,
        )
        journal.open()
        self.journal = journal
        self._holder = journal.directory.name

    def start(self, *, block: bool = False, listen_socket: socket.socket | None = None) -> None:
        """Listen on the configured host and port (DICOM TLS there when ``[ingest.tls]``).

        ``listen_socket``: accept on this already listening socket instead (one that several
        SCP processes share, see :mod:`acwi_node.ingest.listeners`).
        """
        self.open_journal()
        if self._holder is None:  # ingest.journal off
            self._names = HolderName(self.spool.root / HOLDERS_DIR, "scp")
            self._holder = self._names.name
        self.cpu_latency.check()
        node = self.settings.node
        tls = self.settings.ingest.tls
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
        ]
        if self.mpps is not None:
            handlers += self.mpps.handlers()
        if self.commitment is not None:
            handlers += self.commitment.handlers()
        # pynetdicom logs every PDU and DIMSE message through event handlers that cost time per
        # message even when DEBUG is off; the node logs what matters itself. At DEBUG they stay.
        pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if node.log_level == "DEBUG" else "none"
        address = (node.dicom_host, node.dicom_port)
        server = cast(
            _AssociationServer,
            self.ae.make_server(
                address,
                evt_handlers=handlers,
                ssl_context=tls.context() if tls.enabled else None,
                server_class=(
                    _AssociationServer
                    if listen_socket is None
                    else type(
                        "_SharedSocketServer",
                        (_AssociationServer,),
                        {"inherited_socket": listen_socket},
                    )
                ),
            ),
        )
        server.handshake_timeout_s = tls.handshake_timeout_s
        if not reactor_compatible():
            if self.settings.ingest.reactor == "event":
                log.warning("this pynetdicom lacks what the event-driven reactor needs: polling")
        elif self.settings.ingest.reactor == "event":
            server.use_event_driven_reactors()
        else:  # pynetdicom's loops, with the same answers to invalid requests
            server.RequestHandlerClass = CheckedRequestHandler
        server.on_handshake_failed = self._on_handshake_failed
        self.ae._servers.append(server)  # so that AE.shutdown() and server.shutdown() work
        self._server = server
        log.info(
            "storage SCP %s listening on %s%s",
            node.ae_title,
            host_port(*address),
            " (DICOM TLS)" if tls.enabled else "",
        )
        if block:
            server.serve_forever()
        else:
            thread = threading.Thread(
                target=server.serve_forever, name="acwi-scp-acceptor", daemon=True
            )
            thread.start()

    @property
    def listening(self) -> bool:
        """True while the DICOM listener's socket is open (readiness)."""
        return self._server is not None and self._server.socket.fileno() >= 0

    @property
    def open_associations(self) -> int:
        """Associations accepted and not yet fully recorded as ended."""
        with self._lock:
            return len(self._assocs) + self._closing

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self.cpu_latency.close()
        released = self._release_own_holds()
        if self.journal is not None:
            # Holds left (an association still closing, or the ledger down): the journal
            # stays, and the next process to start releases them.
            self.journal.close(keep=not released)
            self.journal = None

    def _release_own_holds(self) -> bool:
        """A clean stop: the ends of this process's associations it could not record (the
        ledger was down just then) are released now, once no association is left to end
        (one still ending would count its end twice). Whether none is held any more."""
        if self._holder is None:
            return True
        deadline = time.monotonic() + STOP_WAIT_S
        while self.open_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.open_associations:
            return False
        if self._names is not None:  # its name goes with what it holds, or stays for a sweep
            self._names.close(self.ledger.release_holder)
            return True
        try:
            released = self.ledger.release_holder(self._holder)
        except Exception:
            log.exception("could not release the associations whose end was not recorded")
            return False
        if released:
            log.warning(
                "released the associations whose end could not be recorded on %d study(ies)",
                len(released),
            )
        return True

    # ---------------------------------------------------------------- handlers
    def _on_handshake_failed(self, address: tuple[str, int], reason: str) -> None:
        metrics.ASSOCIATIONS_REJECTED.inc()
        log.warning("TLS handshake with %s failed: %s", address[0], reason)
        audit(
            AuditEvent.ASSOCIATION_REJECTED,
            outcome=Outcome.MINOR_FAILURE,
            participants=[remote_ae("", str(address[0]), requestor=True)],
            detail=f"TLS handshake failed: {reason}",
        )

    def _on_accepted(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        address = str(event.assoc.requestor.address)
        subject = peer_subject(getattr(event.assoc.dul.socket, "socket", None))
        with self._lock:
            self._assocs[id(event.assoc)] = _AssociationState(calling_ae=calling, address=address)
        self.cpu_latency.acquire()
        log.info("association accepted from %s (%s)", calling, address)
        audit(
            AuditEvent.ASSOCIATION_ACCEPTED,
            participants=[remote_ae(calling, address, requestor=True, tls_subject=subject)],
            detail="DICOM TLS" if subject or self.settings.ingest.tls.enabled else "",
        )

    def _rejection_reason(self, event: evt.Event) -> str:
        calling = event.assoc.requestor.ae_title.strip()
        allowed = self.ae.require_calling_aet  # this peer's list (see _NodeAE)
        if allowed and calling not in allowed:
            if calling in {t.strip() for t in self.settings.ingest.calling_ae_hosts}:
                return "calling AE title not permitted from this address"
            return "calling AE title not recognised"
        return "no association slot free (ingest.max_associations)"

    def _on_rejected(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS_REJECTED.inc()
        calling = event.assoc.requestor.ae_title.strip()
        address = str(event.assoc.requestor.address)
        reason = self._rejection_reason(event)
        log.warning("association rejected from %s (%s): %s", calling, address, reason)
        audit(
            AuditEvent.ASSOCIATION_REJECTED,
            outcome=Outcome.MINOR_FAILURE,
            participants=[remote_ae(calling, address, requestor=True)],
            detail=reason,
        )

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            state = self._assocs.get(id(event.assoc))
            if state is not None:
                state.released = True
        if state is not None:
            self._write_rows(state)  # before the release is answered

    def _audit_received(self, state: _AssociationState) -> None:
        if not state.stored and not state.refused and not state.dropped:
            return
        total = sum(state.stored.values())
        detail = f"{total} instance(s) stored"
        if state.refused:
            detail += f", {state.refused} refused"
        if state.unchanged:
            log.info(
                "association from %s: %d instance(s) sent again unchanged; their studies keep"
                " their results (not re-opened; `acwi-node studies reprocess` analyses one again)",
                state.calling_ae,
                state.unchanged,
            )
        if state.kept:
            log.info(
                "association from %s: %d object(s) no model reads (reports, key object notes,"
                " presentation states) added to studies with results; not re-opened",
                state.calling_ae,
                state.kept,
            )
        if state.dropped:
            detail += f", {state.dropped} of the node's own results not stored"
            log.info(
                "association from %s: %d object(s) written by ACWI Node (its results) came"
                " back; answered as stored, not stored",
                state.calling_ae,
                state.dropped,
            )
        if not state.released:
            detail += "; the association ended without a release"
        audit(
            AuditEvent.INSTANCES_RECEIVED,
            outcome=Outcome.MINOR_FAILURE if state.refused else Outcome.SUCCESS,
            participants=[remote_ae(state.calling_ae, state.address, requestor=True)],
            study_uids=sorted(state.stored),
            instances=dict(state.stored),
            patient_ids=sorted(state.patient_ids),
            detail=detail,
        )

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
            if state is not None:
                self._closing += 1
        try:
            if state is not None:
                self._write_rows(state)  # before the association's end is recorded
            self._record_end(state)
        finally:
            if state is not None:
                self.cpu_latency.release()
                with self._lock:
                    self._closing -= 1

    def _record_end(self, state: _AssociationState | None) -> None:
        if state is not None:
            self._audit_received(state)
        if state is None or not state.study_ids:
            return
        try:
            self.ledger.association_released(sorted(state.study_ids), holder=self._holder)
        except Exception:  # the upper bound on waiting still completes these studies
            log.exception("could not record the end of an association")
            return
        if (
            self.signals is not None
            and state.released
            and state.calling_ae in self._release_complete
        ):
            self.signals.released(state.study_ids)

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        """Persist one instance, then answer. Never raises: an unexpected failure is answered
        0xC211 and counted and audited as a refusal."""
        with self._lock:
            state = self._assocs.get(id(event.assoc))
        try:
            status = self._store(event, state)
        except Exception as exc:
            calling_ae = state.calling_ae if state else event.assoc.requestor.ae_title.strip()
            log.error(
                "C-STORE from %s: refused, the instance could not be stored: %s",
                calling_ae,
                describe(exc),
            )
            log.debug("the C-STORE handler's failure", exc_info=True)
            metrics.INSTANCES_REJECTED.labels("handler_error").inc()
            status = STATUS_HANDLER_FAILED
        if status != STATUS_SUCCESS and state is not None:
            with self._lock:
                state.refused += 1
        return status

    def _store(self, event: evt.Event, state: _AssociationState | None) -> int:
        calling_ae = state.calling_ae if state else event.assoc.requestor.ae_title.strip()
        try:
            dataset, data = _received(event)
        except Exception as exc:
            log.warning("C-STORE from %s: cannot encode the received dataset: %s", calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("unencodable").inc()
            return STATUS_CANNOT_UNDERSTAND
        try:
            header = dataset_header(
                dataset, str(event.context.transfer_syntax), lambda: b"".join(data)
            )
        except HeaderError as exc:
            log.warning("C-STORE from %s: refused, cannot read the data set: %s", calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("unparseable_header").inc()
            return STATUS_CANNOT_UNDERSTAND
        note_identifiers(header)  # from here on, no log line can show this patient's name/ID
        request = cast(C_STORE, event.request)
        command_class = str(request.AffectedSOPClassUID or "")
        command_uid = str(request.AffectedSOPInstanceUID or "")
        data_class = _text(header, "SOPClassUID")
        data_uid = _text(header, "SOPInstanceUID")
        # The file's meta (from the command), its ledger row and the response (from the
        # command) must name the instance the data set is: a mismatch is refused (PS3.4 B.2.3).
        if (data_class and command_class and data_class != command_class) or (
            command_class and not _class_fits_context(command_class, event)
        ):
            log.warning(
                "C-STORE from %s: refused, the data set's SOP Class UID, the command's Affected"
                " SOP Class UID and the presentation context's abstract syntax disagree",
                calling_ae,
            )
            metrics.INSTANCES_REJECTED.labels("class_mismatch").inc()
            return STATUS_DOES_NOT_MATCH
        if data_uid and command_uid and data_uid != command_uid:
            log.warning(
                "C-STORE from %s: refused, the data set's SOP Instance UID is not the command's"
                " Affected SOP Instance UID",
                calling_ae,
            )
            metrics.INSTANCES_REJECTED.labels("instance_mismatch").inc()
            return STATUS_INSTANCE_MISMATCH
        sop_uid = data_uid or command_uid
        sop_class = command_class or data_class
        study_uid = _text(header, "StudyInstanceUID")
        if not sop_uid or not study_uid:
            log.warning("C-STORE from %s: missing Study or SOP Instance UID", calling_ae)
            metrics.INSTANCES_REJECTED.labels("missing_uid").inc()
            return STATUS_MISSING_UID
        if not (is_safe_uid(sop_uid) and is_safe_uid(study_uid)):
            log.warning(
                "C-STORE from %s: rejected an instance with an invalid UID (%d/%d chars)",
                calling_ae,
                len(study_uid),
                len(sop_uid),
            )
            metrics.INSTANCES_REJECTED.labels("invalid_uid").inc()
            return STATUS_BAD_UID
        if is_own_result(header):  # the node holds its results already: nothing to store
            metrics.OWN_RESULTS_DROPPED.labels(calling_ae).inc()
            if state is not None:
                with self._lock:
                    state.dropped += 1
            return STATUS_SUCCESS
        series_uid = _text(header, "SeriesInstanceUID")
        if series_uid and not is_safe_uid(series_uid):
            series_uid = ""
        record = InstanceRecord(
            study_uid=study_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            series_uid=series_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            modality=_text(header, "Modality")[:16],
            body_part=body_part(header),
            path=self.spool.relative_for(study_uid, sop_uid),
            size=len(data[0]) + len(data[1]),
            calling_ae=calling_ae,
            crc32=crc32_of(data),  # the journal's record takes it as it is
            study_date=study_date(header),
        )
        patient_id = _text(header, "PatientID") if self._audit_patient_id else ""
        journal = self.journal
        if (
            journal is not None
            and state is not None
            and record.size <= self._journal_max_bytes
            and self._ledger_works
            and self._spool_works
            and on_fast_path()
        ):
            return self._store_journaled(record, data, state, patient_id, journal)
        if journal is None:
            existed = self.spool.holds(record.path)
            stored = self._store_file(record, data, existed, sync_file=True)
            if isinstance(stored, int):
                return stored
            return self._record(record, stored, existed, state, patient_id)
        # A large instance's bytes are flushed in the spool only; the journal gets its CRC.
        spooled = record.size > self._journal_max_bytes
        try:  # the record is flushed while the spool file is written
            if spooled:
                ticket = journal.write_spooled(dict(vars(record)), data, data_crc=record.crc32)
            else:
                ticket = journal.write(dict(vars(record)), data, payload_crc=record.crc32)
        except JournalError as exc:
            log.error("C-STORE from %s: %s", calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc()
            return STATUS_OUT_OF_RESOURCES
        try:
            # While the record is flushed: whether an earlier version is in the spool (kept
            # if this one fails).
            existed = self.spool.holds(record.path)
            stored = self._store_file(
                record,
                data,
                existed,
                sync_file=spooled,
                wait_durable=lambda: journal.wait_durable(ticket),
            )
        except BaseException:
            journal.done(ticket)
            raise
        if isinstance(stored, int):
            journal.withdraw(ticket)
            journal.done(ticket)
            return stored

        # The instance is durable (journal, or spool for a spooled record): once the ledger is
        # known to work, answer first; the row is written with the association's next ones.
        if (
            self._ledger_works
            and state is not None
            and after_response(
                lambda: self._queue_row(state, _PendingRow(record, ticket, patient_id, stored))
            )
        ):
            return STATUS_SUCCESS
        try:
            return self._record(record, stored, existed, state, patient_id, journal, ticket)
        finally:
            journal.done(ticket)

    def _store_journaled(
        self,
        record: InstanceRecord,
        data: Buffers,
        state: _AssociationState,
        patient_id: str,
        journal: IngestJournal,
    ) -> int:
        """An instance up to ``journal_max_bytes`` (CT slices included) on the fast path:
        answered once its journal record is on disk; the spool file is written after the
        answer, and the ledger row queued (:class:`_PendingRows`). Should the file fail then
        (a full disk), the instance is safe in the journal all the same, and the journal's
        checkpoint writes it; until a spool file can be written again, the SCP writes each
        before it answers (and refuses with 0xA700 while it cannot)."""
        try:
            ticket = journal.write(
                dict(vars(record)), data, head_start=False, payload_crc=record.crc32
            )
        except JournalError as exc:
            log.error("C-STORE from %s: %s", record.calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc()
            return STATUS_OUT_OF_RESOURCES
        try:
            journal.wait_durable(ticket)
        except JournalError as exc:
            log.error("C-STORE from %s: %s", record.calling_ae, exc)
            journal.withdraw(ticket)
            journal.done(ticket)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc()
            return STATUS_OUT_OF_RESOURCES

        def spool_and_queue() -> None:
            try:
                written = self.spool.write(
                    record.study_uid, record.sop_instance_uid, data, sync=False
                )
            except SpoolError as exc:
                self._spool_works = False
                log.error(
                    "C-STORE from %s: an acknowledged instance could not be written to the"
                    " spool (%s); the journal's checkpoint writes it",
                    record.calling_ae,
                    exc,
                )
                self._unrecorded(journal, ticket, record.path, self.spool.identity(record.path))
                journal.done(ticket)
                return
            self._queue_row(state, _PendingRow(record, ticket, patient_id, written))

        if not after_response(spool_and_queue):  # on_fast_path() said it would
            spool_and_queue()
            self._write_rows(state)
        return STATUS_SUCCESS

    def _queue_row(self, state: _AssociationState, row: _PendingRow) -> None:
        """Add an answered instance's row to its association's pending rows; write them if
        they are due, else make sure an idle association writes them."""
        pending = state.pending
        now = time.monotonic()
        with pending.lock:
            if not pending.rows:
                pending.since = now
            pending.rows.append(row)
            due = len(pending.rows) >= ROW_BATCH or now - pending.since >= ROW_MAX_DELAY_S
            register = not due and not pending.on_idle
            pending.on_idle = pending.on_idle or register
        if register and not when_idle(lambda: self._write_rows(state, idle=True)):
            due = True
        if due:
            self._write_rows(state)

    def _write_rows(self, state: _AssociationState, *, idle: bool = False) -> None:
        """Write an association's pending rows in one transaction (``idle``: the write that
        the DUL ran for an idle association). If that fails, the instances are safe in the
        journal (they were answered), its checkpoint records them, and until a row can be
        written again the SCP answers only after the row."""
        pending = state.pending
        journal = self.journal
        with pending.lock:
            if idle:
                pending.on_idle = False
            rows, pending.rows = pending.rows, []
            if not rows or journal is None:
                return
            with self._lock:
                known = set(state.study_uids)
            batch: list[tuple[InstanceRecord, bool]] = []
            for row in rows:
                study_uid = row.record.study_uid
                batch.append((row.record, study_uid not in known))
                known.add(study_uid)
            try:
                recorded = self.ledger.record_instances(
                    batch,
                    flushed=False,
                    file_is_current=lambda i: self.spool.is_current(
                        rows[i].record.path, rows[i].written
                    ),
                    holder=self._holder,
                )
            except Exception:
                for row in rows:
                    left = (row.written.inode, row.written.size)
                    self._unrecorded(journal, row.ticket, row.record.path, left)
                self._ledger_failed(
                    "C-STORE from %s: the ledger could not record %d acknowledged instance(s);"
                    " the journal's checkpoint records them",
                    state.calling_ae,
                    len(rows),
                )
                return
            finally:
                for row in rows:
                    journal.done(row.ticket)
            self._ledger_works = True
            for row, result in zip(rows, recorded, strict=True):
                self._note_recorded(row.record, result, state, row.patient_id)

    def _store_file(
        self,
        record: InstanceRecord,
        data: Buffers,
        existed: bool,
        *,
        sync_file: bool,
        wait_durable: Callable[[], None] | None = None,
    ) -> SpoolFile | int:
        """Write the spool file; the file written, or a failure status if that fails.

        ``sync_file``: flush the spool file and its directory entry (the spool's ``fsync``
        setting permitting); not for an instance whose bytes the journal holds.
        ``wait_durable`` waits until the journal record is on disk, which must come before the
        answer and the ledger row (see :mod:`.journal`); if it fails, so does the store.
        """
        try:
            written = self.spool.write(
                record.study_uid, record.sop_instance_uid, data, sync=None if sync_file else False
            )
        except SpoolError as exc:
            log.error("C-STORE from %s: %s", record.calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc()
            return STATUS_OUT_OF_RESOURCES
        self._spool_works = True
        if wait_durable is not None:
            try:
                wait_durable()
            except JournalError as exc:
                log.error("C-STORE from %s: %s", record.calling_ae, exc)
                if not existed:
                    self.spool.discard(Path(written.path))
                metrics.INSTANCES_REJECTED.labels("spool_error").inc()
                return STATUS_OUT_OF_RESOURCES
        return written

    def _record(
        self,
        record: InstanceRecord,
        written: SpoolFile,
        existed: bool,
        state: _AssociationState | None,
        patient_id: str,
        journal: IngestJournal | None = None,
        ticket: Ticket | None = None,
    ) -> int:
        """Write the instance's ledger row before the answer (flushed unless the journal holds
        the instance) and note it for its association; the status to answer. A failure is
        answered, and the file and the journal record withdrawn (rows written after the
        answer: :meth:`_write_rows`); the association's pending rows are written first, so
        that rows are written in the order the instances came."""
        if state is not None and state.pending.rows:
            self._write_rows(state)
        first = state is not None and record.study_uid not in state.study_uids
        try:
            recorded = self.ledger.record_instances(
                [(record, first)],
                flushed=journal is None,
                file_is_current=lambda _: self.spool.is_current(record.path, written),
                holder=self._holder,
            )[0]
        except Exception:
            self._ledger_failed(
                "C-STORE from %s: the ledger could not record the instance", record.calling_ae
            )
            if not existed:
                self.spool.discard(Path(written.path))
            if journal is not None and ticket is not None:
                journal.withdraw(ticket)
            metrics.INSTANCES_REJECTED.labels("ledger_unavailable").inc()
            return STATUS_LEDGER_UNAVAILABLE
        self._ledger_works = True
        self._note_recorded(record, recorded, state, patient_id)
        return STATUS_SUCCESS

    def _ledger_failed(self, message: str, *args: object) -> None:
        """Log a ledger write that failed: with its traceback if the ledger worked until now,
        else one line (a database that is down for minutes, a traceback per C-STORE refused)."""
        if self._ledger_works:
            self._ledger_works = False
            log.exception(message, *args)
        else:
            log.error(message + " (%s)", *args, failure_summary(sys.exc_info()[1]))

    def _note_recorded(
        self,
        record: InstanceRecord,
        recorded: Recorded,
        state: _AssociationState | None,
        patient_id: str,
    ) -> None:
        """An instance's row is written: note it for its association (the audit record and
        completion at its end), in the metrics and for completion."""
        study_uid = record.study_uid
        if recorded.moved_from:
            self.spool.remove_moved(recorded.moved_from)
        if recorded.superseded:
            log.warning(
                "C-STORE from %s: study_id=%d: another association stored another version of"
                " an instance at the same moment; the ledger describes the version kept",
                record.calling_ae,
                recorded.study_id,
            )
        if state is not None:
            with self._lock:
                state.study_uids.add(study_uid)
                state.study_ids.add(recorded.study_id)
                state.stored[study_uid] = state.stored.get(study_uid, 0) + 1
                state.unchanged += recorded.unchanged
                state.kept += recorded.kept
                if self._audit_patient_id:
                    state.patient_ids.add(patient_id)
        log.debug(
            "stored study_id=%d sop_class=%s size=%d%s",
            recorded.study_id,
            record.sop_class_uid,
            record.size,
            " (re-opened study)" if recorded.reopened else "",
        )
        metrics.INSTANCES_RECEIVED.labels(record.calling_ae).inc()
        if self.on_instance is not None:
            self.on_instance(recorded.study_id)
        if self.signals is not None:
            self.signals.instance_arrived(study_uid)
