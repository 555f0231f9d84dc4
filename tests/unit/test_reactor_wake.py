"""The reactor's wake-up pipe: a send after the reactor ended writes into no file."""

from __future__ import annotations

import os
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association

from acwi_node.ingest.reactor import EventDrivenDUL

SQLITE_HEADER = b"SQLite format 3\0"


def ended_reactor() -> EventDrivenDUL:
    """A DUL whose reactor ran and ended (its pipe closed), as after a peer's abort."""
    dul = EventDrivenDUL(Association(AE(), mode="requestor"))
    dul._kill_thread = True
    dul.assoc._dul_ready.set()
    dul.run_reactor()
    return dul


def test_a_late_wake_leaves_the_file_that_took_the_pipes_descriptor_alone(
    tmp_path: Path,
) -> None:
    """The association thread answering after the reactor ended (a C-STORE response to a
    peer that aborted, a stop) wrote a NUL at offset 0 of whatever file had reused the pipe's
    descriptor number: an SQLite ledger became "file is not a database"."""
    dul = ended_reactor()
    path = tmp_path / "ledger.sqlite"
    # The next two files opened take the two numbers the pipe freed.
    fds = [os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for _ in range(2)]
    try:
        for fd in fds:
            os.pwrite(fd, SQLITE_HEADER, 0)
        dul._wake()
        assert path.read_bytes() == SQLITE_HEADER
    finally:
        for fd in fds:
            os.close(fd)


def test_a_wake_while_the_reactor_runs_reaches_its_pipe() -> None:
    dul = EventDrivenDUL(Association(AE(), mode="requestor"))
    try:
        dul._wake()
        assert os.read(dul._wake_r, 16) == b"\0"
    finally:
        dul._kill_thread = True
        dul.assoc._dul_ready.set()
        dul.run_reactor()
    assert (dul._wake_r, dul._wake_w) == (-1, -1)
