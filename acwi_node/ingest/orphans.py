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
"""

from __future__ import annotations

import datetime as dt
import logging

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
        return replay_orphans(
            self.spool.root / JOURNAL_DIR,
            self.replay,
            self.flush,
            fsync=self.fsync,
            superseded=self.superseded,
            release=self.release,
        )

    def flush(self) -> None:
        sync_filesystem(self.spool.root)
        self.ledger.flush()

    def replay(self, record: JournalRecord) -> bool | None:
        """Write a journaled instance's spool file again (or, for a spooled record, check that
        the file is the one recorded); add its ledger row if missing. See
        :func:`~acwi_node.ingest.journal.replay_orphans`."""
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
        if self.ledger.instance_file(rec.sop_instance_uid) == recorded:
            return False  # the row survived (an older version's row is brought up to date)
        row = self.ledger.record_instance(rec, first_in_association=False, flushed=False)
        if row.moved_from:
            self.spool.remove_moved(row.moved_from)
        return True

    def superseded(self, record: JournalRecord) -> bool:
        """Whether the ledger settled ``record``'s instance after the record was written (a
        journal restored from a backup): replaying it would bring back an instance retention
        purged, re-opening its study, or an older version of one. See
        :meth:`Ledger.journaled_since_settled`."""
        meta = record.meta
        written = dt.datetime.fromtimestamp(record.time_ns / 1e9, dt.timezone.utc)
        return self.ledger.journaled_since_settled(
            str(meta["study_uid"]),
            str(meta["sop_instance_uid"]),
            (str(meta["path"]), int(meta["size"]), str(meta["transfer_syntax_uid"])),
            written.replace(tzinfo=None),
        )

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
