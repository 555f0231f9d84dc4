"""Results to a DICOMweb service: STOW-RS (PS3.18 10.5), and a QIDO-RS query as its check.

A destination with a ``url`` gets a study's result objects by ``POST {url}/studies``,
``multipart/related; type="application/dicom"`` bodies streamed from the result files: split
evenly over ``associations`` requests at once (each on its own connection), and into more
requests where a share would exceed ``request_max_bytes``. Each object's outcome comes from the
response (PS3.18 Table 10.5.3-1 and 10.5.3-2):

* ``200 OK``: every object stored (the body, when there is one, is not needed);
* ``202 Accepted``, ``409 Conflict``: the Referenced SOP Sequence lists the objects stored (a
  Warning Reason with a warning), the Failed SOP Sequence those not stored, with a Failure
  Reason (a DIMSE status: 0xA700 out of resources, 0xC000 cannot understand, ...);
* any other status (``400``, ``401``, ``403``, ``413``, ``415``, ``5xx``): no object stored,
  the status and the server's reason in the error.

Nothing here raises: :func:`stow_files` returns the same :class:`~acwi_node.export.scu.SendReport`
as the DIMSE sender, so the outbox records, retries and audits both alike. Credentials (HTTP
Basic from ``username`` and ``password_file``, or a bearer token from ``token_file``; a proxy's
Basic from ``proxy_username`` and ``proxy_password_file``) are read for every call, so a renewed
password or token is used without a restart, and they never reach a log line.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from pydicom import dcmread

from acwi_node.config import Destination, Source
from acwi_node.export.scu import (
    DELIVERED_WARNING_STATUSES,
    EchoResult,
    FileOutcome,
    SendReport,
    tls_refused,
)
from acwi_node.http_client import connect, request_target, target_of

log = logging.getLogger("acwi_node.exporter")

__all__ = ["CheckResult", "DicomwebError", "check", "get", "parse_stow_response", "stow_files"]

#: A DICOMweb peer: a destination the node stores results on, or a source it reads studies from.
Service = Destination | Source

DICOM_JSON = "application/dicom+json"
#: Tags of the STOW-RS response (PS3.18 Table 10.5.3-2).
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

CheckResult = EchoResult


class _Failed(Exception):
    """A request that got no usable answer (connection, TLS, timeout, unreadable reply);
    ``refused``: the TLS handshake was refused (:func:`~acwi_node.export.scu.tls_refused`),
    an answer of the configuration's making, not an outage."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def _basic(username: str, password_file: Path) -> str:
    password = password_file.expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _credentials(dest: Service) -> tuple[dict[str, str], dict[str, str]]:
    """The headers of each request and those of a proxy's CONNECT, read from ``dest``'s
    files now (raises OSError): the service's ``Authorization``; the proxy's
    ``Proxy-Authorization`` on the CONNECT of an ``https`` URL, or on each request of an
    ``http`` one (which the proxy itself receives), never inside a tunnel to the service."""
    request: dict[str, str] = {}
    tunnel: dict[str, str] = {}
    if dest.token_file is not None:
        token = dest.token_file.expanduser().read_text(encoding="utf-8").strip()
        request["Authorization"] = f"Bearer {token}"
    elif dest.username is not None and dest.password_file is not None:
        request["Authorization"] = _basic(dest.username, dest.password_file)
    if dest.proxy_username is not None and dest.proxy_password_file is not None:
        proxy_auth = _basic(dest.proxy_username, dest.proxy_password_file)
        assert dest.url is not None
        if urlsplit(dest.url).scheme == "https":
            tunnel["Proxy-Authorization"] = proxy_auth
        else:
            request["Proxy-Authorization"] = proxy_auth
    return request, tunnel


def _sop_instance_uid(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


def _batches(
    files: Sequence[tuple[Path, int]], max_bytes: int, parts: int = 1
) -> Iterator[list[Path]]:
    """``files`` in ``parts`` consecutive shares of about equal bytes (each file goes to the
    share its middle byte falls in), each share in runs of at most ``max_bytes`` (an object
    larger goes alone)."""
    parts = max(1, parts)
    total = sum(length for _, length in files)
    shares: list[list[tuple[Path, int]]] = [[] for _ in range(parts)]
    offset = 0
    for path, length in files:
        share = int((offset + length / 2) * parts / total) if total else 0
        shares[min(parts - 1, share)].append((path, length))
        offset += length
    for share_files in shares:
        batch: list[Path] = []
        size = 0
        for path, length in share_files:
            if batch and size + length > max_bytes:
                yield batch
                batch, size = [], 0
            batch.append(path)
            size += length
        if batch:
            yield batch


#: Bytes of an object read at a time while a request is sent (objects are streamed from their
#: files, not held in memory).
_CHUNK = 1 << 20


def _multipart(files: Sequence[BinaryIO], boundary: str) -> tuple[Iterator[bytes], int]:
    """The body, streamed from the open ``files``, and its length."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    tail = f"--{boundary}--\r\n".encode("ascii")
    sizes = [os.fstat(f.fileno()).st_size for f in files]
    length = sum(len(head) + size + 2 for size in sizes) + len(tail)

    def pieces() -> Iterator[bytes]:
        for f, size in zip(files, sizes, strict=True):
            yield head
            left = size
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{f.name}: shorter than its size when the request began")
                left -= len(chunk)
                yield chunk
            yield b"\r\n"
        yield tail

    return pieces(), length


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return value if isinstance(value, list) else []


def _code(value: Any) -> int | None:
    """A Warning or Failure Reason as the response gives it: a number, or its decimal digits
    in a string (Orthanc's DICOMweb plugin); None for anything else (not given)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 0xFFFF else None
    if isinstance(value, str) and value.strip().isdigit() and int(value) <= 0xFFFF:
        return int(value)
    return None


def parse_stow_response(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(stored, failed) from a STOW-RS response body (``application/dicom+json``): SOP Instance
    UID -> Warning Reason (None: none) for the stored objects, -> Failure Reason (None: not
    given, or not a number) for those not stored. Raises ValueError when the body is not such
    a response (JSON nested too deep for the parser included)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    if isinstance(data, list):  # some servers wrap the data set in an array
        data = data[0] if data else {}
    if not isinstance(data, dict):
        raise ValueError("not a DICOM JSON data set")
    found: list[dict[str, int | None]] = []
    for sequence, reason in (
        (_REFERENCED_SOP_SEQUENCE, _WARNING_REASON),
        (_FAILED_SOP_SEQUENCE, _FAILURE_REASON),
    ):
        out: dict[str, int | None] = {}
        for item in _values(data, sequence):
            if not isinstance(item, dict):
                continue
            uids = _values(item, _SOP_INSTANCE_UID)
            if not uids or not isinstance(uids[0], str):
                continue
            reasons = _values(item, reason)
            out[uids[0]] = _code(reasons[0]) if reasons else None
        found.append(out)
    return found[0], found[1]


def _reason(response: http.client.HTTPResponse, body: bytes) -> str:
    text = body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
    detail = f": {text}" if text and not text.startswith("{") else ""
    # a redirect is not followed (the body would have to be sent again, and credentials could
    # go to another host): where it points is what the destination's url should say
    location = response.getheader("Location") if 300 <= response.status < 400 else None
    moved = f" to {location[:200]}" if location else ""
    return f"HTTP {response.status} {response.reason}{moved}{detail}"


def _post(
    conn: http.client.HTTPConnection,
    url: str,
    headers: dict[str, str],
    files: Sequence[BinaryIO],
) -> tuple[http.client.HTTPResponse, bytes]:
    boundary = secrets.token_hex(16)
    pieces, length = _multipart(files, boundary)
    request_headers = {
        **headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": DICOM_JSON,
    }
    try:
        try:
            conn.request("POST", url, body=pieces, headers=request_headers)
        except OSError as sending:
            # A server or proxy may answer before it has read the body (401, 407, 413) and
            # close the connection: that answer, if it came, says more than the broken pipe.
            if conn.sock is None:  # never connected
                raise
            try:
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                raise sending from None
            conn.close()
            return response, body
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise _Failed(f"{type(exc).__name__}: {exc}", refused=tls_refused(exc)) from None
    return response, body


def _outcomes(
    response: http.client.HTTPResponse, body: bytes, uids: dict[Path, str]
) -> tuple[dict[Path, FileOutcome], str | None]:
    """Each object's outcome from one response, and the request's error (if it had one)."""
    status = response.status
    if status == 200:
        # Every object stored (PS3.18 10.5.3); the body, if any, is not needed, but a
        # service that answers 200 to a partial success (earlier versions of Orthanc's
        # DICOMweb plugin always answered 200) names in its Failed SOP Sequence what it did
        # not store: those stay in the outbox.
        try:
            _, failed = parse_stow_response(body) if body.strip() else ({}, {})
        except (ValueError, UnicodeDecodeError):
            failed = {}
        if not any(uid in failed for uid in uids.values()):
            return {p: FileOutcome(0x0000, True, "stored (STOW-RS 200)") for p in uids}, None
        stored: dict[str, int | None] = {uid: None for uid in uids.values() if uid not in failed}
    elif status not in (202, 409):
        error = _reason(response, body)
        return {p: FileOutcome(None, False, error) for p in uids}, error
    else:
        try:
            stored, failed = parse_stow_response(body)
        except (ValueError, UnicodeDecodeError) as exc:
            error = f"HTTP {status}: unreadable STOW-RS response ({exc})"
            return {p: FileOutcome(None, False, error) for p in uids}, error
    outcomes: dict[Path, FileOutcome] = {}
    for path, uid in uids.items():
        if uid in failed:  # named in both sequences: not stored
            reason = failed[uid]
            text = f"0x{reason:04X}" if reason is not None else "no reason given"
            outcomes[path] = FileOutcome(reason, False, f"not stored (STOW-RS {status}): {text}")
        elif uid in stored:
            warning = stored[uid]
            if warning is None:
                outcomes[path] = FileOutcome(0x0000, True, f"stored (STOW-RS {status})")
            else:
                meaning = DELIVERED_WARNING_STATUSES.get(warning, "warning")
                outcomes[path] = FileOutcome(
                    warning, True, f"stored with warning 0x{warning:04X} ({meaning})"
                )
        else:
            outcomes[path] = FileOutcome(
                None, False, f"STOW-RS {status}: the response does not name this object"
            )
    return outcomes, None


def stow_files(
    paths: Sequence[Path],
    dest: Destination,
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> SendReport:
    """Store ``paths`` (Part 10 files) at the DICOMweb destination ``dest``; never raises.
    Once ``stop`` is set no further request is started: the files in none yet are left in
    the report's ``withheld``."""
    assert dest.url is not None, "stow_files needs a DICOMweb destination"
    report = SendReport(association_ok=False)
    unique = list(dict.fromkeys(paths))
    readable: list[tuple[Path, int]] = []
    uids: dict[Path, str] = {}
    for path in unique:
        try:
            length = path.stat().st_size
            uids[path] = _sop_instance_uid(path)
        except Exception as exc:  # noqa: BLE001 - one unreadable file never blocks the rest
            report.outcomes[path] = FileOutcome(None, False, f"unreadable: {exc}", unreadable=True)
            continue
        readable.append((path, length))
    errors: list[str] = []
    headers: dict[str, str] = {}
    tunnel_headers: dict[str, str] = {}
    try:
        headers, tunnel_headers = _credentials(dest)
    except OSError as exc:
        report.error = f"cannot read the destination's credentials: {exc.strerror or exc}"
        readable = []  # nothing is sent; every object waits for the next attempt
    target = target_of(dest.url)
    studies_url = request_target(dest, target, "/studies")
    batches = queue.SimpleQueue[list[Path]]()
    for batch in _batches(readable, dest.request_max_bytes, dest.associations):
        batches.put(batch)
    lock = threading.Lock()
    attempted: set[Path] = set()  # in a request that was sent
    used = [0]
    unanswered = [False]  # a request got no HTTP answer at all
    gone = [False]  # after one went unanswered, the service could not be reached again

    def reachable() -> bool:
        """Whether a new connection reaches the service (or its proxy)."""
        try:
            probe = connect(dest, target, timeout_s, tunnel_headers)
        except (OSError, ValueError):  # the TLS files went missing meanwhile
            return True  # a configuration problem, not an outage
        try:
            probe.connect()
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def send_batches() -> None:
        """One connection's share: batches until none is left, or the service is gone. A
        request without an answer (the service restarted, the connection was cut) is not
        sent again in this call; the next goes over a new connection, and when that one
        gets no answer either (or none can be made) the service went away: what is left,
        and what was not answered, waits out the outage."""
        try:
            conn = connect(dest, target, timeout_s, tunnel_headers)
        except (OSError, ValueError) as exc:  # the TLS files went missing since start-up
            with lock:
                report.error = report.error or f"TLS configuration: {exc}"
            return
        answered = False
        lost = False  # the last request got no answer
        try:
            while True:
                if stop is not None and stop.is_set():
                    return
                try:
                    batch = batches.get_nowait()
                except queue.Empty:
                    if lost and not reachable():
                        with lock:
                            gone[0] = True
                    return
                with contextlib.ExitStack() as opened:
                    files: list[BinaryIO] = []
                    sent: list[Path] = []
                    for path in batch:  # open now: a file removed meanwhile is still read
                        try:
                            files.append(opened.enter_context(path.open("rb")))
                        except OSError as exc:
                            with lock:
                                report.outcomes[path] = FileOutcome(
                                    None, False, f"unreadable: {exc}", unreadable=True
                                )
                            continue
                        sent.append(path)
                    if not sent:
                        continue
                    with lock:
                        attempted.update(sent)
                    try:
                        response, body = _post(conn, studies_url, headers, files)
                    except _Failed as exc:
                        with lock:
                            report.error = report.error or str(exc)
                        if exc.refused:  # TLS refused: no outage, no use asking again now
                            return
                        with lock:
                            unanswered[0] = True
                            if lost:  # twice in a row: the service went away
                                gone[0] = True
                        if lost or not answered:
                            return  # unreachable: what is left waits for the next attempt
                        lost = True
                        try:
                            conn = connect(dest, target, timeout_s, tunnel_headers)
                        except (OSError, ValueError):  # the TLS files went missing meanwhile
                            return
                        continue
                lost = False
                outcomes, error = _outcomes(response, body, {p: uids[p] for p in sent})
                with lock:
                    report.association_ok = True
                    report.outcomes.update(outcomes)
                    if error:
                        errors.append(error)
                    if not answered:
                        answered = True
                        used[0] += 1
        finally:
            conn.close()

    def send_guarded() -> None:
        """:func:`send_batches`, whatever it raises told as the error (nothing here may end
        the exporter's pass; what was not answered waits for the next attempt)."""
        try:
            send_batches()
        except Exception as exc:  # noqa: BLE001 - a bug or an answer nobody foresaw
            log.error("STOW-RS to %s failed: %s", dest.name, type(exc).__name__, exc_info=True)
            with lock:
                report.error = report.error or f"STOW-RS failed: {type(exc).__name__}: {exc}"

    workers = min(dest.associations, batches.qsize())
    if workers <= 1:
        send_guarded()
    else:  # several requests at once, each connection taking the next batch
        threads = [
            threading.Thread(target=send_guarded, name=f"stow-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    report.associations = used[0]
    # no answer to any request: the service could not be reached (an outage)
    report.unreachable = unanswered[0] and not report.association_ok
    if report.error is None and errors:
        report.error = errors[0]
    if stop is not None and stop.is_set():
        report.withheld = {p for p, _ in readable if p not in attempted}
    for path in unique:  # in input order, as the DIMSE sender gives them
        report.outcomes.setdefault(
            path,
            FileOutcome(
                None,
                False,
                report.error or "not sent",
                unreachable=gone[0] and report.association_ok,
            ),
        )
    report.outcomes = {p: report.outcomes[p] for p in unique}
    return report


def check(dest: Service, *, timeout_s: float) -> CheckResult:
    """Ask the DICOMweb service for one study (QIDO-RS, ``GET {url}/studies?limit=1``): it is
    reachable and takes the node's credentials when it answers 200 or 204. Never raises."""
    assert dest.url is not None, "check needs a DICOMweb service"
    started = time.monotonic()
    try:
        headers, tunnel_headers = _credentials(dest)
    except OSError as exc:
        return CheckResult(False, error=f"cannot read the credentials: {exc.strerror or exc}")
    target = target_of(dest.url)
    try:
        conn = connect(dest, target, timeout_s, tunnel_headers)
    except (OSError, ssl.SSLError) as exc:
        return CheckResult(False, error=f"TLS configuration: {exc}")
    try:
        conn.request(
            "GET",
            request_target(dest, target, "/studies?limit=1"),
            headers={**headers, "Accept": DICOM_JSON},
        )
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return CheckResult(False, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    if response.status in (200, 204):
        return CheckResult(True, elapsed_ms=1000 * (time.monotonic() - started))
    return CheckResult(False, error=_reason(response, body))


class DicomwebError(Exception):
    """A request that got no answer: the credentials unreadable, the TLS configuration, the
    connection, a timeout (the message says which)."""


def get(
    service: Service,
    path: str,
    *,
    accept: str,
    timeout_s: float,
    sink: BinaryIO | int | None = None,
    max_bytes: int | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> tuple[int, str, bytes]:
    """``GET {url}{path}`` with the service's credentials, proxy and TLS: the status, the
    Content-Type and the body. With ``sink`` (a binary file or a file descriptor) the body of a
    ``200`` is streamed there instead (``b""`` returned), ``on_chunk`` called for each MiB;
    past ``max_bytes`` it raises :class:`DicomwebError`. Raises :class:`DicomwebError` when no
    answer came."""
    assert service.url is not None, "get needs a DICOMweb service"
    try:
        headers, tunnel_headers = _credentials(service)
    except OSError as exc:
        raise DicomwebError(f"cannot read the credentials: {exc.strerror or exc}") from None
    target = target_of(service.url)
    try:
        conn = connect(service, target, timeout_s, tunnel_headers)
    except (OSError, ssl.SSLError) as exc:
        raise DicomwebError(f"TLS configuration: {exc}") from None
    try:
        conn.request(
            "GET", request_target(service, target, path), headers={**headers, "Accept": accept}
        )
        response = conn.getresponse()
        content_type = response.getheader("Content-Type", "") or ""
        if sink is None or response.status != 200:
            return response.status, content_type, response.read()
        received = 0
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise DicomwebError(f"the response is larger than {max_bytes} bytes")
            if on_chunk is not None:
                on_chunk()
            if isinstance(sink, int):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(sink, view) :]
            else:
                sink.write(chunk)
        return response.status, content_type, b""
    except (OSError, http.client.HTTPException) as exc:
        raise DicomwebError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def reason(status: int, body: bytes) -> str:
    """An HTTP status and the start of a plain-text body, for an error message."""
    text = body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
    detail = f": {text}" if text and not text.startswith("{") else ""
    phrase = http.client.responses.get(status, "")
    return f"HTTP {status} {phrase}".rstrip() + detail
