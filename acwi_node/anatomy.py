"""Body Part Examined terms of Anatomic Region codes, and the body parts an image names.

An enhanced multi-frame image (Enhanced CT or MR, Breast Tomosynthesis, ...) often names its
anatomy only as a code, in the Frame Anatomy functional group (Frame Anatomy Sequence >
Anatomic Region Sequence), not in Body Part Examined (0018,0015). Routing matches such an
image by the Body Part Examined term of that code (:func:`image_body_parts`), and the result
objects name it (:mod:`acwi_node.results.headers`): the one table, :data:`BODY_PART_BY_CODE`,
serves both. It is PS3.16 Annex L's (:mod:`acwi_node.body_part_terms`): every region it gives
a term, of one word or several (Chest, Abdomen and Pelvis: CHESTABDPELVIS; Head and Neck:
HEADNECK; Lumbar spine: LSPINE), built once, at import. The C-STORE handler
reads the same codes without pydicom (:mod:`acwi_node.ingest.header`), with the same outcome.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr._snomed_dict import mapping as _snomed_mapping

from acwi_node.body_part_terms import FORMER_REGIONS, REGIONS, SCHEME
from acwi_node.dicom_classes import is_single_frame_class, reads_nothing

__all__ = [
    "BODY_PART_BY_CODE",
    "BODY_PART_MAX",
    "FRAME_ANATOMY_ITEMS_MAX",
    "image_body_parts",
    "joined_body_parts",
    "may_have_functional_groups",
    "region_body_part",
]

#: Body Part Examined is CS (16 characters a value); the ledger keeps a study's, and an
#: image's, values backslash-separated within 64 characters, each value whole.
BODY_PART_MAX = 64
#: How many Per-frame Functional Groups items are read, at most, for the frames' regions (an
#: image whose shared functional group names none): the first frames of a larger image only.
FRAME_ANATOMY_ITEMS_MAX = 10_000


def _body_parts_by_code() -> dict[tuple[str, str], str]:
    """PS3.16 Annex L's Body Part Examined term of each anatomic region code
    (:data:`~acwi_node.body_part_terms.REGIONS`: Chest: CHEST, Chest, Abdomen and Pelvis:
    CHESTABDPELVIS, Lumbar spine: LSPINE, Sacrum: SSPINE), of the codes those regions had
    before (:data:`~acwi_node.body_part_terms.FORMER_REGIONS`: Thorax 51185008: CHEST), and
    of the SNOMED RT codes (scheme SRT) of both (T-D3000: CHEST). A region Annex L gives no
    term (Anus, Facial bones) is not in it."""
    table: dict[tuple[str, str], str] = {}
    for value, _meaning, term in REGIONS:
        table[(SCHEME, value)] = term
    for value, term, _why in FORMER_REGIONS:
        table.setdefault((SCHEME, value), term)
    for srt, sct in _snomed_mapping["SRT"].items():
        known = table.get((SCHEME, sct))
        if known:
            table.setdefault(("SRT", srt), known)
    return table


#: (Coding Scheme Designator, Code Value) -> Body Part Examined term (:func:`_body_parts_by_code`).
BODY_PART_BY_CODE = _body_parts_by_code()


def region_body_part(scheme: str, value: str) -> str:
    """The Body Part Examined term of an Anatomic Region code (:data:`BODY_PART_BY_CODE`);
    "" for a code without one."""
    return BODY_PART_BY_CODE.get((scheme.strip(" \x00"), value.strip(" \x00")), "")


def may_have_functional_groups(sop_class_uid: str) -> bool:
    """Whether an image of ``sop_class_uid`` may name its anatomy in functional groups: a
    multi-frame image class (not a single-frame one, nor a class without images)."""
    return not is_single_frame_class(sop_class_uid) and not reads_nothing(sop_class_uid)


def joined_body_parts(terms: list[str]) -> str:
    """Distinct ``terms``, in order, backslash-separated, each whole within
    :data:`BODY_PART_MAX` characters (the ones that do not fit left out)."""
    joined = ""
    for term in terms:
        if not term or term in joined.split("\\"):
            continue
        longer = f"{joined}\\{term}" if joined else term
        if len(longer) <= BODY_PART_MAX:
            joined = longer
    return joined


def _group_region(group: object) -> str:
    """The body part term of a functional group item's Frame Anatomy region: its first
    Anatomic Region item's; "" where there is none or no term."""
    try:
        anatomy = group.get(0x00209071) if isinstance(group, Dataset) else None
        if anatomy is None or not isinstance(anatomy.value, DicomSequence) or not anatomy.value:
            return ""
        regions = anatomy.value[0].get(0x00082218)
        if regions is None or not isinstance(regions.value, DicomSequence) or not regions.value:
            return ""
        region = regions.value[0]
        return region_body_part(
            str(region.get("CodingSchemeDesignator", "") or ""),
            str(region.get("CodeValue", "") or ""),
        )
    except (TypeError, AttributeError, KeyError, IndexError):
        return ""


def _has_frame_anatomy(group: object) -> bool:
    if not isinstance(group, Dataset):
        return False
    anatomy = group.get(0x00209071)
    return anatomy is not None and isinstance(anatomy.value, DicomSequence) and bool(anatomy.value)


def image_body_parts(ds: Dataset) -> str:
    """The body parts routing matches an image by, backslash-separated: its Body Part
    Examined as it is; for a multi-frame image without one, the terms of its Frame Anatomy
    regions (:func:`region_body_part`): the shared functional group's, else each one its
    frames' own groups name (the first :data:`FRAME_ANATOMY_ITEMS_MAX`), in frame order,
    once each (:func:`joined_body_parts`). "" for none."""
    body_part = str(ds.get("BodyPartExamined", "") or "").strip()
    if body_part or not may_have_functional_groups(str(ds.get("SOPClassUID", "") or "")):
        return body_part
    shared = ds.get("SharedFunctionalGroupsSequence")
    if isinstance(shared, DicomSequence) and len(shared) > 0 and _has_frame_anatomy(shared[0]):
        return _group_region(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not isinstance(per_frame, DicomSequence):
        return ""
    items = list(per_frame)[:FRAME_ANATOMY_ITEMS_MAX]
    return joined_body_parts([_group_region(group) for group in items])
