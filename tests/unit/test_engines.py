"""Inference engines: selection, parity between the engines present, cache keys, TensorRT.

The CUDA and TensorRT tests skip here with the precise reason and run on a GPU machine
(``pip install tensorrt``): they build real engines and compare them with PyTorch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from acwi_node.config import WorkerSettings
from acwi_node.inference.analyser import Analyser, mc_head_batched, uid_seed
from acwi_node.inference.dropout import keep_masks
from acwi_node.inference.engines import (
    MAX_BATCH,
    EngineKey,
    EngineOptions,
    EngineUnavailable,
    OnnxRuntimeEngine,
    PyTorchEngine,
    TensorRTEngine,
    auto_order,
    cached_onnx,
    calibration_set,
    choose_engine,
    create_engine,
)
from acwi_node.inference.engines.ort import ort_providers
from acwi_node.inference.engines.pytorch import GRAPH_MAX_BATCH, graph_bucket
from acwi_node.inference.manifest import default_model_dir, load_manifest
from acwi_node.inference.types import StudyAnalysis
from models.data.synth import write_enhanced_ct, write_study
from models.export import load_model
from tests.support.heatmap_reference import reference_heatmap

#: PyTorch CPU vs ONNX Runtime CPU (both fp32): largest absolute difference allowed.
FP32_TOL = 1e-4
#: Reduced precision (fp16/bf16 backbone) vs fp32 on probabilities.
FP16_TOL = 2e-2
#: bf16 backbone vs fp32 on probabilities.
BF16_TOL = 0.1
#: PyTorch fp32 on CUDA (convolutions in IEEE fp32) vs PyTorch on the CPU.
CUDA_FP32_TOL = 1e-3

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    folder = tmp_path_factory.mktemp("study")
    paths = write_study(folder, n_images=3, label="nodule", site=1, seed=5)
    paths += write_study(
        folder / "b", n_images=2, label="effusion", site=2, seed=6, study_instance_uid=None
    )
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in paths]
    uid = datasets[0].StudyInstanceUID
    for ds in datasets:  # one study, two series
        ds.StudyInstanceUID = uid
    return datasets


def _load(engine: str, cache_dir: Path, **kwargs: object) -> Analyser:
    precision = str(kwargs.pop("precision", "fp32"))
    device = str(kwargs.pop("device", "cpu"))
    return Analyser.load(
        default_model_dir(),
        device=device,
        mc_samples=20,
        num_threads=2,
        engine=EngineOptions(engine=engine, precision=precision, cache_dir=cache_dir),
        **kwargs,  # type: ignore[arg-type]
    )


def _assert_parity(a: StudyAnalysis, b: StudyAnalysis, tol: float) -> None:
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images, strict=True):
        assert x.sop_instance_uid == y.sop_instance_uid
        for label in x.probabilities:
            assert abs(x.probabilities[label] - y.probabilities[label]) <= tol, label
        assert abs(x.uncertainty.score - y.uncertainty.score) <= tol
        assert abs(x.uncertainty.epistemic - y.uncertainty.epistemic) <= tol
        assert abs(x.uncertainty.aleatoric - y.uncertainty.aleatoric) <= 10 * tol
        assert abs(x.ood_score - y.ood_score) <= 100 * tol * max(1.0, x.ood_score)
        heat_x, heat_y = x.heatmap_array(), y.heatmap_array()
        assert heat_x.shape == heat_y.shape
        peak_x = np.unravel_index(np.argmax(heat_x), heat_x.shape)
        peak_y = np.unravel_index(np.argmax(heat_y), heat_y.shape)
        assert peak_x == peak_y
    assert a.predicted_label == b.predicted_label
    assert a.needs_review == b.needs_review


def _largest_probability_gap(a: StudyAnalysis, b: StudyAnalysis) -> float:
    return max(
        abs(x.probabilities[label] - y.probabilities[label])
        for x, y in zip(a.images, b.images, strict=True)
        for label in x.probabilities
    )


# ------------------------------------------------------------------------- selection


def test_auto_order_is_documented_order() -> None:
    assert auto_order(CPU) == ("onnxruntime", "pytorch")
    assert auto_order(torch.device("cuda")) == ("tensorrt", "onnxruntime", "pytorch")


def test_auto_on_this_cpu_machine() -> None:
    expected = "onnxruntime" if "CPUExecutionProvider" in ort_providers() else "pytorch"
    assert choose_engine("auto", CPU, "fp32") == expected
    # ONNX Runtime has no bf16 on CPU: auto falls through to PyTorch's autocast
    assert choose_engine("auto", CPU, "bf16") == "pytorch"


def test_explicit_tensorrt_fails_clearly_without_it() -> None:
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a CUDA device are present")
    with pytest.raises(EngineUnavailable, match="engine 'tensorrt' needs the tensorrt package"):
        choose_engine("tensorrt", torch.device("cuda"), "fp16")
    manifest = load_manifest(default_model_dir())
    with pytest.raises(EngineUnavailable, match="needs the tensorrt package and a CUDA GPU"):
        create_engine(load_model(manifest), manifest, "cpu", EngineOptions(engine="tensorrt"))


def test_unsupported_combinations_are_refused() -> None:
    with pytest.raises(EngineUnavailable, match="int8"):
        choose_engine("pytorch", CPU, "int8")
    with pytest.raises(EngineUnavailable, match="fp16 needs a CUDA device"):
        choose_engine("pytorch", CPU, "fp16")
    with pytest.raises(EngineUnavailable, match="onnxruntime"):
        choose_engine("onnxruntime", CPU, "bf16")
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine("tflite", CPU, "fp32")


def test_worker_settings_validate_engine_combinations() -> None:
    default = WorkerSettings()
    assert (default.engine, default.precision, default.heatmaps) == ("auto", "fp32", "all")
    WorkerSettings(engine="tensorrt", device="cuda", precision="int8", dla_core=0)
    bad: list[tuple[dict[str, object], str]] = [
        ({"precision": "fp16"}, "fp16 needs device 'cuda'"),
        ({"precision": "int8", "device": "cuda", "engine": "pytorch"}, "int8 needs engine"),
        ({"engine": "tensorrt"}, "tensorrt' needs device 'cuda'"),
        ({"dla_core": 0, "device": "cuda"}, "dla_core needs engine 'tensorrt'"),
        ({"engine": "onnxruntime", "precision": "bf16"}, "does not support precision bf16"),
        ({"engine": "openvino"}, "engine"),
        ({"heatmaps": "some"}, "heatmaps"),
        ({"batch_size": MAX_BATCH + 1}, "batch_size"),
    ]
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            WorkerSettings(**values)


# ------------------------------------------------------------------------- head sampling


def test_batched_head_samples_each_image_from_its_own_seed() -> None:
    model = load_model(load_manifest(default_model_dir()))
    pooled = torch.randn(
        4, model.config.feature_channels, generator=torch.Generator().manual_seed(1)
    )
    seeds = [uid_seed("1.2.3", str(i)) for i in range(4)]
    p = model.config.dropout
    assert p > 0 and model.config.codebook_size == 0  # the reference below has no codebook
    with torch.inference_mode():
        batched = mc_head_batched(model, pooled, 20, seeds)
        masks = torch.from_numpy(keep_masks(seeds, 20, model.config.latent_dim, 1.0 - p))
        for i, seed in enumerate(seeds):
            alone = mc_head_batched(model, pooled[i : i + 1], 20, [seed])
            torch.testing.assert_close(batched[0][:, i], alone[0][:, 0], rtol=0, atol=1e-6)
            torch.testing.assert_close(batched[1][:, i], alone[1][:, 0], rtol=0, atol=1e-6)
            # sample t is the head on mu with image i's mask t, scaled as inverted dropout
            z = model.to_mu(pooled[i : i + 1]) * masks[i].float() / (1.0 - p)
            torch.testing.assert_close(batched[0][:, i], model.classifier(z), rtol=0, atol=1e-5)
        # samples differ from each other (dropout is active) ...
        assert float(batched[0].std(dim=0).max()) > 0
        # ... and 0 samples is the deterministic head
        det = mc_head_batched(model, pooled, 0, seeds)
        torch.testing.assert_close(det[0][0], model.head(pooled).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one seed per image"):
        mc_head_batched(model, pooled, 20, seeds[:3])


# ------------------------------------------------------------------------- parity on CPU


def test_pytorch_and_onnxruntime_cpu_agree(cache_dir: Path, study: list[Dataset]) -> None:
    if "CPUExecutionProvider" not in ort_providers():
        pytest.skip("onnxruntime not installed")
    torch_analyser = _load("pytorch", cache_dir)
    ort_analyser = _load("onnxruntime", cache_dir)
    assert isinstance(torch_analyser.engine, PyTorchEngine)
    assert isinstance(ort_analyser.engine, OnnxRuntimeEngine)
    assert ort_analyser.engine.describe().startswith("onnxruntime-cpu fp32")
    _assert_parity(torch_analyser.analyse(study), ort_analyser.analyse(study), FP32_TOL)


def test_results_do_not_depend_on_batch_size(cache_dir: Path, study: list[Dataset]) -> None:
    one = _load("pytorch", cache_dir, batch_size=1).analyse(study)
    many = _load("pytorch", cache_dir, batch_size=16).analyse(study)
    _assert_parity(one, many, 1e-6)


def test_cuda_graph_buckets_and_the_cpu_engine_without_graphs() -> None:
    assert [graph_bucket(n) for n in (1, 2, 3, 4, 5, 17, 32, 33, GRAPH_MAX_BATCH)] == [
        1,
        2,
        4,
        4,
        8,
        32,
        32,
        64,
        GRAPH_MAX_BATCH,
    ]
    assert graph_bucket(0) is None and graph_bucket(GRAPH_MAX_BATCH + 1) is None
    manifest = load_manifest(default_model_dir())
    engine = PyTorchEngine(load_model(manifest), "cpu", "fp32", cuda_graphs=True)
    assert not engine.cuda_graphs  # graphs are a CUDA feature: ignored on the CPU
    assert engine.describe() == "pytorch-cpu fp32"
    engine.run(torch.rand(3, 1, manifest.input.size, manifest.input.size))
    assert engine.captured_batches == []
    # the worker's setting reaches the engine
    assert WorkerSettings().cuda_graphs and not WorkerSettings(cuda_graphs=False).cuda_graphs
    assert EngineOptions().cuda_graphs


def test_bf16_autocast_on_cpu_is_close(cache_dir: Path, study: list[Dataset]) -> None:
    fp32 = _load("pytorch", cache_dir).analyse(study)
    bf16 = _load("pytorch", cache_dir, precision="bf16").analyse(study)
    assert _largest_probability_gap(fp32, bf16) <= BF16_TOL
    assert fp32.predicted_label == bf16.predicted_label


def test_onnx_export_is_cached_by_weights_hash(cache_dir: Path) -> None:
    manifest = load_manifest(default_model_dir())
    model = load_model(manifest)
    first = cached_onnx(manifest, model, cache_dir)
    assert manifest.weights_sha256[:16] in first.path.name
    mtime = first.path.stat().st_mtime_ns
    again = cached_onnx(manifest, model, cache_dir)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert again.sha256 == first.sha256


# ------------------------------------------------------------------------- heatmap policy


def test_heatmap_policy(cache_dir: Path) -> None:
    analyser = _load("pytorch", cache_dir, heatmaps="positive_or_uncertain")
    labels = analyser.labels
    normal = np.array([0.99 if name == "normal" else 0.005 for name in labels])
    nodule = np.array([0.99 if name == "nodule" else 0.005 for name in labels])
    threshold = analyser.manifest.uncertainty_threshold
    ood_threshold = analyser.manifest.ood.threshold
    assert not analyser.heatmap_selected(normal, 0.0, 0.0)
    assert analyser.heatmap_selected(nodule, 0.0, 0.0)
    assert analyser.heatmap_selected(normal, threshold + 0.01, 0.0)
    assert analyser.heatmap_selected(normal, 0.0, ood_threshold + 1.0)
    everything = _load("pytorch", cache_dir)
    assert everything.heatmap_selected(normal, 0.0, 0.0)
    nothing = _load("pytorch", cache_dir, heatmaps="none")
    assert not nothing.heatmap_selected(nodule, threshold + 0.01, ood_threshold + 1.0)
    # Another policy than the analyser's (a route's).
    assert analyser.heatmap_selected(normal, 0.0, 0.0, "all")
    assert not everything.heatmap_selected(nodule, 0.0, 0.0, "none")
    with pytest.raises(ValueError, match="heatmaps"):
        Analyser(analyser.model, analyser.manifest, heatmaps="some")  # type: ignore[arg-type]


def test_policy_marks_images_in_an_analysis(cache_dir: Path, study: list[Dataset]) -> None:
    analyser = _load("pytorch", cache_dir, heatmaps="positive_or_uncertain")
    result = analyser.analyse(study)
    for image in result.images:
        probs = np.array([image.probabilities[k] for k in analyser.labels])
        expected = (
            analyser.labels[int(np.argmax(probs))] in analyser.manifest.finding_labels
            or image.uncertainty.score > analyser.manifest.uncertainty_threshold
            or image.ood_score > analyser.manifest.ood.threshold
        )
        assert image.heatmap_selected == expected
        assert image.heatmap_array().shape == (study[0].Rows, study[0].Columns)  # still computed


# ------------------------------------------------------------------------- cache keys


def _key(**changes: object) -> EngineKey:
    base = EngineKey(
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        tensorrt_version="10.13.0",
        onnx_sha256="a" * 64,
        precision="fp16",
        max_batch=32,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_engine_cache_key(tmp_path: Path) -> None:
    key = _key()
    assert key.digest() == _key().digest()
    assert key.path(tmp_path, "acwi-dianet-chest") == _key().path(tmp_path, "acwi-dianet-chest")
    changed = [
        _key(onnx_sha256="b" * 64),
        _key(gpu_name="Orin"),
        _key(compute_capability=(8, 7)),
        _key(tensorrt_version="10.14.0"),
        _key(precision="int8", calibration_sha256="c" * 64),
        _key(dla_core=0),
    ]
    paths = {k.path(tmp_path, "m").name for k in changed} | {key.path(tmp_path, "m").name}
    assert len(paths) == len(changed) + 1
    name = _key().file_name("bad/../name with spaces")
    assert "/" not in name and " " not in name and name.endswith(".engine")
    assert "sm90" in name and "fp16" in name


def test_calibration_set_identity(tmp_path: Path) -> None:
    manifest = load_manifest(default_model_dir())
    write_study(tmp_path / "cal", n_images=2, label="normal", site=0, seed=1)
    folder = calibration_set(manifest, tmp_path / "cal")
    assert folder.sha256() == calibration_set(manifest, tmp_path / "cal").sha256()
    images = folder.load()
    size = manifest.input.size
    assert images.shape == (2, 1, size, size) and images.dtype == np.float32
    write_study(tmp_path / "cal" / "more", n_images=1, label="nodule", site=1, seed=2)
    assert calibration_set(manifest, tmp_path / "cal").sha256() != folder.sha256()
    assert calibration_set(manifest, None).sha256() != folder.sha256()


def test_a_multi_frame_calibration_image_gives_an_input_per_frame(tmp_path: Path) -> None:
    manifest = load_manifest(default_model_dir())
    write_study(tmp_path / "cal", n_images=1, label="normal", site=0, seed=1)
    write_enhanced_ct(tmp_path / "cal", slices=3, size=64)
    (tmp_path / "cal" / "notes.txt").write_text("not DICOM")
    size = manifest.input.size
    assert calibration_set(manifest, tmp_path / "cal").load().shape == (4, 1, size, size)
    # three files (a radiograph, its side-car, the CT): four images, three kept
    assert calibration_set(manifest, tmp_path / "cal", limit=3).load().shape[0] == 3


# ------------------------------------------------------------------------- GPU engines


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _need_tensorrt() -> None:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT not installed")
    _need_cuda()


def test_pytorch_cuda_fp32_fp16_and_bf16(cache_dir: Path, study: list[Dataset]) -> None:
    _need_cuda()
    cpu = _load("pytorch", cache_dir).analyse(study)
    fp32 = _load("pytorch", cache_dir, device="cuda")
    assert fp32.engine.describe() == "pytorch-cuda fp32 cuda-graphs"
    # the dropout masks come from CPU generators: the same samples as on the CPU, so the
    # numbers agree to fp32 rounding (cuDNN kept off TF32 for fp32)
    _assert_parity(cpu, fp32.analyse(study), CUDA_FP32_TOL)
    fp16 = _load("pytorch", cache_dir, device="cuda", precision="fp16").analyse(study)
    _assert_parity(cpu, fp16, FP16_TOL)
    # bf16 keeps 8 bits of mantissa (fp16 11): as on the CPU, close, with the same prediction
    bf16 = _load("pytorch", cache_dir, device="cuda", precision="bf16").analyse(study)
    assert _largest_probability_gap(cpu, bf16) <= BF16_TOL
    assert cpu.predicted_label == bf16.predicted_label


def test_cuda_graphs_replay_what_eager_pytorch_computes() -> None:
    _need_cuda()
    manifest = load_manifest(default_model_dir())
    size = manifest.input.size
    graphs = PyTorchEngine(load_model(manifest), "cuda", "fp32")
    eager = PyTorchEngine(load_model(manifest), "cuda", "fp32", cuda_graphs=False)
    assert graphs.cuda_graphs and not eager.cuda_graphs
    generator = torch.Generator().manual_seed(7)
    kept = []
    for batch in (1, 3, 32, 40, 3, GRAPH_MAX_BATCH + 1):
        x = torch.rand(batch, 1, size, size, generator=generator)
        got, want = graphs.run(x), eager.run(x)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.dtype == torch.float32 and a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        kept.append((got, want))
    # buckets 1, 4, 32, 64 were captured; the batch over GRAPH_MAX_BATCH ran eagerly
    assert graphs.captured_batches == [1, 4, 32, 64]
    # outputs handed out earlier are copies: later replays did not overwrite them
    for got, want in kept:
        torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-4, atol=1e-5)
    # fp16 graphs agree with fp16 eager
    half = PyTorchEngine(load_model(manifest), "cuda", "fp16")
    half_eager = PyTorchEngine(load_model(manifest), "cuda", "fp16", cuda_graphs=False)
    x = torch.rand(5, 1, size, size, generator=generator)
    torch.testing.assert_close(half.run(x).pooled, half_eager.run(x).pooled, rtol=0, atol=2e-3)


def test_onnxruntime_cuda_parity(cache_dir: Path, study: list[Dataset]) -> None:
    _need_cuda()
    if "CUDAExecutionProvider" not in ort_providers():
        pytest.skip("onnxruntime-gpu (CUDA execution provider) not installed")
    reference = _load("pytorch", cache_dir).analyse(study)
    analyser = _load("onnxruntime", cache_dir, device="cuda")
    assert "cuda" in analyser.engine.describe()
    _assert_parity(reference, analyser.analyse(study), 1e-3)


def test_tensorrt_fp16_parity_and_cache_reuse(cache_dir: Path, study: list[Dataset]) -> None:
    _need_tensorrt()
    reference = _load("pytorch", cache_dir, device="cuda").analyse(study)
    first = _load("tensorrt", cache_dir, device="cuda", precision="fp16")
    assert isinstance(first.engine, TensorRTEngine)
    assert first.engine.path.is_file()
    _assert_parity(reference, first.analyse(study), FP16_TOL)
    second = _load("tensorrt", cache_dir, device="cuda", precision="fp16")
    assert isinstance(second.engine, TensorRTEngine)
    assert not second.engine.built  # loaded from the cache, not rebuilt
    assert second.engine.path == first.engine.path
    # a batch of the profile's maximum runs
    x = torch.zeros(MAX_BATCH, 1, 128, 128, device="cuda")
    assert second.engine.run(x).features.shape[0] == MAX_BATCH


def test_tensorrt_rebuilds_for_another_model(cache_dir: Path, tmp_path: Path) -> None:
    _need_tensorrt()
    manifest = load_manifest(default_model_dir())
    model = load_model(manifest).cuda()
    options = EngineOptions(engine="tensorrt", precision="fp16", cache_dir=cache_dir)
    engine = create_engine(model, manifest, "cuda", options)
    assert isinstance(engine, TensorRTEngine)
    with torch.no_grad():
        model.to_mu.bias.add_(1.0)  # other weights -> other ONNX hash -> other key
    other_manifest = manifest.model_copy(update={"weights_sha256": "f" * 64})
    other_manifest._directory = manifest.directory
    other = create_engine(model, other_manifest, "cuda", options)
    assert isinstance(other, TensorRTEngine)
    assert other.built and other.path != engine.path


def test_tensorrt_int8_with_calibration(cache_dir: Path, study: list[Dataset]) -> None:
    _need_tensorrt()
    reference = _load("pytorch", cache_dir, device="cuda").analyse(study)
    analyser = _load("tensorrt", cache_dir, device="cuda", precision="int8")
    assert isinstance(analyser.engine, TensorRTEngine)
    assert analyser.engine.key.calibration_sha256
    assert analyser.engine.path.with_suffix(".calib").is_file()
    result = analyser.analyse(study)
    assert result.predicted_label == reference.predicted_label
    for x, y in zip(reference.images, result.images, strict=True):
        for label in x.probabilities:
            assert abs(x.probabilities[label] - y.probabilities[label]) <= 0.1


def test_each_heatmap_maps_the_most_probable_finding_against_the_reference_label(
    cache_dir: Path, study: list[Dataset], tmp_path: Path
) -> None:
    """infer's heatmaps are, per image, the CAM of its most probable finding minus the CAM of
    the reference label (``normal``), resized to its own size and divided by the maximum."""
    from acwi_node.inference.preprocess import preprocess

    labels = load_manifest(default_model_dir()).labels

    def labels_of(probs: np.ndarray) -> list[str]:
        return [labels[int(np.argmax(p))] for p in probs]

    analyser = _load("pytorch", cache_dir)
    spec = analyser.manifest.preprocess_spec()
    normals = [
        pydicom.dcmread(p) for p in write_study(tmp_path, n_images=2, label="normal", seed=8)
    ]
    images = [*study, *normals]  # nodules, effusions, normals (mapped by their top finding)
    x = torch.from_numpy(np.stack([preprocess(ds, spec) for ds in images]))
    sizes = [(256, 256), (300, 200), (256, 256), (64, 96), (256, 256), (256, 256), (40, 50)]
    result = analyser.infer(x, list(range(len(images))), sizes)
    assert labels_of(result.mc.probabilities[-2:]) == ["normal", "normal"]
    assert result.heatmaps is not None
    findings = [labels.index(name) for name in analyser.manifest.finding_labels]
    normal = labels.index("normal")
    with torch.inference_mode():
        cams = analyser.model.cam(analyser.engine.run(x).features)
    shown = set()
    for i, (probs, got) in enumerate(zip(result.mc.probabilities, result.heatmaps, strict=True)):
        k = max(findings, key=lambda j: float(probs[j]))
        shown.add(k)
        want = reference_heatmap(cams[i, k] - cams[i, normal], sizes[i])
        assert got.shape == sizes[i]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert len(shown) == 2  # both findings are mapped somewhere in this batch


def test_jetson_preset_is_a_valid_configuration() -> None:
    from acwi_node.config import load_settings

    preset = Path(__file__).resolve().parents[2] / "deploy" / "acwi-node.jetson.toml"
    worker = load_settings(preset).worker
    assert (worker.device, worker.engine, worker.precision) == ("cuda", "tensorrt", "fp16")
    assert worker.trt_workspace_mb == 512 and worker.heatmaps == "positive_or_uncertain"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_worker_writes_heatmaps_only_for_selected_images(tmp_path: Path, device: str) -> None:
    """run_job with heatmaps = "positive_or_uncertain": one heatmap object per selected image;
    on a GPU too, where the worker's predictions equal the CPU analyser's (the same masks)."""
    if device == "cuda":
        _need_cuda()
    import json
    import shutil

    from acwi_node.config import load_settings
    from acwi_node.ingest.spool import Spool
    from acwi_node.ledger import Ledger, RoutedJob
    from acwi_node.tasks.analyse import run_job
    from tests.support.study_flow import spool_and_record

    model_dir = tmp_path / "model"
    shutil.copytree(default_model_dir(), model_dir)
    raw = json.loads((model_dir / "manifest.json").read_text())
    raw["uncertainty_threshold"] = 1.0  # nothing is "uncertain": only positives get heatmaps
    raw["ood"]["threshold"] = 1e9
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        worker={
            "engine": "pytorch",
            "device": device,
            "mc_samples": 4,
            "heatmaps": "positive_or_uncertain",
        },
        models=[{"name": "m", "manifest": model_dir / "manifest.json"}],
    )
    ledger = Ledger(settings.database_url)
    spool = Spool(settings.spool_dir, fsync=False)
    written: dict[str, tuple[int, int]] = {}
    try:
        for label, seed in (("normal", 11), ("nodule", 12)):
            files = write_study(tmp_path / label, n_images=2, label=label, seed=seed, size=128)
            study_id = generation = 0
            study_uid = ""
            for n, path in enumerate(files):
                data = path.read_bytes()
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                study_uid = str(ds.StudyInstanceUID)
                rec = spool_and_record(
                    spool, ledger, data, ds, calling_ae="SITEA", first_in_association=n == 0
                )
                study_id, generation = rec.study_id, rec.generation
            ledger.association_released([study_id])
            (job,) = ledger.complete_study(
                study_id, generation, lambda _facts: [RoutedJob("r", "m", [], 0)]
            )
            assert run_job(settings, ledger, job) == "analysed"
            objects = [pydicom.dcmread(p) for p in (settings.results_dir / study_uid).glob("*.dcm")]
            heatmaps = sum(1 for ds in objects if ds.Modality != "SR")
            # the same model, samples and seeds as the worker: the same per-image predictions
            same = Analyser.load(model_dir, mc_samples=4, num_threads=2)
            images = same.analyse([pydicom.dcmread(p) for p in files]).images
            positives = sum(
                max(im.probabilities, key=im.probabilities.__getitem__) != "normal" for im in images
            )
            written[label] = (heatmaps, positives)
    finally:
        ledger.dispose()
    # the policy is exercised both ways: images skipped and images written
    assert written["normal"][0] < 2 and written["nodule"][0] > 0
    for heatmaps, positives in written.values():
        assert heatmaps == positives


def test_models_engines_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``acwi-node models engines``: the table, the reasons, the worker's pick, the exit code."""
    import json

    from acwi_node.cli import main
    from tests.support.node import write_config

    data = str(tmp_path / "data")
    cpu = write_config(tmp_path / "cpu.toml", {"node": {"data_dir": data}})
    assert main(["--config", str(cpu), "models", "engines"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("device cpu: cpu, ")
    assert "pytorch      yes   -     yes   -" in out  # fp32, bf16 on the CPU; fp16, int8 not
    assert "precision fp16 needs a CUDA device" in out
    expected = choose_engine("auto", CPU, "fp32")
    assert out.splitlines()[-1] == f"worker settings (engine auto, precision fp32): {expected}"

    assert main(["--config", str(cpu), "models", "engines", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"] == expected and report["problem"] is None
    assert report["engines"]["pytorch"]["fp32"] is None
    assert "int8" in report["engines"]["pytorch"]["int8"]

    gpu = write_config(
        tmp_path / "gpu.toml",
        {"node": {"data_dir": data}, "worker": {"device": "cuda", "engine": "pytorch"}},
    )
    code = main(["--config", str(gpu), "models", "engines"])
    last = capsys.readouterr().out.splitlines()[-1]
    if torch.cuda.is_available():
        assert code == 0
        assert last == "worker settings (engine pytorch, precision fp32): pytorch with CUDA graphs"
    else:  # the worker could not run: say why, exit 1
        assert code == 1
        assert "cannot run" in last and "needs a CUDA GPU" in last
