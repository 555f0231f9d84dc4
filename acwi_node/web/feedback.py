"""``GET /api/feedback/export.zip``: the reviewed cases as a labelled dataset, de-identified,
for an ML engineer without a shell on the node (administrators only).

The archive holds what ``acwi-node feedback export DIR`` writes (``labels.csv``,
``deidentification.json``, ``images/*.dcm``), always de-identified, whatever
``feedback.deidentify`` says: exact copies leave the node only from its command line. It is
built in a folder under ``<data_dir>/tmp`` and streamed from a file there, removed once sent.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from acwi_node.audit import AuditEvent, audit, user
from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.review.feedback import ExportReport, export_feedback
from acwi_node.web.guards import admin_user

log = logging.getLogger("acwi_node.api")


def build_archive(settings: Settings, db: Ledger, work: Path) -> tuple[Path, ExportReport]:
    """Export into ``work/feedback`` (de-identified) and zip it into ``work``; the archive's
    path and what was exported."""
    folder = work / "feedback"
    report = export_feedback(settings, db, folder, deidentify=True)
    archive = work / "feedback.zip"
    # Stored, not deflated: most of it is pixel data, and the archive is made per request.
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(folder).as_posix())
    shutil.rmtree(folder, ignore_errors=True)
    return archive, report


def feedback_router(settings: Settings, db: Ledger) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/api/feedback/export.zip",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/zip": {}}, "description": "The de-identified export"},
            403: {"description": "Not an administrator"},
            503: {"description": "The export could not be written (detail)"},
        },
    )
    def export_zip(request: Request, name: str = Depends(admin_user)) -> FileResponse:
        """The reviewed cases, de-identified (DICOM PS3.15 Basic Profile), as a ZIP archive of
        ``labels.csv``, ``deidentification.json`` and ``images/``; the counts are in the
        ``X-Images``, ``X-Cases``, ``X-Withheld`` and ``X-Missing`` headers."""
        scratch = settings.data_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="feedback-", dir=scratch))
        try:
            archive, report = build_archive(settings, db, work)
        except (OSError, ValueError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            log.error("feedback export for %s failed: %s", name, exc)
            raise HTTPException(status_code=503, detail=f"the export failed: {exc}") from exc
        client = request.client.host if request.client else ""
        audit(
            AuditEvent.FEEDBACK_EXPORTED,
            participants=[user(name, client)],
            detail=f"{report.images} image(s) of {report.cases} reviewed case(s) exported,"
            " de-identified, over HTTP"
            + (f"; {report.withheld} withheld" if report.withheld else ""),
        )
        log.info(
            "feedback export: %d image(s) of %d case(s), de-identified, for %s",
            report.images,
            report.cases,
            name,
        )
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        return FileResponse(
            archive,
            media_type="application/zip",
            filename=f"acwi-feedback-{stamp}.zip",
            headers={
                "X-Images": str(report.images),
                "X-Cases": str(report.cases),
                "X-Withheld": str(report.withheld),
                "X-Cleaned": str(report.cleaned),
                "X-Missing": str(report.missing),
                "Cache-Control": "no-store",
            },
            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
        )

    return router
