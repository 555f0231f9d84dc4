"""DICOM result objects: the TID 1500 SR, heatmap secondary captures and parametric maps, their
UIDs and checks."""

from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.parametric_map import build_parametric_maps
from acwi_node.results.sr import build_sr, summarise_sr
from acwi_node.results.uids import ResultUIDs, derive_uid, is_valid_uid, result_uids
from acwi_node.results.validate import DciodvfyNotFoundError, DciodvfyReport, run_dciodvfy

__all__ = [
    "DciodvfyNotFoundError",
    "DciodvfyReport",
    "ResultUIDs",
    "build_heatmap_sc",
    "build_parametric_maps",
    "build_sr",
    "derive_uid",
    "is_valid_uid",
    "result_uids",
    "run_dciodvfy",
    "summarise_sr",
]
