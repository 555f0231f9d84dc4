"""Associations accepted from memory: the A-ASSOCIATE-RQ PDUs a peer sends again and again.

A modality or a router that opens an association per image, per series or per study sends
the same A-ASSOCIATE-RQ every time: the same AE titles, the same proposed presentation contexts
(DCMTK's ``storescu`` proposes 128, one per storage SOP class), the same user information.
pynetdicom decodes each one into PDU items and then into an A-ASSOCIATE primitive, turning
every one of its 1,700-odd UIDs into a pydicom UID and validating it twice on the way: about
a third of the CPU time an association costs the node (7 of 20 ms).

:class:`RequestMemo` keeps the primitive decoded from each of the last :data:`CAPACITY`
distinct requests, keyed by the PDU's exact bytes, and gives each association a copy of it
(:class:`RememberedRequest`). The primitive is what pynetdicom's decoder made of those very
bytes, so nothing about it can differ from decoding them again; a request that differs in one
byte (another calling AE title, another proposal, a user identity) is decoded on its own. The
copy has its own lists; the presentation contexts and user information items in them are
shared between associations, which pynetdicom's acceptor only reads.

The two other costly steps of accepting are functions of values alone, and are remembered by
those values (:func:`freeze`: every attribute of every object involved, recursively):

* the negotiation of the presentation contexts (pynetdicom's ``negotiate_as_acceptor``: the
  proposed contexts, the acceptor's, the proposed SCP/SCU roles in; the result contexts and
  role replies out), which :func:`install` has pynetdicom's ACSE call through
  :func:`negotiate_as_acceptor`; each caller gets copies of the remembered results;
* the A-ASSOCIATE-AC PDU made of the A-ASSOCIATE (accept) primitive, and its bytes
  (:func:`accept_pdu_bytes`, which the event-driven DUL uses for state machine action AE-7).

A value that cannot be pictured that way (an attribute holding something unhashable) is
simply not remembered: pynetdicom does the work, as it would without this module.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pynetdicom.acse
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

_K = TypeVar("_K")
_V = TypeVar("_V")

#: Distinct requests remembered (least recently used dropped first): a node's peers are few,
#: and a peer that sends a new request each time only costs the decoding it would anyway.
CAPACITY = 32


class RememberedRequest:
    """Stands in for a decoded A-ASSOCIATE-RQ PDU where pynetdicom's state machine takes one
    (action AE-6 reads ``protocol_version`` and calls ``to_primitive``)."""

    protocol_version = 0x0001

    def __init__(self, template: A_ASSOCIATE) -> None:
        self._template = template

    def to_primitive(self) -> A_ASSOCIATE:
        """A new A-ASSOCIATE primitive equal to the one decoded from the request's bytes."""
        primitive = copy.copy(self._template)
        primitive._user_information = list(self._template.user_information)
        primitive._presentation_context_definition_list = list(
            self._template.presentation_context_definition_list
        )
        primitive._presentation_context_definition_results_list = []
        return primitive


class _Memo(Generic[_K, _V]):
    """A small least-recently-used map, safe between threads. ``hits`` counts the lookups
    that found their key, ``misses`` the values put (each after a lookup that did not)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[_K, _V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class RequestMemo(_Memo[bytes, A_ASSOCIATE]):
    """The A-ASSOCIATE primitives of the last :data:`CAPACITY` distinct requests decoded."""

    def request(self, pdu: bytes) -> RememberedRequest | A_ASSOCIATE_RQ:
        """The request in ``pdu`` (the whole PDU, header included), decoded or remembered.

        Raises what pynetdicom's decoder raises for a malformed PDU. A request with a protocol
        version other than 1 is returned decoded and not remembered: the state machine
        rejects it from the PDU itself.
        """
        template = self.get(pdu)
        if template is None:
            decoded = A_ASSOCIATE_RQ()
            decoded.decode(pdu)
            if decoded.protocol_version != 0x0001:
                return decoded
            template = decoded.to_primitive()
            self.put(pdu, template)
        return RememberedRequest(template)


#: The memo the node's acceptor associations share (one per process).
REQUESTS = RequestMemo()


class Unfreezable(Exception):
    """A value holds something :func:`freeze` cannot picture."""


_SCALARS = (str, int, float, bytes, type(None))  # bool is an int; a UID is a str


def freeze(value: Any) -> Any:
    """A hashable picture of ``value`` that is equal for equal values: scalars as they are
    (with their type), lists and tuples as tuples, any other object as its class and every
    attribute it holds. Raises :class:`Unfreezable` for anything else (a dict, a set ...)."""
    if isinstance(value, _SCALARS):
        return value if type(value) is str else (type(value), value)
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    if type(value) is PresentationContext and vars(value).keys() == _CONTEXT_FIELDS:
        # The bulk of every key (hundreds per association): its fields read directly.
        return (
            PresentationContext,
            value._context_id,
            value._abstract_syntax,
            tuple(value._transfer_syntax),
            value.result,
            value._scu_role,
            value._scp_role,
            value._as_scu,
            value._as_scp,
        )
    attributes = getattr(value, "__dict__", None)
    if attributes is None:
        raise Unfreezable(type(value).__name__)
    return (type(value), tuple(attributes), tuple(freeze(a) for a in attributes.values()))


#: What a presentation context holds (pynetdicom 3.0): :func:`freeze` reads these directly.
_CONTEXT_FIELDS = frozenset(vars(PresentationContext()))


#: Values an association's copy of a presentation context shares with the server's.
_IMMUTABLE = (str, int, float, type(None))  # bool is an int, a UID a str


def copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """Copies of ``contexts`` for one association, as ``deepcopy`` makes them, without copying
    their UIDs.

    pynetdicom deep-copies the server's presentation contexts for every association it accepts.
    The SCP supports every storage SOP class with 16 transfer syntaxes, about 2,700 UIDs, and
    pydicom validates each UID it copies against a regular expression: 25 ms per association,
    more than receiving 20 small instances. A UID is an immutable string; only the containers
    around it (a context's list of transfer syntaxes) need copying to keep the server's own
    contexts out of reach of what negotiation does to an association's.
    """
    copies: list[PresentationContext] = []
    for context in contexts:
        fields = dict(vars(context))
        for name, value in fields.items():
            if isinstance(value, _IMMUTABLE):
                continue
            fields[name] = (
                copy.copy(value) if isinstance(value, list | dict | set) else copy.deepcopy(value)
            )
        duplicate = object.__new__(type(context))
        duplicate.__dict__.update(fields)
        copies.append(duplicate)
    return copies


_Negotiated = tuple[list[PresentationContext], list[Any]]

#: pynetdicom's own negotiation, which :func:`negotiate_as_acceptor` remembers.
_pynetdicom_negotiate: Callable[..., _Negotiated] = pynetdicom.acse.negotiate_as_acceptor

NEGOTIATIONS: _Memo[Any, _Negotiated] = _Memo()
ACCEPTS: _Memo[Any, bytes] = _Memo()


def negotiate_as_acceptor(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict[Any, tuple[bool | None, bool | None]] | None = None,
) -> _Negotiated:
    """pynetdicom's ``negotiate_as_acceptor``, remembered by its arguments' values."""
    try:
        key = (
            freeze(rq_contexts),
            freeze(ac_contexts),
            tuple(sorted((str(uid), role) for uid, role in (roles or {}).items())),
        )
        hash(key)
    except (Unfreezable, TypeError):
        return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    remembered = NEGOTIATIONS.get(key)
    if remembered is None:
        contexts, replies = _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
        NEGOTIATIONS.put(key, (copy_contexts(contexts), [copy.copy(r) for r in replies]))
        return contexts, replies
    contexts, replies = remembered
    return copy_contexts(contexts), [copy.copy(r) for r in replies]


def accept_pdu_bytes(primitive: A_ASSOCIATE) -> bytes:
    """The encoded A-ASSOCIATE-AC PDU for an A-ASSOCIATE (accept) primitive, remembered by the
    primitive's value."""
    try:
        key = freeze(primitive)
        hash(key)
    except (Unfreezable, TypeError):
        return bytes(A_ASSOCIATE_AC(primitive).encode())
    encoded = ACCEPTS.get(key)
    if encoded is None:
        encoded = bytes(A_ASSOCIATE_AC(primitive).encode())
        ACCEPTS.put(key, encoded)
    return encoded


def install() -> None:
    """Have pynetdicom's ACSE negotiate presentation contexts through
    :func:`negotiate_as_acceptor` (idempotent; the results are pynetdicom's own)."""
    pynetdicom.acse.negotiate_as_acceptor = negotiate_as_acceptor
