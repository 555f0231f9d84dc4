"""Retrievals from a source PACS, without a network: the queries the node accepts, the
``[[sources]]`` configuration, the ledger's requests (SQLite and PostgreSQL: claims, leases,
attempts), the command line, the HTTP API and the dashboard's form. Over real associations:
``tests/integration/test_retrieval.py``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from acwi_node.cli import main
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.ingest.retrieval import QueryError, check_query, describe_query
from acwi_node.ledger import Ledger
from acwi_node.ledger.retrievals import Retrievals
from acwi_node.retention import DiskSpace, Retention
from acwi_node.web.api import create_app
from tests.support.review_case import CSRF, PASSWORD, add_user, sign_in
from tests.support.study_flow import analyse, receive
from tests.unit.test_retention import later
from tests.unit.test_study_actions import fail_deliveries

SOURCE = {"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 104}


# ------------------------------------------------------------------ queries
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"study_uid": " 1.2.3 "}, {"study_uid": "1.2.3"}),
        ({"accession_number": "A1001", "modality": None}, {"accession_number": "A1001"}),
        ({"study_date": "20261101-20261130", "modality": "ct"},
         {"study_date": "20261101-20261130", "modality": "CT"}),
        ({"study_date": "20261101-"}, {"study_date": "20261101-"}),
        ({"study_date": "-20261130", "study_uid": ""}, {"study_date": "-20261130"}),
    ],
)  # fmt: skip
def test_queries_the_node_sends(query: dict[str, str | None], expected: dict[str, str]) -> None:
    assert check_query(query) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"modality": "CT"}, "give a study_uid, an accession_number or a study_date"),
        ({}, "give a study_uid"),
        ({"patient_id": "P1"}, "unknown query key(s) patient_id"),
        ({"study_uid": "../../etc/passwd"}, "is not a UID"),
        ({"study_uid": "1." + "2" * 70}, "is not a UID"),
        ({"accession_number": "A*"}, "no \\ * or ?"),
        ({"accession_number": "A\\B"}, "no \\ * or ?"),
        ({"accession_number": "X" * 17}, "at most 16"),
        ({"study_date": "2026-11-01"}, "is not YYYYMMDD"),
        ({"study_date": "20261301"}, "is not a date"),
        ({"study_date": "-"}, "is not YYYYMMDD"),
        ({"study_date": "20261130-20261101"}, "ends before it starts"),
        ({"study_date": "20261101", "modality": "C T"}, "is not a modality code"),
    ],
)
def test_queries_the_node_refuses(query: dict[str, str | None], message: str) -> None:
    with pytest.raises(QueryError) as err:
        check_query(query)
    assert message in str(err.value)


def test_a_query_described_for_people_in_a_fixed_order() -> None:
    query = {"modality": "CT", "study_date": "20261101"}
    assert describe_query(query) == "study_date=20261101, modality=CT"


# ------------------------------------------------------------------ configuration
def test_a_source_defaults_to_the_node_ae_title_and_names_are_unique(tmp_path: Path) -> None:
    settings = load_settings(None, node={"data_dir": tmp_path}, sources=[SOURCE])
    src = settings.source("pacs")
    assert (src.calling_ae("ACWI"), src.destination_ae("ACWI")) == ("ACWI", "ACWI")
    assert src.where == "PACS@pacs.example:104"
    other = load_settings(
        None,
        node={"data_dir": tmp_path},
        sources=[{**SOURCE, "calling_ae_title": "ACWIQR", "move_destination": "ACWISCP"}],
    ).source("pacs")
    assert (other.calling_ae("ACWI"), other.destination_ae("ACWI")) == ("ACWIQR", "ACWISCP")
    with pytest.raises(ConfigError, match="sources: name 'pacs' is used twice"):
        load_settings(None, node={"data_dir": tmp_path}, sources=[SOURCE, SOURCE])
    with pytest.raises(ConfigError, match="sources.0.ae_title"):
        load_settings(None, node={"data_dir": tmp_path}, sources=[{**SOURCE, "ae_title": "A\\B"}])
    with pytest.raises(ConfigError, match="retrieve.max_attempts"):
        load_settings(None, node={"data_dir": tmp_path}, retrieve={"max_attempts": 0})


def test_a_source_is_a_dicom_node_or_a_dicomweb_service(tmp_path: Path) -> None:
    def source(**fields: object) -> Settings:
        return load_settings(None, node={"data_dir": tmp_path}, sources=[{"name": "s", **fields}])

    web = source(url="https://vna.example/dicom-web").source("s")
    assert (web.kind, web.where) == ("dicomweb", "https://vna.example/dicom-web")
    dimse = source(**{k: v for k, v in SOURCE.items() if k != "name"}).sources[0]
    assert (dimse.kind, dimse.uses_get) == ("dimse", False)
    fields = {k: v for k, v in SOURCE.items() if k != "name"}
    assert source(**fields, retrieve_with="get").sources[0].uses_get
    assert not web.uses_get
    cases: list[tuple[dict[str, object], str]] = [
        ({"ae_title": "PACS", "host": "h"}, "port missing"),
        ({**SOURCE, "url": "https://vna.example"}, "not both"),
        ({"url": "https://vna.example", "move_destination": "ACWI"},
         "move_destination applies to DIMSE sources"),
        ({**SOURCE, "token_file": "/run/token"}, "apply to DICOMweb (url) only"),
        ({"url": "ftp://vna.example"}, "url must be http:// or https://"),
        ({"url": "https://vna.example", "username": "u"}, "username and password_file go"),
        ({"url": "https://vna.example", "retrieve_with": "get"},
         "retrieve_with applies to DIMSE sources"),
        ({**SOURCE, "retrieve_with": "get", "move_destination": "ACWI"},
         "move_destination applies to retrieve_with = 'move' only"),
        ({**SOURCE, "retrieve_with": "fetch"}, "retrieve_with"),
    ]  # fmt: skip
    for fields, message in cases:
        fields.pop("name", None)
        with pytest.raises(ConfigError, match=re.escape(message)):
            source(**fields)


# ------------------------------------------------------------------ the ledger
def test_a_retrieval_is_claimed_once_and_taken_up_again_when_its_lease_runs_out(
    db: Ledger,
) -> None:
    retrievals = Retrievals(db)
    rid = retrievals.request("pacs", {"accession_number": "A1"}, requested_by="ada")
    first = retrievals.claim(lease_s=3600)
    assert first is not None and (first.id, first.attempt, first.requested_by) == (rid, 1, "ada")
    assert retrievals.claim(lease_s=3600) is None  # running, its lease holds
    retrievals.found(rid, ["1.2.3", "1.2.4"])
    retrievals.progress(rid, lease_s=0.0, retrieved_uid="1.2.3", completed=5, failed=1)
    time.sleep(0.01)
    again = retrievals.claim(lease_s=3600)  # the process running it stopped
    assert again is not None and again.attempt == 2
    assert (again.study_uids, again.retrieved_uids) == (["1.2.3", "1.2.4"], ["1.2.3"])
    retrievals.progress(rid, lease_s=3600, retrieved_uid="1.2.4", completed=2, warnings=1)
    retrievals.finish(rid, note="2 of 2 study(ies) retrieved")
    view = retrievals.get(rid)
    assert view is not None
    assert (view.state, view.studies_found, view.studies_retrieved) == ("done", 2, 2)
    assert (view.completed, view.failed, view.warnings) == (7, 1, 1)
    assert view.finished_at is not None and view.next_attempt_at is None
    assert retrievals.counts() == {"queued": 0, "running": 0, "done": 1, "failed": 0}


def test_a_retrieval_tried_again_waits_for_its_back_off(db: Ledger) -> None:
    retrievals = Retrievals(db)
    rid = retrievals.request("pacs", {"study_uid": "1.2.3"})
    assert retrievals.claim(lease_s=60) is not None
    retrievals.retry(rid, error="connection refused by pacs:104", after_s=3600)
    assert retrievals.claim(lease_s=60) is None
    view = retrievals.get(rid)
    assert view is not None and view.state == "queued" and view.next_attempt_at is not None
    assert view.error == "connection refused by pacs:104"
    newer = retrievals.request("pacs", {"study_uid": "1.2.4"})
    assert [v.id for v in retrievals.recent()] == [newer, rid]
    with pytest.raises(ValueError, match="unknown query key"):
        retrievals.request("pacs", {"patient_name": "DOE^JANE"})


# ------------------------------------------------------------------ command line
def test_the_command_line_queues_and_lists_retrievals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "acwi-node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[[sources]]\nname = "pacs"\n'
        'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    base = ["--config", str(config), "studies"]
    assert main([*base, "retrieve", "vna", "--study-uid", "1.2.3"]) == 2
    assert "no source named 'vna' (configured: pacs" in capsys.readouterr().err
    assert main([*base, "retrieve", "pacs", "--modality", "CT"]) == 2
    assert "give a study_uid" in capsys.readouterr().err
    assert main([*base, "retrieve", "pacs", "--accession", "A1001", "--modality", "ct"]) == 0
    assert "retrieval #1 queued: pacs: accession_number=A1001, modality=CT" in (
        capsys.readouterr().out
    )
    # Nothing runs it here (no scp process): --wait gives up, and says why it may be.
    assert main([*base, "retrieve", "pacs", "--study-uid", "1.2.3", "--wait", "0.2"]) == 1
    assert "still queued after 0.2 s (is the scp process running?)" in capsys.readouterr().err
    assert main([*base, "retrievals"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("#2 queued  pacs: study_uid=1.2.3: 0/0 study(ies)")
    assert out[1].startswith("#1 queued  pacs: accession_number=A1001, modality=CT")
    assert main([*base, "retrievals", "--json", "--limit", "1"]) == 0
    assert '"study_uid": "1.2.3"' in capsys.readouterr().out


def test_sources_check_says_it_asked_a_dicomweb_source_by_qido_rs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DICOMweb source is checked by a QIDO-RS query, as a DICOMweb destination is: its
    line says so, not "C-ECHO and C-FIND" (which a DICOMweb service is never sent)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Qido(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "acwi-node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[[sources]]\nname = "vna"\n'
        f'url = "http://127.0.0.1:{server.server_port}/dicom-web"\n'
    )
    try:
        assert main(["--config", str(config), "sources", "check"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/dicom-web/studies?limit=1"]
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"vna \(http://127\.0\.0\.1:{server.server_port}/dicom-web\): QIDO-RS ok, \d+ ms\n",
        out,
    ), out


# ------------------------------------------------------------------ HTTP API and dashboard
@pytest.fixture
def settings(ledger_node: tuple[Settings, Ledger]) -> Settings:
    return ledger_node[0].model_copy(
        update={"sources": [load_settings(sources=[SOURCE]).sources[0]]}
    )


def test_the_api_queues_retrievals_for_administrators_only(
    ledger_node: tuple[Settings, Ledger], settings: Settings
) -> None:
    ledger = ledger_node[1]
    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    admin, radiologist = ("ada.admin", PASSWORD), ("jane.doe", PASSWORD)
    body = {"source": "pacs", "accession_number": "A1001"}
    with TestClient(create_app(settings, ledger)) as client:
        assert client.post("/api/retrievals", json=body).status_code == 401
        assert client.post("/api/retrievals", json=body, auth=radiologist).status_code == 403
        assert client.post("/api/retrievals", data=body, auth=admin).status_code == 415
        unknown = client.post("/api/retrievals", json={**body, "source": "vna"}, auth=admin)
        assert unknown.status_code == 422 and "no source named 'vna'" in unknown.json()["detail"]
        bad = client.post("/api/retrievals", json={"source": "pacs", "modality": "CT"}, auth=admin)
        assert bad.status_code == 422 and "give a study_uid" in bad.json()["detail"]
        extra = client.post("/api/retrievals", json={**body, "patient_id": "P1"}, auth=admin)
        assert extra.status_code == 422
        queued = client.post("/api/retrievals", json=body, auth=admin)
        assert queued.status_code == 202, queued.text
        got = queued.json()["retrieval"]
        assert (got["state"], got["requested_by"], got["query"]) == (
            "queued", "ada.admin", {"accession_number": "A1001"},
        )  # fmt: skip
        listed = client.get("/api/retrievals", auth=radiologist).json()
        assert [r["id"] for r in listed["retrievals"]] == [got["id"]]
        assert listed["counts"]["queued"] == 1
        one = client.get(f"/api/retrievals/{got['id']}", auth=radiologist)
        assert one.status_code == 200 and one.json()["studies"] == []
        assert client.get("/api/retrievals/999", auth=radiologist).status_code == 404


def test_administrators_retrieve_from_the_dashboard(
    ledger_node: tuple[Settings, Ledger], settings: Settings
) -> None:
    ledger = ledger_node[1]
    add_user(ledger, "ada.admin", role="admin")
    add_user(ledger, "jane.doe")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client, "jane.doe")
        page = client.get("/review/dashboard")
        assert "Retrieve from a PACS" not in page.text
        csrf = CSRF.search(page.text)
        assert csrf is not None
        form = {"csrf_token": csrf.group(1), "source": "pacs", "study_uid": "1.2.3"}
        assert client.post("/review/retrievals", data=form).status_code == 403

    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        token = sign_in(client, "ada.admin")
        html = client.get("/review/dashboard").text
        assert "Retrieve from a PACS" in html and "No retrievals yet." in html
        form = {"csrf_token": token, "source": "pacs", "study_uid": "", "accession_number": ""}
        refused = client.post("/review/retrievals", data={**form, "study_date": "2026-11-01"})
        assert refused.status_code == 422 and "is not YYYYMMDD" in refused.text
        forged = client.post("/review/retrievals", data={**form, "csrf_token": "x"})
        assert forged.status_code == 403
        done = client.post(
            "/review/retrievals",
            data={**form, "accession_number": "<b>A1</b>"},
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"].endswith("done=retrieve")
        html = client.get(done.headers["location"]).text
        assert "The retrieval is queued" in html
        assert "accession_number=&lt;b&gt;A1&lt;/b&gt;" in html and "<b>A1</b>" not in html
        (view,) = Retrievals(ledger).recent()
        assert (view.requested_by, view.query) == ("ada.admin", {"accession_number": "<b>A1</b>"})


def test_a_failed_study_whose_files_were_deleted_is_offered_for_retrieval(
    ledger_node: tuple[Settings, Ledger], settings: Settings
) -> None:
    ledger = ledger_node[1]
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")
    fail_deliveries(ledger)
    Retention(settings, ledger, space=lambda: DiskSpace(900, 1000), clock=later(200)).sweep()
    add_user(ledger, "ada.admin", role="admin")
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        token = sign_in(client, "ada.admin")
        html = client.get("/review/dashboard").text
        assert "files deleted: send it again from the PACS" in html
        assert '<input type="hidden" name="study_uid" value="1.2.3">' in html
        done = client.post(
            "/review/retrievals",
            data={"csrf_token": token, "source": "pacs", "study_uid": "1.2.3"},
            follow_redirects=False,
        )
        assert done.status_code == 303
    (view,) = Retrievals(ledger).recent()
    assert view.query == {"study_uid": "1.2.3"}


def test_a_get_proposes_the_studys_own_classes_first() -> None:
    """The classes the PACS lists for the study come first (once each; a UID that could name a
    path is dropped), then the most used, 127 in all; none listed: the default 127."""
    from acwi_node.ingest.qr_scu import GET_STORAGE_CLASSES, MAX_CONTEXTS, get_classes

    rare = "1.2.840.10008.5.1.4.1.1.88.35"  # Extensible SR: beyond the default 127
    assert rare not in GET_STORAGE_CLASSES
    common = GET_STORAGE_CLASSES[0]
    chosen = get_classes([rare, common, rare, "../etc"])
    assert chosen[:2] == [rare, common] and "../etc" not in chosen
    assert len(chosen) == len(set(chosen)) == MAX_CONTEXTS - 1
    assert get_classes() == GET_STORAGE_CLASSES
