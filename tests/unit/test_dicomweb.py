"""DICOMweb destinations (``acwi_node/export/dicomweb.py``): configuration, the STOW-RS request
and what each answer means for each object, against a real HTTP server on loopback that answers
as a test tells it to (Orthanc's own STOW-RS is in tests/integration/test_dicomweb_orthanc.py)."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from acwi_node.config import Destination
from acwi_node.export import dicomweb
from acwi_node.export.dicomweb import check, parse_stow_response, stow_files
from tests.support import write_secondary_capture
from tests.support.certs import make_pki
from tests.support.http_proxy import FakeProxy
from tests.support.ports import free_port

STUDY = generate_uid()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    parts: list[bytes] = field(default_factory=list)


Answer = Callable[[Seen], tuple[int, dict[str, Any] | bytes | None]]


class FakeService:
    """A DICOMweb service on loopback: records each request (the multipart parts split out)
    and answers with ``answer(seen)``: a status and a DICOM JSON body (or raw bytes, or none)."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.scheme = "https" if tls is not None else "http"
        self.seen: list[Seen] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                )
                content_type = self.headers.get("Content-Type", "")
                if "boundary=" in content_type:
                    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
                    for chunk in body.split(b"--" + boundary.encode())[1:-1]:
                        _, _, data = chunk.partition(b"\r\n\r\n")
                        seen.parts.append(data[:-2])  # the CRLF before the next boundary
                service.seen.append(seen)
                status, reply = service.answer(seen)
                payload = json.dumps(reply).encode() if isinstance(reply, dict) else reply or b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Iterator[Callable[..., FakeService]]:
    made: list[FakeService] = []

    def make(answer: Answer, tls: ssl.SSLContext | None = None) -> FakeService:
        made.append(FakeService(answer, tls))
        return made[-1]

    yield make
    for s in made:
        s.close()


def objects(tmp_path: Path, n: int, *, rows: int = 16) -> tuple[list[Path], list[str]]:
    paths, uids = [], []
    for i in range(n):
        uid = str(generate_uid())
        path = tmp_path / f"r{i}.dcm"
        write_secondary_capture(
            path,
            study_uid=STUDY,
            sop_instance_uid=uid,
            instance_number=i + 1,
            rows=rows,
            columns=rows,
        )
        paths.append(path)
        uids.append(uid)
    return paths, uids


def web(url: str, **extra: Any) -> Destination:
    return Destination(name="cloud", url=url, **extra)


def referenced(uid: str, warning: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed(uid: str, reason: int) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


# ------------------------------------------------------------------------ configuration
def test_a_destination_is_a_dicom_node_or_a_dicomweb_service(tmp_path: Path) -> None:
    node = Destination(name="pacs", ae_title="PACS", host="pacs.local", port=104)
    assert (node.kind, node.where) == ("dimse", "PACS@pacs.local:104")
    cloud = web("https://dicomweb.example/dicom-web")
    assert (cloud.kind, cloud.where) == ("dicomweb", "https://dicomweb.example/dicom-web")
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    token = tmp_path / "token"
    token.write_text("abc")
    bad: list[dict[str, Any]] = [
        {"ae_title": "PACS", "host": "h"},  # no port
        {"url": "https://x/dicom-web", "host": "h"},  # both kinds
        {"url": "ftp://x/dicom-web"},
        {"url": "https://user:pw@x/dicom-web"},  # credentials in the URL
        {"url": "https://x/dicom-web?x=1"},
        {"url": "https://x/dicom-web", "username": "u"},  # no password_file
        {
            "url": "https://x/dicom-web",
            "username": "u",
            "password_file": secret,
            "token_file": token,
        },
        {"url": "https://x/dicom-web", "token_file": tmp_path / "missing"},
        {"url": "http://x/dicom-web", "tls": {}},  # TLS options for plain HTTP
        {"ae_title": "PACS", "host": "h", "port": 104, "token_file": token},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            Destination(name="d", **fields)
    Destination(name="d", url="https://x/dicom-web", username="u", password_file=secret)
    Destination(name="d", url="https://x/dicom-web", token_file=token)


# ----------------------------------------------------------------------------- response
def test_a_stow_response_names_what_was_stored_and_what_was_not() -> None:
    body = {
        "00081199": {"vr": "SQ", "Value": [referenced("1.2.1"), referenced("1.2.2", 0xB000)]},
        "00081198": {"vr": "SQ", "Value": [failed("1.2.3", 0xA700)]},
    }
    stored, not_stored = parse_stow_response(json.dumps(body).encode())
    assert stored == {"1.2.1": None, "1.2.2": 0xB000}
    assert not_stored == {"1.2.3": 0xA700}
    assert parse_stow_response(json.dumps([body]).encode()) == (stored, not_stored)
    assert parse_stow_response(b"{}") == ({}, {})
    for garbage in (b"<html>", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises((ValueError, UnicodeDecodeError)):
            parse_stow_response(garbage)


# -------------------------------------------------------------------------------- sending
def test_every_object_goes_in_one_multipart_request_and_200_stores_them_all(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    paths, _ = objects(tmp_path, 3)
    fake = service(lambda seen: (200, None))
    report = stow_files(paths, web(fake.url, associations=1), timeout_s=10)
    assert report.error is None and report.association_ok
    assert [o.delivered for o in report.outcomes.values()] == [True, True, True]
    assert list(report.outcomes) == paths
    (request,) = fake.seen
    assert (request.method, request.path) == ("POST", "/dicom-web/studies")
    assert request.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert request.headers["accept"] == "application/dicom+json"
    assert "authorization" not in request.headers
    assert request.parts == [p.read_bytes() for p in paths]


def test_results_go_over_several_connections_at_once(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    """``associations`` requests at once, the results split evenly between them: the service
    answers neither request until both have arrived (a barrier), so sent one after the other
    they would fail."""
    paths, _ = objects(tmp_path, 4)
    both = threading.Barrier(2, timeout=10)

    def answer(seen: Seen) -> tuple[int, None]:
        both.wait()
        return 200, None

    fake = service(answer)
    report = stow_files(paths, web(fake.url, associations=2), timeout_s=20)
    assert report.error is None and report.associations == 2
    assert all(o.delivered for o in report.outcomes.values())
    assert sorted(len(s.parts) for s in fake.seen) == [2, 2]
    sent = sorted(part for s in fake.seen for part in s.parts)
    assert sent == sorted(p.read_bytes() for p in paths)


def test_a_partial_answer_gives_each_object_its_own_outcome(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    paths, uids = objects(tmp_path, 4)
    body = {
        "00081199": {"vr": "SQ", "Value": [referenced(uids[0]), referenced(uids[1], 0xB007)]},
        "00081198": {"vr": "SQ", "Value": [failed(uids[2], 0xA700)]},
    }  # the fourth is named nowhere
    fake = service(lambda seen: (202, body))
    report = stow_files(paths, web(fake.url), timeout_s=10)
    got = [report.outcomes[p] for p in paths]
    assert [(o.delivered, o.status) for o in got] == [
        (True, 0x0000),
        (True, 0xB007),
        (False, 0xA700),
        (False, None),
    ]
    assert "0xA700" in got[2].detail and "does not name" in got[3].detail
    assert report.error is None


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, b"", "HTTP 401"),
        (413, b"too large", "HTTP 413 Request Entity Too Large: too large"),
        (503, b"", "HTTP 503"),
        (409, b"<html>oops</html>", "unreadable STOW-RS response"),
    ],
)
def test_a_refused_request_leaves_every_object_undelivered_with_the_reason(
    tmp_path: Path,
    service: Callable[..., FakeService],
    status: int,
    body: bytes,
    expected: str,
) -> None:
    paths, _ = objects(tmp_path, 2)
    fake = service(lambda seen: (status, body))
    report = stow_files(paths, web(fake.url), timeout_s=10)
    assert all(not o.delivered and o.status is None for o in report.outcomes.values())
    assert report.error is not None and expected in report.error
    assert all(expected in o.detail for o in report.outcomes.values())


def test_a_service_that_is_down_is_an_error_and_nothing_is_lost(tmp_path: Path) -> None:
    paths, _ = objects(tmp_path, 2)
    report = stow_files(paths, web(f"http://127.0.0.1:{free_port()}/dicom-web"), timeout_s=5)
    assert not report.association_ok
    assert report.error is not None and "ConnectionRefused" in report.error
    assert list(report.outcomes) == paths
    assert not any(o.delivered for o in report.outcomes.values())


def test_large_results_take_several_requests_and_unreadable_files_stay_behind(
    tmp_path: Path, service: Callable[..., FakeService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects of about 0.45 MB with at most 1 MiB a request: two a request; a file that
    cannot be read is reported, the others are sent."""
    paths, _ = objects(tmp_path, 5, rows=680)
    assert all(400_000 < p.stat().st_size < 500_000 for p in paths)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM")
    fake = service(lambda seen: (200, None))
    monkeypatch.setattr(dicomweb, "_CHUNK", 4096)  # each object streamed in many pieces
    report = stow_files([*paths, broken], web(fake.url, request_max_bytes=1 << 20), timeout_s=10)
    assert sorted(len(s.parts) for s in fake.seen) == [1, 2, 2]
    sent = sorted(part for s in fake.seen for part in s.parts)
    assert sent == sorted(p.read_bytes() for p in paths)
    assert [o.delivered for o in report.outcomes.values()] == [True] * 5 + [False]
    assert "unreadable" in report.outcomes[broken].detail


def test_a_stopped_send_starts_no_further_request_and_withholds_what_it_did_not_send(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    """Stopped during its first request (the exporter is stopping), the send starts no
    other: that request's objects get their outcomes, the rest are withheld, not failed."""
    paths, _ = objects(tmp_path, 5, rows=680)
    stop = threading.Event()

    def answer(seen: Seen) -> tuple[int, None]:
        stop.set()
        return 200, None

    fake = service(answer)
    dest = web(fake.url, request_max_bytes=1 << 20, associations=1)
    report = stow_files(paths, dest, timeout_s=10, stop=stop)
    assert len(fake.seen) == 1  # of the three requests the objects take
    delivered = {p for p, o in report.outcomes.items() if o.delivered}
    assert sorted(p.read_bytes() for p in delivered) == sorted(fake.seen[0].parts)
    assert report.withheld == set(paths) - delivered and len(report.withheld) >= 2


class _NoAnswer(Exception):
    """Raised by an answer: the service closes the connection without answering."""


@pytest.mark.parametrize("stays", [True, False], ids=["still-there", "gone"])
@pytest.mark.parametrize("at", [2, 3], ids=["mid-way", "last-request"])
def test_a_request_without_an_answer_is_an_outage_only_if_the_service_went_away(
    tmp_path: Path,
    service: Callable[..., FakeService],
    monkeypatch: pytest.MonkeyPatch,
    stays: bool,
    at: int,
) -> None:
    """Three requests (two objects, two, one); request ``at`` gets no answer. A service still
    there stores what is left over a new connection, and the objects without an answer count
    as an attempt (they may be what it fails on); one that went away (a restart) leaves them,
    and those never sent, unreachable: the exporter waits the outage out."""
    paths, _ = objects(tmp_path, 5, rows=680)
    fakes: list[FakeService] = []

    def answer(seen: Seen) -> tuple[int, dict[str, Any] | bytes | None]:
        if len(fakes[0].seen) == at:
            if not stays:
                fakes[0].server.shutdown()
                fakes[0].server.server_close()
            raise _NoAnswer
        return 200, None

    fakes.append(service(answer))
    one_at_a_time = web(fakes[0].url, request_max_bytes=1 << 20, associations=1)
    report = stow_files(paths, one_at_a_time, timeout_s=10)
    outcomes = list(report.outcomes.values())
    unanswered = outcomes[2:4] if at == 2 else outcomes[4:]
    assert report.association_ok and not report.unreachable
    assert all(o.delivered for o in outcomes[:2])
    assert not any(o.delivered for o in unanswered)
    if stays:
        assert len(fakes[0].seen) == 3
        assert all(o.delivered for o in outcomes if o not in unanswered)
        assert not any(o.unreachable for o in outcomes)
    else:
        assert len(fakes[0].seen) == at
        left = outcomes[2 * at - 2 :]  # the unanswered request's objects and those after
        assert left == unanswered + left[len(unanswered) :]
        assert all(o.unreachable and not o.delivered for o in left)
        assert all(o.delivered and not o.unreachable for o in outcomes[: 2 * at - 2])


def test_credentials_are_read_from_their_files_for_every_request(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    paths, _ = objects(tmp_path, 1)
    password, token = tmp_path / "password", tmp_path / "token"
    password.write_text("first\n")
    token.write_text("tok-1\n")
    fake = service(lambda seen: (200, None))
    basic = web(fake.url, username="acwi", password_file=password)
    bearer = web(fake.url, token_file=token)
    stow_files(paths, basic, timeout_s=10)
    password.write_text("second")  # changed by an administrator: no restart needed
    stow_files(paths, basic, timeout_s=10)
    stow_files(paths, bearer, timeout_s=10)
    token.write_text("tok-2")
    assert check(bearer, timeout_s=10).ok
    sent = [s.headers["authorization"] for s in fake.seen]
    assert sent == [
        "Basic " + base64.b64encode(b"acwi:first").decode(),
        "Basic " + base64.b64encode(b"acwi:second").decode(),
        "Bearer tok-1",
        "Bearer tok-2",
    ]
    token.unlink()
    report = stow_files(paths, bearer, timeout_s=10)
    assert report.error is not None and "credentials" in report.error
    assert not report.outcomes[paths[0]].delivered


def test_the_check_asks_for_one_study(tmp_path: Path, service: Callable[..., FakeService]) -> None:
    fake = service(lambda seen: (200, b"[]") if seen.path.endswith("limit=1") else (404, None))
    result = check(web(fake.url), timeout_s=10)
    assert result.ok and result.elapsed_ms > 0
    assert [(s.method, s.path) for s in fake.seen] == [("GET", "/dicom-web/studies?limit=1")]
    refused = service(lambda seen: (401, b"Unauthorized"))
    result = check(web(refused.url), timeout_s=10)
    assert not result.ok and result.error.startswith("HTTP 401")
    down = check(web(f"http://127.0.0.1:{free_port()}/dicom-web"), timeout_s=5)
    assert not down.ok and "ConnectionRefused" in down.error


def test_https_checks_the_services_certificate_and_can_present_the_nodes(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    """``tls.ca_file`` is what the service's certificate must chain to; ``cert_file`` and
    ``key_file`` are the node's own, for a service that asks for one."""
    pki = make_pki(tmp_path / "pki")
    paths, _ = objects(tmp_path, 1)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert, pki.server.key)
    server.load_verify_locations(pki.ca)
    server.verify_mode = ssl.CERT_REQUIRED  # the node must show a certificate of this CA
    fake = service(lambda seen: (200, None), server)
    mutual = {"ca_file": pki.ca, "cert_file": pki.client.cert, "key_file": pki.client.key}
    report = stow_files(paths, web(fake.url, tls=mutual), timeout_s=10)
    assert report.error is None and report.outcomes[paths[0]].delivered
    assert check(web(fake.url, tls=mutual), timeout_s=10).ok

    untrusted = stow_files(paths, web(fake.url, tls={"ca_file": pki.rogue_ca}), timeout_s=10)
    assert untrusted.error is not None and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    assert not untrusted.outcomes[paths[0]].delivered
    anonymous = stow_files(paths, web(fake.url, tls={"ca_file": pki.ca}), timeout_s=10)
    assert anonymous.error is not None and not anonymous.outcomes[paths[0]].delivered
    assert len(fake.seen) == 2  # the refused connections never got a request through


@pytest.mark.parametrize(
    ("sizes", "parts", "max_bytes", "expected"),
    [
        ([100, 103, 98, 101], 2, 10_000, [2, 2]),  # sizes differ a little: still two halves
        ([1_700, *[786] * 100], 2, 64_000_000, [50, 51]),  # a CT: the SR and its heatmaps
        ([100] * 5, 1, 250, [2, 2, 1]),  # one at a time, split by size
        ([100, 5_000, 100], 2, 1_000, [1, 1, 1]),  # the large one alone
        ([100] * 3, 4, 10_000, [1, 1, 1]),  # fewer objects than requests
        ([], 2, 1_000, []),
    ],
)
def test_results_are_shared_evenly_between_requests(
    sizes: list[int], parts: int, max_bytes: int, expected: list[int]
) -> None:
    files = [(Path(f"f{i}"), size) for i, size in enumerate(sizes)]
    batches = list(dicomweb._batches(files, max_bytes, parts))
    assert [len(b) for b in batches] == expected
    assert [p for b in batches for p in b] == [p for p, _ in files]  # every one, in order


def test_results_go_through_an_http_proxy(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    """``proxy``: an ``http`` service is asked in absolute form through the proxy, an ``https``
    one through a CONNECT tunnel (its certificate still checked end to end)."""
    paths, _ = objects(tmp_path, 1)
    proxy = FakeProxy()
    try:
        plain = service(lambda seen: (200, None))
        report = stow_files(paths, web(plain.url, proxy=proxy.url), timeout_s=10)
        assert report.error is None and report.outcomes[paths[0]].delivered
        assert check(web(plain.url, proxy=proxy.url), timeout_s=10).ok
        port = urlsplit(plain.url).port
        assert proxy.seen == [
            ("POST", f"http://127.0.0.1:{port}/dicom-web/studies"),
            ("GET", f"http://127.0.0.1:{port}/dicom-web/studies?limit=1"),
        ]
        assert [s.path for s in plain.seen] == ["/dicom-web/studies", "/dicom-web/studies?limit=1"]

        pki = make_pki(tmp_path / "pki")
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(pki.server.cert, pki.server.key)
        secure = service(lambda seen: (200, None), server)
        dest = web(secure.url, proxy=proxy.url, tls={"ca_file": pki.ca})
        report = stow_files(paths, dest, timeout_s=10)
        assert report.error is None and report.outcomes[paths[0]].delivered
        assert proxy.seen[-1] == ("CONNECT", f"127.0.0.1:{urlsplit(secure.url).port}")
        assert [s.parts for s in secure.seen] == [[paths[0].read_bytes()]]
    finally:
        proxy.close()
    down = stow_files(paths, web(plain.url, proxy=f"http://127.0.0.1:{free_port()}"), timeout_s=5)
    assert down.error is not None and "ConnectionRefused" in down.error


def test_a_proxy_that_asks_for_credentials(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    """``proxy_username`` and ``proxy_password_file``: the proxy gets them (on the CONNECT of an
    ``https`` service, on each request of an ``http`` one), the service never does; without
    them, or with a wrong password, the proxy's 407 is the error and nothing is delivered."""
    paths, _ = objects(tmp_path, 1)
    secret = tmp_path / "proxy-password"
    secret.write_text("proxy-secret-1\n")
    proxy = FakeProxy(("node", "proxy-secret-1"))
    creds = {"proxy_username": "node", "proxy_password_file": secret}
    pki = make_pki(tmp_path / "pki")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert, pki.server.key)
    try:
        plain = service(lambda seen: (200, None))
        secure = service(lambda seen: (200, None), server)
        tls = {"tls": {"ca_file": pki.ca}}
        for url, extra in ((plain.url, {}), (secure.url, tls)):
            report = stow_files(paths, web(url, proxy=proxy.url, **creds, **extra), timeout_s=10)
            assert report.error is None and report.outcomes[paths[0]].delivered, report.error
            assert check(web(url, proxy=proxy.url, **creds, **extra), timeout_s=10).ok
        assert proxy.refused == 0
        assert [s.method for s in plain.seen + secure.seen] == ["POST", "GET"] * 2
        # Through the tunnel the service sees no proxy credentials at all.
        assert not any("Proxy-Authorization" in s.headers for s in secure.seen)

        for extra in ({}, tls):
            url = secure.url if extra else plain.url
            anonymous = stow_files(paths, web(url, proxy=proxy.url, **extra), timeout_s=10)
            assert not anonymous.outcomes[paths[0]].delivered
            assert anonymous.error is not None and "407" in anonymous.error, anonymous.error
            refused = check(web(url, proxy=proxy.url, **extra), timeout_s=10)
            assert not refused.ok and "407" in (refused.error or "")
        assert proxy.refused == 4
        secret.write_text("wrong-password\n")  # read for every call: a new password counts
        wrong = stow_files(paths, web(plain.url, proxy=proxy.url, **creds), timeout_s=10)
        assert wrong.error is not None and "407" in wrong.error
        assert "wrong-password" not in wrong.error and "proxy-secret" not in wrong.error
        assert len(plain.seen) == 2 and len(secure.seen) == 2  # nothing more got through
    finally:
        proxy.close()


def test_an_answer_before_the_body_is_read_is_the_error(tmp_path: Path) -> None:
    """A service that answers (413 here; 401 or a proxy's 407 alike) as soon as it has the
    headers, and closes the connection while the body is still being sent: its answer is the
    error, not the broken pipe."""
    paths, _ = objects(tmp_path, 1, rows=2048)  # 8 MiB: more than the socket buffers hold
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_early() -> None:
        client, _ = listener.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(65536)
        client.sendall(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n"
            b"\r\ntoo large"
        )
        time.sleep(0.2)  # the client is still sending
        client.close()

    thread = threading.Thread(target=answer_early, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
    try:
        report = stow_files(paths, web(url), timeout_s=10)
    finally:
        thread.join(timeout=10)
        listener.close()
    assert report.error == "HTTP 413 Payload Too Large: too large", report.error
    assert not report.outcomes[paths[0]].delivered


def test_proxy_credentials_go_with_a_proxy(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    ok = web(
        "https://x/dicom-web",
        proxy="http://p:3128",
        proxy_username="u",
        **{"proxy_password_file": secret},
    )
    assert ok.proxy_username == "u"
    for extra in (
        {"proxy_username": "u"},  # no password file
        {"proxy_password_file": secret},  # no user name
        {"proxy_username": "u", "proxy_password_file": tmp_path / "missing"},
    ):
        with pytest.raises(ValidationError):
            web("https://x/dicom-web", proxy="http://p:3128", **extra)
    with pytest.raises(ValidationError, match="needs a proxy"):
        web("https://x/dicom-web", proxy_username="u", proxy_password_file=secret)
    with pytest.raises(ValidationError):
        Destination(
            name="d",
            ae_title="PACS",
            host="h",
            port=104,
            proxy_username="u",
            proxy_password_file=secret,
        )


def test_a_proxy_is_an_http_url_without_credentials() -> None:
    for proxy in ("https://proxy:3128", "http://user:pw@proxy:3128", "proxy:3128", "http://p/x"):
        with pytest.raises(ValidationError):
            web("https://x/dicom-web", proxy=proxy)
    with pytest.raises(ValidationError):  # DIMSE destinations take no proxy
        Destination(name="d", ae_title="PACS", host="h", port=104, proxy="http://proxy:3128")
    assert web("https://x/dicom-web", proxy="http://proxy:3128").proxy == "http://proxy:3128"
