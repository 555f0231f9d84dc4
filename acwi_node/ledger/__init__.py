"""The ledger: the node's durable record of every instance, study, job, result and delivery."""

from acwi_node.ledger.models import (
    DeliveryState,
    JobState,
    ReviewState,
    StudyState,
)
from acwi_node.ledger.repository import (
    AwaitedCommitment,
    CommitmentOutcome,
    DeliveryAttempt,
    DueDelivery,
    InstanceRecord,
    JobClaim,
    Ledger,
    MergeMoved,
    NoSuchStudy,
    OrderCancelled,
    PatientMerge,
    Recorded,
    ResultFile,
    RoutedJob,
    StudyActionRefused,
    StudyFacts,
)

__all__ = [
    "AwaitedCommitment",
    "CommitmentOutcome",
    "DeliveryState",
    "DeliveryAttempt",
    "DueDelivery",
    "InstanceRecord",
    "JobClaim",
    "JobState",
    "Ledger",
    "MergeMoved",
    "NoSuchStudy",
    "OrderCancelled",
    "PatientMerge",
    "Recorded",
    "ResultFile",
    "ReviewState",
    "RoutedJob",
    "StudyActionRefused",
    "StudyFacts",
    "StudyState",
]
