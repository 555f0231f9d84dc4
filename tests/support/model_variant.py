"""Variants of the bundled model for tests: the same weights under another manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from acwi_node.inference.manifest import default_model_dir


def model_variant(target: Path, *, ood_threshold: float | None = None, **manifest: Any) -> Path:
    """A copy of the bundled model in ``target`` whose manifest takes ``manifest``'s keys
    (``version``, ``uncertainty_threshold``, ...) and ``ood_threshold`` as ``ood.threshold``;
    returns the manifest's path."""
    shutil.copytree(default_model_dir(), target)
    path = target / "manifest.json"
    content = json.loads(path.read_text())
    content.update(manifest)
    if ood_threshold is not None:
        content["ood"]["threshold"] = ood_threshold
    path.write_text(json.dumps(content))
    return path
