"""The OpenAPI document (``/api/openapi.json``) describes what each API path takes and
answers, where FastAPI cannot infer it: bodies the handlers read themselves, statuses they
return by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from acwi_node.config import load_settings
from acwi_node.web.api import create_app


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = Path(tmp_path_factory.mktemp("openapi")) / "data"
    app = create_app(load_settings(None, node={"data_dir": data}))
    return dict(app.openapi())


@pytest.fixture(scope="module")
def paths(document: dict[str, Any]) -> dict[str, Any]:
    return dict(document["paths"])


@pytest.mark.parametrize("path", ["/dicomweb/studies", "/dicomweb/studies/{study_uid}"])
def test_stow_rs_takes_dicom_objects_and_says_what_became_of_them(
    paths: dict[str, Any], path: str
) -> None:
    post = paths[path]["post"]
    assert list(post["requestBody"]["content"]) == ['multipart/related; type="application/dicom"']
    responses = post["responses"]
    for stored in ("200", "202", "409"):
        assert set(responses[stored]["content"]) == {
            "application/dicom+json",
            "application/dicom+xml",
        }
    assert {"400", "401", "403", "406", "413", "415", "429", "503"} <= set(responses)


@pytest.mark.parametrize("action", ["resend", "reprocess"])
def test_an_administrator_s_action_takes_json_and_may_be_refused(
    paths: dict[str, Any], action: str
) -> None:
    post = paths[f"/api/studies/{{study_uid}}/{action}"]["post"]
    assert list(post["requestBody"]["content"]) == ["application/json"]
    assert {"200", "403", "404", "409", "415"} <= set(post["responses"])
    assert post["responses"]["404"]["description"] == "No such study"
    assert "No such" not in post["responses"]["409"]["description"]


@pytest.mark.parametrize(
    "path", ["/api/studies/{study_uid}/withdraw", "/api/models/{name}/{version}/recall"]
)
def test_a_withdrawal_of_what_the_node_does_not_hold_is_not_found(
    paths: dict[str, Any], path: str
) -> None:
    assert {"200", "403", "404", "409", "415", "422"} <= set(paths[path]["post"]["responses"])


def test_the_other_answers_given_by_hand(paths: dict[str, Any]) -> None:
    assert "404" in paths["/api/studies/{study_uid}"]["get"]["responses"]
    assert "403" in paths["/api/destinations"]["get"]["responses"]
    assert "503" in paths["/readyz"]["get"]["responses"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]


def test_the_feedback_archive_is_a_zip_for_administrators(paths: dict[str, Any]) -> None:
    get = paths["/api/feedback/export.zip"]["get"]
    assert list(get["responses"]["200"]["content"]) == ["application/zip"]
    assert {"403", "503"} <= set(get["responses"])


@pytest.mark.parametrize("action", ["verdict", "amend"])
def test_a_radiologist_s_verdict_takes_json_and_says_why_it_was_refused(
    paths: dict[str, Any], action: str
) -> None:
    post = paths[f"/api/review/cases/{{item_id}}/{action}"]["post"]
    assert list(post["requestBody"]["content"]) == ["application/json"]
    assert {"200", "403", "404", "409", "415", "422"} <= set(post["responses"])
    assert "404" in paths["/api/review/cases/{item_id}"]["get"]["responses"]


def _api_operations(paths: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, operations in paths.items()
        if path.startswith("/api/")
        for method, operation in operations.items()
    ]


def test_every_api_path_says_how_to_sign_in_and_what_the_sign_in_answers(
    document: dict[str, Any],
) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["basic"] == {"type": "http", "scheme": "basic", "description": "A local account"}
    assert schemes["session"]["in"] == "cookie"
    operations = _api_operations(document["paths"])
    assert len(operations) > 20
    for path, method, operation in operations:
        assert operation["security"] == [{"basic": []}, {"session": []}], (path, method)
        assert {"401", "403", "429", "503"} <= set(operation["responses"]), (path, method)
        if method in ("post", "put"):
            assert "413" in operation["responses"], (path, method)


def test_every_api_error_is_json_with_a_detail(document: dict[str, Any]) -> None:
    """Each error answer has its body's schema; a handler's own 422 gives its reason as
    text, as FastAPI's gives the list of errors."""
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["properties"] == {"detail": {"type": "string"}}
    detail = schemas["HTTPValidationError"]["properties"]["detail"]
    assert {"type": "string"} in detail["anyOf"]
    assert any(option.get("type") == "array" for option in detail["anyOf"])
    for path, method, operation in _api_operations(document["paths"]):
        for status, answer in operation["responses"].items():
            if status >= "400":
                assert "application/json" in answer.get("content", {}), (path, method, status)


def test_the_models_answer_is_described_warnings_included(document: dict[str, Any]) -> None:
    """``GET /api/models``: each model and each version, with what it warns of (a moving
    version such as ``latest``, to renumber) beside the error of one that cannot load."""
    answer = document["paths"]["/api/models"]["get"]["responses"]["200"]["content"]
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/ModelsAnswer"}
    schemas = document["components"]["schemas"]
    assert schemas["ModelsAnswer"]["properties"]["models"]["items"] == {
        "$ref": "#/components/schemas/ModelOverview"
    }
    model = schemas["ModelOverview"]["properties"]
    version = schemas["VersionOverview"]["properties"]
    assert {"model", "source", "error", "warning", "routes", "versions"} <= set(model)
    assert {"name", "version", "running", "installed", "manifest", "warning"} <= set(version)
    for warning in (model["warning"], version["warning"]):
        assert warning["type"] == "string" and warning["default"] == ""
        assert "moving version" in warning["description"]
    assert "cannot be read" in model["error"]["description"]
