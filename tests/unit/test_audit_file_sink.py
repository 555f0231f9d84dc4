"""The audit file: a re-open that fails after a rotation leaves no stale descriptor behind; a
record a full disk cuts short leaves no fragment behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from acwi_node.audit.trail import JsonLinesSink
from tests.support.descriptors import REAL_CLOSE, CloseReportingAnError

SQLITE_HEADER = b"SQLite format 3\0"


def failed_reopen(tmp_path: Path) -> JsonLinesSink:
    """A sink whose file was rotated away and whose new file could not be opened (here a
    directory in its place; for a node not running as root, a file ``logrotate`` created for
    another user; a file system remounted read-only)."""
    path = tmp_path / "audit" / "audit.jsonl"
    sink = JsonLinesSink(path)
    sink.write(b'{"n":1}\n')
    path.rename(path.with_name("audit.jsonl.1"))
    path.mkdir()
    with pytest.raises(OSError):
        sink.write(b'{"n":2}\n')
    return sink


def test_a_write_after_a_failed_reopen_leaves_the_file_that_took_the_number_open(
    tmp_path: Path,
) -> None:
    """The sink kept the closed descriptor's number and closed it again at its next write:
    whatever file had taken the number meanwhile (the ledger's database) lost its descriptor."""
    sink = failed_reopen(tmp_path)
    victim = os.open(tmp_path / "ledger.sqlite", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError):
            sink.write(b'{"n":3}\n')  # the audit file still cannot be opened
        os.fstat(victim)  # still open
    finally:
        os.close(victim)


def test_a_write_after_a_failed_reopen_goes_to_the_audit_file(tmp_path: Path) -> None:
    """Once the rotated file was back at its path (its inode the one the sink remembered),
    the next line went into the file that had taken the closed descriptor's number."""
    sink = failed_reopen(tmp_path)
    path = tmp_path / "audit" / "audit.jsonl"
    path.rmdir()
    path.with_name("audit.jsonl.1").rename(path)
    ledger = tmp_path / "ledger.sqlite"
    victim = os.open(ledger, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(victim, SQLITE_HEADER, 0)
        sink.write(b'{"n":3}\n')
        assert ledger.read_bytes() == SQLITE_HEADER
        assert path.read_bytes() == b'{"n":1}\n{"n":3}\n'
    finally:
        os.close(victim)
        sink.close()


def test_a_write_after_a_close_that_reported_an_error_goes_to_the_audit_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() may report an error (NFS: a failed write-back), having released the descriptor
    all the same (Linux); the sink kept the number, and its next line went into whatever file
    had taken it."""
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(path)
    sink.write(b'{"n":1}\n')
    failing = CloseReportingAnError(
        tmp_path / "ledger.sqlite",
        errno.EIO,
        once=False,
        then=lambda fd: os.pwrite(fd, SQLITE_HEADER, 0),
    )
    monkeypatch.setattr(os, "close", failing)
    with pytest.raises(OSError):
        sink.close()
    monkeypatch.setattr(os, "close", REAL_CLOSE)
    try:
        sink.write(b'{"n":2}\n')
        assert (tmp_path / "ledger.sqlite").read_bytes() == SQLITE_HEADER
        assert path.read_bytes() == b'{"n":1}\n{"n":2}\n'
    finally:
        failing.close_others()
        sink.close()


def test_a_record_a_full_disk_cuts_short_leaves_no_fragment_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk takes part of a write without an error (the blocks left, or the rest of the
    file's last block). The fragment stayed at the end of the file, the record counted as
    written; once there was room again the next record was appended to it, one line that
    neither record could be read from."""
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(path)
    sink.write(b'{"n":1}\n')
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:5])  # what the file system had room for

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as raised:
        sink.write(b'{"n":2,"detail":"cut short"}\n')
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "write", real_write)
    sink.write(b'{"n":3}\n')  # room again
    sink.close()
    assert path.read_bytes() == b'{"n":1}\n{"n":3}\n'
