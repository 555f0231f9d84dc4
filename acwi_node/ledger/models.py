"""The ledger's tables: every instance, study, job, result and delivery has a row with a state.

The ledger is the truth; the broker only says "look at job N". No patient identifiers are stored
here: the spool files hold them.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    case,
    func,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    NOT_ROUTED = "not_routed"
    QUEUED = "queued"
    ANALYSING = "analysing"
    EXPORTING = "exporting"
    DELIVERED = "delivered"
    FAILED = "failed"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    ANALYSING = "analysing"
    EXPORTING = "exporting"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


FINAL_JOB_STATES = {JobState.DELIVERED, JobState.FAILED, JobState.SUPERSEDED}


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    #: Stored by the destination, whose storage commitment report is awaited (a destination
    #: with ``storage_commitment``): delivered once the report says it is committed.
    COMMITTING = "committing"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


#: Delivery states that are not final: to be sent, or stored and awaiting commitment.
UNSETTLED_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.COMMITTING)


class ReviewState(str, enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


#: ``results.kind`` of a radiologist's verified SR, added to a job once its verdict is given.
VERIFIED_SR_KIND = "sr-verified"
#: ``results.kind`` of a rejection note: the object that withdraws a job's results from a PACS.
REJECTION_NOTE_KIND = "rejection-note"
#: Results added to a job after its analysis: not what the analysis's turnaround waits for.
LATER_RESULT_KINDS = (VERIFIED_SR_KIND, REJECTION_NOTE_KIND)
#: Why results are withdrawn (``Job.withdrawn_reason``), as the rejection note's title says it.
WITHDRAWAL_REASONS = {
    "quality": "rejected for quality reasons",
    "safety": "rejected for patient safety reasons",
    "replaced": "replaced by a later analysis by another model version",
}

#: What may complete a study, as ``Study.completed_by`` records it, and how people read it.
COMPLETED_BY = {
    "quiet_period": "no instance and no open association for the quiet period",
    "max_wait": "no instance for completion.max_wait_s while an association stayed open",
    "release": "its sender released the association (a release-complete sender)",
    "mpps": "an MPPS COMPLETED listed its instances, all here",
    "hl7_order": "the instances its HL7 order announced arrived",
}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    #: Bumped each time the study is re-opened by instances arriving after completion.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    #: The calling AE title of the study's first instance: its first sender.
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    #: The calling AE title of the current generation's first instance (the one that created
    #: or re-opened the study): what routing matches (``match.calling_ae``). None where an
    #: earlier version recorded the generation: ``calling_ae`` stands for it
    #: (:meth:`generation_sender`).
    generation_calling_ae: Mapped[str | None] = mapped_column(
        String(16), nullable=True, default=None
    )
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    #: Study Date (0008,0020), ``YYYYMMDD``, of the first instance that had one; "" if none
    #: did (routing: ``match.max_age_days``).
    study_date: Mapped[str] = mapped_column(String(8), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Associations currently sending instances of this study.
    open_associations: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_released_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: What completed the current generation (:data:`COMPLETED_BY`); "" before completion, or
    #: where an earlier version completed it.
    completed_by: Mapped[str] = mapped_column(String(16), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    needs_review: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str] = mapped_column(Text, default="")

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")

    __table_args__ = (
        Index("ix_studies_state", "state"),
        # model monitoring's studies arriving: the studies of given hours, by source
        Index("ix_studies_first_received_at", "first_received_at"),
    )

    def generation_sender(self) -> str:
        """The calling AE title that sent the current generation first (the study's first
        sender where an earlier version recorded the generation)."""
        if self.generation_calling_ae is None:
            return self.calling_ae
        return self.generation_calling_ae

    def sender_of(self, generation: int) -> str:
        """Who sent the generation ``generation`` (a job's): the first sender for the first,
        the current generation's for any later one (the ledger keeps no sender of the
        generations in between: theirs reads as the current one's). :func:`job_sender` is the
        same in SQL."""
        return self.calling_ae if generation == 1 else self.generation_sender()


class AssociationHold(Base):
    """Of a study's ``open_associations``, how many one process holds: associations it
    accepted (STOW-RS requests, C-GETs and WADO-RS retrievals it runs) that sent the study
    instances and whose end it has not recorded yet.

    ``holder`` names an SCP process as its ingest journal does (the journal's directory,
    ``<process id>-<random>``), any other as its lock file in ``<spool>/.holders/`` does
    (:mod:`acwi_node.ingest.holders`: ``stow-``, ``retrieval-``, ``scp-<process id>-<random>``).
    A process that finds the journal or lock file of a process that is gone
    (:func:`~acwi_node.ingest.journal.replay_orphans`,
    :func:`~acwi_node.ingest.holders.release_gone`) releases that process's holds, as if its
    associations had been aborted (:meth:`~acwi_node.ledger.Ledger.release_holder`): a
    process killed with associations open no longer keeps their studies counted open.
    """

    __tablename__ = "association_holds"

    study_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_association_holds_holder", "holder"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), default="")
    #: Path relative to the spool directory.
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    #: CRC-32 of the file's bytes (unsigned), with the size and transfer syntax what tells an
    #: instance sent again unchanged; NULL where not known (recorded by an earlier version).
    crc32: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=None)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class InstanceArrival(Base):
    """What the instance rows of one generation of a study from one sending AE said, kept
    once records retention deleted those rows (``retention.records_keep_days``): the
    study's trace and the instance counts go on telling the same story."""

    __tablename__ = "instance_arrivals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    instances: Mapped[int] = mapped_column(Integer, default=0)
    series: Mapped[int] = mapped_column(Integer, default=0)
    #: The modalities of those instances, backslash-separated.
    modalities: Mapped[str] = mapped_column(String(64), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    #: The last of them that arrived before the generation completed (a report the PACS
    #: forwarded later is kept in the generation): what the completion waited for.
    waited_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("study_id", "generation", "calling_ae", name="uq_instance_arrival"),
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: What completed its study's generation (:data:`COMPLETED_BY`), kept with the job so
    #: that a study's trace tells it for every generation.
    completed_by: Mapped[str] = mapped_column(String(16), default="")
    #: When the analysis finished and its results were recorded (the delivery follows).
    analysed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: Renewed by the worker while it analyses; a job whose lease ran out is taken again.
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: The model's manifest name and version, as the summary names them, kept beside it: what
    #: groups and picks jobs by model version (:func:`job_model_name`) reads no summary (a
    #: CT's lists hundreds of images). None until the analysis, or where an earlier version
    #: of the node wrote the summary and records retention has not copied them yet.
    manifest_name: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    manifest_version: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    #: Its results withdrawn from the PACS (a rejection note sent): when, by whom, why (the
    #: note's reason, ``quality`` or ``safety``, and the operator's words).
    withdrawn_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    withdrawn_by: Mapped[str] = mapped_column(String(64), default="")
    withdrawn_reason: Mapped[str] = mapped_column(String(16), default="")
    withdrawn_note: Mapped[str] = mapped_column(Text, default="")
    #: The analysis summary: model identity, probabilities, uncertainty, review decision. The
    #: table's last column: a CT's summary spans many pages, and SQLite reads through them
    #: to any column after it.
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", order_by="Result.id")

    __table_args__ = (
        Index("ix_jobs_state", "state"),
        # /metrics counts jobs by state and model at every scrape: from this index alone
        Index("ix_jobs_state_model", "state", "model"),
        # the dashboard's and the model monitoring's windows
        Index("ix_jobs_started_at", "started_at"),
        Index("ix_jobs_created_at", "created_at"),
        # the turnaround's window: the jobs whose results were stored in the last hours
        Index("ix_jobs_finished_at", "finished_at"),
    )


class _SummaryField(ColumnElement[str]):
    """A field of a job's summary, as the database reads it best: on SQLite by a subquery on
    the same row (SQLite copies every column a GROUP BY's expressions name into its sorter,
    a CT's summary of hundreds of images too, even where the expression never reads it); on
    PostgreSQL directly (a subquery there makes the planner cost the query high enough to
    compile it first, which took longer than the query)."""

    inherit_cache = True
    _traverse_internals = [
        ("direct", InternalTraversal.dp_clauseelement),
        ("by_subquery", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, job: Any, path: tuple[str, ...]) -> None:
        same = aliased(Job)
        self.direct = job.summary[path].as_string()
        self.by_subquery = (
            select(same.summary[path].as_string()).where(same.id == job.id).scalar_subquery()
        )
        self.type = String()

    @property
    def _from_objects(self) -> list[Any]:
        return list(self.direct._from_objects)


@compiles(_SummaryField)
def _summary_field(element: _SummaryField, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.direct, **kw))


@compiles(_SummaryField, "sqlite")
def _summary_field_sqlite(element: _SummaryField, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.by_subquery, **kw))


class _SummaryHead(ColumnElement[Any]):
    """Some top-level fields of a job's summary, made by the database: what a view of many
    jobs reads. A CT's summary lists hundreds of images; these fields are a few hundred
    bytes, and the summary is parsed once for all of them (each field extracted on its own
    parsed all of it each time, and decoding it whole took longer still). SQLite gives the
    summary without its lists of images; PostgreSQL the named fields."""

    inherit_cache = True
    _traverse_internals = [
        ("summary", InternalTraversal.dp_clauseelement),
        ("keys", InternalTraversal.dp_string_list),
    ]

    def __init__(self, job: Any, keys: tuple[str, ...]) -> None:
        self.summary = job.summary
        self.keys = list(keys)
        self.type = JSON()

    @property
    def _from_objects(self) -> list[Any]:
        return list(self.summary._from_objects)


@compiles(_SummaryHead)
def _summary_head(element: _SummaryHead, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.summary, **kw)
    fields = ", ".join(f'"{key}" json' for key in element.keys)
    return f"(SELECT json_strip_nulls(row_to_json(h)) FROM json_to_record({column}) AS h({fields}))"


@compiles(_SummaryHead, "sqlite")
def _summary_head_sqlite(element: _SummaryHead, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.summary, **kw)
    return f"json_remove({column}, '$.images', '$.skipped')"


#: The fields :class:`SummaryFields` may read: a summary's top-level fields but its lists.
SUMMARY_HEAD_KEYS = frozenset(
    {
        "model", "labels", "finding_labels", "probabilities", "predicted_label", "uncertainty",
        "uncertainty_threshold", "ood_score", "ood_threshold", "equipment", "needs_review",
    }
)  # fmt: skip


class SummaryFields:
    """Some top-level fields of job summaries, read the way a view of many jobs reads them
    best on the ledger's database: SQLite extracts each field on its own as a number, a
    truth value or JSON text (fast on its JSON text), PostgreSQL parses each summary once for
    all of them (:class:`_SummaryHead`: it parses the whole text for each extraction).
    ``fields`` name each field and what it holds (``float``, ``bool`` or ``json``: an object
    or list). :attr:`columns` go in the query's select list; :meth:`read` makes a row's
    values a dict (a field the summary lacks, or a null one: absent)."""

    def __init__(self, fields: dict[str, str], dialect: str, job: Any = None) -> None:
        unknown = set(fields) - SUMMARY_HEAD_KEYS
        if unknown:
            raise ValueError(f"not a summary's top-level field: {sorted(unknown)}")
        job = Job if job is None else job
        self.fields = dict(fields)
        self.whole = dialect == "postgresql"
        read_as = {
            "float": lambda key: job.summary[key].as_float(),
            "bool": lambda key: job.summary[key].as_boolean(),
            "json": lambda key: job.summary[key].as_string(),
        }
        self.columns: list[Any] = (
            [_SummaryHead(job, tuple(self.fields))]
            if self.whole
            else [read_as[kind](key).label(f"summary_{key}") for key, kind in fields.items()]
        )

    def read(self, values: Sequence[Any]) -> dict[str, Any]:
        if self.whole:
            found: dict[str, Any] = values[0] or {}
        else:
            found = {}
            for (key, kind), value in zip(self.fields.items(), values, strict=True):
                found[key] = json.loads(value) if kind == "json" and value is not None else value
        return {key: value for key, value in found.items() if value is not None}


def job_model_name(job: Any = None) -> Any:
    """The SQL expression of the manifest name of the model that analysed a job (``job``: the
    :class:`Job` entity or an alias of it): its column, else its summary's, else the route's
    model name."""
    job = Job if job is None else job
    return func.coalesce(job.manifest_name, _SummaryField(job, ("model", "name")), job.model)


def job_sender(job: Any = None) -> Any:
    """The SQL expression of the sender of a job's generation (:meth:`Study.sender_of`; the
    query joins :class:`Study`): what its analysis read came from, and what routing matched."""
    job = Job if job is None else job
    return case(
        (job.generation == 1, Study.calling_ae),
        else_=func.coalesce(Study.generation_calling_ae, Study.calling_ae),
    )


def job_model_version(job: Any = None) -> Any:
    """The same for the model's version ("" where the job names none)."""
    job = Job if job is None else job
    return func.coalesce(job.manifest_version, _SummaryField(job, ("model", "version")), "")


class Result(Base):
    """One DICOM object the node wrote (SR or heatmap)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    #: Path relative to the results directory.
    path: Mapped[str] = mapped_column(String(512))

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")

    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)


class Delivery(Base):
    """One result object to one destination: the outbox."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: Storage commitment (state ``committing``): the Transaction UID of the latest request
    #: that the destination accepted, when the latest request was made, and how many were.
    commitment_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    commitment_requested_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    commitment_requests: Mapped[int] = mapped_column(Integer, default=0)
    #: Since when the destination could not be reached at all, and how many such attempts
    #: (an outage: not counted in ``attempts``, ``exporter.outage_patience_s``).
    unreachable_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    outage_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The claim of the process sending it now (:meth:`Ledger.claim_deliveries`), a random
    #: token: renewals, give-backs and outcomes name it, and change nothing once another
    #: process has taken the delivery over (the first stalled past its claim).
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)

    result: Mapped[Result] = relationship(back_populates="deliveries")

    __table_args__ = (
        Index("ix_deliveries_due", "state", "next_attempt_at"),
        # /metrics and the dashboard count deliveries by destination and state: from this
        # index alone, not a scan of every delivery ever made
        Index("ix_deliveries_destination_state", "destination", "state"),
        Index("ix_deliveries_commitment", "commitment_uid"),
    )


class CommitmentRequest(Base):
    """A storage commitment request made for a delivery (one row per delivery per request).

    A destination may report on an earlier request after the node asked again (it reports
    late, or in batches): :attr:`Delivery.commitment_uid` names the latest request alone, and
    these rows let a report on any request still awaited apply. Removed once the delivery
    settles."""

    __tablename__ = "commitment_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), index=True)
    delivery_id: Mapped[int] = mapped_column(Integer, index=True)
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ReviewItem(Base):
    """A study a radiologist must look at: uncertain or out of distribution, or a
    quality-control sample of the studies the model was sure of."""

    __tablename__ = "review_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    state: Mapped[ReviewState] = mapped_column(_enum(ReviewState), default=ReviewState.OPEN)
    reason: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: A quality-control sample (``review.quality_sample_percent``): the model was sure.
    sampled: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Who opened the open case last, and when (``review.reading_claim_s``): the others are
    #: told it is being read. None once nobody is.
    reading_by: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    reading_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, default=None)

    study: Mapped[Study] = relationship()
    job: Mapped[Job] = relationship()


# ------------------------------------------------------------------------- HL7 (RIS)
class Hl7Order(Base):
    """An imaging order from the RIS (ORM^O01 / OMI^O23), keyed by accession number.

    Unlike the rest of the ledger, an order holds patient identifiers (as the RIS sent them, ER7
    text): they go back to the RIS in the ORU^R01 results. They are never logged.
    """

    __tablename__ = "hl7_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="scheduled")  # or "cancelled"
    priority: Mapped[str] = mapped_column(String(2), default="R")  # S = STAT
    expected_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    placer_order_number: Mapped[str] = mapped_column(String(64), default="")
    filler_order_number: Mapped[str] = mapped_column(String(64), default="")
    procedure_code: Mapped[str] = mapped_column(String(64), default="")
    procedure_text: Mapped[str] = mapped_column(String(200), default="")
    patient_id: Mapped[str] = mapped_column(String(250), default="")
    patient_name: Mapped[str] = mapped_column(String(250), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(1), default="")
    control_id: Mapped[str] = mapped_column(String(199), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Hl7Inbound(Base):
    """A processed inbound HL7 message and the ACK it got (a repeated MSH-10 gets it again)."""

    __tablename__ = "hl7_inbound"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: "MSH-3|MSH-4" of the sender: control ids are unique per sending system.
    sender: Mapped[str] = mapped_column(String(400))
    control_id: Mapped[str] = mapped_column(String(199))
    message_type: Mapped[str] = mapped_column(String(16), default="")
    ack_code: Mapped[str] = mapped_column(String(2))
    ack: Mapped[str] = mapped_column(Text)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("sender", "control_id"),)


class Hl7Outbound(Base):
    """One ORU^R01 to the RIS: the outbox of results (and later verdicts) over MLLP."""

    __tablename__ = "hl7_outbound"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    #: "result" (AI result) or "verdict-N" (radiologist review N); one row per job and kind.
    kind: Mapped[str] = mapped_column(String(32), default="result")
    #: MSH-10 of the message; a retry re-sends the same message with the same control id.
    control_id: Mapped[str] = mapped_column(String(64), unique=True)
    #: The ER7 message (holds patient identifiers, like the order it came from).
    message: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_ack_code: Mapped[str] = mapped_column(String(2), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: An outage of the RIS (no connection): since when, and the attempts it took (not counted
    #: in ``attempts``; ``hl7.ris.outage_patience_s``).
    unreachable_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    outage_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The claim of the process sending it now (:meth:`Ledger.claim_attempt`): its outcome
    #: names it, and changes nothing once another process has taken the message over.
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (
        UniqueConstraint("job_id", "kind"),
        Index("ix_hl7_outbound_due", "state", "next_attempt_at"),
    )


class Notification(Base):
    """One POST to a ``[[notify]]`` webhook: what needs someone soon (a case on the worklist,
    a finding, a failed study). The payload holds no patient data."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The ``[[notify]]`` target's name.
    target: Mapped[str] = mapped_column(String(64))
    #: ``review``, ``finding`` or ``failed``.
    event: Mapped[str] = mapped_column(String(16))
    #: What it is about, once per target: ``review-<item>``, ``finding-<job>``,
    #: ``failed-<study>-<generation>``.
    key: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: An outage of the webhook (no connection, no answer, a gateway's 502-504): since when,
    #: and the attempts it took (not counted in ``attempts``; ``outage_patience_s``).
    unreachable_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    outage_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The claim of the process sending it now (:meth:`Ledger.claim_attempt`): its outcome
    #: names it, and changes nothing once another process has taken the message over.
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (
        UniqueConstraint("target", "key"),
        Index("ix_notifications_due", "state", "next_attempt_at"),
    )


# ------------------------------------------------------------------ review web app
class User(Base):
    """A local account of the review web app (radiologist or admin)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: ``scrypt$n$r$p$salt$hash`` (see acwi_node.review.auth); never the password.
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: Failed sign-ins in a row, and when the last was (the sign-in throttle, shared by every
    #: web process; see acwi_node.review.auth.SignInThrottle).
    failed_sign_ins: Mapped[int] = mapped_column(Integer, default=0)
    last_failed_sign_in_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class WebSession(Base):
    """A signed-in browser: the cookie holds a token, the ledger only its SHA-256."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)

    user: Mapped[User] = relationship()


class Verdict(Base):
    """A radiologist's decision on a review item: confirm, override or escalate."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    review_item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    #: The label the radiologist stands by ("" for an escalation).
    label: Mapped[str] = mapped_column(String(64), default="")
    model_label: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: The verified SR this verdict produced ("" for an escalation).
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    #: Lesion boxes the radiologist marked, by image (its SOP Instance UID, ``"<uid> frame
    #: <n>"`` for a frame): a list of ``[x0, y0, x1, y1]`` in the image's pixels, inclusive (a
    #: verdict kept when an image took one box has that box alone; the review store reads it
    #: as a list of one). None: none.
    boxes: Mapped[dict[str, Any] | None] = mapped_column(nullable=True, default=None)
    #: The confirm or override this one amends (a radiologist changed a closed case's
    #: verdict): None for the verdict that closed the item, and for an escalation.
    amends_id: Mapped[int | None] = mapped_column(
        ForeignKey("verdicts.id"), nullable=True, default=None
    )
    #: When an amendment replaced this verdict; None while it stands. A case's current verdict
    #: is its confirm or override with none.
    superseded_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, default=None)


class MppsStep(Base):
    """A Modality Performed Procedure Step received by the MPPS SCP.

    Only UIDs are kept (the studies of the step, the instances it lists when completed), never
    the patient attributes a step also carries. In the ledger, not in a process's memory, so
    that several SCP processes sharing the DICOM port see the same steps: a modality may send
    the N-CREATE and the N-SET on different associations.
    """

    __tablename__ = "mpps_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    study_uids: Mapped[list[Any]] = mapped_column(default=list)
    sop_uids: Mapped[list[Any]] = mapped_column(default=list)
    #: Bumped by every update: concurrent N-SETs of one step cannot both apply.
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class CompletionSignal(Base):
    """A hint that studies are complete before their quiet period (MPPS, a trusted release).

    ``kind`` "mpps": a step completed listing ``sop_uids`` of ``study_uids``; due once every
    listed instance is in the ledger. ``kind`` "release": a release-complete sender ended its
    association after sending study ``study_id``; due once no association sends it. The
    completion loop deletes a signal once it is spent.
    """

    __tablename__ = "completion_signals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True)
    step_uid: Mapped[str] = mapped_column(String(64), default="")
    study_uids: Mapped[list[Any]] = mapped_column(default=list)
    sop_uids: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Purge(Base):
    """One generation of a study whose images and result files storage retention deleted.

    Claimed in one transaction (the instances' paths emptied, this row written), then the files
    are deleted and ``finished_at`` set: a purge left unfinished (the process stopped) is
    finished by the next sweep. Files newer than ``received_before`` (spool) and
    ``started_at`` (results) are never deleted: they belong to a later generation.
    """

    __tablename__ = "purges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    #: "age" (keep_hours passed) or "space" (free space below min_free_percent).
    reason: Mapped[str] = mapped_column(String(8))
    #: The study's last_received_at when it was claimed.
    received_before: Mapped[dt.datetime] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    files: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    #: When records retention summarised the study's instance rows and erased the patient
    #: identifiers the ledger held for it (``retention.records_keep_days`` after
    #: ``finished_at``); None: not yet.
    records_compacted_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime, nullable=True, default=None
    )

    __table_args__ = (UniqueConstraint("study_id", "generation", name="uq_purge_generation"),)


class RetrievalState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Retrieval(Base):
    """A request to retrieve studies from a ``[[sources]]`` PACS (C-FIND, then C-MOVE to the
    node's own SCP), and how far it got.

    ``query`` holds the matching keys (``study_uid``, ``accession_number``, ``study_date``,
    ``modality``): no patient identifiers. ``study_uids`` are the studies the C-FIND found,
    ``retrieved_uids`` those moved so far (a later attempt moves only the rest). A running
    retrieval holds a lease (``lease_until``, renewed on every C-MOVE response): one whose
    process stopped is taken up again once it runs out.
    """

    __tablename__ = "retrievals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    query: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[RetrievalState] = mapped_column(
        _enum(RetrievalState), default=RetrievalState.QUEUED
    )
    requested_by: Mapped[str] = mapped_column(String(64), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    study_uids: Mapped[list[Any]] = mapped_column(default=list)
    retrieved_uids: Mapped[list[Any]] = mapped_column(default=list)
    #: C-MOVE sub-operations over every attempt: instances the source sent (completed),
    #: could not send (failed) and sent with a warning.
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    warnings: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (Index("ix_retrievals_due", "state", "next_attempt_at"),)


class AuditEvent(Base):
    """Who signed in, viewed and decided what (no patient data: UIDs only)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    user_name: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


__all__ = [
    "AssociationHold",
    "AuditEvent",
    "Base",
    "CompletionSignal",
    "Delivery",
    "DeliveryState",
    "UNSETTLED_DELIVERY_STATES",
    "FINAL_JOB_STATES",
    "Hl7Inbound",
    "Hl7Order",
    "Hl7Outbound",
    "Instance",
    "InstanceArrival",
    "Purge",
    "Job",
    "JobState",
    "job_model_name",
    "job_model_version",
    "job_sender",
    "SummaryFields",
    "ModelVersion",
    "MppsStep",
    "Result",
    "Retrieval",
    "RetrievalState",
    "ReviewItem",
    "ReviewState",
    "Study",
    "StudyState",
    "User",
    "Notification",
    "Verdict",
    "WebSession",
    "utcnow",
]


class MonitoringBaseline(Base):
    """The studies a model version's monitoring compares the recent ones with, as pinned by an
    ML engineer (``acwi-node monitor baseline``): those analysed between ``since`` and
    ``until``. A version with no row is compared with its first studies
    (``monitoring.baseline_studies``)."""

    __tablename__ = "monitoring_baselines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The model's manifest name and version, as the results name them.
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    since: Mapped[dt.datetime] = mapped_column(DateTime)
    until: Mapped[dt.datetime] = mapped_column(DateTime)
    pinned_by: Mapped[str] = mapped_column(String(64), default="")
    pinned_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("model", "version", name="uq_monitoring_baseline"),)


class ModelVersion(Base):
    """The weights a model's manifest name and version stand for, recorded the first time a
    worker loaded it (:mod:`acwi_node.ledger.model_versions`): results' UIDs, recalls,
    monitoring, shadow comparisons and the feedback export know a model by its name and
    version alone, so a later load of them with other weights is refused."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The model's manifest name and version, as the results name them.
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    #: The full SHA-256 of the weights file (the manifest's ``weights_sha256``).
    weights_sha256: Mapped[str] = mapped_column(String(64))
    #: The manifest file they were first loaded from.
    manifest_path: Mapped[str] = mapped_column(Text, default="")
    first_loaded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("model", "version", name="uq_model_version"),)


class ShadowState(str, enum.Enum):
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"
    #: Its live job was superseded (the study re-opened) before it ran.
    SUPERSEDED = "superseded"


class ShadowJob(Base):
    """A shadow model's analysis of a live job's study (``[[routes]] shadow_models``): run
    after the live job, on the lowest queue; its summary is compared, never sent."""

    __tablename__ = "shadow_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    #: The shadow model's configured name (a ``[[models]]`` name).
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[ShadowState] = mapped_column(_enum(ShadowState), default=ShadowState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: The analysis summary, as a live job's (acwi_node.tasks.analyse.summarise).
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (
        UniqueConstraint("job_id", "model", name="uq_shadow_job_model"),
        Index("ix_shadow_jobs_state", "state"),
    )


class FlushMark(Base):
    """One row that :meth:`acwi_node.ledger.Ledger.flush` writes on SQLite: a commit with
    ``synchronous = FULL`` syncs the write-ahead log, and with it every commit before that was
    not synced (the ingest journal's instance rows). Opening the database's files to sync them
    by hand would drop the process's SQLite locks on them when closed (POSIX advisory locks
    belong to the process, not to the descriptor), and another process closing its last
    connection would then checkpoint and delete the log under this one's connections."""

    __tablename__ = "flush_marks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flushes: Mapped[int] = mapped_column(Integer, default=0)
