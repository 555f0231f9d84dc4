"""Start-up mistakes an administrator makes: one line naming the setting, exit status 2, no
traceback (a ledger that cannot be reached, a DICOM port already taken)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from acwi_node.cli import main


def node_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = dict(os.environ, ACWI_NODE__DATA_DIR=str(tmp_path / "data"))
    env.update({f"ACWI_{key.upper()}": value for key, value in settings.items()})
    return env


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://acwi:s3cret@127.0.0.1:1/acwi", "Connection refused"),
        ("postgresql://no_such_role:s3cret@127.0.0.1:5432/acwi", 'role "no_such_role"'),
    ],
    ids=["server-down", "unknown-role"],
)
def test_a_ledger_that_cannot_be_used_is_one_line_without_its_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    reason: str,
) -> None:
    monkeypatch.setenv("ACWI_NODE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ACWI_NODE__DATABASE_URL", url)
    assert main(["status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("acwi-node: cannot use the ledger postgresql://")
    assert reason in err and "s3cret" not in err
    assert "\n" not in err and "Traceback" not in err


def test_a_ledger_url_of_another_kind_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ACWI_NODE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ACWI_NODE__DATABASE_URL", "mysql://acwi@db/acwi")
    assert main(["status"]) == 2
    assert "node.database_url" in capsys.readouterr().err
    # postgres:// (as hosting services write it) is PostgreSQL.
    monkeypatch.setenv("ACWI_NODE__DATABASE_URL", "postgres://acwi:s3cret@127.0.0.1:1/acwi")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "cannot use the ledger postgresql://acwi:***@127.0.0.1:1/acwi" in err


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_dicom_port_already_taken_stops_the_scp_with_one_line(
    tmp_path: Path, processes: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = node_env(
            tmp_path,
            node__dicom_host="127.0.0.1",
            node__dicom_port=port,
            ingest__processes=processes,
        )
        done = subprocess.run(
            [sys.executable, "-m", "acwi_node.cli", "scp"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        f"acwi-node: cannot listen on node.dicom_host '127.0.0.1' port {port}"
        " (node.dicom_port): Address already in use"
    ) in done.stderr
