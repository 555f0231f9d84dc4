"""What became of an association a test requested with pynetdicom's own AE."""

from __future__ import annotations

from pynetdicom.association import Association

from acwi_node.export.scu import unread_answer


def rejected(assoc: Association) -> bool:
    """Whether the peer rejected the association request (A-ASSOCIATE-RJ). pynetdicom's
    requestor reports some rejections as aborts: its DUL may receive the rejection and close
    the connection before the association thread looks, which then takes the closed
    connection for one never made (:func:`acwi_node.export.scu.unread_answer`); the
    rejection is then still in the DUL's queue."""
    if assoc.is_rejected:
        return True
    answer = unread_answer(assoc)
    return answer is not None and answer.result in (0x01, 0x02)
