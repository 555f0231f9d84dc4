"""Accepting an association from memory (acwi_node.ingest.negotiation): what comes out is what
pynetdicom makes of the same request, byte for byte and value for value, and nothing one
association does to its copies reaches the next."""

from __future__ import annotations

import copy
import operator
from typing import Any

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import StoragePresentationContexts, build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as pynetdicom_negotiate

from acwi_node.ingest import negotiation
from acwi_node.ingest.negotiation import (
    RememberedRequest,
    RequestMemo,
    SharedContexts,
    SharedResult,
    Unfreezable,
    accept_pdu_bytes,
    acceptor_contexts,
    freeze,
    negotiate_as_acceptor,
)

CT = UID("1.2.840.10008.5.1.4.1.1.2")


def _request(calling: str = "SENDER", *, roles: bool = False, contexts: int = 128) -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "ACWI"
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID("1.2.826.0.1.3680043.9.7.1")
    items: list[Any] = [length, implementation]
    if roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = CT
        role.scu_role, role.scp_role = True, True
        items.append(role)
    primitive.user_information = items
    proposed = []
    for i, context in enumerate(StoragePresentationContexts[:contexts]):
        assert context.abstract_syntax is not None
        cx = build_context(
            context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        cx.context_id = 2 * i + 1
        proposed.append(cx)
    primitive.presentation_context_definition_list = proposed
    return primitive


def _request_pdu(calling: str = "SENDER", *, roles: bool = False, protocol: int = 1) -> bytes:
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(_request(calling, roles=roles))
    raw = bytearray(pdu.encode())
    raw[6:8] = protocol.to_bytes(2, "big")  # after the PDU header: the protocol version
    return bytes(raw)


def _decoded(pdu: bytes) -> A_ASSOCIATE:
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(pdu)
    return decoded.to_primitive()


def _server_contexts() -> list[PresentationContext]:
    contexts = []
    for context in StoragePresentationContexts:
        assert context.abstract_syntax is not None
        contexts.append(build_context(context.abstract_syntax, [ExplicitVRLittleEndian]))
    return contexts


# --------------------------------------------------------------------- requests
def test_a_request_seen_before_is_not_decoded_again_and_equals_its_decoding() -> None:
    memo = RequestMemo()
    pdu = _request_pdu()
    first, second = memo.request(pdu), memo.request(pdu)
    assert (memo.misses, memo.hits) == (1, 1)
    assert isinstance(first, RememberedRequest) and isinstance(second, RememberedRequest)
    assert first.protocol_version == 1
    reference = freeze(_decoded(pdu))
    assert freeze(first.to_primitive()) == reference
    assert freeze(second.to_primitive()) == reference
    assert freeze(memo.request(_request_pdu("OTHER")).to_primitive()) != reference
    assert memo.misses == 2


def test_each_association_gets_lists_of_its_own() -> None:
    memo = RequestMemo()
    pdu = _request_pdu()
    mine = memo.request(pdu).to_primitive()
    mine.presentation_context_definition_list.clear()
    mine.user_information.clear()
    mine.result = 0  # what a reject sets on the primitive
    theirs = memo.request(pdu).to_primitive()
    assert freeze(theirs) == freeze(_decoded(pdu))
    assert len(theirs.presentation_context_definition_list) == len(
        _request().presentation_context_definition_list
    )


def test_the_proposed_contexts_of_a_remembered_request_are_pictured_once() -> None:
    memo = RequestMemo()
    pdu = _request_pdu()
    mine = memo.request(pdu).to_primitive().presentation_context_definition_list
    theirs = memo.request(pdu).to_primitive().presentation_context_definition_list
    assert isinstance(mine, SharedContexts) and isinstance(theirs, SharedContexts)
    assert mine is not theirs
    assert mine.picture() is theirs.picture()
    assert mine.picture().value == freeze(_decoded(pdu).presentation_context_definition_list)


def test_another_protocol_version_is_decoded_for_pynetdicom_to_reject() -> None:
    memo = RequestMemo()
    answer = memo.request(_request_pdu(protocol=2))
    assert isinstance(answer, A_ASSOCIATE_RQ) and answer.protocol_version == 2
    assert len(memo) == 0


def test_a_malformed_request_raises_as_pynetdicom_does_and_is_not_remembered() -> None:
    memo = RequestMemo()
    pdu = _request_pdu()
    cut = pdu[:6] + pdu[6:200]  # declares more than it holds
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever pynetdicom's decoder raises
        A_ASSOCIATE_RQ().decode(cut)
    with pytest.raises(Exception):  # noqa: B017, PT011
        memo.request(cut)
    assert len(memo) == 0


def _huge_request_pdu(calling: str, syntaxes: int) -> bytes:
    """A request proposing 128 contexts of ``syntaxes`` transfer syntaxes each (made-up
    UIDs): what a peer may send before its AE title is checked."""
    primitive = _request(calling)
    for cx in primitive.presentation_context_definition_list:
        cx.transfer_syntax = [UID(f"1.2.840.10008.1.2.1.99.{i}") for i in range(syntaxes)]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_a_request_too_large_to_remember_is_decoded_and_not_kept() -> None:
    """The memo held the last 32 distinct requests whatever their size: a 5 MB request (128
    contexts of 1,400 transfer syntaxes) kept 32 MB of decoded objects, 32 of them a gigabyte,
    sent by peers whose AE titles were then rejected."""
    memo = RequestMemo()
    small = _request_pdu()
    assert len(small) <= negotiation.REMEMBERED_PDU_BYTES
    huge = _huge_request_pdu("PEER", 50)
    assert len(huge) > negotiation.REMEMBERED_PDU_BYTES
    answer = memo.request(huge)
    assert isinstance(answer, A_ASSOCIATE_RQ)
    assert freeze(answer.to_primitive()) == freeze(_decoded(huge))
    for i in range(3):
        memo.request(_huge_request_pdu(f"PEER{i}", 50))
    assert len(memo) == 0
    memo.request(small)
    assert len(memo) == 1
    assert all(len(key) <= negotiation.REMEMBERED_PDU_BYTES for key in memo.held())


def test_a_proposal_of_too_many_transfer_syntaxes_is_negotiated_and_not_kept() -> None:
    contexts = _decoded(_huge_request_pdu("PEER", 40)).presentation_context_definition_list
    assert sum(len(c.transfer_syntax) for c in contexts) > negotiation.REMEMBERED_SYNTAXES
    before = negotiation.NEGOTIATIONS.misses  # one more for each negotiation remembered
    results, _ = negotiate_as_acceptor(contexts, _server_contexts())
    reference, _ = pynetdicom_negotiate(
        _decoded(_huge_request_pdu("PEER", 40)).presentation_context_definition_list,
        _server_contexts(),
    )
    assert [(c.context_id, c.result) for c in results] == [
        (c.context_id, c.result) for c in reference
    ]
    assert negotiation.NEGOTIATIONS.misses == before


def test_the_least_recently_used_request_goes_first() -> None:
    memo = RequestMemo(capacity=2)
    a, b, c = _request_pdu("A"), _request_pdu("B"), _request_pdu("C")
    memo.request(a)
    memo.request(b)
    memo.request(a)  # a is now the most recent
    memo.request(c)  # b goes
    assert len(memo) == 2
    memo.request(a)
    assert memo.hits == 2
    memo.request(b)
    assert memo.misses == 4


# ------------------------------------------------------------- shared contexts
def test_the_acceptor_s_contexts_are_copied_once_per_server_list() -> None:
    server = _server_contexts()
    first, second = acceptor_contexts(server), acceptor_contexts(server)
    assert first is second and first is not server
    assert all(a is not b for a, b in zip(first, server, strict=True))
    assert [vars(c) for c in first] == [vars(c) for c in copy.deepcopy(server)]
    assert first.picture() is second.picture()
    assert first.picture().value == freeze(server)
    server[0] = copy.deepcopy(server[0])  # the server's list now holds another context
    third = acceptor_contexts(server)
    assert third is not first and third[0] is not first[0]
    assert acceptor_contexts(list(server)) is not third  # another list


def test_a_shared_list_is_pictured_anew_once_it_holds_other_contexts() -> None:
    shared = SharedContexts(_server_contexts())
    duplicate = shared.copy()
    assert duplicate is not shared and duplicate.picture() is shared.picture()
    changed = copy.deepcopy(duplicate[0])
    changed.context_id = 99
    duplicate[0] = changed
    assert duplicate.picture() != shared.picture()
    assert duplicate.picture().value == freeze(list(duplicate))
    duplicate.pop()
    assert duplicate.picture().value == freeze(list(duplicate))
    assert shared.copy().picture() is shared.picture()  # the others keep theirs


# ------------------------------------------------------------------ negotiation
@pytest.fixture
def fresh_memos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(negotiation, "NEGOTIATIONS", negotiation._Memo())
    monkeypatch.setattr(negotiation, "ACCEPTS", negotiation._Memo())


@pytest.mark.usefixtures("fresh_memos")
@pytest.mark.parametrize("with_roles", [False, True])
def test_a_remembered_negotiation_equals_pynetdicoms(with_roles: bool) -> None:
    proposed = _request().presentation_context_definition_list
    server = _server_contexts()
    for context in server:
        if context.abstract_syntax == CT:
            context.scu_role, context.scp_role = True, True
    roles: dict[Any, tuple[bool | None, bool | None]] | None = (
        {CT: (True, True)} if with_roles else None
    )
    reference = pynetdicom_negotiate(proposed, server, roles)
    first = negotiate_as_acceptor(proposed, server, roles)
    second = negotiate_as_acceptor(proposed, copy.deepcopy(server), roles)
    assert (negotiation.NEGOTIATIONS.misses, negotiation.NEGOTIATIONS.hits) == (1, 1)
    assert freeze(first) == freeze(reference) == freeze(second)
    assert len(reference[1]) == (1 if with_roles else 0)
    accepted = [c for c in second[0] if c.result == 0]
    assert len(accepted) == len(proposed) > 100
    assert all(type(c) is SharedResult for c in first[0] + second[0])
    assert first[0] is not second[0] and all(map(operator.is_, first[0], second[0]))
    assert first[0] == reference[0]  # pynetdicom's equality: the same values


@pytest.mark.usefixtures("fresh_memos")
def test_what_one_association_does_to_its_results_does_not_reach_the_next() -> None:
    """Remembered results are shared: changing one is refused, a copy is free to change."""
    proposed = _request().presentation_context_definition_list
    server = _server_contexts()
    reference = freeze(pynetdicom_negotiate(proposed, server, None))
    for _ in range(2):
        contexts, _roles = negotiate_as_acceptor(proposed, server, None)
        contexts.clear()  # each association's list is its own
    contexts, _roles = negotiate_as_acceptor(proposed, server, None)
    shared = contexts[0]
    with pytest.raises(AttributeError, match="shared between associations"):
        shared.context_id = 255
    with pytest.raises(AttributeError, match="shared between associations"):
        shared.transfer_syntax = [ImplicitVRLittleEndian]
    with pytest.raises(TypeError, match="copy it"):
        shared.transfer_syntax.clear()
    for duplicate in (copy.copy(shared), copy.deepcopy(shared)):
        assert type(duplicate) is PresentationContext and duplicate == shared
        duplicate.context_id = 255
        duplicate.transfer_syntax.clear()
    assert freeze(negotiate_as_acceptor(proposed, server, None)) == reference
    assert negotiation.NEGOTIATIONS.hits == 3


@pytest.mark.usefixtures("fresh_memos")
def test_any_difference_in_the_inputs_is_negotiated_anew() -> None:
    proposed = _request().presentation_context_definition_list
    server = _server_contexts()
    negotiate_as_acceptor(proposed, server, None)
    fewer = _request(contexts=10).presentation_context_definition_list
    assert len([c for c in negotiate_as_acceptor(fewer, server, None)[0] if c.result == 0]) == 10
    narrower = _server_contexts()[:-1]  # the acceptor supports one SOP class less
    result, _ = negotiate_as_acceptor(proposed, narrower, None)
    assert freeze(result) == freeze(pynetdicom_negotiate(proposed, narrower, None)[0])
    negotiate_as_acceptor(proposed, server, {CT: (True, False)})
    assert (negotiation.NEGOTIATIONS.misses, negotiation.NEGOTIATIONS.hits) == (4, 0)


def test_freeze_tells_values_apart_and_refuses_what_it_cannot_picture() -> None:
    assert freeze([1, True]) != freeze([True, 1])
    assert freeze(UID("1.2")) != freeze("1.2")
    assert freeze(_request()) == freeze(_request())
    assert freeze(_request("A")) != freeze(_request("B"))

    class Odd:
        def __init__(self) -> None:
            self.table = {"a": 1}

    with pytest.raises(Unfreezable):
        freeze(Odd())
    with pytest.raises(Unfreezable):
        freeze(object())


@pytest.mark.usefixtures("fresh_memos")
def test_what_cannot_be_pictured_is_negotiated_by_pynetdicom() -> None:
    proposed = _request(contexts=4).presentation_context_definition_list
    server = _server_contexts()
    server[0].odd = {"unhashable": True}  # type: ignore[attr-defined]
    result, _ = negotiate_as_acceptor(proposed, server, None)
    assert len([c for c in result if c.result == 0]) == 4
    assert len(negotiation.NEGOTIATIONS) == 0


# ---------------------------------------------------------------- A-ASSOCIATE-AC
def _accept_primitive(calling: str = "SENDER") -> A_ASSOCIATE:
    request = _request(calling)
    contexts, _ = pynetdicom_negotiate(
        request.presentation_context_definition_list, _server_contexts(), None
    )
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "ACWI"
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = contexts
    primitive.user_information = request.user_information
    return primitive


@pytest.mark.usefixtures("fresh_memos")
def test_the_accept_pdu_is_pynetdicoms_encoding() -> None:
    reference = A_ASSOCIATE_AC(_accept_primitive()).encode()
    assert accept_pdu_bytes(_accept_primitive()) == reference
    assert accept_pdu_bytes(_accept_primitive()) == reference
    assert (negotiation.ACCEPTS.misses, negotiation.ACCEPTS.hits) == (1, 1)
    other = accept_pdu_bytes(_accept_primitive("OTHER"))
    assert other == A_ASSOCIATE_AC(_accept_primitive("OTHER")).encode() != reference


def test_requests_seen_once_do_not_push_out_a_peer_that_comes_back() -> None:
    """A peer sending a new request each time (refused on its AE title, say): its requests
    replace each other, and the request of a peer that associates again and again stays
    remembered however many of them came in between."""
    memo = RequestMemo(capacity=4)
    good = _request_pdu("MODALITY")
    memo.request(good)
    memo.request(good)  # seen again: kept
    for n in range(40):
        memo.request(_request_pdu(f"STRANGER{n}"))
    assert len(memo) == 4
    hits = memo.hits
    memo.request(good)
    assert memo.hits == hits + 1


def test_the_protected_requests_hold_three_quarters_of_the_memo() -> None:
    memo = RequestMemo(capacity=4)
    pdus = [_request_pdu(f"PEER{n}") for n in range(5)]
    for pdu in pdus:
        memo.request(pdu)
        memo.request(pdu)  # each one used again: protected, the first three stay so
    assert len(memo) == 4
    for n in range(20):
        memo.request(_request_pdu(f"ONCE{n}"))
    hits = memo.hits
    for pdu in pdus[2:]:
        memo.request(pdu)  # the three most recent protected ones were kept
    assert memo.hits == hits + 3
