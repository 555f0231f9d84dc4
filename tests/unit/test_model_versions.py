"""One model name and version, one set of weights: whichever way the model is loaded (a
``[[models]]`` path, the model registry, the bundled model), the ledger records the weights a
version first stood for and refuses others under it."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from acwi_node.cli import main
from acwi_node.config import Settings, load_settings
from acwi_node.inference.analyser import Analyser
from acwi_node.inference.manifest import default_model_dir, load_manifest, sha256_file
from acwi_node.ledger import Ledger
from acwi_node.ledger.model_versions import ModelVersionConflict, ModelVersions
from acwi_node.model_registry import ModelRegistry, RegistryError
from acwi_node.observability.health import ModelPreload
from acwi_node.tasks import analyse
from tests.support.node import write_config


def model_folder(
    target: Path, *, name: str = "lung", version: str = "1.0.0", other: bool = False
) -> Path:
    """A copy of the bundled model under ``name`` ``version`` (``other``: other weights, their
    SHA-256 in the manifest, as a new export writes it); returns its manifest file."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(default_model_dir(), target)
    raw = json.loads((target / "manifest.json").read_text())
    raw["name"], raw["version"] = name, version
    if other:
        weights = target / raw["weights"]
        weights.write_bytes(weights.read_bytes() + b"\0")
        raw["weights_sha256"] = sha256_file(weights)
    (target / "manifest.json").write_text(json.dumps(raw))
    return target / "manifest.json"


@pytest.fixture(autouse=True)
def _fresh_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process of its own: no model loaded, no settings bound; no warm-up (slow)."""
    monkeypatch.setattr(analyse, "_analysers", {})
    monkeypatch.setattr(analyse, "_state", {})
    monkeypatch.setattr(Analyser, "warm_up", lambda self, image_size=(512, 512): 0.01)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The ``[node]`` table of a node whose ledger is on SQLite, or (an integration test) on a
    fresh PostgreSQL database."""
    table: dict[str, Any] = {"data_dir": str(tmp_path / "data")}
    if request.param == "postgresql":
        table["database_url"] = request.getfixturevalue("postgres_url")
    yield table


def worker(node: dict[str, Any], **models: Path) -> Settings:
    """A worker's settings: one ``[[models]]`` entry and one route per keyword."""
    return load_settings(
        None,
        node=node,
        models=[{"name": n, "manifest": str(m)} for n, m in models.items()],
        routes=[{"name": n, "model": n, "destinations": []} for n in models],
    )


def restart() -> None:
    """What a worker's restart forgets: the models it had loaded."""
    analyse._analysers.clear()


def test_two_models_paths_cannot_share_a_name_and_version_with_other_weights(
    node: dict[str, Any], tmp_path: Path
) -> None:
    """Results' UIDs are derived from the study, the model's name and version: two folders
    going by ``lung 1.0.0`` with other weights would write different results under the same
    SOP Instance UIDs. The first loaded is recorded; the other is refused, naming both."""
    first = model_folder(tmp_path / "ward-a")
    second = model_folder(tmp_path / "ward-b", other=True)
    settings = worker(node, **{"ward-a": first, "ward-b": second})
    loaded = analyse.get_analyser(settings, "ward-a").manifest
    with pytest.raises(ModelVersionConflict) as refused:
        analyse.get_analyser(settings, "ward-b")
    message = str(refused.value)
    other_sha = load_manifest(second).weights_sha256
    assert message.startswith(
        f"model lung 1.0.0 from {second.resolve()} (weights SHA-256 {other_sha}) is refused:"
        f" lung 1.0.0 already stands for other weights (SHA-256 {loaded.weights_sha256},"
    )
    assert f"from {first.resolve()})" in message and "new version" in message
    assert ("ward-b", str(second.resolve())) not in analyse._analysers  # not served
    assert analyse.get_analyser(settings, "ward-a").manifest is loaded  # the first runs on
    # the same weights under the name and version from another folder: the same model
    same = model_folder(tmp_path / "ward-c")
    assert analyse.get_analyser(worker(node, **{"ward-c": same}), "ward-c").manifest.version
    ledger = Ledger(settings.ledger_url)
    try:
        recorded = ModelVersions(ledger).recorded("lung", "1.0.0")
    finally:
        ledger.dispose()
    assert recorded is not None and recorded.weights_sha256 == loaded.weights_sha256
    assert recorded.manifest_path == str(first.resolve())


def test_weights_replaced_in_place_under_the_same_version_are_refused_after_a_restart(
    node: dict[str, Any], tmp_path: Path
) -> None:
    """A ``[[models]]`` folder re-exported in place (new weights and a manifest naming their
    SHA-256, the version unchanged) passes the manifest's own check; the ledger's record
    refuses it, in the worker's preload (loaded or verified only) and in its tasks."""
    manifest = model_folder(tmp_path / "lung")
    settings = worker(node, lung=manifest)
    before = analyse.get_analyser(settings, "lung").manifest.weights_sha256
    restart()
    model_folder(tmp_path / "lung", other=True)
    for load in (True, False):
        preload = ModelPreload(settings, load=load)
        preload.run()
        ready, detail = preload.check()
        assert not ready
        assert re.search(
            rf"lung: ModelVersionConflict: model lung 1\.0\.0 from .* is refused: lung 1\.0\.0"
            rf" already stands for other weights \(SHA-256 {before},",
            detail,
        ), detail
    with pytest.raises(ModelVersionConflict):
        analyse.get_analyser(settings, "lung")
    # the way out: the new weights under a new version
    model_folder(tmp_path / "lung", version="1.0.1", other=True)
    assert analyse.get_analyser(settings, "lung").manifest.version == "1.0.1"
    # and the weights the version stands for load again under it
    restart()
    model_folder(tmp_path / "lung")
    assert analyse.get_analyser(settings, "lung").manifest.weights_sha256 == before


def test_a_moving_version_of_an_existing_model_keeps_loading_new_weights(
    node: dict[str, Any], tmp_path: Path
) -> None:
    """A model exported before versions had to be fixed (``latest``) keeps loading, with its
    warning, when it is re-exported in place: nothing is recorded for a moving version, so
    nothing refuses its new weights (the model is not taken offline by the upgrade)."""
    manifest = model_folder(tmp_path / "lung", version="latest")
    settings = worker(node, lung=manifest)
    first = analyse.get_analyser(settings, "lung").manifest.weights_sha256
    restart()
    model_folder(tmp_path / "lung", version="latest", other=True)
    second = analyse.get_analyser(settings, "lung").manifest.weights_sha256
    assert second != first
    versions = ModelVersions(analyse._ledger())
    assert versions.recorded("lung", "latest") is None
    assert versions.claim("lung", "latest", first, manifest) is None


def test_a_ledger_of_an_earlier_version_records_the_models_on_their_first_load(
    node: dict[str, Any], tmp_path: Path
) -> None:
    """A ledger made before the record existed has no row of the model its results name:
    nothing is refused on upgrade, the first load records the weights."""
    manifest = model_folder(tmp_path / "lung")
    settings = worker(node, lung=manifest)
    ledger = Ledger(settings.ledger_url)
    with ledger.engine.begin() as conn:
        conn.execute(text("DROP TABLE model_versions"))  # as an earlier version made it
    ledger.dispose()
    preload = ModelPreload(settings, load=False)
    preload.run()  # the prefork worker's start-up: its Ledger creates the table
    assert preload.check()[0], preload.check()
    ledger = Ledger(settings.ledger_url)
    try:
        recorded = ModelVersions(ledger).recorded("lung", "1.0.0")
    finally:
        ledger.dispose()
    assert recorded is not None
    assert recorded.weights_sha256 == load_manifest(manifest).weights_sha256


def test_the_registry_refuses_a_version_the_workers_know_as_other_weights(
    node: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``acwi-node models install`` and ``activate`` compare with the weights a ``[[models]]``
    path made the version stand for: the worker would refuse them at its next task."""
    config = write_config(tmp_path / "node.toml", {"node": node})
    settings = load_settings(config)
    # installed (not active) before a [[models]] path ran other weights under its version
    registry = ModelRegistry(settings.models_dir)
    registry.install(model_folder(tmp_path / "installed", other=True), name="chest")
    analyse.get_analyser(worker(node, ward=model_folder(tmp_path / "ward")), "ward")

    assert main(["--config", str(config), "models", "activate", "chest", "1.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refused to activate: model lung 1.0.0 from" in err
    assert "already stands for other weights" in err
    assert registry.active_version("chest") is None

    other = model_folder(tmp_path / "other", other=True)
    command = ["--config", str(config), "models", "install", str(other), "--name", "lung-b"]
    assert main(command) == 1
    assert "refused to install: model lung 1.0.0 from" in capsys.readouterr().err
    assert [m.name for m in registry.installed()] == ["chest"]
    ledger = Ledger(settings.ledger_url)
    try:
        with pytest.raises(RegistryError, match="refused to install: .* already stands for"):
            ModelRegistry(settings.models_dir, versions=ModelVersions(ledger)).install(other)
    finally:
        ledger.dispose()


def test_claims_agree_and_other_weights_are_refused(db: Ledger) -> None:
    versions = ModelVersions(db)
    assert versions.recorded("lung", "1.0.0") is None
    first = versions.claim("lung", "1.0.0", "a" * 64, "/models/a/manifest.json")
    again = versions.claim("lung", "1.0.0", "a" * 64, "/models/copy/manifest.json")
    assert first is not None and again == first
    assert first.manifest_path == "/models/a/manifest.json"
    with pytest.raises(ModelVersionConflict, match="from /models/a/manifest.json"):
        versions.claim("lung", "1.0.0", "b" * 64, "/models/b/manifest.json")
    other = versions.claim("lung", "1.0.1", "b" * 64, "/models/b/manifest.json")
    assert other is not None and other.version == "1.0.1"
    assert versions.recorded("lung", "1.0.0") == first
