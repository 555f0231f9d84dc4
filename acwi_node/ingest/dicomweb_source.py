"""Retrieving studies from a DICOMweb source: QIDO-RS to find them (PS3.18 10.6, Search
Transaction), WADO-RS to read each one (PS3.18 10.4, Retrieve Transaction, the study's instances
as ``multipart/related; type="application/dicom"``).

A retrieved study's response is streamed into a file beside the spool and its parts stored as a
STOW-RS request's are (:class:`~acwi_node.ingest.stow.StowReceiver`): spool file and ledger row
flushed, the node's own results left out, the source's name standing for the calling AE title.
The counterparts of :mod:`.qr_scu`'s C-FIND and C-MOVE; nothing here raises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from pydicom import Dataset

from acwi_node.config import Source
from acwi_node.export.dicomweb import DicomwebError, get, reason
from acwi_node.ingest.qr_scu import (
    STUDY_HEADER_KEYWORDS,
    FindResult,
    FoundStudy,
    MoveResult,
    StudyHeader,
    study_header_of,
)
from acwi_node.ingest.spool import Spool, is_safe_uid
from acwi_node.ingest.stow import BodyFile, MultipartError, StowReceiver, boundary_of

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: The study's instances as stored (no transcoding), PS3.18 8.7.3.5.
DICOM_MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'

#: QIDO-RS query parameters (attribute keywords), by the names of a retrieval's query.
_PARAMETERS = {
    "study_uid": "StudyInstanceUID",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "modality": "ModalitiesInStudy",
}
_STUDY_INSTANCE_UID = "0020000D"
_STUDY_INSTANCE_UID_KEYWORD = "StudyInstanceUID"
_NUMBER_OF_STUDY_RELATED_INSTANCES = "00201208"


def _first(item: Any, tag: str) -> Any:
    if not isinstance(item, dict):
        return None
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


class _SearchFailed(Exception):
    """A QIDO-RS search that did not answer a list of matches; the message says why."""


def _search(source: Source, params: list[tuple[str, str]], *, timeout_s: float) -> list[Any]:
    """``GET {url}/studies?params``: the matches (none for ``204``); raises
    :class:`_SearchFailed` with why for no answer, another status or an answer that is not a
    JSON list."""
    try:
        status, _type, body = get(
            source, f"/studies?{urlencode(params)}", accept=DICOM_JSON, timeout_s=timeout_s
        )
    except DicomwebError as exc:
        raise _SearchFailed(f"QIDO-RS to {source.where}: {exc}") from exc
    if status == 204:
        return []
    if status != 200:
        raise _SearchFailed(f"QIDO-RS to {source.where}: {reason(status, body)}")
    try:
        matches = json.loads(body) if body.strip() else []
    except ValueError:
        raise _SearchFailed(f"QIDO-RS to {source.where}: the answer is not JSON") from None
    if not isinstance(matches, list):
        raise _SearchFailed(f"QIDO-RS to {source.where}: the answer is not a list")
    return matches


def search_studies(
    source: Source, query: dict[str, str], *, timeout_s: float, limit: int
) -> FindResult:
    """``GET {url}/studies?...`` with the query's keys; at most ``limit`` studies (more is a
    final error, as for C-FIND)."""
    params = [(_PARAMETERS[k], v) for k, v in query.items()]
    params += [("includefield", _NUMBER_OF_STUDY_RELATED_INSTANCES), ("limit", str(limit + 1))]
    try:
        matches = _search(source, params, timeout_s=timeout_s)
    except _SearchFailed as exc:
        return FindResult(False, error=str(exc))
    studies: dict[str, FoundStudy] = {}
    unusable = 0
    for item in matches:
        uid = _first(item, _STUDY_INSTANCE_UID)
        if not isinstance(uid, str) or not is_safe_uid(uid):
            unusable += 1
            continue
        count = _first(item, _NUMBER_OF_STUDY_RELATED_INSTANCES)
        studies[uid] = FoundStudy(uid, count if isinstance(count, int) else None)
    if len(studies) > limit:
        return FindResult(
            False,
            error=f"more than {limit} studies match (retrieve.max_studies): narrow the query",
            final=True,
        )
    return FindResult(True, studies=list(studies.values()), unusable=unusable)


def search_study_header(source: Source, study_uid: str, *, timeout_s: float) -> StudyHeader:
    """``GET {url}/studies?StudyInstanceUID=...`` with :data:`STUDY_HEADER_KEYWORDS` as
    include fields: the counterpart of :func:`~acwi_node.ingest.qr_scu.find_study_header`."""
    params = [(_STUDY_INSTANCE_UID_KEYWORD, study_uid)]
    params += [("includefield", keyword) for keyword in STUDY_HEADER_KEYWORDS]
    try:
        matches = _search(source, params, timeout_s=timeout_s)
        found = [
            Dataset.from_json(item)
            for item in matches
            if isinstance(item, dict) and _first(item, _STUDY_INSTANCE_UID) == study_uid
        ]
    except _SearchFailed as exc:
        return StudyHeader(False, error=str(exc))
    except (ValueError, TypeError, KeyError) as exc:
        return StudyHeader(
            False, error=f"QIDO-RS to {source.where}: the answer is not DICOM JSON ({exc})"
        )
    return StudyHeader(True, study_header_of(found[0], study_uid) if found else None)


def retrieve_study(
    source: Source,
    study_uid: str,
    *,
    spool: Spool,
    receiver: StowReceiver,
    timeout_s: float,
    max_bytes: int,
    on_chunk: Callable[[], None] | None = None,
) -> MoveResult:
    """``GET {url}/studies/{uid}``: every instance of the study, stored on the node. The
    counts are those of a C-MOVE: completed (stored), failed (refused by the node)."""
    try:
        body = BodyFile(spool, prefix="wado")
    except OSError as exc:
        return MoveResult(False, error=f"cannot keep the response: {exc.strerror or exc}")
    try:
        try:
            status, content_type, answer = get(
                source,
                f"/studies/{quote(study_uid)}",
                accept=DICOM_MULTIPART,
                timeout_s=timeout_s,
                sink=body.fd,
                max_bytes=max_bytes,
                on_chunk=on_chunk,
            )
        except DicomwebError as exc:
            return MoveResult(False, error=f"WADO-RS from {source.where}: {exc}")
        if status != 200:
            return MoveResult(
                False, status=status, error=f"WADO-RS from {source.where}: {reason(status, answer)}"
            )
        try:
            boundary = boundary_of(content_type)
            result = receiver.receive_file(body, boundary, source.name, source.url or "", study_uid)
        except MultipartError as exc:
            return MoveResult(
                False,
                status=status,
                error=f"WADO-RS from {source.where}: not a multipart body of DICOM objects: {exc}",
            )
        stored = len(result.stored) - result.dropped
        return MoveResult(True, status=status, completed=stored, failed=len(result.failed))
    finally:
        body.discard()
