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
simply not remembered: pynetdicom does the work, as it would without this module. Nor is a
request over :data:`REMEMBERED_PDU_BYTES`, or a proposal of more than
:data:`REMEMBERED_SYNTAXES` transfer syntaxes: each memo holds at most :data:`CAPACITY`
entries, and these bounds keep what each entry holds small (a peer, before its AE title is
checked, chooses the request's size).

Picturing the two lists of presentation contexts (128 proposed by ``storescu``, 172 supported
by the node, every one with its UIDs) and hashing the picture cost more than the negotiation
it saves, so the lists associations share carry their picture with them (:class:`SharedContexts`):
the contexts proposed in a remembered request, and the acceptor's (:func:`acceptor_contexts`:
one copy of the server's, made once, where pynetdicom deep-copies them for every association).
Their contexts are shared the way a remembered request's are: pynetdicom's acceptor only reads
them. A shared list that no longer holds the very contexts it was pictured with (an
``EVT_REQUESTED`` handler replaced one, say) is pictured anew.
"""

from __future__ import annotations

import copy
import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import pynetdicom.acse
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

_K = TypeVar("_K")
_V = TypeVar("_V")

#: Distinct requests remembered (least recently used dropped first, those used once before
#: those used again: :class:`_Memo`): a node's peers are few, and a peer that sends a new
#: request each time only costs the decoding it would anyway.
CAPACITY = 32
#: A larger A-ASSOCIATE-RQ PDU is decoded and not remembered. DCMTK's ``storescu`` sends about
#: 10 KB (128 contexts, three transfer syntaxes each); the PDU's length is the peer's to choose
#: (up to 4 GiB, before any AE title is checked), and a remembered request holds some seven
#: times its size in decoded objects: 32 of 5 MB each held a gigabyte for good.
REMEMBERED_PDU_BYTES = 128 << 10
#: Proposed contexts with more transfer syntaxes than this altogether are negotiated by
#: pynetdicom and not remembered (the memo's key holds every one of them).
REMEMBERED_SYNTAXES = 4096


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
        proposed = self._template.presentation_context_definition_list
        primitive._presentation_context_definition_list = (
            proposed.copy() if isinstance(proposed, SharedContexts) else list(proposed)
        )
        primitive._presentation_context_definition_results_list = []
        return primitive


class _Memo(Generic[_K, _V]):
    """A small map of the values used most recently, safe between threads, that holds at most
    ``capacity`` entries. ``hits`` counts the lookups that found their key, ``misses`` the
    values put (each after a lookup that did not).

    A segmented least-recently-used map: a value put waits on probation, and the first lookup
    that finds it moves it to the protected part, which keeps up to three quarters of the
    capacity (its least recent entry goes back on probation when it is full). Probation holds
    whatever the protected entries leave free, and drops its least recent entry first. So
    entries that each come once (a peer sending a new request every time, before its AE title
    is refused) replace each other on probation, and leave alone the requests of the peers that
    come back.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._protected_capacity = capacity * 3 // 4
        self._probation: OrderedDict[_K, _V] = OrderedDict()
        self._protected: OrderedDict[_K, _V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._protected.get(key)
            if value is not None:
                self._protected.move_to_end(key)
            else:
                value = self._probation.pop(key, None)
                if value is None:
                    return None
                self._protected[key] = value
                while len(self._protected) > self._protected_capacity:
                    demoted, kept = self._protected.popitem(last=False)
                    self._probation[demoted] = kept
            self.hits += 1
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self.misses += 1
            if key in self._protected:
                self._protected[key] = value
                self._protected.move_to_end(key)
                return
            self._probation[key] = value
            self._probation.move_to_end(key)
            while len(self._probation) > self.capacity - len(self._protected):
                self._probation.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._probation) + len(self._protected)

    def held(self) -> list[_K]:
        """The keys held, those on probation first."""
        with self._lock:
            return [*self._probation, *self._protected]


class RequestMemo(_Memo[bytes, A_ASSOCIATE]):
    """The A-ASSOCIATE primitives of the last :data:`CAPACITY` distinct requests decoded."""

    def request(self, pdu: bytes) -> RememberedRequest | A_ASSOCIATE_RQ:
        """The request in ``pdu`` (the whole PDU, header included), decoded or remembered.

        Raises what pynetdicom's decoder raises for a malformed PDU. A request with a protocol
        version other than 1 is returned decoded and not remembered: the state machine
        rejects it from the PDU itself. One over :data:`REMEMBERED_PDU_BYTES` is returned
        decoded and not remembered either.
        """
        template = self.get(pdu)
        if template is None:
            decoded = A_ASSOCIATE_RQ()
            decoded.decode(pdu)
            if decoded.protocol_version != 0x0001 or len(pdu) > REMEMBERED_PDU_BYTES:
                return decoded
            template = decoded.to_primitive()
            template._presentation_context_definition_list = SharedContexts(
                template.presentation_context_definition_list
            )
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
    if type(value) is SharedResult:
        return value._picture
    if type(value) is PresentationContext and vars(value).keys() == _CONTEXT_FIELDS:
        return _context_picture(value)  # the bulk of every key: its fields read directly
    attributes = getattr(value, "__dict__", None)
    if attributes is None:
        raise Unfreezable(type(value).__name__)
    return (type(value), tuple(attributes), tuple(freeze(a) for a in attributes.values()))


def _context_picture(value: PresentationContext) -> tuple[Any, ...]:
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


#: What a presentation context holds (pynetdicom 3.0): :func:`freeze` reads these directly.
_CONTEXT_FIELDS = frozenset(vars(PresentationContext()))


class ReadOnlyList(list[Any]):
    """A list that refuses every change (a shared result's transfer syntaxes); its copies are
    plain lists."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "this list belongs to a presentation context that associations share: copy it"
            " to change it"
        )

    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return copy.deepcopy(list(self), memo)


class SharedResult(PresentationContext):
    """A result of a remembered negotiation (:func:`negotiate_as_acceptor`): one object for
    every association that negotiates the same way, so it refuses to be changed (pynetdicom
    only reads an association's accepted and rejected contexts). A copy is a plain
    :class:`PresentationContext`, free to change. Its :func:`freeze` picture is made once,
    equal to that of a plain context with the same values."""

    __slots__ = ("_picture",)  # beside the context's fields, not among them (``__eq__``)
    _picture: tuple[Any, ...]

    @classmethod
    def of(cls, context: PresentationContext) -> SharedResult:
        """The shared, unchangeable twin of ``context`` (a plain presentation context)."""
        fields = dict(vars(context))
        fields["_transfer_syntax"] = ReadOnlyList(context._transfer_syntax)
        shared = object.__new__(cls)
        shared.__dict__.update(fields)
        object.__setattr__(shared, "_picture", _context_picture(context))
        return shared

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"a remembered negotiation's presentation context is shared between associations"
            f" and cannot be changed (setting {name}): copy it to change it"
        )

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __copy__(self) -> PresentationContext:
        plain = object.__new__(PresentationContext)
        plain.__dict__.update(vars(self), _transfer_syntax=list(self._transfer_syntax))
        return plain

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        return self.__copy__()


class Picture:
    """A memo key: a value's :func:`freeze` picture with its hash, computed once (a tuple
    computes its hash anew each time it is asked, over every item, recursively)."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._hash = hash(value)  # TypeError: something unhashable

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Picture) and self._hash == other._hash and self.value == other.value
        )


class _Pictured:
    """The contexts a family of :class:`SharedContexts` lists was made with, and their
    picture once it is first asked for."""

    __slots__ = ("contexts", "lock", "picture")

    def __init__(self, contexts: tuple[PresentationContext, ...]) -> None:
        self.contexts = contexts
        self.picture: Picture | None = None
        self.lock = threading.Lock()


class SharedContexts(list[PresentationContext]):
    """A list of presentation contexts whose contexts associations share and only read, which
    pictures them (:func:`freeze`) once for every list copied from it (:meth:`copy`)."""

    _pictured: _Pictured

    def __init__(self, contexts: Iterable[PresentationContext] = ()) -> None:
        super().__init__(contexts)
        self._pictured = _Pictured(tuple(self))

    def copy(self) -> SharedContexts:
        """A list of its own, with the same contexts and the same picture."""
        duplicate = SharedContexts.__new__(SharedContexts)
        list.__init__(duplicate, self)
        duplicate._pictured = self._pictured
        return duplicate

    def picture(self) -> Picture:
        """The picture of the contexts in this list; made anew (and not kept) when the list
        no longer holds exactly the contexts it was made with. Raises :class:`Unfreezable`
        (or ``TypeError``) for a context that cannot be pictured."""
        pictured = self._pictured
        if len(self) != len(pictured.contexts) or not all(
            map(operator.is_, self, pictured.contexts)
        ):
            return Picture(freeze(self))
        picture = pictured.picture
        if picture is None:
            with pictured.lock:
                if pictured.picture is None:
                    pictured.picture = Picture(freeze(pictured.contexts))
                picture = pictured.picture
        return picture


def picture(contexts: list[PresentationContext]) -> Picture:
    """The memo key of a list of presentation contexts: a :class:`SharedContexts`'s own,
    otherwise pictured now."""
    if isinstance(contexts, SharedContexts):
        return contexts.picture()
    return Picture(freeze(contexts))


#: The acceptor contexts made for the last few servers' lists: the server's list, the contexts
#: it held then, and the shared copy (a process runs one server; tests run many).
_ACCEPTOR_CONTEXTS: OrderedDict[
    int, tuple[list[PresentationContext], tuple[PresentationContext, ...], SharedContexts]
] = OrderedDict()
_ACCEPTOR_LOCK = threading.Lock()
_ACCEPTOR_SERVERS = 4


def acceptor_contexts(server_contexts: list[PresentationContext]) -> SharedContexts:
    """The presentation contexts an acceptor association supports: one copy of the server's
    (:func:`copy_contexts`), made at its first association and shared by every association
    after it, pictured once for the negotiation memo.

    pynetdicom deep-copies the server's contexts for each association it accepts, so that
    nothing one association does reaches the server's; pynetdicom's acceptor only reads them
    (negotiation makes new contexts for its results), and copying 172 contexts took a fifth of
    the CPU time an association costs. The copy is made anew when the server's list is
    another list or holds other contexts; a server's contexts are its AE's, fixed when the
    node starts it."""
    with _ACCEPTOR_LOCK:
        known = _ACCEPTOR_CONTEXTS.get(id(server_contexts))
        if (
            known is not None
            and known[0] is server_contexts
            and len(known[1]) == len(server_contexts)
            and all(map(operator.is_, known[1], server_contexts))
        ):
            return known[2]
        shared = SharedContexts(copy_contexts(server_contexts))
        _ACCEPTOR_CONTEXTS[id(server_contexts)] = (
            server_contexts,
            tuple(server_contexts),
            shared,
        )
        _ACCEPTOR_CONTEXTS.move_to_end(id(server_contexts))
        while len(_ACCEPTOR_CONTEXTS) > _ACCEPTOR_SERVERS:
            _ACCEPTOR_CONTEXTS.popitem(last=False)
        return shared


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
    """pynetdicom's ``negotiate_as_acceptor``, remembered by its arguments' values. The result
    contexts of a remembered negotiation are :class:`SharedResult` objects, the same for every
    association that negotiates the same way (in a list of its own); the role replies are
    copies."""
    if sum(len(getattr(c, "transfer_syntax", None) or ()) for c in rq_contexts) > (
        REMEMBERED_SYNTAXES
    ):
        return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    try:
        key = (
            picture(rq_contexts),
            picture(ac_contexts),
            tuple(sorted((str(uid), role) for uid, role in (roles or {}).items())),
        )
        hash(key)
    except (Unfreezable, TypeError):
        return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    remembered = NEGOTIATIONS.get(key)
    if remembered is None:
        contexts, replies = _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
        if any(vars(c).keys() != _CONTEXT_FIELDS for c in contexts):
            return contexts, replies  # not pynetdicom 3.0's contexts: not shared
        remembered = ([SharedResult.of(c) for c in contexts], [copy.copy(r) for r in replies])
        NEGOTIATIONS.put(key, remembered)
    contexts, replies = remembered
    return list(contexts), [copy.copy(r) for r in replies]


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
