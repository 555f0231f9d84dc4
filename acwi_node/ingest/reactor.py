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
import logging
import os
import queue
import select
import ssl
import threading
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger("acwi_node.ingest")

#: Longest a loop sleeps before it checks its timers again (seconds).
MAX_WAIT_S = 0.05


def compatible() -> bool:
    """Whether the installed pynetdicom has the internals these reactors take over."""
    try:
        return all(
            hasattr(cls, name)
            for cls, name in (
                (DULServiceProvider, "_process_recv_primitive"),
                (DULServiceProvider, "_is_transport_event"),
                (DULServiceProvider, "send_pdu"),
                (DULServiceProvider, "kill_dul"),
                (Association, "_serve_request"),
                (Association, "_run_reactor"),
                (RequestHandler, "_create_association"),
            )
        )
    except Exception:  # pragma: no cover - anything unexpected: use pynetdicom's own
        return False


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, sleeping in ``select`` instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        #: Set after every state-machine action: the association thread has something to see.
        self.activity = threading.Event()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is already awake; a closed one is done
            os.write(self._wake_w, b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()
        self.activity.set()

    def _wait(self) -> None:
        """Sleep until the socket is readable, something is to be sent, or MAX_WAIT_S."""
        sock = getattr(self.socket, "socket", None)
        if sock is None:
            threading.Event().wait(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            select.select([sock, self._wake_r], [], [], MAX_WAIT_S)
        except (OSError, ValueError):  # the socket is closed: the next turn notices
            threading.Event().wait(self._run_loop_delay)
            return
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop, with ``time.sleep`` replaced by :meth:`_wait`."""
        try:
            self._reactor()
        finally:
            self.activity.set()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

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
                log.error("DICOM upper layer error, aborting the association: %s", exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(Exception):
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            self.activity.set()
            idle = False


class EventDrivenAssociation(Association):
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


#: Largest single read of a PDU's body: enough for any common PDU in one call, while a PDU
#: that declares gigabytes and sends little never makes the node allocate more than this.
RECV_CHUNK = 1 << 18


class BulkReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU's body in as few calls as it arrives in.

    pynetdicom reads in 4096-byte pieces: a 512 KB CT slice takes about 130 ``recv`` calls (and
    as many ``poll`` calls, the socket having a timeout), each with Python's overhead around it.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        data = bytearray()
        while len(data) < nr_bytes:
            chunk = sock.recv(min(nr_bytes - len(data), RECV_CHUNK))
            if not chunk:  # the connection broke: return what there is, as pynetdicom does
                break
            data += chunk
        return data


class EventDrivenRequestHandler(RequestHandler):
    """Creates :class:`EventDrivenAssociation` acceptors for the server's connections."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0's ``RequestHandler._create_association``, with the event-driven
        association class."""
        server = cast(Any, self.server)
        ae = server.ae
        assoc = EventDrivenAssociation(ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(BulkReadSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
