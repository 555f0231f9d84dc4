"""The model registry: installed model versions under ``<data_dir>/models`` and which one is active.

Layout::

    <data_dir>/models/<name>/<version>/manifest.json   the manifest, as installed
    <data_dir>/models/<name>/<version>/<weights>       its weights (SHA-256 checked on install)
    <data_dir>/models/<name>/<version>/<onnx files>    the exported backbone and full model, if any
    <data_dir>/models/<name>/ACTIVE                    the active version's name (one line)

``acwi-node models install`` copies a model folder (or the folder of a manifest file) into the
registry after checking the weights' SHA-256 against the manifest, and refuses a mismatch; an
installed version is never overwritten by different weights. ``acwi-node models activate NAME
VERSION`` writes ``ACTIVE`` atomically. :meth:`acwi_node.config.Settings.model_manifest` prefers
the active version, so routes using model ``NAME`` run it from the worker's next task on.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from acwi_node.inference.manifest import ModelManifest

# The manifest module imports PyTorch (seconds); reading which version is active must not, since
# the configuration check and ``acwi-node health`` do it. It is imported where manifests are read.
MANIFEST_NAME = "manifest.json"
ACTIVE_FILE = "ACTIVE"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(ValueError):
    """An install or activation was refused; the message says why."""


@dataclass(frozen=True)
class InstalledModel:
    """One installed model version."""

    name: str
    version: str
    weights_sha256: str
    active: bool
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME


def _check_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.match(value) or value in {".", ".."}:
        raise RegistryError(
            f"model {kind} {value!r} cannot name a folder: use letters, digits, '.', '_' and '-'"
            " (at most 64, starting with a letter or digit)"
        )
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelRegistry:
    """Install, list and activate model versions in one registry folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- reading
    def active_version(self, name: str) -> str | None:
        """The active version of ``name``, or None when none was activated."""
        try:
            text = (self.root / name / ACTIVE_FILE).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text or None

    def active_manifest(self, name: str) -> Path | None:
        """The manifest of the active version of ``name`` (None when there is none)."""
        if not _SAFE_NAME.match(name):
            return None
        version = self.active_version(name)
        if version is None:
            return None
        return (self.root / name / version / MANIFEST_NAME).resolve()

    def activated(self) -> list[str]:
        """Names of models that have an active version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and (p / ACTIVE_FILE).is_file() and self.active_version(p.name)
        )

    def installed(self) -> list[InstalledModel]:
        """Every installed version, by name then version."""
        from acwi_node.inference.manifest import ModelManifest

        out: list[InstalledModel] = []
        if not self.root.is_dir():
            return out
        for name_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if name_dir.name.startswith("."):
                continue
            active = self.active_version(name_dir.name)
            for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
                if version_dir.name.startswith("."):
                    continue
                manifest_file = version_dir / MANIFEST_NAME
                if not manifest_file.is_file():
                    continue
                manifest = ModelManifest.model_validate_json(manifest_file.read_bytes())
                out.append(
                    InstalledModel(
                        name=name_dir.name,
                        version=version_dir.name,
                        weights_sha256=manifest.weights_sha256,
                        active=version_dir.name == active,
                        path=version_dir,
                    )
                )
        return out

    # ----------------------------------------------------------------- writing
    def install(
        self, source: Path, *, name: str | None = None, activate: bool = False
    ) -> InstalledModel:
        """Copy a model (its folder, or its manifest file) into the registry.

        ``name`` is the model name routes use (``[[routes]] model``); by default the manifest's
        own name. The manifest is copied unchanged, so results still name the model as it does.

        The weights' SHA-256 (and the ONNX file's, when the manifest names one) must match the
        manifest, in the source and again in the copy; otherwise nothing is installed. Installing
        a version again with the same weights is a no-op; with different weights it is refused.
        """
        from acwi_node.inference.manifest import ManifestError, load_manifest, sha256_file

        source = Path(source).expanduser()
        try:
            manifest = load_manifest(source)  # validates, and checks the weights' SHA-256
        except ManifestError as exc:
            raise RegistryError(f"refused to install {source}: {exc}") from None
        name = _check_name("name", name or manifest.name)
        version = _check_name("version", manifest.version)
        files = [manifest.weights]
        for record in (manifest.onnx, manifest.full_onnx):
            if record is None:
                continue
            onnx_path = manifest.directory / record.file
            if not onnx_path.is_file():
                raise RegistryError(
                    f"refused to install {source}: ONNX file {onnx_path} named by the manifest"
                    " does not exist"
                )
            if sha256_file(onnx_path) != record.sha256:
                raise RegistryError(
                    f"refused to install {source}: ONNX file {onnx_path} does not match the"
                    " SHA-256 in the manifest"
                )
            files.append(record.file)
        target = self.root / name / version
        if target.exists():
            existing = load_manifest(target)
            if existing.weights_sha256 != manifest.weights_sha256:
                raise RegistryError(
                    f"refused to install {source}: {name} {version} is already installed with"
                    f" other weights (SHA-256 {existing.weights_sha256[:16]}...); give the new"
                    " weights a new version"
                )
        else:
            self._copy_in(manifest, files, target)
        if activate:
            return self.activate(name, version)
        return self._entry(name, version)

    def _copy_in(self, manifest: ModelManifest, files: list[str], target: Path) -> None:
        from acwi_node.inference.manifest import ManifestError, load_manifest

        staging = target.parent / f".install-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            for rel in files:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(manifest.directory / rel, dest)
            (staging / MANIFEST_NAME).write_text(
                manifest.model_dump_json(indent=2) + "\n", encoding="utf-8"
            )
            try:
                load_manifest(staging)  # the copy itself must verify
            except ManifestError as exc:
                raise RegistryError(f"the installed copy does not verify: {exc}") from None
            for path in staging.rglob("*"):
                if path.is_file():
                    with path.open("rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(staging, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def activate(self, name: str, version: str) -> InstalledModel:
        """Make ``version`` the one routes using model ``name`` run (atomic)."""
        from acwi_node.inference.manifest import ManifestError, load_manifest

        _check_name("name", name)
        _check_name("version", version)
        folder = self.root / name / version
        if not (folder / MANIFEST_NAME).is_file():
            installed = [m.version for m in self.installed() if m.name == name]
            hint = f"installed: {', '.join(installed)}" if installed else "none is installed"
            raise RegistryError(f"model {name} version {version} is not installed ({hint})")
        try:
            load_manifest(folder)
        except ManifestError as exc:
            raise RegistryError(f"refused to activate {name} {version}: {exc}") from None
        tmp = self.root / name / f".{ACTIVE_FILE}.{uuid.uuid4().hex}"
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / name / ACTIVE_FILE)
        _fsync_dir(self.root / name)
        return self._entry(name, version)

    def _entry(self, name: str, version: str) -> InstalledModel:
        for model in self.installed():
            if model.name == name and model.version == version:
                return model
        raise RegistryError(f"model {name} version {version} is not installed")
