"""Read and write model folders of every architecture (``dianet`` and ``amrinet``).

The node's manifest schema (:class:`acwi_node.inference.manifest.ModelManifest`) names the
architecture it runs, ``dianet``. Models of other architectures (``amrinet``) are written with
the same schema and their own ``architecture`` name; :func:`read_manifest` validates them
against the schema and returns the name beside it, so the trainer (``--init-from``) and
``acwi-models evaluate`` handle them. The node itself refuses a manifest whose architecture it
does not run, with a clear validation error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch

from acwi_node.inference.analyser import Analyser
from acwi_node.inference.engines import PyTorchEngine
from acwi_node.inference.manifest import (
    EXISTING,
    MANIFEST_NAME,
    ManifestError,
    ModelManifest,
    load_manifest,
    sha256_file,
    warn_moving_version,
    write_manifest,
)
from models.networks import ARCHITECTURES, Network, build
from models.networks.dianet import DIANet

NODE_ARCHITECTURE = "dianet"


def read_manifest(path: Path) -> tuple[ModelManifest, str]:
    """A validated manifest (file or folder, weights hash checked) and its architecture name.

    The model exists (``--init-from``, ``acwi-models evaluate``): a version that is not fixed
    is read, with the node's warning; what training and export write is held to the rule."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"model manifest not found: {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"model manifest {path} is unreadable: {exc}") from exc
    architecture = str(raw.get("architecture", NODE_ARCHITECTURE))
    if architecture == NODE_ARCHITECTURE:
        return load_manifest(path, existing=True), architecture
    if architecture not in ARCHITECTURES:
        raise ManifestError(f"{path}: unknown architecture {architecture!r}")
    manifest = ModelManifest.model_validate(
        {**raw, "architecture": NODE_ARCHITECTURE}, context=EXISTING
    )
    manifest._directory = path.resolve().parent
    actual = sha256_file(manifest.weights_path)
    if actual != manifest.weights_sha256:
        raise ManifestError(f"weights file {manifest.weights_path} does not match {path}")
    warn_moving_version(path, manifest)
    return manifest, architecture


def write_model_manifest(manifest: ModelManifest, architecture: str, directory: Path) -> Path:
    """Write ``manifest.json`` with ``architecture`` as its architecture name."""
    path = write_manifest(manifest, directory)
    if architecture != NODE_ARCHITECTURE:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["architecture"] = architecture
        path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return path


def load_network(path: Path) -> tuple[Network, ModelManifest, str]:
    """The trained network of a model folder (evaluation mode), its manifest and architecture."""
    manifest, architecture = read_manifest(path)
    model = build(architecture, manifest.architecture_config)
    state = torch.load(manifest.weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), manifest, architecture


def load_analyser(path: Path, *, mc_samples: int = 20, threads: int | None = None) -> Analyser:
    """The node's analyser for a model of any architecture.

    ``dianet`` models load exactly as the node loads them (:meth:`Analyser.load`); others run
    their backbone on the PyTorch engine with the analyser's own head sampling, uncertainty,
    OOD and CAM code (they share DIANet's interface).
    """
    manifest, architecture = read_manifest(path)
    if architecture == NODE_ARCHITECTURE:
        return Analyser.load(manifest.directory, mc_samples=mc_samples, num_threads=threads)
    if threads is not None:
        torch.set_num_threads(threads)
    model, manifest, _ = load_network(path)
    as_dianet = cast(DIANet, model)  # same interface: encode/head/cam and the head modules
    return Analyser(
        as_dianet, manifest, mc_samples=mc_samples, engine=PyTorchEngine(as_dianet, "cpu")
    )
