"""Keys of cached TensorRT engines (no TensorRT needed to compute or test them).

A serialized engine is valid only for the GPU model, compute capability and TensorRT version
that built it, and for the exact ONNX file and build options. All of them go into the key; the
key is part of the file name, so any change makes the node build (and cache) a new engine.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized TensorRT engine depends on."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    onnx_sha256: str
    precision: str
    max_batch: int
    dla_core: int | None = None
    #: Hash of the INT8 calibration images ("" unless precision is int8).
    calibration_sha256: str = ""

    def digest(self) -> str:
        """Hex SHA-256 of the key's canonical JSON."""
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def file_name(self, model_name: str) -> str:
        """``<model>-<precision>-sm<cc>-<digest[:20]>.engine`` (safe characters only)."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:64] or "model"
        cc = f"{self.compute_capability[0]}{self.compute_capability[1]}"
        return f"{safe}-{self.precision}-sm{cc}-{self.digest()[:20]}.engine"

    def path(self, cache_dir: Path, model_name: str) -> Path:
        """Where the engine for this key lives in ``cache_dir``."""
        return Path(cache_dir) / "tensorrt" / self.file_name(model_name)

    def to_json(self) -> str:
        """The key as JSON (written next to the engine for people and audits)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)
