"""The exporter: send due result objects to their destinations and record what they answered.

A result is delivered only when the destination answered success (or an accepted warning);
otherwise it stays in the outbox with exponential back-off, and fails visibly after
``max_attempts``. Deliveries due for one destination go over its associations (DIMSE,
:mod:`.scu`) or its STOW-RS requests (DICOMweb, :mod:`.dicomweb`); each destination is sent to
in a thread of its own, so that one that answers slowly or not at all delays no other (a
destination gets its next results once its last send has ended). For a destination with
``storage_commitment``, a stored result is delivered once the destination commits it
(:mod:`.commitment`): the exporter asks, and asks again when no report came.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from acwi_node.audit import AuditEvent, Outcome, audit, remote_ae
from acwi_node.config import Destination, Settings
from acwi_node.export import dicomweb
from acwi_node.export.commitment import (
    MAX_REFERENCES,
    CommitmentReports,
    commitment_request,
    new_transaction_uid,
)
from acwi_node.export.scu import (
    EchoResult,
    SendReport,
    TlsArgs,
    request_commitment,
    send_files,
    verify,
)
from acwi_node.export.wakeup import WakeUpListener, wake_exporter
from acwi_node.ledger import AwaitedCommitment, DeliveryAttempt, DueDelivery, Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.ledger.repository import new_claim
from acwi_node.observability import metrics
from acwi_node.observability.logging import LoopFailures
from acwi_node.tls import TlsConfigError

log = logging.getLogger("acwi_node.exporter")

#: How often the exporter looks for results a later analysis replaced, and how long ago that
#: analysis may have been delivered (an exporter stopped meanwhile catches up).
REPLACED_EVERY_S = 5.0
REPLACED_WITHIN = dt.timedelta(days=2)
#: The most deliveries one pass takes (a destination's share goes in one send).
DUE_LIMIT = 500
#: Seconds between renewals of the deliveries an exporter is sending (see ``_claimed``).
CLAIM_RENEW_S = 10.0
#: How long :meth:`Exporter.run` waits, once stopped, for the sends still under way beyond
#: ``exporter.timeout_s`` (see :meth:`Exporter.stop_wait_s`).
STOP_WAIT_S = 5.0


def tls_args(dest: Destination) -> TlsArgs | None:
    """The TLS context and host name for a DIMSE destination; None for plain TCP.

    Built for every association, so renewed certificate files are used without a restart.
    """
    if dest.tls is None:
        return None
    return dest.tls.context(), dest.tls.server_name or dest.host or ""


def verify_destination(settings: Settings, dest: Destination) -> EchoResult:
    """Whether ``dest`` answers: a C-ECHO (DIMSE; with ``storage_commitment``, and whether
    it offers the Push Model) or a QIDO-RS query (DICOMweb); never raises (``acwi-node
    destinations check``, the dashboard's check button)."""
    timeout_s = settings.exporter.timeout_s
    if dest.kind == "dicomweb":
        return dicomweb.check(dest, timeout_s=timeout_s)
    assert dest.ae_title is not None and dest.host is not None and dest.port is not None
    try:
        tls = tls_args(dest)
    except TlsConfigError as exc:
        return EchoResult(False, error=f"TLS configuration: {exc}")
    return verify(
        dest.ae_title,
        dest.host,
        dest.port,
        dest.calling_ae(settings.node.ae_title),
        timeout_s=timeout_s,
        tls=tls,
        storage_commitment=dest.storage_commitment,
    )


def what_it_checks(dest: Destination) -> str:
    """The check :func:`verify_destination` makes, for people."""
    if dest.kind == "dicomweb":
        return "QIDO-RS"
    return "C-ECHO + storage commitment" if dest.storage_commitment else "C-ECHO"


def backoff_s(settings: Settings, attempts_so_far: int) -> float:
    """Seconds to wait before the next attempt after ``attempts_so_far + 1`` failures."""
    return settings.exporter.backoff_s(attempts_so_far)


class Exporter:
    """Drains the outbox."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self._stop = threading.Event()
        #: A ledger that is down logs a traceback, then a line a minute, not one a pass.
        self.failures = LoopFailures(log, "exporter pass")
        self._listener: WakeUpListener | None = None
        #: :meth:`run` is passing over the outbox (its sends do not hold up its passes).
        self._running = False
        self._committing = [
            d for d in settings.destinations if d.kind == "dimse" and d.storage_commitment
        ]
        #: Reports a destination sends on the request's own association (``commitment_linger_s``).
        self._reports = CommitmentReports(settings, ledger)
        #: Whether the results awaiting commitment from a destination that no longer asks for
        #: it have been delivered (on the first pass: the ledger may not answer yet here).
        self._settled = False
        #: ``time.monotonic()`` of the last finished pass (readiness: the loop is alive).
        self.last_pass: float | None = None
        #: When replaced results were last looked for; the jobs whose could not be withdrawn
        #: (their files deleted), not tried again by this process.
        self._replaced_at = -REPLACED_EVERY_S
        self._replaced_refused: set[int] = set()
        #: The sends under way, by destination (each in a thread of its own).
        self._sending: dict[str, threading.Thread] = {}
        self._sending_lock = threading.Lock()
        #: The exporter's ledger writes that may settle a job take turns: a job whose
        #: deliveries to two destinations end at once is settled from the last one's view.
        self._record_lock = threading.RLock()
        self._reports.lock = self._record_lock
        #: The deliveries being sent, and the claim each was taken under (in the ledger,
        #: :meth:`Ledger.claim_deliveries`, so that another exporter process does not send
        #: them too); guarded by ``_record_lock``, and renewed every :data:`CLAIM_RENEW_S`.
        self._claimed: dict[int, str] = {}
        #: Those of them another process has taken over (this one stalled past its claim: a
        #: send that hung, a pause of the process or its VM, a ledger outage): no longer
        #: renewed, and their outcome is not recorded over the other's.
        self._lost: set[int] = set()
        self._renewed_at = time.monotonic()

    def tick(self, *, wait: bool | None = None) -> int:
        """One pass: a send to each destination with due deliveries (and none under way),
        then the storage commitments to request; returns how many deliveries were taken and
        commitments requested. ``wait``: return once those sends have ended; by default
        only outside :meth:`run`, whose passes leave them going on in their threads."""
        if wait is None:
            wait = not self._running
        if not self._settled:
            with self._record_lock:
                ended = self.ledger.end_commitments([d.name for d in self._committing])
            if ended:
                log.warning(
                    "%d stored result(s) no longer wait for storage commitment (the destination"
                    " does not ask for it any more): delivered",
                    ended,
                )
            self._settled = True
        self._renew_claims()
        with self._sending_lock:
            busy = list(self._sending)
        due = self.ledger.due_deliveries(limit=DUE_LIMIT, exclude=busy)
        by_dest: dict[str, list[DueDelivery]] = defaultdict(list)
        claim = new_claim()
        with self._record_lock:
            taken = self.ledger.claim_deliveries(
                [d.id for d in due], lease_s=self._claim_s(), claim=claim
            )
            self._claimed.update(dict.fromkeys(taken, claim))
        for d in due:
            if d.id in taken:  # else another exporter process took it
                by_dest[d.destination].append(d)
        started: list[threading.Thread] = []
        for dest_name, items in by_dest.items():
            if wait and len(by_dest) == 1:
                self._send_guarded(dest_name, items)
                break
            thread = threading.Thread(
                target=self._send_then_wake,
                args=(dest_name, items),
                name=f"export-{dest_name}",
                daemon=True,
            )
            with self._sending_lock:
                self._sending[dest_name] = thread
            thread.start()
            started.append(thread)
        if wait:
            for thread in started:
                thread.join()
        return len(due) + self._request_commitments() + self._withdraw_replaced()

    def _claim_s(self) -> float:
        """How long a delivery taken for a send stays taken without a renewal: longer than
        a pass of the loop that renews it can take (a storage commitment request waits
        ``timeout_s``)."""
        return 3 * self.settings.exporter.timeout_s + 60.0

    def _by_claim(self, delivery_ids: Iterable[int]) -> dict[str, list[int]]:
        """Deliveries being sent, by the claim they were taken under (``_record_lock``
        held)."""
        grouped: dict[str, list[int]] = defaultdict(list)
        for delivery_id in sorted(delivery_ids):
            grouped[self._claimed[delivery_id]].append(delivery_id)
        return grouped

    def _renew_claims(self) -> None:
        """Every :data:`CLAIM_RENEW_S`: keep the deliveries being sent taken; those another
        process has taken over since this one's claim ran out are not renewed again."""
        now = time.monotonic()
        if now - self._renewed_at < CLAIM_RENEW_S:
            return
        self._renewed_at = now
        with self._record_lock:
            for claim, ids in self._by_claim(set(self._claimed) - self._lost).items():
                lost = set(ids) - self.ledger.renew_delivery_claims(
                    ids, lease_s=self._claim_s(), claim=claim
                )
                if lost:
                    self._lost |= lost
                    log.warning(
                        "%d delivery(ies) being sent were taken over by another exporter (this"
                        " one's claim ran out) or settled: their outcome here is not recorded",
                        len(lost),
                    )

    def _record(self, attempts: list[DeliveryAttempt]) -> None:
        """Record a send's attempts, each under the claim its delivery was taken with; its
        deliveries are no longer taken by this process. One another process has taken over
        meanwhile keeps that one's outcome (the objects it sent again are the same: the
        destination keeps one of each)."""
        with self._record_lock:
            # "" names no claim: a delivery this process does not hold is not recorded
            claimed = [replace(a, claim=self._claimed.pop(a.delivery_id, "")) for a in attempts]
            self._lost -= {a.delivery_id for a in attempts}
            recorded = self.ledger.record_deliveries(claimed)
        if len(recorded) < len(attempts):
            log.warning(
                "%d of %d attempt(s) not recorded: another exporter took those deliveries over"
                " after this one's claim ran out, or they were settled meanwhile",
                len(attempts) - len(recorded),
                len(attempts),
            )

    def _release(self, delivery_ids: list[int]) -> None:
        """Give back deliveries taken and not attempted (the send was stopped before their
        turn): due again at once, for the next exporter; not those another process has
        taken over since."""
        with self._record_lock:
            held = [i for i in delivery_ids if i in self._claimed]
            for claim, ids in self._by_claim(held).items():
                self.ledger.release_delivery_claims(ids, claim=claim)
            for delivery_id in delivery_ids:
                self._claimed.pop(delivery_id, None)
                self._lost.discard(delivery_id)

    def _send_then_wake(self, dest_name: str, items: list[DueDelivery]) -> None:
        """A destination's send in its own thread; then the loop looks again at once (the
        destination may have more results due)."""
        try:
            self._send_guarded(dest_name, items)
        finally:
            with self._sending_lock:
                self._sending.pop(dest_name, None)
            if self._running:
                wake_exporter(self.settings.data_dir)

    def _send_guarded(self, dest_name: str, items: list[DueDelivery]) -> None:
        """:meth:`_send`; what it raises is logged, and stops no other destination's send."""
        try:
            self._send(dest_name, items)
        except Exception:
            log.exception("sending to %s failed; its results are tried again", dest_name)
        finally:  # those not recorded are taken again once their claim runs out
            with self._record_lock:
                for d in items:
                    self._claimed.pop(d.id, None)
                    self._lost.discard(d.id)

    def _withdraw_replaced(self) -> int:
        """Every :data:`REPLACED_EVERY_S`: withdraw the results a later analysis by another
        model version replaced (``exporter.withdraw_replaced``); returns how many rejection
        notes were queued (sent on the next pass, at once)."""
        if not self.settings.exporter.withdraw_replaced:
            return 0
        now = time.monotonic()
        if now - self._replaced_at < REPLACED_EVERY_S:
            return 0
        self._replaced_at = now
        from acwi_node.export.withdrawal import withdraw_replaced

        with self._record_lock:  # it may settle jobs, as a send's outcome does
            outcomes = withdraw_replaced(
                self.settings,
                self.ledger,
                since=utcnow() - REPLACED_WITHIN,
                skip=self._replaced_refused,
            )
        for outcome in outcomes:
            if not outcome.withdrawn:
                self._replaced_refused.add(outcome.job_id)
                log.warning(
                    "job %d: its results, replaced by a later analysis, stay in the PACS: %s",
                    outcome.job_id,
                    outcome.error,
                )
        return sum(o.queued for o in outcomes)

    def _request_commitments(self) -> int:
        """Ask each destination with ``storage_commitment`` to commit what it stored and has
        not reported on (never asked, or asked ``commitment_wait_s`` ago); not while results
        are being sent to it (a PACS may take one association at a time)."""
        asked = 0
        with self._sending_lock:
            sending = set(self._sending)
        for dest in self._committing:
            if dest.name in sending:
                continue
            claim = new_claim()
            with self._record_lock:
                due = self.ledger.commitments_due(
                    dest.name,
                    wait_s=dest.commitment_wait_s,
                    max_requests=self.settings.exporter.max_attempts,
                    claim=claim,
                )
            for start in range(0, len(due), MAX_REFERENCES):
                self._request_commitment(dest, due[start : start + MAX_REFERENCES], claim)
            asked += len(due)
        return asked

    def _request_commitment(
        self, dest: Destination, items: list[AwaitedCommitment], claim: str
    ) -> None:
        """Ask ``dest`` to commit ``items``, taken under ``claim``: not those another process
        has taken since (this one stalled longer than ``commitment_wait_s``), nor its outcome
        for them."""
        assert dest.ae_title is not None and dest.host is not None and dest.port is not None
        transaction_uid = new_transaction_uid()
        # Recorded first: the report may come back before the request's answer does.
        with self._record_lock:
            ids = self.ledger.commitment_requested(
                [i.delivery_id for i in items], transaction_uid, claim=claim
            )
        if len(ids) < len(items):
            log.warning(
                "%d stored result(s) to ask %s to commit were taken by another exporter (this"
                " one's claim ran out): not asked for here",
                len(items) - len(ids),
                dest.name,
            )
            items = [i for i in items if i.delivery_id in set(ids)]
            if not items:
                return
        try:
            tls = tls_args(dest)
        except TlsConfigError as exc:
            result_error = f"TLS configuration of {dest.name!r}: {exc}"
            with self._record_lock:
                self.ledger.commitment_request_failed(ids, result_error, claim=claim)
            log.error("cannot ask %s for storage commitment: %s", dest.name, result_error)
            metrics.COMMITMENT_REQUESTS.labels(dest.name, "failed").inc()
            return
        result = request_commitment(
            commitment_request(transaction_uid, items),
            called_ae=dest.ae_title,
            host=dest.host,
            port=dest.port,
            calling_ae=dest.calling_ae(self.settings.node.ae_title),
            timeout_s=self.settings.exporter.timeout_s,
            tls=tls,
            linger_s=dest.commitment_linger_s,
            on_report=self._reports.handle_n_event_report,
        )
        if result.accepted:
            metrics.COMMITMENT_REQUESTS.labels(dest.name, "accepted").inc()
            with self._record_lock:
                self.ledger.commitment_request_answered(ids, claim=claim)
            log.info("asked %s to commit %d stored result(s)", dest.name, len(items))
            return
        metrics.COMMITMENT_REQUESTS.labels(dest.name, "failed").inc()
        with self._record_lock:
            self.ledger.commitment_request_failed(
                ids,
                result.error,
                unreachable=result.unreachable,
                outage_patience_s=self.settings.exporter.outage_patience_s,
                claim=claim,
            )
        log.warning(
            "storage commitment request to %s for %d result(s) failed: %s (asked again in %g s)",
            dest.name,
            len(items),
            result.error,
            dest.commitment_wait_s,
        )

    def _fail_all(self, items: list[DueDelivery], error: str, *, final: bool) -> None:
        """Record a failed attempt for every item (``final``: no further attempts)."""
        attempts = [
            DeliveryAttempt(
                d.id,
                delivered=False,
                status=None,
                error=error,
                max_attempts=1 if final else self.settings.exporter.max_attempts,
                backoff_s=0 if final else backoff_s(self.settings, d.attempts),
            )
            for d in items
        ]
        self._record(attempts)

    def _send(self, dest_name: str, items: list[DueDelivery]) -> None:
        cfg = self.settings.exporter
        try:
            dest = self.settings.destination(dest_name)
        except KeyError:
            self._fail_all(items, f"destination {dest_name!r} is no longer configured", final=True)
            return
        root = self.settings.results_dir
        paths = {d.id: root / d.path for d in items}
        files = list(dict.fromkeys(paths.values()))
        try:
            report = self._send_files(dest, files)
        except TlsConfigError as exc:  # a certificate file went missing since start-up
            self._fail_all(items, f"TLS configuration of {dest_name!r}: {exc}", final=False)
            log.error("cannot send to %s: %s", dest_name, exc)
            return
        except Exception as exc:  # a fault of the node's: counted, so never sent in a loop
            log.exception("sending to %s failed", dest_name)
            self._fail_all(items, f"the exporter failed: {type(exc).__name__}: {exc}", final=False)
            return
        delivered = 0
        commit = dest.kind == "dimse" and dest.storage_commitment
        attempts: list[DeliveryAttempt] = []
        withheld = [d for d in items if paths[d.id] in report.withheld]
        if withheld:  # stopping: no attempt was made; the next exporter sends them at once
            self._release([d.id for d in withheld])
            log.info(
                "stopping: %d object(s) for %s not sent, left for the next exporter",
                len(withheld),
                dest_name,
            )
            items = [d for d in items if paths[d.id] not in report.withheld]
            if not items:
                return
        for d in items:
            path: Path = paths[d.id]
            outcome = report.outcomes.get(path)
            # nothing answered, or the destination went away in the middle (the association
            # was lost, and a new one could not reach it): an outage; a file that could not
            # be read is no fault of the destination's
            if outcome is None:
                unreachable = report.unreachable
            else:
                unreachable = not outcome.unreadable and (
                    outcome.unreachable or (report.unreachable and not outcome.delivered)
                )
            if outcome is None:
                ok, status, detail = False, None, report.error or "not sent"
            else:
                ok, status, detail = outcome.delivered, outcome.status, outcome.detail
                if not ok and report.error and not detail:
                    detail = report.error
            delivered += ok
            metrics.DELIVERY_ATTEMPTS.labels(
                dest_name, "delivered" if ok else ("unreachable" if unreachable else "refused")
            ).inc()
            attempts.append(
                DeliveryAttempt(
                    d.id,
                    delivered=ok,
                    status=status,
                    error="" if ok else detail,
                    max_attempts=cfg.max_attempts,
                    backoff_s=backoff_s(self.settings, d.attempts + d.outage_attempts),
                    awaits_commitment=commit,
                    unreachable=unreachable,
                    outage_patience_s=cfg.outage_patience_s,
                )
            )
        if attempts:
            self._record(attempts)
        self._audit_sent(dest, items, paths, report)
        if delivered == len(items):
            log.info(
                "sent %d object(s) to %s%s",
                delivered,
                dest_name,
                ", awaiting its storage commitment" if commit else "",
            )
        else:
            log.warning(
                "sent %d of %d object(s) to %s: %s",
                delivered,
                len(items),
                dest_name,
                report.error or "some were refused",
            )

    def _send_files(self, dest: Destination, files: list[Path]) -> SendReport:
        """C-STORE or STOW-RS, as ``dest`` takes them (raises TlsConfigError)."""
        timeout_s = self.settings.exporter.timeout_s
        if dest.kind == "dicomweb":
            if dest.tls is not None:
                dest.tls.context()  # a certificate file went missing: raises as for DIMSE
            return dicomweb.stow_files(files, dest, timeout_s=timeout_s, stop=self._stop)
        assert dest.ae_title is not None and dest.host is not None and dest.port is not None
        return send_files(
            files,
            called_ae=dest.ae_title,
            host=dest.host,
            port=dest.port,
            calling_ae=dest.calling_ae(self.settings.node.ae_title),
            timeout_s=timeout_s,
            tls=tls_args(dest),
            associations=dest.associations,
            stop=self._stop,
        )

    @staticmethod
    def _audit_sent(
        dest: Destination, items: list[DueDelivery], paths: dict[int, Path], report: SendReport
    ) -> None:
        """One audit record per study: how many of its objects the destination took."""
        sent: dict[str, int] = defaultdict(int)
        failed: dict[str, int] = defaultdict(int)
        for d in items:
            outcome = report.outcomes.get(paths[d.id])
            if outcome is not None and outcome.delivered:
                sent[d.study_uid] += 1
            else:
                failed[d.study_uid] += 1
        if dest.kind == "dicomweb":
            peer = remote_ae(dest.name, dest.url or "", requestor=False)
        else:
            peer = remote_ae(dest.ae_title or dest.name, dest.host or "", requestor=False)
        for study_uid in sorted(set(sent) | set(failed)):
            detail = f"{sent[study_uid]} object(s) stored by {dest.name}"
            if failed[study_uid]:
                detail += f", {failed[study_uid]} not: {report.error or 'refused'}"
            audit(
                AuditEvent.RESULTS_SENT,
                outcome=Outcome.MINOR_FAILURE if failed[study_uid] else Outcome.SUCCESS,
                participants=[peer],
                study_uids=[study_uid],
                instances={study_uid: sent[study_uid]},
                detail=detail,
            )

    def run(self) -> None:
        """Pass over the outbox until stopped; between passes with nothing to send, wait for
        ``poll_interval_s`` or a worker's wake-up (:mod:`.wakeup`), whichever comes first."""
        listener = WakeUpListener(self.settings.data_dir)
        self._listener = listener
        self._running = True
        try:
            while not self._stop.is_set():
                try:
                    busy = self.tick()
                except Exception:
                    self.failures.failed()
                    busy = 0
                else:
                    self.failures.worked()
                    self.last_pass = time.monotonic()
                if not busy and not self._stop.is_set():
                    wait_s = self.failures.wait_s(self.settings.exporter.poll_interval_s)
                    if listener.listening:
                        listener.wait(wait_s)
                    else:
                        self._stop.wait(wait_s)
        finally:
            self._listener = None
            listener.close()
            self._wait_for_sends(self.stop_wait_s())
            self._running = False

    def stop_wait_s(self) -> float:
        """How long :meth:`run` waits, once stopped, for the sends under way to end. A send
        stopped starts no further C-STORE or STOW-RS request, and one sent before is answered,
        or its association aborted, within ``exporter.timeout_s``: its outcome is recorded,
        and what was not sent given back, before the process exits (which it could not do
        sooner: an association still open holds it)."""
        return self.settings.exporter.timeout_s + STOP_WAIT_S

    def _wait_for_sends(self, timeout_s: float) -> None:
        """Let the sends under way end (their outcomes recorded), for ``timeout_s`` at most:
        one cut off is sent again by the next exporter, as after a crash."""
        deadline = time.monotonic() + timeout_s
        with self._sending_lock:
            threads = list(self._sending.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            wake_exporter(self.settings.data_dir)  # out of its wait now
