"""What a DICOMweb destination may answer beyond the standard's letter, and what the exporter
makes of it (``acwi_node/export/dicomweb.py``): a ``200`` that names objects it did not store
(earlier versions of Orthanc's DICOMweb plugin answered 200 to every request), reasons that
are no numbers, JSON nested past the parser, a redirect, a TLS handshake refused. Against the
HTTP server of ``test_dicomweb.py``, on loopback."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acwi_node.export.dicomweb import parse_stow_response, stow_files
from tests.support.certs import make_pki
from tests.support.ports import free_port
from tests.unit.test_dicomweb import FakeService, Seen, failed, objects, referenced, service, web

__all__ = ["service"]  # the fixture, used by name


def _reason_item(uid: str, reason: Any) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def test_a_200_that_names_objects_it_did_not_store_leaves_them_in_the_outbox(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    paths, uids = objects(tmp_path, 3)
    body = {
        "00081199": {"vr": "SQ", "Value": [referenced(uids[0]), referenced(uids[2])]},
        "00081198": {"vr": "SQ", "Value": [failed(uids[1], 0xA700)]},
    }
    fake = service(lambda seen: (200, body))
    report = stow_files(paths, web(fake.url, associations=1), timeout_s=10)
    got = [report.outcomes[p] for p in paths]
    assert [(o.delivered, o.status) for o in got] == [(True, 0), (False, 0xA700), (True, 0)]
    assert "not stored (STOW-RS 200): 0xA700" in got[1].detail
    # a 200 with an empty Failed SOP Sequence, a body that is no DICOM JSON, or none: stored
    for reply in (
        {"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": []}},
        b"<html>stored</html>",
        None,
    ):
        fake.answer = lambda seen, reply=reply: (200, reply)  # type: ignore[misc]
        again = stow_files(paths, web(fake.url, associations=1), timeout_s=10)
        assert all(o.delivered for o in again.outcomes.values()), reply


@pytest.mark.parametrize("associations", [1, 2])
@pytest.mark.parametrize("reason", ["272", "A700", None, {}, [1], True, 1.5, -1, 70000], ids=repr)
def test_a_failure_reason_that_is_no_number_still_fails_its_object_alone(
    tmp_path: Path, service: Callable[..., FakeService], associations: int, reason: Any
) -> None:
    """A reason in decimal digits is read (Orthanc writes them so); anything else is "no
    reason given". Nothing raises, whether one request or two: the stored object is stored,
    the failed one waits."""
    paths, uids = objects(tmp_path, 2)

    def answer(seen: Seen) -> tuple[int, dict[str, Any]]:
        return 202, {
            "00081199": {"vr": "SQ", "Value": [referenced(uids[0])]},
            "00081198": {"vr": "SQ", "Value": [_reason_item(uids[1], reason)]},
        }

    fake = service(answer)
    report = stow_files(paths, web(fake.url, associations=associations), timeout_s=10)
    first, second = (report.outcomes[p] for p in paths)
    assert first.delivered and first.status == 0
    assert not second.delivered
    assert second.status == (272 if reason == "272" else None)
    assert ("0x0110" if reason == "272" else "no reason given") in second.detail


def test_answers_nobody_could_parse_leave_every_object_waiting_with_why(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    paths, uids = objects(tmp_path, 1)
    for reply, why in (
        (b"[" * 100_000, "JSON nested too deep"),
        (b"[1]", "not a DICOM JSON data set"),
        (b"", "unreadable STOW-RS response"),
    ):
        fake = service(lambda seen, reply=reply: (202, reply))
        report = stow_files(paths, web(fake.url, associations=1), timeout_s=10)
        assert report.error is not None and why in report.error
        assert not report.outcomes[paths[0]].delivered
    # a SOP Instance UID that is no string names no object
    odd = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [12]}}]}}
    fake = service(lambda seen: (202, odd))
    report = stow_files(paths, web(fake.url, associations=1), timeout_s=10)
    assert "does not name this object" in report.outcomes[paths[0]].detail
    assert parse_stow_response(b'{"00081199": {"vr": "SQ", "Value": [{"00081155": 1}]}}') == (
        {},
        {},
    )


def test_a_redirect_is_not_followed_and_says_where_it_points(
    tmp_path: Path, service: Callable[..., FakeService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body would have to go again, and the credentials to wherever it points: the
    error names the new place, for the destination's ``url``."""
    paths, _ = objects(tmp_path, 1)
    fake = service(lambda seen: (301, b""))
    import http.server

    real = http.server.BaseHTTPRequestHandler.send_header

    def send_header(self: Any, keyword: str, value: str) -> None:
        real(self, keyword, value)
        if keyword == "Content-Type":
            real(self, "Location", "https://pacs.example.org/dicom-web/studies")

    monkeypatch.setattr(http.server.BaseHTTPRequestHandler, "send_header", send_header)
    report = stow_files(paths, web(fake.url, associations=1), timeout_s=10)
    assert report.error == (
        "HTTP 301 Moved Permanently to https://pacs.example.org/dicom-web/studies"
    )
    assert not report.outcomes[paths[0]].delivered
    assert not report.unreachable
    assert len(fake.seen) == 1


def test_a_tls_handshake_the_service_refuses_is_no_outage(
    tmp_path: Path, service: Callable[..., FakeService]
) -> None:
    """A certificate the node does not trust, or ``https`` to a service that speaks plain
    HTTP: the configuration's fault, counted against ``max_attempts`` (not waited out for a
    day as an outage); a service that cannot be connected to still is an outage."""
    pki = make_pki(tmp_path / "pki")
    paths, _ = objects(tmp_path, 1)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert, pki.server.key)
    secure = service(lambda seen: (200, None), server)
    plain = service(lambda seen: (200, None))
    for dest in (
        web(secure.url, tls={"ca_file": pki.rogue_ca}, associations=1),
        web(plain.url.replace("http://", "https://"), tls={"ca_file": pki.ca}),
    ):
        report = stow_files(paths, dest, timeout_s=10)
        outcome = report.outcomes[paths[0]]
        assert report.error is not None and not outcome.delivered
        assert "SSL" in report.error
        assert not report.unreachable and not outcome.unreachable, report.error
    assert secure.seen == plain.seen == []
    down = stow_files(paths, web(f"http://127.0.0.1:{free_port()}/dicom-web"), timeout_s=5)
    assert down.unreachable
