"""The audit trail: JSON lines in a local file and, optionally, DICOM audit messages over syslog.

Every process kind calls :func:`configure_audit` at start-up (``acwi-node`` does it next to the
log set-up) and then :func:`audit` where something auditable happens. Writing never raises and
never blocks the DICOM path for long: the file gets one ``write`` per record (``O_APPEND``, so
several processes can share it), and syslog messages go through a bounded queue to a sender
thread that reconnects after failures.

The trail is not the log: it is meant for the people who answer "who sent, received, viewed and
decided what, when". It holds Study Instance UIDs, AE titles, user names and addresses; patient
IDs only with ``audit.patient_id``; never patient names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from acwi_node.audit.atna import audit_message_xml, syslog_frame
from acwi_node.audit.events import (
    DICOM_CODES,
    AuditEvent,
    AuditRecord,
    Outcome,
    Participant,
)
from acwi_node.config import Settings

log = logging.getLogger("acwi_node.audit")


class JsonLinesSink:
    """Appends one JSON object per line to a file created with mode 0600.

    The file is re-opened when it was rotated away (its inode changed), so ``logrotate``'s
    ``create`` and ``copytruncate`` both work.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._inode = -1

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._inode = os.fstat(self._fd).st_ino

    def write(self, line: bytes) -> None:
        with self._lock:
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -2
            if self._fd < 0 or current != self._inode:
                if self._fd >= 0:
                    # Marked closed before the file is opened again: should that fail (a file
                    # the node may not open, a file system remounted read-only), the number
                    # is free, and the next file the process opens (the ledger, a spool file)
                    # may take it; the next write must not close it or write into it.
                    fd, self._fd = self._fd, -1
                    os.close(fd)
                self._open()
            written = os.write(self._fd, line)
            if written < len(line):
                self._cut_back(written)
                raise OSError(
                    errno.ENOSPC, f"the audit file took {written} of a record's {len(line)} bytes"
                )

    def _cut_back(self, written: int) -> None:
        """Remove the ``written`` bytes of a record cut short (a full disk takes part of a
        write without an error): left there, the next record appended, by any process, once
        there is room again would share its line, and neither could be read. Left alone if
        another process appended after it meanwhile."""
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: the end of this write
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == end:
                os.ftruncate(self._fd, end - written)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1  # released even if close() reports an error
                os.close(fd)


class SyslogSink:
    """Sends RFC 5424 messages to a collector: ``udp://`` (RFC 5426), ``tcp://`` (RFC 6587
    octet counting) or ``tls://`` (RFC 5425), from a background thread."""

    QUEUE_LIMIT = 10_000
    #: The largest message sent in one UDP datagram (what common collectors take whole, as
    #: rsyslog's default ``maxMessageSize``); a larger record goes as several messages, each
    #: naming some of its studies (:meth:`AuditTrail.write`).
    UDP_MESSAGE_LIMIT = 8192

    def __init__(self, url: str, *, tls_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (6514 if self.scheme == "tls" else 514)
        self.tls_context = tls_context
        self.dropped = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_LIMIT)
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="acwi-audit-syslog", daemon=True)
        self._thread.start()

    @property
    def message_limit(self) -> int | None:
        """The largest message this transport takes in one piece (None: no limit)."""
        return self.UDP_MESSAGE_LIMIT if self.scheme == "udp" else None

    def send(self, message: bytes) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            if self.dropped % 1000 == 1:  # the first, then every thousandth
                log.warning(
                    "audit: syslog to %s:%d is behind: %d message(s) not sent, queue full"
                    " (the audit file has them)",
                    self.host,
                    self.port,
                    self.dropped,
                )

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            return socket.socket(
                socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM
            )
        sock = socket.create_connection((self.host, self.port), timeout=5.0)
        if self.scheme == "tls":
            context = self.tls_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def _deliver(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.sendto(message, (self.host, self.port))
        else:
            self._sock.sendall(str(len(message)).encode() + b" " + message)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            message = self._queue.get()
            if message is None:
                return
            while True:
                try:
                    self._deliver(message)
                    backoff = 1.0
                    break
                except OSError as exc:
                    if exc.errno == errno.EMSGSIZE:  # never sendable: the next ones must go
                        self.dropped += 1
                        log.error(
                            "audit: a %d-byte message is too long for syslog to %s:%d, not"
                            " sent (the audit file has it): %s",
                            len(message),
                            self.host,
                            self.port,
                            exc,
                        )
                        break
                    log.warning("audit: syslog to %s:%d failed: %s", self.host, self.port, exc)
                    if self._sock is not None:
                        with contextlib.suppress(OSError):
                            self._sock.close()
                        self._sock = None
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

    def close(self, timeout_s: float = 2.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


class AuditTrail:
    """Where one process's audit records go."""

    def __init__(self, settings: Settings, kind: str) -> None:
        cfg = settings.audit
        self.cfg = cfg
        self.kind = kind
        self.node_ae = settings.node.ae_title
        self.hostname = socket.gethostname()
        self.source_id = f"{settings.node.ae_title}@{self.hostname}"
        self.file = JsonLinesSink(audit_file(settings))
        self.syslog = (
            SyslogSink(cfg.syslog_url, tls_context=cfg.syslog_context()) if cfg.syslog_url else None
        )

    def node(self) -> Participant:
        """The node's own process, as a participant."""
        return Participant("process", self.node_ae, self.hostname, requestor=False)

    def write(self, record: AuditRecord) -> None:
        event_id, event_type, action = DICOM_CODES[record.event]
        body: dict[str, Any] = {
            "time": record.at.isoformat(timespec="milliseconds"),
            "event": record.event.value,
            "outcome": record.outcome.name.lower(),
            "event_id": event_id.as_json(),
            "action": action,
            "source": {"id": self.source_id, "kind": self.kind, "pid": os.getpid()},
            "participants": [p.as_json() for p in record.participants],
        }
        if event_type is not None:
            body["event_type"] = event_type.as_json()
        if record.study_uids:
            body["study_uids"] = list(record.study_uids)
        if record.instances:
            body["instances"] = record.instances
        if record.patient_ids and self.cfg.patient_id:
            body["patient_ids"] = list(record.patient_ids)
        if record.detail:
            body["detail"] = record.detail
        line = json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            self.file.write(line.encode("utf-8"))
        finally:
            # A file that cannot take the record (a full data disk) keeps it from no collector.
            if self.syslog is not None:
                if not self.cfg.patient_id and record.patient_ids:
                    record = AuditRecord(**{**record.__dict__, "patient_ids": ()})
                for frame in self._syslog_frames(record, self.syslog.message_limit):
                    self.syslog.send(frame)

    def _frame(self, record: AuditRecord) -> bytes:
        xml = audit_message_xml(
            record, source_id=self.source_id, enterprise_site=self.cfg.enterprise_site
        )
        return syslog_frame(record, hostname=self.hostname, procid=os.getpid(), xml=xml)

    def _syslog_frames(self, record: AuditRecord, limit: int | None) -> list[bytes]:
        """The syslog message(s) of ``record``: one, or, where it is longer than ``limit``
        (a UDP datagram), one per group of its studies ("part 2 of 4" in the detail), each
        with its detail cut short if it still does not fit. The file keeps the record whole."""
        whole = self._frame(record)
        if limit is None or len(whole) <= limit:
            return [whole]
        uids = list(record.study_uids)
        parts = [record]
        size = len(uids)
        while size > 1:
            size = -(-size // 2)  # ceiling
            groups = [uids[i : i + size] for i in range(0, len(uids), size)]
            parts = [
                dataclasses.replace(
                    record,
                    study_uids=tuple(group),
                    instances={u: record.instances[u] for u in group if u in record.instances},
                    detail=f"{record.detail} (part {n} of {len(groups)})".lstrip(),
                )
                for n, group in enumerate(groups, 1)
            ]
            if all(len(self._frame(part)) <= limit for part in parts):
                break
        return [self._fitted(part, limit) for part in parts]

    def _fitted(self, record: AuditRecord, limit: int) -> bytes:
        """``record``'s message, its detail cut short (``...``) where it is longer than
        ``limit``: rebuilt, so that the message stays well-formed XML."""
        frame = self._frame(record)
        if len(frame) <= limit or not record.detail:
            return frame

        def cut(keep: int) -> bytes:
            return self._frame(dataclasses.replace(record, detail=record.detail[:keep] + "..."))

        low, high = 0, len(record.detail) - 1  # the longest start of the detail that fits
        while low < high:
            middle = (low + high + 1) // 2
            if len(cut(middle)) <= limit:
                low = middle
            else:
                high = middle - 1
        return cut(low)

    def close(self) -> None:
        self.file.close()
        if self.syslog is not None:
            self.syslog.close()


def audit_file(settings: Settings) -> Path:
    return (settings.audit.file or settings.data_dir / "audit" / "audit.jsonl").expanduser()


_TRAIL: dict[str, AuditTrail | None] = {"trail": None}


def configure_audit(settings: Settings, kind: str) -> AuditTrail | None:
    """Start this process's trail (replacing an earlier one); None when auditing is off."""
    close_audit()
    if not settings.audit.enabled:
        return None
    trail = AuditTrail(settings, kind)
    _TRAIL["trail"] = trail
    return trail


def close_audit() -> None:
    trail = _TRAIL["trail"]
    _TRAIL["trail"] = None
    if trail is not None:
        trail.close()


def audit(
    event: AuditEvent,
    *,
    outcome: Outcome = Outcome.SUCCESS,
    participants: Iterable[Participant] = (),
    study_uids: Iterable[str] = (),
    instances: dict[str, int] | None = None,
    patient_ids: Iterable[str] = (),
    detail: str = "",
    with_node: bool = True,
) -> None:
    """Record one event in this process's trail; does nothing when none is configured.

    The node's own process is added as a participant unless ``with_node`` is false.
    """
    trail = _TRAIL["trail"]
    if trail is None:
        return
    people = tuple(participants)
    if with_node:
        people += (trail.node(),)
    record = AuditRecord(
        event=event,
        outcome=outcome,
        participants=people,
        study_uids=tuple(study_uids),
        instances=dict(instances or {}),
        patient_ids=tuple(p for p in patient_ids if p),
        detail=detail,
    )
    try:
        trail.write(record)
    except Exception:  # an audit failure must not stop clinical work; it is logged loudly
        log.exception("audit: could not record %s", event.value)


def user(name: str, address: str = "") -> Participant:
    return Participant("user", name, address, requestor=True)


def command_operator() -> str:
    """Who runs a command: the operating-system account, as the audit trail names it."""
    try:
        return f"os:{getpass.getuser()}"[:64]
    except (KeyError, OSError):
        return "os:unknown"


def remote_ae(
    title: str, address: str = "", *, requestor: bool, tls_subject: str = ""
) -> Participant:
    return Participant("ae", title, address, requestor=requestor, tls_subject=tls_subject)


# --------------------------------------------------------------------- configuration changes
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def note_configuration(settings: Settings, kind: str) -> list[str]:
    """Compare the configuration with the one the node last ran with; audit a change.

    The last configuration is kept (mode 0600) beside the audit file. Returns the dotted names
    of the keys that changed (values are not recorded: they can hold host names and paths
    only, but nobody needs them in a trail). Processes starting at once take turns on a lock.
    """
    if not settings.audit.enabled:
        return []
    current = _flatten(settings.model_dump(mode="json"))
    digest = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()
    snapshot = audit_file(settings).parent / "last-configuration.json"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    lock_path = snapshot.with_suffix(".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            previous = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous.get("sha256") == digest:
            return []
        old: dict[str, Any] = previous.get("settings", {}) if previous else {}
        changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        tmp = snapshot.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"sha256": digest, "settings": current}, handle)
        os.replace(tmp, snapshot)
    names = changed if previous is not None else ["(first start)"]
    audit(
        AuditEvent.CONFIGURATION_CHANGED,
        detail=f"{kind}: configuration {digest[:12]}; changed: {', '.join(names)}",
    )
    return names
