"""What the node writes is not readable by the host's other users, whatever the umask it starts
with: the ledger (patient identifiers of HL7 orders, password hashes), its write-ahead log,
the data directory's folders and a feedback export (``acwi-node`` sets its own umask)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from acwi_node.cli import OTHERS, private_umask
from tests.support.node import write_config


def _cli(config: Path, umask: int, *args: str, stdin: str = "") -> None:
    done = subprocess.run(
        [sys.executable, "-m", "acwi_node.cli", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        umask=umask,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000])
def test_ledger_and_data_directory_closed_to_others(tmp_path: Path, umask: int) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path / "acwi.toml", {"node": {"data_dir": str(data)}})
    _cli(
        config,
        umask,
        "users",
        "add",
        "dr.modes",
        "--role",
        "radiologist",
        "--password-stdin",
        stdin="a password of some length",
    )
    modes = _modes(data)
    assert "ledger.sqlite" in modes
    open_to_others = {name: oct(mode) for name, mode in modes.items() if mode & OTHERS}
    assert open_to_others == {}
    # the group keeps what the umask gave it: processes of the node's group share them
    assert modes["ledger.sqlite"] & 0o040 == 0o040
    assert modes["."] & 0o070 == 0o070 & ~umask


def test_feedback_export_closed_to_others(tmp_path: Path) -> None:
    config = write_config(tmp_path / "acwi.toml", {"node": {"data_dir": str(tmp_path / "d")}})
    out = tmp_path / "export"
    _cli(config, 0o022, "feedback", "export", "--identified", str(out))
    modes = _modes(out)
    assert len(modes) > 1  # labels.csv at least
    assert {name: oct(mode) for name, mode in modes.items() if mode & OTHERS} == {}


@pytest.mark.parametrize(
    ("start", "expected"), [(0o022, 0o027), (0o002, 0o007), (0o077, 0o077), (0o000, 0o007)]
)
def test_private_umask_adds_others_only(start: int, expected: int) -> None:
    before = os.umask(start)
    try:
        assert private_umask() == expected
        assert os.umask(expected) == expected
    finally:
        os.umask(before)
