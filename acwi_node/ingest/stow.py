"""Studies received by DICOMweb: the STOW-RS origin server (PS3.18 10.5, Store Transaction).

A PACS, a VNA or a cloud archive that sends by DICOMweb instead of DIMSE posts
``multipart/related; type="application/dicom"`` bodies to ``/dicomweb/studies`` (or
``/dicomweb/studies/{study}``, which every instance must belong to). Each part is one Part 10
object. What the C-STORE SCP promises holds here too: an object is answered as stored only once
its spool file (flushed, with its directory entry) and its ledger row (flushed) are on disk;
nothing from a data set names a path but UIDs that pass :func:`~.spool.is_safe_uid`; a part
that cannot be stored is refused alone, with a failure reason, and the rest are stored. The
node's own results coming back are answered as stored and not stored (:mod:`.own_results`).

A request plays the part of an association: its studies are marked as being received while it
runs (the quiet period counts from its end, as from a release) and as released when it ends.
The receiving process counts them as its own under its name (:mod:`.holders`): if it is killed
before a request's end is recorded, a process that finds it gone releases them.
The sending account's name (its first 16 characters) stands for the calling AE title, in the
ledger, in routing rules (``calling_ae``) and in the audit trail.

The response (PS3.18 Table 10.5.3-1 and 10.5.3-2) is DICOM JSON, or the Native DICOM Model
(XML) for a client that asks for it: ``200`` when every object was
stored, ``202`` when some were (Referenced SOP Sequence and Failed SOP Sequence), ``409`` when
none was; Failure Reasons are C-STORE statuses (0xA700 out of resources, 0xC000 cannot
understand, 0xA900 a Study Instance UID other than the request's, 0xC211 the ledger is
unavailable).
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from pydicom.datadict import keyword_for_tag
from pydicom.filereader import _read_file_meta_info, read_preamble

from acwi_node.audit import AuditEvent, Outcome, audit, remote_ae
from acwi_node.ingest.checksum import crc32
from acwi_node.ingest.header import (
    DEFLATED,
    LONG_VRS,
    HeaderError,
    body_part,
    dataset_header,
    deflated_header,
    describe,
    pydicom_header,
    study_date,
)
from acwi_node.ingest.holders import HolderName
from acwi_node.ingest.journal import sync_filesystem
from acwi_node.ingest.own_results import is_own_result
from acwi_node.ingest.spool import Spool, SpoolError, is_safe_uid
from acwi_node.ledger import InstanceRecord, Ledger
from acwi_node.observability import metrics
from acwi_node.observability.logging import note_identifiers

log = logging.getLogger("acwi_node.ingest")

#: Failure Reasons (0008,1197) of the response: the C-STORE statuses the SCP answers with.
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
LEDGER_UNAVAILABLE = 0xC211

_REFERENCED_SOP_CLASS = "00081150"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"


def file_meta(data: bytes | memoryview) -> tuple[str, int] | None:
    """The transfer syntax of a Part 10 file and where its data set starts, read from its File
    Meta Information (explicit VR little endian, defined lengths, as PS3.10 requires); None for
    anything else (pydicom then reads the file, or refuses it)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    position, syntax = 132, ""
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            return (syntax, position) if syntax else None
        if bytes(data[position + 4 : position + 6]) in LONG_VRS:
            if position + 12 > len(data):
                return None
            (length,) = struct.unpack_from("<I", data, position + 8)
            value = position + 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            value = position + 8
        if length == 0xFFFFFFFF or value + length > len(data):
            return None
        if element == 0x0010:
            syntax = bytes(data[value : value + length]).rstrip(b"\0 ").decode("ascii", "replace")
        position = value + length
    return None


def read_header(data: bytes | memoryview) -> tuple[str, dict[str, str]]:
    """A Part 10 file's transfer syntax and the header attributes the node needs: read with
    :func:`file_meta` and :func:`~.header.dataset_header` where they can (a view is not copied),
    a deflated data set inflated only as far as they go (:func:`~.header.deflated_header`),
    else by pydicom. Raises :class:`~.header.HeaderError` for what cannot be read (not a
    DICOM file, a corrupt deflate stream, whatever pydicom raised)."""
    found = file_meta(data)
    if found is not None:
        syntax, start = found
        return syntax, dataset_header(data[start:], syntax, lambda: bytes(data))
    try:
        whole = bytes(data)
        stream = io.BytesIO(whole)
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if syntax == DEFLATED:  # never pydicom: it would inflate the whole data set
            return syntax, deflated_header(memoryview(whole)[stream.tell() :])
        return syntax, pydicom_header(whole)
    except HeaderError:
        raise
    except Exception as exc:
        raise HeaderError(describe(exc)) from exc


class MultipartError(ValueError):
    """A request body that is not a ``multipart/related`` body of DICOM objects."""


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` content type;
    raises :class:`MultipartError` for any other content type."""
    kind, _, rest = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        raise MultipartError("the body must be multipart/related")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        name, _, value = item.partition("=")
        if name.strip():
            params[name.strip().lower()] = value.strip().strip('"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise MultipartError(f"multipart/related of {part_type!r}: only application/dicom")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise MultipartError("multipart/related without a boundary")
    return boundary


def split_parts(raw: bytes | mmap.mmap, boundary: str) -> list[memoryview]:
    """The bodies of the parts of a multipart body (RFC 2046), as views into ``raw`` (bytes,
    or a request body mapped from its file). A part whose own Content-Type is given must be
    ``application/dicom``."""
    data = memoryview(raw)
    parts: list[memoryview] = []
    try:
        _split(raw, data, boundary, parts)
    except BaseException:  # no view left behind: the caller may close a mapping
        for part in parts:
            part.release()
        raise
    finally:
        data.release()
    return parts


def _split(
    raw: bytes | mmap.mmap, data: memoryview, boundary: str, parts: list[memoryview]
) -> None:
    delimiter = b"--" + boundary.encode("latin-1")
    start = raw.find(delimiter)
    if start < 0:
        raise MultipartError("the body holds no part (boundary not found)")
    position = start + len(delimiter)
    while True:
        if raw[position : position + 2] == b"--":
            return  # the close delimiter
        line_end = raw.find(b"\r\n", position)
        if line_end < 0:
            raise MultipartError("the body ends inside a part")
        headers_end = raw.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            raise MultipartError("a part without the blank line after its headers")
        headers = raw[line_end + 2 : headers_end].decode("latin-1")
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            part_type = value.split(";")[0].strip().lower()
            if name.strip().lower() == "content-type" and part_type != "application/dicom":
                raise MultipartError(f"a part of type {value.strip()!r}, not application/dicom")
        content_start = headers_end + 4
        next_delimiter = raw.find(b"\r\n" + delimiter, content_start)
        if next_delimiter < 0:
            raise MultipartError("the body ends inside a part (no closing boundary)")
        parts.append(data[content_start:next_delimiter])
        position = next_delimiter + 2 + len(delimiter)


@dataclass
class StowResult:
    """What became of each object of one request."""

    #: (SOP Class UID, SOP Instance UID) of each object stored.
    stored: list[tuple[str, str]] = field(default_factory=list)
    #: (SOP Class UID, SOP Instance UID, Failure Reason) of each refused; UIDs "" if unknown.
    failed: list[tuple[str, str, int]] = field(default_factory=list)
    #: Of ``stored``, the node's own results that came back: answered as stored, not stored
    #: (:mod:`.own_results`).
    dropped: int = 0
    #: Of ``stored``, instances sent again unchanged to a study that keeps its results (it
    #: was not re-opened: :data:`~acwi_node.ledger.repository.KEEPS_RESULTS`).
    unchanged: int = 0
    #: Of ``stored``, objects no model reads added to a study that keeps its results (it is
    #: not re-opened).
    kept: int = 0
    #: The stored instances' Patient IDs, where the audit trail names them
    #: (``StowReceiver.audit_patient_id``).
    patient_ids: set[str] = field(default_factory=set)
    #: The ledger ids of the studies the stored instances belong to.
    study_ids: set[int] = field(default_factory=set)

    @property
    def status(self) -> int:
        """The HTTP status: 200 all stored, 202 some, 409 none."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self, base_url: str) -> dict[str, Any]:
        """The DICOM JSON response (PS3.18 Table 10.5.3-2)."""
        body: dict[str, Any] = {}
        if self.stored:
            body[_REFERENCED_SOP_SEQUENCE] = {
                "vr": "SQ",
                "Value": [
                    {
                        _REFERENCED_SOP_CLASS: {"vr": "UI", "Value": [sop_class]},
                        _REFERENCED_SOP_INSTANCE: {"vr": "UI", "Value": [sop_uid]},
                    }
                    for sop_class, sop_uid in self.stored
                ],
            }
        if self.failed:
            items = []
            for sop_class, sop_uid, reason in self.failed:
                item: dict[str, Any] = {_FAILURE_REASON: {"vr": "US", "Value": [reason]}}
                if sop_class:
                    item[_REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [sop_class]}
                if sop_uid:
                    item[_REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [sop_uid]}
                items.append(item)
            body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": items}
        body[_RETRIEVE_URL] = {"vr": "UR", "Value": [base_url]}
        return body

    def response_xml(self, base_url: str) -> bytes:
        """The same response in the Native DICOM Model (PS3.19 A.1), for a client that asks
        for ``application/dicom+xml``."""
        return native_dicom_model(self.response(base_url))


_NATIVE_DICOM_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


def native_dicom_model(dataset: dict[str, Any]) -> bytes:
    """A DICOM JSON data set (PS3.18 F.2; string, number and sequence values) written in the
    Native DICOM Model (PS3.19 A.1): attributes in tag order, each with its keyword."""
    root = ElementTree.Element("NativeDicomModel", xmlns=_NATIVE_DICOM_NAMESPACE)
    root.set("xml:space", "preserve")
    _add_attributes(root, dataset)
    return ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True)


def _add_attributes(parent: ElementTree.Element, dataset: dict[str, Any]) -> None:
    for tag in sorted(dataset):
        attribute = dataset[tag]
        element = ElementTree.SubElement(
            parent, "DicomAttribute", {"tag": tag, "vr": attribute["vr"]}
        )
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            element.set("keyword", keyword)
        for number, value in enumerate(attribute.get("Value", []), start=1):
            if attribute["vr"] == "SQ":
                item = ElementTree.SubElement(element, "Item", number=str(number))
                _add_attributes(item, value)
            else:
                ElementTree.SubElement(element, "Value", number=str(number)).text = str(value)


class BodyFile:
    """A multipart body (a STOW-RS request's, a WADO-RS response's), kept in a file beside the
    spool while its objects are stored.

    ``.part``: what a crash leaves, the next start of the scp removes (``Spool.clean_tmp``).
    The body is read back through the descriptor it was written with: the name may be gone
    meanwhile (``clean_tmp``)."""

    def __init__(self, spool: Spool, prefix: str = "stow") -> None:
        self.path = os.path.join(spool.tmp_dir, f"{prefix}-{uuid.uuid4().hex}.part")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def discard(self) -> None:
        """Remove the file (its name first: its pages are then dropped, never written) and
        close it; once, whoever calls it first."""
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # Marked closed first: a close() that reports an error (NFS reports ENOSPC, EDQUOT or
        # EIO there) has released the number all the same, and another thread may take it.
        fd, self.fd = self.fd, -1
        os.close(fd)


def close_mapping(mapped: mmap.mmap) -> None:
    """Unmap a request's body. The parts are read where they lie, so a view of one may still
    be alive (held by the traceback of an error that refused the part): then the mapping goes
    when that view does."""
    try:
        mapped.close()
    except BufferError:
        log.debug("a view of a multipart body outlives it; unmapped with it")


class StowReceiver:
    """Stores the objects of STOW-RS requests in the spool and the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        spool: Spool,
        *,
        audit_patient_id: bool = False,
        holder: HolderName | None = None,
    ) -> None:
        self.ledger = ledger
        self.spool = spool
        #: Name the patients' IDs in the audit record (``[audit] patient_id``).
        self.audit_patient_id = audit_patient_id
        #: The process's name, under which the ledger counts the requests it has open as its
        #: own (:mod:`.holders`); None: the studies alone count them.
        self.holder = holder

    @property
    def _holder_name(self) -> str | None:
        return None if self.holder is None else self.holder.name

    def receive(
        self,
        parts: Sequence[memoryview],
        *,
        sender: str,
        address: str,
        study_uid: str | None = None,
        written_out: Callable[[], None] | None = None,
        end_of_request: bool = True,
        opened: set[str] | None = None,
    ) -> StowResult:
        """Store each part; ``sender`` is the account that sent them (the calling AE title
        in the ledger: its first 16 characters), ``study_uid`` the request's study, if any.
        With ``end_of_request`` False the parts are one of several calls of one request (a
        C-GET's C-STOREs): ``opened`` (shared by the calls) holds the studies the request has
        sent instances of so far, and the caller records its end
        and audits it (:meth:`end_request`).

        The request is answered once, for all its objects, so they are flushed together: every
        spool file written, then one flush of the spool's file system (files and directory
        entries), then every ledger row in one transaction, flushed once. ``written_out`` is
        called between the two, when no part is read any more: the caller lets the body go
        there (a body kept in a file would otherwise be written to disk by that flush too)."""
        calling = sender[:16]
        result = StowResult()
        studies: dict[str, int] = {}
        study_ids = result.study_ids
        patient_ids = result.patient_ids
        written: dict[str, _Written] = {}
        try:
            for part in parts:
                try:
                    done = self._write(part, calling, study_uid, result)
                except Exception as exc:  # this part's refusal; the others are stored
                    log.error(
                        "STOW-RS from %s: refused a part, it could not be stored: %s",
                        calling,
                        describe(exc),
                    )
                    log.debug("the STOW-RS part's failure", exc_info=True)
                    metrics.INSTANCES_REJECTED.labels("handler_error").inc()
                    result.failed.append(("", "", CANNOT_UNDERSTAND))
                    continue
                if done is not None:
                    earlier = written.pop(done.record.sop_instance_uid, None)
                    if earlier is not None:  # sent twice: the later bytes are in the file
                        done.existed = earlier.existed
                        done.order = earlier.order + done.order
                    written[done.record.sop_instance_uid] = done
            if written_out is not None:
                written_out()
            committing, pending = list(written.values()), written
            written = {}  # from here on _commit owns the files: it records or removes them
            if (
                committing
                and self._commit(
                    committing,
                    calling,
                    result,
                    studies,
                    study_ids,
                    set() if opened is None else opened,
                )
                and self.audit_patient_id
            ):  # the stored instances' patients only, as the SCP's record names
                patient_ids.update(w.patient_id for w in pending.values())
        except BaseException:
            # Spool files written and never recorded would be orphans: removed (a file that
            # held an earlier version stays, as when the ledger refuses, with that version's row).
            for w in written.values():
                if not w.existed:
                    self.spool.discard(w.path)
            raise
        finally:
            if end_of_request:
                self.end_request(result, studies, sender=calling, address=address)
        return result

    def end_request(
        self,
        result: StowResult,
        studies: dict[str, int],
        *,
        sender: str,
        address: str,
        how: str = "STOW-RS",
    ) -> None:
        """A request has ended: its studies' sending association is closed in the ledger (a
        completion signal), and its instances are audited (none when nothing came):
        ``studies`` counts the instances stored of each study."""
        if result.study_ids:
            try:
                self.ledger.association_released(sorted(result.study_ids), holder=self._holder_name)
            except Exception:  # released when this process stops or is found gone
                log.exception("%s from %s: could not record the request's end", how, sender)
        if not result.stored and not result.failed:
            return
        audit(
            AuditEvent.INSTANCES_RECEIVED,
            outcome=Outcome.MINOR_FAILURE if result.failed else Outcome.SUCCESS,
            participants=[remote_ae(sender[:16], address, requestor=True)],
            study_uids=sorted(studies),
            instances=dict(studies),
            patient_ids=sorted(result.patient_ids),
            detail=f"{len(result.stored) - result.dropped} instance(s) stored by {how}"
            + (f", {len(result.failed)} refused" if result.failed else "")
            + (
                f", {result.dropped} of the node's own results not stored" if result.dropped else ""
            ),
        )

    def receive_file(
        self, body: BodyFile, boundary: str, sender: str, address: str, study_uid: str | None
    ) -> StowResult:
        """:meth:`receive` the parts of a multipart body kept in ``body`` (mapped, never read
        whole into memory); the body's file is discarded as soon as every part is in its spool
        file. Raises :class:`MultipartError` for a body that holds no part."""
        if os.fstat(body.fd).st_size == 0:
            raise MultipartError("an empty body")
        mapped = mmap.mmap(body.fd, 0, access=mmap.ACCESS_READ)
        parts: list[memoryview] = []

        def let_go() -> None:
            """Every part is in its spool file: the body's file goes before the flush (an
            unlinked file's pages are dropped, not written), so the flush writes each object
            once, not twice."""
            for part in parts:
                part.release()
            close_mapping(mapped)
            body.discard()

        try:
            parts = split_parts(mapped, boundary)  # a body that is not multipart: unmapped too
            if not parts:
                raise MultipartError("the body holds no part")
            return self.receive(
                parts, sender=sender, address=address, study_uid=study_uid, written_out=let_go
            )
        finally:
            for part in parts:
                part.release()
            close_mapping(mapped)

    def _write(
        self, part: memoryview, calling: str, expected_study: str | None, result: StowResult
    ) -> _Written | None:
        """Check one part and write its spool file (not flushed yet); None, with the outcome
        noted in ``result``, if it cannot be stored. The part is read and written where it
        lies (the mapped body), never copied whole: an object of gigabytes costs no memory."""
        data = part
        try:
            transfer_syntax, header = read_header(data)
        except HeaderError as exc:
            log.warning("STOW-RS from %s: refused a part that cannot be read: %s", calling, exc)
            metrics.INSTANCES_REJECTED.labels("unparseable_header").inc()
            result.failed.append(("", "", CANNOT_UNDERSTAND))
            return None
        note_identifiers(header)  # from here on, no log line can show this patient's name/ID
        sop_class = header.get("SOPClassUID", "")
        sop_uid = header.get("SOPInstanceUID", "")
        study_uid = header.get("StudyInstanceUID", "")
        if not transfer_syntax or not sop_uid or not study_uid:
            log.warning(
                "STOW-RS from %s: missing transfer syntax, Study or SOP Instance UID", calling
            )
            metrics.INSTANCES_REJECTED.labels("missing_uid").inc()
            result.failed.append((sop_class, sop_uid, CANNOT_UNDERSTAND))
            return None
        if not (is_safe_uid(sop_uid) and is_safe_uid(study_uid)):
            log.warning(
                "STOW-RS from %s: refused an instance with an invalid UID (%d/%d chars)",
                calling,
                len(study_uid),
                len(sop_uid),
            )
            metrics.INSTANCES_REJECTED.labels("invalid_uid").inc()
            result.failed.append((sop_class, "", CANNOT_UNDERSTAND))
            return None
        if expected_study is not None and study_uid != expected_study:
            log.warning("STOW-RS from %s: an instance of another study than the request's", calling)
            metrics.INSTANCES_REJECTED.labels("other_study").inc()
            result.failed.append((sop_class, sop_uid, DOES_NOT_MATCH))
            return None
        if is_own_result(header):  # the node holds its results already: nothing to store
            metrics.OWN_RESULTS_DROPPED.labels(calling).inc()
            result.stored.append((sop_class, sop_uid))
            result.dropped += 1
            return None
        series_uid = header.get("SeriesInstanceUID", "")
        record = InstanceRecord(
            study_uid=study_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            series_uid=series_uid if is_safe_uid(series_uid) else "",
            transfer_syntax_uid=transfer_syntax,
            modality=header.get("Modality", "")[:16],
            body_part=body_part(header),
            path=self.spool.relative_for(study_uid, sop_uid),
            size=len(data),
            calling_ae=calling,
            crc32=crc32(data),
            study_date=study_date(header),
        )
        existed = self.spool.holds(record.path)
        try:
            path = self.spool.store(study_uid, sop_uid, data, sync=False)  # flushed in _commit
        except SpoolError as exc:
            log.error("STOW-RS from %s: %s", calling, exc)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc()
            result.failed.append((sop_class, sop_uid, OUT_OF_RESOURCES))
            return None
        return _Written(record, path, existed, header.get("PatientID", ""), [sop_class])

    def _commit(
        self,
        written: list[_Written],
        calling: str,
        result: StowResult,
        studies: dict[str, int],
        study_ids: set[int],
        opened: set[str],
    ) -> bool:
        """Flush the written files, then record their rows (flushed), in one go each; a
        failure of either refuses every object of the batch and removes its new files.
        ``opened``: the studies the request sent instances of before (each study's first
        opens it: ``Ledger.association_released`` closes it). Whether they were stored."""
        reason = 0
        try:
            if self.spool.fsync:
                sync_filesystem(self.spool.root)
        except OSError as exc:
            log.error("STOW-RS from %s: cannot flush the spool: %s", calling, exc.strerror or exc)
            metrics.INSTANCES_REJECTED.labels("spool_error").inc(len(written))
            reason = OUT_OF_RESOURCES
        recorded = []
        if not reason:
            seen = set(opened)
            batch = []
            for w in written:
                batch.append((w.record, w.record.study_uid not in seen))
                seen.add(w.record.study_uid)
            try:
                recorded = self.ledger.record_instances(
                    batch, flushed=True, holder=self._holder_name
                )
            except Exception:
                log.exception("STOW-RS from %s: the ledger could not record the instances", calling)
                metrics.INSTANCES_REJECTED.labels("ledger_unavailable").inc(len(written))
                reason = LEDGER_UNAVAILABLE
        if reason:
            for w in written:
                if not w.existed:
                    self.spool.discard(w.path)
                uid = w.record.sop_instance_uid
                result.failed.extend((sop_class, uid, reason) for sop_class in w.order)
            return False
        opened |= seen
        for w, row in zip(written, recorded, strict=True):
            if row.moved_from:
                self.spool.remove_moved(row.moved_from)
            study = w.record.study_uid
            studies[study] = studies.get(study, 0) + 1
            study_ids.add(row.study_id)
            result.unchanged += row.unchanged
            result.kept += row.kept
            metrics.INSTANCES_RECEIVED.labels(calling).inc()
            uid = w.record.sop_instance_uid
            result.stored.extend((sop_class, uid) for sop_class in w.order)
        return True


@dataclass
class _Written:
    """A part's spool file, written and not yet flushed, and what its ledger row needs."""

    record: InstanceRecord
    path: Path
    existed: bool
    patient_id: str
    #: The SOP Class UID each time this instance came in the request (usually once).
    order: list[str]
