"""What the node runs, model by model: for the Models page and ``GET /api/models``.

For each model name the routes use (``[[models]]``, the model registry, ``default``): the
version running now and where it comes from, what its manifest says (labels, the findings,
thresholds, how it was trained), the routes that run it live or as a shadow, the versions
installed in the registry, and each version's analyses in the ledger (how many, the last one,
how many withdrawn, how many more a recall would take back). Manifests are read for display
only, their weights not hashed: the worker checks them before it runs a version.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError
from sqlalchemy import func, select

from acwi_node.config import Settings
from acwi_node.inference.manifest import (
    EXISTING,
    MANIFEST_NAME,
    ModelManifest,
    moving_version_warning,
    warn_moving_version,
)
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, JobState, job_model_name, job_model_version
from acwi_node.model_registry import ModelRegistry

__all__ = [
    "ModelOverview",
    "VersionOverview",
    "VersionWarning",
    "model_version_known",
    "model_version_warnings",
    "models_overview",
]

#: Jobs whose analysis has not ended: not counted as analyses yet.
_UNFINISHED = (JobState.QUEUED, JobState.ANALYSING)


@dataclass(frozen=True)
class VersionOverview:
    """One version of a model: installed, running, or only found in the ledger."""

    # the fields' docstrings describe them in the OpenAPI document (``GET /api/models``)
    __pydantic_config__ = ConfigDict(use_attribute_docstrings=True)

    name: str
    """The manifest's name (the results' algorithm name; what ``models recall`` takes)."""
    version: str
    """The manifest's version."""
    running: bool = False
    """The version running now for the model name."""
    installed: bool = False
    """Installed in the model registry (``acwi-node models install``)."""
    analyses: int = 0
    """Analyses by this version in the ledger."""
    last_analysed_at: str | None = None
    """The last analysis's time (ISO 8601, UTC); null when there is none."""
    withdrawn: int = 0
    """Analyses whose results were withdrawn from the PACS."""
    recallable: int = 0
    """Analyses a recall would withdraw now (analysed, not withdrawn)."""
    manifest: dict[str, Any] | None = None
    """The manifest (labels, thresholds, training), for the running and the installed
    versions; null where it cannot be read."""
    warning: str = ""
    """What to know of a version that loads all the same ("" when there is nothing): a
    moving version such as ``latest``, which the node no longer accepts for a model made or
    installed, with how to renumber it."""


@dataclass(frozen=True)
class ModelOverview:
    """One model name the routes use."""

    __pydantic_config__ = ConfigDict(use_attribute_docstrings=True)

    model: str
    """The name routes use (``[[routes]] model``, ``[[models]] name``, the registry's)."""
    source: str
    """Where the running version comes from: ``registry``, ``config`` (a ``[[models]]``
    manifest path), ``bundled`` (``default``), or ``missing`` (its manifest is unreadable)."""
    error: str = ""
    """Why the running version's manifest cannot be read ("" when it can)."""
    warning: str = ""
    """The running version's ``warning`` ("" when there is none): it loads and analyses, but
    a moving version such as ``latest`` should be renumbered, and this says how."""
    routes: list[str] = field(default_factory=list)
    """The routes that run it live."""
    shadow_routes: list[str] = field(default_factory=list)
    """The routes that run it as a shadow."""
    versions: list[VersionOverview] = field(default_factory=list)
    """Its versions: the running one first, then the installed ones, then those met in the
    ledger, by their last analysis."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersionWarning:
    """A version of a model name, running or installed, that loads with a warning."""

    model: str
    version: str
    running: bool
    warning: str


def _manifest(path: Path) -> tuple[ModelManifest | None, str, str]:
    """The manifest at ``path`` (a file or its folder), validated as one the node has, weights
    not hashed; why it cannot be read ("" when it can); and its warning ("" when none: a
    version that is not fixed is shown, :func:`moving_version_warning`, and logged once)."""
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = ModelManifest.model_validate(raw, context=EXISTING)
    except FileNotFoundError:
        return None, f"no manifest at {path}", ""
    except (OSError, ValueError, ValidationError) as exc:
        return None, f"the manifest {path} cannot be read: {type(exc).__name__}", ""
    warn_moving_version(path, manifest)
    return manifest, "", moving_version_warning(path, manifest.version)


def _running(settings: Settings, model: str) -> tuple[ModelManifest | None, str, str]:
    """:func:`_manifest` of the version running now for ``model``."""
    try:
        return _manifest(settings.model_manifest(model))
    except (KeyError, ValueError, OSError) as exc:
        return None, f"no manifest: {exc}", ""


def _facts(manifest: ModelManifest) -> dict[str, Any]:
    """What a reader of the page needs of a manifest (not the OOD statistics' matrices)."""
    training = manifest.training
    return {
        "name": manifest.name,
        "version": manifest.version,
        "labels": list(manifest.labels),
        "finding_labels": list(manifest.finding_labels),
        "uncertainty_threshold": manifest.uncertainty_threshold,
        "target_review_rate": manifest.target_review_rate,
        "ood_threshold": manifest.ood.threshold,
        "mc_samples": manifest.mc_samples,
        "weights_sha256": manifest.weights_sha256,
        "created_at": manifest.created_at.isoformat(timespec="seconds"),
        "onnx": manifest.onnx is not None,
        "training": {
            "dataset": training.dataset,
            "preset": training.preset,
            "epochs": training.epochs,
            "train_images": training.train_images,
            "val_images": training.val_images,
            "val_accuracy": training.val_accuracy,
            "val_balanced_accuracy": training.val_balanced_accuracy,
        },
    }


def _model_names(settings: Settings, registry: ModelRegistry) -> list[str]:
    names: dict[str, None] = {}
    for route in settings.routes:
        names[route.model] = None
        for shadow in route.shadow_models:
            names[shadow] = None
    for spec in settings.models:
        names[spec.name] = None
    for installed in registry.installed():
        names[installed.name] = None
    return sorted(names) or ["default"]


def _ledger_versions(ledger: Ledger) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """Per route model name: (manifest name, version) -> analyses, last, withdrawn."""
    name = job_model_name()
    version = job_model_version()
    withdrawn = func.count(Job.withdrawn_at)
    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    with ledger.session() as s:
        rows = s.execute(
            select(Job.model, name, version, func.count(), func.max(Job.analysed_at), withdrawn)
            .where(Job.analysed_at.is_not(None), Job.state.not_in(_UNFINISHED))
            .group_by(Job.model, name, version)
        ).all()
    for model, manifest_name, model_version, n, last, gone in rows:
        out.setdefault(str(model), {})[(str(manifest_name), str(model_version or ""))] = {
            "analyses": int(n),
            "last_analysed_at": last.isoformat(timespec="seconds") + "Z" if last else None,
            "withdrawn": int(gone or 0),
        }
    return out


def models_overview(settings: Settings, ledger: Ledger) -> list[ModelOverview]:
    """Every model name the node knows, with its versions (newest analysis first, the running
    and installed ones first of all)."""
    registry = ModelRegistry(settings.models_dir)
    installed: dict[str, list[Any]] = {}
    for entry in registry.installed():
        installed.setdefault(entry.name, []).append(entry)
    in_ledger = _ledger_versions(ledger)
    out: list[ModelOverview] = []
    for model in _model_names(settings, registry):
        if registry.active_manifest(model) is not None:
            source = "registry"
        elif any(spec.name == model for spec in settings.models):
            source = "config"
        else:
            source = "bundled" if model == "default" else "missing"
        running, error, warning = _running(settings, model)
        if running is None:
            source = "missing"
        versions: dict[tuple[str, str], dict[str, Any]] = {}
        if running is not None:
            versions[(running.name, running.version)] = {
                "running": True,
                "manifest": _facts(running),
                "warning": warning,
            }
        for entry in installed.get(model, []):
            manifest, _, entry_warning = _manifest(entry.manifest_path)
            key = (manifest.name if manifest else model, entry.version)
            known = versions.get(key, {})
            versions.setdefault(key, {}).update(
                installed=True,
                manifest=_facts(manifest) if manifest else known.get("manifest"),
                warning=entry_warning or known.get("warning", ""),
            )
        for key, counts in in_ledger.get(model, {}).items():
            versions.setdefault(key, {}).update(counts)
        out.append(
            ModelOverview(
                model=model,
                source=source,
                error=error,
                warning=warning,
                routes=[r.name for r in settings.routes if r.model == model],
                shadow_routes=[r.name for r in settings.routes if model in r.shadow_models],
                versions=_ordered(
                    VersionOverview(
                        name=key[0],
                        version=key[1],
                        running=bool(facts.get("running")),
                        installed=bool(facts.get("installed")),
                        analyses=int(facts.get("analyses", 0)),
                        last_analysed_at=facts.get("last_analysed_at"),
                        withdrawn=int(facts.get("withdrawn", 0)),
                        recallable=int(facts.get("analyses", 0)) - int(facts.get("withdrawn", 0)),
                        manifest=facts.get("manifest"),
                        warning=str(facts.get("warning", "")),
                    )
                    for key, facts in versions.items()
                ),
            )
        )
    return out


def model_version_warnings(settings: Settings) -> list[VersionWarning]:
    """The versions of the model names the node knows (:func:`models_overview`'s, without the
    ledger) that are running or installed and load with a warning: for ``/metrics``."""
    registry = ModelRegistry(settings.models_dir)
    out: dict[tuple[str, str], VersionWarning] = {}
    for model in _model_names(settings, registry):
        running, _, warning = _running(settings, model)
        if running is not None and warning:
            out[(model, running.version)] = VersionWarning(model, running.version, True, warning)
    for entry in registry.installed():
        if entry.warning and (entry.name, entry.version) not in out:
            out[(entry.name, entry.version)] = VersionWarning(
                entry.name, entry.version, False, entry.warning
            )
    return sorted(out.values(), key=lambda w: (w.model, w.version))


def model_version_known(
    settings: Settings, ledger: Ledger, name: str, version: str | None = None
) -> bool:
    """Whether the node knows model ``name`` (a manifest's name, as a recall or the model
    monitor takes it) ``version`` (None: any version of it): an analysis by it in the ledger,
    finished or not, or the version running or installed (:func:`models_overview`)."""
    query = select(Job.id).where(job_model_name() == name)
    if version is not None:
        query = query.where(job_model_version() == version)
    with ledger.session() as s:
        found = s.scalar(query.limit(1))
    if found is not None:
        return True
    return any(
        v.name == name and version in (None, v.version)
        for model in models_overview(settings, ledger)
        for v in model.versions
    )


def _ordered(versions: Iterable[VersionOverview]) -> list[VersionOverview]:
    return sorted(
        versions,
        key=lambda v: (not v.running, not v.installed, -(_stamp(v.last_analysed_at)), v.version),
    )


def _stamp(value: str | None) -> float:
    if not value:
        return 0.0
    return datetime.fromisoformat(value.rstrip("Z")).timestamp()
