"""Rejection notes: the DICOM object that withdraws the node's results from a PACS.

A result that must not be read any more (a model version recalled, a result found wrong, a
study analysed by mistake) cannot be deleted from a PACS by DICOM. IHE IOCM (Imaging Object
Change Management) gives the way: a Key Object Selection document in the same study whose
title (CID 7011) says why the instances it lists are rejected. An archive with IOCM hides or
deletes them; a viewer stops showing them. The bundled Orthanc deletes them
(``orthanc/route_to_node.lua``).

The note's UIDs are derived from what it rejects (:func:`rejection_note_uids`): built again, it
is the same object, and a PACS that receives it twice keeps one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom import Dataset
from pydicom.sr.codedict import codes

from acwi_node import MANUFACTURER, __version__
from acwi_node.ledger.models import REJECTION_NOTE_KIND
from acwi_node.results.charset import result_charset
from acwi_node.results.headers import (
    copy_patient_and_study,
    patient_study_header,
    set_result_times,
)
from acwi_node.results.sr import sr_text
from acwi_node.results.uids import UID_NAMESPACE, derive_uid

__all__ = [
    "REJECTION_NOTE_KIND",
    "REJECTION_REASONS",
    "REJECTION_SERIES_NUMBER",
    "build_rejection_note",
    "rejection_note_uids",
]

#: Series Number of the notes (the results' series are 9901-9903).
REJECTION_SERIES_NUMBER = 9904
#: Why results are withdrawn: the note's title (PS3.16 CID 7011, the IOCM rejection reasons a
#: result of the node may have).
REJECTION_REASONS: dict[str, CodedConcept] = {
    # a result that is wrong, or that a model version should not have given
    "quality": CodedConcept("113001", "DCM", "Rejected for Quality Reasons"),
    # a result that could harm a patient if read (a recalled model version)
    "safety": CodedConcept("113037", "DCM", "Rejected for Patient Safety Reasons"),
    # a result a later analysis by another model version replaced (the node's own doing)
    "replaced": CodedConcept("113001", "DCM", "Rejected for Quality Reasons"),
}
#: The value types of the note's references to the objects it rejects.
_REFERENCE_VALUE_TYPES = frozenset({"IMAGE", "COMPOSITE", "WAVEFORM"})
#: Key Object Description: at most 1024 characters (UT would allow more, the text item is UT,
#: but a PACS shows a line).
_MAX_DESCRIPTION = 1024


def rejection_note_uids(
    study_uid: str, reason: str, rejected_uids: Sequence[str]
) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the note rejecting ``rejected_uids`` (SOP
    Instance UIDs of one study) for ``reason``: one series per study, one note per set."""
    series_uid = derive_uid(UID_NAMESPACE, "rejection-series", study_uid)
    sop_uid = derive_uid(UID_NAMESPACE, "rejection-note", study_uid, reason, *sorted(rejected_uids))
    return series_uid, sop_uid


def _node_observer() -> ObserverContext:
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid(UID_NAMESPACE, "device", "node", MANUFACTURER),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
        ),
    )


def build_rejection_note(
    rejected: Sequence[Dataset],
    *,
    reason: str,
    description: str = "",
    now: dt.datetime | None = None,
    timezone: str = "UTC",
) -> KeyObjectSelectionDocument:
    """The IOCM rejection note listing ``rejected`` (the headers of the node's result objects
    of one study, pixel data not needed) for ``reason`` (a key of :data:`REJECTION_REASONS`),
    with ``description`` as its Key Object Description (cut to 1024 characters). Its patient
    and study come from the first rejected object, which copied them from the source images.
    Its own dates and times are ``now`` (None: the moment it is built) in that object's offset
    from UTC, else ``timezone``'s, with Timezone Offset From UTC.
    """
    if reason not in REJECTION_REASONS:
        raise ValueError(f"reason must be one of {sorted(REJECTION_REASONS)}, got {reason!r}")
    if not rejected:
        raise ValueError("a rejection note needs the objects it rejects")
    study_uid = str(rejected[0].StudyInstanceUID)
    other = {str(ds.StudyInstanceUID) for ds in rejected} - {study_uid}
    if other:
        raise ValueError(f"objects of another study: {sorted(other)}")
    foreign = sorted(
        str(ds.SOPInstanceUID) for ds in rejected if ds.get("Manufacturer") != MANUFACTURER
    )
    if foreign:
        raise ValueError(f"not objects the node wrote: {foreign}")
    uids = [str(ds.SOPInstanceUID) for ds in rejected]
    series_uid, sop_uid = rejection_note_uids(study_uid, reason, uids)
    # as its text value may hold it (a TAB of the administrator's note a space)
    description = sr_text(description).strip()[:_MAX_DESCRIPTION]
    # the results' character set, unless the administrator's words need more (UTF-8 then)
    charset = result_charset(rejected[0].get("SpecificCharacterSet"), [description])
    content = KeyObjectSelection(
        document_title=REJECTION_REASONS[reason],
        referenced_objects=list(rejected),
        observer_device_context=_node_observer(),
        description=description or None,
    )
    header = patient_study_header(rejected[0])
    document = KeyObjectSelectionDocument(
        evidence=[header, *rejected[1:]],
        content=content,
        series_instance_uid=series_uid,
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=rejected[0].get("InstitutionName") or None,
        series_description="ACWI withdrawn results",
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        specific_character_set=charset,
    )
    # highdicom's document takes the Type 2 patient and study attributes alone; the others of
    # the Patient and Study modules (Issuer of Patient ID, Other Patient IDs, Study
    # Description, ...) are the rejected objects' too: an archive files the note by them.
    copy_patient_and_study(header, document)
    # TID 2010 rows 8-10: a reference has no Purpose of Reference (its Concept Name), and
    # highdicom names each (260753009, SCT, "Source")
    for item in document.ContentSequence:
        if item.ValueType in _REFERENCE_VALUE_TYPES and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    set_result_times(document, rejected[0], now, timezone)
    return document
