"""Coded entries of the sources (the Code Sequence Macro, PS3.3 8.8), as the result objects
read and copy them.

:func:`usable_code` tells whether an item of a source's code sequence is a code the node can
write: the SR's Procedure Reported is read with it, and every result object copies the code
sequences of the source's patient and study through :func:`clean_code_sequences`, which
leaves out the items that are not (a Code Meaning longer than LO's 64 characters, an empty
Code Value, found in the field), so that a result does not fail validation for its source's
codes. Nothing of a code found wrong is logged or put in an exception: a code can name a
patient's diagnosis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag

__all__ = [
    "CODE_KEYWORDS",
    "LO_MAX",
    "MAX_CODE_ITEMS",
    "NOT_IN_STRING",
    "SH_MAX",
    "VALUE_KEYWORDS",
    "clean_code_sequences",
    "code_items",
    "code_texts",
    "is_code_sequence",
    "usable_code",
    "written_as",
]

#: Long String (LO): Code Meaning.
LO_MAX = 64
#: Short String (SH): Code Value, Coding Scheme Designator, Coding Scheme Version.
SH_MAX = 16
#: What a string value (SH, LO, PN) may not hold: any control character, unpaired surrogates.
NOT_IN_STRING = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: What a URN Code Value (UR) may not hold: anything but printable ASCII without spaces.
_NOT_IN_URN = re.compile("[^\x21-\x7e]")
#: The attributes of a code (the Basic Code Sequence Macro's).
CODE_KEYWORDS = (
    "CodeValue",
    "LongCodeValue",
    "URNCodeValue",
    "CodingSchemeDesignator",
    "CodingSchemeVersion",
    "CodeMeaning",
)
#: The attributes one of which holds a code's value.
VALUE_KEYWORDS = ("CodeValue", "LongCodeValue", "URNCodeValue")
#: At most this many items of one code sequence of a source are read (a real image's hold a
#: few).
MAX_CODE_ITEMS = 32
#: Code sequences whose items are not read deeper than this (a real header's nest two or three
#: deep).
_MAX_DEPTH = 8
#: Code sequences of the Patient module of type 2C: a sequence whose every item is left out
#: is kept, empty (the other code sequences of the Patient and Study modules are of type 3, or
#: 1C where an alternative attribute may stand instead, and are left out then).
_TYPE2_SEQUENCES = frozenset({"PatientBreedCodeSequence", "BreedRegistrationSequence"})


def _code_text(value: Any, limit: int | None) -> str | None:
    """One value of a code's string attribute as a string VR holds it (stripped: leading and
    trailing spaces are not significant in SH, LO, UC), None where it is absent, empty,
    several values, or holds what the VR may not (a control character, a backslash) or more
    than ``limit`` characters."""
    if not isinstance(value, str):
        return None
    text = value.strip(" ")
    if not text or NOT_IN_STRING.search(text) or "\\" in text:
        return None
    if limit is not None and len(text) > limit:
        return None
    return text


def usable_code(item: Dataset) -> CodedConcept | None:
    """The code of an item of a source's code sequence (the Code Sequence Macro) as the node
    writes it, None where it is not usable: not exactly one of Code Value, Long Code Value and
    URN Code Value, or a missing, empty or invalid value, Coding Scheme Designator, Coding
    Scheme Version or Code Meaning (longer than LO's 64 characters, say). A value over 16
    characters is written as Long Code Value (SH holds 16), one of URN Code Value as URN Code
    Value."""
    try:
        present = [keyword for keyword in VALUE_KEYWORDS if item.get(keyword) not in (None, "")]
        if len(present) != 1:
            return None
        keyword = present[0]
        value = _code_text(item.get(keyword), None)
        if keyword == "URNCodeValue" and value is not None and _NOT_IN_URN.search(value):
            value = None
        scheme = _code_text(item.get("CodingSchemeDesignator"), SH_MAX)
        meaning = _code_text(item.get("CodeMeaning"), LO_MAX)
        version: str | None = None
        if item.get("CodingSchemeVersion") not in (None, ""):
            version = _code_text(item.get("CodingSchemeVersion"), SH_MAX)
            if version is None:
                return None
        if value is None or scheme is None or meaning is None:
            return None
        code = CodedConcept(value, scheme, meaning, version)
    except Exception:  # a source's malformed code never stops a result
        return None
    # highdicom picks the attribute by the value's length and form; the source's kind wins
    # for a URN, the length for the others (Code Value up to 16 characters, else Long).
    return written_as(code, _value_keyword(keyword, value), value)


def written_as(code: CodedConcept, keyword: str, value: str) -> CodedConcept:
    """``code`` with its value ``value`` in ``keyword`` (Code Value, Long Code Value or URN
    Code Value) and in no other of them: highdicom picks the attribute by the value's length
    and form alone."""
    for other in VALUE_KEYWORDS:
        if other != keyword and other in code:
            delattr(code, other)
    setattr(code, keyword, value)
    return code


def _value_keyword(keyword: str, value: str) -> str:
    if keyword == "URNCodeValue":
        return keyword
    return "CodeValue" if len(value) <= SH_MAX else "LongCodeValue"


def code_items(ds: Dataset, keyword: str) -> list[Dataset]:
    """The items of ``ds``'s code sequence ``keyword`` (none where it is not a sequence), at
    most :data:`MAX_CODE_ITEMS`."""
    try:
        seq = ds.get(keyword)
        if seq is None or isinstance(seq, str | bytes):
            return []
        return [item for item in list(seq)[:MAX_CODE_ITEMS] if isinstance(item, Dataset)]
    except Exception:  # a source's malformed code never stops a result
        return []


def code_texts(codes_: Iterable[Dataset]) -> list[str]:
    """The words of codes a character set must write (their values, schemes and meanings)."""
    return [
        str(code.get(keyword)) for code in codes_ for keyword in CODE_KEYWORDS if keyword in code
    ]


def is_code_sequence(keyword: str) -> bool:
    """Whether the sequence ``keyword`` holds codes (the Code Sequence Macro): its keyword
    ends in Code Sequence, as each of the standard's does."""
    return keyword.endswith("CodeSequence")


def _conformant_code_item(item: Dataset) -> bool:
    """Whether ``item`` of a code sequence is a usable code (:func:`usable_code`), its value
    moved, in place, to Long Code Value where Code Value (SH) cannot hold it."""
    code = usable_code(item)
    if code is None:
        return False
    if "CodeValue" in item and "LongCodeValue" in code:
        del item.CodeValue
        item.LongCodeValue = code.LongCodeValue
    return True


def _clean_item(item: Dataset, depth: int, *, code: bool) -> bool:
    """Clean the sequences within ``item`` in place. A sequence that lost every item is left
    out of a code (the Code Sequence Macro's sequences are optional); False for any other
    item (the sequence may be required of it: the item is left out then)."""
    for element in list(item):
        if element.VR != "SQ" or _clean_sequence(item, element.tag, depth + 1):
            continue
        if not code:
            return False
        if element.tag in item:
            del item[element.tag]
    return True


def _clean_sequence(ds: Dataset, tag: BaseTag, depth: int) -> bool:
    """Leave out of ``ds``'s sequence ``tag`` the items that are not usable codes (a code
    sequence's) or that lost a sequence of theirs; False where it had items and has none
    left. A sequence that cannot be read is left out whole."""
    try:
        element = ds[tag]
        items = list(element.value or [])
        if not items or depth > _MAX_DEPTH:
            return True
        code = is_code_sequence(element.keyword or "")
        kept = [
            item
            for item in items
            if isinstance(item, Dataset)
            and (not code or _conformant_code_item(item))
            and _clean_item(item, depth, code=code)
        ]
    except Exception:  # a source's malformed sequence never stops a result
        if tag in ds:
            del ds[tag]
        return False
    if len(kept) != len(items):
        element.value = kept
    return bool(kept)


def clean_code_sequences(ds: Dataset, tags: Iterable[BaseTag] | None = None) -> None:
    """Leave out, in place, each item of a code sequence among the top-level ``tags`` of ``ds``
    (all of them: None), or nested in one of their sequences, that is not a usable code
    (:func:`usable_code`), and each item of another sequence that lost every item of one of
    its own sequences; a Code Value longer than SH's 16 characters is moved to Long Code
    Value. A top-level sequence that loses every item is left out (the Patient and Study
    modules' are optional), but for the type 2C :data:`_TYPE2_SEQUENCES`, kept empty."""
    for tag in list(ds.keys() if tags is None else tags):
        try:
            if tag not in ds or ds[tag].VR != "SQ" or _clean_sequence(ds, tag, 0):
                continue
        except Exception:  # a value pydicom cannot read: not a sequence it can clean
            continue
        if tag not in ds:
            continue
        if keyword_for_tag(tag) in _TYPE2_SEQUENCES:
            ds[tag].value = []
        else:
            del ds[tag]
