"""The ledger's repository API: every state change of the node goes through here.

State changes are conditional updates inside one transaction, so several SCP, worker and
exporter processes can share one database (SQLite in WAL mode, or PostgreSQL) safely.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import functools
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from acwi_node.dicom_classes import reads_nothing
from acwi_node.hl7.er7 import cx_identifiers
from acwi_node.ledger.models import (
    FINAL_JOB_STATES,
    REJECTION_NOTE_KIND,
    UNSETTLED_DELIVERY_STATES,
    Base,
    CommitmentRequest,
    Delivery,
    DeliveryState,
    FlushMark,
    Hl7Inbound,
    Hl7Order,
    Hl7Outbound,
    Instance,
    InstanceArrival,
    Job,
    JobState,
    Notification,
    Purge,
    Result,
    Retrieval,
    RetrievalState,
    ReviewItem,
    ReviewState,
    ShadowJob,
    ShadowState,
    Study,
    StudyState,
    Verdict,
    WebSession,
    utcnow,
)

log = logging.getLogger("acwi_node.ledger")


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP learnt about one stored instance (no patient data)."""

    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    path: str
    size: int
    calling_ae: str
    #: CRC-32 of the stored file's bytes (the spool file: the node's Part 10 header and the
    #: data set as received, or a STOW-RS part as sent); None where not known (an instance
    #: journaled by an earlier version). With the size and transfer syntax, it tells an
    #: instance sent again unchanged from a new version of it (:data:`KEEPS_RESULTS`).
    crc32: int | None = None
    #: Study Date (0008,0020) as ``YYYYMMDD``, "" when absent or not a date.
    study_date: str = ""


@dataclass(frozen=True)
class Recorded:
    study_id: int
    generation: int
    reopened: bool
    duplicate: bool
    #: The instance was recorded before with the same bytes, and its study kept its results
    #: (:data:`KEEPS_RESULTS`): it did not re-open the study.
    unchanged: bool = False
    #: An object no model reads (a report, a key object note, a presentation state:
    #: :func:`acwi_node.dicom_classes.reads_nothing`) added to a study that kept its results:
    #: it did not re-open the study either.
    kept: bool = False
    #: The instance was recorded in another study before (its SOP Instance UID came again
    #: in this one: the sender moved it, as a PACS does when it corrects a study): the spool
    #: path of that earlier copy, which the row no longer names (the caller removes the file).
    #: "" when it was not moved.
    moved_from: str = ""
    #: Another write of the instance replaced this version's spool file before its row was
    #: written (two associations sending it at the same moment): the row was left to the
    #: version whose file is there, and this one re-opened nothing.
    superseded: bool = False


#: UIDs looked up in one query (:meth:`Ledger.instance_files`, :meth:`Ledger.purged_before`),
#: and instance rows written in one transaction by an ingest journal's replay: well under
#: SQLite's limit on a statement's parameters.
LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class InstanceFile:
    """What the ledger recorded of an instance's spool file (:meth:`Ledger.instance_files`)."""

    path: str
    size: int
    transfer_syntax_uid: str
    #: When its last version was received (UTC).
    received_at: dt.datetime

    @property
    def recorded(self) -> tuple[str, int, str]:
        """(path, size, transfer syntax), as :meth:`Ledger.instance_file` returns them."""
        return self.path, self.size, self.transfer_syntax_uid


def settled_since(
    purged_before: dt.datetime | None,
    row: InstanceFile | None,
    recorded: tuple[str, int, str],
    written: dt.datetime,
) -> bool:
    """Whether an ingest journal record written at ``written`` (UTC) for an instance
    (``recorded``: its spool path, size and transfer syntax) is older than what the ledger
    has settled since, as a journal restored from a backup is: a generation of its study
    was purged after it (``purged_before``: the latest ``Purge.received_before`` of its
    study; the purge took every instance received until then), or the instance's ``row`` is
    from the same or a later arrival (received at or after ``written``) and describes
    another file. A record never recorded (a crash) is neither; nor is one whose row survived
    as it was recorded (its spool file may not have)."""
    if purged_before is not None and purged_before >= written:
        return True
    if row is None or row.received_at < written:
        return False
    return row.recorded != recorded


#: The states of a study that an instance sent again unchanged does not re-open: it has its
#: results, or is on its way to them. Re-opening would analyse the same images again and put a
#: case a radiologist may have decided back on the worklist. A study that failed or was not
#: routed re-opens on any instance (the sender may be trying again), and so does one whose files
#: storage retention deleted.
KEEPS_RESULTS = frozenset(
    {
        StudyState.COMPLETE.value,
        StudyState.QUEUED.value,
        StudyState.ANALYSING.value,
        StudyState.EXPORTING.value,
        StudyState.DELIVERED.value,
    }
)


@dataclass(frozen=True)
class RoutedJob:
    """What the router decided for a completed study."""

    route: str
    model: str
    destinations: list[str]
    priority: int


@dataclass(frozen=True)
class StudyFacts:
    """What routing rules look at."""

    study_uid: str
    calling_ae: str
    modalities: set[str]
    sop_classes: set[str]
    body_parts: set[str]
    #: Study Date (0008,0020) as ``YYYYMMDD`` (the first instance's that had one), or "".
    study_date: str = ""


@dataclass(frozen=True)
class JobClaim:
    """A worker's claim on a job, as :meth:`Ledger.claim_job` made it: its start and its
    attempt number. A job whose lease ran out and that another worker took over has another
    claim; the writes of the worker that stalled (its lease renewed, its results recorded,
    the job failed or queued again) then change nothing."""

    started_at: dt.datetime
    attempts: int


@dataclass(frozen=True)
class ResultFile:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class DueDelivery:
    id: int
    job_id: int
    destination: str
    path: str
    attempts: int
    study_uid: str = ""
    #: Attempts that could not reach the destination (an outage), not counted in ``attempts``.
    outage_attempts: int = 0


@dataclass(frozen=True)
class DeliveryAttempt:
    """One attempt to deliver one result, as the exporter saw it."""

    delivery_id: int
    delivered: bool
    status: int | None
    error: str
    #: The delivery fails for good once it has had this many attempts.
    max_attempts: int
    #: Seconds until the next attempt, if there is one.
    backoff_s: float
    #: Delivered, and the destination's storage commitment is to be asked for: the delivery
    #: waits (``committing``) for its report (:meth:`Ledger.record_commitment`).
    awaits_commitment: bool = False
    #: The destination could not be reached at all (nothing answered). With
    #: ``outage_patience_s`` > 0 such an attempt is not counted against ``max_attempts``: the
    #: delivery fails only once the destination has been unreachable that long.
    unreachable: bool = False
    outage_patience_s: float = 0.0
    #: The claim the attempt was made under (:meth:`Ledger.claim_deliveries`): not recorded
    #: if another process has taken the delivery over since. None: recorded whoever holds it.
    claim: str | None = None


@dataclass(frozen=True)
class AwaitedCommitment:
    """A result a destination stored and whose storage commitment is to be requested."""

    delivery_id: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str


@dataclass(frozen=True)
class CommitmentOutcome:
    """What a storage commitment report changed in the outbox."""

    #: Deliveries the report committed (now delivered).
    committed: int = 0
    #: Deliveries it refused: sent again (or failed for good after the last attempt).
    refused: int = 0
    #: Whether the transaction was one of this ledger's (a request still awaited).
    known: bool = False


#: What :meth:`Ledger.record_hl7_attempt` answers for an attempt whose claim another process
#: has taken over: nothing recorded.
SUPERSEDED = "superseded"

#: Job priority given to the jobs of a study whose order is STAT; jobs at or above it go to the
#: high-priority analysis queue.
STAT_PRIORITY = 1000

#: Order columns :meth:`Ledger.hl7_record_message` takes from an order dict.
ORDER_FIELDS = (
    "study_uid",
    "priority",
    "expected_images",
    "placer_order_number",
    "filler_order_number",
    "procedure_code",
    "procedure_text",
    "patient_id",
    "patient_name",
    "birth_date",
    "sex",
)


@dataclass(frozen=True)
class RetriedDeliveries:
    """What :meth:`Ledger.retry_failed` put back in the outbox."""

    deliveries: int
    study_uids: list[str]


@dataclass(frozen=True)
class DueHl7:
    id: int
    control_id: str
    message: str
    #: Attempts so far, an outage's included (the back-off grows with them).
    attempts: int


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, *, synchronous: str = "FULL") -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit survives a power loss or an OS crash too (NORMAL may roll the last ones
    # back). Only the ingest journal's instance rows use NORMAL: the journal is durable first
    # and its checkpoint flushes the ledger (see Ledger.flush).
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


#: libpq's connection settings for a PostgreSQL ledger, unless its URL gives its own
#: (``?connect_timeout=30``). Without them a database server that does not answer (a failover
#: whose old address is gone, a firewall that drops a connection without a reset) holds a
#: ledger call for as long as the kernel retransmits, a quarter of an hour: a C-STORE's
#: association release and a loop's pass hung with it (measured: the release, for the whole
#: outage). With them a new connection gives up after ``connect_timeout`` seconds (a server
#: that accepts and never answers included), and one whose data or keepalives the server stops
#: acknowledging is closed after ``tcp_user_timeout`` milliseconds, failing the call under way
#: (the pool's pre-ping then replaces the connection).
POSTGRES_CONNECT_ARGS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def make_engine(url: str | URL, *, sqlite_synchronous: str = "FULL") -> Engine:
    """An engine for the ledger URL; SQLite gets WAL and a busy timeout, PostgreSQL psycopg 3.
    A :class:`~sqlalchemy.engine.URL` is how a password from a file comes
    (:attr:`acwi_node.config.Settings.ledger_url`): it is never written into a string."""
    if isinstance(url, URL):
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        if url.get_backend_name() != "postgresql":
            url = url.render_as_string(hide_password=False)
    if isinstance(url, str) and url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if isinstance(url, str) and url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(
            engine,
            "connect",
            functools.partial(_sqlite_pragmas, synchronous=sqlite_synchronous),
        )
        return engine
    given = make_url(url).query
    connect_args = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in given}
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args
    )


#: pg_advisory_xact_lock key held while the ledger's tables are created ("ACWI" in ASCII).
_SCHEMA_LOCK_KEY = 0x41435749


def _lease_time() -> Any:
    """When an analysing job last showed a sign of life (heartbeat, else its start)."""
    return func.coalesce(Job.heartbeat_at, Job.started_at)


# The completion loop's queries, asked every ``completion.poll_interval_s``: built once
# (building a statement cost about a third of a pass).
_STUDIES_DUE = select(Study.id, Study.generation).where(
    Study.state == StudyState.RECEIVING,
    (
        (Study.open_associations <= 0)
        & (Study.last_received_at <= bindparam("quiet_cut"))
        & ((Study.last_released_at.is_(None)) | (Study.last_released_at <= bindparam("quiet_cut")))
    )
    | (Study.last_received_at <= bindparam("wait_cut")),
)
_EXPECTED_STUDIES_DUE = (
    select(Study.id, Study.generation)
    .join(Hl7Order, Hl7Order.study_uid == Study.study_uid)
    .where(
        Study.state == StudyState.RECEIVING,
        Study.open_associations <= 0,
        Study.last_released_at.is_not(None),
        Study.last_released_at >= Study.last_received_at,
        Hl7Order.status == "scheduled",
        Hl7Order.expected_images.is_(None) | (Study.instance_count >= Hl7Order.expected_images),
    )
)


class _IngestSql:
    """The SQL of :meth:`Ledger.record_instance`, for the DB-API connection of one dialect.

    Written as SQLAlchemy would write it for the models (the same columns and defaults; dates
    as SQLAlchemy stores them in SQLite), so the ORM reads these rows like its own;
    ``tests/unit/test_ledger.py`` checks that.
    """

    def __init__(self, dialect: str, dbapi: Any) -> None:
        self.postgresql = dialect == "postgresql"
        self.integrity_error: type[Exception] = dbapi.IntegrityError
        q = self._style
        lock = " FOR UPDATE" if self.postgresql else ""
        self.select_study = q(
            "SELECT id, generation, state, modality, body_part, study_date FROM studies"
            f" WHERE study_uid = :uid{lock}"
        )
        self.insert_study = q(
            "INSERT INTO studies (study_uid, state, generation, calling_ae,"
            " generation_calling_ae, modality, body_part, study_date, instance_count,"
            " open_associations, first_received_at, last_received_at, updated_at,"
            " needs_review, reason, completed_by)"
            " VALUES (:uid, :state, 1, :ae, :ae, :modality, :body_part, :study_date, 0, 0,"
            " :now, :now, :now, FALSE, '', '') RETURNING id"
        )
        #: Those of a batch's instances already recorded, with what tells whether one came
        #: again unchanged (one query per batch).
        known = (
            "SELECT sop_instance_uid, id, size, transfer_syntax_uid, path, crc32, study_id"
            " FROM instances"
        )
        self.select_instances = (
            f"{known} WHERE sop_instance_uid = ANY(%(sops)s)"
            if self.postgresql
            else f"{known} WHERE sop_instance_uid IN (SELECT value FROM json_each(:sops))"
        )
        self.insert_instance = q(
            "INSERT INTO instances (study_id, sop_instance_uid, sop_class_uid, series_uid,"
            " transfer_syntax_uid, modality, path, size, crc32, calling_ae, generation,"
            " received_at)"
            " VALUES (:study_id, :sop, :sop_class, :series, :ts, :modality, :path, :size, :crc32,"
            " :ae, :generation, :now)"
        )
        #: A new version of an instance (or the same sent again): the row tells the version
        #: the spool holds, and who sent it.
        self.update_instance = q(
            "UPDATE instances SET path = :path, size = :size, crc32 = :crc32,"
            " transfer_syntax_uid = :ts, generation = :generation, received_at = :now,"
            " calling_ae = :ae WHERE id = :id"
        )
        #: An instance recorded in another study came in this one: the row moves, whole.
        self.move_instance = q(
            "UPDATE instances SET study_id = :study_id, sop_class_uid = :sop_class,"
            " series_uid = :series, modality = :modality, calling_ae = :ae, path = :path,"
            " size = :size, crc32 = :crc32, transfer_syntax_uid = :ts,"
            " generation = :generation, received_at = :now WHERE id = :id"
        )
        #: The study an instance moved out of has one instance fewer.
        self.instance_moved_out = q(
            "UPDATE studies SET instance_count = instance_count - 1, updated_at = :now"
            " WHERE id = :id AND instance_count > 0"
        )
        received = (
            "last_received_at = :now, modality = :modality, body_part = :body_part,"
            " study_date = :study_date,"
            " open_associations = open_associations + :open,"
            " instance_count = instance_count + :count, updated_at = :now"
        )
        #: A study still receiving: its state and generation are left as they are.
        self.update_study = q(f"UPDATE studies SET {received} WHERE id = :id")
        #: An instance re-opens a study that had completed: a new generation, whose sender
        #: is that instance's.
        self.reopen_study = q(
            f"UPDATE studies SET {received}, generation = :generation, state = :state,"
            " generation_calling_ae = :ae, reason = '' WHERE id = :id"
        )
        #: An association that sent instances of these studies ended (never below zero). On
        #: PostgreSQL the rows are locked first in the order a batch of instance rows locks
        #: them (their UIDs', byte by byte): two associations ending together, or one ending
        #: while another's rows are written, each updating the same studies in whatever order
        #: the scan met them, deadlocked (the server aborts one after its deadlock_timeout,
        #: leaving a study counted as open until completion's upper bound on waiting).
        self.release_studies = (
            "WITH locked AS (SELECT id FROM studies WHERE id = ANY(%(ids)s)"
            ' ORDER BY study_uid COLLATE "C" FOR UPDATE)'
            " UPDATE studies SET open_associations = GREATEST(open_associations - 1, 0),"
            " last_released_at = %(now)s FROM locked WHERE studies.id = locked.id"
            if self.postgresql
            else "UPDATE studies SET open_associations = max(open_associations - 1, 0),"
            " last_released_at = :now WHERE id IN (SELECT value FROM json_each(:ids))"
        )
        #: The process that holds an association counts it as its own (``association_holds``,
        #: :class:`~acwi_node.ledger.models.AssociationHold`): one statement per study the
        #: association opens, in the transaction that counts it.
        self.hold_studies = q(
            "INSERT INTO association_holds (study_id, holder, count) VALUES (:id, :holder, :open)"
            " ON CONFLICT (study_id, holder) DO UPDATE"
            " SET count = association_holds.count + excluded.count"
        )
        ids = "= ANY(%(ids)s)" if self.postgresql else "IN (SELECT value FROM json_each(:ids))"
        holder = "%(holder)s" if self.postgresql else ":holder"
        #: ... and no longer once it ended: the holds it had alone go, the others count one
        #: fewer (after :attr:`release_studies`, which locks the studies first). On PostgreSQL
        #: in one statement (one round trip): the rows deleted and those updated are not the
        #: same rows.
        unhold_last = (
            f"DELETE FROM association_holds WHERE holder = {holder} AND count <= 1"
            f" AND study_id {ids}"
        )
        unhold_others = (
            "UPDATE association_holds SET count = count - 1"
            f" WHERE holder = {holder} AND count > 1 AND study_id {ids}"
        )
        self.unhold_studies = (
            [f"WITH last AS ({unhold_last}) {unhold_others}"]
            if self.postgresql
            else [unhold_last, unhold_others]
        )
        #: A process that is gone: its holds, taken in one statement (whoever deletes them
        #: releases them, once).
        self.take_holds = q(
            "DELETE FROM association_holds WHERE holder = :holder RETURNING study_id, count"
        )
        #: ... and the studies they counted, locked as :attr:`release_studies` locks them.
        self.lock_studies = (
            "SELECT id FROM studies WHERE id = ANY(%(ids)s)"
            ' ORDER BY study_uid COLLATE "C" FOR UPDATE'
            if self.postgresql
            else None
        )
        self.release_held = q(
            "UPDATE studies SET open_associations = "
            + ("GREATEST" if self.postgresql else "max")
            + "(open_associations - :count, 0), last_released_at = :now WHERE id = :id"
        )

    def _style(self, sql: str) -> str:
        """``:name`` (sqlite3) or ``%(name)s`` (psycopg) parameters."""
        return re.sub(r":(\w+)", r"%(\1)s", sql) if self.postgresql else sql

    def uid_list(self, values: Sequence[str] | Sequence[int]) -> Any:
        """``values`` as :attr:`select_instances` and :attr:`release_studies` take them: an
        array (PostgreSQL), a JSON array (SQLite's ``json_each``)."""
        return list(values) if self.postgresql else json.dumps(list(values))

    def time(self, value: dt.datetime) -> Any:
        """A timestamp as SQLAlchemy stores it: text in SQLite, a timestamp in PostgreSQL."""
        return value if self.postgresql else value.isoformat(" ", "microseconds")


@dataclass
class _StudyRows:
    """A study's row while a batch of its instances is written (:meth:`Ledger.record_instances`)."""

    id: int
    generation: int
    state: str
    modality: str
    body_part: str
    study_date: str
    #: Instances of the batch that are new to the ledger; of those, first in their association.
    added: int = 0
    opened: int = 0
    reopened: bool = False
    #: The calling AE title of the instance that re-opened it: the new generation's sender.
    reopened_by: str = ""


class LedgerSchemaError(RuntimeError):
    """The ledger's database lacks a column this version needs and cannot add by itself."""


def upgrade_schema(conn: Connection) -> list[str]:
    """Bring a ledger made by an earlier version up to this one's tables, in ``conn``'s
    transaction: add each column a model has and its table lacks (nullable, or with a constant
    default its existing rows take), and each missing index. Returns what was added, as
    ``table.column`` and ``index name``; raises :class:`LedgerSchemaError` for a column it
    cannot add (one whose default is computed, or unique). Tables themselves are created by
    ``create_all`` before this runs."""
    inspector = inspect(conn)
    added: list[str] = []
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            default = _constant_default(column, conn.dialect)
            if column.unique or column.primary_key or (default is None and not column.nullable):
                raise LedgerSchemaError(
                    f"the ledger's table {table.name} lacks the column {column.name}, which this"
                    " version cannot add to existing rows: restore the ledger of the version that"
                    " made it, or start a new ledger (database_url)"
                )
            ddl = (
                f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                f"{column.type.compile(dialect=conn.dialect)}"
            )
            if default is not None:
                ddl += f" DEFAULT {default}"
            if not column.nullable:
                ddl += " NOT NULL"
            conn.execute(text(ddl))
            added.append(f"{table.name}.{column.name}")
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            if index.name not in indexes:
                index.create(conn)
                added.append(str(index.name))
    return added


def _constant_default(column: Any, dialect: Any) -> str | None:
    """The SQL literal of a column's constant Python default (an enum as its value); None
    for no default or a computed one."""
    default = column.default
    if default is None or not getattr(default, "is_scalar", False):
        return None
    value = default.arg
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return None


class OrderCancelled(Exception):
    """A message would reopen a cancelled order (a change, a status change, a new order with
    its accession number): a cancelled order stays cancelled, and nothing of the message is
    kept. ``index`` is the order's place in its message (1-based)."""

    def __init__(self, accession_number: str, index: int) -> None:
        super().__init__(f"order {index} of the message is cancelled")
        self.accession_number = accession_number
        self.index = index


@dataclass(frozen=True)
class MergeMoved:
    """What one patient merge moved to the surviving patient: ``orders`` (HL7 orders) and
    ``messages`` (ORU^R01 messages built and waiting in the outbox, not yet delivered)."""

    orders: int = 0
    messages: int = 0


@dataclass(frozen=True)
class PatientMerge:
    """One merge of an ``ADT^A40`` (or another merge event): the orders of any of the
    ``prior`` identifiers (MRG-1, as (CX-1 id, CX-4 assigning authority) pairs) go to the
    surviving patient: ``patient_id`` (PID-3, ER7) and, where given, the name, birth date and
    sex of its PID. ``identifier_change`` (``ADT^A47``): the same patient, whose ``prior``
    identifiers were wrong; they are replaced by ``patient_id``'s and the patient's other
    identifiers stay (:func:`_changed_identifiers`)."""

    prior: tuple[tuple[str, str], ...]
    patient_id: str
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    identifier_change: bool = False


class StudyActionRefused(Exception):
    """An operator's action on a study (resend, reprocess) that its state does not allow; the
    message says why and what to do instead."""


class NoSuchStudy(StudyActionRefused):
    """An operator's action on a study the ledger does not hold (the HTTP API's 404)."""

    def __init__(self, message: str = "no such study") -> None:
        super().__init__(message)


def _lock_jobs(s: Session, job_ids: Iterable[int]) -> None:
    """Lock the jobs' rows (PostgreSQL; in id order) before their deliveries' are written.

    Every writer of deliveries that may settle a job (:meth:`Ledger._sync_job_delivery`)
    takes the job first, as withdrawals and verified SRs do: two transactions recording the
    last deliveries of one job (the exporter one destination's, the storage SCP another's
    commitment report) take turns, the second seeing the first's (each saw the other's still
    unsettled, and the job stayed exporting for ever), and none deadlocks against a
    withdrawal that holds the job and supersedes its deliveries."""
    ids = sorted(set(job_ids))
    if ids:
        s.execute(select(Job.id).where(Job.id.in_(ids)).order_by(Job.id).with_for_update())


def _hold_claim(s: Session, job_id: int, claim: JobClaim | None) -> bool:
    """In ``s``'s transaction: renew the lease of ``job_id`` if it is analysing (and, with
    ``claim``, is still that claim), which locks its row until the transaction ends (SQLite:
    the ledger). Whether it did: a conditional update, its rows counted."""
    held = [Job.id == job_id, Job.state == JobState.ANALYSING]
    if claim is not None:
        held += [Job.started_at == claim.started_at, Job.attempts == claim.attempts]
    result = s.execute(update(Job).where(*held).values(heartbeat_at=utcnow()))
    return bool(getattr(result, "rowcount", 0))


def new_claim() -> str:
    """A claim token: one process's claim on outbox rows it sends (deliveries, ORU^R01
    messages, notifications), written with the claim and named by each later write."""
    return uuid.uuid4().hex


def _held_by(table: Any, claim: str | None) -> list[Any]:
    """The condition that an outbox row of ``table`` is still under ``claim`` (None: under
    anyone's): a write that names a claim another process has since replaced (the first
    stalled past its lease, and the second took the row over) changes nothing."""
    return [] if claim is None else [table.claim_token == claim]


def _forget_requests(s: Session, delivery_ids: Sequence[int]) -> None:
    """The storage commitment requests of settled deliveries: no report applies any more."""
    if delivery_ids:
        s.execute(
            delete(CommitmentRequest).where(CommitmentRequest.delivery_id.in_(list(delivery_ids)))
        )


def _with_values(held: str, received: str, limit: int) -> str:
    """``held`` (a study's values, backslash-separated) with those of ``received`` it lacks
    (compared without case and surrounding blanks) added, each only if the whole fits in
    ``limit`` characters: a value is never cut short."""
    have = {v.strip().upper() for v in held.split("\\") if v.strip()}
    for value in received.split("\\"):
        value = value.strip()
        if not value or value.upper() in have:
            continue
        joined = f"{held}\\{value}" if held else value
        if len(joined) <= limit:
            held = joined
            have.add(value.upper())
    return held


class Ledger:
    """Repository over the ledger database."""

    def __init__(self, url: str | URL, *, create: bool = True) -> None:
        #: The ledger's URL as text; without the password a :class:`~sqlalchemy.engine.URL`
        #: given (``Settings.ledger_url``) carries, which stays in the engine alone.
        self.url = url if isinstance(url, str) else url._replace(password=None).render_as_string()
        self._connect_url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._pid = os.getpid()
        #: SQLite connections whose commits are not flushed (rows the ingest journal protects).
        self._unflushed_engine: Engine | None = None
        self._ingest_sql = _IngestSql(self.engine.dialect.name, self.engine.dialect.loaded_dbapi)
        if create:
            self._create_schema()

    def _create_schema(self) -> None:
        """Create missing tables. Several processes start at once against one database and
        take turns (CREATE TABLE races otherwise: "table ... already exists"): an advisory
        lock on PostgreSQL, a lock file beside an SQLite database."""
        if self.engine.dialect.name != "postgresql":
            database = self.engine.url.database
            if not database or database == ":memory:":
                Base.metadata.create_all(self.engine)
                return
            with open(f"{database}.schema-lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                Base.metadata.create_all(self.engine)
                with self.engine.begin() as conn:
                    self._log_upgrade(upgrade_schema(conn))
            return
        with self.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            Base.metadata.create_all(conn)
            self._log_upgrade(upgrade_schema(conn))

    @staticmethod
    def _log_upgrade(added: list[str]) -> None:
        if added:
            log.warning("ledger: upgraded to this version's schema: added %s", ", ".join(added))

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:  # after fork: never share pooled connections
            self.engine.dispose(close=False)
            if self._unflushed_engine is not None:
                self._unflushed_engine.dispose(close=False)
            self._pid = os.getpid()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session inside one transaction, committed on success."""
        self._after_fork()
        with self._sessions() as s, s.begin():
            yield s

    def flush(self) -> None:
        """Make every commit so far durable, the unflushed ones included.

        PostgreSQL: a synchronous commit of a transaction with an ID flushes the write-ahead
        log up to it, and with it every asynchronous commit before. SQLite (WAL mode): the
        unflushed commits are in the ``-wal`` file (or, checkpointed, in the database file,
        which SQLite synced then); a commit with ``synchronous = FULL`` syncs that file, so
        one that writes a row (:class:`FlushMark`) keeps them all. The files are never opened
        here: closing a descriptor of them would drop every SQLite lock this process holds on
        them (see :class:`FlushMark`).
        """
        self._after_fork()
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text("SELECT txid_current()"))
            return
        database = self.engine.url.database
        if not database or database == ":memory:":
            return
        mark = sqlite_insert(FlushMark).values(id=1, flushes=1)
        mark = mark.on_conflict_do_update(
            index_elements=[FlushMark.id], set_={"flushes": FlushMark.flushes + 1}
        )
        with self.engine.begin() as conn:
            conn.execute(mark)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._unflushed_engine is not None:
            self._unflushed_engine.dispose()

    # ------------------------------------------------------------------ ingest
    def record_instance(
        self, rec: InstanceRecord, *, first_in_association: bool, flushed: bool = True
    ) -> Recorded:
        """Record a stored instance; creates or re-opens its study. Safe under concurrency.

        ``flushed=False``: the commit is not waited for on disk; only for an instance the
        ingest journal holds, whose checkpoint calls :meth:`flush`.
        """
        return self.record_instances([(rec, first_in_association)], flushed=flushed)[0]

    def record_instances(
        self,
        batch: Sequence[tuple[InstanceRecord, bool]],
        *,
        flushed: bool = True,
        file_is_current: Callable[[int], bool] | None = None,
        holder: str | None = None,
    ) -> list[Recorded]:
        """:meth:`record_instance` for each (record, first in its association) of ``batch``,
        in order, in one transaction: all are recorded, or (raising) none.

        ``holder``: the process whose associations sent them (its ingest journal's name), which
        holds the associations each study counts as opened here
        (:class:`~acwi_node.ledger.models.AssociationHold`); its :meth:`association_released`
        names it too. None: the studies alone count them.

        ``file_is_current(i)``: whether the spool file at ``batch[i]``'s path is still the one
        that record describes. It is asked while the batch's studies are locked, for each
        instance recorded before; False (another association stored another version of the
        instance at the same moment, and its file replaced this one's) leaves the row's size,
        CRC-32 and transfer syntax to the version whose file is there: the file writes and
        the row writes of two associations may land in different orders, and the row must
        describe the file, not the last row written (:attr:`Recorded.superseded`)."""
        for attempt in range(3):
            try:
                return self._record_instances(batch, flushed, file_is_current, holder)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _record_instances(
        self,
        batch: Sequence[tuple[InstanceRecord, bool]],
        flushed: bool,
        file_is_current: Callable[[int], bool] | None,
        holder: str | None = None,
    ) -> list[Recorded]:
        sql = self._ingest_sql
        try:
            with self._ingest_transaction(flushed) as cur:
                return self._write_instances(
                    cur, batch, sql.time(utcnow()), file_is_current, holder
                )
        except sql.integrity_error as exc:
            raise IntegrityError(sql.insert_instance, None, exc) from exc

    @contextmanager
    def _ingest_transaction(self, flushed: bool) -> Iterator[Any]:
        """A DB-API cursor in one transaction, committed when the block ends, else rolled
        back; with ``flushed`` false the commit does not wait for the disk (SQLite:
        ``synchronous = NORMAL``; PostgreSQL: ``synchronous_commit`` off).

        The ingest's statements (:class:`_IngestSql`) run this way, on the DB-API connection
        with SQL written once: they run for every C-STORE and every association, and
        SQLAlchemy's execution machinery cost more than the database's own work."""
        self._after_fork()
        postgresql = self._ingest_sql.postgresql
        engine = self.engine
        if not flushed and not postgresql:
            if self._unflushed_engine is None:
                self._unflushed_engine = make_engine(self._connect_url, sqlite_synchronous="NORMAL")
            engine = self._unflushed_engine
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            if not postgresql:
                # The write lock from the first statement: what the batch reads (the instances
                # known, their spool files) is what it writes over. sqlite3 would begin the
                # transaction only at the first INSERT or UPDATE, after the reads.
                cur.execute("BEGIN IMMEDIATE")
            elif not flushed:
                cur.execute("SET LOCAL synchronous_commit TO OFF")
            yield cur
            cur.close()
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()  # back to the pool

    def _write_instances(
        self,
        cur: Any,
        batch: Sequence[tuple[InstanceRecord, bool]],
        now: Any,
        file_is_current: Callable[[int], bool] | None = None,
        holder: str | None = None,
    ) -> list[Recorded]:
        """A batch's rows, on ``cur``, inside the caller's transaction: what writing them one
        after the other would leave, in a few statements (one query for the instances already
        recorded; per study, one query and one update; the new instances in one
        ``executemany``) rather than four per instance; with ``holder``, one more per study
        that an association opens here."""
        sql = self._ingest_sql
        sops = list(dict.fromkeys(rec.sop_instance_uid for rec, _ in batch))
        cur.execute(sql.select_instances, {"sops": sql.uid_list(sops)})
        known: dict[str, int] = {}
        #: (size, transfer syntax, CRC-32) of each known instance whose file the spool holds.
        known_bytes: dict[str, tuple[int, str, int | None]] = {}
        #: The study and spool path of each known instance.
        known_in: dict[str, tuple[int, str]] = {}
        for sop, id_, size, ts, path, crc, study_id in cur.fetchall():
            known[str(sop)] = int(id_)
            known_in[str(sop)] = (int(study_id), str(path or ""))
            if path:  # "": storage retention deleted its file
                known_bytes[str(sop)] = (int(size), str(ts), None if crc is None else int(crc))
        # The batch's studies are read (locked, on PostgreSQL) in one order, their UIDs', not in
        # the order their instances came: two batches sharing studies (associations sending
        # the same studies in different orders) then never wait for each other's locks.
        first_of: dict[str, InstanceRecord] = {}
        for rec, _ in batch:
            first_of.setdefault(rec.study_uid, rec)
        studies = {uid: self._study_rows(cur, first_of[uid], now) for uid in sorted(first_of)}
        inserts: dict[str, dict[str, Any]] = {}  # by SOP Instance UID, in order
        updates: list[dict[str, Any]] = []
        moves: list[dict[str, Any]] = []
        moved_out: list[int] = []  # a study per instance that left it
        recorded: list[Recorded] = []
        for index, (rec, first_in_association) in enumerate(batch):
            study = studies[rec.study_uid]
            sop = rec.sop_instance_uid
            before = known_in.get(sop)
            moved = before is not None and before[0] != study.id
            # Asked under the studies' locks: the file replaced after this is the file of a
            # version whose row comes after this one.
            superseded = file_is_current is not None and not moved and not file_is_current(index)
            reopened = study.state != StudyState.RECEIVING.value and not superseded
            unchanged = (
                not moved
                and not superseded
                and reopened
                and study.state in KEEPS_RESULTS
                and rec.crc32 is not None
                and known_bytes.get(rec.sop_instance_uid)
                == (rec.size, rec.transfer_syntax_uid, rec.crc32)
            )
            kept = (
                reopened
                and not unchanged
                and study.state in KEEPS_RESULTS
                and reads_nothing(rec.sop_class_uid)
            )
            if unchanged or kept:  # sent again as it was, or nothing to read: results kept
                reopened = False
            if reopened:  # an instance re-opens a study that had completed: a new generation
                study.generation += 1
                study.state = StudyState.RECEIVING.value
                study.reopened = True
                study.reopened_by = rec.calling_ae
            # Every value the study's instances carry (routing matches any of them), as many
            # as the column holds whole.
            study.modality = _with_values(study.modality, rec.modality, 16)
            study.body_part = _with_values(study.body_part, rec.body_part, 64)
            study.study_date = study.study_date or rec.study_date
            study.opened += 1 if first_in_association else 0
            version = {
                "path": rec.path,
                "size": rec.size,
                # A superseded version's row is one the instance's own version updates.
                "crc32": None if superseded else rec.crc32,
                "ts": rec.transfer_syntax_uid,
                "generation": study.generation,
                "now": now,
            }
            duplicate = (sop in known and not moved) or sop in inserts
            moved_from = ""
            if moved and before is not None:
                # One SOP Instance UID names one instance: sent in another study, it moves
                # there, as a later version replaces an earlier one in the same study.
                moves.append(
                    {
                        "id": known[sop],
                        "study_id": study.id,
                        "sop_class": rec.sop_class_uid,
                        "series": rec.series_uid,
                        "modality": rec.modality,
                        "ae": rec.calling_ae,
                        **version,
                    }
                )
                moved_out.append(before[0])
                known_in[sop] = (study.id, rec.path)
                study.added += 1
                moved_from = before[1] if before[1] != rec.path else ""
                log.warning(
                    "ledger: an instance of study_id=%d came again in study_id=%d: it moved"
                    " there (its SOP Instance UID names one instance)",
                    before[0],
                    study.id,
                )
            elif sop in known:
                if not superseded:
                    updates.append({"id": known[sop], "ae": rec.calling_ae, **version})
            elif sop in inserts:  # twice in the batch: the row takes the later version
                first = inserts[sop]
                if first["study_id"] != study.id:  # and moved, in the batch
                    left = next(o for o in studies.values() if o.id == first["study_id"])
                    left.added -= 1
                    study.added += 1
                    duplicate = False
                    moved_from = first["path"] if first["path"] != rec.path else ""
                    first.update(
                        study_id=study.id,
                        sop_class=rec.sop_class_uid,
                        series=rec.series_uid,
                        modality=rec.modality,
                        ae=rec.calling_ae,
                    )
                first.update(version, ae=rec.calling_ae)
            else:
                inserts[sop] = {
                    "study_id": study.id,
                    "sop": sop,
                    "sop_class": rec.sop_class_uid,
                    "series": rec.series_uid,
                    "modality": rec.modality,
                    "ae": rec.calling_ae,
                    **version,
                }
                study.added += 1
            recorded.append(
                Recorded(
                    study.id,
                    study.generation,
                    reopened,
                    duplicate,
                    unchanged,
                    kept,
                    moved_from,
                    superseded,
                )
            )
        if inserts:
            cur.executemany(sql.insert_instance, list(inserts.values()))
        if updates:
            cur.executemany(sql.update_instance, updates)
        if moves:
            cur.executemany(sql.move_instance, moves)
            cur.executemany(
                sql.instance_moved_out, [{"id": study_id, "now": now} for study_id in moved_out]
            )
        for study in studies.values():
            params: dict[str, Any] = {
                "id": study.id,
                "now": now,
                "modality": study.modality,
                "body_part": study.body_part,
                "study_date": study.study_date,
                "open": study.opened,
                "count": study.added,
            }
            if study.reopened:
                params.update(generation=study.generation, state=study.state, ae=study.reopened_by)
            cur.execute(sql.reopen_study if study.reopened else sql.update_study, params)
            if holder is not None and study.opened:
                cur.execute(
                    sql.hold_studies, {"id": study.id, "holder": holder, "open": study.opened}
                )
        return recorded

    def _study_rows(self, cur: Any, rec: InstanceRecord, now: Any) -> _StudyRows:
        """The study of ``rec`` as the batch finds it (locked on PostgreSQL), created as
        receiving if the ledger has none."""
        sql = self._ingest_sql
        cur.execute(sql.select_study, {"uid": rec.study_uid})
        row = cur.fetchone()
        if row is not None:
            study_id, generation, state, modality, body_part, study_date = row
            return _StudyRows(
                int(study_id), int(generation), state, modality or "", body_part, study_date or ""
            )
        modality = _with_values("", rec.modality, 16)
        body_part = _with_values("", rec.body_part, 64)
        cur.execute(
            sql.insert_study,
            {
                "uid": rec.study_uid,
                "state": StudyState.RECEIVING.value,
                "ae": rec.calling_ae,
                "modality": modality,
                "body_part": body_part,
                "study_date": rec.study_date,
                "now": now,
            },
        )
        created = cur.fetchone()
        assert created is not None
        return _StudyRows(
            int(created[0]), 1, StudyState.RECEIVING.value, modality, body_part, rec.study_date
        )

    def instance_version(
        self, sop_instance_uid: str
    ) -> tuple[str, int, int | None, dt.datetime] | None:
        """The spool path, size, CRC-32 (None where not known) and time (UTC) recorded for an
        instance; None when the ledger has no such row."""
        with self.session() as s:
            row = s.execute(
                select(Instance.path, Instance.size, Instance.crc32, Instance.received_at).where(
                    Instance.sop_instance_uid == sop_instance_uid
                )
            ).first()
        if row is None:
            return None
        return str(row[0]), int(row[1]), None if row[2] is None else int(row[2]), row[3]

    def journaled_since_settled(
        self,
        study_uid: str,
        sop_instance_uid: str,
        recorded: tuple[str, int, str],
        written: dt.datetime,
    ) -> bool:
        """Whether an ingest journal record written at ``written`` (UTC) for an instance
        (``recorded``: its spool path, size and transfer syntax) is older than what the ledger
        has settled since (:func:`settled_since`); one record's look-ups, where a replay of
        many makes them in batches (:meth:`instance_files`, :meth:`purged_before`)."""
        return settled_since(
            self.purged_before([study_uid]).get(study_uid),
            self.instance_files([sop_instance_uid]).get(sop_instance_uid),
            recorded,
            written,
        )

    def instance_files(self, sop_instance_uids: Iterable[str]) -> dict[str, InstanceFile]:
        """The spool path, size, transfer syntax and time received (UTC) recorded for each of
        these instances that the ledger has, by SOP Instance UID: one query per
        :data:`LOOKUP_CHUNK` of them (an ingest journal's replay looks up thousands)."""
        found: dict[str, InstanceFile] = {}
        uids = list(dict.fromkeys(sop_instance_uids))
        with self.session() as s:
            for start in range(0, len(uids), LOOKUP_CHUNK):
                rows = s.execute(
                    select(
                        Instance.sop_instance_uid,
                        Instance.path,
                        Instance.size,
                        Instance.transfer_syntax_uid,
                        Instance.received_at,
                    ).where(Instance.sop_instance_uid.in_(uids[start : start + LOOKUP_CHUNK]))
                )
                for sop, path, size, ts, received_at in rows:
                    found[str(sop)] = InstanceFile(str(path), int(size), str(ts), received_at)
        return found

    def purged_before(self, study_uids: Iterable[str]) -> dict[str, dt.datetime]:
        """For each of these studies that retention purged, the latest ``received_before``
        of its purges (every instance received until then was purged), by Study Instance UID;
        one query per :data:`LOOKUP_CHUNK` of them."""
        found: dict[str, dt.datetime] = {}
        uids = list(dict.fromkeys(study_uids))
        with self.session() as s:
            for start in range(0, len(uids), LOOKUP_CHUNK):
                rows = s.execute(
                    select(Study.study_uid, func.max(Purge.received_before))
                    .join(Study, Purge.study_id == Study.id)
                    .where(Study.study_uid.in_(uids[start : start + LOOKUP_CHUNK]))
                    .group_by(Study.study_uid)
                )
                for uid, received_before in rows:
                    if received_before is not None:
                        found[str(uid)] = received_before
        return found

    def instance_file(self, sop_instance_uid: str) -> tuple[str, int, str] | None:
        """The spool path, size and transfer syntax recorded for an instance; None when the
        ledger has no such row."""
        with self.session() as s:
            row = s.execute(
                select(Instance.path, Instance.size, Instance.transfer_syntax_uid).where(
                    Instance.sop_instance_uid == sop_instance_uid
                )
            ).first()
        return None if row is None else (str(row[0]), int(row[1]), str(row[2]))

    def association_released(self, study_ids: Sequence[int], *, holder: str | None = None) -> None:
        """An association that sent instances of these studies ended (released or aborted).

        Runs once per association, after it closed: one statement on the DB-API connection
        (the ORM's update cost three times the database's work), and for the holds of
        ``holder`` (the process that recorded the association's first instances with it) one
        more on PostgreSQL, two on SQLite,
        committed without a flush of their own. A crash that loses them leaves the studies
        counted open until the process is found gone (its journal orphaned, its lock file
        free: :meth:`release_holder`;
        the upper bound ``completion.max_wait_s`` meanwhile), never loses an instance; the
        journal's checkpoint flushes them with the rest (:meth:`flush`)."""
        if not study_ids:
            return
        sql = self._ingest_sql
        params = {"now": sql.time(utcnow()), "ids": sql.uid_list(sorted(set(study_ids)))}
        with self._ingest_transaction(flushed=False) as cur:
            cur.execute(sql.release_studies, params)
            if holder is not None:
                params["holder"] = holder
                for statement in sql.unhold_studies:
                    cur.execute(statement, params)

    def release_holder(self, holder: str) -> list[int]:
        """Release every association ``holder`` (a process that is gone: its ingest journal
        is orphaned) still held open, as if each had been aborted: its studies count them no
        longer, and their quiet period starts now. Returns the studies released. Safe to run
        twice, or in two processes at once: the holds are taken in one statement, and only
        once. Committed with a flush (it runs at start-up, not per association)."""
        sql = self._ingest_sql
        with self._ingest_transaction(flushed=True) as cur:
            cur.execute(sql.take_holds, {"holder": holder})
            held = {int(study_id): int(count) for study_id, count in cur.fetchall()}
            if not held:
                return []
            if sql.lock_studies is not None:
                cur.execute(sql.lock_studies, {"ids": sorted(held)})
                cur.fetchall()
            now = sql.time(utcnow())
            cur.executemany(
                sql.release_held,
                [
                    {"id": study_id, "count": count, "now": now}
                    for study_id, count in sorted(held.items())
                    if count > 0
                ],
            )
        return sorted(held)

    # -------------------------------------------------------------- completion
    def studies_due(self, *, quiet_period_s: float, max_wait_s: float) -> list[tuple[int, int]]:
        """(study id, generation) of receiving studies that are complete now.

        Complete means: no association is sending it and the quiet period since the last
        release and the last instance has passed; or, while an association stays open, no
        instance arrived for ``max_wait_s``.
        """
        now = utcnow()
        cuts = {
            "quiet_cut": now - dt.timedelta(seconds=quiet_period_s),
            "wait_cut": now - dt.timedelta(seconds=max_wait_s),
        }
        with self.session() as s:
            rows = s.execute(_STUDIES_DUE, cuts).all()
        return [(r[0], r[1]) for r in rows]

    def clock_stepped(
        self,
        by: dt.timedelta,
        *,
        stamped_before: dt.datetime,
        timers: bool = True,
        retrieval_lease_s: float | None = None,
        session_lifetime_s: float | None = None,
    ) -> int:
        """The wall clock stepped ``by`` (NTP setting a clock that was wrong): move the times
        the completion loop and the reconciler count from, so that they measure the time that
        passed rather than the step. Returns how many rows moved.

        Forward: the times stamped on the old clock (no later than ``stamped_before``, that
        clock's now) move forward with it: a receiving study's last instance and release, an
        analysing job's (and shadow job's) last heartbeat; else every study still being sent
        would complete at once, cut in two, and every worker's lease would look lapsed, its
        job taken by a second worker. Backward: a time now in the future becomes now, so the
        quiet period or the lease counts from now instead of waiting out the step; and the
        next attempt of a delivery, an ORU, a notification or a retrieval waiting out its
        back-off moves back with the clock (not before now), rather than an hour's step later
        (not with ``timers`` false: a step of unknown size, found at start-up).

        The same for who opened an open case last (so that the others are not told a case
        is being read for the step's length) and a web session's last use. A running
        retrieval's lease (``retrieval_lease_s`` long) and a web session's end
        (``session_lifetime_s`` after its sign-in) are deadlines (None: they stay): forward,
        one set on the old clock (ending no later than its now and that length) moves with it,
        else a second runner would take the C-MOVE from a live one and the PACS send the study
        twice; backward, one ending further ahead than one set now would ends then, else a
        dead runner's retrieval would wait out the step and a sign-in last the step longer."""
        now = utcnow()
        forward = by > dt.timedelta(0)

        def moved(value: dt.datetime | None) -> dt.datetime | None:
            if value is None:
                return None
            if forward:
                return value + by if value <= stamped_before else None
            return now if value > now else None

        def ends(until: dt.datetime, length: dt.timedelta) -> dt.datetime | None:
            if forward:
                return until + by if until <= stamped_before + length else None
            return now + length if until > now + length else None

        count = 0
        with self.session() as s:
            for study in s.scalars(select(Study).where(Study.state == StudyState.RECEIVING)):
                received, released = moved(study.last_received_at), moved(study.last_released_at)
                if received is not None:
                    study.last_received_at = received
                if released is not None:
                    study.last_released_at = released
                count += received is not None or released is not None
            for task in (
                *s.scalars(select(Job).where(Job.state == JobState.ANALYSING)),
                *s.scalars(select(ShadowJob).where(ShadowJob.state == ShadowState.ANALYSING)),
            ):
                beat = moved(task.heartbeat_at or task.started_at)
                if beat is not None:
                    task.heartbeat_at = beat
                    count += 1
            for item in s.scalars(
                select(ReviewItem).where(
                    ReviewItem.state == ReviewState.OPEN, ReviewItem.reading_since.is_not(None)
                )
            ):
                since = moved(item.reading_since)
                if since is not None:
                    item.reading_since = since
                    count += 1
            if retrieval_lease_s is not None:
                lease = dt.timedelta(seconds=retrieval_lease_s)
                for retrieval in s.scalars(
                    select(Retrieval).where(
                        Retrieval.state == RetrievalState.RUNNING,
                        Retrieval.lease_until.is_not(None),
                    )
                ):
                    assert retrieval.lease_until is not None
                    until = ends(retrieval.lease_until, lease)
                    if until is not None:
                        retrieval.lease_until = until
                        count += 1
            if session_lifetime_s is not None:
                lifetime = dt.timedelta(seconds=session_lifetime_s)
                for web_session in s.scalars(select(WebSession)):
                    seen = moved(web_session.last_seen_at)
                    until = ends(web_session.expires_at, lifetime)
                    if seen is not None:
                        web_session.last_seen_at = seen
                    if until is not None:
                        web_session.expires_at = until
                    count += seen is not None or until is not None
            if forward or not timers:
                return count  # a retry due sooner than its back-off asked for is harmless
            retries: tuple[
                tuple[
                    type[Delivery] | type[Hl7Outbound] | type[Notification] | type[Retrieval], Any
                ],
                ...,
            ] = (
                (Delivery, DeliveryState.PENDING),
                (Hl7Outbound, DeliveryState.PENDING),
                (Notification, DeliveryState.PENDING),
                (Retrieval, RetrievalState.QUEUED),
            )
            for table, waiting in retries:
                due = table.next_attempt_at
                for row_id, at in s.execute(
                    select(table.id, due).where(table.state == waiting, due > now)
                ).all():
                    s.execute(
                        update(table)
                        .where(table.id == row_id)
                        .values(next_attempt_at=max(now, at + by))
                    )
                    count += 1
        return count

    def study_facts(self, study_id: int) -> StudyFacts:
        """What routing decides on: the study's modalities and SOP classes come from its
        instances as distinct pairs, computed by the database (a study of thousands of
        instances loaded as objects held the completion loop, and the interpreter lock, for
        tens of milliseconds)."""
        with self.session() as s:
            study = s.get_one(Study, study_id)
            pairs = s.execute(
                select(Instance.modality, Instance.sop_class_uid)
                .where(Instance.study_id == study_id, Instance.generation <= study.generation)
                .distinct()
            ).all()
            return StudyFacts(
                study_uid=study.study_uid,
                # the generation's own sender: a study another AE sent again is routed as
                # that AE's
                calling_ae=study.generation_sender(),
                modalities={modality for modality, _ in pairs if modality},
                sop_classes={sop_class for _, sop_class in pairs},
                body_parts={p for p in study.body_part.split("\\") if p},
                study_date=study.study_date,
            )

    def complete_study(
        self,
        study_id: int,
        generation: int,
        decide: Callable[[StudyFacts], list[RoutedJob]],
        explain: Callable[[StudyFacts], str] | None = None,
        *,
        by: str = "",
    ) -> list[int]:
        """Mark a receiving study complete and create its jobs; returns the new job ids.

        Only the caller whose conditional update wins creates jobs, so several processes may
        run completion concurrently. Older unfinished jobs of the study are superseded. A study
        no route takes is ``not_routed``, its reason saying why (``explain``: each route's
        failing condition). ``by`` is the signal that completed it (a key of
        :data:`~acwi_node.ledger.models.COMPLETED_BY`): a quiet period read while an
        association stays open is recorded as ``max_wait``.
        """
        facts = self.study_facts(study_id)
        routed = decide(facts)
        now = utcnow()
        with self.session() as s:
            result = s.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.generation == generation,
                    Study.state == StudyState.RECEIVING,
                )
                .values(state=StudyState.COMPLETE, completed_at=now)
            )
            won: int = getattr(result, "rowcount", 0)
            if not won:
                return []
            self._supersede_older(s, study_id, generation)
            study = s.get_one(Study, study_id)
            if by == "quiet_period" and study.open_associations > 0:
                by = "max_wait"
            study.completed_by = by
            if not routed:
                study.state = StudyState.NOT_ROUTED
                study.reason = "no routing rule matches this study"
                if explain is not None:
                    study.reason = f"{study.reason}: {explain(facts)}"[:2000]
                return []
            jobs = [
                Job(
                    study_id=study_id,
                    generation=generation,
                    route=r.route,
                    model=r.model,
                    destinations=list(r.destinations),
                    priority=r.priority,
                    state=JobState.QUEUED,
                    created_at=now,
                    completed_by=by,
                )
                for r in routed
            ]
            s.add_all(jobs)
            s.flush()
            study.state = StudyState.QUEUED
            study.needs_review = False
            return [j.id for j in jobs]

    def _supersede_older(self, s: Session, study_id: int, generation: int) -> None:
        old_jobs = s.scalars(
            select(Job).where(
                Job.study_id == study_id,
                Job.generation < generation,
                Job.state.not_in([JobState.DELIVERED, JobState.FAILED, JobState.SUPERSEDED]),
                # sending its rejection notes, which the new generation must not stop
                Job.withdrawn_at.is_(None),
            )
        ).all()
        for job in old_jobs:
            job.state = JobState.SUPERSEDED
            job.finished_at = utcnow()
        old_ids = [
            j
            for (j,) in s.execute(
                select(Job.id).where(Job.study_id == study_id, Job.generation < generation)
            ).all()
        ]
        if old_ids:
            notes = select(Result.id).where(
                Result.job_id.in_(old_ids), Result.kind == REJECTION_NOTE_KIND
            )
            s.execute(
                update(Delivery)
                .where(
                    Delivery.job_id.in_(old_ids),
                    Delivery.state.in_(UNSETTLED_DELIVERY_STATES),
                    Delivery.result_id.not_in(notes),
                )
                .values(state=DeliveryState.SUPERSEDED)
            )
            s.execute(
                update(ReviewItem)
                .where(ReviewItem.job_id.in_(old_ids), ReviewItem.state == ReviewState.OPEN)
                .values(state=ReviewState.CLOSED, closed_at=utcnow(), reason="superseded")
            )

    # -------------------------------------------------------------------- jobs
    def mark_enqueued(self, job_ids: Sequence[int]) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id.in_(list(job_ids))).values(enqueued_at=utcnow()))

    def jobs_to_requeue(self, *, older_than_s: float, lease_s: float) -> list[int]:
        """Jobs whose broker message may be lost: queued and not started, or analysing by a
        worker whose lease ran out (no heartbeat for ``lease_s``: it died or hangs)."""
        now = utcnow()
        queued_cut = now - dt.timedelta(seconds=older_than_s)
        stale_cut = now - dt.timedelta(seconds=lease_s)
        with self.session() as s:
            rows = s.execute(
                select(Job.id).where(
                    (
                        (Job.state == JobState.QUEUED)
                        & ((Job.enqueued_at.is_(None)) | (Job.enqueued_at <= queued_cut))
                    )
                    | ((Job.state == JobState.ANALYSING) & (_lease_time() <= stale_cut))
                )
            ).all()
        return [r[0] for r in rows]

    def unfinished_jobs(self) -> list[int]:
        """Every job whose state is not final (for the start-up reconciler)."""
        with self.session() as s:
            rows = s.execute(
                select(Job.id).where(Job.state.in_([JobState.QUEUED, JobState.ANALYSING]))
            ).all()
        return [r[0] for r in rows]

    def claim_job(self, job_id: int, *, lease_s: float, max_attempts: int = 0) -> Job | None:
        """Take a job for analysis. None if it is gone, final, or being analysed elsewhere.

        A job another worker analyses is taken over only when that worker's lease ran out: no
        :meth:`renew_lease` for ``lease_s`` seconds (it was killed, or hangs). With
        ``max_attempts``, a job whose lease ran out that many times (a study that kills or
        hangs every worker that takes it: out of memory, a decoder that crashes) fails instead,
        with that as its error, rather than taking workers down for ever.
        """
        now = utcnow()
        stale_cut = now - dt.timedelta(seconds=lease_s)
        stale = (Job.state == JobState.ANALYSING) & (_lease_time() <= stale_cut)
        may_retry = stale if not max_attempts else stale & (Job.attempts < max_attempts)
        with self.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, (Job.state == JobState.QUEUED) | may_retry)
                .values(
                    state=JobState.ANALYSING,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=Job.attempts + 1,
                )
            )
            won: int = getattr(result, "rowcount", 0)
            if not won:
                if max_attempts:
                    self._fail_exhausted(s, job_id, stale, max_attempts, lease_s, now)
                return None
            job = s.get_one(Job, job_id)
            study = s.get_one(Study, job.study_id)
            if study.generation == job.generation and study.state in (
                StudyState.QUEUED,
                StudyState.COMPLETE,
            ):
                study.state = StudyState.ANALYSING
            return job

    def _fail_exhausted(
        self,
        s: Session,
        job_id: int,
        stale: Any,
        max_attempts: int,
        lease_s: float,
        now: dt.datetime,
    ) -> None:
        """In :meth:`claim_job`'s session: fail ``job_id`` if its lease ran out after its last
        allowed attempt (a conditional update: one claimer fails it)."""
        error = (
            f"analysis did not finish in {max_attempts} attempt(s): each time, the worker"
            f" stopped renewing its lease ({lease_s:g} s) mid-analysis (killed, out of memory,"
            " or hung); reprocess the study to try again"
        )
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, stale, Job.attempts >= max_attempts)
            .values(state=JobState.FAILED, error=error, finished_at=now)
        )
        if getattr(result, "rowcount", 0):
            study_id = s.scalar(select(Job.study_id).where(Job.id == job_id))
            if study_id is not None:
                self._sync_study(s, study_id)
            log.error("job %d: %s", job_id, error)

    def renew_lease(self, job_id: int, *, claim: JobClaim | None = None) -> bool:
        """The worker analysing ``job_id`` is alive. False when the job is no longer analysing,
        or (with ``claim``) no longer that worker's claim: another worker took it over once
        its lease ran out."""
        with self.session() as s:
            return _hold_claim(s, job_id, claim)

    def job_inputs(self, job_id: int) -> tuple[str, list[str]]:
        """The study UID and the spool paths (relative) of the instances a job analyses."""
        with self.session() as s:
            job = s.get_one(Job, job_id)
            study = s.get_one(Study, job.study_id)
            paths = s.scalars(
                select(Instance.path)
                .where(
                    Instance.study_id == job.study_id,
                    Instance.generation <= job.generation,
                    Instance.path != "",  # storage retention deleted its file
                )
                .order_by(Instance.series_uid, Instance.id)
            ).all()
            return study.study_uid, list(paths)

    def jobs_input_paths(self, job_ids: Collection[int]) -> dict[int, list[str]]:
        """The spool paths (relative) of the instances each of ``job_ids`` analyses, in
        :meth:`job_inputs`' order: one query per 500 jobs (a job with none, or unknown, is
        absent)."""
        found: dict[int, list[str]] = {}
        ids = sorted(set(job_ids))
        with self.session() as s:
            for start in range(0, len(ids), 500):
                rows = s.execute(
                    select(Job.id, Instance.path)
                    .join(Instance, Instance.study_id == Job.study_id)
                    .where(
                        Job.id.in_(ids[start : start + 500]),
                        Instance.generation <= Job.generation,
                        Instance.path != "",  # storage retention deleted its file
                    )
                    .order_by(Job.id, Instance.series_uid, Instance.id)
                )
                for job_id, path in rows:
                    found.setdefault(job_id, []).append(path)
        return found

    def finish_analysis(
        self,
        job_id: int,
        *,
        results: Sequence[ResultFile],
        summary: dict[str, Any],
        needs_review: bool,
        review_reason: str,
        hl7_result_control_id: str | None = None,
        takes: DeliveryFilter | None = None,
        quality_sample: bool = False,
        shadow_models: Sequence[str] = (),
        claim: JobClaim | None = None,
    ) -> bool:
        """Record a job's result objects, its outbox rows (one per destination that ``takes``
        the object's kind; all without it) and its review item: for a job that
        ``needs_review``, or (``quality_sample``) a quality-control sample of the confident
        ones, marked as such; and a queued shadow job per ``shadow_models`` (the route's
        shadow models, :class:`acwi_node.ledger.shadow.ShadowJobs`), once.

        With ``hl7_result_control_id`` (a RIS is configured), the job's result ORU is promised
        in the same transaction: an outbox row with that MSH-10 and no message yet, which
        :meth:`fill_hl7_outbound` completes. Should the worker die before it does, the ORU
        sender builds it (:meth:`hl7_outbound_to_build`), so no analysed job misses its ORU.

        Idempotent: re-running replaces the job's earlier result rows. Returns False, recording
        nothing, if the job was superseded while it ran, or (with ``claim``, the worker's) is no
        longer that worker's claim: another worker took it over once its lease ran out (a
        worker that stalled longer than ``worker.lease_s``), and records its own.
        """
        now = utcnow()
        with self.session() as s:
            # the claim checked and the row locked by one conditional update
            if not _hold_claim(s, job_id, claim):
                return False
            job = s.get_one(Job, job_id, with_for_update=True)
            if job.state != JobState.ANALYSING:
                return False
            if hl7_result_control_id is not None:
                promise_hl7_outbound(
                    s, study_id=job.study_id, job_id=job_id, kind="result",
                    control_id=hl7_result_control_id,
                )  # fmt: skip
            replaced: list[int] = []
            for old in list(job.results):
                for d in old.deliveries:
                    replaced.append(d.id)
                    s.delete(d)
                s.delete(old)
            s.flush()
            _forget_requests(s, replaced)
            # Every result row, then every outbox row, in one flush each, not a flush per
            # object: a CT's hundreds of heatmaps are a few batched INSERTs on PostgreSQL (808
            # statements for 400 before). The rows are numbered in the order of ``results``.
            rows = [_add_result(s, job_id, rf, flush=False) for rf in results]
            s.flush()
            queued = sum(_queue_deliveries(s, job, row, now, takes) for row in rows)
            job.summary = summary
            model = summary.get("model") or {}
            job.manifest_name = str(model.get("name") or job.model)[:64]
            job.manifest_version = str(model.get("version") or "")[:64]
            job.error = ""
            job.analysed_at = now
            job.state = JobState.EXPORTING if queued else JobState.DELIVERED
            if not queued:
                job.finished_at = now
            if needs_review or quality_sample:
                item = s.scalars(select(ReviewItem).where(ReviewItem.job_id == job_id)).first()
                if item is None:
                    s.add(
                        ReviewItem(
                            study_id=job.study_id,
                            job_id=job_id,
                            reason=review_reason,
                            priority=job.priority,
                            created_at=now,
                            sampled=not needs_review,
                        )
                    )
            known = set(s.scalars(select(ShadowJob.model).where(ShadowJob.job_id == job_id)))
            s.add_all(
                ShadowJob(job_id=job_id, model=m, created_at=now)
                for m in shadow_models
                if m not in known
            )
            self._sync_study(s, job.study_id)
            return True

    def attach_result(
        self, job_id: int, result: ResultFile, takes: DeliveryFilter | None = None
    ) -> int:
        """Add a result object to a finished job (a verified SR), with one outbox row per
        destination (that ``takes`` it); a result with the same SOP Instance UID is replaced
        and its pending deliveries superseded. A delivered job goes back to exporting until
        the new deliveries are answered. Returns how many deliveries were queued; raises
        :class:`StudyActionRefused` for a job whose results were withdrawn.
        """
        now = utcnow()
        withdrawn = StudyActionRefused(
            "the results of this analysis were withdrawn from the PACS: nothing more of it is sent"
        )
        with self.session() as s:
            job = s.get_one(Job, job_id, with_for_update=True)
            if job.withdrawn_at is not None:
                raise withdrawn
            res = s.scalars(
                select(Result).where(
                    Result.job_id == job_id, Result.sop_instance_uid == result.sop_instance_uid
                )
            ).first()
            if res is None:
                res = _add_result(s, job_id, result)
            else:
                res.path = result.path
                s.execute(
                    update(Delivery)
                    .where(
                        Delivery.result_id == res.id,
                        Delivery.state.in_(UNSETTLED_DELIVERY_STATES),
                    )
                    .values(state=DeliveryState.SUPERSEDED)
                )
            # SQLite locks no row: the check above ran before this transaction's first write,
            # and a withdrawal may have committed between the two. Asked again now that the
            # transaction has written (and holds the write lock), it cannot change any more.
            if s.scalar(select(Job.withdrawn_at).where(Job.id == job_id)) is not None:
                raise withdrawn
            queued = _queue_deliveries(s, job, res, now, takes)
            if queued and job.state == JobState.DELIVERED:
                job.state = JobState.EXPORTING
                job.finished_at = None
                self._sync_study(s, job.study_id)
            elif not queued:  # what it superseded may have been all the job waited for
                s.flush()
                self._sync_job_delivery(s, job.id)
            return queued

    def postpone_job(self, job_id: int, *, claim: JobClaim | None = None) -> bool:
        """Put a job its worker could not finish for want of disk space back in the queue,
        its attempt not counted: the reconciler sends it again after
        ``completion.requeue_after_s``, and a study queued is one storage retention keeps.
        False when it is not this worker's analysis of the study's current generation (final,
        re-opened meanwhile, or with ``claim`` taken over by another worker): :meth:`fail_job`
        then says what it is."""
        with self.session() as s:
            if claim is not None and not _hold_claim(s, job_id, claim):
                return False
            job = s.get_one(Job, job_id)
            if job.state != JobState.ANALYSING:
                return False
            if job.generation < s.get_one(Study, job.study_id).generation:
                return False
            self._queue_uncounted(s, job)
            return True

    def give_back_job(self, job_id: int, *, started_at: dt.datetime, attempts: int) -> bool:
        """Put a job back in the queue, its attempt not counted, if it is still the claim that
        :meth:`claim_job` made with ``started_at`` and ``attempts``: its worker lived, but the
        ledger stopped answering while it analysed (an outage of the database is no fault of
        the study's, and ``worker.max_attempts`` counts the workers a study stopped). False when
        the job is no longer that claim: finished, failed, superseded, or taken over by another
        worker once its lease ran out (that worker's attempt counts)."""
        with self.session() as s:
            if not _hold_claim(s, job_id, JobClaim(started_at, attempts)):
                return False
            self._queue_uncounted(s, s.get_one(Job, job_id))
            return True

    def _queue_uncounted(self, s: Session, job: Job) -> None:
        """In ``s``: ``job`` back in the queue, the attempt its claim counted given back."""
        job.state = JobState.QUEUED
        job.attempts = max(0, job.attempts - 1)
        job.enqueued_at = utcnow()
        job.started_at = None
        job.heartbeat_at = None
        self._sync_study(s, job.study_id)

    def fail_job(self, job_id: int, error: str, *, claim: JobClaim | None = None) -> bool:
        """Mark a job failed with ``error``; False when it was not: it was final already, or
        its study re-opened while it ran (a newer generation of it is receiving or complete:
        the job is superseded, with the error kept, and the study's state is the newer
        generation's). A failure of a study's outdated version is not the study's. With
        ``claim`` (the failing worker's), a job that is no longer that claim (another worker
        took it over once its lease ran out) is left as it is: False."""
        with self.session() as s:
            if claim is not None and not _hold_claim(s, job_id, claim):
                return False
            job = s.get_one(Job, job_id)
            if job.state in FINAL_JOB_STATES:
                return False
            if job.generation < s.get_one(Study, job.study_id).generation:
                job.state = JobState.SUPERSEDED
                job.error = error[:2000]
                job.finished_at = utcnow()
                return False
            job.state = JobState.FAILED
            job.error = error[:2000]
            job.finished_at = utcnow()
            self._sync_study(s, job.study_id)
            return True

    def _sync_study(self, s: Session, study_id: int) -> None:
        """Derive the study's state from the jobs of its current generation."""
        study = s.get_one(Study, study_id)
        if study.state in (StudyState.RECEIVING, StudyState.NOT_ROUTED):
            return
        jobs = [
            j
            for j in s.scalars(
                select(Job).where(Job.study_id == study_id, Job.generation == study.generation)
            ).all()
            if j.state != JobState.SUPERSEDED
        ]
        if not jobs:
            return
        states = {j.state for j in jobs}
        study.needs_review = any(bool(j.summary.get("needs_review")) for j in jobs)
        if JobState.FAILED in states:
            study.state = StudyState.FAILED
            study.reason = "; ".join(f"{j.route}: {j.error}" for j in jobs if j.error)[:2000]
        elif JobState.QUEUED in states:
            study.state = StudyState.QUEUED
        elif JobState.ANALYSING in states:
            study.state = StudyState.ANALYSING
        elif JobState.EXPORTING in states:
            study.state = StudyState.EXPORTING
        else:
            study.state = StudyState.DELIVERED
            study.reason = ""

    # ------------------------------------------------------- operator actions
    def _study_for_action(self, s: Session, study_uid: str, allowed: set[StudyState]) -> Study:
        study = s.scalars(
            select(Study).where(Study.study_uid == study_uid).with_for_update()
        ).one_or_none()
        if study is None:
            raise NoSuchStudy()
        if study.state not in allowed:
            raise StudyActionRefused(
                f"the study is {study.state.value}: wait until it is "
                + " or ".join(sorted(st.value for st in allowed))
            )
        if files_deleted_at(s, study.id, study.generation) is not None:
            raise StudyActionRefused(
                "storage retention deleted this study's images and results: send it again"
                " from the PACS"
            )
        return study

    def resend_results(self, study_uid: str) -> int:
        """Send the results of the study's current generation again: every delivery of its
        finished jobs, failed for good or delivered, goes back to the outbox with its attempts
        counted from zero (the PACS was down longer than ``exporter.max_attempts`` allowed, or
        lost the objects). Returns how many; raises :class:`StudyActionRefused`."""
        now = utcnow()
        with self.session() as s:
            study = self._study_for_action(s, study_uid, {StudyState.DELIVERED, StudyState.FAILED})
            jobs = s.scalars(
                select(Job).where(
                    Job.study_id == study.id,
                    Job.generation == study.generation,
                    Job.state.in_([JobState.DELIVERED, JobState.FAILED]),
                    Job.withdrawn_at.is_(None),
                )
            ).all()
            if not jobs and s.scalar(
                select(Job.id).where(
                    Job.study_id == study.id,
                    Job.generation == study.generation,
                    Job.withdrawn_at.is_not(None),
                )
            ):
                raise StudyActionRefused(
                    "its results were withdrawn from the PACS: reprocess it for new ones"
                )
            deliveries = s.scalars(
                select(Delivery).where(
                    Delivery.job_id.in_([j.id for j in jobs]),
                    Delivery.state.in_([DeliveryState.FAILED, DeliveryState.DELIVERED]),
                )
            ).all()
            if not deliveries:
                raise StudyActionRefused(
                    "the study has no results to send (its analysis failed, or no rule routed"
                    " it): reprocess it instead"
                )
            for d in deliveries:
                _back_to_outbox(d, now)
            for job in jobs:
                if any(d.job_id == job.id for d in deliveries):
                    job.state = JobState.EXPORTING
                    job.finished_at = None
                    job.error = ""
            self._sync_study(s, study.id)
            study.reason = ""  # the failure it gave is being retried
            return len(deliveries)

    def retry_failed(self, destination: str) -> RetriedDeliveries:
        """Every delivery to ``destination`` that failed for good goes back to the outbox,
        its attempts counted from zero (the destination was down longer than its patience, or
        refused until its configuration was mended): the results of each study's current
        generation, never those withdrawn from the PACS, and every rejection note (a note of
        an earlier generation is still owed). Their analyses and studies are exporting again."""
        now = utcnow()
        with self.session() as s:
            rows = s.execute(
                select(Delivery, Job, Study)
                .join(Job, Delivery.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .join(Result, Delivery.result_id == Result.id)
                .where(
                    Delivery.destination == destination,
                    Delivery.state == DeliveryState.FAILED,
                    owed_delivery(),
                )
                .order_by(Delivery.id)
            ).all()
            jobs: dict[int, Job] = {}
            studies: dict[int, Study] = {}
            count = 0
            for d, job, study in rows:
                _back_to_outbox(d, now)
                count += 1
                jobs[job.id] = job
                studies[study.id] = study
            for job in jobs.values():
                if job.state == JobState.FAILED:
                    job.state = JobState.EXPORTING
                    job.finished_at = None
                    job.error = ""
            s.flush()
            for study in studies.values():
                self._sync_study(s, study.id)
                if study.state != StudyState.FAILED:
                    study.reason = ""  # the failure it gave is being retried
            return RetriedDeliveries(count, sorted(st.study_uid for st in studies.values()))

    def reprocess_study(self, study_uid: str) -> int:
        """Take a finished study through completion, routing and analysis again, as a new
        generation (after a failed analysis, a routing rule or model changed); run by the same
        model version, its results replace the earlier ones in the PACS (the same UIDs). A study
        exporting only the rejection notes of its withdrawn results may be reprocessed too.
        Returns the new generation; raises :class:`StudyActionRefused`."""
        with self.session() as s:
            allowed = {StudyState.DELIVERED, StudyState.FAILED, StudyState.NOT_ROUTED}
            if self._sending_notes_only(s, study_uid):
                allowed.add(StudyState.EXPORTING)  # its withdrawn results' rejection notes
            study = self._study_for_action(s, study_uid, allowed)
            has_images = s.scalar(
                select(Instance.id).where(Instance.study_id == study.id, Instance.path != "")
            )
            if has_images is None:
                raise StudyActionRefused("the study has no images left on the node")
            # The completion loop finds it due at once (nothing sends it, its quiet period has
            # passed) and routes it like a study just received.
            study.generation += 1
            study.state = StudyState.RECEIVING
            study.reason = ""
            study.completed_at = None
            study.completed_by = ""
            return study.generation

    @staticmethod
    def _sending_notes_only(s: Session, study_uid: str) -> bool:
        """Whether the study is exporting nothing but rejection notes (its results were
        withdrawn): a new generation does not stop them (:meth:`_supersede_older`)."""
        kinds = s.scalars(
            select(Result.kind)
            .join(Delivery, Delivery.result_id == Result.id)
            .join(Job, Delivery.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(
                Study.study_uid == study_uid,
                Study.state == StudyState.EXPORTING,
                Job.generation == Study.generation,
                Delivery.state.in_(UNSETTLED_DELIVERY_STATES),
            )
        ).all()
        return bool(kinds) and set(kinds) == {REJECTION_NOTE_KIND}

    # --------------------------------------------------------------- delivery
    def due_deliveries(self, *, limit: int = 500, exclude: Sequence[str] = ()) -> list[DueDelivery]:
        """The deliveries due now, the longest due first; none to the destinations ``exclude``
        names (a send to them is under way: a destination with a long backlog hides no
        other's results)."""
        now = utcnow()
        query = (
            select(Delivery, Result.path, Study.study_uid)
            .join(Result, Delivery.result_id == Result.id)
            .join(Job, Delivery.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        )
        if exclude:
            query = query.where(Delivery.destination.not_in(list(exclude)))
        with self.session() as s:
            rows = s.execute(
                query.order_by(Delivery.next_attempt_at, Delivery.id).limit(limit)
            ).all()
            return [
                DueDelivery(
                    d.id, d.job_id, d.destination, path, d.attempts, study_uid, d.outage_attempts
                )
                for d, path, study_uid in rows
            ]

    def claim_deliveries(
        self, delivery_ids: Sequence[int], *, lease_s: float, claim: str | None = None
    ) -> set[int]:
        """Take due deliveries for one attempt: their next attempt moves ``lease_s`` past now,
        so that another exporter process sharing the ledger does not send them too (the
        taker renews the lease while it sends, :meth:`renew_delivery_claims`). Returns the
        ids taken: those still pending and due (not taken by another process meanwhile).

        ``claim`` (:func:`new_claim`) names this claim: the renewals, give-backs and outcomes
        that name it change nothing once another process has taken a delivery over."""
        if not delivery_ids:
            return set()
        now = utcnow()
        with self.session() as s:
            taken = s.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                )
                .values(next_attempt_at=now + dt.timedelta(seconds=lease_s), claim_token=claim)
                .returning(Delivery.id)
            )
            return {int(row[0]) for row in taken}

    def renew_delivery_claims(
        self, delivery_ids: Sequence[int], *, lease_s: float, claim: str | None = None
    ) -> set[int]:
        """Keep the deliveries being sent (:meth:`claim_deliveries`) taken for ``lease_s``
        more; an exporter that dies leaves them due again once its last lease runs out.
        Returns the ids still held: with ``claim``, those still under it (not those another
        process took over after this claim ran out, nor those settled)."""
        if not delivery_ids:
            return set()
        with self.session() as s:
            held = s.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.state == DeliveryState.PENDING,
                    *_held_by(Delivery, claim),
                )
                .values(next_attempt_at=utcnow() + dt.timedelta(seconds=lease_s))
                .returning(Delivery.id)
            )
            return {int(row[0]) for row in held}

    def release_delivery_claims(
        self, delivery_ids: Sequence[int], *, claim: str | None = None
    ) -> int:
        """Give back deliveries taken (:meth:`claim_deliveries`) and not attempted: a send
        stopped before their turn. They are due again at once, for any exporter, with no
        attempt counted; returns how many. Only the taker calls this, naming its ``claim``:
        one another process has taken over since is left to it, and one already due is left
        as it is."""
        if not delivery_ids:
            return 0
        now = utcnow()
        with self.session() as s:
            released = s.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at > now,
                    *_held_by(Delivery, claim),
                )
                .values(next_attempt_at=now, claim_token=None)
                .returning(Delivery.id)
            )
            return len(released.all())

    def record_delivery(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status: int | None,
        error: str,
        max_attempts: int,
        backoff_s: float,
        claim: str | None = None,
    ) -> bool:
        """Record one attempt; a delivery fails for good after ``max_attempts``. Whether it
        was recorded (see :meth:`record_deliveries`)."""
        attempt = DeliveryAttempt(
            delivery_id, delivered, status, error, max_attempts, backoff_s, claim=claim
        )
        return bool(self.record_deliveries([attempt]))

    def record_deliveries(self, attempts: Sequence[DeliveryAttempt]) -> set[int]:
        """Record attempts in one transaction; each job's state follows its deliveries once
        (one association's objects, a job's SR and heatmaps, are recorded together: looking
        at every delivery of the job after each one cost O(n²)). Returns the ids recorded:
        not those settled meanwhile, nor those whose attempt names a claim another process
        has replaced (it took the delivery over: its own outcome stands)."""
        now = utcnow()
        with self.session() as s:
            _lock_jobs(
                s,
                s.scalars(
                    select(Delivery.job_id).where(
                        Delivery.id.in_([a.delivery_id for a in attempts])
                    )
                ),
            )
            jobs: set[int] = set()
            recorded: set[int] = set()
            for attempt in attempts:
                d = s.get_one(Delivery, attempt.delivery_id, with_for_update=True)
                if d.state != DeliveryState.PENDING or (
                    attempt.claim is not None and d.claim_token != attempt.claim
                ):
                    continue
                recorded.add(d.id)
                d.claim_token = None
                d.last_status = attempt.status
                d.last_error = attempt.error[:2000]
                jobs.add(d.job_id)
                if attempt.unreachable and attempt.outage_patience_s > 0:
                    outage_attempt(
                        d,
                        error=attempt.error,
                        backoff_s=attempt.backoff_s,
                        patience_s=attempt.outage_patience_s,
                        setting="exporter.outage_patience_s",
                        now=now,
                    )
                    continue
                d.attempts += 1
                outage_over(d)
                if attempt.delivered and attempt.awaits_commitment:
                    d.state = DeliveryState.COMMITTING
                    d.commitment_uid = None
                    d.commitment_requested_at = None
                    d.commitment_requests = 0
                elif attempt.delivered:
                    d.state = DeliveryState.DELIVERED
                    d.delivered_at = now
                elif d.attempts >= attempt.max_attempts:
                    d.state = DeliveryState.FAILED
                else:
                    d.next_attempt_at = now + dt.timedelta(seconds=attempt.backoff_s)
            s.flush()
            for job_id in sorted(jobs):
                self._sync_job_delivery(s, job_id)
            return recorded

    # ------------------------------------------------------- storage commitment
    def commitments_due(
        self,
        destination: str,
        *,
        wait_s: float,
        max_requests: int,
        limit: int = 1000,
        claim: str | None = None,
    ) -> list[AwaitedCommitment]:
        """Results ``destination`` stored whose storage commitment is to be requested now:
        never requested, or requested ``wait_s`` ago or more with no report since. One
        requested ``max_requests`` times already fails for good instead (the destination
        never reported), and its job with it.

        Those returned are taken for the caller's request: their request time moves to now
        (by one conditional update, so that another exporter process sharing the ledger, on
        PostgreSQL or SQLite, does not ask for them too); one that dies before asking leaves
        them to be asked for again once ``wait_s`` has passed. ``claim`` (:func:`new_claim`)
        names this taking: the request recorded for it, and its outcome, change nothing once
        another process has taken the results again (this one stalled longer than ``wait_s``)."""
        now = utcnow()
        due_again = (Delivery.commitment_requested_at.is_(None)) | (
            Delivery.commitment_requested_at <= now - dt.timedelta(seconds=wait_s)
        )
        awaited = (
            Delivery.destination == destination,
            Delivery.state == DeliveryState.COMMITTING,
            due_again,
        )
        with self.session() as s:
            # the jobs of those that fail now, locked before their deliveries (_lock_jobs)
            _lock_jobs(
                s,
                s.scalars(
                    select(Delivery.job_id).where(
                        *awaited, Delivery.commitment_requests >= max_requests
                    )
                ),
            )
            rows = s.execute(
                select(Delivery, Result.sop_class_uid, Result.sop_instance_uid, Study.study_uid)
                .join(Result, Delivery.result_id == Result.id)
                .join(Job, Delivery.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .where(*awaited)
                .order_by(Delivery.id)
                .limit(limit)
                .with_for_update(of=Delivery)
            ).all()
            due: list[AwaitedCommitment] = []
            exhausted: set[int] = set()
            gave_up: list[int] = []
            for d, sop_class, sop_instance, study_uid in rows:
                if d.commitment_requests >= max_requests:
                    d.state = DeliveryState.FAILED
                    d.last_status = None
                    why = d.last_error or f"no report within {wait_s:g} s"
                    d.last_error = (
                        f"storage commitment: {destination} did not report after"
                        f" {d.commitment_requests} request(s) ({why})"
                    )[:2000]
                    exhausted.add(d.job_id)
                    gave_up.append(d.id)
                else:
                    due.append(AwaitedCommitment(d.id, sop_class, sop_instance, study_uid))
            s.flush()
            _forget_requests(s, gave_up)
            for job_id in sorted(exhausted):
                self._sync_job_delivery(s, job_id)
            if not due:
                return due
            taken = {
                int(row[0])
                for row in s.execute(
                    update(Delivery)
                    .where(
                        Delivery.id.in_([c.delivery_id for c in due]),
                        Delivery.state == DeliveryState.COMMITTING,
                        due_again,
                    )
                    .values(commitment_requested_at=now, claim_token=claim)
                    .returning(Delivery.id)
                    .execution_options(synchronize_session=False)
                )
            }
            return [c for c in due if c.delivery_id in taken]  # else another process took it

    def commitment_requested(
        self, delivery_ids: Sequence[int], transaction_uid: str, *, claim: str | None = None
    ) -> list[int]:
        """Record, before it is sent, a storage commitment request for ``delivery_ids`` under
        ``transaction_uid`` (the destination may report before the request's answer is
        back). Returns those recorded, to be asked for: with ``claim``
        (:meth:`commitments_due`), not those another process has taken since."""
        if not delivery_ids:
            return []
        now = utcnow()
        with self.session() as s:
            held = s.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(delivery_ids),
                    Delivery.state == DeliveryState.COMMITTING,
                    *_held_by(Delivery, claim),
                )
                .values(
                    commitment_uid=transaction_uid,
                    commitment_requested_at=now,
                    commitment_requests=Delivery.commitment_requests + 1,
                    last_error="",
                )
                .returning(Delivery.id)
            )
            asked = sorted(int(row[0]) for row in held)
            # a report on this request still applies once the node has asked again
            s.add_all(
                CommitmentRequest(transaction_uid=transaction_uid, delivery_id=i, requested_at=now)
                for i in asked
            )
            return asked

    def commitment_request_failed(
        self,
        delivery_ids: Sequence[int],
        error: str,
        *,
        unreachable: bool = False,
        outage_patience_s: float = 0.0,
        claim: str | None = None,
    ) -> None:
        """Record why a storage commitment request failed (it is made again after the
        destination's ``commitment_wait_s``). One that could not reach the destination
        (``unreachable``, with ``outage_patience_s`` > 0) is not counted against the requests
        allowed, until the destination has been unreachable that long: then the results
        fail, saying since when. With ``claim``, not those another process has taken since."""
        if not delivery_ids:
            return
        now = utcnow()
        with self.session() as s:
            _lock_jobs(
                s, s.scalars(select(Delivery.job_id).where(Delivery.id.in_(list(delivery_ids))))
            )
            rows = s.scalars(
                select(Delivery).where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.state == DeliveryState.COMMITTING,
                    *_held_by(Delivery, claim),
                )
            ).all()
            failed: set[int] = set()
            for d in rows:
                d.last_error = error[:2000]
                if not (unreachable and outage_patience_s > 0):
                    outage_over(d)  # it answered
                    continue
                d.commitment_requests = max(0, d.commitment_requests - 1)
                since = d.unreachable_since or now
                d.unreachable_since = since
                d.outage_attempts += 1
                if (now - since).total_seconds() >= outage_patience_s:
                    d.state = DeliveryState.FAILED
                    d.last_error = (
                        f"storage commitment: unreachable since {since:%Y-%m-%d %H:%M:%S} UTC"
                        f" (exporter.outage_patience_s): {error}"
                    )[:2000]
                    failed.add(d.job_id)
            s.flush()
            for job_id in sorted(failed):
                self._sync_job_delivery(s, job_id)

    def commitment_request_answered(
        self, delivery_ids: Sequence[int], *, claim: str | None = None
    ) -> None:
        """A storage commitment request the destination accepted: no outage any more (with
        ``claim``, not for those another process has taken since)."""
        if not delivery_ids:
            return
        with self.session() as s:
            s.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.unreachable_since.is_not(None),
                    *_held_by(Delivery, claim),
                )
                .values(unreachable_since=None, outage_attempts=0)
            )

    def end_commitments(self, destinations: Sequence[str]) -> int:
        """Deliver the results awaiting storage commitment from any destination but
        ``destinations`` (the ones that still ask for it): they were stored, and no longer
        wait for a report. Returns how many."""
        now = utcnow()
        ending = (
            Delivery.state == DeliveryState.COMMITTING,
            Delivery.destination.not_in(list(destinations)),
        )
        with self.session() as s:
            _lock_jobs(s, s.scalars(select(Delivery.job_id).where(*ending)))
            rows = s.scalars(select(Delivery).where(*ending)).all()
            _forget_requests(s, [d.id for d in rows])
            jobs: set[int] = set()
            for d in rows:
                d.state = DeliveryState.DELIVERED
                d.delivered_at = now
                d.commitment_uid = None
                jobs.add(d.job_id)
            s.flush()
            for job_id in sorted(jobs):
                self._sync_job_delivery(s, job_id)
            return len(rows)

    def record_commitment(
        self,
        transaction_uid: str,
        committed: Sequence[str],
        refused: dict[str, int],
        *,
        max_attempts: int,
        backoff_s: Callable[[int], float],
        describe: Callable[[int], str],
    ) -> CommitmentOutcome:
        """Apply a storage commitment report: the deliveries requested in
        ``transaction_uid`` whose SOP Instance UID the report commits are delivered; those it
        refuses (``refused``: SOP Instance UID -> Failure Reason) are sent again after
        ``backoff_s(attempts)`` seconds, or fail for good once they have had ``max_attempts``
        (``describe`` words a Failure Reason). Deliveries the report does not name keep
        waiting (asked again after the wait)."""
        now = utcnow()
        committed_uids = set(committed)
        # the latest request of a delivery, or an earlier one (a report that came late)
        requested = (Delivery.commitment_uid == transaction_uid) | Delivery.id.in_(
            select(CommitmentRequest.delivery_id).where(
                CommitmentRequest.transaction_uid == transaction_uid
            )
        )
        with self.session() as s:
            _lock_jobs(s, s.scalars(select(Delivery.job_id).where(requested)))
            rows = s.execute(
                select(Delivery, Result.sop_instance_uid)
                .join(Result, Delivery.result_id == Result.id)
                .where(requested)
                .order_by(Delivery.id)
                .with_for_update(of=Delivery)
            ).all()
            if not rows:
                return CommitmentOutcome()
            n_committed = n_refused = 0
            jobs: set[int] = set()
            settled: list[int] = []
            for d, sop_instance in rows:
                if d.state != DeliveryState.COMMITTING:
                    continue
                if sop_instance in committed_uids:
                    d.state = DeliveryState.DELIVERED
                    d.delivered_at = now
                    d.last_error = ""
                    n_committed += 1
                elif sop_instance in refused:
                    reason = refused[sop_instance]
                    d.last_status = reason
                    d.last_error = (
                        f"storage commitment refused by {d.destination}: {describe(reason)}"
                    )
                    if d.attempts >= max_attempts:
                        d.state = DeliveryState.FAILED
                    else:
                        d.state = DeliveryState.PENDING
                        d.next_attempt_at = now + dt.timedelta(seconds=backoff_s(d.attempts - 1))
                    n_refused += 1
                else:
                    continue
                d.commitment_uid = None
                jobs.add(d.job_id)
                settled.append(d.id)
            s.flush()
            _forget_requests(s, settled)
            for job_id in sorted(jobs):
                self._sync_job_delivery(s, job_id)
            return CommitmentOutcome(n_committed, n_refused, known=True)

    def _sync_job_delivery(self, s: Session, job_id: int) -> None:
        """Settle an exporting job once none of its deliveries is: delivered, or failed with
        its first failed delivery's reason. The job's row is locked first (callers that write
        deliveries lock it before them, :func:`_lock_jobs`), and its deliveries are read as
        committed now, not as this session loaded them."""
        job = s.get_one(Job, job_id, with_for_update=True)
        if job.state != JobState.EXPORTING:
            return
        states = s.execute(
            select(Delivery.state, Delivery.destination, Delivery.last_status, Delivery.last_error)
            .where(Delivery.job_id == job_id)
            .order_by(Delivery.id)
        ).all()
        if any(st in UNSETTLED_DELIVERY_STATES for st, *_ in states):
            return
        failed = [
            (dest, status, err) for st, dest, status, err in states if st == DeliveryState.FAILED
        ]
        job.finished_at = utcnow()
        if failed:
            dest, status, err = failed[0]
            code = f"0x{status:04X}" if status is not None else "no status"
            job.state = JobState.FAILED
            job.error = f"delivery to {dest} failed ({code}): {err}"[:2000]
        else:
            job.state = JobState.DELIVERED
        self._sync_study(s, job.study_id)

    # ------------------------------------------------------------------ views
    def list_studies(
        self, *, limit: int = 200, state: str = "", calling_ae: str = "", uid: str = ""
    ) -> list[dict[str, Any]]:
        """The latest studies first; only those in ``state`` (a :class:`StudyState` value),
        from ``calling_ae`` (its first sender, or its current generation's), or whose Study
        Instance UID starts with ``uid``, where given."""
        query = select(Study).order_by(Study.id.desc()).limit(limit)
        if state:
            query = query.where(Study.state == StudyState(state))
        if calling_ae:
            query = query.where(
                (Study.calling_ae == calling_ae) | (Study.generation_calling_ae == calling_ae)
            )
        if uid:
            query = query.where(Study.study_uid.startswith(uid, autoescape=True))
        with self.session() as s:
            studies = s.scalars(query).all()
            ids = [st.id for st in studies]
            # Three queries for the whole list, not two more per study.
            jobs: dict[int, list[Job]] = {}
            for job in s.scalars(select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)):
                jobs.setdefault(job.study_id, []).append(job)
            deleted = {
                study_id: started
                for study_id, started in s.execute(
                    select(Purge.study_id, func.min(Purge.started_at))
                    .join(Study, Study.id == Purge.study_id)
                    .where(Purge.study_id.in_(ids), Purge.generation >= Study.generation)
                    .group_by(Purge.study_id)
                )
            }
            return [self.study_view(st, jobs.get(st.id, []), deleted.get(st.id)) for st in studies]

    def get_study(self, study_uid: str) -> dict[str, Any] | None:
        with self.session() as s:
            st = s.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
            if st is None:
                return None
            jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
            deleted = files_deleted_at(s, st.id, st.generation)
            return self.study_view(st, jobs, deleted, detail=True)

    @staticmethod
    def study_view(
        st: Study,
        jobs: Sequence[Job],
        images_deleted_at: dt.datetime | None,
        *,
        detail: bool = False,
    ) -> dict[str, Any]:
        """A study as the API and ``status`` show it, from its row, its jobs and when retention
        deleted its current generation's files (:func:`files_deleted_at`)."""
        status = st.state.value
        if st.needs_review and st.state in (StudyState.EXPORTING, StudyState.DELIVERED):
            status = "needs_review"
        view: dict[str, Any] = {
            "study_uid": st.study_uid,
            "state": st.state.value,
            "status": status,
            "needs_review": st.needs_review,
            "reason": st.reason,
            "generation": st.generation,
            # the study's first sender, and the current generation's (what routing matched)
            "calling_ae": st.calling_ae,
            "generation_calling_ae": st.generation_sender(),
            "modality": st.modality,
            "body_part": st.body_part,
            "instances": st.instance_count,
            "first_received_at": _iso(st.first_received_at),
            "last_received_at": _iso(st.last_received_at),
            "completed_at": _iso(st.completed_at),
            # When storage retention deleted this generation's images and result files.
            "images_deleted_at": _iso(images_deleted_at),
            "jobs": [],
        }
        for j in jobs:
            jv: dict[str, Any] = {
                "id": j.id,
                "generation": j.generation,
                "route": j.route,
                "model": j.model,
                "state": j.state.value,
                "attempts": j.attempts,
                "error": j.error,
                "summary": j.summary,
                # its results withdrawn from the PACS (``acwi-node studies withdraw``)
                "withdrawn": (
                    {
                        "at": _iso(j.withdrawn_at),
                        "by": j.withdrawn_by,
                        "reason": j.withdrawn_reason,
                        "note": j.withdrawn_note,
                    }
                    if j.withdrawn_at is not None
                    else None
                ),
            }
            if detail:
                jv["results"] = [
                    {
                        "kind": r.kind,
                        "sop_instance_uid": r.sop_instance_uid,
                        "deliveries": [
                            {
                                "destination": d.destination,
                                "state": d.state.value,
                                "attempts": d.attempts,
                                "last_status": d.last_status,
                                "last_error": d.last_error,
                                # an outage: attempts that could not reach the destination
                                "unreachable_since": _iso(d.unreachable_since),
                                "outage_attempts": d.outage_attempts,
                            }
                            for d in r.deliveries
                        ],
                    }
                    for r in j.results
                ]
            view["jobs"].append(jv)
        return view

    def worklist(self) -> list[dict[str, Any]]:
        """Open review items, highest priority first, then those the model asked about before
        quality-control samples, then oldest."""
        with self.session() as s:
            items = s.scalars(
                select(ReviewItem)
                .where(ReviewItem.state == ReviewState.OPEN)
                .order_by(ReviewItem.priority.desc(), ReviewItem.sampled, ReviewItem.created_at)
            ).all()
            out = []
            for it in items:
                job = it.job
                out.append(
                    {
                        "id": it.id,
                        "study_uid": it.study.study_uid,
                        "job_id": job.id,
                        "route": job.route,
                        "model": job.model,
                        "reason": it.reason,
                        # a quality-control sample of the studies the model was sure of
                        "sampled": bool(it.sampled),
                        "priority": it.priority,
                        "created_at": _iso(it.created_at),
                        "modality": it.study.modality,
                        # who sent the generation the model read
                        "calling_ae": it.study.sender_of(job.generation),
                        "predicted_label": job.summary.get("predicted_label"),
                        "probabilities": job.summary.get("probabilities"),
                        "uncertainty": job.summary.get("uncertainty"),
                        "ood_score": job.summary.get("ood_score"),
                    }
                )
            return out

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            out = {state.value: 0 for state in StudyState}
            for state, n in rows:
                out[StudyState(state).value] = n
            out["instances"] = (s.scalar(select(func.count()).select_from(Instance)) or 0) + int(
                s.scalar(select(func.sum(InstanceArrival.instances))) or 0
            )
            return out

    # -------------------------------------------------------------------- HL7
    def hl7_stored_ack(self, sender: str, control_id: str) -> str | None:
        """The ACK already given to this sender's message ``control_id`` (a repeat), or None."""
        with self.session() as s:
            return s.scalar(
                select(Hl7Inbound.ack).where(
                    Hl7Inbound.sender == sender[:400], Hl7Inbound.control_id == control_id
                )
            )

    def hl7_record_message(
        self,
        *,
        sender: str,
        control_id: str,
        message_type: str,
        ack_code: str,
        ack: str,
        orders: Sequence[Mapping[str, Any]] = (),
        merges: Sequence[PatientMerge] = (),
        merged: list[MergeMoved] | None = None,
        taken: list[str] | None = None,
    ) -> str:
        """Record a processed message, its ACK and the orders it carries, in one transaction.

        Each order is a dict of its ``accession_number``, ``cancelled`` (the order cancelled or
        discontinued; else it is created or updated and scheduled) and :data:`ORDER_FIELDS`; a
        field empty or absent leaves the stored value as it was. Returns the ACK to send:
        ``ack``, or the stored one when the same sender's ``control_id`` was recorded first by
        a concurrent connection (nothing is then created twice).

        A cancelled order stays cancelled: an order of the message that would give it another
        status (a change ``XO``, a status change, ``NW`` again) raises :class:`OrderCancelled`
        and nothing of the message is recorded. ``merges`` (an ``ADT^A40``) move orders, and
        the ORU^R01 messages waiting in the outbox, to the surviving patient
        (:func:`_merge_patients`); ``merged``, when given, gets each merge's
        :class:`MergeMoved`, and ``taken`` what became of each order (``created``, the
        ledger did not have it; ``updated``; ``cancelled``; ``""``, none without an accession
        number), once the transaction is committed
        (neither gets anything when a concurrent connection recorded the message first).
        """
        moved_now: list[MergeMoved] = []
        taken_now: list[str] = []
        try:
            with self.session() as s:
                s.add(
                    Hl7Inbound(
                        sender=sender[:400],
                        control_id=control_id,
                        message_type=message_type[:16],
                        ack_code=ack_code,
                        ack=ack,
                        accession_number=str(orders[0]["accession_number"])[:64] if orders else "",
                    )
                )
                s.flush()
                for merge in merges:
                    moved_now.append(_merge_patients(s, merge, control_id))
                for index, order in enumerate(orders, start=1):
                    accession_number = str(order.get("accession_number") or "")
                    if not accession_number:
                        taken_now.append("")  # nothing taken
                        continue
                    row = s.scalars(
                        select(Hl7Order)
                        .where(Hl7Order.accession_number == accession_number)
                        .with_for_update()
                    ).one_or_none()
                    if order.get("cancelled"):
                        taken_now.append("cancelled")
                    else:
                        taken_now.append("created" if row is None else "updated")
                    if row is None:
                        row = Hl7Order(accession_number=accession_number)
                        s.add(row)
                    elif row.status == "cancelled" and not order.get("cancelled"):
                        raise OrderCancelled(accession_number, index)
                    for key in ORDER_FIELDS:
                        value = order.get(key)
                        if value is not None and value != "":
                            setattr(row, key, value)
                    row.control_id = control_id
                    row.status = "cancelled" if order.get("cancelled") else "scheduled"
                    s.flush()  # a later order of the message with the same accession finds it
        except IntegrityError:
            stored = self.hl7_stored_ack(sender, control_id)
            if stored is None:
                raise
            return stored
        if merged is not None:
            merged.extend(moved_now)
        if taken is not None:
            taken.extend(taken_now)
        return ack

    def hl7_order(self, accession_number: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.scalars(
                select(Hl7Order).where(Hl7Order.accession_number == accession_number)
            ).one_or_none()
            return None if row is None else _order_view(row)

    def hl7_order_for_study(self, study_uid: str, accession_number: str = "") -> dict | None:
        """The order of a study: by Study Instance UID, else by accession number."""
        with self.session() as s:
            row = s.scalars(
                select(Hl7Order).where(Hl7Order.study_uid == study_uid).order_by(Hl7Order.id)
            ).first()
            if row is None and accession_number:
                row = s.scalars(
                    select(Hl7Order).where(Hl7Order.accession_number == accession_number)
                ).one_or_none()
            return None if row is None else _order_view(row)

    def expected_studies_due(self) -> list[tuple[int, int]]:
        """(study id, generation) of receiving studies an order announced that have arrived.

        Arrived: the sending association was released and, when the order gave the number of
        images, at least that many are here. Such a study need not wait for the quiet period.
        """
        with self.session() as s:
            rows = s.execute(_EXPECTED_STUDIES_DUE).all()
        return sorted({(r[0], r[1]) for r in rows})

    def apply_order_priority(self, study_id: int, job_ids: Sequence[int]) -> bool:
        """Raise the priority of a study's new jobs to :data:`STAT_PRIORITY` when its order is
        STAT. Returns whether it was."""
        if not job_ids:
            return False
        with self.session() as s:
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == study_id))
            stat = s.scalar(
                select(func.count())
                .select_from(Hl7Order)
                .where(
                    Hl7Order.study_uid == study_uid,
                    Hl7Order.priority == "S",
                    Hl7Order.status == "scheduled",
                )
            )
            if not stat:
                return False
            s.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), Job.priority < STAT_PRIORITY)
                .values(priority=STAT_PRIORITY)
            )
            return True

    def job_priorities(self, job_ids: Sequence[int]) -> dict[int, int]:
        if not job_ids:
            return {}
        with self.session() as s:
            rows = s.execute(select(Job.id, Job.priority).where(Job.id.in_(list(job_ids)))).all()
        return {r[0]: r[1] for r in rows}

    def job_report_inputs(self, job_id: int) -> dict[str, Any]:
        """What an ORU needs from the ledger: the study, the job's summary, one spooled file."""
        with self.session() as s:
            job = s.get_one(Job, job_id)
            study = s.get_one(Study, job.study_id)
            path = s.scalar(
                select(Instance.path)
                .where(Instance.study_id == study.id, Instance.generation <= job.generation)
                .order_by(Instance.id)
                .limit(1)
            )
            return {
                "study_id": study.id,
                "study_uid": study.study_uid,
                "job_state": job.state.value,
                "summary": dict(job.summary or {}),
                "instance_path": path,
                "completed_at": study.completed_at,
            }

    def add_hl7_outbound(
        self, *, job_id: int, kind: str, control_id: str, message: str
    ) -> int | None:
        """Queue one ORU for the RIS; None when this job already has one of this kind."""
        try:
            with self.session() as s:
                study_id = s.get_one(Job, job_id).study_id
                row = Hl7Outbound(
                    study_id=study_id,
                    job_id=job_id,
                    kind=kind,
                    control_id=control_id,
                    message=message,
                    next_attempt_at=utcnow(),
                )
                s.add(row)
                s.flush()
                return row.id
        except IntegrityError:
            return None

    def hl7_outbound_kinds(self, job_id: int) -> list[str]:
        """The kinds of ORU queued or sent for this job (``result``, ``verdict-N``, ...)."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Hl7Outbound.kind)
                    .where(Hl7Outbound.job_id == job_id)
                    .order_by(Hl7Outbound.id)
                )
            )

    def unbuilt_hl7_outbound(self, job_id: int, kind: str) -> tuple[int, str] | None:
        """(row id, MSH-10) of this job's promised ORU whose message is not built yet."""
        with self.session() as s:
            row = s.execute(
                select(Hl7Outbound.id, Hl7Outbound.control_id).where(
                    Hl7Outbound.job_id == job_id,
                    Hl7Outbound.kind == kind,
                    Hl7Outbound.message == "",
                    Hl7Outbound.state == DeliveryState.PENDING,
                )
            ).first()
            return None if row is None else (int(row[0]), str(row[1]))

    def study_has_final_oru(self, job_id: int, *, before_id: int | None = None) -> bool:
        """Whether an ORU with a radiologist's verdict (a final result) is already queued or
        delivered for this job's study, in any generation: then a new message for the study is a
        correction. ``before_id`` counts only rows queued before that one (a promised row being
        built late); messages that failed for good never reached the RIS and do not count."""
        with self.session() as s:
            study_id = s.get_one(Job, job_id).study_id
            query = select(Hl7Outbound.id).where(
                Hl7Outbound.study_id == study_id,
                Hl7Outbound.kind.like("verdict%"),
                Hl7Outbound.state != DeliveryState.FAILED,
            )
            if before_id is not None:
                query = query.where(Hl7Outbound.id < before_id)
            return s.scalar(query.limit(1)) is not None

    def fill_hl7_outbound(self, outbound_id: int, message: str) -> bool:
        """Put the built message into a promised ORU row; False if it already had one."""
        with self.session() as s:
            filled = s.execute(
                update(Hl7Outbound)
                .where(Hl7Outbound.id == outbound_id, Hl7Outbound.message == "")
                .values(message=message)
            )
            return bool(cast(Any, filled).rowcount)

    def hl7_outbound_to_build(self, *, limit: int = 100) -> list[tuple[int, str]]:
        """(job id, kind) of promised ORUs still without a message (whoever promised them
        died before building them)."""
        with self.session() as s:
            rows = s.execute(
                select(Hl7Outbound.job_id, Hl7Outbound.kind)
                .where(
                    Hl7Outbound.state == DeliveryState.PENDING,
                    Hl7Outbound.message == "",
                    Hl7Outbound.job_id.is_not(None),
                )
                .order_by(Hl7Outbound.id)
                .limit(limit)
            ).all()
            return [(int(r[0]), str(r[1])) for r in rows if r[0] is not None]

    def review_verdict(
        self, review_item_id: int, verdict_id: int | None = None
    ) -> dict[str, Any] | None:
        """A confirm or override on a review item: the one that closed it, or with
        ``verdict_id`` that verdict (an amendment); None when there is none. Its lesion
        ``boxes`` are as kept (by image name, see :class:`Verdict`)."""
        with self.session() as s:
            query = select(Verdict).where(
                Verdict.review_item_id == review_item_id,
                Verdict.action.in_(("confirm", "override")),
            )
            if verdict_id is None:
                query = query.where(Verdict.amends_id.is_(None))
            else:
                query = query.where(Verdict.id == verdict_id)
            v = s.scalars(query.order_by(Verdict.id).limit(1)).first()
            if v is None:
                return None
            return {
                "action": v.action,
                "label": v.label,
                "user_name": v.user_name,
                "reason": v.reason,
                "created_at": v.created_at,
                "boxes": dict(v.boxes or {}),
            }

    def due_hl7_outbound(self, *, limit: int = 100) -> list[DueHl7]:
        now = utcnow()
        earlier = aliased(Hl7Outbound)
        with self.session() as s:
            rows = s.scalars(
                select(Hl7Outbound)
                .where(
                    Hl7Outbound.state == DeliveryState.PENDING,
                    Hl7Outbound.next_attempt_at <= now,
                    Hl7Outbound.message != "",
                    # One study's messages reach the RIS in the order they were queued: a
                    # verdict (F) never overtakes its study's result (P) in back-off.
                    ~exists().where(
                        earlier.study_id == Hl7Outbound.study_id,
                        earlier.id < Hl7Outbound.id,
                        earlier.state == DeliveryState.PENDING,
                    ),
                )
                .order_by(Hl7Outbound.next_attempt_at, Hl7Outbound.id)
                .limit(limit)
            ).all()
            return [
                DueHl7(r.id, r.control_id, r.message, r.attempts + r.outage_attempts) for r in rows
            ]

    def claim_hl7_outbound(self, outbound_id: int, *, lease_s: float) -> str | None:
        """Take a due ORU for one attempt, so that another ``hl7`` process sharing the ledger
        does not send it too (:meth:`claim_attempt`): the claim's token, or None."""
        return self.claim_attempt(Hl7Outbound, outbound_id, lease_s=lease_s)

    def claim_attempt(
        self,
        table: type[Hl7Outbound] | type[Notification],
        row_id: int,
        *,
        lease_s: float,
        due_at: dt.datetime | None = None,
    ) -> str | None:
        """Take a pending message that is due (at ``due_at``, default now) for one attempt:
        its next attempt moves ``lease_s`` past now (longer than the attempt can take), so
        that another process sharing the ledger does not send it too. Returns the claim's
        token, which the attempt's outcome names (it changes nothing once another process
        has taken the message over); None when it is not due any more (another process took
        it, or it was settled meanwhile). A process that dies holding it leaves it to be sent
        again once the lease has run out."""
        now = utcnow()
        claim = new_claim()
        with self.session() as s:
            taken = s.execute(
                update(table)
                .where(
                    table.id == row_id,
                    table.state == DeliveryState.PENDING,
                    table.next_attempt_at <= (now if due_at is None else due_at),
                )
                .values(next_attempt_at=now + dt.timedelta(seconds=lease_s), claim_token=claim)
            )
            return claim if cast(Any, taken).rowcount else None

    def record_hl7_attempt(
        self,
        outbound_id: int,
        *,
        delivered: bool,
        ack_code: str,
        error: str,
        max_attempts: int,
        backoff_s: float,
        final: bool = False,
        unreachable: bool = False,
        outage_patience_s: float = 0.0,
        claim: str | None = None,
    ) -> str:
        """Record one send; ``final`` (a rejection) fails it at once; ``unreachable`` (no
        connection) with ``outage_patience_s`` > 0 is an outage, not counted against
        ``max_attempts`` until the RIS has been unreachable that long. Returns the new state;
        :data:`SUPERSEDED`, recording nothing, when ``claim`` (:meth:`claim_hl7_outbound`) is
        no longer the message's: another process took it over after the claim ran out."""
        now = utcnow()
        with self.session() as s:
            row = s.get_one(Hl7Outbound, outbound_id, with_for_update=True)
            if row.state != DeliveryState.PENDING:
                return row.state.value
            if claim is not None and row.claim_token != claim:
                return SUPERSEDED
            row.claim_token = None
            row.last_ack_code = ack_code[:2]
            row.last_error = error[:2000]
            if unreachable and outage_patience_s > 0:
                outage_attempt(
                    row,
                    error=error,
                    backoff_s=backoff_s,
                    patience_s=outage_patience_s,
                    setting="hl7.ris.outage_patience_s",
                    now=now,
                )
                return row.state.value
            row.attempts += 1
            outage_over(row)
            if delivered:
                row.state = DeliveryState.DELIVERED
                row.delivered_at = now
            elif final or row.attempts >= max_attempts:
                row.state = DeliveryState.FAILED
            else:
                row.next_attempt_at = now + dt.timedelta(seconds=backoff_s)
            return row.state.value

    def hl7_outbound(self, study_uid: str) -> list[dict[str, Any]]:
        """The ORU deliveries of a study (no message text: it holds patient identifiers)."""
        with self.session() as s:
            rows = s.scalars(
                select(Hl7Outbound)
                .join(Study, Study.id == Hl7Outbound.study_id)
                .where(Study.study_uid == study_uid)
                .order_by(Hl7Outbound.id)
            ).all()
            return [
                {
                    "id": r.id,
                    "job_id": r.job_id,
                    "kind": r.kind,
                    "control_id": r.control_id,
                    "state": r.state.value,
                    "attempts": r.attempts,
                    "last_ack_code": r.last_ack_code,
                    "last_error": r.last_error,
                    "delivered_at": _iso(r.delivered_at),
                    # an outage of the RIS: not counted in attempts
                    "unreachable_since": _iso(r.unreachable_since),
                    "outage_attempts": r.outage_attempts,
                }
                for r in rows
            ]


def _cx_keys(er7: str) -> set[tuple[str, str]]:
    """(CX-1 id, CX-4 assigning authority) of each repetition of a PID-3 kept as ER7."""
    return set(cx_identifiers(er7))


def _merge_patients(s: Session, merge: PatientMerge, control_id: str) -> MergeMoved:
    """Move the orders of a merged-away patient (any identifier of ``merge.prior``: the same
    id from the same assigning authority) to the surviving one, and the ORU^R01 messages
    built for it and waiting in the outbox (:func:`_surviving_patient`); returns how many of
    each moved."""
    prior = {(ident, authority) for ident, authority in merge.prior if ident}
    if not prior:
        return MergeMoved()
    moved = 0
    messages: set[int] = set()
    for ident in sorted({ident for ident, _ in prior}):
        pattern = ident.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        # A message still to be sent (a first attempt, or a retry in back-off) carries the
        # surviving patient; one sent already is the RIS's to merge, as its own records. The
        # same MSH-10: a RIS that took it before (its ACK lost) answers the repeat as such.
        waiting = s.scalars(
            select(Hl7Outbound)
            .where(
                Hl7Outbound.state == DeliveryState.PENDING,
                Hl7Outbound.message.like(f"%{pattern}%", escape="\\"),
            )
            .with_for_update()
        ).all()
        for outbound in waiting:
            patched = _surviving_patient(outbound.message, merge, prior)
            if patched is not None:
                outbound.message = patched
                messages.add(outbound.id)
        rows = s.scalars(
            select(Hl7Order)
            .where(Hl7Order.patient_id.like(f"%{pattern}%", escape="\\"))
            .with_for_update()
        ).all()
        for row in rows:
            if not (_cx_keys(row.patient_id) & prior):
                continue
            surviving = _surviving_id(row.patient_id, merge, prior)
            if row.patient_id == surviving:
                continue
            row.patient_id = surviving
            for key in ("patient_name", "birth_date", "sex"):
                value = getattr(merge, key)
                if value:
                    setattr(row, key, value)
            row.control_id = control_id
            moved += 1
    s.flush()
    return MergeMoved(orders=moved, messages=len(messages))


def _surviving_id(patient_id: str, merge: PatientMerge, prior: set[tuple[str, str]]) -> str:
    """The PID-3 (ER7) that a patient under a merged-away identifier of ``prior`` takes:
    the surviving patient's (a merge), or, for an identifier change (``ADT^A47``), its own
    with the wrong identifiers replaced by ``merge.patient_id``'s (where the first of them
    was; its other identifiers kept, in their order, unless ``merge.patient_id`` names them
    too), as many whole repetitions as fit in 250 characters."""
    if not merge.identifier_change:
        return merge.patient_id
    new = _cx_keys(merge.patient_id)
    out: list[str] = []
    placed = False
    for repetition in patient_id.split("~"):
        keys = _cx_keys(repetition)
        if keys & prior:
            if not placed:
                out.extend(merge.patient_id.split("~"))
                placed = True
        elif not keys & new:
            out.append(repetition)
    kept = out[0][:250]
    for repetition in out[1:]:
        if len(kept) + 1 + len(repetition) > 250:
            break
        kept += "~" + repetition
    return kept


def _surviving_patient(
    message: str, merge: PatientMerge, prior: set[tuple[str, str]]
) -> str | None:
    """``message`` (an ORU^R01 the node built: standard delimiters, segments ended by CR) with
    the surviving patient of ``merge`` in each PID whose PID-3 names a merged-away identifier
    of ``prior``: its PID-3 (:func:`_surviving_id`) and, where the merge gives them, PID-5,
    PID-7 and PID-8 (as an order takes them); None when no PID names one."""
    segments = message.split("\r")
    changed = False
    for n, segment in enumerate(segments):
        fields = segment.split("|")
        if fields[0] != "PID" or len(fields) <= 3 or not (_cx_keys(fields[3]) & prior):
            continue
        surviving = _surviving_id(fields[3], merge, prior)
        if fields[3] == surviving:
            continue
        fields += [""] * (9 - len(fields))
        fields[3] = surviving
        for index, value in ((5, merge.patient_name), (7, merge.birth_date), (8, merge.sex)):
            if value:
                fields[index] = value
        segments[n] = "|".join(fields)
        changed = True
    return "\r".join(segments) if changed else None


def _order_view(row: Hl7Order) -> dict[str, Any]:
    return {
        "accession_number": row.accession_number,
        "status": row.status,
        "control_id": row.control_id,
        **{key: getattr(row, key) for key in ORDER_FIELDS},
    }


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


def files_deleted_at(s: Session, study_id: int, generation: int) -> dt.datetime | None:
    """When storage retention deleted the files generation ``generation`` of a study analyses
    (its purge, or a later generation's, which takes every earlier file too); None if it did
    not."""
    return s.scalar(
        select(func.min(Purge.started_at)).where(
            Purge.study_id == study_id, Purge.generation >= generation
        )
    )


def jobs_files_deleted(s: Session, job_ids: Collection[int]) -> set[int]:
    """Those of ``job_ids`` whose files storage retention deleted (:func:`files_deleted_at`
    of each job's study and generation), in one query."""
    if not job_ids:
        return set()
    purged = exists().where(Purge.study_id == Job.study_id, Purge.generation >= Job.generation)
    return set(s.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), purged)))


def promise_hl7_outbound(
    s: Session, *, study_id: int, job_id: int, kind: str, control_id: str
) -> None:
    """In the caller's transaction: an ORU outbox row with its MSH-10 and no message yet, unless
    the job already has one of this kind. Whoever promised it builds the message
    (:meth:`Ledger.fill_hl7_outbound`); should it die first, the ORU sender does."""
    already = s.scalar(
        select(Hl7Outbound.id).where(Hl7Outbound.job_id == job_id, Hl7Outbound.kind == kind)
    )
    if already is None:
        s.add(
            Hl7Outbound(
                study_id=study_id,
                job_id=job_id,
                kind=kind,
                control_id=control_id[:64],
                message="",
                next_attempt_at=utcnow(),
            )
        )


#: Whether a destination (by name) takes result objects of a kind (``sr``, ``heatmap``, ...).
DeliveryFilter = Callable[[str, str], bool]


def _queue_deliveries(
    s: Session,
    job: Job,
    result: Result,
    now: dt.datetime,
    takes: DeliveryFilter | None = None,
) -> int:
    """One pending outbox row per destination of the job that takes this result's kind;
    returns how many."""
    queued = 0
    for destination in job.destinations:
        if takes is not None and not takes(destination, result.kind):
            continue
        s.add(
            Delivery(
                result_id=result.id,
                job_id=job.id,
                destination=destination,
                state=DeliveryState.PENDING,
                next_attempt_at=now,
            )
        )
        queued += 1
    return queued


@dataclass(frozen=True)
class Outage:
    """A destination (or the RIS) with results waiting that cannot be reached."""

    destination: str
    #: When the oldest waiting delivery first failed to reach it.
    since: dt.datetime
    #: Results (or ORU^R01 messages) waiting for it.
    waiting: int


#: The name an outage of the RIS goes by (it is not a ``[[destinations]]`` entry).
RIS_OUTAGE = "RIS (HL7)"


def outages(s: Session, *, ris: bool = True) -> list[Outage]:
    """Each destination with results waiting that cannot be reached (to be sent, or stored
    and awaiting its storage commitment, whose requests cannot reach it), and (``ris``) the
    RIS with ORU^R01 waiting as :data:`RIS_OUTAGE`: the dashboard, the metrics and the
    ``unreachable`` notification read them alike."""
    found = [
        Outage(str(name), since, int(n))
        for name, since, n in s.execute(
            select(Delivery.destination, func.min(Delivery.unreachable_since), func.count())
            .where(
                Delivery.state.in_(UNSETTLED_DELIVERY_STATES),
                Delivery.unreachable_since.is_not(None),
            )
            .group_by(Delivery.destination)
        ).all()
        if since is not None
    ]
    if ris:
        since, n = s.execute(
            select(func.min(Hl7Outbound.unreachable_since), func.count()).where(
                Hl7Outbound.state == DeliveryState.PENDING,
                Hl7Outbound.unreachable_since.is_not(None),
            )
        ).one()
        if since is not None:
            found.append(Outage(RIS_OUTAGE, since, int(n)))
    return found


def webhook_outages(s: Session) -> dict[str, dt.datetime]:
    """Each ``[[notify]]`` webhook with notifications waiting that cannot be reached: since
    when (the dashboard and the metrics)."""
    return {
        str(target): since
        for target, since in s.execute(
            select(Notification.target, func.min(Notification.unreachable_since))
            .where(
                Notification.state == DeliveryState.PENDING,
                Notification.unreachable_since.is_not(None),
            )
            .group_by(Notification.target)
        ).all()
        if since is not None
    }


def _back_to_outbox(d: Delivery, now: dt.datetime) -> None:
    """A delivery sent again (resend, retry): due now, its attempts counted from zero."""
    d.state = DeliveryState.PENDING
    d.attempts = 0
    outage_over(d)
    d.next_attempt_at = now


def owed_delivery() -> Any:
    """The SQL condition (over Delivery joined to its Job, Study and Result) of a delivery the
    node still owes its destination: a result of the study's current generation not withdrawn
    from the PACS, or a rejection note (owed whatever came after). A failed one is what
    :meth:`Ledger.retry_failed` sends again; the others failed for good and stay so."""
    return or_(
        Result.kind == REJECTION_NOTE_KIND,
        and_(Job.withdrawn_at.is_(None), Job.generation == Study.generation),
    )


def outage_attempt(
    row: Delivery | Hl7Outbound | Notification,
    *,
    error: str,
    backoff_s: float,
    patience_s: float,
    setting: str,
    now: dt.datetime,
) -> None:
    """An attempt that could not reach the destination (``row``: a result's delivery, an
    ORU^R01 to the RIS, a notification to a webhook): tried again after the back-off, not
    counted against ``max_attempts``, until the destination has been unreachable for
    ``patience_s`` (the setting named ``setting``); then it fails, saying since when."""
    since = row.unreachable_since or now
    row.unreachable_since = since
    row.outage_attempts += 1
    if (now - since).total_seconds() >= patience_s:
        row.state = DeliveryState.FAILED
        why = f"unreachable since {since:%Y-%m-%d %H:%M:%S} UTC ({setting}): {error}"
        row.last_error = why[:2000]
    else:
        row.next_attempt_at = now + dt.timedelta(seconds=backoff_s)


def outage_over(row: Delivery | Hl7Outbound | Notification) -> None:
    """The destination answered an attempt (or the row is sent afresh): no outage now, and
    the next one counts its time and attempts from its own start."""
    row.unreachable_since = None
    row.outage_attempts = 0


def _add_result(s: Session, job_id: int, result: ResultFile, *, flush: bool = True) -> Result:
    """A new result row of the job (flushed: it has its id; not yet, without ``flush``)."""
    row = Result(
        job_id=job_id,
        kind=result.kind,
        sop_instance_uid=result.sop_instance_uid,
        sop_class_uid=result.sop_class_uid,
        path=result.path,
    )
    s.add(row)
    if flush:
        s.flush()
    return row
