"""The storage SCP: C-ECHO, and C-STORE of every standard storage SOP class.

The C-STORE handler keeps the hot path short: it takes the encoded bytes as received (file meta
plus ``event.encoded_dataset()``, no full decode), reads only the few header attributes it needs
(stopping before pixel data), writes the file atomically to the spool, records it in the ledger,
and only then answers success. Anything that fails answers a DIMSE failure status and leaves no
partial file.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from acwi_node.config import Settings
from acwi_node.ingest.mpps import MPPS_SOP_CLASS, CompletionSignals, MppsSCP
from acwi_node.ingest.spool import Spool, SpoolError, is_safe_uid
from acwi_node.ledger import InstanceRecord, Ledger
from acwi_node.observability import metrics
from acwi_node.observability.logging import note_identifiers

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

# DIMSE status codes the handler answers (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_LEDGER_UNAVAILABLE = 0xA701  # out of resources: the ledger cannot record the instance
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_BAD_UID = 0xC001  # cannot understand: a UID unsafe to store (path-like, too long)
STATUS_MISSING_UID = 0xC002  # cannot understand: no Study/SOP Instance UID

_HEADER_TAGS = [
    Tag(0x0008, 0x0016),  # SOPClassUID
    Tag(0x0008, 0x0018),  # SOPInstanceUID
    Tag(0x0008, 0x0060),  # Modality
    Tag(0x0010, 0x0010),  # PatientName: only to keep it out of the logs (note_identifiers)
    Tag(0x0010, 0x0020),  # PatientID: likewise
    Tag(0x0018, 0x0015),  # BodyPartExamined
    Tag(0x0020, 0x000D),  # StudyInstanceUID
    Tag(0x0020, 0x000E),  # SeriesInstanceUID
]


def read_header(data: bytes) -> Dataset:
    """The header attributes routing needs, from a Part-10 byte string, without pixel data."""
    return dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


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


@dataclass
class _AssociationState:
    calling_ae: str
    study_uids: set[str] = field(default_factory=set)
    study_ids: set[int] = field(default_factory=set)
    released: bool = False


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
        self.mpps = MppsSCP(signals) if settings.ingest.mpps else None
        self._release_complete = {a.strip() for a in settings.completion.release_complete_aes}
        self._assocs: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()
        self._server: Any = None

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
        return ae

    # ------------------------------------------------------------------ server
    def _on_connection(self, event: evt.Event) -> None:
        """Give the accepted socket a read timeout before its association thread starts.

        pynetdicom's accepted sockets block forever: a peer that stops in the middle of a PDU
        (half a PDU, a huge declared length) would hold an association slot for good. With a
        timeout the read fails after ``network_timeout_s`` and the connection is closed.
        """
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.settimeout(self.settings.ingest.network_timeout_s)

    def start(self, *, block: bool = False) -> None:
        """Listen on the configured host and port."""
        node = self.settings.node
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
        address = (node.dicom_host, node.dicom_port)
        log.info("storage SCP %s listening on %s:%d", node.ae_title, *address)
        if block:
            self.ae.start_server(address, block=True, evt_handlers=handlers)
        else:
            self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)

    @property
    def listening(self) -> bool:
        """True while the DICOM listener's socket is open (readiness)."""
        return self._server is not None and self._server.socket.fileno() >= 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    # ---------------------------------------------------------------- handlers
    def _on_accepted(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        with self._lock:
            self._assocs[id(event.assoc)] = _AssociationState(calling_ae=calling)
        log.info("association accepted from %s (%s)", calling, event.assoc.requestor.address)

    def _on_rejected(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS_REJECTED.inc()
        log.warning(
            "association rejected from %s (%s)",
            event.assoc.requestor.ae_title.strip(),
            event.assoc.requestor.address,
        )

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            state = self._assocs.get(id(event.assoc))
            if state is not None:
                state.released = True

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
        if state is None or not state.study_ids:
            return
        try:
            self.ledger.association_released(sorted(state.study_ids))
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
        """Persist one instance, then answer. Never raises."""
        with self._lock:
            state = self._assocs.get(id(event.assoc))
        calling_ae = state.calling_ae if state else event.assoc.requestor.ae_title.strip()
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("C-STORE from %s: cannot encode the received dataset: %s", calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("unencodable").inc()
            return STATUS_CANNOT_UNDERSTAND
        try:
            header = read_header(data)
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError) as exc:
            log.warning("C-STORE from %s: cannot parse the dataset header: %s", calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("unparseable_header").inc()
            return STATUS_CANNOT_UNDERSTAND
        note_identifiers(header)  # from here on, no log line can show this patient's name/ID
        request = cast(C_STORE, event.request)
        sop_uid = _text(header, "SOPInstanceUID") or str(request.AffectedSOPInstanceUID or "")
        sop_class = str(request.AffectedSOPClassUID or "") or _text(header, "SOPClassUID")
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
        series_uid = _text(header, "SeriesInstanceUID")
        if series_uid and not is_safe_uid(series_uid):
            series_uid = ""
        existed = self.spool.path_for(study_uid, sop_uid).exists()
        try:
            path = self.spool.store(study_uid, sop_uid, data)
        except SpoolError as exc:
            log.error("C-STORE from %s: %s", calling_ae, exc)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc()
            return STATUS_OUT_OF_RESOURCES
        record = InstanceRecord(
            study_uid=study_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            series_uid=series_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            modality=_text(header, "Modality")[:16],
            body_part=_text(header, "BodyPartExamined")[:64],
            path=self.spool.relative(path),
            size=len(data),
            calling_ae=calling_ae,
        )
        first = state is not None and study_uid not in state.study_uids
        try:
            recorded = self.ledger.record_instance(record, first_in_association=first)
        except Exception:
            log.exception("C-STORE from %s: the ledger could not record the instance", calling_ae)
            if not existed:
                self.spool.discard(path)
            metrics.INSTANCES_REJECTED.labels("ledger_unavailable").inc()
            return STATUS_LEDGER_UNAVAILABLE
        if state is not None:
            with self._lock:
                state.study_uids.add(study_uid)
                state.study_ids.add(recorded.study_id)
        log.debug(
            "stored study_id=%d sop_class=%s size=%d%s",
            recorded.study_id,
            sop_class,
            len(data),
            " (re-opened study)" if recorded.reopened else "",
        )
        metrics.INSTANCES_RECEIVED.labels(calling_ae).inc()
        if self.on_instance is not None:
            self.on_instance(recorded.study_id)
        if self.signals is not None:
            self.signals.instance_arrived(study_uid)
        return STATUS_SUCCESS
