"""ONNX export without a model run: the opset a file really has, the engine cache's file names
and the all-or-nothing rename of an export's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import acwi_node.inference.engines.onnx_export as onnx_export
from acwi_node.inference.engines.onnx_export import (
    DEFAULT_OPSET,
    OnnxFile,
    cached_onnx,
    write_onnx,
)
from acwi_node.inference.manifest import (
    ManifestError,
    ModelManifest,
    default_model_dir,
    load_manifest,
)

pytest.importorskip("onnxscript", reason="the ONNX exporter is not installed")


class _Pool(nn.Module):
    """A mean over the spatial axes: ReduceMean, whose axes input opset 17 cannot take."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def test_write_onnx_returns_the_opset_the_file_imports(tmp_path: Path) -> None:
    from acwi_node.inference.engines.onnx_export import onnx_opset

    example = torch.zeros(2, 1, 8, 8)
    path = tmp_path / "pool.onnx"
    written = write_onnx(_Pool(), example, path, input_names=["x"], output_names=["y"], opset=17)
    assert written == onnx_opset(path) == 18  # asked for 17; the exporter kept its own 18
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _renamed(name: str) -> ModelManifest:
    manifest = load_manifest(default_model_dir())
    return manifest.model_copy(update={"name": name})  # no validation: any name gets here


def test_cache_file_names_stay_inside_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest name such as ``../../../escaped`` cannot put the cached export elsewhere."""
    written: list[Path] = []

    def fake_export(model: object, path: Path, *, input_size: int) -> OnnxFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
        written.append(path)
        return OnnxFile(path=path, sha256="0" * 64, opset=DEFAULT_OPSET)

    monkeypatch.setattr(onnx_export, "export_backbone", fake_export)
    cache = tmp_path / "data" / "engines"
    for name in ("../../../escaped", "/etc/passwd", "..", "a/../../b", ".hidden", "-rf"):
        manifest = _renamed(name)
        result = cached_onnx(manifest, None, cache)  # type: ignore[arg-type]
        assert result.path.resolve().parent == (cache / "onnx").resolve(), name
        assert not result.path.name.startswith((".", "-")), name
    assert {p.parent for p in written} == {cache / "onnx"}
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 6 and files == sorted(p.name for p in written)


def test_cache_file_name_keeps_a_plain_name_as_before() -> None:
    """``<name>-<hash 16>-opset18.onnx`` as before for ordinary names: existing caches are
    used again."""
    from acwi_node.inference.engines.onnx_export import cache_file_name

    manifest = load_manifest(default_model_dir())
    name = cache_file_name(manifest)
    assert name == f"{manifest.name}-{manifest.weights_sha256[:16]}-opset{DEFAULT_OPSET}.onnx"
    assert cache_file_name(_renamed("../../../escaped")).startswith("escaped-")


def test_cache_refuses_a_link_out_of_the_cache(tmp_path: Path) -> None:
    manifest = load_manifest(default_model_dir())
    folder = tmp_path / "engines" / "onnx"
    folder.mkdir(parents=True)
    name = f"{manifest.name}-{manifest.weights_sha256[:16]}-opset{DEFAULT_OPSET}.onnx"
    (folder / name).symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(ManifestError, match="does not lie in"):
        cached_onnx(manifest, None, tmp_path / "engines")  # type: ignore[arg-type]


def test_staged_files_are_renamed_all_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename that fails half-way through the commit puts the files already renamed back."""
    from models.export import _Staging

    finals = [tmp_path / n for n in ("backbone.onnx", "model.onnx", "manifest.json")]
    for final in finals[:2]:
        final.write_text(f"old {final.name}")
    staging = _Staging()
    for final in finals:
        staging.path(final).write_text(f"new {final.name}")
    real_replace = os.replace
    calls: list[str] = []

    def failing_replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        staging.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    staging.discard()
    assert [p.read_text() for p in finals[:2]] == ["old backbone.onnx", "old model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.onnx", "model.onnx"]

    staging = _Staging()
    for final in finals:
        staging.path(final).write_text(f"new {final.name}")
    staging.commit()
    assert [p.read_text() for p in finals] == [f"new {p.name}" for p in finals]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in finals)
