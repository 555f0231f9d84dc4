"""The ingest journal: records, group commit, checkpoints, and replay after a crash."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from acwi_node.ingest import journal as journal_module
from acwi_node.ingest.journal import (
    KIND_INSTANCE,
    IngestJournal,
    JournalError,
    JournalRecord,
    Ticket,
    read_journal,
    read_segment,
    replay_orphans,
    sync_filesystem,
)
from acwi_node.observability import metrics
from tests.support.descriptors import REAL_CLOSE, CloseReportingAnError


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the journal flushed, in order: 'fs' (the spool's file system), 'ledger'."""
    seen: list[str] = []
    monkeypatch.setattr(journal_module, "sync_filesystem", lambda path: seen.append("fs"))
    return seen


def make_journal(tmp_path: Path, flushes: list[str], **kwargs: object) -> IngestJournal:
    journal = IngestJournal(
        tmp_path / ".journal",
        tmp_path,
        lambda: flushes.append("ledger"),
        checkpoint_s=kwargs.pop("checkpoint_s", 3600.0),  # type: ignore[arg-type]
        checkpoint_idle_s=kwargs.pop("checkpoint_idle_s", 3600.0),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    journal.open()
    return journal


def segments(journal: IngestJournal) -> list[Path]:
    return sorted(journal.directory.glob("*.wal"))


def test_records_read_back_whole_and_in_order(tmp_path: Path, flushes: list[str]) -> None:
    journal = make_journal(tmp_path, flushes)
    payloads = [os.urandom(n) for n in (0, 1, 700, 70_000)]
    for i, payload in enumerate(payloads):
        journal.done(journal.append({"i": i, "uid": f"1.2.{i}"}, payload))
    records = read_journal(journal.directory)
    assert [r.meta for r in records] == [{"i": i, "uid": f"1.2.{i}"} for i in range(4)]
    assert [r.payload for r in records] == payloads
    assert [r.number for r in records] == [1, 2, 3, 4]
    journal.close()


def test_a_payload_in_several_buffers_reads_back_as_one(tmp_path: Path, flushes: list[str]) -> None:
    """The SCP hands over an instance as its file meta and its data set, never joined."""
    journal = make_journal(tmp_path, flushes)
    meta, dataset = b"file-meta", memoryview(bytearray(os.urandom(5000)))
    parts: tuple[bytes, memoryview] = (meta, dataset)
    journal.done(journal.append({"uid": "1"}, parts))
    ticket = journal.write_spooled({"uid": "2"}, parts)
    journal.wait_durable(ticket)
    journal.done(ticket)
    whole, spooled = read_journal(journal.directory)
    assert whole.payload == meta + bytes(dataset)
    assert spooled.matches(meta + bytes(dataset)) and not spooled.matches(bytes(dataset))
    journal.close()


def test_a_withdrawn_instance_is_not_replayed(tmp_path: Path, flushes: list[str]) -> None:
    journal = make_journal(tmp_path, flushes)
    kept = journal.append({"uid": "1"}, b"a")
    refused = journal.append({"uid": "2"}, b"b")
    journal.withdraw(refused)
    journal.done(refused)
    journal.done(kept)
    assert [r.meta["uid"] for r in read_journal(journal.directory)] == ["1"]
    journal.close()


@pytest.mark.parametrize("cut", [1, 10, 30, 45])
def test_a_record_cut_short_ends_the_segment(tmp_path: Path, flushes: list[str], cut: int) -> None:
    journal = make_journal(tmp_path, flushes)
    journal.done(journal.append({"uid": "1"}, b"x" * 20))
    journal.done(journal.append({"uid": "2"}, b"y" * 20))
    (segment,) = segments(journal)
    data = segment.read_bytes()[: journal.written_bytes]
    segment.write_bytes(data[: len(data) - cut])  # the second record, torn by a crash
    assert [r.meta["uid"] for r in read_segment(segment)] == ["1"]
    journal.close()


def test_a_record_with_a_wrong_checksum_ends_the_segment(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes)
    journal.done(journal.append({"uid": "1"}, b"x" * 20))
    journal.done(journal.append({"uid": "2"}, b"y" * 20))
    journal.done(journal.append({"uid": "3"}, b"z" * 20))
    (segment,) = segments(journal)
    data = bytearray(segment.read_bytes())
    data[data.index(b"y" * 20) + 5] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert [r.meta["uid"] for r in read_segment(segment)] == ["1"]
    journal.close()


def test_a_new_segment_is_preallocated_and_a_retired_one_reused(
    tmp_path: Path, flushes: list[str]
) -> None:
    """Segments are written in place: the first one starts as zeros, a retired one becomes
    the next. Its records from before end its replay, even before a new record is written
    (their CRC-32 is XOR-ed with another segment number)."""
    journal = make_journal(tmp_path, flushes, preallocate_bytes=64 << 10)
    (first,) = segments(journal)
    assert first.stat().st_size == 64 << 10
    deadline = time.monotonic() + 10
    while journal.spare_segments == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the checkpointer writes a spare of zeros
    assert journal.spare_segments == 1
    for i in range(3):
        journal.done(journal.append({"uid": f"old-{i}"}, b"old" * 100))
    assert journal.checkpoint() == 3  # the next segment is the spare; the first, retired
    journal.done(journal.append({"uid": "between"}, b"x"))
    assert journal.checkpoint() == 1  # the next segment is the first one's file again
    (reused,) = segments(journal)
    assert b"old" * 100 in reused.read_bytes()
    assert read_journal(journal.directory) == []
    journal.done(journal.append({"uid": "new"}, b"new"))
    assert [r.meta["uid"] for r in read_journal(journal.directory)] == ["new"]
    assert journal.spare_segments == 1  # the segment in between
    journal.close()


def test_a_spare_segment_is_written_only_while_the_process_is_idle(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spare zeros are written a MiB at a time; once a record comes (the process is no longer
    idle), the rest and the spare's flush wait for the next idle moment, so that no
    association's flush waits behind them; a journal closed meanwhile removes the part."""
    monkeypatch.setattr(IngestJournal, "_checkpoint_loop", lambda self: None)  # driven here
    journal = make_journal(tmp_path, flushes, preallocate_bytes=4 << 20)
    idle = [True, True, False]  # two MiB, then a record comes
    monkeypatch.setattr(journal, "_idle", lambda: idle.pop(0) if idle else True)
    synced: list[int] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    journal._prepare_spare()
    (spare,) = journal.directory.glob("*.spare")
    assert spare.stat().st_size == 2 << 20 and journal.spare_segments == 0 and synced == []
    journal._prepare_spare()  # idle again: the rest, then its flush
    assert spare.stat().st_size == 4 << 20 and journal.spare_segments == 1 and len(synced) == 1

    journal._spares.clear()  # taken by a new segment, say: the next spare is started
    idle[:] = [True, False]
    journal._prepare_spare()
    assert len(list(journal.directory.glob("*.spare"))) == 2
    partial = journal._partial_spare
    assert partial is not None and partial.written == 1 << 20
    journal.close()
    assert not journal.directory.exists()
    with pytest.raises(OSError):
        os.fstat(partial.fd)  # closed, not leaked


def test_records_of_the_first_format_are_still_read(tmp_path: Path) -> None:
    """A journal left by a version whose CRC-32 started from zero (magic AJR1)."""
    meta = json.dumps({"uid": "1.2.3"}).encode()
    payload = b"instance"
    head = journal_module._HEADER.pack(
        journal_module.MAGIC_V1, KIND_INSTANCE, 1, 7, len(meta), len(payload), 0
    )[:-4]
    crc = zlib.crc32(payload, zlib.crc32(meta, zlib.crc32(head)))
    segment = tmp_path / "000000000001.wal"
    segment.write_bytes(head + struct.pack("<I", crc) + meta + payload)
    (record,) = read_segment(segment)
    assert record.meta == {"uid": "1.2.3"} and record.payload == payload


def test_one_flush_covers_the_appends_that_wait_for_it(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = make_journal(tmp_path, flushes)
    syncs: list[int] = []
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        syncs.append(fd)
        time.sleep(0.02)  # a slow disk: appends pile up behind the running flush
        real(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", slow_fdatasync)
    covered: list[bool] = []

    def sender(n: int) -> None:
        for i in range(10):
            ticket = journal.append({"sender": n, "i": i}, b"p" * 100)
            covered.append(ticket.segment.synced >= ticket.end)
            journal.done(ticket)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(covered) == 80 and all(covered)  # nobody returned before its record was flushed
    assert len(syncs) < 80 / 2  # ...and most shared a flush with others
    journal.close()


@pytest.fixture
def flushing_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Every ``fdatasync`` the journal makes: (file descriptor, the calling thread's name)."""
    calls: list[tuple[int, str]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append((fd, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    return calls


def _flushed_by(calls: list[tuple[int, str]], ticket: Ticket) -> list[str]:
    """The threads that flushed the ticket's segment (the checkpointer flushes spares too)."""
    return [name for fd, name in calls if fd == ticket.segment.fd]


def test_a_record_is_flushed_by_the_thread_that_waits_for_it(
    tmp_path: Path, flushes: list[str], flushing_threads: list[tuple[int, str]]
) -> None:
    """No thread is woken to flush an instance's record: the association that waits for it
    flushes (after writing the spool file, with no hand-over to another thread and back)."""
    journal = make_journal(tmp_path, flushes)
    flushing_threads.clear()  # the new segment's preallocation
    ticket = journal.write({"i": 0}, b"data")
    time.sleep(0.1)
    assert ticket.segment.synced < ticket.end and _flushed_by(flushing_threads, ticket) == []
    journal.wait_durable(ticket)
    assert ticket.segment.synced >= ticket.end
    assert _flushed_by(flushing_threads, ticket) == [threading.current_thread().name]
    journal.done(ticket)
    journal.close()


def test_writing_a_record_starts_its_writeback(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record's own bytes, and only those, are sent on their way to the disk at once (the
    flush that follows waits for less); a spooled record is left to the flusher thread."""
    journal = make_journal(tmp_path, flushes)
    started: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        journal_module, "start_writeback", lambda fd, off, n: started.append((fd, off, n))
    )
    first = journal.write({"i": 0}, b"a" * 100)
    second = journal.write({"i": 1}, b"b" * 300)
    spooled = journal.write_spooled({"i": 2}, b"c" * 1000)
    fd = first.segment.fd
    assert started == [(fd, 0, first.end), (fd, first.end, second.end - first.end)]
    for ticket in (first, second, spooled):
        journal.wait_durable(ticket)
        journal.done(ticket)
    monkeypatch.undo()
    journal.close()


def test_start_writeback_takes_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        journal_module.start_writeback(fd, 0, 8192)  # no error, no change
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 8192


def test_records_read_their_segment_ahead_of_them(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first small record reads a step ahead; the next step is read once half of the
    one before is written; a large record moves the mark, and reads ahead only around where
    a successor of its size would end (it fills its other pages whole: reading them would
    only double its disk traffic)."""
    monkeypatch.setattr(journal_module, "READ_AHEAD_BYTES", 8192)
    monkeypatch.setattr(journal_module, "READ_AHEAD_RECORD_MAX", 1024)
    journal = make_journal(tmp_path, flushes)
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(journal_module, "read_ahead", lambda fd, off, n: asked.append((off, n)))
    tickets = [journal.write({"i": 0}, b"a" * 900, head_start=False)]
    assert asked == [(0, 8192)]
    while tickets[-1].end + 1000 + 4096 <= 8192:  # records up to half a step from the mark
        tickets.append(journal.write({"i": len(tickets)}, b"a" * 900, head_start=False))
    assert asked == [(0, 8192)]
    tickets.append(journal.write({"i": len(tickets)}, b"a" * 900, head_start=False))
    assert asked == [(0, 8192), (8192, 8192)]
    before = tickets[-1].end
    tickets.append(journal.write({"i": -1}, b"L" * 20000, head_start=False))  # large
    large_end = tickets[-1].end
    successor_end = large_end + (large_end - before)
    assert asked == [(0, 8192), (8192, 8192), (successor_end - 4096, 8192)]
    tickets.append(journal.write({"i": -2}, b"a" * 900, head_start=False))
    assert asked[-1] == (large_end, 8192)
    assert len(asked) == 4
    for ticket in tickets:
        journal.done(ticket)
    monkeypatch.undo()
    journal.close()


def _resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (``mincore`` over a mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(byte & 1 for byte in vec.raw[:pages])
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_read_ahead_brings_a_file_s_pages_back_into_memory(tmp_path: Path) -> None:
    """A segment whose pages left the page cache gets them back before records reach them,
    without the writer waiting for the disk. (On a disk's file system, as the node's data
    directory is: tmpfs keeps every page in memory and has nothing to drop.)"""
    path = tmp_path / "segment"
    pages = (1 << 20) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(1 << 20), 0)
        os.fdatasync(fd)  # clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _resident_pages(path) < pages, "the test's directory keeps every page in memory"
        journal_module.read_ahead(fd, 0, 1 << 20)
        deadline = time.monotonic() + 10
        while _resident_pages(path) < pages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _resident_pages(path) == pages
    finally:
        os.close(fd)


def test_a_spooled_record_is_flushed_at_once_in_the_background(
    tmp_path: Path, flushes: list[str], flushing_threads: list[tuple[int, str]]
) -> None:
    """A spooled record's flush overlaps the caller's own flushes of the spool file: the
    flusher thread starts it as soon as the record is written, and the caller's wait finds it
    done (or running) instead of flushing again."""
    journal = make_journal(tmp_path, flushes)
    flushing_threads.clear()  # the new segment's preallocation
    ticket = journal.write_spooled({"i": 0}, b"x" * 1000)
    deadline = time.monotonic() + 5
    while ticket.segment.synced < ticket.end:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    journal.wait_durable(ticket)
    assert _flushed_by(flushing_threads, ticket) == ["acwi-journal-flush"]
    journal.done(ticket)
    journal.close()


def test_a_flush_wakes_the_flusher_thread_only_for_a_record_it_left_behind(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An association's flush does not wake the flusher thread (a wake-up, and a turn of the
    interpreter lock, for every instance) unless a spooled record written while it ran still
    waits for a flush: that one the flusher then flushes, with nobody waiting for it."""
    journal = make_journal(tmp_path, flushes)
    wakes: list[int] = []
    notify_all = journal._dirty.notify_all

    def counted_notify_all() -> None:
        wakes.append(1)
        notify_all()

    monkeypatch.setattr(journal._dirty, "notify_all", counted_notify_all)
    for i in range(20):
        ticket = journal.append({"i": i}, b"p" * 100)
        journal.done(ticket)
    assert wakes == []

    gate, entered = threading.Event(), threading.Event()
    flushed_by: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if fd == journal._segments[0].fd:  # not a spare the checkpointer prepares
            flushed_by.append(threading.current_thread().name)
        if threading.current_thread().name == "association":
            entered.set()
            gate.wait(5)
        real(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    first = journal.write({"i": "first"}, b"a" * 100)
    waiter = threading.Thread(target=journal.wait_durable, args=(first,), name="association")
    waiter.start()
    assert entered.wait(5)  # the association's flush runs, covering `first` only
    spooled = journal.write_spooled({"i": "spooled"}, b"b" * 100)
    time.sleep(0.1)  # the flusher saw the running flush and left the record to it
    assert spooled.segment.synced < spooled.end and flushed_by == ["association"]
    gate.set()
    waiter.join(5)
    deadline = time.monotonic() + 5
    while spooled.segment.synced < spooled.end:
        assert time.monotonic() < deadline, "the record left behind was never flushed"
        time.sleep(0.005)
    assert flushed_by == ["association", "acwi-journal-flush"] and len(wakes) == 1
    for ticket in (first, spooled):
        journal.done(ticket)
    monkeypatch.undo()
    journal.close()


def test_a_failed_flush_fails_every_record_waiting_for_it(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Associations waiting behind a flush that fails are not answered as if it had worked."""
    journal = make_journal(tmp_path, flushes)
    started = threading.Event()

    def fdatasync(fd: int) -> None:
        started.set()
        time.sleep(0.1)  # the others arrive and wait for this flush
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    tickets = [journal.write({"i": i}, b"data") for i in range(3)]
    errors: list[str] = []

    def wait(ticket: object) -> None:
        try:
            journal.wait_durable(ticket)  # type: ignore[arg-type]
        except JournalError as exc:
            errors.append(str(exc))

    leader = threading.Thread(target=wait, args=(tickets[0],))
    leader.start()
    started.wait(5)
    followers = [threading.Thread(target=wait, args=(t,)) for t in tickets[1:]]
    for thread in followers:
        thread.start()
    for thread in [leader, *followers]:
        thread.join(10)
    assert len(errors) == 3 and all("Input/output error" in e for e in errors)
    for ticket in tickets:
        journal.done(ticket)
    monkeypatch.undo()
    journal.close()


def test_checkpoint_flushes_spool_and_ledger_then_deletes_the_segments(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes)
    for i in range(3):
        journal.done(journal.append({"i": i}, b"data"))
    first = segments(journal)
    assert journal.checkpoint() == 3
    assert flushes == ["fs", "ledger"]
    assert not any(p.exists() for p in first)
    assert journal.pending_records == 0
    assert journal.checkpoint() == 0  # nothing new: nothing flushed
    assert flushes == ["fs", "ledger"]
    journal.close()


def test_an_unrecorded_instance_is_replayed_before_its_segment_is_retired(
    tmp_path: Path, flushes: list[str]
) -> None:
    """An instance answered without a ledger row: the checkpoint replays its record (and only
    its), before anything is flushed; while that fails the segment stays."""
    replayed: list[str] = []
    failing = [True]

    def replay(record: JournalRecord) -> None:
        if failing[0]:
            raise RuntimeError("the ledger is down")
        replayed.append(record.meta["uid"])

    journal = make_journal(tmp_path, flushes, replay=replay)
    recorded = journal.append({"uid": "1"}, b"a")
    unrecorded = journal.append({"uid": "2"}, b"b")
    journal.unrecorded(unrecorded)
    journal.done(unrecorded)
    journal.done(recorded)
    with pytest.raises(RuntimeError, match="the ledger is down"):
        journal.checkpoint()
    assert flushes == [] and journal.pending_records == 2
    failing[0] = False
    assert journal.checkpoint() == 2
    assert replayed == ["2"] and flushes == ["fs", "ledger"]
    assert journal.pending_records == 0
    journal.close()


def test_an_unrecorded_instance_without_a_replay_keeps_its_segment(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes)
    ticket = journal.append({"uid": "1"}, b"a")
    journal.unrecorded(ticket)
    journal.done(ticket)
    with pytest.raises(JournalError, match="lack a ledger row"):
        journal.checkpoint()
    assert journal.pending_records == 1
    journal.close()  # the last checkpoint fails too: the journal stays for the next start
    assert segments(journal) != []


def test_checkpoint_waits_for_instances_still_being_written(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes)
    ticket = journal.append({"i": 0}, b"data")  # its spool file and ledger row: not yet
    worker = threading.Thread(target=journal.checkpoint)
    worker.start()
    time.sleep(0.2)
    assert flushes == []  # a flush now would miss the instance still being written
    assert worker.is_alive()
    journal.done(ticket)
    worker.join(5)
    assert flushes == ["fs", "ledger"]
    journal.close()


def test_the_checkpointer_runs_on_its_own(tmp_path: Path, flushes: list[str]) -> None:
    journal = make_journal(tmp_path, flushes, checkpoint_s=0.05)
    journal.done(journal.append({"i": 0}, b"data"))
    deadline = time.monotonic() + 5
    while journal.pending_records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journal.pending_records == 0
    assert flushes[:2] == ["fs", "ledger"]
    journal.close()


def wait_for_checkpoints(journal: IngestJournal, n: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while journal.checkpoints < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journal.checkpoints >= n


def test_a_full_segment_gets_a_successor_without_a_checkpoint(
    tmp_path: Path, flushes: list[str]
) -> None:
    """A burst fills segment after segment; the checkpoint waits (here: an hour)."""
    journal = make_journal(tmp_path, flushes, segment_bytes=1000)
    journal.done(journal.append({"i": 0}, b"x" * 1500))
    journal.done(journal.append({"i": 1}, b"x" * 1500))
    assert len(segments(journal)) == 3  # each record filled its segment
    time.sleep(0.3)
    assert journal.checkpoints == 0 and flushes == []
    assert len(read_journal(journal.directory)) == 2
    journal.close()


def test_a_journal_holding_checkpoint_bytes_is_checkpointed_at_once(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes, segment_bytes=1000, checkpoint_bytes=2500)
    journal.done(journal.append({"i": 0}, b"x" * 1500))
    time.sleep(0.2)
    assert journal.checkpoints == 0  # one full segment: under checkpoint_bytes
    journal.done(journal.append({"i": 1}, b"x" * 1500))
    wait_for_checkpoints(journal, 1)
    assert flushes == ["fs", "ledger"]
    assert len(segments(journal)) == 1 and read_journal(journal.directory) == []
    journal.close()


def test_the_checkpoint_waits_for_the_journal_to_be_idle(
    tmp_path: Path, flushes: list[str]
) -> None:
    """While records keep coming (every 50 ms, for 0.6 s) no checkpoint runs; 0.3 s after the
    last one, it does."""
    journal = make_journal(tmp_path, flushes, checkpoint_idle_s=0.3)
    for i in range(12):
        journal.done(journal.append({"i": i}, b"data"))
        time.sleep(0.05)
    assert journal.checkpoints == 0
    wait_for_checkpoints(journal, 1)
    assert journal.pending_records == 0 and flushes == ["fs", "ledger"]
    journal.close()


def test_a_journal_never_idle_is_checkpointed_when_its_oldest_record_is_checkpoint_s_old(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes, checkpoint_s=0.3)
    start = time.monotonic()
    while journal.checkpoints == 0:
        journal.done(journal.append({"i": 0}, b"data"))
        assert time.monotonic() - start < 5
        time.sleep(0.02)
    assert time.monotonic() - start >= 0.3
    journal.close()


def test_a_clean_close_leaves_no_journal(tmp_path: Path, flushes: list[str]) -> None:
    journal = make_journal(tmp_path, flushes)
    journal.done(journal.append({"i": 0}, b"data"))
    journal.close()
    assert flushes == ["fs", "ledger"]
    assert list((tmp_path / ".journal").iterdir()) == []


_CRASHING_WRITER = """
import json, os, sys
from pathlib import Path
from acwi_node.ingest.journal import IngestJournal
journal = IngestJournal(Path(sys.argv[1]), Path(sys.argv[2]), lambda: None, checkpoint_s=3600)
journal.open()
for kind, meta, data in json.loads(sys.argv[3]):
    write = journal.write_spooled if kind == "spooled" else journal.write
    ticket = write({**meta, "pid": os.getpid()}, bytes.fromhex(data))
    journal.wait_durable(ticket)
    journal.done(ticket)
print(journal.directory, flush=True)
os._exit(1)  # a crash: no checkpoint, no clean close
"""


def crashed_journal(
    tmp_path: Path, records: list[tuple[str, dict[str, str], bytes]] | None = None
) -> Path:
    """The journal of a process that crashed after writing ``records`` (``payload`` or
    ``spooled``, meta, the instance's bytes; each meta gets the process's ``pid``); by default
    five instances with payloads."""
    if records is None:
        records = [("payload", {"uid": f"1.2.{i}"}, bytes([i]) * 1000) for i in range(5)]
    todo = json.dumps([(kind, meta, data.hex()) for kind, meta, data in records])
    out = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(tmp_path / ".journal"), str(tmp_path), todo],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    return Path(out.stdout.strip())


def test_the_journal_of_a_crashed_process_is_replayed_and_removed(
    tmp_path: Path, flushes: list[str]
) -> None:
    directory = crashed_journal(tmp_path)
    live = make_journal(tmp_path, flushes)  # this process's own: its owner runs, never replayed
    live.done(live.append({"uid": "live"}, b"l"))
    replayed: list[JournalRecord] = []

    def replay(record: JournalRecord) -> bool:
        replayed.append(record)
        return record.meta["uid"] != "1.2.0"  # pretend that one's ledger row had survived

    report = replay_orphans(tmp_path / ".journal", replay, lambda: flushes.append("flush"))
    assert [r.meta["uid"] for r in replayed] == [f"1.2.{i}" for i in range(5)]
    assert [r.payload for r in replayed] == [bytes([i]) * 1000 for i in range(5)]
    assert (report.journals, report.instances, report.recorded) == (1, 5, 4)
    assert flushes == ["flush"]
    assert not directory.exists()
    assert live.directory.exists()
    live.close()


def test_a_replayer_finding_another_at_work_waits_until_it_has_replayed(
    tmp_path: Path,
) -> None:
    """An SCP process starting and the completion loop's sweep may look at once. The one that
    comes second returns only once the first has replayed what it took: the completion loop
    then completes no study before the instances a killed process acknowledged for it are
    recorded (it used to find the journal locked, pass it by, and go on)."""
    directory = crashed_journal(tmp_path)
    started, go_on = threading.Event(), threading.Event()
    replayed: list[str] = []

    def slow(record: JournalRecord) -> bool:
        started.set()
        assert go_on.wait(30)
        replayed.append(record.meta["uid"])
        return True

    first = threading.Thread(
        target=replay_orphans, args=(tmp_path / ".journal", slow, lambda: None)
    )
    first.start()
    assert started.wait(30)
    second: list[tuple[int, list[str]]] = []
    late = threading.Thread(
        target=lambda: second.append(
            (
                replay_orphans(tmp_path / ".journal", lambda r: True, lambda: None).journals,
                list(replayed),
            )
        )
    )
    late.start()
    time.sleep(0.3)
    assert late.is_alive()  # waits for the first
    go_on.set()
    first.join(30)
    late.join(30)
    assert second == [(0, [f"1.2.{i}" for i in range(5)])]  # nothing left, all replayed
    assert not directory.exists()


def test_records_the_ledger_settled_since_are_left_out_with_one_line(
    tmp_path: Path, flushes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A journal restored from a backup: the files whose last record the ledger settled since
    (``superseded``) are not replayed, none of their records, and one line counts them."""
    crashed_journal(
        tmp_path,
        [
            ("payload", {"path": "a", "uid": "1.2.1"}, b"a1"),
            ("payload", {"path": "b", "uid": "1.2.2"}, b"b1"),
            ("payload", {"path": "a", "uid": "1.2.1"}, b"a2"),
            ("payload", {"path": "c", "uid": "1.2.3"}, b"c1"),
        ],
    )
    replayed: list[bytes] = []

    def replay(record: JournalRecord) -> bool:
        replayed.append(record.payload)
        return True

    with caplog.at_level(logging.INFO, logger="acwi_node.ingest"):
        report = replay_orphans(
            tmp_path / ".journal",
            replay,
            lambda: None,
            superseded=lambda record: record.meta["path"] in ("a", "c"),
        )
    assert replayed == [b"b1"]
    assert (report.instances, report.recorded, report.superseded) == (1, 1, 2)
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.startswith("ingest journal: 2 instance(s) left out") and "1.2." not in line
    assert list((tmp_path / ".journal").iterdir()) == []


def test_journals_of_several_processes_replay_in_the_order_written(
    tmp_path: Path, flushes: list[str]
) -> None:
    first = crashed_journal(tmp_path)
    second = crashed_journal(tmp_path)  # the same UIDs, sent again later to another process
    pids = [int(first.name.split("-")[0]), int(second.name.split("-")[0])]
    # Directory names do not tell the order: make the later journal sort first.
    first = first.rename(first.with_name("9-earlier"))
    second = second.rename(second.with_name("0-later"))
    replayed: list[JournalRecord] = []

    def replay(record: JournalRecord) -> bool:
        replayed.append(record)
        return True

    report = replay_orphans(tmp_path / ".journal", replay, lambda: None)
    assert (report.journals, report.instances) == (2, 10)
    assert [r.meta["pid"] for r in replayed] == [pids[0]] * 5 + [pids[1]] * 5
    assert [r.time_ns for r in replayed] == sorted(r.time_ns for r in replayed)
    assert not first.exists() and not second.exists()


def test_a_spooled_record_holds_the_crc_of_the_bytes_not_the_bytes(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes)
    data = os.urandom(100_000)
    journal.done(journal.append({"path": "a"}, b"small"))
    ticket = journal.write_spooled({"path": "b"}, data)
    journal.wait_durable(ticket)
    journal.done(ticket)
    assert journal.written_bytes < 1000
    small, large = read_journal(journal.directory)
    assert not small.spooled and small.payload == b"small" and small.meta == {"path": "a"}
    assert large.spooled and large.payload == b""
    assert large.matches(data)
    assert not large.matches(data[:-1]) and not large.matches(b"")
    journal.close()


def test_the_last_usable_record_of_each_spool_file_is_replayed(
    tmp_path: Path, flushes: list[str]
) -> None:
    """Of several records for one file, the last decides; a spooled record whose file does not
    hold its bytes (a crash came before the file was flushed: never answered) gives way to the
    record before it."""
    old, new, other = b"old" * 100, b"new" * 100, b"other" * 100
    crashed_journal(
        tmp_path,
        [
            ("payload", {"path": "a"}, old),
            ("payload", {"path": "b"}, b"b1"),
            ("spooled", {"path": "a"}, new),  # its file never made it: "a" still holds old
            ("spooled", {"path": "c"}, other),
            ("payload", {"path": "b"}, b"b2"),
            ("spooled", {"path": "d"}, b"lost"),  # nothing before it: skipped
        ],
    )
    files = {"a": old, "c": other}
    replayed: list[tuple[str, bytes]] = []

    def replay(record: JournalRecord) -> bool | None:
        path = record.meta["path"]
        if record.spooled:
            if path not in files or not record.matches(files[path]):
                return None
            replayed.append((path, files[path]))
        else:
            files[path] = record.payload
            replayed.append((path, record.payload))
        return True

    report = replay_orphans(tmp_path / ".journal", replay, lambda: None)
    # In the order of each file's last record; "b" once, as sent last.
    assert replayed == [("a", old), ("c", other), ("b", b"b2")]
    assert (report.instances, report.recorded, report.unusable) == (3, 3, 2)
    assert list((tmp_path / ".journal").iterdir()) == []


def test_a_journal_whose_replay_fails_is_kept_for_the_next_start(
    tmp_path: Path, flushes: list[str]
) -> None:
    directory = crashed_journal(tmp_path)

    def replay(record: JournalRecord) -> bool:
        raise OSError(28, "No space left on device")

    report = replay_orphans(tmp_path / ".journal", replay, lambda: flushes.append("flush"))
    assert report.failed and "No space left" in report.failed[0]
    assert directory.exists() and flushes == []
    again = replay_orphans(tmp_path / ".journal", lambda r: True, lambda: None)
    assert again.instances == 5 and not directory.exists()


def test_a_failed_flush_fails_its_records_and_the_next_go_to_a_new_segment(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = make_journal(tmp_path, flushes)
    real = os.fdatasync
    failing = [True]

    def fdatasync(fd: int) -> None:
        if failing[0]:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    with pytest.raises(JournalError, match="Input/output error"):
        journal.append({"i": 0}, b"lost")
    failing[0] = False
    journal.done(journal.append({"i": 1}, b"kept"))
    assert len(segments(journal)) == 2
    journal.close()


def test_a_failed_checkpoint_keeps_the_journal_and_counts(
    tmp_path: Path, flushes: list[str]
) -> None:
    failures = metrics.JOURNAL_CHECKPOINT_FAILURES._value.get()
    broken = [True]

    def flush_ledger() -> None:
        if broken[0]:
            raise OSError(5, "Input/output error")
        flushes.append("ledger")

    journal = IngestJournal(tmp_path / ".journal", tmp_path, flush_ledger, checkpoint_s=0.05)
    journal.open()
    journal.done(journal.append({"i": 0}, b"data"))
    deadline = time.monotonic() + 5
    while metrics.JOURNAL_CHECKPOINT_FAILURES._value.get() == failures:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [r.meta for r in read_journal(journal.directory)] == [{"i": 0}]
    broken[0] = False
    while journal.pending_records:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "ledger" in flushes
    journal.close()


def test_a_checkpoint_failing_for_long_logs_one_traceback_not_one_a_second(
    tmp_path: Path, flushes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk lasting hours: the checkpoint is tried again every second and counted
    each time, but its traceback is logged once (a traceback a second filled the log of a
    node whose data disk was full), and its recovery once."""
    failures = metrics.JOURNAL_CHECKPOINT_FAILURES._value.get()
    broken = [True]

    def flush_ledger() -> None:
        if broken[0]:
            raise OSError(28, "No space left on device")
        flushes.append("ledger")

    journal = IngestJournal(tmp_path / ".journal", tmp_path, flush_ledger, checkpoint_s=0.05)
    journal.retry_s = 0.01
    caplog.set_level(logging.INFO, logger="acwi_node.ingest")
    journal.open()
    journal.done(journal.append({"i": 0}, b"data"))
    deadline = time.monotonic() + 10
    while metrics.JOURNAL_CHECKPOINT_FAILURES._value.get() < failures + 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    broken[0] = False
    while journal.pending_records:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    journal.close()
    said = [r for r in caplog.records if "checkpoint" in r.getMessage()]
    assert len([r for r in said if r.exc_info]) == 1, [r.getMessage() for r in said]
    assert len(said) == 2, [r.getMessage() for r in said]
    assert "done after" in said[-1].getMessage()
    assert "No space left on device" in said[-1].getMessage()


def test_a_record_written_while_the_journal_closes_is_still_flushed(
    tmp_path: Path, flushes: list[str]
) -> None:
    journal = make_journal(tmp_path, flushes)
    flusher = journal._flusher
    assert flusher is not None
    with journal._lock:  # closing: the flusher stops first
        journal._stop_flusher = True
        journal._dirty.notify_all()
    flusher.join(5)
    ticket = journal.write({"i": 0}, b"late")  # an association still sending at shutdown
    waiter = threading.Thread(target=journal.wait_durable, args=(ticket,), daemon=True)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive(), "nobody flushed the record"
    assert ticket.segment.synced >= ticket.end
    journal.done(ticket)
    journal.close()
    assert list((tmp_path / ".journal").iterdir()) == []


def test_syncfs_is_looked_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libc's syncfs is found once per process, not on every flush (``find_library`` runs
    ``ldconfig``, a millisecond each time)."""
    import ctypes.util

    looked_up: list[str] = []
    real = ctypes.util.find_library

    def counting(name: str) -> str | None:
        looked_up.append(name)
        return real(name)

    monkeypatch.setattr(ctypes.util, "find_library", counting)
    journal_module._syncfs.cache_clear()
    try:
        for _ in range(3):
            sync_filesystem(tmp_path)
    finally:
        journal_module._syncfs.cache_clear()
    assert looked_up == ["c"]


def test_a_segment_whose_close_reported_an_error_is_not_closed_again(
    tmp_path: Path, flushes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() may report an error (NFS reports a failed write-back there: EIO, ENOSPC),
    having released the descriptor all the same (Linux). The checkpoint failed on it, and its
    next try closed the segment's number again: whatever file another thread had opened
    meanwhile (an association's spool file, the ledger's database) lost its descriptor."""
    journal = make_journal(tmp_path, flushes)
    journal.done(journal.append({"i": 0}, b"data"))
    segment_fd = journal._segments[0].fd
    failing = CloseReportingAnError(
        tmp_path / "ledger.sqlite", errno.EIO, which=lambda fd: fd == segment_fd
    )
    monkeypatch.setattr(os, "close", failing)
    try:
        with contextlib.suppress(OSError):
            journal.checkpoint()  # retires the segment
        journal.checkpoint()  # the checkpointer's next try
        os.fstat(failing.others[0])  # still open
    finally:
        monkeypatch.setattr(os, "close", REAL_CLOSE)
        failing.close_others()
        journal.close()


def test_a_spare_whose_close_reported_an_error_is_not_closed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a segment: the spare's close reporting an error left it half-prepared, and the
    next idle moment closed its number again."""
    journal = IngestJournal(
        tmp_path / ".journal", tmp_path, lambda: None, preallocate_bytes=1 << 20
    )
    journal.directory.mkdir(parents=True)  # as open() makes it, without the threads
    journal._segments.append(journal._new_segment())
    failing = CloseReportingAnError(
        tmp_path / "ledger.sqlite",
        errno.EIO,
        which=lambda fd: os.readlink(f"/proc/self/fd/{fd}").endswith(".spare"),
    )
    monkeypatch.setattr(os, "close", failing)
    try:
        with contextlib.suppress(OSError):
            journal._prepare_spare()
        journal._prepare_spare()  # the next idle moment
        os.fstat(failing.others[0])  # still open
    finally:
        monkeypatch.setattr(os, "close", REAL_CLOSE)
        failing.close_others()
        for seg in journal._segments:
            REAL_CLOSE(seg.fd)


def test_two_checkpoints_at_once_retire_each_segment_once(
    tmp_path: Path, flushes: list[str]
) -> None:
    """A checkpoint called while another runs (the checkpointer thread's and a caller's)
    waits for it: both retired the same segment, the second closing its file again (whatever
    another thread had opened since under that number: a test's read of a spool file failed
    with EBADF) and failing."""
    inside, go_on = threading.Event(), threading.Event()

    def flush_ledger() -> None:
        inside.set()
        go_on.wait(10)

    journal = IngestJournal(
        tmp_path / ".journal", tmp_path, flush_ledger, checkpoint_s=3600.0, checkpoint_idle_s=3600.0
    )
    journal.open()
    for i in range(3):
        journal.done(journal.append({"i": i}, b"data"))
    outcomes: list[object] = []

    def checkpoint() -> None:
        try:
            outcomes.append(journal.checkpoint())
        except Exception as exc:  # noqa: BLE001 - what the second one raised
            outcomes.append(exc)

    first = threading.Thread(target=checkpoint)
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=checkpoint)
    second.start()
    second.join(0.5)  # it waits for the first (it went on to retire the same segment)
    go_on.set()
    first.join(10)
    second.join(10)
    assert sorted(map(str, outcomes)) == ["0", "3"]
    journal.close()
