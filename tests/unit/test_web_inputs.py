"""What the web app accepts from people: ids in paths (one that cannot be a ledger row's is
404, on SQLite and PostgreSQL alike), bodies that fail validation (a 422 whatever they hold,
NaN and Infinity included) and typed text (no control characters, from the API or a form)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import annotated_types
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.routing import BaseRoute

from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Verdict
from acwi_node.review.inputs import MAX_ROW_ID, typed_text_error
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from tests.support.review_case import PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, receive

ADMIN = ("ada", PASSWORD)
READER = ("jane.doe", PASSWORD)
#: Ids no ledger row can have: beyond PostgreSQL's INTEGER, beyond SQLite's, not positive, not
#: a number.
IMPOSSIBLE_IDS = [str(MAX_ROW_ID + 1), str(2**63), "99999999999999999999", "0", "-1", "x"]
#: A forged line: NUL, an ANSI escape sequence and a line that pretends to be another record.
FORGED = "scar\u0000\u001b[2J\r\nFORGED: line"


def _open_case(settings: Settings, ledger: Ledger, study: str = "1.2.3") -> int:
    receive(settings, ledger, study, f"{study}.1")
    analyse(settings, ledger, study, needs_review=True)
    (item,) = [i["id"] for i in ledger.worklist() if i["study_uid"] == study]
    return int(item)


def _strict_json(text: str) -> Any:
    """JSON as the standard has it: NaN and Infinity refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} in the answer")

    return json.loads(text, parse_constant=refuse)


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """The app's routes, those of the routers it includes too (FastAPI keeps an included
    router's routes in it)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _api_routes(included.routes)


def _verdicts(ledger: Ledger) -> int:
    with ledger.session() as s:
        return int(s.scalar(select(func.count()).select_from(Verdict)) or 0)


def test_every_integer_path_parameter_is_bounded_to_a_row_id(settings: Settings) -> None:
    """Each route's integer path parameter takes 1 to MAX_ROW_ID only: the database is never
    asked for an id its keys cannot hold."""
    found = []
    for route in _api_routes(create_app(settings).routes):
        for param in route.dependant.path_params:
            if param.field_info.annotation is not int:
                continue
            found.append(route.path)
            bounds = param.field_info.metadata
            assert annotated_types.Ge(1) in bounds, route.path
            assert annotated_types.Le(MAX_ROW_ID) in bounds, route.path
    assert "/api/review/cases/{item_id}" in found and "/api/retrievals/{retrieval_id}" in found
    assert "/review/cases/{item_id}/overlays/{sop}.png" in found


def test_an_id_no_row_can_have_is_not_found(ledger_node: tuple[Settings, Ledger]) -> None:
    """API and pages, GET and POST: 404 for an id beyond the ledger's keys (or no id at all),
    as for one that is merely absent; never a server error."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    with TestClient(
        create_app(settings, ledger), base_url="https://testserver", raise_server_exceptions=False
    ) as client:
        for item in [*IMPOSSIBLE_IDS, str(MAX_ROW_ID)]:
            for method, path, body in [
                ("GET", f"/api/review/cases/{item}", None),
                ("POST", f"/api/review/cases/{item}/verdict", {"action": "confirm"}),
                ("POST", f"/api/review/cases/{item}/amend",
                 {"amends": 1, "action": "confirm", "reason": "r"}),
                ("GET", f"/api/retrievals/{item}", None),
            ]:  # fmt: skip
                answer = client.request(method, path, json=body, auth=ADMIN)
                assert answer.status_code == 404, (path, answer.text)
        csrf = sign_in(client, "ada")
        for item in [*IMPOSSIBLE_IDS, str(MAX_ROW_ID)]:
            for path in ["", "/images/1.2.3.png", "/heatmaps/1.2.3.png", "/overlays/1.2.3.png"]:
                answer = client.get(f"/review/cases/{item}{path}")
                assert answer.status_code == 404, (item, path, answer.text)
        for item in IMPOSSIBLE_IDS:
            for action in ["verdict", "leave", "amend"]:
                answer = client.post(
                    f"/review/cases/{item}/{action}",
                    data={"csrf_token": csrf, "action": "escalate", "reason": "r", "amends": "1"},
                )
                assert answer.status_code == 404, (item, action, answer.text)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/retrievals", '{"source": NaN}'),
        ("/api/review/cases/1/verdict", '{"action": "confirm", "boxes": {"a": [[NaN, 1, 2, 3]]}}'),
        ("/api/retrievals", '{"source": Infinity, "study_uid": 4.5}'),
        ("/api/review/cases/1/verdict", '{"action": "escalate", "reason": "\\ud800"}'),
        ("/api/review/cases/1/amend", '{"amends": Infinity, "action": "confirm", "reason": "x"}'),
        ("/api/review/cases/1/amend", '{"amends": 1, "action": "confirm", "reason": -Infinity}'),
        ("/api/studies/1.2.3/withdraw", '{"note": NaN}'),
        ("/api/models/m/1/recall", '{"reason": "quality", "note": Infinity}'),
    ],
)
def test_a_body_that_fails_validation_is_a_422_whatever_it_holds(
    settings: Settings, ledger: Ledger, path: str, body: str
) -> None:
    """The 422 lists each error (where, what), leaving out the input JSON cannot carry."""
    add_user(ledger, "ada", role="admin")
    with TestClient(create_app(settings, ledger), raise_server_exceptions=False) as client:
        answer = client.post(
            path, content=body, headers={"Content-Type": "application/json"}, auth=ADMIN
        )
    assert answer.status_code == 422, answer.text
    errors = _strict_json(answer.text)["detail"]
    assert errors and all(e["loc"][0] == "body" and e["msg"] and e["type"] for e in errors)
    if "4.5" in body:  # an input JSON carries is still given back
        assert [e.get("input") for e in errors] == [None, 4.5]


def test_control_characters_in_typed_text_are_refused_by_the_api(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A verdict's or an amendment's reason, a withdrawal's note: 422 naming the character,
    and nothing recorded; tabs and line breaks are text."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    add_user(ledger)
    item = _open_case(settings, ledger)
    with TestClient(create_app(settings, ledger), raise_server_exceptions=False) as client:
        for path, body in [
            (f"/api/review/cases/{item}/verdict",
             {"action": "escalate", "reason": FORGED}),
            (f"/api/review/cases/{item}/verdict",
             {"action": "override", "label": "normal", "reason": "scar\u009b2J"}),
            (f"/api/review/cases/{item}/amend",
             {"amends": 1, "action": "override", "label": "normal", "reason": FORGED}),
            ("/api/studies/1.2.3/withdraw", {"reason": "quality", "note": FORGED}),
            ("/api/models/acwi-dianet-chest/1.0.0/recall", {"note": "wrong\u007fmodel"}),
        ]:  # fmt: skip
            answer = client.post(path, json=body, auth=ADMIN)
            assert answer.status_code == 422, (path, answer.text)
            assert "a control character (U+" in answer.text, (path, answer.text)
        assert _verdicts(ledger) == 0
        kept = client.post(
            f"/api/review/cases/{item}/verdict",
            json={"action": "escalate", "reason": "second opinion:\r\n\tthe left apex"},
            auth=READER,
        )
        assert kept.status_code == 200, kept.text
    case = ReviewStore(ledger).case(item)
    assert case is not None
    assert [v["reason"] for v in case["verdicts"]] == ["second opinion:\r\n\tthe left apex"]


def test_control_characters_in_typed_text_are_refused_by_the_forms(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The case page's verdict (an escalation's reason too), a study's withdrawal and a
    model's recall: the page again with the error and nothing done."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    item = _open_case(settings, ledger)
    with TestClient(
        create_app(settings, ledger), base_url="https://testserver", raise_server_exceptions=False
    ) as client:
        csrf = sign_in(client, "ada")
        for form in [
            {"action": "escalate", "reason": FORGED},
            {"action": "override", "label": "normal", "reason": "rib\u0007"},
        ]:
            page = client.post(f"/review/cases/{item}/verdict", data={"csrf_token": csrf, **form})
            assert page.status_code == 400, page.text
            assert "reason: a control character (U+" in page.text
        assert _verdicts(ledger) == 0
        withdraw = client.post(
            "/review/studies/1.2.3/withdraw",
            data={"csrf_token": csrf, "reason": "quality", "note": FORGED},
        )
        assert withdraw.status_code == 422, withdraw.text
        assert "the note: a control character (U+0000, character 5)" in withdraw.text
        recall = client.post(
            "/review/models/recall",
            data={
                "csrf_token": csrf, "name": "acwi-dianet-chest", "version": "1.0.0",
                "confirm": "on", "reason": "quality", "note": "bad\u001bmodel",
            },
        )  # fmt: skip
        assert recall.status_code == 422, recall.text
        assert "the note: a control character (U+001B, character 4)" in recall.text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("plain text,\r\n\tand line breaks", None),
        ("Œdème, 肺結節", None),
        ("a\u0000b", "a control character (U+0000, character 2)"),
        ("\u001b[2J", "a control character (U+001B, character 1)"),
        ("page\u000cbreak", "a control character (U+000C, character 5)"),
        ("del\u007f", "a control character (U+007F, character 4)"),
        ("c1\u0085", "a control character (U+0085, character 3)"),
        ("x\ud800", "an unpaired surrogate (U+D800, character 2)"),
    ],
)
def test_typed_text_is_plain_text(text: str, problem: str | None) -> None:
    found = typed_text_error(text, "reason")
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(f"reason: {problem} is not allowed")
