"""Studies received by DICOMweb: ``POST /dicomweb/studies`` (STOW-RS) into the spool and the
ledger (SQLite and PostgreSQL), what each part's outcome is, and who may post."""

from __future__ import annotations

import base64
import errno
import io
import logging
import mmap
import os
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from sqlalchemy import select

from acwi_node.config import Settings, load_settings
from acwi_node.ingest import spool as spool_module
from acwi_node.ingest import stow
from acwi_node.ingest.header import HeaderError, pydicom_header
from acwi_node.ingest.holders import HOLDERS_DIR
from acwi_node.ingest.spool import Spool
from acwi_node.ingest.stow import MultipartError, boundary_of, close_mapping, split_parts
from acwi_node.ledger import Ledger, RoutedJob
from acwi_node.ledger.models import Instance, Study
from acwi_node.review.auth import SESSION_COOKIE, new_token, token_hash
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from acwi_node.web.stow import response_type
from bench.common import write_ct_series, write_small_instances
from models.data.synth import write_study
from tests.support.asgi import post_then_hang_up
from tests.support.descriptors import REAL_CLOSE, CloseReportingAnError
from tests.support.review_case import CSRF, PASSWORD, add_user

NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
BOUNDARY = "acwi-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


GSPS = UID("1.2.840.10008.5.1.4.1.1.11.1")


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def basic(name: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def post(
    client: TestClient,
    body: bytes,
    *,
    user: str = "pacs",
    path: str = "/dicomweb/studies",
    content_type: str = MULTIPART,
    accept: str = "application/dicom+json",
) -> Any:
    return client.post(
        path,
        content=body,
        headers={"Content-Type": content_type, "Accept": accept, **basic(user)},
    )


def values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def spool_files(settings: Settings) -> list[Path]:
    """The spool's files (request bodies in ``.tmp`` too); not the lock file that names the
    receiving process (``.holders``)."""
    holders = settings.spool_dir / HOLDERS_DIR
    return sorted(p for p in settings.spool_dir.rglob("*") if p.is_file() and p.parent != holders)


def studies(ledger: Ledger) -> list[tuple[str, int, int, str]]:
    """(study UID, instances, open associations, calling AE of the first instance) each."""
    with ledger.session() as s:
        rows = []
        for study in s.scalars(select(Study)).all():
            instances = s.scalars(select(Instance).where(Instance.study_id == study.id)).all()
            rows.append(
                (study.study_uid, len(instances), study.open_associations, study.calling_ae)
            )
        return rows


@pytest.fixture
def client(ledger_node: tuple[Settings, Ledger]) -> TestClient:
    settings, ledger = ledger_node
    add_user(ledger, "pacs", role="sender")
    add_user(ledger, "jane.doe", role="radiologist")
    add_user(ledger, "root", role="admin")
    return TestClient(create_app(settings, ledger), base_url="https://node.example")


def test_a_study_stored_by_stow_rs(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    settings, ledger = ledger_node
    study_uid = generate_uid()
    files = write_study(tmp_path / "study", n_images=2, seed=3, study_instance_uid=study_uid)
    answer = post(client, multipart(*(f.read_bytes() for f in files)))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    body = answer.json()
    sent = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [
        (values(i, "00081150")[0], values(i, "00081155")[0]) for i in values(body, "00081199")
    ] == [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in sent]
    assert "00081198" not in body
    assert values(body, "00081190") == ["https://node.example/dicomweb/studies"]
    # Byte for byte in the spool, one row each, the request over: the study waits only for
    # its quiet period, as after an association's release.
    for f, d in zip(files, sent, strict=True):
        stored = settings.spool_dir / study_uid / f"{d.SOPInstanceUID}.dcm"
        assert stored.read_bytes() == f.read_bytes()
    assert studies(ledger) == [(study_uid, 2, 0, "pacs")]
    assert [uid for uid, _ in ledger.studies_due(quiet_period_s=0, max_wait_s=3600)]
    # Sent again to the study's own URL: stored again (the same files), still one study.
    again = post(client, multipart(files[0].read_bytes()), path=f"/dicomweb/studies/{study_uid}")
    assert again.status_code == 200
    assert values(again.json(), "00081190") == [
        f"https://node.example/dicomweb/studies/{study_uid}"
    ]
    assert len(spool_files(settings)) == 2
    assert [s[:2] for s in studies(ledger)] == [(study_uid, 2)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_parts_that_cannot_be_stored_are_refused_alone(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    """A part that is not DICOM, an instance whose UID could name a path, an instance of
    another study than the URL's: each refused with its reason; the others stored."""
    settings, ledger = ledger_node
    study_uid = generate_uid()
    good, evil = write_study(tmp_path / "s", n_images=2, seed=4, study_instance_uid=study_uid)
    ds = pydicom.dcmread(evil)
    ds.SOPInstanceUID = "../../../etc/passwd"
    ds.save_as(evil)
    answer = post(client, multipart(good.read_bytes(), b"not a DICOM file", evil.read_bytes()))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    (stored,) = values(body, "00081199")
    assert values(stored, "00081155") == [str(pydicom.dcmread(good).SOPInstanceUID)]
    failed = values(body, "00081198")
    assert [values(i, "00081197") for i in failed] == [[0xC000], [0xC000]]
    assert all("../" not in str(i) for i in failed)
    assert [p.name for p in spool_files(settings)] == [f"{stored['00081155']['Value'][0]}.dcm"]

    other = write_study(tmp_path / "o", n_images=1, seed=5, study_instance_uid=generate_uid())
    refused = post(client, multipart(other[0].read_bytes()), path=f"/dicomweb/studies/{study_uid}")
    assert refused.status_code == 409
    (item,) = values(refused.json(), "00081198")
    assert values(item, "00081197") == [0xA900]
    assert "00081199" not in refused.json()
    assert [s[:2] for s in studies(ledger)] == [(study_uid, 1)]


def test_the_node_s_own_results_are_answered_as_stored_and_not_stored(
    tmp_path: Path,
    ledger_node: tuple[Settings, Ledger],
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A DICOMweb PACS sending a study back with the node's results in it: each result is in
    the Referenced SOP Sequence (nothing to retry) but neither in the spool nor the ledger, so
    the study is not re-opened for them; another study's result is still refused."""
    settings, ledger = ledger_node
    study_uid = generate_uid()
    image, result = write_study(tmp_path / "s", n_images=2, seed=6, study_instance_uid=study_uid)
    ds = pydicom.dcmread(result)
    ds.Manufacturer = "ACWI Node"
    ds.save_as(result)
    dropped = REGISTRY.get_sample_value(
        "acwi_scp_own_results_dropped_total", {"calling_ae": "pacs"}
    )
    caplog.set_level(logging.INFO, logger="acwi_node.ingest")
    answer = post(client, multipart(image.read_bytes(), result.read_bytes()))
    assert answer.status_code == 200, answer.text
    assert sorted(values(i, "00081155")[0] for i in values(answer.json(), "00081199")) == sorted(
        [str(pydicom.dcmread(image).SOPInstanceUID), str(ds.SOPInstanceUID)]
    )
    assert spool_files(settings) == [
        settings.spool_dir / study_uid / f"{pydicom.dcmread(image).SOPInstanceUID}.dcm"
    ]
    assert studies(ledger) == [(study_uid, 1, 0, "pacs")]
    assert (
        REGISTRY.get_sample_value("acwi_scp_own_results_dropped_total", {"calling_ae": "pacs"})
        == (dropped or 0) + 1
    )
    assert "1 stored, 0 refused, 1 written by ACWI Node (its results) not stored" in caplog.text

    refused = post(
        client, multipart(result.read_bytes()), path=f"/dicomweb/studies/{generate_uid()}"
    )
    assert refused.status_code == 409
    assert studies(ledger) == [(study_uid, 1, 0, "pacs")]


def test_a_study_sent_again_unchanged_keeps_its_results(
    tmp_path: Path,
    ledger_node: tuple[Settings, Ledger],
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, ledger = ledger_node
    study_uid = generate_uid()
    files = write_study(tmp_path / "s", n_images=2, seed=7, study_instance_uid=study_uid)
    body = multipart(*(f.read_bytes() for f in files))
    assert post(client, body).status_code == 200
    ((study_id, generation),) = ledger.studies_due(quiet_period_s=0, max_wait_s=3600)
    route = RoutedJob(route="any", model="default", destinations=["pacs"], priority=0)
    ledger.complete_study(study_id, generation, lambda facts: [route])
    caplog.set_level(logging.INFO, logger="acwi_node.ingest")
    assert post(client, body).status_code == 200
    st = ledger.get_study(study_uid)
    assert st is not None and (st["state"], st["generation"]) == ("queued", 1)
    assert "2 stored, 0 refused, 2 sent again unchanged (their studies not re-opened)" in (
        caplog.text
    )
    # a presentation state stored in the study after its images: nothing to read
    state = pydicom.dcmread(files[1])
    state.SOPClassUID = state.file_meta.MediaStorageSOPClassUID = GSPS
    state.SOPInstanceUID = state.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del state.PixelData
    buffer = io.BytesIO()
    state.save_as(buffer)
    assert post(client, multipart(buffer.getvalue())).status_code == 200
    st = ledger.get_study(study_uid)
    assert st is not None and (st["state"], st["generation"], st["instances"]) == ("queued", 1, 3)
    assert "1 object(s) no model reads (their studies not re-opened)" in caplog.text
    ds = pydicom.dcmread(files[0])
    ds.PatientName = "STOW^CORRECTED"  # the same instance, other bytes
    ds.save_as(files[0])
    assert post(client, multipart(files[0].read_bytes())).status_code == 200
    st = ledger.get_study(study_uid)
    assert st is not None and (st["state"], st["generation"]) == ("receiving", 2)


def xml_items(root: ElementTree.Element, keyword: str) -> list[dict[str, list[str]]]:
    """The items of a sequence of a Native DICOM Model response: each as {keyword: values}."""
    (sequence,) = root.findall(f"{NATIVE}DicomAttribute[@keyword='{keyword}']")
    return [
        {
            a.attrib["keyword"]: [v.text or "" for v in a.findall(f"{NATIVE}Value")]
            for a in item.findall(f"{NATIVE}DicomAttribute")
        }
        for item in sequence.findall(f"{NATIVE}Item")
    ]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_client_that_asks_for_xml(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    """``Accept: application/dicom+xml``: the same answer in the Native DICOM Model (PS3.19);
    a client that accepts neither JSON nor XML gets 406, and nothing is stored."""
    settings, _ = ledger_node
    good, evil = write_study(tmp_path / "s", n_images=2, seed=15)
    ds = pydicom.dcmread(evil)
    ds.SOPInstanceUID = "../../x"
    ds.save_as(evil)
    body = multipart(good.read_bytes(), evil.read_bytes())
    refused = post(client, body, accept="text/html")
    assert refused.status_code == 406
    assert spool_files(settings) == []

    answer = post(client, body, accept="application/dicom+json;q=0.5, application/dicom+xml")
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"] == "application/dicom+xml"
    root = ElementTree.fromstring(answer.content)
    assert root.tag == f"{NATIVE}NativeDicomModel"
    sent = pydicom.dcmread(good)
    assert xml_items(root, "ReferencedSOPSequence") == [
        {
            "ReferencedSOPClassUID": [str(sent.SOPClassUID)],
            "ReferencedSOPInstanceUID": [str(sent.SOPInstanceUID)],
        }
    ]
    (failed,) = xml_items(root, "FailedSOPSequence")
    assert failed["FailureReason"] == [str(0xC000)]
    tags = [a.attrib["tag"] for a in root.findall(f"{NATIVE}DicomAttribute")]
    assert tags == ["00081190", "00081198", "00081199"]  # in tag order, as PS3.19 asks
    assert len(spool_files(settings)) == 1


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/dicom+json"),
        ("*/*", "application/dicom+json"),
        ("application/json", "application/dicom+json"),
        ("application/dicom+json, application/dicom+xml", "application/dicom+json"),
        ("application/dicom+xml", "application/dicom+xml"),
        ("application/dicom+xml, application/dicom+json;q=0.9", "application/dicom+xml"),
        ("application/dicom+json;q=0, */*", "application/dicom+xml"),
        ("application/dicom+xml;q=0, */*;q=0.1", "application/dicom+json"),
        ("text/html, application/xml", None),
        ("application/dicom+json;q=0", None),
    ],
)
def test_the_response_type_follows_accept(accept: str | None, chosen: str | None) -> None:
    assert response_type(accept) == chosen


def test_an_instance_sent_twice_in_one_request(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    """Stored twice, the later bytes kept (as two C-STOREs would), one row."""
    settings, ledger = ledger_node
    study_uid = generate_uid()
    (first,) = write_study(tmp_path / "a", n_images=1, seed=10, study_instance_uid=study_uid)
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "second version"
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    answer = post(client, multipart(first.read_bytes(), second.read_bytes()))
    assert answer.status_code == 200, answer.text
    assert len(values(answer.json(), "00081199")) == 2
    (stored,) = spool_files(settings)
    assert stored.read_bytes() == second.read_bytes()
    assert [s[:2] for s in studies(ledger)] == [(study_uid, 1)]


def test_an_instance_stored_in_another_study_moves_there(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    """Its SOP Instance UID kept, an image stored again in another study moves: one row, in
    the later study, and one file, the later one."""
    settings, ledger = ledger_node
    first_uid, second_uid = generate_uid(), generate_uid()
    (first,) = write_study(tmp_path / "a", n_images=1, seed=11, study_instance_uid=first_uid)
    ds = pydicom.dcmread(first)
    ds.StudyInstanceUID = second_uid
    second = tmp_path / "moved.dcm"
    ds.save_as(second)
    assert post(client, multipart(first.read_bytes())).status_code == 200
    answer = post(client, multipart(second.read_bytes()))
    assert answer.status_code == 200, answer.text
    (stored,) = spool_files(settings)
    assert stored == settings.spool_dir / second_uid / f"{ds.SOPInstanceUID}.dcm"
    assert sorted(s[:2] for s in studies(ledger)) == sorted([(first_uid, 0), (second_uid, 1)])


def test_one_flush_for_a_request_and_what_a_failure_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool's file system is flushed once per request, before any row; if that flush or
    the ledger fails, every object of the request is refused and its new files removed."""
    settings = load_settings(  # fsync on, patients' IDs in the audit trail
        None, node={"data_dir": tmp_path / "data"}, audit={"patient_id": True}
    )
    ledger = Ledger(settings.database_url)
    add_user(ledger, "pacs", role="sender")
    client = TestClient(create_app(settings, ledger))
    flushes: list[Path] = []
    monkeypatch.setattr(stow, "sync_filesystem", flushes.append)
    audited: list[dict[str, Any]] = []
    monkeypatch.setattr(stow, "audit", lambda event, **record: audited.append(record))
    files = write_study(tmp_path / "s", n_images=3, seed=11)
    assert post(client, multipart(*(f.read_bytes() for f in files))).status_code == 200
    assert flushes == [settings.spool_dir]
    assert len(spool_files(settings)) == 3
    assert audited[-1]["patient_ids"] == [str(pydicom.dcmread(files[0]).PatientID)]

    def flush_fails(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stow, "sync_filesystem", flush_fails)
    others = write_study(tmp_path / "o", n_images=2, seed=12, study_instance_uid=generate_uid())
    refused = post(client, multipart(*(f.read_bytes() for f in others)))
    assert refused.status_code == 409
    assert [values(i, "00081197") for i in values(refused.json(), "00081198")] == [[0xA700]] * 2
    assert len(spool_files(settings)) == 3
    # The audit record names no patient of an instance that was refused (as the SCP's).
    assert (audited[-1]["patient_ids"], audited[-1]["study_uids"]) == ([], [])

    monkeypatch.setattr(stow, "sync_filesystem", flushes.append)

    def ledger_fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database is gone")

    monkeypatch.setattr(ledger, "record_instances", ledger_fails)
    refused = post(client, multipart(*(f.read_bytes() for f in others)))
    assert refused.status_code == 409
    assert [values(i, "00081197") for i in values(refused.json(), "00081198")] == [[0xC211]] * 2
    assert audited[-1]["patient_ids"] == []
    assert len(spool_files(settings)) == 3  # the earlier study's files stay, no new ones
    ledger.dispose()


def test_the_body_is_gone_before_the_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's body file is removed once its objects are in their spool files, before
    the file system is flushed: the flush writes each object once, not the body as well."""
    settings = load_settings(None, node={"data_dir": tmp_path / "data"})  # fsync on
    ledger = Ledger(settings.database_url)
    add_user(ledger, "pacs", role="sender")
    client = TestClient(create_app(settings, ledger))
    at_flush: list[list[str]] = []
    monkeypatch.setattr(
        stow,
        "sync_filesystem",
        lambda path: at_flush.append([p.name for p in (path / ".tmp").iterdir()]),
    )
    files = write_study(tmp_path / "s", n_images=2, seed=17)
    assert post(client, multipart(*(f.read_bytes() for f in files))).status_code == 200
    assert at_flush == [[]]
    assert len(spool_files(settings)) == 2
    ledger.dispose()


def test_a_full_disk_refuses_the_parts(
    tmp_path: Path,
    ledger_node: tuple[Settings, Ledger],
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spool files that cannot be written (a full disk): each part refused with 0xA700, the
    request answered (the parts' views, held by the errors, do not stop the body from being
    unmapped and removed), nothing left behind; once there is room again, stored."""
    settings, _ = ledger_node
    files = write_study(tmp_path / "s", n_images=2, seed=18)
    body = multipart(*(f.read_bytes() for f in files))

    def disk_full(*args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "write_all", disk_full)
    refused = post(client, body)
    assert refused.status_code == 409, refused.text
    assert [values(i, "00081197") for i in values(refused.json(), "00081198")] == [[0xA700]] * 2
    assert spool_files(settings) == []
    monkeypatch.undo()
    assert post(client, body).status_code == 200
    assert len(spool_files(settings)) == 2


def test_parts_are_not_copied(tmp_path: Path, ledger_node: tuple[Settings, Ledger]) -> None:
    """A part is read and written where it lies in the mapped body: storing a 32 MB object
    allocates nothing near its size."""
    settings, ledger = ledger_node
    files = write_ct_series(tmp_path / "ct", 1, size=4096)  # one 32 MB slice
    (tmp_path / "body").write_bytes(multipart(files[0].read_bytes()))
    receiver = stow.StowReceiver(ledger, Spool(settings.spool_dir, fsync=False))
    with open(tmp_path / "body", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        parts = split_parts(m, BOUNDARY)
        tracemalloc.start()
        try:
            result = receiver.receive(parts, sender="pacs", address="127.0.0.1")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            for part in parts:
                part.release()
    assert len(result.stored) == 1 and not result.failed
    assert files[0].stat().st_size > 32 << 20
    assert peak < 4 << 20, peak
    assert spool_files(settings)[0].read_bytes() == files[0].read_bytes()


def test_a_mapping_with_a_view_alive_goes_with_the_view(tmp_path: Path) -> None:
    """Unmapping a body while a view of it is alive (an error's traceback holding a part)
    does not fail the request: the mapping stays until the view goes."""
    (tmp_path / "body").write_bytes(b"x" * 4096)
    with open(tmp_path / "body", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)[:10]
    close_mapping(mapped)  # no BufferError
    assert not mapped.closed and bytes(view) == b"x" * 10
    view.release()
    close_mapping(mapped)
    assert mapped.closed


def test_who_may_store(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    _, ledger = ledger_node
    files = write_study(tmp_path / "s", n_images=1, seed=6)
    body = multipart(files[0].read_bytes())
    anonymous = client.post("/dicomweb/studies", content=body, headers={"Content-Type": MULTIPART})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic")
    wrong = client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": MULTIPART, **basic("pacs", "not the password")},
    )
    assert wrong.status_code == 401
    assert post(client, body, user="jane.doe").status_code == 403  # a radiologist
    # A sender account stores studies and does nothing else, signed in or not.
    for path in ("/api/studies", "/api/worklist", "/api/destinations"):
        assert client.get(path, headers=basic("pacs")).status_code == 403, path
    token = CSRF.search(client.get("/login").text)
    assert token is not None
    form = {"csrf_token": token.group(1), "username": "pacs", "password": PASSWORD, "next": "/"}
    signing_in = client.post("/login", data=form, follow_redirects=False)
    assert signing_in.status_code == 403 and "cannot sign in" in signing_in.text
    assert SESSION_COOKIE not in client.cookies
    # A session it somehow holds opens nothing either.
    token_value = new_token()
    store = ReviewStore(ledger)
    user = store.get_user("pacs")
    assert user is not None
    store.create_session(user.id, token_hash(token_value), 3600)
    client.cookies.set(SESSION_COOKIE, token_value)
    for path in ("/review/worklist", "/review/dashboard", "/api/studies"):
        assert client.get(path, follow_redirects=False).status_code == 403, path
    client.cookies.clear()
    assert post(client, body, user="root").status_code == 200  # an administrator may


def test_requests_that_are_not_stow_rs(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    settings, _ = ledger_node
    files = write_study(tmp_path / "s", n_images=1, seed=7)
    whole = multipart(files[0].read_bytes())

    def answered(status: str) -> float:
        value = REGISTRY.get_sample_value("acwi_web_stow_requests_total", {"status": status})
        return value or 0.0

    before_400, before_415 = answered("400"), answered("415")
    for content_type in (
        "application/dicom",
        "application/json",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        'multipart/related; type="application/dicom"',
    ):
        answer = post(client, whole, content_type=content_type)
        assert answer.status_code == 415, (content_type, answer.text)
    cut = post(client, whole[: len(whole) // 2])  # the connection dropped halfway
    assert cut.status_code == 400 and "closing boundary" in cut.json()["detail"]
    assert post(client, b"").status_code == 400
    # Counted by status, each request's time observed.
    assert answered("400") == before_400 + 2 and answered("415") == before_415 + 4
    assert (REGISTRY.get_sample_value("acwi_web_stow_request_seconds_count") or 0) >= 7
    typed = post(client, multipart(files[0].read_bytes(), part_type="image/jpeg"))
    assert typed.status_code == 400
    assert post(client, whole, path="/dicomweb/studies/..%2Fetc").status_code in (400, 404)
    assert spool_files(settings) == []  # nothing stored, no body left behind


def test_a_sender_that_hangs_up_halfway(
    tmp_path: Path,
    ledger_node: tuple[Settings, Ledger],
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection closes in the middle of the body: a warning saying so (no traceback),
    nothing stored, no body left beside the spool, and the node stores the next request."""
    settings, _ = ledger_node
    files = write_study(tmp_path / "s", n_images=1, seed=16)
    body = multipart(files[0].read_bytes())
    headers = {"Content-Type": MULTIPART, "Content-Length": str(len(body)), **basic("pacs")}
    with caplog.at_level(logging.WARNING, logger="acwi_node.ingest"):
        status = post_then_hang_up(client.app, "/dicomweb/studies", headers, body[:500])
    assert status == 400
    assert "closed after 500 bytes" in caplog.text
    assert "Traceback" not in caplog.text
    assert spool_files(settings) == []
    assert post(client, body).status_code == 200


def test_a_body_over_the_limit_is_refused(tmp_path: Path, ledger_node: Any) -> None:
    _, ledger = ledger_node
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        dicomweb={"max_request_bytes": 1 << 20},
    )
    limited = Ledger(settings.database_url)
    add_user(limited, "pacs", role="sender")
    client = TestClient(create_app(settings, limited))
    body = multipart(b"\0" * (1 << 20))
    answer = post(client, body)
    assert answer.status_code == 413
    assert spool_files(settings) == []
    limited.dispose()


def test_a_body_that_cannot_be_kept_is_refused(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    """Where the body cannot be written beside the spool (here: its folder is gone and a
    file stands in its place), 503 with the reason, and the node keeps serving."""
    settings, _ = ledger_node
    files = write_study(tmp_path / "s", n_images=1, seed=14)
    tmp_dir = settings.spool_dir / ".tmp"
    tmp_dir.rmdir()
    tmp_dir.write_text("not a folder")
    answer = post(client, multipart(files[0].read_bytes()))
    assert answer.status_code == 503 and "cannot store now" in answer.json()["detail"]
    tmp_dir.unlink()
    tmp_dir.mkdir()
    assert post(client, multipart(files[0].read_bytes())).status_code == 200


def test_stow_rs_can_be_turned_off(tmp_path: Path) -> None:
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data"}, dicomweb={"stow_enabled": False}
    )
    ledger = Ledger(settings.database_url)
    add_user(ledger, "pacs", role="sender")
    files = write_study(tmp_path / "s", n_images=1, seed=8)
    answer = post(TestClient(create_app(settings, ledger)), multipart(files[0].read_bytes()))
    assert answer.status_code == 403 and "stow_enabled" in answer.json()["detail"]
    ledger.dispose()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_headers_read_as_pydicom_reads_them(tmp_path: Path) -> None:
    """read_header's fast path gives pydicom's transfer syntax and attributes, for radiographs,
    CT slices, small instances and implicit VR; what is not Part 10 is refused by pydicom."""
    files = write_study(tmp_path / "dx", n_images=1, seed=13)
    files += write_ct_series(tmp_path / "ct", 2, size=64)
    files += write_small_instances(tmp_path / "small", 2)
    implicit = pydicom.dcmread(files[0])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    files.append(tmp_path / "implicit.dcm")
    for f in files:
        data = f.read_bytes()
        assert stow.file_meta(data) is not None, f
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        syntax, header = stow.read_header(data)
        assert syntax == ds.file_meta.TransferSyntaxUID
        assert header == pydicom_header(data), f
    raw = files[0].read_bytes()
    for broken in (raw[132:], raw[:140], b"\0" * 128 + b"DICM"):
        assert stow.file_meta(broken) is None
    with pytest.raises(HeaderError, match="InvalidDicomError"):
        stow.read_header(raw[132:])  # no preamble: not a Part 10 file
    # Cut short inside the patient's name, before the UIDs: the reason is the cut.
    with pytest.raises(HeaderError, match="ends inside an element before its UIDs"):
        stow.read_header(raw[: raw.index(b"\x10\x00\x10\x00PN") + 10])


def test_multipart_bodies() -> None:
    assert boundary_of('Multipart/Related; type="application/dicom"; boundary="b 1"') == "b 1"
    assert boundary_of("multipart/related; boundary=x") == "x"  # type defaults to DICOM
    body = (
        b"preamble\r\n--x\r\n\r\nfirst\r\n--x\r\nContent-Type: application/dicom\r\n"
        b"Content-Length: 6\r\n\r\nsec\r\nond\r\n--x--\r\nepilogue"
    )
    assert [bytes(p) for p in split_parts(body, "x")] == [b"first", b"sec\r\nond"]
    for broken in (b"no boundary at all", b"--x\r\n\r\nunfinished", b"--x\r\nContent-Type"):
        with pytest.raises(MultipartError):
            split_parts(broken, "x")


def deflated_part10(ds: pydicom.Dataset, deflated: bytes) -> bytes:
    """``ds``'s File Meta Information (deflated transfer syntax), then ``deflated`` as its
    data set."""
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    part10 = buffer.getvalue()
    meta_end = 132 + 12 + struct.unpack_from("<I", part10, 140)[0]
    return part10[:meta_end] + deflated


def nested_big_endian(ds: pydicom.Dataset, levels: int) -> bytes:
    """``ds`` in Explicit VR Big Endian with a sequence nested ``levels`` deep before Patient's
    Name (pydicom's reader recurses per level)."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True, little_endian=False, implicit_vr=False)
    part10 = buffer.getvalue()
    level = b"\x00\x08\x11\x40SQ\x00\x00\xff\xff\xff\xff" + b"\xff\xfe\xe0\x00\xff\xff\xff\xff"
    close = b"\xff\xfe\xe0\x0d\x00\x00\x00\x00" + b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
    at = part10.index(b"\x00\x10\x00\x10PN")
    return part10[:at] + level * levels + close * levels + part10[at:]


def test_parts_that_cannot_be_read_are_refused_alone(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger], client: TestClient
) -> None:
    """A corrupt deflate stream, sequences nested deeper than pydicom can read: each refused
    with 0xC000, the good part before them stored and recorded, no file left without a row."""
    settings, ledger = ledger_node
    study_uid = generate_uid()
    good, other = write_study(tmp_path / "s", n_images=2, seed=6, study_instance_uid=study_uid)
    corrupt = deflated_part10(pydicom.dcmread(other), b"\x78\x9c" + bytes(range(256)) * 2)
    nested = nested_big_endian(pydicom.dcmread(other), 3000)
    answer = post(client, multipart(good.read_bytes(), corrupt, nested))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    good_uid = str(pydicom.dcmread(good).SOPInstanceUID)
    assert [values(i, "00081155") for i in values(body, "00081199")] == [[good_uid]]
    assert [values(i, "00081197") for i in values(body, "00081198")] == [[0xC000], [0xC000]]
    assert [p.name for p in spool_files(settings)] == [f"{good_uid}.dcm"]
    assert [s[:2] for s in studies(ledger)] == [(study_uid, 1)]


def test_an_unexpected_failure_refuses_its_part_alone(
    tmp_path: Path,
    ledger_node: tuple[Settings, Ledger],
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, ledger = ledger_node
    study_uid = generate_uid()
    first, second = write_study(tmp_path / "s", n_images=2, seed=7, study_instance_uid=study_uid)
    store = Spool.store
    failing = str(pydicom.dcmread(second).SOPInstanceUID)

    def store_or_fail(self: Spool, study: str, sop: str, *args: Any, **kwargs: Any) -> Path:
        if sop == failing:
            raise RuntimeError("an unexpected failure")
        return store(self, study, sop, *args, **kwargs)

    monkeypatch.setattr(Spool, "store", store_or_fail)
    answer = post(client, multipart(first.read_bytes(), second.read_bytes()))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    first_uid = str(pydicom.dcmread(first).SOPInstanceUID)
    assert [values(i, "00081155") for i in values(body, "00081199")] == [[first_uid]]
    assert [values(i, "00081197") for i in values(body, "00081198")] == [[0xC000]]
    assert [p.name for p in spool_files(settings)] == [f"{first_uid}.dcm"]
    assert [s[:2] for s in studies(ledger)] == [(study_uid, 1)]


def test_files_written_are_removed_when_the_request_fails_before_recording(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger]
) -> None:
    settings, ledger = ledger_node
    receiver = stow.StowReceiver(ledger, Spool(settings.spool_dir, fsync=False))
    (only,) = write_study(tmp_path / "s", n_images=1, seed=8)

    def body_lost() -> None:
        raise OSError("the body's file could not be released")

    with pytest.raises(OSError):
        receiver.receive(
            [memoryview(only.read_bytes())], sender="pacs", address="", written_out=body_lost
        )
    assert spool_files(settings) == []
    assert studies(ledger) == []


def test_a_deflate_bomb_is_stored_as_received_in_little_memory(
    tmp_path: Path, ledger_node: tuple[Settings, Ledger]
) -> None:
    """A deflated object of a megabyte that inflates to 256 MiB: its header read from the
    first kilobytes inflated, the object stored byte for byte."""
    settings, ledger = ledger_node
    receiver = stow.StowReceiver(ledger, Spool(settings.spool_dir, fsync=False))
    (path,) = write_study(tmp_path / "s", n_images=1, seed=9)
    ds = pydicom.dcmread(path)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    whole = buffer.getvalue()
    explicit = whole[132 + 12 + struct.unpack_from("<I", whole, 140)[0] :]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(explicit)
    deflated += compressor.compress(struct.pack("<HH2s2xI", 0x0099, 0x1000, b"OB", 256 << 20))
    deflated += b"".join(compressor.compress(bytes(1 << 20)) for _ in range(256))
    deflated += compressor.flush()
    part10 = deflated_part10(ds, deflated)
    tracemalloc.start()
    try:
        result = receiver.receive([memoryview(part10)], sender="pacs", address="")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stored == [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))]
    assert peak < 8 << 20, peak
    stored = settings.spool_dir / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    assert stored.read_bytes() == part10


def test_a_body_file_whose_close_reported_an_error_is_not_closed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() may report a write error (NFS: ENOSPC, EDQUOT, EIO), having released the
    descriptor all the same (Linux). The receiver's discard raised, and the request's own
    discard afterwards closed the number again: whatever file another thread had opened
    meanwhile (the ledger's database, another request's body) lost its descriptor."""
    body = stow.BodyFile(Spool(tmp_path / "spool", fsync=False))
    failing = CloseReportingAnError(tmp_path / "ledger.sqlite", errno.EIO)
    monkeypatch.setattr(os, "close", failing)
    try:
        with pytest.raises(OSError):
            body.discard()  # the receiver's, once every part is in the spool
        body.discard()  # the request's own, afterwards
        os.fstat(failing.others[0])  # still open
    finally:
        monkeypatch.setattr(os, "close", REAL_CLOSE)
        failing.close_others()
