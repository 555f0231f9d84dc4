"""What ``acwi-node`` prints goes to a reader that may stop reading (``| head``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_CLI = "from acwi_node.cli import main; raise SystemExit(main())"


def test_a_reader_that_stops_reading_ends_the_command_without_a_traceback(
    tmp_path: Path,
) -> None:
    """``acwi-node config | head -1``: head exits after a line; the node's next write finds no
    reader. It stops quietly (status 1), as other command-line tools do, instead of printing
    a BrokenPipeError traceback."""
    env = {**os.environ, "ACWI_NODE__DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_CLI, "config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command writes (it starts in a second or so)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_broken_pipe_that_is_not_standard_output_is_still_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken pipe elsewhere (a socket's peer gone) is not taken for the reader of the
    output going away."""
    from acwi_node import cli

    def broken(*_args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["config"])
