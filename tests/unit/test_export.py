"""``acwi-models export``: the ONNX backbone, its manifest record and its use by the engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from acwi_node.inference.analyser import Analyser
from acwi_node.inference.engines import EngineOptions, OnnxRuntimeEngine
from acwi_node.inference.manifest import (
    MANIFEST_NAME,
    ManifestError,
    default_model_dir,
    load_manifest,
    sha256_file,
)
from models.cli import main as models_main
from models.data.synth import write_study
from models.export import ONNX_NAME, export_model

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model exported into a new folder (the source is left untouched)."""
    out = tmp_path_factory.mktemp("exported")
    export_model(default_model_dir(), out)
    return out


def test_bundled_manifest_without_onnx_still_loads() -> None:
    manifest = load_manifest(default_model_dir())
    assert manifest.onnx is None
    raw = json.loads((default_model_dir() / MANIFEST_NAME).read_text())
    assert "onnx" not in raw


def test_export_records_the_onnx_file(exported: Path) -> None:
    manifest = load_manifest(exported)
    record = manifest.onnx
    assert record is not None
    assert record.file == ONNX_NAME
    assert record.sha256 == sha256_file(exported / ONNX_NAME)
    assert record.opset == 18
    assert record.input_names == ["image"]
    assert record.output_names == ["features", "pooled", "mu"]
    assert record.dynamic_batch
    source = load_manifest(default_model_dir())
    assert manifest.weights_sha256 == source.weights_sha256
    assert manifest.labels == source.labels and manifest.temperature == source.temperature
    assert not (default_model_dir() / ONNX_NAME).exists()


def test_exported_onnx_runs_any_batch(exported: Path) -> None:
    session = onnxruntime.InferenceSession(
        str(exported / ONNX_NAME), providers=["CPUExecutionProvider"]
    )
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape[1:] == [1, 128, 128]
    for batch in (1, 5, 32):
        features, pooled, mu = session.run(None, {"image": np.zeros((batch, 1, 128, 128), "f4")})
        assert features.shape[0] == pooled.shape[0] == mu.shape[0] == batch
        np.testing.assert_allclose(pooled, features.mean(axis=(2, 3)), atol=1e-5)


def test_analyser_uses_the_recorded_file(exported: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    analyser = Analyser.load(
        exported, num_threads=2, engine=EngineOptions(engine="onnxruntime", cache_dir=cache)
    )
    assert isinstance(analyser.engine, OnnxRuntimeEngine)
    assert not (cache / "onnx").exists()  # no on-the-fly export: the manifest has one
    study = [pydicom.dcmread(p) for p in write_study(tmp_path / "s", n_images=2, seed=3)]
    reference = Analyser.load(default_model_dir(), num_threads=2).analyse(study)
    result = analyser.analyse(study)
    for x, y in zip(reference.images, result.images, strict=True):
        for label in x.probabilities:
            assert abs(x.probabilities[label] - y.probabilities[label]) <= 1e-4


def test_tampered_onnx_is_refused(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    data = bytearray((copy / ONNX_NAME).read_bytes())
    data[-1] ^= 0xFF
    (copy / ONNX_NAME).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="SHA-256"):
        Analyser.load(copy, engine=EngineOptions(engine="onnxruntime", cache_dir=tmp_path / "c"))
    (copy / ONNX_NAME).unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        Analyser.load(copy, engine=EngineOptions(engine="onnxruntime", cache_dir=tmp_path / "c"))


def test_onnx_path_must_stay_next_to_the_manifest(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["onnx"]["file"] = "../elsewhere.onnx"
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="relative to the manifest"):
        load_manifest(copy)


def test_cli_export_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    assert models_main(["export", "--model", str(model)]) == 0
    assert "recorded it in" in capsys.readouterr().out
    manifest = load_manifest(model)
    assert manifest.onnx is not None
    assert (model / manifest.onnx.file).is_file()


def test_cli_export_reports_a_bad_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main(["export", "--model", str(tmp_path / "missing")]) == 1
    assert "export failed" in capsys.readouterr().err
