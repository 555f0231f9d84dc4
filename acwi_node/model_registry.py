"""The model registry: installed model versions under ``<data_dir>/models`` and which one is active.

Layout::

    <data_dir>/models/<name>/<version>/manifest.json   the manifest, as installed
    <data_dir>/models/<name>/<version>/<weights>       its weights (SHA-256 checked on install)
    <data_dir>/models/<name>/<version>/<onnx files>    the exported backbone and full model, if any
    <data_dir>/models/<name>/ACTIVE                    the active version's name (one line)

``acwi-node models install`` copies a model folder (or the folder of a manifest file) into the
registry after checking the weights' SHA-256 against the manifest, and refuses a mismatch;
before the copy the model must run as the worker runs it (:func:`trial_run`). An installed
version is never overwritten: installing it again with another manifest (other weights, labels,
thresholds) is refused, and so is a model whose manifest takes the name and version of another
(the bundled model's, or one installed under another registry name), since results,
monitoring and recalls know a model by them; given the ledger's record of the weights each
version stands for (``versions``: ``acwi-node models`` does), so are installing and activating
a version the workers loaded before with other weights (from a ``[[models]]`` path).
``acwi-node models activate NAME VERSION`` writes ``ACTIVE`` atomically.
:meth:`acwi_node.config.Settings.model_manifest` prefers the active version, so routes using
model ``NAME`` run it from the worker's next task on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from acwi_node.inference.manifest import ModelManifest
    from acwi_node.ledger.model_versions import ModelVersions

# The manifest module imports PyTorch (seconds); reading which version is active must not, since
# the configuration check and ``acwi-node health`` do it. It is imported where manifests are read.
MANIFEST_NAME = "manifest.json"
ACTIVE_FILE = "ACTIVE"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: What :func:`is_safe_name` takes, in words (error messages).
SAFE_NAME_RULE = (
    "use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)"
)


def is_safe_name(value: str) -> bool:
    """Whether ``value`` can name a folder or a file on its own (a model's name or version):
    no path separator, no ``..``, nothing hidden."""
    return bool(_SAFE_NAME.fullmatch(value))


#: Words that name whichever weights are newest rather than one set of them (``1.0-SNAPSHOT``).
_MOVING_WORDS = frozenset({"latest", "current", "newest", "snapshot", "nightly"})
#: What :func:`is_fixed_version` takes, in words (error messages).
FIXED_VERSION_RULE = (
    "a version names one set of weights for good (results' UIDs, recalls, monitoring and the"
    " heatmaps' and HL7 messages' algorithm version know a model by its name and version):"
    " give it a number or a date (1.2.0, 2.0.0-rc1, 2026.03.01), not a moving name such as"
    " 'latest' or 'current'"
)


def is_fixed_version(value: str) -> bool:
    """Whether ``value`` can be a model's version: it holds a digit (a number or a date) and
    no word of a moving alias (``latest``, ``current``, ``newest``, ``snapshot``,
    ``nightly``, between ``.``, ``_`` or ``-``). A version without a digit (``latest``,
    ``stable``) says nothing an auditor can trace, and ``ACTIVE`` would take the place of the
    registry's own ``ACTIVE`` file."""
    words = re.split(r"[._-]", value.lower())
    return any(c.isdigit() for c in value) and not _MOVING_WORDS.intersection(words)


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
    #: Why this version of the node refuses to load it ("" when it loads): a model an earlier
    #: version installed before a check it fails was added (a name such as ``../x``).
    refused: str = ""
    #: What to know of a version that loads all the same ("" when there is nothing): one an
    #: earlier version installed under a moving version such as ``latest``, with how to
    #: install it again under a fixed one
    #: (:func:`~acwi_node.inference.manifest.moving_version_warning`).
    warning: str = ""

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME


def _check_name(kind: str, value: str) -> str:
    if not is_safe_name(value):
        raise RegistryError(f"model {kind} {value!r} cannot name a folder: {SAFE_NAME_RULE}")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrialRunError(RuntimeError):
    """The model does not run as the worker would run it; the message says where (one line)."""


#: The longest exception message a refusal quotes.
_REASON_CHARS = 300


def _brief(exc: BaseException) -> str:
    """An exception on one line: its type and its message's first :data:`_REASON_CHARS`
    characters (a state dict's size mismatches fill many lines)."""
    message = " ".join(str(exc).split())
    if len(message) > _REASON_CHARS:
        message = message[: _REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def trial_run(source: Path) -> None:
    """Load the model at ``source`` as the worker does and run its warm-up analysis (a
    synthetic image at the manifest's input size, alone and in a batch of two) on the CPU:
    on PyTorch, and through the backbone ONNX file the manifest records on ONNX Runtime, whose
    outputs must match PyTorch's as ``acwi-models export`` required; the full-model ONNX file,
    when recorded, must pass the export's parity check. The ONNX files are checked when ONNX
    Runtime is installed (without it the worker cannot run them either).

    Raises :class:`TrialRunError` naming the step that failed.
    """
    import tempfile

    quiet = logging.getLogger("acwi_node.engines")  # "inference engine: ...": the worker's news
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        with tempfile.TemporaryDirectory(prefix="acwi-install-") as cache_dir:
            _trial_runs(Path(source), Path(cache_dir))
    finally:
        quiet.setLevel(level)


def _trial_runs(source: Path, cache_dir: Path) -> None:
    from acwi_node.inference.analyser import Analyser
    from acwi_node.inference.engines import EngineOptions, cached_onnx
    from acwi_node.inference.engines.ort import ort_providers
    from models.export import CHECK_TOLERANCE, check_full_onnx, check_onnx, parity_inputs

    def load(engine: str) -> Analyser:  # as the worker's get_analyser does, on the CPU
        return Analyser.load(
            source,
            device="cpu",
            mc_samples=2,
            batch_size=2,
            engine=EngineOptions(engine=engine, cache_dir=cache_dir, cuda_graphs=False),
        )

    try:
        analyser = load("pytorch")
    except Exception as exc:
        raise TrialRunError(
            f"the worker could not load the model (network, weights): {_brief(exc)}"
        ) from None
    manifest, model = analyser.manifest, analyser.model
    size = manifest.input.size
    try:
        analyser.warm_up()
    except Exception as exc:
        raise TrialRunError(
            f"a trial analysis on PyTorch (input {size} x {size}) failed: {_brief(exc)}"
        ) from None
    if not ort_providers():
        return
    if manifest.onnx is not None:
        try:
            load("onnxruntime").warm_up()
        except Exception as exc:
            raise TrialRunError(
                f"a trial analysis through {manifest.onnx.file} on ONNX Runtime (input"
                f" {size} x {size}) failed: {_brief(exc)}"
            ) from None
        try:
            worst = check_onnx(model, cached_onnx(manifest, model, cache_dir), size)
        except Exception as exc:
            raise TrialRunError(
                f"{manifest.onnx.file} does not compute what the weights and manifest do:"
                f" {_brief(exc)}"
            ) from None
        if worst is not None and not worst <= CHECK_TOLERANCE:
            raise TrialRunError(
                f"{manifest.onnx.file} does not compute what the weights and manifest do"
                f" (ONNX Runtime differs from PyTorch by {worst:.2e} > {CHECK_TOLERANCE:.0e}):"
                " was it exported from other weights or another architecture_config?"
            )
    if manifest.full_onnx is not None:
        path = manifest.directory / manifest.full_onnx.file
        try:
            parity = check_full_onnx(model, path, parity_inputs(manifest), manifest.temperature)
        except Exception as exc:
            raise TrialRunError(
                f"a trial run of {manifest.full_onnx.file} on ONNX Runtime (input {size} x"
                f" {size}) failed: {_brief(exc)}"
            ) from None
        if not parity.ok:
            worst_outputs = ", ".join(
                f"{k} {parity.max_abs_diff[k]:.2e} > {parity.tolerances[k]:.0e}"
                for k in parity.failures
            )
            raise TrialRunError(
                f"{manifest.full_onnx.file} does not compute what the weights and manifest"
                f" do (ONNX Runtime differs from PyTorch: {worst_outputs}): was it exported"
                " from other weights, another architecture_config or temperature?"
            )


#: The manifest's records of its exported ONNX files: an export of a model adds them, and it
#: stays the same model.
_EXPORT_RECORDS = frozenset({"onnx", "full_onnx"})


def _refusal(exc: ValueError, manifest_file: Path, content: object) -> str:
    """Why an installed manifest no longer loads, in one line, with the way out where there is
    one (:func:`~acwi_node.inference.manifest.refused_version_advice`)."""
    from pydantic import ValidationError

    from acwi_node.inference.manifest import _problems, refused_version_advice

    reason = _problems(exc) if isinstance(exc, ValidationError) else str(exc)
    return reason + refused_version_advice(manifest_file, content)


def _canonical(manifest: ModelManifest) -> str:
    """The manifest as canonical JSON (what two installs of one version must share)."""
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _differences(a: ModelManifest, b: ModelManifest) -> list[str]:
    """The manifest's top-level keys whose values differ between ``a`` and ``b``."""
    one, two = a.model_dump(mode="json"), b.model_dump(mode="json")
    return sorted(k for k in one.keys() | two.keys() if one.get(k) != two.get(k))


class ModelRegistry:
    """Install, list and activate model versions in one registry folder."""

    def __init__(self, root: Path, *, versions: ModelVersions | None = None) -> None:
        self.root = Path(root)
        #: The ledger's record of the weights each model version stands for
        #: (:mod:`acwi_node.ledger.model_versions`): with it, installing or activating a
        #: version the ledger knows as other weights is refused (the worker would refuse it).
        self.versions = versions

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
        if not is_safe_name(name):
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
        from acwi_node.inference.manifest import (
            EXISTING,
            ModelManifest,
            moving_version_warning,
        )

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
                raw = manifest_file.read_bytes()
                refused = warning = ""
                try:
                    manifest = ModelManifest.model_validate_json(raw, context=EXISTING)
                except ValueError as exc:
                    # installed before a check it fails was added: still listed (activating it,
                    # or a worker loading it, is refused with the reason)
                    content = json.loads(raw)
                    weights_sha256 = str(content.get("weights_sha256", ""))
                    refused = _refusal(exc, manifest_file, content)
                else:
                    weights_sha256 = manifest.weights_sha256
                    warning = moving_version_warning(manifest_file, manifest.version)
                out.append(
                    InstalledModel(
                        name=name_dir.name,
                        version=version_dir.name,
                        weights_sha256=weights_sha256,
                        active=version_dir.name == active,
                        path=version_dir,
                        refused=refused,
                        warning=warning,
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
        manifest, in the source and again in the copy; otherwise nothing is installed. Before
        the copy, the model must also run as the worker runs it (:func:`trial_run`). Installing
        a version again with the same manifest is a no-op; with another manifest (other weights,
        labels, thresholds...) it is refused.
        """
        from acwi_node.inference.manifest import ManifestError, load_manifest, sha256_file

        source = Path(source).expanduser()
        try:
            manifest = load_manifest(source)  # validates, and checks the weights' SHA-256
        except ManifestError as exc:
            raise RegistryError(f"refused to install {source}: {exc}") from None
        name = _check_name("name", name or manifest.name)
        version = _check_name("version", manifest.version)
        self._stands_for_other_weights(manifest, source, "install")
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
            try:
                existing = load_manifest(target, existing=True)
            except ManifestError as exc:
                raise RegistryError(
                    f"refused to install {source}: the installed {name} {version} does not"
                    f" verify: {exc}"
                ) from None
            if existing.weights_sha256 != manifest.weights_sha256:
                raise RegistryError(
                    f"refused to install {source}: {name} {version} is already installed with"
                    f" other weights (SHA-256 {existing.weights_sha256[:16]}...); give the new"
                    " weights a new version"
                )
            if _canonical(existing) != _canonical(manifest):
                raise RegistryError(
                    f"refused to install {source}: {name} {version} is installed with another"
                    f" manifest ({', '.join(_differences(existing, manifest))} differ): give it"
                    " a new version"
                )
        else:
            try:
                trial_run(source)
            except TrialRunError as exc:
                raise RegistryError(f"refused to install {source}: {exc}") from None
            namesake = self._namesake(manifest, target)
            if namesake:
                raise RegistryError(
                    f"refused to install {source}: {manifest.name} {manifest.version} already"
                    f" names another model ({namesake}); results, monitoring and recalls know a"
                    " model by its manifest's name and version: give this one its own"
                    " (acwi-models train takes them from its --config)"
                )
            self._copy_in(manifest, files, target)
        if activate:
            return self.activate(name, version)
        return self._entry(name, version)

    def _stands_for_other_weights(self, manifest: ModelManifest, source: Path, what: str) -> None:
        """Refuse (:class:`RegistryError`) to ``what`` a model whose name and version the
        ledger records as other weights (a ``[[models]]`` path the workers loaded before):
        the worker would refuse it."""
        if self.versions is None:
            return
        from acwi_node.ledger.model_versions import conflict_message

        recorded = self.versions.recorded(manifest.name, manifest.version)
        if recorded is not None and recorded.weights_sha256 != manifest.weights_sha256:
            message = conflict_message(
                manifest.name, manifest.version, manifest.weights_sha256, str(source), recorded
            )
            raise RegistryError(f"refused to {what}: {message}")

    def _namesake(self, manifest: ModelManifest, target: Path) -> str | None:
        """Another model going by ``manifest``'s name and version (the bundled model, or one
        installed under any registry name but ``target``) whose manifest differs: where it is
        and what differs; None if there is none."""
        from acwi_node.inference.manifest import ManifestError, default_model_dir, load_manifest

        others = [("the bundled model", default_model_dir())]
        others += [
            (f"installed as {m.name} {m.version}", m.path)
            for m in self.installed()
            if m.path != target
        ]
        for where, folder in others:
            try:
                raw = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(raw, dict) or (raw.get("name"), raw.get("version")) != (
                manifest.name,
                manifest.version,
            ):
                continue
            try:
                other = load_manifest(folder, existing=True)
            except ManifestError:
                return f"{where}, which does not verify"
            differ = [k for k in _differences(other, manifest) if k not in _EXPORT_RECORDS]
            if differ:
                return f"{where}: {', '.join(differ)} differ"
        return None

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
            # installed: a version an earlier version of the node took that is not fixed is
            # activated, with the warning (installing it again under a fixed one is the fix)
            manifest = load_manifest(folder, existing=True)
        except ManifestError as exc:
            raise RegistryError(f"refused to activate {name} {version}: {exc}") from None
        self._stands_for_other_weights(manifest, folder / MANIFEST_NAME, "activate")
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
