"""Query/Retrieve SCU: find studies on a PACS (C-FIND) and have it send them to the node
(C-MOVE or C-GET), in the Study Root information model (PS3.4 Annex C).

A C-MOVE makes the PACS open an association of its own to the move destination (the node's
storage SCP, known to the PACS by its AE title), so every retrieved instance goes through the
same path as any other: spooled, recorded, acknowledged. A C-GET has the PACS send the
instances back over the node's own association (PS3.4 C.4.3), for a PACS that cannot connect
to the node; the caller stores each. These functions never raise: they return what happened,
with the reason in clear text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AllStoragePresentationContexts, StoragePresentationContexts, evt
from pynetdicom.presentation import build_context, build_role

from acwi_node.export.scu import TlsArgs, end_association, open_association
from acwi_node.ingest.spool import is_safe_uid

logger = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
STUDY_ROOT_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_ROOT_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")

#: Presentation contexts one association may propose (PS3.8 9.3.2.2: IDs 1 to 255, odd).
MAX_CONTEXTS = 128
#: The most pending responses one C-FIND is read for (a PACS that repeats its answers, or
#: answers pending without matches, would otherwise hold the retrievals forever).
MAX_FIND_RESPONSES = 10_000


def _get_storage_classes() -> list[str]:
    """The storage SOP classes a C-GET offers to receive (the SCP role, by role selection):
    those the node's storage SCP accepts, pynetdicom's most used first, as many as fit beside
    the GET context in :data:`MAX_CONTEXTS`. A study holding another class comes by C-MOVE."""
    accepted = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    common = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    ordered = [uid for uid in common if uid in accepted]
    ordered += [uid for uid in accepted if uid not in ordered]
    return ordered[: MAX_CONTEXTS - 1]


GET_STORAGE_CLASSES: list[str] = _get_storage_classes()


def get_classes(study_classes: Sequence[str] = ()) -> list[str]:
    """The storage SOP classes a C-GET of a study proposes: the study's own, as the PACS
    listed them (SOP Classes in Study, :func:`study_sop_classes`), then
    :data:`GET_STORAGE_CLASSES`, as many as fit beside the GET context."""
    listed = [uid for uid in dict.fromkeys(study_classes) if is_safe_uid(uid)]
    ordered = listed + [uid for uid in GET_STORAGE_CLASSES if uid not in listed]
    return ordered[: MAX_CONTEXTS - 1]


#: The transfer syntaxes a C-GET proposes for each: the uncompressed ones and the lossless
#: and lossy compressions modalities use, which the node stores as received.
GET_TRANSFER_SYNTAXES: list[str] = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
]

#: C-MOVE failure statuses (PS3.4 C.4.2.1.5) and what they mean for whoever reads the error.
MOVE_FAILURES = {
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xFE00: "sub-operations cancelled",
}

#: Matching keys the node sends, by the names of a retrieval's query.
_KEYWORDS = {
    "study_uid": "StudyInstanceUID",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "modality": "ModalitiesInStudy",
}


@dataclass(frozen=True)
class FoundStudy:
    study_uid: str
    #: Number of Study Related Instances, when the PACS returned it.
    instances: int | None = None


@dataclass(frozen=True)
class FindResult:
    ok: bool
    studies: list[FoundStudy] = field(default_factory=list)
    #: Why not, in clear text ("" when ok).
    error: str = ""
    #: Matches whose Study Instance UID was missing or not a UID (left out).
    unusable: int = 0
    #: The failure will not change by asking again (more matches than allowed).
    final: bool = False


@dataclass(frozen=True)
class MoveResult:
    ok: bool
    #: The final C-MOVE status, when one came.
    status: int | None = None
    completed: int = 0
    failed: int = 0
    warnings: int = 0
    error: str = ""


def _status_text(status: int) -> str:
    if status in MOVE_FAILURES:
        return MOVE_FAILURES[status]
    if 0xC000 <= status <= 0xCFFF:
        return "unable to process"
    return "failed"


def _comment(status: Dataset) -> str:
    comment = status.get("ErrorComment")
    return f" ({comment})" if comment else ""


class _FindFailed(Exception):
    """A Study Root C-FIND that did not end with success; the message says why, for people."""


def _study_root_find(
    identifier: Dataset,
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float,
    tls: TlsArgs | None,
    max_responses: int | None = None,
) -> Generator[tuple[Any, Dataset], None, None]:
    """One Study Root C-FIND on an association of its own: yields (the association, a match)
    for each pending response, ends at success, and raises :class:`_FindFailed` with why
    otherwise (no association, the context refused, a failure status, no response, the
    association lost, more than ``max_responses`` (default :data:`MAX_FIND_RESPONSES`) pending
    responses: a PACS that repeats its answers never ends). The association is ended when the
    generator is closed."""
    assoc, error = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=[build_context(STUDY_ROOT_FIND)],
    )  # fmt: skip
    if assoc is None:
        raise _FindFailed(error)
    where = f"{called_ae}@{host}:{port}"
    try:
        if not assoc.accepted_contexts:
            raise _FindFailed(f"{where} does not accept Study Root C-FIND")
        try:
            pending, most = 0, MAX_FIND_RESPONSES if max_responses is None else max_responses
            for status, match in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
                if "Status" not in status:
                    raise _FindFailed(f"no C-FIND response within {timeout_s:g} s")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    pending += 1
                    if pending > most:
                        assoc.abort()
                        raise _FindFailed(f"{where} answered more than {most} C-FIND responses")
                    if match is not None:
                        yield assoc, match
                elif code == 0x0000:
                    return
                else:
                    raise _FindFailed(
                        f"C-FIND refused by {where} with status 0x{code:04X}{_comment(status)}"
                    )
        except _FindFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - association lost mid-way
            raise _FindFailed(f"association lost: {type(exc).__name__}: {exc}") from exc
    finally:
        end_association(assoc)


def find_studies(
    query: dict[str, str],
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 30.0,
    tls: TlsArgs | None = None,
    limit: int = 200,
) -> FindResult:
    """C-FIND at the STUDY level with the query's keys; at most ``limit`` studies (more is
    an error: the association is aborted rather than read to the end)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.NumberOfStudyRelatedInstances = ""
    for key, value in query.items():
        setattr(identifier, _KEYWORDS[key], value)
    studies: dict[str, FoundStudy] = {}
    unusable = 0
    answers = 0
    matches = _study_root_find(
        identifier, called_ae=called_ae, host=host, port=port, calling_ae=calling_ae,
        timeout_s=timeout_s, tls=tls,
    )  # fmt: skip
    try:
        for assoc, found in matches:
            answers += 1
            uid = str(found.get("StudyInstanceUID", "") or "")
            if is_safe_uid(uid):
                count = found.get("NumberOfStudyRelatedInstances")
                try:
                    instances = int(count) if count not in (None, "") else None
                except (TypeError, ValueError):
                    instances = None
                studies[uid] = FoundStudy(uid, instances)
            else:
                unusable += 1
            if len(studies) > limit:
                assoc.abort()
                return FindResult(
                    False,
                    error=f"more than {limit} studies match (retrieve.max_studies):"
                    " narrow the query",
                    final=True,
                )
            if answers > limit:
                # The same study again and again, or matches without a usable UID: a PACS
                # that never ends its answer must not hold the retrievals.
                assoc.abort()
                return FindResult(
                    False,
                    error=f"{called_ae}@{host}:{port} answered more than {limit} matches"
                    f" (retrieve.max_studies) for {len(studies)} distinct study(ies)"
                    + (f", {unusable} without a usable Study Instance UID" if unusable else ""),
                    final=True,
                )
    except _FindFailed as exc:
        return FindResult(False, error=str(exc))
    finally:
        matches.close()
    return FindResult(True, studies=list(studies.values()), unusable=unusable)


#: The patient's and the study's attributes a result object copies from its source images,
#: asked of a PACS at the STUDY level when the node keeps no file of the study any more (a
#: rejection note of results whose files storage retention deleted).
STUDY_HEADER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True)
class StudyHeader:
    """What a PACS holds of one study's patient and study attributes."""

    ok: bool
    #: The study's attributes (:data:`STUDY_HEADER_KEYWORDS`, with the Specific Character
    #: Set the PACS answered in); None with ``ok`` when the PACS does not have the study.
    dataset: Dataset | None = None
    #: Why not, in clear text ("" when ok).
    error: str = ""


def find_study_header(
    study_uid: str,
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 30.0,
    tls: TlsArgs | None = None,
) -> StudyHeader:
    """A Study Root C-FIND at the STUDY level for ``study_uid``, asking for
    :data:`STUDY_HEADER_KEYWORDS`."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    for keyword in STUDY_HEADER_KEYWORDS:
        setattr(identifier, keyword, "")
    found: Dataset | None = None
    try:
        for _assoc, match in _study_root_find(
            identifier, called_ae=called_ae, host=host, port=port, calling_ae=calling_ae,
            timeout_s=timeout_s, tls=tls,
        ):  # fmt: skip
            if found is None and str(match.get("StudyInstanceUID", "") or "") == study_uid:
                found = match
    except _FindFailed as exc:
        return StudyHeader(False, error=str(exc))
    return StudyHeader(True, study_header_of(found, study_uid) if found is not None else None)


def study_header_of(match: Dataset, study_uid: str) -> Dataset:
    """The header keys of a C-FIND or QIDO-RS match (the keys it left out absent), in the
    Specific Character Set it was answered in."""
    header = Dataset()
    charset = match.get("SpecificCharacterSet")
    if charset:
        header.SpecificCharacterSet = charset
    header.StudyInstanceUID = study_uid
    for keyword in STUDY_HEADER_KEYWORDS:
        if keyword in match:
            header[keyword] = match[keyword]
    return header


def move_study(
    study_uid: str,
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    move_destination: str,
    timeout_s: float = 600.0,
    tls: TlsArgs | None = None,
    on_response: Callable[[], None] | None = None,
) -> MoveResult:
    """C-MOVE one study to ``move_destination``; ``on_response`` is called on every response
    (a pending one says the PACS is still sending)."""
    assoc, error = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=[build_context(STUDY_ROOT_MOVE)],
    )  # fmt: skip
    if assoc is None:
        return MoveResult(False, error=error)
    where = f"{called_ae}@{host}:{port}"

    def hint(code: int, completed: int) -> str:
        if code == 0xA801:
            return (
                f": {where} does not know the AE title {move_destination!r};"
                " add the node's storage SCP to its modalities"
            )
        if 0xC000 <= code <= 0xCFFF and not completed:
            # Orthanc, for one, answers so for a move destination it does not know.
            return (
                f"; check that {where} knows the move destination {move_destination!r}"
                " with the node's host and port, and that the node admits its calling AE"
                " title (ingest.allowed_calling_aes)"
            )
        return ""

    try:
        if not assoc.accepted_contexts:
            return MoveResult(False, error=f"{where} does not accept Study Root C-MOVE")
        responses = assoc.send_c_move(
            _study_identifier(study_uid), move_destination, STUDY_ROOT_MOVE
        )
        moved = _follow(responses, "C-MOVE", where, timeout_s, on_response, hint)
        if moved.status is None and assoc.is_established:
            assoc.abort()  # still under way on the PACS: no release waits for it
        return moved
    finally:
        end_association(assoc)


#: The most series of a study whose instances are asked for their SOP classes (a PACS that
#: does not list SOP Classes in Study), and the most instance answers read in all.
MAX_QUERIED_SERIES = 1000
MAX_QUERIED_INSTANCES = 100_000


def _find(assoc: Any, identifier: Dataset) -> Iterator[Dataset]:
    """The matches of one Study Root C-FIND on ``assoc``, to its end or its first failure;
    after :data:`MAX_FIND_RESPONSES` pending responses the association is aborted (a PACS
    that repeats its answers never ends)."""
    responses = assoc.send_c_find(identifier, STUDY_ROOT_FIND)
    for pending, (status, found) in enumerate(responses, start=1):
        if "Status" not in status or int(status.Status) not in (0xFF00, 0xFF01):
            return
        if pending > MAX_FIND_RESPONSES:
            assoc.abort()
            return
        if found is not None:
            yield found


def _uids(value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else list(value or [])
    return [str(uid).strip() for uid in values if str(uid).strip()]


def _listed_classes(assoc: Any, study_uid: str) -> list[str]:
    """SOP Classes in Study (0008,0062), as a STUDY level C-FIND answers it."""
    identifier = _study_identifier(study_uid)
    identifier.SOPClassesInStudy = ""
    classes: list[str] = []
    for found in _find(assoc, identifier):
        if str(found.get("StudyInstanceUID", "")) == study_uid:
            classes += _uids(found.get("SOPClassesInStudy"))
    return classes


def _instance_classes(assoc: Any, study_uid: str) -> list[str]:
    """The study's SOP classes as its instances say them: a SERIES level C-FIND for its
    series, then an IMAGE level one per series for SOP Class UID (0008,0016), for a PACS that
    does not list SOP Classes in Study (hierarchical queries: each level's unique keys)."""
    identifier = _study_identifier(study_uid)
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.SeriesInstanceUID = ""
    series = [
        uid
        for found in _find(assoc, identifier)
        for uid in _uids(found.get("SeriesInstanceUID"))[:1]
        if is_safe_uid(uid)
    ]
    classes: list[str] = []
    answers = 0
    for series_uid in list(dict.fromkeys(series))[:MAX_QUERIED_SERIES]:
        identifier = _study_identifier(study_uid)
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.SeriesInstanceUID = series_uid
        identifier.SOPInstanceUID = ""
        identifier.SOPClassUID = ""
        for found in _find(assoc, identifier):
            classes += _uids(found.get("SOPClassUID"))[:1]
            answers += 1
            if answers >= MAX_QUERIED_INSTANCES:
                return classes
    return classes


def study_sop_classes(
    study_uid: str,
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 30.0,
    tls: TlsArgs | None = None,
) -> list[str]:
    """The study's SOP classes on the PACS: SOP Classes in Study (0008,0062) from a C-FIND at
    the STUDY level (Orthanc and dcm4chee answer it); where the PACS leaves that key out (many
    do), the SOP Class UID of each instance, from C-FINDs at the SERIES and IMAGE levels.
    Empty when neither says or the PACS cannot be asked: the C-GET goes on without them."""
    assoc, _ = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=[build_context(STUDY_ROOT_FIND)],
    )  # fmt: skip
    if assoc is None:
        return []
    classes: list[str] = []
    try:
        if not assoc.accepted_contexts:
            return []
        classes = _listed_classes(assoc, study_uid)
        if not classes and assoc.is_established:
            classes = _instance_classes(assoc, study_uid)
            if classes:
                logger.info(
                    "the source lists no SOP Classes in Study: %d class(es) from its instances",
                    len(set(classes)),
                )
    except Exception as exc:  # noqa: BLE001 - only a hint: the C-GET goes on without it
        logger.info("C-FIND of a study's SOP classes failed: %s", type(exc).__name__)
    finally:
        end_association(assoc)
    return list(dict.fromkeys(uid for uid in classes if is_safe_uid(uid)))


def get_study(
    study_uid: str,
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    store: Callable[[evt.Event], int],
    timeout_s: float = 600.0,
    tls: TlsArgs | None = None,
    on_response: Callable[[], None] | None = None,
    study_classes: Sequence[str] = (),
) -> MoveResult:
    """C-GET one study: the PACS sends its instances back over the node's association, each
    C-STORE handed to ``store`` (it returns the C-STORE status). The node proposes to take
    the SCP role for the study's own SOP classes (``study_classes``, see
    :func:`study_sop_classes`) and :data:`GET_STORAGE_CLASSES` (:func:`get_classes`) in
    :data:`GET_TRANSFER_SYNTAXES`."""
    classes = get_classes(study_classes)
    contexts = [build_context(STUDY_ROOT_GET)] + [
        build_context(uid, GET_TRANSFER_SYNTAXES) for uid in classes
    ]
    roles = [build_role(uid, scp_role=True) for uid in classes]
    assoc, error = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=contexts, handlers=[(evt.EVT_C_STORE, store)], ext_neg=roles,
    )  # fmt: skip
    if assoc is None:
        return MoveResult(False, error=error)
    where = f"{called_ae}@{host}:{port}"

    def hint(code: int, completed: int) -> str:
        if code in (0xA702, 0xB000) or (0xC000 <= code <= 0xCFFF and not completed):
            return (
                f"; {where} could send none or only some of the instances over the node's"
                " association: a SOP class or transfer syntax the node did not propose"
                " (retrieve_with = 'move' takes any)"
            )
        return ""

    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        if STUDY_ROOT_GET not in accepted:
            return MoveResult(False, error=f"{where} does not accept Study Root C-GET")
        responses = assoc.send_c_get(_study_identifier(study_uid), STUDY_ROOT_GET)
        got = _follow(responses, "C-GET", where, timeout_s, on_response, hint)
        if got.status is None and assoc.is_established:
            assoc.abort()  # still under way on the PACS: no release waits for it
        return got
    finally:
        end_association(assoc)


def _study_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _follow(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    what: str,
    where: str,
    timeout_s: float,
    on_response: Callable[[], None] | None,
    hint: Callable[[int, int], str],
) -> MoveResult:
    """Read a C-MOVE's or C-GET's responses to the final one: the sub-operation counts, and
    for a failure the status, its meaning and ``hint(status, completed)``."""
    counts = {"completed": 0, "failed": 0, "warnings": 0, "remaining": -1}
    progress_at = time.monotonic()

    def result(ok: bool, status: int | None = None, error: str = "") -> MoveResult:
        return MoveResult(
            ok, status, counts["completed"], counts["failed"], counts["warnings"], error
        )

    try:
        for status, _identifier in responses:
            if "Status" not in status:
                return result(False, error=f"no {what} response within {timeout_s:g} s")
            if on_response is not None:
                on_response()
            before = dict(counts)
            for key, keyword in (
                ("completed", "NumberOfCompletedSuboperations"),
                ("failed", "NumberOfFailedSuboperations"),
                ("warnings", "NumberOfWarningSuboperations"),
                ("remaining", "NumberOfRemainingSuboperations"),
            ):
                value = status.get(keyword)
                if value is not None:
                    counts[key] = int(value)
            code = int(status.Status)
            if code == 0xFF00:
                # Pending responses whose sub-operation counts never change: the PACS is stuck
                # (each one within the DIMSE timeout would otherwise hold the retrieval forever).
                if counts != before:
                    progress_at = time.monotonic()
                elif time.monotonic() - progress_at > timeout_s:
                    return result(
                        False,
                        error=f"{where} kept answering the {what} pending with no"
                        f" sub-operation ending for {timeout_s:g} s",
                    )
                continue
            if code == 0x0000 or code == 0xB000:
                return result(True, status=code)
            return result(
                False,
                status=code,
                error=f"{what} refused by {where} with status 0x{code:04X}: {_status_text(code)}"
                + hint(code, counts["completed"])
                + _comment(status),
            )
        return result(False, error=f"{where} ended the {what} without a final status")
    except Exception as exc:  # noqa: BLE001 - association lost mid-way
        return result(False, error=f"association lost: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class SourceCheck:
    """What a check of a source found: it answers C-ECHO and a C-FIND, and accepts C-MOVE
    (or C-GET)."""

    ok: bool
    elapsed_ms: float = 0.0
    error: str = ""


def check_source(
    *,
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float = 30.0,
    tls: TlsArgs | None = None,
    get: bool = False,
) -> SourceCheck:
    """One association proposing Verification and Study Root FIND and MOVE (``get``: GET): a
    C-ECHO, then a C-FIND for a Study Instance UID nobody has (it must answer, with no match).
    Whether the source knows the node as a move destination shows only on a real C-MOVE."""
    started = time.monotonic()
    retrieve = STUDY_ROOT_GET if get else STUDY_ROOT_MOVE
    assoc, error = open_association(
        calling_ae, called_ae, host, port, timeout_s=timeout_s, max_pdu=0, tls=tls,
        contexts=[build_context(VERIFICATION), build_context(STUDY_ROOT_FIND),
                  build_context(retrieve)],
    )  # fmt: skip
    if assoc is None:
        return SourceCheck(False, error=error)
    where = f"{called_ae}@{host}:{port}"
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        missing = [
            name
            for uid, name in (
                (STUDY_ROOT_FIND, "C-FIND"),
                (retrieve, "C-GET" if get else "C-MOVE"),
            )
            if uid not in accepted
        ]
        if missing:
            return SourceCheck(
                False, error=f"{where} does not accept Study Root {' or '.join(missing)}"
            )
        if VERIFICATION in accepted:
            status = assoc.send_c_echo()
            if "Status" not in status or int(status.Status) != 0x0000:
                return SourceCheck(False, error=f"{where} did not answer the C-ECHO")
        probe = Dataset()
        probe.QueryRetrieveLevel = "STUDY"
        probe.StudyInstanceUID = generate_uid()
        for status, _found in assoc.send_c_find(probe, STUDY_ROOT_FIND):
            if "Status" not in status:
                return SourceCheck(False, error=f"no C-FIND response within {timeout_s:g} s")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                continue
            if code != 0x0000:
                return SourceCheck(
                    False,
                    error=f"C-FIND refused by {where} with status 0x{code:04X}{_comment(status)}",
                )
        return SourceCheck(True, elapsed_ms=1000 * (time.monotonic() - started))
    except Exception as exc:  # noqa: BLE001 - association lost mid-way
        return SourceCheck(False, error=f"association lost: {type(exc).__name__}: {exc}")
    finally:
        end_association(assoc)
