"""The weights each model version stands for: one manifest name and version, one set of weights.

Results' UIDs (:func:`acwi_node.results.uids.result_uids`), recalls, monitoring, shadow
comparisons, the SR's algorithm identification and the feedback export know a model by its
manifest's name and version alone. The model registry refuses to install a version again with
other weights, but a ``[[models]]`` entry names any folder: two folders (or one whose weights
and manifest were replaced) going by the same name and version with other weights would write
results of different weights under the same UIDs.

So the ledger keeps, for each name and version, the SHA-256 of the weights a worker first
loaded under them (table ``model_versions``), and every later load compares its own
(:meth:`ModelVersions.claim`): other weights are refused (:class:`ModelVersionConflict`), with
both manifests and both digests in the message, whichever way the model came (the registry, a
``[[models]]`` path, the bundled model). The digest is the manifest's ``weights_sha256``, which
:func:`~acwi_node.inference.manifest.load_manifest` has already checked against the file: no
weights are hashed again. A ledger made by an earlier version has no row for a model yet: its
first load records one (nothing is refused on upgrade but two sets of weights under one
version, of which the first loaded is kept). A moving version (``latest``: not
:func:`~acwi_node.model_registry.is_fixed_version`) is not recorded: new models cannot have
one, and an existing one keeps loading, new weights too, with the warning that asks for it to
be renumbered (:mod:`acwi_node.inference.manifest`), as before.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from acwi_node.ledger.models import ModelVersion
from acwi_node.ledger.repository import Ledger
from acwi_node.model_registry import is_fixed_version

__all__ = ["ModelVersionConflict", "ModelVersions", "RecordedVersion"]


class ModelVersionConflict(RuntimeError):
    """A model's name and version stand for other weights in the ledger; the message says
    which, where each came from, and what to do."""


@dataclass(frozen=True)
class RecordedVersion:
    """The weights a model version stands for, as the ledger recorded them."""

    model: str
    version: str
    weights_sha256: str
    manifest_path: str
    first_loaded_at: dt.datetime


def conflict_message(
    model: str, version: str, weights_sha256: str, manifest_path: str, recorded: RecordedVersion
) -> str:
    """Why loading ``manifest_path`` (``weights_sha256``) under ``model`` ``version`` is
    refused, in one line with the way out."""
    first = recorded.manifest_path or "a manifest not recorded"
    return (
        f"model {model} {version} from {manifest_path} (weights SHA-256 {weights_sha256}) is"
        f" refused: {model} {version} already stands for other weights (SHA-256"
        f" {recorded.weights_sha256}, first loaded {recorded.first_loaded_at:%Y-%m-%d %H:%M} UTC"
        f" from {first}); results' UIDs, recalls, monitoring and the feedback export know a"
        " model by its name and version alone. Give these weights a new version in their"
        ' manifest\'s "version" (or install them with `acwi-node models install` under one),'
        " or put back the weights the version stands for"
    )


class ModelVersions:
    """The ledger's record of which weights each model name and version stands for."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def recorded(self, model: str, version: str) -> RecordedVersion | None:
        """The weights ``model`` ``version`` stands for, or None before its first load."""
        with self.ledger.session() as s:
            row = s.scalar(
                select(ModelVersion).where(
                    ModelVersion.model == model, ModelVersion.version == version
                )
            )
            return _recorded(row) if row is not None else None

    def claim(
        self, model: str, version: str, weights_sha256: str, manifest_path: Path | str
    ) -> RecordedVersion | None:
        """Record that ``model`` ``version`` stands for ``weights_sha256`` (loaded from
        ``manifest_path``) if nothing is recorded for them yet, and return the record; None,
        nothing recorded or refused, for a moving version (:func:`is_fixed_version`).

        Raises :class:`ModelVersionConflict` when they already stand for other weights.
        Workers loading one model at once agree: the first insert wins, the others read it.
        """
        if not is_fixed_version(version):
            return None
        values = {
            "model": model,
            "version": version,
            "weights_sha256": weights_sha256,
            "manifest_path": str(manifest_path),
        }
        dialect = self.ledger.engine.dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = (
            insert(ModelVersion)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["model", "version"])
        )
        with self.ledger.session() as s:
            s.execute(statement)
            row = s.scalars(
                select(ModelVersion).where(
                    ModelVersion.model == model, ModelVersion.version == version
                )
            ).one()
            recorded = _recorded(row)
        if recorded.weights_sha256 != weights_sha256:
            raise ModelVersionConflict(
                conflict_message(model, version, weights_sha256, str(manifest_path), recorded)
            )
        return recorded


def _recorded(row: ModelVersion) -> RecordedVersion:
    return RecordedVersion(
        model=row.model,
        version=row.version,
        weights_sha256=row.weights_sha256,
        manifest_path=row.manifest_path,
        first_loaded_at=row.first_loaded_at,
    )
