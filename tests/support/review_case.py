"""Review cases for tests: a synthetic study stored, completed and analysed for real.

:func:`review_settings` gives settings whose model is a copy of the bundled one with an
uncertainty threshold near zero, so every analysed study lands on the worklist;
:func:`make_review_case` spools a phantom study, records it in the ledger, completes it with a
job routed to one destination and runs the real analyse task (SR and heatmaps written).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from fastapi.testclient import TestClient

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger, RoutedJob
from acwi_node.review import auth
from acwi_node.review.store import ReviewStore
from acwi_node.tasks.analyse import run_job
from models.data.synth import write_study
from tests.support.model_variant import model_variant
from tests.support.study_flow import spool_and_record

MODEL = "review-model"
ROUTE = "review-route"
DESTINATION = "pacs"
PASSWORD = "correct horse battery"


def review_model(root: Path) -> Path:
    """A copy of the bundled model that sends every study to review."""
    target = root / "review-model"
    if not target.exists():
        model_variant(target, uncertainty_threshold=1e-9, ood_threshold=1e-9)
    return target / "manifest.json"


def review_settings(
    tmp_path: Path,
    *,
    database_url: str | None = None,
    pacs_ae: str = "PACS",
    pacs_port: int = 11199,
    model_manifest: Path | None = None,
    review: dict[str, Any] | None = None,
    extra_models: Sequence[dict[str, Any]] = (),
    **extra: Any,
) -> Settings:
    """Settings of a node in ``tmp_path`` whose route runs :func:`review_model` (or
    ``model_manifest``) and sends to one destination; ``review`` adds ``[review]`` keys,
    ``extra_models`` more ``[[models]]``."""
    node: dict[str, Any] = {"data_dir": tmp_path / "data"}
    if database_url:
        node["database_url"] = database_url
    return load_settings(
        None,
        node=node,
        ingest={"fsync": False},
        worker={"mc_samples": 4, "torch_threads": 2, "engine": "pytorch"},
        models=[
            {"name": MODEL, "manifest": model_manifest or review_model(tmp_path)},
            *extra_models,
        ],
        destinations=[
            {"name": DESTINATION, "ae_title": pacs_ae, "host": "127.0.0.1", "port": pacs_port}
        ],
        review={"cookie_secure": False, **(review or {})},
        **extra,
    )


def store_and_route(
    settings: Settings,
    ledger: Ledger,
    files: list[Path],
    *,
    calling_ae: str = "SITEA",
    priority: int = 0,
    destinations: Sequence[str] = (DESTINATION,),
    route: str = ROUTE,
) -> tuple[int, str]:
    """Spool and record a study's files as the SCP would, complete it, and route it to
    ``route`` (default ``review-route``; the review model, to ``destinations``); returns (job
    id, study UID)."""
    spool = Spool(settings.spool_dir, fsync=False)
    study_id = generation = 0
    study_uid = ""
    for n, path in enumerate(files):
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study_uid = str(ds.StudyInstanceUID)
        rec = spool_and_record(
            spool, ledger, data, ds, calling_ae=calling_ae, first_in_association=n == 0
        )
        study_id, generation = rec.study_id, rec.generation
    ledger.association_released([study_id])
    jobs = ledger.complete_study(
        study_id,
        generation,
        lambda _facts: [RoutedJob(route, MODEL, list(destinations), priority)],
    )
    assert len(jobs) == 1
    return jobs[0], study_uid


def flagged_case(
    settings: Settings,
    ledger: Ledger,
    ds: pydicom.Dataset,
    summary: dict[str, Any],
    *,
    calling_ae: str,
    review_reason: str = "uncertain",
) -> int:
    """Spool and record the one image ``ds`` as the SCP would (from ``calling_ae``), complete
    its study, and finish its job with ``summary`` as an analysis that asks for review, without
    running a model; returns the worklist item's id."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    spool = Spool(settings.spool_dir, fsync=False)
    rec = spool_and_record(
        spool, ledger, buf.getvalue(), ds, calling_ae=calling_ae, first_in_association=True
    )
    ledger.association_released([rec.study_id])
    (job,) = ledger.complete_study(
        rec.study_id, rec.generation, lambda _f: [RoutedJob("r", "default", [], 0)]
    )
    assert ledger.claim_job(job, lease_s=30) is not None
    assert ledger.finish_analysis(
        job, results=[], summary=summary, needs_review=True, review_reason=review_reason
    )
    return int(ledger.worklist()[0]["id"])


def make_review_case(
    settings: Settings,
    ledger: Ledger,
    work_dir: Path,
    *,
    patient_name: str = "PHANTOM^ONE",
    calling_ae: str = "SITEA",
    label: str = "nodule",
    seed: int = 0,
    priority: int = 0,
    accession: str = "ACC0001",
    files: list[Path] | None = None,
) -> tuple[int, str]:
    """Store, complete and analyse one synthetic study (two radiographs, or ``files``);
    returns (review item id, study UID)."""
    files = files or write_study(
        work_dir / f"src-{seed}-{calling_ae}",
        n_images=2,
        label=label,
        seed=seed,
        size=128,
        patient_name=patient_name,
        accession_number=accession,
    )
    job_id, study_uid = store_and_route(
        settings, ledger, files, calling_ae=calling_ae, priority=priority
    )
    outcome = run_job(settings, ledger, job_id)
    assert outcome == "analysed", outcome
    items = [i for i in ledger.worklist() if i["study_uid"] == study_uid]
    assert len(items) == 1, "the analysed study did not land on the worklist"
    return int(items[0]["id"]), study_uid


def add_user(ledger: Ledger, name: str = "jane.doe", role: str = "radiologist") -> None:
    ReviewStore(ledger).add_user(name, auth.hash_password(PASSWORD), role)


#: The CSRF token in a page's forms.
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def sign_in(client: TestClient, name: str = "jane.doe", password: str = PASSWORD) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    assert page.status_code == 200
    token = CSRF.search(page.text)
    assert token is not None
    answer = client.post(
        "/login",
        data={"csrf_token": token.group(1), "username": name, "password": password, "next": "/"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    worklist = client.get("/review/worklist")
    assert worklist.status_code == 200
    found = CSRF.search(worklist.text)
    assert found is not None
    return found.group(1)
