"""Names of the processes that hold associations open, for those without an ingest journal.

A study counts the associations (and STOW-RS requests, C-GETs, WADO-RS retrievals) sending it
(``studies.open_associations``), and each process counts its own share under its name
(``association_holds``, :class:`~acwi_node.ledger.models.AssociationHold`). An SCP process is
named by its ingest journal (:mod:`.journal`); the web process's STOW-RS and the retrieval
service are named here, by a lock file: ``<spool>/.holders/<kind>-<process id>-<random>``,
``flock``-ed by its process for its whole life, as a journal's ``lock`` is. The kernel drops
the lock when the process goes, however it goes (SIGKILL, out of memory), so a process that
can take it knows the owner is gone: it releases what the owner held
(:meth:`~acwi_node.ledger.Ledger.release_holder`), as if its requests had been aborted, and
removes the file. Every process that names itself so sweeps the folder when it starts (a
process started again releases what its predecessor held), and the completion loop sweeps it
every :data:`SWEEP_EVERY_S`.

A process that stops cleanly releases its own name last (:meth:`HolderName.close`): what is
left is the end of a request it could not record (the ledger was down just then). If the
ledger is down at that moment too, the file stays, unlocked, for the next sweep.

Naming costs nothing per instance: the hold is one more statement in the transaction that
records a request's first instances of a study, and its end one more (two on SQLite) in the
statement that records the request's end.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("acwi_node.ingest")

#: The folder of the spool holding the holders' lock files.
HOLDERS_DIR = ".holders"
#: Seconds between the completion loop's sweeps of the folder.
SWEEP_EVERY_S = 5.0
#: A file still under its hidden name (being created) this old was left by a process killed
#: while creating it: it names nothing that holds anything, and goes.
_STALE_HIDDEN_S = 60.0


class HolderName:
    """This process's name as a holder of associations (``kind``: ``stow``, ``retrieval``),
    taken on first use: in each process that uses it (a forked or spawned worker gets a name
    of its own)."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.kind = kind
        self._lock = threading.Lock()
        self._pid = -1
        self._fd = -1
        self._name = ""

    @property
    def name(self) -> str:
        """The name, its lock file created and locked first; it is what the ledger records."""
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            return self._name

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{self.kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Created and locked under a hidden name, then renamed: a sweep never takes a file
        # that is being created for its owner.
        hidden = self.root / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, self.root / name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            raise
        # the parent's descriptor, inherited by a forked child, is not this process's to close
        self._fd, self._name, self._pid = fd, name, os.getpid()

    def close(self, release: Callable[[str], object]) -> None:
        """A clean stop, once nothing is being received any more: release what this process
        still holds (the ends it could not record), then remove its file. If the release
        fails, the file stays, unlocked: the next sweep releases it."""
        with self._lock:
            if self._pid != os.getpid() or self._fd < 0:
                return
            name, fd = self._name, self._fd
            self._fd, self._pid, self._name = -1, -1, ""
        try:
            release(name)
        except Exception:
            log.exception(
                "could not release the associations %s still holds; the next process to"
                " look releases them",
                name,
            )
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)
        finally:
            os.close(fd)


def release_gone(root: Path, release: Callable[[str], object]) -> list[str]:
    """Release what each process named under ``root`` that is gone held (``release`` with its
    name), and remove its file; returns their names. Safe in several processes at once (a
    file is taken by whoever locks it; ``release`` is idempotent). A release that fails
    leaves the file for the next sweep."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    released: list[str] = []
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith("."):
            _remove_stale_hidden(entry.path)
            continue
        try:
            fd = os.open(entry.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            continue  # removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner runs
            try:
                if os.stat(entry.path).st_ino != os.fstat(fd).st_ino:
                    continue  # removed (and perhaps made again) meanwhile
            except FileNotFoundError:
                continue
            try:
                release(entry.name)
            except Exception as exc:  # the ledger down: a line, not a traceback, each sweep
                log.warning(
                    "could not release what %s held (%s); tried again later", entry.name, exc
                )
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            released.append(entry.name)
        finally:
            os.close(fd)
    return released


def _remove_stale_hidden(path: str) -> None:
    try:
        if time.time() - os.stat(path).st_mtime < _STALE_HIDDEN_S:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def release_gone_holders(spool_root: Path, ledger_release: Callable[[str], list[int]]) -> int:
    """:func:`release_gone` for the spool's holders, logging each release that freed studies;
    returns how many processes' holds were released."""

    def release(name: str) -> None:
        studies = ledger_release(name)
        if studies:
            log.warning(
                "released the requests a stopped process (%s) left open on %d study(ies);"
                " their quiet period starts now",
                name,
                len(studies),
            )

    return len(release_gone(spool_root / HOLDERS_DIR, release))
