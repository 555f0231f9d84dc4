"""The ingest journals of SCP processes that are gone, replayed into the spool and the ledger.

An SCP process killed (SIGKILL, out of memory, its host lost) leaves its journal behind, its
``lock`` held by nobody (:mod:`.journal`). The instances it acknowledged and had not yet
checkpointed may lack their ledger rows (and, after a power loss, their spool files), and the
associations it had open stay counted under its name. Replaying the journal writes those files
and rows again, then releases the associations, in that order: a study completes only once
every instance acknowledged for it is in the ledger.

Two kinds of process replay them: an SCP process when it starts
(:meth:`~acwi_node.ingest.scp.StorageSCP.open_journal`), and the completion loop of a running
``scp`` process (:class:`~acwi_node.ingest.completion.CompletionService`), every
:data:`~acwi_node.ingest.holders.SWEEP_EVERY_S` and before it completes a study, so that an
SCP process that is not started again (a listener that keeps failing, a host that stays down)
leaves no study to complete without what it acknowledged. Whoever takes a journal's lock
replays it; the others pass it by (:func:`~acwi_node.ingest.journal.replay_orphans`).

A replay looks up the ledger's rows for all its records at once, a few queries per
:data:`~acwi_node.ledger.repository.LOOKUP_CHUNK` instances, decides each record against what
it found (and against the rows it is about to write: an instance journaled in two studies),
and writes the rows it restores in transactions of as many, before its owner's associations are
released: a journal of thousands of small instances no longer costs three ledger transactions
an instance, while the SCP that replays it at start-up is not yet listening.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from acwi_node.ingest.journal import (
    JOURNAL_DIR,
    SPOOLED_CRC,
    JournalRecord,
    ReplayReport,
    replay_orphans,
    sync_filesystem,
)
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import InstanceRecord, Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.ledger.repository import LOOKUP_CHUNK, InstanceFile, settled_since

log = logging.getLogger("acwi_node.ingest")


class OrphanedJournals:
    """Replays the journals under ``spool``'s ``.journal`` whose processes are gone."""

    def __init__(self, spool: Spool, ledger: Ledger, *, fsync: bool = True) -> None:
        self.spool = spool
        self.ledger = ledger
        self.fsync = fsync

    def replay_stopped(self) -> ReplayReport:
        """Replay every journal whose owner is gone, release the associations its owner left
        open, and remove it (a journal whose replay fails stays, for the next try)."""
        batch = _Batch(self.spool, self.ledger)
        return replay_orphans(
            self.spool.root / JOURNAL_DIR,
            batch.replay,
            self.flush,
            fsync=self.fsync,
            superseded=batch.superseded,
            release=self.release,
            prepare=batch.prepare,
            commit=batch.commit,
        )

    def flush(self) -> None:
        sync_filesystem(self.spool.root)
        self.ledger.flush()

    def replay(self, record: JournalRecord) -> bool | None:
        """Write one journaled instance's spool file again (or, for a spooled record, check
        that the file is the one recorded); add its ledger row if missing (see
        :meth:`_Batch.replay`): the checkpoint of a running SCP's own journal, for an
        instance acknowledged while the spool or the ledger failed."""
        batch = _Batch(self.spool, self.ledger)
        batch.prepare([record], purges=False)
        outcome = batch.replay(record)
        batch.commit()
        return outcome

    def release(self, holder: str) -> None:
        """The associations a process that is gone left open (its journal ``holder`` is
        replayed) end, as aborted: their studies complete by their usual signals."""
        released = self.ledger.release_holder(holder)
        if released:
            log.warning(
                "released the associations a stopped SCP process (%s) left open on %d"
                " study(ies); their quiet period starts now",
                holder,
                len(released),
            )


class _Batch:
    """One replay's records, decided against the ledger as the replay found it (looked up in
    :meth:`prepare`, a query per :data:`LOOKUP_CHUNK` instances) and the rows it restores,
    written in :meth:`commit`: what replaying the records one by one, each looking the ledger
    up and writing its row, would leave. The replayed records' order, and which record of a
    file is replayed, are :func:`~acwi_node.ingest.journal.replay_orphans`'s."""

    def __init__(self, spool: Spool, ledger: Ledger) -> None:
        self.spool = spool
        self.ledger = ledger
        #: The ledger's row of each instance of the replay, as it found it, then as the rows
        #: to write will leave it.
        self.files: dict[str, InstanceFile] = {}
        #: The latest purge of each study of the replay that retention purged.
        self.purged: dict[str, dt.datetime] = {}
        #: Rows to restore, in the order of their records.
        self.rows: list[InstanceRecord] = []

    def prepare(self, records: Sequence[JournalRecord], *, purges: bool = True) -> None:
        """Look up the ledger's rows (and, with ``purges``, its studies' purges) for
        ``records``, every record the replay may replay."""
        self.files = self.ledger.instance_files(str(r.meta["sop_instance_uid"]) for r in records)
        if purges:
            self.purged = self.ledger.purged_before(str(r.meta["study_uid"]) for r in records)

    def replay(self, record: JournalRecord) -> bool | None:
        """Write a journaled instance's spool file again (or, for a spooled record, check that
        the file is the one recorded); its ledger row is restored (:meth:`commit`) if missing
        or of another version (True), else left (False); None: a spooled record whose file a
        crash took or cut. See :func:`~acwi_node.ingest.journal.replay_orphans`."""
        meta = {k: v for k, v in record.meta.items() if k != SPOOLED_CRC}
        rec = InstanceRecord(**meta)
        if record.spooled:
            try:
                data = self.spool.path_for(rec.study_uid, rec.sop_instance_uid).read_bytes()
            except FileNotFoundError:
                return None
            if not record.matches(data):
                return None
        else:
            self.spool.store(rec.study_uid, rec.sop_instance_uid, record.payload, sync=False)
        recorded = (rec.path, rec.size, rec.transfer_syntax_uid)
        row = self.files.get(rec.sop_instance_uid)
        if row is not None and row.recorded == recorded:
            return False  # the row survived (an older version's row is brought up to date)
        self.rows.append(rec)
        self.files[rec.sop_instance_uid] = InstanceFile(*recorded, utcnow())  # as it will be
        return True

    def superseded(self, record: JournalRecord) -> bool:
        """Whether the ledger settled ``record``'s instance after the record was written (a
        journal restored from a backup): replaying it would bring back an instance retention
        purged, re-opening its study, or an older version of one (:func:`settled_since`)."""
        meta = record.meta
        written = dt.datetime.fromtimestamp(record.time_ns / 1e9, dt.timezone.utc)
        return settled_since(
            self.purged.get(str(meta["study_uid"])),
            self.files.get(str(meta["sop_instance_uid"])),
            (str(meta["path"]), int(meta["size"]), str(meta["transfer_syntax_uid"])),
            written.replace(tzinfo=None),
        )

    def commit(self) -> None:
        """Write the rows to restore, in their order, :data:`LOOKUP_CHUNK` to a transaction
        (committed without a flush: the replay flushes the ledger once, before it releases
        any association); the earlier copy of an instance that moved to another study goes
        once its row names the new one."""
        rows, self.rows = self.rows, []
        for start in range(0, len(rows), LOOKUP_CHUNK):
            chunk = rows[start : start + LOOKUP_CHUNK]
            written = self.ledger.record_instances([(rec, False) for rec in chunk], flushed=False)
            for row in written:
                if row.moved_from:
                    self.spool.remove_moved(row.moved_from)
