"""A heatmap's map kept beside its secondary capture, for the review page's overlay.

The heatmap secondary capture burns the colour map into the source image as the file's window
shows it. The review page lets a radiologist choose another window (a CT's lung or bone window),
so it draws the colour map as a layer of its own over the image: from the class activation map
at the network's resolution (a few hundred bytes), which the worker writes next to each heatmap
object (``<uid>.heat.npy`` beside ``<uid>.dcm``), upsampled as the analyser upsamples it
(:func:`acwi_node.inference.resample.upsample_cam`) and coloured with the secondary capture's
colour map and opacity: over the file's window the layer looks as the secondary capture does.
The file is an aid to display, written without a flush: where it is missing (results written
before it existed, a crash) the page shows the secondary capture itself.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import numpy as np

from acwi_node.inference.resample import upsample_cam
from acwi_node.results.heatmap import MAX_ALPHA, ColourMapName, colour_map

log = logging.getLogger(__name__)

__all__ = ["MAX_CAM_SIDE", "heat_path", "overlay_rgba", "read_cam", "write_cam"]

#: The largest side of a map that is read back (a network's maps are 7 to 64 wide).
MAX_CAM_SIDE = 512
_SUFFIX = ".heat.npy"


def heat_path(object_path: Path) -> Path:
    """Where the map of the heatmap object at ``object_path`` (``<uid>.dcm``) is kept."""
    return object_path.with_name(object_path.stem + _SUFFIX)


def write_cam(object_path: Path, cam: np.ndarray) -> None:
    """Keep ``cam`` (2-D, at the network's resolution) beside the heatmap object at
    ``object_path``; a failure is logged, never raised (the page then shows the object)."""
    target = heat_path(object_path)
    temporary: str | None = None
    try:
        # the result objects' mode (0640 under the node's umask), not mkstemp's 0600: a web
        # process of another user in the node's group reads the object and its map alike
        temporary = str(target.with_name(f".heat-{secrets.token_hex(8)}.tmp"))
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.ascontiguousarray(cam, dtype=np.float32), allow_pickle=False)
        os.replace(temporary, target)
        temporary = None
    except OSError as exc:
        log.warning("the heatmap's map could not be kept for the review page: %s", exc)
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def read_cam(object_path: Path) -> np.ndarray | None:
    """The map kept beside the heatmap object at ``object_path``; None when there is none or
    it is not a small 2-D array of finite numbers."""
    try:
        cam = np.load(heat_path(object_path), allow_pickle=False)
    except (OSError, ValueError):
        return None
    if (
        not isinstance(cam, np.ndarray)
        or cam.ndim != 2
        or cam.dtype.kind != "f"
        or min(cam.shape) < 1
        or max(cam.shape) > MAX_CAM_SIDE
        or not np.isfinite(cam).all()
    ):
        return None
    return cam


def overlay_rgba(
    cam: np.ndarray, rows: int, columns: int, colours: ColourMapName = "jet"
) -> np.ndarray:
    """The colour map ``colours`` of ``cam`` at ``rows`` x ``columns`` as 8-bit RGBA, its alpha
    the heat times the secondary capture's opacity: drawn over a grey image ``g`` it gives
    ``g * (1 - alpha) + colour * alpha``, the secondary capture's blend."""
    heat = upsample_cam(cam, (rows, columns)).astype(np.float64)
    rgba = np.empty((rows, columns, 4), dtype=np.uint8)
    rgba[..., :3] = np.clip(np.rint(colour_map(heat, colours) * 255.0), 0, 255)
    rgba[..., 3] = np.clip(np.rint(MAX_ALPHA * heat * 255.0), 0, 255)
    return rgba
