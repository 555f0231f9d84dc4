"""Helpers around dicom3tools' ``dciodvfy`` IOD validator."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_CANDIDATES = ("/usr/bin/dciodvfy", "/usr/local/bin/dciodvfy")


def dciodvfy_path() -> Path | None:
    """Return the ``dciodvfy`` binary, or None when dicom3tools is not installed."""
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("dciodvfy")
    return Path(found) if found else None


def require_dciodvfy() -> Path:
    """Return the ``dciodvfy`` binary or skip the calling test with the reason."""
    path = dciodvfy_path()
    if path is None:
        pytest.skip(
            "dciodvfy (dicom3tools) not found in /usr/bin, /usr/local/bin or PATH; "
            "install the Debian package 'dicom3tools'"
        )
    return path


def dciodvfy_output(path: Path, *, timeout_s: float = 60.0) -> str:
    """Run ``dciodvfy`` on ``path`` and return its combined output."""
    binary = require_dciodvfy()
    completed = subprocess.run(
        [str(binary), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        check=False,
    )
    return completed.stdout + completed.stderr


def dciodvfy_errors(path: Path, *, timeout_s: float = 60.0) -> list[str]:
    """Return the lines of ``dciodvfy``'s report that start with ``Error``."""
    return [
        line.strip()
        for line in dciodvfy_output(path, timeout_s=timeout_s).splitlines()
        if line.startswith("Error")
    ]
