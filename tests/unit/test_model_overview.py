"""The Models page and ``GET /api/models``: the version running for each model name and where
it comes from, the installed versions, each version's analyses and withdrawals from the
ledger, and an administrator's recall from the page. Real analyses (the review model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from acwi_node.config import Settings
from acwi_node.export.withdrawal import withdraw_results
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job
from acwi_node.model_overview import models_overview
from acwi_node.model_registry import ModelRegistry
from acwi_node.web.api import create_app
from tests.support.model_variant import model_variant
from tests.support.review_case import (
    CSRF,
    DESTINATION,
    MODEL,
    PASSWORD,
    ROUTE,
    add_user,
    review_settings,
    sign_in,
)
from tests.support.study_flow import deliver
from tests.unit.test_withdrawal import analysed, notes_due

NOTE = "recalled by its maker"


@pytest.fixture
def node(tmp_path: Path) -> tuple[Settings, Ledger]:
    route = {"name": ROUTE, "match": {"modality": ["DX"]}, "model": MODEL,
             "destinations": [DESTINATION]}  # fmt: skip
    settings = review_settings(tmp_path, routes=[route])
    return settings, Ledger(settings.database_url)


def _version(settings: Settings, ledger: Ledger) -> tuple[str, str]:
    """The manifest name and version of the review model's analyses."""
    with ledger.session() as s:
        model = s.scalars(select(Job.summary)).first()["model"]  # type: ignore[index]
    return model["name"], model["version"]


def test_each_model_shows_its_running_version_installed_ones_and_analyses(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    _, uid = analysed(settings, ledger, tmp_path, seed=1)
    analysed(settings, ledger, tmp_path, seed=2)
    deliver(ledger)
    name, version = _version(settings, ledger)
    withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    # a newer version installed in the registry under the route's model name, not active yet
    newer = model_variant(tmp_path / "v9", version="9.9.9")
    ModelRegistry(settings.models_dir).install(newer.parent, name=MODEL)

    (model,) = [m for m in models_overview(settings, ledger) if m.model == MODEL]
    assert (model.source, model.error) == ("config", "")
    assert model.routes == [ROUTE] and model.shadow_routes == []
    running, installed = model.versions
    assert (running.name, running.version, running.running) == (name, version, True)
    assert (running.analyses, running.withdrawn, running.recallable) == (2, 1, 1)
    assert running.last_analysed_at and running.last_analysed_at.endswith("Z")
    assert running.manifest is not None and "nodule" in running.manifest["labels"]
    assert (installed.version, installed.installed, installed.running) == ("9.9.9", True, False)
    assert installed.analyses == 0
    # activated, it is the running one and the registry its source
    ModelRegistry(settings.models_dir).activate(MODEL, "9.9.9")
    (model,) = [m for m in models_overview(settings, ledger) if m.model == MODEL]
    assert model.source == "registry"
    assert [(v.version, v.running) for v in model.versions] == [("9.9.9", True), (version, False)]
    assert model.versions[1].analyses == 2  # the earlier version's analyses stay listed

    add_user(ledger, "rad", "radiologist")
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client, "rad")
        body = client.get("/api/models").json()
        (listed,) = [m for m in body["models"] if m["model"] == MODEL]
        assert [v["version"] for v in listed["versions"]] == ["9.9.9", version]
        assert listed["versions"][1]["withdrawn"] == 1
        page = client.get("/review/models")
        assert page.status_code == 200
        assert f"{name} {version}" in page.text and "model registry" in page.text
        assert 'href="/review/models"' in page.text
        assert "/review/models/recall" not in page.text  # a radiologist recalls nothing
    ledger.dispose()


def test_an_administrator_recalls_a_version_from_the_page(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    _, uid1 = analysed(settings, ledger, tmp_path, seed=1)
    _, uid2 = analysed(settings, ledger, tmp_path, seed=2)
    deliver(ledger)
    name, version = _version(settings, ledger)
    add_user(ledger, "boss", "admin")
    add_user(ledger, "rad", "radiologist")
    with TestClient(create_app(settings, ledger)) as client:
        csrf = sign_in(client, "boss")
        page = client.get("/review/models").text
        assert 'action="/review/models/recall"' in page
        assert "withdraw its results of 2 analysis(es)" in page
        token = CSRF.search(page)
        assert token is not None
        form = {"csrf_token": token.group(1), "name": name, "version": version,
                "reason": "safety", "note": NOTE}  # fmt: skip
        unconfirmed = client.post("/review/models/recall", data=form)
        assert unconfirmed.status_code == 422 and "tick the box" in unconfirmed.text
        assert notes_due(ledger, settings) == {}
        done = client.post("/review/models/recall", data={**form, "confirm": "2"})
        assert done.status_code == 200, done.text
        assert (
            f"{name} {version}: the results of 2 analysis(es) of 2 study(ies) withdrawn,"
            " 4 rejection note(s) on their way to the PACS" in done.text
        )
        again = client.post("/review/models/recall", data={**form, "confirm": "2"})
        assert again.status_code == 409 and "nothing withdrawn" in again.text
        bad = client.post("/review/models/recall", data={**form, "reason": "x", "confirm": "1"})
        assert bad.status_code == 422 and "reason must be one of" in bad.text
        assert (
            client.post("/review/models/recall", data={**form, "csrf_token": "x"}).status_code
            == 403
        )
        assert csrf
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client, "rad")
        page = client.get("/review/models").text
        token = CSRF.search(page)
        assert token is not None
        refused = client.post(
            "/review/models/recall", data={**form, "csrf_token": token.group(1), "confirm": "1"}
        )
        assert refused.status_code == 403
    for uid in (uid1, uid2):
        view = ledger.get_study(uid)
        assert view is not None and all(j["withdrawn"] for j in view["jobs"])
    ledger.dispose()


def test_a_recall_of_a_version_the_node_does_not_know_is_not_found(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """Over the API and from the page: a model name or version the node never ran nor
    installed is 404, nothing withdrawn; one installed that analysed nothing is a recall of
    nothing (200, zero)."""
    settings, ledger = node
    analysed(settings, ledger, tmp_path, seed=1)
    deliver(ledger)
    name, version = _version(settings, ledger)
    ModelRegistry(settings.models_dir).install(
        model_variant(tmp_path / "v9", version="9.9.9").parent, name=MODEL
    )
    (model,) = [m for m in models_overview(settings, ledger) if m.model == MODEL]
    (idle,) = [v for v in model.versions if v.version == "9.9.9"]
    assert idle.analyses == 0
    add_user(ledger, "boss", "admin")
    boss = ("boss", PASSWORD)
    body = {"reason": "safety", "note": NOTE}
    with TestClient(create_app(settings, ledger)) as client:
        for unknown_name, unknown_version in [(name, "0.0.0-none"), ("no-such-model", version)]:
            url = f"/api/models/{unknown_name}/{unknown_version}/recall"
            answer = client.post(url, json=body, auth=boss)
            assert answer.status_code == 404, answer.text
            assert answer.json() == {
                "detail": f"no model {unknown_name} version {unknown_version} on this node"
            }
        nothing = client.post(f"/api/models/{idle.name}/9.9.9/recall", json=body, auth=boss)
        assert nothing.status_code == 200, nothing.text
        assert (nothing.json()["withdrawn"], nothing.json()["jobs"]) == (0, [])

        sign_in(client, "boss")
        token = CSRF.search(client.get("/review/models").text)
        assert token is not None
        form = {"csrf_token": token.group(1), "name": name, "version": "0.0.0-none",
                "reason": "safety", "note": NOTE, "confirm": "1"}  # fmt: skip
        page = client.post("/review/models/recall", data=form)
        assert page.status_code == 404
        assert f"no model {name} version 0.0.0-none on this node" in page.text
    assert notes_due(ledger, settings) == {}
    ledger.dispose()
