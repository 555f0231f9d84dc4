"""The manifest validator: what the worker builds from a manifest must fit the manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from acwi_node.inference.manifest import (
    EXISTING,
    ManifestError,
    ModelManifest,
    default_model_dir,
    load_manifest,
)

Edit = Callable[[dict[str, Any]], None]


def bundled() -> dict[str, Any]:
    """The bundled model's manifest, as JSON."""
    raw: dict[str, Any] = json.loads((default_model_dir() / "manifest.json").read_text())
    return raw


def edited(edit: Edit) -> dict[str, Any]:
    raw = bundled()
    edit(raw)
    return raw


def _labels(*names: str) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        raw["labels"], raw["finding_labels"] = list(names), list(names[1:])

    return edit


def _ood_dims(dim: int) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        ood = raw["ood"]
        ood["mean"] = ood["mean"][:dim]
        ood["precision"] = [row[:dim] for row in ood["precision"][:dim]]

    return edit


def _arch(**values: Any) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        raw["architecture_config"].update(values)

    return edit


def _set(key: str, value: Any) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        raw[key] = value

    return edit


def test_the_bundled_manifest_is_consistent() -> None:
    manifest = ModelManifest.model_validate(bundled())
    assert len(manifest.labels) == manifest.architecture_config["num_classes"]
    assert len(manifest.ood.mean) == manifest.architecture_config["latent_dim"]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_labels("normal", "nodule"), "num_classes is 3 but the manifest lists 2 labels"),
        (
            _labels("normal", "nodule", "effusion", "mass"),
            "num_classes is 3 but the manifest lists 4 labels",
        ),
        (
            _arch(latent_dim=16),
            "ood.mean and ood.precision have 32 dimensions but the latent has 16",
        ),
        (_ood_dims(16), "ood.mean and ood.precision have 16 dimensions but the latent has 32"),
        (_arch(in_channels=3), "in_channels is 3 but input.channels is 1"),
    ],
    ids=["2-labels", "4-labels", "latent-dim", "ood-dims", "in-channels"],
)
def test_what_the_architecture_cannot_take_is_refused(edit: Edit, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ModelManifest.model_validate(edited(edit))


def test_another_architectures_configuration_is_checked_by_the_shared_keys() -> None:
    """``models.model_io`` validates AMRI-Net manifests (keys DIANet does not know) with this
    schema: the keys both share are checked, with their common defaults."""
    amrinet = {"kernel_sizes": [3, 5, 7], "transformer_heads": 2, "input_size": 64}
    raw = bundled()
    raw["architecture_config"] = dict(amrinet)
    ModelManifest.model_validate(raw)
    raw["architecture_config"] = {**amrinet, "num_classes": 2}
    with pytest.raises(ValidationError, match="num_classes is 2 but the manifest lists 3"):
        ModelManifest.model_validate(raw)


@pytest.mark.parametrize(
    "value",
    ["../../../escaped", "a/b", "..", ".hidden", "-x", "a b", "name\n", "x" * 65, "a\\b"],
)
@pytest.mark.parametrize("key", ["name", "version"])
def test_name_and_version_must_be_safe_file_names(key: str, value: str) -> None:
    with pytest.raises(ValidationError, match="cannot name a folder or a file"):
        ModelManifest.model_validate(edited(_set(key, value)))


@pytest.mark.parametrize(
    "version",
    ["latest", "Latest", "current", "ACTIVE", "active", "stable", "newest", "1.0-SNAPSHOT",
     "latest-2", "2.0_current", "nightly.3"],
)  # fmt: skip
def test_a_moving_version_is_refused(version: str) -> None:
    """A version names one set of weights for good: the results' UIDs, recalls, monitoring and
    the heatmaps' and HL7 messages' algorithm version know a model by its name and version, so
    a name that moves to newer weights (or says nothing, or takes the place of the registry's
    ``ACTIVE`` file) is refused."""
    with pytest.raises(ValidationError, match=f"version {version!r} is refused: .*moving name"):
        ModelManifest.model_validate(edited(_set("version", version)))


@pytest.mark.parametrize("version", ["", " ", "..", "latest "])
def test_an_empty_or_unsafe_version_is_still_refused(version: str) -> None:
    with pytest.raises(ValidationError, match="version"):
        ModelManifest.model_validate(edited(_set("version", version)))
    with pytest.raises(ValidationError, match="version"):  # also of a model the node has
        ModelManifest.model_validate(edited(_set("version", version)), context=EXISTING)


@pytest.mark.parametrize("version", ["latest", "current", "stable", "1.0-SNAPSHOT"])
def test_a_moving_version_of_a_model_the_node_has_validates(version: str) -> None:
    """The version rule is for what is made from now on: an installed or configured manifest
    an earlier version accepted (validated with ``EXISTING``) keeps loading."""
    raw = edited(_set("version", version))
    assert ModelManifest.model_validate(raw, context=EXISTING).version == version
    with pytest.raises(ValidationError, match="is refused"):
        ModelManifest.model_validate(raw, context={"existing": False})


@pytest.mark.parametrize(
    "version",
    ["1", "1.0", "1.1.0", "9.9.9", "1.2.0-rc1", "1.0-b", "0.0.0-none", "2026.03.01",
     "2026-03-01", "20260301", "v3", "3.0.1_ward-a"],
)  # fmt: skip
def test_numbered_and_dated_versions_validate(version: str) -> None:
    assert ModelManifest.model_validate(edited(_set("version", version))).version == version


def test_safe_names_still_validate() -> None:
    raw = edited(_set("version", "1.2.0-rc1_b.2"))
    raw["name"] = "Chest.AI_v2-x"
    manifest = ModelManifest.model_validate(raw)
    assert (manifest.name, manifest.version) == ("Chest.AI_v2-x", "1.2.0-rc1_b.2")


@pytest.mark.parametrize(
    "edit",
    [
        lambda raw: raw["preprocessing"].update(mean=float("nan")),
        lambda raw: raw["ood"].update(threshold=float("inf")),
        lambda raw: raw["ood"]["mean"].__setitem__(0, float("nan")),
        lambda raw: raw.update(temperature=float("inf")),
    ],
    ids=["nan-mean", "inf-ood-threshold", "nan-ood-mean", "inf-temperature"],
)
def test_nan_and_infinity_are_refused(edit: Edit) -> None:
    """The worker would compute NaN for every image, and JSON cannot write them back."""
    with pytest.raises(ValidationError, match="finite number"):
        ModelManifest.model_validate(edited(edit))


def test_an_invalid_manifest_is_reported_on_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    (folder / "manifest.json").write_text(json.dumps(edited(_labels("normal", "nodule"))))
    with pytest.raises(ManifestError) as caught:
        load_manifest(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(
        "is invalid: architecture_config num_classes is 3 but the manifest lists 2 labels"
    )
