"""The ingest journal: an instance is durable once it is here, before its spool file is.

Answering a C-STORE with success promises that the instance survives a crash, power loss
included. Making the spool file, its directory entry and the ledger row durable one by one costs
three flushes to disk per instance, and on small instances those flushes are nearly all of the
node's time. The journal needs one, shared by every association of the process:

1. The SCP appends a record (what the ledger needs to know, then the Part 10 bytes) to the
   journal's current segment.
2. It flushes the segment itself (``fdatasync``, :meth:`IngestJournal.wait_durable`) and
   answers success once its record is on disk; then (on the fast path; before the flush
   otherwise) it writes the spool file and the ledger row without flushing them. Should
   either fail, :meth:`IngestJournal.unrecorded` has the checkpoint replay the record. One
   flush covers every record written before it started, from every association of the
   process: an association that finds a flush running waits for it, and flushes itself only
   what that flush did not cover (a group commit whose leader is whoever needs a flush next).
   No thread is woken for it, and none has to hand it back; a caller with other work to do
   before it waits has the record's writeback started (``sync_file_range``), so its blocks
   travel to the disk meanwhile. A dedicated flusher thread (the design before this one)
   overlapped the whole flush with the spool file, but the two hand-overs between threads
   cost more: small instances on one association, side by side, 484 -> 640 per second
   (medians of ten rounds), CPU time per instance 1.55 -> 1.10 ms.
3. A checkpointer thread starts a new segment, waits until every instance of the old ones is
   in the spool and the ledger, flushes the spool's file system (``syncfs``) and the ledger,
   and only then deletes those segments. It does so once the process has journaled nothing
   for ``checkpoint_idle_s`` (a study has arrived: the flush costs no sender anything), else
   once the journal holds ``checkpoint_bytes`` or its oldest record is ``checkpoint_s`` old,
   as databases checkpoint on time or log size. A checkpoint in the middle of a burst makes
   the associations' own flushes wait behind the spool's (every byte of a CT series reaching
   the disk twice while the sender waits): on one association, side by side with the earlier
   policy (every 2 s and whenever a 64 MiB segment filled; ``bench/ingest.py`` target
   ``node-eager-checkpoint``), five rounds, medians, 400 CT slices went from 419 to 503 per
   second and 2,000 small instances from 1,417 to 1,692. Spare segments (64 MiB of zeros
   each) are written only while the process is idle, for the same reason.
4. When a process starts, it replays the journals of processes that are gone (a journal
   directory whose lock nobody holds): every record's spool file is written again and its
   ledger row added where it is missing. What a crash took from the page cache comes back.
   What the ledger settled after a record was written (a journal restored from a backup: its
   study purged since, the instance sent again since) is left out. The completion loop of a
   running ``scp`` process replays them too (:mod:`.orphans`), every few seconds and before
   it completes a study: a process killed and not started again (a listener that keeps
   failing, another host) would otherwise leave the instances it acknowledged out of the
   ledger while its studies complete, by ``completion.max_wait_s`` or by another process's
   association. A journal is replayed by whoever takes its lock, and its owner's associations
   are released only once its records are in the ledger; replayers take turns (the lock of
   ``.journal.replay`` beside the folder), so one that finds another at work waits for it.

This is the write-ahead rule databases follow: the journal is flushed before the ledger row
exists, so no durable ledger row can point at a spool file that a power loss took away.

A large instance (over ``ingest.journal_max_bytes``, 1 MiB: a radiograph, a multi-frame
object) would cost more to write twice than to flush once in the spool; a CT or MR slice costs
less: flushing its 512 KB into a preallocated segment is one write to the disk, flushing a new
spool file is three (its data, its inode and directory entries, and the rename's directory),
and its spool file is written after the answer, while the sender prepares the next one.
A large instance's bytes go only to the spool file, flushed there (file, then directory
entry), and the journal gets a *spooled* record instead: the ledger's facts, the file's size
and CRC-32, no payload. That record is flushed while the file is, by the journal's flusher
thread (the two flushes overlap: here the overlap is worth the hand-over), and the ledger row
is again written without a flush of its own once both are on disk. A replay keeps a spooled
record only if the file holds exactly what it names: if a crash came between the two flushes,
the instance was never acknowledged, and the replay falls back on the previous record for that
file, if any.

Layout: ``<spool>/.journal/<process id>-<random>/`` holds ``lock`` (``flock``-ed by its owner
for its whole life), segments ``<seq>.wal`` and spare segments ``<n>.spare``. A record is a
fixed header (magic, kind, record number, meta length, payload length, CRC-32 of the rest), the
JSON meta, then the payload. A record cut short by a crash, or with a wrong CRC, ends the replay
of its segment.

Segments are written in place, not appended to: a new segment starts as
:data:`PREALLOCATE_BYTES` of zeros, and a retired one becomes a spare and, renamed, the next
segment. Flushing a record then writes its blocks and nothing else (no new file size, no new
blocks to map), which takes about a third less time per flush. A reused segment still holds
records of its earlier use after the new ones; each record's CRC-32 is XOR-ed with its
segment's number (never reused in one journal), so such a record fails its check and ends the
segment, as does a record number not above the one before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from acwi_node.ingest.checksum import crc32, crc32_of
from acwi_node.ingest.spool import Buffers, buffers, fsync_dir, write_all
from acwi_node.observability import metrics

log = logging.getLogger("acwi_node.ingest")

#: Records written by this version: the CRC-32 (of payload, meta, then header) XOR the
#: segment's number (see the module's docstring).
MAGIC = b"AJR2"
#: Records of earlier versions (CRC-32 from zero), still replayed.
MAGIC_V1 = b"AJR1"
KIND_INSTANCE = 1
#: Withdraws an instance record: the SCP answered a failure for it after journaling it.
KIND_WITHDRAWN = 2
#: An instance whose bytes are in its spool file, flushed there: the meta holds their CRC-32.
KIND_SPOOLED = 3
#: The meta key holding a spooled record's CRC-32.
SPOOLED_CRC = "spooled_crc32"
#: magic, kind, record number, time written (ns since the epoch), meta length, payload length,
#: CRC-32 of (the fields before it, meta and payload).
_HEADER = struct.Struct("<4sBQQIQI")
#: A record's meta as compact JSON (one encoder for every record: ``json.dumps`` with
#: separators makes a new one per call).
_META_ENCODER = json.JSONEncoder(separators=(",", ":"))

#: The folder of the spool holding the journals (one folder per SCP process).
JOURNAL_DIR = ".journal"
#: Beside that folder, the file whose lock one process replaying orphaned journals holds.
REPLAY_LOCK_SUFFIX = ".replay"

#: A segment this large gets a successor (the checkpoint retires whole segments).
SEGMENT_BYTES = 64 << 20
#: Checkpoint once the segments not yet retired hold this much (a CT series of 500 slices).
CHECKPOINT_BYTES = 256 << 20
#: Bytes of zeros written into a new segment before it takes records: a flush that only
#: overwrites blocks the file already has needs no change to its size or block map, one write
#: to the disk instead of two. The whole segment: CT slices (512 KB each, journaled whole)
#: fill one in a second or less, and a flush that also grows the file costs CT ingest about
#: 15 % (16 MiB preallocated against 64 MiB, side by side). Writing the first one takes about
#: 70 ms when the SCP starts; the checkpointer writes spares while the process is idle.
PREALLOCATE_BYTES = SEGMENT_BYTES
#: Retired segments kept for reuse (renamed, their space already allocated), at least; as
#: many as a journal of ``checkpoint_bytes`` needs, so that a burst that long never grows
#: or zeroes a segment while associations wait for their flushes.
SPARE_SEGMENTS = 2


#: How far ahead of the write position a segment's pages are read into the page cache, and in
#: steps of how much (see :func:`read_ahead`).
READ_AHEAD_BYTES = 1 << 20
#: Records up to this size are read ahead for; a larger one covers most of its pages whole,
#: and only the page its successor would end in, were it as large, is read ahead (the slices
#: of a series are all one size; the record's last page is the one written in part).
READ_AHEAD_RECORD_MAX = 64 << 10
#: The window read ahead around that page.
READ_AHEAD_PAGE = 4096

#: A CRC-32 is 32 bits.
_CRC_MASK = 0xFFFFFFFF


def _preallocate(fd: int, size: int) -> None:
    """``size`` bytes of zeros at the start of ``fd``, flushed; without room for them, none
    (the file grows as it is written instead)."""
    chunk = bytes(min(size, 1 << 20))
    offset = 0
    try:
        while offset < size:
            offset += os.pwrite(fd, chunk[: size - offset], offset)
        if size:
            os.fdatasync(fd)
    except OSError:
        os.ftruncate(fd, 0)


#: Seconds between tries of a checkpoint that failed (a full disk, a ledger down).
CHECKPOINT_RETRY_S = 1.0
#: While a checkpoint keeps failing the same way it is tried every CHECKPOINT_RETRY_S and
#: counted each time, but logged again (one line) at most this often: a full disk outlasting
#: a night must not fill the log with a traceback a second.
CHECKPOINT_FAILURE_LOG_S = 60.0

#: What a spare segment is written with, a MiB at a time.
_ZEROS = bytes(1 << 20)


@dataclass(slots=True)
class _PartialSpare:
    """A spare segment being written: its first ``written`` bytes are zeros."""

    path: Path
    fd: int
    written: int = 0


class JournalError(OSError):
    """The journal could not take a record; ``out_of_space`` as for the spool."""

    def __init__(self, message: str, *, out_of_space: bool) -> None:
        super().__init__(message)
        self.out_of_space = out_of_space


@dataclass
class _Segment:
    seq: int
    path: Path
    fd: int
    size: int = 0
    synced: int = 0
    #: Instances appended here whose spool file and ledger row are not written yet.
    in_flight: int = 0
    records: int = 0
    #: True while a flush of this segment runs (it must stay open meanwhile).
    flushing: bool = False
    #: Flush up to here in the background (the flusher thread): spooled records.
    wanted: int = 0
    #: Set when a flush failed: no record after ``synced`` can be promised durable.
    error: str = ""
    #: Numbers of records acknowledged without a ledger row (see ``IngestJournal.unrecorded``).
    unrecorded: set[int] = field(default_factory=set)
    #: time.monotonic() of its first record (None while it has none).
    first_write: float | None = None
    #: Where the read-ahead of the segment's pages has got to (see :func:`read_ahead`).
    read_ahead: int = 0


@dataclass(frozen=True)
class Ticket:
    """One journaled instance, until the SCP is done with it."""

    segment: _Segment
    number: int
    end: int


@dataclass(frozen=True)
class JournalRecord:
    kind: int
    number: int
    time_ns: int
    meta: dict[str, Any]
    payload: bytes

    @property
    def spooled(self) -> bool:
        """The instance's bytes are in its spool file, not here (see :meth:`matches`)."""
        return self.kind == KIND_SPOOLED

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` (the spool file's bytes) is what this spooled record was written
        for: a crash may have taken the file, or cut it, before it was flushed."""
        return crc32(data) == self.meta.get(SPOOLED_CRC)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    libc_name = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(libc_name), "sync_file_range", None) if libc_name else None
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a file's range to disk, without waiting (Linux's
    ``sync_file_range(..., SYNC_FILE_RANGE_WRITE)``; elsewhere nothing). Only a head start
    for the ``fdatasync`` that follows, which alone makes the data durable."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def read_ahead(fd: int, offset: int, length: int) -> None:
    """Start reading ``fd``'s bytes at ``offset`` into the page cache, without waiting
    (``posix_fadvise(..., POSIX_FADV_WILLNEED)``; where there is none, nothing).

    A record that fills part of a page of its segment, when that page has left the page cache
    (the segment was written at start-up, or it is a spare from long ago, and received files
    pushed it out), makes the kernel read the page from the disk before it copies the record
    in: the association waits for a disk read on top of the flush. Read ahead, the pages are
    in memory before the records reach them."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, offset, length, os.POSIX_FADV_WILLNEED)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs``, looked up once (``find_library`` runs ``ldconfig``: a millisecond,
    every STOW-RS request and journal checkpoint paid it); None where there is none."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    return cast(
        "Callable[[int], int] | None",
        getattr(ctypes.CDLL(libc_name, use_errno=True), "syncfs", None),
    )


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page and directory entry of the file system holding ``path``."""
    syncfs = _syncfs()
    if syncfs is None:  # not Linux: the whole machine
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class IngestJournal:
    """One process's journal. ``flush_ledger`` makes every ledger write so far durable.

    ``fsync=False`` (tests only) keeps the records but never flushes anything.
    """

    def __init__(
        self,
        root: Path,
        spool_root: Path,
        flush_ledger: Callable[[], None],
        *,
        checkpoint_s: float = 10.0,
        checkpoint_idle_s: float = 0.5,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        fsync: bool = True,
        segment_bytes: int = SEGMENT_BYTES,
        preallocate_bytes: int = PREALLOCATE_BYTES,
        replay: Callable[[JournalRecord], object] | None = None,
    ) -> None:
        self.root = root
        self.spool_root = spool_root
        self.flush_ledger = flush_ledger
        #: Writes one record's spool file and ledger row (see :meth:`unrecorded`).
        self.replay = replay
        #: At the latest, seconds from a record to the checkpoint that retires it.
        self.checkpoint_s = checkpoint_s
        #: Checkpoint once nothing was journaled for this long (seconds).
        self.checkpoint_idle_s = checkpoint_idle_s
        #: Checkpoint once the segments not yet retired hold this many bytes.
        self.checkpoint_bytes = checkpoint_bytes
        self.max_spares = max(SPARE_SEGMENTS, -(-checkpoint_bytes // segment_bytes))
        #: time.monotonic() of the last record written.
        self._last_write = 0.0
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        #: Zeros written into a new segment (none without flushes: nothing to gain).
        self.preallocate_bytes = preallocate_bytes if fsync else 0
        #: Retired segments to reuse, oldest first.
        self._spares: list[Path] = []
        self._next_spare = 1
        #: A spare being written, between idle moments (only the checkpointer touches it).
        self._partial_spare: _PartialSpare | None = None
        self.directory = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        #: One checkpoint at a time (the checkpointer thread's, a caller's): two would each
        #: retire the same segments, closing each file twice (the second close() closing
        #: whatever another thread had opened since under that number).
        self._checkpointing = threading.Lock()
        #: Records were written (the flusher waits on this) / a flush ended (writers wait).
        self._dirty = threading.Condition(self._lock)
        self._flushed = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._stop_flusher = False
        self._segments: list[_Segment] = []
        self._next_seq = 1
        self._next_number = 1
        self._lock_fd = -1
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0
        #: Seconds between tries of a checkpoint that failed.
        self.retry_s = CHECKPOINT_RETRY_S
        #: A checkpoint failing again the same way is logged at most this often (seconds).
        self.failure_log_s = CHECKPOINT_FAILURE_LOG_S

    # ---------------------------------------------------------------- life
    def open(self) -> None:
        """Create this process's journal directory and start the checkpointer."""
        # Made under a hidden name and locked before it gets its real one: a process replaying
        # orphans never takes a journal that is being created for its owner.
        staging = self.root / f".{self.directory.name}"
        staging.mkdir(parents=True)
        self._lock_fd = os.open(staging / "lock", os.O_WRONLY | os.O_CREAT, 0o640)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        staging.rename(self.directory)
        with self._lock:
            self._segments.append(self._new_segment(zeros=True))
        if self.fsync:
            fsync_dir(self.root)
        self._thread = threading.Thread(
            target=self._checkpoint_loop, name="acwi-journal-checkpoint", daemon=True
        )
        self._thread.start()
        if self.fsync:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="acwi-journal-flush", daemon=True
            )
            self._flusher.start()

    def close(self, *, keep: bool = False) -> None:
        """Checkpoint everything and remove this journal (a clean stop leaves none).

        ``keep``: leave the journal, unlocked, once checkpointed (nothing in it to replay):
        its owner still holds associations it could not release (the ledger down), and the
        next process to find it orphaned releases them (:func:`replay_orphans`)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._flusher is not None:
            with self._lock:
                self._stop_flusher = True
                self._dirty.notify_all()
            self._flusher.join()
            self._flusher = None
        self._discard_partial_spare()
        if self._lock_fd < 0:
            return
        try:
            self.checkpoint(final=True)
        except OSError:
            log.exception("ingest journal: the last checkpoint failed; it is replayed at start")
            return
        if not keep:
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1

    def _new_segment(self, *, zeros: bool = False) -> _Segment:
        """The next segment: a spare renamed, else a new file (``zeros``: preallocated, else
        it grows as it is written; the checkpointer prepares spares meanwhile)."""
        seq = self._next_seq
        self._next_seq += 1
        path = self.directory / f"{seq:012d}.wal"
        if self._spares:
            os.rename(self._spares.pop(0), path)
            fd = os.open(path, os.O_RDWR)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
            if zeros:
                _preallocate(fd, self.preallocate_bytes)
        if self.fsync:
            fsync_dir(self.directory)  # the segment's name must survive a crash too
        return _Segment(seq=seq, path=path, fd=fd)

    def _prepare_spare(self) -> None:
        """Without a spare segment, write one (outside the lock: writers go on meanwhile), a
        MiB at a time while the process stays idle (:meth:`_idle`): once a record comes, the
        rest waits for the next idle moment, so that an association's flushes never wait
        behind 64 MiB of zeros (as the first burst after a start did)."""
        with self._lock:
            if self._spares or not self.preallocate_bytes or not self._segments:
                return
            if self._partial_spare is None:
                spare = self.directory / f"{self._next_spare:012d}.spare"
                self._next_spare += 1
                fd = os.open(spare, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
                self._partial_spare = _PartialSpare(spare, fd)
            partial = self._partial_spare
        size = self.preallocate_bytes
        try:
            while partial.written < size:
                if not self._idle() or self._stop.is_set():
                    return  # the rest when idle again
                end = min(size, partial.written + len(_ZEROS))
                partial.written += os.pwrite(
                    partial.fd, _ZEROS[: end - partial.written], partial.written
                )
            if not self._idle() or self._stop.is_set():
                return  # its flush, too, waits for an idle moment
            os.fdatasync(partial.fd)
        except OSError:
            # No room for the zeros: an empty spare, which grows as it is written (as
            # ``_preallocate`` leaves a segment).
            with contextlib.suppress(OSError):
                os.ftruncate(partial.fd, 0)
        with contextlib.suppress(OSError):  # released even if close() reports an error
            os.close(partial.fd)
        with self._lock:
            self._partial_spare = None
            self._spares.append(partial.path)

    def _discard_partial_spare(self) -> None:
        """Remove a spare segment not fully written (the journal closes)."""
        partial, self._partial_spare = self._partial_spare, None
        if partial is not None:
            with contextlib.suppress(OSError):
                os.close(partial.fd)
            partial.path.unlink(missing_ok=True)

    def _retire(self, seg: _Segment) -> None:
        """Close a checkpointed segment; keep it as a spare, or delete it."""
        # A close() that reports an error (NFS: a failed write-back) has released the number
        # all the same, and the segment's records are in the spool and the ledger: closing it
        # again at the next checkpoint would close whatever file another thread opened since.
        with contextlib.suppress(OSError):
            os.close(seg.fd)
        if self.preallocate_bytes and not seg.error and len(self._spares) < self.max_spares:
            spare = self.directory / f"{self._next_spare:012d}.spare"
            self._next_spare += 1
            try:
                os.rename(seg.path, spare)
            except OSError:
                seg.path.unlink(missing_ok=True)
            else:
                self._spares.append(spare)
                return
        seg.path.unlink(missing_ok=True)

    # ------------------------------------------------------------- records
    def append(self, meta: dict[str, Any], payload: Buffers) -> Ticket:
        """Journal one instance and wait until it is on disk. Call :meth:`done` afterwards."""
        ticket = self.write(meta, payload)
        try:
            self.wait_durable(ticket)
        except BaseException:
            self.done(ticket)
            raise
        return ticket

    def write(
        self,
        meta: dict[str, Any],
        payload: Buffers,
        *,
        head_start: bool = True,
        payload_crc: int | None = None,
    ) -> Ticket:
        """Journal one instance (written, not flushed). Before answering for it,
        :meth:`wait_durable`; in any case :meth:`done` afterwards.

        ``head_start``: start the record's writeback now (:func:`start_writeback`), for a
        caller that does other work before it waits; not for one that waits at once (starting
        the writeback is a system call that the flush would make anyway). ``payload_crc``: the
        CRC-32 of ``payload``, where the caller has it already (not computed twice)."""
        return self._write(
            KIND_INSTANCE, meta, payload, head_start=head_start, payload_crc=payload_crc
        )

    def write_spooled(
        self, meta: dict[str, Any], data: Buffers, *, data_crc: int | None = None
    ) -> Ticket:
        """Journal an instance whose ``data`` the caller flushes in the spool itself: only
        ``meta`` and the CRC-32 of ``data`` (``data_crc``, or computed here) are written, and
        the flusher thread flushes the record at once, while the caller flushes the file. As
        for :meth:`write`, then."""
        crc = crc32_of(buffers(data)) if data_crc is None else data_crc
        return self._write(KIND_SPOOLED, {**meta, SPOOLED_CRC: crc}, b"", background=True)

    def wait_durable(self, ticket: Ticket) -> None:
        """Return once the record is on disk, flushing the segment here unless a flush that
        covers the record runs already; raises :class:`JournalError` if it cannot be."""
        if not self.fsync:
            return
        seg = ticket.segment
        with self._lock:
            while seg.synced < ticket.end:
                if seg.error:
                    raise JournalError(
                        f"cannot flush the ingest journal: {seg.error}", out_of_space=False
                    )
                if not seg.flushing:
                    seg.flushing = True  # this thread flushes, for everyone waiting
                    target = seg.size
                    break
                self._flushed.wait()
            else:
                return
        self._flush(seg, target)

    def _flush(self, seg: _Segment, target: int) -> None:
        """Flush ``seg``, whose ``flushing`` the caller set, and record that every byte up to
        ``target`` is on disk; raises :class:`JournalError` if the flush fails."""
        error = ""
        try:
            os.fdatasync(seg.fd)
        except OSError as exc:
            error = exc.strerror or str(exc)
        with self._lock:
            seg.flushing = False
            if error:
                # What the file holds after a failed flush is unknown: the records not flushed
                # yet fail, and later ones go to a new segment.
                seg.error = error
                log.error("ingest journal: flush failed: %s", error)
                if seg is self._segments[-1]:
                    with contextlib.suppress(OSError):
                        self._segments.append(self._new_segment())
            else:
                seg.synced = max(seg.synced, target)
            self._flushed.notify_all()
            self._done.notify_all()
            if seg.wanted > seg.synced:  # left to this flush by the flusher thread
                self._dirty.notify_all()
        if error:
            raise JournalError(f"cannot flush the ingest journal: {error}", out_of_space=False)

    def withdraw(self, ticket: Ticket) -> None:
        """The instance was refused after all: a replay must not store it (best effort)."""
        try:
            self.done(self._write(KIND_WITHDRAWN, {"withdraws": ticket.number}, b""))
        except JournalError:
            log.warning("ingest journal: could not withdraw a refused instance")

    def unrecorded(self, ticket: Ticket) -> None:
        """The instance was acknowledged, but its spool file or ledger row could not be
        written: before its segment is retired, the checkpoint replays the record (``replay``),
        and until that succeeds the segment stays. Call :meth:`done` as usual."""
        with self._lock:
            ticket.segment.unrecorded.add(ticket.number)

    def done(self, ticket: Ticket) -> None:
        """The instance's spool file and ledger row are written (or it was refused)."""
        with self._lock:
            ticket.segment.in_flight -= 1
            if ticket.segment.in_flight == 0:
                self._done.notify_all()

    def _write(
        self,
        kind: int,
        meta: dict[str, Any],
        payload: Buffers,
        *,
        background: bool = False,
        head_start: bool = True,
        payload_crc: int | None = None,
    ) -> Ticket:
        meta_bytes = _META_ENCODER.encode(meta).encode()
        payload_parts = buffers(payload)
        payload_size = sum(len(p) for p in payload_parts)
        if payload_crc is None:
            payload_crc = crc32_of(payload_parts)
        # Outside the lock (the CRC lets other threads run meanwhile): all but the header's CRC.
        body_crc = crc32(meta_bytes, payload_crc)
        with self._lock:
            if not self._segments:
                raise JournalError("the ingest journal is closed", out_of_space=False)
            seg = self._segments[-1]
            number = self._next_number
            head = _HEADER.pack(
                MAGIC, kind, number, time.time_ns(), len(meta_bytes), payload_size, 0
            )[:-4]
            crc = crc32(head, body_crc) ^ (seg.seq & _CRC_MASK)
            parts = [head + struct.pack("<I", crc), meta_bytes, *payload_parts]
            total = len(head) + 4 + len(meta_bytes) + payload_size
            if total > READ_AHEAD_RECORD_MAX:
                seg.read_ahead = max(seg.read_ahead, seg.size + total)
                read_ahead(seg.fd, seg.size + 2 * total - READ_AHEAD_PAGE, 2 * READ_AHEAD_PAGE)
            elif seg.size + total + READ_AHEAD_BYTES // 2 > seg.read_ahead:
                # Half the read-ahead left: the next step (a system call a MiB, not a wait).
                start = max(seg.read_ahead, seg.size)
                read_ahead(seg.fd, start, READ_AHEAD_BYTES)
                seg.read_ahead = start + READ_AHEAD_BYTES
            try:
                write_all(seg.fd, parts, seg.size)
            except OSError as exc:
                # Whatever part was written ends the segment's replay there (bad CRC or short):
                # start a new segment so that later records stay readable.
                with contextlib.suppress(OSError):
                    self._segments.append(self._new_segment())
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                raise JournalError(
                    f"cannot write to the ingest journal: {exc.strerror or exc}", out_of_space=full
                ) from exc
            self._next_number += 1
            seg.size += total
            seg.records += 1
            seg.in_flight += 1
            ticket = Ticket(seg, number, seg.size)
            self._last_write = time.monotonic()
            if seg.first_write is None:
                seg.first_write = self._last_write
                self._wake.set()  # the checkpointer may be waiting with nothing to do
            if background and self.fsync:
                seg.wanted = seg.size
                self._dirty.notify()
            if seg.size >= self.segment_bytes:
                self._segments.append(self._new_segment())
                self._wake.set()  # the checkpointer sees whether the journal is full
        if self.fsync and head_start and not background:
            # The record's blocks go to the disk while the caller writes the spool file; the
            # flush that its wait_durable makes then has less left to wait for.
            start_writeback(seg.fd, ticket.end - total, total)
        return ticket

    def _flush_loop(self) -> None:
        """Flush what :meth:`write_spooled` asked to be flushed in the background, at once;
        a segment that an association is flushing meanwhile is left to it."""
        while True:
            with self._lock:
                while True:
                    work = [
                        s
                        for s in self._segments
                        if s.wanted > s.synced and not s.flushing and not s.error
                    ]
                    if work or self._stop_flusher:
                        break
                    self._dirty.wait()
                if not work:
                    return
                targets = [(seg, seg.size) for seg in work]
                for seg in work:
                    seg.flushing = True
            for seg, target in targets:
                with contextlib.suppress(JournalError):  # logged; its waiters raise
                    self._flush(seg, target)

    # ---------------------------------------------------------- checkpoint
    def _checkpoint_loop(self) -> None:
        # A checkpoint that keeps failing the same way (a full disk for hours) is tried every
        # second and counted each time, but logged with its traceback once, then a line at
        # most every CHECKPOINT_FAILURE_LOG_S, and once more when it works again.
        failing: str | None = None
        failures = 0
        logged_at = 0.0
        while not self._stop.is_set():
            due_in = self._checkpoint_due_in()
            if due_in > 0:
                if self._idle():
                    try:
                        self._prepare_spare()  # 64 MiB of zeros: not while senders wait
                    except OSError as exc:
                        log.warning("ingest journal: cannot prepare a spare segment: %s", exc)
                self._wake.wait(due_in)
                self._wake.clear()
                continue
            try:
                self.checkpoint()
            except Exception as exc:
                metrics.JOURNAL_CHECKPOINT_FAILURES.inc()
                failures += 1
                lines = str(exc).splitlines()
                what = f"{type(exc).__name__}: {lines[0] if lines else ''}"
                now = time.monotonic()
                if what != failing:
                    log.exception("ingest journal: checkpoint failed; trying again")
                    failing, logged_at = what, now
                elif now - logged_at >= self.failure_log_s:
                    log.error(
                        "ingest journal: checkpoint still failing after %d tries (%s);"
                        " trying again",
                        failures,
                        what,
                    )
                    logged_at = now
                self._stop.wait(self.retry_s)
                continue
            if failing is not None:
                log.warning(
                    "ingest journal: checkpoint done after %d failed tries (%s)", failures, failing
                )
                failing, failures = None, 0

    def _idle(self) -> bool:
        """Nothing journaled for ``checkpoint_idle_s``, or nothing to checkpoint."""
        with self._lock:
            pending = any(s.first_write is not None for s in self._segments)
            return not pending or time.monotonic() - self._last_write >= self.checkpoint_idle_s

    def _checkpoint_due_in(self) -> float:
        """Seconds until the next checkpoint is due, 0 if it is due now: the process has
        journaled nothing for ``checkpoint_idle_s``, the oldest record not yet checkpointed is
        ``checkpoint_s`` old, or the journal holds ``checkpoint_bytes``."""
        with self._lock:
            starts = [s.first_write for s in self._segments if s.first_write is not None]
            if not starts:
                return self.checkpoint_s  # nothing to checkpoint
            if sum(s.size for s in self._segments) >= self.checkpoint_bytes:
                return 0.0
            now = time.monotonic()
            idle_in = self._last_write + self.checkpoint_idle_s - now
            age_in = min(starts) + self.checkpoint_s - now
            return max(0.0, min(idle_in, age_in))

    def checkpoint(self, *, final: bool = False) -> int:
        """Make the instances of every finished segment durable in the spool and the ledger,
        then delete those segments; returns how many records that retired. ``final``: the
        current segment too (the SCP has stopped). A checkpoint called while another runs
        waits for it."""
        with self._checkpointing:
            return self._checkpoint(final)

    def _checkpoint(self, final: bool) -> int:
        with self._lock:
            if not final and self._segments[-1].records:
                self._segments.append(self._new_segment())
            old = list(self._segments) if final else self._segments[:-1]
            if not old:
                return 0
            # Wait until the SCP has written every journaled instance of these segments, and
            # the flusher has let go of them.
            while any(s.in_flight or s.flushing for s in old):
                self._done.wait(1.0)
            unrecorded = [(seg, set(seg.unrecorded)) for seg in old if seg.unrecorded]
        for seg, numbers in unrecorded:
            self._record_again(seg, numbers)
        if self.fsync and any(s.records for s in old):
            sync_filesystem(self.spool_root)
            self.flush_ledger()
        retired = 0
        with self._lock:
            for seg in old:
                self._retire(seg)
                self._segments.remove(seg)
                retired += seg.records
        self.checkpoints += 1
        return retired

    def _record_again(self, seg: _Segment, numbers: set[int]) -> None:
        """Replay the records ``numbers`` of ``seg`` (acknowledged instances without a ledger
        row); raises, keeping the segment, while that fails."""
        if self.replay is None:
            raise JournalError(
                f"{len(numbers)} acknowledged instance(s) lack a ledger row and this journal"
                " cannot replay them",
                out_of_space=False,
            )
        replayed = 0
        for record in read_segment(seg.path):
            if record.number in numbers:
                self.replay(record)  # raises while the ledger still fails: the segment stays
                replayed += 1
        with self._lock:
            seg.unrecorded -= numbers
        log.info("ingest journal: %d acknowledged instance(s) recorded in the ledger", replayed)

    @property
    def written_bytes(self) -> int:
        """Bytes of records in the segments not yet checkpointed (their files are longer)."""
        with self._lock:
            return sum(s.size for s in self._segments)

    @property
    def spare_segments(self) -> int:
        with self._lock:
            return len(self._spares)

    @property
    def pending_records(self) -> int:
        """Records not yet checkpointed (health and tests)."""
        with self._lock:
            return sum(s.records for s in self._segments)


# ------------------------------------------------------------------------- replay
def read_segment(path: Path) -> Iterator[JournalRecord]:
    """The whole records of one segment, in order; stops at the first record that is torn,
    corrupt, or left from the segment's earlier use (or at the zeros after the last one)."""
    data = path.read_bytes()
    try:
        segment_number = int(path.stem) & _CRC_MASK
    except ValueError:
        segment_number = -1  # not a segment's name: only records of the first version can be read
    offset = 0
    previous = 0
    while offset + _HEADER.size <= len(data):
        magic, kind, number, time_ns, meta_len, payload_len, crc = _HEADER.unpack_from(data, offset)
        if not (magic == MAGIC_V1 or (magic == MAGIC and segment_number >= 0)):
            return  # zeros after the last record, or a record torn at its first bytes
        start = offset + _HEADER.size
        end = start + meta_len + payload_len
        if end > len(data):
            log.warning("ingest journal %s: a cut-short record ends it", path.name)
            return
        head = data[offset : offset + _HEADER.size - 4]
        meta_bytes = data[start : start + meta_len]
        payload = data[start + meta_len : end]
        if magic == MAGIC_V1:
            computed = crc32(payload, crc32(meta_bytes, crc32(head)))
        else:
            computed = crc32(head, crc32(meta_bytes, crc32(payload))) ^ segment_number
        if computed != crc or number <= previous:
            # A record torn by a crash, or one of the segment's earlier use.
            log.debug("ingest journal %s: ends after record %d", path.name, previous)
            return
        yield JournalRecord(kind, number, time_ns, json.loads(meta_bytes), payload)
        previous = number
        offset = end


def read_journal(directory: Path) -> list[JournalRecord]:
    """The instance records of one journal directory that were not withdrawn, in order."""
    records: list[JournalRecord] = []
    for path in sorted(directory.glob("*.wal")):
        records.extend(read_segment(path))
    withdrawn = {r.meta.get("withdraws") for r in records if r.kind == KIND_WITHDRAWN}
    return [
        r for r in records if r.kind in (KIND_INSTANCE, KIND_SPOOLED) and r.number not in withdrawn
    ]


def journaled_studies(root: Path) -> set[str]:
    """The Study Instance UIDs named by the records of every journal under ``root`` (the
    spool's ``.journal``): the running processes' and those a start-up would replay. What a
    record names may not be in the ledger yet, and a spooled record's file is its only copy.

    Read-only, beside the processes writing them: only each record's header and meta are
    read, with no CRC check, so a record torn or left from a segment's earlier use may be
    named too (more, never fewer, than a replay would record). A journal that cannot be read
    raises ``OSError``."""
    found: set[str] = set()
    if not root.is_dir():
        return found
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            segments = sorted(directory.glob("*.wal"))
        except FileNotFoundError:
            continue  # its owner removed it meanwhile (a clean stop, a checkpoint)
        for path in segments:
            try:
                f = path.open("rb")
            except FileNotFoundError:
                continue  # retired meanwhile: its records are in the ledger
            with f:
                while True:
                    head = f.read(_HEADER.size)
                    if len(head) < _HEADER.size:
                        break
                    magic, _, _, _, meta_len, payload_len, _ = _HEADER.unpack(head)
                    if magic not in (MAGIC, MAGIC_V1):
                        break  # the zeros after the last record
                    try:
                        meta = json.loads(f.read(meta_len))
                    except ValueError:
                        break  # torn
                    if isinstance(meta, dict):
                        for value in (meta.get("study_uid"), meta.get("path")):
                            if isinstance(value, str):
                                found.add(value.split("/", 1)[0])  # a path's study folder
                    f.seek(payload_len, os.SEEK_CUR)
    return found


@dataclass
class ReplayReport:
    journals: int = 0
    instances: int = 0
    #: Instances whose ledger row was missing and is back.
    recorded: int = 0
    #: Spooled records whose file a crash took or cut before it was flushed (never answered).
    unusable: int = 0
    #: Instances the ledger settled after their records were written (``superseded``): a
    #: journal restored from a backup. Left out.
    superseded: int = 0
    failed: list[str] = field(default_factory=list)


def replay_orphans(
    root: Path,
    replay: Callable[[JournalRecord], bool | None],
    flush: Callable[[], None],
    *,
    fsync: bool = True,
    superseded: Callable[[JournalRecord], bool] | None = None,
    release: Callable[[str], object] | None = None,
    prepare: Callable[[list[JournalRecord]], object] | None = None,
    commit: Callable[[], object] | None = None,
) -> ReplayReport:
    """Replay and remove every journal under ``root`` whose owner is gone.

    The records of all those journals are replayed in the order they were written. Of the
    records for one spool file (meta ``path``), the last one written decides it (an instance
    sent again, to this process or another, must end up as sent last); the earlier ones are
    replayed only if it cannot be. ``replay`` writes one record's spool file and ledger row and
    says whether the row was missing (True) or there (False); None: the record cannot be
    replayed (a spooled record whose file a crash took or cut, so never acknowledged).
    ``flush`` makes the spool and the ledger durable. If the replay fails the journals stay for
    the next try (a start, the completion loop's next sweep). ``superseded`` says whether the
    ledger settled an instance after its last record was written (a journal restored from a
    backup: recorded since, its study purged since): such a file is left out, its records not
    replayed, and counted in one log line.
    ``release`` is called with the name of each journal replayed (its owner's name), once its
    records are, before the journal is removed: the associations its owner left open are
    released there (``Ledger.release_holder``). If it fails the journals stay for the next
    try too. One replayer runs at a time (the lock of ``<root>.replay``): one that finds
    another at work waits for it, and returns once what that one took is replayed.
    ``prepare`` is called with every record before any is replayed (its ledger look-ups made
    for all of them at once), and ``commit`` once all are, before ``flush``: ``replay`` may
    leave the ledger rows to it, to write them together (see
    :class:`~acwi_node.ingest.orphans.OrphanedJournals`); if either fails the journals stay.
    """
    report = ReplayReport()
    if not root.is_dir():
        return report
    # One replayer at a time (an SCP process starting, a completion loop's sweep): the records
    # of all the journals found are replayed in one order, never split between two replayers.
    # A replayer that finds another at work waits for it, then finds its journals gone.
    try:
        serial_fd = os.open(
            root.with_name(root.name + REPLAY_LOCK_SUFFIX),
            os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
            0o640,
        )
    except OSError as exc:
        log.error("ingest journal: cannot take the replay lock (%s); not replayed now", exc)
        report.failed.append(str(exc))
        return report
    try:
        fcntl.flock(serial_fd, fcntl.LOCK_EX)
        return _replay_locked(
            root, report, replay, flush, fsync, superseded, release, prepare, commit
        )
    finally:
        os.close(serial_fd)


def _replay_locked(
    root: Path,
    report: ReplayReport,
    replay: Callable[[JournalRecord], bool | None],
    flush: Callable[[], None],
    fsync: bool,
    superseded: Callable[[JournalRecord], bool] | None,
    release: Callable[[str], object] | None,
    prepare: Callable[[list[JournalRecord]], object] | None = None,
    commit: Callable[[], object] | None = None,
) -> ReplayReport:
    """:func:`replay_orphans`, under the lock that lets one replayer run at a time."""
    locked: list[tuple[Path, int]] = []
    try:
        for directory in sorted(p for p in root.iterdir() if p.is_dir()):
            if directory.name.startswith("."):
                continue  # being created (see IngestJournal.open)
            try:
                lock_fd = os.open(directory / "lock", os.O_WRONLY | os.O_CREAT, 0o640)
            except OSError:
                continue
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)  # its owner runs
                continue
            if not directory.exists():
                os.close(lock_fd)  # its owner removed it on a clean stop meanwhile
                continue
            locked.append((directory, lock_fd))
        report.journals = len(locked)
        if not locked:
            return report
        readable: list[Path] = []
        records: list[tuple[int, int, int, JournalRecord]] = []
        for index, (directory, _) in enumerate(locked):
            try:
                found = read_journal(directory)
            except OSError as exc:
                log.error("ingest journal %s: cannot read it (%s); kept", directory.name, exc)
                report.failed.append(f"{directory.name}: {exc}")
                continue
            readable.append(directory)
            records.extend((r.time_ns, index, r.number, r) for r in found)
        records.sort(key=lambda item: item[:3])
        keyed = [
            (record.meta.get("path") or ("record", i), record)
            for i, (*_, record) in enumerate(records)
        ]
        versions: dict[object, list[JournalRecord]] = {}
        for key, record in keyed:
            versions.setdefault(key, []).append(record)
        try:
            if prepare is not None:
                prepare([record for _, record in keyed])
            for key, record in keyed:
                if versions[key][-1] is not record:
                    continue  # a later record for the same file decides it
                if superseded is not None and superseded(record):
                    report.superseded += 1  # and its earlier records are older still
                    continue
                for candidate in reversed(versions[key]):
                    outcome = replay(candidate)
                    if outcome is None:
                        report.unusable += 1
                        continue
                    report.instances += 1
                    if outcome:
                        report.recorded += 1
                    break
            if commit is not None:
                commit()
            if fsync:
                flush()
            if release is not None:
                for directory in readable:
                    release(directory.name)
        except Exception as exc:
            log.exception("ingest journal: replay failed; the journals are kept for the next try")
            report.failed.append(str(exc))
            return report
        for directory in readable:
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        for _, lock_fd in locked:
            os.close(lock_fd)
    if report.superseded:
        log.warning(
            "ingest journal: %d instance(s) left out: the ledger recorded them, or purged their"
            " study, after the journal was written (a journal restored from a backup)",
            report.superseded,
        )
    log.info(
        "ingest journal: replayed %d journal(s), %d instance(s), %d ledger row(s) restored, "
        "%d unacknowledged instance(s) skipped",
        report.journals,
        report.instances,
        report.recorded,
        report.unusable,
    )
    return report
