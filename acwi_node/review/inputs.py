"""What the review pages and the JSON API accept from people: ids in paths, and typed text.

* An id in a path (``/review/cases/{id}``, ``/api/retrievals/{id}``) is a ledger row's: a
  whole number from 1 to 2**31 - 1 (:data:`RowId`), what the ledger's INTEGER keys hold on
  PostgreSQL (SQLite's would hold more, but its rows are numbered the same way). Any other
  names nothing: the app answers 404 without asking the database, which would fail on it
  (the request validation handler of :func:`acwi_node.web.api.create_app`).
* Typed text (a verdict's reason, a withdrawal's note) is plain text: tabs and line breaks
  (CR, LF) but no other control character, and no unpaired surrogate, which is no character
  at all (:func:`typed_text_error`). The text goes into the ledger, the verified SR and the
  RIS's messages, where a NUL or an escape sequence would corrupt them; the node refuses it
  with the reason rather than change what the reader wrote.
* Text that names something (a path parameter, a query value, a sign-in name) holds no such
  character either: none can name anything the node keeps, and PostgreSQL cannot even compare
  a NUL (psycopg refuses it). :func:`plain_path_and_query`, a dependency of every route of the
  app, answers a path parameter holding one 404 (it names nothing) and a query value 422 (a
  value no filter can take), as for any other invalid path or query, without asking the
  database; sign-in treats such a name as no account's (a wrong password's answer) and writes
  it to the audit trail as :func:`printable` gives it.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator

#: The largest id a ledger row can have (PostgreSQL's INTEGER, a signed 32-bit integer).
MAX_ROW_ID = 2**31 - 1

#: An id in a path: 1 to :data:`MAX_ROW_ID`; anything else is answered 404.
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]

#: What typed text may not hold: the C0 controls but tab, LF and CR, DEL, the C1 controls and
#: unpaired surrogates.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def typed_text_error(text: str, what: str = "") -> str | None:
    """Why ``text`` (``what``: the field, for the message) cannot be kept, or None when it is
    plain text: the first character that is not, by code point and position (never the text
    itself)."""
    found = _NOT_TEXT.search(text)
    if found is None:
        return None
    char = found.group()
    kind = "an unpaired surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    problem = (
        f"{kind} (U+{ord(char):04X}, character {found.start() + 1}) is not allowed:"
        " plain text, tabs and line breaks only"
    )
    return f"{what}: {problem}" if what else problem


def _plain_text(value: str) -> str:
    problem = typed_text_error(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A JSON API model's typed text field (refused with a 422 naming the character).
TypedText = Annotated[str, AfterValidator(_plain_text)]


def printable(text: str) -> str:
    """``text`` with each character typed text may not hold written as its escape (``\\x00``,
    ``\\x1b``, ``\\ud800``): a name no account can have, as the audit trail and the logs keep
    it."""
    return _NOT_TEXT.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def plain_path_and_query(request: Request) -> None:
    """Every route's first dependency: a path parameter, or a query parameter's name or value,
    holding a character typed text may not hold (:func:`typed_text_error`: a NUL, an ESC, ...)
    is refused before the handler asks the database about it. The request validation handler
    answers the path's 404 (no such thing) and the query's 422 (its error names the parameter
    and the character)."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and (problem := typed_text_error(value)) is not None:
            raise RequestValidationError([_invalid("path", name, value, problem)])
    for name, value in request.query_params.multi_items():
        problem = typed_text_error(name, "the parameter's name") or typed_text_error(value)
        if problem is not None:
            raise RequestValidationError([_invalid("query", name, value, problem)])


def _invalid(where: str, name: str, value: str, problem: str) -> dict[str, object]:
    """A validation error as FastAPI gives one (``type``, ``loc``, ``msg``, ``input``)."""
    return {"type": "value_error", "loc": (where, name), "msg": problem, "input": value}
