"""Retrieving studies from a PACS: the ``scp`` process runs the queued requests.

A request names a ``[[sources]]`` PACS and Study-level matching keys. The service finds the
studies (C-FIND), then has the PACS send each one to the node's own storage SCP (C-MOVE), where
it is spooled, recorded and acknowledged like any study. The end of a study's C-MOVE is a
completion signal (every instance the PACS had is here): the study is complete and routed once
the PACS's sending association is released, without waiting for the quiet period. A PACS that
cannot be reached, or refuses, is tried again (``retrieve.max_attempts``, with back-off); a later
attempt moves only the studies not yet moved.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TypedDict, cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from acwi_node.audit import AuditEvent, Outcome, Participant, audit
from acwi_node.config import Settings, Source
from acwi_node.export.scu import TlsArgs
from acwi_node.ingest.dicomweb_source import retrieve_study, search_studies
from acwi_node.ingest.holders import HOLDERS_DIR, HolderName, release_gone_holders
from acwi_node.ingest.mpps import CompletionSignals
from acwi_node.ingest.part10 import file_meta_prefix
from acwi_node.ingest.qr_scu import (
    FindResult,
    MoveResult,
    find_studies,
    get_study,
    move_study,
    study_sop_classes,
)
from acwi_node.ingest.spool import Spool, is_safe_uid
from acwi_node.ingest.stow import CANNOT_UNDERSTAND, StowReceiver, StowResult
from acwi_node.ledger import Ledger, StudyState
from acwi_node.ledger.models import utcnow
from acwi_node.ledger.repository import KEEPS_RESULTS
from acwi_node.ledger.retrievals import QUERY_KEYS, Retrievals, RetrievalTask, StudyNow
from acwi_node.observability.logging import LoopFailures
from acwi_node.observability.metrics import RETRIEVALS, RETRIEVED_INSTANCES
from acwi_node.tls import TlsConfigError

log = logging.getLogger("acwi_node.retrieval")

_DATE = re.compile(r"\d{8}")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
#: States of a study still on its way to its analysis.
_WAITING = frozenset(
    {
        StudyState.RECEIVING.value,
        StudyState.COMPLETE.value,
        StudyState.QUEUED.value,
        StudyState.ANALYSING.value,
    }
)
#: What the audit record calls a retrieval's search, by the source's kind.
_SEARCH = {"dimse": "C-FIND", "dicomweb": "QIDO-RS"}
#: How long the ledger rows of instances the SCP acknowledged may take to appear.
_ROWS_WAIT_S = 10.0
#: Seconds between lease renewals while a C-MOVE reports progress.
_RENEW_EVERY_S = 5.0


class _Peer(TypedDict):
    """The association parameters of a DIMSE source, as the Q/R SCU functions take them."""

    called_ae: str
    host: str
    port: int
    calling_ae: str
    timeout_s: float
    tls: TlsArgs | None


@dataclass(frozen=True)
class _Arrival:
    """What reached the node of a study the source reported sent."""

    #: The study as the ledger holds it; None: none of its instances came.
    held: StudyNow | None = None
    #: Why the retrieval fails for good (instances reported sent, none came), or "".
    none_came: str = ""
    #: The source sent another study's instances instead (what came, for people), or "".
    other_study: str = ""


class QueryError(ValueError):
    """A retrieval query the node will not send (the message says why)."""


def _check_date(value: str) -> None:
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise QueryError(f"study_date: {value!r} is not a date (YYYYMMDD)") from None


def check_query(query: dict[str, str | None]) -> dict[str, str]:
    """The query with empty keys dropped, or :class:`QueryError`: known keys only, and a
    Study Instance UID, an accession number or a study date among them (a query by modality
    alone would match the whole archive)."""
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise QueryError(
            f"unknown query key(s) {', '.join(unknown)} (known: {', '.join(QUERY_KEYS)})"
        )
    clean = {k: v.strip() for k, v in query.items() if v is not None and v.strip()}
    if not {"study_uid", "accession_number", "study_date"} & set(clean):
        raise QueryError("give a study_uid, an accession_number or a study_date")
    uid = clean.get("study_uid")
    if uid is not None and not is_safe_uid(uid):
        raise QueryError(f"study_uid: {uid!r} is not a UID (digits and dots, at most 64)")
    accession = clean.get("accession_number")
    if accession is not None and (
        len(accession) > 16 or any(c in accession for c in "\\*?") or not accession.isprintable()
    ):
        raise QueryError("accession_number: at most 16 printable characters, no \\ * or ?")
    date = clean.get("study_date")
    if date is not None:
        low, sep, high = date.partition("-")
        ends = [d for d in (low, high) if d]
        if not ends or any(_DATE.fullmatch(d) is None for d in ends):
            raise QueryError(f"study_date: {date!r} is not YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        for d in ends:
            _check_date(d)
        if sep and low and high and low > high:
            raise QueryError(f"study_date: {date!r} ends before it starts")
    modality = clean.get("modality")
    if modality is not None:
        clean["modality"] = modality = modality.upper()
        if _MODALITY.fullmatch(modality) is None:
            raise QueryError(f"modality: {modality!r} is not a modality code (CT, DX, MR, ...)")
    return clean


def describe_query(query: dict[str, str]) -> str:
    """The query for people (the dashboard, errors): ``accession_number=A123, modality=CT``."""
    return ", ".join(f"{k}={query[k]}" for k in QUERY_KEYS if k in query)


def source_tls(source: Source) -> TlsArgs | None:
    if source.tls is None:
        return None
    return source.tls.context(), source.tls.server_name or source.host or ""


class RetrievalService:
    """Background loop of the ``scp`` process: runs queued retrievals one at a time."""

    def __init__(
        self, settings: Settings, ledger: Ledger, signals: CompletionSignals | None = None
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.retrievals = Retrievals(ledger)
        self.signals = signals
        # DICOMweb and C-GET sources: what comes is stored as a STOW-RS request is, counted
        # open under this process's name while it comes (released by whoever finds it gone).
        self.spool = Spool(settings.spool_dir, fsync=settings.ingest.fsync)
        self.holder = HolderName(self.spool.root / HOLDERS_DIR, "retrieval")
        self.receiver = StowReceiver(
            ledger, self.spool, audit_patient_id=settings.audit.patient_id, holder=self.holder
        )
        #: By retrieval: studies whose C-MOVE the PACS answered with another study's
        #: instances, and what came (for people).
        self._answered_wrong: dict[int, dict[str, str]] = {}
        self._stop = threading.Event()
        #: A ledger that is down logs a traceback, then a line a minute, not one a pass.
        self.failures = LoopFailures(log, "retrieval pass")
        self._thread: threading.Thread | None = None

    @property
    def lease_s(self) -> float:
        return self.settings.retrieve.lease_s

    # ----------------------------------------------------------------- one retrieval
    def tick(self) -> bool:
        """Run the next due retrieval, if any; returns whether one ran."""
        task = self.retrievals.claim(self.lease_s)
        if task is None:
            return False
        try:
            self._run(task)
        except Exception as exc:  # noqa: BLE001 - the loop keeps serving the others
            log.exception("retrieval %d failed", task.id)
            self._failed(task, f"internal error: {type(exc).__name__}: {exc}")
        return True

    def _run(self, task: RetrievalTask) -> None:
        try:
            source = self.settings.source(task.source)
        except KeyError:
            self._finish(task, error=f"no source named {task.source!r} in the configuration")
            return
        try:
            tls = source_tls(source) if source.kind == "dimse" else None
        except TlsConfigError as exc:
            self._failed(task, f"TLS: {exc}")
            return
        node_ae = self.settings.node.ae_title
        study_uids = task.study_uids
        if not study_uids:
            found = self._find(source, tls, task.query)
            audit(
                AuditEvent.STUDIES_QUERIED,
                outcome=Outcome.SUCCESS if found.ok else Outcome.MINOR_FAILURE,
                participants=[
                    Participant(
                        "ae",
                        source.ae_title or source.name,
                        source.host or source.where,
                        requestor=False,
                    ),
                    *([Participant("user", task.requested_by)] if task.requested_by else []),
                ],
                study_uids=[s.study_uid for s in found.studies],
                detail=f"retrieval {task.id}: {_SEARCH[source.kind]} {describe_query(task.query)}: "
                + (f"{len(found.studies)} study(ies)" if found.ok else found.error),
            )
            if not found.ok:
                if found.final:
                    self._finish(task, error=found.error)
                else:
                    self._failed(task, found.error)
                return
            if not found.studies:
                self._finish(
                    task,
                    error=f"no study on {source.name} matches {describe_query(task.query)}",
                    # The query may hold an accession number: not in the log.
                    log_error=f"no study on {source.name} matches the query",
                )
                return
            study_uids = [s.study_uid for s in found.studies]
            self.retrievals.found(task.id, study_uids)
            log.info(
                "retrieval %d: %d study(ies) found on %s", task.id, len(study_uids), source.name
            )
        retrieved = set(task.retrieved_uids)
        already: list[str] = []
        # Studies whose C-MOVE the PACS answered with another study's instances: not moved
        # again when the retrieval resumes (stepped back, or tried again) in this process.
        answered_wrong = self._answered_wrong.setdefault(task.id, {})
        for uid in study_uids:
            if uid in retrieved or uid in answered_wrong:
                continue
            if self._waiting(retrieved) >= self.settings.retrieve.studies_ahead:
                # Its studies on the node wait for their analyses: later, and others first.
                self.retrievals.defer(task.id, after_s=self.settings.retrieve.poll_interval_s)
                return
            before = self.retrievals.study_states([uid]).get(uid)
            since = utcnow()
            moved = self._move(task, source, tls, uid, node_ae)
            if moved.failed and not moved.completed:
                dest = source.destination_ae(node_ae)
                if source.uses_get:
                    hint = (
                        f"{source.name} could send none of the study's {moved.failed}"
                        " instance(s) over the node's C-GET association: the node refused"
                        " them (its log says why), or their SOP class or transfer syntax is"
                        " not among those it proposes (retrieve_with = 'move' takes any)"
                    )
                elif source.kind == "dimse":
                    hint = (
                        f"{source.name} could not send any of the study's {moved.failed}"
                        f" instance(s) to {dest!r}: check the host and port it has for"
                        f" {dest!r}, and that the node admits its calling AE title"
                        " (ingest.allowed_calling_aes) and its instances (the node's log says"
                        " why it refused one)"
                    )
                else:
                    hint = (
                        f"the node refused each of the study's {moved.failed} instance(s)"
                        f" {source.name} sent (the node's log says why)"
                    )
                moved = replace(
                    moved, ok=False, error=f"{moved.error}; {hint}" if moved.error else hint
                )
            if not moved.ok:
                # Its counts are not kept: the next attempt moves the whole study again.
                self._failed(task, moved.error)
                return
            arrival = self._arrival(uid, moved, source, since)
            if arrival.none_came:
                self._finish(task, error=arrival.none_came)
                return
            if arrival.other_study:
                # Not retrieved, its counts not kept; the other studies are moved still (a
                # later attempt, after another study's failure, moves this one again).
                answered_wrong[uid] = arrival.other_study
                log.warning("retrieval %d: %s", task.id, arrival.other_study)
                continue
            RETRIEVED_INSTANCES.labels("completed").inc(moved.completed)
            RETRIEVED_INSTANCES.labels("failed").inc(moved.failed)
            RETRIEVED_INSTANCES.labels("warning").inc(moved.warnings)
            self.retrievals.progress(
                task.id, lease_s=self.lease_s, retrieved_uid=uid, completed=moved.completed,
                failed=moved.failed, warnings=moved.warnings,
            )  # fmt: skip
            retrieved.add(uid)
            after = self.retrievals.study_states([uid]).get(uid)
            if (
                before is not None
                and after is not None
                and after.generation == before.generation
                and after.state in KEEPS_RESULTS
            ):
                already.append(uid)  # its instances came back unchanged: it keeps its results
            self._signal_complete(uid, arrival.held)
        view = self.retrievals.get(task.id)  # the counts of every attempt and step
        not_sent = view.failed if view is not None else 0
        self._answered_wrong.pop(task.id, None)
        summary = self._summary(study_uids, already, not_sent, answered_wrong)
        if answered_wrong:
            self._finish(task, error="; ".join([summary, *answered_wrong.values()]))
        else:
            self._finish(task, note=summary)

    def _waiting(self, retrieved: set[str]) -> int:
        """Studies this retrieval moved that wait for their analysis on the node."""
        if not retrieved:
            return 0
        held = self.retrievals.study_states(sorted(retrieved))
        return sum(1 for study in held.values() if study.state in _WAITING)

    def _find(self, source: Source, tls: TlsArgs | None, query: dict[str, str]) -> FindResult:
        if source.kind == "dicomweb":
            return search_studies(
                source,
                query,
                timeout_s=self.settings.retrieve.timeout_s,
                limit=self.settings.retrieve.max_studies,
            )
        return find_studies(
            query, **self._peer(source, tls), limit=self.settings.retrieve.max_studies
        )

    def _peer(self, source: Source, tls: TlsArgs | None) -> _Peer:
        """The association parameters of a DIMSE source."""
        assert source.ae_title is not None and source.host is not None and source.port
        return {
            "called_ae": source.ae_title,
            "host": source.host,
            "port": source.port,
            "calling_ae": source.calling_ae(self.settings.node.ae_title),
            "timeout_s": self.settings.retrieve.timeout_s,
            "tls": tls,
        }

    def _move(
        self, task: RetrievalTask, source: Source, tls: TlsArgs | None, uid: str, node_ae: str
    ) -> MoveResult:
        last = time.monotonic()

        def renew() -> None:
            nonlocal last
            if time.monotonic() - last >= _RENEW_EVERY_S:
                last = time.monotonic()
                self.retrievals.progress(task.id, lease_s=self.lease_s)

        if source.kind == "dicomweb":
            return retrieve_study(
                source,
                uid,
                spool=self.spool,
                receiver=self.receiver,
                timeout_s=self.settings.retrieve.timeout_s,
                max_bytes=self.settings.retrieve.max_study_bytes,
                on_chunk=renew,
            )
        if source.uses_get:
            return self._get(source, tls, uid, renew)
        return move_study(
            uid,
            **self._peer(source, tls),
            move_destination=source.destination_ae(node_ae),
            on_response=renew,
        )

    def _get(
        self, source: Source, tls: TlsArgs | None, uid: str, renew: Callable[[], None]
    ) -> MoveResult:
        """C-GET one study: each instance the source sends back is stored as a STOW-RS part
        is (spooled, flushed, recorded) before its C-STORE is answered; one audit record for
        the whole study."""
        assert source.ae_title is not None and source.host is not None and source.port
        sender, address = source.ae_title, source.host
        received = StowResult()
        studies: dict[str, int] = {}
        opened: set[str] = set()  # the studies this C-GET sent instances of

        def store(event: evt.Event) -> int:
            renew()
            try:
                request = cast(C_STORE, event.request)
                data = (
                    file_meta_prefix(
                        str(request.AffectedSOPClassUID),
                        str(request.AffectedSOPInstanceUID),
                        str(event.context.transfer_syntax),
                    )
                    + cast(BytesIO, request.DataSet).getvalue()
                )
            except (AttributeError, TypeError, ValueError) as exc:
                log.warning("C-GET from %s: an instance the node cannot read: %s", sender, exc)
                return CANNOT_UNDERSTAND
            result = self.receiver.receive(
                [memoryview(data)],
                sender=sender,
                address=address,
                study_uid=uid,
                end_of_request=False,
                opened=opened,
            )
            received.stored += result.stored
            received.failed += result.failed
            received.dropped += result.dropped
            received.patient_ids |= result.patient_ids
            received.study_ids |= result.study_ids
            if result.failed:
                return result.failed[0][2]
            studies[uid] = studies.get(uid, 0) + len(result.stored) - result.dropped
            return 0x0000

        # the study's own SOP classes, where the PACS lists them: proposed first, so that a
        # class beyond the 127 the association has room for still comes
        classes = study_sop_classes(uid, **self._peer(source, tls))
        try:
            return get_study(
                uid, **self._peer(source, tls), store=store, on_response=renew,
                study_classes=classes,
            )  # fmt: skip
        finally:  # the sending association's end, as the SCP records it, and the audit
            self.receiver.end_request(
                received, studies, sender=sender, address=address, how="C-GET"
            )

    def _arrival(self, uid: str, moved: MoveResult, source: Source, since: dt.datetime) -> _Arrival:
        """What reached the node of a study whose C-MOVE (or C-GET, WADO-RS) ended, once the
        ledger rows of the instances the source reported sent are there (they follow the
        C-STORE responses by a moment; at most :data:`_ROWS_WAIT_S`)."""
        held = self.retrievals.study_states([uid])
        # The PACS sends its C-MOVE sub-operations under its own AE title.
        sender = source.ae_title if source.kind == "dimse" and not source.uses_get else None
        others = (0, 0)
        deadline = time.monotonic() + _ROWS_WAIT_S
        next_look = 0.0
        while uid not in held and moved.completed and time.monotonic() < deadline:
            if sender and time.monotonic() >= next_look:
                # Instances of other studies, as many as reported sent: no need to wait on.
                others = self.retrievals.other_arrivals(sender, since, besides=uid)
                if others[0] >= moved.completed:
                    break
                next_look = time.monotonic() + 0.25
            time.sleep(0.05)
            held = self.retrievals.study_states([uid])
        if uid in held:
            return _Arrival(held=held[uid])
        if not moved.completed:
            return _Arrival()
        if sender:
            others = self.retrievals.other_arrivals(sender, since, besides=uid)
        if others[0]:
            instances, studies = others
            return _Arrival(
                other_study=(
                    f"{source.name} answered the C-MOVE of a study with another study: it"
                    f" reported sending {moved.completed} instance(s), and {instances}"
                    f" instance(s) of {studies} other study(ies) came from {sender!r}, none of"
                    " the study asked for (check that study's UID and accession number on"
                    f" {source.name}; what came is kept and processed like any study received)"
                )
            )
        destination = source.destination_ae(self.settings.node.ae_title)
        return _Arrival(
            none_came=(
                f"{source.name} reported sending {moved.completed} instance(s) of a study"
                f" to {destination!r} but none reached this node: check the host and port"
                f" {source.name} has for {destination!r}"
            )
        )

    def _signal_complete(self, uid: str, study: StudyNow | None) -> None:
        """The study's C-MOVE ended: complete it once its sending association is released."""
        if study is None:
            return
        if study.state == StudyState.RECEIVING.value and self.signals is not None:
            self.signals.released([study.id])

    def _summary(
        self,
        study_uids: list[str],
        already: list[str],
        not_sent: int,
        answered_wrong: dict[str, str] | None = None,
    ) -> str:
        held = self.retrievals.study_states(study_uids)
        wrong = [uid for uid in answered_wrong or {} if uid not in held]
        parts = [f"{len(held)} of {len(study_uids)} study(ies) retrieved"]
        missing = len(study_uids) - len(held) - len(wrong)
        if missing:
            parts.append(f"{missing} with no instances sent")
        if wrong:
            parts.append(f"{len(wrong)} answered with another study's instances")
        if not_sent:
            parts.append(f"{not_sent} instance(s) the PACS could not send")
        if already:
            parts.append(
                f"{len(already)} the node had analysed already, not analysed again"
                " (acwi-node studies reprocess does)"
            )
        return "; ".join(parts)

    # ----------------------------------------------------------------- outcomes
    def _finish(
        self, task: RetrievalTask, *, error: str = "", note: str = "", log_error: str = ""
    ) -> None:
        # Something else ended it: what the PACS sent instead of a study is said still.
        wrong = list(self._answered_wrong.pop(task.id, {}).values())
        if wrong and error:
            error = "; ".join([error, *wrong])
            log_error = "; ".join([log_error, *wrong]) if log_error else ""
        self.retrievals.finish(task.id, error=error, note=note)
        RETRIEVALS.labels("failed" if error else "done").inc()
        if error:
            log.warning("retrieval %d failed: %s", task.id, log_error or error)
        else:
            log.info("retrieval %d done: %s", task.id, note)

    def _failed(self, task: RetrievalTask, error: str) -> None:
        cfg = self.settings.retrieve
        if task.attempt >= cfg.max_attempts:
            self._finish(task, error=f"{error} (after {task.attempt} attempt(s))")
            return
        after_s = cfg.backoff_s * 2 ** (task.attempt - 1)
        self.retrievals.retry(task.id, error=error, after_s=after_s)
        RETRIEVALS.labels("retry").inc()
        log.warning(
            "retrieval %d: attempt %d failed, again in %g s: %s",
            task.id, task.attempt, after_s, error,
        )  # fmt: skip

    # ----------------------------------------------------------------- the loop
    def run(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.tick()
            except Exception:
                self.failures.failed()
                ran = False
            else:
                self.failures.worked()
            if not ran:
                self._stop.wait(self.failures.wait_s(self.settings.retrieve.poll_interval_s))

    def start(self) -> None:
        # What a retrieval process killed in the middle of a C-GET or WADO-RS held goes.
        try:
            release_gone_holders(self.spool.root, self.ledger.release_holder)
        except Exception:  # the completion loop sweeps them too
            log.exception("could not release what stopped processes held")
        self._thread = threading.Thread(target=self.run, name="retrieval", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                return  # a retrieval still under way: its end is recorded when it ends
        # An end this process could not record (the ledger down just then) goes now.
        self.holder.close(self.ledger.release_holder)
