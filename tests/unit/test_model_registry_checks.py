"""Install runs the model before it copies it: a manifest the worker cannot run is refused,
with one line naming the problem, and the registry is left as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acwi_node.config import Settings
from acwi_node.inference.analyser import Analyser
from acwi_node.inference.manifest import default_model_dir
from acwi_node.model_registry import ModelRegistry, RegistryError

Edit = Callable[[dict[str, Any]], None]


def variant(source: Path, target: Path, edit: Edit) -> Path:
    """A copy of the model folder ``source`` whose manifest ``edit`` changed."""
    shutil.copytree(source, target)
    path = target / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return target


def refused(settings: Settings, source: Path, match: str) -> str:
    """Install ``source`` (as the route's model, activated): refused with one line matching
    ``match``, and nothing of it in the registry."""
    registry = ModelRegistry(settings.models_dir)
    with pytest.raises(RegistryError, match=match) as caught:
        registry.install(source, name="probe", activate=True)
    message = str(caught.value)
    assert "\n" not in message
    assert registry.installed() == []
    assert not (settings.models_dir / "probe").exists()
    return message


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with its recorded ONNX files (``acwi-models export``)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from models.export import export_model

    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(default_model_dir(), folder)
    export_model(folder)
    return folder


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"widths": [8, 16, 32, 64, 128]}, "size mismatch"),
        ({"width": [8, 16, 32, 64, 96]}, "unexpected keyword argument 'width'"),
    ],
    ids=["wider", "unknown-key"],
)
def test_weights_the_network_cannot_load_are_refused(
    settings: Settings, tmp_path: Path, config: dict[str, Any], problem: str
) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["architecture_config"].update(config)

    source = variant(default_model_dir(), tmp_path / "m", edit)
    message = refused(settings, source, "the worker could not load the model")
    assert problem in message


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda raw: raw.update(labels=["normal", "nodule"], finding_labels=["nodule"]),
            "num_classes is 3 but the manifest lists 2 labels",
        ),
        (
            lambda raw: raw["ood"].update(
                mean=raw["ood"]["mean"][:16],
                precision=[row[:16] for row in raw["ood"]["precision"][:16]],
            ),
            "ood.mean and ood.precision have 16 dimensions but the latent has 32",
        ),
        (
            lambda raw: raw["architecture_config"].update(latent_dim=16),
            "the latent has 16",
        ),
    ],
    ids=["labels", "ood-dims", "latent-dim"],
)
def test_a_manifest_its_network_does_not_fit_is_refused(
    settings: Settings, tmp_path: Path, edit: Edit, problem: str
) -> None:
    refused(settings, variant(default_model_dir(), tmp_path / "m", edit), problem)


def test_a_model_whose_warm_up_fails_is_refused(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes the worker's warm-up fail makes every analysis fail: not installed."""

    def broken(self: Analyser, image_size: tuple[int, int] = (512, 512)) -> float:
        raise ValueError("operands could not be broadcast together\nwith shapes (1,32) (16,)")

    monkeypatch.setattr(Analyser, "warm_up", broken)
    message = refused(settings, default_model_dir(), "a trial analysis on PyTorch")
    assert message.endswith(
        "(input 128 x 128) failed: ValueError: operands could not be broadcast together with"
        " shapes (1,32) (16,)"
    )


def test_an_input_size_the_recorded_onnx_does_not_take_is_refused(
    settings: Settings, tmp_path: Path, exported: Path
) -> None:
    source = variant(exported, tmp_path / "m", lambda raw: raw["input"].update(size=160))
    message = refused(settings, source, r"trial analysis through backbone\.onnx on ONNX Runtime")
    assert "(input 160 x 160) failed" in message
    assert "ONNXRuntimeError" in message


def test_a_recorded_onnx_of_another_architecture_is_refused(
    settings: Settings, tmp_path: Path, exported: Path
) -> None:
    """The weights load into ``fusion_level = 1`` too, but the exported backbone computes
    the ``fusion_level = 0`` network: ONNX Runtime and PyTorch would disagree."""
    edit: Edit = lambda raw: raw["architecture_config"].update(fusion_level=1)  # noqa: E731
    source = variant(exported, tmp_path / "m", edit)
    refused(settings, source, r"backbone\.onnx does not compute what the weights and manifest do")


def test_a_full_model_onnx_of_another_temperature_is_refused(
    settings: Settings, tmp_path: Path, exported: Path
) -> None:
    source = variant(exported, tmp_path / "m", lambda raw: raw.update(temperature=0.5))
    message = refused(settings, source, r"model\.onnx does not compute what")
    assert "probabilities" in message


def test_the_exported_model_installs(settings: Settings, exported: Path) -> None:
    model = ModelRegistry(settings.models_dir).install(exported, name="probe", activate=True)
    assert (model.name, model.active) == ("probe", True)
    assert sorted(p.name for p in model.path.iterdir()) == [
        "backbone.onnx",
        "manifest.json",
        "model.onnx",
        "weights.pt",
    ]
