"""PS3.16 Annex L's table of anatomic region codes and Body Part Examined terms, as the
node holds it (:mod:`acwi_node.body_part_terms`), and its lookup (:mod:`acwi_node.anatomy`)."""

from __future__ import annotations

import re

import pytest
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import codes

from acwi_node.anatomy import BODY_PART_BY_CODE, region_body_part
from acwi_node.body_part_terms import FORMER_REGIONS, REGIONS, SCHEME

#: Former codes pydicom's dictionary no longer holds (each documented in FORMER_REGIONS).
_RETIRED = {"280717001"}
_CID_4031 = {str(getattr(codes.cid4031, name).value) for name in codes.cid4031.dir()}
_SNOMED_CT: set[str] = {str(value) for by_value in concepts["SCT"].values() for value in by_value}  # type: ignore[attr-defined]
#: A CS value: upper case letters, digits, space and underscore, at most 16 characters.
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")


def test_every_code_is_a_snomed_ct_code_of_ps3_16() -> None:
    assert SCHEME == "SCT"
    for value, meaning, term in REGIONS:
        assert value in _CID_4031 or value in _SNOMED_CT, (value, meaning, term)
    for value, term, why in FORMER_REGIONS:
        assert value in _SNOMED_CT or value in _RETIRED, (value, term, why)
        assert value not in {row[0] for row in REGIONS}


def test_every_term_is_a_cs_value_and_one_a_code() -> None:
    values = [value for value, _, _ in REGIONS]
    terms = [term for _, _, term in REGIONS]
    assert len(set(values)) == len(values)  # one term a code
    assert len(set(terms)) == len(terms)  # one code a term
    for term in terms:
        assert _CS.fullmatch(term) and term == term.upper(), term
    for _, term, _ in FORMER_REGIONS:
        assert term in terms


def test_the_common_anatomic_regions_with_a_term_are_all_there() -> None:
    """Each CID 4031 region Annex L gives a term has it; the ones it does not are few."""
    held = {value for value, _, _ in REGIONS}
    left_out = {
        str(getattr(codes.cid4031, name).meaning)
        for name in codes.cid4031.dir()
        if str(getattr(codes.cid4031, name).value) not in held
    }
    assert {"Anus", "Facial bones", "Hip", "Tarsal joint"} <= left_out
    assert len(left_out) == 17


@pytest.mark.parametrize(
    ("scheme", "value", "term"),
    [
        ("SCT", "416775004", "CHESTABDPELVIS"),  # Chest, Abdomen and Pelvis
        ("SCT", "818982008", "ABDOMENPELVIS"),
        ("SCT", "416550000", "CHESTABDOMEN"),
        ("SCT", "774007", "HEADNECK"),
        ("SCT", "122494005", "CSPINE"),
        ("SCT", "122495006", "TSPINE"),
        ("SCT", "122496007", "LSPINE"),
        ("SCT", "38266002", "WHOLEBODY"),  # Entire body
        ("SCT", "11279006", "CIRCLEOFWILLIS"),
        ("SCT", "41801008", "CORONARYARTERY"),
        ("SCT", "28273000", "BILEDUCT"),
        ("SCT", "53620006", "TMJ"),
        ("SCT", "12738006", "BRAIN"),
        # one word whose term is not that word
        ("SCT", "54735007", "SSPINE"),  # Sacrum
        ("SCT", "24136001", "HIP"),  # Hip joint
        ("SCT", "40983000", "UPPERARM"),
        ("SCT", "30021000", "LOWERLEG"),
        ("SCT", "363654007", "ORBIT"),  # Orbital structure
        ("SCT", "91609006", "MANDIBLE"),
        ("SCT", "14975008", "FOREARM"),
        # former codes, and SNOMED RT ones
        ("SCT", "51185008", "CHEST"),
        ("SCT", "297172009", "TLSPINE"),
        ("SCT", "29836001", "HIP"),  # Hip (the region): Annex L gives HIP the joint's code
        ("SRT", "T-D3000", "CHEST"),
        ("SRT", "T-11503", "LSPINE"),
        ("SRT", "T-D00F8", "TLSPINE"),
        (" SCT", "416775004 ", "CHESTABDPELVIS"),
        # no term: none guessed
        ("SCT", "53505006", ""),  # Anus
        ("SCT", "91397008", ""),  # Facial bones
        ("DCM", "416775004", ""),
    ],
)
def test_a_code_has_its_term(scheme: str, value: str, term: str) -> None:
    assert region_body_part(scheme, value) == term


def test_every_region_has_its_term() -> None:
    for value, _, term in REGIONS:
        assert BODY_PART_BY_CODE[("SCT", value)] == term
