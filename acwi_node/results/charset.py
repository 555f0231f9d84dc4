"""The Specific Character Set a result object is written in.

A result copies the patient's and the study's attributes from its source, so it keeps the
source's Specific Character Set: a name written in the source's repertoire stays as the PACS
holds it. The node adds words of its own, though, that are not the source's: the model's
labels and name (from the model manifest), a radiologist's name and reason, an administrator's
note. Where the source's character set cannot write one of them (a Japanese label in a Latin-1
study, a ``ø`` in a study in the default repertoire), pydicom would write question marks in its
place; the result is written in UTF-8 (``ISO_IR 192``) instead, which writes every one of them
and the copied patient attributes alike.

The source's value is normalised first (:func:`normalised_charset`), as highdicom takes only
the Defined Terms, spelt as PS3.3 C.12.1.1.2 spells them: an empty first value of several (the
usual Japanese and Korean form, ``\\ISO 2022 IR 87``: the default repertoire) is written
``ISO 2022 IR 6``; a value highdicom or pydicom does not know or would not take in that place
(``ISO_IR 6``, ``UTF-8``, a single ``ISO 2022 IR 100``, ``ISO_IR 100\\ISO_IR 192``, highdicom's
missing ``ISO 2022 IR 149``) makes the result UTF-8. That loses nothing: pydicom decoded the
source's text to ``str`` when it read it, and UTF-8 writes any ``str``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import convert_encodings, python_encoding

UTF8 = "ISO_IR 192"
#: The default repertoire with code extensions: what an empty first value stands for.
_DEFAULT_WITH_EXTENSIONS = "ISO 2022 IR 6"


def _values(charset: Any) -> list[str]:
    if charset is None or charset == "":
        return []
    if isinstance(charset, str):
        return [charset]
    return [str(value) for value in charset]


#: Python codecs pydicom gives a character set whose repertoire is narrower than the codec's:
#: the default repertoire (``ISO_IR 6``, ``ISO 2022 IR 6``) is ASCII, which pydicom encodes as
#: Latin-1; a single-byte Japanese set (``ISO_IR 13``) writes half-width katakana only.
_NARROWER = {"iso8859": "ascii", "shift_jis": "ascii"}


def _writes(text: str, codec: str) -> bool:
    codec = _NARROWER.get(codec, codec)
    if codec.startswith("iso2022"):
        return False  # a stateful code extension: the escapes belong to the whole value
    try:
        text.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def normalised_charset(source_charset: Any) -> str | list[str] | None:
    """``source_charset`` as highdicom takes it and pydicom writes it: ``None`` (the default
    repertoire) for none; an empty first value of several as ``ISO 2022 IR 6``; :data:`UTF8`
    for a value (or a combination of values) that highdicom refuses or pydicom has no codec
    for."""
    values = [value.strip() for value in _values(source_charset)]
    if not values or values == [""]:
        return None
    if len(values) > 1 and values[0] == "":
        values[0] = _DEFAULT_WITH_EXTENSIONS
    if not all(value in python_encoding for value in values):
        return UTF8  # pydicom would write it in the default repertoire: question marks
    try:
        checked = _check_specific_character_set(values)
    except (TypeError, ValueError):
        return UTF8
    return checked if isinstance(checked, str) else list(checked)


def result_charset(source_charset: Any, texts: Iterable[str | None]) -> str | list[str] | None:
    """``source_charset`` (a source's ``SpecificCharacterSet``: absent, one value or several,
    normalised by :func:`normalised_charset`) when it writes every one of ``texts``, else
    :data:`UTF8`.

    A source with one character set keeps it when its codec encodes every text; one with code
    extensions (several values, ISO 2022) keeps it only for ASCII texts, whose bytes are the
    same in any of them."""
    source_charset = normalised_charset(source_charset)
    wanted = [text for text in texts if text and not text.isascii()]
    if not wanted:
        return source_charset
    values = _values(source_charset)
    if len(values) == 1:
        codecs = convert_encodings(values)
        if len(codecs) == 1 and all(_writes(text, codecs[0]) for text in wanted):
            return source_charset
    return UTF8
