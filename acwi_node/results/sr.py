"""The study's AI result as a Comprehensive 3D SR (TID 1500 Measurement Report).

Content tree written by :func:`build_sr`::

    Imaging Measurement Report (TID 1500)
      Language, Observation context (device observer = the model), Procedure reported (the
          study's coded procedures, :func:`procedure_codes`)
      Image Library (TID 1600): the analysed source images (a projection radiograph's with
          its laterality and view, :mod:`.library_descriptors`)
      Imaging Measurements
        per label, study level (TID 1501): tracking identifier = the label,
            finding = coded label, Probability (method "Study-level aggregate"),
            algorithm identification, source images = every analysed image
        study summary (TID 1501): entropy, epistemic and aleatoric uncertainty, uncertainty
            score, out-of-distribution score, "Needs human review" yes/no, predicted class
        per analysed image: one group per label (method "Single-image inference") and one
            summary group, each referencing that image only
        per image the model reports a finding on (its most probable label is one of the
            manifest's finding labels), unless turned off (``region_fraction`` None): an AI
            region (TID 1410): tracking identifier "AI region <n>: <label>", finding = the
            label, method "Heatmap region", the image's Probability of the label and its
            uncertainty score, algorithm identification, and the box around the heatmap's
            hot region holding its peak (:mod:`.heatmap_region`) as a closed polyline
            selected from the image (and frame)

Every source instance handed to :func:`build_sr` (analysed or skipped) is listed in the
Current Requested Procedure Evidence Sequence. The Contributing Equipment Sequence names the
model (:func:`algorithm_equipment`, as the IHE AI Results profile asks of every result object).
:func:`summarise_sr` reads the numbers back from any dataset with this layout, walking the
content tree.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageLibraryEntryDescriptors,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from acwi_node import MANUFACTURER
from acwi_node.inference.types import ImageResult, StudyAnalysis, Uncertainty, unit_name
from acwi_node.results.charset import result_charset
from acwi_node.results.codes import (
    CODE_KEYWORDS,
    LO_MAX,
    NOT_IN_STRING,
    code_items,
    code_texts,
    usable_code,
)
from acwi_node.results.content_templates import append_encoded, set_encoded
from acwi_node.results.headers import patient_study_header, set_result_times
from acwi_node.results.heatmap_region import heatmap_region
from acwi_node.results.image_groups import encode_image_groups
from acwi_node.results.image_library import describe as describe_library
from acwi_node.results.image_library import plan_image_library
from acwi_node.results.iod_classes import (
    in_patient_study_class,
    region_class,
    restore_reference_classes,
)
from acwi_node.results.library_classes import in_known_class
from acwi_node.results.library_descriptors import library_descriptors
from acwi_node.results.region_groups import RegionSpec, encode_region_groups, region_corners
from acwi_node.results.study_groups import STUDY_SCOPE, encode_study_groups
from acwi_node.results.uids import (
    UID_NAMESPACE,
    ResultUIDs,
    derive_uid,
    device_uid,
    reissue_parts,
    result_uids,
)

__all__ = [
    "MANUFACTURER",
    "PRIVATE_SCHEME",
    "PROCESSING_ALGORITHM",
    "SR_SERIES_NUMBER",
    "VERDICT_ACTIONS",
    "Verification",
    "algorithm_equipment",
    "build_sr",
    "build_verified_sr",
    "finding_code",
    "procedure_codes",
    "summarise_sr",
    "verified_sr_uid",
]

SR_SERIES_NUMBER = 9901

# ---------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------

#: Coding Scheme Designator of the node's local codes (PS3.16 8.2: private schemes start "99").
PRIVATE_SCHEME = "99ACWI"

_PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="ACWI Node local codes",
    responsible_organization="ACWI Node",
)


#: The Purpose of Reference of the item of the Contributing Equipment Sequence that describes the
#: algorithm (the model) that produced a result, as the IHE Radiology AI Results (AIR) profile
#: defines it (General Result Encoding Requirements): the code is IHE's interim one.
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

_IHE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator="99IHE",
    name="IHE interim codes",
    responsible_organization="IHE International",
)


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# DICOM PS3.16 concepts (as listed in pydicom.sr.codedict, which is generated from PS3.16).
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
#: Procedure Reported where the sources name no procedure, or one not usable (CID 100).
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")  # CID 100
#: The concept name of TID 1500's Procedure Reported rows.
_PROCEDURE_REPORTED = ("DCM", "121058")
YES = CodedConcept("373066001", "SCT", "Yes")  # CID 230
NO = CodedConcept("373067005", "SCT", "No")  # CID 230
_TRACKING_IDENTIFIER = ("DCM", "112039")
_TRACKING_UID = ("DCM", "112040")
_FINDING = ("DCM", "121071")
_MEASUREMENT_GROUP = ("DCM", "125007")
_IMAGING_MEASUREMENTS = ("DCM", "126010")
_IMAGE_LIBRARY = ("DCM", "111028")
_MEASUREMENT_METHOD = ("SCT", "370129005")
_ALGORITHM_NAME = ("DCM", "111001")
_ALGORITHM_VERSION = ("DCM", "111003")
_SOURCE_IMAGE_CONCEPTS = {("DCM", "121112"), ("SCT", "260753009")}

#: UCUM annotation for an entropy in natural units.
NATS = CodedConcept("{nat}", "UCUM", "nat")

# Local concepts: PS3.16 has no concepts for these model outputs.
PREDICTIVE_ENTROPY = _local("ACWI001", "Predictive entropy")
EPISTEMIC_UNCERTAINTY = _local("ACWI002", "Epistemic uncertainty")
ALEATORIC_UNCERTAINTY = _local("ACWI003", "Aleatoric uncertainty")
UNCERTAINTY_SCORE = _local("ACWI004", "Uncertainty score")
OOD_SCORE = _local("ACWI005", "Out-of-distribution score")
NEEDS_REVIEW = _local("ACWI006", "Needs human review")
PREDICTED_CLASS = _local("ACWI007", "Predicted class")
METHOD_STUDY = _local("ACWI010", "Study-level aggregate")
METHOD_IMAGE = _local("ACWI011", "Single-image inference")
RADIOLOGIST_VERDICT = _local("ACWI020", "Radiologist verdict")
VERDICT_CONFIRMED = _local("ACWI021", "AI result confirmed")
VERDICT_OVERRIDDEN = _local("ACWI022", "AI result overridden")
VERDICT_REASON = _local("ACWI023", "Reason for override")
VERIFIED_LABEL = _local("ACWI024", "Verified class")
#: The method of an AI region group: the box around the connected region of the image's
#: heatmap at or above a fraction of its peak that holds the peak.
METHOD_HEATMAP_REGION = _local("ACWI012", "Heatmap region")
#: The fraction of the heatmap's peak an AI region's pixels are at or above.
HEATMAP_REGION_FRACTION = _local("ACWI013", "Heatmap region threshold")
#: Verdicts that verify a result (an escalation verifies nothing).
VERDICT_ACTIONS: Mapping[str, CodedConcept] = {
    "confirm": VERDICT_CONFIRMED,
    "override": VERDICT_OVERRIDDEN,
}
VERIFIED_SR_INSTANCE_NUMBER = 2

_UNCERTAINTY_FIELDS: tuple[tuple[str, CodedConcept, CodedConcept], ...] = (
    ("entropy", PREDICTIVE_ENTROPY, NATS),
    ("epistemic", EPISTEMIC_UNCERTAINTY, NATS),
    ("aleatoric", ALEATORIC_UNCERTAINTY, NATS),
    ("score", UNCERTAINTY_SCORE, NO_UNITS),
)

_SCT_NORMAL = CodedConcept("17621005", "SCT", "Normal")
_SCT_PLEURAL_EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")
_SCT_PULMONARY_NODULE = CodedConcept("786838002", "SCT", "Pulmonary nodule")
_SCT_PULMONARY_EDEMA = CodedConcept("19242006", "SCT", "Pulmonary edema")

#: Finding codes for common label spellings (normalised: lower case, single spaces).
#: SCT/DCM values are those of PS3.16 (pydicom.sr.codedict); 786838002 "Pulmonary nodule" and
#: 233604007 "Pneumonia" are SNOMED CT International concepts not listed in PS3.16.
FINDING_CODES: Mapping[str, CodedConcept] = {
    "normal": _SCT_NORMAL,
    "no finding": _SCT_NORMAL,
    "abnormal": CodedConcept("263654008", "SCT", "Abnormal"),
    "effusion": _SCT_PLEURAL_EFFUSION,
    "pleural effusion": _SCT_PLEURAL_EFFUSION,
    "pneumothorax": CodedConcept("36118008", "SCT", "Pneumothorax"),
    "nodule": _SCT_PULMONARY_NODULE,
    "lung nodule": _SCT_PULMONARY_NODULE,
    "pulmonary nodule": _SCT_PULMONARY_NODULE,
    "mass": CodedConcept("4147007", "SCT", "Mass"),
    "cardiomegaly": CodedConcept("287272002", "SCT", "Cardiomegaly"),
    "edema": _SCT_PULMONARY_EDEMA,
    "pulmonary edema": _SCT_PULMONARY_EDEMA,
    "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
    "fibrosis": CodedConcept("112674009", "SCT", "Fibrosis"),
    "opacity": CodedConcept("112001", "DCM", "Opacity"),
    "infiltrate": CodedConcept("112121", "DCM", "Infiltrate"),
    "infiltration": CodedConcept("112121", "DCM", "Infiltrate"),
}


def _normalise_label(label: str) -> str:
    return re.sub(r"[\s_\-]+", " ", label.strip().lower())


def _local_label_code(label: str) -> CodedConcept:
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:12].upper()
    return _local(f"LBL{digest}", _lo(label) or "(unnamed label)")


def finding_code(label: str) -> CodedConcept:
    """The coded finding for a model label: a standard code when known, else a local one."""
    known = FINDING_CODES.get(_normalise_label(label))
    if known is not None:
        return CodedConcept(known.value, known.scheme_designator, known.meaning)
    return _local_label_code(label)


def _label_codes(labels: Sequence[str]) -> dict[str, CodedConcept]:
    """One distinct code per label, so a code read back names exactly one label."""
    result: dict[str, CodedConcept] = {}
    seen: set[tuple[str, str]] = set()
    for label in labels:
        code = finding_code(label)
        if (code.scheme_designator, code.value) in seen:
            code = _local_label_code(label)
        seen.add((code.scheme_designator, code.value))
        result[label] = code
    return result


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


#: What a text value (UT, the TEXT items' Text Value) may not hold: every control character
#: but LF, FF and CR (PS3.5 6.2: a TAB is none of the control characters UT may hold; ESC
#: belongs to the character set's own encoding), and unpaired surrogates, which no character
#: set writes.
_NOT_IN_TEXT = re.compile("[\x00-\x09\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def sr_text(text: str) -> str:
    """``text`` as a text value may hold it: each character it may not (a NUL, an escape
    sequence's ESC, a TAB, ...; see :data:`_NOT_IN_TEXT`) written as a space. Readers' words
    are refused with such characters but a TAB before they get here
    (:mod:`acwi_node.review.inputs`): this keeps the document valid whatever the words."""
    return _NOT_IN_TEXT.sub(" ", text)


def _string(text: str) -> str:
    """``text`` as a string value (LO, PN) may hold it: each control character a space."""
    return NOT_IN_STRING.sub(" ", text)


def _lo(text: str) -> str:
    """A Long String value: no backslash (the value separator), no control character, at
    most 64 characters."""
    return _string(text).replace("\\", "/")[:LO_MAX]


def procedure_codes(sources: Sequence[Dataset]) -> list[CodedConcept]:
    """Procedure Reported (TID 1500, 1-n; BCID 100 is extensible) for the study of
    ``sources``: the codes of their Procedure Code Sequence (0008,1032), else those of the
    Requested Procedure Code Sequence (0032,1064) of their Request Attributes Sequence items
    (or at the top level), else :data:`IMAGING_PROCEDURE`. Each code once (by scheme and
    value, the first meaning), in the order of the sources and their items; an item that is not
    a usable code (:func:`~acwi_node.results.codes.usable_code`) counts as
    :data:`IMAGING_PROCEDURE`."""
    performed = [item for ds in sources for item in code_items(ds, "ProcedureCodeSequence")]
    requested: list[Dataset] = []
    for ds in sources:
        for request in code_items(ds, "RequestAttributesSequence"):
            requested += code_items(request, "RequestedProcedureCodeSequence")
        requested += code_items(ds, "RequestedProcedureCodeSequence")
    found: dict[tuple[str, str], CodedConcept] = {}
    read: set[tuple[Any, ...]] = set()  # the items read: every slice of a CT repeats its own
    for item in performed or requested:
        try:
            raw = tuple(str(item.get(keyword)) for keyword in CODE_KEYWORDS)
        except Exception:  # a source's malformed code never stops the SR
            raw = None
        if raw is not None:
            if raw in read:
                continue
            read.add(raw)
        code = usable_code(item) or _generic_procedure()
        found.setdefault((code.scheme_designator, code.value), code)
    return list(found.values()) or [_generic_procedure()]


def _generic_procedure() -> CodedConcept:
    return CodedConcept(
        IMAGING_PROCEDURE.value, IMAGING_PROCEDURE.scheme_designator, IMAGING_PROCEDURE.meaning
    )


def _check_sources(
    sources: Sequence[Dataset], analysis: StudyAnalysis
) -> tuple[str, dict[str, Dataset]]:
    if not sources:
        raise ValueError("build_sr needs at least one source instance")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources}
    if len(study_uids) != 1:
        raise ValueError(f"source instances belong to more than one study: {sorted(study_uids)}")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    missing = [
        img.sop_instance_uid for img in analysis.images if img.sop_instance_uid not in by_uid
    ]
    if missing:
        raise ValueError(f"analysed images not among the source instances: {missing}")
    if not analysis.labels:
        raise ValueError("the analysis has no labels")
    unknown = [label for label in analysis.labels if label not in analysis.probabilities]
    if unknown:
        raise ValueError(f"no study-level probability for labels: {unknown}")
    return study_uids.pop(), by_uid


def _algorithm(analysis: StudyAnalysis) -> AlgorithmIdentification:
    model = analysis.model
    return _algorithm_items(model.name, model.version, model.manufacturer or None)


@functools.lru_cache(maxsize=16)
def _algorithm_items(name: str, version: str, manufacturer: str | None) -> AlgorithmIdentification:
    """The algorithm identification items (TID 4019), built once per model: every measurement
    and group of a document holds the same ones (a 100-slice CT has 1,200), and nothing
    changes a built document's items."""
    return AlgorithmIdentification(name=name, version=version, manufacturer=manufacturer)


def algorithm_equipment(name: str, version: str, manufacturer: str) -> ContributingEquipment:
    """The Contributing Equipment item that describes the model that produced a result (IHE
    AIR: Purpose of Reference "Processing Algorithm", Manufacturer, Manufacturer's Model Name
    and Software Versions). AIR's Device UID is not written: the SOP Common Module's
    Contributing Equipment Sequence has no such attribute as dicom3tools' dciodvfy knows it
    (the document would be a Standard Extended SOP Class); the content tree's Device Observer
    UID identifies the model."""
    item = ContributingEquipment(
        manufacturer=_lo(manufacturer) or MANUFACTURER,
        # highdicom takes CID 7005's codes only; the item then gets IHE's (CID 7005 is
        # extensible)
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(name),
        software_versions=_lo(version),
        contribution_description="AI model that produced the results",
    )
    item.PurposeOfReferenceCodeSequence = [
        CodedConcept(
            PROCESSING_ALGORITHM.value,
            PROCESSING_ALGORITHM.scheme_designator,
            PROCESSING_ALGORITHM.meaning,
        )
    ]
    return item


def _is_algorithm_item(item: Dataset) -> bool:
    purpose = item.get("PurposeOfReferenceCodeSequence") or []
    return any(
        (str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")))
        == _key(PROCESSING_ALGORITHM)
        for code in purpose
    )


def _verified_equipment(
    unverified: Dataset, model_name: str, model_version: str
) -> list[ContributingEquipment]:
    """The algorithm items of the SR a verified SR verifies: its own, or for an SR written
    without them, one for its algorithm (the manufacturer its device observer names)."""
    found = [
        algorithm_equipment(
            str(item.get("ManufacturerModelName", "") or model_name),
            str(item.get("SoftwareVersions", "") or model_version),
            str(item.get("Manufacturer", "") or MANUFACTURER),
        )
        for item in unverified.get("ContributingEquipmentSequence") or []
        if _is_algorithm_item(item)
    ]
    if found:
        return found
    maker = next(
        (
            str(item.TextValue)
            for item in _children(unverified)
            if _concept(item) == ("DCM", "121014")  # Device Observer Manufacturer
            and item.get("TextValue")
        ),
        MANUFACTURER,
    )
    return [algorithm_equipment(model_name, model_version, maker)]


def _source_refs(
    images: Sequence[Dataset], frame_number: int | None = None
) -> list[SourceImageForMeasurementGroup]:
    """The group's source images; ``frame_number``: the one frame of a multi-frame image an
    image's group is for."""
    frames = [frame_number] if frame_number is not None else None
    return [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            referenced_frame_numbers=frames,
        )
        for ds in images
    ]


def _number(
    name: CodedConcept,
    value: float,
    unit: CodedConcept,
    method: CodedConcept,
    analysis: StudyAnalysis,
) -> Measurement:
    return Measurement(
        name=name,
        value=float(value),
        unit=unit,
        method=method,
        algorithm_id=_algorithm(analysis),
    )


def _label_group(
    label: str,
    probability: float,
    scope: str,
    method: CodedConcept,
    code: CodedConcept,
    images: Sequence[Dataset],
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    frame_number: int | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.tracking_uid(label, scope), identifier=label
        ),
        finding_type=code,
        algorithm_id=_algorithm(analysis),
        measurements=[_number(PROBABILITY, probability, NO_UNITS, method, analysis)],
        source_images=_source_refs(images, frame_number),
    )


def _summary_group(
    identifier: str,
    scope: str,
    method: CodedConcept,
    uncertainty: Uncertainty,
    ood_score: float,
    images: Sequence[Dataset],
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    evaluations: Sequence[QualitativeEvaluation] = (),
    frame_number: int | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    measurements = [
        _number(concept, getattr(uncertainty, field), unit, method, analysis)
        for field, concept, unit in _UNCERTAINTY_FIELDS
    ]
    measurements.append(_number(OOD_SCORE, ood_score, NO_UNITS, method, analysis))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.summary_tracking_uid(scope), identifier=identifier
        ),
        algorithm_id=_algorithm(analysis),
        measurements=measurements,
        qualitative_evaluations=list(evaluations) or None,
        source_images=_source_refs(images, frame_number),
    )


#: What an Image Library entry of an image without the descriptors highdicom reads says of it:
#: TID 1602's rows for any image (its modality, from its SOP Class, and the frame of reference).
_PLAIN_ENTRY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID")


def _plain_entry_image(ds: Dataset) -> Dataset:
    """A stand-in for ``ds`` whose Image Library entry has TID 1602's descriptors for any image
    alone: highdicom's TID 1603/1604 descriptors need the geometry at the top level of the
    dataset, which an enhanced multi-frame image keeps in its functional groups (an empty
    Modality is neither a projection nor a cross-sectional modality to highdicom; the coded
    modality is its SOP Class's)."""
    plain = Dataset()
    for keyword in _PLAIN_ENTRY_KEYWORDS:
        if ds.get(keyword) not in (None, ""):
            setattr(plain, keyword, ds[keyword].value)
    plain.Modality = ""
    return plain


def _library_images(sources: Sequence[Dataset]) -> list[Dataset]:
    """What the Image Library entries (TID 1601/1602) describe, each source once: the source,
    or where highdicom cannot describe it, a stand-in with the descriptors of any image
    (:func:`_plain_entry_image`); a source of a class highdicom has no modality for, in the
    class it has for the same modality (:mod:`.library_classes`; the entry's class is the
    source's again in :func:`~.image_library.describe`); a source that is no image, or of
    another class highdicom does not know, is left out."""
    usable: list[Dataset] = []
    seen: set[str] = set()
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        for candidate in (ds, _plain_entry_image(ds)):
            # an image of a class highdicom has no modality for: as one of a class it has
            described = in_known_class(candidate)
            try:
                ImageLibraryEntryDescriptors(described)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                continue
            seen.add(uid)
            usable.append(described)
            break
    return usable


def build_sr(
    sources: Sequence[Dataset],
    analysis: StudyAnalysis,
    *,
    institution_name: str | None = None,
    check_all: bool = False,
    now: dt.datetime | None = None,
    timezone: str = "UTC",
    region_fraction: float | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR holding ``analysis`` for the study of ``sources``.

    ``region_fraction``: each image the model reports a finding on gets an AI region group
    (TID 1410, module docstring), the box around the connected region of its heatmap at or
    above this fraction of the peak that holds the peak; None: no region groups.

    Its own dates and times are ``now`` (None: the moment it is built) in the source study's
    offset from UTC, else in ``timezone`` (the hospital's), with Timezone Offset From UTC
    (:func:`~acwi_node.results.headers.set_result_times`).

    ``sources`` are all instances received for the study (analysed or skipped); the first one
    supplies the patient and study attributes. Series and SOP Instance UIDs come from
    :func:`~acwi_node.results.uids.result_uids`, so a re-run replaces the earlier document.

    highdicom's document constructor copies the whole content tree and walks it, item by item,
    to check every image reference against the evidence: for a 100-slice CT (about 9,400
    content items) that took 5-10 s, most of the result's time. So the constructor is given a
    stand-in to copy and check, a report with one empty group and no image reference (it was
    the study-level groups, which reference every analysed image: a radiograph's SR 58 -> 33
    ms, a 100-slice CT's 0.39 -> 0.21 s), and the document then gets the whole report's
    content; the evidence, every source, is the same either way.
    The per-image groups (about 80 content items per image, alike but for a dozen values) and
    Image Library entries are not built by highdicom one by one either: highdicom builds them
    once, for a stand-in image, and every image's are encoded from that template
    (:mod:`.image_groups`, :mod:`.image_library`; a 100-slice CT's SR 3.6-4.7 s -> 0.8-0.95 s
    to build, 0.8-1.3 s -> 0.01 s to encode). The measurement group templates are kept for
    the next studies, and the study-level groups have one too, for a stand-in study with as
    many images (:mod:`.study_groups`): a radiograph's SR 33 -> 18 ms to build, a 100-slice
    CT's 0.21 -> 0.10 s. The AI regions are rendered from templates too (:mod:`.region_groups`:
    100 regions 0.67 -> 0.1 s). ``check_all``: build every group and entry with highdicom and give
    the constructor the whole report (the same document, slower; the tests compare the two).
    """
    study_uid, by_uid = _check_sources(sources, analysis)
    model = analysis.model
    uids = result_uids(study_uid, model.name, model.version, analysis.reissue)
    # Each analysed image once: a multi-frame image has a result per frame.
    analysed = [
        by_uid[uid] for uid in dict.fromkeys(img.sop_instance_uid for img in analysis.images)
    ]
    codes_by_label = _label_codes(analysis.labels)
    procedures = procedure_codes(sources)

    def build_study_groups(
        study: StudyAnalysis, images: Sequence[Dataset]
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        return _study_groups(study, images, uids, codes_by_label)

    def build_image_groups(
        number: int, image: ImageResult, source: Dataset
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        return _image_groups(number, image, source, analysis, uids, codes_by_label)

    def all_image_groups() -> list[MeasurementsAndQualitativeEvaluations]:
        return [
            group
            for number, image in enumerate(analysis.images, start=1)
            for group in build_image_groups(number, image, by_uid[image.sop_instance_uid])
        ]

    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(model.name, model.version, model.weights_sha256),
            name=model.name,
            manufacturer_name=model.manufacturer or None,
            model_name=f"{model.name} {model.version}",
            serial_number=model.weights_sha256 or None,
        ),
    )
    context = ObservationContext(observer_device_context=observer)
    specs = [] if region_fraction is None else _ai_region_specs(analysis, by_uid, region_fraction)
    fraction = 0.0 if region_fraction is None else region_fraction

    def build_region(spec: RegionSpec) -> PlanarROIMeasurementsAndQualitativeEvaluations:
        return _ai_region_group(spec, analysis, uids, codes_by_label, fraction)

    def all_regions() -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
        return [build_region(spec) for spec in specs]

    groups: list[_Group]
    if check_all:
        groups = [*build_study_groups(analysis, analysed), *all_image_groups(), *all_regions()]
        report: MeasurementReport | None = _report(context, procedures, groups, analysed)
    else:
        report = None
    # What highdicom's document constructor copies and checks (see above): a stand-in report
    # that references no image, so that the copy and the walk cost the same for any study.
    # The check it skips (every image the content references is in the evidence) holds by
    # construction: every group and Image Library entry is for an analysed image, which
    # _check_sources found among the sources, and every source is evidence.
    checked = report if report is not None else _stand_in_report(context, procedures)
    # the source's character set, unless the model's words or the procedures' need more
    # (UTF-8 then: a procedure's meaning may come from a source in another character set)
    charset = result_charset(
        sources[0].get("SpecificCharacterSet"),
        [
            *analysis.labels,
            model.name,
            model.version,
            model.manufacturer,
            institution_name,
            *code_texts(procedures),
            *code_texts(code for ds in analysed for code in library_descriptors(ds).codes()),
        ],
    )
    document = Comprehensive3DSR(
        evidence=[in_patient_study_class(patient_study_header(sources[0])), *sources[1:]],
        content=checked,
        specific_character_set=charset,
        series_instance_uid=uids.sr_series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=_lo(f"ACWI {model.name} {model.version} AI result"),
        manufacturer_model_name=_lo(model.name),
        software_versions=_lo(model.version),
        coding_schemes=[_PRIVATE_SCHEME_ITEM, _IHE_SCHEME_ITEM],
        contributing_equipment=[algorithm_equipment(model.name, model.version, model.manufacturer)],
    )
    if report is None:
        # The study-level groups (study_groups.py), then the per-image ones (image_groups.py),
        # encoded from templates; where a template cannot describe them, built by highdicom.
        encodings = document.get("SpecificCharacterSet")
        encoded = encode_image_groups(analysis, uids, build_image_groups, by_uid, encodings)
        if encoded is None:
            groups = [*build_study_groups(analysis, analysed), *all_image_groups(), *all_regions()]
            report = _report(context, procedures, groups, analysed)
        else:
            # the AI regions after the per-image groups, from templates too (region_groups.py)
            encoded += encode_region_groups(
                specs, analysis, uids, build_region, fraction, encodings
            )
            study = encode_study_groups(analysis, uids, build_study_groups, analysed, encodings)
            if study is None:
                groups = [*build_study_groups(analysis, analysed)]
                report = _report(
                    context, procedures, groups, analysed, encodings=encodings, templates=True
                )
                _append_encoded_groups(report, encoded, encodings)
            else:
                # The report's one group is the stand-in's, replaced by the encoded ones.
                groups = [_stand_in_group()]
                report = _report(
                    context, procedures, groups, analysed, encodings=encodings, templates=True
                )
                set_encoded(_measurements_container(report), study + encoded)
    # The root item's other attributes are the same in both reports. (highdicom's own parsed
    # copy, ``document.content``, keeps the checked one: the node never reads it.)
    document.ContentSequence = report[0].ContentSequence
    _restore_evidence_classes(document, sources)
    set_result_times(document, sources[0], now, timezone)
    return document


#: The evidence sequences of a document (PS3.3 C.17.2).
_EVIDENCE = ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")


def _restore_evidence_classes(document: Dataset, sources: Sequence[Dataset]) -> None:
    """The first source's own class in the evidence, where highdicom was given it in the
    stand-in class of its patient and study copy (:mod:`.iod_classes`: a class highdicom has
    no IOD for, a retired ultrasound image say)."""
    restore_reference_classes(document, sources[:1], _EVIDENCE)


#: The stand-in group's tracking UID: it is in no document (its report is only checked).
_STAND_IN_TRACKING_UID = derive_uid("sr-constructor-stand-in")


#: A measurement group of the report: TID 1501, or a TID 1410 AI region.
_Group = MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations


def _stand_in_group() -> MeasurementsAndQualitativeEvaluations:
    """A measurement group that is in no document (a report needs one to be built)."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_STAND_IN_TRACKING_UID, identifier="stand-in")
    )


def _stand_in_report(
    context: ObservationContext, procedures: Sequence[CodedConcept]
) -> MeasurementReport:
    """A TID 1500 report with the root item's attributes of every report built here (the
    document's observation context and procedures), one group and no image reference: what
    the document constructor copies and walks."""
    return MeasurementReport(
        observation_context=context,
        procedure_reported=procedures,
        imaging_measurements=[_stand_in_group()],
    )


def _study_groups(
    analysis: StudyAnalysis,
    images: Sequence[Dataset],
    uids: ResultUIDs,
    codes_by_label: Mapping[str, CodedConcept],
) -> list[MeasurementsAndQualitativeEvaluations]:
    """The study-level groups: one per label, then the summary, each over every analysed
    image."""
    groups = [
        _label_group(
            label,
            analysis.probabilities[label],
            STUDY_SCOPE,
            METHOD_STUDY,
            codes_by_label[label],
            images,
            analysis,
            uids,
        )
        for label in analysis.labels
    ]
    evaluations = [QualitativeEvaluation(NEEDS_REVIEW, YES if analysis.needs_review else NO)]
    if analysis.predicted_label in codes_by_label:
        evaluations.append(
            QualitativeEvaluation(PREDICTED_CLASS, codes_by_label[analysis.predicted_label])
        )
    groups.append(
        _summary_group(
            "Study summary",
            STUDY_SCOPE,
            METHOD_STUDY,
            analysis.uncertainty,
            analysis.ood_score,
            images,
            analysis,
            uids,
            evaluations,
        )
    )
    return groups


def _measurements_container(report: MeasurementReport) -> Dataset:
    """The Imaging Measurements container of ``report``."""
    return next(
        item
        for item in report[0].ContentSequence
        if item.ValueType == "CONTAINER" and _concept(item) == _IMAGING_MEASUREMENTS
    )


def _append_encoded_groups(report: MeasurementReport, encoded: bytes, encodings: Any) -> None:
    """Append encoded measurement groups to the Imaging Measurements container of ``report``."""
    append_encoded(_measurements_container(report), encoded, encodings)


def _report(
    context: ObservationContext,
    procedures: Sequence[CodedConcept],
    groups: Sequence[_Group],
    analysed: Sequence[Dataset],
    *,
    encodings: Any = None,
    templates: bool = False,
) -> MeasurementReport:
    """The TID 1500 report, with an Image Library entry for every analysed image that can have
    one (each source is described once; only when one cannot be are they tried one by one).
    ``templates``: highdicom lists the first image of each library group, and the others'
    entries are encoded from templates (:mod:`.image_library`; ``encodings``: the document's
    character set), where they can be."""
    unique = len({str(ds.SOPInstanceUID) for ds in analysed}) == len(analysed)
    if unique and templates and analysed:
        plan = plan_image_library(analysed)
        if plan is not None:
            try:
                report = MeasurementReport(
                    observation_context=context,
                    procedure_reported=procedures,
                    imaging_measurements=groups,
                    referenced_images=plan.representatives,
                )
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                pass  # as below: highdicom describes what it can
            else:
                describe_library(report, analysed)
                if plan.append_to(report, encodings):
                    return report
    if unique:
        try:
            report = MeasurementReport(
                observation_context=context,
                procedure_reported=procedures,
                imaging_measurements=groups,
                referenced_images=list(analysed) or None,
            )
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            pass  # a source an Image Library entry cannot describe: leave it out
        else:
            describe_library(report, analysed)
            return report
    library = _library_images(analysed)
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=procedures,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
    describe_library(report, analysed)
    return report


def _image_groups(
    number: int,
    image: ImageResult,
    source: Dataset,
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    codes_by_label: Mapping[str, CodedConcept],
) -> list[MeasurementsAndQualitativeEvaluations]:
    scope = image.name  # its SOP Instance UID, and its frame number for a frame
    groups = [
        _label_group(
            label,
            image.probabilities[label],
            scope,
            METHOD_IMAGE,
            codes_by_label[label],
            [source],
            analysis,
            uids,
            image.frame_number,
        )
        for label in analysis.labels
        if label in image.probabilities
    ]
    groups.append(
        _summary_group(
            f"Image {number} summary",
            scope,
            METHOD_IMAGE,
            image.uncertainty,
            image.ood_score,
            [source],
            analysis,
            uids,
            frame_number=image.frame_number,
        )
    )
    return groups


def finding_label(image: ImageResult, analysis: StudyAnalysis) -> str | None:
    """The finding the model reports on ``image``: its most probable label (the first of
    equals, in the manifest's order) when that is one of the manifest's finding labels (as
    the ``positive_or_uncertain`` heatmap policy decides; the heatmap then shows that label),
    else None."""
    labels = [label for label in analysis.labels if label in image.probabilities]
    if not labels:
        return None
    top = max(labels, key=lambda label: image.probabilities[label])
    return top if top in analysis.finding_labels else None


def _ai_region_specs(
    analysis: StudyAnalysis, by_uid: Mapping[str, Dataset], fraction: float
) -> list[RegionSpec]:
    """The AI regions of a document: one per image the model reports a finding on
    (:func:`finding_label`) whose heatmap has a peak, the box around the hot region holding it
    (:func:`~.heatmap_region.heatmap_region`). The heatmap is at the source's Rows x Columns,
    so the box is in the source image's pixels; a heatmap that is not (it cannot be located
    on the image) gives no region."""
    specs: list[RegionSpec] = []
    for number, image in enumerate(analysis.images, start=1):
        label = finding_label(image, analysis)
        if label is None:
            continue
        source = by_uid[image.sop_instance_uid]
        heat = image.heatmap_array()
        if heat.shape != (int(source.get("Rows") or 0), int(source.get("Columns") or 0)):
            continue
        region = heatmap_region(heat, fraction)
        if region is not None:
            specs.append(RegionSpec(number, image, source, label, region.box))
    return specs


def _ai_region_group(
    spec: RegionSpec,
    analysis: StudyAnalysis,
    uids: ResultUIDs,
    codes_by_label: Mapping[str, CodedConcept],
    fraction: float,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 group of one AI region: the box as a closed polyline in the source image's
    pixel coordinates (:func:`~.region_groups.region_corners`, as the radiologist's boxes are
    written), selected from the image and, for a frame of a multi-frame image, its frame."""
    image = spec.image
    frames = [image.frame_number] if image.frame_number is not None else None
    measurements = [
        _number(PROBABILITY, image.probabilities[spec.label], NO_UNITS, METHOD_IMAGE, analysis),
        _number(UNCERTAINTY_SCORE, image.uncertainty.score, NO_UNITS, METHOD_IMAGE, analysis),
        _number(HEATMAP_REGION_FRACTION, fraction, NO_UNITS, METHOD_HEATMAP_REGION, analysis),
    ]
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.region_tracking_uid(spec.label, image.name),
            identifier=f"AI region {spec.number}: {spec.label}",
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(region_corners(spec.box), dtype=np.float32).reshape(-1, 2),
            source_image=SourceImageForRegion(
                region_class(str(spec.source.SOPClassUID)), str(spec.source.SOPInstanceUID), frames
            ),
        ),
        finding_type=codes_by_label[spec.label],
        method=METHOD_HEATMAP_REGION,
        algorithm_id=_algorithm(analysis),
        measurements=measurements,
    )
    # a class highdicom has no IOD for was given as one it has (:func:`.iod_classes.region_class`)
    restore_reference_classes(group[0], [spec.source])
    return group


# ---------------------------------------------------------------------------------------------
# Verified SR (after a radiologist's verdict)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionRegion:
    """A lesion box a radiologist marked on one analysed image with the verdict."""

    #: The image's SOP Instance UID.
    sop_instance_uid: str
    #: The frame of a multi-frame image (1-based); None for a single-frame image.
    frame_number: int | None
    #: ``(x0, y0, x1, y1)``: the first and last column and row it covers, inclusive.
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Verification:
    """A radiologist's verdict that verifies an AI result."""

    #: Verifying Observer Name (PN), e.g. ``"Doe^Jane"``.
    observer_name: str
    #: Verifying Organization.
    organization: str
    #: ``confirm`` or ``override`` (see :data:`VERDICT_ACTIONS`).
    action: str
    #: The label the radiologist stands by (one of the model's labels).
    label: str
    #: Why the model's result was overridden (required for ``override``).
    reason: str
    #: When the verdict was given (UTC).
    verified_at: dt.datetime
    #: The lesion boxes the radiologist marked (a confirmed or corrected finding only).
    regions: tuple[LesionRegion, ...] = ()
    #: An amendment: the SOP Instance UID of the verified SR it replaces ("" for the verdict
    #: that first verified the result).
    amends: str = ""
    #: How many verified SRs of the case came before this one (0 for the first).
    revision: int = 0


def verified_sr_uid(study_uid: str, model_name: str, model_version: str, reissue: int = 0) -> str:
    """SOP Instance UID of the verified SR for one model version's result on one study (its
    ``reissue``-th after a withdrawal, :func:`acwi_node.results.uids.result_uids`)."""
    return derive_uid(
        UID_NAMESPACE,
        "sr-verified-instance",
        study_uid,
        model_name,
        model_version,
        *reissue_parts(reissue),
    )


def amended_sr_uid(predecessor_uid: str) -> str:
    """SOP Instance UID of the verified SR that amends the verified SR ``predecessor_uid``: a
    new instance (its content differs), derived from the one it replaces, so re-sending it
    replaces, never duplicates."""
    return derive_uid(UID_NAMESPACE, "sr-verified-amendment", predecessor_uid)


def _person_name(name: str) -> str:
    """A PN value: no value separator, no control character, at most 64 characters."""
    cleaned = _string(name).replace("\\", "/").replace("=", "-").strip()[:63] or "Unknown"
    # A single component is a family name: the trailing caret says so (PS3.5 6.2.1.2).
    return cleaned if "^" in cleaned else cleaned + "^"


def _dicom_datetime(value: dt.datetime, offset: dt.tzinfo = dt.timezone.utc) -> str:
    """A DT value for ``value`` (naive: UTC) in ``offset``, with the offset written."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(offset).strftime("%Y%m%d%H%M%S.%f%z")


def _verdict_group(
    verification: Verification,
    label_code: CodedConcept,
    uids: ResultUIDs,
) -> MeasurementsAndQualitativeEvaluations:
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids._derive("verdict-tracking"), identifier="Radiologist verdict"
        ),
        qualitative_evaluations=[
            QualitativeEvaluation(RADIOLOGIST_VERDICT, VERDICT_ACTIONS[verification.action]),
            QualitativeEvaluation(VERIFIED_LABEL, label_code),
        ],
    )
    if verification.reason:
        container = group[0]
        container.ContentSequence.append(
            TextContentItem(
                name=VERDICT_REASON,
                value=verification.reason[:1024],
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _region_groups(
    regions: Sequence[LesionRegion],
    sources: Sequence[Dataset],
    label_code: CodedConcept,
    uids: ResultUIDs,
) -> list[Dataset]:
    """One TID 1410 Planar ROI group per marked box: tracking identifier "Radiologist lesion
    box <n>", finding = the verified label, and the box as a closed polyline in the image's
    pixel coordinates (SCOORD: 0,0 is the top left corner of the top left pixel, so a box
    covering columns x0..x1 spans x0 to x1 + 1), selected from the image (and frame)."""
    classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sources}
    groups: list[Dataset] = []
    on_image: Counter[str] = Counter()  # boxes so far per image: each its own tracking UID
    for n, region in enumerate(regions, start=1):
        sop_class = classes.get(region.sop_instance_uid)
        if sop_class is None:
            raise ValueError("a lesion box names an image that is not among the sources")
        x0, y0, x1, y1 = region.box
        corners = [(x0, y0), (x1 + 1, y0), (x1 + 1, y1 + 1), (x0, y1 + 1), (x0, y0)]
        image = SourceImageForRegion(
            region_class(sop_class),  # the source's own class again below
            region.sop_instance_uid,
            [region.frame_number] if region.frame_number is not None else None,
        )
        name = unit_name(region.sop_instance_uid, region.frame_number)
        earlier = on_image[name]
        on_image[name] += 1
        tracking = (name,) if earlier == 0 else (name, str(earlier))
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uids._derive("verdict-region", *tracking),
                identifier=f"Radiologist lesion box {n}",
            ),
            referenced_region=ImageRegion(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=np.asarray(corners, dtype=np.float32),
                source_image=image,
            ),
            finding_type=label_code,
        )
        restore_reference_classes(group[0], sources)
        groups.append(group[0])
    return groups


def build_verified_sr(
    unverified: Dataset,
    sources: Sequence[Dataset],
    verification: Verification,
    *,
    reissue: int = 0,
    timezone: str = "UTC",
) -> Dataset:
    """The VERIFIED successor of an SR written by :func:`build_sr`.

    Its own dates and times, and the Verification DateTime, are ``verification.verified_at``
    in the unverified SR's offset from UTC, else the hospital's (``timezone``) at that moment.

    The content tree is the unverified document's, plus one "Radiologist verdict" measurement
    group (verdict, verified class, reason) and one planar ROI group per lesion box the
    radiologist marked (``verification.regions``). The document is complete, final and verified by
    ``verification.observer_name``; it lists the unverified SR in the Predecessor Documents
    Sequence, lives in the same series and has its own deterministic SOP Instance UID
    (:func:`verified_sr_uid`), so re-sending it replaces, never duplicates; ``reissue`` is the
    unverified SR's (its job summary's ``model.reissue``).

    An amendment (``verification.amends``: the verified SR it replaces) has its own UID
    (:func:`amended_sr_uid`), instance number 2 + ``verification.revision``, and lists the
    verified SR it replaces after the unverified one in the Predecessor Documents Sequence.
    """
    if verification.action not in VERDICT_ACTIONS:
        raise ValueError(
            f"verdict must be one of {sorted(VERDICT_ACTIONS)}, got {verification.action!r}"
        )
    # the reason as a text value holds it (and the charset chosen for that text)
    verification = dataclasses.replace(verification, reason=sr_text(verification.reason))
    if verification.action == "override" and not verification.reason.strip():
        raise ValueError("an override needs a reason")
    if not sources:
        raise ValueError("build_verified_sr needs the source instances")
    if str(unverified.get("VerificationFlag", "")) != "UNVERIFIED":
        raise ValueError("the document to verify is not an UNVERIFIED SR")
    summary = summarise_sr(unverified)
    labels = list(summary["probabilities"])
    if verification.label not in labels:
        raise ValueError(f"label {verification.label!r} is not one of the model's {labels}")
    model_name, model_version = summary["model_name"], summary["model_version"]
    if not model_name or not model_version:
        raise ValueError("the SR names no algorithm")
    study_uid = str(unverified.StudyInstanceUID)
    other = {str(ds.StudyInstanceUID) for ds in sources} - {study_uid}
    if other:
        raise ValueError(f"source instances from another study: {sorted(other)}")
    uids = result_uids(study_uid, model_name, model_version, reissue)

    root = Dataset()
    for keyword in (
        "ValueType",
        "ConceptNameCodeSequence",
        "ContinuityOfContent",
        "ContentTemplateSequence",
    ):
        if keyword in unverified:
            setattr(root, keyword, copy.deepcopy(unverified[keyword].value))
    root.ContentSequence = copy.deepcopy(unverified.ContentSequence)
    measurements = [
        item for item in root.ContentSequence if _concept(item) == _IMAGING_MEASUREMENTS
    ]
    if not measurements:
        raise ValueError("the SR has no Imaging Measurements container")
    codes_by_label = _label_codes(labels)
    group = _verdict_group(verification, codes_by_label[verification.label], uids)
    measurements[0].ContentSequence.append(group[0])
    for region_group in _region_groups(
        verification.regions, sources, codes_by_label[verification.label], uids
    ):
        measurements[0].ContentSequence.append(region_group)

    previous = [unverified]
    sop_instance_uid = verified_sr_uid(study_uid, model_name, model_version, reissue)
    if verification.amends:
        # the verified SR it replaces: in the same series, of the same class
        replaced = Dataset()
        replaced.StudyInstanceUID = study_uid
        replaced.SeriesInstanceUID = unverified.SeriesInstanceUID
        replaced.SOPClassUID = Comprehensive3DSRStorage
        replaced.SOPInstanceUID = verification.amends
        previous.append(replaced)
        sop_instance_uid = amended_sr_uid(verification.amends)
    # the source's character set, unless the radiologist's or the model's words need more:
    # UTF-8 then (a name or reason in another script would otherwise be question marks)
    equipment = _verified_equipment(unverified, model_name, model_version)
    words = (verification.observer_name, verification.organization, verification.reason)
    makers = [str(item.Manufacturer) for item in equipment]
    # the study's procedures as the unverified SR reported them (its content is copied)
    procedures = [
        code
        for item in root.ContentSequence
        if _concept(item) == _PROCEDURE_REPORTED
        for code in item.get("ConceptCodeSequence") or []
    ]
    # and the codes of its Image Library (an image's laterality and view, as its source has them)
    library_codes = [
        code
        for item in root.ContentSequence
        if _concept(item) == _IMAGE_LIBRARY
        for child in _walk(item)
        if child.get("ValueType") == "CODE"
        for code in child.get("ConceptCodeSequence") or []
    ]
    charset = result_charset(
        sources[0].get("SpecificCharacterSet"),
        [*words, *labels, *makers, *code_texts(procedures), *code_texts(library_codes)],
    )
    document = Comprehensive3DSR(
        evidence=[in_patient_study_class(patient_study_header(sources[0])), *sources[1:]],
        content=root,
        series_instance_uid=str(unverified.SeriesInstanceUID),
        series_number=int(unverified.get("SeriesNumber", SR_SERIES_NUMBER) or SR_SERIES_NUMBER),
        sop_instance_uid=sop_instance_uid,
        instance_number=VERIFIED_SR_INSTANCE_NUMBER + max(0, verification.revision),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        institution_name=unverified.get("InstitutionName") or None,
        verifying_observer_name=_person_name(verification.observer_name),
        verifying_organization=_lo(verification.organization),
        previous_versions=previous,
        # a Series-level attribute: the same for every SR of the series (a PACS shows one)
        series_description=_lo(
            str(unverified.get("SeriesDescription") or f"ACWI {model_name} {model_version}")
        ),
        manufacturer_model_name=_lo(model_name),
        software_versions=_lo(model_version),
        coding_schemes=[_PRIVATE_SCHEME_ITEM, _IHE_SCHEME_ITEM],
        contributing_equipment=equipment,
        specific_character_set=charset,
    )
    _restore_evidence_classes(document, sources)
    offset = set_result_times(document, unverified, verification.verified_at, timezone)
    document.VerifyingObserverSequence[0].VerificationDateTime = _dicom_datetime(
        verification.verified_at, offset
    )
    return document


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (str(seq[0].CodingSchemeDesignator), str(seq[0].CodeValue))


def _code_value(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptCodeSequence")
    if not seq:
        return None
    return (str(seq[0].CodingSchemeDesignator), str(seq[0].CodeValue))


def _key(code: CodedConcept) -> tuple[str, str]:
    return (code.scheme_designator, code.value)


def _children(item: Dataset) -> Sequence[Dataset]:
    seq = item.get("ContentSequence")
    return list(seq) if seq else []


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _num_value(item: Dataset) -> float | None:
    seq = item.get("MeasuredValueSequence")
    if not seq:
        return None
    measured = seq[0]
    if "FloatingPointValue" in measured:
        return float(measured.FloatingPointValue)
    return float(measured.NumericValue)


def _image_uid(item: Dataset) -> str | None:
    seq = item.get("ReferencedSOPSequence")
    if not seq:
        return None
    return str(seq[0].ReferencedSOPInstanceUID)


def _image_name(item: Dataset) -> str | None:
    """The referenced image as :attr:`ImageResult.name` names it: its SOP Instance UID, with
    the frame number of a reference to one frame."""
    uid = _image_uid(item)
    if uid is None:
        return None
    frames = item.ReferencedSOPSequence[0].get("ReferencedFrameNumber")
    if frames is None or frames == "":
        return uid
    values = list(frames) if isinstance(frames, MultiValue | list) else [frames]
    return unit_name(uid, int(values[0])) if len(values) == 1 else uid


def _region(item: Dataset) -> dict[str, Any] | None:
    """A lesion box read back from its SCOORD item: ``{"image": name, "box": [x0, y0, x1,
    y1]}`` (the columns and rows it covers, inclusive), None without an image or points."""
    images = [_image_name(child) for child in _children(item) if child.get("ValueType") == "IMAGE"]
    points = [float(v) for v in item.get("GraphicData") or []]
    if not images or images[0] is None or len(points) < 4:
        return None
    xs, ys = points[0::2], points[1::2]
    box = [int(min(xs)), int(min(ys)), int(max(xs)) - 1, int(max(ys)) - 1]
    return {"image": images[0], "box": box}


def _measurement_groups(ds: Dataset) -> Iterator[Dataset]:
    for container in _children(ds):
        if _concept(container) != _IMAGING_MEASUREMENTS:
            continue
        for group in _children(container):
            if _concept(group) == _MEASUREMENT_GROUP and group.get("ValueType") == "CONTAINER":
                yield group


def _evidence_uids(ds: Dataset) -> list[str]:
    found: list[str] = []
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword) or []:
            for series in study.get("ReferencedSeriesSequence") or []:
                for ref in series.get("ReferencedSOPSequence") or []:
                    found.append(str(ref.ReferencedSOPInstanceUID))
    return found


_UNCERTAINTY_BY_CONCEPT = {_key(concept): field for field, concept, _ in _UNCERTAINTY_FIELDS}


def summarise_sr(ds: Dataset) -> dict[str, Any]:
    """Read the AI result back from an SR written by :func:`build_sr`.

    Only the dataset's content tree and evidence sequences are used. Returns a dict with:
    ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``; ``model_name`` and
    ``model_version`` (from the algorithm identification); ``probabilities`` (label ->
    study-level probability); ``image_probabilities`` (SOP Instance UID, ``"<uid> frame
    <n>"`` for a frame of a multi-frame image, -> label -> probability); ``uncertainty``
    (entropy, epistemic, aleatoric, score) and ``ood_score`` for the study;
    ``image_uncertainty`` (the same keys -> the same five numbers);
    ``needs_review`` (bool or None); ``predicted_label`` (str or None);
    ``evidence_sop_instance_uids`` (the evidence sequences) and
    ``referenced_sop_instance_uids`` (evidence plus every image referenced in the content),
    both sorted; ``verified`` (VerificationFlag is VERIFIED), ``verifying_observer`` (name or
    None) and ``verdict`` (``action``, ``label``, ``reason`` and ``regions``, the
    radiologist's lesion boxes as ``{"image", "box"}``, of a verified SR, else None);
    ``ai_regions``: the AI regions derived from the heatmaps, as ``{"image", "box",
    "label"}`` (groups whose method is "Heatmap region": never among the radiologist's).
    """
    probabilities: dict[str, float] = {}
    image_probabilities: dict[str, dict[str, float]] = {}
    uncertainty: dict[str, float] = {}
    image_uncertainty: dict[str, dict[str, float]] = {}
    ood_score: float | None = None
    needs_review: bool | None = None
    predicted_code: tuple[str, str] | None = None
    label_by_code: dict[tuple[str, str], str] = {}
    model_name: str | None = None
    model_version: str | None = None
    content_uids: set[str] = set()
    verdict_action: tuple[str, str] | None = None
    verdict_label: tuple[str, str] | None = None
    verdict_reason = ""
    regions: list[dict[str, Any]] = []
    ai_regions: list[tuple[dict[str, Any], tuple[str, str] | None]] = []

    for item in _walk(ds):
        if item.get("ValueType") == "IMAGE":
            uid = _image_uid(item)
            if uid is not None:
                content_uids.add(uid)

    for group in _measurement_groups(ds):
        if any(
            _concept(item) == _MEASUREMENT_METHOD
            and _code_value(item) == _key(METHOD_HEATMAP_REGION)
            for item in _children(group)
        ):
            # an AI region: its numbers repeat the image's groups'
            ai_finding = next(
                (_code_value(item) for item in _children(group) if _concept(item) == _FINDING),
                None,
            )
            for item in _children(group):
                if item.get("ValueType") == "SCOORD" and (region := _region(item)) is not None:
                    ai_regions.append((region, ai_finding))
            continue
        label: str | None = None
        finding: tuple[str, str] | None = None
        sources: list[str] = []
        numbers: list[tuple[tuple[str, str], float, tuple[str, str] | None]] = []
        for item in _children(group):
            concept = _concept(item)
            value_type = item.get("ValueType")
            if concept == _TRACKING_IDENTIFIER and value_type == "TEXT":
                label = str(item.TextValue)
            elif concept == _FINDING and value_type == "CODE":
                finding = _code_value(item)
            elif concept in _SOURCE_IMAGE_CONCEPTS and value_type == "IMAGE":
                name = _image_name(item)
                if name is not None:
                    sources.append(name)
            elif concept == _key(NEEDS_REVIEW) and value_type == "CODE":
                needs_review = _code_value(item) == _key(YES)
            elif concept == _key(PREDICTED_CLASS) and value_type == "CODE":
                predicted_code = _code_value(item)
            elif concept == _key(RADIOLOGIST_VERDICT) and value_type == "CODE":
                verdict_action = _code_value(item)
            elif concept == _key(VERIFIED_LABEL) and value_type == "CODE":
                verdict_label = _code_value(item)
            elif concept == _key(VERDICT_REASON) and value_type == "TEXT":
                verdict_reason = str(item.TextValue)
            elif value_type == "SCOORD":
                region = _region(item)
                if region is not None:
                    regions.append(region)
            elif value_type == "NUM" and concept is not None:
                value = _num_value(item)
                if value is None:
                    continue
                method: tuple[str, str] | None = None
                for child in _children(item):
                    child_concept = _concept(child)
                    if child_concept == _MEASUREMENT_METHOD:
                        method = _code_value(child)
                    elif child_concept == _ALGORITHM_NAME and model_name is None:
                        model_name = str(child.TextValue)
                    elif child_concept == _ALGORITHM_VERSION and model_version is None:
                        model_version = str(child.TextValue)
                numbers.append((concept, value, method))

        for concept, value, method in numbers:
            per_image = method == _key(METHOD_IMAGE)
            if per_image and len(sources) != 1:
                continue
            if concept == _key(PROBABILITY) and label is not None:
                if per_image:
                    image_probabilities.setdefault(sources[0], {})[label] = value
                else:
                    probabilities[label] = value
                    if finding is not None:
                        label_by_code.setdefault(finding, label)
                continue
            if concept in _UNCERTAINTY_BY_CONCEPT:
                field = _UNCERTAINTY_BY_CONCEPT[concept]
            elif concept == _key(OOD_SCORE):
                field = "ood_score"
            else:
                continue
            if per_image:
                image_uncertainty.setdefault(sources[0], {})[field] = value
            elif field == "ood_score":
                ood_score = value
            else:
                uncertainty[field] = value

    evidence = _evidence_uids(ds)
    verdict: dict[str, Any] | None = None
    if verdict_action is not None:
        actions = {_key(code): name for name, code in VERDICT_ACTIONS.items()}
        verdict = {
            "action": actions.get(verdict_action),
            "label": label_by_code.get(verdict_label) if verdict_label else None,
            "reason": verdict_reason,
            "regions": regions,
        }
    observers = ds.get("VerifyingObserverSequence") or []
    return {
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "model_name": model_name,
        "model_version": model_version,
        "probabilities": probabilities,
        "image_probabilities": image_probabilities,
        "uncertainty": uncertainty,
        "ood_score": ood_score,
        "image_uncertainty": image_uncertainty,
        "needs_review": needs_review,
        "predicted_label": label_by_code.get(predicted_code) if predicted_code else None,
        "evidence_sop_instance_uids": sorted(set(evidence)),
        "referenced_sop_instance_uids": sorted(set(evidence) | content_uids),
        "verified": str(ds.get("VerificationFlag", "")) == "VERIFIED",
        "verifying_observer": str(observers[0].VerifyingObserverName) if observers else None,
        "verdict": verdict,
        "ai_regions": [
            {**region, "label": label_by_code.get(code) if code else None}
            for region, code in ai_regions
        ],
    }
