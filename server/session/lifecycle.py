"""A session's life: accept, query parameters, queueing, joining a slot, the conversation, ending.

Bad input ends only the offending session, with a kind-5 error: text frames, empty or oversized
messages, audio that is not Ogg/Opus. Control (3), ping (6), client-sent handshake/text/metadata
and unknown kinds are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
from starlette.websockets import WebSocket, WebSocketState

from duplex.server import protocol
from duplex.server.admission import Busy, Closed
from duplex.server.guard import guard_refusal
from duplex.server.metrics import SessionRecord
from duplex.server.request import resolve_request
from duplex.server.scheduler import SchedulerFailed, SchedulerFull
from duplex.server.session.inbound import Inbound
from duplex.server.session.outbound import Outbound

if TYPE_CHECKING:
    from duplex.server.service import DuplexService

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 1.0  # how long sending the close frame may take
# The client cannot or does not read, or the guard closed the socket already: nothing is flushed.
NO_FLUSH_REASONS = ("client_closed", "slow_client", "bad_audio", "no_audio")


class Session:
    """Serves one websocket from accept to close."""

    def __init__(self, websocket: WebSocket, service: DuplexService) -> None:
        self.ws = websocket
        self.service = service
        self.id = uuid.uuid4().hex[:12]
        client = websocket.client
        self.record = SessionRecord(session_id=self.id, client=f"{client.host}:{client.port}" if client else "?")
        self.inbound = Inbound(self)
        self.outbound = Outbound(self)
        self.done = asyncio.Event()
        self.end_reason: str | None = None
        self.end_error: str | None = None
        self.handle = None
        self._holds_admission = False
        self._resolved: dict = {}  # the session's resolved sampling settings (metadata)

    # ------------------------------------------------------------------ entry point
    async def run(self) -> None:
        """Accept, validate, wait for a slot, stream until the end, clean up."""
        await self.ws.accept()
        started = time.monotonic()
        try:
            params = protocol.parse_query_params(self.ws.query_params, adapters=self.service.adapter_names)
        except ValueError as exc:
            await self._reject(str(exc), "bad_params")
            return
        if not await self._wait_for_slot():
            return
        self._holds_admission = True
        self.record.queued_s = time.monotonic() - started
        refusal = self._join_scheduler(params)
        if refusal is not None:
            self._release_admission()
            await self._reject(*refusal)
            return
        try:
            await self._converse(params)
        finally:
            self._release_admission()
            self.record.duration_s = time.monotonic() - started - self.record.queued_s
            self.record.end_reason = self.end_reason or "unknown"
            self.service.metrics.sessions_ended.labels(self.record.end_reason).inc()
            self.record.log()

    def _guard_reason(self) -> str | None:
        """Why the connection guard closed the socket (``bad_audio``, ``no_audio``), or None."""
        return guard_refusal(getattr(self.ws, "scope", None) or {})

    def _release_admission(self) -> None:
        """Give the admitted slot back (once), so that the next queued client starts."""
        if self._holds_admission:
            self._holds_admission = False
            self.service.admission.release()

    def _join_scheduler(self, params: protocol.SessionParams) -> tuple[str, str] | None:
        """Bind to a batch slot, or say why not: (message sent as kind 5, rejection reason).

        No await between the check and the join: a session admitted just as shutdown starts is told.
        """
        refusal = self.service.refusal()
        if refusal is not None:
            return refusal, "shutdown" if self.service.shutting_down else "server_error"
        request, self._resolved = resolve_request(params, self.service.defaults)
        try:
            self.handle = self.service.scheduler.join(self, request)
        except SchedulerFailed as exc:
            return str(exc), "shutdown" if self.service.shutting_down else "server_error"
        except SchedulerFull as exc:  # admission and scheduler disagree: should not happen, but must not leak
            logger.warning("session %s: admitted but no batch slot free (%s)", self.id, exc)
            return f"server busy: {exc}; try again later", "busy"
        return None

    async def _reject(self, message: str | None, reason: str) -> None:
        """Refuse the session (counted by reason): a kind-5 error, then close; no message = the client is gone."""
        self.service.metrics.rejected.labels(reason).inc()
        self.record.end_reason = reason
        if message is not None:
            try:
                await self.send_now(protocol.encode_error(message))
            except Exception:  # noqa: BLE001 - the client is gone already
                logger.debug("session %s: could not send %r", self.id, message, exc_info=True)
            await self._close()
        self.record.log()

    # ------------------------------------------------------------------ admission
    async def _wait_for_slot(self) -> bool:
        """Queue for a slot while watching for the client leaving. False = session will not start."""
        if self.service.admission.try_acquire():
            return True
        acquire = asyncio.ensure_future(self.service.admission.acquire(self._send_position))
        watch = asyncio.ensure_future(self.inbound.read_while_queued())
        try:
            done, _ = await asyncio.wait({acquire, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if watch in done:  # the client left (or sent bad input) while queued, even if a slot came too
            await self._give_up_queued_slot(acquire)
            error = None if watch.cancelled() or watch.exception() else watch.result()
            await self._reject(error, "bad_input" if error else self._guard_reason() or "left_queue")
            return False
        try:
            acquire.result()
        except Busy as exc:
            await self._reject(str(exc), "busy")
            return False
        except Closed as exc:
            await self._reject(str(exc), "shutdown" if self.service.shutting_down else "server_error")
            return False
        except Exception:  # noqa: BLE001 - a position update found the client gone
            logger.debug("session %s: left while queued", self.id, exc_info=True)
            await self._reject(None, "left_queue")
            return False
        return True

    async def _give_up_queued_slot(self, acquire: asyncio.Future) -> None:
        """Stop waiting for a slot; one granted already (in the same turn the client left) goes back."""
        if not acquire.done():
            acquire.cancel()  # a slot granted but not yet taken is given back by the admission itself
        await asyncio.gather(acquire, return_exceptions=True)
        if not acquire.cancelled() and acquire.exception() is None:
            self.service.admission.release()

    async def _send_position(self, position: int) -> None:
        # Kyutai's web client validates every kind-4 object against its server-info schema: carry its fields.
        message = {**self.service.kyutai_fields(), "type": "queue", "queue_position": position}
        await self.send_now(protocol.encode_metadata(message))

    # ------------------------------------------------------------------ the conversation
    async def _converse(self, params: protocol.SessionParams) -> None:
        """Stream with the bound slot until the session ends; the slot is freed (and admission released)
        before the output is flushed."""
        self.record.slot = self.handle.slot
        self.service.sessions.add(self)
        self.inbound.start_stream()
        sender = asyncio.ensure_future(self.outbound.send_loop(lambda: self.finish("client_closed")))
        receiver = asyncio.ensure_future(self.inbound.receive_loop())
        feeder = asyncio.ensure_future(self.inbound.feed_loop())
        try:
            self.outbound.enqueue(protocol.encode_handshake())
            self.outbound.enqueue(protocol.encode_metadata(
                self.service.session_metadata(self.id, params, self._resolved)))
            limit = self.service.settings.max_session_seconds or None
            try:
                await asyncio.wait_for(self.done.wait(), timeout=limit)
            except asyncio.TimeoutError:
                self.finish("time_limit", f"session time limit of {limit:g} s reached")
        finally:
            self.service.scheduler.leave(self.handle)
            self._release_admission()  # the slot is free now: a queued client need not wait for the flush
            self.service.sessions.discard(self)
            receiver.cancel()
            feeder.cancel()
            await asyncio.gather(receiver, feeder, return_exceptions=True)
            await self._drain_and_close(sender)
            self.record.frames_in = self.handle.frames_in
            self.record.frames_late = self.handle.frames_silence

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the session (first call wins); ``error`` is sent as kind 5 after the pending output. A
        "client_closed" seen after the guard closed the socket takes the guard's reason."""
        if reason == "client_closed":
            reason = self._guard_reason() or reason
        if self.end_reason is None:
            self.end_reason = reason
            self.end_error = error
        self.done.set()

    async def _drain_and_close(self, sender: asyncio.Future) -> None:
        """Flush the outbox (bounded time), send the kind-5 error if any, close the socket.

        A client that closed or is too slow to read gets no flush: its pending output is dropped.
        """
        await self.outbound.flush(sender, flush=self.end_reason not in NO_FLUSH_REASONS)
        if self.end_error is not None and self.end_reason != "client_closed":
            try:
                await asyncio.wait_for(self.send_now(protocol.encode_error(self.end_error)), timeout=1.0)
            except Exception:  # noqa: BLE001 - the client may be gone already
                logger.debug("session %s: could not send the error", self.id, exc_info=True)
        await self._close()

    async def send_now(self, data: bytes) -> None:
        await self.ws.send_bytes(data)
        self.outbound.record_written(data)
        self.record.bytes_out += len(data)
        self.service.metrics.bytes.labels("out").inc(len(data))

    async def _close(self) -> None:
        """Close the socket; bounded in time (a peer that reads nothing can block the close frame
        behind unsent output, and the admission slot is only released after this)."""
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            try:
                await asyncio.wait_for(self.ws.close(), timeout=CLOSE_TIMEOUT_SECONDS)
            except Exception:  # noqa: BLE001 - already closed by the peer, or it does not read
                logger.debug("session %s: close not completed", self.id, exc_info=True)

    # ------------------------------------------------------------------ scheduler callbacks (loop thread)
    def deliver(self, pcm: np.ndarray, text_id: int, tokens: np.ndarray, arrived: float | None = None) -> None:
        """Queue one output frame for sending (``arrived``: when the user frame its step consumed arrived)."""
        if not self.done.is_set():
            self.outbound.deliver(pcm, text_id, tokens, arrived, self.finish)

    def fail(self, reason: str, end_reason: str = "server_error") -> None:
        """The scheduler ends the session (model failure, or overload past the hard bound)."""
        self.finish(end_reason, reason)
