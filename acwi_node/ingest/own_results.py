"""The node's own results, sent back to it: answered as stored, and not stored.

A PACS that forwards a study's new instances to the node (a rule on the study, not on each
instance's modality) or the whole study again once it changed, sends the node its own SR,
heatmaps and parametric maps as soon as they are stored there. Each is an instance the study
has not had, so storing it would re-open the study: a second analysis of the same images, the
same results sent again and, for a study on the review worklist, a new work item superseding
the one a radiologist may already have decided. No model reads these objects either (an SR has
no pixels, a heatmap is RGB, a parametric map has many frames).

So an object whose Manufacturer (0008,0070) is the node's (:data:`acwi_node.MANUFACTURER`,
whichever ACWI Node wrote it) is answered as stored, C-STORE ``0x0000`` or a STOW-RS Referenced
SOP item, so that the sender has nothing to retry, and is neither written to the spool nor
recorded: the node holds its results already. Objects that fail the checks every object gets
(unreadable header, unsafe UIDs, another study than a STOW-RS request's) are refused as usual.
"""

from __future__ import annotations

from collections.abc import Mapping

from acwi_node import MANUFACTURER

_OWN_MANUFACTURER = MANUFACTURER.upper()


def is_own_result(header: Mapping[str, str]) -> bool:
    """Whether ``header`` (:func:`~acwi_node.ingest.header.scan_header`'s) is of an object an
    ACWI Node wrote: its Manufacturer is the node's, case and surrounding blanks aside."""
    return header.get("Manufacturer", "").strip().upper() == _OWN_MANUFACTURER
