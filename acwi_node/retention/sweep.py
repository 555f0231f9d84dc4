"""Storage retention: deletes finished studies' images and result files from the node's disk.

The PACS keeps every study; the node keeps its copy while it may need it (analysis, delivery,
the review worklist, feedback for training) and then for ``retention.keep_hours`` (studies
that went through the review worklist: ``retention.reviewed_keep_hours``). When the data
directory's file system has less than ``retention.min_free_percent`` free, finished studies
go oldest first, never-reviewed ones before reviewed ones, whatever their age. A study still
receiving, analysing, delivering or open on the worklist is never touched.

Each purge: the ledger part first (:meth:`RetentionStore.claim`: the instances' paths
emptied, a ``purges`` row), then the files of ``spool/<study>/`` and ``results/<study>/``.
A file newer than the claim's limits is a later generation's (the study was re-opened
meanwhile) and stays; a spool file older than an hour before the claim goes whatever its time
(a data directory restored or copied without its files' times leaves them newer than the
study's last arrival). Files found again in the folders of a study purged before (a data
directory restored from before the purge) go at the next sweep, those an hour old. Folders
of studies the ledger has no row of (nor the ingest journal a record of) go once their files
are ``retention.orphan_keep_hours`` old (:meth:`Retention._delete_orphans`). The
ledger keeps the study, its jobs, results and verdicts; ``retention.records_keep_days`` later,
its instance rows are summarised and the patient identifiers kept for the RIS erased
(:mod:`acwi_node.retention.records`).
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from acwi_node.audit import AuditEvent, audit
from acwi_node.config import Settings
from acwi_node.ingest.journal import JOURNAL_DIR, journaled_studies
from acwi_node.ingest.spool import is_safe_uid
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.observability import metrics
from acwi_node.retention.records import RecordsStore
from acwi_node.retention.store import Candidate, PurgeClaim, RetentionStore

log = logging.getLogger("acwi_node.retention")

#: Studies read per query while free space is short (it is measured again after each purge).
_SPACE_BATCH = 50
#: An unfinished purge older than this was left by a process that stopped: finished again.
_LEFTOVER_AFTER = dt.timedelta(seconds=60)
#: A study folder without a ledger row is deleted once its files are at least this old, whatever
#: ``retention.orphan_keep_hours`` says (an arrival's row follows its file within seconds).
_ORPHAN_MIN_AGE = dt.timedelta(hours=1)
#: A spool file written this long before its purge was claimed, and still newer than the
#: study's last recorded arrival, is no arrival whose ledger row is yet to come (rows follow
#: their files within seconds): its time is a restore's or a copy's, and it goes with the rest.
_ARRIVAL_SETTLED = dt.timedelta(hours=1)
_trash_names = itertools.count()


@dataclass(frozen=True)
class DiskSpace:
    free_bytes: int
    total_bytes: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 100.0


def disk_space(path: Path) -> DiskSpace:
    """Free (for unprivileged users) and total bytes of the file system holding ``path``; for
    a ``path`` not made yet (a node that has stored nothing, its ledger elsewhere), of the one
    it will be made on (its nearest existing parent's)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    st = os.statvfs(path)
    return DiskSpace(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


@dataclass
class SweepReport:
    studies: int = 0
    files: int = 0
    bytes: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    #: Dry run: the studies that would be deleted, with their reason (``bytes``: what their
    #: folders hold now).
    planned: list[tuple[str, str]] = field(default_factory=list)
    free_percent: float | None = None
    #: Free space is still below ``min_free_percent`` and no finished study is left to delete.
    short_of_space: bool = False
    #: Records retention: studies whose records were compacted (a dry run: would be), the
    #: instance rows that became arrivals, the HL7 orders and ORU^R01 messages whose patient
    #: identifiers were erased, and the inbound HL7 messages' records deleted.
    compacted: int = 0
    instance_rows: int = 0
    orders_erased: int = 0
    messages_erased: int = 0
    inbound_deleted: int = 0
    #: Dry run: the studies whose records would be compacted.
    planned_compactions: list[str] = field(default_factory=list)


def _epoch_ns(value: dt.datetime) -> int:
    """A naive UTC ledger time as nanoseconds since the epoch (file times' scale)."""
    return calendar.timegm(value.utctimetuple()) * 1_000_000_000 + value.microsecond * 1000


def delete_study_files(root: Path, study_uid: str, modified_before: dt.datetime) -> tuple[int, int]:
    """Delete the files of ``root/<study_uid>/`` last modified at or before
    ``modified_before``, then the folder if it is empty; returns (files, bytes).

    Each file is first renamed aside and the renamed file examined, so that a newer version
    renamed into place meanwhile (the instance sent again) is never the one deleted: it is
    linked back unless an even newer one took its place."""
    if not is_safe_uid(study_uid):
        return 0, 0
    folder = os.path.join(root, study_uid)
    limit = _epoch_ns(modified_before)
    files = size = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0, 0
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime_ns > limit:
                continue
            trash = os.path.join(folder, f".purge-{os.getpid()}-{next(_trash_names)}")
            os.rename(entry.path, trash)
            taken = os.stat(trash)
            if taken.st_mtime_ns > limit:
                try:  # a newer version arrived between the look and the rename: put it back
                    os.link(trash, entry.path)
                except FileExistsError:
                    pass  # an even newer one is in place; this one is superseded
                else:
                    os.unlink(trash)
                    continue
            os.unlink(trash)
            files += 1
            size += taken.st_size
        except FileNotFoundError:
            continue
    with contextlib.suppress(OSError):  # not empty (a later generation's files), or gone
        os.rmdir(folder)
    return files, size


class Retention:
    """Runs storage retention sweeps (in the exporter process, and ``acwi-node retention``)."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        *,
        space: Callable[[], DiskSpace] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.store = RetentionStore(ledger)
        self.records = RecordsStore(ledger)
        self._space = space or (lambda: disk_space(settings.data_dir))
        self._clock = clock
        self._stop = threading.Event()
        #: ``time.monotonic()`` of the last finished sweep.
        self.last_sweep: float | None = None
        #: Sweeps that failed since the last one that finished, and the last one's error type
        #: (readiness: a sweep that always fails would let the data disk fill).
        self.failed_in_a_row = 0
        self.last_error: str | None = None

    # ----------------------------------------------------------------- sweeps
    def sweep(self, *, dry_run: bool = False) -> SweepReport:
        """Delete what the policy says should go now; with ``dry_run``, only list it."""
        cfg = self.settings.retention
        report = SweepReport()
        now = self._clock()
        if not dry_run:
            for claim in self.store.unfinished(started_before=now - _LEFTOVER_AFTER):
                log.info("storage retention: finishing an interrupted purge")
                self._delete_files(claim, report)
            self._delete_restored(report)
        hours = dt.timedelta(hours=1)
        for candidate in self.store.candidates(
            unreviewed_before=now - cfg.keep_hours * hours if cfg.keep_hours else None,
            reviewed_before=now - cfg.reviewed_keep_hours * hours
            if cfg.reviewed_keep_hours
            else None,
        ):
            self._purge(candidate, "age", report, dry_run=dry_run)
        if cfg.orphan_keep_hours:
            self._delete_orphans(
                now - max(dt.timedelta(hours=cfg.orphan_keep_hours), _ORPHAN_MIN_AGE),
                report,
                dry_run=dry_run,
            )
        if cfg.min_free_percent:
            self._make_space(report, dry_run=dry_run)
        if cfg.records_keep_days:
            self._compact_records(now - dt.timedelta(days=cfg.records_keep_days), report, dry_run)
        if not dry_run:  # jobs an earlier version analysed: their model's identity, copied
            for _ in range(10):
                if self.records.copy_model_identity() == 0:
                    break
        return report

    def _compact_records(self, cut: dt.datetime, report: SweepReport, dry_run: bool) -> None:
        """Records retention (:mod:`acwi_node.retention.records`) for what is older than
        ``cut``: studies purged before it, orders and inbound messages of before it."""
        records = self.records
        while True:
            batch = records.candidates(purged_before=cut)
            if dry_run:
                report.planned_compactions += [c.study_uid for c in batch]
                report.compacted += len(batch)
                break
            done = [d for d in map(records.compact, batch) if d is not None]
            for compacted in done:
                report.compacted += 1
                report.instance_rows += compacted.instance_rows
                report.orders_erased += compacted.orders
                report.messages_erased += compacted.messages
                if compacted.orders or compacted.messages:
                    audit(
                        AuditEvent.PATIENT_DATA_ERASED,
                        study_uids=[compacted.study_uid],
                        detail=f"records retention: the patient identifiers of"
                        f" {compacted.orders} HL7 order(s) and {compacted.messages} ORU^R01"
                        " message(s)",
                    )
            metrics.RETENTION_RECORDS_COMPACTED.inc(len(done))
            if not done:  # nothing left, or only studies that changed meanwhile
                break
        orders = records.erase_unclaimed_orders(updated_before=cut, dry_run=dry_run)
        report.orders_erased += orders
        if orders and not dry_run:
            audit(
                AuditEvent.PATIENT_DATA_ERASED,
                detail=f"records retention: the patient identifiers of {orders} HL7 order(s)"
                " that no study the node holds names",
            )
        report.inbound_deleted += records.delete_inbound(received_before=cut, dry_run=dry_run)

    def _make_space(self, report: SweepReport, *, dry_run: bool) -> None:
        cfg = self.settings.retention
        space = self._space()
        report.free_percent = space.free_percent
        if space.free_percent >= cfg.min_free_percent:
            return
        # A dry run has deleted nothing: what it planned so far (by age) counts as freed.
        needed = self._shortfall(space) - (report.bytes if dry_run else 0)
        # Studies tried already (a dry run's age-planned ones included: nothing was claimed).
        seen = {uid for uid, _ in report.planned}
        # Of those, the ones the candidates' query still lists (not claimed): each read must
        # reach past them, or a dry run (which claims nothing) would see only its first batch.
        still_listed = len(seen)
        while needed > 0:
            batch = [
                c
                for c in self.store.candidates(
                    unreviewed_before=None,
                    reviewed_before=None,
                    any_age=True,
                    limit=still_listed + _SPACE_BATCH,
                )
                if c.study_uid not in seen
            ]
            if not batch:
                break
            for candidate in batch:
                seen.add(candidate.study_uid)
                claimed_before = report.studies
                freed = self._purge(candidate, "space", report, dry_run=dry_run)
                if dry_run or report.studies == claimed_before:
                    still_listed += 1
                if dry_run:
                    needed -= freed
                else:
                    space = self._space()
                    report.free_percent = space.free_percent
                    needed = self._shortfall(space)
                if needed <= 0:
                    break
        if needed > 0:
            report.short_of_space = True
            log.warning(
                "storage retention: %.1f%% free, below retention.min_free_percent (%.1f%%), and"
                " no finished study is left to delete",
                report.free_percent or 0.0,
                cfg.min_free_percent,
            )

    def _shortfall(self, space: DiskSpace) -> int:
        """Bytes to free before ``min_free_percent`` of the file system is free."""
        return int(self.settings.retention.min_free_percent / 100 * space.total_bytes) - (
            space.free_bytes
        )

    def _purge(
        self, candidate: Candidate, reason: str, report: SweepReport, *, dry_run: bool
    ) -> int:
        """Purge one study; returns the bytes freed (a dry run: the bytes its folders hold)."""
        if dry_run:
            would_free = sum(
                self._folder_bytes(root, candidate.study_uid) for root in self._roots()
            )
            report.planned.append((candidate.study_uid, reason))
            report.studies += 1
            report.by_reason[reason] += 1
            report.bytes += would_free
            return would_free
        claim = self.store.claim(candidate, reason)
        if claim is None:
            return 0
        before = report.bytes
        self._delete_files(claim, report)
        report.studies += 1
        report.by_reason[reason] += 1
        metrics.RETENTION_STUDIES_DELETED.labels(reason).inc()
        audit(
            AuditEvent.STUDY_DELETED,
            study_uids=[claim.study_uid],
            instances={claim.study_uid: claim.instances},
            detail=f"storage retention ({reason})",
        )
        return report.bytes - before

    def _delete_files(self, claim: PurgeClaim, report: SweepReport) -> None:
        files = size = 0
        for root, before in (
            (
                self.settings.spool_dir,
                max(claim.received_before, claim.started_at - _ARRIVAL_SETTLED),
            ),
            (self.settings.results_dir, claim.started_at),
        ):
            n, b = delete_study_files(root, claim.study_uid, before)
            files, size = files + n, size + b
        self.store.finish(claim, files=files, size=size)
        report.files += files
        report.bytes += size
        metrics.RETENTION_BYTES_DELETED.inc(size)

    def _delete_restored(self, report: SweepReport) -> None:
        """Delete the files found in the folders of studies already purged (and not come back
        since): a data directory restored from before their purge brought them back, and no
        later purge would look at them again. Files younger than an hour stay (an arrival
        whose ledger row is still to come)."""
        present: set[str] = set()
        for root in self._roots():
            with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
                present.update(
                    e.name
                    for e in entries
                    if not e.name.startswith(".") and is_safe_uid(e.name) and e.is_dir()
                )
        if not present:
            return
        cut = utcnow() - _ARRIVAL_SETTLED
        for claim in self.store.purged(sorted(present)):
            files = size = 0
            for root in self._roots():
                n, b = delete_study_files(root, claim.study_uid, cut)
                files, size = files + n, size + b
            if not files:
                continue
            self.store.finish(claim, files=files, size=size)
            report.files += files
            report.bytes += size
            metrics.RETENTION_BYTES_DELETED.inc(size)
            log.info(
                "storage retention: deleted %d file(s) found again in a study purged before",
                files,
            )
            audit(
                AuditEvent.STUDY_DELETED,
                study_uids=[claim.study_uid],
                detail="storage retention (files restored after the study's purge)",
            )

    def _delete_orphans(self, cut: dt.datetime, report: SweepReport, *, dry_run: bool) -> None:
        """Delete the study folders in the spool and results that the ledger has no study row
        of, nor the ingest journal a record of, and that nothing changed for since ``cut``:
        their files older than it (a younger file is an arrival whose row is still to come, or
        one a restore brought back: it stays, and so does its folder).

        The journal is read before the ledger: an instance it no longer holds was recorded
        before its segment went (a checkpoint deletes a segment only once the ledger holds
        its rows), or was written after the folders were looked at (its file is young)."""
        limit = _epoch_ns(cut)
        folders: dict[str, list[Path]] = {}
        for root in self._roots():
            with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
                for e in entries:
                    if e.name.startswith(".") or not is_safe_uid(e.name):
                        continue
                    try:
                        if not e.is_dir(follow_symlinks=False):
                            continue
                        if e.stat(follow_symlinks=False).st_mtime_ns > limit:
                            continue  # a file came or went there since the cut
                    except FileNotFoundError:
                        continue
                    folders.setdefault(e.name, []).append(root)
        if not folders:
            return
        journaled = journaled_studies(self.settings.spool_dir / JOURNAL_DIR)
        uids = sorted(set(folders) - journaled)
        known = self.store.known(uids) if uids else set()
        deleted = deleted_files = 0
        for uid in (u for u in uids if u not in known):
            if dry_run:
                old = [self._old_files(root, uid, limit) for root in folders[uid]]
                if not sum(n for n, _ in old):
                    continue  # only younger files: nothing would go
                report.planned.append((uid, "orphan"))
                report.studies += 1
                report.by_reason["orphan"] += 1
                report.bytes += sum(b for _, b in old)
                continue
            files = size = 0
            for root in folders[uid]:
                n, b = delete_study_files(root, uid, cut)
                files, size = files + n, size + b
            if not files:
                continue
            deleted, deleted_files = deleted + 1, deleted_files + files
            report.studies += 1
            report.by_reason["orphan"] += 1
            report.files += files
            report.bytes += size
            metrics.RETENTION_STUDIES_DELETED.labels("orphan").inc()
            metrics.RETENTION_BYTES_DELETED.inc(size)
            audit(
                AuditEvent.STUDY_DELETED,
                study_uids=[uid],
                detail="storage retention (orphan: a folder the ledger has no study row of)",
            )
        if deleted:
            log.info(
                "storage retention: deleted the folders of %d studies the ledger has no row"
                " of (%d files, older than retention.orphan_keep_hours)",
                deleted,
                deleted_files,
            )

    def _roots(self) -> tuple[Path, Path]:
        return self.settings.spool_dir, self.settings.results_dir

    @staticmethod
    def _folder_bytes(root: Path, study_uid: str) -> int:
        if not is_safe_uid(study_uid):
            return 0
        try:
            with os.scandir(os.path.join(root, study_uid)) as entries:
                return sum(e.stat().st_size for e in entries if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return 0

    @staticmethod
    def _old_files(root: Path, study_uid: str, modified_before_ns: int) -> tuple[int, int]:
        """The files of ``root/<study_uid>/`` modified at or before ``modified_before_ns``
        (what :func:`delete_study_files` would take): how many, and their bytes."""
        files = size = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(root / study_uid) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    if st.st_mtime_ns <= modified_before_ns:
                        files, size = files + 1, size + st.st_size
        return files, size

    # ----------------------------------------------------------------- the loop
    def run(self) -> None:
        """Sweep every ``retention.interval_s`` until :meth:`stop`."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                report = self.sweep()
            except Exception as exc:
                self.failed_in_a_row += 1
                self.last_error = type(exc).__name__
                metrics.RETENTION_SWEEP_FAILURES.inc()
                log.exception("storage retention sweep failed; retrying")
            else:
                self.last_sweep = time.monotonic()
                self.failed_in_a_row = 0
                self.last_error = None
                if report.studies:
                    log.info(
                        "storage retention: deleted the files of %d studies (%d files, %.1f MB)",
                        report.studies,
                        report.files,
                        report.bytes / 1e6,
                    )
                if report.compacted or report.orders_erased or report.inbound_deleted:
                    log.info(
                        "records retention: compacted the records of %d studies (%d instance"
                        " rows); erased the patient identifiers of %d HL7 orders and %d ORU"
                        " messages; deleted %d inbound HL7 message records",
                        report.compacted,
                        report.instance_rows,
                        report.orders_erased,
                        report.messages_erased,
                        report.inbound_deleted,
                    )
            elapsed = time.monotonic() - started
            self._stop.wait(max(0.0, self.settings.retention.interval_s - elapsed))

    def stop(self) -> None:
        self._stop.set()
