"""What accepting an association costs: copy_contexts gives each association the server's
presentation contexts as deepcopy would, without copying (and validating) every UID, and an SCP
process makes pydicom skip its value check of every UID it reads."""

from __future__ import annotations

import copy

import pytest
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from acwi_node.config import Settings
from acwi_node.ingest.negotiation import copy_contexts
from acwi_node.ingest.scp import StorageSCP


def _server_contexts(settings: Settings | None = None) -> list[PresentationContext]:
    scp = StorageSCP.__new__(StorageSCP)
    scp.settings = settings or Settings()
    ae: AE = scp._make_ae()
    return copy.deepcopy(ae.supported_contexts)  # what pynetdicom's server keeps


#: A destination asked for storage commitment: the SCP accepts the Push Model with roles.
COMMITTING = Settings(
    destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104,
         "storage_commitment": True},
    ]
)  # fmt: skip


@pytest.mark.parametrize("settings", [None, COMMITTING], ids=["default", "storage-commitment"])
def test_the_copies_equal_deepcopy(settings: Settings | None) -> None:
    contexts = _server_contexts(settings)
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


def test_an_scp_process_makes_no_value_checks_on_uids() -> None:
    """The UIDs of an A-ASSOCIATE-RQ become pydicom UIDs without a regular expression each;
    a non-conformant one is still refused where the SCP uses it (is_safe_uid)."""
    import warnings

    from pydicom import config as pydicom_config
    from pydicom.uid import UID

    from acwi_node.ingest.scp import skip_pydicom_value_checks
    from acwi_node.ingest.spool import is_safe_uid

    before = pydicom_config.settings.reading_validation_mode
    try:
        skip_pydicom_value_checks()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom's check would warn about this one
            uid = UID("1.2.3." + "4" * 70)
        assert not is_safe_uid(uid)
    finally:
        pydicom_config.settings.reading_validation_mode = before
