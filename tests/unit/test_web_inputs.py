"""What the web app accepts from people: ids in paths (one that cannot be a ledger row's is
404, on SQLite and PostgreSQL alike), bodies that fail validation (a 422 whatever they hold,
NaN and Infinity included), typed text (no control characters, from the API or a form) and
names (a control character, a NUL that PostgreSQL refuses among them, in a path is a 404, in a
query value, a form field or a JSON name a 422, in sign-in credentials a wrong password's
answer: never a server error, on either database)."""

from __future__ import annotations

import base64
import json
import re
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
from acwi_node.model_overview import models_overview
from acwi_node.review import auth
from acwi_node.review.inputs import MAX_ROW_ID, typed_text_error
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from tests.support.review_case import CSRF, PASSWORD, add_user, sign_in
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


#: Control characters no name holds: NUL (which PostgreSQL refuses), ESC, a C1 control, each
#: as a URL carries it.
NAMELESS = {"\u0000": "%00", "\u001b": "%1B", "\u0085": "%C2%85"}


def _client(settings: Settings, ledger: Ledger) -> TestClient:
    return TestClient(
        create_app(settings, ledger), base_url="https://testserver", raise_server_exceptions=False
    )


def _refused_query(answer: Any, name: str) -> None:
    """A 422 whose one error names the query parameter and the character."""
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["detail"]
    assert error["loc"] == ["query", name], error
    assert "a control character (U+" in error["msg"], error


def _basic(name: str, password: str = PASSWORD) -> dict[str, str]:
    credentials = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


def test_a_control_character_in_a_path_or_a_query_names_nothing(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A study UID, a destination's or a model's name in the path is a 404, a filter in the
    query a 422 naming it: the database is never asked (PostgreSQL refuses a NUL: it was a
    500 there), and SQLite answers the same. Reading, administrators' actions and pages."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    with _client(settings, ledger) as client:
        for char, q in NAMELESS.items():
            for path in [f"/api/studies/{q}", f"/api/studies/1.2{q}", f"/api/studies/1.2{q}/trace"]:
                assert client.get(path, auth=ADMIN).status_code == 404, path
            for path, body in [
                (f"/api/studies/1.2{q}/resend", {}),
                (f"/api/studies/1.2{q}/reprocess", {}),
                (f"/api/studies/1.2{q}/withdraw", {"reason": "quality", "note": "wrong"}),
                (f"/api/destinations/{q}/retry", {}),
                (f"/api/models/{q}/1.0/recall", {"reason": "quality", "note": "wrong"}),
                (f"/api/models/acwi-dianet-chest/1.0{q}/recall", {"note": "wrong"}),
            ]:
                answer = client.post(path, json=body, auth=ADMIN)
                assert answer.status_code == 404, (char, path, answer.text)
            for method in ["PUT", "DELETE"]:
                answer = client.request(
                    method, f"/api/monitoring/baselines/m{q}/1", auth=ADMIN,
                    json={"since": "2026-01-01", "until": "2026-01-31"},
                )  # fmt: skip
                assert answer.status_code == 404, (method, answer.text)
            for path, name in [
                (f"/api/studies?uid={q}", "uid"),
                (f"/api/studies?calling_ae={q}", "calling_ae"),
                (f"/api/studies?state=received&uid=1.2{q}", "uid"),
                (f"/api/review/decided?reader={q}", "reader"),
                (f"/api/worklist?modality={q}", "modality"),
                (f"/api/monitoring?model={q}", "model"),
            ]:
                _refused_query(client.get(path, auth=ADMIN), name)
            # the study is still there for a UID without the character
            found = client.get("/api/studies?uid=1.2", auth=ADMIN).json()["studies"]
            assert [s["study_uid"] for s in found] == ["1.2.3"]
            # signing in comes first: 401 without credentials; a page is the sign-in page,
            # which does not offer to come back to it
            assert client.get(f"/api/studies/{q}").status_code == 401
            for path in [f"/review/studies/1.2{q}", f"/review/studies?uid={q}"]:
                answer = client.get(path, follow_redirects=False)
                assert (answer.status_code, answer.headers["location"]) == (303, "/login")
        assert client.get("/login").status_code == 200
        csrf = sign_in(client, "ada")
        for q in NAMELESS.values():
            for path in [f"/review/studies/1.2{q}", f"/review/studies/{q}"]:
                assert client.get(path).status_code == 404, path
            for path in [f"/review/destinations/{q}/retry", f"/review/studies/1.2{q}/resend"]:
                answer = client.post(path, data={"csrf_token": csrf})
                assert answer.status_code == 404, (path, answer.text)
            for path, name in [
                (f"/review/studies?uid={q}", "uid"),
                (f"/review/studies?calling_ae={q}", "calling_ae"),
                (f"/review/worklist?calling_ae={q}", "calling_ae"),
            ]:
                _refused_query(client.get(path), name)
        assert client.get("/review/studies?uid=1.2").status_code == 200


def test_every_route_refuses_a_control_character_in_its_path_and_query(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """Every route of the app, those to come too (the rule is the app's, not each
    handler's): a path parameter with a NUL is a 404 and a query parameter a 422, for an
    administrator signed in, before the handler looks anything up."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    checked = 0
    with _client(settings, ledger) as client:
        sign_in(client, "ada")
        for route in _api_routes(client.app.routes):  # type: ignore[attr-defined]
            method = sorted(route.methods or {"GET"})[0]
            names = [p.name for p in route.dependant.path_params]
            for name in names:
                path = route.path
                for other in names:
                    path = path.replace(f"{{{other}}}", "1.2%00" if other == name else "1")
                answer = client.request(method, path, headers={"Content-Type": "application/json"})
                assert answer.status_code == 404, (method, path, answer.text)
                checked += 1
            plain = route.path
            for other in names:
                plain = plain.replace(f"{{{other}}}", "1")
            for param in route.dependant.query_params:
                answer = client.request(
                    method,
                    f"{plain}?{param.name}=%00",
                    headers={"Content-Type": "application/json"},
                )
                _refused_query(answer, param.name)
                checked += 1
    assert checked > 30


def test_a_control_character_in_sign_in_credentials_is_a_wrong_password(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """HTTP Basic and the sign-in form: a user name or a password with a NUL (or any control
    character) is answered as a wrong password is (401, the same words), never a 500 or
    anything that tells more; the failure is audited with the name escaped."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    with _client(settings, ledger) as client:
        wrong = client.get("/api/studies", headers=_basic("ada", "not the password"))
        assert wrong.status_code == 401
        for name, password in [("a\u0000da", PASSWORD), ("ada", "pass\u0000word"),
                               ("a\u001bda", PASSWORD), ("ada\u0085", PASSWORD)]:  # fmt: skip
            answer = client.get("/api/studies", headers=_basic(name, password))
            assert answer.status_code == 401, (name, answer.text)
            assert answer.json() == wrong.json()
            assert answer.headers["WWW-Authenticate"] == wrong.headers["WWW-Authenticate"]

        def form_sign_in(name: str, password: str) -> Any:
            token = CSRF.search(client.get("/login").text)
            assert token is not None
            return client.post(
                "/login",
                data={"csrf_token": token.group(1), "username": name, "password": password},
                follow_redirects=False,
            )

        for name, password in [("a\u0000da", PASSWORD), ("ada", "pass\u0000word")]:
            answer = form_sign_in(name, password)
            assert answer.status_code == 401, (name, answer.text)
            assert "Unknown user name or wrong password." in answer.text
            assert auth.SESSION_COOKIE not in answer.cookies
        assert form_sign_in("ada", PASSWORD).status_code == 303  # not throttled, not locked
    failed = [
        e["user"] for e in ReviewStore(ledger).audit_events() if e["action"] == "login_failed"
    ]
    assert "a\\x00da" in failed and "a\\x1bda" in failed and "ada\\x85" in failed
    assert not [name for name in failed if typed_text_error(name) is not None]


def test_a_control_character_in_a_form_field_is_refused(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A model's name or version (a recall, a monitoring baseline), a verdict's label, a
    lesion box's image name: the pages' forms refuse a control character with a 422 naming
    the field, before anything is looked up; nothing is recorded."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    item = _open_case(settings, ledger)
    with _client(settings, ledger) as client:
        csrf = sign_in(client, "ada")
        for path, form, field in [
            ("/review/models/recall", {"name": "m\u0000", "version": "1", "confirm": "on",
                                       "reason": "quality", "note": "wrong"}, "name"),
            ("/review/models/recall", {"name": "m", "version": "1\u0000", "confirm": "on",
                                       "reason": "quality", "note": "wrong"}, "version"),
            ("/review/monitoring/baseline", {"model": "m\u0000", "version": "1",
                                             "since": "2026-01-01", "until": "2026-01-31"},
             "model"),
            ("/review/monitoring/baseline", {"model": "m", "version": "1\u001b", "clear": "1"},
             "version"),
            (f"/review/cases/{item}/verdict",
             {"action": "override", "label": "nor\u0000mal", "reason": "scar"}, "label"),
            (f"/review/cases/{item}/verdict",
             {"action": "confirm", "box:1.2.3.1\u0000": "0.1 0.1 0.2 0.2"}, "a field's name"),
            (f"/review/cases/{item}/amend",
             {"amends": "1", "action": "override", "label": "x\u0085", "reason": "r"}, "label"),
        ]:  # fmt: skip
            answer = client.post(path, data={"csrf_token": csrf, **form})
            assert answer.status_code == 422, (path, form, answer.text)
            assert answer.json()["detail"].startswith(f"{field}")
            assert "a control character (U+" in answer.json()["detail"]
        assert _verdicts(ledger) == 0
        # a CSRF token beyond ASCII is a wrong token, not a server error
        answer = client.post(f"/review/cases/{item}/leave", data={"csrf_token": csrf + "é"})
        assert answer.status_code == 403, answer.text


def test_a_control_character_in_a_json_name_is_refused(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The JSON API's names (a verdict's label, a lesion box's image name, a retrieval's
    source and keys, a baseline's period): 422, never a 500, nothing recorded."""
    settings, ledger = ledger_node
    add_user(ledger, "ada", role="admin")
    item = _open_case(settings, ledger)
    # a model version the node ran (another is not found, whatever the body: 404)
    model = next(v for m in models_overview(settings, ledger) for v in m.versions if v.analyses)
    with _client(settings, ledger) as client:
        for method, path, body in [
            ("POST", f"/api/review/cases/{item}/verdict",
             {"action": "override", "label": "nor\u0000mal", "reason": "scar"}),
            ("POST", f"/api/review/cases/{item}/verdict",
             {"action": "confirm", "boxes": {"1.2.3.1\u0000": [[1, 1, 2, 2]]}}),
            ("POST", f"/api/review/cases/{item}/amend",
             {"amends": 1, "action": "override", "label": "x\u001b", "reason": "r"}),
            ("POST", "/api/retrievals", {"source": "pacs\u0000", "study_uid": "1.2"}),
            ("POST", "/api/retrievals", {"source": "pacs", "accession_number": "A\u0000"}),
            ("PUT", f"/api/monitoring/baselines/{model.name}/{model.version}",
             {"since": "2026-01-0\u0000", "until": "2026-01-31"}),
        ]:  # fmt: skip
            answer = client.request(method, path, json=body, auth=ADMIN)
            assert answer.status_code == 422, (path, body, answer.text)
        assert _verdicts(ledger) == 0


def test_a_name_with_a_control_character_is_kept_printable() -> None:
    """What the audit trail keeps of a sign-in name no account can have."""
    from acwi_node.review.inputs import printable

    assert printable("a\u0000d\u001ba\u0085\ud800") == "a\\x00d\\x1ba\\x85\\ud800"
    assert printable("Doe^Jane, Œdème\t") == "Doe^Jane, Œdème\t"
    assert re.fullmatch(r"[ -~]*", printable("\u0000\u007f"))
