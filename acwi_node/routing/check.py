"""``acwi-node routes check``: what the configured routes would do with studies on disk.

A PACS administrator setting up routes wants to know, before a modality sends anything, which
route takes a study, which of its images the route's model reads, and why a route does not
match. This reads DICOM files (headers only), groups them by study as the SCP would, and
applies the same rules the node applies (:mod:`acwi_node.routing.rules`,
:mod:`acwi_node.routing.selection`), and the checks of preprocessing that a header answers
(:mod:`acwi_node.inference.image_checks`). The calling AE title is not in the files: it is given on
the command line, as is the day the study would complete (routes' ``max_age_days``).
Nothing is written and nothing is sent. Only UIDs and coded values are printed, no names.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from acwi_node.anatomy import image_body_parts
from acwi_node.config import Settings
from acwi_node.dicom_frames import frame_count
from acwi_node.inference.image_checks import header_refusal
from acwi_node.ingest.own_results import is_own_result
from acwi_node.ledger import StudyFacts
from acwi_node.routing.rules import decide_routes, why_not
from acwi_node.routing.selection import select_instances

#: Unreadable files the text report names (the JSON names them all).
UNREADABLE_SHOWN = 5


@dataclass
class RouteOutcome:
    """One configured route against one study."""

    route: str
    priority: int
    model: str
    destinations: list[str]
    #: The models that analyse its studies in the shadow of ``model`` (nothing sent).
    shadow_models: list[str] = field(default_factory=list)
    #: Why the route does not match the study; "" when it does.
    no_match: str = ""
    #: Of a matching route: how many instances its model reads, and the others' reasons.
    selected: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    #: Of the selected instances, those the model cannot read (from their headers: a
    #: localizer, a colour image, no image at all), by reason.
    unreadable_by_model: dict[str, int] = field(default_factory=dict)
    #: Of the selected instances the model can read, the multi-frame ones and their frames
    #: (each frame is one image to the model: a result and a heatmap of its own).
    multi_frame: int = 0
    frames: int = 0
    #: What its jobs write beside the SR (the route's ``results``, else the worker's).
    heatmaps: str = "all"
    parametric_maps: bool = False
    #: The fraction of the heatmap's peak the SR's AI regions are found at; None: none.
    sr_region_fraction: float | None = 0.5

    @property
    def matches(self) -> bool:
        return not self.no_match


@dataclass
class StudyCheck:
    """One study found in the files, and what each route does with it."""

    study_uid: str
    instances: int
    modalities: list[str]
    study_date: str
    #: The node's own results among the files: dropped on receipt, never routed.
    own_results: int
    routes: list[RouteOutcome]

    @property
    def jobs(self) -> list[str]:
        """The routes that would give the study a job, highest priority first."""
        return [r.route for r in self.routes if r.matches]

    @property
    def analysed(self) -> bool:
        """A job of the study's would have images its model can read."""
        return any(
            r.matches and r.selected > sum(r.unreadable_by_model.values()) for r in self.routes
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "instances": self.instances,
            "modalities": self.modalities,
            "study_date": self.study_date,
            "own_results": self.own_results,
            "jobs": self.jobs,
            "analysed": self.analysed,
            "routes": [
                {
                    "route": r.route,
                    "priority": r.priority,
                    "model": r.model,
                    "shadow_models": r.shadow_models,
                    "destinations": r.destinations,
                    "matches": r.matches,
                    "no_match": r.no_match,
                    "selected": r.selected,
                    "left_out": r.left_out,
                    "unreadable_by_model": r.unreadable_by_model,
                    "multi_frame": r.multi_frame,
                    "frames": r.frames,
                    "heatmaps": r.heatmaps,
                    "parametric_maps": r.parametric_maps,
                    "sr_regions": r.sr_region_fraction is not None,
                    "sr_region_fraction": r.sr_region_fraction,
                }
                for r in self.routes
            ],
        }


@dataclass
class CheckReport:
    studies: list[StudyCheck]
    #: Files that are not DICOM Part 10 (or not readable), with the reason.
    unreadable: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "studies": [s.as_dict() for s in self.studies],
            "unreadable": self.unreadable,
        }


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def read_studies(paths: Iterable[Path]) -> tuple[dict[str, list[Dataset]], dict[str, str]]:
    """Headers of the DICOM files under ``paths``, by Study Instance UID; and the files that
    could not be read, with the reason."""
    studies: dict[str, list[Dataset]] = {}
    unreadable: dict[str, str] = {}
    for path in _files(paths):
        try:
            # values over 4 KiB (the pixel data) left in the file: which pixel data element
            # the file has is known, its bytes are not read
            ds = dcmread(path, defer_size=4096)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            unreadable[str(path)] = f"not a readable DICOM file: {type(exc).__name__}"
            continue
        study_uid = _text(ds, "StudyInstanceUID")
        if not study_uid:
            unreadable[str(path)] = "no Study Instance UID"
            continue
        studies.setdefault(study_uid, []).append(ds)
    return studies, unreadable


def _model_cannot_read(ds: Dataset) -> str | None:
    """Preprocessing's refusal told from the header and which pixel data element the file
    has (its bytes are not read: whether they decode is found when the study is analysed)."""
    if "Rows" not in ds and "PhotometricInterpretation" not in ds:
        return "no pixel data (not an image)"
    refusal = header_refusal(ds)
    if refusal is None and "PixelData" not in ds:
        # Float or Double Float Pixel Data (a parametric map, some enhanced images): as the
        # analysis says (acwi_node.inference.preprocess.padded_modality_pixels)
        return "no PixelData (not an integer-pixel image)"
    return refusal


def facts_of(study_uid: str, datasets: list[Dataset], calling_ae: str) -> StudyFacts:
    """What routing decides on, as the ledger would hold it once these instances arrived."""
    dates = [_text(ds, "StudyDate") for ds in datasets if _text(ds, "StudyDate")]
    return StudyFacts(
        study_uid=study_uid,
        calling_ae=calling_ae,
        modalities={_text(ds, "Modality") for ds in datasets if _text(ds, "Modality")},
        sop_classes={_text(ds, "SOPClassUID") for ds in datasets},
        body_parts={part for ds in datasets for part in image_body_parts(ds).split("\\") if part},
        study_date=dates[0] if dates else "",
    )


def check_study(
    settings: Settings,
    study_uid: str,
    datasets: list[Dataset],
    *,
    calling_ae: str,
    today: dt.date,
) -> StudyCheck:
    received: list[Dataset] = []
    own = 0
    for ds in datasets:
        if is_own_result({"Manufacturer": _text(ds, "Manufacturer")}):
            own += 1
        else:
            received.append(ds)
    facts = facts_of(study_uid, received, calling_ae)
    routed = {job.route for job in decide_routes(settings.routes, facts, today)}
    ordered = sorted(enumerate(settings.routes), key=lambda ir: (-ir[1].priority, ir[0]))
    outcomes: list[RouteOutcome] = []
    for _, route in ordered:
        outcome = RouteOutcome(
            route=route.name,
            priority=route.priority,
            model=route.model,
            destinations=list(route.destinations),
            shadow_models=list(route.shadow_models),
            heatmaps=route.results.heatmaps or settings.worker.heatmaps,
            parametric_maps=(
                settings.worker.parametric_maps
                if route.results.parametric_maps is None
                else route.results.parametric_maps
            ),
            sr_region_fraction=route.results.region_fraction(settings.worker),
        )
        if route.name not in routed:
            outcome.no_match = why_not(route, facts, today) or "does not match"
        else:
            picked = select_instances(route, received)
            outcome.selected = len(picked.datasets)
            prefix = f"not selected by route {route.name!r}: "
            outcome.left_out = dict(
                Counter(r.removeprefix(prefix) for r in picked.left_out.values()).most_common()
            )
            readable: list[Dataset] = []
            refused: Counter[str] = Counter()
            for ds in picked.datasets:
                reason = _model_cannot_read(ds)
                if reason is None:
                    readable.append(ds)
                else:
                    refused[reason] += 1
            outcome.unreadable_by_model = dict(refused.most_common())
            multi = [frame_count(ds) for ds in readable if frame_count(ds) > 1]
            outcome.multi_frame, outcome.frames = len(multi), sum(multi)
        outcomes.append(outcome)
    return StudyCheck(
        study_uid=study_uid,
        instances=len(received),
        modalities=sorted(facts.modalities),
        study_date=facts.study_date,
        own_results=own,
        routes=outcomes,
    )


def check(
    settings: Settings, paths: Iterable[Path], *, calling_ae: str = "", today: dt.date
) -> CheckReport:
    studies, unreadable = read_studies(paths)
    return CheckReport(
        studies=[
            check_study(settings, uid, datasets, calling_ae=calling_ae, today=today)
            for uid, datasets in studies.items()
        ],
        unreadable=unreadable,
    )


def format_report(report: CheckReport) -> str:
    """The report as text, one block per study."""
    lines: list[str] = []
    for study in report.studies:
        lines.append(
            f"study {study.study_uid}: {study.instances} instance(s), "
            f"modalities {'/'.join(study.modalities) or 'none'}, "
            f"Study Date {study.study_date or 'none'}"
        )
        if study.own_results:
            lines.append(
                f"  {study.own_results} object(s) written by ACWI Node (its results):"
                " dropped on receipt"
            )
        if not study.routes:
            lines.append("  no routes configured")
        for r in study.routes:
            head = f"  route {r.route} (priority {r.priority})"
            if not r.matches:
                lines.append(f"{head}: no match: {r.no_match}")
                continue
            regions = (
                "without AI regions"
                if r.sr_region_fraction is None
                else f"with AI regions at {r.sr_region_fraction:g} of the peak"
            )
            written = [f"SR {regions}", f"heatmaps: {r.heatmaps}"]
            if r.parametric_maps:
                written.append("parametric maps")
            lines.append(
                f"{head}: matches; model {r.model} reads {r.selected} of {study.instances}"
                f" instance(s); results ({', '.join(written)}) to"
                f" {', '.join(r.destinations) or 'no destination'}"
                + (
                    f"; in its shadow (kept, not sent): {', '.join(r.shadow_models)}"
                    if r.shadow_models
                    else ""
                )
            )
            if r.multi_frame:
                lines.append(
                    f"    {r.multi_frame} multi-frame image(s): read frame by frame"
                    f" ({r.frames} frames, each with its result and heatmap)"
                )
            for reason, count in r.left_out.items():
                lines.append(f"    left out: {count} x {reason}")
            for reason, count in r.unreadable_by_model.items():
                lines.append(f"    the model cannot read: {count} x {reason}")
            if r.selected <= sum(r.unreadable_by_model.values()):
                lines.append("    its job would fail: nothing to analyse")
        if not study.instances:
            lines.append("  => nothing the node would record")
        elif not study.jobs:
            lines.append("  => no route matches: the study would be recorded as not_routed")
        else:
            lines.append(f"  => job(s): {', '.join(study.jobs)}")
        lines.append("")
    shown = list(report.unreadable.items())[:UNREADABLE_SHOWN]
    if report.unreadable:
        lines.append(f"{len(report.unreadable)} file(s) skipped:")
    for path, reason in shown:
        lines.append(f"  {path}: {reason}")
    if len(report.unreadable) > len(shown):
        lines.append(f"  and {len(report.unreadable) - len(shown)} more (--json lists them all)")
    if not report.studies and not report.unreadable:
        lines.append("no files found")
    return "\n".join(lines).rstrip() + "\n"
