"""Deterministic DICOM UIDs for the objects the node writes.

Every UID the node creates is derived from its inputs, so re-running the same model version on
the same study produces the same Series and SOP Instance UIDs: the PACS replaces the earlier
result instead of storing a duplicate.

The one exception is a result withdrawn from the PACS (an IOCM rejection note named its UIDs):
an archive with IOCM may refuse those UIDs for good, so the next analysis of the study by the
same model version is a **reissue** (:func:`result_uids`' ``reissue``, the number of that
version's analyses of the study withdrawn before it), whose UIDs are derived with it. Reissue
0, every result never withdrawn, has the UIDs it always had.

UIDs live under the ``2.25`` root (ISO/IEC 9834-8): the SHA-256 of the length-prefixed parts is
cut to 128 bits and stamped as an RFC 9562 version-8 (custom) UUID, whose integer value follows
the root. The result is at most 44 characters long.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = [
    "UID_NAMESPACE",
    "ResultUIDs",
    "derive_uid",
    "device_uid",
    "is_valid_uid",
    "result_uids",
]

#: First part of every derivation made for result objects; changing it changes every UID.
UID_NAMESPACE = "acwi-node/results/v1"

_UUID_ROOT = "2.25"
_MAX_UID_LENGTH = 64
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

_VERSION_MASK = 0xF << 76
_VERSION_8 = 0x8 << 76
_VARIANT_MASK = 0x3 << 62
_VARIANT_RFC = 0x2 << 62


def derive_uid(*parts: str) -> str:
    """Return a UID under ``2.25`` that depends only on ``parts`` (in order).

    Each part is UTF-8 encoded and prefixed with its byte length, so no choice of part values can
    make two different part lists hash the same input (``("a", "bc")`` differs from
    ``("ab", "c")``).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    digest = hashlib.sha256()
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"UID parts must be str, got {type(part).__name__}")
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    value = int.from_bytes(digest.digest()[:16], "big")
    value = (value & ~_VERSION_MASK) | _VERSION_8
    value = (value & ~_VARIANT_MASK) | _VARIANT_RFC
    return f"{_UUID_ROOT}.{value}"


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid DICOM UID (PS3.5 9.1).

    Digits and dots only, no empty component, no leading zero in a component other than ``"0"``
    itself, at most 64 characters. A valid UID is therefore also safe to use as a file name.
    """
    if not isinstance(value, str):
        return False
    if not value or len(value) > _MAX_UID_LENGTH:
        return False
    return _UID_PATTERN.fullmatch(value) is not None


def device_uid(model_name: str, model_version: str, weights_sha256: str = "") -> str:
    """UID of the model as an SR device observer: one per name, version and weights file."""
    return derive_uid(UID_NAMESPACE, "device", model_name, model_version, weights_sha256)


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of every object one model version writes into one study."""

    study_instance_uid: str
    model_name: str
    model_version: str
    sr_series_uid: str
    sr_instance_uid: str
    heatmap_series_uid: str
    parametric_map_series_uid: str
    #: How many of this model version's analyses of the study were withdrawn before (0: none).
    reissue: int = 0

    def heatmap_instance_uid(
        self, source_sop_instance_uid: str, frame_number: int | None = None
    ) -> str:
        """SOP Instance UID of the heatmap secondary capture made from one source image (or
        from frame ``frame_number`` of a multi-frame one)."""
        if frame_number is None:
            return self._derive("heatmap-instance", source_sop_instance_uid)
        return self._derive("heatmap-instance", source_sop_instance_uid, f"frame {frame_number}")

    def parametric_map_instance_uid(self, source_uid: str, rows: int, columns: int) -> str:
        """SOP Instance UID of the parametric map made from one source series (of images
        ``rows`` x ``columns``), or from one multi-frame image (``source_uid`` its SOP Instance
        UID)."""
        return self._derive("parametric-map-instance", source_uid, f"{rows}x{columns}")

    def series_uid(self, kind: str) -> str | None:
        """The Series Instance UID of the result objects of ``kind`` (a ledger result kind:
        ``sr``, a radiologist's ``sr-verified`` in the SR's series, ``heatmap``,
        ``parametric_map``); None for a kind with no series of its own here."""
        return {
            "sr": self.sr_series_uid,
            "sr-verified": self.sr_series_uid,
            "heatmap": self.heatmap_series_uid,
            "parametric_map": self.parametric_map_series_uid,
        }.get(kind)

    def tracking_uid(self, label: str, scope: str) -> str:
        """Tracking Unique Identifier of an SR measurement group.

        ``scope`` names what the group covers: ``"study"``, or a source SOP Instance UID for a
        per-image group (``"<uid> frame <n>"`` for a frame of a multi-frame image).
        """
        return self._derive("tracking", label, scope)

    def region_tracking_uid(self, label: str, scope: str) -> str:
        """Tracking Unique Identifier of the AI region group (TID 1410) of ``label`` on the
        image (or frame) ``scope`` names."""
        return self._derive("region-tracking", label, scope)

    def summary_tracking_uid(self, scope: str) -> str:
        """Tracking Unique Identifier of the uncertainty summary group for ``scope``."""
        return self._derive("summary-tracking", scope)

    def _derive(self, kind: str, *parts: str) -> str:
        return derive_uid(
            UID_NAMESPACE,
            kind,
            self.study_instance_uid,
            self.model_name,
            self.model_version,
            *reissue_parts(self.reissue),
            *parts,
        )


def reissue_parts(reissue: int) -> tuple[str, ...]:
    """The derivation's parts for ``reissue``: none for 0 (the UIDs results always had)."""
    if reissue < 0:
        raise ValueError(f"reissue must be 0 or more, got {reissue}")
    return (f"reissue {reissue}",) if reissue else ()


def result_uids(
    study_uid: str, model_name: str, model_version: str, reissue: int = 0
) -> ResultUIDs:
    """The result UIDs for ``model_name`` ``model_version`` run on study ``study_uid``, the
    ``reissue``-th time after a withdrawal (module docstring)."""
    if not is_valid_uid(study_uid):
        raise ValueError(f"not a valid Study Instance UID: {study_uid!r}")
    extra = reissue_parts(reissue)

    def derive(kind: str) -> str:
        return derive_uid(UID_NAMESPACE, kind, study_uid, model_name, model_version, *extra)

    return ResultUIDs(
        study_instance_uid=study_uid,
        model_name=model_name,
        model_version=model_version,
        sr_series_uid=derive("sr-series"),
        sr_instance_uid=derive("sr-instance"),
        heatmap_series_uid=derive("heatmap-series"),
        parametric_map_series_uid=derive("parametric-map-series"),
        reissue=reissue,
    )
