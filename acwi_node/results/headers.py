"""Source images' headers, as the result objects copy patient, study and anatomy from them.

What a result copies is cleaned of the non-conformant values found in the field that would
make highdicom refuse to build it, or make the result fail validation where its source did
not: a Patient's Sex outside M, F, O (:func:`clean_patient_sex`), a date or time that is no
valid DA, DT or TM value (:func:`conformant_date_time`), a Body Part Examined in lower case
(:func:`copy_anatomy`), an item of a code sequence that is no usable code (a Code Meaning
over 64 characters, an empty Code Value: :func:`~acwi_node.results.codes.clean_code_sequences`),
an optional descriptive attribute whose value its VR cannot hold (:func:`clean_descriptions`).
No value found wrong is ever put into an exception or a log: they are patient data.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import re
import warnings
import zoneinfo
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from highdicom import SOPClass
from highdicom._standard_utils import (
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom import DataElement, Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, DT, TM

from acwi_node.anatomy import region_body_part
from acwi_node.dicom_frames import frame_count, functional_groups
from acwi_node.results.codes import LO_MAX, NOT_IN_STRING, SH_MAX, clean_code_sequences
from acwi_node.results.iod_classes import patient_study_class

__all__ = [
    "IMAGE_LATERALITIES",
    "PATIENT_STUDY_TYPE2",
    "UNPAIRED_BODY_PARTS",
    "clean_date_times",
    "clean_descriptions",
    "clean_patient_sex",
    "conformant_date_time",
    "SeriesAnatomy",
    "copy_anatomy",
    "series_anatomy",
    "frame_anatomic_region",
    "frame_body_part",
    "frame_laterality",
    "copy_patient_and_study",
    "patient_study_header",
    "result_offset",
    "set_result_times",
    "source_header",
]

#: Patient and study attributes of type 2 in every result object; a source without one
#: (non-conformant, but stored all the same) gives it empty.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEX_VALUES = {"M", "F", "O"}
#: Pixel Data, Float Pixel Data, Double Float Pixel Data.
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def source_header(source: Dataset) -> Dataset:
    """Deep copy of ``source`` without its pixel data (which is not read either, where the
    source was read with it left in the file)."""
    header = Dataset()
    for tag in source.keys():  # noqa: SIM118 (iterating a Dataset reads every value)
        if tag in _PIXEL_DATA_TAGS:
            continue
        header.add(copy.deepcopy(source[tag]))
    return header


class _CopyProbe(SOPClass):
    """An empty highdicom SOP instance, only to see what highdicom copies from a source."""

    def __init__(self) -> None:
        Dataset.__init__(self)


@functools.lru_cache(maxsize=64)
def _patient_study_tags(sop_class_uid: str, present: frozenset[BaseTag]) -> tuple[BaseTag, ...]:
    """The tags that highdicom's ``copy_patient_and_study_information`` copies from a source
    of ``sop_class_uid`` holding the tags ``present``: the root attributes of its IOD's
    Patient and Study modules that it has. Found by letting highdicom copy into an empty
    probe from a source of that shape (element values do not change the choice)."""
    shape = Dataset()
    for tag in present:
        shape.add_new(tag, "UN", None)
    # a class highdicom has no IOD for: as the stand-in with the same Patient and Study modules
    shape.SOPClassUID = patient_study_class(sop_class_uid)
    probe = _CopyProbe()
    probe.copy_patient_and_study_information(shape)
    return tuple(sorted(probe.keys()))


# A date (DA), a time (TM), a date and time (DT) as PS3.5 6.2 writes them; and the lenient forms
# of a date or a time (ISO 8601's, ACR-NEMA's) the node repairs, as each can mean one thing only.
_DA = re.compile(r"(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})")
_DA_LENIENT = re.compile(r"(?P<y>\d{4})(?P<sep>[-.])(?P<m>\d{2})(?P=sep)(?P<d>\d{2})")
_TM = re.compile(r"(?P<h>\d{2})(?:(?P<m>\d{2})(?:(?P<s>\d{2})(?:\.(?P<f>\d*))?)?)?")
_TM_LENIENT = re.compile(r"(?P<h>\d{2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d*))?)?")
_DT = re.compile(
    r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?(?:[+-]\d{4})?"
)
#: TM's fraction of a second: at most six digits.
_TM_FRACTION = 6


def _parses(parse: Callable[[str], Any], value: str) -> bool:
    """Whether pydicom's ``parse`` (:class:`DA`, :class:`TM`, :class:`DT`) reads ``value`` as
    a date or time that exists (not 2 Feb 30, not year 0). Its exception, which names the
    value, is not kept."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a leap second: pydicom warns, DICOM allows it
            parse(value)
    except (ArithmeticError, TypeError, ValueError):
        return False
    return True


def _date(value: str) -> str:
    match = _DA.fullmatch(value) or _DA_LENIENT.fullmatch(value)
    if match is None:
        return ""
    date = match["y"] + match["m"] + match["d"]
    return date if _parses(DA, date) else ""


def _time(value: str) -> str:
    match = _TM.fullmatch(value) or _TM_LENIENT.fullmatch(value)
    if match is None:
        return ""
    time = match["h"] + (match["m"] or "") + (match["s"] or "")
    if match["f"]:
        time += "." + match["f"][:_TM_FRACTION]  # a 7th digit and on: below a microsecond
    return time if _parses(TM, time) else ""


def _date_time(value: str) -> str:
    return value if _DT.fullmatch(value) and _parses(DT, value) else ""


_CONFORMANT: dict[str, Callable[[str], str]] = {"DA": _date, "TM": _time, "DT": _date_time}


def conformant_date_time(vr: str, value: str) -> str:
    """``value`` of the VR ``vr`` (DA, TM or DT) as the standard writes it, or "" where it is
    no date or time that can be.

    A conformant value is kept. A lenient form of a date or a time that can mean one thing
    only is repaired: ``1967-03-21`` and ``1967.03.21`` are ``19670321``, ``10:15:00`` is
    ``101500``, a fraction of a second of more than six digits is cut to six. Anything else (a
    date that does not exist, as ``00000000`` or ``19700230``, ``21/03/1967``, whose order of
    day and month is a guess) is empty, which the Type 2 patient and study attributes allow."""
    return _CONFORMANT[vr](value.strip())


def _clean_date_time(element: DataElement) -> None:
    values: Iterable[Any]
    if isinstance(element.value, MultiValue | list | tuple):
        values = element.value
    else:
        values = [element.value]
    texts = [str(value) for value in values if value is not None and str(value).strip()]
    if not texts:
        return
    cleaned = [conformant_date_time(element.VR, text) for text in texts]
    if cleaned == texts:
        return
    kept = [value for value in cleaned if value]
    element.value = kept if len(kept) > 1 else (kept[0] if kept else "")


def clean_date_times(ds: Dataset, tags: Iterable[BaseTag] | None = None) -> None:
    """Each DA, TM, DT value among the top-level ``tags`` of ``ds`` (all of them: None) as
    :func:`conformant_date_time` writes it, in place. highdicom refuses a result whose source
    has a date or time pydicom cannot read (and its exception would name the value)."""
    for tag in ds.keys() if tags is None else tags:
        if tag not in ds:
            continue
        element = ds[tag]
        if element.VR in _CONFORMANT:
            _clean_date_time(element)


def clean_patient_sex(ds: Dataset) -> None:
    """``ds``'s Patient's Sex, where it has one, as M, F or O (case and spaces aside), else
    empty (unknown)."""
    if "PatientSex" not in ds:
        return
    sex = str(ds.PatientSex or "").strip().upper()
    ds.PatientSex = sex if sex in _PATIENT_SEX_VALUES else ""


def copy_patient_and_study(source: Dataset, result: Dataset) -> None:
    """What highdicom's ``SOPClass.copy_patient_and_study_information`` copies from
    ``source`` onto ``result``, as copies (``result`` shares no element with ``source``):
    without copying the whole header first and walking highdicom's module tables for every
    object (2-3 ms of each of a CT's heatmaps). Cleaned as :func:`patient_study_header`
    cleans it: Patient's Sex, dates and times, code sequences, descriptions."""
    tags = _patient_study_tags(str(source.SOPClassUID), frozenset(source.keys()))
    for tag in tags:
        result.add(copy.deepcopy(source[tag]))
    clean_patient_sex(result)
    clean_date_times(result, tags)
    clean_code_sequences(result, tags)
    clean_descriptions(result, str(source.SOPClassUID), tags)


def patient_study_header(source: Dataset) -> Dataset:
    """:func:`source_header`, with absent Type 2 patient/study attributes empty (as the IODs
    allow), a Patient's Sex outside the enumerated values empty (unknown), every date and
    time as :func:`conformant_date_time` writes it, and the patient and study attributes'
    code sequences (:func:`~acwi_node.results.codes.clean_code_sequences`) and descriptions
    (:func:`clean_descriptions`) cleaned: what a result object copies its patient and study
    from."""
    header = source_header(source)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    clean_patient_sex(header)
    clean_date_times(header)
    sop_class_uid = str(header.get("SOPClassUID", ""))
    try:
        tags: Iterable[BaseTag] = _patient_study_tags(sop_class_uid, frozenset(header.keys()))
    except Exception:  # an IOD highdicom does not know: every top-level attribute
        tags = list(header.keys())
    clean_code_sequences(header, tags)
    clean_descriptions(header, sop_class_uid, tags)
    return header


#: The longest value of each string VR a description may have (PS3.5 6.2); UC and UT have
#: no limit but their length's.
_MAX_LENGTH = {"SH": SH_MAX, "LO": LO_MAX, "ST": 1024, "LT": 10240, "UC": None, "UT": None}
#: What a text value (ST, LT, UT) may not hold: the control characters but LF, FF, CR and
#: ESC (PS3.5 6.1.3), unpaired surrogates.
_NOT_IN_TEXT = re.compile("[\x00-\x09\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f\ud800-\udfff]")
_SINGLE_VALUED = frozenset({"ST", "LT", "UT"})
_FORMS = {
    "CS": re.compile("[A-Z0-9 _]{0,16}"),
    "AS": re.compile(r"\d{3}[DWMY]"),
    "DS": re.compile(r" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)? *"),
}
_DS_MAX = 16


@functools.lru_cache(maxsize=64)
def _optional_root_keywords(sop_class_uid: str) -> frozenset[str]:
    """The type 3 root attributes of the Patient and Study modules of the IOD of
    ``sop_class_uid`` (for a class highdicom has no IOD for, those of the stand-in with the
    same modules, :func:`~.iod_classes.patient_study_class`)."""
    try:
        iod = get_sop_class_iod_map()[patient_study_class(sop_class_uid)]
        modules = [m["key"] for m in get_iod_module_map()[iod] if m["ie"] in {"Patient", "Study"}]
        table = get_module_attribute_map()
    except KeyError:
        return frozenset()
    return frozenset(
        str(attribute["keyword"])
        for module in modules
        for attribute in table.get(module, [])
        if not attribute["path"] and attribute["type"] == "3"
    )


def _valid_value(vr: str, value: str) -> bool:
    if vr in _FORMS:
        form = _FORMS[vr]
        return form.fullmatch(value) is not None and (vr != "DS" or len(value) <= _DS_MAX)
    if vr in _SINGLE_VALUED:
        limit = _MAX_LENGTH[vr]
        return not _NOT_IN_TEXT.search(value) and (limit is None or len(value) <= limit)
    limit = _MAX_LENGTH[vr]
    return (
        not NOT_IN_STRING.search(value)
        and "\\" not in value
        and (limit is None or len(value.strip(" ")) <= limit)
    )


def _is_identifier(keyword: str) -> bool:
    """An identifier of the patient, the study, an admission, a trial (Issuer of Patient ID,
    Admission ID, ...): copied as sent, whatever its value, as the archive files the result
    by it; a value cut or left out could file it elsewhere."""
    return keyword.endswith("ID") or keyword.startswith("IssuerOf")


def clean_descriptions(ds: Dataset, sop_class_uid: str, tags: Iterable[BaseTag]) -> None:
    """Leave out of ``ds``, in place, each of the top-level ``tags`` that is an optional (type
    3) attribute of the Patient and Study modules of ``sop_class_uid``'s IOD, of a string VR
    (SH, LO, ST, LT, UC, UT, CS, AS, DS), with a value its VR cannot hold: a Study
    Description longer than 64 characters, a control character in Patient Comments, a
    Patient's Weight of 17 characters. Identifiers (:func:`_is_identifier`), names (PN) and
    the attributes of types 1 and 2 are copied as sent."""
    optional = _optional_root_keywords(sop_class_uid)
    for tag in list(tags):
        try:
            if tag not in ds:
                continue
            element = ds[tag]
            keyword = element.keyword
            if keyword not in optional or _is_identifier(keyword):
                continue
            if element.VR not in _MAX_LENGTH and element.VR not in _FORMS:
                continue
            if element.value is None or element.value == "":
                continue
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            if all(_valid_value(element.VR, str(value)) for value in values):
                continue
        except Exception:  # a value pydicom cannot read: left out, as an invalid one
            pass
        if tag in ds:
            del ds[tag]


_OFFSET = re.compile(r"(?P<sign>[+-])(?P<h>\d{2})(?P<m>\d{2})")


def result_offset(source: Dataset, moment: dt.datetime, zone: str = "UTC") -> dt.timezone:
    """The offset from UTC a result object's own dates and times are written in: the source
    study's Timezone Offset From UTC where it has a valid one (the study's dates and times,
    which the result copies, are in it, and PS3.3 C.12.1.1.8 gives one offset to every date
    and time of an instance), else ``zone``'s (the hospital's, ``monitoring.timezone``) at
    ``moment`` (a naive ``moment`` is UTC)."""
    text = str(source.get("TimezoneOffsetFromUTC", "") or "").strip()
    match = _OFFSET.fullmatch(text)
    if match is not None:
        hours, minutes = int(match["h"]), int(match["m"])
        if hours <= 14 and minutes < 60:
            delta = dt.timedelta(hours=hours, minutes=minutes)
            return dt.timezone(-delta if match["sign"] == "-" else delta)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    offset = moment.astimezone(zoneinfo.ZoneInfo(zone)).utcoffset() or dt.timedelta(0)
    return dt.timezone(offset)


def _offset_text(offset: dt.timezone) -> str:
    minutes = int((offset.utcoffset(None) or dt.timedelta(0)).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def set_result_times(
    result: Dataset, source: Dataset, moment: dt.datetime | None = None, zone: str = "UTC"
) -> dt.timezone:
    """Write ``result``'s own dates and times (Instance Creation, Content, Series where it
    has them, Date/Time of Secondary Capture where it has them) for ``moment`` (None: now; a
    naive ``moment`` is UTC) in :func:`result_offset`'s offset, with that offset as its
    Timezone Offset From UTC: one clock for every date and time of the result, whatever the
    node's own time zone, and told apart in the hour repeated when the clocks go back.
    Returns the offset."""
    if moment is None:
        moment = dt.datetime.now(dt.timezone.utc)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    offset = result_offset(source, moment, zone)
    here = moment.astimezone(offset)
    date = here.strftime("%Y%m%d")
    time = here.strftime("%H%M%S.%f")
    result.InstanceCreationDate = date
    result.InstanceCreationTime = time
    for date_keyword, time_keyword in (
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        if date_keyword in result:
            setattr(result, date_keyword, date)
        if time_keyword in result:
            setattr(result, time_keyword, time)
    result.TimezoneOffsetFromUTC = _offset_text(offset)
    return offset


#: Body Part Examined values of unpaired structures (PS3.16 CID 4031), for which the General
#: Series module's Laterality (2C) must be absent; for any other body part, or none, it is
#: required (empty when the side is unknown). The set is dciodvfy's verdict on each value, so
#: that what the node writes validates.
# fmt: off
UNPAIRED_BODY_PARTS = frozenset((
    "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BACK", "BLADDER", "BRAIN", "CEREBELLUM", "CERVIX",
    "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "CIRCLEOFWILLIS", "COCCYX", "COLON",
    "CORONARYARTERY", "CSPINE", "CTSPINE", "DUODENUM", "ESOPHAGUS", "FACE", "GALLBLADDER",
    "HEAD", "HEADNECK", "HEART", "ILEUM", "ILIUM", "JAW", "JEJUNUM", "LARYNX", "LIVER",
    "LSPINE", "LSSPINE", "MAXILLA", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST",
    "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE", "PANCREAS", "PELVIS", "PENIS",
    "PHARYNX", "PROSTATE", "RECTUM", "SKULL", "SPINE", "SPLEEN", "STERNUM", "STOMACH",
    "THYMUS", "THYROID", "TLSPINE", "TONGUE", "TRACHEA", "TSPINE", "URETER", "URETHRA",
    "UTERUS", "VAGINA", "VULVA", "WHOLEBODY",
))
# fmt: on


def _region_term(region: Dataset | None) -> str:
    """The Body Part Examined term of an Anatomic Region code, where PS3.16 Annex L gives it
    one (:func:`~acwi_node.anatomy.region_body_part`); "" otherwise."""
    if not isinstance(region, Dataset):
        return ""
    return region_body_part(
        str(region.get("CodingSchemeDesignator", "")), str(region.get("CodeValue", ""))
    )


#: Image Laterality (0020,0062)'s Enumerated Values: right, left, unpaired, both.
IMAGE_LATERALITIES = frozenset({"R", "L", "U", "B"})


def _has_functional_groups(source: Dataset) -> bool:
    return any(
        isinstance(source.get(groups), DicomSequence)
        for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
    )


#: Frame Anatomy Sequence, Frame Laterality, Anatomic Region Sequence: read by tag (every
#: frame of a CT of hundreds is read, for each of its heatmaps).
_FRAME_ANATOMY, _FRAME_LATERALITY, _ANATOMIC_REGION = 0x00209071, 0x00209072, 0x00082218


def _group_anatomy(group: Dataset) -> tuple[str, Dataset | None] | None:
    """A functional group's Frame Laterality (upper case, "" for none) and first Anatomic
    Region item (None for none); None where the group has no Frame Anatomy."""
    try:
        anatomy = group.get(_FRAME_ANATOMY)
        if anatomy is None or not anatomy.value:
            return None
        item = anatomy.value[0]
        side = item.get(_FRAME_LATERALITY)
        regions = item.get(_ANATOMIC_REGION)
        region = regions.value[0] if regions is not None and regions.value else None
        return (
            str(side.value or "").strip().upper() if side is not None else "",
            region if isinstance(region, Dataset) else None,
        )
    except (TypeError, IndexError, AttributeError, KeyError):
        return None


def _one_frames_anatomy(source: Dataset, frame_number: int) -> tuple[str, Dataset | None]:
    """Frame ``frame_number``'s Frame Laterality (upper case, "" for none) and the first item of
    its Anatomic Region Sequence (None for none): its own Frame Anatomy functional group's,
    else the shared one's (the macro is one: a frame's own item wins whole)."""
    found: tuple[str, Dataset | None] = ("", None)
    for group in functional_groups(source, frame_number):  # the frame's own last: it wins
        found = _group_anatomy(group) or found
    return found


def _image_anatomy(source: Dataset) -> tuple[str, str]:
    """The Frame Laterality and the body part term (:func:`_region_term`) every frame of an
    enhanced image has, each "" where there is none or the frames' differ: one pass over the
    frames."""
    if not _has_functional_groups(source):
        return "", ""
    frames = frame_count(source)
    shared: tuple[str, Dataset | None] = ("", None)
    per_frame: list[Dataset] = []
    try:
        items = source.get("SharedFunctionalGroupsSequence")
        if isinstance(items, DicomSequence) and len(items) > 0:
            shared = _group_anatomy(items[0]) or shared
        items = source.get("PerFrameFunctionalGroupsSequence")
        if isinstance(items, DicomSequence):
            per_frame = list(items)[:frames]
    except (TypeError, AttributeError):
        return "", ""
    anatomies = [_group_anatomy(group) or shared for group in per_frame]
    anatomies += [shared] * (frames - len(anatomies))  # frames without a group: the shared
    sides = {side for side, _ in anatomies}
    parts = {_region_term(region) for _, region in anatomies}
    return (
        sides.pop() if len(sides) == 1 else "",
        parts.pop() if len(parts) == 1 else "",
    )


def frame_anatomic_region(source: Dataset, frame_number: int) -> Dataset | None:
    """Frame ``frame_number``'s Anatomic Region item (its Frame Anatomy functional group's,
    else the shared one's), the source's own item; None for none."""
    if not _has_functional_groups(source):
        return None
    return _one_frames_anatomy(source, frame_number)[1]


def frame_body_part(source: Dataset, frame_number: int | None = None) -> str:
    """The Body Part Examined term of an enhanced image's Frame Anatomy region (Anatomic
    Region Sequence), where PS3.16 Annex L gives its code one (Chest, Abdomen and Pelvis:
    CHESTABDPELVIS): frame ``frame_number``'s (its own group, else the shared one); for the
    whole image (None), the one every frame has. "" otherwise, and for the whole image when
    its frames' differ (a frame of the pelvis is never said to be of the chest because the
    first frame is)."""
    if frame_number is not None:
        return _region_term(frame_anatomic_region(source, frame_number))
    return _image_anatomy(source)[1]


def frame_laterality(source: Dataset, frame_number: int | None = None) -> str:
    """An enhanced image's Frame Laterality (R, L, U for an unpaired structure, B for both),
    from the Frame Anatomy functional groups: frame ``frame_number``'s (its own group, else the
    shared one); for the whole image (None), the one every frame has. "" when there is none,
    and for the whole image when its frames' differ (a frame of the left breast is never said
    to be of the right one because the first frame is)."""
    if not _has_functional_groups(source):
        return ""
    if frame_number is not None:
        return _one_frames_anatomy(source, frame_number)[0]
    return _image_anatomy(source)[0]


def _anatomy(source: Dataset) -> tuple[str, str]:
    """The source's Body Part Examined, upper case, without spaces around it (an enhanced
    image that names none: the Frame Anatomy region all its frames have), and its side, R or
    L (Laterality, else Image Laterality, else the Frame Laterality every frame of an enhanced
    image has, in either case); "" for none."""
    # CS is upper case: a "chest" in the field is written, and looked up, as CHEST
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    laterality = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "")
    laterality = laterality.strip().upper()
    if not body_part or laterality not in {"R", "L"}:  # the frames' (one pass over them)
        frame_side, frame_part = _image_anatomy(source)
        body_part = body_part or frame_part
        if laterality not in {"R", "L"} and frame_side in {"R", "L"}:
            laterality = frame_side
    return body_part, laterality if laterality in {"R", "L"} else ""


@dataclasses.dataclass(frozen=True)
class SeriesAnatomy:
    """What the sources of one result series all show (:func:`series_anatomy`): the Body
    Part Examined they share ("" where they differ or name none) and the side, R or L, they
    share ("" where they differ or have none)."""

    body_part: str
    laterality: str


def series_anatomy(sources: Iterable[Dataset]) -> SeriesAnatomy:
    """The anatomy the ``sources`` of a result series share (each source read once)."""
    anatomies = [_anatomy(ds) for ds in {id(ds): ds for ds in sources}.values()]
    body_parts = {body_part for body_part, _ in anatomies}
    sides = {side for _, side in anatomies}
    return SeriesAnatomy(
        body_part=body_parts.pop() if len(body_parts) == 1 else "",
        laterality=sides.pop() if len(sides) == 1 else "",
    )


def copy_anatomy(
    source: Dataset, result: Dataset, series: Sequence[Dataset] | SeriesAnatomy = ()
) -> None:
    """The source's Body Part Examined onto ``result`` (upper case, without spaces around it),
    (an enhanced image that names none: the Frame Anatomy region all its frames have,
    :func:`frame_body_part`; none where its frames' differ), and the General Series module's
    Laterality (2C): the source's side (Laterality, else Image Laterality, else the Frame
    Laterality all the frames of an enhanced image have) when it is R or L (in either case);
    absent for an unpaired body part; else empty (unknown).

    ``series``: the sources of the other instances of ``result``'s series. Both attributes
    are the series', the same in each of its instances (a PACS keeps one value for the
    series, and a hanging protocol places the series by it): a body part they do not all
    share is left out, and a side they do not all share is unknown (empty), so that a
    heatmap of the right breast is never in a series that says left. A
    :class:`SeriesAnatomy` of the series' sources (``source`` among them), made once for a
    study's results, stands for them: each result then costs nothing more than copying it (a
    CT of 400 slices, a heatmap each, read every source once for each heatmap: 4 s)."""
    shared = series if isinstance(series, SeriesAnatomy) else series_anatomy((source, *series))
    body_part = shared.body_part
    if body_part:
        result.BodyPartExamined = body_part
    elif "BodyPartExamined" in result:
        del result.BodyPartExamined
    laterality = shared.laterality
    if laterality:
        result.Laterality = laterality
    elif body_part in UNPAIRED_BODY_PARTS:
        if "Laterality" in result:
            del result.Laterality
    else:
        result.Laterality = ""
