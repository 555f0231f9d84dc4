"""Withdrawing results from the PACS: the rejection note (an IHE IOCM Key Object Selection
document, valid by dciodvfy), what the ledger records and refuses afterwards, the command
line (``studies withdraw``, ``models recall``), the API and the study page. Real analyses
(the bundled model's results), on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text, update

from acwi_node.cli import main
from acwi_node.config import Settings
from acwi_node.export import withdrawal as withdrawal_module
from acwi_node.export.outbox import Exporter
from acwi_node.export.withdrawal import withdraw_replaced, withdraw_results
from acwi_node.inference.types import ImageResult, ModelIdentity, StudyAnalysis, Uncertainty
from acwi_node.ledger import Ledger, ResultFile, RoutedJob, StudyActionRefused, repository
from acwi_node.ledger import withdrawals as withdrawals_module
from acwi_node.ledger.models import (
    Delivery,
    DeliveryState,
    Job,
    Result,
    ReviewItem,
    ReviewState,
    Verdict,
    utcnow,
)
from acwi_node.ledger.trace import study_trace
from acwi_node.monitoring.turnaround import TurnaroundMonitor
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.rejection import REJECTION_SERIES_NUMBER, build_rejection_note
from acwi_node.results.sr import build_sr
from acwi_node.retention import DiskSpace, Retention
from acwi_node.review.store import ItemClosed, ReviewError, ReviewStore, SessionInfo
from acwi_node.review.verdicts import amend_verdict, submit_verdict
from acwi_node.tasks.analyse import run_job
from acwi_node.web.api import create_app
from models.data.synth import write_study
from tests.support.dciodvfy import dciodvfy_errors, require_dciodvfy
from tests.support.dx import make_dx
from tests.support.model_variant import model_variant
from tests.support.review_case import (
    CSRF,
    MODEL,
    PASSWORD,
    ROUTE,
    add_user,
    review_settings,
    sign_in,
    store_and_route,
)
from tests.support.study_flow import deliver, study_id
from tests.unit.test_retention import later

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
NOTE = "model 1.3 recalled by its maker: false negatives on small nodules"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Settings, Ledger]]:
    """A node with two destinations: ``pacs`` takes every result, ``viewer`` the SR alone."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    settings = review_settings(tmp_path, database_url=url)
    dests = [
        settings.destinations[0].model_dump(),
        {"name": "viewer", "ae_title": "VIEWER", "host": "127.0.0.1", "port": 11198,
         "results": ["sr"]},
    ]  # fmt: skip
    settings = settings.model_copy(
        update={"destinations": [type(settings.destinations[0])(**d) for d in dests]}
    )
    ledger = Ledger(settings.database_url)
    yield settings, ledger
    ledger.dispose()


def analysed(
    settings: Settings, ledger: Ledger, tmp_path: Path, *, seed: int = 0, name: str = "PHANTOM^ONE"
) -> tuple[int, str]:
    """A real study analysed by the review model, routed to both destinations; (job, UID)."""
    files = write_study(
        tmp_path / f"src-{seed}", n_images=2, label="nodule", seed=seed, size=128,
        patient_name=name, accession_number=f"ACC{seed}",
    )  # fmt: skip
    job_id, uid = store_and_route(settings, ledger, files, destinations=("pacs", "viewer"))
    assert run_job(settings, ledger, job_id) == "analysed"
    return job_id, uid


def deliveries(ledger: Ledger, job_id: int) -> list[tuple[str, str, str]]:
    """(destination, result kind, state) of each of the job's deliveries."""
    view = ledger.session()
    with view as s:
        rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
        return sorted((d.destination, d.result.kind, d.state.value) for d in rows)


@dataclass(frozen=True)
class JobView:
    state: str
    withdrawn: bool


def report_jobs(ledger: Ledger, uid: str) -> list[JobView]:
    """The study's jobs, oldest first: state, and whether withdrawn."""
    view = ledger.get_study(uid)
    assert view is not None
    return [JobView(j["state"], j["withdrawn"] is not None) for j in view["jobs"]]


def all_notes_due(ledger: Ledger, settings: Settings) -> dict[tuple[str, str], Any]:
    """The rejection notes waiting in the outbox, read: (study UID, destination) -> dataset."""
    due = [(d, dcmread(settings.results_dir / d.path)) for d in ledger.due_deliveries()]
    return {(d.study_uid, d.destination): ds for d, ds in due if ds.SOPClassUID == KOS}


def notes_due(ledger: Ledger, settings: Settings) -> dict[str, Any]:
    """The rejection notes waiting in the outbox for one study: destination -> dataset."""
    found = all_notes_due(ledger, settings)
    assert len({study for study, _ in found}) <= 1
    return {destination: ds for (_, destination), ds in found.items()}


def referenced(note: Any) -> set[str]:
    return {
        sop.ReferencedSOPInstanceUID
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def test_a_delivered_studys_results_are_withdrawn_with_a_note_per_destination(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    assert ledger.get_study(uid)["state"] == "delivered"  # type: ignore[index]
    with ledger.session() as s:
        results = {r.kind: r.sop_instance_uid for r in s.get_one(Job, job_id).results}
        heatmaps = {
            r.sop_instance_uid for r in s.get_one(Job, job_id).results if r.kind == "heatmap"
        }
    assert len(heatmaps) == 2 and "sr" in results

    report = withdraw_results(
        settings, ledger, reason="safety", note=NOTE, by="admin", study_uid=uid
    )
    (job,) = report.jobs
    assert job.withdrawn and job.rejected == 3 and job.queued == 2 and job.cancelled == 0
    notes = notes_due(ledger, settings)
    assert set(notes) == {"pacs", "viewer"}
    # each destination's note names what it may hold: the SR alone for the viewer
    assert referenced(notes["pacs"]) == heatmaps | {results["sr"]}
    assert referenced(notes["viewer"]) == {results["sr"]}
    pacs = notes["pacs"]
    title = pacs.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113037", "DCM")
    assert str(pacs.PatientName) == "PHANTOM^ONE" and pacs.StudyInstanceUID == uid
    assert pacs.Manufacturer == "ACWI Node" and pacs.Modality == "KO"
    assert pacs.SeriesNumber == REJECTION_SERIES_NUMBER
    description = [
        item.TextValue
        for item in pacs.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    assert description and NOTE in description[0]
    require_dciodvfy()
    path = next(settings.results_dir.rglob(f"{pacs.SOPInstanceUID}.dcm"))
    assert dciodvfy_errors(path) == []

    # the job exports its notes, then is delivered again; the trace tells who and why
    assert ledger.get_study(uid)["state"] == "exporting"  # type: ignore[index]
    deliver(ledger)
    view = ledger.get_study(uid)
    assert view is not None and view["state"] == "delivered"
    withdrawn = view["jobs"][0]["withdrawn"]
    assert withdrawn["by"] == "admin" and withdrawn["reason"] == "safety"
    assert withdrawn["note"] == NOTE
    trace = study_trace(ledger, uid)
    assert trace is not None
    text = trace.render()
    assert "results withdrawn from the PACS by admin (rejected for patient safety reasons)" in text
    assert "(1 rejection-note) stored by pacs" in text
    # the turnaround is the analysis's own: the note delivered later does not count
    assert trace.turnaround and trace.turnaround[-1].seconds is not None
    assert trace.turnaround[-1].seconds < 600

    # nothing of it is sent again: resend is refused, a second withdrawal finds nothing
    with pytest.raises(StudyActionRefused, match="withdrawn from the PACS: reprocess"):
        ledger.resend_results(uid)
    again = withdraw_results(
        settings, ledger, reason="quality", note="again", by="x", study_uid=uid
    )
    assert again.jobs == [] and again.withdrawn_before == 1


def test_results_still_in_the_outbox_are_never_sent_and_named_in_the_note(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    assert len(ledger.due_deliveries()) == 4  # 3 objects to the PACS, the SR to the viewer

    report = withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    (job,) = report.jobs
    assert job.cancelled == 4 and job.queued == 2
    # a pending object may be on its way while it is withdrawn: the note names it all the same
    notes = notes_due(ledger, settings)
    assert len(referenced(notes["pacs"])) == 3
    assert notes["pacs"].ConceptNameCodeSequence[0].CodeValue == "113001"
    assert [d.destination for d in ledger.due_deliveries()] == ["pacs", "viewer"]
    states = deliveries(ledger, job_id)
    assert states.count(("pacs", "heatmap", "superseded")) == 2
    assert ("viewer", "sr", "superseded") in states
    assert ("pacs", "rejection-note", "pending") in states
    # an attempt that was in flight and answers now changes nothing
    deliver(ledger)
    assert deliveries(ledger, job_id).count(("pacs", "heatmap", "superseded")) == 2
    assert ledger.get_study(uid)["state"] == "delivered"  # type: ignore[index]


def test_results_that_reached_no_destination_are_withdrawn_without_a_note(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    for d in ledger.due_deliveries():
        ledger.record_delivery(
            d.id, delivered=False, status=0xA700, error="out of resources", max_attempts=1,
            backoff_s=1,
        )  # fmt: skip
    assert ledger.get_study(uid)["state"] == "failed"  # type: ignore[index]
    (job,) = withdraw_results(
        settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid
    ).jobs
    assert job.withdrawn and job.rejected == 0 and job.queued == 0
    assert ledger.due_deliveries() == []
    # they were never stored, and now never will be
    with pytest.raises(StudyActionRefused, match="withdrawn"):
        ledger.resend_results(uid)


def test_a_withdrawn_cases_review_closes_and_takes_no_verdict(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    with ledger.session() as s:
        item = s.scalars(select(ReviewItem).where(ReviewItem.job_id == job_id)).one()
        assert item.state.value == "open"
    withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    with ledger.session() as s:
        item = s.scalars(select(ReviewItem).where(ReviewItem.job_id == job_id)).one()
        assert (item.state.value, item.reason) == ("closed", "withdrawn")
    # a verified SR of a withdrawn analysis is never queued
    with pytest.raises(StudyActionRefused, match="withdrawn"):
        ledger.attach_result(job_id, ResultFile("sr-verified", "1.2.3.4", KOS, "x.dcm"))
    add_user(ledger, "rad", "radiologist")
    with TestClient(create_app(settings)) as client:
        sign_in(client, "rad")
        page = client.get(f"/review/cases/{item.id}").text
        assert "its AI results were withdrawn from the PACS" in page
        assert 'name="action"' not in page  # no verdict form


def _radiologist(
    ledger: Ledger, job_id: int, name: str = "rad"
) -> tuple[int, ReviewStore, SessionInfo]:
    """A radiologist ``name`` for the job's review case: (case id, store, their session)."""
    with ledger.session() as s:
        item_id = s.scalars(select(ReviewItem.id).where(ReviewItem.job_id == job_id)).one()
    add_user(ledger, name, "radiologist")
    store = ReviewStore(ledger)
    found = store.get_user(name)
    assert found is not None
    return item_id, store, SessionInfo(found.id, found.name, found.role, "", utcnow())


def _confirmed_by_a_radiologist(
    settings: Settings, ledger: Ledger, job_id: int
) -> tuple[int, ReviewStore, SessionInfo, Any]:
    """A radiologist ("rad") confirms the job's review case: (case id, store, the
    radiologist's session, the verdict's outcome)."""
    item_id, store, rad = _radiologist(ledger, job_id)
    return item_id, store, rad, submit_verdict(settings, store, item_id, rad, action="confirm")


def unrecorded_files(settings: Settings, ledger: Ledger) -> list[str]:
    """The DICOM files in the results directory that no result in the ledger names (a
    verified SR written for a verdict that was refused)."""
    with ledger.session() as s:
        known = set(s.scalars(select(Result.path)).all())
    found = (
        p.relative_to(settings.results_dir).as_posix() for p in settings.results_dir.rglob("*.dcm")
    )
    return sorted(path for path in found if path not in known)


def _item(ledger: Ledger, item_id: int) -> tuple[str, str]:
    """A review item's state and reason."""
    with ledger.session() as s:
        item = s.get_one(ReviewItem, item_id)
        return item.state.value, item.reason


def _verdicts(ledger: Ledger, item_id: int) -> list[tuple[str, bool]]:
    """A review item's verdicts: action, and whether an amendment replaced it."""
    with ledger.session() as s:
        rows = s.scalars(select(Verdict).where(Verdict.review_item_id == item_id)).all()
        return [(v.action, v.superseded_at is not None) for v in rows]


def _kinds(ledger: Ledger, job_id: int) -> list[str]:
    with ledger.session() as s:
        return sorted(r.kind for r in s.get_one(Job, job_id).results)


def _basic(name: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_a_decided_case_withdrawn_later_cannot_be_amended(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    item_id, store, rad, verdict = _confirmed_by_a_radiologist(settings, ledger, job_id)
    deliver(ledger)
    withdraw_results(settings, ledger, reason="safety", note=NOTE, by="a", study_uid=uid)
    with TestClient(create_app(settings)) as client:
        sign_in(client, "rad")
        page = client.get(f"/review/cases/{item_id}?amend=1").text
        assert "its AI results were withdrawn from the PACS" in page
        assert 'id="amend-link"' not in page and "Amend verdict</button>" not in page
    with pytest.raises(ReviewError, match="withdrawn from the PACS"):
        amend_verdict(
            settings, store, item_id, rad, amends=verdict.verdict_id, action="override",
            label="normal", reason="scar",
        )  # fmt: skip
    # the refused amendment left nothing behind: the verdict stands, nothing queued
    case = store.case(item_id)
    assert case is not None and case["current_verdict"] == verdict.verdict_id
    with ledger.session() as s:
        kinds = [r.kind for r in s.get_one(Job, job_id).results]
    assert kinds.count("sr-verified") == 1  # the verdict's, not the amendment's
    assert unrecorded_files(settings, ledger) == []  # nor its verified SR's file


def test_a_verdict_claimed_as_its_results_are_withdrawn_closes_its_case_as_withdrawn(
    node: tuple[Settings, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The withdrawal lands between the verdict's claim of the case (closed then, so the
    withdrawal passes it by) and its verified SR's attaching, which is refused: the case ends
    closed as withdrawn, not back on the worklist, and the SR's file is removed."""
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    item_id, _, _ = _radiologist(ledger, job_id)
    add_user(ledger, "rad2", "radiologist")
    attach = ReviewStore.attach_verified_sr
    attached: list[ResultFile] = []

    def withdrawn_first(self: ReviewStore, job: int, result: ResultFile, *args: Any) -> int:
        attached.append(result)
        (done,) = withdraw_results(
            settings, ledger, reason="quality", note=NOTE, by="admin", study_uid=uid
        ).jobs
        assert done.withdrawn
        assert _item(ledger, item_id)[0] == "closed"  # the verdict's: the withdrawal passed it
        return attach(self, job, result, *args)

    monkeypatch.setattr(ReviewStore, "attach_verified_sr", withdrawn_first)
    with TestClient(create_app(settings)) as client:
        url = f"/api/review/cases/{item_id}/verdict"
        answer = client.post(url, json={"action": "confirm"}, headers=_basic("rad"))
        assert answer.status_code == 422, answer.text
        assert "withdrawn from the PACS" in answer.json()["detail"]
        (sr,) = attached
        assert sr.kind == "sr-verified" and not (settings.results_dir / sr.path).exists()
        assert _item(ledger, item_id) == ("closed", "withdrawn")
        assert _verdicts(ledger, item_id) == []
        assert "sr-verified" not in _kinds(ledger, job_id)
        assert unrecorded_files(settings, ledger) == []
        worklist = client.get("/api/worklist", headers=_basic("rad2")).json()
        assert [case["id"] for case in worklist["items"]] == []
        # the next radiologist finds it closed, and nothing is written for them either
        answer = client.post(url, json={"action": "confirm"}, headers=_basic("rad2"))
        assert answer.status_code == 409, answer.text
    assert len(attached) == 1 and unrecorded_files(settings, ledger) == []
    assert _item(ledger, item_id) == ("closed", "withdrawn")


def test_an_amendment_claimed_as_its_results_are_withdrawn_leaves_the_verdict_standing(
    node: tuple[Settings, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same moment for an amendment: refused, the verdict it amended stands (its
    verified SR too), and the amendment's verified SR file is removed."""
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    item_id, store, rad, verdict = _confirmed_by_a_radiologist(settings, ledger, job_id)
    deliver(ledger)
    before = _item(ledger, item_id)
    attach = ReviewStore.attach_verified_sr
    attached: list[ResultFile] = []

    def withdrawn_first(self: ReviewStore, job: int, result: ResultFile, *args: Any) -> int:
        attached.append(result)
        withdraw_results(settings, ledger, reason="safety", note=NOTE, by="a", study_uid=uid)
        return attach(self, job, result, *args)

    monkeypatch.setattr(ReviewStore, "attach_verified_sr", withdrawn_first)
    with pytest.raises(ReviewError, match="withdrawn from the PACS"):
        amend_verdict(
            settings, store, item_id, rad, amends=verdict.verdict_id, action="override",
            label="normal", reason="scar",
        )  # fmt: skip
    (sr,) = attached
    assert sr.sop_instance_uid != verdict.sr_sop_instance_uid
    assert not (settings.results_dir / sr.path).exists()
    assert unrecorded_files(settings, ledger) == []
    case = store.case(item_id)
    assert case is not None and case["current_verdict"] == verdict.verdict_id
    assert _verdicts(ledger, item_id) == [("confirm", False)]
    assert _item(ledger, item_id) == before  # decided before the withdrawal: as it was
    assert _kinds(ledger, job_id).count("sr-verified") == 1  # the verdict's, still named


@pytest.mark.parametrize("action", ["verdict", "amendment"])
def test_a_verdict_claimed_after_a_withdrawal_is_refused_before_its_sr_is_written(
    node: tuple[Settings, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """The withdrawal lands after the verdict read the case (open, not withdrawn) and before
    its claim: the claim is refused, and no verified SR is written."""
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    if action == "verdict":
        item_id, store, rad = _radiologist(ledger, job_id)
        method = "claim_verdict"
    else:
        item_id, store, rad, verdict = _confirmed_by_a_radiologist(settings, ledger, job_id)
        method = "claim_amendment"
    deliver(ledger)
    before = _item(ledger, item_id)
    claim = getattr(ReviewStore, method)

    def withdrawn_first(self: ReviewStore, *args: Any, **kwargs: Any) -> int:
        withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
        return int(claim(self, *args, **kwargs))

    monkeypatch.setattr(ReviewStore, method, withdrawn_first)
    with pytest.raises(ReviewError, match="withdrawn from the PACS"):
        if action == "verdict":
            submit_verdict(settings, store, item_id, rad, action="confirm")
        else:
            amend_verdict(
                settings, store, item_id, rad, amends=verdict.verdict_id, action="override",
                label="normal", reason="scar",
            )  # fmt: skip
    assert unrecorded_files(settings, ledger) == []
    if action == "verdict":
        assert _item(ledger, item_id) == ("closed", "withdrawn")
        assert _verdicts(ledger, item_id) == []
        assert "sr-verified" not in _kinds(ledger, job_id)
    else:
        assert _item(ledger, item_id) == before
        assert _verdicts(ledger, item_id) == [("confirm", False)]
        assert _kinds(ledger, job_id).count("sr-verified") == 1


def test_a_case_a_withdrawal_left_open_is_closed_by_the_next_verdict(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """A case that a withdrawal left open (as the race above did before it was fixed) takes
    no verdict: the first one tried closes it as withdrawn, and writes no verified SR."""
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    item_id, store, rad = _radiologist(ledger, job_id)
    withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    with ledger.session() as s:
        s.execute(
            update(ReviewItem)
            .where(ReviewItem.id == item_id)
            .values(state=ReviewState.OPEN, closed_at=None, reason="uncertain")
        )
    assert [case["id"] for case in ledger.worklist()] == [item_id]
    with pytest.raises(ReviewError, match="withdrawn from the PACS"):
        submit_verdict(settings, store, item_id, rad, action="confirm")
    assert _item(ledger, item_id) == ("closed", "withdrawn")
    assert ledger.worklist() == []
    assert _verdicts(ledger, item_id) == [] and "sr-verified" not in _kinds(ledger, job_id)
    assert unrecorded_files(settings, ledger) == []
    # a withdrawn case's verdict is refused before anything is written, as ever
    with pytest.raises(ItemClosed):
        submit_verdict(settings, store, item_id, rad, action="confirm")
    assert unrecorded_files(settings, ledger) == []


def test_a_verified_sr_attached_as_a_withdrawal_commits_is_refused_on_sqlite(
    node: tuple[Settings, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite locks no row: a withdrawal may commit between the attaching's check of the job
    and its first write. The attaching asks again under the write lock, and is refused."""
    settings, ledger = node
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL: the attaching holds the job's row from its check on")
    job_id, uid = analysed(settings, ledger, tmp_path)
    item_id, store, rad = _radiologist(ledger, job_id)
    add_result = repository._add_result
    withdrawn: list[int] = []

    def withdrawn_first(s: Any, job: int, result: ResultFile) -> Any:
        if not withdrawn:  # after the attaching's check, before its first write
            withdrawn.append(job)
            withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
        return add_result(s, job, result)

    monkeypatch.setattr(repository, "_add_result", withdrawn_first)
    with pytest.raises(ReviewError, match="withdrawn from the PACS"):
        submit_verdict(settings, store, item_id, rad, action="confirm")
    assert withdrawn == [job_id]
    assert _item(ledger, item_id) == ("closed", "withdrawn")
    assert "sr-verified" not in _kinds(ledger, job_id)
    assert unrecorded_files(settings, ledger) == []
    # nothing of the withdrawn analysis is on its way but its rejection notes
    assert {kind for _, kind, state in deliveries(ledger, job_id) if state == "pending"} == {
        "rejection-note"
    }


def test_a_verified_sr_attached_while_the_notes_are_written_is_in_them(
    node: tuple[Settings, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A withdrawal finds the job's results, writes their rejection notes, then records them.
    A verdict whose verified SR is attached between the two (queued, so possibly on its way to
    the PACS) must be named in the notes too: the withdrawal is prepared again, and the notes
    of the first try are removed."""
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    item_id, store, rad = _radiologist(ledger, job_id)
    write_notes = withdrawal_module._write_notes
    tries: list[int] = []

    def verdict_meanwhile(*args: Any, **kwargs: Any) -> Any:
        notes = write_notes(*args, **kwargs)
        tries.append(len(notes))
        if len(tries) == 1:
            submit_verdict(settings, store, item_id, rad, action="confirm")
        return notes

    monkeypatch.setattr(withdrawal_module, "_write_notes", verdict_meanwhile)
    report = withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    (job,) = report.jobs
    assert job.withdrawn and len(tries) == 2, job.error
    with ledger.session() as s:
        (sr_uid,) = s.scalars(
            select(Result.sop_instance_uid).where(
                Result.job_id == job_id, Result.kind == "sr-verified"
            )
        ).all()
    notes = notes_due(ledger, settings)
    assert sr_uid in referenced(notes["pacs"]) and sr_uid in referenced(notes["viewer"])
    assert unrecorded_files(settings, ledger) == []  # the first try's notes are gone
    assert {kind for _, kind, state in deliveries(ledger, job_id) if state == "pending"} == {
        "rejection-note"
    }


def test_a_verdict_waits_for_a_withdrawal_in_progress_on_postgresql(
    node: tuple[Settings, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verdict given while a withdrawal of its case's results holds the job's row (its
    rejection notes being recorded, its open cases not closed yet) waits for it, then is
    refused; the two never deadlock (the verdict locked the case's row first, then waited for
    the job's, which the withdrawal held while it waited for the case's)."""
    settings, ledger = node
    if ledger.engine.dialect.name != "postgresql":
        pytest.skip("SQLite: one writer at a time, nothing for the verdict to wait on")
    job_id, uid = analysed(settings, ledger, tmp_path)
    item_id, store, rad = _radiologist(ledger, job_id)
    add_result = withdrawals_module._add_result
    holding, go_on = threading.Event(), threading.Event()

    def add_and_hold(s: Any, job: int, result: ResultFile) -> Any:
        row = add_result(s, job, result)
        holding.set()  # the withdrawal holds the job's row; its case is open still
        assert go_on.wait(60)
        return row

    monkeypatch.setattr(withdrawals_module, "_add_result", add_and_hold)
    outcomes: dict[str, Any] = {}

    def run(name: str, call: Any) -> None:
        try:
            outcomes[name] = call()
        except Exception as exc:
            outcomes[name] = exc

    withdrawal = threading.Thread(
        target=run,
        args=("withdrawal", lambda: withdraw_results(
            settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid
        )),
    )  # fmt: skip
    verdict = threading.Thread(
        target=run,
        args=("verdict", lambda: submit_verdict(settings, store, item_id, rad, action="confirm")),
    )
    try:
        withdrawal.start()
        assert holding.wait(60)
        verdict.start()
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        deadline = time.monotonic() + 60
        with ledger.engine.connect() as conn:
            while not conn.execute(waiting).scalar() and time.monotonic() < deadline:
                conn.rollback()
                time.sleep(0.05)
            assert conn.execute(waiting).scalar(), "the verdict never waited for the withdrawal"
    finally:
        go_on.set()
        withdrawal.join(120)
        verdict.join(120)
    report = outcomes["withdrawal"]
    assert not isinstance(report, Exception), report
    assert [j.withdrawn for j in report.jobs] == [True]
    refused = outcomes["verdict"]
    assert isinstance(refused, ReviewError) and "withdrawn from the PACS" in str(refused), refused
    assert _item(ledger, item_id) == ("closed", "withdrawn")
    assert _verdicts(ledger, item_id) == [] and "sr-verified" not in _kinds(ledger, job_id)
    assert unrecorded_files(settings, ledger) == []


def test_a_recall_withdraws_one_model_versions_results_and_reprocesses(
    node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = node
    first, uid1 = analysed(settings, ledger, tmp_path, seed=1)
    second, uid2 = analysed(settings, ledger, tmp_path, seed=2)
    deliver(ledger)
    with ledger.session() as s:
        model = s.get_one(Job, first).summary["model"]
    name, version = model["name"], model["version"]
    config = tmp_path / "node.toml"
    config.write_text(_toml(settings), encoding="utf-8")

    # a version the node does not know: one line, exit 2 (as a name mistyped), nothing touched
    recall = ["--config", str(config), "models", "recall", name]
    for extra in ([], ["--dry-run"]):
        assert main([*recall, "0.0.0-other", "--note", NOTE, *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[-1] == (
            f"acwi-node models recall: no model {name} version 0.0.0-other on this node"
        )
    assert ledger.due_deliveries() == []
    # a dry run lists, changes nothing
    args = [*recall, version, "--note", NOTE]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert uid1 in out and uid2 in out and "2 analysis(es)" in out
    assert ledger.due_deliveries() == []

    assert main([*args, "--reason", "safety", "--reprocess", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["withdrawn"] == 2 and result["refused"] == 0
    assert set(result["reprocessed"]) == {uid1, uid2}
    assert all(v == "generation 2" for v in result["reprocessed"].values())
    assert set(all_notes_due(ledger, settings)) == {
        (uid, dest) for uid in (uid1, uid2) for dest in ("pacs", "viewer")
    }
    assert len([d for d in ledger.due_deliveries()]) == 4
    for uid in (uid1, uid2):
        assert ledger.get_study(uid)["generation"] == 2  # type: ignore[index]
    # the new generation completes and is routed: the notes of the one it replaces still go
    route = [RoutedJob(ROUTE, MODEL, ["pacs", "viewer"], 0)]
    assert ledger.complete_study(study_id(ledger, uid1), 2, lambda _facts: route)
    assert len(all_notes_due(ledger, settings)) == 4
    assert [job.withdrawn for job in report_jobs(ledger, uid1)] == [True, False]
    # the audit trail records the withdrawal
    audit = (settings.data_dir / "audit" / "audit.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in audit.splitlines() if "results_withdrawn" in line]
    assert records and NOTE in records[-1]["detail"]
    assert {uid1, uid2} <= set(records[-1]["study_uids"])


def test_withdrawal_refuses_what_it_cannot_do(
    node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = node
    with pytest.raises(StudyActionRefused, match="no such study"):
        withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid="9.9")
    with pytest.raises(ValueError, match="reason must be one of quality, safety"):
        withdraw_results(settings, ledger, reason="bad", note=NOTE, by="a", study_uid="9.9")
    with pytest.raises(ValueError, match="say why"):
        withdraw_results(settings, ledger, reason="quality", note=" ", by="a", study_uid="9.9")
    with pytest.raises(ValueError, match=r"the note: a control character \(U\+001B"):
        withdraw_results(
            settings, ledger, reason="quality", note="bad\x1b[2J", by="a", study_uid="9.9"
        )
    job_id, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    # storage retention deleted the results the note is made of: withdraw by hand
    with ledger.session() as s:
        s.execute(update(ReviewItem).values(state=ReviewState.CLOSED, closed_at=utcnow()))
    days_91 = later(91 * 24)
    Retention(settings, ledger, space=lambda: DiskSpace(900, 1000), clock=days_91).sweep()
    assert not list(settings.results_dir.rglob("*.dcm"))
    report = withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    (job,) = report.jobs
    assert not job.withdrawn and "storage retention deleted" in job.error
    with ledger.session() as s:
        assert s.get_one(Job, job_id).withdrawn_at is None
    config = tmp_path / "node.toml"
    config.write_text(_toml(settings), encoding="utf-8")
    assert main(["--config", str(config), "studies", "withdraw", uid, "--note", NOTE]) == 1
    assert "reject them in the PACS by hand" in capsys.readouterr().err
    assert main(["--config", str(config), "studies", "withdraw", "9.9", "--note", NOTE]) == 1
    assert "9.9: no such study" in capsys.readouterr().err


def test_a_result_file_that_is_not_the_nodes_is_refused_not_raised(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    with ledger.session() as s:
        sr = next(r for r in s.get_one(Job, job_id).results if r.kind == "sr")
        path = settings.results_dir / sr.path
    path.write_bytes(next((tmp_path / "src-0").rglob("*.dcm")).read_bytes())  # a source image
    (job,) = withdraw_results(
        settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid
    ).jobs
    assert not job.withdrawn and "the rejection note cannot be made: not objects the node" in (
        job.error
    )
    assert ledger.due_deliveries() == []


def test_the_note_is_the_same_object_when_built_again(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    _, uid = analysed(settings, ledger, tmp_path)
    files = sorted((settings.results_dir / uid).glob("*.dcm"))
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    a = build_rejection_note(headers, reason="quality")
    b = build_rejection_note(list(reversed(headers)), reason="quality")
    c = build_rejection_note(headers, reason="safety")
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.SeriesInstanceUID == c.SeriesInstanceUID
    # the administrator's words in any script: UTF-8 then, else the results' character set
    assert a.get("SpecificCharacterSet") == headers[0].get("SpecificCharacterSet")
    words = "Größe falsch, 右肺 nodule"
    note = build_rejection_note(headers, reason="quality", description=words)
    written = dcmread(io.BytesIO(encode_part10(note)))
    assert written.SpecificCharacterSet == "ISO_IR 192"
    texts = [i.TextValue for i in written.ContentSequence if i.ValueType == "TEXT"]
    assert words in texts
    assert str(written.PatientName) == str(headers[0].PatientName)
    source = dcmread(next((tmp_path / "src-0").rglob("*.dcm")), stop_before_pixels=True)
    with pytest.raises(ValueError, match="not objects the node wrote"):
        build_rejection_note([*headers, source], reason="quality")


def _written_results() -> list[Dataset]:
    """The headers of an SR and a heatmap, as read from their files, of a source image whose
    patient has an issuer of patient ID, another ID, an age; and its study an admission."""
    source = make_dx(generate_uid(), generate_uid())
    source.IssuerOfPatientID = "HOSP-A"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "1.2.826.0.1.3680043.8.498.1"
    qualifiers.UniversalEntityIDType = "ISO"
    source.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    other = Dataset()
    other.PatientID = "X-99"
    other.IssuerOfPatientID = "HOSP-B"
    other.TypeOfPatientID = "TEXT"
    source.OtherPatientIDsSequence = [other]
    source.PatientAge = "054Y"
    source.AdmissionID = "ADM-7"
    analysis = StudyAnalysis(
        model=ModelIdentity(name="dianet", version="1.4.0", weights_sha256="9f2c4e1a"),
        labels=["normal", "nodule"],
        images=[
            ImageResult(
                sop_instance_uid=str(source.SOPInstanceUID),
                sop_class_uid=str(source.SOPClassUID),
                series_instance_uid=str(source.SeriesInstanceUID),
                probabilities={"normal": 0.3, "nodule": 0.7},
                uncertainty=Uncertainty(entropy=0.6, epistemic=0.1, aleatoric=0.5, score=0.3),
                heatmap=np.zeros((source.Rows, source.Columns), dtype=np.float32),
            )
        ],
        probabilities={"normal": 0.3, "nodule": 0.7},
        predicted_label="nodule",
        uncertainty=Uncertainty(entropy=0.6, epistemic=0.1, aleatoric=0.5, score=0.3),
        ood_score=0.1,
        needs_review=False,
        finding_labels=["nodule"],
    )
    image = analysis.images[0]
    results: list[Dataset] = [
        dcmread(io.BytesIO(encode_part10(ds)), stop_before_pixels=True)
        for ds in (
            build_sr([source], analysis),
            build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1),
        )
    ]
    return results


def test_the_note_has_the_patient_and_study_of_the_results_it_rejects() -> None:
    """Every Patient and Study module attribute the results copied from the source image is
    the note's too, not the Type 2 ones alone: an archive that tells patients apart by the
    issuer of their ID files a note without it under another patient."""
    results = _written_results()
    note = dcmread(io.BytesIO(encode_part10(build_rejection_note(results, reason="quality"))))
    copied = (
        "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
        "OtherPatientIDsSequence", "PatientBirthDate", "PatientSex", "PatientAge",
        "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
        "ReferringPhysicianName", "StudyDescription", "AdmissionID",
    )  # fmt: skip
    for result in results:
        for keyword in copied:
            assert keyword in result, keyword
            assert note[keyword].value == result[keyword].value, keyword


def test_the_notes_references_have_no_purpose_of_reference() -> None:
    """TID 2010 rows 8-10: the IMAGE and COMPOSITE items that list the rejected objects carry
    no Purpose of Reference (a Concept Name)."""
    results = _written_results()
    note = dcmread(io.BytesIO(encode_part10(build_rejection_note(results, reason="safety"))))
    references = [i for i in note.ContentSequence if i.ValueType in ("IMAGE", "COMPOSITE")]
    assert sorted(i.ValueType for i in references) == ["COMPOSITE", "IMAGE"]
    assert [i for i in references if "ConceptNameCodeSequence" in i] == []
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in references} == {
        r.SOPInstanceUID for r in results
    }


def test_a_note_typed_with_tabs_is_a_valid_text_value(tmp_path: Path) -> None:
    """An administrator may type tabs in a withdrawal's note, but the Key Object Description
    (UT) holds no tab (PS3.5 6.2): each is written as a space and dciodvfy finds the note
    valid."""
    note = build_rejection_note(
        _written_results(), reason="quality", description="recalled:\tsee ticket\t42"
    )
    path = tmp_path / "note.dcm"
    path.write_bytes(encode_part10(note))
    texts = [i.TextValue for i in dcmread(path).ContentSequence if i.ValueType == "TEXT"]
    assert "recalled: see ticket 42" in texts
    require_dciodvfy()
    assert dciodvfy_errors(path) == []


def test_withdrawal_over_the_api_and_from_the_study_page(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    _, uid = analysed(settings, ledger, tmp_path, seed=3)
    _, other = analysed(settings, ledger, tmp_path, seed=4)
    deliver(ledger)
    add_user(ledger, "rad", "radiologist")
    add_user(ledger, "boss", "admin")
    app = create_app(settings)
    with TestClient(app) as client:
        url = f"/api/studies/{uid}/withdraw"
        assert client.post(url, json={"note": NOTE}, auth=("rad", PASSWORD)).status_code == 403
        bad = client.post(url, json={"reason": "mood", "note": NOTE}, auth=("boss", PASSWORD))
        assert bad.status_code == 422
        assert client.post(url, json={"note": ""}, auth=("boss", PASSWORD)).status_code == 422
        form = client.post(url, data={"note": NOTE}, auth=("boss", PASSWORD))
        assert form.status_code == 415
        answer = client.post(url, json={"note": NOTE}, auth=("boss", PASSWORD))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["withdrawn"] == 1 and body["jobs"][0]["notes_queued"] == 2
        assert body["study"]["jobs"][0]["withdrawn"]["by"] == "boss"
        again = client.post(url, json={"note": NOTE}, auth=("boss", PASSWORD))
        assert again.status_code == 409 and "withdrawn already" in again.json()["detail"]
        missing = client.post(
            "/api/studies/9.9/withdraw", json={"note": NOTE}, auth=("boss", PASSWORD)
        )
        assert missing.status_code == 404

        # the study page: administrators see the form, use it, and are led back
        sign_in(client, "boss")
        page = client.get(f"/review/studies/{other}")
        assert "Withdraw its AI results from the PACS" in page.text
        assert 'value="safety"' in page.text and 'value="replaced"' not in page.text
        token = CSRF.search(page.text)
        assert token is not None
        done = client.post(
            f"/review/studies/{other}/withdraw",
            data={"csrf_token": token.group(1), "reason": "safety", "note": NOTE},
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"].endswith("done=withdraw")
        page = client.get(done.headers["location"])
        assert "rejection notes are on their way" in page.text
        assert "rejected for patient safety reasons" in page.text
        assert "Withdraw its AI results from the PACS" not in page.text  # nothing left
        client.cookies.clear()
        sign_in(client, "rad")
        assert "Withdraw its AI results" not in client.get(f"/review/studies/{uid}").text


def test_turnaround_counts_neither_a_late_note_nor_its_wait(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    job_id, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    monitor = TurnaroundMonitor(ledger, settings.monitoring)
    # its note waits in the outbox: the study is not "overdue", its results arrived
    far = later(2)()
    assert monitor.report(now=far).routes[0].overdue == 0
    with ledger.session() as s:
        for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id)):
            assert d.state in (DeliveryState.DELIVERED, DeliveryState.PENDING)


def _toml(settings: Settings) -> str:
    """The settings as a configuration file for the command line."""
    lines = [
        "[node]",
        f'data_dir = "{settings.data_dir}"',
        f'database_url = "{settings.database_url}"',
        "[ingest]",
        "fsync = false",
    ]
    for m in settings.models:
        lines += ["[[models]]", f'name = "{m.name}"', f'manifest = "{m.manifest}"']
    for d in settings.destinations:
        lines += [
            "[[destinations]]",
            f'name = "{d.name}"',
            f'ae_title = "{d.ae_title}"',
            f'host = "{d.host}"',
            f"port = {d.port}",
        ]
    return "\n".join(lines) + "\n"


def test_the_ris_is_told_where_it_had_the_result(tmp_path: Path) -> None:
    from acwi_node.hl7.messages import parse
    from acwi_node.ledger.models import Hl7Outbound

    settings = review_settings(tmp_path, hl7={"ris": {"host": "127.0.0.1", "port": 2575}})
    ledger = Ledger(settings.database_url)
    try:
        files = write_study(tmp_path / "src", n_images=1, label="nodule", seed=5, size=128)
        job_id, uid = store_and_route(settings, ledger, files)
        assert run_job(settings, ledger, job_id) == "analysed"
        assert ledger.hl7_outbound_kinds(job_id) == ["result"]
        withdraw_results(settings, ledger, reason="safety", note=NOTE, by="a", study_uid=uid)
        assert ledger.hl7_outbound_kinds(job_id) == ["result", "withdrawal"]
        with ledger.session() as s:
            text = s.scalars(
                select(Hl7Outbound.message).where(Hl7Outbound.kind == "withdrawal")
            ).one()
        assert parse(text) is not None  # hl7apy reads it back
        lines = text.replace("\n", "\r").split("\r")
        obr = next(line for line in lines if line.startswith("OBR|")).split("|")
        assert obr[25] == "C"
        obx = [line.split("|") for line in lines if line.startswith("OBX|")]
        assert obx and all(fields[11] == "W" for fields in obx)
        withdrawn = next(f for f in obx if f[3].startswith("WITHDRAWN^"))
        assert withdrawn[5] == NOTE
        assert any(f[3].startswith("FINDING^") for f in obx)
        assert "PHANTOM" not in NOTE and "|" not in NOTE
    finally:
        ledger.dispose()

    # a job the RIS never heard of gets no withdrawal message
    quiet = review_settings(tmp_path / "quiet", hl7={"ris": {"host": "127.0.0.1", "port": 2575}})
    other = Ledger(quiet.database_url)
    try:
        files = write_study(tmp_path / "src2", n_images=1, label="nodule", seed=6, size=128)
        job_id, uid = store_and_route(quiet, other, files)
        assert run_job(review_settings(tmp_path / "quiet"), other, job_id) == "analysed"
        assert other.hl7_outbound_kinds(job_id) == []
        withdraw_results(quiet, other, reason="quality", note=NOTE, by="a", study_uid=uid)
        assert other.hl7_outbound_kinds(job_id) == []
    finally:
        other.dispose()


def test_a_later_analysis_by_another_version_withdraws_the_earlier_results(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """The exporter withdraws what a re-analysis by another model version replaced (its UIDs
    differ: the PACS would show both); a re-analysis by the same version replaces the objects
    themselves, and a failed one replaces nothing."""
    settings, ledger = node
    first, uid = analysed(settings, ledger, tmp_path)
    same, _ = analysed(settings, ledger, tmp_path, seed=8)
    deliver(ledger)
    since = utcnow() - dt.timedelta(hours=1)

    # the same version again: nothing to withdraw
    generation = ledger.reprocess_study(uid)
    route = [RoutedJob(ROUTE, MODEL, ["pacs", "viewer"], 0)]
    (again,) = ledger.complete_study(study_id(ledger, uid), generation, lambda _facts: route)
    assert run_job(settings, ledger, again) == "analysed"
    deliver(ledger)
    assert withdraw_replaced(settings, ledger, since=since) == []

    # another version: its delivery withdraws both earlier analyses' results
    newer = model_variant(tmp_path / "v2", version="9.9.9", uncertainty_threshold=1e-9)
    upgraded = settings.model_copy(
        update={"models": [settings.models[0].model_copy(update={"manifest": newer})]}
    )
    generation = ledger.reprocess_study(uid)
    (third,) = ledger.complete_study(study_id(ledger, uid), generation, lambda _facts: route)
    assert run_job(upgraded, ledger, third) == "analysed"
    # not before the new results are stored: the PACS keeps a result all the while
    assert withdraw_replaced(upgraded, ledger, since=since) == []
    deliver(ledger)
    outcomes = withdraw_replaced(upgraded, ledger, since=since)
    assert sorted(o.job_id for o in outcomes) == [first, again]
    assert all(o.withdrawn for o in outcomes)
    # generation 2 wrote the same objects as generation 1: each note names them once a
    # destination, and the new version's objects never
    notes = list(all_notes_due(ledger, settings).values())
    view = ledger.get_study(uid)
    assert view is not None
    new_uids = {r["sop_instance_uid"] for r in view["jobs"][2]["results"]}
    old_uids = {r["sop_instance_uid"] for r in view["jobs"][0]["results"]}
    assert notes and all(referenced(n) <= old_uids - new_uids for n in notes)
    assert [j["withdrawn"]["reason"] if j["withdrawn"] else None for j in view["jobs"]] == [
        "replaced", "replaced", None,
    ]  # fmt: skip
    assert view["jobs"][0]["withdrawn"]["by"] == "acwi-node"
    note = view["jobs"][0]["withdrawn"]["note"]
    assert note == "replaced by acwi-dianet-chest 9.9.9 (generation 3)"
    # found once: withdrawn jobs are not looked at again, the other study never was
    assert withdraw_replaced(upgraded, ledger, since=since) == []
    assert [j.withdrawn for j in report_jobs(ledger, _study_of(ledger, same))] == [False]


def _study_of(ledger: Ledger, job_id: int) -> str:
    with ledger.session() as s:
        return s.get_one(Job, job_id).study.study_uid


def test_the_exporter_withdraws_replaced_results_unless_told_not_to(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    settings, ledger = node
    first, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    newer = model_variant(tmp_path / "v2", version="9.9.9", uncertainty_threshold=1e-9)
    from acwi_node.config import NotifyTarget
    from acwi_node.ledger.models import Notification

    # the node's own withdrawal of replaced results is routine: it tells no one
    safety = NotifyTarget(name="safety", url="http://127.0.0.1:9/", events=["withdrawn"])
    upgraded = settings.model_copy(
        update={
            "models": [settings.models[0].model_copy(update={"manifest": newer})],
            "notify": [safety],
        }
    )
    generation = ledger.reprocess_study(uid)
    route = [RoutedJob(ROUTE, MODEL, ["pacs", "viewer"], 0)]
    (second,) = ledger.complete_study(study_id(ledger, uid), generation, lambda _facts: route)
    assert run_job(upgraded, ledger, second) == "analysed"
    # the new results never reached the PACS: the earlier ones stay
    for d in ledger.due_deliveries():
        ledger.record_delivery(
            d.id, delivered=False, status=None, error="down", max_attempts=1, backoff_s=1
        )
    assert ledger.get_study(uid)["state"] == "failed"  # type: ignore[index]
    assert Exporter(upgraded, ledger)._withdraw_replaced() == 0
    assert ledger.resend_results(uid) == 4
    deliver(ledger)
    off = upgraded.model_copy(
        update={"exporter": upgraded.exporter.model_copy(update={"withdraw_replaced": False})}
    )
    Exporter(off, ledger)._withdraw_replaced()
    assert all_notes_due(ledger, settings) == {}
    assert Exporter(upgraded, ledger)._withdraw_replaced() == 2  # the PACS's and the viewer's
    assert set(all_notes_due(ledger, settings)) == {(uid, "pacs"), (uid, "viewer")}
    with ledger.session() as s:
        assert s.get_one(Job, first).withdrawn_reason == "replaced"
        assert s.get_one(Job, second).withdrawn_at is None
        assert s.scalar(select(func.count()).select_from(Notification)) == 0


def test_the_command_offers_the_reasons_an_administrator_may_give() -> None:
    from acwi_node.export.withdrawal import REASONS
    from acwi_node.export.withdrawal_commands import REASON_CHOICES

    assert REASON_CHOICES == REASONS == ("quality", "safety")


def test_a_withdrawal_is_told_to_the_webhooks_once_per_request(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """A study's withdrawal and a recall of two studies: one ``withdrawn`` notification each,
    with what was taken back and a link, never the administrator's words; the node's own
    withdrawal of replaced results tells no one."""
    from acwi_node.config import NotifyTarget
    from acwi_node.ledger.models import Notification
    from acwi_node.notify import Notifier
    from tests.support.webhook import WebhookServer

    base, ledger = node
    with WebhookServer() as hook, WebhookServer() as other:
        settings = base.model_copy(
            update={
                "notify": [
                    NotifyTarget(name="safety", url=hook.url, events=["withdrawn", "failed"]),
                    NotifyTarget(name="reading-room", url=other.url, events=["review"]),
                ],
                "review": base.review.model_copy(update={"public_url": "https://ai.example.org"}),
            }
        )
        _, uid = analysed(settings, ledger, tmp_path, seed=1)
        deliver(ledger)
        secret = "wrong patient: Smith^John"
        withdraw_results(settings, ledger, reason="quality", note=secret, by="jane", study_uid=uid)
        first, uid2 = analysed(settings, ledger, tmp_path, seed=2)
        _, uid3 = analysed(settings, ledger, tmp_path, seed=3)
        deliver(ledger)
        with ledger.session() as s:
            model = s.get_one(Job, first).summary["model"]
        report = withdraw_results(
            settings, ledger, reason="safety", note=NOTE, by="rick",
            model_name=model["name"], model_version=model["version"],
        )  # fmt: skip
        assert len([j for j in report.jobs if j.withdrawn]) == 2
        # nothing left to withdraw: told nothing
        withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
        Notifier(settings, ledger).tick()
        bodies = [r["json"] for r in hook.received]
        assert [b["event"] for b in bodies] == ["withdrawn", "withdrawn"]
        study, recall = sorted(bodies, key=lambda b: b["by"])
        assert (study["study_uid"], study["reason"], study["studies"]) == (uid, "quality", 1)
        assert study["study_url"] == f"https://ai.example.org/review/studies/{uid}"
        assert study["text"].startswith("ACWI Node: jane withdrew the AI results of study")
        assert (study["objects"], study["notes_queued"]) == (3, 2)  # SR, 2 heatmaps; 2 notes
        assert recall["study_uid"] is None and recall["model"] == model
        assert (recall["studies"], recall["analyses"], recall["reason"]) == (2, 2, "safety")
        assert f"of {model['name']} {model['version']}" in recall["text"]
        assert recall["dashboard_url"] == "https://ai.example.org/review/dashboard"
        assert all(secret not in str(b) and NOTE not in str(b) for b in bodies)
        assert other.received == []  # a target that does not listen for it
        with ledger.session() as s:
            assert s.scalar(select(func.count()).select_from(Notification)) == 2
        assert uid2 and uid3


def _uids_of(ledger: Ledger, job_id: int) -> dict[str, set[str]]:
    """The job's result SOP Instance UIDs, by kind."""
    with ledger.session() as s:
        out: dict[str, set[str]] = {}
        for r in s.get_one(Job, job_id).results:
            out.setdefault(r.kind, set()).add(r.sop_instance_uid)
        return out


def test_the_same_version_analysing_a_withdrawn_study_again_reissues_new_uids(
    node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """An archive with IOCM may refuse the UIDs a rejection note named for good: the same
    model version's next analysis of the study (reprocessed, or late images) writes new ones,
    its verified SR too; analysed again without a withdrawal, it replaces itself as before; a
    note made without its files names the reissued objects."""
    settings, ledger = node
    first, uid = analysed(settings, ledger, tmp_path)
    deliver(ledger)
    withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=uid)
    route = [RoutedJob(ROUTE, MODEL, ["pacs", "viewer"], 0)]

    def again() -> int:
        generation = ledger.reprocess_study(uid)
        (job,) = ledger.complete_study(study_id(ledger, uid), generation, lambda _facts: route)
        assert run_job(settings, ledger, job) == "analysed"
        return job

    second = again()
    before, after = _uids_of(ledger, first), _uids_of(ledger, second)
    assert set(before) == {"sr", "heatmap", "rejection-note"} and set(after) == {"sr", "heatmap"}
    assert not before["sr"] & after["sr"] and not before["heatmap"] & after["heatmap"]
    with ledger.session() as s:
        summary = s.get_one(Job, second).summary
        model = summary["model"]
        assert model["reissue"] == 1
        assert "reissue" not in s.get_one(Job, first).summary["model"]
    from acwi_node.results.uids import result_uids

    reissued = result_uids(uid, model["name"], model["version"], 1)
    assert after["sr"] == {reissued.sr_instance_uid}
    assert (
        reissued.sr_instance_uid
        != result_uids(uid, model["name"], model["version"]).sr_instance_uid
    )
    sources = {
        reissued.heatmap_instance_uid(str(im["sop_instance_uid"])) for im in summary["images"]
    }
    assert after["heatmap"] == sources
    # the radiologist's verified SR of the reissued result is a new object too
    item_id, _store, _rad, verdict = _confirmed_by_a_radiologist(settings, ledger, second)
    from acwi_node.results.sr import verified_sr_uid

    assert verdict.sr_sop_instance_uid == verified_sr_uid(uid, model["name"], model["version"], 1)
    assert verdict.sr_sop_instance_uid != verified_sr_uid(uid, model["name"], model["version"])
    # the review page finds the reissued heatmaps
    with TestClient(create_app(settings)) as client:
        sign_in(client, "rad")
        image = str(summary["images"][0]["sop_instance_uid"])
        assert client.get(f"/review/cases/{item_id}/heatmaps/{image}.png").status_code == 200
    # not withdrawn: the next analysis replaces it, same UIDs
    deliver(ledger)
    third = again()
    assert _uids_of(ledger, third)["sr"] == after["sr"]
    # withdrawn once storage retention deleted its files: the note names the reissued objects
    from acwi_node.export.withdrawal_headers import stand_ins
    from acwi_node.ledger.withdrawals import Withdrawals

    deliver(ledger)
    (candidate,) = Withdrawals(ledger).candidates(job_ids=[third]).jobs
    assert candidate.reissue == 1
    header = dcmread(next(settings.spool_dir.rglob("*.dcm")), stop_before_pixels=True)
    named = stand_ins(header, candidate, candidate.results)
    assert {ds.SOPInstanceUID for ds in named} == after["sr"] | after["heatmap"]
    assert {ds.SeriesInstanceUID for ds in named} == {
        reissued.sr_series_uid,
        reissued.heatmap_series_uid,
    }


def _fail_all(ledger: Ledger, destination: str | None = None) -> None:
    for d in ledger.due_deliveries():
        if destination is None or d.destination == destination:
            ledger.record_delivery(
                d.id, delivered=False, status=0xA700, error="out of resources", max_attempts=1,
                backoff_s=1,
            )  # fmt: skip


def test_a_destinations_failed_deliveries_are_retried_at_once_never_withdrawn_results(
    node: tuple[Settings, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an outage longer than the patience, or a destination's configuration mended:
    every failed delivery to it goes back to the outbox (its studies exporting again), and so
    does a failed rejection note; never the results a withdrawal took back, nor another
    destination's. From the command line, the API and the dashboard."""
    settings, ledger = node
    failed_job, failed = analysed(settings, ledger, tmp_path, seed=1)
    _fail_all(ledger)
    _, noted = analysed(settings, ledger, tmp_path, seed=2)
    deliver(ledger)
    withdraw_results(settings, ledger, reason="safety", note=NOTE, by="a", study_uid=noted)
    _fail_all(ledger)  # the notes, to both destinations
    withdrawn_job, withdrawn = analysed(settings, ledger, tmp_path, seed=3)
    _fail_all(ledger)
    withdraw_results(settings, ledger, reason="quality", note=NOTE, by="a", study_uid=withdrawn)
    assert ledger.due_deliveries() == []
    assert ledger.get_study(failed)["state"] == "failed"  # type: ignore[index]

    retried = ledger.retry_failed("pacs")
    # the failed study's SR and 2 heatmaps, and the note owed to the PACS
    assert retried.deliveries == 4 and retried.study_uids == sorted([failed, noted])
    due = ledger.due_deliveries()
    assert sorted((d.study_uid == failed, d.destination) for d in due) == [
        (False, "pacs"), (True, "pacs"), (True, "pacs"), (True, "pacs"),
    ]  # fmt: skip
    assert all(d.attempts == 0 for d in due)
    assert ledger.get_study(failed)["state"] == "exporting"  # type: ignore[index]
    assert ("viewer", "sr", "failed") in deliveries(ledger, failed_job)  # another destination
    assert all(state != "pending" for *_, state in deliveries(ledger, withdrawn_job))
    assert ledger.retry_failed("pacs").deliveries == 0  # nothing failed any more

    # the command line: status, then the viewer's (the failed study's SR and the note)
    config = tmp_path / "node.toml"
    config.write_text(_toml(settings), encoding="utf-8")
    assert main(["--config", str(config), "destinations", "status"]) == 1  # the viewer failed
    out = capsys.readouterr().out
    assert "pacs  PACS@127.0.0.1:11199: 4 waiting, 0 failed" in out
    # (the withdrawn study's 3 failed results are no longer owed: not counted, not retried)
    assert "viewer  VIEWER@127.0.0.1:11198: 0 waiting, 2 failed" in out
    assert main(["--config", str(config), "destinations", "retry", "viewer"]) == 0
    assert "viewer: 2 failed delivery(ies) of 2 study(ies) back in the outbox" in (
        capsys.readouterr().out
    )
    assert main(["--config", str(config), "destinations", "retry", "nowhere"]) == 2
    assert "no destination named nowhere" in capsys.readouterr().err
    assert main(["--config", str(config), "destinations", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["failed"], r["pending"]) for r in rows] == [
        ("pacs", 0, 4), ("viewer", 0, 2),
    ]  # fmt: skip

    # the API and the dashboard, once they failed again
    _fail_all(ledger)
    add_user(ledger, "boss", "admin")
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client, "boss")
        page = client.get("/review/dashboard").text
        assert 'action="/review/destinations/pacs/retry"' in page
        assert "Retry the 4 failed" in page
        token = CSRF.search(page)
        assert token is not None
        done = client.post("/review/destinations/pacs/retry", data={"csrf_token": token.group(1)})
        assert done.status_code == 200
        assert "pacs: 4 failed delivery(ies) of 2 study(ies) back in the outbox" in done.text
        answer = client.post("/api/destinations/viewer/retry", json={})
        assert answer.status_code == 200 and answer.json()["deliveries"] == 2
        assert client.post("/api/destinations/nowhere/retry", json={}).status_code == 404
    add_user(ledger, "rad", "radiologist")
    with TestClient(create_app(settings, ledger)) as client:
        sign_in(client, "rad")
        assert client.post("/api/destinations/pacs/retry", json={}).status_code == 403
