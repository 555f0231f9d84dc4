"""Heatmaps as Parametric Maps (PS3.3 A.75), for viewers that overlay them on the source.

The RGB secondary captures (:mod:`.heatmap`) are what every PACS viewer shows. A viewer that
overlays a Parametric Map on its source series (OHIF, 3D Slicer and others) lets the reader pick
the colour map and opacity and read the value under the cursor. Written when
``worker.parametric_maps`` is on: one multi-frame Parametric Map per analysed series, a frame per
image in the source images' geometry (same rows and columns, the images' plane positions and
orientation, in their frame of reference), each pixel the model's heat for that image (0 to 1,
relative to the image's peak, as in the secondary captures) stored as a 16-bit integer with a
real-world value mapping (value = stored / 65535).

The IOD has a frame of reference, so only images with one get a map: cross-sectional images
(CT, MR, PET) do; projection radiographs and secondary captures do not, and keep their
secondary captures only. Images of one series that differ in size go to one map per size. A
multi-frame image in a frame of reference (an Enhanced CT or MR) gets a map of its own, a frame
per frame in that frame's plane (from the image's functional groups), when every one of its
frames was analysed (a frame skipped, a localizer frame say, would leave a hole: no map, and the
secondary captures stand) and all its frames have the same pixel spacing, slice thickness and
orientation, shared or given per frame (a map has one of each: frames that differ get no map).
Built by ``highdicom.pm.ParametricMap``; the UIDs are derived from the source series (the
source image, for a multi-frame one), so a re-run replaces the map.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from acwi_node.dicom_frames import frame_count, frame_view
from acwi_node.inference.types import ImageResult, StudyAnalysis
from acwi_node.results.charset import result_charset
from acwi_node.results.headers import (
    copy_anatomy,
    patient_study_header,
    set_result_times,
    source_header,
)
from acwi_node.results.heatmap import NOTICE, unit_heat
from acwi_node.results.iod_classes import in_patient_study_class, restore_reference_classes
from acwi_node.results.sr import MANUFACTURER, algorithm_equipment
from acwi_node.results.uids import result_uids

__all__ = [
    "PARAMETRIC_MAP_SERIES_NUMBER",
    "STORED_MAX",
    "build_parametric_maps",
    "frames_share_planes",
    "mappable",
    "share_planes",
]

log = logging.getLogger("acwi_node.results")

PARAMETRIC_MAP_SERIES_NUMBER = 9903
#: The stored value of heat 1.0 (heat = stored / STORED_MAX).
STORED_MAX = 65535

_GEOMETRY = (
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)


def mappable(source: Dataset) -> bool:
    """Whether a parametric map can carry ``source``'s heatmaps: an image in a frame of
    reference, with its position, orientation and pixel spacing (a multi-frame image's, from
    its first frame's functional groups)."""
    geometry = frame_view(source, 1) if frame_count(source) > 1 else source
    return all(geometry.get(keyword) not in (None, "") for keyword in _GEOMETRY)


#: The functional groups whose values a map has one of (its shared functional groups), which
#: highdicom reads from a multi-frame source's shared group alone, and the attributes that
#: must be the same in every frame for them to be shared.
_PLANE_MACROS = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
}


def _frame_values(view: Dataset, keywords: Sequence[str]) -> tuple[tuple[float, ...], ...]:
    values = []
    for keyword in keywords:
        value = view.get(keyword)
        items = value if isinstance(value, MultiValue | list | tuple) else [value]
        values.append(tuple(float(v) if v not in (None, "") else float("nan") for v in items))
    return tuple(values)


def frames_share_planes(source: Dataset) -> bool:
    """Whether every frame of the multi-frame ``source`` has the same pixel spacing, slice
    thickness and orientation (its own functional groups', else the shared ones'): a map has
    one of each. False for values that are no numbers."""
    try:
        found = {
            _frame_values(frame_view(source, n), [k for ks in _PLANE_MACROS.values() for k in ks])
            for n in range(1, frame_count(source) + 1)
        }
    except (TypeError, ValueError):
        return False
    return len(found) == 1


def share_planes(header: Dataset) -> None:
    """Move, in place, the Pixel Measures and Plane Orientation that every frame of the
    multi-frame ``header`` has in its own functional group (:func:`frames_share_planes`) to its
    shared group, where highdicom reads them: a scanner may write them per frame."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not isinstance(per_frame, DicomSequence) or len(per_frame) == 0:
        return
    if not isinstance(header.get("SharedFunctionalGroupsSequence"), DicomSequence) or not len(
        header.SharedFunctionalGroupsSequence
    ):
        header.SharedFunctionalGroupsSequence = [Dataset()]
    shared = header.SharedFunctionalGroupsSequence[0]
    for macro in _PLANE_MACROS:
        if macro in shared or macro not in per_frame[0]:
            continue
        shared[macro] = per_frame[0][macro]
        for group in per_frame:
            if macro in group:
                del group[macro]


def build_parametric_maps(
    sources: Sequence[Dataset],
    analysis: StudyAnalysis,
    *,
    now: dt.datetime | None = None,
    timezone: str = "UTC",
) -> list[Dataset]:
    """One parametric map per series (and image size) of the analysed images that
    :func:`mappable` accepts; none for the others. Their own dates and times are ``now``
    (None: the moment each is built) in the source's offset from UTC, else ``timezone``'s,
    with Timezone Offset From UTC (:func:`~acwi_node.results.headers.set_result_times`).
    A map is an extra: a series whose map cannot be built (planes highdicom refuses, a
    heatmap of the wrong size) is logged and gets none, and the study's other results stand."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    groups: dict[tuple[str, int, int], list[tuple[Dataset, ImageResult]]] = {}
    for image in analysis.images:
        source = by_uid.get(image.sop_instance_uid)
        if source is None or not mappable(source):
            continue
        # a multi-frame image is a map of its own (its frames are its planes)
        framed = image.frame_number is not None
        group = image.sop_instance_uid if framed else str(source.SeriesInstanceUID)
        key = (group, int(source.Rows), int(source.Columns))
        groups.setdefault(key, []).append((source, image))
    for key, members in list(groups.items()):
        frames = frame_count(members[0][0])
        if frames > 1 and len(members) != frames:
            log.info(
                "no parametric map for a multi-frame image: %d of its %d frames analysed",
                len(members),
                frames,
            )
            del groups[key]
        elif frames > 1 and not frames_share_planes(members[0][0]):
            log.info(
                "no parametric map for a multi-frame image whose frames differ in pixel"
                " spacing, slice thickness or orientation (a map has one of each)"
            )
            del groups[key]
    # the sources of every map: the maps are one series, whose anatomy they all share
    mapped = [source for members in groups.values() for source, _ in members]
    maps: list[Dataset] = []
    for (group_uid, rows, columns), members in groups.items():
        try:
            pmap = _build(group_uid, rows, columns, members, analysis, len(maps) + 1, mapped)
            set_result_times(pmap, members[0][0], now, timezone)
            maps.append(pmap)
        except Exception as exc:
            log.warning(
                "no parametric map for %s (%dx%d): %s: %s",
                group_uid,
                rows,
                columns,
                type(exc).__name__,
                exc,
            )
    return maps


def _build(
    source_uid: str,
    rows: int,
    columns: int,
    members: list[tuple[Dataset, ImageResult]],
    analysis: StudyAnalysis,
    instance_number: int,
    series: Sequence[Dataset],
) -> Dataset:
    """The parametric map of one source series (or multi-frame image); ``series``: the sources
    of every map of the study (one series, :func:`~.headers.copy_anatomy`)."""
    members = sorted(
        members,
        key=lambda m: (
            int(m[0].get("InstanceNumber") or 0),
            m[1].sop_instance_uid,
            m[1].frame_number or 0,
        ),
    )
    frames = np.empty((len(members), rows, columns), dtype=np.uint16)
    for k, (_, image) in enumerate(members):
        heat = unit_heat(image.heatmap_array())
        if heat.shape != (rows, columns):
            raise ValueError(
                f"heatmap of {image.sop_instance_uid} is {heat.shape}, its image {rows}x{columns}"
            )
        frames[k] = np.rint(heat * STORED_MAX).astype(np.uint16)
    # highdicom copies patient and study from the first source image; a multi-frame image is
    # the one source of its map, whose frames are the image's, in order.
    # (an image of a class highdicom has no IOD for: copied as the stand-in's, whose Patient
    # and Study modules are the same, and referenced in its own class, :mod:`.iod_classes`)
    first = in_patient_study_class(patient_study_header(members[0][0]))
    if members[0][1].frame_number is not None:
        share_planes(first)
        headers = [first]
    else:
        headers = [first, *(source_header(s) for s, _ in members[1:])]
    model = analysis.model
    uids = result_uids(
        str(headers[0].StudyInstanceUID), model.name, model.version, analysis.reissue
    )
    mapping = RealWorldValueMapping(
        lut_label="HEAT",
        lut_explanation=f"{model.name} {model.version} relative heat"[:64],
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(0, STORED_MAX),
        slope=1.0 / STORED_MAX,
        intercept=0.0,
    )
    pmap = ParametricMap(
        source_images=headers,
        pixel_array=frames,
        series_instance_uid=uids.parametric_map_series_uid,
        series_number=PARAMETRIC_MAP_SERIES_NUMBER,
        sop_instance_uid=uids.parametric_map_instance_uid(source_uid, rows, columns),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=(model.weights_sha256 or "unknown")[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=STORED_MAX / 2, window_width=STORED_MAX)
        ],
        content_label="HEATMAP",
        content_description=NOTICE,
        # the model, as the IHE AI Results profile describes the algorithm of a result
        contributing_equipment=[algorithm_equipment(model.name, model.version, model.manufacturer)],
        series_description=f"ACWI {model.name} {model.version} AI heatmap map"[:64],
        # the source's, unless the model's words need more (UTF-8 then)
        specific_character_set=result_charset(
            headers[0].get("SpecificCharacterSet"),
            [model.name, model.version, model.manufacturer],
        ),
    )
    restore_reference_classes(pmap, [members[0][0]])
    copy_anatomy(headers[0], pmap, series)  # General Series: the sources' anatomy
    return pmap
