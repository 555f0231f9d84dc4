"""CSV cells a spreadsheet opens as text, read back exactly by the node's own readers.

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab, a carriage return, a line feed or a
NUL opens as a formula in Excel, LibreOffice Calc or Google Sheets ("CSV injection": OWASP's
CSV Injection page, ASVS 5.0 requirement 1.2.10), and so does one that begins with the
full-width ``＝``, ``＋``, ``－`` or ``＠`` (or the long vowel mark ``ー`` a Japanese keyboard
types for a minus), which a spreadsheet in an East Asian locale takes for their ASCII forms. A
calling AE title a remote device chose, or a model's label, could then run a formula on the
workstation of whoever opens the node's ``labels.csv``. :func:`neutralise` prefixes such a cell
with a single quote, which the spreadsheet shows as text; :func:`restore` takes exactly that
one quote off again, so the training reader (``models/data/dicom_dataset.py``) gets the value
as it was. A value that itself begins with quotes before such a character gets one more
quote, so that every value comes back unchanged; any other value (a number, a UID, a box) is
written as it is.
"""

from __future__ import annotations

#: The characters a spreadsheet takes as the start of a formula at the head of a cell: the
#: ASCII ``= + - @``, the tab, carriage return, line feed and NUL a spreadsheet skips before
#: them, and the full-width ``＝ ＋ － ＠`` (U+FF1D, U+FF0B, U+FF0D, U+FF20) and ``ー``
#: (U+30FC) an East Asian locale reads as ``= + - @``.
FORMULA_STARTS = frozenset("=+-@\t\r\n\x00\uff1d\uff0b\uff0d\uff20\u30fc")


def _quoted_formula(text: str) -> bool:
    """Whether ``text`` begins with a formula character after any number of single quotes."""
    unquoted = text.lstrip("'")
    return bool(unquoted) and unquoted[0] in FORMULA_STARTS


def neutralise(value: str) -> str:
    """``value`` as a CSV cell a spreadsheet shows as text: with a single quote before it
    when it begins, after any single quotes, with a character of :data:`FORMULA_STARTS`."""
    return "'" + value if _quoted_formula(value) else value


def restore(cell: str) -> str:
    """The value :func:`neutralise` wrote as ``cell``: one leading single quote taken off a
    cell that begins with a quote and, after any further quotes, a formula character; any
    other cell is returned as it is."""
    return cell[1:] if cell.startswith("'") and _quoted_formula(cell) else cell
