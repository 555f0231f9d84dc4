"""Which instances of a routed study the route's model reads (``[routes.select]``).

A route matches a *study* (:mod:`acwi_node.routing.rules`); its selection then picks the
*instances* the model reads: a CT route does not read the PET images of a PET/CT study, nor,
when told so, the reformats and projections a scanner adds to the axial slices. Each instance
left out gets a reason, listed with the images the model could not read.

Modality and SOP class default to the route's own ``match`` lists; ``[]`` means any. Values are
compared as routing compares them: case-insensitive, surrounding blanks ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from acwi_node.config import Route


def _norm(value: object) -> str:
    return str(value).strip().upper()


def _values(ds: Dataset, keyword: str) -> list[str]:
    """A (possibly multi-valued) string attribute's values; [] when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    items: Iterable[object] = [value] if isinstance(value, str) else list(value)
    return [str(v) for v in items]


@dataclass(frozen=True)
class InstanceSelection:
    """The compiled ``select`` of one route."""

    route: str
    modalities: frozenset[str] | None = None
    sop_classes: frozenset[str] | None = None
    image_type_exclude: frozenset[str] = frozenset()
    series_description: tuple[re.Pattern[str], ...] | None = None

    @classmethod
    def for_route(cls, route: Route) -> InstanceSelection:
        sel, match = route.select, route.match
        modality = sel.modality if sel.modality is not None else match.modality
        sop_class = sel.sop_class_uid if sel.sop_class_uid is not None else match.sop_class_uid
        return cls(
            route=route.name,
            modalities=frozenset(_norm(m) for m in modality) if modality else None,
            sop_classes=frozenset(s.strip() for s in sop_class) if sop_class else None,
            image_type_exclude=frozenset(_norm(v) for v in sel.image_type_exclude),
            series_description=(
                tuple(re.compile(p, re.IGNORECASE) for p in sel.series_description)
                if sel.series_description is not None
                else None
            ),
        )

    def reason_to_leave_out(self, ds: Dataset) -> str | None:
        """Why the route's model does not read this instance; None when it does."""
        prefix = f"not selected by route {self.route!r}"
        if self.modalities is not None:
            modality = _norm(ds.get("Modality", ""))
            if modality not in self.modalities:
                return f"{prefix}: Modality {modality or '(none)'}"
        if self.sop_classes is not None:
            sop_class = str(ds.get("SOPClassUID", "")).strip()
            if sop_class not in self.sop_classes:
                return f"{prefix}: SOP Class {sop_class or '(none)'}"
        if self.image_type_exclude:
            image_type = [_norm(v) for v in _values(ds, "ImageType")]
            if self.image_type_exclude & set(image_type):
                shown = "\\".join(image_type)
                return f"{prefix}: Image Type {shown}"
        if self.series_description is not None:
            description = str(ds.get("SeriesDescription", "") or "")
            if not any(p.search(description) for p in self.series_description):
                return f"{prefix}: Series Description not among the route's"
        return None


@dataclass
class Selected:
    """The instances a job's model reads, and those it leaves out with the reason."""

    datasets: list[Dataset] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def select_instances(route: Route | None, datasets: Sequence[Dataset]) -> Selected:
    """Split a study's datasets by the route's selection (no route: every one is read; a
    route removed from the configuration after the study was routed selects everything)."""
    out = Selected()
    if route is None:
        out.datasets = list(datasets)
        return out
    selection = InstanceSelection.for_route(route)
    for i, ds in enumerate(datasets):
        reason = selection.reason_to_leave_out(ds)
        if reason is None:
            out.datasets.append(ds)
        else:
            out.left_out[str(ds.get("SOPInstanceUID", "") or f"#{i}")] = reason
    return out
