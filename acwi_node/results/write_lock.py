"""One job at a time writes a study's result objects.

A study's result objects have UIDs, and so paths, derived from (study, model, version,
kind): two jobs of one study and model version write the same files. That happens when a
study re-opens (more of it arrives) while its job writes: the older job is superseded, the
newer one is created, and both may write at once. Unserialised, the older job's late write
could replace a file the newer job had already recorded (its row then naming the older
version's content), or its clean-up could remove it.

:func:`study_results_lock` serialises the write phase (from the first result file to the
ledger's answer and any clean-up) between processes and threads with ``flock`` on one of
:data:`STRIPES` lock files in ``<results>/.locks/``, chosen by the study UID: a bounded
number of files, never removed (removing a lock file others may hold would let two holders
in). Two studies that share a stripe take turns; the write phase is short (the analysis
runs before it, outside the lock). Works wherever ``flock`` does: one host's disk, or
NFSv4, where Linux maps it to a lease-backed lock.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Lock files in ``<results>/.locks/``.
STRIPES = 256

LOCK_DIR = ".locks"


def lock_path(results_dir: Path, study_uid: str) -> Path:
    """The lock file serialising ``study_uid``'s result writes."""
    stripe = zlib.crc32(study_uid.encode("ascii", "replace")) % STRIPES
    return results_dir / LOCK_DIR / f"{stripe:03d}.lock"


@contextmanager
def study_results_lock(results_dir: Path, study_uid: str) -> Iterator[None]:
    """Hold the study's result-write lock (blocking until it is free) for the ``with`` body."""
    path = lock_path(results_dir, study_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
