"""Retrieving studies from a DICOMweb source: a real Orthanc's DICOMweb plugin, with HTTP Basic
authentication on, answers QIDO-RS and WADO-RS; the node stores each study as a STOW-RS
request's and completes it at once. The quiet period is an hour, as in ``test_retrieval.py``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from acwi_node.cli import main
from acwi_node.config import load_settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.mpps import CompletionSignals
from acwi_node.ingest.retrieval import RetrievalService
from acwi_node.ledger import Ledger
from tests.integration.test_retrieval import HOUR, Node, put_study
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

USER = ("acwi", "qido-s3cret")


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    require_orthanc()
    with OrthancServer(http_user=USER) as server:
        server.require_dicomweb()
        yield server


@pytest.fixture
def make_node(tmp_path: Path, orthanc: OrthancServer) -> Iterator[Callable[..., Node]]:
    ledgers: list[Ledger] = []
    secret = tmp_path / "password"
    secret.write_text(USER[1] + "\n")

    def make(*, password_file: Path = secret, url: str = "", **retrieve: Any) -> Node:
        settings = load_settings(
            None,
            node={"data_dir": tmp_path / "data"},
            ingest={"fsync": False},
            completion={"quiet_period_s": HOUR, "max_wait_s": HOUR, "poll_interval_s": HOUR},
            retrieve={"timeout_s": 30, "backoff_s": 0.01, **retrieve},
            sources=[{"name": "pacs", "url": url or f"{orthanc.url}/dicom-web",
                      "username": USER[0], "password_file": password_file}],
        )  # fmt: skip
        ledger = Ledger(settings.database_url)
        ledgers.append(ledger)
        signals = CompletionSignals(ledger)
        celery = Celery("acwi-test-retrieval", broker="redis://127.0.0.1:6379/9")
        completion = CompletionService(settings, ledger, celery, signals=signals)
        return Node(settings, ledger, RetrievalService(settings, ledger, signals), completion)

    yield make
    for ledger in ledgers:
        ledger.dispose()


def test_a_study_is_found_by_qido_rs_read_by_wado_rs_and_complete_at_once(
    orthanc: OrthancServer, make_node: Callable[..., Node]
) -> None:
    study = put_study(orthanc, 3, accession="WR1001")
    put_study(orthanc, 1, accession="WR1002")
    n = make_node()
    view = n.run(n.request(accession_number="WR1001"))
    assert (view.state, view.error) == ("done", "")
    assert (view.study_uids, view.completed, view.failed) == ([study], 3, 0)
    st = n.ledger.get_study(study)
    assert st is not None and st["instances"] == 3
    assert st["calling_ae"] == "pacs"  # the source's name stands for the calling AE title
    assert not list((n.settings.spool_dir / ".tmp").glob("wado-*"))  # the response file went
    n.completion.tick()  # no quiet period: the response was the whole study
    assert n.state(study) == "not_routed"


def test_a_wrong_password_is_tried_again_and_fails_with_the_answer(
    orthanc: OrthancServer, make_node: Callable[..., Node], tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    n = make_node(password_file=wrong, max_attempts=1)
    view = n.run(n.request(study_uid="1.2.3"))
    assert view.state == "failed"
    assert "QIDO-RS to " in view.error and "HTTP 401 Unauthorized" in view.error


def test_a_study_the_service_does_not_have_is_no_match(make_node: Callable[..., Node]) -> None:
    n = make_node()
    view = n.run(n.request(study_uid="1.2.826.0.1.3680043.10.1511.404"))
    assert (view.state, view.attempts) == ("failed", 1)
    assert view.error == "no study on pacs matches study_uid=1.2.826.0.1.3680043.10.1511.404"


def test_a_service_that_is_down_is_tried_again(make_node: Callable[..., Node]) -> None:
    n = make_node(url=f"http://127.0.0.1:{free_port()}/dicom-web", max_attempts=2)
    view = n.run(n.request(study_uid="1.2.3"))
    assert view.state == "queued" and "ConnectionRefusedError" in view.error


def test_sources_check_queries_the_service(
    orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "password"
    secret.write_text(USER[1])
    config = tmp_path / "acwi-node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[[sources]]\nname = "vna"\n'
        f'url = "{orthanc.url}/dicom-web"\nusername = "{USER[0]}"\npassword_file = "{secret}"\n'
    )
    assert main(["--config", str(config), "sources", "check", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["ok"] and row["where"] == f"{orthanc.url}/dicom-web"
