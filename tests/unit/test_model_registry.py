"""The model registry: install (SHA-256 checked), list, activate, and what the worker then runs."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from acwi_node.cli import main
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.inference import manifest as manifest_module
from acwi_node.inference.analyser import Analyser
from acwi_node.inference.manifest import (
    ManifestError,
    default_model_dir,
    load_manifest,
    sha256_file,
)
from acwi_node.ledger import Ledger
from acwi_node.model_overview import models_overview
from acwi_node.model_registry import ModelRegistry, RegistryError
from acwi_node.observability.health import ModelPreload
from acwi_node.observability.logging import forget_identifiers
from acwi_node.results.uids import device_uid
from acwi_node.tasks.analyse import get_analyser
from acwi_node.web.api import create_app
from tests.support.node import write_config
from tests.support.review_case import add_user, sign_in


def model_copy(
    tmp_path: Path,
    folder: str,
    *,
    name: str = "default",
    version: str = "2.0.0",
    change_weights: bool = False,
) -> Path:
    """A copy of the bundled model under another name/version (optionally other weights)."""
    target = tmp_path / folder
    shutil.copytree(default_model_dir(), target)
    raw = json.loads((target / "manifest.json").read_text())
    raw["name"], raw["version"] = name, version
    if change_weights:
        weights = target / raw["weights"]
        weights.write_bytes(weights.read_bytes() + b"\0")
        raw["weights_sha256"] = sha256_file(weights)
    (target / "manifest.json").write_text(json.dumps(raw))
    return target


def test_install_list_activate_round_trip(settings: Settings, tmp_path: Path) -> None:
    registry = ModelRegistry(settings.models_dir)
    bundled = load_manifest(default_model_dir())
    assert registry.installed() == []
    assert settings.model_manifest("default") == default_model_dir() / "manifest.json"

    installed = registry.install(model_copy(tmp_path, "v2"))
    assert (installed.name, installed.version, installed.active) == ("default", "2.0.0", False)
    assert installed.weights_sha256 == bundled.weights_sha256
    assert installed.path == settings.models_dir / "default" / "2.0.0"
    assert sorted(p.name for p in installed.path.iterdir()) == ["manifest.json", "weights.pt"]
    # installed, not yet active: the bundled model still runs
    assert settings.model_manifest("default") == default_model_dir() / "manifest.json"

    # install through the manifest file itself, a second version with other weights
    v3 = registry.install(
        model_copy(tmp_path, "v3", version="3.0.0", change_weights=True) / "manifest.json"
    )
    assert v3.weights_sha256 != bundled.weights_sha256

    registry.activate("default", "2.0.0")
    assert settings.model_manifest("default") == installed.manifest_path.resolve()
    analyser = get_analyser(settings, "default")  # what the worker's next task loads
    assert analyser.manifest.version == "2.0.0"
    assert analyser.manifest.directory == installed.path.resolve()

    registry.activate("default", "3.0.0")
    listing = {(m.version, m.active) for m in registry.installed()}
    assert listing == {("2.0.0", False), ("3.0.0", True)}
    assert load_manifest(settings.model_manifest("default")).version == "3.0.0"


def test_install_refuses_weights_that_do_not_match_the_manifest(
    settings: Settings, tmp_path: Path
) -> None:
    source = model_copy(tmp_path, "tampered")
    weights = source / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    registry = ModelRegistry(settings.models_dir)
    with pytest.raises(RegistryError, match="SHA-256"):
        registry.install(source)
    assert registry.installed() == []
    assert not (settings.models_dir / "default" / "2.0.0").exists()


def test_a_version_is_never_overwritten_with_other_weights(
    settings: Settings, tmp_path: Path
) -> None:
    registry = ModelRegistry(settings.models_dir)
    first = registry.install(model_copy(tmp_path, "a"))
    again = registry.install(model_copy(tmp_path, "b"))  # same weights: a no-op
    assert again == first
    with pytest.raises(RegistryError, match="already installed with other weights"):
        registry.install(model_copy(tmp_path, "c", change_weights=True))
    assert load_manifest(first.path).weights_sha256 == first.weights_sha256


def test_a_version_is_never_reinstalled_with_another_manifest(
    settings: Settings, tmp_path: Path
) -> None:
    """Same weights, other labels and threshold: refused, the installed manifest kept."""
    registry = ModelRegistry(settings.models_dir)
    first = registry.install(model_copy(tmp_path, "a"), activate=True)
    kept = first.manifest_path.read_bytes()
    changed = model_copy(tmp_path, "b")
    raw = json.loads((changed / "manifest.json").read_text())
    raw["labels"], raw["finding_labels"] = ["normal", "mass", "effusion"], ["mass", "effusion"]
    raw["uncertainty_threshold"] = 0.05
    (changed / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(
        RegistryError,
        match=r"default 2\.0\.0 is installed with another manifest \(finding_labels, labels,"
        r" uncertainty_threshold differ\): give it a new version",
    ):
        registry.install(changed, activate=True)
    assert first.manifest_path.read_bytes() == kept
    assert registry.install(model_copy(tmp_path, "c"), activate=True) == first  # the same: no-op


def test_a_model_taking_another_models_name_and_version_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    """Results, monitoring and recalls know a model by its manifest's name and version: a model
    trained from the default preset (the bundled model's name and version, other weights), or
    one reusing an installed model's under another registry name, would be taken for it."""
    bundled = load_manifest(default_model_dir())
    registry = ModelRegistry(settings.models_dir)
    own_training = model_copy(
        tmp_path, "own", name=bundled.name, version=bundled.version, change_weights=True
    )
    for registry_name in (None, "chest"):
        with pytest.raises(
            RegistryError,
            match=rf"{bundled.name} {re.escape(bundled.version)} already names another model"
            r" \(the bundled model: .*weights_sha256 differ\)",
        ):
            registry.install(own_training, name=registry_name)
    assert registry.installed() == []
    # the bundled model itself may be installed, under any name
    assert registry.install(default_model_dir(), name="chest").version == bundled.version

    registry.install(model_copy(tmp_path, "a", name="lung", version="1.0"), name="ward-a")
    with pytest.raises(
        RegistryError,
        match=r"lung 1\.0 already names another model \(installed as ward-a 1\.0: weights_sha256",
    ):
        registry.install(
            model_copy(tmp_path, "b", name="lung", version="1.0", change_weights=True),
            name="ward-b",
        )
    assert [m.name for m in registry.installed()] == ["chest", "ward-a"]


def test_a_manifest_name_that_is_a_path_is_refused(settings: Settings, tmp_path: Path) -> None:
    """The manifest's own name names engine cache files: it must be a safe file name too,
    whatever name the registry installs it under."""
    registry = ModelRegistry(settings.models_dir)
    with pytest.raises(RegistryError, match="name '../../../escaped' cannot name a folder"):
        registry.install(model_copy(tmp_path, "x", name="../../../escaped"), name="probe")
    assert registry.installed() == []
    assert not (settings.models_dir / "probe").exists()


def test_a_version_installed_before_a_new_check_is_still_listed(
    settings: Settings, tmp_path: Path
) -> None:
    registry = ModelRegistry(settings.models_dir)
    model = registry.install(model_copy(tmp_path, "a"))
    raw = json.loads(model.manifest_path.read_text())
    raw["name"] = "../escaped"  # what an older node installed unchecked
    model.manifest_path.write_text(json.dumps(raw))
    (listed,) = registry.installed()
    assert replace(listed, refused="") == model
    assert "name '../escaped' cannot name a folder" in listed.refused  # and says why
    with pytest.raises(RegistryError, match="cannot name a folder"):
        registry.activate("default", "2.0.0")


def test_activate_needs_an_installed_version(settings: Settings, tmp_path: Path) -> None:
    registry = ModelRegistry(settings.models_dir)
    with pytest.raises(RegistryError, match="none is installed"):
        registry.activate("default", "9.9")
    registry.install(model_copy(tmp_path, "a"))
    with pytest.raises(RegistryError, match=r"installed: 2\.0\.0"):
        registry.activate("default", "9.9")
    with pytest.raises(RegistryError, match="cannot name a folder"):
        registry.activate("../etc", "1")
    # weights changed after install: activation refuses
    (settings.models_dir / "default" / "2.0.0" / "weights.pt").write_bytes(b"corrupt")
    with pytest.raises(RegistryError, match="SHA-256"):
        registry.activate("default", "2.0.0")


def test_unsafe_names_are_refused(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot name a folder"):
        ModelRegistry(settings.models_dir).install(model_copy(tmp_path, "x", version="1/../2"))


@pytest.mark.parametrize("version", ["latest", "ACTIVE"])
def test_a_moving_version_is_not_installed(
    settings: Settings, tmp_path: Path, version: str
) -> None:
    """``latest`` would name other weights on each install, and ``ACTIVE`` took the place of
    the registry's ``ACTIVE`` file (activating another version then failed on a folder)."""
    registry = ModelRegistry(settings.models_dir)
    with pytest.raises(RegistryError, match=f"version {version!r} is refused: .*moving name"):
        registry.install(model_copy(tmp_path, "moving", name="chest", version=version))
    assert registry.installed() == []
    registry.install(model_copy(tmp_path, "v1", name="chest", version="1.0.0"), activate=True)
    assert registry.active_version("chest") == "1.0.0"


def installed_as_earlier_versions_did(settings: Settings, tmp_path: Path, version: str) -> Path:
    """A model an earlier version of the node installed and activated as ``chest`` under a
    version this one refuses (the check came later): returns its folder in the registry."""
    registry = ModelRegistry(settings.models_dir)
    registry.install(model_copy(tmp_path, "v1", name="chest-ai", version="1.0.0"), name="chest")
    folder = settings.models_dir / "chest" / version
    (settings.models_dir / "chest" / "1.0.0").rename(folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["version"] = version
    (folder / "manifest.json").write_text(json.dumps(raw))
    (settings.models_dir / "chest" / "ACTIVE").write_text(version + "\n")
    return folder


@pytest.fixture(autouse=True)
def no_patient_noted_before() -> None:
    """The log lines these tests read name temporary folders (``test_...``): a patient an
    earlier test of the process noted (``Test^Patient``) would have "test" redacted in them."""
    forget_identifiers()


def moving_version_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "is a moving name" in r.getMessage()
    ]


def test_an_installed_moving_version_keeps_loading_after_an_upgrade(
    settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model an earlier version installed as ``latest`` is not taken offline by the upgrade:
    the worker loads it (and its health check passes), logging once why the version matters
    and how to renumber it; the way out (a copy under a fixed version, installed and
    activated) works, and activating the moving version again is allowed, with the warning."""
    folder = installed_as_earlier_versions_did(settings, tmp_path, "latest")
    steps = re.escape(
        f"installed in the model registry as chest latest before versions had to be fixed:"
        f' copy {folder}, give the copy\'s manifest.json a fixed "version" (1.0.0) and run'
        " `acwi-node models install COPY --name chest --activate`"
    )
    caplog.set_level(logging.WARNING)
    analyser = get_analyser(settings, "chest")  # what the worker's next task loads
    assert analyser.manifest.version == "latest"
    assert analyser.manifest.directory == folder.resolve()
    routes = [{"name": "chest", "model": "chest", "destinations": []}]
    worker = load_settings(None, node={"data_dir": str(settings.data_dir)}, routes=routes)
    for load in (False, True):
        preload = ModelPreload(worker, load=load)
        preload.run()
        assert (
            preload.check()
            == (  # ready, with a warning
                True,
                f"chest: chest-ai latest sha256 {analyser.manifest.weights_sha256[:16]} "
                + ("loaded" if load else "verified")
                + " (warning: its version is a moving name, to renumber: the log and the Models"
                " page say how)",
            )
        )
    Analyser.load(folder, mc_samples=2)  # another load of the same manifest: no second line
    (warning,) = moving_version_warnings(caplog)
    assert f"model chest-ai latest ({folder / 'manifest.json'}) loads, but" in warning
    assert re.search(f"version 'latest' is a moving name.*results' UIDs, recalls.*{steps}", warning)

    config = write_config(tmp_path / "node.toml", {"node": {"data_dir": str(settings.data_dir)}})
    copy = tmp_path / "chest-fixed"
    shutil.copytree(folder, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["version"] = "1.0.0"
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert (
        main(
            ["--config", str(config), "models", "install", str(copy), "--name", "chest"]
            + ["--activate"]
        )
        == 0
    )
    capsys.readouterr()
    assert load_manifest(settings.model_manifest("chest")).version == "1.0.0"
    assert get_analyser(settings, "chest").manifest.version == "1.0.0"
    warnings = {m.version: m.warning for m in ModelRegistry(settings.models_dir).installed()}
    assert warnings["1.0.0"] == "" and "moving name" in warnings["latest"]

    # going back to the installed moving version is allowed, with the warning (logged by the
    # command, a process of its own)
    monkeypatch.setattr(manifest_module, "_warned", set())
    assert main(["--config", str(config), "models", "activate", "chest", "latest"]) == 0
    out, err = capsys.readouterr()
    assert "version latest is active" in out
    (warning,) = [line for line in err.splitlines() if "is a moving name" in line]
    assert " WARNING acwi_node.models " in warning and re.search(steps, warning)
    assert ModelRegistry(settings.models_dir).active_version("chest") == "latest"


def test_models_list_warns_of_an_installed_moving_version(
    settings: Settings, ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``acwi-node models list`` shows a version an earlier version installed as ``latest`` as
    one that loads, with a warning line saying how to renumber it (``--json``: ``warning``);
    the Models page shows it running."""
    folder = installed_as_earlier_versions_did(settings, tmp_path, "latest")
    steps = re.escape(
        f"installed in the model registry as chest latest before versions had to be fixed:"
        f' copy {folder}, give the copy\'s manifest.json a fixed "version" (1.0.0) and run'
        " `acwi-node models install COPY --name chest --activate`"
    )
    config = write_config(tmp_path / "node.toml", {"node": {"data_dir": str(settings.data_dir)}})
    assert main(["--config", str(config), "models", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].split()[:3] == ["chest", "latest", "yes"]
    assert listing[2].startswith("warning: chest latest loads, but its version 'latest' is")
    assert re.search(steps, listing[2])
    assert len(listing) == 3  # and no "does not load" line
    assert main(["--config", str(config), "models", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["refused"] == "" and re.search(steps, row["warning"])

    (model,) = [m for m in models_overview(settings, ledger) if m.model == "chest"]
    assert (model.source, model.error) == ("registry", "")
    assert [(v.version, v.running) for v in model.versions] == [("latest", True)]


def test_the_models_page_api_and_metrics_warn_of_a_moving_version(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    """Where an administrator looks: the Models page (in words, not by colour alone),
    ``GET /api/models`` (``warning``, of the model and its version) and the web process's
    ``/metrics`` (``acwi_model_warnings``) say that a model runs, or has installed, a version
    an earlier version installed as ``latest``, and how to renumber it; a fixed one, nothing."""
    folder = installed_as_earlier_versions_did(settings, tmp_path, "latest")
    steps = re.escape(
        f"installed in the model registry as chest latest before versions had to be fixed:"
        f' copy {folder}, give the copy\'s manifest.json a fixed "version" (1.0.0) and run'
        " `acwi-node models install COPY --name chest --activate`"
    )
    (model,) = [m for m in models_overview(settings, ledger) if m.model == "chest"]
    (running,) = model.versions
    assert re.match(f"loads, but its version 'latest' is a moving name.*{steps}", model.warning)
    assert running.warning == model.warning and running.running

    add_user(ledger, "boss", "admin")
    metric = "acwi_model_warnings"
    web = load_settings(None, node={"data_dir": settings.data_dir}, review={"cookie_secure": False})
    with TestClient(create_app(web, ledger)) as client:
        sign_in(client, "boss")
        (listed,) = [m for m in client.get("/api/models").json()["models"] if m["model"] == "chest"]
        assert listed["warning"] == model.warning
        assert listed["versions"][0]["warning"] == model.warning
        page = html.unescape(client.get("/review/models").text)
        assert re.search(
            r'<p class="warning"><strong>Warning:</strong> chest-ai latest, running now, loads,'
            f" but its version 'latest' is a moving name.*{steps}.*</p>",
            page,
        )
        assert "<td>running; <strong>with a warning</strong></td>" in page
        samples = _samples(client.get("/metrics").text, metric)
        assert samples == {(("model", "chest"), ("state", "running"), ("version", "latest")): 1}

        # renumbered: the fixed version runs without a warning; the moving one, still
        # installed, keeps its own
        copy = tmp_path / "chest-fixed"
        shutil.copytree(folder, copy)
        raw = json.loads((copy / "manifest.json").read_text())
        raw["version"] = "1.0.0"
        (copy / "manifest.json").write_text(json.dumps(raw))
        ModelRegistry(settings.models_dir).install(copy, name="chest", activate=True)
        (listed,) = [m for m in client.get("/api/models").json()["models"] if m["model"] == "chest"]
        assert listed["warning"] == ""
        assert [(v["version"], v["running"], bool(v["warning"])) for v in listed["versions"]] == [
            ("1.0.0", True, False),
            ("latest", False, True),
        ]
        page = html.unescape(client.get("/review/models").text)
        assert ", running now," not in page
        assert "<td>installed; <strong>with a warning</strong></td>" in page
        assert re.search(
            r'<tr class="warning-row"><td colspan="8"><p class="warning"><strong>Warning:'
            f"</strong> chest-ai latest loads, but .*{steps}.*</p>",
            page,
        )
        samples = _samples(client.get("/metrics").text, metric)
        assert samples == {(("model", "chest"), ("state", "installed"), ("version", "latest")): 1}


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_a_models_path_manifest_with_a_moving_version_keeps_loading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``[[models]]`` manifest an earlier version ran with version ``latest`` still loads in
    the worker, with one warning saying to give its file a fixed version."""
    source = model_copy(tmp_path, "latest", name="chest-ai", version="latest")
    settings = load_settings(
        None,
        node={"data_dir": str(tmp_path / "data")},
        models=[{"name": "chest", "manifest": str(source / "manifest.json")}],
        routes=[{"name": "chest", "model": "chest", "destinations": []}],
    )
    caplog.set_level(logging.WARNING)
    preload = ModelPreload(settings, load=True)
    preload.run()
    ready, detail = preload.check()
    assert ready and detail.endswith(
        " loaded (warning: its version is a moving name, to renumber:"
        " the log and the Models page say how)"
    ), detail
    assert get_analyser(settings, "chest").manifest.version == "latest"
    Analyser.load(source, mc_samples=2)
    (warning,) = moving_version_warnings(caplog)
    manifest_file = (source / "manifest.json").resolve()
    assert f"({manifest_file}) loads, but its version 'latest' is a moving name" in warning
    assert warning.endswith(f'Give {manifest_file} a fixed "version" (1.0.0)')
    assert "model registry" not in warning


def test_a_manifest_outside_the_registry_gets_no_registry_advice(tmp_path: Path) -> None:
    """A ``[[models]]`` manifest with a moving version is refused with the reason alone: its
    own file is the one to fix."""
    source = model_copy(tmp_path, "latest", version="latest")
    with pytest.raises(ManifestError, match="version 'latest' is refused") as refused:
        load_manifest(source)
    assert "model registry" not in str(refused.value)


def test_routes_may_name_an_activated_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    routes = [{"name": "chest", "model": "chest-ai", "destinations": []}]
    with pytest.raises(ConfigError, match="chest-ai"):
        load_settings(None, node={"data_dir": str(data)}, routes=routes)
    registry = ModelRegistry(data / "models")
    registry.install(model_copy(tmp_path, "chest", name="chest-ai", version="1.0"), activate=True)
    settings = load_settings(None, node={"data_dir": str(data)}, routes=routes)
    assert load_manifest(settings.model_manifest("chest-ai")).name == "chest-ai"


def test_device_uid_follows_the_active_weights(settings: Settings, tmp_path: Path) -> None:
    """The SR's device observer UID includes the weights' hash: another version with other
    weights is another device."""
    registry = ModelRegistry(settings.models_dir)
    registry.install(model_copy(tmp_path, "a", version="1.0"), activate=True)
    one = load_manifest(settings.model_manifest("default")).identity()
    registry.install(model_copy(tmp_path, "b", version="1.0-b", change_weights=True))
    registry.activate("default", "1.0-b")
    two = load_manifest(settings.model_manifest("default")).identity()
    assert one.weights_sha256 and two.weights_sha256 and one.weights_sha256 != two.weights_sha256
    assert device_uid(one.name, "1.0", one.weights_sha256) != device_uid(
        two.name, "1.0", two.weights_sha256
    )


def test_models_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "node.toml", {"node": {"data_dir": str(tmp_path / "data")}})
    base = ["--config", str(config), "models"]
    assert main([*base, "list"]) == 0
    assert "no models installed" in capsys.readouterr().out

    tampered = model_copy(tmp_path, "bad")
    (tampered / "weights.pt").write_bytes(b"other bytes")
    assert main([*base, "install", str(tampered)]) == 1
    assert "SHA-256" in capsys.readouterr().err

    assert main([*base, "install", str(model_copy(tmp_path, "good"))]) == 0
    assert "installed default 2.0.0" in capsys.readouterr().out
    assert main([*base, "activate", "default", "2.0.0"]) == 0
    assert "version 2.0.0 is active" in capsys.readouterr().out
    assert main([*base, "activate", "default", "7"]) == 1
    capsys.readouterr()
    assert main([*base, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    sha = load_manifest(default_model_dir()).weights_sha256
    assert [(r["name"], r["version"], r["active"], r["weights_sha256"]) for r in rows] == [
        ("default", "2.0.0", True, sha)
    ]
    assert main([*base, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["default", "2.0.0", "yes", sha]


def test_install_under_the_name_routes_use(settings: Settings, tmp_path: Path) -> None:
    registry = ModelRegistry(settings.models_dir)
    model = registry.install(default_model_dir(), name="default", activate=True)
    assert (model.name, model.version, model.active) == (
        "default",
        load_manifest(default_model_dir()).version,
        True,
    )
    manifest = load_manifest(settings.model_manifest("default"))
    assert manifest.directory == model.path.resolve()
    assert manifest.name == load_manifest(default_model_dir()).name  # copied unchanged


def test_install_copies_and_checks_the_exported_onnx_files(
    settings: Settings, tmp_path: Path
) -> None:
    from models.export import export_model

    source = model_copy(tmp_path, "exported", version="3.0.0")
    manifest = load_manifest(export_model(source))
    assert manifest.onnx is not None and manifest.full_onnx is not None
    registry = ModelRegistry(settings.models_dir)
    installed = load_manifest(registry.install(source).manifest_path)
    for record in (installed.onnx, installed.full_onnx):
        assert record is not None
        assert sha256_file(installed.directory / record.file) == record.sha256
    (source / manifest.full_onnx.file).write_bytes(b"not onnx")
    other = model_copy(tmp_path, "broken", version="3.0.1")
    for name in (manifest.onnx.file, manifest.full_onnx.file):
        shutil.copyfile(source / name, other / name)
    raw = json.loads((source / "manifest.json").read_text())
    raw["version"] = "3.0.1"
    (other / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(RegistryError, match="does not match"):
        registry.install(other)
