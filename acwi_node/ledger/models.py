"""The ledger's tables: every instance, study, job, result and delivery has a row with a state.

The ledger is the truth; the broker only says "look at job N". No patient identifiers are stored
here: the spool files hold them.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


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
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class ReviewState(str, enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    #: Bumped each time the study is re-opened by instances arriving after completion.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Associations currently sending instances of this study.
    open_associations: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_released_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    needs_review: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str] = mapped_column(Text, default="")

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")

    __table_args__ = (Index("ix_studies_state", "state"),)


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
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


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
    #: Renewed by the worker while it analyses; a job whose lease ran out is taken again.
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: The analysis summary: model identity, probabilities, uncertainty, review decision.
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", order_by="Result.id")

    __table_args__ = (Index("ix_jobs_state", "state"),)


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

    result: Mapped[Result] = relationship(back_populates="deliveries")

    __table_args__ = (Index("ix_deliveries_due", "state", "next_attempt_at"),)


class ReviewItem(Base):
    """A study a radiologist must look at: uncertain or out of distribution."""

    __tablename__ = "review_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    state: Mapped[ReviewState] = mapped_column(_enum(ReviewState), default=ReviewState.OPEN)
    reason: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    study: Mapped[Study] = relationship()
    job: Mapped[Job] = relationship()


__all__ = [
    "Base",
    "Delivery",
    "DeliveryState",
    "FINAL_JOB_STATES",
    "Instance",
    "Job",
    "JobState",
    "Result",
    "ReviewItem",
    "ReviewState",
    "Study",
    "StudyState",
    "utcnow",
]
