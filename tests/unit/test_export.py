"""``acwi-models export``: the ONNX backbone and full model, parity, manifest records, engines."""

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
from models.export import (
    FULL_ONNX_NAME,
    FULL_OUTPUT_NAMES,
    FULL_TOLERANCES,
    ONNX_NAME,
    ExportError,
    check_full_onnx,
    export_model,
    load_model,
    parity_inputs,
)
from models.networks import feature_stride

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model exported into a new folder (the source is left untouched)."""
    out = tmp_path_factory.mktemp("exported")
    export_model(default_model_dir(), out)
    return out


def test_bundled_manifest_without_onnx_still_loads() -> None:
    manifest = load_manifest(default_model_dir())
    assert manifest.onnx is None and manifest.full_onnx is None
    raw = json.loads((default_model_dir() / MANIFEST_NAME).read_text())
    assert "onnx" not in raw and "full_onnx" not in raw


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
    out = capsys.readouterr().out
    assert "recorded them in" in out
    manifest = load_manifest(model)
    assert manifest.onnx is not None and manifest.full_onnx is not None
    assert (model / manifest.onnx.file).is_file()
    assert sha256_file(model / manifest.full_onnx.file) == manifest.full_onnx.sha256
    # One printed figure per output, each within its tolerance.
    printed = {}
    for line in out.splitlines():
        if line.startswith("parity ") and "max |onnx - torch|" in line:
            words = line.split()
            printed[words[1]] = float(words[words.index("torch|") + 1])
    assert set(printed) == set(FULL_OUTPUT_NAMES)
    for name, diff in printed.items():
        assert 0.0 <= diff <= FULL_TOLERANCES[name], (name, diff)


def test_cli_export_reports_a_bad_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main(["export", "--model", str(tmp_path / "missing")]) == 1
    assert "export failed" in capsys.readouterr().err


def test_cli_export_refuses_a_moving_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model whose manifest says ``latest`` is not exported: nothing is written next to it."""
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    raw = json.loads((model / MANIFEST_NAME).read_text())
    (model / MANIFEST_NAME).write_text(json.dumps({**raw, "version": "latest"}))
    before = sorted(p.name for p in model.iterdir())
    assert models_main(["export", "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert "export failed" in err and "version 'latest' is refused" in err
    assert sorted(p.name for p in model.iterdir()) == before


def test_export_records_the_full_model(exported: Path) -> None:
    manifest = load_manifest(exported)
    record = manifest.full_onnx
    assert record is not None
    assert record.file == FULL_ONNX_NAME
    assert record.sha256 == sha256_file(exported / FULL_ONNX_NAME)
    assert record.opset == 18
    assert record.input_names == ["image"]
    assert record.output_names == ["probabilities", "logits", "features", "mu", "logvar"]
    assert record.dynamic_batch
    assert (exported / ONNX_NAME).is_file()  # the backbone is still there for the engines
    assert not (default_model_dir() / FULL_ONNX_NAME).exists()


def test_full_onnx_outputs_and_shapes(exported: Path) -> None:
    manifest = load_manifest(exported)
    session = onnxruntime.InferenceSession(
        str(exported / FULL_ONNX_NAME), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == list(FULL_OUTPUT_NAMES)
    k = len(manifest.labels)
    latent = int(manifest.architecture_config["latent_dim"])
    channels = int(manifest.architecture_config["feature_channels"])
    x = parity_inputs(manifest)
    model = load_model(manifest)
    w_eff, b_eff = (t.detach().numpy() for t in model.cam_weights())
    side = manifest.input.size // feature_stride("dianet", manifest.architecture_config)
    for batch in (1, len(x)):
        probs, logits, features, mu, logvar = session.run(None, {"image": x[:batch]})
        assert probs.shape == logits.shape == (batch, k)
        assert features.shape == (batch, channels, side, side)
        assert mu.shape == logvar.shape == (batch, latent)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        scaled = logits / manifest.temperature
        softmax = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        np.testing.assert_allclose(probs, softmax / softmax.sum(axis=1, keepdims=True), atol=1e-6)
        # The CAM of the last activations averages back to the logits (DIANet.cam).
        cam_logits = np.einsum("kc,bchw->bk", w_eff, features) / side**2 + b_eff
        np.testing.assert_allclose(cam_logits, logits, atol=1e-4)


def test_full_onnx_matches_the_analyser(exported: Path) -> None:
    manifest = load_manifest(exported)
    analyser = Analyser.load(default_model_dir(), num_threads=2)
    x = parity_inputs(manifest)
    deterministic = analyser.infer(x, seeds=[0] * len(x), samples=0)
    session = onnxruntime.InferenceSession(
        str(exported / FULL_ONNX_NAME), providers=["CPUExecutionProvider"]
    )
    probs, *_ = session.run(["probabilities"], {"image": x})
    np.testing.assert_allclose(probs, deterministic.mc.probabilities, atol=1e-4)
    # The parity images span the classes: the check is not run on one kind of input only.
    assert len(set(probs.argmax(axis=1).tolist())) >= 2


def test_parity_within_tolerance_and_catches_a_mismatch(exported: Path) -> None:
    manifest = load_manifest(exported)
    model = load_model(manifest)
    x = parity_inputs(manifest)
    parity = check_full_onnx(model, exported / FULL_ONNX_NAME, x, manifest.temperature)
    assert parity.ok, parity.lines()
    assert set(parity.max_abs_diff) == set(FULL_OUTPUT_NAMES)
    assert parity.shapes["probabilities"] == (len(x), len(manifest.labels))
    assert all(f"{parity.max_abs_diff[n]:.3e}" in "\n".join(parity.lines()) for n in parity.shapes)
    # The same file against a different temperature: probabilities no longer agree.
    wrong = check_full_onnx(model, exported / FULL_ONNX_NAME, x, manifest.temperature * 2)
    assert "probabilities" in wrong.failures and not wrong.ok
    assert "logits" not in wrong.failures


def test_cli_export_fails_on_a_parity_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.export as export_module

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    before = (model / MANIFEST_NAME).read_bytes()
    reference = export_module.reference_outputs

    def skewed(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        outputs = reference(*args, **kwargs)  # type: ignore[arg-type]
        outputs["probabilities"] = outputs["probabilities"] + 1e-3
        return outputs

    monkeypatch.setattr(export_module, "reference_outputs", skewed)
    assert models_main(["export", "--model", str(model)]) == 1
    captured = capsys.readouterr()
    assert "export failed" in captured.err and "probabilities" in captured.err
    assert "FAIL" in captured.out
    assert (model / MANIFEST_NAME).read_bytes() == before  # nothing recorded
    assert not (model / FULL_ONNX_NAME).exists() and not (model / ONNX_NAME).exists()


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file in ``folder`` (hidden ones too): inode and bytes."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("failure", ["interrupted", "export error"])
def test_a_failed_reexport_leaves_the_old_files_and_manifest(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Killed, interrupted or failing after the new backbone was written, a re-export in place
    leaves the files the manifest records: nothing final is replaced before every check
    passed (before, backbone.onnx was replaced first and the manifest then named a file that
    was no longer there)."""
    import models.export as export_module

    model = tmp_path / "model"
    shutil.copytree(exported, model)
    before = _snapshot(model)
    seen: list[dict[str, tuple[int, bytes]]] = []

    def check_then_stop(*args: object, **kwargs: object) -> float:
        seen.append(_snapshot(model))  # the new backbone is written by now
        if failure == "interrupted":
            raise KeyboardInterrupt  # as a kill would end it, but with clean-up
        raise export_module.ExportError("simulated failure after the backbone")

    monkeypatch.setattr(export_module, "check_onnx", check_then_stop)
    with pytest.raises(KeyboardInterrupt if failure == "interrupted" else ExportError):
        export_module.export(model)
    (during,) = seen
    assert {k: during[k] for k in before} == before  # old files in place while it ran
    assert _snapshot(model) == before  # and after: no temporary file left either
    manifest = load_manifest(model)
    assert manifest.onnx is not None and manifest.full_onnx is not None
    assert sha256_file(model / manifest.onnx.file) == manifest.onnx.sha256
    assert sha256_file(model / manifest.full_onnx.file) == manifest.full_onnx.sha256


def test_an_opset_the_exporter_cannot_write_fails_and_records_nothing(tmp_path: Path) -> None:
    """The exporter writes opset 18 and cannot convert DIANet's graph to 17 (it keeps 18,
    quietly): the export fails saying so, instead of recording 17 for an opset-18 file."""
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    before = _snapshot(model)
    with pytest.raises(ExportError, match=r"--opset 17 cannot be written here: .* opset 18"):
        export_model(model, opset=17)
    assert _snapshot(model) == before
    with pytest.raises(ExportError, match="newer than the newest opset"):
        export_model(model, opset=10_000)
    assert _snapshot(model) == before
