"""The spool: received instances as Part-10 files, written atomically and durably.

A file is written to ``<spool>/.tmp/`` (same file system), fsynced, renamed to
``<spool>/<study uid>/<sop instance uid>.dcm`` and its directory fsynced; or, for an instance
already in the ingest journal (``<spool>/.journal/``, see :mod:`.journal`), written and renamed
without flushing, which the journal's checkpoint does later. Names come only from UIDs
that passed :func:`is_safe_uid` (digits and dots, at most 64 characters); nothing else from a
dataset ever names a path. On any failure the temporary file is removed: no partial file remains.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TypeAlias

log = logging.getLogger("acwi_node.spool")

#: One buffer, or several written one after the other (an instance's file meta and data set,
#: written without joining them first).
Buffers: TypeAlias = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]

#: How many study directories a spool remembers as made (some 150 KB of UIDs).
REMEMBERED_STUDY_DIRS = 1024

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def buffers(data: Buffers) -> list[bytes | bytearray | memoryview]:
    """``data`` as a list of buffers."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [data]
    return list(data)


def write_all(fd: int, data: Buffers, offset: int | None = None) -> int:
    """Write every byte of ``data`` (at ``offset``, else at the file position); the count."""
    parts = [b for b in buffers(data) if len(b)]
    if not parts:
        return 0
    size = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in parts)
    total = os.writev(fd, parts) if offset is None else os.pwritev(fd, parts, offset)
    if total == size:  # the usual case: one system call took every byte
        return total
    views = [memoryview(b).cast("B") for b in parts]
    count = total
    while True:
        while views and count >= len(views[0]):
            count -= len(views[0])
            views.pop(0)
        if not views:
            return total
        if count:
            views[0] = views[0][count:]
        count = os.writev(fd, views) if offset is None else os.pwritev(fd, views, offset + total)
        total += count


@functools.lru_cache(maxsize=1024)
def is_safe_uid(value: str) -> bool:
    """True for a UID that may name a file: digits and dots, no empty component, <= 64 chars.

    Leading zeros in a component (invalid in strict DICOM, seen from old scanners) are tolerated;
    they cannot form a path. Remembered for the last UIDs asked about: an instance's UIDs are
    checked where they arrive and again where they name its file, and a study's UID for each of
    its instances.
    """
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


class SpoolFile(NamedTuple):
    """A file :meth:`Spool.write` wrote: its final path, and what tells it from a later file
    renamed over it (its inode and size, which a rename keeps)."""

    path: str
    inode: int
    size: int


class SpoolError(OSError):
    """Writing to the spool failed; ``out_of_space`` tells a full disk or quota from the rest."""

    def __init__(self, message: str, *, out_of_space: bool) -> None:
        super().__init__(message)
        self.out_of_space = out_of_space


class Spool:
    """Atomic, durable storage of received instances under one root directory."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.tmp_dir = root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # The same as strings: the ingest path joins them per instance, without pathlib.
        self._root = str(root)
        self._tmp = str(self.tmp_dir)
        #: Study directories known to exist (saves a stat and a mkdir per instance): the
        #: latest studies', at most :data:`REMEMBERED_STUDY_DIRS` of them.
        self._dirs: set[str] = set()
        #: Temporary names: this spool object's random prefix and a counter (no random number,
        #: and no system call, per file).
        self._prefix = uuid.uuid4().hex[:16]
        self._names = itertools.count()

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; both UIDs must be safe."""
        return self.root / self.relative_for(study_uid, sop_instance_uid)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def relative_for(self, study_uid: str, sop_instance_uid: str) -> str:
        """``relative(path_for(...))``, without building the path; both UIDs must be safe (the
        one place that checks them before a spool path is made of them)."""
        if not (is_safe_uid(study_uid) and is_safe_uid(sop_instance_uid)):
            raise ValueError("refusing to build a spool path from an unsafe UID")
        return f"{study_uid}/{sop_instance_uid}.dcm"

    def holds(self, relative: str) -> bool:
        """Whether the spool has a file at ``relative`` (from :meth:`relative_for`)."""
        return os.path.exists(os.path.join(self._root, relative))

    def resolve(self, relative: str) -> Path:
        """The absolute path of a ledger-recorded relative path, refusing anything outside."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError("spool path escapes the spool directory")
        return path

    def store(
        self,
        study_uid: str,
        sop_instance_uid: str,
        data: Buffers,
        *,
        sync: bool | None = None,
    ) -> Path:
        """Write ``data`` atomically to the instance's place; returns the final path.

        ``sync``: flush the file and its directory entry before returning (default: the
        spool's ``fsync``). False for an instance the ingest journal already holds.
        """
        return Path(self.write(study_uid, sop_instance_uid, data, sync=sync).path)

    def write(
        self,
        study_uid: str,
        sop_instance_uid: str,
        data: Buffers,
        *,
        sync: bool | None = None,
    ) -> SpoolFile:
        """:meth:`store`, returning the final path as a string (no ``Path`` made: this runs
        for every instance received) with the identity of the file written there."""
        sync = self.fsync if sync is None else sync
        # Strings, not Paths, up to the return: this runs for every instance received.
        final = os.path.join(self._root, self.relative_for(study_uid, sop_instance_uid))
        directory = os.path.dirname(final)
        tmp = os.path.join(self._tmp, f"{self._prefix}-{next(self._names)}.part")
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            size = write_all(fd, data)
            if sync:
                os.fsync(fd)
            inode = os.fstat(fd).st_ino
            # Never closed twice: a close() that reports an error (NFS reports ENOSPC,
            # EDQUOT or EIO there) has released the number, which another thread may take.
            written, fd = fd, -1
            os.close(written)
            new_dir = study_uid not in self._dirs and not os.path.isdir(directory)
            if new_dir:
                os.makedirs(directory, exist_ok=True)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # the study directory was removed meanwhile
                os.makedirs(directory, exist_ok=True)
                os.replace(tmp, final)
                new_dir = True
            if study_uid not in self._dirs:
                if len(self._dirs) >= REMEMBERED_STUDY_DIRS:
                    # A listener runs for months and sees each study once: forget them all
                    # (the studies being received come back with one stat each).
                    self._dirs.clear()
                self._dirs.add(study_uid)
            if sync:
                fsync_dir(Path(directory))
                if new_dir:
                    fsync_dir(self.root)
            return SpoolFile(final, inode, size)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise SpoolError(
                f"cannot write to spool: {exc.strerror or exc}", out_of_space=full
            ) from exc

    def is_current(self, relative: str, written: SpoolFile) -> bool:
        """Whether the file at ``relative`` is still the one :meth:`write` wrote as
        ``written``: False when another write of the same instance (another association
        sending it at the same moment) replaced it since. A file gone (removed by retention)
        is no evidence of a replacement: True."""
        try:
            st = os.stat(os.path.join(self._root, relative))
        except FileNotFoundError:
            return True
        return st.st_ino == written.inode and st.st_size == written.size

    def identity(self, relative: str) -> tuple[int, int] | None:
        """The inode and size of the file at ``relative`` (what :meth:`is_current` compares:
        a later write of the instance renames another file over it); None where there is none."""
        try:
            st = os.stat(os.path.join(self._root, relative))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size

    def discard(self, path: Path) -> None:
        """Remove a stored file (used when recording it in the ledger failed)."""
        path.unlink(missing_ok=True)

    def remove_moved(self, relative: str) -> None:
        """Remove the earlier copy of an instance that moved to another study (its SOP
        Instance UID came again there: :attr:`acwi_node.ledger.Recorded.moved_from`); the
        ledger no longer names it."""
        try:
            self.resolve(relative).unlink(missing_ok=True)
        except (ValueError, OSError) as exc:
            log.warning("spool: the earlier copy of a moved instance stays: %s", exc)

    def clean_tmp(self) -> int:
        """Remove temporary files left by a crash; returns how many."""
        n = 0
        for p in self.tmp_dir.glob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a file created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
