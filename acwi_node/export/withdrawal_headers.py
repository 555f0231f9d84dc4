"""What a rejection note names when its results' files are gone.

A rejection note copies the patient's and the study's attributes from the objects it rejects,
and names each by SOP Class, SOP Instance and Series Instance UID. Once storage retention has
deleted a study's files the node still has the UIDs: the ledger keeps every result's SOP Class
and Instance UIDs, and a result's series is derived from the study, the model and its version
like every UID the node writes (:meth:`~acwi_node.results.uids.ResultUIDs.series_uid`). The
patient and the study it asks of the destination's own archive: the ``[[sources]]`` entry its
``query_source`` names, by a STUDY level C-FIND or a QIDO-RS search. What the archive answers
is what the note must carry, even where the patient's identifiers changed since the study
was analysed (a merge): an archive files a note by them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from pydicom.dataset import Dataset

from acwi_node import MANUFACTURER
from acwi_node.audit import AuditEvent, Outcome, Participant, audit
from acwi_node.config import Settings, Source
from acwi_node.ingest.dicomweb_source import search_study_header
from acwi_node.ingest.qr_scu import STUDY_HEADER_KEYWORDS, StudyHeader, find_study_header
from acwi_node.ingest.retrieval import source_tls
from acwi_node.ledger.withdrawals import WithdrawableJob, WithdrawableResult
from acwi_node.results.charset import result_charset
from acwi_node.results.uids import result_uids
from acwi_node.tls import TlsConfigError

__all__ = [
    "ArchiveDown",
    "ArchiveQueries",
    "HeaderUnavailable",
    "query_source_of",
    "stand_ins",
    "study_header",
]

#: Result kinds whose objects are images (a rejection note lists them as IMAGE items).
_IMAGE_KINDS = ("heatmap", "parametric_map")


class HeaderUnavailable(Exception):
    """The study's patient and study attributes cannot be had; the message says why."""


class ArchiveDown(HeaderUnavailable):
    """The archive did not answer, or refused the query."""


def query_source_of(settings: Settings, destinations: Sequence[str]) -> Source | None:
    """The source that queries the archive of the first of ``destinations`` that names one."""
    for name in destinations:
        try:
            source_name = settings.destination(name).query_source
        except KeyError:
            continue  # no longer configured
        if source_name is not None:
            return settings.source(source_name)
    return None


def _ask(settings: Settings, source: Source, study_uid: str) -> StudyHeader:
    timeout_s = settings.retrieve.timeout_s
    if source.kind == "dicomweb":
        return search_study_header(source, study_uid, timeout_s=timeout_s)
    assert source.ae_title is not None and source.host is not None and source.port
    try:
        tls = source_tls(source)
    except TlsConfigError as exc:
        return StudyHeader(False, error=f"TLS: {exc}")
    return find_study_header(
        study_uid,
        called_ae=source.ae_title,
        host=source.host,
        port=source.port,
        calling_ae=source.calling_ae(settings.node.ae_title),
        timeout_s=timeout_s,
        tls=tls,
    )


def study_header(settings: Settings, source: Source, study_uid: str, by: str) -> Dataset:
    """The study's patient and study attributes as ``source`` holds them; the query is in the
    audit trail (``studies_queried``). Raises :class:`HeaderUnavailable`."""
    answer = _ask(settings, source, study_uid)
    where = "QIDO-RS" if source.kind == "dicomweb" else "C-FIND"
    audit(
        AuditEvent.STUDIES_QUERIED,
        outcome=Outcome.SUCCESS if answer.ok else Outcome.MINOR_FAILURE,
        participants=[
            Participant(
                "ae", source.ae_title or source.name, source.host or source.where, requestor=False
            ),
            Participant("user", by),
        ],
        study_uids=[study_uid],
        detail=f"withdrawal: {where} for the study's patient and study attributes: "
        + (("found" if answer.dataset is not None else "not found") if answer.ok else answer.error),
    )
    if not answer.ok:
        raise ArchiveDown(
            f"asking {source.name} for the study's patient and study attributes failed:"
            f" {answer.error}; withdraw again once it answers"
        )
    if answer.dataset is None:
        raise HeaderUnavailable(
            f"{source.name} does not have the study, so its results are not there either"
        )
    return answer.dataset


class ArchiveQueries:
    """The archives one withdrawal request asks (:func:`study_header`): each study once, and
    an archive that failed is not asked again in the request, so that a recall of hundreds of
    studies from an archive that does not answer waits for one timeout, not hundreds."""

    def __init__(self, settings: Settings, by: str) -> None:
        self.settings = settings
        self.by = by
        self._headers: dict[tuple[str, str], Dataset] = {}
        self._failed: dict[str, str] = {}

    def header(self, source: Source, study_uid: str) -> Dataset:
        """The study's attributes as ``source`` holds them. Raises :class:`HeaderUnavailable`."""
        key = (source.name, study_uid)
        if key in self._headers:
            return self._headers[key]
        if source.name in self._failed:
            raise HeaderUnavailable(self._failed[source.name])
        try:
            found = study_header(self.settings, source, study_uid, self.by)
        except ArchiveDown as exc:
            self._failed[source.name] = str(exc)
            raise
        self._headers[key] = found
        return found


def stand_ins(
    header: Dataset, job: WithdrawableJob, results: Sequence[WithdrawableResult]
) -> list[Dataset]:
    """A stand-in for each of ``results`` of ``job``, for
    :func:`~acwi_node.results.rejection.build_rejection_note`: the patient and study
    attributes of ``header`` and the result's UIDs. Raises :class:`HeaderUnavailable` for a
    result whose series is not the node's derivation (its SR's UID says whether the
    derivation holds)."""
    uids = result_uids(job.study_uid, job.model_name, job.model_version, job.reissue)
    texts = [str(element.value) for element in header if element.VR in ("PN", "LO", "SH")]
    charset = result_charset(header.get("SpecificCharacterSet"), texts)
    out: list[Dataset] = []
    for result in results:
        series_uid = uids.series_uid(result.kind)
        if series_uid is None or (
            result.kind == "sr" and result.sop_instance_uid != uids.sr_instance_uid
        ):
            raise HeaderUnavailable(
                f"its {result.kind} result's series cannot be told without its file:"
                " reject them in the PACS by hand"
            )
        ds = Dataset()  # the patient and study alone, each stand-in its own elements
        for keyword in STUDY_HEADER_KEYWORDS:
            if keyword in header:
                ds[keyword] = copy.deepcopy(header[keyword])
        if charset:
            ds.SpecificCharacterSet = charset
        ds.StudyInstanceUID = job.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPClassUID = result.sop_class_uid
        ds.SOPInstanceUID = result.sop_instance_uid
        ds.Manufacturer = MANUFACTURER
        if result.kind in _IMAGE_KINDS:
            # highdicom lists an object that has Rows and Columns as an IMAGE item (the
            # values are not read); the others as COMPOSITE, as the files would be
            ds.Rows = 0
            ds.Columns = 0
        out.append(ds)
    return out
