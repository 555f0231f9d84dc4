"""A radiologist's verdict on a review item, and the VERIFIED SR it produces.

* ``confirm``: the model's predicted label is right.
* ``override``: the right label is another of the model's labels; a reason is required.
* ``escalate``: a second opinion is needed; a reason is required. The item stays on the
  worklist (at the top) and no SR is written.

With a confirmed or corrected finding the reader may mark the lesion on the images, a box per
image (:mod:`.lesion_boxes`): kept with the verdict, written into the verified SR as a planar
region of its image, exported with the feedback.

Confirm and override close the item, write a VERIFIED Comprehensive 3D SR (verifying observer =
the radiologist) that supersedes the unverified one, store it in the results directory and queue
it in the outbox for every destination of the job: the exporter sends it by C-STORE like any
other result. The SR is built before the item is claimed, so a case that cannot be verified
(missing files) stays open; if storing it fails after the claim, the verdict is undone and its
file removed. A verdict or an amendment on an analysis whose results were withdrawn from the PACS
is refused (:class:`ResultsWithdrawn`), also one whose claim the withdrawal came just after: its
verified SR is refused then, and its case closed as the withdrawal closes the cases it finds
open (``withdrawn``), never open again.

A closed case's verdict can be amended (:func:`amend_verdict`): a reader who finds the verdict
wrong (the finding, or the lesion boxes) gives a confirm or override again, with a reason. The
amendment replaces the verdict it amends (which stays in the case's history, superseded): a new
VERIFIED SR, with its own SOP Instance UID, lists the one it replaces among its predecessor
documents and goes to the same destinations; the RIS gets the amended verdict as a corrected
result (``C``); the agreement figures and the feedback export take the amendment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from acwi_node.config import Settings
from acwi_node.inference.types import unit_name
from acwi_node.ingest.spool import Spool, SpoolFile
from acwi_node.ledger import ResultFile, StudyActionRefused
from acwi_node.ledger.models import VERIFIED_SR_KIND, utcnow
from acwi_node.results.encoding import encode_part10
from acwi_node.results.sr import LesionRegion, Verification, build_verified_sr
from acwi_node.review.inputs import typed_text_error
from acwi_node.review.lesion_boxes import BoxError, marks_from_pixels, place_boxes
from acwi_node.review.store import (
    ACTIONS,
    FINAL_ACTIONS,
    RESULTS_WITHDRAWN,
    ItemClosed,
    ResultsWithdrawn,
    ReviewError,
    ReviewStore,
    SessionInfo,
    VerdictAmended,
    frame_number_of,
    kept_boxes,
)

log = logging.getLogger("acwi_node.review")

MAX_REASON = 1000


@dataclass(frozen=True)
class VerdictOutcome:
    verdict_id: int
    action: str
    label: str
    sr_sop_instance_uid: str
    deliveries: int


def _unverified_sr(settings: Settings, case: dict[str, Any]) -> Dataset:
    paths = [r["path"] for r in case["results"] if r["kind"] == "sr"]
    if not paths:
        raise ReviewError("this case has no AI result SR to verify")
    path = settings.results_dir / paths[0]
    try:
        return dcmread(path)
    except (OSError, ValueError) as exc:
        raise ReviewError("the AI result SR of this case cannot be read") from exc


def _sources(settings: Settings, store: ReviewStore, job_id: int) -> list[Dataset]:
    spool = Spool(settings.spool_dir, fsync=False)
    sources: list[Dataset] = []
    for rel in store.job_instance_paths(job_id):
        try:
            sources.append(dcmread(spool.resolve(rel), stop_before_pixels=True))
        except (OSError, ValueError):
            continue
    if not sources:
        raise ReviewError("the source images of this case are no longer in the spool")
    return sources


def decide_label(case: dict[str, Any], action: str, label: str, reason: str) -> str:
    """Validate a verdict against the case; returns the label the verdict stands by."""
    if action not in ACTIONS:
        raise ReviewError(f"verdict must be one of {', '.join(ACTIONS)}")
    if len(reason) > MAX_REASON:
        raise ReviewError(f"reason: at most {MAX_REASON} characters")
    problem = typed_text_error(reason, "reason")
    if problem is not None:  # it goes into the ledger, the verified SR and the RIS's message
        raise ReviewError(problem)
    summary = case["summary"]
    predicted = str(summary.get("predicted_label") or "")
    labels = [str(x) for x in summary.get("labels") or []]
    if action == "confirm":
        if not predicted:
            raise ReviewError("this case has no predicted label to confirm")
        return predicted
    if action == "override":
        if label not in labels:
            raise ReviewError(f"choose the correct label among: {', '.join(labels)}")
        if label == predicted:
            raise ReviewError("the chosen label is the model's: use confirm")
        if not reason:
            raise ReviewError("an override needs a reason")
        return label
    if not reason:
        raise ReviewError("an escalation needs a reason")
    return ""


def _queue_ris_verdict(
    settings: Settings,
    store: ReviewStore,
    job_id: int,
    item_id: int,
    user: SessionInfo,
    verification: Verification,
    amendment: int | None = None,
) -> None:
    """Also tell the RIS (ORU^R01 with the verdict; ``amendment``: the id of an amending
    verdict) when ``[hl7.ris]`` is configured.

    The verdict and the verified SR stand even if this fails; the failure is logged.
    """
    if settings.hl7.ris is None:
        return
    try:
        from acwi_node.hl7.client import queue_oru
        from acwi_node.hl7.messages import Lesion
        from acwi_node.hl7.messages import Verdict as Hl7Verdict

        queue_oru(
            settings,
            store.ledger,
            job_id,
            Hl7Verdict(
                agrees=verification.action == "confirm",
                label=verification.label,
                reviewer=user.user_name,
                comment=verification.reason,
                reviewed_at=verification.verified_at,
                lesions=tuple(
                    Lesion(r.sop_instance_uid, r.frame_number, r.box) for r in verification.regions
                ),
            ),
            review_id=item_id,
            amendment=amendment,
        )
    except Exception:
        log.exception("review item %d: the verdict could not be queued for the RIS", item_id)


def _regions(
    case: dict[str, Any],
    sources: list[Dataset],
    marks: Mapping[str, str],
    label: str,
    pixels: Mapping[str, Any] | None = None,
) -> tuple[dict[str, list[list[int]]], tuple[LesionRegion, ...]]:
    """The reader's lesion boxes in the images' pixels, by image name, and as the verified
    SR's regions; each image's Rows and Columns from its header among ``sources``. The boxes
    come as the page's ``marks`` or, from the JSON API, in the images' ``pixels``."""
    images = _case_images(case["summary"])
    headers = {str(ds.SOPInstanceUID): ds for ds in sources}

    def image_size(name: str) -> tuple[int, int] | None:
        ds = headers.get(images[name][0])
        if ds is None or "Rows" not in ds or "Columns" not in ds:
            return None
        return int(ds.Rows), int(ds.Columns)

    if pixels:
        if marks:
            raise BoxError("lesion boxes come as the page's marks or in pixels, not both")
        marks = marks_from_pixels(pixels, images=set(images), image_size=image_size)
    boxes = place_boxes(
        marks,
        images=set(images),
        label=label,
        finding_labels=_finding_labels(case["summary"]),
        image_size=image_size,
    )
    regions = tuple(
        LesionRegion(*images[name], (box[0], box[1], box[2], box[3]))
        for name, kept in boxes.items()
        for box in kept
    )
    return boxes, regions


def _case_images(summary: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """A job's analysed images by name (see :func:`unit_name`): SOP Instance UID and frame."""
    out: dict[str, tuple[str, int | None]] = {}
    for im in summary.get("images") or []:
        sop, frame = str(im.get("sop_instance_uid", "")), frame_number_of(im)
        out[unit_name(sop, frame)] = (sop, frame)
    return out


def _finding_labels(summary: dict[str, Any]) -> list[str]:
    """The labels of a job's model that name a finding; for a job analysed before summaries
    carried them, every label but one named "normal"."""
    if "finding_labels" in summary:
        return [str(label) for label in summary["finding_labels"]]
    return [str(label) for label in summary.get("labels") or [] if str(label).lower() != "normal"]


def submit_verdict(
    settings: Settings,
    store: ReviewStore,
    item_id: int,
    user: SessionInfo,
    *,
    action: str,
    label: str = "",
    reason: str = "",
    marks: Mapping[str, str] | None = None,
    boxes: Mapping[str, Any] | None = None,
) -> VerdictOutcome:
    """Record a verdict; for confirm/override also write and queue the verified SR.

    ``marks`` are the lesion boxes drawn on the page, by image name (see
    :func:`~acwi_node.review.lesion_boxes.place_boxes`); ``boxes`` the same given in the
    images' pixels (the JSON API, see
    :func:`~acwi_node.review.lesion_boxes.marks_from_pixels`)."""
    case = store.case(item_id)
    if case is None:
        raise ReviewError("no such case")
    if case["state"] != "open":
        raise ItemClosed("this case is no longer open for review")
    reason = reason.strip()
    chosen = decide_label(case, action, label.strip(), reason)
    model_label = str(case["summary"].get("predicted_label") or "")
    if action == "escalate":
        if marks or boxes:
            raise BoxError(
                "a lesion box goes with a confirmed or corrected finding, not an escalation"
            )
        vid = store.claim_verdict(
            item_id, user=user, action=action, label="", model_label=model_label, reason=reason
        )
        log.info("review item %d escalated", item_id)
        return VerdictOutcome(vid, action, "", "", 0)

    verified = _verified_sr(settings, store, case, user, action, chosen, reason, marks, boxes)
    kept, verification, document, data = verified
    uid = str(document.SOPInstanceUID)
    ris_control_id = None
    if settings.hl7.ris is not None:
        from acwi_node.hl7.client import control_id_for

        ris_control_id = control_id_for(case["job_id"], f"verdict-{item_id}", item_id)
    vid = store.claim_verdict(
        item_id,
        user=user,
        action=action,
        label=chosen,
        model_label=model_label,
        reason=reason,
        sr_sop_instance_uid=uid,
        hl7_control_id=ris_control_id,  # the RIS's ORU, promised with the verdict
        boxes=kept,
    )
    deliveries = _store_verified_sr(settings, store, case, item_id, vid, document, data)
    _queue_ris_verdict(settings, store, case["job_id"], item_id, user, verification)
    log.info(
        "review item %d: %s, verified SR queued for %d destination(s)",
        item_id,
        action,
        deliveries,
    )
    return VerdictOutcome(vid, action, chosen, uid, deliveries)


def _verified_sr(
    settings: Settings,
    store: ReviewStore,
    case: dict[str, Any],
    user: SessionInfo,
    action: str,
    label: str,
    reason: str,
    marks: Mapping[str, str] | None,
    boxes: Mapping[str, Any] | None,
    *,
    amends: str = "",
    revision: int = 0,
) -> tuple[dict[str, list[list[int]]], Verification, Dataset, bytes]:
    """A confirm's or override's VERIFIED SR (``amends``: the verified SR an amendment
    replaces), built from the case's unverified SR and source images before anything is
    recorded: the lesion boxes kept (pixels, by image), the verification, the document and its
    Part 10 bytes. Raises :class:`ReviewError` when the case cannot be verified."""
    unverified = _unverified_sr(settings, case)
    sources = _sources(settings, store, case["job_id"])
    kept, regions = _regions(case, sources, marks or {}, label, boxes)
    verification = Verification(
        observer_name=user.user_name,
        organization=settings.review.organization,
        action=action,
        label=label,
        reason=reason,
        verified_at=utcnow(),
        regions=regions,
        amends=amends,
        revision=revision,
    )
    try:
        model = case["summary"].get("model") or {}
        document = build_verified_sr(
            unverified,
            sources,
            verification,
            reissue=int(model.get("reissue", 0)),
            timezone=settings.monitoring.timezone,
        )
    except ValueError as exc:
        raise ReviewError(f"the verified SR cannot be written: {exc}") from exc
    return kept, verification, document, encode_part10(document)


def _store_verified_sr(
    settings: Settings,
    store: ReviewStore,
    case: dict[str, Any],
    item_id: int,
    verdict_id: int,
    document: Dataset,
    data: bytes,
) -> int:
    """Store a claimed verdict's verified SR and queue it for the job's destinations; returns
    how many deliveries were queued. On failure the verdict is undone, the file written
    removed and the error raised: :class:`ResultsWithdrawn` when the analysis's results were
    withdrawn since the claim (its case is then closed, see :meth:`ReviewStore.undo_verdict`).
    """
    uid = str(document.SOPInstanceUID)
    out = Spool(settings.results_dir, fsync=settings.ingest.fsync)
    written: SpoolFile | None = None
    try:
        written = out.write(case["study_uid"], uid, data)
        return store.attach_verified_sr(
            case["job_id"],
            ResultFile(
                VERIFIED_SR_KIND, uid, str(document.SOPClassUID), out.relative(Path(written.path))
            ),
            settings.destination_takes,
        )
    except StudyActionRefused as exc:  # the results were withdrawn meanwhile
        store.undo_verdict(verdict_id)
        _remove_unrecorded(store, out, written, item_id)
        raise ResultsWithdrawn(str(exc)) from exc
    except Exception:
        log.exception("review item %d: the verified SR could not be stored", item_id)
        store.undo_verdict(verdict_id)
        _remove_unrecorded(store, out, written, item_id)
        raise


def _remove_unrecorded(
    store: ReviewStore, out: Spool, written: SpoolFile | None, item_id: int
) -> None:
    """Remove the verified SR file of a verdict undone: no result in the ledger names it, and
    nothing is sent of it. A file some result names (the same object of an earlier analysis
    of the study), or that another write replaced since, stays."""
    if written is None:
        return
    relative = out.relative(Path(written.path))
    try:
        if store.names_result_file(relative) or not out.is_current(relative, written):
            return
        out.discard(Path(written.path))
    except Exception as exc:  # the verdict's failure is what the reader is told
        log.warning("review item %d: the verified SR file %s stays: %s", item_id, relative, exc)


def current_verdict(case: dict[str, Any]) -> dict[str, Any] | None:
    """The confirm or override that stands on ``case`` (:meth:`ReviewStore.case`), or None."""
    wanted = case.get("current_verdict")
    return next((v for v in case["verdicts"] if v["id"] == wanted), None)


def amend_verdict(
    settings: Settings,
    store: ReviewStore,
    item_id: int,
    user: SessionInfo,
    *,
    amends: int,
    action: str,
    label: str = "",
    reason: str = "",
    marks: Mapping[str, str] | None = None,
    boxes: Mapping[str, Any] | None = None,
) -> VerdictOutcome:
    """Amend a closed case's verdict: record a confirm or override that replaces verdict
    ``amends`` (the case's current one, as the page showed it), write its VERIFIED SR (a new
    instance that names the one it replaces as a predecessor) and queue it, and the RIS's
    corrected ORU^R01.

    ``marks`` (the page's) or ``boxes`` (pixels, the JSON API's) are all the lesion boxes the
    amended verdict keeps (the page starts from the current verdict's). A reason is required,
    and the amendment must change something: the finding or the boxes. Raises
    :class:`ReviewError` (:class:`VerdictAmended` when ``amends`` is no longer the current
    verdict).
    """
    case = store.case(item_id)
    if case is None:
        raise ReviewError("no such case")
    if case["withdrawn"]:  # its verified SR would go to the PACS
        raise ResultsWithdrawn(RESULTS_WITHDRAWN)
    previous = current_verdict(case)
    if case["state"] != "closed" or previous is None:
        raise ReviewError("only a closed case's verdict can be amended")
    if previous["id"] != amends:
        raise VerdictAmended("this case's verdict changed since the page was loaded: reload it")
    if case["images_deleted_at"]:
        raise ReviewError(
            "storage retention deleted this case's images: its verdict can no longer be amended"
        )
    if action not in FINAL_ACTIONS:
        raise ReviewError("an amendment confirms or overrides the finding")
    reason = reason.strip()
    if not reason:
        raise ReviewError("an amendment needs a reason")
    chosen = decide_label(case, action, label.strip(), reason)
    kept, verification, document, data = _verified_sr(
        settings, store, case, user, action, chosen, reason, marks, boxes,
        amends=str(previous["sr_sop_instance_uid"]),
        revision=sum(1 for v in case["verdicts"] if v["action"] in FINAL_ACTIONS),
    )  # fmt: skip
    if (action, chosen, _same_boxes(kept)) == (
        previous["action"],
        previous["label"],
        _same_boxes(kept_boxes(previous["boxes"])),
    ):
        raise ReviewError("the amendment changes nothing: change the finding or the lesion boxes")
    uid = str(document.SOPInstanceUID)
    vid = store.claim_amendment(
        item_id,
        amends,
        user=user,
        action=action,
        label=chosen,
        model_label=str(case["summary"].get("predicted_label") or ""),
        reason=reason,
        sr_sop_instance_uid=uid,
        ris=settings.hl7.ris is not None,  # the RIS's ORU, promised with the amendment
        boxes=kept,
    )
    deliveries = _store_verified_sr(settings, store, case, item_id, vid, document, data)
    _queue_ris_verdict(settings, store, case["job_id"], item_id, user, verification, vid)
    log.info(
        "review item %d: verdict %d amended (%s), verified SR queued for %d destination(s)",
        item_id,
        amends,
        action,
        deliveries,
    )
    return VerdictOutcome(vid, action, chosen, uid, deliveries)


def _same_boxes(boxes: Mapping[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Boxes by image in an order-free form, to tell whether an amendment moved any."""
    return {name: sorted(kept) for name, kept in boxes.items() if kept}
