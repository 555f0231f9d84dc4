"""Validation of written objects against their IOD with dicom3tools' ``dciodvfy``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["DciodvfyNotFoundError", "DciodvfyReport", "find_dciodvfy", "run_dciodvfy"]

_DEFAULT_PATH = "/usr/bin/dciodvfy"


class DciodvfyNotFoundError(RuntimeError):
    """dicom3tools' ``dciodvfy`` is not installed."""


@dataclass
class DciodvfyReport:
    """What ``dciodvfy`` said about one file."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The IOD dciodvfy recognised (its first output line), e.g. "SecondaryCaptureImage".
    iod: str = ""
    returncode: int = 0
    output: str = ""

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors


def find_dciodvfy() -> str:
    """Path of the ``dciodvfy`` executable, or raise :class:`DciodvfyNotFoundError`."""
    found = shutil.which("dciodvfy") or (
        _DEFAULT_PATH if os.access(_DEFAULT_PATH, os.X_OK) else None
    )
    if found is None:
        raise DciodvfyNotFoundError(
            "dciodvfy (dicom3tools) was not found on PATH or at /usr/bin/dciodvfy; "
            "install dicom3tools to validate DICOM objects"
        )
    return found


def _parse(output: str) -> tuple[str, list[str], list[str]]:
    iod = ""
    errors: list[str] = []
    warnings: list[str] = []
    current: list[str] | None = None
    for raw in output.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        if line.startswith("Error - "):
            errors.append(line[len("Error - ") :])
            current = errors
        elif line.startswith("Warning - "):
            warnings.append(line[len("Warning - ") :])
            current = warnings
        elif current is not None and raw[:1].isspace():
            current[-1] = f"{current[-1]} {line.strip()}"
        elif not iod and not raw[:1].isspace():  # the IOD's name, before or after warnings
            iod = line.strip()
    return iod, errors, warnings


def _write(dataset: Dataset, path: Path) -> None:
    copy = Dataset(dataset)
    meta = getattr(dataset, "file_meta", None)
    copy.file_meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
    if "TransferSyntaxUID" not in copy.file_meta:
        copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy.save_as(path, enforce_file_format=True)


def run_dciodvfy(
    path_or_dataset: str | os.PathLike[str] | Dataset, *, timeout: float = 120.0
) -> DciodvfyReport:
    """Run ``dciodvfy`` on a DICOM file, or on a dataset written to a temporary file first."""
    executable = find_dciodvfy()
    if isinstance(path_or_dataset, Dataset):
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as folder:
            target = Path(folder) / "object.dcm"
            _write(path_or_dataset, target)
            return _run(executable, target, timeout)
    return _run(executable, Path(path_or_dataset), timeout)


def _run(executable: str, path: Path, timeout: float) -> DciodvfyReport:
    if not path.is_file():
        raise FileNotFoundError(path)
    completed = subprocess.run(
        [executable, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    output = completed.stdout + completed.stderr
    iod, errors, warnings = _parse(output)
    return DciodvfyReport(
        errors=errors,
        warnings=warnings,
        iod=iod,
        returncode=completed.returncode,
        output=output,
    )
