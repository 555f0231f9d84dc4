"""Withdrawing results whose files storage retention deleted: the rejection note is built from
the ledger's UIDs and the patient and study attributes the destination's archive holds, asked
of its ``query_source`` (a real Orthanc, by C-FIND and by QIDO-RS); the exporter sends it and
the bundled Orthanc deletes the results it names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import update

from acwi_node.config import Settings
from acwi_node.export.outbox import Exporter
from acwi_node.export.withdrawal import withdraw_results
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, Result, ReviewItem, ReviewState, utcnow
from acwi_node.results.rejection import build_rejection_note
from acwi_node.retention import DiskSpace, Retention
from acwi_node.tasks.analyse import run_job
from models.data.synth import write_study
from tests.support.dciodvfy import dciodvfy_errors, require_dciodvfy
from tests.support.orthanc import OrthancServer, require_orthanc
from tests.support.ports import free_port
from tests.support.review_case import review_settings, store_and_route
from tests.unit.test_retention import later

pytestmark = pytest.mark.integration

NODE_AE = "ACWI"  # the node's default AE title
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
NOTE = "recalled by its maker"


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    """The production configuration with its Lua script (it honours the node's notes); the
    node's AE title is a known modality, which Orthanc answers C-FIND from."""
    require_orthanc()
    with OrthancServer(node_ae=NODE_AE, node_port=free_port(), with_lua=True) as server:
        yield server


def _settings(tmp_path: Path, orthanc: OrthancServer, source: dict[str, Any] | None) -> Settings:
    """The review node, its destination ``pacs`` the Orthanc, queried through ``source``
    (``None``: no query source)."""
    settings = review_settings(
        tmp_path,
        pacs_ae=orthanc.aet,
        pacs_port=orthanc.dicom_port,
        sources=[{"name": "archive", **source}] if source is not None else [],
    )
    pacs = settings.destinations[0].model_copy(
        update={"query_source": "archive" if source is not None else None}
    )
    return settings.model_copy(update={"destinations": [pacs]})


def _dimse(orthanc: OrthancServer) -> dict[str, Any]:
    return {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


def _in_the_pacs_then_deleted(
    settings: Settings, ledger: Ledger, orthanc: OrthancServer, tmp_path: Path, seed: int
) -> tuple[int, str, list[str], dict[str, str], Any]:
    """A study in Orthanc under a patient the PACS knows by ``PAT<seed>``, analysed by the
    node, its results delivered there, then every file of it deleted by storage retention.
    Returns (job, study UID, the source images' SOP classes, result SOP Instance UID -> the
    Series Instance UID Orthanc holds it in, the ``safety`` note made of the result files)."""
    files = write_study(
        tmp_path / f"study-{seed}", n_images=2, label="nodule", seed=seed, size=128,
        patient_name=f"Müller^Jörg {seed}", accession_number=f"ACC{seed}",
    )  # fmt: skip
    for path in files:
        ds = dcmread(path)
        ds.PatientID = f"PAT{seed}"
        ds.save_as(path)
        orthanc.upload(path)
    job_id, uid = store_and_route(settings, ledger, files)
    assert run_job(settings, ledger, job_id) == "analysed"
    exporter = Exporter(settings, ledger)
    while exporter.tick():
        pass
    view = ledger.get_study(uid)
    assert view is not None and view["state"] == "delivered", view
    with ledger.session() as s:
        results = s.query(Result).filter(Result.job_id == job_id).all()
        # what a note made of the files would be, while they are there
        from_files = build_rejection_note(
            [dcmread(settings.results_dir / r.path, stop_before_pixels=True) for r in results],
            reason="safety",
        )
        held = {
            r.sop_instance_uid: str(
                orthanc.instance_tags(
                    orthanc._lookup(r.sop_instance_uid)[0]["ID"]  # noqa: SLF001
                )["SeriesInstanceUID"]
            )
            for r in results
        }
        s.execute(update(ReviewItem).values(state=ReviewState.CLOSED, closed_at=utcnow()))
    # 91 days on, its files go, and (records_keep_days being past too, on this clock) the
    # ledger's records of it are compacted: a recall needs neither
    swept = Retention(
        settings, ledger, space=lambda: DiskSpace(900, 1000), clock=later(91 * 24)
    ).sweep()
    assert (swept.studies, swept.compacted) == (1, 1)
    assert not list(settings.results_dir.rglob("*.dcm"))
    sources = [str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files]
    return job_id, uid, sources, held, from_files


def _classes_in(orthanc: OrthancServer, study_uid: str) -> list[str]:
    return sorted(
        str(orthanc.instance_tags(i["ID"]).get("SOPClassUID", ""))
        for i in orthanc.study_instances(study_uid)
    )


def _note_due(settings: Settings, ledger: Ledger) -> tuple[Path, Any]:
    """The one delivery waiting in the outbox (the rejection note): its file, read."""
    (due,) = ledger.due_deliveries()
    path = settings.results_dir / due.path
    return path, dcmread(path)


def _named(note: Any) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of each object the note names."""
    return {
        sop.ReferencedSOPInstanceUID: series.SeriesInstanceUID
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def _items(note: Any) -> list[tuple[str, str]]:
    """(value type, referenced SOP Instance UID) of each object the note's content lists."""
    return sorted(
        (str(item.ValueType), str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        for item in note.ContentSequence
        if "ReferencedSOPSequence" in item
    )


def test_results_whose_files_are_gone_are_withdrawn_with_the_patient_the_pacs_holds(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """C-FIND: the note carries the patient as the PACS holds it now (merged under another
    ID since the analysis), names every result in the series the PACS holds it in, is valid,
    and the bundled Orthanc deletes the results it names."""
    settings = _settings(tmp_path, orthanc, _dimse(orthanc))
    ledger = Ledger(settings.database_url)
    try:
        _job_id, uid, sources, held, from_files = _in_the_pacs_then_deleted(
            settings, ledger, orthanc, tmp_path, seed=31
        )
        patient = orthanc.get_json(f"/studies/{orthanc.find_study(uid)}")["ParentPatient"]
        orthanc.post_json(
            f"/patients/{patient}/modify",
            {
                "Replace": {"PatientID": "MERGED31"},
                "Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
                "Force": True,
                "KeepSource": False,
            },
        )
        report = withdraw_results(
            settings, ledger, reason="safety", note=NOTE, by="jane", study_uid=uid
        )
        (job,) = report.jobs
        assert job.withdrawn, job.error
        assert (job.rejected, job.queued) == (len(held), 1)
        path, note = _note_due(settings, ledger)
        assert note.SOPClassUID == KOS
        assert (note.PatientID, str(note.PatientName)) == ("MERGED31", "Müller^Jörg 31")
        assert note.AccessionNumber == "ACC31"
        assert _named(note) == held  # every result, in the series the PACS holds it in
        # the note its files would have made: the same object, images listed as images
        assert note.SOPInstanceUID == from_files.SOPInstanceUID
        assert _items(note) == _items(from_files)
        require_dciodvfy()
        assert dciodvfy_errors(path) == []

        exporter = Exporter(settings, ledger)
        while exporter.tick():
            pass
        orthanc.wait_for(
            lambda: _classes_in(orthanc, uid) == sorted([*sources, KOS]),
            timeout_s=60,
            message="the source images and the rejection note, nothing else",
        )
    finally:
        ledger.dispose()


def test_the_patient_is_asked_by_qido_rs_of_a_dicomweb_archive(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    orthanc.require_dicomweb()
    settings = _settings(tmp_path, orthanc, {"url": f"{orthanc.url}/dicom-web"})
    ledger = Ledger(settings.database_url)
    try:
        _job_id, uid, _sources, held, _ = _in_the_pacs_then_deleted(
            settings, ledger, orthanc, tmp_path, seed=32
        )
        report = withdraw_results(
            settings, ledger, reason="quality", note=NOTE, by="jane", study_uid=uid
        )
        (job,) = report.jobs
        assert job.withdrawn, job.error
        path, note = _note_due(settings, ledger)
        assert (note.PatientID, str(note.PatientName)) == ("PAT32", "Müller^Jörg 32")
        assert _named(note) == held
        require_dciodvfy()
        assert dciodvfy_errors(path) == []
    finally:
        ledger.dispose()


def test_an_archive_that_cannot_tell_the_patient_refuses_the_withdrawal_with_why(
    tmp_path: Path, orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive that does not answer: refused, nothing recorded, asked once for a recall of
    two studies, and withdrawn once it answers; one that does not have the study: refused
    (the results are not there either); no query source: by hand. A dry run of a recall says
    which."""
    from acwi_node.export import withdrawal_headers
    from acwi_node.export.withdrawal_commands import _files_deleted

    asked: list[str] = []
    real_ask = withdrawal_headers._ask  # noqa: SLF001

    def counting_ask(settings: Settings, source: Any, study_uid: str) -> Any:
        asked.append(study_uid)
        return real_ask(settings, source, study_uid)

    monkeypatch.setattr(withdrawal_headers, "_ask", counting_ask)
    down = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": free_port()}
    settings = _settings(tmp_path, orthanc, down)
    ledger = Ledger(settings.database_url)
    try:
        job_id, uid, _sources, _held, _ = _in_the_pacs_then_deleted(
            settings, ledger, orthanc, tmp_path, seed=33
        )
        _, other, _sources, _held, _ = _in_the_pacs_then_deleted(
            settings, ledger, orthanc, tmp_path, seed=34
        )
        assert _files_deleted(settings, ["pacs"]) == (
            "; its files are deleted: the patient asked of archive"
        )
        with ledger.session() as s:
            model = s.get_one(Job, job_id).summary["model"]
        report = withdraw_results(
            settings, ledger, reason="safety", note=NOTE, by="jane",
            model_name=model["name"], model_version=model["version"],
        )  # fmt: skip
        assert [j.withdrawn for j in report.jobs] == [False, False]
        for job in report.jobs:
            assert "storage retention deleted its result files; asking archive" in job.error
            assert "withdraw again once it answers" in job.error
        assert len(asked) == 1  # the archive that failed is not asked again in the request
        assert ledger.due_deliveries() == []

        answering = _settings(tmp_path, orthanc, _dimse(orthanc))
        (job,) = withdraw_results(
            answering, ledger, reason="quality", note=NOTE, by="jane", study_uid=other
        ).jobs
        assert job.withdrawn, job.error

        orthanc.client.delete(f"/studies/{orthanc.find_study(uid)}").raise_for_status()
        (job,) = withdraw_results(
            answering, ledger, reason="quality", note=NOTE, by="jane", study_uid=uid
        ).jobs
        assert not job.withdrawn
        assert "archive does not have the study" in job.error

        alone = _settings(tmp_path, orthanc, None)
        assert _files_deleted(alone, ["pacs"]) == "; its files are deleted: reject by hand in pacs"
        (job,) = withdraw_results(
            alone, ledger, reason="quality", note=NOTE, by="jane", study_uid=uid
        ).jobs
        assert not job.withdrawn and "reject them in the PACS by hand" in job.error
        assert "no query_source of pacs" in job.error
    finally:
        ledger.dispose()
