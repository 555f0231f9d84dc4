"""The MLLP listener for orders from the RIS (asyncio).

One task per connection, at most ``max_connections`` at once (more are closed at once). Each
framed message gets exactly one acknowledgement (``AR`` where none could be built), or none
where its MSH-15 and MSH-16 (enhanced mode) ask for none; a batch (FHS/BHS) one batch of
acknowledgements; the ledger
work runs in a thread so a slow database never blocks other connections. A peer that breaks
framing (no start byte, no end bytes before the read timeout or the end of the connection, a
message over ``max_message_bytes``) or stays idle past ``idle_timeout_s`` has its connection
closed; the listener carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from acwi_node.config import Settings
from acwi_node.hl7.mllp import FramingError, frame, read_frame, stream_limit
from acwi_node.hl7.orders import OrderIntake, acknowledgement, is_batch
from acwi_node.ledger import Ledger
from acwi_node.tcp import host_port, listening_socket, quick_ack

log = logging.getLogger("acwi_node.hl7")


class MllpListener:
    """Serves :class:`OrderIntake` over MLLP; runs its own event loop in a thread."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.intake = OrderIntake(settings, ledger)
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cfg = self.settings.hl7
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "peer"
        if self._active >= cfg.max_connections:
            log.warning("connection from %s refused: %d connections open", where, self._active)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._active += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        try:
            while True:
                # A sender with Nagle's algorithm on holds a frame's later parts until the
                # earlier ones are acknowledged: acknowledge each message's first part at once.
                quick_ack(sock)
                try:
                    payload = await read_frame(
                        reader,
                        max_bytes=cfg.max_message_bytes,
                        idle_timeout_s=cfg.idle_timeout_s,
                        read_timeout_s=cfg.read_timeout_s,
                    )
                except FramingError as exc:
                    log.warning("closing connection from %s: %s", where, exc)
                    break
                except (TimeoutError, asyncio.TimeoutError):
                    log.info("closing connection from %s: timed out", where)
                    break
                if payload is None:
                    break
                try:
                    if is_batch(payload):
                        reply = frame(await asyncio.to_thread(self.intake.handle_batch, payload))
                    else:
                        ack = await asyncio.to_thread(self.intake.handle, payload)
                        answer = acknowledgement(payload, ack)
                        if answer is None:  # enhanced mode: MSH-15 and MSH-16 ask for none
                            continue
                        reply = frame(answer)
                except Exception as exc:  # every message gets an answer, never a silent close
                    log.error(
                        "message from %s could not be acknowledged (%s): answered AR",
                        where,
                        type(exc).__name__,
                    )
                    reply = frame(
                        self.intake.refusal(payload, "AR", "the acknowledgement could not be built")
                    )
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s ended: %s", where, type(exc).__name__)
        except Exception:
            log.exception("connection from %s failed", where)
        finally:
            self._active -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _main(self, stop: asyncio.Event) -> None:
        cfg = self.settings.hl7
        # ``::`` takes IPv4 connections too, as every listener of the node does (asyncio's own
        # binding made it IPv6 only)
        self._server = await asyncio.start_server(
            self._serve_connection,
            sock=listening_socket(cfg.listen_host, cfg.listen_port),
            limit=stream_limit(cfg.max_message_bytes),
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("HL7 MLLP listener on %s", host_port(cfg.listen_host, self.port))
        self._ready.set()
        async with self._server:
            await stop.wait()
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        try:
            loop.run_until_complete(self._main(self._stop_event))
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def start(self) -> MllpListener:
        """Start serving in a background thread; returns once the port is bound."""
        self._thread = threading.Thread(target=self._run, name="hl7-listener", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"HL7 listener cannot start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
