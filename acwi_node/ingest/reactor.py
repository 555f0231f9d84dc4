"""Event-driven reactors for pynetdicom's acceptor associations (the storage SCP's hot loop).

pynetdicom runs two polling loops per association: the DUL thread checks the socket with a
zero-timeout ``select`` and sleeps 1 ms whenever it found nothing, and the association thread
sleeps 1 ms on every turn before it looks for a decoded DIMSE message. A C-STORE waits for
both: the request is seen up to a millisecond late, the handler runs up to a millisecond late,
and the response leaves up to a millisecond late. For small instances that latency, not the
work, sets the rate (about 120 instances/s on one association).

Here both loops sleep on what they wait for instead:

* the DUL thread blocks in ``select`` on the socket and on a wake-up pipe, written to whenever
  a primitive is queued for it to send (``send_pdu``) or it is told to stop; TLS data already
  decrypted (``SSLSocket.pending()``) never waits;
* the association thread blocks on an event the DUL thread sets after every state-machine
  action (a decoded DIMSE message, a release or abort request, a closed connection).

Both wait at most :data:`MAX_WAIT_S` before going round anyway, so the ARTIM and idle timers
and every check of pynetdicom's loops still run, only without the busy waiting. The loops are
pynetdicom 3.0's own, with the sleeps replaced; :func:`compatible` checks that the installed
pynetdicom still has the internals this relies on, and the SCP falls back to pynetdicom's
reactors when it does not.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import re
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from typing import Any, cast

import pynetdicom.acse
from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ, A_RELEASE_RP
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

from acwi_node.ingest.fastpath import (
    C_STORE_RQ,
    PassThrough,
    PDataRouter,
    StoreRequest,
    store_response_pdu,
    ui_value,
    us_value,
)
from acwi_node.ingest.negotiation import REQUESTS, accept_pdu_bytes, acceptor_contexts
from acwi_node.reactor_pause import install as install_reactor_pause
from acwi_node.tcp import no_delay, quick_ack

log = logging.getLogger("acwi_node.ingest")

# Every association the node makes or accepts (all come through this module) pauses its
# reactor safely before a send_* method sends: see acwi_node.reactor_pause.
install_reactor_pause()

#: The status of the C-STORE response to a request that lacks a required parameter (an
#: Affected SOP Class or Instance UID, a Priority, a data set): Error: Cannot understand
#: (PS3.4 B.2.3).
INVALID_REQUEST_STATUS = 0xC000

#: Longest a loop sleeps before it checks its timers again (seconds).
MAX_WAIT_S = 0.05
#: Longest the DUL waits, at the first P-DATA-TF PDU, for the association thread to finish
#: negotiating before it leaves the PDU to pynetdicom's path instead (seconds).
SERVING_WAIT_S = 5.0


#: How long the peer must have sent nothing before the DUL runs the work left for when the
#: association is idle (:func:`when_idle`), in seconds: longer than a sender takes between two
#: instances it streams, short beside anything that waits for that work.
IDLE_S = 0.005


#: The fast path's C-STORE handler may leave work for after its response (see
#: :func:`after_response`) and for when the association is idle (:func:`when_idle`); per DUL
#: thread.
_serving = threading.local()


def on_fast_path() -> bool:
    """Whether the caller is the EVT_C_STORE handler of a request the fast path serves: only
    there do :func:`after_response` and :func:`when_idle` take work."""
    return getattr(_serving, "after", None) is not None


def after_response(work: Callable[[], object]) -> bool:
    """Have ``work`` run once the C-STORE response now being prepared has been sent, on the
    association's own thread before it reads the next PDU; False when the handler does not
    run on the fast path (the caller must do the work before it returns)."""
    pending: list[Callable[[], object]] | None = getattr(_serving, "after", None)
    if pending is None:
        return False
    pending.append(work)
    return True


def when_idle(work: Callable[[], object]) -> bool:
    """Have ``work`` run on this association's DUL thread, once, at the first of: the peer has
    sent nothing for :data:`IDLE_S`; a received PDU is about to reach pynetdicom's path (a
    release or abort request, a C-ECHO, an MPPS message, a closed connection: anything but a
    C-STORE the fast path serves); the DUL stops. False (nothing registered) when not called
    on an event-driven DUL's thread."""
    dul: EventDrivenDUL | None = getattr(_serving, "dul", None)
    if dul is None:
        return False
    dul.idle_work.append(work)
    return True


def compatible() -> bool:
    """Whether the installed pynetdicom has the internals these reactors take over."""
    try:
        return all(
            hasattr(cls, name)
            for cls, name in (
                (DULServiceProvider, "_process_recv_primitive"),
                (DULServiceProvider, "_decode_pdu"),
                (DULServiceProvider, "_read_pdu_data"),
                (DULServiceProvider, "_is_transport_event"),
                (DULServiceProvider, "send_pdu"),
                (DULServiceProvider, "kill_dul"),
                (Association, "_serve_request"),
                (DIMSEServiceProvider, "receive_primitive"),
                (DIMSEMessage, "decode_msg"),
                (DIMSEMessage, "message_to_primitive"),
                (Association, "_run_reactor"),
                (RequestHandler, "_create_association"),
                (AE, "_create_socket"),
                (StateMachine, "transition"),
                (pynetdicom.acse, "negotiate_as_acceptor"),
            )
        )
    except Exception:  # pragma: no cover - anything unexpected: use pynetdicom's own
        return False


#: A UID that every check on pynetdicom's path accepts without a word (pydicom's value
#: validation, pynetdicom's ``VALIDATORS["UI"]`` and ``UID.is_valid``): numbers without leading
#: zeros, separated by dots.
_CONFORMANT_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_DEFAULT_UI_VALIDATOR = pynetdicom_config.VALIDATORS["UI"]


def conformant_uid(value: str) -> UID | None:
    """``value`` as the UID pynetdicom's setters make of it, skipping their validations (three
    regular expressions per UID, a sixth of the fast path's time) when none of them can
    object; None: the setters decide, as for every value when the validators were replaced."""
    if (
        len(value) <= 64
        and _CONFORMANT_UID.fullmatch(value) is not None
        and pynetdicom_config.VALIDATORS["UI"] is _DEFAULT_UI_VALIDATOR
    ):
        return UID(value, validation_mode=pydicom_config.IGNORE)
    return None


def peer_name(assoc: Association) -> str:
    """The peer of ``assoc`` as log lines name it: its AE title once known, and its address."""
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        address = str(peer.address)
    except Exception:  # no address information (a stand-in socket)
        address = "an unknown address"
    ae_title = str(getattr(peer, "_ae_title", "") or "").strip()
    return f"{ae_title} ({address})" if ae_title else address


#: Where the Called and the Calling AE Title lie in an A-ASSOCIATE-RQ PDU, header included
#: (PS3.8 9.3.2).
_AE_TITLE_FIELDS = (("called", 10), ("calling", 26))


def bad_ae_title(assoc: Association, pdu: bytes | bytearray) -> bool:
    """Whether an A-ASSOCIATE-RQ PDU carries a Called or Calling AE Title pynetdicom
    refuses (:func:`ae_title_problem`); if so, logged in one line, the title escaped."""
    for name, offset in _AE_TITLE_FIELDS:
        field = bytes(pdu[offset : offset + 16])
        if len(field) < 16:
            return False  # a PDU cut short: pynetdicom's decoding reports it
        problem = ae_title_problem(field)
        if problem is not None:
            log.warning(
                "association request from %s refused: its %s AE title %s is not a valid "
                "AE title (%s)",
                peer_name(assoc),
                name,
                ascii(field.rstrip(b" ").decode("latin-1")),
                problem,
            )
            return True
    return False


def ae_title_problem(value: bytes) -> str | None:
    """Why the 16 bytes of an A-ASSOCIATE-RQ's AE title field are not an AE title that
    pynetdicom takes (ASCII, no control character or backslash, not only spaces; PS3.5 6.2);
    None when they are. pynetdicom logs such a title at ERROR (a traceback for one not in
    ASCII) before it refuses it."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        if any(
            codec.lower() not in ("ascii", "646", "us-ascii") for codec in pynetdicom_config.CODECS
        ):
            return None  # pynetdicom is configured to try other character sets: it decides
        return "not in ASCII"
    text = text.strip()
    if not text:
        return "only spaces"
    valid, reason = pynetdicom_config.VALIDATORS["AE"](text)
    return None if valid else str(reason or "not a valid AE title")


def _why(message: DIMSEMessage, exc: Exception) -> str:
    """Why a command set could not be decoded, in words where pynetdicom's are obscure."""
    command_set = getattr(message, "command_set", None)
    try:
        if command_set is not None and "CommandField" not in command_set:
            return "no Command Field"
        if isinstance(exc, KeyError) and command_set is not None:
            return f"unknown Command Field 0x{int(command_set.CommandField):04X}"
    except Exception:  # the command set itself cannot be read
        pass
    return f"{type(exc).__name__}: {exc}"


class CheckedDIMSE(DIMSEServiceProvider):
    """pynetdicom 3.0's DIMSE service provider, whose ``receive_primitive`` ends the
    association when a received message cannot be decoded.

    pynetdicom raises from the state machine's action DT-2 when a command set is not a DIMSE
    command (no Command Field, an unknown one, bytes pydicom cannot read): the exception went
    up the DUL thread, which died without a word to the peer, after some 40 lines of
    tracebacks. Here such a message is an invalid PDU (event 19): the state machine sends an
    A-ABORT (source service provider) and tells the association, and one line is logged.
    """

    def receive_primitive(self, primitive: Any) -> None:
        """pynetdicom 3.0's, with the decoding's failures handled as described above."""
        message = self.message
        if message is None:
            message = self.message = DIMSEMessage()
        try:
            if not message.decode_msg(primitive, self.assoc):
                return
        except Exception as exc:
            self._undecodable("a command set that is not a DIMSE command", _why(message, exc))
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = cast(int, message.context_id)
        try:
            received = message.message_to_primitive()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._undecodable(f"a {type(message).__name__} message that is not valid", reason)
            return
        if isinstance(received, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[cast(int, received.MessageIDBeingRespondedTo)] = received
        elif isinstance(received, N_EVENT_REPORT) and received.is_valid_request:
            # pynetdicom serves these at once, on a thread of their own
            threading.Thread(
                target=make_target(self.assoc._serve_request), args=(received, context_id)
            ).start()
        else:
            self.msg_queue.put((context_id, cast(Any, received)))  # not a C-CANCEL here
        self._forget(message)

    def _forget(self, message: DIMSEMessage) -> None:
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        self.message = None

    def _undecodable(self, what: str, reason: str) -> None:
        self._forget(cast(DIMSEMessage, self.message))
        log.warning(
            "the association from %s sent %s (%s): aborting it", peer_name(self.assoc), what, reason
        )
        self.dul.event_queue.put("Evt19")  # an invalid PDU: A-ABORT, A-P-ABORT indication


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, sleeping in ``select`` instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        #: Held while the pipe's write end is written or closed (see :meth:`_wake`).
        self._wake_lock = threading.Lock()
        #: Set after every state-machine action: the association thread has something to see.
        self.activity = threading.Event()
        #: Set when the association thread starts serving (negotiation done, EVT_ACCEPTED
        #: handled): only then may this thread serve C-STOREs itself.
        self.serving = threading.Event()
        self._router = PDataRouter(self._accept_store)
        self._fast: bool | None = None  # decided at the first P-DATA-TF PDU
        self._storage_classes: dict[str, bool] = {}
        #: The accepted SOP Class Common Extended Negotiation, read once the association is
        #: established (it does not change afterwards).
        self._extended: dict[Any, Any] | None = None
        #: Per accepted presentation context ID, the tuple EVT_C_STORE handlers get as
        #: ``event.context`` (the accepted contexts do not change once established).
        self._context_tuples: dict[int, Any] = {}
        #: SOP Class UIDs already made into UIDs (:func:`conformant_uid`); a few per
        #: association, bounded all the same.
        self._class_uids: dict[str, UID] = {}
        #: Work for when the association is idle (:func:`when_idle`); this thread's only.
        self.idle_work: list[Callable[[], object]] = []
        #: Held around every state machine action (:meth:`_accept_at_once` takes one on the
        #: association's thread).
        self.fsm_lock = threading.Lock()
        #: Whether an A-ASSOCIATE-RQ PDU came (Evt6), or the association's wait for one was
        #: ended (:meth:`_no_request_came`).
        self._request_settled = False
        #: Whether an A-ASSOCIATE-RQ PDU came (:func:`holds_association_slot`).
        self.request_came = False

    def _run_idle_work(self) -> None:
        """Run the work left for when the association is idle, in the order it was left."""
        while self.idle_work:
            work, self.idle_work = self.idle_work, []
            for item in work:
                try:
                    item()
                except Exception:
                    log.exception("the work left for an idle association failed")

    def _wake(self) -> None:
        """Wake the reactor thread from another one (something is to be sent).

        The association thread may send after the reactor ended and closed the pipe (a
        response to a peer that aborted, a stop): its descriptor number is then free, and the
        next file the process opens (a spool file, the ledger's database) gets it. Writing to
        the number then would put a NUL byte into that file: at offset 0 of an SQLite database
        that SQLite writes with ``pwrite``, which makes it "not a database". So the write end
        is written and closed under a lock, and marked closed (-1) when it is."""
        with self._wake_lock:
            if self._wake_w < 0:
                return
            with contextlib.suppress(OSError):  # a full pipe is already awake
                os.write(self._wake_w, b"\0")

    def send_pdu(self, primitive: Any) -> None:
        if self._answer_at_once(primitive):
            return
        super().send_pdu(primitive)
        self._wake()

    def _answer_at_once(self, primitive: Any) -> bool:
        """Answer the peer's association or release request on the caller's thread, the
        association's, which has just decided: state machine action AE-7 (send the
        A-ASSOCIATE-AC, go to Sta6) or AR-4 (send the A-RELEASE-RP, start the ARTIM timer,
        go to Sta13). Handed to the DUL thread, the answer waited for that thread to wake and
        then for the interpreter lock while the association thread recorded the acceptance or
        the release: 0.3 ms of the 1.5 an A-ASSOCIATE-AC took.

        False, having done nothing, for any other primitive, on a TLS connection (an SSL
        connection is not to be written by one thread while another reads it: the DUL thread
        does all of its I/O), where handlers watch the PDUs sent or the state machine (they see
        pynetdicom's own actions), or when the state machine is not waiting for exactly this
        answer (Sta3 or Sta8, nothing else queued)."""
        if isinstance(primitive, A_ASSOCIATE) and primitive.result == 0x00:
            waiting, then = "Sta3", "Sta6"
        elif isinstance(primitive, A_RELEASE) and primitive.result == "affirmative":
            waiting, then = "Sta8", "Sta13"
        else:
            return False
        assoc = self.assoc
        if (
            not assoc.is_acceptor
            or not isinstance(self.socket, BulkReadSocket)
            or self.socket._raw_fd() < 0
            or any(
                assoc.get_handlers(event) for event in (evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)
            )
        ):
            return False
        with self.fsm_lock:
            if self.state_machine.current_state != waiting or self.to_provider_queue.qsize():
                return False
            if then == "Sta6":
                data = accept_pdu_bytes(primitive)
            else:
                data = bytes(A_RELEASE_RP(primitive).encode())
                self.artim_timer.start()
            # The next state before the first byte leaves: the peer's answer (its first
            # P-DATA-TF, its closing the connection) may follow at once.
            self.state_machine.transition(then)
            assert self.socket is not None
            self.socket.send(data)  # a failure queues Evt17, which the DUL thread handles
        self.activity.set()
        return True

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()
        self.activity.set()

    # ------------------------------------------------------- the C-STORE fast path
    def _fast_path_on(self) -> bool:
        """Whether this association's C-STORE requests may take the fast path.

        Not when anything listens to the PDU or DIMSE traffic (pynetdicom's debug logging
        handlers, a bound EVT_PDU_RECV ...): those see every message only on pynetdicom's path.
        """
        if self._fast is None:
            assoc = self.assoc
            if not assoc.is_acceptor:  # a requestor's P-DATA are answers: pynetdicom's path
                self._fast = False
                return False
            watched = (
                evt.EVT_DATA_RECV,
                evt.EVT_DATA_SENT,
                evt.EVT_PDU_RECV,
                evt.EVT_PDU_SENT,
                evt.EVT_DIMSE_RECV,
                evt.EVT_DIMSE_SENT,
            )
            self._fast = (
                not pynetdicom_config.STORE_RECV_CHUNKED_DATASET
                and not pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE
                and not any(assoc.get_handlers(event) for event in watched)
            )
        return self._fast

    def _is_storage_class(self, uid: str) -> bool:
        known = self._storage_classes.get(uid)
        if known is None:
            known = uid_to_service_class(uid) is StorageServiceClass
            self._storage_classes[uid] = known
        return known

    def _accept_store(self, context_id: int, elements: dict[int, bytes]) -> StoreRequest | None:
        """A StoreRequest for a C-STORE request the fast path serves; None to pass it on."""
        assoc = self.assoc
        if (
            us_value(elements, 0x0100) != C_STORE_RQ
            or not assoc.is_established
            or assoc._sent_release
        ):
            return None
        context = assoc._accepted_cx.get(context_id)
        sop_class = ui_value(elements, 0x0002)
        sop_instance = ui_value(elements, 0x1000)
        message_id = us_value(elements, 0x0110)
        priority = us_value(elements, 0x0700)
        if (
            context is None
            or not sop_class
            or not sop_instance
            or message_id is None
            or priority is None
        ):
            return None
        class_uid = self._class_uids.get(sop_class)
        if class_uid is None or pynetdicom_config.VALIDATORS["UI"] is not _DEFAULT_UI_VALIDATOR:
            class_uid = conformant_uid(sop_class)
            if class_uid is not None and len(self._class_uids) < 64:
                self._class_uids[sop_class] = class_uid
        instance_uid = conformant_uid(sop_instance)
        if self._extended is None:
            self._extended = assoc.acceptor.accepted_common_extended
        extended = self._extended.get(class_uid or UID(sop_class)) if self._extended else None
        service_uid = str(extended[0]) if extended else sop_class
        if not self._is_storage_class(service_uid):
            return None
        request = C_STORE()
        try:  # pynetdicom's checks of these values; anything it dislikes goes its own way
            request.MessageID = message_id
            if class_uid is not None and instance_uid is not None:
                # What pynetdicom's setters would store, without their three validations.
                request._affected_sop_class_uid = class_uid
                request._affected_sop_instance_uid = instance_uid
            else:
                request.AffectedSOPClassUID = sop_class
                request.AffectedSOPInstanceUID = sop_instance
            request.Priority = priority
            if 0x1030 in elements:
                request.MoveOriginatorApplicationEntityTitle = ui_value(elements, 0x1030)
            if 0x1031 in elements:
                request.MoveOriginatorMessageID = us_value(elements, 0x1031)
        except (ValueError, TypeError):
            return None
        if request.AffectedSOPClassUID is None or request.AffectedSOPInstanceUID is None:
            return None
        context_tuple = self._context_tuples.get(context_id)
        if context_tuple is None:
            context_tuple = self._context_tuples[context_id] = context.as_tuple
        return StoreRequest(
            context_id, sop_class, sop_instance, message_id, (request, context_tuple)
        )

    def _serve_store(self, taken: StoreRequest) -> None:
        """Run the EVT_C_STORE handler on this thread and answer, as pynetdicom's Storage
        service class does (a handler that raises: 0xC211); then the work the handler left
        for after the response (:func:`after_response`)."""
        request, context = taken.payload
        request.DataSet = BytesIO(taken.data_set)
        taken.data_set = b""
        after: list[Callable[[], object]] = []
        _serving.after = after
        try:
            self._answer_store(taken, request, context)
        finally:
            _serving.after = None
            for work in after:
                try:
                    work()
                except Exception:
                    log.exception("the work left for after a C-STORE response failed")

    def _answer_store(self, taken: StoreRequest, request: C_STORE, context: Any) -> None:
        """``context``: the presentation context as handlers see it (``as_tuple``)."""
        assoc = self.assoc
        try:
            status = evt.trigger(assoc, evt.EVT_C_STORE, {"request": request, "context": context})
        except Exception as exc:
            log.error("the C-STORE handler failed: %s", exc)
            status = 0xC211
        if not assoc.is_established:  # the handler aborted or released
            return
        if isinstance(status, int) and not isinstance(status, bool) and 0 <= status <= 0xFFFF:
            assert self.socket is not None
            self.socket.send(store_response_pdu(taken, status))
            return
        # A status data set, or something odd: pynetdicom's validation and encoder.
        response = C_STORE()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response = StorageServiceClass(assoc).validate_status(cast(Any, status), response)
        assoc.dimse.send_msg(response, taken.context_id)

    def _is_transport_event(self) -> bool:
        """pynetdicom's, holding ``fsm_lock`` in Sta13, where it closes the connection once
        nothing more is to be read: the association thread moves to Sta13 before its
        A-RELEASE-RP leaves and sends it holding the lock (:meth:`_answer_at_once`). Closed in
        between, the response was lost; closed just after the association thread took the
        socket's descriptor number, the response went to the next file the process opened,
        which had taken the number (10 bytes at offset 0 of an SQLite database)."""
        if self.state_machine.current_state != "Sta13":
            return bool(super()._is_transport_event())
        with self.fsm_lock:
            return bool(super()._is_transport_event())

    def _process_recv_primitive(self) -> bool:
        """pynetdicom's, without the exception it raises and catches when nothing was sent to
        the DUL (on every turn of the loop)."""
        if not self.to_provider_queue.queue:
            return False
        return bool(super()._process_recv_primitive())

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0's ``_read_pdu_data``, with P-DATA-TF PDUs of an established
        association routed through the C-STORE fast path (:mod:`.fastpath`)."""
        assert self.socket is not None
        try:
            header = self.socket.recv(6)
        except (OSError, TimeoutError) as exc:
            log.debug("connection closed before the entire PDU was received: %s", exc)
            self._queue_event("Evt17")
            return
        try:
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        except struct.error:
            self._queue_event("Evt17")  # the connection closed
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.warning("unknown PDU type 0x%02X received", pdu_type)
            self._queue_event("Evt19")
            return
        try:
            body = self.socket.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            log.debug("connection closed before the entire PDU was received: %s", exc)
            self._queue_event("Evt17")
            return
        if len(body) != pdu_length:
            log.warning(
                "the received PDU is shorter than it says (%d of %d bytes)",
                len(body),
                pdu_length,
            )
            self._queue_event("Evt17")
            return
        if (
            pdu_type == 0x04
            and self.state_machine.current_state == "Sta6"
            and self._fast_path_on()
            and (self.serving.is_set() or self.serving.wait(SERVING_WAIT_S))
        ):
            for action in self._router.feed(body):  # ProtocolError: the reactor aborts
                if isinstance(action, PassThrough):
                    self._decode_and_queue(bytearray(action.pdu()))
                else:
                    self._serve_store(action)
            return
        if pdu_type == 0x01 and self.assoc.is_acceptor and self._bad_ae_title(header + body):
            self._queue_event("Evt19")  # an invalid PDU: A-ABORT
            return
        if pdu_type == 0x01 and self._remember_requests():
            self._queue_request(bytes(header + body))
            return
        self._decode_and_queue(header + body)

    def _bad_ae_title(self, pdu: bytes | bytearray) -> bool:
        return bad_ae_title(self.assoc, pdu)

    def _queue_event(self, event: str) -> None:
        """Hand a state-machine event to pynetdicom, after the work left for an idle
        association (:func:`when_idle`)."""
        self._run_idle_work()
        self.event_queue.put(event)

    def _remember_requests(self) -> bool:
        """Whether an A-ASSOCIATE-RQ may come from :data:`~.negotiation.REQUESTS`: on an
        acceptor whose received PDUs nothing watches (those see pynetdicom's decoding)."""
        assoc = self.assoc
        return assoc.is_acceptor and not any(
            assoc.get_handlers(event) for event in (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)
        )

    def _queue_request(self, pdu_bytes: bytes) -> None:
        """An A-ASSOCIATE-RQ, decoded or remembered (:mod:`.negotiation`), to the state
        machine, as :meth:`_decode_and_queue` would queue it."""
        self._run_idle_work()
        try:
            pdu = REQUESTS.request(pdu_bytes)
        except Exception as exc:
            log.warning("unable to decode a received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put("Evt6")
        self._recv_pdu.put(pdu)  # type: ignore[arg-type]

    def _decode_and_queue(self, pdu_bytes: bytearray) -> None:
        self._run_idle_work()  # before pynetdicom sees the PDU (see when_idle)
        try:
            pdu, event = self._decode_pdu(pdu_bytes)
        except Exception as exc:
            log.warning("unable to decode a received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _wait(self) -> None:
        """Sleep until the socket is readable, something is to be sent, or MAX_WAIT_S."""
        sock = getattr(self.socket, "socket", None)
        if sock is None:
            threading.Event().wait(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        if isinstance(self.socket, BulkReadSocket) and self.socket.buffered:
            return
        idle_work = bool(self.idle_work)
        try:
            readable, _, _ = select.select(
                [sock, self._wake_r], [], [], IDLE_S if idle_work else MAX_WAIT_S
            )
        except (OSError, ValueError):  # the socket is closed: the next turn notices
            threading.Event().wait(self._run_loop_delay)
            return
        if idle_work and not readable:
            self._run_idle_work()
            return
        if sock in readable and isinstance(self.socket, BulkReadSocket):
            self.socket.readable = True  # spares the zero-timeout select that would follow
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 4096):
                    pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop, with ``time.sleep`` replaced by :meth:`_wait`."""
        _serving.dul = self
        try:
            self._reactor()
        finally:
            _serving.dul = None
            self._run_idle_work()
            self.activity.set()
            with self._wake_lock:
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_r = self._wake_w = -1

    def _reactor(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                self._abort_on_error(exc)
                return
            # Nothing queued: looked at without the queue's lock and without the exception that
            # get() raises (twice per C-STORE on the fast path); what another thread queues
            # meanwhile is seen on a later turn, as it would be after get() had found nothing.
            if not self.event_queue.queue:
                idle = True
                continue
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            try:
                with self.fsm_lock:
                    if event == "Evt6":  # an A-ASSOCIATE-RQ PDU came
                        self._request_settled = True
                        self.request_came = True
                    if not (
                        event == "Evt7"
                        and self.state_machine.current_state == "Sta3"
                        and self._send_accept()
                    ):
                        self.state_machine.do_action(event)
                    if not self._request_settled and self.state_machine.current_state == "Sta1":
                        self._no_request_came()
            except Exception as exc:
                # pynetdicom's state machine logged it and raised it again: the association
                # cannot go on, but this thread must end in order, not with the exception.
                self._abort_on_error(exc)
                return
            self.activity.set()
            idle = False

    def _abort_on_error(self, exc: Exception) -> None:
        """End the association after an error in the upper layer: one log line, an A-ABORT
        (source service provider) to the peer, the association thread told, this one ended."""
        log.error(
            "DICOM upper layer error on the association from %s, aborting it: %s",
            peer_name(self.assoc),
            exc,
        )
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        with contextlib.suppress(Exception):
            self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        if not self._request_settled:
            self._no_request_came()
        self.activity.set()

    def _no_request_came(self) -> None:
        """The connection ended, or was aborted, before an A-ASSOCIATE-RQ came: a port probe,
        a health check, HTTP on the DICOM port, a peer that gave up. pynetdicom's acceptor
        waits for the request for ``acse_timeout`` all the same, its thread counted among the
        associations that ``ingest.max_associations`` limits: three probes held both slots of
        a node allowing two for 30 s, and it rejected the next modality. An empty primitive
        ends that wait now (as its timeout would), and the association closes."""
        self._request_settled = True
        if self.assoc.is_acceptor:
            # pynetdicom types the queue as holding primitives; its acceptor reads None as
            # "none came" (what its own timeout gives it). Not every release types it so.
            self.to_user_queue.put(None)  # type: ignore[arg-type, unused-ignore]

    def _send_accept(self) -> bool:
        """State machine action AE-7 (send the A-ASSOCIATE-AC, go to Sta6), with the PDU's
        bytes from :func:`~.negotiation.accept_pdu_bytes`; False, having done nothing, where
        handlers watch the PDUs sent or the state machine (they see pynetdicom's own AE-7)."""
        assoc = self.assoc
        if not assoc.is_acceptor or any(
            assoc.get_handlers(event) for event in (evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)
        ):
            return False
        assert self.socket is not None
        primitive = cast(A_ASSOCIATE, self.to_provider_queue.get(False))
        self.socket.send(accept_pdu_bytes(primitive))
        self.state_machine.transition("Sta6")
        return True


def holds_association_slot(assoc: Association) -> bool:
    """Whether an acceptor counts against ``ingest.max_associations``: once its peer's
    A-ASSOCIATE-RQ came. A connection that has sent no request yet (a port probe, a health
    check, a peer still connecting) holds none, even for the moment between its connection
    closing and its thread ending: under load a few such threads outlived their connection
    long enough for the next modality, negotiating meanwhile, to be rejected. Associations
    served by pynetdicom's own loops (``ingest.reactor = "polling"``) always count."""
    return bool(getattr(assoc.dul, "request_came", True))


class AnswersInvalidRequests(Association):
    """An acceptor association that answers at once the requests pynetdicom drops as invalid,
    and whose DIMSE provider ends the association on a command set that is no DIMSE command
    (:class:`CheckedDIMSE`)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dimse = CheckedDIMSE(self)

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """pynetdicom's, but a request it would drop as invalid (a required parameter missing:
        "Received unexpected C-STORE service message") is answered at once: the peer would
        otherwise wait for the response until a timeout ends the association. A C-STORE
        request with a Message ID gets a failure response (:data:`INVALID_REQUEST_STATUS`);
        any other is aborted."""
        if (
            self._sent_release
            or msg is None
            or msg.is_valid_request
            or getattr(msg, "MessageIDBeingRespondedTo", None) is not None  # a response
        ):
            super()._serve_request(msg, context_id)
            return
        missing = [name for name in msg.REQUEST_KEYWORDS if getattr(msg, name, None) is None]
        if (
            isinstance(msg, C_STORE)
            and msg.MessageID is not None
            and context_id in self._accepted_cx
        ):
            log.warning(
                "C-STORE request from %s without %s: refused with 0x%04X",
                peer_name(self),
                ", ".join(missing),
                INVALID_REQUEST_STATUS,
            )
            response = C_STORE()
            response.MessageIDBeingRespondedTo = msg.MessageID
            response.AffectedSOPClassUID = msg.AffectedSOPClassUID
            response.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
            response.Status = INVALID_REQUEST_STATUS
            self.dimse.send_msg(response, context_id)
            return
        log.warning(
            "%s request from %s without %s, which cannot be answered: aborting the association",
            msg.msg_type,
            peer_name(self),
            ", ".join(missing),
        )
        self.abort()


class CheckedDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, refusing an A-ASSOCIATE-RQ whose AE titles are
    none in one line (:func:`bad_ae_title`), as :class:`EventDrivenDUL` does: pynetdicom's
    decoding logged such a title at ERROR, with a traceback for one not in ASCII."""

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if (
            bytestream[:1] == b"\x01"
            and self.assoc.is_acceptor
            and bad_ae_title(self.assoc, bytestream)
        ):
            return A_ASSOCIATE_RQ(), "Evt19"  # an invalid PDU: A-ABORT
        return cast(tuple[Any, str], super()._decode_pdu(bytestream))


class CheckedAssociation(AnswersInvalidRequests):
    """The association of ``ingest.reactor = "polling"``: pynetdicom's own loops, with the
    same answers to invalid requests and AE titles as the event-driven association's."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = CheckedDUL(self)
        # pynetdicom applies these to the DUL when they are set; apply them to the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout


class CheckedRequestHandler(RequestHandler):
    """Creates :class:`CheckedAssociation` acceptors (``ingest.reactor = "polling"``)."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0's ``RequestHandler._create_association``, with the checked
        association class."""
        return _make_acceptor(self, CheckedAssociation, AssociationSocket, shared=False)


def _make_acceptor(
    handler: RequestHandler,
    association: type[Association],
    socket_class: type[AssociationSocket],
    *,
    shared: bool,
) -> Association:
    """pynetdicom 3.0's ``RequestHandler._create_association`` for ``handler``'s connection,
    with ``association`` and ``socket_class`` for pynetdicom's own; ``shared``: the
    presentation contexts shared by every association (:func:`acceptor_contexts`), else each
    association's copy, as pynetdicom makes."""
    server = cast(Any, handler.server)
    ae = server.ae
    assoc = association(ae, MODE_ACCEPTOR)
    assoc._server = server
    assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
    assoc.set_socket(socket_class(assoc, client_socket=handler.request))
    assoc.acceptor.maximum_length = ae.maximum_pdu_size
    assoc.acceptor.ae_title = server.ae_title
    assoc.acceptor.address_info = handler.local
    assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
    assoc.acceptor.implementation_version_name = ae.implementation_version_name
    assoc.acceptor.supported_contexts = (
        acceptor_contexts(server.contexts) if shared else copy.deepcopy(server.contexts)
    )
    assoc.requestor.address_info = handler.remote
    for event, handlers in server._handlers.items():
        if event.is_intervention and handlers:
            assoc.bind(event, *handlers)
        elif isinstance(event, evt.NotificationEvent):
            for bound in handlers:
                assoc.bind(event, bound[0], bound[1])
    return assoc


class EventDrivenAssociation(AnswersInvalidRequests):
    """An acceptor association whose reactor waits on the DUL's activity, not on a timer."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self)
        # pynetdicom applies these to the DUL when they are set; apply them to the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, waiting for the DUL instead of sleeping 1 ms."""
        dul = self.dul
        assert isinstance(dul, EventDrivenDUL)
        dul.serving.set()
        self._is_paused = False
        while not self._kill:
            if dul.activity.wait(MAX_WAIT_S):
                dul.activity.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            # Serve every decoded message before looking again.
            while True:
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
            if self.is_established and self.acse.is_release_requested():
                # Record the release before answering it: once the A-RELEASE-RP is out, the
                # peer closes the connection and EVT_CONN_CLOSE (DUL thread) could otherwise
                # run before EVT_RELEASED, so the association would look aborted.
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("network timeout reached: aborting the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
        # Killed from another thread (AE.shutdown() aborting the association: the SCP stops),
        # which waits for the DUL thread to end while that thread sends the A-ABORT. pynetdicom
        # closes the connection as soon as this returns: not while the DUL thread may still
        # write to the socket's descriptor number, which would then be the next file opened.
        dul.join()


#: Largest single read of a PDU's body: enough for any common PDU in one call, while a PDU
#: that declares gigabytes and sends little never makes the node allocate more than this.
RECV_CHUNK = 1 << 18
#: A read for less than this (a PDU's 6-byte header, a small PDU's body) asks for up to this
#: many bytes more: what the peer sent next (the PDU's body, the next PDU, a small instance's
#: data set PDU) is then taken from memory instead of by further system calls.
READ_AHEAD = 1 << 16


class BulkReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading in as few system calls as the data arrives in.

    pynetdicom reads in 4096-byte pieces: a 512 KB CT slice takes about 130 ``recv`` calls, each
    with Python's overhead around it, and a socket with a timeout (the node's have one) makes
    each of them two system calls, a ``poll`` and the ``recv``. Here:

    * a PDU's body is read straight into its buffer, in pieces of up to :data:`RECV_CHUNK`,
      the buffer growing only as the data arrives;
    * a short read (a PDU's header) reads ahead up to :data:`READ_AHEAD` bytes, kept for the
      next reads: a small instance's two PDUs, headers included, usually come in one call;
    * a plain TCP socket is read and written with ``readv``/``write`` on its descriptor, which
      the timeout leaves non-blocking: no ``poll`` first while there is data to read (the
      reactor's ``select`` said so) or room to send; only when there is none does the read or
      write wait, through the socket and its timeout, as before;
    * :attr:`ready` is true while read-ahead data waits, which ``select`` cannot see, and
      right after the reactor's ``select`` found the socket readable.
    """

    _ahead: bytearray | None = None
    #: Set by the DUL when its ``select`` found the socket readable; the next :attr:`ready`
    #: takes it instead of asking ``select`` again.
    readable = False

    @property
    def ready(self) -> bool:
        if self._ahead or self.readable:
            self.readable = False
            return True
        return bool(super().ready)

    @property
    def buffered(self) -> bool:
        """Whether data read ahead waits to be taken."""
        return bool(self._ahead)

    def _raw_fd(self) -> int:
        """The descriptor to use directly (-1: go through the socket object: TLS, a stand-in)."""
        sock = self.socket
        if type(sock) is socket.socket:
            return sock.fileno()
        return -1

    def _read_into(self, view: memoryview) -> int:
        quick_ack(self.socket)
        fd = self._raw_fd()
        if fd >= 0:
            with contextlib.suppress(BlockingIOError):  # nothing yet: wait, with the timeout
                return os.readv(fd, [view])
        sock = self.socket
        assert sock is not None
        return sock.recv_into(view, len(view))

    def recv(self, nr_bytes: int) -> bytearray:
        ahead = self._ahead
        if ahead is None:
            ahead = self._ahead = bytearray()
        if len(ahead) >= nr_bytes:
            data = ahead[:nr_bytes]
            del ahead[:nr_bytes]
            return data
        got = len(ahead)
        extra = READ_AHEAD if nr_bytes < READ_AHEAD else 0
        # Read straight into the PDU's buffer (no copy); the buffer grows with what arrives,
        # never to a declared length that the data does not back.
        data = bytearray(got + min(nr_bytes - got, RECV_CHUNK) + extra)
        data[:got] = ahead
        ahead.clear()
        while got < nr_bytes:
            if got == len(data):
                data += bytes(min(len(data), nr_bytes - got))
            with memoryview(data) as view:
                count = self._read_into(view[got : got + min(len(data) - got, RECV_CHUNK)])
            if not count:  # the connection broke: return what there is, as pynetdicom does
                break
            got += count
        if got > nr_bytes:
            with memoryview(data) as view:
                ahead += view[nr_bytes:got]
            del data[nr_bytes:]
        elif got < len(data):
            del data[got:]
        return data

    def send(self, bytestream: bytes) -> None:
        """pynetdicom's ``send``: every byte sent, then EVT_DATA_SENT; a failure is Evt17."""
        try:
            sent = 0
            fd = self._raw_fd()
            if fd >= 0:
                with contextlib.suppress(BlockingIOError):  # no room: wait, with the timeout
                    sent = os.write(fd, bytestream)
            if sent < len(bytestream):
                sock = self.socket
                assert sock is not None
                with memoryview(bytestream) as view:
                    while sent < len(view):
                        sent += sock.send(view[sent:])
            evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:
            self.event_queue.put("Evt17")


class EventDrivenRequestHandler(RequestHandler):
    """Creates :class:`EventDrivenAssociation` acceptors for the server's connections."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0's ``RequestHandler._create_association``, with the event-driven
        association class."""
        return _make_acceptor(self, EventDrivenAssociation, BulkReadSocket, shared=True)


class EventDrivenRequestorAE(AE):
    """An AE whose requested associations' DUL sleeps in ``select`` instead of polling, and
    whose sockets send each PDU at once (:func:`no_delay`).

    pynetdicom's DUL sleeps 1 ms whenever it finds nothing to do, so each C-STORE response is
    seen up to a millisecond late (100 CT slices to Orthanc: 1.0 s against 1.1 s), and an idle
    association wakes a thousand times a second. The association is pynetdicom's own; only its
    DUL, not started yet when the socket is made, is replaced by :class:`EventDrivenDUL` (whose
    C-STORE fast path serves acceptors only).
    """

    def _create_socket(
        self,
        assoc: Association,
        address: Any,
        tls_args: Any,
    ) -> AssociationSocket:
        if compatible():
            assoc.dul = EventDrivenDUL(assoc)
            assoc.dimse = CheckedDIMSE(assoc)
            # pynetdicom applies these to the DUL when they are set; apply them to the new one.
            assoc.acse_timeout = assoc.acse_timeout
            assoc.network_timeout = assoc.network_timeout
        # pynetdicom's AE._create_socket, with the socket class that acknowledges at once.
        sock = QuickAckSocket(assoc, address=address)
        sock.tls_args = tls_args
        no_delay(sock.socket)
        return sock


class QuickAckSocket(AssociationSocket):
    """pynetdicom's association socket, acknowledging what arrives at once (:func:`quick_ack`)
    before each read: a requestor's reads are the peer's answers, which a peer with Nagle's
    algorithm on (a DCMTK-based SCP: Orthanc without ``TCP_NODELAY`` in its environment) holds
    back until the node acknowledges the part already sent."""

    def recv(self, nr_bytes: int) -> bytearray:
        quick_ack(self.socket)
        return super().recv(nr_bytes)
