"""copy_contexts: each association gets the server's presentation contexts as deepcopy would
give them, without the cost of copying (and validating) every UID."""

from __future__ import annotations

import copy

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from acwi_node.config import Settings
from acwi_node.ingest.reactor import copy_contexts
from acwi_node.ingest.scp import StorageSCP


def _server_contexts() -> list[PresentationContext]:
    scp = StorageSCP.__new__(StorageSCP)
    scp.settings = Settings()
    ae: AE = scp._make_ae()
    return copy.deepcopy(ae.supported_contexts)  # what pynetdicom's server keeps


def test_the_copies_equal_deepcopy() -> None:
    contexts = _server_contexts()
    assert len(contexts) > 100  # every storage SOP class
    ours, reference = copy_contexts(contexts), copy.deepcopy(contexts)
    assert [vars(c) for c in ours] == [vars(c) for c in reference]
    assert [str(c) for c in ours] == [str(c) for c in reference]


def test_an_association_cannot_change_the_servers_contexts() -> None:
    contexts = _server_contexts()
    before = [(c.abstract_syntax, list(c.transfer_syntax), c.context_id) for c in contexts]
    for context in copy_contexts(contexts):
        context.context_id = 7  # what negotiation sets on an association's copies
        context.transfer_syntax.clear()
        context.add_transfer_syntax("1.2.840.10008.1.2")
        context.scp_role = True
    assert [(c.abstract_syntax, list(c.transfer_syntax), c.context_id) for c in contexts] == before
    assert all(c.scp_role is None for c in contexts)
