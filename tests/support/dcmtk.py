"""Run DCMTK's network tools (``storescu``, ``echoscu``) from tests.

pynetdicom installs Python apps named ``storescu``/``echoscu`` into the
virtualenv's ``bin/``, which shadow DCMTK's on ``PATH``.  The binaries are
therefore resolved explicitly: ``/usr/bin``, ``/usr/local/bin``, then the
``PATH`` entries outside the running virtualenv, and each candidate must
identify itself as DCMTK in its ``--version`` output.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

_PREFERRED_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"))


class DcmtkNotFoundError(FileNotFoundError):
    """Raised when a DCMTK binary cannot be found."""


def _virtualenv_bin_dirs() -> set[Path]:
    dirs: set[Path] = {Path(sys.prefix) / "bin", Path(sys.executable).parent}
    virtual_env = os.environ.get("VIRTUAL_ENV")
    if virtual_env:
        dirs.add(Path(virtual_env) / "bin")
    return {d.resolve() for d in dirs if d.exists()}


def _candidate_dirs() -> list[Path]:
    excluded = _virtualenv_bin_dirs()
    dirs: list[Path] = list(_PREFERRED_DIRS)
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        directory = Path(entry)
        try:
            resolved = directory.resolve()
        except OSError:
            continue
        if resolved in excluded or directory in dirs:
            continue
        dirs.append(directory)
    return dirs


def _is_dcmtk(binary: Path) -> bool:
    try:
        completed = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    output = (completed.stdout + completed.stderr).lower()
    return "dcmtk" in output or "offis" in output


@functools.cache
def find_dcmtk_tool(name: str) -> Path:
    """Return the path of DCMTK's ``name`` binary (never a virtualenv shadow).

    Raises:
        DcmtkNotFoundError: when no candidate identifies itself as DCMTK.
    """
    rejected: list[str] = []
    for directory in _candidate_dirs():
        candidate = directory / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if candidate.resolve().parent in _virtualenv_bin_dirs():
            rejected.append(str(candidate))
            continue
        if _is_dcmtk(candidate):
            return candidate
        rejected.append(str(candidate))
    detail = f" (not DCMTK: {', '.join(rejected)})" if rejected else ""
    raise DcmtkNotFoundError(
        f"DCMTK's {name} not found in /usr/bin, /usr/local/bin or PATH{detail}; "
        "install the Debian package 'dcmtk'"
    )


def require_dcmtk_tool(name: str) -> Path:
    """Return DCMTK's ``name`` binary or skip the calling test with the reason."""
    try:
        return find_dcmtk_tool(name)
    except DcmtkNotFoundError as exc:
        pytest.skip(str(exc))


def _dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _network_args(called_ae: str, calling_ae: str, timeout_s: int) -> list[str]:
    return [
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-to",
        str(timeout_s),
        "-ta",
        str(timeout_s),
        "-td",
        str(timeout_s),
    ]


def storescu(
    host: str,
    port: int,
    called_ae: str,
    files_or_dir: Path | Sequence[Path],
    calling_ae: str = "STORESCU",
    extra_args: Sequence[str] = (),
    *,
    timeout_s: int = 60,
) -> subprocess.CompletedProcess[str]:
    """Send files (directories are scanned recursively) with DCMTK's ``storescu``.

    ``storescu`` proposes, for the SOP Classes of the input files, all
    uncompressed transfer syntaxes plus each file's own transfer syntax, so
    DX/CR/SC/SR objects are sent as they are.  The environment always has
    ``TCP_NODELAY=1``.  The process is not checked: inspect ``returncode``.
    """
    inputs = [files_or_dir] if isinstance(files_or_dir, Path) else list(files_or_dir)
    args: list[str] = [str(find_dcmtk_tool("storescu"))]
    if any(Path(item).is_dir() for item in inputs):
        args += ["+sd", "+r"]
    args += _network_args(called_ae, calling_ae, timeout_s)
    args += list(extra_args)
    args += [host, str(port)]
    args += [str(item) for item in inputs]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        errors="replace",
        env=_dcmtk_env(),
        timeout=timeout_s * 3 + 30,
        check=False,
    )


def echoscu(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    extra_args: Sequence[str] = (),
    *,
    timeout_s: int = 30,
) -> subprocess.CompletedProcess[str]:
    """Send a C-ECHO with DCMTK's ``echoscu`` (``TCP_NODELAY=1``; not checked)."""
    args: list[str] = [str(find_dcmtk_tool("echoscu"))]
    args += _network_args(called_ae, calling_ae, timeout_s)
    args += list(extra_args)
    args += [host, str(port)]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        errors="replace",
        env=_dcmtk_env(),
        timeout=timeout_s * 3 + 30,
        check=False,
    )


def dsrdump_clean(path: Path) -> str:
    """Read the SR at ``path`` with DCMTK's ``dsrdump -v`` (which checks its content tree
    against the IOD's relationship constraints) and return what it printed; fails the calling
    test on any warning, error or fatal line, and skips it without DCMTK."""
    run = subprocess.run(
        [str(require_dcmtk_tool("dsrdump")), "-v", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )
    complaints = [line for line in run.stderr.splitlines() if line.startswith(("W:", "E:", "F:"))]
    assert run.returncode == 0 and complaints == [], (path.name, run.stderr)
    return run.stdout
