"""Withdrawing results from the PACS: a study's, or every one of a model version (a recall).

For each job whose results may be in a destination's hands, a rejection note
(:mod:`acwi_node.results.rejection`) listing them is written into the results directory and
queued for that destination; the exporter sends it like any other result. Destinations that
may hold different objects of the job (a destination that takes only the SR) get each their
own note. What was still waiting in the outbox is never sent. The job keeps who withdrew it,
when and why; the study's trace tells it, and the audit trail records it.

Where the RIS was sent the analysis's result, it gets an ORU^R01 withdrawing it (every
observation ``W``, :func:`acwi_node.hl7.client.queue_withdrawal_oru`).

A note is built from the results' own files (their patient and study headers, their series).
Once storage retention has deleted them, it is built from what the ledger keeps of them and
from the patient and study attributes the destination's archive holds, asked of its
``query_source`` (:mod:`.withdrawal_headers`); a destination without one has its results
withdrawn in the PACS by hand, and the withdrawal says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from acwi_node.audit import AuditEvent, Outcome, audit
from acwi_node.audit.trail import user
from acwi_node.config import Settings
from acwi_node.export.withdrawal_headers import (
    ArchiveQueries,
    HeaderUnavailable,
    query_source_of,
    stand_ins,
)
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger, ResultFile, StudyActionRefused
from acwi_node.ledger.models import utcnow
from acwi_node.ledger.withdrawals import ResultsChanged, WithdrawableJob, Withdrawals
from acwi_node.results.encoding import encode_part10
from acwi_node.results.rejection import (
    REJECTION_NOTE_KIND,
    REJECTION_REASONS,
    build_rejection_note,
)

__all__ = [
    "REASONS",
    "JobWithdrawal",
    "NoSuchModel",
    "WithdrawalReport",
    "withdraw_replaced",
    "withdraw_results",
]

log = logging.getLogger("acwi_node.withdrawal")

#: The reasons an administrator's withdrawal may give (the note's title): ``quality``,
#: ``safety``; the node's own (:func:`withdraw_replaced`) gives ``replaced``.
REASONS = ("quality", "safety")
#: Who withdraws the results a later analysis replaced.
NODE = "acwi-node"
MAX_NOTE = 1000


class NoSuchModel(LookupError):
    """A recall of a model version the node does not know (:func:`check_model_known`)."""


def check_model_known(settings: Settings, ledger: Ledger, name: str, version: str) -> None:
    """Raise :class:`NoSuchModel` unless model ``name`` ``version`` analysed a study here or
    is running or installed (a version that exists but analysed nothing recalls nothing)."""
    from acwi_node.model_overview import model_version_known

    if not model_version_known(settings, ledger, name, version):
        raise NoSuchModel(f"no model {name} version {version} on this node")


class WithdrawalError(Exception):
    """A job's results cannot be withdrawn by the node; the message says why and what to do."""


@dataclass(frozen=True)
class JobWithdrawal:
    """What became of one job's results."""

    job_id: int
    study_uid: str
    generation: int
    route: str
    model: str
    version: str
    withdrawn: bool
    #: Objects the rejection notes name, notes queued (one per destination), deliveries
    #: that were pending and will not be sent.
    rejected: int = 0
    queued: int = 0
    cancelled: int = 0
    #: Why it was not withdrawn.
    error: str = ""

    def describe(self) -> str:
        what = f"{self.study_uid} #{self.generation} {self.route} ({self.model} {self.version})"
        if not self.withdrawn:
            return f"{what}: not withdrawn: {self.error}"
        text = (
            f"{what}: {self.rejected} object(s) withdrawn, {self.queued} rejection note(s) queued"
        )
        if self.cancelled:
            text += f", {self.cancelled} pending delivery(ies) cancelled"
        return text

    def as_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "study_uid": self.study_uid,
            "generation": self.generation,
            "route": self.route,
            "model": self.model,
            "version": self.version,
            "withdrawn": self.withdrawn,
            "rejected": self.rejected,
            "notes_queued": self.queued,
            "cancelled": self.cancelled,
            "error": self.error,
        }


@dataclass
class WithdrawalReport:
    jobs: list[JobWithdrawal] = field(default_factory=list)
    #: Matching jobs still queued or analysing, and those withdrawn before.
    unfinished: int = 0
    withdrawn_before: int = 0

    @property
    def refused(self) -> list[JobWithdrawal]:
        return [j for j in self.jobs if not j.withdrawn]

    def why_nothing(self) -> str:
        """Why nothing was withdrawn, for people; "" when something was."""
        if any(j.withdrawn for j in self.jobs):
            return ""
        if self.refused:
            return "; ".join(sorted({j.error for j in self.refused}))
        if self.unfinished:
            return f"{self.unfinished} analysis(es) not finished: withdraw once they are"
        if self.withdrawn_before:
            return f"withdrawn already ({self.withdrawn_before} analysis(es))"
        return "no analysis of it wrote results"

    def as_json(self) -> dict[str, object]:
        return {
            "jobs": [j.as_json() for j in self.jobs],
            "withdrawn": sum(1 for j in self.jobs if j.withdrawn),
            "refused": len(self.refused),
            "unfinished": self.unfinished,
            "withdrawn_before": self.withdrawn_before,
        }


def check_request(reason: str, note: str, *, automatic: bool = False) -> None:
    """Raise ValueError for a reason not in :data:`REASONS` (any of the notes' with
    ``automatic``), or a missing or long note, or one with a control character."""
    if reason not in (REJECTION_REASONS if automatic else REASONS):
        raise ValueError(f"reason must be one of {', '.join(REASONS)}")
    if not note.strip():
        raise ValueError("say why the results are withdrawn (it is kept, and sent in the note)")
    if len(note) > MAX_NOTE:
        raise ValueError(f"the note: at most {MAX_NOTE} characters")
    from acwi_node.review.inputs import typed_text_error

    problem = typed_text_error(note, "the note")  # it goes into the note and to the RIS
    if problem is not None:
        raise ValueError(problem)


def withdraw_results(
    settings: Settings,
    ledger: Ledger,
    *,
    reason: str,
    note: str,
    by: str,
    address: str = "",
    study_uid: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    job_ids: Collection[int] | None = None,
    automatic: bool = False,
) -> WithdrawalReport:
    """Withdraw the results of study ``study_uid`` and/or of ``model_name``
    (``model_version``): every job that wrote some and was not withdrawn yet. ``by`` is who
    asks (an account, or the command's operator), ``note`` their words. Raises ValueError for
    a bad request, :class:`StudyActionRefused` for a study not in the ledger and
    :class:`NoSuchModel` for a model version the node does not know; a job that cannot be
    withdrawn is reported, not raised."""
    check_request(reason, note, automatic=automatic)
    if study_uid is None and model_name is None:
        raise ValueError("name a study or a model")
    if model_name is not None and model_version is not None:
        check_model_known(settings, ledger, model_name, model_version)
    withdrawals = Withdrawals(ledger)
    found = withdrawals.candidates(
        study_uid=study_uid, model_name=model_name, model_version=model_version, job_ids=job_ids
    )
    report = WithdrawalReport(unfinished=found.unfinished, withdrawn_before=found.withdrawn_before)
    archives = ArchiveQueries(settings, by)
    for job in found.jobs:
        report.jobs.append(
            _withdraw_job(settings, withdrawals, job, reason, note.strip(), by, archives)
        )
    done = [j for j in report.jobs if j.withdrawn]
    refused = report.refused
    for outcome, jobs in ((Outcome.SUCCESS, done), (Outcome.MINOR_FAILURE, refused)):
        if not jobs:
            continue
        instances: dict[str, int] = defaultdict(int)
        for j in jobs:
            instances[j.study_uid] += j.rejected
        audit(
            AuditEvent.RESULTS_WITHDRAWN,
            outcome=outcome,
            participants=[user(by, address)],
            study_uids=sorted(instances),
            instances=dict(instances),
            detail=(
                f"{reason}: {note.strip()}"
                if outcome == Outcome.SUCCESS
                else "not withdrawn: " + "; ".join(sorted({j.error for j in jobs}))
            )[:2000],
        )
    if not automatic and report.jobs:
        _notify(settings, ledger, report, reason, by, study_uid, model_name, model_version)
    return report


def _notify(
    settings: Settings,
    ledger: Ledger,
    report: WithdrawalReport,
    reason: str,
    by: str,
    study_uid: str | None,
    model_name: str | None,
    model_version: str | None,
) -> None:
    """Tell the ``[[notify]]`` targets listening for ``withdrawn``: once per request."""
    if not any("withdrawn" in target.events for target in settings.notify):
        return
    from acwi_node.notify.events import queue_notice, withdrawn_payload

    done = [j for j in report.jobs if j.withdrawn]
    payload = withdrawn_payload(
        settings,
        reason=reason,
        by=by,
        study_uid=study_uid,
        model_name=model_name,
        model_version=model_version,
        studies=sorted({j.study_uid for j in done}),
        analyses=len(done),
        objects=sum(j.rejected for j in done),
        notes=sum(j.queued for j in done),
        refused=len(report.refused),
        at=utcnow(),
    )
    try:
        queue_notice(settings, ledger, payload)
    except Exception as exc:  # the withdrawal stands: the audit trail has it
        log.error("the withdrawal's notification not queued: %s", type(exc).__name__)


def withdraw_replaced(
    settings: Settings, ledger: Ledger, *, since: dt.datetime, skip: Collection[int] = ()
) -> list[JobWithdrawal]:
    """Withdraw the results that a later analysis of the same study by another model
    version replaced (``exporter.withdraw_replaced``): the new results have other UIDs, so
    the PACS would show both. Jobs in ``skip`` (refused before) are left. Returns each job's
    outcome."""
    outcomes: list[JobWithdrawal] = []
    for replaced in Withdrawals(ledger).replaced(since):
        if replaced.job_id in skip:
            continue
        report = withdraw_results(
            settings,
            ledger,
            reason="replaced",
            note=(
                f"replaced by {replaced.model_name} {replaced.model_version}"
                f" (generation {replaced.generation})"
            ),
            by=NODE,
            study_uid=replaced.study_uid,
            job_ids=[replaced.job_id],
            automatic=True,
        )
        outcomes += report.jobs
    return outcomes


def _withdraw_job(
    settings: Settings,
    withdrawals: Withdrawals,
    job: WithdrawableJob,
    reason: str,
    note: str,
    by: str,
    archives: ArchiveQueries,
) -> JobWithdrawal:
    def outcome(**kwargs: object) -> JobWithdrawal:
        return JobWithdrawal(
            job.job_id,
            job.study_uid,
            job.generation,
            job.route,
            job.model_name,
            job.model_version,
            **kwargs,  # type: ignore[arg-type]
        )

    try:
        for attempt in range(_PREPARE_ATTEMPTS):
            notes = _write_notes(settings, job, reason, note, archives)
            try:
                recorded = withdrawals.record(
                    job.job_id, reason=reason, note=note, by=by, notes=notes, held=job
                )
                break
            except ResultsChanged:  # a verified SR attached meanwhile: its note too
                _discard_notes(settings, notes)
                found = withdrawals.candidates(job_ids=[job.job_id]).jobs
                if not found or attempt == _PREPARE_ATTEMPTS - 1:
                    raise WithdrawalError(
                        "its results kept changing while it was withdrawn: try again"
                    ) from None
                job = found[0]
    except (WithdrawalError, StudyActionRefused) as exc:
        return outcome(withdrawn=False, error=str(exc))
    except (ValueError, OSError) as exc:  # a result that is not one, a full disk
        log.error("job %d: no rejection note: %s", job.job_id, exc)
        return outcome(withdrawn=False, error=f"the rejection note cannot be made: {exc}")
    automatic = reason == "replaced"
    if not automatic:  # the new analysis's ORU replaces it: a W would hide it too
        _tell_the_ris(settings, withdrawals, job.job_id, note)
    log.log(
        logging.INFO if automatic else logging.WARNING,
        "results withdrawn (%s): job %d, %d rejection note(s) queued, %d pending cancelled",
        reason,
        job.job_id,
        recorded.queued,
        recorded.cancelled,
    )
    return outcome(
        withdrawn=True,
        rejected=len(job.results),
        queued=recorded.queued,
        cancelled=recorded.cancelled,
    )


#: How many times a job's withdrawal is prepared (its notes written) before it gives up on
#: results that change under it (:class:`ResultsChanged`).
_PREPARE_ATTEMPTS = 3


def _discard_notes(settings: Settings, notes: Sequence[tuple[ResultFile, Sequence[str]]]) -> None:
    """Remove the rejection notes written for a withdrawal not recorded (no ledger row names
    them; those written again are written anew)."""
    out = Spool(settings.results_dir, fsync=False)
    for file, _destinations in notes:
        with contextlib.suppress(OSError, ValueError):
            out.resolve(file.path).unlink(missing_ok=True)


def _tell_the_ris(settings: Settings, withdrawals: Withdrawals, job_id: int, note: str) -> None:
    """Queue the ORU^R01 withdrawing the job's result where the RIS has it; a failure is
    logged, not raised: the PACS's notes are queued already."""
    if settings.hl7.ris is None:
        return
    from acwi_node.hl7.client import queue_withdrawal_oru

    try:
        queue_withdrawal_oru(settings, withdrawals.ledger, job_id, note)
    except Exception as exc:
        log.error("job %d: the withdrawal's ORU^R01 not queued: %s", job_id, type(exc).__name__)


def _write_notes(
    settings: Settings, job: WithdrawableJob, reason: str, note: str, archives: ArchiveQueries
) -> list[tuple[ResultFile, Sequence[str]]]:
    """The rejection notes of ``job``'s results, written into the results directory: one per
    set of objects that destinations may hold, with the destinations that get it."""
    held: dict[str, list[int]] = defaultdict(list)
    for n, result in enumerate(job.results):
        for destination in result.destinations:
            held[destination].append(n)
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for destination, held_by_it in sorted(held.items()):
        groups[tuple(held_by_it)].append(destination)
    if not groups:
        return []
    headers, unreadable = _file_headers(settings, job)
    out = Spool(settings.results_dir, fsync=settings.ingest.fsync)
    description = f"{job.model_name} {job.model_version} results withdrawn: {note}"
    files: list[tuple[ResultFile, Sequence[str]]] = []
    for group, destinations in groups.items():
        if unreadable is None:
            rejected = [headers[n] for n in group]
        else:
            rejected = _stand_ins(settings, job, group, destinations, unreadable, archives)
        document = build_rejection_note(
            rejected,
            reason=reason,
            description=description,
            timezone=settings.monitoring.timezone,
        )
        uid = str(document.SOPInstanceUID)
        path = out.store(job.study_uid, uid, encode_part10(document))
        files.append(
            (
                ResultFile(REJECTION_NOTE_KIND, uid, str(document.SOPClassUID), out.relative(path)),
                destinations,
            )
        )
    return files


def _file_headers(settings: Settings, job: WithdrawableJob) -> tuple[list[Dataset], str | None]:
    """The headers of the job's results, from their files; with why not (None when every one
    was read)."""
    results = Spool(settings.results_dir, fsync=False)
    headers: list[Dataset] = []
    for result in job.results:
        try:
            headers.append(dcmread(results.resolve(result.path), stop_before_pixels=True))
        except (OSError, ValueError, InvalidDicomError) as exc:
            if job.files_deleted:
                return [], "storage retention deleted its result files"
            return [], f"its {result.kind} result file cannot be read ({type(exc).__name__})"
    return headers, None


def _stand_ins(
    settings: Settings,
    job: WithdrawableJob,
    group: Sequence[int],
    destinations: Sequence[str],
    unreadable: str,
    archives: ArchiveQueries,
) -> list[Dataset]:
    """What the note of ``group`` names, its files unreadable: the UIDs the ledger keeps,
    the patient and study as the destinations' archive holds them
    (:mod:`.withdrawal_headers`). Raises :class:`WithdrawalError`."""
    source = query_source_of(settings, destinations)
    if source is None:
        raise WithdrawalError(
            f"{unreadable}, which a rejection note is made from, and no query_source of"
            f" {', '.join(destinations)} can tell the study's patient: reject them in the PACS"
            " by hand"
        )
    try:
        header = archives.header(source, job.study_uid)
        return stand_ins(header, job, [job.results[n] for n in group])
    except HeaderUnavailable as exc:
        raise WithdrawalError(f"{unreadable}; {exc}") from exc
